"""The watcher's conditions that other stages write: storage commitment and certificates.

Level in, edges out, as for a destination's state (tests/test_alerts.py): a
state file or a certificate file on disk is the truth, each change is one alert.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import trustme

from hermes_py import commitment
from hermes_py.alerts.watcher import CERT_EVERY, Watcher
from hermes_py.spool import Spool, now_iso
from hermes_py.tls import ReceiverTLS
from tests.test_alerts import T0, alerts_toml, events_of, hook, pending, settings


def test_not_committing_once_then_cleared_by_a_report(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x")))
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    w.tick(T0)
    assert events_of(spool) == []          # no state file: nothing to say
    spool.write_json(commitment.state_file(spool, "pacs"), {
        "destination": "pacs", "mode": "required", "not_committing_since": now_iso(T0),
        "last_report_at": None, "updated_at": now_iso(T0)})
    for t in range(1, 20):
        w.tick(T0 + t)
    assert events_of(spool) == ["destination_not_committing"]
    p = pending(spool)[0]["payload"]
    assert p["severity"] == "error" and p["destination"]["name"] == "pacs"
    assert "committing/" in p["summary"]
    spool.write_json(commitment.state_file(spool, "pacs"), {
        "destination": "pacs", "mode": "required", "not_committing_since": None,
        "last_report_at": now_iso(T0 + 30), "updated_at": now_iso(T0 + 30)})
    w.tick(T0 + 31)
    assert "commitment:pacs" not in w.open
    assert events_of(spool) == ["destination_not_committing"]   # cleared without a message


def test_cert_expiring_once_and_a_renewed_file_clears_it(tmp_path: Path) -> None:
    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    soon = ca.issue_cert("hermes.test", not_after=now + dt.timedelta(days=10))
    cert, key = tmp_path / "hermes.pem", tmp_path / "hermes.key"
    soon.cert_chain_pems[0].write_to_path(str(cert))
    soon.private_key_pem.write_to_path(str(key))
    base = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x")))
    cfg = dataclasses.replace(base, receiver=dataclasses.replace(
        base.receiver, tls=ReceiverTLS(port=2762, cert_file=str(cert), key_file=str(key))))
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    t0 = now.timestamp()
    w.tick(t0)
    w.tick(t0 + 1)                       # looked at once per CERT_EVERY, told once
    assert events_of(spool) == ["cert_expiring"]
    p = pending(spool)[0]["payload"]
    assert p["severity"] == "warning" and "expires in" in p["summary"]
    later = ca.issue_cert("hermes.test", not_after=now + dt.timedelta(days=365))
    later.cert_chain_pems[0].write_to_path(str(cert))
    w.tick(t0 + 2)
    assert "cert:receiver" in w.open     # not looked at again before CERT_EVERY
    w.tick(t0 + CERT_EVERY + 2)
    assert "cert:receiver" not in w.open
    assert events_of(spool) == ["cert_expiring"]
