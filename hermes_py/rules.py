"""Matching one instance against rules.toml: the decision the router records and acts on.

Everything here is a pure function of the rules and of a flat ``values`` dict
(DICOM keyword -> text of the element, plus the receive facts CallingAE,
CalledAE, PeerAddress, Source), so the router and ``hermes-py rules test`` give
the same answer for the same file, and the property tests can check the matcher
without a spool. The only I/O is ``read_header``: the header, once, without the
pixel data.

Decision semantics (what a person writing rules.toml can rely on):

- a rule matches when every ``match`` condition holds and no ``exclude`` one does;
  an element that is absent satisfies no condition (so ``"*"`` means "present");
- every matching rule applies and each destination gets the instance once, at the
  highest priority any matching rule gives it;
- a matching ``action = "discard"`` rule overrides routing: it exists to stop
  instances (test patients, scouts) that other rules would send;
- a destination named by an instance-level rule is sent at once; one named only
  by series/study-level rules is held (in the first such rule's batch) until that
  series/study is quiet;
- nothing matched: discard, with the reason kept beside the file.
"""

from __future__ import annotations

import errno
import hashlib
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from hermes_py.config import RECEIVE_KEYS, Condition, Rule, Settings
from hermes_py.spool import JSON, sanitize

# Read for every instance whatever the rules say: the name, the class, and the
# keys of series/study batches (also written to the sidecar for admin and dispatcher).
HEADER_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")

# Sidecar key -> receive-fact key a rule can test.
_FACT_KEYS = {"calling_ae": "CallingAE", "called_ae": "CalledAE", "peer_address": "PeerAddress",
              "source": "Source"}

_LEVEL_UID = {"series": "SeriesInstanceUID", "study": "StudyInstanceUID"}
_PIXEL_DATA = 0x7FE00010

Values = Mapping[str, str | None]


class UnreadableError(Exception):
    """The file cannot be routed (not DICOM, a broken or truncated header): error/ with this."""


# ---------------------------------------------------------------- reading


def keywords_for(rules: Iterable[Rule]) -> tuple[str, ...]:
    """The tags to read: the ones the rules test plus HEADER_KEYWORDS, nothing else."""
    used = {c.key for r in rules for c in (*r.match, *r.exclude) if c.key not in RECEIVE_KEYS}
    return tuple(dict.fromkeys([*HEADER_KEYWORDS, *sorted(used)]))


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


def receive_facts(sidecar: Mapping[str, Any]) -> dict[str, str | None]:
    """CallingAE, CalledAE, PeerAddress, Source from a spool sidecar (None when unknown)."""
    out: dict[str, str | None] = {}
    for skey, fkey in _FACT_KEYS.items():
        v = sidecar.get(skey)
        out[fkey] = None if v is None else str(v)
    return out


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Check:
    """One condition of one rule against the value found."""

    section: str  # "match" or "exclude"
    condition: Condition
    value: str | None
    holds: bool

    @property
    def failed(self) -> bool:
        """A match condition that does not hold, or an exclude condition that does."""
        return self.holds if self.section == "exclude" else not self.holds

    def explain(self) -> str:
        c = self.condition
        if self.value is not None:
            found = f"found {_quote(self.value)}"
        else:
            found = "not known" if c.key in RECEIVE_KEYS else "element absent"
        verb = "holds" if self.holds else "does not hold"
        return f"{self.section}.{c.key} = {c.source} {verb}: {found}"


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    failed: tuple[Check, ...]

    @property
    def matched(self) -> bool:
        return not self.failed

    def why_not(self) -> str:
        return "; ".join(c.explain() for c in self.failed)


@dataclass(frozen=True)
class Hold:
    """Destinations waiting in ``pending/<key>/`` until the series/study is quiet."""

    key: str
    rule: str
    level: str
    uid: str
    quiet_for: float
    destinations: Mapping[str, str]  # destination -> priority

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "rule": self.rule, "level": self.level, "uid": self.uid,
                "quiet_for": self.quiet_for, "destinations": list(self.destinations),
                "priorities": dict(self.destinations)}

    @classmethod
    def from_json(cls, d: Any) -> Hold:
        if not isinstance(d, dict):
            raise ValueError(f"hold is not an object: {d!r}")
        dests = d.get("destinations")
        prios = d.get("priorities") or {}
        if not isinstance(dests, list) or not dests or not isinstance(prios, dict):
            raise ValueError(f"hold without destinations: {d!r}")
        return cls(key=_safe_key(str(d["key"])), rule=str(d.get("rule", "")),
                   level=str(d.get("level", "series")), uid=str(d.get("uid", "")),
                   quiet_for=float(d.get("quiet_for", 60.0)),
                   destinations={str(x): _prio(prios.get(x)) for x in dests})


@dataclass(frozen=True)
class Decision:
    """Where one instance goes; what the router records before it links anything."""

    destinations: Mapping[str, str] = field(default_factory=dict)  # sent at once: dest -> prio
    holds: tuple[Hold, ...] = ()
    rules: tuple[str, ...] = ()  # names of the rules that matched
    discarded_by: str | None = None
    verdicts: tuple[Verdict, ...] = ()  # empty when read back from a sidecar

    @property
    def discard(self) -> bool:
        return not self.destinations and not self.holds

    @property
    def reason(self) -> str:
        """Why it is discarded (only meaningful when ``discard``)."""
        if self.discarded_by is not None:
            return f"discard rule {self.discarded_by!r} matched"
        return "no rule matched"

    @property
    def all_destinations(self) -> list[str]:
        out = list(self.destinations)
        for h in self.holds:
            out.extend(d for d in h.destinations if d not in out)
        return out

    def to_routing(self, at: str) -> dict[str, Any]:
        """The ``routing`` object of the sidecar (docs/internals.md)."""
        prios = dict(self.destinations)
        for h in self.holds:
            prios.update(h.destinations)
        data: dict[str, Any] = {
            "at": at, "rules": list(self.rules), "destinations": self.all_destinations,
            "discarded_by": self.discarded_by, "priorities": prios,
            "held": [h.to_json() for h in self.holds],
        }
        if self.discard:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_routing(cls, data: Any) -> Decision:
        """A decision an earlier run recorded: finished as recorded, whatever the rules now say."""
        if not isinstance(data, dict) or not isinstance(data.get("destinations"), list):
            raise ValueError("no recorded destinations")
        holds = tuple(Hold.from_json(h) for h in data.get("held") or [])
        held = {d for h in holds for d in h.destinations}
        prios = data.get("priorities") or {}
        if not isinstance(prios, dict):
            raise ValueError("priorities is not an object")
        now = {str(d): _prio(prios.get(d)) for d in data["destinations"] if d not in held}
        rules = tuple(str(r) for r in data.get("rules") or [])
        by = data.get("discarded_by")
        return cls(destinations=now, holds=holds, rules=rules,
                   discarded_by=None if by is None else str(by))


def _prio(p: Any) -> str:
    return "urgent" if p == "urgent" else "normal"


def _safe_key(key: str) -> str:
    """A recorded pending key is reused as a folder name: it must stay one path component."""
    return key if key and "/" not in key and "\0" not in key and key not in (".", "..") \
        else sanitize(key)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_rule(rule: Rule, values: Values) -> Verdict:
    """Every condition of one rule (not short-circuited: the explanation lists them all)."""
    failed = []
    for section, conds in (("match", rule.match), ("exclude", rule.exclude)):
        for c in conds:
            v = values.get(c.key)
            chk = Check(section, c, v, c.holds(v))
            if chk.failed:
                failed.append(chk)
    return Verdict(rule, tuple(failed))


def pending_key(rule: Rule | str, level: str, uid: str | None) -> str:
    """``series_<uid>_<rule>-<hash>``: one folder per (rule, series/study), readable by a person.

    The UID is sanitised (wire data never becomes a path unsanitised); the hash
    keeps two rule names that sanitise alike ("a b", "a_b") apart.
    """
    name = rule if isinstance(rule, str) else rule.name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{level}_{sanitize(uid)}_{sanitize(name, 24)}-{digest}"


def evaluate(rules: Sequence[Rule], values: Values) -> Decision:
    """The decision for one instance; ``values`` = header values plus receive facts."""
    verdicts = tuple(check_rule(r, values) for r in rules)
    matched = [v.rule for v in verdicts if v.matched]
    names = tuple(r.name for r in matched)
    discards = [r for r in matched if r.action == "discard"]
    if discards:
        return Decision(rules=names, discarded_by=discards[0].name, verdicts=verdicts)
    prio: dict[str, str] = {}
    for r in matched:
        for d in r.to:
            if r.priority == "urgent" or d not in prio:
                prio[d] = r.priority
    now = {d: prio[d] for r in matched if r.level == "instance" for d in r.to}
    taken = set(now)
    holds: list[Hold] = []
    for r in matched:
        if r.level == "instance":
            continue
        dests = {d: prio[d] for d in r.to if d not in taken}
        if not dests:
            continue
        taken.update(dests)
        uid = values.get(_LEVEL_UID[r.level]) or ""
        holds.append(Hold(key=pending_key(r, r.level, uid), rule=r.name, level=r.level,
                          uid=uid, quiet_for=r.quiet_for, destinations=dests))
    return Decision(destinations=now, holds=tuple(holds), rules=names, verdicts=verdicts)


# ---------------------------------------------------------------- the two CLI verbs


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def describe_rule(rule: Rule) -> str:
    parts = []
    for section, conds in (("match", rule.match), ("exclude", rule.exclude)):
        if conds:
            parts.append(f"{section} " + ", ".join(f"{c.key} = {c.source}" for c in conds))
    cond = "; ".join(parts) or "every instance"
    if rule.action == "discard":
        where = "discard"
    else:
        where = ", ".join(rule.to)
        if rule.level != "instance":
            where += f" (whole {rule.level}, after {_duration(rule.quiet_for)} quiet)"
        if rule.priority == "urgent":
            where += " [urgent]"
    return f"{cond} -> {where}"


def check(cfg: Settings) -> int:
    """``hermes-py rules check``: the file validated (cli.main loaded it); say what it does."""
    out = sys.stdout
    r = cfg.receiver
    print(f"{cfg.path}: OK", file=out)
    print(f"receiver: {r.ae_title} on {r.bind}:{r.port}", file=out)
    print(f"spool: {cfg.spool.path}", file=out)
    print(f"destinations ({len(cfg.destinations)}):", file=out)
    width = max((len(n) for n in cfg.destinations), default=0)
    for name, d in cfg.destinations.items():
        print(f"  {name:<{width}}  {d.ae_title}@{d.host}:{d.port} (calling as "
              f"{d.calling_ae_title})", file=out)
    print(f"rules ({len(cfg.rules)}):", file=out)
    for i, rule in enumerate(cfg.rules, 1):
        print(f"  {i}. {rule.name}: {describe_rule(rule)}", file=out)
    used = {d for rule in cfg.rules for d in rule.to}
    for name in cfg.destinations:
        if name not in used:
            print(f"note: no rule sends to destination {name!r}", file=out)
    if not any(rule.action == "route" for rule in cfg.rules):
        print("note: no routing rule: every instance will go to discard/", file=out)
    return 0


def _facts_for_file(path: Path) -> tuple[dict[str, str | None], str]:
    """Receive facts from a spool sidecar beside the file, else those of a dropped file."""
    sidecar = path.with_suffix(JSON)
    if path.suffix.lower() == ".dcm" and sidecar.is_file():
        from hermes_py.spool import Spool
        data = Spool.read_json(sidecar)
        if data.get("source") or data.get("sop_instance_uid"):
            facts = receive_facts(data)
            shown = ", ".join(f"{k}={v}" for k, v in facts.items() if v is not None)
            return facts, f"receive facts from {sidecar.name}: {shown or 'none'}"
    return ({"CallingAE": None, "CalledAE": None, "PeerAddress": None, "Source": "drop"},
            "no sidecar: tested as a dropped file: Source=drop, no AE titles or address")


def explain(decision: Decision) -> list[str]:
    """The dry-run report lines for one decision (also used by admin tools)."""
    lines = []
    for v in decision.verdicts:
        if v.matched:
            what = "discard" if v.rule.action == "discard" else ", ".join(v.rule.to)
            lines.append(f"  matched      {v.rule.name!r} -> {what}")
        else:
            lines.append(f"  not matched  {v.rule.name!r}: {v.why_not()}")
    if decision.discard:
        extra = " (a discard rule overrides routing)" if decision.discarded_by and any(
            v.matched and v.rule.action == "route" for v in decision.verdicts) else ""
        lines.append(f"  => discard: {decision.reason}{extra}")
        return lines
    where = [f"{d}{' [urgent]' if p == 'urgent' else ''}" for d, p in
             decision.destinations.items()]
    for h in decision.holds:
        for d, p in h.destinations.items():
            where.append(f"{d}{' [urgent]' if p == 'urgent' else ''} (held with {h.level} "
                         f"{h.uid or '(no UID)'} until {_duration(h.quiet_for)} quiet)")
    lines.append("  => " + "; ".join(where))
    return lines


def dry_run(cfg: Settings, paths: Sequence[Path]) -> int:
    """``hermes-py rules test FILE...``: what the router would do with each file, and why.

    Returns 0 when every file could be evaluated, 1 when some could not be read.
    """
    keywords = keywords_for(cfg.rules)
    failures = 0
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        for path in paths:
            try:
                values = read_header(path, keywords)
            except UnreadableError as e:
                print(f"{path}:\n  => error: {e} (the router would move it to error/)")
                failures += 1
                continue
            except OSError as e:
                print(f"{path}:\n  => cannot read: {e.strerror or e}")
                failures += 1
                continue
            facts, note = _facts_for_file(Path(path))
            decision = evaluate(cfg.rules, {**values, **facts})
            print(f"{path}: sop={values.get('SOPInstanceUID')}  ({note})")
            for line in explain(decision):
                print(line)
    finally:
        pydicom_config.settings.reading_validation_mode = previous
    return 1 if failures else 0
