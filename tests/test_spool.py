"""The spool primitives every stage relies on: atomic moves, claims, recovery.

(The properties of the names themselves are in test_properties.py.)
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hermes_py.spool import Lock, Spool, Worker, carried, durable
from tests.support.peers import wait_for
from tests.support.spool import put

DATA = b"x" * 100  # what an instance holds does not matter to these verbs


def test_publish_writes_sidecar_first_and_is_atomic(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["pacs"])
    dcm = put(s, s.incoming, DATA, sop="1.2.3", calling_ae="CT1")
    assert dcm.read_bytes() == DATA
    assert s.read_sidecar(dcm)["calling_ae"] == "CT1"
    assert list(s.tmp.iterdir()) == []


def test_publish_into_incoming_carries_the_sidecar_in_one_fsync_with_the_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data's fsync makes the sidecar durable too (an xattr is inode metadata): two
    fsyncs per published instance (data, folder), not three, and no .json in incoming/.
    Linked onward, the .json the router writes wins over what the file carries."""
    s = Spool(tmp_path)
    s.ensure(["a"])
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(
        f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    dcm = put(s, s.incoming, DATA, sop="1.2.3", calling_ae="CT1")
    monkeypatch.undo()
    assert len(synced) == 2, synced   # the data (still in tmp/), then incoming/
    assert synced[0].startswith(str(s.tmp) + "/") and synced[1] == str(s.incoming)
    assert not s.sidecar_of(dcm).exists()
    assert carried.carried(dcm)["calling_ae"] == "CT1"
    assert s.read_sidecar(dcm)["calling_ae"] == "CT1"
    out = s.link(dcm, s.outbox("a"), {"destination": "a"})
    assert s.read_sidecar(out) == {"destination": "a"}


def test_publish_without_xattrs_writes_the_json(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without user xattrs (ENOTSUP) gets the .json beside the .dcm."""
    def refuse(*_: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    s = Spool(tmp_path)
    s.ensure()
    dcm = put(s, s.incoming, DATA, sop="1.2.3", calling_ae="CT1")
    assert s.sidecar_of(dcm).exists() and carried.carried(dcm) == {}
    assert s.read_sidecar(dcm)["calling_ae"] == "CT1"
    assert list(s.tmp.iterdir()) == []


def test_link_fans_out_one_inode_and_is_idempotent(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a", "b"])
    dcm = put(s, s.incoming, DATA, sop="1.2.3")
    la = s.link(dcm, s.outbox("a"), {"destination": "a"})
    lb = s.link(dcm, s.outbox("b"), {"destination": "b"})
    s.link(dcm, s.outbox("b"), {"destination": "b"})  # re-run after a crash
    assert os.stat(la).st_ino == os.stat(lb).st_ino == os.stat(dcm).st_ino
    assert os.stat(dcm).st_nlink == 3
    assert s.read_sidecar(lb)["destination"] == "b"


def test_move_with_new_sidecar_and_next_attempt(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    dcm = put(s, s.outbox("a"), DATA, sop="1.2.3")
    later = time.time() + 3600
    moved = s.move(dcm, s.success_dir("a"), {"delivered": True}, mtime=later)
    assert not dcm.exists() and not s.sidecar_of(dcm).exists()
    assert s.read_sidecar(moved) == {"delivered": True}
    assert s.next_attempt(moved) == pytest.approx(later)


def test_oldest_respects_due_time(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    box = s.outbox("a")
    paths = [put(s, box, DATA, sop=f"1.{i}") for i in range(5)]
    future = time.time() + 600
    s.set_next_attempt(paths[0], future)
    now = time.time()
    due = s.oldest(box, 10, due_before=now)
    assert paths[0] not in due and len(due) == 4
    assert due == sorted(due)
    assert s.oldest(box, 2) == sorted(paths)[:2]


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
        assert wait_for(lk.acquire, 5, what="lock after kill -9")
        lk.release()
    finally:
        holder.kill()
        holder.wait()


def test_claims_are_exclusive_and_dead_workers_recovered(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    box = s.outbox("a")
    paths = [put(s, box, DATA, sop=f"2.{i}", dest="a") for i in range(3)]
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
    dcm = put(s, None, DATA, sop="1.2.3", dest="a", priority="urgent")
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


def test_private_tmp_is_per_owner_and_released(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure()
    assert s.tmp_dir == s.tmp
    own = s.use_private_tmp()
    assert own.parent == s.tmp and s.tmp_dir == own and s.use_private_tmp() == own
    assert s.tmp_path(".json").parent == own
    other = Spool(tmp_path)  # another stage in the same process: its own folder
    assert other.use_private_tmp() != own
    s.write_json(s.incoming / "x.json", {"a": 1})  # temps go through the own folder
    left = s.tmp_path(".json")
    left.write_bytes(b"nobody renamed this")
    s.release_private_tmp()
    assert not own.exists() and not (s.tmp / f"{own.name}.lock").exists()
    assert s.tmp_dir == s.tmp
    other.release_private_tmp()
    assert os.listdir(s.tmp) == []


def test_sweep_tmp_removes_a_dead_owners_folder_whole(tmp_path: Path) -> None:
    """A kill -9'd stage's folder goes at the next sweep, fresh files included; a live
    owner's folder loses only what is older than max_age."""
    s = Spool(tmp_path)
    s.ensure()
    code = textwrap.dedent(f"""
        import os
        from hermes_py.spool import Spool
        s = Spool({str(tmp_path)!r})
        s.use_private_tmp()
        s.tmp_path(".dcm").write_bytes(b"half an instance")
        print(s.tmp_dir.name, flush=True)
        os._exit(9)  # no release: as kill -9 leaves it
    """)
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    assert dead and len(list((s.tmp / dead).iterdir())) == 1
    live = Spool(tmp_path)
    own = live.use_private_tmp()
    fresh, stale = live.tmp_path(".dcm"), live.tmp_path(".json")
    fresh.write_bytes(b"being written")
    stale.write_bytes(b"forgotten")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert s.sweep_tmp(3600) == 2
    assert not (s.tmp / dead).exists() and not (s.tmp / f"{dead}.lock").exists()
    assert fresh.exists() and not stale.exists()
    assert (s.tmp / f"{own.name}.lock").exists()  # the live owner keeps its lock
    live.release_private_tmp()


def test_sidecar_batch_change_nothing_until_commit_then_everything(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    targets = [s.outbox("a") / f"{i}.json" for i in range(durable.SYNCFS_MIN_FILES + 3)]
    targets[0].write_text('{"old": true}')
    w = s.sidecar_batch()
    for i, t in enumerate(targets):
        w.write(t, {"i": i})
    assert len(w) == len(targets)
    assert s.read_json(targets[0]) == {"old": True} and not targets[1].exists()
    w.rollback(len(targets) - 1)  # the last one is forgotten
    w.commit()
    assert [s.read_json(t).get("i") for t in targets[:-1]] == list(range(len(targets) - 1))
    assert not targets[-1].exists() and len(w) == 0
    assert os.listdir(s.tmp) == []
    w.write(s.outbox("a") / "gone.json", {})
    w.rollback()
    assert not (s.outbox("a") / "gone.json").exists() and os.listdir(s.tmp) == []


def test_sidecar_batch_commit_failure_leaves_no_temp(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.ensure(["a"])
    w = s.sidecar_batch()
    w.write(s.outbox("a") / "ok.json", {"ok": 1})
    w.write(s.root / "missing" / "x.json", {"x": 1})  # its rename fails
    w.write(s.outbox("a") / "after.json", {"after": 1})
    with pytest.raises(FileNotFoundError):
        w.commit()
    assert s.read_json(s.outbox("a") / "ok.json") == {"ok": 1}
    assert not (s.outbox("a") / "after.json").exists()
    assert os.listdir(s.tmp) == [] and len(w) == 0


def test_fsync_all_many_files_and_folders(tmp_path: Path) -> None:
    files = []
    for i in range(durable.SYNCFS_MIN_FILES * 2):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    durable.fsync_all(files, [tmp_path, tmp_path])
    with pytest.raises(FileNotFoundError):  # a file that is not there is an error, not skipped
        durable.fsync_all([tmp_path / "nope"])


def test_sync_files_stops_using_syncfs_while_it_is_slow(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs writes out the whole filesystem: on one shared with a busy writer it is slow,
    and the spool falls back to plain fsyncs for a while (they alone are the promise)."""
    s = Spool(tmp_path)
    files = []
    for i in range(durable.SYNCFS_MIN_FILES):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    monkeypatch.setattr(durable, "SYNCFS_SLOW", 0.0)  # any syncfs counts as slow
    s.sync_files(files)
    paused_until = s._syncfs_after
    assert paused_until > time.monotonic() + durable.SYNCFS_PAUSE / 2
    s.sync_files(files)  # fsyncs only: the pause is not extended by a syncfs
    assert s._syncfs_after == paused_until
    monkeypatch.setattr(durable, "SYNCFS_SLOW", 3600.0)
    s._syncfs_after = 0.0
    s.sync_files(files)
    assert s._syncfs_after == 0.0


def test_a_claim_that_cannot_go_back_is_said_once_not_every_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A read-only spool fails every return until it is fixed: one line per instance, not
    one per dispatcher pass (33 per instance before), and the claim goes back after."""
    import errno
    s = Spool(tmp_path)
    s.ensure(["a"])
    put(s, None, sop="1.2.3", dest="a")
    w = Worker(s, "a")
    w.start()
    [claimed] = [w.claim(p) for p in s.oldest(s.outbox("a"), 10)]
    assert claimed is not None
    real_move = Spool.move

    def read_only(*a: object, **k: object) -> Path:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Spool, "move", read_only)
    for _ in range(5):
        assert w.return_all() == 0
    assert sum("cannot return" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(Spool, "move", real_move)
    assert w.return_all() == 1
    assert len(list(s.scan(s.outbox("a")))) == 1
    w.stop()
