"""DIMSE command sets encoded straight to bytes, not through pydicom's general writer.

pynetdicom encodes every command set (group 0000, always Implicit VR Little Endian)
with pydicom's ``write_dataset``, twice per message: once to measure the Command
Group Length and once to send (``dimse_messages.py:550,811``). Under the GIL profile
of a relay those two calls were a fifth of the receiver's and of the dispatcher's
Python time, for a handful of integers and UIDs per C-STORE.

:func:`encode` writes the element kinds command sets are made of (UL, US, UI and
short strings, AT) itself and gives anything else (another VR, a value of an
unexpected type, another encoding) to pynetdicom's own ``encode``, so its output is
pydicom's, byte for byte (tests compare the two on every message we send and
receive). :func:`install` points ``pynetdicom.dimse_messages`` at it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dsutils

_original: Callable[..., bytes | None] = dsutils.encode
_HEADER = struct.Struct("<HHI")
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


def install() -> None:
    """Have pynetdicom's DIMSE messages use :func:`encode` (process-wide, idempotent)."""
    dimse_messages.encode = encode
