"""Scenario 6 (intake and operations): bad input and edits while serve runs.

- Junk and truncated files dropped into spool/drop/ go to error/ with a reason beside
  them; good files dropped with them (nested folders, odd names, no preamble) are
  delivered; the router keeps serving.
- A file still being written (a slow copy that keeps the file open) is not taken early.
- An invalid edit of rules.toml while running (saved, then SIGHUP as ``systemctl reload``
  sends): the old rules keep working, an error is logged. A valid edit before it proves the
  reload is real, not a router that never reads the file again.

(SIGTERM in the middle of a transfer is in test_kill.py.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.e2e.harness import assert_delivered, scp_arrivals, sent_index, wait_delivered
from tests.support.config import Dest, route_all
from tests.support.dicomgen import dataset_bytes, make_corpus, uid_of
from tests.support.peers import wait_for
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def drop_atomically(h: Hermes, rel: str, data: bytes) -> Path:
    """A complete file appears in drop/ at once (as `mv` from the same filesystem does)."""
    target = h.spool.drop / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = h.spool_dir / f".e2e-{os.getpid()}-{target.name}"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def files_in_drop(h: Hermes) -> list[Path]:
    return [p for p in h.spool.drop.rglob("*") if p.is_file()]


@pytest.mark.timeout(180)
def test_drop_junk_and_truncated_to_error_good_ones_delivered(tmp_path: Path, hermes,
                                                              scp) -> None:
    dest = Dest("pacs")
    h = hermes([dest])
    peer = scp(dest)
    good = make_corpus(tmp_path / "corpus", 4, rows=64, cols=64)
    sent = sent_index(good)
    whole = good[3].read_bytes()
    h.start()

    junk = {
        "notes.txt": b"this is not DICOM at all\n" * 20,
        "empty.dcm": b"",
        "random.bin": os.urandom(5000),
        "fake/preamble.dcm": b"\0" * 128 + b"DICM" + b"\xff\xfe garbage" * 50,
        "study9/truncated.dcm": whole[: len(whole) - 1000],  # cut inside the pixel data
    }
    for rel, data in junk.items():
        drop_atomically(h, rel, data)
    drop_atomically(h, "study1/IM0001", good[0].read_bytes())
    drop_atomically(h, "study1/series 2/IM 0002", good[1].read_bytes())
    drop_atomically(h, "IM0003.dcm", good[2].read_bytes())
    drop_atomically(h, "study1/nopreamble", dataset_bytes(good[3]))  # a raw dataset, no meta

    wait_delivered(lambda: peer.uids, set(sent), what="the good dropped files", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    wait_for(lambda: len(h.in_error()) >= len(junk) and not files_in_drop(h), 60, interval=0.3,
             what=f"{len(junk)} junk files in error/ and drop/ empty")
    errors = h.in_error()
    assert len(errors) == len(junk), [p.name for p, _ in errors]
    for rel in junk:
        name = Path(rel).name
        hits = [s for _, s in errors if str(s.get("original_path", "")).endswith(name)]
        assert hits, (f"no error/ entry names the dropped file {rel!r} (original_path): "
                      f"{[s.get('original_path') for _, s in errors]}")
        reason = (hits[0].get("error") or {}).get("reason")
        assert reason, f"{rel}: no reason in the error sidecar: {hits[0]}"
    assert h.running
    h.stop()


@pytest.mark.timeout(180)
def test_drop_file_still_being_written_is_not_taken_early(tmp_path: Path, hermes, scp) -> None:
    dest = Dest("pacs")
    # stable_for well above our write interval, so a loaded machine cannot fake "complete".
    h = hermes([dest], intake={"stable_for": "3s", "rescan_interval": "500ms"})
    peer = scp(dest)
    files = make_corpus(tmp_path / "corpus", 1, rows=128, cols=128)
    sent = sent_index(files)
    data = files[0].read_bytes()
    h.start()

    path = h.spool.drop / "slow" / "IM0001.dcm"
    path.parent.mkdir(parents=True)
    chunk = len(data) // 20
    with open(path, "wb") as f:
        for i in range(0, len(data) - chunk, chunk):
            f.write(data[i:i + chunk])
            f.flush()
            time.sleep(0.25)  # the slow writer itself, not a synchronisation
            assert path.exists(), f"taken after {i + chunk} of {len(data)} bytes"
            assert not h.all_errors(), "a file still being written went to error/"
        f.write(data[i + chunk:])
    wait_delivered(lambda: peer.uids, set(sent), what="the slowly written file", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    assert not h.all_errors()
    h.stop()


RULES_V2 = """
[[rules]]
name = "test patients"
match = { PatientID = "DISCARDME" }
action = "discard"

[[rules]]
name = "everything else"
exclude = { PatientID = "DISCARDME" }
to = ["pacs"]
"""


@pytest.mark.timeout(240)
def test_invalid_rules_edit_keeps_old_rules_running(tmp_path: Path, hermes, scp) -> None:
    dest = Dest("pacs")
    h = hermes([dest], rules=route_all([dest]))
    peer = scp(dest)
    h.start()

    # A valid edit takes effect without a restart: probe until one lands in discard/.
    h.config.rules = RULES_V2
    h.write_config()
    h.reload()
    probes = make_corpus(tmp_path / "probes", 30, patient_id="DISCARDME")
    deadline = time.monotonic() + 60
    for p in probes:
        assert h.send([p]).acked == {uid_of(p)}
        if wait_discarded(h, 1, 3.0) or time.monotonic() > deadline:
            break
    assert h.dcm_in(h.spool.discard), "a valid edit of rules.toml never took effect"

    # An invalid edit: an unknown destination. Error logged, the old (v2) rules keep working.
    offset = h.log_size()
    h.write_config(h.config.render().replace('to = ["pacs"]', 'to = ["nowhere"]'))
    h.reload()
    wait_for(lambda: config_error_logged(h.log_since(offset)), 60, interval=0.3,
             what="an error naming rules.toml in the log after the invalid edit")
    before = len(h.dcm_in(h.spool.discard))
    routed = make_corpus(tmp_path / "routed", 10)
    discarded = make_corpus(tmp_path / "discarded", 5, patient_id="DISCARDME")
    sent = sent_index(routed)
    assert h.send(routed).acked == set(sent)
    assert len(h.send(discarded).acked) == len(discarded)
    wait_delivered(lambda: peer.uids, set(sent), what="routing by the old rules", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), expect=set(sent), where="pacs")
    assert wait_discarded(h, before + len(discarded), 60), (
        f"the old rules' discard stopped working: {h.spool_listing()}")
    assert not (set(peer.uids) & {uid_of(p) for p in discarded})
    assert not h.all_errors()
    assert h.running
    h.stop()


def wait_discarded(h: Hermes, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(h.dcm_in(h.spool.discard)) >= n:
            return True
        time.sleep(0.1)
    return False


def config_error_logged(text: str) -> bool:
    return any(("ERROR" in ln or "WARNING" in ln) and "rules.toml" in ln
               for ln in text.splitlines())


@pytest.mark.timeout(240)
def test_piece_restarted_after_invalid_edit_still_serves(tmp_path: Path, hermes, scp) -> None:
    """The old rules must survive more than the running processes: a piece that crashes
    after an invalid edit is restarted by serve and must still route with the old rules,
    not exit on the file it cannot use (leaving the router down until someone notices)."""
    dest = Dest("pacs")
    h = hermes([dest])
    peer = scp(dest)
    h.start()
    offset = h.log_size()
    h.write_config(h.config.render().replace('to = ["pacs"]', 'to = ["nowhere"]'))
    h.reload()
    wait_for(lambda: config_error_logged(h.log_since(offset)), 60, interval=0.3,
             what="an error naming rules.toml in the log after the invalid edit")

    routers = h.pids("route")
    assert routers, "no route child found under serve"
    h.kill(routers)
    files = make_corpus(tmp_path / "corpus", 10)
    sent = sent_index(files)
    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_delivered(lambda: peer.uids, set(sent), timeout=60,
                   what="routing after the router was restarted with an invalid rules.toml "
                        "on disk", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    h.stop()
