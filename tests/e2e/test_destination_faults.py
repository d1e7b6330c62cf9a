"""Scenario 5: destinations that misbehave, each in its own way, all behind one router.

- ``busy`` answers 0xA700 (Out of Resources) three times, then accepts: transient, retried,
  everything arrives, nothing in error/.
- ``a900`` answers 0xA900 (data set does not match SOP class): permanent, error/a900/ at
  once with the reason, never retried.
- ``misconf`` rejects every association permanently (called AE not recognised): the
  destination is misconfigured; everything stays queued (never dumped into error/), and
  state and ``hermes-py status`` say so.
- ``plain`` accepts only uncompressed: JPEG, JPEG 2000, JPEG-LS and RLE instances routed to
  it arrive decompressed, with the same SOP Instance UID and equal pixel arrays.

One serve with all four: one destination's trouble must not touch another's delivery.
Instances are routed by the calling AE title the modality presents (a receive fact).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.e2e.harness import assert_delivered, config, scp_arrivals, sent_index, wait_delivered
from tests.support.config import Dest
from tests.support.dicomgen import COMPRESSED_SAMPLES, compressed_instance, make_corpus, save
from tests.support.peers import Script, ScriptedSCP, wait_for
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]

NAMES = ("busy", "a900", "misconf", "plain")


@dataclass
class Faults:
    h: Hermes
    peers: dict[str, ScriptedSCP]
    sent: dict[str, dict[str, Dataset]]  # dest -> {uid: what was sent}


def _rules() -> str:
    return "".join(f'[[rules]]\nname = "to {n}"\nmatch = {{ CallingAE = "TO_{n.upper()}" }}\n'
                   f'to = ["{n}"]\n\n' for n in NAMES)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    tmp = tmp_path_factory.mktemp("faults")
    dests = {n: Dest(n, ae_title=n.upper()) for n in NAMES}
    scripts = {
        "busy": Script(statuses=[0xA700] * 3),
        "a900": Script(default_status=0xA900),
        "misconf": Script(reject=(1, 1, 7)),
        "plain": Script(transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    }
    peers = {n: ScriptedSCP(ae_title=d.ae_title, port=d.port, script=scripts[n])
             for n, d in dests.items()}
    h = Hermes(tmp / "router", config(list(dests.values()), rules=_rules()))
    try:
        for p in peers.values():
            p.start()
        corpora = {
            "busy": make_corpus(tmp / "busy", 6),
            "a900": make_corpus(tmp / "a900", 3),
            "misconf": make_corpus(tmp / "misconf", 4),
            "plain": [save(compressed_instance(kind), tmp / "plain" / f"{kind}.dcm")
                      for kind in COMPRESSED_SAMPLES]
                     + make_corpus(tmp / "plain-uncompressed", 1),
        }
        h.start()
        sent = {}
        for n, files in corpora.items():
            sent[n] = sent_index(files)
            res = h.send(files, calling=f"TO_{n.upper()}")
            assert res.acked == set(sent[n]), f"{n}: {res.describe()}"
        yield Faults(h, peers, sent)
    finally:
        h.cleanup()
        for p in peers.values():
            p.stop()


@pytest.mark.timeout(180)
def test_a700_a_few_times_then_accepts(faults: Faults) -> None:
    h, peer, sent = faults.h, faults.peers["busy"], faults.sent["busy"]
    wait_delivered(lambda: peer.uids, set(sent), what="busy: delivery after 3 x 0xA700",
                   hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="busy")
    assert peer.answers.count(0xA700) == 3
    wait_for(lambda: len(h.delivered("busy")) == len(sent), 60,
             what="every busy instance in success/busy/")
    assert not h.in_error("busy"), "0xA700 is transient: nothing may go to error/busy/"
    histories = [h.spool.read_sidecar(p) for p in h.delivered("busy")]
    retried = [s for s in histories if "a700" in json.dumps(s.get("history", [])).lower()]
    assert retried, ("the 0xA700 answers must be recorded in the sidecars' history: "
                     f"{histories[0]}")
    assert all(int(s.get("attempts", 0)) >= 2 for s in retried), retried[0]


@pytest.mark.timeout(180)
def test_a900_is_permanent_and_not_retried(faults: Faults) -> None:
    h, peer, sent = faults.h, faults.peers["a900"], faults.sent["a900"]
    wait_for(lambda: len(h.in_error("a900")) == len(sent), 90, interval=0.3,
             what="all 0xA900 instances in error/a900/")
    for path, sidecar in h.in_error("a900"):
        assert (sidecar.get("error") or {}).get("reason"), f"{path.name}: no reason: {sidecar}"
        assert "a900" in json.dumps(sidecar).lower(), f"{path.name}: status not recorded"
        assert sidecar.get("attempts") == 1, f"{path.name}: tried {sidecar.get('attempts')} times"
    # Not retried later either: ask the dispatcher to make everything it still has queued
    # for a900 due now (`hermes-py flush`). Its answer in the log proves it looked after
    # the failures, and says how many it found; something it did find would be sent
    # at once, so a second flush answered proves it had a pass to send it in.
    for _ in range(2):
        offset = h.log_size()
        r = h.cli("flush", "a900")
        assert r.returncode == 0, r.stderr
        line = wait_for(lambda off=offset: re.search(
            r"destination a900: FLUSH requested: (\d+) queued", h.log_since(off)), 60,
            what="the a900 dispatcher to act on the flush")
        assert line.group(1) == "0", f"0xA900 instances queued for a retry: {line.group(0)}"
    assert len(peer.answers) == len(sent), f"0xA900 was retried: answers {peer.answers}"
    assert h.queued("a900") == 0


@pytest.mark.timeout(180)
def test_permanent_rejection_keeps_queue_and_says_misconfigured(faults: Faults) -> None:
    h, peer, sent = faults.h, faults.peers["misconf"], faults.sent["misconf"]
    wait_for(lambda: h.state("misconf").get("state") == "misconfigured", 90, interval=0.3,
             what="state/misconf.json to say misconfigured")
    assert peer.associations >= 1
    assert peer.count() == 0
    wait_for(lambda: h.queued("misconf") == len(sent), 30, interval=0.2,
             what="a misconfigured destination to keep its whole queue")
    assert not h.in_error("misconf"), "a config typo must never dump the queue into error/"
    r = h.cli("status")
    assert r.returncode == 0, r.stderr
    assert "misconfigured" in r.stdout.lower(), (
        f"hermes-py status must say the destination is misconfigured:\n{r.stdout}")


@pytest.mark.timeout(180)
def test_uncompressed_only_destination_gets_decompressed(faults: Faults) -> None:
    h, peer, sent = faults.h, faults.peers["plain"], faults.sent["plain"]
    wait_delivered(lambda: peer.uids, set(sent), what="plain: decompressed delivery", hermes=h)
    arrived = scp_arrivals(peer)
    for uid, copies in arrived.items():
        for ds in copies:
            ts = UID(ds.file_meta.TransferSyntaxUID)
            assert not ts.is_compressed, f"{uid} arrived as {ts.name}"
    assert_delivered(sent, arrived, where="plain (uncompressed only)")
    assert not h.in_error("plain")


def test_serve_stops_cleanly_after_faults(faults: Faults) -> None:
    assert faults.h.running, "serve died while destinations misbehaved"
    faults.h.stop()
