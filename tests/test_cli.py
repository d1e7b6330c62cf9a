"""The installed ``hermes-py`` as an admin meets it: arguments, configs, one-line errors.

Every test runs the console script as a subprocess (what systemd and a person
run), so argument parsing, config loading and exit codes are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hermes_py.spool import Spool
from tests.support.cli import one_error_line, run
from tests.support.config import pacs_and_ris
from tests.support.spool import put


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """The pacs/ris router's rules.toml, with its spool."""
    path = pacs_and_ris().write(tmp_path)
    Spool(tmp_path / "spool").ensure(["pacs", "ris"])
    return path


# ---------------------------------------------------------------- arguments


def test_version_and_help() -> None:
    cp = run("--version")
    assert cp.returncode == 0 and "hermes-py" in cp.stdout
    cp = run("--help")
    assert cp.returncode == 0
    for verb in ("serve", "status", "find", "retry", "hold", "release", "flush", "purge",
                 "echo", "send"):
        assert verb in cp.stdout


def test_bad_arguments_exit_2(rules: Path) -> None:
    cp = run("retry", "-c", rules)                      # neither NAME nor --all
    assert cp.returncode == 2 and "retry" in cp.stderr
    cp = run("purge", "trash", "-c", rules)             # not error|discard
    assert cp.returncode == 2 and "invalid choice" in cp.stderr
    cp = run("nosuchverb")
    assert cp.returncode == 2


def test_default_config_is_rules_toml_in_cwd(tmp_path: Path) -> None:
    cp = run("status", cwd=tmp_path)
    line = one_error_line(cp)
    assert cp.returncode == 2
    assert "rules.toml" in line and "not found" in line
    pacs_and_ris().write(tmp_path)
    Spool(tmp_path / "spool").ensure(["pacs", "ris"])
    cp = run("status", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert "pacs" in cp.stdout


@pytest.mark.parametrize("verb", [["status"], ["find", "1.2.3"], ["hold", "pacs"],
                                  ["retry", "--all"], ["serve"], ["send", "x"],
                                  ["echo", "--all"], ["rules", "check"]])
def test_missing_config_is_one_line(tmp_path: Path, verb: list[str]) -> None:
    cp = run(*verb, "-c", tmp_path / "nope.toml", cwd=tmp_path)
    assert cp.returncode == 2
    line = one_error_line(cp)
    assert "nope.toml" in line and "not found" in line


def test_invalid_config_names_file_line_and_key(tmp_path: Path) -> None:
    path = pacs_and_ris().write(tmp_path)
    path.write_text(path.read_text().replace('port = ', 'prot = ', 1))
    cp = run("status", "-c", path)
    assert cp.returncode == 2
    line = one_error_line(cp)
    assert "rules.toml:" in line and "prot" in line and "did you mean 'port'" in line
    path.write_text("this is = not toml = at all\n")
    cp = run("serve", "-c", path)
    assert cp.returncode == 2
    assert "not valid TOML" in one_error_line(cp)


def test_unknown_destination(rules: Path) -> None:
    for verb in (["hold", "nowhere"], ["release", "nowhere"], ["flush", "nowhere"],
                 ["echo", "nowhere"], ["retry", "nowhere"], ["dispatch", "nowhere"]):
        cp = run(*verb, "-c", rules)
        assert cp.returncode == 2, verb
        line = one_error_line(cp)
        assert "unknown destination 'nowhere'" in line and "pacs, ris" in line


def test_admin_commands_never_create_a_spool(tmp_path: Path) -> None:
    path = pacs_and_ris().write(tmp_path)
    spool = tmp_path / "spool"
    for verb in (["status"], ["status", "--json"], ["find", "1.2.3"], ["retry", "--all"],
                 ["hold", "pacs"], ["release", "pacs"], ["flush", "pacs"],
                 ["purge", "error", "pacs", "--all"], ["send", str(path)]):
        cp = run(*verb, "-c", path)
        assert cp.returncode == 2, (verb, cp.stdout, cp.stderr)
        line = one_error_line(cp)
        assert f"spool folder {spool} does not exist" in line
        assert "is serve running with this config?" in line
        assert not spool.exists(), verb


def test_purge_needs_a_selection(rules: Path) -> None:
    cp = run("purge", "error", "pacs", "-c", rules)
    assert cp.returncode == 2
    assert "--all, --study UID or --older-than" in one_error_line(cp)
    cp = run("purge", "discard", "pacs", "--all", "-c", rules)
    assert cp.returncode == 2
    assert "no per-destination folders" in one_error_line(cp)
    cp = run("purge", "error", "pacs", "--all", "--study", "1.2", "-c", rules)
    assert cp.returncode == 2
    cp = run("purge", "error", "pacs", "--older-than", "soon", "-c", rules)
    assert cp.returncode == 2
    assert "not a duration" in one_error_line(cp)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_permission_denied_is_one_line(rules: Path) -> None:
    spool = rules.parent / "spool"
    (spool / "outgoing").chmod(0)
    try:
        cp = run("status", "-c", rules)
        assert cp.returncode == 2
        assert "permission denied" in one_error_line(cp)
    finally:
        (spool / "outgoing").chmod(0o755)


def test_permission_denied_config(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = pacs_and_ris().write(tmp_path)
    path.chmod(0)
    cp = run("status", "-c", path)
    assert cp.returncode == 2
    assert "permission denied" in one_error_line(cp)


def test_find_not_found_exits_1(rules: Path) -> None:
    cp = run("find", "1.2.826.0.1.999", "-c", rules)
    assert cp.returncode == 1
    assert "no instance with UID 1.2.826.0.1.999" in cp.stdout


def test_status_runs_with_spool_of_removed_destination(rules: Path) -> None:
    """A destination removed from rules.toml still shows while instances wait for it."""
    spool = Spool(rules.parent / "spool")
    put(spool, spool.error_dir("oldpacs"), sop="1.2.3.9", destination="oldpacs")
    cp = run("status", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "oldpacs" in cp.stdout and "not configured" in cp.stdout
    # retry into an outbox nobody serves is refused; purge is allowed
    cp = run("retry", "oldpacs", "-c", rules)
    assert cp.returncode == 2
    assert "no longer in" in one_error_line(cp)
    cp = run("purge", "error", "oldpacs", "--all", "--yes", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert not list(spool.error_dir("oldpacs").iterdir())


def test_python_m_entry_point(rules: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "hermes_py", "status", "--json", "-c",
                         str(rules)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert '"destinations"' in cp.stdout


def test_time_formats() -> None:
    from hermes_py.durations import human_age
    assert human_age(None) == "-"
    assert human_age(42) == "42s"
    assert human_age(12 * 60 + 5) == "12m"
    assert human_age(2 * 3600 + 13 * 60) == "2h13m"
    assert human_age(3 * 86400 + 4 * 3600) == "3d04h"
