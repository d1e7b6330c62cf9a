"""A destination that stays down fails over to its backup, and fails back when it returns.

Seconds stand for minutes: failover_after and failback_after are 2 s. The primary is a
port nothing listens on until the test starts a peer there; the backup is a scripted
pynetdicom SCP. divert delivers each instance to exactly one of them, copy to both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.harness import sent_index, wait_delivered
from tests.support.config import Dest, rule
from tests.support.dicomgen import make_corpus
from tests.support.peers import wait_for
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def primary(mode: str) -> Dest:
    return Dest("pacs", ae_title="PACS", options={
        "failover_to": "backup", "failover_mode": mode, "failover_after": "2s",
        "failback_after": "2s"})


def failed_over(h: Hermes) -> dict[str, object]:
    path = h.spool.failover_file("pacs")
    return json.loads(path.read_text()) if path.exists() else {}


def diverted_records(h: Hermes) -> list[dict[str, object]]:
    folder = h.spool.diverted_dir("pacs")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@pytest.mark.timeout(240)
def test_divert_then_failback_delivers_each_instance_once(tmp_path: Path, hermes, scp) -> None:
    pacs, backup = primary("divert"), Dest("backup", ae_title="BACKUP")
    h = hermes([pacs, backup], rules=rule("all to pacs", ["pacs"]))
    backup_peer = scp(backup)
    first = make_corpus(tmp_path / "first", 40, per_series=20)
    sent = sent_index(first)
    h.start()
    res = h.send(first)
    assert res.acked == set(sent), res.describe()

    wait_delivered(lambda: backup_peer.uids, set(sent), what="every instance at the backup "
                   "after the primary stayed down past failover_after", hermes=h)
    rec = failed_over(h)
    assert rec.get("to") == "backup" and rec.get("mode") == "divert", rec
    assert "failover_started" in h.log_text() or "FAILED OVER" in h.log_text()
    records = diverted_records(h)
    assert len(records) == len(sent)
    assert all(r["failover"]["to"] == "backup" for r in records)  # type: ignore[index]
    delivered = [json.loads(p.with_suffix(".json").read_text()) for p in h.delivered("backup")]
    assert {d["failover"]["from"] for d in delivered} == {"pacs"}
    uid = next(iter(sent))
    found = h.cli("find", uid)
    assert found.returncode == 0, found.stderr
    assert "diverted" in found.stdout and "backup" in found.stdout, found.stdout
    status = h.cli("status")
    assert "failed over to backup" in status.stdout, status.stdout

    pacs_peer = scp(pacs)
    wait_for(lambda: not failed_over(h), 60, 0.2,
             "failback once the primary answered for failback_after")
    assert "FAILED BACK" in h.log_text()
    second = make_corpus(tmp_path / "second", 10, per_series=10)
    later = sent_index(second)
    res = h.send(second)
    assert res.acked == set(later), res.describe()
    wait_delivered(lambda: pacs_peer.uids, set(later), what="new work at the primary after "
                   "failback", hermes=h)
    assert not (backup_peer.uids & set(later)), "work routed after failback went to the backup"
    assert not (pacs_peer.uids & set(sent)), "a diverted instance was delivered twice"
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(240)
def test_failback_returns_what_the_backup_had_not_sent(tmp_path: Path, hermes, scp) -> None:
    """The backup is held (an admin paused it): its failover queue fills; at failback those
    instances go back to the primary and reach it, and the backup sends none of them."""
    pacs, backup = primary("divert"), Dest("backup", ae_title="BACKUP")
    h = hermes([pacs, backup], rules=rule("all to pacs", ["pacs"]))
    h.start()
    assert h.cli("hold", "backup").returncode == 0
    files = make_corpus(tmp_path / "corpus", 30, per_series=30)
    sent = sent_index(files)
    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    queue = h.spool.failover_queue("backup", "pacs")
    wait_for(lambda: len(list(queue.glob("*.dcm"))) == len(sent), 60, 0.2,
             "the held backup's failover queue to hold every instance")
    pacs_peer = scp(pacs)
    wait_delivered(lambda: pacs_peer.uids, set(sent), what="the returned instances at the "
                   "primary after failback", hermes=h)
    assert not list(queue.glob("*.dcm"))
    assert not diverted_records(h), "a returned instance kept its diverted/ record"
    assert "returned" in h.log_text()
    assert h.cli("release", "backup").returncode == 0
    h.stop()


@pytest.mark.timeout(240)
def test_copy_sends_to_the_backup_and_the_primary_keeps_its_queue(tmp_path: Path, hermes,
                                                                  scp) -> None:
    pacs, backup = primary("copy"), Dest("backup", ae_title="BACKUP")
    h = hermes([pacs, backup], rules=rule("all to pacs", ["pacs"]))
    backup_peer = scp(backup)
    files = make_corpus(tmp_path / "corpus", 30, per_series=30)
    sent = sent_index(files)
    h.start()
    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_delivered(lambda: backup_peer.uids, set(sent), what="every instance copied to the "
                   "backup site", hermes=h)
    assert h.queued("pacs") == len(sent), "copy mode keeps the primary's queue"
    pacs_peer = scp(pacs)
    wait_delivered(lambda: pacs_peer.uids, set(sent), what="the primary's queue drained when "
                   "it came back", hermes=h)
    wait_for(lambda: not failed_over(h), 60, 0.2, "failback")
    assert backup_peer.count() == len(sent), "the backup got an instance twice"
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(300)
def test_kill9_during_divert_loses_nothing(tmp_path: Path, hermes, scp) -> None:
    pacs, backup = primary("divert"), Dest("backup", ae_title="BACKUP")
    h = hermes([pacs, backup], rules=rule("all to pacs", ["pacs"]))
    files = make_corpus(tmp_path / "corpus", 300, per_series=100)
    sent = sent_index(files)
    h.start()
    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_for(lambda: bool(failed_over(h)) and any(h.spool.diverted_dir("pacs").glob("*.dcm")),
             60, 0.05, "the divert to be under way")
    h.kill9()
    backup_peer = scp(backup)
    h.start()
    pacs_peer_uids: set[str] = set()
    wait_delivered(lambda: backup_peer.uids | pacs_peer_uids, set(sent),
                   what="every acknowledged instance at the backup after kill -9 mid-divert",
                   hermes=h)
    assert h.queued("pacs") == 0
    assert not h.all_errors()
    h.stop()
