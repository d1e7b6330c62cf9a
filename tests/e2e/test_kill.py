"""Crashes and shutdowns during a relay: nothing the modality was answered Success for is lost.

Scenario 3: kill -9 of serve's whole process group at random moments while ~1,000 small
instances are received and relayed, several times in a row, restarting each time and
letting the modality resend what it was not answered Success for (what a real modality
does). Every acknowledged instance must arrive; duplicates (at-least-once) are counted
and stay within what can be in flight at a kill: one batch per dispatcher association,
plus the one instance the receiver had stored but not yet acknowledged.

Scenario 6 (part): SIGTERM in the middle of a transfer: exit 0, nothing lost.

The kill moments come from a seeded RNG; the seed is printed (set HERMES_E2E_SEED to
replay a failure).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    assert_delivered,
    duplicates,
    folder_arrivals,
    scp_arrivals,
    sent_index,
    wait_delivered,
)
from tests.support.config import Dest
from tests.support.dicomgen import make_corpus
from tests.support.peers import Script, wait_for
from tests.support.serve import group_members

pytestmark = [pytest.mark.e2e, pytest.mark.network]

BATCH = 25  # instances per association: the bound on resends per kill


@pytest.mark.timeout(420)
def test_kill9_during_relay_loses_nothing_acknowledged(tmp_path: Path, hermes, scp) -> None:
    seed = int(os.environ.get("HERMES_E2E_SEED", str(time.time_ns() % 10**6)))
    print(f"HERMES_E2E_SEED={seed}")
    rng = random.Random(seed)
    dest = Dest("pacs", options={"batch_size": BATCH})
    h = hermes([dest])
    peer = scp(dest)
    files = make_corpus(tmp_path / "corpus", 1000, per_series=100)
    sent = sent_index(files)
    uid_of = {p: str(ds.SOPInstanceUID) for p, ds in zip(files, sent.values(), strict=True)}

    acked: set[str] = set()
    kills = 4
    for k in range(kills):
        h.start()
        todo = [p for p in files if uid_of[p] not in acked]
        modality = h.send_async(todo)
        # Kill at a random moment of this relay: while receiving, routing and sending.
        at = rng.uniform(0.3, 2.5)
        deadline = time.monotonic() + at
        while time.monotonic() < deadline and modality.proc.poll() is None:
            time.sleep(0.02)
        h.kill9()
        res = modality.result()
        acked |= res.acked
        print(f"kill {k + 1} after {at:.2f}s: {len(res.acked)} acknowledged this round, "
              f"{len(acked)} in total, {peer.count()} stores at the destination")

    h.start()
    todo = [p for p in files if uid_of[p] not in acked]
    res = h.send(todo)
    acked |= res.acked
    assert acked == set(sent), (f"a healthy router must accept the rest: {res.describe()}")

    wait_delivered(lambda: peer.uids, acked, what="every acknowledged instance", hermes=h)
    wait_for(lambda: h.queued("pacs") == 0, 60, what="the outbox to drain")
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, expect=acked, where="pacs")
    dups = duplicates(arrived)
    # Per kill: one batch on the dispatcher's association, one stored-but-unanswered
    # C-STORE at the receiver (the modality resends it), one instance the router linked
    # but had not yet unlinked from incoming/.
    bound = kills * (BATCH + 2)
    print(f"{len(arrived)} distinct instances arrived, {dups} duplicate(s), bound {bound}")
    assert dups <= bound, f"{dups} duplicates after {kills} kills, more than the bound {bound}"
    assert not h.all_errors(), f"instances in error/ after crashes: {h.all_errors()[:3]}"
    h.stop()


@pytest.mark.timeout(300)
def test_sigterm_mid_transfer_exits_0_and_loses_nothing(tmp_path: Path, hermes, scp) -> None:
    dest = Dest("pacs", options={"batch_size": BATCH})
    h = hermes([dest])
    # A slow destination, so the dispatcher is certainly mid-batch at SIGTERM.
    peer = scp(dest, Script(delay=0.02))
    files = make_corpus(tmp_path / "corpus", 300)
    sent = sent_index(files)
    uid_of = {p: str(ds.SOPInstanceUID) for p, ds in zip(files, sent.values(), strict=True)}
    h.start()

    modality = h.send_async(files)
    wait_for(lambda: peer.count() >= 20 or modality.proc.poll() is not None, 120,
             what="the relay to be under way")
    h.stop()  # asserts exit 0 and that every child is gone
    res = modality.result()
    acked = set(res.acked)

    h.start()
    res2 = h.send([p for p in files if uid_of[p] not in acked])
    acked |= res2.acked
    assert acked == set(sent), res2.describe()
    wait_delivered(lambda: peer.uids, acked, what="every acknowledged instance after restart",
                   hermes=h)
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, where="pacs")
    dups = duplicates(arrived)
    print(f"{dups} duplicate(s) after a clean SIGTERM")
    assert dups <= BATCH + 1, f"{dups} duplicates after one clean shutdown"
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(300)
def test_kill9_single_pieces_while_relaying(tmp_path: Path, hermes, scp) -> None:
    """kill -9 of one piece at a time (router, dispatcher, receiver) while serve keeps
    running: serve restarts it, the piece recovers its own in-flight work, and everything
    acknowledged arrives."""
    seed = int(os.environ.get("HERMES_E2E_SEED", str(time.time_ns() % 10**6)))
    print(f"HERMES_E2E_SEED={seed}")
    rng = random.Random(seed)
    dest = Dest("pacs", options={"batch_size": BATCH})
    h = hermes([dest])
    peer = scp(dest, Script(delay=0.005))
    files = make_corpus(tmp_path / "corpus", 400)
    sent = sent_index(files)
    uid_of = {p: str(ds.SOPInstanceUID) for p, ds in zip(files, sent.values(), strict=True)}
    h.start()

    acked: set[str] = set()
    kills = 0
    for verb in ("route", "dispatch", "receive", "dispatch", "route"):
        modality = h.send_async([p for p in files if uid_of[p] not in acked])
        time.sleep(rng.uniform(0.3, 1.5))
        pids = h.pids(verb)
        assert pids, f"no {verb} child under serve"
        h.kill(pids)
        kills += 1
        acked |= modality.result().acked
        # serve restarts it; the receiver must answer again before the next round.
        wait_for(lambda v=verb, old=set(pids): h.pids(v) and not set(h.pids(v)) & old,
                 60, what=f"serve to restart {verb}")
        h.wait_ready()
    res = h.send([p for p in files if uid_of[p] not in acked])
    acked |= res.acked
    assert acked == set(sent), res.describe()
    wait_delivered(lambda: peer.uids, acked, what="every acknowledged instance", hermes=h)
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, where="pacs")
    dups = duplicates(arrived)
    print(f"{dups} duplicate(s) after {kills} single-piece kills")
    assert dups <= kills * (BATCH + 2)
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(420)
def test_kill9_with_everything_on(tmp_path: Path, hermes, scp, storescp) -> None:
    """kill -9 with the moving parts that have their own crash recovery all in use: two
    receiver processes on one port, series-level hold (pending/), two associations per
    destination, fan-out to a scripted SCP and a DCMTK storescp."""
    seed = int(os.environ.get("HERMES_E2E_SEED", str(time.time_ns() % 10**6)))
    print(f"HERMES_E2E_SEED={seed}")
    rng = random.Random(seed)
    fast = Dest("fast", options={"batch_size": BATCH, "max_associations": 2})
    store = Dest("store", ae_title="STORESCP", options={"batch_size": BATCH})
    rules = ('[[rules]]\nname = "whole series"\nlevel = "series"\nquiet_for = "1s"\n'
             'to = ["fast", "store"]\n')
    h = hermes([fast, store], rules=rules, receiver={"processes": 2})
    peer = scp(fast)
    dcmtk = storescp(store)
    files = make_corpus(tmp_path / "corpus", 400, per_series=40)
    sent = sent_index(files)
    uid_of = {p: str(ds.SOPInstanceUID) for p, ds in zip(files, sent.values(), strict=True)}

    acked: set[str] = set()
    kills = 3
    for _ in range(kills):
        h.start()
        modality = h.send_async([p for p in files if uid_of[p] not in acked])
        deadline = time.monotonic() + rng.uniform(0.5, 3.0)
        while time.monotonic() < deadline and modality.proc.poll() is None:
            time.sleep(0.02)
        h.kill9()
        acked |= modality.result().acked
    h.start()
    res = h.send([p for p in files if uid_of[p] not in acked])
    acked |= res.acked
    assert acked == set(sent), res.describe()

    wait_delivered(lambda: peer.uids, acked, what="everything at 'fast'", hermes=h)
    wait_delivered(lambda: dcmtk.uids() if len(dcmtk.files()) >= len(acked) else set(), acked,
                   what="everything at 'store' (storescp)", hermes=h)
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, where="fast")
    assert_delivered(sent, folder_arrivals(dcmtk.folder), where="store")
    dups = duplicates(arrived)
    print(f"{dups} duplicate(s) at 'fast' after {kills} kills")
    assert dups <= kills * (2 * BATCH + 2)
    assert not h.all_errors(), f"instances in error/ after crashes: {h.all_errors()[:3]}"
    h.stop()


@pytest.mark.timeout(300)
def test_kill9_of_serve_alone_children_follow_and_restart_works(tmp_path: Path, hermes,
                                                                scp) -> None:
    """kill -9 of the supervisor only (an OOM killer's choice): its children must not live
    on as orphans holding the port, the claims or the locks; a new serve starts at once and
    everything acknowledged arrives."""
    dest = Dest("pacs", options={"batch_size": BATCH})
    h = hermes([dest])
    peer = scp(dest, Script(delay=0.005))
    files = make_corpus(tmp_path / "corpus", 300)
    sent = sent_index(files)
    uid_of = {p: str(ds.SOPInstanceUID) for p, ds in zip(files, sent.values(), strict=True)}
    h.start()
    modality = h.send_async(files)
    wait_for(lambda: peer.count() >= 20 or modality.proc.poll() is not None, 120,
             what="the relay to be under way")
    pgid = h.kill_serve()
    acked = set(modality.result().acked)
    wait_for(lambda: not group_members(pgid), 30,
             what="serve's children to exit after their parent was killed")
    h.start()
    res = h.send([p for p in files if uid_of[p] not in acked])
    acked |= res.acked
    assert acked == set(sent), res.describe()
    wait_delivered(lambda: peer.uids, acked, what="every acknowledged instance", hermes=h)
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, where="pacs")
    assert duplicates(arrived) <= BATCH + 2
    assert not h.all_errors()
    h.stop()
