"""Tag coercion per destination: ``[destinations.NAME.coerce]`` set and remove header values
in the copy that destination receives, and only there.

Where: at send time, into a temp copy in the dispatcher's scratch folder
(``destinations/coerced.py`` wraps the destination's sender). The spool keeps the
instance as received: fan-out shares one file by hard link between destinations,
so an edit in place would reach every destination, and a copy made at routing
time would need the fan-out and the series/study batches to learn a second way of
queueing. A retry coerces again, the same way (the edit is a pure function of the
file and the receive facts).

How: the header is read up to Pixel Data (pydicom stops with the file positioned
at that element), edited, written again in the file's own transfer syntax, and
everything from Pixel Data on is copied as bytes: memory stays that of the header
whatever the pixels weigh, and compressed frames are never decoded. A deflated
instance is inflated first (bounded, ``transcode.inflate_to_file``) and sent as
Explicit VR Little Endian.

What: SOP, study and series UIDs, the file meta group and Pixel Data are never
touched (``uids = "remap"`` may come later). Values are literals or templates of
DICOM keywords and receive facts, ``"${CallingAE}-${PatientID}"``; a literal is
checked at ``rules check`` against its keyword's VR, a template's result when it is
applied (a value the VR cannot hold fails that instance permanently, with the
reason). The sidecar of the delivered copy names the keywords set and removed,
never their values.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_py.config_reader import Reader

# Receive facts a template may use, and the sidecar keys they come from.
FACTS = {"CallingAE": "calling_ae", "CalledAE": "called_ae", "PeerAddress": "peer_address"}
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9]+)\}")
NEVER = frozenset({"SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
                   "PixelData", "FloatPixelData", "DoubleFloatPixelData",
                   "SpecificCharacterSet"})


class CoercionFailed(Exception):
    """This instance cannot be coerced as configured (permanent for this file)."""


@dataclass(frozen=True)
class Coercion:
    set: Mapping[str, str]
    remove: tuple[str, ...] = ()

    @property
    def keywords(self) -> tuple[str, ...]:
        """Header values the templates read."""
        return tuple(dict.fromkeys(kw for v in self.set.values()
                                   for kw in _PLACEHOLDER.findall(v) if kw not in FACTS))


def parse(p: Reader, table: tuple[str | int, ...], data: Any) -> Coercion:
    from pydicom.datadict import dictionary_VR, keyword_dict

    ct = (*table, "coerce")
    if not isinstance(data, dict):
        raise p.err(table, "coerce", "expected a table [destinations.NAME.coerce]")
    p.check_keys(ct, data, {"set", "remove"})
    raw_set = p.get(ct, data, "set", dict, {})
    raw_remove = p.get(ct, data, "remove", list, [])
    if not raw_set and not raw_remove:
        raise p.err(ct, "set", "coerce needs set = { Keyword = \"value\" } or remove = [...]")

    def keyword(key: str, kw: object) -> str:
        if not isinstance(kw, str) or kw not in keyword_dict:
            raise p.err(ct, key, f"unknown DICOM keyword {kw!r}")
        if kw in NEVER or keyword_dict[kw] >> 16 == 0x0002:
            raise p.err(ct, key, f"{kw} is never coerced (UIDs, the meta group and pixel "
                                 "data stay as received)")
        return kw

    out: dict[str, str] = {}
    for kw, value in raw_set.items():
        keyword("set", kw)
        vr = dictionary_VR(keyword_dict[kw])
        if vr == "SQ" or not isinstance(value, str):
            raise p.err(ct, "set", f"{kw}: a text value is expected (sequences cannot be set)")
        for ph in _PLACEHOLDER.findall(value):
            if ph not in FACTS and ph not in keyword_dict:
                raise p.err(ct, "set", f"{kw}: unknown placeholder ${{{ph}}} (a DICOM keyword "
                                       f"or one of {', '.join(FACTS)})")
        if not value.isascii():
            raise p.err(ct, "set", f"{kw}: only ASCII values can be set (the instance's "
                                   "character set is kept)")
        if not _PLACEHOLDER.search(value):
            problem = check_value(vr, value)
            if problem:
                raise p.err(ct, "set", f"{kw}: {problem}")
        out[kw] = value
    removed = tuple(keyword("remove", kw) for kw in raw_remove)
    both = set(out) & set(removed)
    if both:
        raise p.err(ct, "remove", f"{', '.join(sorted(both))} both set and removed")
    return Coercion(out, removed)


def check_value(vr: str, value: str) -> str | None:
    """What is wrong with ``value`` for ``vr`` (pydicom's rules), or None."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def render(template: str, header: Mapping[str, str | None], facts: Mapping[str, str]) -> str:
    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in FACTS:
            return facts.get(FACTS[name], "") or ""
        return header.get(name) or ""
    return _PLACEHOLDER.sub(fill, template)


def apply(src: Path, dst: Path, c: Coercion, facts: Mapping[str, str]) -> dict[str, list[str]]:
    """Write ``src`` coerced to ``dst``; returns the keywords set and removed."""
    from pydicom import dcmread, dcmwrite
    from pydicom.datadict import dictionary_VR, keyword_dict

    from hermes_py.dicomfile import element_text

    with open(src, "rb") as fin:
        ds = dcmread(fin, stop_before_pixels=True)
        offset = fin.tell()
        header = {kw: element_text(ds, kw) for kw in c.keywords}
        changed: list[str] = []
        for kw, template in c.set.items():
            value = render(template, header, facts)
            problem = check_value(dictionary_VR(keyword_dict[kw]), value)
            if problem:
                raise CoercionFailed(f"coerce: {kw} = {template!r} gives a value its VR cannot "
                                     f"hold: {problem}")
            setattr(ds, kw, value)
            changed.append(kw)
        removed = [kw for kw in c.remove if kw in ds]
        for kw in removed:
            delattr(ds, kw)
        with open(dst, "wb") as fout:
            dcmwrite(fout, ds, enforce_file_format=True)
            fin.seek(offset)
            shutil.copyfileobj(fin, fout, 1 << 20)
    return {"set": changed, "removed": removed}
