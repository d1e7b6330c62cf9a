"""Walking a DICOM data set's bytes without decoding it: element by element, seeking over values.

The structure walk behind ``dicomfile.inspect`` (is this file whole?) and the
bounded read of a deflated header: a data set is read as a stream of element
headers; values are skipped (a seek on a file, bounded inflation of a deflated
stream), so memory is constant whatever the file size, and a deflate bomb is
refused at a limit instead of being inflated.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import keyword_for_tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

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


class Incomplete(Unacceptable):
    """The file may still be growing: a writer that paused is not a writer that finished.

    Cut short inside an element, empty, too short to read, or an image whose data
    set ends before its Pixel Data: the intake waits for more (``incomplete_after``)
    before it calls such a file truncated.
    """


class Truncated(Incomplete):
    pass


class Corrupt(Unacceptable):
    pass


class EndOfData(Exception):
    """The data ended before a read or skip could be satisfied."""


def tag_text(tag: int) -> str:
    kw = keyword_for_tag(tag) if tag >> 16 not in (0xFFFE,) else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + kw if kw else ''}"


# ---------------------------------------------------------------- byte sources


class FileSource:
    """Sequential reads and seeks over an open file, with its size known."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size: int = size
        self.pos: int = f.tell()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        if len(data) < n:
            raise EndOfData
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
            raise EndOfData
        self.pos += n
        self.f.seek(self.pos)

    def remaining(self) -> int | None:
        return self.size - self.pos

    def at_end(self) -> bool:
        return self.pos >= self.size


class TooLarge(Unacceptable):
    """Inflates past the configured limit (``[limits] max_inflated_mb``)."""



class InflateSource:
    """A deflated data set (raw deflate after the file meta), inflated as it is walked,
    never more than ``limit`` bytes of it (a deflate bomb is refused, not inflated)."""

    def __init__(self, raw: FileSource, limit: int | None = None):
        self.raw = raw
        self.limit = limit
        self.d = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buf = bytearray()
        self.pos = 0  # offset in the inflated data
        self.inflated = 0

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.d.eof:
            data = self.d.unconsumed_tail or self.raw.read_some(65536)
            if not data:
                return
            try:
                out = self.d.decompress(data, COPY_CHUNK)
            except zlib.error as e:
                raise Corrupt(f"deflated data set cannot be inflated: {e}") from None
            self.inflated += len(out)
            if self.limit is not None and self.inflated > self.limit:
                raise TooLarge(f"the deflated data set inflates to more than "
                               f"{self.limit // (1024 * 1024)} MB ([limits] max_inflated_mb): "
                               "refused (a deflate bomb?)")
            self.buf += out

    def read(self, n: int) -> bytes:
        self._fill(n)
        if len(self.buf) < n:
            raise EndOfData
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            self._fill(min(n, COPY_CHUNK))
            take = min(n, len(self.buf))
            if take == 0:
                raise EndOfData
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


class CapturingInflate(InflateSource):
    """An inflated data set read as it is walked, every byte kept (a header, bounded)."""

    def __init__(self, raw: FileSource, limit: int):
        super().__init__(raw, limit)
        self.captured = bytearray()

    def read(self, n: int) -> bytes:
        out = super().read(n)
        self.captured += out
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            take = self.read(min(n, COPY_CHUNK))
            n -= len(take)


# ---------------------------------------------------------------- the structure walk

LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_NESTING = 32
_WANTED = {0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid"}
# Top-level elements whose presence tells an image from other objects, and its pixels.
ROWS_COLUMNS = frozenset({0x00280010, 0x00280011})
PIXELS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009, 0x56000020})  # + float, double, MRS
_META_WANTED = {0x00020002: "media_class", 0x00020003: "media_instance",
                0x00020010: "transfer_syntax"}


class Walker:
    """Walks a data set's elements from start to end, reading only the UIDs we need."""

    def __init__(self, src: FileSource | InflateSource):
        self.src = src
        self.values: dict[str, str] = {}
        self.elements = 0
        self.encapsulated = False
        self.seen: set[int] = set()  # of the ROWS_COLUMNS and PIXELS tags, at top level
        self.open: list[str] = []  # sequences / pixel data not yet closed, for messages
        self.stop_at: frozenset[int] = frozenset()  # top-level tags to stop before
        self.stopped_at: int | None = None           # where the first of them starts

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
        if tag == 0 and vr == b"\0\0":
            return tag, None, 0, pos  # zero padding after the data set (dataset() ends there)
        if vr in LONG_VRS:
            src.read(2)
            return tag, vr, struct.unpack(e + "L", src.read(4))[0], pos
        if vr in SHORT_VRS:
            return tag, vr, struct.unpack(e + "H", src.read(2))[0], pos
        if self.elements == 0 and not vr.isalpha():
            # pydicom guesses its way past this; a receiver would take the data set as the
            # meta says and misread every element, so it is refused, saying why.
            raise Corrupt(f"the data set is encoded Implicit VR but its transfer syntax is an "
                          f"Explicit VR one (element {tag_text(tag)} at byte {pos}): the file "
                          "meta and the data set disagree; re-save the file with a true meta")
        raise Corrupt(f"element {tag_text(tag)} at byte {pos} has an invalid value representation "
                      f"{vr!r}: this is not a well-formed DICOM data set")

    def value(self, tag: int, length: int, pos: int, keep: str | None) -> None:
        remaining = self.src.remaining()
        if remaining is not None and length > remaining:
            raise Truncated(
                f"truncated: element {tag_text(tag)} at byte {pos} declares {length} bytes but the "
                f"file ends after {remaining}; the copy was probably interrupted")
        if keep and length <= 256:
            raw = self.src.read(length)
            self.values[keep] = raw.decode("ascii", "replace").rstrip("\0 ").strip()
        else:
            self.open.append(f"element {tag_text(tag)} (byte {pos}, {length} bytes)")
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
                raise Corrupt(f"unexpected {tag_text(tag)} at byte {pos} outside a sequence")
            if top and tag == 0 and self.elements:
                return  # trailing zero padding after the data set
            if top and tag in self.stop_at:
                self.stopped_at = pos
                return
            self.elements += 1
            if top and (tag in PIXELS or tag in ROWS_COLUMNS):
                self.seen.add(tag)
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
                    raise Corrupt(f"element {tag_text(tag)} at byte {pos} has undefined length but "
                                  f"value representation {vr!r}")
            else:
                self.value(tag, length, pos, _WANTED.get(tag) if top else None)

    def sequence(self, tag: int, pos: int, explicit: bool, little: bool, depth: int) -> None:
        if depth > MAX_NESTING:
            raise Corrupt(f"sequences nested more than {MAX_NESTING} deep at byte {pos}")
        self.open.append(f"sequence {tag_text(tag)} starting at byte {pos}")
        while True:
            itag, _, ilen, ipos = self.header(explicit, little)
            if itag == SEQ_END:
                break
            if itag != ITEM:
                raise Corrupt(f"sequence {tag_text(tag)}: expected an item at byte {ipos}, found "
                              f"{tag_text(itag)}")
            if ilen == UNDEFINED:
                self.dataset(explicit, little, depth, top=False)
            else:
                self.value(itag, ilen, ipos, None)
        self.open.pop()

    def fragments(self, tag: int, pos: int) -> None:
        self.open.append(f"encapsulated pixel data {tag_text(tag)} starting at byte {pos}")
        while True:
            itag, _, ilen, ipos = self.header(True, True)
            if itag == SEQ_END:
                break
            if itag != ITEM or ilen == UNDEFINED:
                raise Corrupt(f"encapsulated pixel data {tag_text(tag)}: expected a fragment at "
                              f"byte {ipos}, found {tag_text(itag)}")
            self.value(itag, ilen, ipos, None)
        self.open.pop()

    def meta(self) -> dict[str, str]:
        """Group 0002 (always explicit VR little endian) up to the first other group."""
        src = self.src
        assert isinstance(src, FileSource)
        found: dict[str, str] = {}
        while True:
            head = src.peek(2)
            if len(head) < 2 or struct.unpack("<H", head)[0] != 0x0002:
                return found
            tag, vr, length, pos = self.header(True, True)
            if length == UNDEFINED:
                raise Corrupt(f"file meta element {tag_text(tag)} at byte {pos} has undefined "
                              "length")
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


