"""The drop folder: files people copy into ``spool/drop/`` become instances in incoming/.

``hermes-py intake`` (a child of ``serve`` when ``[intake] enabled``) is the only
writer that takes from drop/: it holds ``locks/intake.lock`` for life and a second
one waits as standby, like Postfix's pickup beside its queue manager. It only
ever publishes into incoming/ (or error/), where the router takes over.

People copy files of any name, in nested folders, possibly huge, possibly over a
slow SMB share that keeps the file open for minutes. ``incoming/`` only ever holds
complete instances with their sidecar, so the intake decides when a dropped file
is complete, checks it is a whole DICOM instance (``dicomfile.inspect``), and
hands it over with ``Spool.publish`` (or sends it to ``error/`` with
``Spool.quarantine`` and a reason a person understands).

Completeness. Watchdog events are hints only (inotify drops events silently on
overflow): a periodic full rescan is the source of truth. A file is complete when
it is structurally whole (``dicomfile.inspect``: every element ends inside the
file, an image has its Pixel Data) *and*

- watchdog saw it closed after writing (IN_CLOSE_WRITE) or renamed into drop/, and
  its size and mtime have not changed since; or
- its size and mtime stayed unchanged for ``stable_for`` seconds of our own
  observation (writers that never close: SMB clients, ``rsync --inplace``). Our
  clock, not the file's mtime, measures that, so a file server with a skewed clock
  cannot make a file look old.

A file that is not whole yet is a writer that paused, not one that finished (a
slow share pauses between the header and the pixels): it waits, and only when it
stayed unchanged for ``incomplete_after`` does it go to error/ as truncated. A
file renamed into drop/ (``hermes-py send``, the router's from-incoming/, a writer
that writes ``x.part`` then renames it) is final at once: a rename is how a writer
says it is done, so a truncated one is rejected without the wait. So is every file
under drop/send-*/ and drop/from-incoming/, which only the spool fills, by rename
(inotify misses renames into a folder it is not watching yet).

What the intake publishes is its own copy, never the dropped inode: a writer that
still holds the file (or a hard link to a file outside the spool) could otherwise
change the spool's copy after it was checked, or after it was delivered. The copy
is published only if the dropped file did not change while it was copied; then
the dropped file is removed. A data set without preamble and file meta gets them
written in front, in that same copy.

Hidden files and folders (a leading ``.``) are ignored: rsync and SMB clients write
their temp files that way and rename them when done.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import shutil
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from hermes_py import dicomfile
from hermes_py.config import IntakeSettings, Limits, Settings
from hermes_py.dicomfile import Incomplete, Unacceptable
from hermes_py.durations import fmt_duration
from hermes_py.errors import HermesError
from hermes_py.events import emit
from hermes_py.lifecycle import Event
from hermes_py.log import printable as _printable
from hermes_py.process import stop_on_signals
from hermes_py.spool import DCM, Spool, new_name
from hermes_py.spool import sidecar as sc
from hermes_py.spool.names import deposited

LOG = logging.getLogger(__name__)

EMPTY_DIR_AGE = 600.0  # an emptied sub-folder of drop/ is removed after this long untouched
COPY_CHUNK = 1 << 20
MAX_DIR_DEPTH = 64
IDLE_TICK = 1.0  # longest wait between passes when watchdog says nothing


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file is the same file, unchanged: inode, device, size and mtime."""
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _observer() -> Any:
    """An inotify observer that reports a file renamed in from outside drop/ (``hermes-py
    send`` and the router deposit that way) as moved, not created: a rename means its
    writer is done. Elsewhere watchdog's default, where such files wait for stable_for."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:
        from watchdog.observers import Observer
        return Observer()
    return InotifyObserver(generate_full_events=True)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split(os.sep))


class DropIntake:
    """Turns complete files under ``spool/drop/`` into instances in incoming/ (or error/).

    Use: ``start()`` (watchdog hints), then ``serve(stop)``, or in a loop
    ``wakeup.clear(); poll(); wakeup.wait(next_check())``; ``stop()`` at the end.
    ``poll()`` alone works too (rescans only). Not thread-safe for concurrent
    ``poll()`` calls: one intake process owns drop/ (it holds ``locks/intake.lock``).
    """

    def __init__(self, spool: Spool, settings: IntakeSettings,
                 max_inflated: int = Limits().max_inflated):
        self.spool = spool
        self.settings = settings
        self.max_inflated = max_inflated
        self.wakeup = threading.Event()
        self.empty_dir_age = EMPTY_DIR_AGE
        self.accepted = 0
        self.rejected = 0
        self._root = os.path.abspath(spool.drop)
        self._lock = threading.Lock()
        self._hints: set[str] = set()
        self._dir_hints: set[str] = set()
        # rel -> (size, mtime_ns, renamed) at close (False) or rename into drop/ (True)
        self._closed: dict[str, tuple[int, int, bool]] = {}
        # rel -> (size, mtime_ns, since, wait, incomplete): unchanged since ``since``; looked
        # at again ``wait`` later (stable_for, or incomplete_after once found not whole)
        self._pending: dict[str, tuple[int, int, float, float, bool]] = {}
        self._due: list[tuple[float, str]] = []  # heap of (since + wait, rel)
        self._last_full: float | None = None
        self._complained: dict[str, tuple[int, int]] = {}
        self._observer: Any = None

    # ------------------------------------------------------------ watchdog

    def start(self) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )

        intake = self

        class _Hints(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                intake._hint(event)

        Path(self._root).mkdir(parents=True, exist_ok=True)
        # watchdog 7 warns (with a different text each time, so never deduplicated) when
        # a new nested folder is registered twice; harmless, but one per folder a person
        # creates would flood the log.
        warnings.filterwarnings("ignore", message=r"Callback with id .* already exists",
                                category=RuntimeWarning, module=r"watchdog\.")
        try:
            observer = _observer()
            observer.schedule(_Hints(), self._root, recursive=True, event_filter=[
                FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent,
                DirCreatedEvent, DirMovedEvent])
            observer.start()
        except OSError as e:  # e.g. the inotify watch limit: rescans still find everything
            LOG.warning("watching %s failed (%s); relying on rescans every %gs", self._root, e,
                        self.settings.rescan_interval)
            return
        self._observer = observer

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(5)

    def _rel(self, path: str | bytes) -> str | None:
        p = os.fsdecode(path)
        if not p.startswith(self._root + os.sep):
            return None
        rel = p[len(self._root) + 1:]
        return None if not rel or _hidden(rel) else rel

    def _hint(self, event: Any) -> None:
        """Runs on the watchdog thread: remember what changed, wake the poller."""
        kind = event.event_type
        path = event.dest_path if kind == "moved" else event.src_path
        rel = self._rel(path)
        if rel is None:
            return
        sig = None
        if not event.is_directory and kind in ("closed", "moved"):
            with contextlib.suppress(OSError):
                st = os.lstat(os.fsdecode(path))
                sig = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if event.is_directory:
                self._dir_hints.add(rel)
            else:
                if sig is not None:
                    self._closed[rel] = (*sig, kind == "moved")
                self._hints.add(rel)
        self.wakeup.set()

    # ------------------------------------------------------------ polling

    def serve(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set: at once when watchdog names a file, else when due."""
        while not stop.is_set():
            self.wakeup.clear()
            try:
                self.poll()
            except Exception:  # a bug or an I/O error must not end the intake
                LOG.exception("drop-folder intake pass failed; retrying in 5 s")
                stop.wait(5.0)
                continue
            self.wakeup.wait(min(IDLE_TICK, self.next_check()))

    def next_check(self, now: float | None = None) -> float:
        """Seconds until a poll could take something the events will not announce."""
        now = time.time() if now is None else now
        wait = self.settings.rescan_interval
        if self._last_full is not None:
            wait = self._last_full + self.settings.rescan_interval - now
        if self._due:
            wait = min(wait, self._due[0][0] - now)
        return max(wait, 0.05)

    def poll(self, now: float | None = None) -> int:
        """One pass: take every complete file; returns how many left drop/ (to incoming/ or error/).

        A full rescan runs every ``rescan_interval``; in between only the files
        watchdog named and the ones whose stability period ran out are looked at,
        so a burst of events costs O(events), not O(files in drop/) each.
        """
        now = time.time() if now is None else now
        with self._lock:
            hints, self._hints = self._hints, set()
            dirs, self._dir_hints = self._dir_hints, set()
        taken = 0
        last = self._last_full
        if last is None or now - last >= self.settings.rescan_interval or now < last:
            self._last_full = now
            if not os.path.isdir(self._root):
                Path(self._root).mkdir(parents=True, exist_ok=True)
            taken += self._scan_dir(self._root, "", now, 0)
            self._pending = {k: v for k, v in self._pending.items()
                             if os.path.lexists(os.path.join(self._root, k))}
            self._due = [(v[2] + v[3], k) for k, v in self._pending.items()]
            heapq.heapify(self._due)
            return taken
        for rel in sorted(hints):
            taken += self._consider(rel, now)
        for rel in sorted(dirs):
            taken += self._scan_dir(os.path.join(self._root, rel), rel, now, rel.count(os.sep) + 1)
        while self._due and self._due[0][0] <= now:
            due, rel = heapq.heappop(self._due)
            p = self._pending.get(rel)
            if p is not None and p[2] + p[3] == due:
                taken += self._consider(rel, now)
        if len(self._due) > 4 * len(self._pending) + 64:  # drop stale heap entries
            self._due = [(v[2] + v[3], k) for k, v in self._pending.items()]
            heapq.heapify(self._due)
        return taken

    def _scan_dir(self, path: str, rel: str, now: float, depth: int) -> int:
        try:
            with os.scandir(path) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return 0
        except OSError as e:
            LOG.warning("cannot list %s: %s", path, e)
            return 0
        taken = 0
        for name, is_dir in sorted(entries):
            if name.startswith("."):
                continue
            erel = os.path.join(rel, name) if rel else name
            if is_dir:
                if depth < MAX_DIR_DEPTH:
                    taken += self._scan_dir(os.path.join(path, name), erel, now, depth + 1)
            else:
                taken += self._consider(erel, now)
        if rel:
            self._remove_if_empty(path)
        return taken

    def _remove_if_empty(self, path: str) -> None:
        try:
            if time.time() - os.stat(path).st_mtime >= self.empty_dir_age:
                self.spool.remove_folder(Path(path))  # fails unless empty
        except OSError:
            pass

    def _consider(self, rel: str, now: float) -> int:
        path = os.path.join(self._root, rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(rel)
            return 0
        if stat.S_ISDIR(st.st_mode) or _hidden(rel):
            return 0
        sig = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hint = self._closed.get(rel)
        closed = hint is not None and hint[:2] == sig
        renamed = deposited(rel) or (closed and hint is not None and hint[2])
        prev = self._pending.get(rel)
        stable_for = self.settings.stable_for
        if prev is None or prev[:2] != sig:
            since, wait, incomplete = now, stable_for, False
            self._pending[rel] = (sig[0], sig[1], since, wait, incomplete)
            heapq.heappush(self._due, (since + wait, rel))
        else:
            since, wait, incomplete = prev[2], prev[3], prev[4]
        if now - since < wait and not (closed and not incomplete):
            return 0
        # Found not whole before and unchanged since for incomplete_after, or renamed here
        # whole by its writer: what is missing will not come.
        final = ("renamed into drop/ by its writer" if renamed else
                 f"unchanged for {fmt_duration(self.settings.incomplete_after)}"
                 if incomplete else None)
        taken = self._take(rel, path, st, final=final)
        if taken is None:  # not whole yet: wait for more, then judge it as it is
            wait = max(self.settings.incomplete_after, stable_for)
            self._pending[rel] = (sig[0], sig[1], since, wait, True)
            heapq.heappush(self._due, (since + wait, rel))
            return 0
        self._forget(rel)
        return taken

    def _forget(self, rel: str) -> None:
        self._pending.pop(rel, None)
        with self._lock:
            self._closed.pop(rel, None)

    # ------------------------------------------------------------ taking a file

    def _take(self, rel: str, path: str, st: os.stat_result, final: str | None) -> int | None:
        """Take one file that stopped changing: 1 when it left drop/ (for incoming/ or
        error/), 0 when it stays for the next pass, None when it is not whole yet (and
        not ``final``, which says why no more will come)."""
        original = "drop/" + rel.replace(os.sep, "/")
        base = sc.dropped(original, st.st_size)
        if not stat.S_ISREG(st.st_mode):
            return self._reject(path, original, "not a regular file (a symbolic link, pipe or "
                                                "device): copy the file itself into drop/", base)
        try:
            info = dicomfile.inspect(path, self.max_inflated)
        except Incomplete as e:
            if final is None:
                self._complain(rel, st, f"{_printable(original)} is not complete yet "
                                        f"({e.reason}): waiting up to "
                                        f"{fmt_duration(self.settings.incomplete_after)} "
                                        "for its writer", level=logging.INFO)
                return None
            return self._reject(path, original, f"{e.reason} ({final})", base)
        except Unacceptable as e:
            return self._reject(path, original, e.reason, base)
        except FileNotFoundError:
            return 0
        except OSError as e:
            return self._reject(path, original, f"cannot read the file: {e.strerror or e}", base)
        except Exception as e:  # a bug in the checks must not stop the intake loop
            LOG.exception("checking %s failed", original)
            return self._reject(path, original, f"internal error while checking the file: "
                                                f"{type(e).__name__}: {e}", base)
        name = new_name(info.sop_instance_uid)
        sidecar = sc.accepted_drop(base, name, info.sop_instance_uid, info.sop_class_uid,
                                   info.transfer_syntax, st.st_size)
        try:
            with self.spool.temp_file(DCM) as (tmp, out):
                if info.part10:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, COPY_CHUNK)
                    sidecar["size"] = out.tell()
                else:
                    sidecar["size"] = dicomfile.write_part10(path, info, out)
            try:
                if _signature(os.lstat(path)) != _signature(st):
                    # Written to while we checked or copied it: not complete after all.
                    self.spool.discard_temp(tmp)
                    return 0
                self.spool.publish(tmp, self.spool.incoming, name, sidecar, fsync_data=False)
            except BaseException:
                self.spool.discard_temp(tmp)
                raise
            self.spool.take_dropped(Path(path))
        except FileNotFoundError:
            return 0  # gone meanwhile (its writer renamed it away)
        except OSError as e:
            self._complain(rel, st, f"cannot move {_printable(original)} into incoming/: {e}; "
                                    "will retry")
            return 0
        self.accepted += 1
        emit(LOG, Event.RECEIVED, info.sop_instance_uid, name=name, source="drop",
             path=_printable(original), ts=info.transfer_syntax, size=sidecar.get("size"),
             note=info.new_meta or None)
        return 1

    def _reject(self, path: str, original: str, reason: str, base: sc.Sidecar) -> int:
        try:
            dst = self.spool.quarantine(Path(path), reason, stage="intake", sidecar=base)
        except FileNotFoundError:
            return 0
        except OSError as e:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                self._complain(original, st, f"cannot move {_printable(original)} to error/: "
                                             f"{e}; will retry")
            return 0
        self.rejected += 1
        emit(LOG, Event.REJECTED, level=logging.WARNING, name=dst.stem, source="drop",
             path=_printable(original), reason=reason)
        return 1

    def _complain(self, key: str, st: os.stat_result, message: str,
                  level: int = logging.WARNING) -> None:
        """Log a problem once per file version, not on every poll."""
        sig = (st.st_size, st.st_mtime_ns)
        if self._complained.get(key) != sig:
            if len(self._complained) > 10000:
                self._complained.clear()
            self._complained[key] = sig
            LOG.log(level, "%s", message)


def run(cfg: Settings) -> int:
    """``hermes-py intake``: take complete files from drop/ until SIGTERM/SIGINT."""
    if not cfg.intake.enabled:
        raise HermesError(f"the drop folder intake is disabled ([intake] enabled = false in "
                          f"{cfg.path})")
    stop = threading.Event()
    spool = Spool(cfg.spool.path)
    intake = DropIntake(spool, cfg.intake, cfg.limits.max_inflated)
    stop_on_signals(stop, also=intake.wakeup.set)
    spool.ensure()
    lock, _ = spool.take_lock("intake", stop)
    if lock is None:
        return 0
    try:
        spool.use_private_tmp()  # its creates never queue behind the receiver's
        intake.start()
        LOG.info("intake active on %s (stable_for %gs, rescan every %gs)", spool.drop,
                 cfg.intake.stable_for, cfg.intake.rescan_interval)
        intake.serve(stop)
    finally:
        intake.stop()
        spool.release_private_tmp()
        lock.release()
    LOG.info("intake stopped")
    return 0
