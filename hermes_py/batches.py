"""Series/study batches in ``pending/``: held until quiet, then released whole.

A series/study-level rule holds hard links in ``pending/<key>/`` (key = level,
sanitised UID, rule name and hash) until nothing joined for ``quiet_for``: the
folder's mtime is the last arrival. Release renames the folder to
``<key>@releasing-<hex>`` (``Spool.rename_folder``), so a late instance starts a
new batch and is never lost, then drains it into the outboxes with the
fan-out's link-fsync-unlink steps. A ``@releasing-`` folder found at start is
drained first. The held state is only folders and sidecars, so it survives
restarts.

("Batch" is the code's word; the sidecar keys say ``hold``/``held``, and stay.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hermes_py import rules
from hermes_py.fanout import RELEASING, Commit, Fanout, Job, Link
from hermes_py.lifecycle import Event, Stage
from hermes_py.spool import Spool, disk_full, now_iso
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)

CHUNK = 64
# A release or drain that failed (not for a full disk) is tried again this much later.
RETRY_AFTER = 5.0
DEFAULT_QUIET_FOR = 60.0


@dataclass
class _Quiet:
    """When a held batch is due: ``last`` is when the last instance joined (wall clock)."""

    last: float
    quiet_for: float

    @property
    def due(self) -> float:
        return self.last + self.quiet_for


class Batches:
    """The pending/ batches of one router."""

    def __init__(self, spool: Spool, fanout: Fanout, stopping: Callable[[], bool],
                 paused: Callable[[], bool]) -> None:
        self.spool = spool
        self.fanout = fanout
        self.stopping = stopping
        self.paused = paused
        self._held: dict[str, _Quiet] = {}
        self._unfinished: set[Path] = set()  # releasing folders still to drain
        self._drain_retry_at = 0.0

    def join(self, batch: rules.Batch) -> None:
        q = self._held.get(batch.key)
        if q is None:
            self._held[batch.key] = _Quiet(time.time(), batch.quiet_for)
        else:
            q.last = time.time()
            q.quiet_for = batch.quiet_for

    def next_due(self) -> float | None:
        """Wall-clock time the next batch is due, None when nothing is held."""
        return min((q.due for q in self._held.values()), default=None)

    async def recover(self) -> None:
        """At start: learn the held batches from disk and finish interrupted releases."""
        for place in list(self.spool.places(Stage.PENDING)):
            name, path = place.part or "", place.path
            if RELEASING in name:
                self._unfinished.add(path)
                continue
            quiet_for = await asyncio.to_thread(self._quiet_for, path)
            if quiet_for is None:
                try:
                    self.spool.remove_folder(path)  # an empty batch folder left by a crash
                except OSError:
                    pass
                continue
            try:
                self._held[name] = _Quiet(path.stat().st_mtime, quiet_for)
            except FileNotFoundError:
                continue
        if self._held or self._unfinished:
            LOG.info("pending/: %d held batch(es), %d interrupted release(s) to finish",
                     len(self._held), len(self._unfinished))
        await self._drain_unfinished()

    def _quiet_for(self, folder: Path) -> float | None:
        with self.spool.scan(folder) as entries:
            first = next(entries, None)
        if first is None:
            return None
        hold = self.spool.read_sidecar(Path(first.path)).get("hold")
        try:
            return rules.Batch.from_json(hold).quiet_for
        except (ValueError, KeyError, TypeError):
            return DEFAULT_QUIET_FOR

    async def release_due(self) -> None:
        if self.paused():
            return
        await self._drain_unfinished()
        now = time.time()
        for key, q in list(self._held.items()):
            if self.stopping():
                return
            if q.due <= now:
                await self._release(key)

    async def _drain_unfinished(self) -> None:
        if time.monotonic() < self._drain_retry_at:
            return
        for folder in sorted(self._unfinished):
            if self.stopping() or self.paused():
                return
            await self._drain(folder, recovering=True)

    async def _release(self, key: str) -> None:
        src = self.spool.folder(Stage.PENDING, part=key)
        dst = self.spool.folder(Stage.PENDING, part=f"{key}{RELEASING}{secrets.token_hex(4)}")
        self._held.pop(key, None)
        self.fanout.forget_folder(src)
        try:
            self.spool.rename_folder(src, dst)
        except FileNotFoundError:
            return
        except OSError as e:
            LOG.error("cannot release held batch %s (%s); retrying in %gs", key, e, RETRY_AFTER)
            # Not a quiet period: a timer for the next try, in the same table.
            self._held[key] = _Quiet(time.time() + RETRY_AFTER, 0.0)
            return
        await self._drain(dst, recovering=False)

    async def _drain(self, folder: Path, recovering: bool) -> None:
        """Move a released batch into its outboxes; the folder goes when it is empty."""
        self._unfinished.add(folder)
        try:
            with self.spool.scan(folder) as entries:
                while not self.stopping():
                    paths = [Path(e.path) for e in itertools.islice(entries, CHUNK)]
                    if not paths:
                        break
                    sidecars = await asyncio.to_thread(self._read_sidecars, paths)
                    commit = Commit()
                    try:
                        jobs = [job for dcm, sidecar in zip(paths, sidecars, strict=True)
                                if (job := self._release_one(dcm, sidecar, commit, recovering))]
                        self.fanout.link_all(jobs, commit)
                    finally:
                        self.fanout.commit(commit)
                    if self.paused():
                        return
        except OSError as e:
            if disk_full(e):
                self.fanout.pause(e)
            else:
                LOG.error("releasing %s failed (%s); retrying in %gs", folder.name, e,
                          RETRY_AFTER)
                self._drain_retry_at = time.monotonic() + RETRY_AFTER
            return
        if self.stopping():
            return
        with self.spool.scan(folder) as entries:
            left = next(entries, None)
        if left is not None:  # an instance that could not be linked (logged): try again
            self._drain_retry_at = time.monotonic() + RETRY_AFTER
            return
        self._unfinished.discard(folder)
        self.spool.sweep_orphan_sidecars(folder, 0)
        try:
            self.spool.remove_folder(folder)
        except OSError as e:  # stray non-instance files: leave them to a person
            LOG.warning("released batch folder %s still holds other files (%s): left in place",
                        folder, e)

    def _read_sidecars(self, paths: list[Path]) -> list[sc.Sidecar]:
        return [self.spool.read_sidecar(p) for p in paths]

    def _release_one(self, dcm: Path, sidecar: sc.Sidecar, commit: Commit,
                     recovering: bool) -> Job | None:
        sop = str(sidecar.get("sop_instance_uid") or dcm.stem)
        try:
            hold = rules.Batch.from_json(sidecar.get("hold"))
        except (ValueError, KeyError, TypeError) as e:
            self.fanout.quarantine(dcm, f"held instance without a readable hold record: {e}",
                                   sidecar, commit, sop)
            return None
        at = now_iso()
        job = Job(dcm, sop, sidecar)
        for dest, prio in hold.destinations.items():
            folder = self.fanout.folder(self.spool.outbox(dest, prio), commit)
            if recovering and self.spool.has_copy(dest, dcm.name):
                continue
            job.links.append(Link(folder, sc.queued(
                sidecar, dest, prio, at,
                hold=sc.released(sidecar.get("hold") or {}, at, dcm.parent.name)),
                [(Event.RELEASED, sop, dest, {"priority": prio, "batch": hold.key,
                                              "name": dcm.stem})]))
        return job
