"""``hermes-py serve`` as systemd or a person runs it: start, restart, reload, stop.

Each test starts the installed console script in its own session (process
group), so a test can kill -9 the supervisor and all its children at once, and
the teardown never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hermes_py.spool import Flag, Spool
from tests.dicomgen import iter_uids, make_instance, save, write_series
from tests.peers import Storescp, echoscu, free_port, storescu, wait_for, wait_port
from tests.test_cli import hermes_exe, one_error_line, put, run, write_rules

CHILDREN = {"receive", "intake", "route", "dispatch:pacs", "dispatch:ris", "clean"}
START = 90.0   # generous: five Python processes importing pydicom on a shared 2-core box


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    rules: Path
    spool: Spool
    log: Path
    port: int

    def state(self) -> dict[str, Any]:
        return self.spool.read_json(self.spool.state / "serve.json")

    def children(self) -> dict[str, dict[str, Any]]:
        state = self.state()
        if state.get("pid") != self.proc.pid:
            return {}   # still the file of an earlier serve
        return {c["name"]: c for c in state.get("children", [])}

    def pid(self, name: str) -> int | None:
        c = self.children().get(name)
        return c.get("pid") if c else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_serve(folder: Path, rules: Path, *extra: str) -> Served:
    log = folder / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([hermes_exe(), "serve", "-c", str(rules), *extra],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    text = rules.read_text()
    port = int(text.split("[receiver]")[1].split("port = ")[1].split()[0])
    return Served(proc, rules, Spool(rules.parent / "spool"), log, port)


def kill_group(s: Served) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(s.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        s.proc.wait(30)


@contextlib.contextmanager
def serving(folder: Path, rules: Path, *extra: str) -> Iterator[Served]:
    s = start_serve(folder, rules, *extra)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.stop(timeout=60)
        kill_group(s)


def wait_dicom(port: int) -> None:
    """Until C-ECHO answers: how a modality finds out (a bare TCP probe would hold an
    unfinished association open in the receiver until its ACSE timeout)."""
    wait_for(lambda: echoscu(port).returncode == 0, START, 0.5, f"C-ECHO on port {port}")


def wait_children(s: Served, names: set[str] = CHILDREN) -> dict[str, dict[str, Any]]:
    def up() -> dict[str, dict[str, Any]] | None:
        assert s.proc.poll() is None, f"serve exited early:\n{s.log_text()}"
        kids = s.children()
        return kids if all(_alive(kids.get(n, {}).get("pid")) for n in names) else None
    return wait_for(up, START, 0.2, f"children {sorted(names)} to run") or {}


# ---------------------------------------------------------------- start / stop


def test_serve_starts_everything_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """No destination is up: serve must start, answer C-ECHO, and stop with exit 0."""
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        kids = wait_children(s)
        assert set(kids) == CHILDREN
        for n in ("pacs", "ris"):
            assert s.spool.outbox(n).is_dir() and s.spool.error_dir(n).is_dir()
        wait_dicom(s.port)
        cp = run("status", "-c", rules)
        assert "serve: running" in cp.stdout
        pids = [c["pid"] for c in kids.values()]
        # every child is in the supervisor's process group (kill -9 of the group works)
        assert {os.getpgid(p) for p in pids} == {s.proc.pid}
        assert s.stop() == 0, s.log_text()
        for p in pids:
            assert not _alive(p)
        assert s.state().get("stopped_at")
        log = s.log_text()
        assert "stopping (receiver first)" in log and "stopped" in log
        assert "Traceback" not in log
    cp = run("status", "-c", rules)
    assert "serve: NOT running" in cp.stdout


def test_second_serve_on_same_spool_refuses(tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        wait_children(s, {"clean"})
        cp = run("serve", "-c", rules, timeout=60)
        assert cp.returncode == 2
        line = one_error_line(cp)
        assert "already running" in line and f"pid {s.proc.pid}" in line
        assert s.proc.poll() is None


def test_kill_9_of_everything_leaves_no_stale_lock(tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    s = start_serve(tmp_path, rules)
    try:
        wait_children(s, {"clean"})
    finally:
        kill_group(s)
    with serving(tmp_path, rules) as again:
        wait_children(again, {"clean"})
        assert again.stop() == 0


def test_sigint_stops_with_exit_0(tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        wait_children(s)
        # Ctrl-C in a terminal: the whole foreground group gets SIGINT at once
        os.killpg(s.proc.pid, signal.SIGINT)
        assert s.proc.wait(90) == 0, s.log_text()


# ---------------------------------------------------------------- restarts and reload


@pytest.mark.parametrize("victim", ["receive", "dispatch:pacs"])
def test_killed_child_is_restarted(tmp_path: Path, victim: str) -> None:
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        old = wait_children(s)[victim]["pid"]
        os.kill(old, signal.SIGKILL)

        def restarted() -> bool:
            c = s.children().get(victim, {})
            return bool(c.get("pid")) and c["pid"] != old and _alive(c["pid"])
        wait_for(restarted, START, 0.2, f"{victim} to be restarted")
        c = s.children()[victim]
        assert c["restarts"] == 1 and "killed by SIGKILL" in c["last_exit"]
        log = s.log_text()
        assert f"{victim} (pid {old}) killed by SIGKILL" in log
        assert f"{victim}: restarting in 1s" in log
        if victim == "receive":
            wait_dicom(s.port)
        assert s.stop() == 0


def test_sighup_reloads_adds_and_removes_destinations(tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        wait_children(s)
        wait_for(lambda: "router active" in s.log_text(), START, 0.2, "the router to start")
        ris_pid = s.pid("dispatch:ris")
        text = rules.read_text()
        # invalid edit: kept running with the old configuration
        rules.write_text(text + "\n[destinations.broken]\nhost = 1\n")
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: keeping the running configuration" in s.log_text(), START,
                 0.2, "the reload error")
        assert s.proc.poll() is None
        # valid edit: a new destination, ris removed
        new = text.replace('to = ["pacs", "ris"]', 'to = ["pacs", "lab"]')
        new = new.replace("[destinations.ris]", "[destinations.lab]")
        rules.write_text(new)
        s.proc.send_signal(signal.SIGHUP)
        wait_children(s, {"dispatch:lab", "receive", "route", "clean", "dispatch:pacs"})
        wait_for(lambda: "dispatch:ris" not in s.children(), START, 0.2, "ris to stop")
        # the router got the SIGHUP too and reloaded its rules itself
        wait_for(lambda: "(SIGHUP): 1 rule(s), 2 destination(s)" in s.log_text(), START, 0.2,
                 "the router's reload")
        assert not _alive(ris_pid)
        assert s.spool.outbox("lab").is_dir()
        log = s.log_text()
        assert "killed by SIGHUP" not in log
        assert "dispatch:ris (pid" in log and "not restarted (no longer configured)" in log
        assert s.stop() == 0


def test_sighup_while_children_start_kills_nothing(tmp_path: Path) -> None:
    """systemctl reload right after start: no child may die of the default SIGHUP action."""
    rules = write_rules(tmp_path)
    with serving(tmp_path, rules) as s:
        wait_for(lambda: len(s.children()) == len(CHILDREN), START, 0.02, "children started")
        for _ in range(3):
            s.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        wait_children(s)
        wait_for(lambda: "router active" in s.log_text(), START, 0.2, "the router to start")
        time.sleep(1.0)  # let a wrongly killed child be reaped and logged
        assert "killed by SIGHUP" not in s.log_text()
        assert all(c["restarts"] == 0 for c in s.children().values()), s.children()
        assert s.stop() == 0


# ---------------------------------------------------------------- metrics


METRICS_CONFIG = """
[spool]
path = "spool"
min_free_mb = 0

[receiver]
bind = "127.0.0.1"
port = {port}

[metrics]
port = {metrics_port}

[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
connection_timeout = "2s"

[destinations.ris]
ae_title = "RIS"
host = "127.0.0.1"
port = {ris_port}

[[rules]]
name = "everything"
to = ["pacs", "ris"]
"""


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            k, v = ln.rsplit(" ", 1)
            out[k] = float(v)
    return out


def test_metrics_endpoint(tmp_path: Path) -> None:
    mport = free_port()
    rules = write_rules(tmp_path, METRICS_CONFIG, metrics_port=mport)
    spool = Spool(tmp_path / "spool")
    spool.ensure(["pacs", "ris"])
    spool.flag("pacs", Flag.HOLD).write_text("{}")   # held: these stay queued whatever happens
    for i in range(3):
        put(spool, spool.outbox("pacs"), f"1.2.3.{i}", next_attempt=time.time() - 1)
    with serving(tmp_path, rules) as s:
        wait_children(s, {"receive", "route"})
        wait_port(mport, START)
        m = _scrape(mport)
        assert m['hermes_queue_depth{destination="pacs"}'] == 3
        assert m['hermes_destination_state{destination="pacs",state="held"}'] == 1
        assert m['hermes_queue_oldest_age_seconds{destination="pacs"}'] >= 0
        assert m["hermes_spool_free_bytes"] > 0
        assert m['hermes_child_up{process="receive"}'] == 1
        # one instance through the receiver: the counters come from the stages' events
        f = save(make_instance(), tmp_path / "in" / "one.dcm")
        wait_dicom(s.port)
        cp = storescu(s.port, [f])
        assert cp.returncode == 0, cp.stderr

        def counted() -> dict[str, float] | None:
            m = _scrape(mport)
            ok = m.get('hermes_received_total{source="network"}', 0) >= 1 and \
                m.get('hermes_routed_total{destination="ris"}', 0) >= 1
            return m if ok else None
        m = wait_for(counted, START, 0.5, "received and routed counters")
        assert m['hermes_received_bytes_total{source="network"}'] >= f.stat().st_size - 200
        assert m['hermes_routed_total{destination="pacs"}'] >= 1
        assert s.stop() == 0


# ---------------------------------------------------------------- the README quickstart


@pytest.mark.e2e
def test_readme_quickstart_relays_to_storescp(tmp_path: Path) -> None:
    """README: serve, echoscu and storescu to HERMES, the instance arrives at storescp."""
    with Storescp(tmp_path / "pacs-received", ae_title="PACS") as pacs:
        rules = tmp_path / "rules.toml"
        port = free_port()
        rules.write_text(textwrap.dedent(f"""
            [receiver]
            ae_title = "HERMES"
            bind = "127.0.0.1"
            port = {port}

            [spool]
            path = "spool"
            min_free_mb = 0

            [destinations.pacs]
            ae_title = "PACS"
            host = "127.0.0.1"
            port = {pacs.port}

            [[rules]]
            name = "everything to pacs"
            to = ["pacs"]
        """))
        with serving(tmp_path, rules) as s:
            wait_dicom(port)     # README: echoscu -aec HERMES localhost PORT
            ds = make_instance()
            f = save(ds, tmp_path / "ct.dcm")
            cp = storescu(port, [f], called="HERMES")
            assert cp.returncode == 0, cp.stderr
            wait_for(lambda: str(ds.SOPInstanceUID) in pacs.uids(), START, 0.5,
                     "the instance at storescp")
            wait_for(lambda: list(s.spool.success_dir("pacs").glob("*.dcm")), START, 0.2,
                     "success/pacs/")
            cp = run("find", str(ds.SOPInstanceUID), "-c", rules)
            assert cp.returncode == 0 and "success/pacs/" in cp.stdout, cp.stdout
            # README: `hermes-py send FOLDER` while serve runs
            series = write_series(tmp_path / "cdrom" / "DICOM", 2)
            cp = run("send", tmp_path / "cdrom", "-c", rules)
            assert cp.returncode == 0 and "sent 2 file(s)" in cp.stdout, cp.stderr
            sent = set(iter_uids(series))
            wait_for(lambda: sent <= pacs.uids(), START, 0.5, "the sent files at storescp")
            wait_for(lambda: len(list(s.spool.success_dir("pacs").glob("*.dcm"))) == 3, START,
                     0.2, "three instances in success/pacs/")
            st = json.loads(run("status", "--json", "-c", rules).stdout)
            assert st["destinations"]["pacs"]["success_24h"] == 3
            assert st["destinations"]["pacs"]["queued"] == 0
            assert s.stop() == 0
