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
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pydicom.filereader import read_file_meta_info

from hermes_py import destinations, log
from hermes_py.config import DestinationSettings, RetryPolicy, Settings
from hermes_py.destinations.base import Destination, Item
from hermes_py.errors import HermesError
from hermes_py.outcomes import LinkFailure, Outcome, Result, escalate
from hermes_py.spool import DCM, JSON, Spool, Worker, Writes, now_iso, parse_iso, received_at

LOG = logging.getLogger(__name__)

POLL = 0.5               # idle poll: new work, flags, backoff expiry
RECOVER_EVERY = 30.0     # return dead workers' claims
EXPIRE_EVERY = 60.0      # give_up_after sweep while the destination is unreachable
HEARTBEAT_EVERY = 30.0   # state file rewritten at least this often (updated_at)
SUCCESS_WRITE_EVERY = 5.0  # last_success in the state file lags at most this much
RESCAN_EVERY = 5.0       # candidate list refreshed at least this often
HISTORY_MAX = 200        # attempts kept in a sidecar (first one + the latest)
PROBE_BATCH = 1          # instances tried while a destination is backed off
SUCCESS_FLUSH_COUNT = 32   # delivered instances whose success/ sidecars share one flush
SUCCESS_FLUSH_AGE = 0.25   # ... or the oldest of them waited this long (at the next answer)

STATE_OK = "ok"
STATE_BACKOFF = "backoff"
STATE_MISCONFIGURED = "misconfigured"


# ---------------------------------------------------------------- small helpers


def fmt_duration(seconds: float) -> str:
    """``250ms``, ``45s``, ``90s``, ``30m``, ``36h``, ``3d``: as one writes it in rules.toml."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= 2 * size or (seconds >= size and seconds % size == 0):
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


def backoff_delay(failures: int, retry: RetryPolicy, rng: random.Random) -> float:
    """initial_delay * 2^(failures-1), at most max_delay, +-20 % jitter (never above max).

    The jitter spreads a backlog that came due at once (after an outage) and
    several dispatchers probing one destination.
    """
    base = min(retry.max_delay, retry.initial_delay * 2.0 ** min(max(failures - 1, 0), 60))
    return min(retry.max_delay, base * rng.uniform(0.8, 1.2))


# ---------------------------------------------------------------- destination state


class DestinationState:
    """Reachability of one destination, shared by the workers and written to state/NAME.json.

    Several dispatcher processes may serve one destination: whoever wrote the
    state file last is believed (``refresh``), so one process's backoff holds
    the others back too and a success anywhere releases everyone.
    """

    def __init__(self, spool: Spool, dest: DestinationSettings, rng: random.Random):
        self.spool = spool
        self.dest = dest
        self.path = spool.state_file(dest.name)
        self.rng = rng
        self.lock = threading.Lock()
        self.state = STATE_OK
        self.backoff_until: float | None = None
        self.failures = 0
        self.failed_at: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_success: str | None = None
        self._probing = False
        self._written: str | None = None
        self._written_at = 0.0
        self.refresh(force=True)
        # A (re)started dispatcher probes at once instead of sitting out a backoff a
        # previous process chose: after an admin fixed an AE title and restarted, the
        # queue should move now, not in max_delay.
        self.backoff_until = None

    # what the admin reads; docs/internals.md has this exact shape
    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "destination": self.dest.name,
            "state": self.state,
            "backoff_until": self.backoff_until if self.state != STATE_OK else None,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "last_success": self.last_success,
            "updated_at": now_iso(now),
        }

    def _write(self, now: float) -> None:
        snap = self.snapshot(now)
        try:
            self.spool.write_json(self.path, snap)
        except OSError as e:  # a full disk must not stop deliveries
            LOG.warning("destination %s: cannot write %s: %s", self.dest.name, self.path, e)
            return
        self._written = snap["updated_at"]
        self._written_at = now

    def refresh(self, force: bool = False) -> None:
        """Adopt the state file if another process wrote it after our last write.

        Read and compared under the lock, so a worker's write cannot slip in
        between and be overwritten by an older file's content.
        """
        with self.lock:
            data = self.spool.read_json(self.path)
            stamp = data.get("updated_at")
            if not data or not isinstance(stamp, str):
                return
            if not force and self._written is not None and stamp <= self._written:
                return  # ours, or older than ours (ISO-8601 UTC strings sort by time)
            st = data.get("state")
            if st in (STATE_OK, STATE_BACKOFF, STATE_MISCONFIGURED):
                self.state = st
            bu = data.get("backoff_until")
            self.backoff_until = float(bu) if isinstance(bu, int | float) else None
            cf = data.get("consecutive_failures")
            self.failures = int(cf) if isinstance(cf, int) else 0
            le = data.get("last_error")
            self.last_error = le if isinstance(le, dict) else None
            ls = data.get("last_success")
            self.last_success = ls if isinstance(ls, str) else None
            if self.state != STATE_OK:
                self.failed_at = parse_iso((self.last_error or {}).get("at")) or time.time()
            self._written = stamp

    def begin(self, now: float) -> tuple[float, bool]:
        """(seconds to wait, is_probe). One probe at a time while in backoff."""
        with self.lock:
            if self.backoff_until is not None and self.backoff_until > now:
                return self.backoff_until - now, False
            if self.state == STATE_OK:
                return 0.0, False
            if self._probing:
                return POLL, False
            self._probing = True
            return 0.0, True

    def end_probe(self) -> None:
        with self.lock:
            self._probing = False

    def failure(self, link: LinkFailure, now: float, queued: int) -> float:
        """Back the destination off; returns the delay. Loud on change, and always when
        misconfigured (someone must fix a config file)."""
        with self.lock:
            self._probing = False
            self.failures += 1
            if link.misconfigured:
                new = STATE_MISCONFIGURED
                delay = self.dest.retry.max_delay * self.rng.uniform(0.9, 1.0)
            else:
                new = STATE_BACKOFF
                delay = backoff_delay(self.failures, self.dest.retry, self.rng)
            changed = new != self.state
            self.state = new
            self.backoff_until = now + delay
            self.failed_at = now
            self.last_error = {"at": now_iso(now), "kind": str(link.kind), "detail": link.detail}
            self._write(now)
            failures = self.failures
        name = self.dest.name
        if link.misconfigured:
            LOG.error("destination %s is MISCONFIGURED: %s. Keeping all %d queued instance(s); "
                      "fix the AE titles/host/port in rules.toml or at the destination. "
                      "Retrying in %s.", name, link, queued, fmt_duration(delay))
        elif changed:
            LOG.warning("destination %s is UNAVAILABLE: %s. Backing off (next probe in %s); "
                        "%d instance(s) stay queued.", name, link, fmt_duration(delay), queued)
        else:
            LOG.info("destination %s still unavailable after %d attempt(s): %s; next probe "
                     "in %s", name, failures, link, fmt_duration(delay))
        return delay

    def success(self, now: float, started_at: float) -> None:
        """A destination answered. It only clears a backoff if the association that
        answered was opened after the failure (an older one proves nothing new)."""
        with self.lock:
            self._probing = False
            first = self.last_success is None
            self.last_success = now_iso(now)
            recovered = self.state != STATE_OK and (self.failed_at is None
                                                    or started_at >= self.failed_at)
            if recovered:
                old, failures = self.state, self.failures
                self.state = STATE_OK
                self.failures = 0
                self.backoff_until = None
                self.failed_at = None
            if recovered or first or now - self._written_at >= SUCCESS_WRITE_EVERY:
                self._write(now)
        if recovered:
            LOG.warning("destination %s is AVAILABLE again (was %s, %d failed attempt(s)); "
                        "draining the queue", self.dest.name, old, failures)

    def flush(self, now: float) -> None:
        with self.lock:
            self.backoff_until = None
            self._probing = False
            self._write(now)

    def heartbeat(self, now: float) -> None:
        with self.lock:
            if now - self._written_at >= HEARTBEAT_EVERY:
                self._write(now)


# ---------------------------------------------------------------- picking work


class Picker:
    """Due instances, urgent first then oldest first, claimed for one worker.

    One scan of an outbox feeds many batches (a candidate list refreshed when
    used up or older than RESCAN_EVERY), so a large backlog costs one scandir
    per thousand instances, not one per batch (DESIGN.md invariant 6). Every
    candidate is re-checked (one stat) and claimed by rename, so a stale list
    is harmless: another process may have taken or rescheduled an entry.
    """

    def __init__(self, spool: Spool, dest: str, size: int):
        self.spool = spool
        self.folders = spool.outboxes(dest)
        self.size = size
        self.lock = threading.Lock()
        self._cache: dict[Path, tuple[deque[Path], float]] = {}

    def invalidate(self) -> None:
        with self.lock:
            self._cache.clear()

    def pick(self, worker: Worker, n: int, now: float) -> list[Path]:
        claimed: list[Path] = []
        with self.lock:
            for folder in self.folders:
                rescanned = False
                while len(claimed) < n:
                    q, at = self._cache.get(folder, (deque(), 0.0))
                    if not q or now - at > RESCAN_EVERY:
                        if rescanned:
                            break
                        q = deque(self.spool.oldest(folder, self.size, due_before=now))
                        self._cache[folder] = (q, now)
                        rescanned = True
                        if not q:
                            break
                    p = q.popleft()
                    if self.spool.next_attempt(p) > now:
                        continue
                    c = worker.claim(p)
                    if c is not None:
                        claimed.append(c)
                if len(claimed) >= n:
                    break
        return claimed


# ---------------------------------------------------------------- the dispatcher


@dataclass
class _Delivered:
    """An answered instance whose move to success/ waits for the next flush."""

    item: Item
    sidecar: dict[str, Any]
    result: Result


@dataclass
class Slot:
    """One worker thread's own things: claim area, destination object (own AE)."""

    worker: Worker
    dest: Destination
    sidecars: dict[Path, dict[str, Any]] = field(default_factory=dict)
    # success/ sidecars written (not yet flushed) and the instances they belong to
    writes: Writes | None = None
    delivered: list[_Delivered] = field(default_factory=list)
    delivered_since: float = 0.0


class Dispatcher:
    """Dispatcher of destination ``name``. ``serve(stop)`` runs it; ``run_once()`` is for tests."""

    def __init__(self, cfg: Settings, name: str, *, poll: float = POLL,
                 rng: random.Random | None = None):
        if name not in cfg.destinations:
            known = ", ".join(sorted(cfg.destinations)) or "none defined"
            raise HermesError(f"unknown destination {name!r} (defined: {known})")
        self.cfg = cfg
        self.name = name
        self.settings = cfg.destinations[name]
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

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._started:
            return
        Worker.recover(self.spool, self.name)
        self._last_recover = time.time()
        self.spool.use_private_tmp()  # sidecar temps never queue behind other stages' creates
        for _ in range(self.settings.max_associations):
            w = Worker(self.spool, self.name)
            w.start()
            self.slots.append(Slot(w, destinations.create(self.settings, label=w.id)))
        self._upkeep_worker = Worker(self.spool, self.name)
        self._upkeep_worker.start()
        self._started = True
        LOG.info("dispatcher %s: %d worker(s) -> %s@%s:%d (calling AE %s), state %s",
                 self.name, len(self.slots), self.settings.ae_title, self.settings.host,
                 self.settings.port, self.settings.calling_ae_title, self.state.state)

    def close(self) -> None:
        """Return unfinished claims (clean stop) and let go of the worker locks."""
        for slot in self.slots:
            slot.worker.stop()
            slot.dest.close()
        if self._upkeep_worker is not None:
            self._upkeep_worker.stop()
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
        threads = [threading.Thread(target=self._worker_loop, args=(slot, stop),
                                    name=f"dispatch-{self.name}-{i}", daemon=True)
                   for i, slot in enumerate(self.slots)]
        for t in threads:
            t.start()
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
        return self.spool.hold_flag(self.name).exists()

    def queued(self) -> int:
        return sum(1 for f in self.spool.outboxes(self.name) for _ in self.spool.scan(f))

    def upkeep(self, now: float) -> None:
        self.state.refresh()
        flag = self.spool.flush_flag(self.name)
        if flag.exists():
            self._flush(now, flag)
        if now - self._last_recover >= RECOVER_EVERY:
            self._last_recover = now
            if Worker.recover(self.spool, self.name):
                self.picker.invalidate()
        if (self.state.state == STATE_BACKOFF and now - self._last_expire >= EXPIRE_EVERY
                and not self.held()):
            self._last_expire = now
            self.expire(now)
        self.state.heartbeat(now)

    def _flush(self, now: float, flag: Path) -> None:
        n = 0
        for folder in self.spool.outboxes(self.name):
            for e in self.spool.scan(folder):
                try:
                    Spool.set_next_attempt(Path(e.path), now)
                    n += 1
                except FileNotFoundError:
                    continue
        self.state.flush(now)
        self.picker.invalidate()
        try:
            os.unlink(flag)
        except FileNotFoundError:
            pass
        LOG.warning("destination %s: FLUSH requested: %d queued instance(s) due now, backoff "
                    "cleared", self.name, n)

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
                data = self.spool.read_json(Path(e.path[: -len(DCM)] + ".json"))
                queued = parse_iso(data.get("queued_at")) or rt or now
                if now - queued <= give_up:
                    continue
                claimed = w.claim(Path(e.path))
                if claimed is None:
                    continue
                data = self.spool.read_sidecar(claimed) or data
                last = self.state.last_error or {}
                reason = (f"gave up after {fmt_duration(give_up)} (give_up_after) queued; "
                          f"destination unreachable: {last.get('kind', '?')}: "
                          f"{last.get('detail', '')}")
                self._fail(claimed, data, reason, None)
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
        if self.held():
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
                if result.status is not None or result.outcome is not Outcome.TRANSIENT:
                    contacted[0] = True
                self._record(slot, item, result)

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
        """Items for the claimed files, urgent first, then grouped by study and series."""
        rows: list[tuple[int, int, int, int, Item]] = []
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
                    meta = read_file_meta_info(path)
                    sop = sop or str(meta.get("MediaStorageSOPInstanceUID", ""))
                    cls = cls or str(meta.get("MediaStorageSOPClassUID", ""))
                    ts = ts or str(meta.get("TransferSyntaxUID", ""))
                except Exception as e:  # anything pydicom raises on a broken file
                    self._fail(path, data, f"not a readable DICOM file: {type(e).__name__}: "
                                           f"{e}", None)
                    continue
                if not (sop and cls and ts):
                    self._fail(path, data, "the file's meta header lacks the SOP class, SOP "
                                           "instance or transfer syntax UID", None)
                    continue
            if "queued_at" not in data:
                data["queued_at"] = now_iso(received_at(name) or now)
            slot.sidecars[path] = data
            st = str(data.get("study_instance_uid") or "")
            se = str(data.get("series_instance_uid") or "")
            s_rank = studies.setdefault(st, len(studies))
            r_rank = series.setdefault(se, len(series))
            prio = 0 if data.get("priority") == "urgent" else 1
            rows.append((prio, s_rank, r_rank, i, Item(path=path, name=name,
                                                       sop_instance_uid=sop, sop_class_uid=cls,
                                                       transfer_syntax=ts, study=st, series=se)))
        rows.sort(key=lambda r: r[:4])
        return [r[4] for r in rows]

    # ------------------------------------------------------------ recording outcomes

    def _attempt(self, data: dict[str, Any], now: float, outcome: str, result: Result | None,
                 reason: str, detail: str = "", scope: str | None = None) -> dict[str, Any]:
        """The sidecar after one more attempt (a new dict; keys are never renamed)."""
        d = dict(data)
        d["destination"] = self.name
        d["attempts"] = int(d.get("attempts") or 0) + 1
        d["last_attempt"] = now_iso(now)
        entry: dict[str, Any] = {"at": now_iso(now), "outcome": outcome,
                                 "status": result.status_hex if result else None,
                                 "reason": reason}
        if detail:
            entry["detail"] = detail
        if scope:
            entry["scope"] = scope
        if result is not None and result.association:
            entry["association"] = result.association
        hist = list(d.get("history") or [])
        hist.append(entry)
        if len(hist) > HISTORY_MAX:
            d["history_dropped"] = int(d.get("history_dropped") or 0) + len(hist) - HISTORY_MAX
            hist = hist[:1] + hist[len(hist) - HISTORY_MAX + 1:]
        d["history"] = hist
        if outcome != Outcome.DELIVERED:
            d["last_error"] = {"at": now_iso(now), "class": outcome,
                               "status": result.status_hex if result else None,
                               "reason": reason, "detail": detail}
        return d

    def _record(self, slot: Slot, item: Item, result: Result) -> None:
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
        d = self._attempt(data, now, outcome, result, reason, result.detail)
        try:
            if outcome is Outcome.DELIVERED:
                d["delivered_at"] = now_iso(now)
                d["delivered_as"] = result.delivered_as
                if result.warnings:
                    d["warnings"] = list(d.get("warnings") or []) + result.warnings
                d["next_attempt"] = None
                self._delivered(slot, item, d, result, now)
            elif outcome is Outcome.TRANSIENT:
                if self._expired(d, now):
                    why = (f"gave up after {fmt_duration(self.retry.give_up_after)} "
                           f"(give_up_after) queued; last error: {reason}")
                    self._fail(item.path, d, why, result, recorded=True)
                    return
                # Only this instance's own failures grow its delay; tries that met a
                # destination-level failure are the destination's backoff's business.
                own = sum(1 for h in d["history"] if h.get("outcome") == Outcome.TRANSIENT
                          and h.get("scope") != "destination")
                delay = backoff_delay(own, self.retry, self.rng)
                d["next_attempt"] = now_iso(now + delay)
                self._unclaim(slot, item.path, sidecar=d, mtime=now + delay)
                log.event(LOG, "retried", item.sop_instance_uid, self.name, logging.WARNING,
                          status=result.status_hex, reason=reason, attempt=d["attempts"],
                          next_in=fmt_duration(delay))
            else:
                self._fail(item.path, d, reason, result, recorded=True)
        except FileNotFoundError:
            LOG.error("destination %s: %s vanished from its claim while being recorded",
                      self.name, item.path)
        finally:
            slot.sidecars.pop(item.path, None)

    def _delivered(self, slot: Slot, item: Item, d: dict[str, Any], result: Result,
                   now: float) -> None:
        """Queue the move to success/: its sidecar is written now, fsynced with the others'.

        A success/ sidecar is written like any other (temp, fsync, rename), but
        fsyncing each as it was written was a third of the dispatcher's time,
        and every such fsync is a journal commit that the receiver's and
        router's creates wait for. So answered instances are fsynced together
        (``spool.Writes``), when SUCCESS_FLUSH_COUNT wait, when an answer
        comes SUCCESS_FLUSH_AGE or more after the first waiting one, and when the
        batch ends. Until then they stay claimed in active/: a crash sends them
        again, which is at-least-once within the batch in flight (DESIGN.md
        invariant 3), as before.
        """
        if slot.writes is None:
            slot.writes = self.spool.writes()
        if not slot.delivered:
            slot.delivered_since = now
        slot.writes.write_json(self.spool.success_dir(self.name) / (item.name + JSON), d)
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
        folder = self.spool.success_dir(self.name)
        for p in pending:
            item, d, result = p.item, p.sidecar, p.result
            try:
                self.spool.move_written(item.path, folder)
            except FileNotFoundError:
                LOG.error("destination %s: %s vanished from its claim while being recorded",
                          self.name, item.path)
                continue
            log.event(LOG, "sent", item.sop_instance_uid, self.name,
                      status=result.status_hex, ts=result.delivered_as,
                      attempts=d["attempts"], size=d.get("size"),
                      warning="; ".join(result.warnings) if result.warnings else None)

    def _defer(self, slot: Slot, item: Item, failure: LinkFailure, delay: float) -> None:
        """Not sent because the destination failed as a whole: back to the queue, due as
        before (its own timer is not pushed out; the destination's backoff governs)."""
        now = time.time()
        data = slot.sidecars.get(item.path) or self.spool.read_sidecar(item.path)
        d = self._attempt(data, now, Outcome.TRANSIENT, None, str(failure.kind), failure.detail,
                          scope="destination")
        d["next_attempt"] = now_iso(now + delay)
        try:
            if not failure.misconfigured and self._expired(d, now):
                self._fail(item.path, d, f"gave up after {fmt_duration(self.retry.give_up_after)}"
                                         f" (give_up_after) queued; last error: {failure}", None,
                           recorded=True)
                return
            due = min(Spool.next_attempt(item.path) or now, now)
            self._unclaim(slot, item.path, sidecar=d, mtime=due)
            log.event(LOG, "deferred", item.sop_instance_uid, self.name, reason=str(failure),
                      next_probe_in=fmt_duration(delay))
        except FileNotFoundError:
            LOG.error("destination %s: %s vanished from its claim", self.name, item.path)
        finally:
            slot.sidecars.pop(item.path, None)

    def _expired(self, d: dict[str, Any], now: float) -> bool:
        queued = parse_iso(d.get("queued_at"))
        if queued is None:
            queued = received_at(str(d.get("name") or "")) or now
        return now - queued > self.retry.give_up_after

    def _fail(self, path: Path, data: dict[str, Any], reason: str, result: Result | None,
              recorded: bool = False) -> None:
        """To error/NAME/ with the reason and the full history; an admin decides."""
        now = time.time()
        d = data if recorded else self._attempt(data, now, Outcome.PERMANENT, result, reason)
        d["next_attempt"] = None
        dst = self.spool.quarantine(path, reason, stage="dispatch", dest=self.name, sidecar=d)
        log.event(LOG, "failed", str(d.get("sop_instance_uid") or path.name), self.name,
                  logging.ERROR, status=result.status_hex if result else None, reason=reason,
                  moved_to=str(dst.parent))

    def _unclaim(self, slot: Slot, path: Path, sidecar: dict[str, Any] | None = None,
                 mtime: float | None = None) -> None:
        slot.worker.unclaim(path, mtime=mtime, sidecar=sidecar)

    def _return_leftovers(self, slot: Slot) -> None:
        """Whatever is still in this worker's claim area goes back untouched."""
        for e in list(self.spool.scan(slot.worker.dir)):
            try:
                slot.worker.unclaim(Path(e.path))
            except FileNotFoundError:
                continue
            except OSError:
                LOG.exception("dispatcher %s: cannot return %s to the outbox", self.name, e.path)


# ---------------------------------------------------------------- process entry


def run(cfg: Settings, name: str) -> int:
    """``hermes-py dispatch NAME``: serve until SIGTERM/SIGINT, then stop between instances."""
    from hermes_py.destinations.dicom import configure_pynetdicom
    configure_pynetdicom()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOG.info("dispatcher %s: signal %d, stopping after the instance in flight", name, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Dispatcher(cfg, name).serve(stop)
    return 0
