"""rules.toml -> typed, validated settings.

Every stage reads its settings from here and nothing else parses the TOML, so a
mistake in the file is reported once, the same way, by ``hermes-py rules check``
and by every process at start: one line naming the file, the line (where TOML
lets us find it) and the key. A running process that reloads an edited file keeps
its old settings when the new ones do not validate.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from hermes_py.errors import HermesError

DEFAULT_CONFIG = "rules.toml"

# Keys a rule may test besides DICOM keywords: facts about how the instance arrived.
RECEIVE_KEYS = ("CallingAE", "CalledAE", "PeerAddress", "Source")

# How the dispatcher classifies an outcome; see dispatcher.py.
OUTCOME_CLASSES = ("success", "transient", "permanent")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(HermesError):
    """A rules.toml problem, formatted as one line: ``file:line: key: message``."""

    def __init__(self, path: Path | str, key: str, message: str, line: int | None = None):
        self.path = str(path)
        self.key = key
        self.message = message
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# ---------------------------------------------------------------- settings types


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 30.0
    max_delay: float = 3600.0
    give_up_after: float = 3 * 86400.0


@dataclass(frozen=True)
class ReceiverSettings:
    ae_title: str = "HERMES"
    bind: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    # Receive PDU size we advertise; 128-256 KiB is measured fastest, 0 is slow and huge.
    max_pdu_size: int = 262144
    # Extra receiver processes sharing the port (SO_REUSEPORT): one process is GIL-bound.
    processes: int = 1
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    min_free_mb: int = 500
    keep_success: float = 7 * 86400.0
    keep_discard: float = 7 * 86400.0
    # A temp file untouched this long belongs to a dead writer (dropped association).
    tmp_max_age: float = 3600.0


@dataclass(frozen=True)
class IntakeSettings:
    """The drop folder: files people copy in by hand."""

    enabled: bool = True
    # A file whose size and mtime did not change for this long is complete even if its
    # writer never closed it (SMB clients, rsync --inplace).
    stable_for: float = 5.0
    rescan_interval: float = 10.0


@dataclass(frozen=True)
class DestinationSettings:
    name: str
    ae_title: str
    host: str
    port: int
    type: str = "dicom"
    calling_ae_title: str = "HERMES"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_associations: int = 1
    connection_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Instances per association before we release and re-associate.
    batch_size: int = 200
    # Per-destination overrides of the status-code classification: code -> class.
    status_classes: Mapping[int, str] = field(default_factory=dict)


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _glob_regex(pattern: str) -> str:
    """``*`` any run of characters, ``?`` exactly one; everything else literal.

    Deliberately not fnmatch: ``[`` is an ordinary character in DICOM values
    ("[CT] HEAD"), so a rule written with one must match it literally.
    """
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


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
    regex: re.Pattern[str] | None = None
    ignore_case: bool = False
    source: str = ""  # the TOML value as written, for explanations
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _glob: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pats = [p.casefold() if self.ignore_case else p for p in self.patterns]
        globs = [p for p in pats if _is_glob(p)]
        object.__setattr__(self, "_exact", frozenset(p for p in pats if not _is_glob(p)))
        object.__setattr__(self, "_glob", re.compile(
            "|".join(f"(?:{_glob_regex(g)})" for g in globs), re.DOTALL) if globs else None)

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


@dataclass(frozen=True)
class Settings:
    path: Path
    receiver: ReceiverSettings
    spool: SpoolSettings
    retry: RetryPolicy
    destinations: Mapping[str, DestinationSettings]
    rules: tuple[Rule, ...]
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"

    @property
    def dicom_keywords(self) -> set[str]:
        """DICOM keywords any rule tests: the only tags the router needs to read."""
        return {k for r in self.rules for k in r.keys if k not in RECEIVE_KEYS}


# ---------------------------------------------------------------- parsing helpers


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"3d"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(
        f"not a duration: {value!r} (use seconds, or a number with ms, s, m, h or d, e.g. \"30s\")"
    )


class _Locator:
    """Finds the line of a key in the TOML text; tomllib keeps no positions."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def _header_line(self, table: tuple[str | int, ...]) -> int | None:
        if not table:
            return 0
        if table[0] == "rules" and len(table) >= 2 and isinstance(table[1], int):
            seen = -1
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[\[\s*rules\s*\]\]", raw):
                    seen += 1
                    if seen == table[1]:
                        return i
            return None
        dotted = ".".join(str(t) for t in table)
        pat = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            r'"?' + re.escape(str(t)) + r'"?' for t in table) + r"\s*\]")
        for i, raw in enumerate(self.lines):
            if pat.match(raw):
                return i
        # Dotted key inside a parent table, e.g. destinations = { ... }: give up gracefully.
        del dotted
        return None

    def line(self, table: tuple[str | int, ...], key: str | None = None) -> int | None:
        start = self._header_line(table)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        inline_re = re.compile(r'[{,]\s*"?' + re.escape(key) + r'"?\s*=')
        if not table:
            # A top-level key is either written before the first table or is a table.
            head_re = re.compile(r'^\s*\[\[?\s*"?' + re.escape(key) + r'"?\s*[\].]')
            in_root = True
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[", raw):
                    in_root = False
                    if head_re.match(raw):
                        return i + 1
                elif in_root and key_re.match(raw):
                    return i + 1
            return None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                break
            if key_re.match(raw) or inline_re.search(raw):
                return i + 1
        return start + 1

    def rule_line(self, index: int, section: str, key: str | None = None) -> int | None:
        """Line of ``section`` (``match``/``exclude``) of rule ``index``, or of one of its keys.

        Handles both spellings: ``match = { Modality = "CT" }`` on the rule's
        own lines, and a ``[rules.match]`` sub-table below the ``[[rules]]``.
        """
        start = self._header_line(("rules", index))
        if start is None:
            return None
        q = r'\s*"?'
        sec = re.escape(section)
        inline_re = re.compile(rf'^{q}{sec}"?\s*=')
        dotted_re = re.compile(rf'^{q}{sec}"?\s*\.{q}{re.escape(key or "")}"?\s*=')
        sub_re = re.compile(rf'^\s*\[{q}rules"?\s*\.{q}{sec}"?\s*\]')
        key_re = re.compile(rf'^{q}{re.escape(key or "")}"?\s*=')
        in_sub = False
        sub_line: int | None = None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                if re.match(r"^\s*\[\[", raw) or not re.match(r'^\s*\[\s*"?rules"?\s*\.', raw):
                    break  # the next rule or another table: this rule ends here
                in_sub = bool(sub_re.match(raw))
                if in_sub:
                    sub_line = i + 1
                continue
            if in_sub:
                if key is None or key_re.match(raw):
                    return i + 1 if key else sub_line
            elif inline_re.match(raw) or (key and dotted_re.match(raw)):
                return i + 1
        return sub_line or start + 1


class _Parser:
    def __init__(self, path: Path, text: str):
        self.path = path
        self.loc = _Locator(text)

    def err(self, table: tuple[str | int, ...], key: str, msg: str,
            line_key: str | None = None) -> ConfigError:
        dotted = ".".join(
            f"[{t}]" if isinstance(t, int) else str(t) for t in (*table, key) if t != ""
        ).replace(".[", "[")
        return ConfigError(self.path, dotted, msg, self.loc.line(table, line_key or key))

    def check_keys(self, table: tuple[str | int, ...], data: Mapping[str, Any],
                   allowed: set[str]) -> None:
        for k in data:
            if k not in allowed:
                expected = ", ".join(sorted(allowed))
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.err(table, k, f"unknown key ({hint}expected one of: {expected})")

    def get(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
            typ: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        v = data[key]
        if isinstance(v, bool) and typ is not bool and (typ is int or int in (
                typ if isinstance(typ, tuple) else (typ,))):
            raise self.err(table, key, f"expected {self._tname(typ)}, got {v!r}")
        if not isinstance(v, typ):
            raise self.err(table, key, f"expected {self._tname(typ)}, got {v!r}")
        return v

    @staticmethod
    def _tname(typ: type | tuple[type, ...]) -> str:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                 list: "a list", dict: "a table"}
        ts = typ if isinstance(typ, tuple) else (typ,)
        return " or ".join(names.get(t, t.__name__) for t in ts)

    def duration(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
                 default: float) -> float:
        if key not in data:
            return default
        try:
            return parse_duration(data[key])
        except ValueError as e:
            raise self.err(table, key, str(e)) from None

    def port(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
             default: int) -> int:
        p = int(self.get(table, data, key, int, default))
        if not 0 <= p <= 65535:
            raise self.err(table, key, f"port out of range: {p}")
        return p

    def ae_title(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
                 default: str | None) -> str:
        v = self.get(table, data, key, str, default)
        if v is None:
            raise self.err(table, key, "missing (an AE title is required)", line_key=None)
        if not _AE_RE.match(v) or v.strip() == "" or "\\" in v:
            raise self.err(table, key, f"invalid AE title {v!r}: 1-16 printable ASCII characters, "
                                       "no backslash")
        return str(v)

    def positive(self, table: tuple[str | int, ...], key: str, value: float) -> None:
        if value <= 0:
            raise self.err(table, key, f"must be greater than 0, got {value!r}")


_RETRY_KEYS = {"initial_delay", "max_delay", "give_up_after"}


def _parse_retry(p: _Parser, table: tuple[str | int, ...], data: Mapping[str, Any],
                 base: RetryPolicy) -> RetryPolicy:
    r = RetryPolicy(
        initial_delay=p.duration(table, data, "initial_delay", base.initial_delay),
        max_delay=p.duration(table, data, "max_delay", base.max_delay),
        give_up_after=p.duration(table, data, "give_up_after", base.give_up_after),
    )
    if r.initial_delay <= 0:
        raise p.err(table, "initial_delay", "must be greater than 0")
    if r.max_delay < r.initial_delay:
        raise p.err(table, "max_delay", f"must be at least initial_delay ({r.initial_delay:g}s)")
    return r


def _parse_status_classes(p: _Parser, table: tuple[str | int, ...],
                          data: Mapping[str, Any]) -> dict[int, str]:
    raw = p.get(table, data, "status_classes", dict, {})
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            code = int(k, 16) if k.lower().startswith("0x") else int(k)
        except ValueError:
            raise p.err(table, "status_classes", f"{k!r} is not a status code "
                                                 "(write it as \"0xC001\")") from None
        if v not in OUTCOME_CLASSES:
            raise p.err(table, "status_classes",
                        f"{k} = {v!r}: class must be one of {', '.join(OUTCOME_CLASSES)}")
        out[code] = v
    return out


_DEST_KEYS = {"type", "ae_title", "host", "port", "calling_ae_title", "max_associations",
              "connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout",
              "batch_size", "status_classes"} | _RETRY_KEYS
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _parse_destination(p: _Parser, name: str, data: Any, retry: RetryPolicy,
                       default_calling: str) -> DestinationSettings:
    table: tuple[str | int, ...] = ("destinations", name)
    if not isinstance(data, dict):
        raise p.err(("destinations",), name, "expected a table [destinations.NAME]")
    if not _NAME_RE.match(name):
        raise p.err(("destinations",), name, "destination names are letters, digits, '_', '-', "
                                             "'.', at most 64, and become folder names")
    p.check_keys(table, data, _DEST_KEYS)
    dtype = p.get(table, data, "type", str, "dicom")
    if dtype != "dicom":
        raise p.err(table, "type", f"unknown destination type {dtype!r} (supported: dicom)")
    for req in ("ae_title", "host", "port"):
        if req not in data:
            raise ConfigError(p.path, f"destinations.{name}.{req}", "missing",
                              p.loc.line(table))
    d = DestinationSettings(
        name=name,
        type=dtype,
        ae_title=p.ae_title(table, data, "ae_title", None),
        host=p.get(table, data, "host", str, ""),
        port=p.port(table, data, "port", 0),
        calling_ae_title=p.ae_title(table, data, "calling_ae_title", default_calling),
        retry=_parse_retry(p, table, data, retry),
        max_associations=int(p.get(table, data, "max_associations", int, 1)),
        connection_timeout=p.duration(table, data, "connection_timeout", 10.0),
        acse_timeout=p.duration(table, data, "acse_timeout", 30.0),
        dimse_timeout=p.duration(table, data, "dimse_timeout", 60.0),
        network_timeout=p.duration(table, data, "network_timeout", 60.0),
        batch_size=int(p.get(table, data, "batch_size", int, 200)),
        status_classes=_parse_status_classes(p, table, data),
    )
    if not d.host.strip():
        raise p.err(table, "host", "must not be empty")
    if d.port == 0:
        raise p.err(table, "port", "must be 1-65535")
    if d.max_associations < 1:
        raise p.err(table, "max_associations", "must be at least 1")
    if d.batch_size < 1:
        raise p.err(table, "batch_size", "must be at least 1")
    for k in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        p.positive(table, k, getattr(d, k))
    return d


_COND_TABLE_KEYS = {"regex", "glob", "equals", "any", "ignore_case"}
# Elements a rule cannot test: sequences hold datasets and binary VRs hold bytes
# (PixelData among them, which the router never reads).
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW"}
_SOURCES = ("network", "drop")


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _keyword_problem(key: str) -> str | None:
    """Why ``key`` cannot be a condition key, or None when it can."""
    if key in RECEIVE_KEYS:
        return None
    tag = tag_for_keyword(key)
    if tag is None:
        candidates = [*RECEIVE_KEYS, *keyword_dict]
        folded = [c for c in candidates if c.casefold() == key.casefold()]
        close = folded or difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (f"unknown DICOM keyword {key!r} ({hint}keywords are spelled as in the standard, "
                f"e.g. Modality, StudyDescription; or one of {', '.join(RECEIVE_KEYS)})")
    vr = dictionary_VR(tag)
    if vr in _UNMATCHABLE_VRS:
        what = "pixel data, which the router never reads" if key == "PixelData" else (
            "a sequence" if vr == "SQ" else "binary data")
        return f"{key} {_tag_str(tag)} has VR {vr} ({what}): only text and number " \
               "elements can be matched"
    return None


def _parse_condition(p: _Parser, index: int, section: str, key: str, value: Any) -> Condition:
    line = p.loc.rule_line(index, section, key)

    def bad(msg: str) -> ConfigError:
        return ConfigError(p.path, f"rules[{index}].{section}.{key}", msg, line)

    if key in _RULE_KEYS:
        raise bad(f"{key!r} is a rule key, but TOML puts every key written after a "
                  f"[rules.{section}] header into that table: move it above the header")
    problem = _keyword_problem(key)
    if problem:
        raise bad(problem)
    ignore_case = False
    regex: re.Pattern[str] | None = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - _COND_TABLE_KEYS)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(_COND_TABLE_KEYS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise bad(f"unknown key {unknown[0]!r} in condition ({hint}use regex, glob, equals, "
                      "any, ignore_case)")
        ignore_case = value.get("ignore_case", False)
        if not isinstance(ignore_case, bool):
            raise bad("ignore_case must be true or false")
        kinds = [k for k in ("regex", "glob", "equals", "any") if k in value]
        if len(kinds) != 1:
            raise bad("a condition table needs exactly one of regex, glob, equals, any "
                      "(e.g. { regex = \"^CT\", ignore_case = true })")
        kind = kinds[0]
        inner = value[kind]
        if kind == "regex":
            if not isinstance(inner, str):
                raise bad("regex must be a string")
            try:
                regex = re.compile(inner, re.IGNORECASE if ignore_case else 0)
            except re.error as e:
                raise bad(f"bad regex {inner!r}: {e}") from None
            patterns: tuple[str, ...] = (inner,)
        else:
            patterns = _pattern_list(bad, inner)
    else:
        patterns = _pattern_list(bad, value)
    if key == "Source" and regex is None:
        for pat in patterns:
            if not _is_glob(pat) and pat.casefold() not in _SOURCES:
                raise bad(f"Source is \"network\" or \"drop\", got {pat!r}")
    return Condition(key=key, patterns=patterns, regex=regex, ignore_case=ignore_case,
                     source=_toml_repr(value))


def _pattern_list(bad: Callable[[str], ConfigError], value: Any) -> tuple[str, ...]:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, list) and value and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value)
    raise bad("a value is a string, a non-empty list of strings, or { regex = \"...\" }")


def _toml_repr(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_repr(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_RULE_KEYS = {"name", "match", "exclude", "to", "action", "level", "quiet_for", "priority"}


def _parse_rule(p: _Parser, i: int, data: Any, destinations: Mapping[str, Any],
                seen: dict[str, int]) -> Rule:
    if not isinstance(data, dict):
        raise p.err(("rules",), str(i), "each [[rules]] entry must be a table")
    name = data.get("name")
    try:
        return _parse_rule_body(p, i, data, destinations, seen)
    except ConfigError as e:
        if not isinstance(name, str) or not name or "duplicate rule name" in e.message:
            raise
        # People know their rules by name, not by index: say which one.
        raise ConfigError(e.path, e.key, f"{e.message} (rule {name!r})", e.line) from None


def _parse_rule_body(p: _Parser, i: int, data: dict[str, Any],
                     destinations: Mapping[str, Any], seen: dict[str, int]) -> Rule:
    table: tuple[str | int, ...] = ("rules", i)
    p.check_keys(table, data, _RULE_KEYS)
    name = p.get(table, data, "name", str, None)
    if not name or not name.strip():
        raise ConfigError(p.path, f"rules[{i}].name", "missing (every rule needs a name)",
                          p.loc.line(table))
    if name in seen:
        raise p.err(table, "name",
                    f"duplicate rule name {name!r} (first used by rules[{seen[name]}])")
    seen[name] = i
    action = p.get(table, data, "action", str, "route")
    if action not in ("route", "discard"):
        raise p.err(table, "action", f"must be \"route\" or \"discard\", got {action!r}")
    level = p.get(table, data, "level", str, "instance")
    if level not in ("instance", "series", "study"):
        raise p.err(table, "level", f"must be \"instance\", \"series\" or \"study\", got {level!r}")
    priority = p.get(table, data, "priority", str, "normal")
    if priority not in ("urgent", "normal"):
        raise p.err(table, "priority", f"must be \"urgent\" or \"normal\", got {priority!r}")
    quiet_for = p.duration(table, data, "quiet_for", 60.0)
    if "quiet_for" in data:
        if level == "instance":
            raise p.err(table, "quiet_for", "only applies with level = \"series\" or \"study\" "
                                            "(an instance-level rule routes at once)")
        p.positive(table, "quiet_for", quiet_for)
    if action == "discard":
        for k in ("level", "priority"):
            if k in data:
                raise p.err(table, k, f"a discard rule acts on each instance at once: remove {k}")
    conds: dict[str, tuple[Condition, ...]] = {}
    for section in ("match", "exclude"):
        raw = p.get(table, data, section, dict, {})
        conds[section] = tuple(_parse_condition(p, i, section, k, v) for k, v in raw.items())
    to_raw = data.get("to", [])
    if isinstance(to_raw, str):
        to_raw = [to_raw]
    if not isinstance(to_raw, list) or not all(isinstance(t, str) for t in to_raw):
        raise p.err(table, "to", "must be a list of destination names")
    for t in to_raw:
        if t not in destinations:
            known = ", ".join(sorted(destinations)) or "none defined"
            raise p.err(table, "to", f"unknown destination {t!r} (defined: {known})")
    if action == "route" and not to_raw:
        raise p.err(table, "to", "a routing rule needs at least one destination "
                                 "(or action = \"discard\")")
    if action == "discard" and to_raw:
        raise p.err(table, "to", "a discard rule sends nowhere: remove 'to' or the action")
    return Rule(name=name, match=conds["match"], exclude=conds["exclude"],
                to=tuple(dict.fromkeys(to_raw)), action=action, level=level,
                quiet_for=quiet_for, priority=priority, line=p.loc.line(table))


_TOP_KEYS = {"receiver", "spool", "retry", "destinations", "rules", "intake", "metrics"}
_RECEIVER_KEYS = {"ae_title", "bind", "port", "allowed_calling_aets", "max_associations",
                  "max_pdu_size", "processes", "acse_timeout", "dimse_timeout", "network_timeout"}
_SPOOL_KEYS = {"path", "min_free_mb", "keep_success", "keep_discard", "tmp_max_age"}
_INTAKE_KEYS = {"enabled", "stable_for", "rescan_interval"}
_METRICS_KEYS = {"port", "bind"}


def parse(text: str, path: Path) -> Settings:
    """Validate ``text`` (the content of ``path``) into Settings, or raise ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, "", f"not valid TOML: {e}", line) from None
    p = _Parser(path, text)
    p.check_keys((), data, _TOP_KEYS)
    for t in ("receiver", "spool", "retry", "destinations", "intake", "metrics"):
        if t in data and not isinstance(data[t], dict):
            raise p.err((), t, f"expected a table [{t}]")

    rd = data.get("receiver", {})
    p.check_keys(("receiver",), rd, _RECEIVER_KEYS)
    aets = p.get(("receiver",), rd, "allowed_calling_aets", list, [])
    for a in aets:
        if not isinstance(a, str) or not _AE_RE.match(a):
            raise p.err(("receiver",), "allowed_calling_aets", f"invalid AE title {a!r}")
    receiver = ReceiverSettings(
        ae_title=p.ae_title(("receiver",), rd, "ae_title", "HERMES"),
        bind=p.get(("receiver",), rd, "bind", str, "0.0.0.0"),
        port=p.port(("receiver",), rd, "port", 11112),
        allowed_calling_aets=tuple(a.strip() for a in aets),
        max_associations=int(p.get(("receiver",), rd, "max_associations", int, 10)),
        max_pdu_size=int(p.get(("receiver",), rd, "max_pdu_size", int, 262144)),
        processes=int(p.get(("receiver",), rd, "processes", int, 1)),
        acse_timeout=p.duration(("receiver",), rd, "acse_timeout", 30.0),
        dimse_timeout=p.duration(("receiver",), rd, "dimse_timeout", 60.0),
        network_timeout=p.duration(("receiver",), rd, "network_timeout", 120.0),
    )
    if receiver.max_associations < 1:
        raise p.err(("receiver",), "max_associations", "must be at least 1")
    if receiver.processes < 1:
        raise p.err(("receiver",), "processes", "must be at least 1")
    if receiver.max_pdu_size != 0 and receiver.max_pdu_size < 4096:
        raise p.err(("receiver",), "max_pdu_size", "must be at least 4096 (262144 recommended)")

    sd = data.get("spool", {})
    p.check_keys(("spool",), sd, _SPOOL_KEYS)
    spool_path = Path(p.get(("spool",), sd, "path", str, "spool"))
    if not spool_path.is_absolute():
        spool_path = path.parent / spool_path
    spool = SpoolSettings(
        path=spool_path,
        min_free_mb=int(p.get(("spool",), sd, "min_free_mb", int, 500)),
        keep_success=p.duration(("spool",), sd, "keep_success", 7 * 86400.0),
        keep_discard=p.duration(("spool",), sd, "keep_discard", 7 * 86400.0),
        tmp_max_age=p.duration(("spool",), sd, "tmp_max_age", 3600.0),
    )
    if spool.min_free_mb < 0:
        raise p.err(("spool",), "min_free_mb", "must be 0 or more")

    retry = _parse_retry(p, ("retry",), data.get("retry", {}), RetryPolicy())
    p.check_keys(("retry",), data.get("retry", {}), _RETRY_KEYS)

    idata = data.get("intake", {})
    p.check_keys(("intake",), idata, _INTAKE_KEYS)
    intake = IntakeSettings(
        enabled=p.get(("intake",), idata, "enabled", bool, True),
        stable_for=p.duration(("intake",), idata, "stable_for", 5.0),
        rescan_interval=p.duration(("intake",), idata, "rescan_interval", 10.0),
    )
    p.positive(("intake",), "rescan_interval", intake.rescan_interval)

    dests: dict[str, DestinationSettings] = {}
    for name, dd in data.get("destinations", {}).items():
        dests[name] = _parse_destination(p, name, dd, retry, receiver.ae_title)

    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise p.err((), "rules", "write rules as [[rules]] tables")
    seen: dict[str, int] = {}
    rules = tuple(_parse_rule(p, i, r, dests, seen) for i, r in enumerate(rules_raw))

    md = data.get("metrics", {})
    p.check_keys(("metrics",), md, _METRICS_KEYS)
    metrics_port = p.port(("metrics",), md, "port", 0) if "port" in md else None

    return Settings(path=path, receiver=receiver, spool=spool, retry=retry,
                    destinations=dests, rules=rules, intake=intake, metrics_port=metrics_port,
                    metrics_bind=p.get(("metrics",), md, "bind", str, "127.0.0.1"))


def load(path: Path | str = DEFAULT_CONFIG) -> Settings:
    """Read and validate a config file; every failure is a ConfigError with one clear line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "config file not found (pass -c PATH)") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied reading the config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason}") from None
    return parse(text, path.resolve())
