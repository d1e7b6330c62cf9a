"""Failover of a whole destination to its backup, and failback, decided by its dispatcher.

A destination with ``failover_to`` that stays unreachable (or misconfigured)
without a break for ``failover_after`` fails over: its dispatcher writes
``state/<dest>.failover.json`` (the one record that it is failed over, read by
status, the metrics and the alerts) and from then on hands its queue to the
backup's ``outgoing/<backup>/failover/<dest>/`` queue:

- ``divert`` (another path to the same archive): each queued copy moves to
  ``diverted/<dest>/`` (the primary's record: "delivered via the backup") and a
  hard link of it is queued at the backup; the primary's workers send nothing
  while failed over. At failback, what the backup has not claimed yet comes back
  to the primary's queue by rename, so either the backup's worker took it or we
  did, never both.
- ``copy`` (a backup site): the backup gets a hard link of every copy queued for
  the primary, and the primary keeps its queue and drains it when it answers.

While failed over the primary is probed (C-ECHO, or the type's own probe) at
its backoff interval, so its recovery is seen with nothing queued for it; work
returns only after ``failback_after`` of reachability without a failed probe,
so a flapping primary does not ping-pong. Every step is a rename or a link of an
instance already durable in the spool: a kill -9 anywhere leaves each instance
in at least one queue (at worst in two: a duplicate across a crash), and
``reconcile`` at start finishes a step a crash cut short.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, cast

from hermes_py.destination_state import DestinationState
from hermes_py.destinations.base import Probe
from hermes_py.durations import fmt_duration
from hermes_py.events import emit
from hermes_py.failover_policy import FailoverMode, FailoverPolicy
from hermes_py.lifecycle import DestinationStatus, Event, Stage
from hermes_py.outcomes import LinkFailure
from hermes_py.spool import DCM, Spool, now_iso, parse_iso
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)

# While waiting out failback_after, the primary is probed this many times at least,
# so "without a failed probe" means something.
FAILBACK_PROBES = 5
HANDOVER_BATCH = 500    # instances handed to the backup per upkeep (the rest next time)


class FailoverRecord(TypedDict, total=False):
    """``state/<dest>.failover.json``: docs/internals.md, "Failover"."""

    destination: str
    to: str           # the backup destination
    mode: str         # a FailoverMode
    since: str        # ISO-8601 UTC: when the failover started
    reason: str       # e.g. "unreachable for 15m: connection refused: ..."


def read(spool: Spool, dest: str) -> FailoverRecord | None:
    """The failover ``dest`` is in, or None."""
    data = spool.read_json(spool.failover_file(dest))
    if not data or not isinstance(data.get("to"), str):
        return None
    keys = FailoverRecord.__annotations__
    return cast(FailoverRecord, {k: str(v) for k, v in data.items() if k in keys})


def counts(spool: Spool, dest: str, backup: str) -> tuple[int, int]:
    """(diverted records of ``dest``, copies still queued at ``backup`` for it)."""
    return (_count(spool.diverted_dir(dest)), _count(spool.failover_queue(backup, dest)))


def _count(folder: Path) -> int:
    return sum(1 for _ in Spool.scan(folder))


class ProbeKind(enum.StrEnum):
    """The ``kind`` a failed probe records in state/<dest>.json."""

    PROBE_FAILED = "probe failed"


class Failover:
    """One primary's failover, driven from its dispatcher's upkeep (one thread)."""

    def __init__(self, spool: Spool, name: str, policy: FailoverPolicy,
                 state: DestinationState, probe: Callable[[], Probe],
                 queued: Callable[[], int]):
        self.spool = spool
        self.name = name
        self.policy = policy
        self.state = state
        self._probe = probe
        self._queued = queued
        self.record: FailoverRecord | None = read(spool, name)
        self._copied: set[str] = set()     # copy mode: names the backup already has
        self._last_probe = 0.0
        spool.ensure([policy.to])

    @property
    def diverting(self) -> bool:
        """Failed over in divert mode: the primary's workers send nothing."""
        return self.record is not None and self.record.get("mode") == FailoverMode.DIVERT

    # ------------------------------------------------------------ the decision

    def upkeep(self, now: float) -> int:
        """Start, continue or end the failover; returns how many copies changed queue."""
        self.record = read(self.spool, self.name)
        if self.record is None:
            down = self.state.down_since
            if (self.state.state != DestinationStatus.OK and down is not None
                    and now - down >= self.policy.after):
                return self._start(now, down)
            return 0
        started = parse_iso(self.record.get("since")) or now
        up = self.state.up_since
        if (self.state.state == DestinationStatus.OK and up is not None and up >= started
                and now - up >= self.policy.failback_after):
            return self._failback(now)
        moved = self._hand_over(now)
        self._probe_if_due(now)
        return moved

    def _start(self, now: float, down: float) -> int:
        last = self.state.last_error or {}
        reason = (f"{self.state.state} for {fmt_duration(now - down)}: "
                  f"{last.get('kind', '?')}: {last.get('detail', '')}").strip()[:300]
        rec = FailoverRecord(destination=self.name, to=self.policy.to,
                             mode=str(self.policy.mode), since=now_iso(now), reason=reason)
        self.spool.write_json(self.spool.failover_file(self.name), rec)
        self.record = rec
        queued = self._queued()
        emit(LOG, Event.FAILOVER_STARTED, dest=self.name, level=logging.WARNING,
             message=f"destination {self.name} FAILED OVER to {self.policy.to} "
                     f"({self.policy.mode}) after {reason}; {queued} queued instance(s) "
                     f"{'move' if self.diverting else 'are copied'} there",
             to=self.policy.to, mode=str(self.policy.mode), reason=reason, queued=queued)
        return self._hand_over(now)

    # ------------------------------------------------------------ moving work

    def _hand_over(self, now: float) -> int:
        """Queued copies of the primary to the backup (divert: move; copy: link)."""
        rec = self.record
        if rec is None:
            return 0
        backup = self.policy.to
        target = self.spool.failover_queue(backup, self.name)
        target.mkdir(parents=True, exist_ok=True)
        diverted = self.spool.diverted_dir(self.name)
        diverted.mkdir(parents=True, exist_ok=True)
        fo = sc.Failover({"from": self.name, "to": backup, "mode": rec.get("mode", ""),
                          "at": now_iso(now), "reason": rec.get("reason", "")})
        n = 0
        for folder in self.spool.outboxes(self.name):
            for e in list(self.spool.scan(folder)):
                if n >= HANDOVER_BATCH:
                    break
                path = Path(e.path)
                if self.diverting:
                    n += self._divert(path, diverted, target, fo)
                else:
                    n += self._copy(path, target, fo)
        if n:
            self.spool.sync_dirs([target, diverted, *self.spool.outboxes(self.name)])
        return n

    def _divert(self, path: Path, diverted: Path, target: Path, fo: sc.Failover) -> int:
        data = self.spool.read_sidecar(path)
        try:
            # The rename is the claim: a primary's worker (a probe) may have taken it.
            record = self.spool.move(path, diverted, sc.diverted(data, fo))
        except FileNotFoundError:
            return 0
        self.spool.link(record, target, sc.failed_over(data, fo))
        emit(LOG, Event.DIVERTED, str(data.get("sop_instance_uid") or path.name), self.name,
             to=fo.get("to"), mode="divert", name=path.name[: -len(DCM)])
        return 1

    def _copy(self, path: Path, target: Path, fo: sc.Failover) -> int:
        name = path.name
        if name in self._copied:
            return 0
        if self.spool.has_copy(self.policy.to, name):
            self._copied.add(name)
            return 0
        data = self.spool.read_sidecar(path)
        try:
            self.spool.link(path, target, sc.failed_over(data, fo))
        except FileNotFoundError:  # claimed meanwhile: seen again if it comes back
            return 0
        self._copied.add(name)
        emit(LOG, Event.DIVERTED, str(data.get("sop_instance_uid") or name), self.name,
             to=self.policy.to, mode="copy", name=name[: -len(DCM)])
        return 1

    def _failback(self, now: float) -> int:
        rec = self.record or FailoverRecord()
        returned = 0
        if rec.get("mode") == FailoverMode.DIVERT:
            returned = self._return_undelivered(now)
        diverted, _ = counts(self.spool, self.name, self.policy.to)
        self.spool.remove_state(self.spool.failover_file(self.name).name)
        self.record = None
        self._copied.clear()
        since = parse_iso(rec.get("since")) or now
        emit(LOG, Event.FAILBACK, dest=self.name, level=logging.WARNING,
             message=f"destination {self.name} FAILED BACK from {self.policy.to} after "
                     f"{fmt_duration(now - since)} failed over: reachable for "
                     f"{fmt_duration(self.policy.failback_after)}; {returned} instance(s) the "
                     f"backup had not sent return to its queue",
             to=self.policy.to, mode=rec.get("mode"), returned=returned,
             failed_over_for=fmt_duration(now - since), diverted=diverted)
        return returned

    def _return_undelivered(self, now: float) -> int:
        """Copies still queued at the backup go back to the primary; their diverted/ records
        are removed after (a crash between leaves a record ``reconcile`` removes)."""
        source = self.spool.failover_queue(self.policy.to, self.name)
        diverted = self.spool.diverted_dir(self.name)
        n = 0
        for e in list(self.spool.scan(source)):
            path = Path(e.path)
            record = diverted / e.name
            data = self.spool.read_sidecar(record) or self.spool.read_sidecar(path)
            back = sc.returned(data, self.name, now)
            folder = self.spool.queue_for(self.name, back)
            try:
                self.spool.move(path, folder, back)
            except FileNotFoundError:  # the backup's worker claimed it first: it sends it
                continue
            self.spool.remove(record)
            n += 1
            emit(LOG, Event.RETURNED, str(data.get("sop_instance_uid") or e.name), self.name,
                 to=self.policy.to, name=e.name[: -len(DCM)])
        if n:
            self.spool.sync_dirs([source, diverted, *self.spool.outboxes(self.name)])
        return n

    def reconcile(self) -> int:
        """Finish what a crash interrupted: a diverted/ record whose instance is in no queue
        of the backup (killed between the move and the link) is linked again while failed
        over, and one the primary holds again (killed during failback) is removed."""
        fixed = 0
        diverted = self.spool.diverted_dir(self.name)
        rec = read(self.spool, self.name)
        for e in list(self.spool.scan(diverted)):
            path = Path(e.path)
            if self._primary_holds(e.name):
                self.spool.remove(path)
                fixed += 1
                continue
            if rec is None or self.spool.has_copy(self.policy.to, e.name):
                continue
            data = self.spool.read_sidecar(path)
            fo = data.get("failover") or sc.Failover()
            if (parse_iso(fo.get("at")) or 0.0) < (parse_iso(rec.get("since")) or 0.0):
                continue  # an earlier episode's record: its backup copy aged out
            target = self.spool.failover_queue(self.policy.to, self.name)
            target.mkdir(parents=True, exist_ok=True)
            self.spool.link(path, target, sc.failed_over(data, fo))
            fixed += 1
        if fixed:
            LOG.warning("destination %s: finished %d failover step(s) a stop interrupted",
                        self.name, fixed)
        return fixed

    def _primary_holds(self, fname: str) -> bool:
        for st in Stage:
            if st.facts.queued and st is not Stage.FAILOVER:
                for place in self.spool.places(st, self.name):
                    if (place.path / fname).exists():
                        return True
        return False

    # ------------------------------------------------------------ probing

    def _probe_if_due(self, now: float) -> None:
        """With nothing queued for it (divert), nothing else would notice the primary is
        back: probe it at its backoff interval, and while waiting out failback_after."""
        if not self.diverting:
            return  # copy mode: the primary keeps its queue, its workers probe with it
        if self.state.state == DestinationStatus.OK:
            every = max(1.0, self.policy.failback_after / FAILBACK_PROBES)
            if now - self._last_probe < every:
                return
        else:
            wait, probe = self.state.begin(now)
            if wait > 0 or not probe:
                return
        self._last_probe = now
        clock = time.monotonic()
        try:
            result = self._probe()
        except Exception as e:  # a probe must never take the dispatcher down
            result = Probe(False, f"{type(e).__name__}: {e}")
        finally:
            self.state.end_probe()
        done = now + (time.monotonic() - clock)  # on upkeep's clock (tests drive a fake one)
        if result.ok:
            self.state.success(done, now)
        else:
            self.state.failure(LinkFailure(ProbeKind.PROBE_FAILED, result.text[:300]), done, 0)
