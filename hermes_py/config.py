"""rules.toml -> typed, validated settings.

Every stage reads its settings from here and nothing else parses the TOML, so a
mistake in the file is reported once, the same way, by ``hermes-py rules check``
and by every process at start: one line naming the file, the line (where TOML
lets us find it) and the key. A running process that reloads an edited file keeps
its old settings when the new ones do not validate.

A section's keys, their kinds and their defaults are its dataclass's fields
(``Duration``, ``Port`` and ``AETitle`` say how a value is read and checked), so
a new key is one new field. Each destination type owns the keys of its own
table (``hermes_py.destinations``); the keys every type shares are here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from hermes_py import destinations
from hermes_py.config_lines import Locator
from hermes_py.durations import parse_duration
from hermes_py.errors import HermesError
from hermes_py.rules import RECEIVE_KEYS, Condition, Rule, is_glob
from hermes_py.spool import Spool

__all__ = ["AETitle", "ConfigError", "DestinationSettings", "Duration", "IntakeSettings",
           "Port", "Reader", "ReceiverSettings", "RetryPolicy", "Settings", "SpoolSettings",
           "load", "parse", "parse_duration"]

DEFAULT_CONFIG = "rules.toml"

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


# ---------------------------------------------------------------- value kinds


class _Kind:
    def __init__(self, name: str):
        self.name = name


_DURATION, _PORT, _AE_TITLE = _Kind("duration"), _Kind("port"), _Kind("AE title")
Duration = Annotated[float, _DURATION]   # seconds, or "500ms", "30s", "5m", "2h", "3d"
Port = Annotated[int, _PORT]             # 0-65535
AETitle = Annotated[str, _AE_TITLE]      # 1-16 printable ASCII characters, no backslash


# ---------------------------------------------------------------- settings types


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: Duration = 30.0
    max_delay: Duration = 3600.0
    give_up_after: Duration = 3 * 86400.0


@dataclass(frozen=True)
class ReceiverSettings:
    ae_title: AETitle = "HERMES"
    bind: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    # Receive PDU size we advertise; 128-256 KiB is measured fastest, 0 is slow and huge.
    max_pdu_size: int = 262144
    # Receiver processes sharing the port (SO_REUSEPORT), started by serve: one is GIL-bound.
    processes: int = 1
    acse_timeout: Duration = 30.0
    dimse_timeout: Duration = 60.0
    network_timeout: Duration = 120.0


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    min_free_mb: int = 500
    keep_success: Duration = 7 * 86400.0
    keep_discard: Duration = 7 * 86400.0
    # A temp file untouched this long belongs to a dead writer (dropped association).
    tmp_max_age: Duration = 3600.0


@dataclass(frozen=True)
class IntakeSettings:
    """The drop folder: files people copy in by hand."""

    enabled: bool = True
    # A file whose size and mtime did not change for this long is complete even if its
    # writer never closed it (SMB clients, rsync --inplace).
    stable_for: Duration = 5.0
    rescan_interval: Duration = 10.0


@dataclass(frozen=True, kw_only=True)
class DestinationSettings:
    """What every destination type has; each type's own settings extend this class."""

    name: str
    type: str = "dicom"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_associations: int = 1
    # Instances per batch (for DICOM: per association, then release and re-associate).
    batch_size: int = 200


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

    def destination(self, name: str) -> DestinationSettings:
        """The settings of destination ``name``, or the one-line error every verb gives."""
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none defined"
            raise HermesError(f"unknown destination {name!r} in {self.path} "
                              f"(defined: {known})") from None


def keys_of(cls: type, exclude: tuple[str, ...] = ()) -> set[str]:
    """The TOML keys of a settings section: its dataclass's field names."""
    return {f.name for f in dataclasses.fields(cls) if f.name not in exclude}


RETRY_KEYS = keys_of(RetryPolicy)
COMMON_DEST_KEYS = keys_of(DestinationSettings, ("name", "retry")) | RETRY_KEYS


# ---------------------------------------------------------------- reading tables


class Reader:
    """Reads the values of one rules.toml, each checked, each error pointing at its line."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.loc = Locator(text)

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

    def fields(self, table: tuple[str | int, ...], data: Mapping[str, Any], cls: type,
               skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The keys of ``data`` that are fields of ``cls`` (but ``skip``), each read by its kind.

        Keys that are absent are left out, so the dataclass's defaults apply.
        """
        hints = typing.get_type_hints(cls, include_extras=True)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name not in data:
                continue
            out[f.name] = self.value(table, data, f.name, hints[f.name])
        return out

    def value(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
              hint: Any) -> Any:
        kind = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, _Kind)), None)
        if kind is _DURATION:
            return self.duration(table, data, key, 0.0)
        if kind is _PORT:
            return self.port(table, data, key, 0)
        if kind is _AE_TITLE:
            return self.ae_title(table, data, key, None)
        base = typing.get_origin(hint) or hint
        if base is float:
            return float(self.get(table, data, key, (int, float), 0.0))
        if base in (bool, int, str):
            return self.get(table, data, key, base, None)
        raise TypeError(f"{key}: no reader for {hint!r}")  # a settings field needs custom code

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

    def at_least_one(self, table: tuple[str | int, ...], key: str, value: int) -> None:
        if value < 1:
            raise self.err(table, key, "must be at least 1")

    def required(self, table: tuple[str | int, ...], data: Mapping[str, Any],
                 keys: tuple[str, ...]) -> None:
        dotted = ".".join(str(t) for t in table)
        for k in keys:
            if k not in data:
                raise ConfigError(self.path, f"{dotted}.{k}", "missing", self.loc.line(table))


# ---------------------------------------------------------------- sections


def _parse_retry(p: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
                 base: RetryPolicy) -> RetryPolicy:
    r = dataclasses.replace(base, **p.fields(table, data, RetryPolicy))
    if r.initial_delay <= 0:
        raise p.err(table, "initial_delay", "must be greater than 0")
    if r.max_delay < r.initial_delay:
        raise p.err(table, "max_delay", f"must be at least initial_delay ({r.initial_delay:g}s)")
    return r


def _parse_receiver(p: Reader, rd: Mapping[str, Any]) -> ReceiverSettings:
    table = ("receiver",)
    p.check_keys(table, rd, keys_of(ReceiverSettings))
    aets = p.get(table, rd, "allowed_calling_aets", list, [])
    for a in aets:
        if not isinstance(a, str) or not _AE_RE.match(a):
            raise p.err(table, "allowed_calling_aets", f"invalid AE title {a!r}")
    receiver = ReceiverSettings(allowed_calling_aets=tuple(a.strip() for a in aets),
                                **p.fields(table, rd, ReceiverSettings,
                                           skip=("allowed_calling_aets",)))
    p.at_least_one(table, "max_associations", receiver.max_associations)
    p.at_least_one(table, "processes", receiver.processes)
    if receiver.max_pdu_size != 0 and receiver.max_pdu_size < 4096:
        raise p.err(table, "max_pdu_size", "must be at least 4096 (262144 recommended)")
    return receiver


def _parse_spool(p: Reader, sd: Mapping[str, Any], config_path: Path) -> SpoolSettings:
    table = ("spool",)
    p.check_keys(table, sd, keys_of(SpoolSettings))
    spool_path = Path(p.get(table, sd, "path", str, "spool"))
    if not spool_path.is_absolute():
        spool_path = config_path.parent / spool_path
    spool = SpoolSettings(path=spool_path, **p.fields(table, sd, SpoolSettings, skip=("path",)))
    if spool.min_free_mb < 0:
        raise p.err(table, "min_free_mb", "must be 0 or more")
    return spool


def _parse_intake(p: Reader, idata: Mapping[str, Any]) -> IntakeSettings:
    p.check_keys(("intake",), idata, keys_of(IntakeSettings))
    intake = IntakeSettings(**p.fields(("intake",), idata, IntakeSettings))
    p.positive(("intake",), "rescan_interval", intake.rescan_interval)
    return intake


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_folders(p: Reader, dests: Mapping[str, DestinationSettings]) -> None:
    """Each destination gets folders of its own: names that become the same folder name
    (``pacs-web`` and ``pacs_web``; ``PACS`` and ``pacs`` on a case-blind filesystem)
    would share a queue, a state file and flags."""
    seen: dict[str, str] = {}
    for name in dests:
        folder = Spool.dest_folder(name).casefold()
        if folder in seen:
            raise ConfigError(p.path, f"destinations.{name}",
                              f"would share its folders with destination {seen[folder]!r} "
                              "(names become folder names: '-' and '_' are the same there, "
                              "and so are upper and lower case): rename one",
                              p.loc.line(("destinations", name)))
        seen[folder] = name


def _parse_destination(p: Reader, name: str, data: Any, retry: RetryPolicy,
                       receiver: ReceiverSettings) -> DestinationSettings:
    table: tuple[str | int, ...] = ("destinations", name)
    if not isinstance(data, dict):
        raise p.err(("destinations",), name, "expected a table [destinations.NAME]")
    if not _NAME_RE.match(name):
        raise p.err(("destinations",), name, "destination names are letters, digits, '_', '-', "
                                             "'.', at most 64, and become folder names")
    dtype = p.get(table, data, "type", str, "dicom")
    kind = destinations.type_named(dtype)
    if kind is None:
        raise p.err(table, "type", f"unknown destination type {dtype!r} "
                                   f"(supported: {', '.join(destinations.TYPE_NAMES)})")
    p.check_keys(table, data, COMMON_DEST_KEYS | kind.keys())
    common: dict[str, Any] = {
        "name": name, "type": dtype, "retry": _parse_retry(p, table, data, retry),
        **p.fields(table, data, DestinationSettings, skip=("name", "type", "retry"))}
    settings = kind.parse(p, table, data, common, receiver)
    p.at_least_one(table, "max_associations", settings.max_associations)
    p.at_least_one(table, "batch_size", settings.batch_size)
    return settings


# ---------------------------------------------------------------- conditions and rules


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


def _parse_condition(p: Reader, index: int, section: str, key: str, value: Any) -> Condition:
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
            if not is_glob(pat) and pat.casefold() not in _SOURCES:
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


def _parse_rule(p: Reader, i: int, data: Any, destinations: Mapping[str, Any],
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


def _parse_rule_body(p: Reader, i: int, data: dict[str, Any],
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
_METRICS_KEYS = {"port", "bind"}


def parse(text: str, path: Path) -> Settings:
    """Validate ``text`` (the content of ``path``) into Settings, or raise ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, "", f"not valid TOML: {e}", line) from None
    p = Reader(path, text)
    p.check_keys((), data, _TOP_KEYS)
    for t in ("receiver", "spool", "retry", "destinations", "intake", "metrics"):
        if t in data and not isinstance(data[t], dict):
            raise p.err((), t, f"expected a table [{t}]")
    receiver = _parse_receiver(p, data.get("receiver", {}))
    spool = _parse_spool(p, data.get("spool", {}), path)
    p.check_keys(("retry",), data.get("retry", {}), RETRY_KEYS)
    retry = _parse_retry(p, ("retry",), data.get("retry", {}), RetryPolicy())
    intake = _parse_intake(p, data.get("intake", {}))
    dests = {name: _parse_destination(p, name, dd, retry, receiver)
             for name, dd in data.get("destinations", {}).items()}
    _check_folders(p, dests)
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
