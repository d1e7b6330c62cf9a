"""``hermes-py serve`` as systemd or a person runs it: start, restart, reload, stop.

Each test starts the installed console script in its own session (process
group) through tests.support.serve.Hermes, so a test can kill -9 the supervisor
and all its children at once, and the teardown never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from hermes_py.spool import Flag
from tests.support.cli import one_error_line
from tests.support.config import Config, dest, pacs_and_ris, receiver, rule
from tests.support.dicomgen import iter_uids, make_instance, save, write_series
from tests.support.peers import Storescp, free_port, storescu, wait_for, wait_port
from tests.support.serve import START_TIMEOUT, Hermes, alive
from tests.support.spool import put, sidecar

CHILDREN = {"receive", "intake", "route", "dispatch:pacs", "dispatch:ris", "clean"}
Serve = Callable[[Config], Hermes]


@pytest.fixture
def router(serve: Serve) -> Hermes:
    """serve (not started) of the pacs/ris router; nothing listens at pacs or ris."""
    return serve(pacs_and_ris())


# ---------------------------------------------------------------- start / stop


def test_serve_starts_everything_and_stops_cleanly_on_sigterm(router: Hermes) -> None:
    """No destination is up: serve must start, answer C-ECHO, and stop with exit 0."""
    router.start()
    kids = router.wait_children(CHILDREN)
    assert set(kids) == CHILDREN
    for n in ("pacs", "ris"):
        assert router.spool.outbox(n).is_dir() and router.spool.error_dir(n).is_dir()
    cp = router.cli("status")
    assert "serve: running" in cp.stdout
    pids = [c["pid"] for c in kids.values()]
    # every child is in the supervisor's process group (kill -9 of the group works)
    assert router.proc is not None
    assert {os.getpgid(p) for p in pids} == {router.proc.pid}
    router.stop()
    for p in pids:
        assert not alive(p)
    assert router.serve_state().get("stopped_at")
    log = router.log_text()
    assert "stopping (receiver first)" in log and "stopped" in log
    assert "Traceback" not in log
    cp = router.cli("status")
    assert "serve: NOT running" in cp.stdout


def test_second_serve_on_same_spool_refuses(router: Hermes) -> None:
    router.start(wait=False)
    router.wait_children({"clean"})
    cp = router.cli("serve")
    assert cp.returncode == 2
    line = one_error_line(cp)
    assert router.proc is not None
    assert "already running" in line and f"pid {router.proc.pid}" in line
    assert router.running


def test_kill_9_of_everything_leaves_no_stale_lock(router: Hermes) -> None:
    router.start()
    router.kill9()
    router.start(wait=False)
    router.wait_children({"clean"})
    router.stop()


def test_sigint_stops_with_exit_0(router: Hermes) -> None:
    router.start()
    router.wait_children(CHILDREN)
    # Ctrl-C in a terminal: the whole foreground group gets SIGINT at once
    assert router.proc is not None
    os.killpg(router.proc.pid, signal.SIGINT)
    assert router.proc.wait(90) == 0, router.log_tail()


def test_children_follow_the_config_two_receivers_no_intake(serve: Serve, tmp_path: Path
                                                           ) -> None:
    """``[receiver] processes = 2``: two children receive:1 and receive:2 that share the
    port (SO_REUSEPORT: associations land in both, and each instance's received_by names
    the process that took it); ``[intake] enabled = false``: no intake child. And when
    serve itself is killed -9, both receivers exit with it (PR_SET_PDEATHSIG)."""
    cfg = pacs_and_ris()
    assert cfg.receiver is not None
    cfg.receiver["processes"] = 2
    cfg.intake = {"enabled": False}
    h = serve(cfg)
    h.start()
    want = {"receive:1", "receive:2", "route", "dispatch:pacs", "dispatch:ris", "clean"}
    kids = h.wait_children(want)
    assert set(kids) == want, sorted(kids)  # no "receive", no "intake"
    receivers = {kids[n]["pid"] for n in ("receive:1", "receive:2")}
    assert len(receivers) == 2

    f = save(make_instance(8, 8), tmp_path / "one.dcm")

    def takers() -> set[str]:
        """``received_by`` of every instance so far, wherever the router has put it."""
        out = set()
        with contextlib.suppress(OSError):  # folders and files move while we look
            for dcm in h.spool_dir.rglob("*.dcm"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    out.add(sidecar(dcm)["received_by"])
        return out

    def sent_until_both() -> bool:  # each storescu is a new association, from a new port
        cp = storescu(h.port, [f])
        assert cp.returncode == 0, cp.stderr
        return len(takers()) >= 2
    wait_for(sent_until_both, 60, 0.05, "associations to reach both receivers")
    host = socket.gethostname()
    assert takers() == {f"{host}:{pid}" for pid in receivers}

    h.kill_serve()
    wait_for(lambda: not any(alive(p) for p in receivers), 30,
             what="both receivers to exit after serve was killed -9")


def _takes_sigterm(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` of ``pid`` leaves SIGTERM unblocked (the kernel may pick it)."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return not int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1))
    return True


@pytest.mark.parametrize("victim", ["receive", "dispatch:pacs"])
def test_a_sigterm_any_thread_takes_stops_the_stage(router: Hermes, victim: str) -> None:
    """The kernel hands a process-directed SIGTERM (kill, serve's death) to any thread
    that does not block it, and CPython runs the handler only in the main thread. A
    receiver whose main thread waited without a timeout never stopped (it failed CI: a
    receiver outlived a kill -9 of serve). So: our threads block it, and a thread that
    still takes it (a native library's) stops the stage within the main thread's wake."""
    router.start()
    pid = router.wait_children(CHILDREN)[victim]["pid"]
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "every stage runs more than one thread (the log writer at least)"
    takers = [t for t in others if _takes_sigterm(pid, t)]
    if not takers:
        return  # only the main thread can take it: the failure cannot happen
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, pid, takers[0], signal.SIGTERM) == 0  # SYS_tgkill, x86_64
    wait_for(lambda: not alive(pid), 10, what=f"{victim} to stop on a SIGTERM its "
             f"thread {takers[0]} took")


# ---------------------------------------------------------------- restarts and reload


@pytest.mark.parametrize("victim", ["receive", "dispatch:pacs"])
def test_killed_child_is_restarted(router: Hermes, victim: str) -> None:
    router.start()
    old = router.wait_children(CHILDREN)[victim]["pid"]
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        c = router.children().get(victim, {})
        return bool(c.get("pid")) and c["pid"] != old and alive(c["pid"])
    wait_for(restarted, START_TIMEOUT, 0.2, f"{victim} to be restarted")
    c = router.children()[victim]
    assert c["restarts"] == 1 and "killed by SIGKILL" in c["last_exit"]
    log = router.log_text()
    assert f"{victim} (pid {old}) killed by SIGKILL" in log
    assert f"{victim}: restarting in 1s" in log
    if victim == "receive":
        router.wait_ready()
    router.stop()


def test_sighup_reloads_adds_and_removes_destinations(router: Hermes) -> None:
    router.start()
    router.wait_children(CHILDREN)
    wait_for(lambda: "router active" in router.log_text(), START_TIMEOUT, 0.2,
             "the router to start")
    ris_pid = router.pid("dispatch:ris")
    # invalid edit: kept running with the old configuration
    router.write_config(router.config.render() + "\n[destinations.broken]\nhost = 1\n")
    router.reload()
    wait_for(lambda: "reload: keeping the running configuration" in router.log_text(),
             START_TIMEOUT, 0.2, "the reload error")
    assert router.running
    # valid edit: a new destination, ris removed
    router.config.destination("ris").name = "lab"
    router.config.rules = router.config.rules.replace('"ris"', '"lab"')
    router.write_config()
    router.reload()
    router.wait_children({"dispatch:lab", "receive", "route", "clean", "dispatch:pacs"})
    wait_for(lambda: "dispatch:ris" not in router.children(), START_TIMEOUT, 0.2, "ris to stop")
    # the router got the SIGHUP too and reloaded its rules itself
    wait_for(lambda: "(SIGHUP): 1 rule(s), 2 destination(s)" in router.log_text(),
             START_TIMEOUT, 0.2, "the router's reload")
    assert not alive(ris_pid)
    assert router.spool.outbox("lab").is_dir()
    log = router.log_text()
    assert "killed by SIGHUP" not in log
    assert "dispatch:ris (pid" in log and "not restarted (no longer configured)" in log
    router.stop()


# What each child logs once it is up (after it ignores SIGHUP), as serve.log shows it.
READY = {"receive": r" receive \S+: receiver \S+ listening on ",
         "intake": r" intake \S+: intake active on ",
         "route": r" route \S+: router active on ",
         "dispatch:pacs": r" dispatch:pacs \S+: dispatcher pacs: ",
         "dispatch:ris": r" dispatch:ris \S+: dispatcher ris: ",
         "clean": r" clean \S+: cleaner: keep success "}


def test_sighup_while_children_start_kills_nothing(router: Hermes) -> None:
    """systemctl reload right after start: no child may die of the default SIGHUP action."""
    assert set(READY) == CHILDREN
    router.start(wait=False)
    wait_for(lambda: len(router.children()) == len(CHILDREN), START_TIMEOUT, 0.02,
             "children started")
    for _ in range(3):
        router.reload()
        time.sleep(0.2)  # spread over the children's start (the test's input)
    # Until every child has said it is up. A child killed by a SIGHUP never says so: its
    # replacement does, after serve has reaped it and logged why.
    wait_for(lambda: all(re.search(r, router.log_text()) for r in READY.values()),
             START_TIMEOUT, 0.2, "every child to be up")
    log = router.log_text()
    assert "killed by SIGHUP" not in log
    assert len(re.findall(r"\bstarted \S+ \(pid \d+\)", log)) == len(CHILDREN), log
    assert all(c["restarts"] == 0 for c in router.children().values()), router.children()
    router.stop()


# ---------------------------------------------------------------- metrics


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


def test_metrics_endpoint(serve: Serve, tmp_path: Path) -> None:
    mport = free_port()
    h = serve(pacs_and_ris(metrics={"port": mport}))
    spool = h.spool
    spool.ensure(["pacs", "ris"])
    spool.set_flag("pacs", Flag.HOLD, "test")   # held: these stay queued whatever happens
    received = time.time() - 3600                # the oldest an hour ago
    for i in range(3):
        put(spool, None, sop=f"1.2.3.{i}", dest="pacs", received=received + i * 60,
            mtime=time.time() - 1)
    h.start()
    h.wait_children({"receive", "route"})
    wait_port(mport, START_TIMEOUT)
    m = _scrape(mport)
    assert m['hermes_queue_depth{destination="pacs"}'] == 3
    assert m['hermes_destination_state{destination="pacs",state="held"}'] == 1
    age = m['hermes_queue_oldest_age_seconds{destination="pacs"}']
    assert 3600 <= age < 3600 + START_TIMEOUT + 60, age
    assert m["hermes_spool_free_bytes"] > 0
    assert m['hermes_child_up{process="receive"}'] == 1
    # one instance through the receiver: the counters come from the stages' events
    f = save(make_instance(), tmp_path / "in" / "one.dcm")
    cp = storescu(h.port, [f])
    assert cp.returncode == 0, cp.stderr

    def counted() -> dict[str, float] | None:
        m = _scrape(mport)
        ok = m.get('hermes_received_total{source="network"}', 0) >= 1 and \
            m.get('hermes_routed_total{destination="ris"}', 0) >= 1
        return m if ok else None
    m = wait_for(counted, START_TIMEOUT, 0.5, "received and routed counters")
    assert m['hermes_received_bytes_total{source="network"}'] >= f.stat().st_size - 200
    assert m['hermes_routed_total{destination="pacs"}'] >= 1
    h.stop()


# ---------------------------------------------------------------- the README quickstart


@pytest.mark.e2e
def test_readme_quickstart_relays_to_storescp(serve: Serve, tmp_path: Path) -> None:
    """README: serve, echoscu and storescu to HERMES, the instance arrives at storescp."""
    with Storescp(tmp_path / "pacs-received", ae_title="PACS") as pacs:
        # the shipped rules.toml (README), on free ports
        port = free_port()
        h = serve(Config(destinations=[dest("pacs", pacs.port, "PACS")],
                         rules=rule("everything to pacs", ["pacs"]), receiver=receiver(port)))
        h.start()            # README: echoscu -aec HERMES localhost PORT
        ds = make_instance()
        f = save(ds, tmp_path / "ct.dcm")
        cp = storescu(port, [f], called="HERMES")
        assert cp.returncode == 0, cp.stderr
        wait_for(lambda: str(ds.SOPInstanceUID) in pacs.uids(), START_TIMEOUT, 0.5,
                 "the instance at storescp")
        wait_for(lambda: list(h.spool.success_dir("pacs").glob("*.dcm")), START_TIMEOUT, 0.2,
                 "success/pacs/")
        cp = h.cli("find", str(ds.SOPInstanceUID))
        assert cp.returncode == 0 and "success/pacs/" in cp.stdout, cp.stdout
        # README: `hermes-py send FOLDER` while serve runs
        series = write_series(tmp_path / "cdrom" / "DICOM", 2)
        cp = h.cli("send", str(tmp_path / "cdrom"))
        assert cp.returncode == 0 and "sent 2 file(s)" in cp.stdout, cp.stderr
        sent = set(iter_uids(series))
        wait_for(lambda: sent <= pacs.uids(), START_TIMEOUT, 0.5, "the sent files at storescp")
        wait_for(lambda: len(list(h.spool.success_dir("pacs").glob("*.dcm"))) == 3,
                 START_TIMEOUT, 0.2, "three instances in success/pacs/")
        st = json.loads(h.cli("status", "--json").stdout)
        assert st["destinations"]["pacs"]["success_24h"] == 3
        assert st["destinations"]["pacs"]["queued"] == 0
        h.stop()
