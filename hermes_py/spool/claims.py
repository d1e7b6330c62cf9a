"""A dispatcher worker's claim area: ``active/<dest>/<id>/`` plus ``<id>.lock``.

Claiming is a rename from the outbox into the worker's folder, so two workers
(threads, processes, or hosts on a shared spool) can never both own an
instance. The worker holds an flock on its lock file for its whole life;
whoever can take that lock knows the owner is dead and returns its claims to
the outbox (``recover``). Nothing here depends on a "file exists" lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hermes_py.lifecycle import Stage
from hermes_py.spool.durable import Lock
from hermes_py.spool.names import owner_id
from hermes_py.spool.sidecar import Sidecar

if TYPE_CHECKING:
    from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class Worker:
    """One worker's claims on one destination's queue."""

    def __init__(self, spool: Spool, dest: str):
        self.spool = spool
        self.dest = dest
        self.id = owner_id()
        base = spool.folder(Stage.ACTIVE, dest)
        self.dir = base / self.id
        self._lock = Lock(base / f"{self.id}{LOCK_SUFFIX}")
        self._stuck: set[str] = set()  # claims that could not go back (said once each)

    def start(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"worker lock {self._lock.path} is busy")
        self.dir.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """Return unfinished claims and let go of the lock (clean shutdown)."""
        self.return_all()
        with contextlib.suppress(OSError):
            self.dir.rmdir()
        with contextlib.suppress(OSError):
            os.unlink(self._lock.path)
        self._lock.release()

    def claim(self, dcm: Path) -> Path | None:
        """Take an instance from its outbox; None if another worker got it first."""
        dst = self.dir / dcm.name
        try:
            os.rename(dcm, dst)
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.spool.sidecar_of(dcm), self.spool.sidecar_of(dst))
        return dst

    def unclaim(self, claimed: Path, mtime: float | None = None,
                sidecar: Sidecar | None = None) -> Path:
        """Put a claimed instance back in its outbox (urgent ones to urgent/)."""
        return _back_to_outbox(self.spool, self.dest, claimed, sidecar, mtime)

    def return_all(self) -> int:
        """Everything still in this claim area back to the outbox, untouched."""
        returned = 0
        for e in list(self.spool.scan(self.dir)):
            try:
                self.unclaim(Path(e.path))
                returned += 1
                self._stuck.discard(e.name)
            except FileNotFoundError:
                continue
            except OSError as err:
                # A read-only or full spool fails every try until it is fixed: say it once
                # per instance (the claim stays, and goes back when it can).
                if e.name not in self._stuck:
                    self._stuck.add(e.name)
                    LOG.error("destination %s: cannot return %s to the outbox (%s); it stays "
                              "claimed until it can", self.dest, e.name, err)
        return returned

    @staticmethod
    def recover(spool: Spool, dest: str) -> int:
        """Return the claims of dead workers of ``dest`` to the outbox. Safe to run anytime."""
        base = spool.folder(Stage.ACTIVE, dest)
        returned = 0
        try:
            with os.scandir(base) as it:
                locks = [e for e in it if e.name.endswith(LOCK_SUFFIX)]
        except FileNotFoundError:
            return 0
        for e in locks:
            lk = Lock(Path(e.path))
            try:
                if not lk.acquire(blocking=False):
                    continue  # the owner is alive
            except FileNotFoundError:
                continue
            try:
                wdir = base / e.name[: -len(LOCK_SUFFIX)]
                for entry in list(spool.scan(wdir)):
                    try:
                        _back_to_outbox(spool, dest, Path(entry.path), None, None)
                    except FileNotFoundError:
                        continue
                    returned += 1
                # sidecars whose .dcm was already moved back
                spool.sweep_orphan_sidecars(wdir, 0)
                with contextlib.suppress(OSError):
                    wdir.rmdir()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
            finally:
                lk.release()
        if returned:
            LOG.warning("destination %s: returned %d instance(s) claimed by a dead worker to "
                        "the outbox", dest, returned)
        return returned


def _back_to_outbox(spool: Spool, dest: str, claimed: Path, sidecar: Sidecar | None,
                    mtime: float | None) -> Path:
    data = sidecar if sidecar is not None else spool.read_sidecar(claimed)
    folder = spool.queue_for(dest, data)
    folder.mkdir(parents=True, exist_ok=True)
    return spool.move(claimed, folder, sidecar, mtime=mtime)
