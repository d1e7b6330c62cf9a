"""rules.toml validation: every class of mistake is one line naming file, line and key.

Each bad file marks the line the error must point at with ``# <-``; the test
checks the exact ``file:line: key:`` prefix, so a message that names the wrong
line (or none) fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hermes_py.config import ConfigError, load, parse, parse_duration
from hermes_py.rules import HEADER_KEYWORDS, keywords_for

HERE = Path(__file__).resolve().parent
HERMES = Path(sys.executable).parent / "hermes-py"

HEAD = """\
[receiver]
ae_title = "HERMES"
port = 11112

[spool]
path = "spool"
min_free_mb = 500

[retry]
initial_delay = "30s"
max_delay = "1h"
give_up_after = "3d"

[destinations.pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

"""

ISSUE_EXAMPLE = HEAD + """\
[[rules]]
name = "CT and MR to pacs"
match = { Modality = ["CT", "MR"], StudyDescription = "*HEAD*" }
exclude = { SeriesDescription = "*SCOUT*" }
to = ["pacs"]
"""


def _marked(text: str) -> tuple[str, int]:
    """The text without its marker, and the 1-based line the marker was on."""
    lines = text.splitlines()
    marked = [i + 1 for i, ln in enumerate(lines) if "# <-" in ln]
    assert len(marked) == 1, "each case marks exactly one line"
    return text.replace("# <-", ""), marked[0]


# (id, file text with "# <-" on the expected line, expected key, expected message part)
BACKUP = """\
[destinations.backup]
ae_title = "BACKUP"
host = "127.0.0.1"
port = 4243

"""


def _failover(keys: str) -> str:
    """HEAD plus a backup destination, ``keys`` added to [destinations.pacs]."""
    return HEAD.replace('port = 4242\n', 'port = 4242\n' + keys) + BACKUP


BAD = [
    ("failover-unknown", _failover('failover_to = "bakup"  # <-\nfailover_mode = "divert"\n'),
     "destinations.pacs.failover_to", "unknown destination 'bakup' (defined: backup)"),
    ("failover-itself", _failover('failover_to = "pacs"  # <-\nfailover_mode = "copy"\n'),
     "destinations.pacs.failover_to", "cannot fail over to itself"),
    ("failover-no-mode", _failover('failover_to = "backup"  # <-\n'),
     "destinations.pacs.failover_mode", "missing: with failover_to, choose 'divert', 'copy'"),
    ("failover-bad-mode", _failover('failover_to = "backup"\nfailover_mode = "mirror"  # <-\n'),
     "destinations.pacs.failover_mode", "expected one of 'divert', 'copy', got 'mirror'"),
    ("failover-two-levels", _failover('failover_to = "backup"\nfailover_mode = "divert"\n')
     + '[destinations.third]\nae_title = "THIRD"\nhost = "127.0.0.1"\nport = 4244\n'
       'failover_to = "pacs"  # <-\nfailover_mode = "copy"\n',
     "destinations.third.failover_to", "'pacs' fails over to 'backup' itself: failover is one "
                                       "level deep"),
    ("unknown-top-level-table", HEAD + "[recevier]  # <-\nport = 1\n",
     "recevier", "did you mean 'receiver'?"),
    ("unknown-top-level-key", "verbose = true  # <-\n" + HEAD,
     "verbose", "unknown key"),
    ("unknown-rule-key", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        prority = "urgent"  # <-
        """), "rules[0].prority", "did you mean 'priority'?"),
    ("unknown-destination-key", HEAD.replace(
        'host = "127.0.0.1"\n', 'host = "127.0.0.1"\naetitle = "X"  # <-\n'),
     "destinations.pacs.aetitle", "did you mean 'ae_title'?"),
    ("unknown-receiver-key", HEAD.replace("port = 11112\n", "port = 11112\nbnid = \"x\"  # <-\n"),
     "receiver.bnid", "did you mean 'bind'?"),
    ("unknown-destination-in-to", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs", "pcas"]  # <-
        """), "rules[0].to", "unknown destination 'pcas' (defined: pacs)"),
    ("bad-duration-retry", HEAD.replace('max_delay = "1h"', 'max_delay = "1 hour"  # <-'),
     "retry.max_delay", "not a duration: '1 hour'"),
    ("bad-duration-destination", HEAD.replace(
        'port = 4242\n', 'port = 4242\ngive_up_after = "forever"  # <-\n'),
     "destinations.pacs.give_up_after", "not a duration: 'forever'"),
    ("bad-duration-quiet-for", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "whole series"
        to = ["pacs"]
        level = "series"
        quiet_for = "1 minute"  # <-
        """), "rules[0].quiet_for", "not a duration: '1 minute'"),
    ("negative-duration", HEAD.replace('initial_delay = "30s"', 'initial_delay = -5  # <-'),
     "retry.initial_delay", "negative duration"),
    ("bad-regex", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        match = { SeriesDescription = { regex = "(unclosed" } }  # <-
        to = ["pacs"]
        """), "rules[0].match.SeriesDescription", "bad regex '(unclosed'"),
    ("unknown-keyword-inline", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match = { Modalty = "CT" }  # <-
        """), "rules[0].match.Modalty",
     "unknown DICOM keyword 'Modalty' (did you mean 'Modality'?"),
    ("unknown-keyword-lowercase", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        exclude = { seriesdescription = "*SCOUT*" }  # <-
        """), "rules[0].exclude.seriesdescription", "did you mean 'SeriesDescription'?"),
    ("unknown-keyword-subtable", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "first"
        to = ["pacs"]

        [[rules]]
        name = "second"
        to = ["pacs"]
        [rules.match]
        Modality = "CT"
        PatientNme = "X"  # <-
        """), "rules[1].match.PatientNme", "did you mean 'PatientName'?"),
    ("unknown-keyword-dotted", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match.Modality = "CT"
        match.SeriesDescripton = "AX"  # <-
        """), "rules[0].match.SeriesDescripton", "did you mean 'SeriesDescription'?"),
    ("rule-key-inside-subtable", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        [rules.match]
        Modality = "CT"
        to = ["pacs"]  # <-
        """), "rules[0].match.to", "move it above the header"),
    ("sequence-keyword", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match = { ReferencedImageSequence = "x" }  # <-
        """), "rules[0].match.ReferencedImageSequence", "VR SQ (a sequence)"),
    ("pixel-data-keyword", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match = { PixelData = "*" }  # <-
        """), "rules[0].match.PixelData", "pixel data, which the router never reads"),
    ("duplicate-names", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "CT"
        to = ["pacs"]

        [[rules]]
        to = ["pacs"]
        name = "CT"  # <-
        """), "rules[1].name", "duplicate rule name 'CT' (first used by rules[0])"),
    ("condition-table-unknown-key", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        match = { Modality = { regexp = "^C" } }  # <-
        to = ["pacs"]
        """), "rules[0].match.Modality", "did you mean 'regex'?"),
    ("quiet-for-on-instance-rule", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        quiet_for = "60s"  # <-
        """), "rules[0].quiet_for", 'only applies with level = "series" or "study"'),
    ("bad-level", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        level = "patient"  # <-
        """), "rules[0].level", "got 'patient'"),
    ("discard-with-to", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        action = "discard"
        to = ["pacs"]  # <-
        """), "rules[0].to", "a discard rule sends nowhere"),
    ("route-without-to", HEAD + textwrap.dedent("""\
        [[rules]]  # <-
        name = "r"
        match = { Modality = "CT" }
        """), "rules[0].to", "needs at least one destination"),
    ("missing-name", HEAD + textwrap.dedent("""\
        [[rules]]  # <-
        to = ["pacs"]
        """), "rules[0].name", "missing"),
    ("bad-source-value", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match = { Source = "dropped" }  # <-
        """), "rules[0].match.Source", 'Source is "network" or "drop"'),
    ("empty-list", HEAD + textwrap.dedent("""\
        [[rules]]
        name = "r"
        to = ["pacs"]
        match = { Modality = [] }  # <-
        """), "rules[0].match.Modality", "non-empty list"),
    # a table inside a table is found by its own header, not by its parent's
    ("unknown-sub-table", textwrap.dedent("""\
        [spool]
        path = "spool"

        [receiver.tls]  # <-
        port = 2762
        """), "receiver.tls.cert_file", "missing"),
    ("file-in-a-sub-table-of-a-destination", HEAD + textwrap.dedent("""\
        [destinations.pacs.tls]
        ca_file = "no-such-ca.pem"  # <-
        """), "destinations.pacs.tls.ca_file", "cannot read"),
    # pacs-web and pacs_web would both be outgoing/pacs_web/: one queue for two.
    ("names-sharing-a-folder", HEAD + textwrap.dedent("""\
        [destinations.pacs-web]
        ae_title = "A"
        host = "h"
        port = 1

        [destinations.PACS_web]  # <-
        ae_title = "B"
        host = "h"
        port = 2
        """), "destinations.PACS_web", "would share its folders with destination 'pacs-web'"),
]


@pytest.mark.parametrize("text,key,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_every_mistake_names_file_line_and_key(tmp_path: Path, text: str, key: str,
                                               message: str) -> None:
    body, line = _marked(text)
    path = tmp_path / "rules.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as ei:
        load(path)
    err = ei.value
    assert (err.key, err.line) == (key, line), str(err)
    text_ = str(err)
    assert text_.startswith(f"{path.resolve()}:{line}: {key}: "), text_
    assert message in text_
    assert "\n" not in text_


def test_rule_errors_name_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(HEAD + '[[rules]]\nname = "CT to pacs"\nto = ["nowhere"]\n')
    with pytest.raises(ConfigError, match=r"\(rule 'CT to pacs'\)$"):
        load(path)


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(HEAD + '[[rules]]\nname = "unterminated\nto = ["pacs"]\n')
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert ei.value.line == HEAD.count("\n") + 2
    assert "not valid TOML" in str(ei.value)


def test_issue_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(ISSUE_EXAMPLE)
    cfg = load(path)
    assert cfg.spool.path == tmp_path / "spool"
    assert cfg.retry.initial_delay == 30 and cfg.retry.give_up_after == 3 * 86400
    (rule,) = cfg.rules
    assert rule.to == ("pacs",) and rule.level == "instance" and rule.action == "route"
    assert [c.key for c in rule.match] == ["Modality", "StudyDescription"]
    assert rule.match[0].patterns == ("CT", "MR")
    assert rule.exclude[0].holds("AP SCOUT 1") and not rule.exclude[0].holds("AXIAL")
    assert set(keywords_for(cfg.rules)) - set(HEADER_KEYWORDS) == {
        "Modality", "StudyDescription", "SeriesDescription"}
    assert rule.line == HEAD.count("\n") + 1  # the [[rules]] header


def test_condition_forms(tmp_path: Path) -> None:
    cfg = parse(HEAD + textwrap.dedent("""\
        [[rules]]
        name = "forms"
        to = ["pacs"]
        [rules.match]
        StudyDescription = "[CT] HEAD*"
        Modality = { any = ["ct", "mr"], ignore_case = true }
        SeriesDescription = { regex = "^ax", ignore_case = true }
        InstanceNumber = 1
        CallingAE = { glob = "CT?" }
        Source = "network"
        """), tmp_path / "rules.toml")
    c = {x.key: x for x in cfg.rules[0].match}
    # '[' is literal (not an fnmatch character class)
    assert c["StudyDescription"].holds("[CT] HEAD ROUTINE")
    assert not c["StudyDescription"].holds("C HEAD")
    assert c["Modality"].holds("MR") and not c["Modality"].holds("US")
    assert c["SeriesDescription"].holds("AXIAL 5mm") and not c["SeriesDescription"].holds("x ax")
    assert c["InstanceNumber"].holds("1") and not c["InstanceNumber"].holds("10")
    assert c["CallingAE"].holds("CT1") and not c["CallingAE"].holds("CT12")
    assert c["Source"].kind == "exact" and c["CallingAE"].kind == "glob"
    # absent never holds; empty is ""
    assert not c["CallingAE"].holds(None)
    # multi-valued: any single value, or the whole joined value
    assert c["Modality"].holds("OT\\CT")


def test_durations() -> None:
    assert parse_duration(30) == 30.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration("3d") == 3 * 86400.0
    for bad in ("", "5 minutes", "1w", True, "-1s", -1):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cli_check_ok_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(ISSUE_EXAMPLE)
    r = subprocess.run([str(HERMES), "rules", "check", "-c", str(good)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{good.resolve()}: OK" in r.stdout
    assert "ORTHANC@127.0.0.1:4242" in r.stdout
    assert 'CT and MR to pacs: match Modality = ["CT", "MR"]' in r.stdout

    body, line = _marked(BAD[[c[0] for c in BAD].index("unknown-keyword-inline")][1])
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    r = subprocess.run([str(HERMES), "rules", "check", "-c", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        f"hermes-py: error: {bad.resolve()}:{line}: rules[0].match.Modalty: unknown DICOM keyword")


def test_spool_path_naming_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for where in ("afile", "afile/spool"):
        path = tmp_path / "rules.toml"
        path.write_text(f'[spool]\npath = "{where}"\n')
        with pytest.raises(ConfigError, match=r"rules.toml:2: spool.path: .*afile is a file, "
                                              r"not a folder"):
            load(path)
    cp = subprocess.run([sys.executable, "-m", "hermes_py", "serve", "-c", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
