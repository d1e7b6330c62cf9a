"""The installed ``hermes-py`` as an admin meets it: arguments, configs, one-line errors.

Every test runs the console script as a subprocess (what systemd and a person
run), so argument parsing, config loading and exit codes are the real ones.
Helpers here are shared with test_admin.py and test_supervisor.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hermes_py.spool import Spool, new_name, now_iso
from tests.dicomgen import make_instance, save

ROOT = Path(__file__).resolve().parents[1]
HERMES = ROOT / ".venv" / "bin" / "hermes-py"


def hermes_exe() -> str:
    if HERMES.exists():
        return str(HERMES)
    found = shutil.which("hermes-py")
    if not found:
        pytest.skip("hermes-py is not installed (make test installs it)")
    return found


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; stdout and stderr captured as text."""
    return subprocess.run([hermes_exe(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, input=input)


def one_error_line(cp: subprocess.CompletedProcess[str]) -> str:
    """The error output must be exactly one line (no traceback) and say 'error'."""
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{cp.stderr}"
    assert "error" in lines[0]
    return lines[0]


BASE_CONFIG = """
[spool]
path = "spool"
min_free_mb = 0

[receiver]
ae_title = "HERMES"
bind = "127.0.0.1"
port = {port}

[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
connection_timeout = "3s"
acse_timeout = "5s"
initial_delay = "1s"
max_delay = "2s"

[destinations.ris]
ae_title = "RIS"
host = "127.0.0.1"
port = {ris_port}
connection_timeout = "3s"
acse_timeout = "5s"

[[rules]]
name = "everything"
to = ["pacs", "ris"]
"""


def write_rules(folder: Path, text: str = BASE_CONFIG, **ports: Any) -> Path:
    from tests.peers import free_port
    values = {"port": free_port(), "pacs_port": free_port(), "ris_port": free_port(), **ports}
    path = folder / "rules.toml"
    path.write_text(textwrap.dedent(text).format(**values))
    return path


def put(spool: Spool, folder: Path, sop: str, sidecar: dict[str, Any] | None = None,
        received: float | None = None, next_attempt: float | None = None,
        study: str | None = None, series: str | None = None, dicom: bool = False) -> Path:
    """Place one instance (a .dcm and its sidecar) in a spool folder, as a stage would."""
    folder.mkdir(parents=True, exist_ok=True)
    name = new_name(sop, when=received)
    tmp = spool.tmp / f"t-{name}.dcm"
    tmp.parent.mkdir(exist_ok=True)
    if dicom:
        save(make_instance(sop_uid=sop, study_uid=study, series_uid=series), tmp)
    else:
        tmp.write_bytes(b"not really dicom " + sop.encode())
    data: dict[str, Any] = {"name": name, "sop_instance_uid": sop,
                            "received_at": now_iso(received), "source": "network",
                            "calling_ae": "CT1", "called_ae": "HERMES",
                            "peer_address": "127.0.0.1", "size": tmp.stat().st_size}
    if study:
        data["study_instance_uid"] = study
    if series:
        data["series_instance_uid"] = series
    data.update(sidecar or {})
    dcm = spool.publish(tmp, folder, name, data, fsync_data=False)
    if next_attempt is not None:
        os.utime(dcm.with_suffix(".json"), (next_attempt, next_attempt))
    return dcm


def make_rules(folder: Path) -> Path:
    """A rules.toml with two destinations (nothing listening) and an existing spool."""
    path = write_rules(folder)
    Spool(folder / "spool").ensure(["pacs", "ris"])
    return path


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return make_rules(tmp_path)


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
    write_rules(tmp_path)
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
    path = write_rules(tmp_path)
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
    path = write_rules(tmp_path)
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
    path = write_rules(tmp_path)
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
    put(spool, spool.error_dir("oldpacs"), "1.2.3.9", {"destination": "oldpacs"})
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
