"""Matching one instance against rules.toml: the decision the router records and acts on.

Everything here is a pure function of the rules and of a flat ``values`` dict
(DICOM keyword -> text of the element, plus the receive facts CallingAE,
CalledAE, PeerAddress, Source), so the router and ``hermes-py rules test`` give
the same answer for the same file, and the property tests can check the matcher
without a spool. There is no I/O here: the router reads the header with
``dicomfile.read_header`` (once, without the pixel data) and passes its values in.

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

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import re2

from hermes_py.durations import fmt_duration
from hermes_py.spool.names import sanitize
from hermes_py.spool.sidecar import HeldRecord, Routing

# Keys a rule may test besides DICOM keywords: facts about how the instance arrived.
RECEIVE_KEYS = ("CallingAE", "CalledAE", "PeerAddress", "Source")

# Read for every instance whatever the rules say: the name, the class, and the
# keys of series/study batches (also written to the sidecar for admin and dispatcher).
HEADER_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")

# Sidecar key -> receive-fact key a rule can test.
_FACT_KEYS = {"calling_ae": "CallingAE", "called_ae": "CalledAE", "peer_address": "PeerAddress",
              "source": "Source"}

_LEVEL_UID = {"series": "SeriesInstanceUID", "study": "StudyInstanceUID"}

Values = Mapping[str, str | None]


# ---------------------------------------------------------------- the rule model


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _glob_regex(pattern: str) -> str:
    """``*`` any run of characters, ``?`` exactly one; everything else literal.

    Deliberately not fnmatch: ``[`` is an ordinary character in DICOM values
    ("[CT] HEAD"), so a rule written with one must match it literally.
    """
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


class Matcher(Protocol):
    def search(self, text: str) -> object | None: ...
    def fullmatch(self, text: str) -> object | None: ...


def compile_linear(pattern: str, ignore_case: bool = False, dot_all: bool = False) -> Matcher:
    """A regex that runs in time linear in the value: RE2, not Python's backtracking ``re``.

    The values come from any modality and the router evaluates rules for
    everyone: with ``re``, ``^(a+)+$`` and a PatientName of 30 a's and a "!"
    freeze all routing for minutes. RE2 refuses what it cannot run linearly
    (backreferences, lookaround): ValueError with RE2's words.
    """
    opts = re2.Options()
    opts.log_errors = False  # our ValueError says it; RE2 would also print to stderr
    opts.case_sensitive = not ignore_case
    opts.dot_nl = dot_all
    try:
        return cast(Matcher, re2.compile(pattern, opts))
    except re2.error as e:
        text = e.args[0] if e.args else e
        why = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        raise ValueError(f"{why} (rules use RE2 syntax, which always runs in linear time: no "
                         "backreferences, no lookahead or lookbehind)") from None


@dataclass(frozen=True)
class Condition:
    """One ``match``/``exclude`` entry: a key and the patterns any of which may hold.

    Patterns are exact strings or globs (``*``, ``?``); ``regex`` (searched, not
    anchored: write ``^...$`` to anchor) replaces them. With ``ignore_case`` the
    value and the patterns are compared casefolded. The patterns are compiled
    once here so the router pays one set lookup or one regex per value.
    """

    key: str
    patterns: tuple[str, ...]
    # compiled with compile_linear; compared by its text, which is in ``patterns``
    regex: Matcher | None = field(default=None, compare=False)
    ignore_case: bool = False
    source: str = ""  # the TOML value as written, for explanations
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _glob: Matcher | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pats = [p.casefold() if self.ignore_case else p for p in self.patterns]
        globs = [p for p in pats if is_glob(p)]
        object.__setattr__(self, "_exact", frozenset(p for p in pats if not is_glob(p)))
        object.__setattr__(self, "_glob", compile_linear(
            "|".join(f"(?:{_glob_regex(g)})" for g in globs), dot_all=True) if globs else None)

    @property
    def kind(self) -> str:
        if self.regex is not None:
            return "regex"
        return "glob" if self._glob is not None else "exact"

    def holds(self, value: str | None) -> bool:
        """Whether the condition holds for one element's value (None: element absent).

        Multi-valued DICOM elements arrive joined with backslashes
        (``ORIGINAL\\PRIMARY\\AXIAL``): the condition holds if it holds for any
        single value, or for the whole joined string. An absent element never
        satisfies a condition (so ``"*"`` means "present"); an empty one is "".
        """
        if value is None:
            return False
        if "\\" in value:
            return self._holds_one(value) or any(self._holds_one(v) for v in value.split("\\"))
        return self._holds_one(value)

    def _holds_one(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.search(value) is not None
        v = value.casefold() if self.ignore_case else value
        if v in self._exact:
            return True
        return self._glob is not None and self._glob.fullmatch(v) is not None


Level = Literal["instance", "series", "study"]
Priority = Literal["urgent", "normal"]


@dataclass(frozen=True)
class Rule:
    name: str
    match: tuple[Condition, ...] = ()
    exclude: tuple[Condition, ...] = ()
    to: tuple[str, ...] = ()
    action: Literal["route", "discard"] = "route"
    level: Level = "instance"
    quiet_for: float = 60.0
    priority: Priority = "normal"
    line: int | None = None

    @property
    def keys(self) -> set[str]:
        return {c.key for c in (*self.match, *self.exclude)}


# ---------------------------------------------------------------- what to read


def keywords_for(rules: Iterable[Rule]) -> tuple[str, ...]:
    """The tags to read: the ones the rules test plus HEADER_KEYWORDS, nothing else."""
    used = {c.key for r in rules for c in (*r.match, *r.exclude) if c.key not in RECEIVE_KEYS}
    return tuple(dict.fromkeys([*HEADER_KEYWORDS, *sorted(used)]))


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
class Batch:
    """Destinations waiting in ``pending/<key>/`` until the series/study is quiet."""

    key: str
    rule: str
    level: str
    uid: str
    quiet_for: float
    destinations: Mapping[str, str]  # destination -> priority

    def to_json(self) -> HeldRecord:
        return HeldRecord(key=self.key, rule=self.rule, level=self.level, uid=self.uid,
                          quiet_for=self.quiet_for, destinations=list(self.destinations),
                          priorities=dict(self.destinations))

    @classmethod
    def from_json(cls, d: Any) -> Batch:
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
    batches: tuple[Batch, ...] = ()
    rules: tuple[str, ...] = ()  # names of the rules that matched
    discarded_by: str | None = None
    verdicts: tuple[Verdict, ...] = ()  # empty when read back from a sidecar

    @property
    def discard(self) -> bool:
        return not self.destinations and not self.batches

    @property
    def reason(self) -> str:
        """Why it is discarded (only meaningful when ``discard``)."""
        if self.discarded_by is not None:
            return f"discard rule {self.discarded_by!r} matched"
        return "no rule matched"

    @property
    def all_destinations(self) -> list[str]:
        out = list(self.destinations)
        for h in self.batches:
            out.extend(d for d in h.destinations if d not in out)
        return out

    def to_routing(self, at: str) -> Routing:
        """The ``routing`` object of the sidecar (docs/internals.md)."""
        prios = dict(self.destinations)
        for h in self.batches:
            prios.update(h.destinations)
        data = Routing(at=at, rules=list(self.rules), destinations=self.all_destinations,
                       discarded_by=self.discarded_by, priorities=prios,
                       held=[h.to_json() for h in self.batches])
        if self.discard:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_routing(cls, data: Any) -> Decision:
        """A decision an earlier run recorded: finished as recorded, whatever the rules now say."""
        if not isinstance(data, dict) or not isinstance(data.get("destinations"), list):
            raise ValueError("no recorded destinations")
        batches = tuple(Batch.from_json(h) for h in data.get("held") or [])
        held = {d for h in batches for d in h.destinations}
        prios = data.get("priorities") or {}
        if not isinstance(prios, dict):
            raise ValueError("priorities is not an object")
        now = {str(d): _prio(prios.get(d)) for d in data["destinations"] if d not in held}
        rules = tuple(str(r) for r in data.get("rules") or [])
        by = data.get("discarded_by")
        return cls(destinations=now, batches=batches, rules=rules,
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
    batches: list[Batch] = []
    for r in matched:
        if r.level == "instance":
            continue
        dests = {d: prio[d] for d in r.to if d not in taken}
        if not dests:
            continue
        taken.update(dests)
        uid = values.get(_LEVEL_UID[r.level]) or ""
        batches.append(Batch(key=pending_key(r, r.level, uid), rule=r.name, level=r.level,
                          uid=uid, quiet_for=r.quiet_for, destinations=dests))
    return Decision(destinations=now, batches=tuple(batches), rules=names, verdicts=verdicts)


# ---------------------------------------------------------------- explanations


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
            where += f" (whole {rule.level}, after {fmt_duration(rule.quiet_for)} quiet)"
        if rule.priority == "urgent":
            where += " [urgent]"
    return f"{cond} -> {where}"


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
    for h in decision.batches:
        for d, p in h.destinations.items():
            where.append(f"{d}{' [urgent]' if p == 'urgent' else ''} (held with {h.level} "
                         f"{h.uid or '(no UID)'} until {fmt_duration(h.quiet_for)} quiet)")
    lines.append("  => " + "; ".join(where))
    return lines
