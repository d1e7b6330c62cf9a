"""Failover decisions on a fake clock: when it starts, why a flapping primary does not
ping-pong, and what a crash between two steps leaves for ``reconcile``.

The Failover object is driven as the dispatcher's upkeep drives it, with the
destination's state fed the failures and successes a real dispatcher records and a
probe the test answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from hermes_py import failover
from hermes_py.destination_state import DestinationState
from hermes_py.destinations.base import Probe
from hermes_py.failover import Failover
from hermes_py.lifecycle import DestinationStatus
from hermes_py.outcomes import LinkFailure, LinkKind
from hermes_py.spool import Spool
from tests.support.config import Dest, rule
from tests.support.spool import put

REFUSED = LinkFailure(LinkKind.REFUSED, "nothing listens")


class Peer:
    """The primary as the probe sees it."""

    def __init__(self) -> None:
        self.up = False
        self.probes = 0

    def probe(self) -> Probe:
        self.probes += 1
        return Probe(self.up, "OK" if self.up else "connection refused")


def setup(make_settings: Any, mode: str) -> tuple[Spool, DestinationState, Failover, Peer]:
    cfg = make_settings(
        Dest("pacs", options={"failover_to": "backup", "failover_mode": mode,
                              "failover_after": "15m", "failback_after": "2m",
                              "initial_delay": "30s", "max_delay": "1m"}),
        Dest("backup"), rules=rule("all", ["pacs"]))
    spool = Spool(cfg.spool.path)
    state = DestinationState(spool, cfg.destination("pacs"), random.Random(1))
    peer = Peer()
    policy = cfg.destination("pacs").failover
    assert policy is not None
    fo = Failover(spool, "pacs", policy, state, peer.probe, lambda: 0)
    return spool, state, fo, peer


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.dcm")}


def run(fo: Failover, state: DestinationState, start: float, end: float,
        step: float = 5.0) -> None:
    """Upkeep every ``step`` seconds, probes allowed whenever the backoff says so."""
    t = start
    while t <= end:
        if state.backoff_until is not None and state.backoff_until <= t:
            state.backoff_until = t  # due now on the fake clock
        fo.upkeep(t)
        t += step


def test_failover_only_after_failover_after_without_a_break(make_settings: Any) -> None:
    spool, state, fo, _ = setup(make_settings, "divert")
    t0 = 1_000_000.0
    state.failure(REFUSED, t0, 3)
    fo.upkeep(t0 + 14 * 60)
    assert failover.read(spool, "pacs") is None, "failed over before failover_after"
    state.success(t0 + 14 * 60 + 1, t0 + 14 * 60 + 1)  # one answer resets the clock
    state.failure(REFUSED, t0 + 15 * 60, 3)
    fo.upkeep(t0 + 16 * 60)
    assert failover.read(spool, "pacs") is None, "the outage restarted at the answer"
    fo.upkeep(t0 + 30 * 60 + 1)
    rec = failover.read(spool, "pacs")
    assert rec is not None and rec["to"] == "backup" and rec["mode"] == "divert"
    assert "connection refused" in rec["reason"]


def test_a_flapping_primary_does_not_fail_back(make_settings: Any) -> None:
    spool, state, fo, peer = setup(make_settings, "divert")
    t0 = 1_000_000.0
    state.failure(REFUSED, t0, 1)
    fo.upkeep(t0 + 901)
    assert fo.diverting
    # up 60 s, down, up 60 s, down ... for half an hour: never failback_after (2m) in a row
    t = t0 + 905
    while t < t0 + 905 + 1800:
        peer.up = int((t - t0) // 60) % 2 == 0
        if state.backoff_until is not None and state.backoff_until <= t:
            state.backoff_until = t
        fo.upkeep(t)
        assert failover.read(spool, "pacs") is not None, f"failed back at {t - t0:.0f}s"
        t += 5
    assert peer.probes > 20, "the primary was probed while failed over"
    peer.up = True
    run(fo, state, t, t + 200)
    assert failover.read(spool, "pacs") is None, "no failback after 2m of success"
    assert state.state is DestinationStatus.OK


def test_divert_moves_the_queue_and_failback_returns_what_was_not_sent(
        make_settings: Any) -> None:
    spool, state, fo, peer = setup(make_settings, "divert")
    a = put(spool, dest="pacs")
    b = put(spool, dest="pacs", priority="urgent")
    t0 = 1_000_000.0
    state.failure(REFUSED, t0, 2)
    fo.upkeep(t0 + 901)
    queue = spool.failover_queue("backup", "pacs")
    assert names(queue) == {a.name, b.name}
    assert names(spool.diverted_dir("pacs")) == {a.name, b.name}
    assert not names(spool.outbox("pacs")) and not names(spool.outbox("pacs", "urgent"))
    assert spool.outboxes("backup")[1] == queue, "the backup drains it after urgent/"
    side = json.loads((queue / b.name).with_suffix(".json").read_text())
    assert side["destination"] == "backup" and side["priority"] == "urgent"
    assert side["failover"]["from"] == "pacs"
    # the backup delivered a (moved it out of its queue); b is still waiting there
    success = spool.success_dir("backup")
    spool.move(queue / a.name, success)
    peer.up = True
    run(fo, state, t0 + 1000, t0 + 1200)
    assert failover.read(spool, "pacs") is None
    assert names(spool.outbox("pacs", "urgent")) == {b.name}, "b went back, urgent still"
    assert not names(queue)
    assert names(spool.diverted_dir("pacs")) == {a.name}, "a's record says: via the backup"
    back = json.loads((spool.outbox("pacs", "urgent") / b.name).with_suffix(".json")
                      .read_text())
    assert back["destination"] == "pacs" and "failover" not in back
    assert back["history"][-1]["outcome"] == "returned"


def test_reconcile_links_a_diverted_record_that_lost_its_backup_copy(
        make_settings: Any) -> None:
    """kill -9 between the move to diverted/ and the link into the backup's queue."""
    spool, state, fo, _ = setup(make_settings, "divert")
    a = put(spool, dest="pacs")
    t0 = 1_000_000.0
    state.failure(REFUSED, t0, 1)
    fo.upkeep(t0 + 901)
    queue = spool.failover_queue("backup", "pacs")
    spool.remove(queue / a.name)  # as if the link never happened
    assert not names(queue)
    assert fo.reconcile() == 1
    assert names(queue) == {a.name}
    assert fo.reconcile() == 0


def test_copy_links_and_keeps_the_primary_queue(make_settings: Any) -> None:
    spool, state, fo, _ = setup(make_settings, "copy")
    a = put(spool, dest="pacs")
    t0 = 1_000_000.0
    state.failure(REFUSED, t0, 1)
    fo.upkeep(t0 + 901)
    fo.upkeep(t0 + 906)  # a second pass copies nothing twice
    queue = spool.failover_queue("backup", "pacs")
    assert names(queue) == {a.name} and names(spool.outbox("pacs")) == {a.name}
    assert (queue / a.name).stat().st_ino == a.stat().st_ino
    assert not fo.diverting
