"""What pynetdicom encodes per C-STORE, written straight to bytes, not by pydicom's writer.

pynetdicom encodes every command set (group 0000, always Implicit VR Little Endian)
with pydicom's ``write_dataset``, twice per message: once to measure the Command
Group Length and once to send (``dimse_messages.py:550,811``). Under the GIL profile
of a relay those two calls were a fifth of the receiver's and of the dispatcher's
Python time, for a handful of integers and UIDs per C-STORE.

:func:`encode` writes the element kinds command sets are made of (UL, US, UI and
short strings) itself and gives anything else (another VR such as AT, a value of an
unexpected type, another encoding) to pynetdicom's own ``encode``, so its output is
pydicom's, byte for byte (tests compare the two). The same goes for the File Meta
Information chunked receive puts in front of every received data set
(:func:`write_file_meta_info`, ``dimse_messages.py:474-483``): a few UIDs, written by
pydicom's ``write_file_meta_info`` after a validation pass, about 0.2 ms per instance.
:func:`install` points ``pynetdicom.dimse_messages`` at both.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pydicom import filewriter
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dsutils

_original: Callable[..., bytes | None] = dsutils.encode
_original_meta: Callable[..., None] = filewriter.write_file_meta_info
_HEADER = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")   # tag, VR, 2-byte length
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")  # tag, VR, reserved, 4-byte length (OB)
# The elements create_file_meta makes, and their VRs: anything else goes to pydicom.
_META_VRS = {0x0000: "UL", 0x0001: "OB", 0x0002: "UI", 0x0003: "UI", 0x0010: "UI",
             0x0012: "UI", 0x0013: "SH", 0x0016: "AE"}
_META_REQUIRED = frozenset({0x0001, 0x0002, 0x0003, 0x0010, 0x0012})
_PADDED_WITH_SPACE = frozenset({"AE", "SH", "LO", "CS", "ST", "LT"})


class _Unusual(Exception):
    """An element this encoder leaves to pydicom."""


def _value_bytes(vr: str, value: Any) -> bytes:
    if vr in ("US", "UL"):
        fmt = "<H" if vr == "US" else "<I"
        if isinstance(value, int) and not isinstance(value, bool):
            return struct.pack(fmt, value)
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return b"".join(struct.pack(fmt, v) for v in value)
        raise _Unusual
    if vr == "UI":
        if not isinstance(value, str):
            raise _Unusual
        raw = value.encode("ascii")
        return raw + b"\0" if len(raw) % 2 else raw
    if vr in _PADDED_WITH_SPACE:
        if not isinstance(value, str) or "\\" in value:
            raise _Unusual
        raw = value.encode("ascii")
        return raw + b" " if len(raw) % 2 else raw
    raise _Unusual


def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
           deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode``, without pydicom for a plain command set."""
    if not (is_implicit_vr and is_little_endian) or deflated:
        return _original(ds, is_implicit_vr, is_little_endian, deflated)
    out = bytearray()
    try:
        for tag in sorted(ds.keys()):
            if tag >> 16:
                raise _Unusual   # not group 0000: a data set, not a command set
            elem = ds[tag]
            value = elem.value
            if value is None or value == "":
                body = b""
            else:
                body = _value_bytes(elem.VR, value)
            out += _HEADER.pack(0, tag & 0xFFFF, len(body))
            out += body
    except (_Unusual, UnicodeEncodeError, struct.error, AttributeError, TypeError):
        return _original(ds, is_implicit_vr, is_little_endian, deflated)
    return bytes(out)


def _meta_bytes(file_meta: Dataset) -> bytes:
    elements = {}
    for elem in file_meta:
        tag = int(elem.tag)
        if tag >> 16 != 2 or (tag & 0xFFFF) not in _META_VRS:
            raise _Unusual
        elements[tag & 0xFFFF] = elem
    if not elements.keys() >= _META_REQUIRED:
        raise _Unusual
    body = bytearray()
    for element in sorted(elements):
        if element == 0x0000:
            continue   # the group length: computed below
        vr, value = _META_VRS[element], elements[element].value
        if vr != elements[element].VR:
            raise _Unusual
        if vr == "OB":
            if not isinstance(value, bytes):
                raise _Unusual
            raw = value + b"\0" if len(value) % 2 else value
            body += _EXPLICIT_LONG.pack(2, element, b"OB", len(raw)) + raw
            continue
        raw = _value_bytes(vr, value) if value not in (None, "") else b""
        if len(raw) > 0xFFFF:
            raise _Unusual
        body += _EXPLICIT_SHORT.pack(2, element, vr.encode(), len(raw)) + raw
    return _EXPLICIT_SHORT.pack(2, 0x0000, b"UL", 4) + struct.pack("<I", len(body)) + body


def write_file_meta_info(fp: Any, file_meta: Dataset, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info`` for the File Meta pynetdicom builds (the same bytes)."""
    if enforce_standard:
        try:
            data = _meta_bytes(file_meta)
        except (_Unusual, UnicodeEncodeError, struct.error, AttributeError, TypeError):
            pass
        else:
            fp.write(data)
            return
    _original_meta(fp, file_meta, enforce_standard)


def install() -> None:
    """Have pynetdicom's DIMSE messages and chunked receive use this module's writers
    (process-wide, idempotent)."""
    dimse_messages.encode = encode
    dimse_messages.write_file_meta_info = write_file_meta_info
