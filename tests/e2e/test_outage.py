"""Destinations that are down: the reason a store-and-forward router exists.

Scenario 1: a destination down from the start, a few hundred instances received, the
destination comes up: everything arrives, nothing in error/.
Scenario 2: two destinations, one down: the live one gets everything meanwhile (one
destination never delays another), the other its backlog when it returns.
Scenario 7: give_up_after expires while a destination is down: error/<dest>/ with a reason;
``hermes-py retry NAME`` brings them back and they are delivered when it returns.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.harness import (
    assert_delivered,
    folder_arrivals,
    scp_arrivals,
    sent_index,
    wait_delivered,
)
from tests.support.config import Dest
from tests.support.dicomgen import make_corpus
from tests.support.peers import Storescp, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def storescp_uids(peer: Storescp, n: int) -> set[str]:
    """Cheap while fewer files than wanted are there; parse only when it can be complete."""
    return peer.uids() if len(peer.files()) >= n else set()


@pytest.mark.timeout(300)
def test_destination_down_from_start_then_up(tmp_path: Path, hermes, storescp) -> None:
    dest = Dest("pacs", ae_title="STORESCP")
    h = hermes([dest])
    files = make_corpus(tmp_path / "corpus", 300, per_series=60)
    sent = sent_index(files)
    h.start()

    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_for(lambda: h.queued("pacs") == len(sent), 120, interval=0.3,
             what="all 300 instances queued for the down destination")
    wait_for(lambda: h.state("pacs").get("state") == "backoff", 30, interval=0.3,
             what="state/pacs.json to say backoff while the destination is down")
    assert not h.all_errors(), f"destination down is not an error: {h.all_errors()[:3]}"

    peer = storescp(dest)
    wait_delivered(lambda: storescp_uids(peer, len(sent)), set(sent),
                   what="the backlog at storescp after it came up", hermes=h)
    assert_delivered(sent, folder_arrivals(peer.folder), where="storescp")
    wait_for(lambda: h.queued("pacs") == 0 and len(h.delivered("pacs")) == len(sent), 60,
             what="the outbox drained into success/pacs/")
    assert not h.all_errors(), f"instances in error/: {h.all_errors()[:3]}"
    h.stop()


@pytest.mark.timeout(300)
def test_two_destinations_one_down(tmp_path: Path, hermes, scp, storescp) -> None:
    live = Dest("live", ae_title="LIVE")
    down = Dest("down", ae_title="STORESCP")
    h = hermes([live, down])
    live_peer = scp(live)
    files = make_corpus(tmp_path / "corpus", 200, per_series=50)
    sent = sent_index(files)
    h.start()

    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_delivered(lambda: live_peer.uids, set(sent),
                   what="everything at the live destination while the other is down", hermes=h)
    # (polled: an instance moving between the outbox and a probe's claim is briefly in neither)
    wait_for(lambda: h.queued("down") == len(sent), 30, interval=0.2,
             what=f"all {len(sent)} instances waiting for 'down' (fan-out is per instance)")
    assert not h.in_error("down")

    peer = storescp(down)
    wait_delivered(lambda: storescp_uids(peer, len(sent)), set(sent),
                   what="the backlog of 'down' after it came up", hermes=h)
    assert_delivered(sent, scp_arrivals(live_peer), where="live")
    assert_delivered(sent, folder_arrivals(peer.folder), where="down (storescp)")
    assert live_peer.count() == len(sent), (
        f"the live destination got {live_peer.count()} stores for {len(sent)} instances: "
        "the outage of another destination caused resends")
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(240)
def test_give_up_after_then_retry(tmp_path: Path, hermes, scp) -> None:
    dest = Dest("flaky", options={"give_up_after": "3s"})
    h = hermes([dest])
    files = make_corpus(tmp_path / "corpus", 6)
    sent = sent_index(files)
    h.start()

    res = h.send(files)
    assert res.acked == set(sent), res.describe()
    wait_for(lambda: len(h.in_error("flaky")) == len(sent), 90, interval=0.3,
             what="every instance in error/flaky/ once give_up_after (3s) expired")
    assert h.queued("flaky") == 0
    for path, sidecar in h.in_error("flaky"):
        err = sidecar.get("error") or {}
        assert err.get("reason"), f"{path.name}: no reason in its sidecar: {sidecar}"
        assert sidecar.get("sop_instance_uid") in sent, f"{path.name}: sidecar lost its UID"

    peer = scp(dest)
    r = h.cli("retry", "flaky")
    assert r.returncode == 0, f"hermes-py retry flaky: rc={r.returncode} {r.stderr}"
    wait_delivered(lambda: peer.uids, set(sent), what="retried instances delivered", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="flaky")
    wait_for(lambda: not h.in_error("flaky") and len(h.delivered("flaky")) == len(sent), 60,
             what="error/flaky/ empty and everything in success/flaky/")
    h.stop()


@pytest.mark.timeout(180)
def test_hold_then_release(tmp_path: Path, hermes, scp) -> None:
    """``hermes-py hold NAME`` while serve runs: instances keep queueing, nothing is sent;
    ``release NAME``: the queue drains."""
    dest = Dest("pacs")
    h = hermes([dest])
    peer = scp(dest)
    files = make_corpus(tmp_path / "corpus", 20)
    sent = sent_index(files)
    h.start()
    r = h.cli("hold", "pacs")
    assert r.returncode == 0, r.stderr
    assert h.send(files).acked == set(sent)
    wait_for(lambda: h.queued("pacs") == len(sent), 60, what="everything queued while held")
    # An admin flushes the held destination: its dispatcher makes all of them due now
    # (and says so in the log), and still sends none. A second flush answered proves the
    # dispatcher has had its pass after the first, in which a due instance would go.
    for _ in range(2):
        offset = h.log_size()
        r = h.cli("flush", "pacs")
        assert r.returncode == 0 and "is held" in r.stdout, r.stdout + r.stderr
        line = wait_for(lambda off=offset: re.search(
            r"destination pacs: FLUSH requested: (\d+) queued", h.log_since(off)), 60,
            what="the held dispatcher to act on the flush")
        assert int(line.group(1)) == len(sent), line.group(0)
    assert peer.count() == 0, f"{peer.count()} instance(s) sent to a held destination"
    r = h.cli("release", "pacs")
    assert r.returncode == 0, r.stderr
    wait_delivered(lambda: peer.uids, set(sent), what="the queue after release", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    h.stop()
