"""Removing what is finished or left behind: aged-out copies, dead writers' temps, orphans.

The cleaner and the stages' own start-up sweeps decide *when*; these verbs are
*how*, so every unlink of a spool path stays inside the spool package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hermes_py.spool.durable import Lock, read_json
from hermes_py.spool.names import DCM, JSON

LOG = logging.getLogger(__name__)

TMP_LOCK = ".lock"


class Sweeps:
    """The hygiene verbs of :class:`hermes_py.spool.Spool`."""

    root: Path
    tmp: Path

    def sweep_tmp(self, max_age: float, now: float | None = None) -> int:
        """Remove temp files of dead writers (a dropped association leaves one).

        Files older than ``max_age`` go, in tmp/ and in every owner's folder; a
        folder whose owner is dead (its flock is free, see use_private_tmp) goes
        whole, with its lock file, whatever the age of what is in it.
        """
        now = time.time() if now is None else now
        removed = 0
        owners: set[str] = set()
        try:
            it = os.scandir(self.tmp)
        except FileNotFoundError:
            return 0
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        owners.add(e.name)
                    elif e.name.endswith(TMP_LOCK):
                        owners.add(e.name[: -len(TMP_LOCK)])
                    elif e.is_file(follow_symlinks=False) and now - e.stat().st_mtime > max_age:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        for owner in sorted(owners):
            folder = self.tmp / owner
            lock = Lock(self.tmp / f"{owner}{TMP_LOCK}")
            try:
                dead = lock.acquire(blocking=False)
            except OSError:
                continue
            if not dead:
                removed += remove_files(folder, older_than=now - max_age, keep=True)
                continue
            try:
                removed += remove_files(folder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock.path)
            finally:
                lock.release()
        if removed:
            LOG.info("swept %d stale temp file(s) from %s", removed, self.tmp)
        return removed

    def sweep_orphan_sidecars(self, folder: Path, max_age: float, now: float | None = None,
                              only: Callable[[Path], bool] | None = None) -> int:
        """Remove ``.json`` files whose ``.dcm`` is gone (crash between two steps).

        ``only`` narrows it to the sidecars it accepts (the router removes only
        those carrying its own routing decision).
        """
        now = time.time() if now is None else now
        removed = 0
        for path, st in self.orphan_sidecars(folder):
            if now - st.st_mtime <= max_age or (only is not None and not only(path)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed

    @staticmethod
    def orphan_sidecars(folder: Path) -> Iterator[tuple[Path, os.stat_result]]:
        """Sidecars in ``folder`` whose .dcm is absent right now, with their stat."""
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name.endswith(JSON) and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            try:
                if os.path.exists(e.path[: -len(JSON)] + DCM):
                    continue
                st = e.stat()
            except FileNotFoundError:
                continue
            yield Path(e.path), st

    @staticmethod
    def remove_orphan_sidecar(path: Path, inode: int, mtime: float) -> bool:
        """Remove a sidecar seen orphaned before, if it is still that file and still orphaned."""
        try:
            st = os.stat(path)
            if (st.st_ino, st.st_mtime) != (inode, mtime) or os.path.exists(
                    str(path)[: -len(JSON)] + DCM):
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def remove_older(folder: Path, keep: float, now: float) -> int:
        """Delete copies that landed in ``folder`` more than ``keep`` seconds ago.

        The landing time is the sidecar's mtime (written by the move into the
        folder), else the .dcm's. The .dcm goes first: a crash in between leaves
        an orphan sidecar, which the cleaner's next passes remove.
        """
        removed = 0
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name.endswith(DCM) and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return 0
        for e in entries:
            js = e.path[: -len(DCM)] + JSON
            try:
                try:
                    t = os.stat(js).st_mtime
                except FileNotFoundError:
                    t = e.stat().st_mtime
                if now - t <= keep:
                    continue
                os.unlink(e.path)
                removed += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(js)
            except FileNotFoundError:
                continue  # someone (an admin) moved it meanwhile
            except OSError as err:
                LOG.warning("cannot remove %s: %s", e.path, err)
        return removed

    @staticmethod
    def has_routing(sidecar: Path) -> bool:
        """A sidecar the router wrote its decision into (only the router writes one)."""
        return "routing" in read_json(sidecar)


def remove_files(folder: Path, older_than: float | None = None, keep: bool = False) -> int:
    """Delete the files in a temp folder (only those last written before ``older_than``
    if given), then the folder itself unless ``keep``; returns how many files went."""
    removed = 0
    try:
        it = os.scandir(folder)
    except FileNotFoundError:
        return 0
    with it:
        for e in it:
            try:
                if older_than is not None and e.stat(follow_symlinks=False).st_mtime >= older_than:
                    continue
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                shutil.rmtree(e.path, ignore_errors=True)
    if not keep:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return removed
