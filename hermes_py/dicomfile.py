"""What a DICOM file on disk is: whole or cut short, its UIDs, its header values.

Every stage that looks inside an instance file asks here, so "is this file
whole" and "which UIDs does it carry" have one answer:

- :func:`inspect` walks the element structure from the first to the last byte
  without reading values (pixel data is skipped with a seek; memory is constant
  whatever the file size): an element whose declared length runs past the end of
  the file, or an undefined-length sequence / encapsulated pixel data without its
  delimiter, is a truncated copy. Files without the 128-byte preamble and file
  meta but with a valid data set are accepted; :func:`write_part10` puts a
  preamble and file meta in front of their unchanged data set bytes.
- :func:`read_header` gives the router the values its rules test, from one
  pydicom read that stops before the pixel data, and refuses a file whose Pixel
  Data is cut short.
- :func:`header_uids` and :func:`meta_uids` give admin and dispatcher the UIDs of
  a file whose sidecar does not have them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import create_file_meta

# Deflated Explicit VR Little Endian, and JPIP Referenced Deflate (its data set is deflated too).
DEFLATED = (DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
COPY_CHUNK = 1 << 20


# ---------------------------------------------------------------- reasons


class Unacceptable(Exception):
    """A file that cannot become an instance; ``reason`` goes into its error/ sidecar."""

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
    if ts == ImplicitVRLittleEndian:
        return False, True, False
    if ts == ExplicitVRBigEndian:
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
            ts: str = ImplicitVRLittleEndian if not explicit else (
                ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
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


def write_part10(src: Path | str, info: Inspection, out: IO[bytes]) -> int:
    """Write preamble + file meta + the unchanged data set bytes of ``src`` to ``out``.

    The meta is the one the receiver's files carry (pynetdicom's), so every file in
    incoming/ looks alike. Returns the size written. Streams; never reads src whole.
    """
    meta = create_file_meta(sop_class_uid=UID(info.sop_class_uid),
                            sop_instance_uid=UID(info.sop_instance_uid),
                            transfer_syntax=UID(info.transfer_syntax))
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta)
    written = out.write(b"\0" * 128 + b"DICM" + buf.getvalue())
    with open(src, "rb") as fi:
        fi.seek(info.dataset_offset)
        while chunk := fi.read(COPY_CHUNK):
            written += out.write(chunk)
    return written


# ---------------------------------------------------------------- header values


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """Read headers without pydicom's validation: vendor headers are often slightly off,
    and a warning per instance is noise and cost (pydicom's setting is process-wide)."""
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = previous


class UnreadableError(Exception):
    """The file cannot be routed (not DICOM, a broken or truncated header): error/ with this."""


_PIXEL_DATA = 0x7FE00010


def element_text(ds: Dataset, keyword: str) -> str | None:
    """An element as the text a condition is tested against; None when absent.

    Multi-valued elements are joined with backslashes as on the wire, numbers as
    written (DS/IS keep their original string), person names as ``FAMILY^GIVEN``.
    """
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return _text(value)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("latin-1").rstrip(" \0")
    return "" if v is None else str(v)


def read_header(path: Path | str, keywords: Sequence[str]) -> dict[str, str | None]:
    """The values of ``keywords`` from the header of ``path``; never reads the pixel data.

    Raises UnreadableError for anything that means "this file can never be
    routed" (so the caller moves it to error/ instead of retrying it forever),
    FileNotFoundError when it vanished, and OSError for I/O trouble that may pass.
    """
    try:
        with open(path, "rb") as fp:
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=list(keywords))
            except InvalidDicomError:
                raise UnreadableError("not a DICOM Part-10 file (no 'DICM' prefix after the "
                                      "128-byte preamble)") from None
            except (OSError, MemoryError):
                raise
            except Exception as e:  # pydicom raises many kinds on a broken header
                raise UnreadableError(
                    f"cannot parse the DICOM header: {type(e).__name__}: {e}") from None
            _check_pixel_data_complete(fp, ds)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EISDIR, errno.EACCES, errno.EPERM):
            raise UnreadableError(f"cannot read the file: {e.strerror or e}") from None
        raise
    values: dict[str, str | None] = {}
    for kw in keywords:
        try:
            values[kw] = element_text(ds, kw)
        except Exception as e:
            raise UnreadableError(f"cannot decode {kw}: {type(e).__name__}: {e}") from None
    if not values.get("SOPInstanceUID"):
        meta_uid = ds.file_meta.get("MediaStorageSOPInstanceUID") if ds.file_meta else None
        if not meta_uid:
            raise UnreadableError("no SOP Instance UID in the header")
        values["SOPInstanceUID"] = str(meta_uid)
    return values


def _check_pixel_data_complete(fp: BinaryIO, ds: Dataset) -> None:
    """A file cut inside its pixel data still parses (pydicom stops quietly at EOF).

    dcmread(stop_before_pixels) leaves the file at the Pixel Data element; its
    12-byte header gives the length, which the file size must cover. Encapsulated
    (undefined length) data is not checked: that would mean walking the fragments.
    """
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return
    little = ds.is_little_endian if ds.is_little_endian is not None else True
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if (group << 16 | elem) != _PIXEL_DATA:
        return
    if ds.is_implicit_VR:
        length, header = struct.unpack(e + "L", head[4:8])[0], 8
    elif len(head) == 12:
        length, header = struct.unpack(e + "L", head[8:12])[0], 12
    else:
        raise UnreadableError("truncated: the file ends inside the Pixel Data header")
    if length == 0xFFFFFFFF:
        return
    size = fp.seek(0, 2)
    if size < pos + header + length:
        raise UnreadableError(f"truncated: Pixel Data needs {length} bytes, the file has "
                              f"{max(0, size - pos - header)}")


def header_uids(dcm: Path) -> dict[str, str]:
    """Study/series/SOP UIDs from the file itself, for sidecars written before routing."""
    try:
        ds = pydicom.dcmread(dcm, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                            "SOPInstanceUID"])
    except Exception:
        return {}
    out = {}
    for kw, key in (("StudyInstanceUID", "study_instance_uid"),
                    ("SeriesInstanceUID", "series_instance_uid"),
                    ("SOPInstanceUID", "sop_instance_uid")):
        v = ds.get(kw)
        if v:
            out[key] = str(v)
    return out


def meta_uids(path: Path) -> tuple[str, str, str]:
    """(SOP instance, SOP class, transfer syntax) from a Part-10 file's meta header.

    Raises what pydicom raises on a broken file; an element that is absent is "".
    """
    meta = read_file_meta_info(path)
    return (str(meta.get("MediaStorageSOPInstanceUID", "")),
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")))
