"""The spool: folder layout, unique names, and the only code that moves instances.

The folders ARE the state (docs/internals.md), so every state change is a rename, link
or unlink on one filesystem, and every such call on a spool path is in this
package: the other modules ask :class:`Spool` for a verb (publish, move, link,
quarantine, remove, ...) instead of calling ``os.rename`` themselves, the way
``mailbox.Maildir`` gives its callers ``add``/``remove``/``discard``. The stages
and their folders are named in :mod:`hermes_py.lifecycle`; the layout below is
derived from there.

Layout under the spool root::

    tmp/                  temp files being written; swept by age (dead writers)
    tmp/<owner>/          a long-running stage's own temp files (<owner>.lock beside it,
                          flocked for life): removed whole once the owner is dead
    drop/                 people copy files here (any names, sub-folders)
    incoming/ pending/<batch>/ outgoing/<dest>/[urgent/] active/<dest>/<worker>/
    success/<dest>/ error/[<dest>/] discard/      the stages (lifecycle.Stage)
    state/                per-destination state (<dest>.json), hold/flush flags
    locks/                flock files of single-instance stages
    alerts/pending/ alerts/sent/ alerts/failed/   the alert outbox (spool/alerts.py)

Each instance is ``<name>.dcm`` with ``<name>.json`` (its sidecar) beside it (in
incoming/ the .dcm may carry it instead, ``carried``). The ``.dcm`` is the commit
point: a stage acts on ``*.dcm`` only, writes the sidecar first and renames the
``.dcm`` last. A ``.json`` with no ``.dcm`` is the harmless
leftover of a crash between those two steps and the cleaner removes it.

A sidecar's mtime is the instance's next-attempt time in an outbox, and the time
it landed in success/, error/ and discard/ (Postfix's trick): the dispatcher,
``status`` and the cleaner learn what they need from one ``stat``.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from hermes_py.lifecycle import Stage
from hermes_py.spool import carried, durable
from hermes_py.spool.alerts import AlertOutbox
from hermes_py.spool.claims import Worker
from hermes_py.spool.drops import Drops
from hermes_py.spool.durable import (
    Lock,
    SidecarBatch,
    disk_full,
    dump_json,
    fsync_all,
    fsync_dir,
    fsync_path,
    read_json,
)
from hermes_py.spool.names import (
    DCM,
    JSON,
    is_name,
    new_name,
    now_iso,
    owner_id,
    parse_iso,
    received_at,
    sanitize,
    uid_of_name,
)
from hermes_py.spool.places import Place, Scan, expand
from hermes_py.spool.sidecar import Sidecar, of, quarantined
from hermes_py.spool.sweeps import TMP_LOCK, Sweeps, remove_files

__all__ = ["DCM", "JSON", "URGENT", "Flag", "Lock", "Place", "Scan", "SidecarBatch", "Spool",
           "Worker", "disk_full", "is_name", "new_name", "now_iso", "parse_iso", "received_at",
           "sanitize"]

LOG = logging.getLogger(__name__)

URGENT = str(Stage.URGENT)
STANDBY_RETRY = 1.0


class Flag(enum.StrEnum):
    """``state/<dest>.<flag>``: what an admin asks of a destination's dispatcher."""

    HOLD = "hold"      # present = send nothing, keep queueing, nothing expires
    FLUSH = "flush"    # present = everything due now and backoff forgotten, once


class Spool(Sweeps, Drops):
    """One spool root. Cheap to construct; holds no open resources."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.drop = self.root / "drop"
        self.state = self.root / "state"
        self.locks = self.root / "locks"
        # Each stage's top folder is its name (lifecycle.Stage); urgent/ lives in outgoing/<dest>/.
        self.incoming = self.root / Stage.INCOMING
        self.pending = self.root / Stage.PENDING
        self.outgoing = self.root / Stage.OUTGOING
        self.active = self.root / Stage.ACTIVE
        self.success = self.root / Stage.SUCCESS
        self.error = self.root / Stage.ERROR
        self.discard = self.root / Stage.DISCARD
        self._private: tuple[Path, Lock] | None = None  # see use_private_tmp
        self._syncfs_after = 0.0  # monotonic; syncfs was slow here, see SYNCFS_SLOW

    # ------------------------------------------------------------ layout

    @staticmethod
    def dest_folder(dest: str) -> str:
        """The folder name of a destination in every per-destination stage."""
        return sanitize(dest)

    def folder(self, stage: Stage, dest: str | None = None, part: str | None = None) -> Path:
        """The folder of ``stage`` (for ``dest``, for the batch or worker ``part``)."""
        for pattern in stage.facts.layout:
            if ("{dest}" in pattern) != (dest is not None):
                continue
            out = self.root
            for comp in pattern.split("/"):
                if comp == "{dest}":
                    out = out / self.dest_folder(dest or "")
                elif comp.startswith("{"):
                    if part is None:
                        return out
                    out = out / part
                else:
                    out = out / comp
            return out
        raise ValueError(f"stage {stage} has no folder {'for a destination' if dest else ''}")

    def places(self, stage: Stage | None = None, dest: str | None = None) -> Iterator[Place]:
        """Every existing folder of ``stage`` (of every stage, in lifecycle order)."""
        for st in (stage,) if stage is not None else tuple(Stage):
            for pattern in st.facts.layout:
                if dest is not None and "{dest}" not in pattern:
                    continue
                yield from expand(st, self.root, pattern.split("/"), dest, self.dest_folder)

    def outbox(self, dest: str, priority: str = "normal") -> Path:
        return self.folder(Stage.URGENT if priority == URGENT else Stage.OUTGOING, dest)

    def outboxes(self, dest: str) -> tuple[Path, ...]:
        """Every queue folder of ``dest`` in the order a dispatcher drains them: urgent/,
        then what other destinations failed over to it, then the rest."""
        backups = tuple(p.path for p in self.places(Stage.FAILOVER, dest))
        return (self.outbox(dest, URGENT), *backups, self.outbox(dest))

    def failover_queue(self, backup: str, primary: str) -> Path:
        """``outgoing/<backup>/failover/<primary>/``: the backup's queue of the primary's work."""
        return self.folder(Stage.FAILOVER, backup, self.dest_folder(primary))

    def diverted_dir(self, dest: str) -> Path:
        return self.folder(Stage.DIVERTED, dest)

    def queue_for(self, dest: str, sidecar: Mapping[str, Any]) -> Path:
        """The queue folder a copy of ``dest`` with this sidecar belongs in (its priority, or
        the failover queue of the destination it came from)."""
        fo = sidecar.get("failover")
        if isinstance(fo, dict) and fo.get("to") == dest and isinstance(fo.get("from"), str):
            return self.failover_queue(dest, fo["from"])
        return self.outbox(dest, str(sidecar.get("priority") or "normal"))

    def success_dir(self, dest: str) -> Path:
        return self.folder(Stage.SUCCESS, dest)

    def error_dir(self, dest: str | None = None) -> Path:
        return self.folder(Stage.ERROR, dest)

    def state_file(self, dest: str) -> Path:
        return self.state / f"{self.dest_folder(dest)}.json"

    def failover_file(self, dest: str) -> Path:
        """``state/<dest>.failover.json``: present while ``dest`` is failed over (failover.py)."""
        return self.state / f"{self.dest_folder(dest)}.failover.json"

    @property
    def drain_file(self) -> Path:
        """``state/drain``: present = the receivers refuse new associations (hermes-py drain)."""
        return self.state / "drain"

    @property
    def serve_state(self) -> Path:
        """``state/serve.json``: serve and its children, for ``status``."""
        return self.state / "serve.json"

    def flag(self, dest: str, flag: Flag) -> Path:
        return self.state / f"{self.dest_folder(dest)}.{flag}"

    @property
    def web_dir(self) -> Path:
        """``state/web/``: the web page's users and API token hashes (hermes_py.web)."""
        return self.state / "web"

    @property
    def alerts(self) -> AlertOutbox:
        """``alerts/pending|sent|failed/`` and ``state/alerts.json`` (spool.alerts)."""
        return AlertOutbox(self)

    @property
    def events_log(self) -> Path:
        """``state/events.jsonl``: serve's bounded ring of recent events (spool.eventlog)."""
        return self.state / "events.jsonl"

    def lock(self, name: str) -> Lock:
        """flock for a single-instance stage ("router", "serve", ...)."""
        return Lock(self.locks / f"{sanitize(name)}.lock")

    def take_lock(self, name: str, stop: threading.Event,
                  retry: float = STANDBY_RETRY) -> tuple[Lock | None, bool]:
        """The flock of single-instance stage ``name``; while another holds it, wait as standby.

        Returns (the lock, whether we waited for it), or (None, ...) when ``stop``
        was set first. Only one router and one intake work a spool at a time.
        """
        lock = self.lock(name)
        waited = False
        while not stop.is_set():
            if lock.acquire(blocking=False):
                if waited:
                    LOG.info("%s lock %s acquired: this %s is now active", name, lock.path, name)
                return lock, waited
            if not waited:
                LOG.warning("another %s is active on spool %s (%s is locked): waiting as "
                            "standby", name, self.root, lock.path)
                waited = True
            stop.wait(retry)
        return None, waited

    def ensure(self, destinations: Iterable[str] = ()) -> None:
        for d in (self.tmp, self.drop, self.state, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        for st in Stage:
            for pattern in st.facts.layout:
                (self.root / pattern.split("/")[0]).mkdir(exist_ok=True)
        for name in destinations:
            for st in Stage:
                if st.facts.per_destination and st.facts.eager:
                    self.folder(st, name).mkdir(parents=True, exist_ok=True)

    def destinations_on_disk(self) -> list[str]:
        """Destination folder names with an outbox."""
        return sorted(p.dest for p in self.places(Stage.OUTGOING) if p.dest)

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    # ------------------------------------------------------------ temp files

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
        ``tmp/<owner>.lock`` (like a dispatcher worker), so ``sweep_tmp`` knows a
        folder whose lock it can take belongs to a dead process and removes it.
        """
        if self._private is not None:
            return self._private[0]
        owner = owner_id()
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
        remove_files(folder)
        with contextlib.suppress(OSError):
            os.unlink(lock.path)
        lock.release()

    def write_temp(self, data: bytes, suffix: str = "", mtime: float | None = None,
                   sync: bool = True) -> Path:
        """A new temp file holding ``data`` (fsynced unless the caller syncs it later)."""
        with self.temp_file(suffix, sync=sync) as (tmp, f):
            f.write(data)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        return tmp

    @contextlib.contextmanager
    def temp_file(self, suffix: str = "", sync: bool = True) -> Iterator[tuple[Path, IO[bytes]]]:
        """A new temp file to write into; fsynced when the block ends, removed if it raises."""
        tmp = self.tmp_path(suffix)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                yield tmp, f
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            self.discard_temp(tmp)
            raise

    def copy_in(self, src: Path, suffix: str = DCM) -> Path:
        """Copy a file into tmp/ (from another filesystem), fsynced."""
        with open(src, "rb") as fi, self.temp_file(suffix) as (tmp, fo):
            shutil.copyfileobj(fi, fo, 1024 * 1024)
        return tmp

    discard_temp = staticmethod(durable.discard)

    # ------------------------------------------------------------ sidecars

    @staticmethod
    def sidecar_of(dcm: Path) -> Path:
        return dcm.with_suffix(JSON)

    read_json = staticmethod(read_json)

    def read_sidecar(self, dcm: Path) -> Sidecar:
        """The .json beside ``dcm``, else the sidecar the file carries (fresh in incoming/)."""
        return of(read_json(self.sidecar_of(dcm)) or carried.carried(dcm))

    def write_bytes_atomic(self, target: Path, data: bytes, mtime: float | None = None) -> None:
        """tmp/ then fsync then rename: the target is never seen half-written."""
        tmp = self.write_temp(data, target.suffix, mtime)
        try:
            os.replace(tmp, target)
        except BaseException:
            self.discard_temp(tmp)
            raise

    def write_json(self, target: Path, data: Any, mtime: float | None = None) -> None:
        self.write_bytes_atomic(target, dump_json(data), mtime)

    def sidecar_batch(self) -> SidecarBatch:
        """Several sidecar writes that share one flush (see :class:`SidecarBatch`)."""
        return SidecarBatch(self)

    def sync_files(self, files: Iterable[Path | str]) -> None:
        """``fsync_all`` of files in this spool, without the syncfs speed-up while it is slow."""
        use = time.monotonic() >= self._syncfs_after
        if fsync_all(files, syncfs=use) > durable.SYNCFS_SLOW:
            self._syncfs_after = time.monotonic() + durable.SYNCFS_PAUSE
            LOG.debug("syncfs on %s took over %gs (other writers on this filesystem): "
                      "fsyncing files one by one for %gs", self.root, durable.SYNCFS_SLOW,
                      durable.SYNCFS_PAUSE)

    @staticmethod
    def sync_dirs(folders: Iterable[Path]) -> None:
        """The renames, links and unlinks made in these folders survive power loss."""
        for d in dict.fromkeys(folders):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(d)

    # ------------------------------------------------------------ state changes

    def publish(self, src: Path, folder: Path, name: str, sidecar: Sidecar,
                fsync_data: bool = True) -> Path:
        """Make a fully written file visible in ``folder`` as ``name``.dcm, durably.

        Order: data and sidecar durable (carried by the file, ``carried``, or else
        a .json written atomically beside it), rename of the .dcm (the commit
        point), directory fsync. When this returns the instance survives power loss.
        """
        dst = folder / (name + DCM)
        if folder == self.incoming and carried.attach(src, sidecar):
            fsync_path(src)   # the data and its sidecar in one
        else:
            if fsync_data:
                fsync_path(src)
            self.write_json(folder / (name + JSON), sidecar)
        os.replace(src, dst)
        fsync_dir(folder)
        return dst

    def move(self, dcm: Path, folder: Path, sidecar: Sidecar | None = None,
             mtime: float | None = None, durable: bool = False, written: bool = False) -> Path:
        """Move an instance (its .dcm and sidecar) into ``folder``.

        With ``sidecar`` the new content is written at the destination first and
        the old sidecar removed after the rename; with ``written`` a batch wrote it
        there already; otherwise the sidecar moves along. A crash at any point
        leaves the .dcm in exactly one folder.
        """
        name = dcm.name[: -len(DCM)]
        dst = folder / dcm.name
        old_json = self.sidecar_of(dcm)
        if sidecar is not None or written:
            if sidecar is not None:
                self.write_json(folder / (name + JSON), sidecar, mtime)
            try:
                os.replace(dcm, dst)
            except FileNotFoundError:
                if sidecar is not None:  # someone moved it first: ours describes nothing
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(folder / (name + JSON))
                raise
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

    def link(self, dcm: Path, folder: Path, sidecar: Sidecar | None = None) -> Path:
        """Hard-link an instance into ``folder`` (fan-out, no copy), its sidecar written first
        (``None``: a :class:`SidecarBatch` wrote it already).

        Idempotent: re-running after a crash finds the link already there. A
        different file of that name raises FileExistsError.
        """
        if sidecar is not None:
            self.write_json(folder / (dcm.stem + JSON), sidecar)
        dst = folder / dcm.name
        try:
            os.link(dcm, dst)
        except FileExistsError:
            if not os.path.samefile(dcm, dst):
                raise
        except FileNotFoundError:
            if sidecar is not None:  # the source moved on: the sidecar we wrote is nobody's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / (dcm.stem + JSON))
            raise
        return dst

    def remove(self, dcm: Path) -> bool:
        """Delete an instance copy: the .dcm (the commit point), then its sidecar.

        False when the .dcm was already gone (another admin, a concurrent move).
        The caller makes the folder durable (``sync_dirs``) when it matters.
        """
        try:
            os.unlink(dcm)
            gone = True
        except FileNotFoundError:
            gone = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sidecar_of(dcm))
        return gone

    def quarantine(self, path: Path, reason: str, stage: str, dest: str | None = None,
                   sidecar: Sidecar | None = None) -> Path:
        """Move an instance or a dropped file to error/ (or error/<dest>/) with its reason."""
        folder = self.error_dir(dest)
        folder.mkdir(parents=True, exist_ok=True)
        data = quarantined(sidecar or {}, stage, reason, dest)
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

    def rename_folder(self, src: Path, dst: Path) -> None:
        """Rename a whole folder of instances in one step (the router releasing a batch).

        Atomic: every instance is under the old name or all are under the new one,
        and instances that arrive for the old name afterwards start a fresh folder.
        """
        os.rename(src, dst)
        fsync_dir(dst.parent)

    @staticmethod
    def remove_folder(folder: Path) -> bool:
        """Remove an empty folder (a drained batch, an emptied drop/ sub-folder).

        False when it is gone already; OSError when it still holds something.
        """
        try:
            folder.rmdir()
        except FileNotFoundError:
            return False
        return True

    def set_flag(self, dest: str, flag: Flag, by: str) -> Path:
        path = self.flag(dest, flag)
        self.state.mkdir(exist_ok=True)
        self.write_json(path, {"flag": str(flag), "at": now_iso(), "by": by})
        return path

    def clear_flag(self, dest: str, flag: Flag) -> bool:
        """False when the flag was not set."""
        try:
            os.unlink(self.flag(dest, flag))
        except FileNotFoundError:
            return False
        return True

    def has_flag(self, dest: str, flag: Flag) -> bool:
        return self.flag(dest, flag).exists()

    def remove_state(self, filename: str) -> bool:
        """Remove one record in state/ (False when it was not there)."""
        try:
            os.unlink(self.state / filename)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def set_next_attempt(dcm: Path, when: float) -> None:
        os.utime(dcm.with_suffix(JSON), (when, when))

    # ------------------------------------------------------------ queries

    @staticmethod
    def scan(folder: Path) -> Scan:
        """Every ``*.dcm`` entry in one folder (not recursive); missing folder = empty."""
        return Scan(folder)

    @staticmethod
    def next_attempt(dcm: Path | str) -> float:
        """An outbox entry's next-attempt time: its sidecar's mtime (0 = due, no sidecar)."""
        try:
            return os.stat(str(dcm)[: -len(DCM)] + JSON).st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def landed_at(dcm: Path | str) -> float | None:
        """When a copy landed in success/, error/ or discard/: its sidecar's mtime."""
        try:
            return os.stat(str(dcm)[: -len(DCM)] + JSON).st_mtime
        except FileNotFoundError:
            return None

    def oldest(self, folder: Path, n: int, due_before: float | None = None) -> list[Path]:
        """The ``n`` oldest instances (by name = receive time), optionally only due ones.

        Memory is O(n) whatever the backlog; one scandir per call, amortised over
        the n instances it returns.
        """
        entries: Iterable[os.DirEntry[str]] = self.scan(folder)
        if due_before is not None:
            entries = (e for e in entries if self.next_attempt(e.path) <= due_before)
        return [Path(folder, nm) for nm in heapq.nsmallest(n, (e.name for e in entries))]

    def has_copy(self, dest: str, fname: str, queued: bool = False) -> bool:
        """Whether ``dest`` already has this instance (queued, claimed, delivered or failed).

        ``queued``: only whether it waits in one of ``dest``'s queues. Checked in
        the order a copy moves (lifecycle.Stage), so a dispatcher moving it during
        the checks cannot make it look absent.
        """
        for st in Stage:
            if (st.facts.queued if queued else st.facts.has_copy) and st.facts.per_destination:
                for place in self.places(st, dest):
                    if (place.path / fname).exists():
                        return True
        return False

    def copies(self, name: str | None = None, uid: str | None = None
               ) -> Iterator[tuple[Place, Path]]:
        """Every copy whose spool name is ``name``, or whose name carries SOP Instance ``uid``."""
        target = sanitize(uid) if uid is not None else None
        for place in self.places():
            for e in self.scan(place.path):
                stem = e.name[: -len(DCM)]
                if stem == name or (target is not None and uid_of_name(stem) == target):
                    yield place, Path(e.path)
