"""One destination's sender: claims what is due, sends it, and records the truth.

``hermes-py dispatch NAME`` runs ``run(cfg, NAME)``: ``max_associations`` worker
threads, each with its own claim area (``spool.Worker``) and its own
destination object (its own pynetdicom AE), plus a main thread for upkeep
(flags, recovering dead workers' claims, expiring what waited too long).

What it promises, and how:

- Nothing is lost or deleted because a destination was down. An instance leaves
  the outbox only by being claimed (a rename, so two workers, processes or
  hosts never own it at once); a claim ends in success/NAME/, error/NAME/, or
  back in the outbox. A killed dispatcher's claims go back to the outbox when
  any dispatcher of that destination next runs ``Worker.recover`` (the flock
  of a dead process is gone, so this needs no timeout).
- error/ only for what can never succeed (permanent statuses, no usable
  presentation context, an unconvertible transfer syntax) or what waited longer
  than ``give_up_after`` since it was queued while failing. A permanent
  association rejection (an AE title typo) marks the destination
  "misconfigured": everything stays queued, retried every ``max_delay``, with
  one loud line per attempt. Nothing expires while misconfigured or held.
- Two levels of backoff. When the destination cannot be reached it is backed
  off as a whole: one probe (a single instance) per interval, exponential from
  ``initial_delay`` to ``max_delay`` with jitter, and the instances' own timers
  are left alone, so when a probe succeeds the whole backlog drains at full
  speed. Only a failure of one instance (0xA7xx on it, the association dying
  while it was in flight) pushes out that instance's own next attempt (its
  sidecar's mtime).
- Answered instances are moved to success/ a few at a time (their sidecars
  share one flush, see ``_delivered``) and at the latest when their batch
  ends, so a crash resends at most the batch in flight (at-least-once delivery).
- Flags from admin commands: ``state/NAME.hold`` = send nothing (checked between
  instances), ``state/NAME.flush`` = everything due now, backoff forgotten, once.

The destination's reachability is ``destination_state.py``; the wire is the
destination type's (``destinations``); this module owns the queue.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hermes_py import destinations, dicomfile
from hermes_py.commitment import Commitments
from hermes_py.config import Settings
from hermes_py.destination_state import POLL, DestinationState, backoff_delay
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, Item, Probe, Workspace
from hermes_py.durations import fmt_duration
from hermes_py.events import emit
from hermes_py.failover import Failover
from hermes_py.lifecycle import DestinationStatus, Event
from hermes_py.outcomes import LinkFailure, Outcome, Result, escalate
from hermes_py.ownership import Fence
from hermes_py.picker import Picker
from hermes_py.process import start_thread, stop_on_signals
from hermes_py.severed import judge_severed, severed_attempts
from hermes_py.spool import (
    DCM,
    JSON,
    Flag,
    SidecarBatch,
    Spool,
    Worker,
    now_iso,
    parse_iso,
    received_at,
)
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)

RECOVER_EVERY = 30.0     # return dead workers' claims
EXPIRE_EVERY = 60.0      # give_up_after sweep while the destination is unreachable
PROBE_BATCH = 1          # instances tried while a destination is backed off
SUCCESS_FLUSH_COUNT = 32   # delivered instances whose success/ sidecars share one flush
SUCCESS_FLUSH_AGE = 0.25   # ... or the oldest of them waited this long (at the next answer)


# ---------------------------------------------------------------- the dispatcher


@dataclass
class _Delivered:
    """An answered instance whose move to success/ waits for the next flush."""

    item: Item
    sidecar: sc.Sidecar
    result: Result


@dataclass
class Slot:
    """One worker thread's own things: claim area, destination object (own AE)."""

    worker: Worker
    dest: Destination
    sidecars: dict[Path, sc.Sidecar] = field(default_factory=dict)
    # success/ sidecars written (not yet flushed) and the instances they belong to
    writes: SidecarBatch | None = None
    delivered: list[_Delivered] = field(default_factory=list)
    delivered_since: float = 0.0


class Dispatcher:
    """Dispatcher of destination ``name``. ``serve(stop)`` runs it; ``run_once()`` is for tests."""

    def __init__(self, cfg: Settings, name: str, *, poll: float = POLL,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.name = name
        self.settings = cfg.destination(name)
        self.retry = self.settings.retry
        self.poll = poll
        self.rng = rng or random.Random()
        self.spool = Spool(cfg.spool.path)
        self.spool.ensure([name])
        self.state = DestinationState(self.spool, self.settings, self.rng)
        self.picker = Picker(self.spool, name, max(4 * self.settings.batch_size, 1000))
        self.slots: list[Slot] = []
        self._upkeep_worker: Worker | None = None
        self._last_recover = 0.0
        self._last_expire = 0.0
        self._started = False
        self._prober: Destination | None = None   # the upkeep thread's own (failover probes)
        self.fence = Fence(self.spool)   # stop sending once another serve owns the spool
        self.commitments = Commitments(self.spool, self.settings)   # storage_commitment
        policy = self.settings.failover
        self.failover = (Failover(self.spool, name, policy, self.state, self._probe,
                                  self.queued) if policy is not None else None)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._started:
            return
        Worker.recover(self.spool, self.name)
        self._last_recover = time.time()
        if self.failover is not None:
            self.failover.reconcile()
        # Sidecar temps never queue behind other stages' creates, and converted copies
        # live where the tmp sweep removes them once this process is dead.
        workspace = Workspace(scratch=self.spool.use_private_tmp(),
                              max_inflated=self.cfg.limits.max_inflated)
        for _ in range(self.settings.max_associations):
            w = Worker(self.spool, self.name)
            w.start()
            self.slots.append(Slot(w, destinations.create(self.settings, w.id, workspace)))
        self._upkeep_worker = Worker(self.spool, self.name)
        self._upkeep_worker.start()
        self._started = True
        LOG.info("dispatcher %s: %d worker(s) -> %s, state %s", self.name, len(self.slots),
                 destinations.describe(self.settings), self.state.state)

    def close(self) -> None:
        """Return unfinished claims (clean stop) and let go of the worker locks."""
        for slot in self.slots:
            slot.worker.stop()
            slot.dest.close()
        if self._upkeep_worker is not None:
            self._upkeep_worker.stop()
        if self._prober is not None:
            self._prober.close()
            self._prober = None
        self.commitments.close()
        self.spool.release_private_tmp()
        self.slots = []
        self._upkeep_worker = None
        self._started = False

    def __enter__(self) -> Dispatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; workers stop between instances."""
        self.start()
        threads = [start_thread(self._worker_loop, f"dispatch-{self.name}-{i}", (slot, stop))
                   for i, slot in enumerate(self.slots)]
        try:
            while not stop.is_set():
                try:
                    self.upkeep(time.time())
                except Exception:  # upkeep must never take the sender down
                    LOG.exception("dispatcher %s: upkeep failed", self.name)
                stop.wait(self.poll)
        finally:
            stop.set()
            for t in threads:
                t.join()
            self.close()
            LOG.info("dispatcher %s stopped", self.name)

    def run_once(self) -> int:
        """Upkeep plus one batch in this thread (tests); returns instances handled."""
        self.start()
        self.upkeep(time.time())
        return self._cycle(self.slots[0], lambda: False)

    # ------------------------------------------------------------ upkeep

    def held(self) -> bool:
        return self.spool.has_flag(self.name, Flag.HOLD)

    def _probe(self) -> Probe:
        if self._prober is None:
            self._prober = destinations.create(self.settings, "probe", SYSTEM_TEMP)
        return self._prober.probe()

    def queued(self) -> int:
        return sum(1 for f in self.spool.outboxes(self.name) for _ in self.spool.scan(f))

    def upkeep(self, now: float) -> None:
        if not self.fence.check(f"dispatcher {self.name}"):
            return
        if self.spool.has_flag(self.name, Flag.FLUSH):
            self._flush(now)
        if now - self._last_recover >= RECOVER_EVERY:
            self._last_recover = now
            if Worker.recover(self.spool, self.name):
                self.picker.invalidate()
        if (self.state.state == DestinationStatus.BACKOFF
                and now - self._last_expire >= EXPIRE_EVERY and not self.held()):
            self._last_expire = now
            self.expire(now)
        if self.failover is not None and not self.held() and self.failover.upkeep(now):
            self.picker.invalidate()
        if self.commitments.upkeep(now):   # failed commitments went back to the queue
            self.picker.invalidate()
        self.state.heartbeat(now)

    def _flush(self, now: float) -> None:
        n = 0
        for folder in self.spool.outboxes(self.name):
            for e in self.spool.scan(folder):
                try:
                    Spool.set_next_attempt(Path(e.path), now)
                    n += 1
                except FileNotFoundError:
                    continue
        self.state.flush(now)
        asked = self.commitments.flush(now)   # storage commitment asked twice: once more
        self.picker.invalidate()
        self.spool.clear_flag(self.name, Flag.FLUSH)
        emit(LOG, Event.DESTINATION_FLUSHED, dest=self.name, level=logging.WARNING,
             message=f"destination {self.name}: FLUSH requested: {n} queued instance(s) due "
                     "now, backoff cleared" + (f", {asked} storage commitment request(s) asked "
                                               "again" if asked else ""), due=n)

    def expire(self, now: float) -> int:
        """Move what waited longer than give_up_after (since queued) to error/NAME/.

        Runs while the destination is unreachable, so a long outage ends in
        error/ (where an admin sees it) rather than in a queue that never
        drains. A spool name holds the receive time, which is never after
        queued_at, so only old names cost a sidecar read.
        """
        w = self._upkeep_worker
        if w is None:
            return 0
        give_up = self.retry.give_up_after
        n = 0
        for folder in self.spool.outboxes(self.name):
            for e in list(self.spool.scan(folder)):
                name = e.name[: -len(DCM)]
                rt = received_at(name)
                if rt is not None and now - rt <= give_up:
                    continue
                data = self.spool.read_sidecar(Path(e.path))
                queued = parse_iso(data.get("queued_at")) or rt or now
                if now - queued <= give_up:
                    continue
                claimed = w.claim(Path(e.path))
                if claimed is None:
                    continue
                data = self.spool.read_sidecar(claimed) or data
                last = self.state.last_error or {}
                why = self._gave_up(f"destination unreachable: {last.get('kind', '?')}: "
                                    f"{last.get('detail', '')}")
                self._fail(claimed, data, why, None, event=Event.GAVE_UP)
                n += 1
        if n:
            self.picker.invalidate()
        return n

    # ------------------------------------------------------------ workers

    def _worker_loop(self, slot: Slot, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self._cycle(slot, stop.is_set):
                    continue
            except Exception:
                LOG.exception("dispatcher %s: worker %s failed; its claims go back to the "
                              "outbox", self.name, slot.worker.id)
                self._return_leftovers(slot)
            stop.wait(self._until_ready())

    def _until_ready(self) -> float:
        bu = self.state.backoff_until
        if bu is None:
            return self.poll
        return max(0.01, min(self.poll, bu - time.time()))

    def _cycle(self, slot: Slot, should_stop: Callable[[], bool]) -> int:
        """One batch: claim, send, record. Returns how many instances were handled."""
        if self.held() or (self.failover is not None and self.failover.diverting) \
                or self.fence.lost is not None:
            return 0
        now = time.time()
        wait, probe = self.state.begin(now)
        if wait > 0:
            return 0
        try:
            n = PROBE_BATCH if probe else self.settings.batch_size
            claimed = self.picker.pick(slot.worker, n, now)
            if not claimed:
                return 0
            items = self._items(slot, claimed)
            if not items:
                return len(claimed)
            started = time.time()
            answered: set[Path] = set()
            contacted = [False]

            def report(item: Item, result: Result) -> None:
                answered.add(item.path)
                self._record(slot, item, result, others_answered=contacted[0])
                if result.status is not None or result.outcome is not Outcome.TRANSIENT:
                    contacted[0] = True

            failure = slot.dest.deliver(items, report,
                                        lambda: should_stop() or self.held())
            unanswered = [i for i in items if i.path not in answered]
            if failure is not None:
                self.picker.invalidate()  # what goes back is the oldest: pick it first next
                delay = self.state.failure(failure, time.time(), self.queued() + len(unanswered))
                for item in unanswered:
                    self._defer(slot, item, failure, delay)
            else:
                for item in unanswered:
                    self._unclaim(slot, item.path)
                if contacted[0]:
                    self.state.success(time.time(), started)
            return len(items)
        finally:
            if probe:
                self.state.end_probe()
            try:
                self._flush_delivered(slot)
            except OSError:
                LOG.exception("dispatcher %s: cannot record delivered instances in success/; "
                              "they go back to the outbox and are sent again", self.name)
            self._return_leftovers(slot)
            slot.sidecars.clear()

    def _items(self, slot: Slot, claimed: list[Path]) -> list[Item]:
        """Items for the claimed files, urgent first, then grouped by study and series.

        An instance whose send once ended its association goes last and alone:
        at most one per batch (the others go back untouched, due as they were),
        so its next abort costs no other instance a resend and, when the ones
        before it were answered, shows the association worked for them.
        """
        rows: list[tuple[int, int, int, int, int, Item]] = []
        suspect_taken = False
        studies: dict[str, int] = {}
        series: dict[str, int] = {}
        now = time.time()
        for i, path in enumerate(claimed):
            data = self.spool.read_sidecar(path)
            name = path.name[: -len(DCM)]
            sop = str(data.get("sop_instance_uid") or "")
            cls = str(data.get("sop_class_uid") or "")
            ts = str(data.get("transfer_syntax") or "")
            if not (sop and cls and ts):
                try:
                    msop, mcls, mts = dicomfile.meta_uids(path)
                    sop, cls, ts = sop or msop, cls or mcls, ts or mts
                except Exception as e:  # anything pydicom raises on a broken file
                    self._fail(path, data, f"not a readable DICOM file: {type(e).__name__}: "
                                           f"{e}", None)
                    continue
                if not (sop and cls and ts):
                    self._fail(path, data, "the file's meta header lacks the SOP class, SOP "
                                           "instance or transfer syntax UID", None)
                    continue
            suspect = severed_attempts(data) > 0
            if suspect and suspect_taken:
                self._unclaim(slot, path)
                continue
            suspect_taken = suspect_taken or suspect
            if "queued_at" not in data:
                data["queued_at"] = now_iso(received_at(name) or now)
            slot.sidecars[path] = data
            st = str(data.get("study_instance_uid") or "")
            se = str(data.get("series_instance_uid") or "")
            s_rank = studies.setdefault(st, len(studies))
            r_rank = series.setdefault(se, len(series))
            prio = 0 if data.get("priority") == "urgent" else 1
            facts = {k: str(data.get(k) or "") for k in ("calling_ae", "called_ae",
                                                           "peer_address")}
            rows.append((int(suspect), prio, s_rank, r_rank, i, Item(path=path, name=name,
                                                       sop_instance_uid=sop, sop_class_uid=cls,
                                                       transfer_syntax=ts, study=st, series=se,
                                                       facts=facts)))
        rows.sort(key=lambda r: r[:5])
        return [r[5] for r in rows]

    # ------------------------------------------------------------ recording outcomes

    def _attempt(self, data: sc.Sidecar, now: float, outcome: str, result: Result | None,
                 reason: str, detail: str = "", scope: str | None = None) -> sc.Sidecar:
        return sc.attempted(data, self.name, now, outcome,
                            status=result.status_hex if result else None, reason=reason,
                            detail=detail, scope=scope,
                            association=result.association if result else None)

    def _gave_up(self, last: str) -> str:
        return (f"gave up after {fmt_duration(self.retry.give_up_after)} (give_up_after) "
                f"queued; {last}")

    def _record(self, slot: Slot, item: Item, result: Result,
                others_answered: bool = False) -> None:
        now = time.time()
        data = slot.sidecars.get(item.path) or self.spool.read_sidecar(item.path)
        outcome = result.outcome
        same = 0
        if outcome is Outcome.TRANSIENT and result.status is not None:
            same = sum(1 for h in data.get("history") or []
                       if h.get("status") == result.status_hex)
            outcome = escalate(outcome, result.status, same)
        reason = result.reason
        if outcome is not result.outcome:
            reason = f"{reason} (still failing after {same + 1} attempts)"
        if result.severed:
            outcome, reason = judge_severed(data, result, others_answered,
                                            parse_iso(self.state.last_success))
        d = self._attempt(data, now, outcome, result, reason, result.detail,
                          scope=sc.Scope.SEVERED if result.severed else None)
        try:
            if outcome is Outcome.SUCCESS:
                done = sc.delivered(d, now, result.delivered_as, result.warnings)
                if result.coerced is not None:
                    done["coerced"] = sc.Coerced(set=result.coerced.get("set", []),
                                                 removed=result.coerced.get("removed", []))
                self._delivered(slot, item, done, result, now)
            elif outcome is Outcome.TRANSIENT:
                if self._expired(d, now):
                    self._fail(item.path, d, self._gave_up(f"last error: {reason}"), result,
                               recorded=True, event=Event.GAVE_UP)
                    return
                # Only this instance's own failures grow its delay; tries that met a
                # destination-level failure are the destination's backoff's business.
                own = sum(1 for h in d.get("history") or [] if h.get("outcome") == Outcome.TRANSIENT
                          and h.get("scope") != sc.Scope.DESTINATION)
                delay = backoff_delay(own, self.retry, self.rng)
                d["next_attempt"] = now_iso(now + delay)
                self._unclaim(slot, item.path, sidecar=d, mtime=now + delay)
                emit(LOG, Event.RETRIED, item.sop_instance_uid, self.name, logging.WARNING,
                     status=result.status_hex, reason=reason, attempt=d.get("attempts"),
                     next_in=fmt_duration(delay))
            else:
                self._fail(item.path, d, reason, result, recorded=True)
        except FileNotFoundError:
            LOG.error("destination %s: %s vanished from its claim while being recorded",
                      self.name, item.path)
        finally:
            slot.sidecars.pop(item.path, None)

    def _delivered(self, slot: Slot, item: Item, d: sc.Sidecar, result: Result,
                   now: float) -> None:
        """Queue the move to success/: its sidecar is written now, fsynced with the others'.

        Answered instances are fsynced together (a ``SidecarBatch``): when
        SUCCESS_FLUSH_COUNT wait, when an answer comes SUCCESS_FLUSH_AGE or more
        after the first waiting one, and when the batch ends. Until then they
        stay claimed in active/: a crash sends them again, which is
        at-least-once within the batch in flight, as the design promises.
        """
        if slot.writes is None:
            slot.writes = self.spool.sidecar_batch()
        if not slot.delivered:
            slot.delivered_since = now
        slot.writes.write(self.commitments.landing / (item.name + JSON), d)
        slot.delivered.append(_Delivered(item, d, result))
        if (len(slot.delivered) >= SUCCESS_FLUSH_COUNT
                or now - slot.delivered_since >= SUCCESS_FLUSH_AGE):
            self._flush_delivered(slot)

    def _flush_delivered(self, slot: Slot) -> None:
        """The queued success/ sidecars durable, then their instances moved beside them."""
        pending, slot.delivered = slot.delivered, []
        if not pending:
            return
        assert slot.writes is not None
        slot.writes.commit()  # on failure nothing moved: the claims go back to the outbox
        folder = self.commitments.landing   # success/, or committing/ (storage commitment)
        for p in pending:
            item, d, result = p.item, p.sidecar, p.result
            try:
                self.spool.move(item.path, folder, written=True)
            except FileNotFoundError:
                LOG.error("destination %s: %s vanished from its claim while being recorded",
                          self.name, item.path)
                continue
            self.commitments.delivered(item)
            emit(LOG, Event.SENT, item.sop_instance_uid, self.name,
                 status=result.status_hex, ts=result.delivered_as, attempts=d.get("attempts"),
                 size=d.get("size"),
                 warning="; ".join(result.warnings) if result.warnings else None)

    def _defer(self, slot: Slot, item: Item, failure: LinkFailure, delay: float) -> None:
        """Not sent because the destination failed as a whole: back to the queue, due as
        before (its own timer is not pushed out; the destination's backoff governs)."""
        now = time.time()
        data = slot.sidecars.get(item.path) or self.spool.read_sidecar(item.path)
        d = self._attempt(data, now, Outcome.TRANSIENT, None, str(failure.kind), failure.detail,
                          scope=sc.Scope.DESTINATION)
        d["next_attempt"] = now_iso(now + delay)
        try:
            if not failure.misconfigured and self._expired(d, now):
                self._fail(item.path, d, self._gave_up(f"last error: {failure}"), None,
                           recorded=True, event=Event.GAVE_UP)
                return
            due = min(Spool.next_attempt(item.path) or now, now)
            self._unclaim(slot, item.path, sidecar=d, mtime=due)
            emit(LOG, Event.DEFERRED, item.sop_instance_uid, self.name, reason=str(failure),
                 next_probe_in=fmt_duration(delay))
        except FileNotFoundError:
            LOG.error("destination %s: %s vanished from its claim", self.name, item.path)
        finally:
            slot.sidecars.pop(item.path, None)

    def _expired(self, d: sc.Sidecar, now: float) -> bool:
        queued = parse_iso(d.get("queued_at"))
        if queued is None:
            queued = received_at(str(d.get("name") or "")) or now
        return now - queued > self.retry.give_up_after

    def _fail(self, path: Path, data: sc.Sidecar, reason: str, result: Result | None,
              recorded: bool = False, event: Event = Event.FAILED) -> None:
        """To error/NAME/ with the reason and the full history; an admin decides."""
        now = time.time()
        d = data if recorded else self._attempt(data, now, Outcome.PERMANENT, result, reason)
        d["next_attempt"] = None
        dst = self.spool.quarantine(path, reason, stage="dispatch", dest=self.name, sidecar=d)
        emit(LOG, event, str(d.get("sop_instance_uid") or path.name), self.name,
             logging.ERROR, status=result.status_hex if result else None, reason=reason,
             moved_to=str(dst.parent))

    def _unclaim(self, slot: Slot, path: Path, sidecar: sc.Sidecar | None = None,
                 mtime: float | None = None) -> None:
        slot.worker.unclaim(path, mtime=mtime, sidecar=sidecar)

    def _return_leftovers(self, slot: Slot) -> None:
        """Whatever is still in this worker's claim area goes back untouched."""
        slot.worker.return_all()


# ---------------------------------------------------------------- process entry


def run(cfg: Settings, name: str) -> int:
    """``hermes-py dispatch NAME``: serve until SIGTERM/SIGINT, then stop between instances."""
    stop = threading.Event()
    stop_on_signals(stop, also=lambda: LOG.info(
        "dispatcher %s: stopping after the instance in flight", name))
    Dispatcher(cfg, name).serve(stop)
    return 0
