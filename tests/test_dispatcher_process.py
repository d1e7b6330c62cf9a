"""``hermes-py dispatch NAME`` as real processes: kill -9, restarts, two at once, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from hermes_py.config import Settings
from hermes_py.spool import Spool
from tests.support.config import dest
from tests.support.dicomgen import make_instance
from tests.support.peers import Script, ScriptedSCP, wait_for
from tests.support.spool import claimed, delivered, queue, queued, sidecars

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

BATCH = 50


@contextlib.contextmanager
def dispatch_process(cfg: Settings, name: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m hermes_py dispatch NAME``; killed at the end if the test did not stop it."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hermes_py", "dispatch", name, "-c",
                                 str(cfg.path)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def fill(cfg: Settings, n: int) -> set[str]:
    study = generate_uid()
    uids = set()
    for s in range(n // 50):
        series = generate_uid()
        for i in range(50):
            ds = make_instance(16, 16, study_uid=study, series_uid=series,
                               instance_number=s * 50 + i + 1)
            queue(cfg, "pacs", ds)
            uids.add(str(ds.SOPInstanceUID))
    return uids


def test_kill_9_mid_send_then_restart_delivers_all_with_bounded_duplicates(
        make_settings, tmp_path: Path) -> None:
    with ScriptedSCP(script=Script(delay=0.01)) as scp:
        cfg = make_settings(dest("pacs", scp.port, batch_size=BATCH))
        uids = fill(cfg, 300)
        with dispatch_process(cfg, "pacs", tmp_path / "a.log") as a:
            wait_for(lambda: scp.count() >= 60, 60, what="60 instances received")
            a.send_signal(signal.SIGKILL)
            a.wait(30)
        # nothing lost at the instant of the kill: every instance is in exactly one place
        in_flight = claimed(cfg, "pacs")
        total = len(delivered(cfg, "pacs")) + len(queued(cfg, "pacs")) + len(in_flight)
        assert total == 300, (total, (tmp_path / "a.log").read_text()[-2000:])
        assert len(in_flight) <= BATCH  # at most the batch in flight, stranded in a dead claim
        with dispatch_process(cfg, "pacs", tmp_path / "b.log") as b:
            wait_for(lambda: len(delivered(cfg, "pacs")) == 300, 120, what="all 300 delivered")
            b.send_signal(signal.SIGTERM)
            assert b.wait(30) == 0
        if in_flight:
            assert f"returned {len(in_flight)} instance(s) claimed by a dead worker" in \
                (tmp_path / "b.log").read_text()
        assert scp.uids == uids
        duplicates = scp.count() - len(uids)
        assert 0 <= duplicates <= BATCH
        assert not queued(cfg, "pacs") and not claimed(cfg, "pacs")
        assert not list((Spool(cfg.spool.path).active / "pacs").glob("*.lock"))


def test_two_processes_on_one_destination_never_send_the_same_instance(
        make_settings, tmp_path: Path) -> None:
    with ScriptedSCP(script=Script(delay=0.005)) as scp:
        cfg = make_settings(dest("pacs", scp.port, batch_size=25))
        with dispatch_process(cfg, "pacs", tmp_path / "a.log") as a, \
                dispatch_process(cfg, "pacs", tmp_path / "b.log") as b:
            # both running (and polling) before there is any work, however slow they start
            for log in ("a.log", "b.log"):
                wait_for(lambda log=log: "worker(s) ->" in (tmp_path / log).read_text(), 60,
                         what=f"dispatcher {log} started")
            uids = fill(cfg, 300)
            wait_for(lambda: len(delivered(cfg, "pacs")) == 300, 120, what="all 300 delivered")
            for p in (a, b):
                p.send_signal(signal.SIGTERM)
            assert a.wait(30) == 0 and b.wait(30) == 0
        assert scp.count() == 300 and scp.uids == uids  # each exactly once
        pids = {sc["history"][-1]["association"].split("#")[0].split("_")[-2]
                for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs"))}
        assert pids == {str(a.pid), str(b.pid)}  # both really worked


def test_sigterm_stops_between_instances_and_returns_claims(make_settings,
                                                            tmp_path: Path) -> None:
    with ScriptedSCP(script=Script(delay=0.05)) as scp:
        cfg = make_settings(dest("pacs", scp.port, batch_size=BATCH, max_associations=2))
        fill(cfg, 100)
        with dispatch_process(cfg, "pacs", tmp_path / "a.log") as a:
            wait_for(lambda: scp.count() >= 5, 60)
            a.send_signal(signal.SIGTERM)
            assert a.wait(30) == 0
        assert not claimed(cfg, "pacs")
        assert len(delivered(cfg, "pacs")) + len(queued(cfg, "pacs")) == 100
        assert len(delivered(cfg, "pacs")) < 100
        log = (tmp_path / "a.log").read_text()
        assert "stopped" in log and "Traceback" not in log
        assert os.path.exists(Spool(cfg.spool.path).state_file("pacs"))
