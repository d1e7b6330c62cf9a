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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any, BinaryIO

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import create_file_meta

from hermes_py.dicomwalk import (
    COPY_CHUNK,
    DEFLATED,
    DICOMDIR_CLASS,
    LONG_VRS,
    PIXEL_DATA,
    PIXELS,
    ROWS_COLUMNS,
    SHORT_VRS,
    CapturingInflate,
    Corrupt,
    EndOfData,
    FileSource,
    Incomplete,
    InflateSource,
    NotDicom,
    TooLarge,
    Truncated,
    Unacceptable,
    Walker,
)

# Deflated Explicit VR Little Endian, and JPIP Referenced Deflate (its data set is deflated too).
# ---------------------------------------------------------------- inspection


@dataclass(frozen=True)
class Inspection:
    """What a dropped file is, from one streaming pass over it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dataset_offset: int  # where the data set bytes start (kept unchanged)
    size: int
    # Why the published copy gets a new preamble and meta ("" = a Part-10 file whose
    # meta is true to its data set: published byte for byte).
    new_meta: str = ""

    @property
    def part10(self) -> bool:
        return not self.new_meta


def _guess_encoding(head: bytes) -> tuple[bool, bool]:
    """(explicit, little) for a data set with no file meta, from its first element."""
    if len(head) < 8:
        raise Incomplete("too short to hold a DICOM data set (nothing more was written)")
    explicit = head[4:6] in LONG_VRS or head[4:6] in SHORT_VRS
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


def inspect(path: Path | str, max_inflated: int | None = None) -> Inspection:
    """Check a file is one whole DICOM instance; raise :class:`Unacceptable` with the reason.

    :class:`Incomplete` (and :class:`Truncated`) may mean a writer is still at work.
    """
    with open(path, "rb", buffering=65536) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise Incomplete("empty file (0 bytes)")
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
        src = FileSource(f, size)
        w = Walker(src)
        meta: dict[str, str] = {}
        try:
            meta = w.meta()
        except EndOfData:
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
        body: FileSource | InflateSource = InflateSource(src, max_inflated) \
            if deflated else src
        w.src = body
        try:
            w.dataset(explicit, little)
            if isinstance(body, InflateSource) and not body.complete:
                raise Truncated("truncated: the deflated data set ends before the end of its "
                                "compressed stream; the copy was probably interrupted")
        except EndOfData:
            reason = w.eof_reason(body.pos)
            if guessed and not w.elements:
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
    if is_image(sop_class, w.seen) and not w.seen & PIXELS:
        raise Truncated("truncated: an image whose data set ends before its Pixel Data "
                        "(7FE0,0010); the copy was probably interrupted")
    # A meta that names another instance than its data set (pydicom's rtdose.dcm) would
    # make every C-STORE of it inconsistent: pynetdicom takes the Affected SOP UIDs from
    # the meta, and the peer answers 0xA900. The data set is the instance: the meta is
    # rewritten from it, like a missing one.
    new_meta = ""
    if not (preamble and meta):
        new_meta = "no preamble/file meta: added"
    elif meta.get("media_instance") != sop or meta.get("media_class") != sop_class:
        new_meta = "its file meta named another SOP instance or class: rewritten"
    return Inspection(sop_instance_uid=sop, sop_class_uid=sop_class, transfer_syntax=ts,
                      dataset_offset=offset, size=size, new_meta=new_meta)


def is_image(sop_class: str, seen: set[int]) -> bool:
    """An image SOP class (its standard name says so), or any object with Rows and Columns."""
    return "Image Storage" in UID(sop_class).name or seen >= ROWS_COLUMNS


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

# The header of a deflated instance (everything before its Pixel Data) is read into
# memory to be parsed; no real header comes near this.
HEADER_LIMIT = 64 * 1024 * 1024


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
            if _meta_transfer_syntax(fp) in DEFLATED:
                # pydicom inflates a deflated data set whole before reading one element,
                # stop_before_pixels or not: 4 MB on the wire can be 8 GB inflated.
                ds = _deflated_header(fp, path)
            else:
                ds = _dcmread_header(fp, keywords)
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


def _meta_transfer_syntax(fp: BinaryIO) -> str | None:
    """The transfer syntax in a Part-10 file's meta (None without one), read by our walker."""
    size = os.fstat(fp.fileno()).st_size
    head = fp.read(132)
    fp.seek(0)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    fp.seek(132)
    try:
        meta = Walker(FileSource(fp, size)).meta()
    except (EndOfData, Unacceptable):
        return None
    finally:
        fp.seek(0)
    return meta.get("transfer_syntax")


def _deflated_header(fp: BinaryIO, path: Path | str) -> Dataset:
    """The elements before the Pixel Data of a deflated instance, inflated only that far."""
    size = os.fstat(fp.fileno()).st_size
    meta = read_file_meta_info(path)
    fp.seek(132)
    src = FileSource(fp, size)
    w = Walker(src)
    w.meta()
    body = CapturingInflate(src, HEADER_LIMIT)
    w.src = body
    w.stop_at = PIXELS
    try:
        w.dataset(True, True)
    except EndOfData:
        raise UnreadableError(f"cannot parse the DICOM header: {w.eof_reason(body.pos)}") from None
    except TooLarge:
        raise UnreadableError(f"the header (everything before the Pixel Data) inflates to "
                              f"more than {HEADER_LIMIT // (1024 * 1024)} MB") from None
    except Unacceptable as e:
        raise UnreadableError(f"cannot parse the DICOM header: {e.reason}") from None
    end = w.stopped_at if w.stopped_at is not None else len(body.captured)
    try:
        ds = read_dataset(BytesIO(bytes(body.captured[:end])), is_implicit_VR=False,
                          is_little_endian=True)
    except Exception as e:  # pydicom raises many kinds on a broken header
        raise UnreadableError(f"cannot parse the DICOM header: {type(e).__name__}: {e}") from None
    ds.file_meta = meta
    return ds


def _dcmread_header(fp: BinaryIO, keywords: Sequence[str]) -> Dataset:
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=list(keywords))
    except InvalidDicomError:
        raise UnreadableError("not a DICOM Part-10 file (no 'DICM' prefix after the "
                              "128-byte preamble)") from None
    except (OSError, MemoryError):
        raise
    except Exception as e:  # pydicom raises many kinds on a broken header
        raise UnreadableError(f"cannot parse the DICOM header: {type(e).__name__}: {e}") from None
    _check_pixel_data_complete(fp, ds)
    return ds


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
    if (group << 16 | elem) != PIXEL_DATA:
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
