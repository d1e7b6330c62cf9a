"""Scenario 4: the spool fills up during a receive.

On a real small filesystem (a tmpfs, where the machine lets us mount one) the receiver
hits ENOSPC for real; elsewhere ``min_free_mb`` above the free space stands in. Either
way: the modality is refused with 0xA700 for what was not stored (so it keeps its copy),
nothing it was answered Success for is lost or visible half-written, and receiving
resumes once space is free.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from hermes_py.spool import DCM, JSON, new_name
from hermes_py.spool import sidecar as sc
from hermes_py.spool.durable import dump_json
from tests.e2e.harness import (
    assert_delivered,
    difference,
    scp_arrivals,
    sent_index,
    wait_delivered,
)
from tests.support.config import Dest
from tests.support.dicomgen import make_corpus
from tests.support.peers import LOOPBACK, wait_for
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]

# A 10 MB tmpfs for the spool (skipped where it cannot be mounted:
# test_min_free_mb_refuses_then_resumes covers the refusal there).
FS_MB = 10
FILLER_MB = 6


def spool_instances(h: Hermes, drop: bool = False) -> dict[Path, Dataset]:
    """Every instance a stage can see (tmp/ excluded: it is nobody's until renamed), read.

    A dispatcher probing a down destination moves instances between its outbox and its
    claim folder meanwhile: one that moved is skipped here, so callers poll.
    """
    s = h.spool
    paths: list[Path] = []
    for folder in (s.incoming, s.pending, s.outgoing, s.active):
        if folder.is_dir():
            paths += folder.rglob("*.dcm")
    if drop and s.drop.is_dir():
        paths += [p for p in s.drop.rglob("*") if p.is_file()]
    out = {}
    for p in paths:
        try:
            out[p] = dcmread(p)
        except FileNotFoundError:
            continue
    return out


def uids_in(instances: dict[Path, Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in instances.values()}


@pytest.mark.timeout(300)
def test_spool_fills_on_a_small_filesystem(tmp_path: Path, small_fs, hermes, scp) -> None:
    fs = small_fs(FS_MB)
    dest = Dest("pacs")
    h = hermes([dest], spool_dir=fs / "spool")
    filler = fs / "filler.bin"
    with open(filler, "wb") as f:
        for _ in range(FILLER_MB):
            f.write(b"\xa5" * (1024 * 1024))
    # ~33 KB each, ~6.6 MB with sidecars: more than the ~4 MB left, less than the 10 MB.
    files = make_corpus(tmp_path / "corpus", 150, rows=128, cols=128)
    sent = sent_index(files)
    by_uid = dict(zip(sent, files, strict=True))
    h.start()

    res = h.send(files)
    acked = res.acked
    refused = set(sent) - acked
    assert acked, f"nothing was stored on a filesystem with ~4 MB free: {res.describe()}"
    assert refused, f"the filesystem never filled (test sizing is wrong): {res.describe()}"
    assert res.with_status(0xA700) == refused, (
        f"what was not stored must be answered 0xA700 (Out of Resources): {res.describe()}")

    # Nothing acknowledged lost, nothing visible half-written.
    wait_for(lambda: acked <= uids_in(spool_instances(h)), 30, interval=0.3,
             what="every acknowledged instance complete in the spool")
    for p, ds in spool_instances(h).items():
        uid = str(ds.SOPInstanceUID)
        assert uid in acked, f"{p} holds {uid}, which the modality was refused for"
        why = difference(sent[uid], ds)
        assert why is None, f"{p} is not what was sent: {why}"

    # Space comes back: the modality's retry of the refused ones is accepted.
    filler.unlink()
    res2 = h.send([by_uid[u] for u in sorted(refused)])
    assert res2.acked == refused, f"receiving did not resume after space was freed: " \
                                  f"{res2.describe()}"

    peer = scp(dest)
    wait_delivered(lambda: peer.uids, set(sent), what="everything once the destination is up",
                   hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    assert not h.all_errors(), f"a full disk is no reason for error/: {h.all_errors()[:3]}"
    h.stop()


@pytest.mark.timeout(240)
def test_min_free_mb_refuses_then_resumes(tmp_path: Path, hermes, scp) -> None:
    dest = Dest("pacs")
    h = hermes([dest], spool={"min_free_mb": 10**9})  # a petabyte: never available
    peer = scp(dest)
    files = make_corpus(tmp_path / "corpus", 20)
    sent = sent_index(files)
    h.start()

    res = h.send(files)
    assert res.with_status(0xA700) == set(sent), (
        f"below min_free_mb every C-STORE must be refused with 0xA700: {res.describe()}")
    assert not spool_instances(h, drop=True), (
        f"refused instances in the spool: {h.spool_listing()}")
    h.stop()
    assert peer.count() == 0

    h.config.spool["min_free_mb"] = 0
    h.write_config()
    h.start()
    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_delivered(lambda: peer.uids, set(sent), what="delivery once space is available",
                   hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    h.stop()


def fill_up(path: Path) -> None:
    """Grow ``path`` until the filesystem refuses another byte."""
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    f.write(b"\x5a" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break


@pytest.mark.timeout(240)
def test_router_and_intake_on_a_full_disk(tmp_path: Path, small_fs, hermes, scp) -> None:
    """The disk fills after instances were received but before they were routed, and
    while files sit in drop/: routing and intake wait for space, never quarantine or drop
    anything because of it, and finish once space is back."""
    fs = small_fs(FS_MB)
    dest = Dest("pacs")
    h = hermes([dest], spool_dir=fs / "spool")
    files = make_corpus(tmp_path / "corpus", 10, rows=64, cols=64)
    sent = sent_index(files)
    h.start()

    # Staged on the same filesystem while there is room: five instances exactly as the
    # receiver publishes them (its sidecar, docs/internals.md, then the .dcm), five files
    # a person drops. (Renamed in by hand below: no spool verb can write a sidecar on a
    # full disk, which is the point.)
    staging = fs / "staging"
    staging.mkdir()
    published = []
    for p, (uid, ds) in zip(files[:5], list(sent.items())[:5], strict=True):
        name = new_name(uid)
        sidecar = sc.network(name, uid, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                             calling_ae="MODALITY", called_ae="HERMES", peer_address=LOOPBACK,
                             peer_port=1, size=p.stat().st_size, received_by="e2e:1")
        (staging / f"{name}{JSON}").write_bytes(dump_json(sidecar))
        shutil.copyfile(p, staging / f"{name}{DCM}")
        published.append(name)
    for i, p in enumerate(files[5:]):
        shutil.copyfile(p, staging / f"dropped{i}.dcm")

    routers = set(h.pids("route"))
    assert routers, "no route child found under serve"
    offset = h.log_size()
    fill_up(fs / "filler.bin")
    for name in published:
        os.rename(staging / f"{name}{JSON}", h.spool.incoming / f"{name}{JSON}")
        os.rename(staging / f"{name}{DCM}", h.spool.incoming / f"{name}{DCM}")
    for i in range(5):
        os.rename(staging / f"dropped{i}.dcm", h.spool.drop / f"dropped{i}.dcm")

    # Until the router has met the full disk twice (it pauses between tries, several
    # intake rescans of 1s each) and the intake has failed to take every dropped file.
    def passes() -> bool:
        log = h.log_since(offset)
        return (len(re.findall(r"spool \S+ is full", log)) >= 2
                and all(re.search(rf"cannot move drop/dropped{i}\.dcm into incoming/.*will "
                                  r"retry", log) for i in range(5)))
    wait_for(passes, 60, what="two routing passes and five intake attempts on the full disk")
    assert h.running, "serve died on a full disk"
    assert set(h.pids("route")) == routers, (
        "the router crashed on a full disk (serve restarted it); it must wait for space")
    assert not h.all_errors(), (
        f"a full disk is no reason for error/: {[p.name for p in h.all_errors()]}")
    wait_for(lambda: uids_in(spool_instances(h, drop=True)) == set(sent), 30, interval=0.3,
             what="all ten instances still in the spool (incoming/, drop/ or queued)")
    for p, ds in spool_instances(h, drop=True).items():
        why = difference(sent[str(ds.SOPInstanceUID)], ds)
        assert why is None, f"{p} damaged on a full disk: {why}"

    (fs / "filler.bin").unlink()
    peer = scp(dest)
    wait_delivered(lambda: peer.uids, set(sent), what="everything once space is back", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    assert not h.all_errors()
    h.stop()
