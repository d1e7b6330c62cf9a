"""/healthz and drain, as a load balancer sees them: 200 only while this router can take
and keep an instance; drain refuses new associations (transient) and says 503."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.config import Dest, rule
from tests.support.dicomgen import make_instance, save
from tests.support.peers import free_port, storescu, wait_for
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(120)
def test_healthz_and_drain(tmp_path: Path, hermes, scp) -> None:
    pacs = Dest("pacs", ae_title="PACS")
    port = free_port()
    h: Hermes = hermes([pacs], rules=rule("all", ["pacs"]), health={"port": port})
    scp(pacs)
    h.start()
    wait_for(lambda: healthz(port) == (200, "ok\n"), 30, 0.1, "/healthz to say ok")
    f = save(make_instance(8, 8), tmp_path / "a.dcm")
    assert storescu(h.port, [f]).returncode == 0

    cp = h.cli("drain")
    assert cp.returncode == 0 and "draining" in cp.stdout, cp.stdout + cp.stderr
    assert healthz(port) == (503, "draining\n")
    wait_for(lambda: storescu(h.port, [f]).returncode != 0, 10, 0.3,
             "the receiver to refuse new associations while draining")
    refused = storescu(h.port, [f])
    assert "Association Rejected" in refused.stderr, refused.stderr
    assert "DRAINING since" in h.cli("status").stdout
    assert h.cli("undrain").returncode == 0
    wait_for(lambda: healthz(port)[0] == 200, 10, 0.1, "healthy again after undrain")
    wait_for(lambda: storescu(h.port, [f]).returncode == 0, 10, 0.3,
             "associations accepted after undrain")

    victim = h.wait_children({"dispatch:pacs"})["dispatch:pacs"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: healthz(port) == (503, "not running: dispatch:pacs\n"), 10, 0.02,
             "503 while a dispatcher is down")
    wait_for(lambda: healthz(port)[0] == 200, 30, 0.1, "200 once serve restarted it")
    body = healthz(port)[1]
    assert "pacs" not in body and "spool" not in body  # nothing but ok
    h.stop()
