"""Property-based invariants: name sanitising of hostile wire data, and rule conditions.

Names (invariant 5 of DESIGN.md): whatever a modality puts in a UID or an AE title, the
sanitised result is exactly one path component inside the spool folder, never empty,
never '.' or '..', deterministic, and ``new_name`` stays a well-formed spool name that
sorts by receive time. Checked against a real directory, not just by string inspection.

Conditions (``hermes_py.config.Condition``): the semantics a rules.toml author relies on -
an exact pattern is equality, '*' holds for any value, a list is "any of", ignore_case is
case-insensitivity, a multi-valued element holds when one of its values does, and a
missing element never holds.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hermes_py.config import Condition
from hermes_py.spool import is_name, new_name, received_at, sanitize

pytestmark = pytest.mark.e2e

HOSTILE = st.one_of(
    st.text(),
    st.lists(st.sampled_from([*"./\\\0 \t\n~$*?%:", "..", "../", "\u202e", "é", "\udcff",
                              "1.2", "A"])).map("".join),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", ".", "..", "../../etc/passwd", "/", "//", "\0", ".hidden", " ",
                     "1.2.840.10008\0", "..\\..\\x", "CON", "a" * 300, "...", ". .", "\n"]),
)
HOSTILE_OR_BYTES = st.one_of(HOSTILE, st.binary(max_size=100), st.none())

SPOOL = Path(tempfile.mkdtemp(prefix="hermes-e2e-props-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_spool() -> Iterator[None]:
    yield
    shutil.rmtree(SPOOL, ignore_errors=True)


@settings(max_examples=400, deadline=None)
@given(HOSTILE_OR_BYTES)
@example("../../etc/x")
@example(b"\x00\xff..")
@example(".")
def test_sanitized_name_is_one_component_inside_the_folder(value: str | bytes | None) -> None:
    s = sanitize(value)
    assert s, "empty name"
    assert s not in (".", ".."), s
    assert not s.startswith("."), f"hidden or relative: {s!r}"
    assert "/" not in s and "\0" not in s and os.sep not in s, s
    assert s == sanitize(value), "not deterministic"
    assert len(s.encode()) <= 255
    assert re.fullmatch(r"[0-9A-Za-z._]+", s), s
    path = SPOOL / s
    assert path.parent == SPOOL and path.resolve().parent == SPOOL.resolve()
    # Really creatable as one file in that folder (and removable again).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    assert s in os.listdir(SPOOL)
    os.unlink(path)


@settings(max_examples=200, deadline=None)
@given(HOSTILE_OR_BYTES, st.integers(min_value=1, max_value=100))
def test_sanitize_respects_limit(value: str | bytes | None, limit: int) -> None:
    s = sanitize(value, limit=limit)
    assert s and len(s) <= max(limit, len("unknown"))


@settings(max_examples=300, deadline=None)
@given(HOSTILE_OR_BYTES,
       st.floats(min_value=0, max_value=4102444800, allow_nan=False))  # 1970 .. 2100
def test_new_name_is_a_valid_unique_spool_name(uid: str | bytes | None, when: float) -> None:
    a = new_name(uid, when)
    b = new_name(uid, when)
    assert is_name(a) and is_name(b), a
    assert a != b, "two receptions of one UID must never share a name"
    assert "/" not in a and not a.startswith(".")
    t = received_at(a)
    assert t is not None and abs(t - when) <= 2e-6, (t, when)
    assert a.split("_")[0] == b.split("_")[0]
    # Creatable in a real folder, as <name>.dcm and <name>.json.
    for suffix in (".dcm", ".json"):
        p = SPOOL / (a + suffix)
        p.write_bytes(b"")
        assert p.parent == SPOOL
        p.unlink()


@settings(max_examples=200, deadline=None)
@given(HOSTILE, HOSTILE,
       st.floats(min_value=0, max_value=4102444800, allow_nan=False),
       st.floats(min_value=0.001, max_value=10**6, allow_nan=False))
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
