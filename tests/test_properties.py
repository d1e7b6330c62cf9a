"""Property-based invariants: spool names from hostile wire data, and rule conditions.

Names (``hermes_py.spool.sanitize`` / ``new_name``): the receiver names every instance
``new_name(<Affected SOP Instance UID>)`` and a hostile or broken sender controls that
UID completely; AE titles and tags become path components the same way. Whatever the
value, the sanitised result is exactly one path component inside its folder, never
empty, never '.' or '..' or hidden, deterministic, and ``new_name`` is a well-formed spool
name, unique per reception, that carries and sorts by the receive time. Checked against
a real directory, not just by string inspection.

Conditions (``hermes_py.rules.Condition``): the semantics a rules.toml author relies on -
an exact pattern is equality, '*' holds for any value, a list is "any of", ignore_case is
case-insensitivity, a multi-valued element holds when one of its values does, and a
missing element never holds.

Rules engine (``hermes_py.rules.evaluate``): an instance goes to the union of the
destinations of every matching rule, once each; a matching discard rule wins; an instance
no rule routes is discarded with a reason, never lost; the recorded decision reads back as
the same decision (crash recovery finishes it as recorded).

Pure functions: no process, no network (one real folder for the names).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hermes_py.rules import Condition, Decision, Rule, evaluate, pending_key
from hermes_py.spool import is_name, new_name, received_at, sanitize

# Anything a peer can put on the wire: text, path tricks, NULs, odd Unicode, huge values.
HOSTILE = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from([*"./\\\0 \t\n~$*?%:\"<>|", "..", "../", "\u202e", "é",
                              "\udcff", "1.2", "A", "etc"])).map("".join),
    st.builds("/".join, st.lists(st.sampled_from(["..", ".", "", "etc"]), max_size=40)),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", ".", "..", "../../etc/passwd", "/", "//", "\0", ".hidden", " ",
                     "1.2.840.10008\0", "..\\..\\x", "CON", "a" * 300, "...", ". .", "\n"]),
)
HOSTILE_OR_BYTES = st.one_of(HOSTILE, st.binary(max_size=300), st.none())
EPOCHS = st.floats(min_value=0, max_value=4102444800, allow_nan=False)  # 1970 .. 2100


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real folder the names must be creatable in (module scope: hypothesis reuses it)."""
    return tmp_path_factory.mktemp("names")


@settings(max_examples=400, deadline=None)
@given(HOSTILE_OR_BYTES)
@example("../../etc/x")
@example(b"\x00\xff..")
@example(".")
@example(None)
def test_sanitized_name_is_one_component_inside_the_folder(folder: Path,
                                                           value: str | bytes | None) -> None:
    s = sanitize(value)
    assert 1 <= len(s) <= 64, s
    assert re.fullmatch(r"[0-9A-Za-z._]+", s), s
    assert s not in (".", ".."), s
    assert not s.startswith("."), f"hidden or relative: {s!r}"
    assert "/" not in s and "\\" not in s and "\0" not in s and os.sep not in s, s
    assert os.path.basename(s) == s
    assert s == sanitize(value), "not deterministic"
    path = folder / s
    assert path.parent == folder and path.resolve().parent == folder.resolve()
    # Really creatable as one file in that folder (and removable again).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    assert s in os.listdir(folder)
    os.unlink(path)


@settings(max_examples=200, deadline=None)
@given(HOSTILE_OR_BYTES, st.integers(min_value=1, max_value=100))
def test_sanitize_respects_limit(value: str | bytes | None, limit: int) -> None:
    s = sanitize(value, limit=limit)
    assert s and len(s) <= max(limit, len("unknown"))


@settings(max_examples=300, deadline=None)
@given(HOSTILE_OR_BYTES, EPOCHS)
@example("../../etc/x", 1_764_307_023.5)
def test_new_name_is_a_valid_unique_spool_name_in_its_folder(folder: Path,
                                                             uid: str | bytes | None,
                                                             when: float) -> None:
    a = new_name(uid, when)
    b = new_name(uid, when)
    assert is_name(a) and is_name(b), a
    assert a != b, "two receptions of one UID must never share a name"
    assert "/" not in a and not a.startswith(".")
    t = received_at(a)
    assert t is not None and abs(t - when) <= 2e-6, (t, when)
    assert a.split("_")[0] == b.split("_")[0]
    assert Path(os.path.normpath(folder / (a + ".dcm"))).parent == folder
    # Creatable in a real folder, as <name>.dcm and <name>.json.
    for suffix in (".dcm", ".json"):
        p = folder / (a + suffix)
        p.write_bytes(b"")
        assert p.parent == folder and p.name in os.listdir(folder)
        p.unlink()


def test_a_hostile_uid_is_flattened_not_dropped() -> None:
    name = new_name("../../etc/x")
    assert "_.._etc_x_" in name and "/" not in name


@settings(max_examples=200, deadline=None)
@given(HOSTILE, HOSTILE, EPOCHS, st.floats(min_value=0.001, max_value=10**6, allow_nan=False))
def test_new_names_sort_by_receive_time(u1: str, u2: str, t: float, dt: float) -> None:
    assume(int(t * 1e6) + 1 < int((t + dt) * 1e6))
    assert new_name(u1, t) < new_name(u2, t + dt)


# ---------------------------------------------------------------- conditions

PLAIN = st.text(alphabet=st.characters(codec="ascii", exclude_characters="*?[]\\"),
                max_size=12)
VALUE = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\\"), max_size=12)


def cond(*patterns: str, ignore_case: bool = False, regex: str | None = None) -> Condition:
    return Condition(key="Modality", patterns=tuple(patterns), ignore_case=ignore_case,
                     regex=re.compile(regex) if regex is not None else None)


@given(PLAIN, VALUE)
def test_exact_pattern_is_equality(pattern: str, value: str) -> None:
    assert cond(pattern).holds(value) == (value == pattern)


@given(VALUE)
def test_star_holds_for_every_value_and_nothing_holds_for_missing(value: str) -> None:
    assert cond("*").holds(value)
    assert not cond("*").holds(None)
    assert not cond(value or "x").holds(None)


@given(st.lists(st.one_of(PLAIN, st.just("*CT*"), st.just("M?")), min_size=1, max_size=4),
       VALUE)
def test_list_is_any_of(patterns: list[str], value: str) -> None:
    assert cond(*patterns).holds(value) == any(cond(p).holds(value) for p in patterns)


@given(PLAIN.filter(bool), VALUE)
def test_glob_agrees_with_fnmatchcase(stem: str, value: str) -> None:
    pattern = stem + "*"
    assert cond(pattern).holds(value) == fnmatch.fnmatchcase(value, pattern)


@given(st.lists(st.one_of(PLAIN, st.just("*CT*")), min_size=1, max_size=3), VALUE)
def test_ignore_case_is_case_insensitive(patterns: list[str], value: str) -> None:
    c = cond(*patterns, ignore_case=True)
    assert c.holds(value) == c.holds(value.upper()) == c.holds(value.lower())
    assert c.holds(value) >= cond(*patterns).holds(value)  # never holds less than exact


@given(st.lists(VALUE, min_size=2, max_size=4), PLAIN)
def test_multi_valued_holds_when_one_value_does(values: list[str], pattern: str) -> None:
    joined = "\\".join(values)
    one = any(cond(pattern).holds(v) for v in values)
    assert cond(pattern).holds(joined) == (one or joined == pattern)


@given(st.from_regex(r"[A-Z]{1,3}", fullmatch=True), VALUE)
def test_regex_is_search(regex: str, value: str) -> None:
    assert cond(regex=regex).holds(value) == (re.search(regex, value) is not None)


# ---------------------------------------------------------------- the rules engine

DESTS = ("pacs", "archive", "ai")
KEYS = ("Modality", "PatientID", "CallingAE")
KEY_VALUES = st.sampled_from(["CT", "MR", "ct", "OT", "P1", "P2", "CT1", "", "*"])


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    key = draw(st.sampled_from(KEYS))
    pats = tuple(draw(st.lists(st.sampled_from(["CT", "MR", "C*", "P?", "*", "OT", "CT1"]),
                               min_size=1, max_size=2)))
    return Condition(key=key, patterns=pats, ignore_case=draw(st.booleans()))


@st.composite
def rule_sets(draw: st.DrawFn) -> list[Rule]:
    out = []
    for i in range(draw(st.integers(min_value=0, max_value=4))):
        discard = draw(st.booleans()) and draw(st.booleans())  # ~1 in 4
        out.append(Rule(
            name=f"r{i}",
            match=tuple(draw(st.lists(conditions(), max_size=2))),
            exclude=tuple(draw(st.lists(conditions(), max_size=1))),
            to=() if discard else tuple(draw(st.lists(st.sampled_from(DESTS), min_size=1,
                                                      max_size=2, unique=True))),
            action="discard" if discard else "route",
            level=draw(st.sampled_from(["instance", "instance", "series"])),
            priority=draw(st.sampled_from(["normal", "urgent"])),
        ))
    return out


@st.composite
def header_values(draw: st.DrawFn) -> dict[str, str | None]:
    vals: dict[str, str | None] = {k: draw(st.one_of(st.none(), KEY_VALUES)) for k in KEYS}
    vals["SeriesInstanceUID"] = draw(st.one_of(st.just("1.2.3"), HOSTILE))
    vals["StudyInstanceUID"] = "1.2"
    return vals


def expected_match(rule: Rule, values: dict[str, str | None]) -> bool:
    return (all(c.holds(values.get(c.key)) for c in rule.match)
            and not any(c.holds(values.get(c.key)) for c in rule.exclude))


@settings(max_examples=400, deadline=None)
@given(rule_sets(), header_values())
def test_rules_engine_routes_to_the_union_of_matching_rules(rule_list: list[Rule],
                                                            values: dict[str, str | None]) -> None:
    d = evaluate(rule_list, values)
    matched = [r for r in rule_list if expected_match(r, values)]
    assert set(d.rules) == {r.name for r in matched}, "match = all hold, exclude = none holds"
    if any(r.action == "discard" for r in matched):
        assert d.discard and d.discarded_by in {r.name for r in matched}
        assert not d.all_destinations
        return
    want = {dest for r in matched for dest in r.to}
    assert set(d.all_destinations) == want, "every matching rule applies"
    assert len(d.all_destinations) == len(set(d.all_destinations)), "once per destination"
    if not matched:
        assert d.discard and d.discarded_by is None, "unmatched goes to discard/, never lost"
    for h in d.batches:
        assert h.key and "/" not in h.key and h.key not in (".", ".."), h.key
        assert not set(h.destinations) & set(d.destinations), "held and sent at once"
    # What the router records before linking is what it finishes after a crash.
    back = Decision.from_routing(d.to_routing("2026-11-28T00:00:00Z"))
    assert dict(back.destinations) == dict(d.destinations)
    assert [(h.key, dict(h.destinations)) for h in back.batches] == \
        [(h.key, dict(h.destinations)) for h in d.batches]
    assert back.discard == d.discard


@settings(max_examples=300, deadline=None)
@given(HOSTILE, st.sampled_from(["series", "study"]),
       # rule names come from TOML: any Unicode scalar, never a lone surrogate
       st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1))
def test_pending_key_is_one_path_component(uid: str, level: str, rule_name: str) -> None:
    key = pending_key(rule_name, level, uid)
    assert key and "/" not in key and "\0" not in key and key not in (".", "..")
    assert (Path("/spool/pending") / key).parent == Path("/spool/pending")
    assert key == pending_key(rule_name, level, uid)
