"""The drop folder: files people copy into ``spool/drop/`` become instances in incoming/.

People copy files of any name, in nested folders, possibly huge, possibly over a
slow SMB share that keeps the file open for minutes. ``incoming/`` only ever holds
complete instances with their sidecar, so the intake decides when a dropped file
is complete, checks it is a whole DICOM instance, and hands it over with
``Spool.publish`` (or sends it to ``error/`` with ``Spool.quarantine`` and a reason
a person understands). The router creates one :class:`DropIntake` and calls
:meth:`DropIntake.poll` from its loop.

Completeness. Watchdog events are hints only (inotify drops events silently on
overflow): a periodic full rescan is the source of truth. A file is complete when

- watchdog saw it closed after writing (IN_CLOSE_WRITE) or renamed into drop/, and
  its size and mtime have not changed since; or
- its size and mtime stayed unchanged for ``stable_for`` seconds of our own
  observation (writers that never close: SMB clients, ``rsync --inplace``). Our
  clock, not the file's mtime, measures that, so a file server with a skewed clock
  cannot make a file look old.

Validation walks the element structure from the first to the last byte without
reading values (pixel data is skipped with a seek; memory is constant whatever the
file size): an element whose declared length runs past the end of the file, or an
undefined-length sequence / encapsulated pixel data without its delimiter, is a
truncated copy. Files without the 128-byte preamble and file meta but with a valid
data set are accepted: a preamble and file meta are written in front of the data
set bytes, which are copied unchanged (the dispatcher sends Part-10 files). Proper
Part-10 files are renamed into incoming/, never copied.

Hidden files and folders (a leading ``.``) are ignored: rsync and SMB clients write
their temp files that way and rename them when done.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import stat
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import keyword_for_tag
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from hermes_py import log
from hermes_py.config import IntakeSettings
from hermes_py.spool import DCM, Spool, new_name, now_iso

LOG = logging.getLogger(__name__)

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

EMPTY_DIR_AGE = 600.0  # an emptied sub-folder of drop/ is removed after this long untouched
MAX_DIR_DEPTH = 64
COPY_CHUNK = 1 << 20


# ---------------------------------------------------------------- reasons


class Unacceptable(Exception):
    """A dropped file that cannot become an instance; ``reason`` goes into error/<name>.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NotDicom(Unacceptable):
    pass


class Truncated(Unacceptable):
    pass


class Corrupt(Unacceptable):
    pass


class _EOF(Exception):
    """The data ended before a read or skip could be satisfied."""


def _tag(tag: int) -> str:
    kw = keyword_for_tag(tag) if tag >> 16 not in (0xFFFE,) else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + kw if kw else ''}"


# ---------------------------------------------------------------- byte sources


class _FileSource:
    """Sequential reads and seeks over an open file, with its size known."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size: int = size
        self.pos: int = f.tell()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        if len(data) < n:
            raise _EOF
        return bytes(data)

    def read_some(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return bytes(data)

    def peek(self, n: int) -> bytes:
        data = self.f.read(n)
        self.f.seek(self.pos)
        return bytes(data)

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _EOF
        self.pos += n
        self.f.seek(self.pos)

    def remaining(self) -> int | None:
        return self.size - self.pos

    def at_end(self) -> bool:
        return self.pos >= self.size


class _InflateSource:
    """A deflated data set (raw deflate after the file meta), inflated as it is walked."""

    def __init__(self, raw: _FileSource):
        self.raw = raw
        self.d = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buf = bytearray()
        self.pos = 0  # offset in the inflated data

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.d.eof:
            data = self.d.unconsumed_tail or self.raw.read_some(65536)
            if not data:
                return
            try:
                self.buf += self.d.decompress(data, COPY_CHUNK)
            except zlib.error as e:
                raise Corrupt(f"deflated data set cannot be inflated: {e}") from None

    def read(self, n: int) -> bytes:
        self._fill(n)
        if len(self.buf) < n:
            raise _EOF
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            self._fill(min(n, COPY_CHUNK))
            take = min(n, len(self.buf))
            if take == 0:
                raise _EOF
            del self.buf[:take]
            self.pos += take
            n -= take

    def remaining(self) -> int | None:
        return None

    def at_end(self) -> bool:
        self._fill(1)
        return not self.buf

    @property
    def complete(self) -> bool:
        return self.d.eof


# ---------------------------------------------------------------- the structure walk

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_NESTING = 32
_WANTED = {0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid"}
_META_WANTED = {0x00020002: "media_class", 0x00020003: "media_instance",
                0x00020010: "transfer_syntax"}


class _Walker:
    """Walks a data set's elements from start to end, reading only the UIDs we need."""

    def __init__(self, src: _FileSource | _InflateSource):
        self.src = src
        self.values: dict[str, str] = {}
        self.elements = 0
        self.encapsulated = False
        self.open: list[str] = []  # sequences / pixel data not yet closed, for messages

    def header(self, explicit: bool, little: bool) -> tuple[int, bytes | None, int, int]:
        src = self.src
        pos = src.pos
        e = "<" if little else ">"
        group, elem = struct.unpack(e + "HH", src.read(4))
        tag = group << 16 | elem
        if group == 0xFFFE:
            return tag, None, struct.unpack(e + "L", src.read(4))[0], pos
        if not explicit:
            return tag, None, struct.unpack(e + "L", src.read(4))[0], pos
        vr = src.read(2)
        if vr in _LONG_VRS:
            src.read(2)
            return tag, vr, struct.unpack(e + "L", src.read(4))[0], pos
        if vr in _SHORT_VRS:
            return tag, vr, struct.unpack(e + "H", src.read(2))[0], pos
        raise Corrupt(f"element {_tag(tag)} at byte {pos} has an invalid value representation "
                      f"{vr!r}: this is not a well-formed DICOM data set")

    def value(self, tag: int, length: int, pos: int, keep: str | None) -> None:
        remaining = self.src.remaining()
        if remaining is not None and length > remaining:
            raise Truncated(
                f"truncated: element {_tag(tag)} at byte {pos} declares {length} bytes but the "
                f"file ends after {remaining}; the copy was probably interrupted")
        if keep and length <= 256:
            raw = self.src.read(length)
            self.values[keep] = raw.decode("ascii", "replace").rstrip("\0 ").strip()
        else:
            self.open.append(f"element {_tag(tag)} (byte {pos}, {length} bytes)")
            self.src.skip(length)
            self.open.pop()

    def dataset(self, explicit: bool, little: bool, depth: int = 0, top: bool = True) -> None:
        while True:
            if top and self.src.at_end():
                return
            tag, vr, length, pos = self.header(explicit, little)
            if tag == ITEM_END:
                if top:
                    raise Corrupt(f"unexpected item delimiter at byte {pos}")
                return
            if tag >> 16 == 0xFFFE:
                raise Corrupt(f"unexpected {_tag(tag)} at byte {pos} outside a sequence")
            if top and tag == 0 and self.elements:
                return  # trailing zero padding after the data set
            self.elements += 1
            if length == UNDEFINED:
                if tag == PIXEL_DATA or vr in (b"OB", b"OW"):
                    if top:
                        self.encapsulated = True
                    self.fragments(tag, pos)
                elif vr == b"UN":  # PS3.5 6.2.2: content is implicit VR little endian
                    self.sequence(tag, pos, False, True, depth + 1)
                elif vr is None or vr == b"SQ":
                    self.sequence(tag, pos, explicit, little, depth + 1)
                else:
                    raise Corrupt(f"element {_tag(tag)} at byte {pos} has undefined length but "
                                  f"value representation {vr!r}")
            else:
                self.value(tag, length, pos, _WANTED.get(tag) if top else None)

    def sequence(self, tag: int, pos: int, explicit: bool, little: bool, depth: int) -> None:
        if depth > MAX_NESTING:
            raise Corrupt(f"sequences nested more than {MAX_NESTING} deep at byte {pos}")
        self.open.append(f"sequence {_tag(tag)} starting at byte {pos}")
        while True:
            itag, _, ilen, ipos = self.header(explicit, little)
            if itag == SEQ_END:
                break
            if itag != ITEM:
                raise Corrupt(f"sequence {_tag(tag)}: expected an item at byte {ipos}, found "
                              f"{_tag(itag)}")
            if ilen == UNDEFINED:
                self.dataset(explicit, little, depth, top=False)
            else:
                self.value(itag, ilen, ipos, None)
        self.open.pop()

    def fragments(self, tag: int, pos: int) -> None:
        self.open.append(f"encapsulated pixel data {_tag(tag)} starting at byte {pos}")
        while True:
            itag, _, ilen, ipos = self.header(True, True)
            if itag == SEQ_END:
                break
            if itag != ITEM or ilen == UNDEFINED:
                raise Corrupt(f"encapsulated pixel data {_tag(tag)}: expected a fragment at "
                              f"byte {ipos}, found {_tag(itag)}")
            self.value(itag, ilen, ipos, None)
        self.open.pop()

    def meta(self) -> dict[str, str]:
        """Group 0002 (always explicit VR little endian) up to the first other group."""
        src = self.src
        assert isinstance(src, _FileSource)
        found: dict[str, str] = {}
        while True:
            head = src.peek(2)
            if len(head) < 2 or struct.unpack("<H", head)[0] != 0x0002:
                return found
            tag, vr, length, pos = self.header(True, True)
            if length == UNDEFINED:
                raise Corrupt(f"file meta element {_tag(tag)} at byte {pos} has undefined length")
            key = _META_WANTED.get(tag)
            self.value(tag, length, pos, key)
            if key:
                found[key] = self.values.pop(key)

    def eof_reason(self, pos: int) -> str:
        if self.open:
            what = self.open[-1]
            if what.startswith("element"):
                return (f"truncated: the data ends inside {what}; the copy was probably "
                        "interrupted")
            return (f"truncated: {what} never ends (the file ends before its delimiter); the "
                    "copy was probably interrupted")
        return f"truncated: the file ends in the middle of an element header at byte {pos}"


# ---------------------------------------------------------------- inspection


@dataclass(frozen=True)
class Inspection:
    """What a dropped file is, from one streaming pass over it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    part10: bool  # preamble + DICM + file meta: publish as is
    dataset_offset: int  # where the data set bytes start (kept unchanged)
    size: int


def _guess_encoding(head: bytes) -> tuple[bool, bool]:
    """(explicit, little) for a data set with no file meta, from its first element."""
    if len(head) < 8:
        raise NotDicom("not DICOM: too short to hold a DICOM data set")
    explicit = head[4:6] in _LONG_VRS or head[4:6] in _SHORT_VRS
    if struct.unpack("<H", head[:2])[0] in (0x0004, 0x0008):
        return explicit, True
    if explicit and struct.unpack(">H", head[:2])[0] in (0x0004, 0x0008):
        return True, False
    raise NotDicom("not DICOM: no 'DICM' marker at byte 128 and the file does not start like a "
                   "DICOM data set")


def _syntax_of(ts: str) -> tuple[bool, bool, bool]:
    """(explicit, little, deflated) for a transfer syntax UID (unknown ones: explicit LE)."""
    if ts == IMPLICIT_LE:
        return False, True, False
    if ts == EXPLICIT_BE:
        return True, False, False
    return True, True, ts in DEFLATED


def inspect(path: Path | str) -> Inspection:
    """Check a file is one whole DICOM instance; raise :class:`Unacceptable` with the reason."""
    with open(path, "rb", buffering=65536) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise NotDicom("empty file (0 bytes)")
        head = f.read(132)
        f.seek(0)
        if len(head) == 132 and head[128:132] == b"DICM":
            f.seek(132)
            preamble = True
        elif head[:4] == b"DICM":
            f.seek(4)
            preamble = False
        else:
            preamble = False
        src = _FileSource(f, size)
        w = _Walker(src)
        meta: dict[str, str] = {}
        try:
            meta = w.meta()
        except _EOF:
            raise Truncated(w.eof_reason(src.pos)) from None
        except Corrupt as e:
            if preamble:
                raise Corrupt(f"corrupt file meta information: {e.reason}") from None
            raise NotDicom(f"not DICOM: {e.reason}") from None
        if meta and not meta.get("transfer_syntax"):
            raise Corrupt("the file meta information has no Transfer Syntax UID (0002,0010)")
        if meta.get("media_class") == DICOMDIR_CLASS:
            raise Unacceptable("a DICOMDIR (media directory), not an instance: the instances it "
                               "lists are taken from their own files")
        offset = src.pos
        guessed = not meta
        if guessed:
            explicit, little = _guess_encoding(src.peek(8))
            ts = IMPLICIT_LE if not explicit else (EXPLICIT_LE if little else EXPLICIT_BE)
            deflated = False
        else:
            ts = meta["transfer_syntax"]
            explicit, little, deflated = _syntax_of(ts)
        body: _FileSource | _InflateSource = _InflateSource(src) if deflated else src
        w.src = body
        try:
            w.dataset(explicit, little)
            if isinstance(body, _InflateSource) and not body.complete:
                raise Truncated("truncated: the deflated data set ends before the end of its "
                                "compressed stream; the copy was probably interrupted")
        except _EOF:
            reason = w.eof_reason(body.pos)
            if guessed and not w.values:
                raise NotDicom(f"not DICOM: no 'DICM' preamble, and the content does not read as "
                               f"a data set ({reason})") from None
            raise Truncated(reason) from None
        except Unacceptable as e:
            if guessed and not w.values:
                raise NotDicom(f"not DICOM: no 'DICM' preamble, and the content does not read as "
                               f"a data set ({e.reason})") from None
            raise
    sop = w.values.get("sop_instance_uid") or ""
    sop_class = w.values.get("sop_class_uid") or ""
    if not sop_class and not sop and guessed:
        raise NotDicom("not DICOM: no 'DICM' preamble and no SOP Class/Instance UID in the data")
    if not sop:
        raise Unacceptable("no SOP Instance UID (0008,0018) in the data set: it cannot be "
                           "routed or sent")
    if not sop_class:
        raise Unacceptable("no SOP Class UID (0008,0016) in the data set: it cannot be sent")
    if guessed and w.encapsulated:
        raise Unacceptable("compressed (encapsulated) pixel data but no file meta information: "
                           "the transfer syntax it is compressed with is unknown")
    return Inspection(sop_instance_uid=sop, sop_class_uid=sop_class, transfer_syntax=ts,
                      part10=preamble and bool(meta), dataset_offset=offset, size=size)


def build_part10(src: Path, info: Inspection, dst: Path) -> int:
    """Write preamble + file meta + the unchanged data set bytes of ``src`` to ``dst``, fsynced.

    The meta is the one the receiver's files carry (pynetdicom's), so every file in
    incoming/ looks alike. Returns the size written. Streams; never reads src whole.
    """
    meta = create_file_meta(sop_class_uid=UID(info.sop_class_uid),
                            sop_instance_uid=UID(info.sop_instance_uid),
                            transfer_syntax=UID(info.transfer_syntax))
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta)
    try:
        with open(src, "rb") as fi, open(dst, "xb") as fo:
            fo.write(b"\0" * 128 + b"DICM" + buf.getvalue())
            fi.seek(info.dataset_offset)
            while chunk := fi.read(COPY_CHUNK):
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
            return fo.tell()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise


# ---------------------------------------------------------------- the intake


def _printable(s: str) -> str:
    """A file name as it may appear in a one-line log: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split(os.sep))


class DropIntake:
    """Turns complete files under ``spool/drop/`` into instances in incoming/ (or error/).

    Use: ``start()`` (watchdog hints), then in a loop ``wakeup.clear(); poll();
    wakeup.wait(next_check())``; ``stop()`` at the end. ``poll()`` alone works too
    (rescans only). Not thread-safe for concurrent ``poll()`` calls: one router
    process owns the intake (it holds ``locks/router.lock``).
    """

    def __init__(self, spool: Spool, settings: IntakeSettings):
        self.spool = spool
        self.settings = settings
        self.wakeup = threading.Event()
        self.empty_dir_age = EMPTY_DIR_AGE
        self.accepted = 0
        self.rejected = 0
        self._root = os.path.abspath(spool.drop)
        self._lock = threading.Lock()
        self._hints: set[str] = set()
        self._dir_hints: set[str] = set()
        self._closed: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) at close/rename
        self._pending: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, since)
        self._due: list[tuple[float, str]] = []  # heap of (since + stable_for, rel)
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
        from watchdog.observers import Observer

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
        observer = Observer()
        try:
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
                    self._closed[rel] = sig
                self._hints.add(rel)
        self.wakeup.set()

    # ------------------------------------------------------------ polling

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
            self._due = [(v[2] + self.settings.stable_for, k) for k, v in self._pending.items()]
            heapq.heapify(self._due)
            return taken
        for rel in sorted(hints):
            taken += self._consider(rel, now)
        for rel in sorted(dirs):
            taken += self._scan_dir(os.path.join(self._root, rel), rel, now, rel.count(os.sep) + 1)
        while self._due and self._due[0][0] <= now:
            due, rel = heapq.heappop(self._due)
            p = self._pending.get(rel)
            if p is not None and p[2] + self.settings.stable_for == due:
                taken += self._consider(rel, now)
        if len(self._due) > 4 * len(self._pending) + 64:  # drop stale heap entries
            self._due = [(v[2] + self.settings.stable_for, k) for k, v in self._pending.items()]
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
                os.rmdir(path)  # fails unless empty
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
            closed = self._closed.get(rel)
        if closed != sig:
            prev = self._pending.get(rel)
            if prev is None or prev[:2] != sig:
                self._pending[rel] = (sig[0], sig[1], now)
                since = now
                heapq.heappush(self._due, (now + self.settings.stable_for, rel))
            else:
                since = prev[2]
            if now - since < self.settings.stable_for:
                return 0
        self._forget(rel)
        return self._take(rel, path, st)

    def _forget(self, rel: str) -> None:
        self._pending.pop(rel, None)
        with self._lock:
            self._closed.pop(rel, None)

    # ------------------------------------------------------------ taking a file

    def _take(self, rel: str, path: str, st: os.stat_result) -> int:
        original = "drop/" + rel.replace(os.sep, "/")
        base: dict[str, Any] = {"source": "drop", "original_path": original,
                                "size": st.st_size, "received_at": now_iso()}
        if not stat.S_ISREG(st.st_mode):
            return self._reject(path, original, "not a regular file (a symbolic link, pipe or "
                                                "device): copy the file itself into drop/", base)
        try:
            info = inspect(path)
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
        sidecar = {
            "name": name,
            "sop_instance_uid": info.sop_instance_uid,
            "sop_class_uid": info.sop_class_uid,
            "transfer_syntax": info.transfer_syntax,
            "source": "drop",
            "received_at": base["received_at"],
            "original_path": original,
            "size": st.st_size,
        }
        tmp: Path | None = None
        try:
            now_st = os.lstat(path)
            if (now_st.st_size, now_st.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                return 0  # written to while we checked it: not complete after all
            if info.part10:
                self.spool.publish(Path(path), self.spool.incoming, name, sidecar)
            else:
                tmp = self.spool.tmp_path(DCM)
                sidecar["size"] = build_part10(Path(path), info, tmp)
                self.spool.publish(tmp, self.spool.incoming, name, sidecar, fsync_data=False)
                tmp = None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._complain(rel, st, f"cannot move {_printable(original)} into incoming/: {e}; "
                                    "will retry")
            return 0
        self.accepted += 1
        log.event(LOG, "received", sop=info.sop_instance_uid, name=name, source="drop",
                  path=_printable(original), ts=info.transfer_syntax, size=sidecar["size"],
                  note=None if info.part10 else "no preamble/file meta: added")
        return 1

    def _reject(self, path: str, original: str, reason: str, base: dict[str, Any]) -> int:
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
        log.event(LOG, "rejected", level=logging.WARNING, name=dst.stem, source="drop",
                  path=_printable(original), reason=reason)
        return 1

    def _complain(self, key: str, st: os.stat_result, message: str) -> None:
        """Log a problem once per file version, not on every poll."""
        sig = (st.st_size, st.st_mtime_ns)
        if self._complained.get(key) != sig:
            if len(self._complained) > 10000:
                self._complained.clear()
            self._complained[key] = sig
            LOG.warning("%s", message)


def run_forever(intake: DropIntake, stop: threading.Event) -> None:
    """Poll until ``stop`` is set: the loop a router runs, for tests and small tools."""
    while not stop.is_set():
        intake.wakeup.clear()
        try:
            intake.poll()
        except OSError as e:
            if e.errno != errno.ENOENT:
                LOG.warning("drop intake pass failed: %s", e)
        intake.wakeup.wait(intake.next_check())
