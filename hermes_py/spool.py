"""The spool: folder layout, unique names, and the only code that moves instances.

The folders ARE the state (see DESIGN.md), so every state change is a rename on
one filesystem and every other module goes through the primitives here instead
of calling ``os.rename`` itself. The protocol needs nothing but ``rename``,
``link`` and ``flock`` so that several processes, or several hosts on a POSIX
shared filesystem, can work one spool.

Layout under the spool root::

    tmp/                  temp files being written; swept by age (dead writers)
    tmp/<owner>/          a long-running stage's own temp files (<owner>.lock beside it,
                          flocked for life): removed whole once the owner is dead
    drop/                 people copy files here (any names, sub-folders)
    incoming/             complete instances waiting for the router
    pending/<key>/        instances a series/study rule holds until quiet
    outgoing/<dest>/      queued for a destination (urgent/ inside: sent first)
    active/<dest>/<w>/    claimed by dispatcher worker <w>, which holds <w>.lock
    success/<dest>/       delivered
    error/                unreadable input (not DICOM, truncated), with reason
    error/<dest>/         gave up or failed permanently for that destination
    discard/              no rule routes it, or a discard rule matched
    state/                per-destination state (<dest>.json), hold/flush flags
    locks/                flock files of single-instance stages

Each instance is ``<name>.dcm`` with ``<name>.json`` (its sidecar) beside it. The
``.dcm`` is the commit point: a stage acts on ``*.dcm`` only, writes the sidecar
first and renames the ``.dcm`` last. A ``.json`` with no ``.dcm`` is the harmless
leftover of a crash between those two steps and the cleaner removes it.

A sidecar's mtime is the instance's next-attempt time in an outbox (Postfix's
trick): the dispatcher and ``status`` learn what is due from one ``stat`` instead
of parsing JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import heapq
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

DCM = ".dcm"
JSON = ".json"
URGENT = "urgent"

_UNSAFE = re.compile(r"[^0-9A-Za-z.]")
_NAME_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}_[0-9A-Za-z._]{1,64}_[0-9a-f]{8}$")


# ---------------------------------------------------------------- names


def sanitize(value: str | bytes | None, limit: int = 64, empty: str = "unknown") -> str:
    """Make wire data (a UID, an AE title, a tag) safe as one path component.

    Only ASCII letters, digits and '.' survive; everything else (slashes, NUL,
    spaces, non-ASCII) becomes '_', so ``../../etc/x`` can never leave its
    folder. A leading '.' is replaced too, so no result is hidden or ``..``.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    s = _UNSAFE.sub("_", (value or "").strip().rstrip("\0"))[:limit]
    if s.startswith("."):
        s = "_" + s[1:]
    return s or empty


def new_name(sop_instance_uid: str | bytes | None, when: float | None = None) -> str:
    """A name unique per reception, sortable by receive time, readable by a person.

    ``20261128T051703.123456_1.2.840.1_9f3c2a1b``: the same UID received twice
    gets two names, so a resend never overwrites an instance still in flight.
    """
    t = time.time() if when is None else when
    dt = datetime.fromtimestamp(t, UTC)
    return f"{dt:%Y%m%dT%H%M%S.%f}_{sanitize(sop_instance_uid)}_{secrets.token_hex(4)}"


def is_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def received_at(name: str) -> float | None:
    """Receive time encoded in a spool name (cheap 'oldest age' without a stat)."""
    try:
        dt = datetime.strptime(name[:22], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return dt.timestamp()


def parse_iso(value: object) -> float | None:
    """Epoch seconds from a sidecar timestamp written by now_iso; None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- durable primitives


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
    finds its data on disk and its journal transaction committed: measured on
    ext4, 64 small files cost ~0.13 ms each this way against ~0.3 ms fsynced one
    at a time as they were written. Returns the seconds syncfs took (0 if unused).
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


def dump_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


@dataclass
class QueueCounts:
    queued: int = 0
    due: int = 0
    oldest: float | None = None  # receive time of the oldest queued instance


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

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Spool:
    """One spool root. Cheap to construct; holds no open resources."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.drop = self.root / "drop"
        self.incoming = self.root / "incoming"
        self.pending = self.root / "pending"
        self.outgoing = self.root / "outgoing"
        self.active = self.root / "active"
        self.success = self.root / "success"
        self.error = self.root / "error"
        self.discard = self.root / "discard"
        self.state = self.root / "state"
        self.locks = self.root / "locks"
        self._private: tuple[Path, Lock] | None = None  # see use_private_tmp
        self._syncfs_after = 0.0  # monotonic; syncfs was slow here, see SYNCFS_SLOW

    # ------------------------------------------------------------ layout

    def ensure(self, destinations: list[str] | tuple[str, ...] = ()) -> None:
        for d in (self.tmp, self.drop, self.incoming, self.pending, self.outgoing, self.active,
                  self.success, self.error, self.discard, self.state, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        for name in destinations:
            for d in (self.outbox(name), self.outbox(name, URGENT), self.success_dir(name),
                      self.error_dir(name), self.active / name):
                d.mkdir(parents=True, exist_ok=True)

    def outbox(self, dest: str, priority: str = "normal") -> Path:
        base = self.outgoing / sanitize(dest)
        return base / URGENT if priority == URGENT else base

    def outboxes(self, dest: str) -> tuple[Path, Path]:
        """Urgent first: the order a dispatcher drains them in."""
        return self.outbox(dest, URGENT), self.outbox(dest)

    def success_dir(self, dest: str) -> Path:
        return self.success / sanitize(dest)

    def error_dir(self, dest: str | None = None) -> Path:
        return self.error / sanitize(dest) if dest else self.error

    def state_file(self, dest: str) -> Path:
        return self.state / f"{sanitize(dest)}.json"

    def hold_flag(self, dest: str) -> Path:
        return self.state / f"{sanitize(dest)}.hold"

    def flush_flag(self, dest: str) -> Path:
        return self.state / f"{sanitize(dest)}.flush"

    def lock(self, name: str) -> Lock:
        """flock for a single-instance stage ("router", "serve", ...)."""
        return Lock(self.locks / f"{sanitize(name)}.lock")

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    # ------------------------------------------------------------ files

    @property
    def tmp_dir(self) -> Path:
        """Where this process writes temp files: its own folder once it called use_private_tmp."""
        return self._private[0] if self._private is not None else self.tmp

    def tmp_path(self, suffix: str = "") -> Path:
        return self.tmp_dir / f"{os.getpid()}.{secrets.token_hex(8)}{suffix}"

    def use_private_tmp(self) -> Path:
        """Give this long-running stage its own ``tmp/<owner>/`` for temp files, for its life.

        Receiver, router and dispatchers each create and rename several temp files
        per instance; in one shared tmp/ every create and rename waits for the
        others' on the same directory lock. The owner holds an flock on
        ``tmp/<owner>.lock`` (like spool.Worker), so ``sweep_tmp`` knows a folder
        whose lock it can take belongs to a dead process and removes it whole. The
        owner name carries a random part: a reused pid never finds a folder.
        """
        if self._private is not None:
            return self._private[0]
        owner = sanitize(f"{os.uname().nodename[:20]}-{os.getpid()}-{secrets.token_hex(3)}")
        owner = owner.replace(".", "_")
        lock = Lock(self.tmp / f"{owner}{TMP_LOCK}")
        if not lock.acquire(blocking=False):
            raise RuntimeError(f"temp folder lock {lock.path} is busy")
        folder = self.tmp / owner
        try:
            folder.mkdir(exist_ok=True)
        except BaseException:
            lock.release()
            raise
        self._private = (folder, lock)
        return folder

    def release_private_tmp(self) -> None:
        """Remove this process's temp folder (what is left in it is nobody's) and its lock."""
        private, self._private = self._private, None
        if private is None:
            return
        folder, lock = private
        _remove_folder(folder)
        with contextlib.suppress(OSError):
            os.unlink(lock.path)
        lock.release()

    @staticmethod
    def sidecar_of(dcm: Path) -> Path:
        return dcm.with_suffix(JSON)

    def write_temp(self, data: bytes, suffix: str = "", mtime: float | None = None,
                   sync: bool = True) -> Path:
        """A new temp file holding ``data`` (fsynced unless the caller syncs it later)."""
        tmp = self.tmp_path(suffix)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def write_bytes_atomic(self, target: Path, data: bytes, mtime: float | None = None) -> None:
        """tmp/ then fsync then rename: the target is never seen half-written."""
        tmp = self.write_temp(data, target.suffix, mtime)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_json(self, target: Path, data: dict[str, Any], mtime: float | None = None) -> None:
        self.write_bytes_atomic(target, dump_json(data), mtime)

    def writes(self) -> Writes:
        """Several write_json()s that share one flush (see :class:`Writes`)."""
        return Writes(self)

    def sync_files(self, files: Iterable[Path | str]) -> None:
        """``fsync_all`` of files in this spool, without the syncfs speed-up while it is slow."""
        use = time.monotonic() >= self._syncfs_after
        if fsync_all(files, syncfs=use) > SYNCFS_SLOW:
            self._syncfs_after = time.monotonic() + SYNCFS_PAUSE
            LOG.debug("syncfs on %s took over %gs (other writers on this filesystem): "
                      "fsyncing files one by one for %gs", self.root, SYNCFS_SLOW, SYNCFS_PAUSE)

    @staticmethod
    def read_json(path: Path) -> dict[str, Any]:
        """A sidecar, or {} when it is missing or unreadable (the .dcm is what counts)."""
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def read_sidecar(self, dcm: Path) -> dict[str, Any]:
        return self.read_json(self.sidecar_of(dcm))

    # ------------------------------------------------------------ state changes

    def publish(self, src: Path, folder: Path, name: str, sidecar: dict[str, Any],
                fsync_data: bool = True) -> Path:
        """Make a fully written file visible in ``folder`` as ``name``.dcm, durably.

        Order: data fsync, sidecar (atomic), rename of the .dcm (the commit point),
        directory fsync. When this returns the instance survives power loss.
        """
        if fsync_data:
            fsync_path(src)
        dst = folder / (name + DCM)
        self.write_json(folder / (name + JSON), sidecar)
        os.replace(src, dst)
        fsync_dir(folder)
        return dst

    def move(self, dcm: Path, folder: Path, sidecar: dict[str, Any] | None = None,
             mtime: float | None = None, durable: bool = False) -> Path:
        """Move an instance (its .dcm and sidecar) into ``folder``.

        With ``sidecar`` the new content is written at the destination first and
        the old sidecar removed after the rename; without it the sidecar moves
        along. A crash at any point leaves the .dcm in exactly one folder.
        """
        name = dcm.name[: -len(DCM)]
        dst = folder / dcm.name
        old_json = self.sidecar_of(dcm)
        if sidecar is not None:
            self.write_json(folder / (name + JSON), sidecar, mtime)
            os.replace(dcm, dst)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old_json)
        else:
            os.replace(dcm, dst)
            with contextlib.suppress(FileNotFoundError):
                os.replace(old_json, folder / (name + JSON))
            if mtime is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(folder / (name + JSON), (mtime, mtime))
        if durable:
            fsync_dir(folder)
        return dst

    def move_written(self, dcm: Path, folder: Path) -> Path:
        """The rest of ``move(dcm, folder, sidecar=...)`` for a caller whose new sidecar
        is in ``folder`` already (a :class:`Writes` batch): rename the .dcm, drop the
        old sidecar."""
        dst = folder / dcm.name
        os.replace(dcm, dst)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sidecar_of(dcm))
        return dst

    def link(self, dcm: Path, folder: Path, sidecar: dict[str, Any]) -> Path:
        """Hard-link an instance into ``folder`` with its own sidecar (fan-out, no copy).

        Idempotent: re-running after a crash finds the link already there.
        """
        name = dcm.name[: -len(DCM)]
        self.write_json(folder / (name + JSON), sidecar)
        return self.link_file(dcm, folder)

    @staticmethod
    def link_file(dcm: Path, folder: Path) -> Path:
        """The link half of :meth:`link`, for a caller that wrote the sidecar already
        (a :class:`Writes` batch). Idempotent; a different file of that name raises
        FileExistsError."""
        dst = folder / dcm.name
        try:
            os.link(dcm, dst)
        except FileExistsError:
            if not os.path.samefile(dcm, dst):
                raise
        return dst

    def rename_folder(self, src: Path, dst: Path) -> None:
        """Rename a whole folder of instances in one step (the router releasing a held batch).

        Atomic: every instance is under the old name or all are under the new one,
        and instances that arrive for the old name afterwards start a fresh folder.
        """
        os.rename(src, dst)
        fsync_dir(dst.parent)

    def quarantine(self, path: Path, reason: str, stage: str, dest: str | None = None,
                   sidecar: dict[str, Any] | None = None) -> Path:
        """Move an instance or a dropped file to error/ (or error/<dest>/) with its reason."""
        folder = self.error_dir(dest)
        folder.mkdir(parents=True, exist_ok=True)
        data = dict(sidecar or {})
        data["error"] = {"stage": stage, "reason": reason, "at": now_iso()}
        if dest:
            data["error"]["destination"] = dest
        if path.suffix == DCM and is_name(path.stem):
            name = path.stem
        else:
            name = new_name(None)
            data.setdefault("original_path", str(path))
        self.write_json(folder / (name + JSON), data)
        os.replace(path, folder / (name + DCM))
        if path.suffix == DCM and path.parent != folder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sidecar_of(path))
        fsync_dir(folder)
        return folder / (name + DCM)

    @staticmethod
    def set_next_attempt(dcm: Path, when: float) -> None:
        os.utime(dcm.with_suffix(JSON), (when, when))

    @staticmethod
    def next_attempt(dcm: Path) -> float:
        try:
            return dcm.with_suffix(JSON).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    # ------------------------------------------------------------ scanning

    @staticmethod
    def scan(folder: Path) -> Iterator[os.DirEntry[str]]:
        """Every ``*.dcm`` entry in one folder (not recursive); missing folder = empty."""
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.endswith(DCM) and not e.name.startswith("."):
                        yield e
        except FileNotFoundError:
            return

    def oldest(self, folder: Path, n: int, due_before: float | None = None) -> list[Path]:
        """The ``n`` oldest instances (by name = receive time), optionally only due ones.

        Memory is O(n) whatever the backlog; one scandir per call, amortised over
        the n instances it returns.
        """
        entries: Iterator[os.DirEntry[str]] = self.scan(folder)
        if due_before is not None:
            entries = (e for e in entries if self.next_attempt(Path(e.path)) <= due_before)
        return [Path(folder, nm) for nm in heapq.nsmallest(n, (e.name for e in entries))]

    def count(self, folder: Path, now: float | None = None) -> QueueCounts:
        c = QueueCounts()
        oldest_name: str | None = None
        for e in self.scan(folder):
            c.queued += 1
            if oldest_name is None or e.name < oldest_name:
                oldest_name = e.name
            if now is not None and next_attempt_of(e.path) <= now:
                c.due += 1
        if oldest_name:
            c.oldest = received_at(oldest_name)
        return c

    def destinations_on_disk(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.outgoing) if e.is_dir())
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------ hygiene

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
                removed += _remove_folder(folder, older_than=now - max_age, keep=True)
                continue
            try:
                removed += _remove_folder(folder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock.path)
            finally:
                lock.release()
        if removed:
            LOG.info("swept %d stale temp file(s) from %s", removed, self.tmp)
        return removed

    def sweep_orphan_sidecars(self, folder: Path, max_age: float, now: float | None = None) -> int:
        """Remove ``.json`` files whose ``.dcm`` is gone (crash between two steps)."""
        now = time.time() if now is None else now
        removed = 0
        try:
            it = os.scandir(folder)
        except FileNotFoundError:
            return 0
        with it:
            for e in it:
                if not e.name.endswith(JSON):
                    continue
                dcm = e.path[: -len(JSON)] + DCM
                try:
                    if not os.path.exists(dcm) and now - e.stat().st_mtime > max_age:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


TMP_LOCK = ".lock"


def _remove_folder(folder: Path, older_than: float | None = None, keep: bool = False) -> int:
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


class Writes:
    """Atomic sidecar replacements that share one flush: temps now, fsync all, rename all.

    Each target still goes through "write temp, fsync, rename" (DESIGN.md
    invariant 2: never seen empty or half-written, even after a power loss);
    only the fsyncs are taken together in :meth:`commit` (``sync_files``: one
    syncfs writes them all out, then each is fsynced), which makes a chunk of
    instances cost about one journal commit instead of one per file. Until
    ``commit`` returns no target has changed, so a caller that needs "these
    before those" commits in that order. The targets' folders are the caller's
    to fsync (it usually has more entries to make durable there).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: list[tuple[Path, Path]] = []

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def targets(self) -> list[Path]:
        return [t for _, t in self._pending]

    def write_json(self, target: Path, data: dict[str, Any], mtime: float | None = None) -> None:
        tmp = self.spool.write_temp(dump_json(data), target.suffix, mtime, sync=False)
        self._pending.append((tmp, target))

    def rollback(self, to: int) -> None:
        """Forget (and delete) the writes made after the first ``to`` ones."""
        dropped, self._pending = self._pending[to:], self._pending[:to]
        for tmp, _ in dropped:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

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
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def discard(self) -> None:
        pending, self._pending = self._pending, []
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---------------------------------------------------------------- claims


class Worker:
    """A dispatcher worker's claim area: ``active/<dest>/<id>/`` plus ``<id>.lock``.

    Claiming is a rename from the outbox into the worker's folder, so two workers
    (threads, processes, or hosts on a shared spool) can never both own an
    instance. The worker holds an flock on its lock file for its whole life;
    whoever can take that lock knows the owner is dead and returns its claims to
    the outbox (``recover``). Nothing here depends on a "file exists" lock.
    """

    def __init__(self, spool: Spool, dest: str):
        self.spool = spool
        self.dest = dest
        self.id = f"{os.uname().nodename[:20]}-{os.getpid()}-{secrets.token_hex(3)}"
        self.id = sanitize(self.id).replace(".", "_")
        base = spool.active / sanitize(dest)
        self.dir = base / self.id
        self._lock = Lock(base / f"{self.id}.lock")

    def start(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"worker lock {self._lock.path} is busy")
        self.dir.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """Return unfinished claims and let go of the lock (clean shutdown)."""
        for dcm in list(self.spool.scan(self.dir)):
            self.unclaim(Path(dcm.path))
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
                sidecar: dict[str, Any] | None = None) -> Path:
        """Put a claimed instance back in its outbox (urgent ones to urgent/)."""
        data = sidecar if sidecar is not None else self.spool.read_sidecar(claimed)
        folder = self.spool.outbox(self.dest, str(data.get("priority", "normal")))
        folder.mkdir(parents=True, exist_ok=True)
        return self.spool.move(claimed, folder, sidecar, mtime=mtime)

    @staticmethod
    def recover(spool: Spool, dest: str) -> int:
        """Return the claims of dead workers of ``dest`` to the outbox. Safe to run anytime."""
        base = spool.active / sanitize(dest)
        returned = 0
        try:
            locks = [e for e in os.scandir(base) if e.name.endswith(".lock")]
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
                wdir = base / e.name[: -len(".lock")]
                for entry in list(spool.scan(wdir)):
                    dcm = Path(entry.path)
                    data = spool.read_sidecar(dcm)
                    folder = spool.outbox(dest, str(data.get("priority", "normal")))
                    folder.mkdir(parents=True, exist_ok=True)
                    try:
                        spool.move(dcm, folder)
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


def next_attempt_of(dcm_path: str) -> float:
    """An outbox entry's next-attempt time: its sidecar's mtime (0 = due, no sidecar)."""
    try:
        return os.stat(dcm_path[: -len(DCM)] + JSON).st_mtime
    except FileNotFoundError:
        return 0.0


def disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def copy_into_tmp(spool: Spool, src: Path, suffix: str = DCM) -> Path:
    """Copy a file into tmp/ (for intake from another filesystem), fsynced."""
    tmp = spool.tmp_path(suffix)
    try:
        with open(src, "rb") as fi, open(tmp, "xb") as fo:
            shutil.copyfileobj(fi, fo, 1024 * 1024)
            fo.flush()
            os.fsync(fo.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp
