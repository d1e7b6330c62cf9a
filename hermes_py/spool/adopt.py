"""Moving another spool's queues into this one (``hermes-py adopt``), at least once.

The other spool is retired or its node fenced: nothing may hold any of its locks
(serve, router, intake, a dispatcher worker, a private temp folder), and we hold
them all while we work, so nothing starts there meanwhile. Each instance is
copied (the old spool may be another filesystem: a disk brought over), fsynced
into this spool's tmp/, given its sidecar in every target folder, hard-linked
there, the folders fsynced, and only then removed from the old spool. A kill -9
at any point leaves the instance in the old spool, in this one, or in both, never
in neither; running adopt again skips what this spool already has a copy of and
removes it from the old one.

What goes where (``targets``): queued copies (outgoing/, urgent/, failover/) to
the same queue of the mapped destination; claims in active/ and copies in
committing/ queued again (they may have been sent, and the old router's storage
commitment transaction cannot be finished here); error/ and error/<dest>/ to
error/; incoming/ to incoming/ without its routing decision (this router's rules
decide); pending/ copies queued at once to the destinations of their batch.
success/, discard/ and diverted/ are history and stay.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hermes_py.lifecycle import Stage
from hermes_py.spool import sidecar as sc
from hermes_py.spool.claims import LOCK_SUFFIX
from hermes_py.spool.durable import Lock, fsync_dir
from hermes_py.spool.names import JSON, now_iso
from hermes_py.spool.places import Place, subdirs
from hermes_py.spool.sweeps import TMP_LOCK

if TYPE_CHECKING:
    from hermes_py.spool import Spool

# What is adopted, in this order: the queues first (what a destination waits for).
STAGES = (Stage.URGENT, Stage.FAILOVER, Stage.OUTGOING, Stage.ACTIVE, Stage.COMMITTING,
          Stage.PENDING, Stage.INCOMING, Stage.ERROR)
QUEUED_AGAIN = (Stage.ACTIVE, Stage.COMMITTING)

Step = Callable[[str, Path], None]   # ("copied" | "linked" | "removed", old .dcm)
# A copy to make: its folder, its sidecar, our destination ("" for incoming/, error/),
# and the sidecar's mtime (next attempt in a queue, landing time in error/; None: now).
Target = tuple[Path, "sc.Sidecar", str, "float | None"]


class SpoolBusy(Exception):
    """Something holds a lock in the spool to adopt: it is alive."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


@dataclass
class Tally:
    """What an adoption moved (or would move): ``(stage, from dest, to dest) -> count``."""

    moved: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    already: int = 0        # instances this spool had already (an earlier, interrupted run)
    unknown: set[str] = field(default_factory=set)   # old destinations with no mapping


def hold_locks(old: Spool) -> list[Lock]:
    """Every lock of ``old``, taken (the caller releases them); SpoolBusy when one is held."""
    paths = [*sorted(old.locks.glob("*.lock")), *sorted(old.tmp.glob(f"*{TMP_LOCK}"))]
    for d in subdirs(old.active):
        paths += sorted(d.glob(f"*{LOCK_SUFFIX}"))
    held: list[Lock] = []
    try:
        for path in paths:
            lock = Lock(path)
            if not lock.acquire(blocking=False):
                raise SpoolBusy(path)
            held.append(lock)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def _places(old: Spool) -> Iterator[Place]:
    for stage in STAGES:
        yield from old.places(stage)


def _pending_dests(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    hold = data.get("hold")
    dests = hold.get("destinations") if isinstance(hold, dict) else None
    prios = hold.get("priorities") if isinstance(hold, dict) else None
    if not isinstance(dests, list):
        return []
    prios = prios if isinstance(prios, dict) else {}
    return [(str(d), str(prios.get(d) or "normal")) for d in dests if isinstance(d, str)]


class Adoption:
    """One adoption of ``old`` into ``new``; ``dest_map``: old folder name -> our destination."""

    def __init__(self, new: Spool, old: Spool, dest_map: Mapping[str, str],
                 record: sc.Adopted, on_step: Step | None = None):
        self.new, self.old = new, old
        self.dest_map = dict(dest_map)
        self.record = record
        self.on_step = on_step or (lambda step, path: None)

    def _map(self, old_dest: str) -> str | None:
        return self.dest_map.get(old_dest) or self.dest_map.get(self.old.dest_folder(old_dest))

    def plan(self) -> Tally:
        """What :meth:`run` would move; ``unknown`` names destinations without a mapping."""
        return self._walk(dry_run=True)

    def run(self) -> Tally:
        return self._walk(dry_run=False)

    def _walk(self, dry_run: bool) -> Tally:
        tally = Tally()
        for place in _places(self.old):
            # Listed as we go (memory does not grow with the backlog): we only remove here.
            for entry in self.old.scan(place.path):
                dcm = Path(entry.path)
                data = self.old.read_sidecar(dcm)
                targets = self.targets(place, dcm, data, tally)
                if targets is None:
                    continue
                label = (str(place.stage), self._from(place, data), ",".join(
                    sorted({t[2] for t in targets})) or "-")
                if dry_run:
                    tally.moved[label] += 1
                    continue
                done = self._move(dcm, targets)
                if done is None:
                    continue   # gone meanwhile (nothing else may touch it, but be safe)
                if done[0]:
                    tally.moved[label] += 1
                else:
                    tally.already += 1
        return tally

    @staticmethod
    def _from(place: Place, data: Mapping[str, Any]) -> str:
        if place.stage is Stage.PENDING:
            return ",".join(sorted(d for d, _ in _pending_dests(data))) or "-"
        return place.dest or "-"

    def targets(self, place: Place, dcm: Path, data: sc.Sidecar, tally: Tally
                ) -> list[Target] | None:
        """(folder, sidecar, our destination or "", next-attempt mtime) for each copy to make;
        None (and the destination noted in ``unknown``) when a destination has no mapping."""
        stage, now = place.stage, time.time()
        base = sc.of(data)
        base["adopted"] = self.record
        if stage is Stage.INCOMING:
            base.pop("routing", None)
            return [(self.new.incoming, base, "", None)]
        if stage is Stage.PENDING:
            wanted = _pending_dests(data)
            if not wanted:
                return [(self.new.incoming, sc.shared(base), "", None)]
            out: list[Target] = []
            for name, prio in wanted:
                ours = self._map(name)
                if ours is None:
                    tally.unknown.add(self.old.dest_folder(name))
                    continue
                copy = sc.queued(base, ours, prio, now_iso(now))
                if isinstance(data.get("hold"), dict):
                    copy["hold"] = sc.released(data["hold"], now_iso(now),
                                               f"adopted:{place.part}")
                out.append((self.new.outbox(ours, prio), copy, ours, now))
            return out if len(out) == len(wanted) else None
        old_dest = place.dest
        if old_dest is None:   # error/ itself: unreadable input
            return [(self.new.error_dir(None), base, "", self.old.landed_at(dcm))]
        ours = self._map(old_dest)
        if ours is None:
            tally.unknown.add(old_dest)
            return None
        named = str(data.get("destination") or old_dest)
        base["destination"] = ours
        fo = base.get("failover")
        if isinstance(fo, dict):
            fo = cast(sc.Failover, dict(fo))
            if fo.get("to") == named:
                fo["to"] = ours
            if isinstance(fo.get("from"), str):
                fo["from"] = self._map(fo["from"]) or fo["from"]
            base["failover"] = fo
        if stage is Stage.ERROR:
            return [(self.new.error_dir(ours), base, ours, self.old.landed_at(dcm))]
        # Claims and commitments are due now; a queued copy keeps its next attempt.
        mtime = now if stage in QUEUED_AGAIN else (self.old.next_attempt(dcm) or now)
        return [(self.new.queue_for(ours, base), base, ours, mtime)]

    def _has(self, folder: Path, ours: str, fname: str) -> bool:
        if ours:
            return self.new.has_copy(ours, fname)
        return (folder / fname).exists()

    def _move(self, dcm: Path, targets: list[Target]) -> tuple[int, int] | None:
        """Copy into every target, fsync, then remove from the old spool: (made, already)."""
        todo = [t for t in targets if not self._has(t[0], t[2], dcm.name)]
        made = 0
        if todo:
            try:
                tmp = self.new.copy_in(dcm)
            except FileNotFoundError:
                return None
            self.on_step("copied", dcm)
            try:
                for folder, data, _, mtime in todo:
                    folder.mkdir(parents=True, exist_ok=True)
                    # The sidecar is fresh until the .dcm is there (no sweep takes it for an
                    # orphan), then gets its next-attempt time.
                    self.new.write_json(folder / (dcm.stem + JSON), data)
                    try:
                        os.link(tmp, folder / dcm.name)
                    except FileExistsError:
                        continue
                    if mtime is not None:
                        self.new.set_next_attempt(folder / dcm.name, mtime)
                    made += 1
                self.new.sync_dirs(t[0] for t in todo)
            finally:
                self.new.discard_temp(tmp)
            self.on_step("linked", dcm)
        self.old.remove(dcm)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(dcm.parent)
        self.on_step("removed", dcm)
        return made, len(targets) - len(todo)
