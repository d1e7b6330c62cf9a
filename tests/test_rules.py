"""The matcher and the decision, against independent oracles; header reading; ``rules test``.

The property tests build rules the way users do (TOML text through config.parse)
and compare the decision with an oracle that shares no code with the matcher: a
dynamic-programming wildcard match instead of regexes, substring tests instead of
``re.search``, plain set logic for fan-out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from hermes_py import dicomfile, rules
from hermes_py.admin import rules_verbs
from hermes_py.config import ConfigError, Settings, load, parse
from hermes_py.rules import Condition, Rule
from hermes_py.spool import Spool
from tests.support.dicomgen import make_instance, save
from tests.support.spool import put

HERMES = Path(sys.executable).parent / "hermes-py"
TOML_PATH = Path("/nonexistent/rules.toml")

DESTS = """\
[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[destinations.a]
ae_title = "A"
host = "127.0.0.1"
port = 105

[destinations.b]
ae_title = "B"
host = "127.0.0.1"
port = 106

[destinations.c]
ae_title = "C"
host = "127.0.0.1"
port = 107

"""

# ---------------------------------------------------------------- oracles


def wildcard(pattern: str, text: str) -> bool:
    """Classic DP: '*' any run, '?' one character, everything else literal."""
    n, m = len(pattern), len(text)
    dp = [[False] * (m + 1) for _ in range(n + 1)]
    dp[0][0] = True
    for i in range(1, n + 1):
        p = pattern[i - 1]
        dp[i][0] = dp[i - 1][0] and p == "*"
        for j in range(1, m + 1):
            if p == "*":
                dp[i][j] = dp[i - 1][j] or dp[i][j - 1]
            elif p == "?" or p == text[j - 1]:
                dp[i][j] = dp[i - 1][j - 1]
    return dp[n][m]


def _candidates(value: str) -> list[str]:
    return [value, *value.split("\\")] if "\\" in value else [value]


def oracle_patterns(patterns: list[str], ignore_case: bool, value: str | None) -> bool:
    if value is None:
        return False
    for v in _candidates(value):
        for p in patterns:
            vv, pp = (v.casefold(), p.casefold()) if ignore_case else (v, p)
            if wildcard(pp, vv):
                return True
    return False


def oracle_regex(lit: str, start: bool, end: bool, ignore_case: bool, value: str | None) -> bool:
    if value is None:
        return False
    for v in _candidates(value):
        vv, ll = (v.lower(), lit.lower()) if ignore_case else (v, lit)
        if start and end:
            ok = vv == ll
        elif start:
            ok = vv.startswith(ll)
        elif end:
            ok = vv.endswith(ll)
        else:
            ok = ll in vv
        if ok:
            return True
    return False


# ---------------------------------------------------------------- strategies

# Built from tokens, not characters, so the tricky cases come up often: brackets
# (literal here, a class for fnmatch), a backslash inside a pattern (only the
# whole multi-valued string can match it), and ß, whose casefold is "ss".
PATTERN_TOKENS = ["*", "?", "a", "A", "b", "s", "S", "ß", "[a]", "[", "]", ".", " ", "\\"]
VALUE_TOKENS = ["a", "A", "b", "ss", "S", "ß", "[a]", "[", ".", " ", "*", "?"]


def _joined(tokens: list[str], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(tokens), max_size=max_size).map("".join)


patterns_st = st.lists(_joined(PATTERN_TOKENS, 5), min_size=1, max_size=3)
single_value_st = _joined(VALUE_TOKENS, 5)
value_st = st.one_of(
    st.none(),
    single_value_st,
    st.lists(single_value_st, min_size=2, max_size=3).map("\\".join),
)


@st.composite
def condition_spec(draw: st.DrawFn) -> dict:
    """A condition as data: what to write in TOML and what the oracle needs."""
    if draw(st.booleans()):
        lit = draw(st.text("abAB.-", min_size=1, max_size=4))
        start, end, ic = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        src = ("^" if start else "") + re.escape(lit) + ("$" if end else "")
        flag = ", ignore_case = true" if ic else ""
        toml = f"{{ regex = {json.dumps(src)}{flag} }}"
        return {"toml": toml, "oracle": lambda v: oracle_regex(lit, start, end, ic, v)}
    pats = draw(patterns_st)
    ic = draw(st.booleans())
    form = draw(st.sampled_from(["plain", "table"]))
    if form == "plain" and not ic:
        toml = json.dumps(pats[0]) if len(pats) == 1 else json.dumps(pats)
    else:
        kind = "any" if len(pats) > 1 else draw(st.sampled_from(["glob", "equals", "any"]))
        inner = json.dumps(pats) if kind == "any" else json.dumps(pats[0])
        flag = ", ignore_case = true" if ic else ""
        toml = f"{{ {kind} = {inner}{flag} }}"
    return {"toml": toml, "oracle": lambda v: oracle_patterns(pats, ic, v)}


KEYS = ["Modality", "StudyDescription", "SeriesDescription", "ImageType"]


# ---------------------------------------------------------------- property tests


@settings(max_examples=1000, deadline=None)
@given(pats=patterns_st, ignore_case=st.booleans(), value=value_st)
@example(pats=["[a]*"], ignore_case=False, value="a")  # '[' is literal, not a class
@example(pats=["[a]*"], ignore_case=False, value="[a]b")
@example(pats=["a*b"], ignore_case=False, value="a\\b")  # only the joined value matches
@example(pats=["s?"], ignore_case=True, value="ß")  # casefold, not lower()
@example(pats=["SS"], ignore_case=True, value="x\\ß")
@example(pats=["a", "b?"], ignore_case=False, value="c\\bb")
def test_globs_and_lists_match_the_oracle(pats: list[str], ignore_case: bool,
                                          value: str | None) -> None:
    c = Condition("StudyDescription", tuple(pats), ignore_case=ignore_case)
    assert c.holds(value) == oracle_patterns(pats, ignore_case, value)


@settings(max_examples=300, deadline=None)
@given(lit=st.text("abAB.-", min_size=1, max_size=4), start=st.booleans(), end=st.booleans(),
       ignore_case=st.booleans(),
       value=st.one_of(st.none(), st.text("abAB.-x\\", max_size=10)))
def test_regexes_match_the_oracle(lit: str, start: bool, end: bool, ignore_case: bool,
                                  value: str | None) -> None:
    src = ("^" if start else "") + re.escape(lit) + ("$" if end else "")
    c = Condition("Modality", (src,), regex=re.compile(src, re.I if ignore_case else 0),
                  ignore_case=ignore_case)
    assert c.holds(value) == oracle_regex(lit, start, end, ignore_case, value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rules_from_toml_match_with_exclusion(data: st.DataObject) -> None:
    """match: all must hold; exclude: none may hold; written as users write rules.toml."""
    match_keys = data.draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
    exclude_keys = data.draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=2))
    match = {k: data.draw(condition_spec()) for k in match_keys}
    exclude = {k: data.draw(condition_spec()) for k in exclude_keys}
    values = {k: data.draw(value_st) for k in KEYS}
    text = DESTS + '[[rules]]\nname = "r"\nto = ["pacs"]\n'
    for section, conds in (("match", match), ("exclude", exclude)):
        if conds:
            text += f"[rules.{section}]\n" + "".join(
                f"{k} = {c['toml']}\n" for k, c in conds.items())
    cfg = parse(text, TOML_PATH)
    expected = all(c["oracle"](values[k]) for k, c in match.items()) and not any(
        c["oracle"](values[k]) for k, c in exclude.items())
    decision = rules.evaluate(cfg.rules, values)
    assert (decision.rules == ("r",)) == expected
    assert decision.discard == (not expected)
    verdict = decision.verdicts[0]
    # the explanation names exactly the conditions that failed
    failed = {(ch.section, ch.condition.key) for ch in verdict.failed}
    assert failed == {("match", k) for k, c in match.items() if not c["oracle"](values[k])} | {
        ("exclude", k) for k, c in exclude.items() if c["oracle"](values[k])}


rule_spec = st.fixed_dictionaries({
    "matches": st.booleans(),
    "action": st.sampled_from(["route", "route", "route", "discard"]),
    "to": st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True),
    "level": st.sampled_from(["instance", "instance", "series", "study"]),
    "priority": st.sampled_from(["normal", "urgent"]),
})


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(rule_spec, max_size=6))
def test_fan_out_each_destination_once(specs: list[dict]) -> None:
    rule_list = []
    for i, s in enumerate(specs):
        discard = s["action"] == "discard"
        rule_list.append(Rule(
            name=f"r{i}", match=(Condition("Modality", (f"M{i}",)),),
            to=() if discard else tuple(s["to"]), action=s["action"],
            level="instance" if discard else s["level"], priority=s["priority"]))
    values = {"Modality": "\\".join(f"M{i}" for i, s in enumerate(specs) if s["matches"]) or "X",
              "SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2"}
    d = rules.evaluate(rule_list, values)

    matched = [(r, s) for r, s in zip(rule_list, specs, strict=True) if s["matches"]]
    assert set(d.rules) == {r.name for r, _ in matched}
    if any(r.action == "discard" for r, _ in matched):
        assert d.discard and d.discarded_by is not None and not d.all_destinations
        return
    named = {t for r, _ in matched for t in r.to}
    now = {t for r, _ in matched if r.level == "instance" for t in r.to}
    held = [t for h in d.batches for t in h.destinations]
    assert set(d.destinations) == now
    assert len(held) == len(set(held)) and not set(held) & now  # once per destination
    assert set(held) | now == named == set(d.all_destinations)
    assert d.discard == (not named)
    for t in named:
        urgent = any(r.priority == "urgent" and t in r.to for r, _ in matched)
        prio = d.destinations.get(t) or next(h.destinations[t] for h in d.batches
                                             if t in h.destinations)
        assert prio == ("urgent" if urgent else "normal")
    # what the router records is what a restart acts on
    back = rules.Decision.from_routing(json.loads(json.dumps(d.to_routing("now"))))
    assert dict(back.destinations) == dict(d.destinations)
    assert [(h.key, dict(h.destinations), h.quiet_for) for h in back.batches] == [
        (h.key, dict(h.destinations), h.quiet_for) for h in d.batches]


# ---------------------------------------------------------------- examples


def _cfg(body: str) -> Settings:
    return parse(DESTS + body, TOML_PATH)


def test_instance_and_series_rules_split_destinations() -> None:
    cfg = _cfg("""
[[rules]]
name = "now"
match = { Modality = "CT" }
to = ["a"]

[[rules]]
name = "whole series"
match = { Modality = "CT" }
to = ["a", "b"]
level = "series"
quiet_for = "2m"

[[rules]]
name = "whole study"
to = ["b", "c"]
level = "study"
priority = "urgent"
quiet_for = "10s"
""")
    d = rules.evaluate(cfg.rules, {"Modality": "CT", "SeriesInstanceUID": "1.2.3",
                                   "StudyInstanceUID": "9.8"})
    assert dict(d.destinations) == {"a": "normal"}
    assert [(h.rule, h.level, h.uid, dict(h.destinations), h.quiet_for) for h in d.batches] == [
        ("whole series", "series", "1.2.3", {"b": "urgent"}, 120.0),
        ("whole study", "study", "9.8", {"c": "urgent"}, 10.0)]
    assert d.batches[0].key.startswith("series_1.2.3_whole_series-")
    assert d.all_destinations == ["a", "b", "c"]


def test_discard_rule_overrides_routing_and_unmatched_is_discarded() -> None:
    cfg = _cfg("""
[[rules]]
name = "all"
to = ["a"]

[[rules]]
name = "test patients"
match = { PatientID = "TEST*" }
action = "discard"
""")
    d = rules.evaluate(cfg.rules, {"PatientID": "TEST01"})
    assert d.discard and d.discarded_by == "test patients"
    assert d.reason == "discard rule 'test patients' matched"
    assert d.rules == ("all", "test patients")
    routing = d.to_routing("t")
    assert routing["destinations"] == [] and routing["discarded_by"] == "test patients"
    d2 = rules.evaluate(_cfg('[[rules]]\nname = "x"\nmatch = { Modality = "MR" }\nto = ["a"]\n'
                             ).rules, {"Modality": "CT"})
    assert d2.discard and d2.discarded_by is None and d2.reason == "no rule matched"


def test_receive_facts_are_matchable() -> None:
    cfg = _cfg("""
[[rules]]
name = "from CT1 over the network"
match = { CallingAE = "CT?", Source = "network", PeerAddress = "10.0.*" }
to = ["a"]
""")
    facts = rules.receive_facts({"calling_ae": "CT1", "source": "network",
                                 "peer_address": "10.0.0.5", "called_ae": "HERMES"})
    assert facts["CalledAE"] == "HERMES"
    assert not rules.evaluate(cfg.rules, facts).discard
    dropped = rules.receive_facts({"source": "drop"})
    d = rules.evaluate(cfg.rules, dropped)
    assert d.discard
    assert "match.CallingAE = \"CT?\" does not hold: not known" in d.verdicts[0].why_not()


def test_pending_key_is_one_safe_path_component() -> None:
    k = rules.pending_key("a b", "series", "../../etc/passwd")
    assert "/" not in k and not k.startswith(".")
    assert rules.pending_key("a b", "series", "1.2") != rules.pending_key("a_b", "series", "1.2")
    assert rules.pending_key("r", "study", None).startswith("study_unknown_r-")
    # a tampered recorded key cannot escape pending/
    h = rules.Batch.from_json({"key": "../x", "destinations": ["a"], "quiet_for": 1})
    assert "/" not in h.key


def test_read_header_values(tmp_path: Path) -> None:
    ds = make_instance(16, 16, modality="MR", series_description="AX T1")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    path = save(ds, tmp_path / "a.dcm")
    kws = rules.keywords_for(_cfg(
        '[[rules]]\nname = "x"\nto = ["a"]\nmatch = { ImageType = "AXIAL", PatientName = "*", '
        'AccessionNumber = "*", Modality = "MR" }\n').rules)
    assert kws[:4] == rules.HEADER_KEYWORDS
    v = dicomfile.read_header(path, kws)
    assert v["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert v["PatientName"] == "TEST^HERMES"
    assert v["AccessionNumber"] is None  # absent
    assert v["Modality"] == "MR"
    assert v["SOPInstanceUID"] == ds.SOPInstanceUID
    assert v["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert set(v) == set(kws)  # only the tags the rules use (+ the four UIDs)


def test_read_header_rejects_what_cannot_be_routed(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 40)
    with pytest.raises(dicomfile.UnreadableError, match="not a DICOM Part-10 file"):
        dicomfile.read_header(junk, rules.HEADER_KEYWORDS)
    whole = save(make_instance(64, 64), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) - 100])  # cut inside the pixel data
    with pytest.raises(dicomfile.UnreadableError, match="truncated: Pixel Data needs 8192 bytes"):
        dicomfile.read_header(cut, rules.HEADER_KEYWORDS)
    with pytest.raises(FileNotFoundError):
        dicomfile.read_header(tmp_path / "gone.dcm", rules.HEADER_KEYWORDS)


def test_check_summary(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(DESTS + """
[[rules]]
name = "series to b"
match = { Modality = { regex = "^C", ignore_case = true } }
to = ["b"]
level = "series"
quiet_for = "90s"
priority = "urgent"

[[rules]]
name = "junk"
match = { PatientID = "TEST*" }
action = "discard"
""")
    checked = rules_verbs.check(load(path))
    assert checked.exit_code == 0
    out = checked.text()
    assert "destinations (4):" in out and "rules (2):" in out
    assert ('1. series to b: match Modality = { regex = "^C", ignore_case = true } -> b '
            "(whole series, after 90s quiet) [urgent]") in out
    assert '2. junk: match PatientID = "TEST*" -> discard' in out
    assert "note: no rule sends to destination 'pacs'" in out


def test_rules_test_cli_explains(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(DESTS + """
[[rules]]
name = "CT and MR to pacs"
match = { Modality = ["CT", "MR"], StudyDescription = "*HEAD*" }
exclude = { SeriesDescription = "*SCOUT*" }
to = ["pacs"]

[[rules]]
name = "from CT1"
match = { CallingAE = "CT1" }
to = ["a"]

[[rules]]
name = "whole series to b"
match = { Modality = "CT" }
to = ["b"]
level = "series"
quiet_for = "30s"
""")
    series = generate_uid()
    head = save(make_instance(16, 16, series_description="AXIAL", series_uid=series),
                tmp_path / "head.dcm")
    scout = save(make_instance(16, 16, modality="MR", series_description="SCOUT 1"),
                 tmp_path / "scout.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 300)
    # a file in a spool, with its sidecar: the receive facts come from there
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    spooled = put(spool, spool.incoming, make_instance(16, 16, modality="US"), calling_ae="CT1")
    name = spooled.stem

    r = subprocess.run([str(HERMES), "rules", "test", "-c", str(path), str(head), str(scout),
                        str(junk), str(spooled)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # one file could not be read
    out = r.stdout
    blocks = {b.split(":", 1)[0]: b for b in out.split("\n" + str(tmp_path))}
    b_head = next(b for k, b in blocks.items() if k.endswith("head.dcm"))
    assert "matched      'CT and MR to pacs' -> pacs" in b_head
    assert ("not matched  'from CT1': match.CallingAE = \"CT1\" does not hold: not known"
            in b_head)
    assert f"=> pacs; b (held with series {series} until 30s quiet)" in b_head
    assert "Source=drop" in b_head
    b_scout = next(b for k, b in blocks.items() if k.endswith("scout.dcm"))
    assert ("not matched  'CT and MR to pacs': exclude.SeriesDescription = \"*SCOUT*\" holds: "
            'found "SCOUT 1"') in b_scout
    assert 'match.Modality = "CT" does not hold: found "MR"' in b_scout
    assert "=> discard: no rule matched" in b_scout
    b_junk = next(b for k, b in blocks.items() if k.endswith("junk.dcm"))
    assert "=> error: not a DICOM Part-10 file" in b_junk
    b_sp = next(b for k, b in blocks.items() if k.endswith(f"{name}.dcm"))
    assert "CallingAE=CT1" in b_sp
    assert "matched      'from CT1' -> a" in b_sp
    assert "=> a" in b_sp


@pytest.mark.timeout(30)
def test_a_catastrophic_regex_cannot_stall_routing(tmp_path: Path) -> None:
    """``^(a+)+$`` against 40 a's and a "!": 2**40 steps for a backtracking engine (Python's
    re froze the router for 37 s at 29 a's); RE2 answers at once."""
    path = tmp_path / "rules.toml"
    path.write_text(DESTS + '[[rules]]\nname = "evil"\nto = ["a"]\n'
                    'match = { PatientName = { regex = "^(a+)+$" } }\n')
    cfg = load(path)
    d = rules.evaluate(cfg.rules, {"PatientName": "a" * 40 + "!"})
    assert d.discard and d.reason == "no rule matched"
    assert not rules.evaluate(cfg.rules, {"PatientName": "a" * 40}).discard


def test_a_regex_re2_cannot_run_linearly_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(DESTS + '[[rules]]\nname = "back"\nto = ["a"]\n'
                    'match = { PatientName = { regex = "(a)\\\\1" } }\n')
    with pytest.raises(ConfigError, match=r"invalid escape sequence.*RE2 syntax.*no "
                                          r"backreferences"):
        load(path)
