"""Wire data never becomes a path unsanitised: properties of spool.sanitize / new_name.

The receiver names every instance ``new_name(<Affected SOP Instance UID>)``; a
hostile or broken sender controls that UID completely.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_py.spool import is_name, new_name, received_at, sanitize

# Anything a peer can put on the wire: text, raw bytes, path tricks, NULs, huge values.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="./\\\0 :*?\"<>|~$", max_size=80),
    st.builds(lambda parts: "/".join(parts), st.lists(st.sampled_from(["..", ".", "", "etc"]),
                                                       max_size=40)),
)
hostile = st.one_of(hostile_text, st.binary(max_size=300), st.none())


@given(hostile)
@settings(max_examples=400, deadline=None)
def test_sanitize_is_one_safe_path_component(value: str | bytes | None) -> None:
    s = sanitize(value)
    assert 1 <= len(s) <= 64
    assert all(c.isascii() and (c.isalnum() or c == ".") or c == "_" for c in s)
    assert "/" not in s and "\\" not in s and "\0" not in s
    assert not s.startswith(".")  # never hidden, never "." or ".."
    assert os.path.basename(s) == s


@given(hostile)
@settings(max_examples=400, deadline=None)
def test_new_name_stays_in_its_folder(value: str | bytes | None) -> None:
    base = Path("/spool/incoming")
    name = new_name(value)
    assert is_name(name)
    target = Path(os.path.normpath(base / (name + ".dcm")))
    assert target.parent == base
    assert received_at(name) is not None


@given(hostile_text)
@settings(max_examples=100, deadline=None)
def test_the_same_uid_twice_gets_two_names(uid: str) -> None:
    t = 1_764_307_023.5
    assert new_name(uid, t) != new_name(uid, t)
