"""The spool primitives every stage relies on: names, atomic moves, claims, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermes_py import spool as sp
from hermes_py.spool import Lock, Spool, Worker
from tests.peers import wait_for


def _instance(s: Spool, folder: Path, uid: str = "1.2.3", data: bytes = b"x" * 100,
              **side: object) -> Path:
    tmp = s.tmp_path(".dcm")
    tmp.write_bytes(data)
    name = sp.new_name(uid)
    return s.publish(tmp, folder, name, {"name": name, "sop_instance_uid": uid, **side})


@given(st.text())
def test_sanitize_is_one_safe_component(value: str) -> None:
    out = sp.sanitize(value)
    assert out and "/" not in out and "\0" not in out
    assert out not in (".", "..") and not out.startswith(".")
    assert len(out) <= 64
    assert sp.sanitize(value) == out


@given(st.binary(max_size=200))
def test_names_from_hostile_uids_stay_inside(tmp_path_factory: pytest.TempPathFactory,
                                             uid: bytes) -> None:
    name = sp.new_name(uid)
    assert sp.is_name(name)
    base = Path("/spool/incoming")
    assert (base / (name + ".dcm")).resolve().parent == base


def test_same_uid_twice_gets_two_names() -> None:
    assert sp.new_name("1.2.3") != sp.new_name("1.2.3")
    hostile = sp.new_name("../../etc/x")
    assert "_.._etc_x_" in hostile and "/" not in hostile


def test_names_sort_by_receive_time() -> None:
    a = sp.new_name("9.9", when=1_000_000.0)
    b = sp.new_name("1.1", when=1_000_001.5)
    assert a < b
    assert sp.received_at(b) == pytest.approx(1_000_001.5)


def test_publish_writes_sidecar_first_and_is_atomic(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["pacs"])
    dcm = _instance(s, s.incoming, calling_ae="CT1")
    assert dcm.read_bytes() == b"x" * 100
    assert s.read_sidecar(dcm)["calling_ae"] == "CT1"
    assert list(s.tmp.iterdir()) == []


def test_link_fans_out_one_inode_and_is_idempotent(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a", "b"])
    dcm = _instance(s, s.incoming)
    la = s.link(dcm, s.outbox("a"), {"destination": "a"})
    lb = s.link(dcm, s.outbox("b"), {"destination": "b"})
    s.link(dcm, s.outbox("b"), {"destination": "b"})  # re-run after a crash
    assert os.stat(la).st_ino == os.stat(lb).st_ino == os.stat(dcm).st_ino
    assert os.stat(dcm).st_nlink == 3
    assert s.read_sidecar(lb)["destination"] == "b"


def test_move_with_new_sidecar_and_next_attempt(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    dcm = _instance(s, s.outbox("a"))
    later = time.time() + 3600
    moved = s.move(dcm, s.success_dir("a"), {"delivered": True}, mtime=later)
    assert not dcm.exists() and not s.sidecar_of(dcm).exists()
    assert s.read_sidecar(moved) == {"delivered": True}
    assert s.next_attempt(moved) == pytest.approx(later)


def test_oldest_and_count_respect_due_time(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    box = s.outbox("a")
    paths = [_instance(s, box, uid=f"1.{i}") for i in range(5)]
    future = time.time() + 600
    s.set_next_attempt(paths[0], future)
    now = time.time()
    due = s.oldest(box, 10, due_before=now)
    assert paths[0] not in due and len(due) == 4
    assert due == sorted(due)
    c = s.count(box, now)
    assert (c.queued, c.due) == (5, 4)
    assert c.oldest is not None and c.oldest <= now


def test_quarantine_keeps_reason(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    junk = s.drop / "sub" / "notes.txt"
    junk.parent.mkdir(parents=True)
    junk.write_text("hello")
    moved = s.quarantine(junk, "not a DICOM file", stage="intake")
    side = s.read_sidecar(moved)
    assert side["error"]["reason"] == "not a DICOM file"
    assert side["original_path"].endswith("notes.txt")
    assert not junk.exists() and moved.read_text() == "hello"


def test_flock_is_released_when_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "router.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert not Lock(path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lk = Lock(path)
        assert wait_for(lambda: lk.held or lk.acquire(), 5, what="lock after kill -9")
        lk.release()
    finally:
        holder.kill()
        holder.wait()


def test_claims_are_exclusive_and_dead_workers_recovered(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    box = s.outbox("a")
    paths = [_instance(s, box, uid=f"2.{i}", priority="normal") for i in range(3)]
    w1, w2 = Worker(s, "a"), Worker(s, "a")
    w1.start()
    w2.start()
    got1 = w1.claim(paths[0])
    assert got1 is not None and got1.exists()
    assert w2.claim(paths[0]) is None  # already taken
    assert Worker.recover(s, "a") == 0  # both owners alive
    # simulate w1 dying: the kernel drops its flock
    w1._lock.release()
    assert Worker.recover(s, "a") == 1
    assert (box / paths[0].name).exists() and s.sidecar_of(box / paths[0].name).exists()
    assert not w1.dir.exists()
    w2.stop()
    assert sorted(p.name for p in box.glob("*.dcm")) == sorted(p.name for p in paths)


def test_urgent_claims_return_to_urgent_outbox(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    dcm = _instance(s, s.outbox("a", "urgent"), priority="urgent")
    w = Worker(s, "a")
    w.start()
    claimed = w.claim(dcm)
    assert claimed is not None
    w.stop()
    assert (s.outbox("a", "urgent") / dcm.name).exists()


def test_sweep_tmp_removes_only_stale(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure()
    old = s.tmp_path(".dcm")
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = s.tmp_path(".dcm")
    fresh.write_bytes(b"in progress")
    assert s.sweep_tmp(3600) == 1
    assert fresh.exists() and not old.exists()
