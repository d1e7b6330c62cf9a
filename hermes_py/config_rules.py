"""The ``[[rules]]`` tables of rules.toml: conditions, actions, levels, priorities.

A rule is validated here into the model ``rules.py`` matches with; every error
names the rule's line (and the condition's, for a condition) and, since people
know their rules by name, the rule's name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from hermes_py.config_reader import ConfigError, Reader
from hermes_py.rules import RECEIVE_KEYS, Condition, Matcher, Rule, compile_linear, is_glob

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
    regex: Matcher | None = None
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
                regex = compile_linear(inner, ignore_case)
            except ValueError as e:
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


def parse_rule(p: Reader, i: int, data: Any, destinations: Mapping[str, Any],
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


