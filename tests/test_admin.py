"""Admin verbs against spools with known contents, through the installed ``hermes-py``.

The spool contents are built with the spool verbs and sidecar builders the stages
use (tests.support.spool.put), so status and find read what a running router and
dispatcher would have written.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from hermes_py.admin import queue as queue_verbs
from hermes_py.config import load
from hermes_py.lifecycle import Event
from hermes_py.pynetdicom_compat import VERIFICATION
from hermes_py.spool import Flag, Spool, now_iso
from tests.support.cli import one_error_line, run
from tests.support.config import Config, dest, pacs_and_ris
from tests.support.dicomgen import make_instance, save, write_series
from tests.support.peers import ScriptedSCP, free_port
from tests.support.spool import put

HOUR = 3600.0


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """The pacs/ris router's rules.toml (nothing listening), with its spool."""
    path = pacs_and_ris().write(tmp_path)
    Spool(tmp_path / "spool").ensure(["pacs", "ris"])
    return path


def _spool(rules: Path) -> Spool:
    return Spool(rules.parent / "spool")


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.dcm")} if folder.is_dir() else set()


# ---------------------------------------------------------------- status


@pytest.fixture
def known(rules: Path) -> dict[str, Any]:
    """A spool whose every count status reports is known in advance."""
    spool = _spool(rules)
    now = time.time()
    # pacs: 3 normal (2 due, 1 in the future), 1 urgent due, 1 claimed by a worker
    put(spool, None, sop="1.1.1", dest="pacs", received=now - 30, mtime=now - 5)
    put(spool, None, sop="1.1.2", dest="pacs", received=now - 15 * 60, mtime=now - 5)
    put(spool, None, sop="1.1.3", dest="pacs", received=now - 2 * HOUR, mtime=now + HOUR)
    put(spool, None, sop="1.1.4", dest="pacs", priority="urgent", received=now - 60,
        mtime=now - 1)
    put(spool, spool.active / "pacs" / "vm-1-abc", sop="1.1.5", dest="pacs",
        received=now - 3 * HOUR)
    # pacs: 2 in error/pacs, 3 in success/pacs of which 2 delivered in the last 24 h
    put(spool, spool.error_dir("pacs"), sop="1.1.6", dest="pacs",
        error={"stage": "dispatch", "reason": "0xC000 cannot understand", "at": "x"})
    put(spool, spool.error_dir("pacs"), sop="1.1.7", dest="pacs")
    put(spool, spool.success_dir("pacs"), sop="1.1.8", dest="pacs", received=now - 60)
    put(spool, spool.success_dir("pacs"), sop="1.1.9", dest="pacs", received=now - 3 * 86400,
        mtime=now - HOUR)            # received long ago, delivered an hour ago
    put(spool, spool.success_dir("pacs"), sop="1.1.10", dest="pacs", received=now - 3 * 86400,
        mtime=now - 2 * 86400)       # delivered two days ago: not counted
    # ris: held, backing off, 1 queued
    put(spool, None, sop="1.2.1", dest="ris", received=now - 25 * HOUR, mtime=now - 5)
    spool.write_json(spool.state_file("ris"), {
        "destination": "ris", "state": "backoff", "backoff_until": now + 600,
        "consecutive_failures": 4,
        "last_error": {"at": "t", "kind": "connection refused", "detail": "[Errno 111]"}})
    spool.write_json(spool.state_file("pacs"), {
        "destination": "pacs", "state": "backoff", "backoff_until": now + 600,
        "last_error": {"at": "t", "kind": "association rejected", "detail": "(1,1,7)"}})
    spool.flag("ris", Flag.HOLD).write_text("{}")
    # shared folders
    put(spool, spool.incoming, sop="1.3.1")
    put(spool, spool.incoming, sop="1.3.2")
    put(spool, spool.pending / "study-1.2.3", sop="1.3.3")
    put(spool, spool.error, b"not DICOM", sop="1.3.4", error={"reason": "not DICOM"})
    put(spool, spool.discard, sop="1.3.5")
    (spool.drop / "a" / "b").mkdir(parents=True)
    (spool.drop / "a" / "b" / "IM1").write_bytes(b"x")
    return {"rules": rules, "spool": spool, "now": now}


def test_status_json_counts(known: dict[str, Any]) -> None:
    cp = run("status", "--json", "-c", known["rules"])
    assert cp.returncode == 0, cp.stderr
    s = json.loads(cp.stdout)
    pacs, ris = s["destinations"]["pacs"], s["destinations"]["ris"]
    assert pacs["queued"] == 5 and pacs["urgent"] == 1 and pacs["active"] == 1
    assert pacs["due"] == 3
    assert pacs["error"] == 2
    assert pacs["success_24h"] == 2
    assert 3 * HOUR - 60 < pacs["oldest_age"] < 3 * HOUR + 600
    # qshape buckets, newest first: <=5m: 1.1.1+1.1.4, 10-20m: 1.1.2, 80-160m: 1.1.3,
    # 160-320m: 1.1.5 (active)
    assert pacs["age_buckets"] == [2, 0, 1, 0, 0, 1, 1, 0, 0, 0]
    assert pacs["state"] == "backoff" and pacs["last_error"]["kind"] == "association rejected"
    assert ris["state"] == "held" and ris["held"] is True
    assert ris["queued"] == 1 and ris["due"] == 1 and ris["age_buckets"][-1] == 1
    assert ris["last_error"]["kind"] == "connection refused"
    assert s["folders"] == {"incoming": 2, "pending": 1, "drop": 1, "drop_capped": False,
                            "error": 1, "discard": 1}
    assert s["free_mb"] > 0 and s["low_space"] is False
    assert s["serve"] is None


def test_status_text_one_screen(known: dict[str, Any]) -> None:
    cp = run("status", "-c", known["rules"])
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert len(out.splitlines()) <= 24
    lines: dict[str, str] = {}
    for ln in out.splitlines():
        if ln.strip():
            lines.setdefault(ln.split()[0], ln)   # the destination table comes first
    assert "backoff, retry in" in lines["pacs"]
    assert "association rejected" in lines["pacs"]
    assert "HELD" in lines["ris"] and "connection refused" in lines["ris"]
    assert "incoming/ 2" in out and "pending/ 1" in out and "discard/ 1" in out
    assert "error/ (unreadable) 1" in out
    assert "serve: never started" in out
    assert "AGE (min)" in out


def test_status_low_space_warning(known: dict[str, Any]) -> None:
    path: Path = known["rules"]
    path.write_text(path.read_text().replace("min_free_mb = 0", "min_free_mb = 999999999"))
    cp = run("status", "-c", path)
    assert cp.returncode == 0
    assert "BELOW min_free_mb" in cp.stdout


def test_status_counts_a_hyphenated_destination_once_under_its_name(tmp_path: Path) -> None:
    """``pacs-web`` lives in folders named ``pacs_web`` (folder names are sanitised): its
    queue is counted under the name rules.toml gives it, once, and the folders do not
    show up again as a destination that is "not configured"."""
    path = Config(destinations=[dest("pacs-web", ae_title="WEB"), dest("pacs", ae_title="PACS")],
                  receiver={"port": free_port()}).write(tmp_path)
    spool = Spool(tmp_path / "spool")
    spool.ensure(["pacs-web", "pacs"])
    assert spool.outbox("pacs-web").name == "pacs_web"  # the premise
    now = time.time()
    for i in range(3):
        put(spool, None, sop=f"5.1.{i}", dest="pacs-web", received=now - 600, mtime=now - 1)
    put(spool, None, sop="5.2", dest="pacs-web", priority="urgent")
    put(spool, spool.active / "pacs_web" / "vm-1-abc", sop="5.3", dest="pacs-web")
    put(spool, spool.error_dir("pacs-web"), sop="5.4", dest="pacs-web")
    put(spool, None, sop="5.5", dest="pacs")

    cp = run("status", "--json", "-c", path)
    assert cp.returncode == 0, cp.stderr
    dests = json.loads(cp.stdout)["destinations"]
    assert sorted(dests) == ["pacs", "pacs-web"]
    web = dests["pacs-web"]
    assert web["configured"] is True and web["state"] != "not configured"
    assert (web["queued"], web["urgent"], web["active"], web["due"], web["error"]) == \
        (5, 1, 1, 4, 1)
    assert 600 - 60 < web["oldest_age"] < 600 + 600
    assert dests["pacs"]["queued"] == 1 and dests["pacs"]["error"] == 0
    cp = run("status", "-c", path)
    assert cp.returncode == 0, cp.stderr
    assert "pacs_web" not in cp.stdout and "not configured" not in cp.stdout


# ---------------------------------------------------------------- find


def test_find_by_sop_study_and_series(rules: Path) -> None:
    spool = _spool(rules)
    study, series, other_series = generate_uid(), generate_uid(), generate_uid()
    sop1, sop2, sop3 = generate_uid(), generate_uid(), generate_uid()
    routing = {"at": "2026-11-28T05:17:03.500Z", "rules": ["everything"],
               "destinations": ["pacs", "ris"], "discarded_by": None}
    history = [{"at": "2026-11-28T05:18:00.000Z", "outcome": "transient", "status": "0xA700",
                "reason": "Refused: Out of Resources"}]
    put(spool, None, sop=sop1, study=study, series=series, dest="pacs", routing=routing,
        attempts=1, history=history)
    put(spool, spool.success_dir("ris"), sop=sop1, study=study, series=series, dest="ris",
        routing=routing, attempts=1, delivered_at="2026-11-28T05:17:04.000Z")
    put(spool, spool.error_dir("pacs"), sop=sop2, study=study, series=other_series,
        dest="pacs", routing=routing, error={"stage": "dispatch", "reason": "0xC000 bad",
                                             "at": "2026-11-28T05:20:00.000Z"})
    # not routed yet: the study and series UIDs are only in the file
    put(spool, spool.incoming, make_instance(sop_uid=sop3, study_uid=study, series_uid=series),
        source="drop", original_path="drop/IM3")
    put(spool, None, dest="pacs", study=generate_uid())  # someone else

    cp = run("find", sop1, "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "1 instance(s) of SOP Instance" in cp.stdout
    assert "outgoing/pacs/" in cp.stdout and "success/ris/" in cp.stdout
    assert "0xA700 Refused: Out of Resources" in cp.stdout
    assert 'by "everything" -> pacs, ris' in cp.stdout
    assert "from CT1@127.0.0.1:40000 to HERMES" in cp.stdout

    cp = run("find", study, "--json", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["kind"] == "study"
    got = sorted((c["folder"], c["sidecar"]["sop_instance_uid"]) for c in res["copies"])
    assert got == sorted([("outgoing/pacs", sop1), ("success/ris", sop1),
                          ("error/pacs", sop2), ("incoming", sop3)])

    cp = run("find", series, "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "2 instance(s) of series" in cp.stdout
    assert "incoming/ 1, outgoing/pacs/ 1, success/ris/ 1" in cp.stdout
    assert sop2 not in cp.stdout
    assert "waiting for the router" in cp.stdout


# ---------------------------------------------------------------- retry, hold, release, flush


def test_retry_moves_error_back_with_counters_reset(rules: Path) -> None:
    spool = _spool(rules)
    study = generate_uid()
    err = {"stage": "dispatch", "reason": "gave up after 3d", "at": "t", "destination": "pacs"}
    hist = [{"at": "t0", "outcome": "transient", "reason": "refused"}]
    a = put(spool, spool.error_dir("pacs"), sop="2.1", study=study, dest="pacs", attempts=9,
            error=err, history=hist)
    b = put(spool, spool.error_dir("pacs"), sop="2.2", dest="pacs", priority="urgent",
            attempts=4, error=err)
    c = put(spool, spool.error_dir("ris"), sop="2.3", dest="ris", attempts=2, error=err)

    before = time.time()
    cp = run("retry", "pacs", "--study", study, "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "moved 1 instance(s) from error/pacs/" in cp.stdout
    assert _names(spool.outbox("pacs")) == {a.name}
    assert _names(spool.error_dir("pacs")) == {b.name}
    side = json.loads((spool.outbox("pacs") / a.name).with_suffix(".json").read_text())
    assert side["attempts"] == 0 and "error" not in side
    assert side["history"][0] == hist[0]
    assert side["history"][-1]["outcome"] == "retried"
    assert side["history"][-1]["previous_error"]["reason"] == "gave up after 3d"
    assert (spool.outbox("pacs") / a.name).with_suffix(".json").stat().st_mtime >= before - 1
    assert "retried sop=2.1 dest=pacs" in cp.stderr

    cp = run("retry", "--all", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert _names(spool.outbox("pacs", "urgent")) == {b.name}   # priority kept
    assert _names(spool.outbox("ris")) == {c.name}
    assert not _names(spool.error_dir("pacs")) and not _names(spool.error_dir("ris"))
    cp = run("retry", "--all", "-c", rules)
    assert cp.returncode == 0 and "nothing to retry" in cp.stdout


def test_hold_release_flush_flags(rules: Path) -> None:
    spool = _spool(rules)
    cp = run("hold", "pacs", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert spool.flag("pacs", Flag.HOLD).exists() and not spool.flag("ris", Flag.HOLD).exists()
    assert "held" in cp.stdout
    assert "destination_held dest=pacs by=" in cp.stderr  # the event's log line
    assert run("hold", "pacs", "-c", rules).stdout.startswith("pacs: already held")
    cp = run("flush", "pacs", "-c", rules)
    assert cp.returncode == 0 and spool.flag("pacs", Flag.FLUSH).exists()
    assert "is held" in cp.stdout
    cp = run("status", "--json", "-c", rules)
    assert json.loads(cp.stdout)["destinations"]["pacs"]["state"] == "held"
    cp = run("release", "pacs", "-c", rules)
    assert cp.returncode == 0 and not spool.flag("pacs", Flag.HOLD).exists()
    assert "destination_released dest=pacs by=" in cp.stderr
    assert "was not held" in run("release", "pacs", "-c", rules).stdout


def test_hold_and_release_are_events_saying_who_asked(rules: Path, events) -> None:
    cfg = load(rules)
    assert queue_verbs.hold(cfg, "pacs", by="alice").changed
    assert not queue_verbs.hold(cfg, "pacs", by="bob").changed      # already held
    assert queue_verbs.release(cfg, "pacs", by="carol").changed
    assert not queue_verbs.release(cfg, "pacs", by="dave").changed  # was not held
    assert [(o.event, o.destination, dict(o.fields)) for o in events] == [
        (Event.DESTINATION_HELD, "pacs", {"by": "alice"}),
        (Event.DESTINATION_RELEASED, "pacs", {"by": "carol"})]


# ---------------------------------------------------------------- purge


def test_purge_lists_without_yes_and_deletes_only_the_selection(rules: Path) -> None:
    spool = _spool(rules)
    study = generate_uid()
    old = put(spool, spool.error_dir("pacs"), sop="3.1", error={"reason": "bad"},
              mtime=time.time() - 10 * 86400)     # landed in error/pacs/ 10 days ago
    new = put(spool, spool.error_dir("pacs"), sop="3.2", study=study)
    ris = put(spool, spool.error_dir("ris"), sop="3.3")
    top = put(spool, spool.error, sop="3.4")
    q = put(spool, None, sop="3.5", dest="pacs")
    d1 = put(spool, spool.discard, sop="3.6", study=study)
    d2 = put(spool, spool.discard, sop="3.7")

    cp = run("purge", "error", "pacs", "--older-than", "7d", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert f"would delete error/pacs/{old.name}  (bad)" in cp.stdout
    assert new.name not in cp.stdout
    assert "nothing deleted" in cp.stdout and old.exists()

    cp = run("purge", "error", "pacs", "--older-than", "7d", "--yes", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert not old.exists() and not old.with_suffix(".json").exists()
    assert new.exists() and ris.exists() and top.exists() and q.exists()

    cp = run("purge", "discard", "--study", study, "--yes", "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert not d1.exists() and d2.exists() and new.exists()

    cp = run("purge", "error", "--all", "--yes", "-c", rules)   # error/ itself: unreadable
    assert cp.returncode == 0, cp.stderr
    assert not top.exists() and new.exists() and ris.exists()
    assert "deleted 1 instance(s) from error/" in cp.stdout
    assert q.exists() and spool.outbox("pacs").is_dir() and spool.error_dir("pacs").is_dir()


# ---------------------------------------------------------------- echo


def _echo_rules(folder: Path, pacs_port: int, ris_port: int, **pacs: object) -> Path:
    cfg = pacs_and_ris(pacs_port, ris_port)
    cfg.destination("pacs").options.update(pacs)
    path = cfg.write(folder)
    Spool(folder / "spool").ensure(["pacs", "ris"])
    return path


@pytest.mark.network
def test_echo_up_down_and_rejected(tmp_path: Path) -> None:
    down = free_port()
    with ScriptedSCP("PACS") as up:
        path = _echo_rules(tmp_path, up.port, down)
        cp = run("echo", "pacs", "-c", path)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "OK" in cp.stdout and " ms" in cp.stdout
        assert "PACS@127.0.0.1" in cp.stdout and "as HERMES" in cp.stdout
        cp = run("echo", "ris", "-c", path)
        assert cp.returncode == 1
        assert "FAILED connection refused" in cp.stdout
        cp = run("echo", "--all", "-c", path)
        assert cp.returncode == 1
        assert "OK" in cp.stdout and "connection refused" in cp.stdout
    # A pynetdicom SCP that checks the called AE title, as many PACS do.
    # (ScriptedSCP's scripted reject races pynetdicom's socket shutdown and
    # reaches the requestor as an abort, so it cannot show the reason.)
    ae = AE(ae_title="NOTPACS")
    ae.add_supported_context(VERIFICATION)
    ae.require_called_aet = True
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        path = _echo_rules(tmp_path, port, down)
        cp = run("echo", "pacs", "-c", path)
        assert cp.returncode == 1
        assert "rejected (permanent) by Service User: Called AE title not recognised" \
            in cp.stdout
        assert "check ae_title" in cp.stdout
    finally:
        server.shutdown()


@pytest.mark.network
def test_echo_timeout_when_peer_never_answers(tmp_path: Path) -> None:
    """A hung service: the TCP connection is accepted, the association never answered."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(5)
        path = _echo_rules(tmp_path, hung.getsockname()[1], free_port(), acse_timeout="1s")
        cp = run("echo", "pacs", "-c", path)
    assert cp.returncode == 1
    assert "FAILED timeout: connected, but no association answer within acse_timeout 1s" \
        in cp.stdout


# ---------------------------------------------------------------- send


def test_send_folder_tree_into_drop(rules: Path, tmp_path: Path) -> None:
    spool = _spool(rules)
    src = tmp_path / "study1"
    files = write_series(src / "series1", 3) + write_series(src / "series2" / "deep", 2)
    single = save(make_instance(), tmp_path / "loose.dcm")
    cp = run("send", src, single, "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "sent 6 file(s)" in cp.stdout
    assert "serve is not running" in cp.stdout
    batches = list(spool.drop.iterdir())
    assert len(batches) == 1 and batches[0].name.startswith("send-")
    for f in files:
        copy = batches[0] / "study1" / f.relative_to(src)
        assert copy.read_bytes() == f.read_bytes()
    assert (batches[0] / "loose.dcm").read_bytes() == single.read_bytes()
    assert not [p for p in spool.tmp.iterdir() if p.suffix == ".send"]   # no temp left
    assert not stat.S_ISDIR(os.stat(batches[0] / "loose.dcm").st_mode)
    # a second send of the same tree does not overwrite the first
    cp = run("send", src, "-c", rules)
    assert cp.returncode == 0
    assert len(list(spool.drop.iterdir())) == 2


def test_send_refuses_missing_paths_and_disabled_intake(rules: Path, tmp_path: Path) -> None:
    cp = run("send", tmp_path / "nope", "-c", rules)
    assert cp.returncode == 2
    assert "no such file or folder" in one_error_line(cp)
    cfg = pacs_and_ris()
    cfg.intake = {"enabled": False}
    cfg.write(rules.parent)
    cp = run("send", rules, "-c", rules)
    assert cp.returncode == 2
    assert "intake is disabled" in one_error_line(cp)


def test_send_refuses_the_spool_itself_or_a_folder_in_or_around_it(rules: Path,
                                                                   tmp_path: Path) -> None:
    """Sending the spool (success/ among it) would deliver every instance again."""
    spool = _spool(rules)
    put(spool, spool.success_dir("pacs"), sop="1.2.3")
    for target in (spool.root, spool.success_dir("pacs"), rules.parent):
        cp = run("send", target, "-c", rules)
        assert cp.returncode == 2, cp.stdout
        assert "is the spool or inside it" in one_error_line(cp)
    assert not any(spool.drop.iterdir())


def test_status_says_stalled_when_a_dispatcher_stops_reporting(rules: Path) -> None:
    """A dispatcher rewrites its state file every heartbeat (30 s) while it runs; one that
    is stopped (SIGSTOP), hung or gone must not keep looking ok."""
    spool = _spool(rules)
    now = time.time()
    put(spool, None, sop="1.5.1", dest="pacs", received=now - 600)
    for name, age in (("pacs", 600.0), ("ris", 5.0)):
        spool.write_json(spool.state_file(name), {
            "destination": name, "state": "ok", "backoff_until": None,
            "consecutive_failures": 0, "last_error": None, "last_success": None,
            "updated_at": now_iso(now - age)})
    snap = json.loads(run("status", "--json", "-c", rules).stdout)
    assert snap["destinations"]["pacs"]["state"] == "stalled"
    assert snap["destinations"]["ris"]["state"] == "ok"
    text = run("status", "-c", rules).stdout
    assert "STALLED (no report for 10m)" in text


# ---------------------------------------------------------------- resend


def test_resend_queues_hard_links_for_another_destination(rules: Path) -> None:
    """Copies delivered to or failed at pacs go to ris as links of the same file, each
    sidecar saying where it came from and who asked; a second run queues nothing new."""
    spool = _spool(rules)
    study = generate_uid()
    err = {"stage": "dispatch", "reason": "0xA900", "at": "t", "destination": "pacs"}
    done = put(spool, spool.success_dir("pacs"), sop="5.1", study=study, dest="pacs")
    failed = put(spool, spool.error_dir("pacs"), sop="5.2", study=study, dest="pacs", error=err)
    other = put(spool, spool.success_dir("pacs"), sop="5.3", dest="pacs")

    cp = run("resend", "--to", "ris", "--study", study, "-c", rules)
    assert cp.returncode == 0, cp.stderr
    assert "queued 2 instance(s) for ris" in cp.stdout, cp.stdout
    assert "error/pacs: 1" in cp.stdout and "success/pacs: 1" in cp.stdout
    queued = spool.outbox("ris")
    assert _names(queued) == {done.name, failed.name}
    assert (queued / done.name).stat().st_ino == done.stat().st_ino  # a link, not a copy
    side = json.loads((queued / failed.name).with_suffix(".json").read_text())
    assert side["destination"] == "ris" and side["attempts"] == 0 and "error" not in side
    assert side["resent"]["from"] == "error/pacs" and side["resent"]["by"]
    assert "resent sop=5.2 dest=ris" in cp.stderr

    again = run("resend", "--to", "ris", "--study", study, "-c", rules)
    assert again.returncode == 0 and "queued 0" in again.stdout
    assert "2 already queued" in again.stdout

    by_uid = run("resend", "--to", "ris", "5.3", "--from", "pacs", "-c", rules)
    assert by_uid.returncode == 0 and _names(queued) == {done.name, failed.name, other.name}

    nothing = run("resend", "--to", "ris", "--series", "9.9.9", "-c", rules)
    assert nothing.returncode == 1 and "nothing to resend" in nothing.stdout
    unknown = run("resend", "--to", "nowhere", "5.1", "-c", rules)
    assert unknown.returncode == 2 and "unknown destination 'nowhere'" in one_error_line(unknown)
