"""Making writes survive power loss, cheaply: fsync, one syncfs for many, and flock.

Every promise the spool makes ends in an fsync of the file and of the folder a
rename or link landed in. What varies is how many journal commits that costs:
``fsync_all`` takes the fsyncs of many files together behind one ``syncfs``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hermes_py.spool import Spool


def fsync_path(path: Path | str) -> None:
    """fsync a file or directory by path (a read-only fd flushes the inode on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Make renames and links into ``path`` survive power loss."""
    fsync_path(path)


# Below this many files a syncfs (which writes out the whole filesystem) is not worth it.
SYNCFS_MIN_FILES = 8
# A syncfs slower than this wrote out other programs' data (a filesystem shared with a
# busy writer): the fsyncs alone are cheaper then, for SYNCFS_PAUSE seconds.
SYNCFS_SLOW = 0.1
SYNCFS_PAUSE = 60.0
_syncfs_fn: Any = None


def _syncfs(path: Path | str) -> None:
    """Ask Linux to write out the whole filesystem in one go (best effort, errors ignored).

    Only ever a speed-up before fsyncing the files one by one, which stays the
    guarantee: syncfs reports errors for the whole filesystem, only since 5.8,
    and through a freshly opened fd misses one that another process already
    collected, so it proves nothing about our files; each file's fsync does.
    """
    global _syncfs_fn
    if not sys.platform.startswith("linux"):
        return
    if _syncfs_fn is None:
        try:
            _syncfs_fn = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _syncfs_fn = False
    if not _syncfs_fn:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _syncfs_fn(fd)
    finally:
        os.close(fd)


def fsync_all(files: Iterable[Path | str], dirs: Iterable[Path | str] = (),
              syncfs: bool = True) -> float:
    """fsync many files, then folders, paying for about one journal commit instead of one each.

    Each file is fsynced (that is the durability promise, on any POSIX
    filesystem, with the file's own error report). With many files, one
    ``syncfs`` first writes them all out together, so that each fsync after it
    finds its data on disk and its journal transaction committed. Returns the
    seconds syncfs took (0 if unused).
    """
    files = list(files)
    dirs = list(dict.fromkeys(dirs))
    took = 0.0
    if syncfs and len(files) >= SYNCFS_MIN_FILES:
        t0 = time.monotonic()
        _syncfs(files[0])
        took = time.monotonic() - t0
    for f in files:
        fsync_path(f)
    for d in dirs:
        fsync_dir(d)
    return took


def export_copy(src: Path, target: Path, chunk: int = 1 << 20) -> bool:
    """Copy ``src`` to ``target`` outside the spool, whole or not at all, never overwriting.

    Written to a hidden temp file beside ``target``, fsynced, then hard-linked to its
    name (a link fails on an existing name, so a file someone else put there is never
    replaced) and the folder fsynced. Returns False when ``target`` already holds the
    same bytes (delivered before: a resend after a crash); raises FileExistsError when
    it holds different ones.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if _same_bytes(src, target, chunk):
            return False
        raise FileExistsError(f"a different file is already at {target}")
    tmp = target.parent / f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
    try:
        with open(src, "rb") as fi, open(tmp, "xb") as fo:
            while block := fi.read(chunk):
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            if _same_bytes(src, target, chunk):
                return False
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(target.parent)
    return True


def _same_bytes(a: Path, b: Path, chunk: int) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def discard(path: Path | str) -> None:
    """Remove a temp file if it is there (nobody else has a name for it)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def dump_json(data: Any) -> bytes:
    """A sidecar's or state file's bytes: indented, so a person can read them with less."""
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


def read_json(path: Path) -> dict[str, Any]:
    """A sidecar or state file, or {} when it is missing or unreadable (the .dcm is what counts)."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


class Lock:
    """An exclusive ``fcntl.flock`` on a file, released by the kernel if we die.

    Never a "file exists" lock: the file stays, and it is the flock on it that
    counts, so a kill -9 cannot leave a stale lock behind.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False if a live holder has it.

        A lock file whose holder died may be unlinked by whoever reaps it (recover,
        sweep_tmp) between our open and our flock: then we would hold a lock on a
        file nobody else can see, and the next reaper would create a fresh file,
        lock it and take us for dead. So after flock we check the path still names
        the file we locked, and start again if not.
        """
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                    same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
                except FileNotFoundError:
                    same = False
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SidecarBatch:
    """Atomic sidecar replacements that share one flush: temps now, fsync all, rename all.

    Each target still goes through "write temp, fsync, rename" (never seen empty
    or half-written, even after a power loss); only the fsyncs are taken
    together in :meth:`commit` (one syncfs writes them all out, then each is
    fsynced), so a chunk of instances costs about one journal commit instead of
    one per file. Until ``commit`` returns no target has changed, so a caller that
    needs "these before those" commits in that order. The targets' folders are
    the caller's to fsync (it usually has more entries to make durable there).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: list[tuple[Path, Path]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def write(self, target: Path, data: Any, mtime: float | None = None) -> None:
        tmp = self.spool.write_temp(dump_json(data), target.suffix, mtime, sync=False)
        self._pending.append((tmp, target))

    def rollback(self, to: int = 0) -> None:
        """Forget (and delete) the writes made after the first ``to`` ones."""
        dropped, self._pending = self._pending[to:], self._pending[:to]
        for tmp, _ in dropped:
            self.spool.discard_temp(tmp)

    def commit(self) -> None:
        """fsync every temp, then rename each onto its target (in the order written)."""
        pending, self._pending = self._pending, []
        try:
            self.spool.sync_files(tmp for tmp, _ in pending)
            while pending:
                tmp, target = pending[0]
                os.replace(tmp, target)
                pending.pop(0)
        finally:
            for tmp, _ in pending:
                self.spool.discard_temp(tmp)
