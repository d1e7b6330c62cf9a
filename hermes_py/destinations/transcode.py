"""Converting an instance file for a destination, file to file, in bounded memory.

Why this module exists: the dispatcher streams instances from disk
(``send_c_store(path)`` with pynetdicom's chunked send), but any conversion
used to go through ``dcmread`` of the whole file and pynetdicom's ``encode()``,
which holds the data set three times over (the read values, pydicom's write
buffer, and its ``getvalue()`` copy): a 1 GiB instance re-encoded to Implicit VR
took 3.1 GB, and a 1 MB deflate bomb took 4.1 GB, because pydicom inflates a
deflated file with one ``zlib.decompress`` of everything
(``pydicom/filereader.py:897-903``). Here every conversion writes a Part-10
temp file that pynetdicom then streams like any stored file:

- :func:`inflate_to_file`: Deflated Explicit VR LE -> Explicit VR LE, with
  ``zlib.decompressobj`` and a bounded output per call, so a bomb costs at
  most ``READ_CHUNK + OUT_CHUNK`` of memory and at most ``max_inflated`` of disk,
  and is refused past that with a reason a person can act on.
- :func:`pad_to_even`: a deflated file whose deflate stream has odd length
  (PS3.5 A.5 requires one trailing NUL byte then; pydicom's own writer pads,
  ``pydicom/filewriter.py:1451``, but older writers did not, e.g. pydicom's test
  file ``image_dfl.dcm``) cannot be streamed as is: chunked send copies the
  bytes verbatim (``pynetdicom/dimse_messages.py:607-634``), its last PDV is
  odd, and PS3.8 Annex E wants even PDV fragments: DCMTK aborts with
  "DIMSE: Odd Fragment Length". A padded copy is sent as stored instead.
- :func:`reencode_to_file`: Explicit VR LE <-> Implicit VR LE with pydicom for
  the small elements and a raw byte copy for every value over ``DEFER_SIZE``
  (``dcmread(defer_size=...)`` leaves them on disk): a little-endian value's
  bytes are the same in both encodings, only the element header differs.

Every output has a fresh file meta (transfer syntax of the output, the same
SOP Class / SOP Instance UID, our implementation UID), so pynetdicom picks the
context by the meta's transfer syntax and sends it as is. The caller owns the
output path and deletes it after the send (``spool.tempfiles.scratch_file``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import (
    correct_ambiguous_vr_element,
    write_data_element,
    write_file_meta_info,
)
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

READ_CHUNK = 1 << 20        # compressed bytes read per step
OUT_CHUNK = 4 << 20         # most inflated bytes produced per zlib call (the bomb guard)
COPY_CHUNK = 1 << 20
# Values larger than this stay on disk while re-encoding and are byte-copied.
DEFER_SIZE = 256 * 1024
IMPLEMENTATION_VERSION = "HERMES_PY"


class ConversionRefused(Exception):
    """The file cannot be converted (malformed, or over a limit); permanent for this file."""


class TempSpaceError(OSError):
    """Writing the converted copy failed for lack of space: transient, not the file's fault."""


# ---------------------------------------------------------------- shared pieces


def read_meta(path: Path) -> tuple[Dataset, int]:
    """The file meta group and the offset of the data set (like pynetdicom's split_dataset).

    ``defer_size`` keeps a hostile oversized meta element out of memory; only the
    short UIDs are read.
    """
    with open(path, "rb") as fp:
        read_preamble(fp, False)   # InvalidDicomError: no preamble/"DICM"
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag.group != 2,
                            defer_size=64 * 1024)
        return meta, fp.tell()


def fresh_meta(sop_class: str, sop_instance: str, transfer_syntax: str,
               source_ae: str | None = None) -> FileMetaDataset:
    """A standard file meta for a converted copy: same SOP instance, the new syntax."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    return meta


def _encoded_header(meta: FileMetaDataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


def _uids(meta: Dataset, path: Path) -> tuple[str, str, str | None]:
    cls = str(meta.get("MediaStorageSOPClassUID", "") or "")
    inst = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    if not cls or not inst:
        raise ConversionRefused(f"{path.name}: the file meta has no Media Storage SOP "
                                "Class/Instance UID")
    ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None
    return cls, inst, ae


@contextlib.contextmanager
def _no_space_is_transient() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, TempSpaceError):
            raise TempSpaceError(e.errno, f"no room for the converted copy: {e}") from e
        raise


# ---------------------------------------------------------------- deflate


def dataset_length(path: Path) -> tuple[Dataset, int]:
    """(file meta, length in bytes of what chunked send puts on the wire after the meta)."""
    meta, offset = read_meta(path)
    return meta, os.path.getsize(path) - offset


def pad_to_even(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` plus one NUL byte: PS3.5 A.5's pad for an odd deflate stream.

    Streaming copy (the file is the compressed one, so usually small, but no
    size is assumed). Inflaters stop at the end of the deflate stream, so the
    pad is ignored by every reader, as in files pydicom and DCMTK write.
    """
    with _no_space_is_transient(), open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, COPY_CHUNK)
        fout.write(b"\x00")


def inflate_to_file(src: Path, dst: Path, max_inflated: int) -> int:
    """Write ``src`` (Deflated Explicit VR LE) to ``dst`` as Explicit VR LE; return its size.

    Memory stays at about ``READ_CHUNK + OUT_CHUNK`` whatever the ratio:
    ``decompress(data, max_length)`` never yields more than ``OUT_CHUNK`` per
    call and keeps the rest of the input in ``unconsumed_tail``. Past
    ``max_inflated`` inflated bytes it stops and raises ConversionRefused, so a
    deflate bomb costs at most that much temp disk and a few seconds of CPU.
    Also refused: a truncated or corrupt stream, an odd inflated length, and
    output that does not start like an Explicit VR LE data set.
    """
    meta, offset = read_meta(src)
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if ts != DeflatedExplicitVRLittleEndian:
        raise ConversionRefused(f"{src.name}: not deflated (transfer syntax {ts or 'none'})")
    cls, inst, ae = _uids(meta, src)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    head = b""
    with _no_space_is_transient(), open(src, "rb") as fin, open(dst, "wb") as fout:
        fin.seek(offset)
        fout.write(_encoded_header(fresh_meta(cls, inst, ExplicitVRLittleEndian, ae)))
        while not inflater.eof:
            # b"" at the end of the file still lets zlib hand out output it holds back
            data = inflater.unconsumed_tail or fin.read(READ_CHUNK)
            try:
                out = inflater.decompress(data, OUT_CHUNK)
            except zlib.error as e:
                raise ConversionRefused(f"{src.name}: corrupt deflate stream after "
                                        f"{total} inflated bytes: {e}") from e
            if not data and not out and not inflater.eof:
                raise ConversionRefused(f"{src.name}: the deflated data set is truncated "
                                        f"(stream ends after {total} inflated bytes)")
            total += len(out)
            if total > max_inflated:
                raise ConversionRefused(
                    f"{src.name}: inflates to more than {max_inflated // (1024 * 1024)} MB "
                    f"([limits] max_inflated_mb) from {os.path.getsize(src)} bytes; "
                    "refused as a possible deflate bomb")
            if len(head) < 6:
                head += out[:6 - len(head)]
                if len(head) == 6:
                    _check_explicit_start(head, src)
            fout.write(out)
    if total % 2:
        raise ConversionRefused(f"{src.name}: the inflated data set has odd length {total}")
    if total and len(head) < 6:
        _check_explicit_start(head, src)
    return total


def _check_explicit_start(head: bytes, src: Path) -> None:
    """A cheap sanity check that inflating produced a data set, not noise."""
    if len(head) < 6:
        raise ConversionRefused(f"{src.name}: the inflated data set is too short")
    group = struct.unpack("<H", head[:2])[0]
    vr = head[4:6]
    if group < 0x0008 or group == 0xFFFE or not (vr.isalpha() and vr.isupper()):
        raise ConversionRefused(f"{src.name}: the inflated data does not start with an "
                                "Explicit VR Little Endian data element")


# ---------------------------------------------------------------- Explicit <-> Implicit


def reencode_to_file(src: Path, dst: Path, target: str) -> None:
    """Write ``src`` (Explicit or Implicit VR LE, Part-10 or bare) to ``dst`` in ``target``.

    ``target`` is Explicit or Implicit VR LE. pydicom encodes the small elements
    (VR lookup and ambiguous-VR correction are its); every top-level non-sequence
    value over ``DEFER_SIZE`` is left on disk by ``dcmread(defer_size=...)`` and
    copied byte for byte after a header we write, so memory is the small elements,
    the largest sequence, and one copy buffer. (A sequence is re-encoded by
    pydicom: its items are in the data set's encoding, so copying one would mix
    encodings, which pydicom's reader silently tolerates and others do not.)
    Group lengths (retired in data sets) are dropped, as pydicom's own
    ``write_dataset`` does; the output is byte-identical to what pydicom writes
    from the fully read data set. A deflated source must be inflated first
    (:func:`inflate_to_file`): pydicom would inflate it whole in memory.
    """
    target_uid = UID(target)
    if target_uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ConversionRefused(f"cannot re-encode to {target}")
    try:
        ds = dcmread(src, force=True, defer_size=DEFER_SIZE)
    except (InvalidDicomError, ValueError, EOFError, AttributeError) as e:
        raise ConversionRefused(f"{src.name}: cannot read it: {type(e).__name__}: {e}") from e
    meta = getattr(ds, "file_meta", None) or Dataset()
    stored = str(meta.get("TransferSyntaxUID", "") or "")
    implicit_src, little_src = ds.original_encoding
    if stored == DeflatedExplicitVRLittleEndian:
        raise ConversionRefused(f"{src.name}: deflated; inflate it first")
    if little_src is False:
        raise ConversionRefused(f"{src.name}: big endian cannot be re-encoded here")
    cls = str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    inst = str(meta.get("MediaStorageSOPInstanceUID", "") or ds.get("SOPInstanceUID", "") or "")
    if not cls or not inst:
        raise ConversionRefused(f"{src.name}: no SOP Class/Instance UID")
    ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None
    implicit = target_uid == ImplicitVRLittleEndian
    charset = ds.get("SpecificCharacterSet", "iso8859")
    with _no_space_is_transient(), open(src, "rb") as fin, open(dst, "wb") as raw:
        raw.write(_encoded_header(fresh_meta(cls, inst, target_uid, ae)))
        out = DicomFileLike(raw)
        out.is_little_endian, out.is_implicit_VR = True, implicit
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:
                continue
            elem = ds.get_item(tag, keep_deferred=True)
            vr = (elem.VR or _vr_for(tag, ds)) if isinstance(elem, RawDataElement) else ""
            # A sequence's items are encoded like the data set: never byte-copied.
            if isinstance(elem, RawDataElement) and elem.value is None and elem.length \
                    and vr != "SQ":
                _write_header(raw, tag, vr, elem.length, implicit)
                _copy_range(fin, raw, elem.value_tell, elem.length)
                continue
            full: DataElement | RawDataElement = ds[tag]
            if not implicit:
                full = correct_ambiguous_vr_element(full, ds, True)
            write_data_element(out, full, charset)


def _vr_for(tag: BaseTag, ds: Dataset) -> str:
    """The VR of a deferred value read from an Implicit VR file (explicit target only)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " or " not in vr:
        return vr
    if tag == 0x7FE00010:   # Pixel Data: OW unless 8-bit (PS3.5 A.2)
        return "OB" if int(ds.get("BitsAllocated", 16) or 16) <= 8 else "OW"
    return "OW" if "OW" in vr else vr.split(" or ")[0]


def _write_header(fp: BinaryIO, tag: BaseTag, vr: str, length: int, implicit: bool) -> None:
    head = struct.pack("<HH", tag.group, tag.element)
    if implicit:
        fp.write(head + struct.pack("<I", length))
        return
    if vr not in EXPLICIT_VR_LENGTH_32 and length > 0xFFFF:
        vr = "UN"   # PS3.5 6.2.2, as pydicom does
    if vr in EXPLICIT_VR_LENGTH_32:
        fp.write(head + vr.encode("ascii") + b"\x00\x00" + struct.pack("<I", length))
    else:
        fp.write(head + vr.encode("ascii") + struct.pack("<H", length))


def _copy_range(fin: BinaryIO, fout: BinaryIO, offset: int, length: int) -> None:
    fin.seek(offset)
    left = length
    while left:
        chunk = fin.read(min(left, COPY_CHUNK))
        if not chunk:
            raise ConversionRefused(f"the file ends {left} bytes into a {length}-byte value")
        fout.write(chunk)
        left -= len(chunk)
