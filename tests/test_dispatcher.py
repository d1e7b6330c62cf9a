"""The dispatcher against real peers: a scripted pynetdicom SCP and DCMTK storescp.

Every scenario of issue 4's "How we will know" that fits in one process; the
kill -9 and multi-process ones are in test_dispatcher_process.py.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import AllStoragePresentationContexts

from hermes_py import pynetdicom_wake
from hermes_py.config import RetryPolicy, Settings
from hermes_py.destination_state import DestinationState
from hermes_py.destinations.dicom_scu import DicomDestination
from hermes_py.destinations.negotiation import plan
from hermes_py.dispatcher import SUCCESS_FLUSH_COUNT, Dispatcher, backoff_delay
from hermes_py.lifecycle import Event
from hermes_py.outcomes import RETRY_CAPS, LinkFailure, LinkKind, classify_reject
from hermes_py.severed import SEVERED_LIMIT
from hermes_py.spool import Flag, Spool
from tests.support.config import dest
from tests.support.dicomgen import compressed_instance, dataset_bytes, make_instance
from tests.support.peers import (
    LOOPBACK,
    Script,
    ScriptedSCP,
    Storescp,
    free_port,
    loops_per_second,
    wait_for,
)
from tests.support.spool import (
    claimed,
    delivered,
    errored,
    queue,
    queued,
    sidecars,
    state,
    temp_files,
)
from tests.support.stages import serving

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def series(cfg: Settings, dest: str, n: int, **kw: object) -> list[str]:
    """``n`` instances of one new series queued for ``dest``; their SOP Instance UIDs."""
    study, ser = generate_uid(), generate_uid()
    uids = []
    for i in range(n):
        ds = make_instance(16, 16, study_uid=study, series_uid=ser, instance_number=i + 1,
                           **kw)  # type: ignore[arg-type]
        queue(cfg, dest, ds)
        uids.append(str(ds.SOPInstanceUID))
    return uids


# ---------------------------------------------------------------- the happy path


def test_delivers_as_stored_with_truthful_sidecars(make_settings) -> None:
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port, calling_ae_title="ROUTER1"))
        uids = series(cfg, "pacs", 8)
        uids += series(cfg, "pacs", 2, transfer_syntax=ImplicitVRLittleEndian)
        jpeg = compressed_instance("jpeg_baseline")
        queue(cfg, "pacs", jpeg)
        uids.append(str(jpeg.SOPInstanceUID))
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 11, 60, what="11 delivered")
        assert scp.uids == set(uids) and scp.count() == 11
        assert {r.calling_ae for r in scp.received} == {"ROUTER1"}
        assert scp.associations == 1  # one association for the whole batch
        by_uid = {r.sop_instance_uid: r for r in scp.received}
        for path in delivered(cfg, "pacs"):
            sc = Spool.read_json(path.with_suffix(".json"))
            r = by_uid[sc["sop_instance_uid"]]
            # as stored: same syntax on the wire, bytes unchanged
            assert r.transfer_syntax == sc["transfer_syntax"] == sc["delivered_as"]
            assert r.data == dataset_bytes(path)
            assert sc["attempts"] == 1 and sc["delivered_at"] and sc["last_attempt"]
            assert [h["outcome"] for h in sc["history"]] == ["success"]
            assert sc["history"][0]["status"] == "0x0000"
            assert sc["destination"] == "pacs" and "last_error" not in sc
        assert not queued(cfg, "pacs") and not claimed(cfg, "pacs")
        st = state(cfg, "pacs")
        assert st["state"] == "ok" and st["backoff_until"] is None and st["last_success"]
        assert st["consecutive_failures"] == 0 and st["destination"] == "pacs"


def test_urgent_is_sent_before_older_normal(make_settings) -> None:
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        series(cfg, "pacs", 4)
        urgent = make_instance(16, 16)
        queue(cfg, "pacs", urgent, priority="urgent")
        d = Dispatcher(cfg, "pacs")
        try:
            assert d.run_once() == 5
        finally:
            d.close()
        assert scp.received[0].sop_instance_uid == str(urgent.SOPInstanceUID)


# ---------------------------------------------------------------- destination down


def test_down_for_several_backoff_periods_then_up_drains_everything(make_settings, caplog,
                                                                    events) -> None:
    caplog.set_level(logging.INFO, logger="hermes_py")
    port = free_port()
    cfg = make_settings(dest("pacs", port, max_delay="600ms"))
    uids = series(cfg, "pacs", 30)
    with serving(cfg, "pacs"):
        wait_for(lambda: state(cfg, "pacs").get("consecutive_failures", 0) >= 4, 60,
                 what="4 failed probes")
        st = state(cfg, "pacs")
        assert st["state"] == "backoff" and st["backoff_until"] > 0
        assert st["last_error"]["kind"] == "connection refused"
        assert not errored(cfg, "pacs")
        # The destination was backed off, not each instance: every queued instance is
        # still due now (its own timer was not pushed out by connection failures).
        now = time.time()
        for p in queued(cfg, "pacs"):
            assert Spool.next_attempt(p) <= now
        with ScriptedSCP(port=port) as scp:
            wait_for(lambda: len(delivered(cfg, "pacs")) == 30, 60, what="backlog drained")
    assert scp.uids == set(uids)
    scs = sidecars(Spool(cfg.spool.path).success_dir("pacs"))
    # The first batch (all 30) met the refusal; after that one probe (one instance) per
    # interval, not one failed connection per instance.
    assert all(sc["history"][0]["reason"] == "connection refused" for sc in scs)
    assert all(h["scope"] == "destination" for sc in scs for h in sc["history"][:-1])
    assert all(sc["history"][-1]["outcome"] == "success" for sc in scs)
    probes = sum(sc["attempts"] - 2 for sc in scs)
    assert 3 <= probes <= 40
    assert sum(1 for sc in scs if sc["attempts"] == 2) >= 25
    assert state(cfg, "pacs")["state"] == "ok"
    text = caplog.text
    assert text.count("is UNAVAILABLE") == 1 and "is AVAILABLE again" in text
    # the two edges are events, once each, in order (the probes between are not)
    edges = [o for o in events if o.event in (Event.DESTINATION_DOWN,
                                              Event.DESTINATION_RECOVERED)]
    assert [(o.event, o.destination) for o in edges] == [
        (Event.DESTINATION_DOWN, "pacs"), (Event.DESTINATION_RECOVERED, "pacs")]
    down, up = edges
    assert down.fields["kind"] == "connection refused" and down.fields["queued"] == 30
    assert up.fields["was"] == "backoff" and up.fields["failures"] >= 4


def test_two_destinations_one_down_other_gets_everything(make_settings) -> None:
    down = free_port()
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port), dest("dead", down))
        uids = series(cfg, "pacs", 20)
        series(cfg, "dead", 20)
        with serving(cfg, "dead"), serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 20, 60, what="pacs delivered")
            wait_for(lambda: state(cfg, "dead").get("state") == "backoff", 30)
        assert scp.uids == set(uids)
        assert len(queued(cfg, "dead")) == 20 and not errored(cfg, "dead")


def test_black_holed_peer_is_an_association_timeout_not_a_hang(make_settings) -> None:
    # A listener that never answers: the TCP handshake completes, no A-ASSOCIATE-AC.
    with socket.socket() as lsock:
        lsock.bind((LOOPBACK, 0))
        lsock.listen(16)
        cfg = make_settings(dest("pacs", lsock.getsockname()[1], acse_timeout="500ms"))
        series(cfg, "pacs", 3)
        with serving(cfg, "pacs"):
            wait_for(lambda: state(cfg, "pacs").get("state") == "backoff", 30)
        assert state(cfg, "pacs")["last_error"]["kind"] == "no association response"
        assert len(queued(cfg, "pacs")) == 3 and not claimed(cfg, "pacs")


def test_rejected_permanent_is_misconfigured_and_never_dumps_the_queue(make_settings,
                                                                      caplog) -> None:
    caplog.set_level(logging.INFO, logger="hermes_py")
    with ScriptedSCP(script=Script(reject=(1, 1, 7))) as scp:
        # give_up_after is tiny and everything is old: still nothing may go to error/
        cfg = make_settings(dest("pacs", scp.port, give_up_after="1s", max_delay="300ms"))
        long_ago = time.time() - 3600
        for _ in range(5):
            queue(cfg, "pacs", make_instance(16, 16), queued_at=long_ago, received=long_ago)
        with serving(cfg, "pacs"):
            wait_for(lambda: state(cfg, "pacs").get("consecutive_failures", 0) >= 3, 60)
        st = state(cfg, "pacs")
        assert st["state"] == "misconfigured"
        assert st["last_error"]["kind"] == "association rejected (permanent)"
        assert "called AE title not recognised" in st["last_error"]["detail"]
        assert not errored(cfg, "pacs") and len(queued(cfg, "pacs")) == 5
        assert scp.count() == 0
        loud = [r for r in caplog.records if "MISCONFIGURED" in r.getMessage()]
        assert len(loud) >= 3 and all(r.levelno == logging.ERROR for r in loud)
        tried = [sc for sc in sidecars(Spool(cfg.spool.path).outbox("pacs")) if sc["attempts"]]
        assert tried and tried[0]["last_error"]["reason"] == "association rejected (permanent)"


def test_rejected_transient_backs_off_then_delivers(make_settings) -> None:
    script = Script(reject=(2, 3, 2))
    with ScriptedSCP(script=script) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        uids = series(cfg, "pacs", 5)
        with serving(cfg, "pacs"):
            wait_for(lambda: state(cfg, "pacs").get("state") == "backoff", 30)
            assert state(cfg, "pacs")["last_error"]["kind"] == "association rejected (transient)"
            script.reject = None
            wait_for(lambda: len(delivered(cfg, "pacs")) == 5, 60)
        assert scp.uids == set(uids) and not errored(cfg, "pacs")


# ---------------------------------------------------------------- per-instance outcomes


def test_abort_mid_batch_reassociates_and_resends_only_unanswered(make_settings) -> None:
    with ScriptedSCP(script=Script(abort_after=3)) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        uids = series(cfg, "pacs", 10)
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 10, 60)
        # the aborted ones were never stored, so each instance arrived exactly once
        assert scp.count() == 10 and scp.uids == set(uids)
        assert scp.associations >= 3
        retried = [sc for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs"))
                   if sc["attempts"] > 1]
        assert retried
        for sc in retried:
            assert sc["history"][0]["outcome"] == "transient"
            assert "aborted" in sc["history"][0]["reason"]


def test_an_instance_that_aborts_every_association_fails_alone(make_settings, events) -> None:
    """Blamed on the instance, not the destination: sent alone after its first abort,
    permanent after SEVERED_LIMIT while the others are delivered, no backoff at all."""
    cfg = make_settings(dest("pacs", free_port(), batch_size=10))
    uids = series(cfg, "pacs", 8)
    poison = uids[2]
    with ScriptedSCP(port=cfg.destination("pacs").port,  # type: ignore[attr-defined]
                     script=Script(abort_on=frozenset({poison}))) as scp, \
            serving(cfg, "pacs"):
        wait_for(lambda: len(errored(cfg, "pacs")) == 1, 60)
        wait_for(lambda: len(delivered(cfg, "pacs")) == 7, 30)
    assert scp.uids == set(uids) - {poison}
    [failed] = sidecars(Spool(cfg.spool.path).error_dir("pacs"))
    assert failed["sop_instance_uid"] == poison
    assert failed["attempts"] == SEVERED_LIMIT
    assert [h.get("scope") for h in failed["history"]] == ["severed"] * SEVERED_LIMIT
    assert "aborted" in failed["error"]["reason"]
    assert "accepted others" in failed["error"]["reason"]
    # the others went at once: none waited behind it, none was deferred
    assert all(sc["attempts"] == 1 for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs")))
    assert not [o for o in events if o.event in (Event.DESTINATION_DOWN, Event.DEFERRED)]
    assert state(cfg, "pacs")["state"] == "ok"


def test_aborts_of_different_instances_in_a_row_back_off_the_destination(make_settings) -> None:
    """A peer that aborts whatever it gets is failing as a whole: no instance is blamed
    for good, and the destination is backed off."""
    cfg = make_settings(dest("pacs", free_port()))
    uids = series(cfg, "pacs", 4)
    script = Script(abort_on=frozenset(uids))
    with ScriptedSCP(port=cfg.destination("pacs").port,  # type: ignore[attr-defined]
                     script=script) as scp, serving(cfg, "pacs"):
        wait_for(lambda: state(cfg, "pacs").get("state") == "backoff", 30)
        assert state(cfg, "pacs")["last_error"]["kind"] == "association aborted"
        script.abort_on = frozenset()
        wait_for(lambda: len(delivered(cfg, "pacs")) == 4, 60)
    assert scp.uids == set(uids) and not errored(cfg, "pacs")


def test_dimse_timeout_keeps_instances_queued_then_delivers(make_settings) -> None:
    script = Script(delay=1.5)
    with ScriptedSCP(script=script) as scp:
        cfg = make_settings(dest("pacs", scp.port, dimse_timeout="300ms"))
        uids = series(cfg, "pacs", 3)
        with serving(cfg, "pacs"):
            wait_for(lambda: state(cfg, "pacs").get("state") == "backoff", 30)
            assert state(cfg, "pacs")["last_error"]["kind"] == "no response (DIMSE timeout)"
            script.delay = 0.0
            wait_for(lambda: len(delivered(cfg, "pacs")) == 3, 60)
        assert scp.uids == set(uids) and not errored(cfg, "pacs")
        first = [sc for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs"))
                 if sc["attempts"] > 1]
        assert first and "dimse_timeout" in first[0]["history"][0]["reason"]


def test_out_of_resources_twice_then_accepted(make_settings, caplog) -> None:
    caplog.set_level(logging.INFO, logger="hermes_py")
    with ScriptedSCP(script=Script(statuses=[0xA700, 0xA700])) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        uids = series(cfg, "pacs", 5)
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 5, 60)
        assert scp.uids == set(uids) and scp.count() == 5
        scs = sidecars(Spool(cfg.spool.path).success_dir("pacs"))
        twice = [sc for sc in scs if sc["attempts"] == 2]
        assert len(twice) == 2 and sum(sc["attempts"] for sc in scs) == 7
        for sc in twice:
            assert sc["history"][0]["status"] == "0xA700"
            assert sc["last_error"]["status"] == "0xA700"
            assert "Out of Resources" in sc["last_error"]["reason"]
        assert "retried sop=" in caplog.text
        assert state(cfg, "pacs")["state"] == "ok"  # two in a row is not a busy destination


def test_out_of_resources_in_a_row_backs_off_the_destination(make_settings) -> None:
    with ScriptedSCP(script=Script(statuses=[0xA700] * 3)) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        uids = series(cfg, "pacs", 6)
        with serving(cfg, "pacs"):
            wait_for(lambda: state(cfg, "pacs").get("consecutive_failures", 0) >= 1, 30)
            assert state(cfg, "pacs")["last_error"]["kind"] == "destination out of resources"
            wait_for(lambda: len(delivered(cfg, "pacs")) == 6, 60)
        assert scp.uids == set(uids)
        # the batch stopped at the third refusal: the rest were never offered then
        assert scp.answers[:4] == [0xA700, 0xA700, 0xA700, 0x0000]


def test_partial_failure_is_per_instance(make_settings, caplog) -> None:
    caplog.set_level(logging.INFO, logger="hermes_py")
    statuses = [0, 0, 0xA900, 0, 0, 0xC000, 0, 0xB000, 0]
    with ScriptedSCP(script=Script(statuses=list(statuses))) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        series(cfg, "pacs", 9)
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) + len(errored(cfg, "pacs")) == 9, 60)
        assert len(delivered(cfg, "pacs")) == 7 and scp.count() == 7
        bad = sidecars(Spool(cfg.spool.path).error_dir("pacs"))
        assert sorted(sc["last_error"]["status"] for sc in bad) == ["0xA900", "0xC000"]
        for sc in bad:
            assert sc["error"]["stage"] == "dispatch" and sc["error"]["destination"] == "pacs"
            assert sc["error"]["reason"].startswith(sc["last_error"]["status"])
            assert sc["attempts"] == 1 and sc["history"][0]["outcome"] == "permanent"
        warned = [sc for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs"))
                  if sc.get("warnings")]
        assert len(warned) == 1 and warned[0]["warnings"][0].startswith("0xB000")
        assert scp.answers == statuses  # nothing was sent twice
        assert caplog.text.count("failed sop=") == 2 and not queued(cfg, "pacs")


def test_status_classes_override_per_destination(make_settings) -> None:
    with ScriptedSCP(script=Script(statuses=[0xC001, 0xC001])) as scp:
        cfg = make_settings(dest("pacs", scp.port, status_classes={"0xC001": "transient"}))
        series(cfg, "pacs", 2)
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 2, 60)
        assert not errored(cfg, "pacs")
        assert all(sc["attempts"] == 2 for sc in sidecars(Spool(cfg.spool.path)
                                                          .success_dir("pacs")))


@pytest.mark.parametrize("status", sorted(RETRY_CAPS), ids=lambda c: f"0x{c:04X}")
def test_capped_transient_status_is_retried_then_fails_for_good(make_settings, events,
                                                                status: int) -> None:
    """0x0110 (Processing Failure) and 0x0210 (Duplicate Invocation) are worth a few more
    tries (outcomes.RETRY_CAPS): retried while under the cap, then error/<dest>/ with the
    reason and every attempt in the history. The SCP stored none of them."""
    cap = RETRY_CAPS[status]
    code = f"0x{status:04X}"
    with ScriptedSCP(script=Script(default_status=status)) as scp:
        cfg = make_settings(dest("pacs", scp.port, initial_delay="50ms", max_delay="100ms"))
        (uid,) = series(cfg, "pacs", 1)
        with serving(cfg, "pacs"):
            wait_for(lambda: errored(cfg, "pacs"), 30, what="the instance in error/pacs/")
        assert scp.answers == [status] * cap and scp.count() == 0
    (sc,) = sidecars(Spool(cfg.spool.path).error_dir("pacs"))
    assert sc["sop_instance_uid"] == uid and sc["attempts"] == cap
    assert sc["error"]["reason"].startswith(code)
    assert sc["error"]["reason"].endswith(f"(still failing after {cap} attempts)")
    assert [(h["outcome"], h["status"]) for h in sc["history"]] == \
        [("transient", code)] * (cap - 1) + [("permanent", code)]
    assert not queued(cfg, "pacs") and not delivered(cfg, "pacs")
    mine = [o for o in events if o.sop == uid]
    assert [o.event for o in mine] == [Event.RETRIED] * (cap - 1) + [Event.FAILED]
    assert all(o.destination == "pacs" and o.fields["status"] == code for o in mine)
    assert mine[-1].fields["reason"] == sc["error"]["reason"]


def test_destination_state_edges_are_events(make_settings, events) -> None:
    """Down once (not on every failed probe), recovered once; misconfigured is its own."""
    cfg = make_settings(dest("pacs", free_port()))
    st = DestinationState(Spool(cfg.spool.path), cfg.destination("pacs"), random.Random(1))
    t = time.time()
    st.failure(LinkFailure(LinkKind.REFUSED, "[Errno 111]"), t, queued=7)
    st.failure(LinkFailure(LinkKind.REFUSED, "[Errno 111]"), t + 1, queued=7)
    st.success(t + 3, started_at=t + 0.5)   # opened before the last failure: proves nothing
    st.success(t + 4, started_at=t + 2)
    st.failure(classify_reject(1, 1, 7), t + 5, queued=2)
    st.failure(classify_reject(1, 1, 7), t + 6, queued=2)
    assert [(o.event, o.destination) for o in events] == [
        (Event.DESTINATION_DOWN, "pacs"), (Event.DESTINATION_RECOVERED, "pacs"),
        (Event.DESTINATION_MISCONFIGURED, "pacs")]
    down, up, misconf = events
    assert down.fields["kind"] == "connection refused" and down.fields["queued"] == 7
    assert up.fields == {"was": "backoff", "failures": 2}
    assert misconf.fields["kind"] == "association rejected (permanent)"
    assert state(cfg, "pacs")["state"] == "misconfigured"


def test_gives_up_after_while_unreachable_but_keeps_recent_ones(make_settings,
                                                               events) -> None:
    cfg = make_settings(dest("pacs", free_port(), give_up_after="30s"))
    long_ago = time.time() - 3600
    old = [queue(cfg, "pacs", make_instance(16, 16), queued_at=long_ago, received=long_ago)
           for _ in range(3)]
    series(cfg, "pacs", 2)
    with serving(cfg, "pacs"):
        wait_for(lambda: len(errored(cfg, "pacs")) == 3, 30, what="3 expired")
    assert {p.name for p in errored(cfg, "pacs")} == {p.name for p in old}
    assert len(queued(cfg, "pacs")) == 2
    for sc in sidecars(Spool(cfg.spool.path).error_dir("pacs")):
        assert "gave up after 30s" in sc["error"]["reason"]
        assert "connection refused" in sc["error"]["reason"]
    # an expiry is "gave_up", never "failed" (the destination did not refuse them)
    gave_up = events.of(Event.GAVE_UP)
    assert sorted(o.sop for o in gave_up) == sorted(sc["sop_instance_uid"] for sc in
                                                   sidecars(Spool(cfg.spool.path)
                                                            .error_dir("pacs")))
    assert {o.destination for o in gave_up} == {"pacs"}
    assert all("gave up after 30s" in o.fields["reason"] for o in gave_up)
    assert not events.of(Event.FAILED)


def test_transient_failure_past_give_up_after_goes_to_error(make_settings, events) -> None:
    with ScriptedSCP(script=Script(statuses=[0xA701])) as scp:
        cfg = make_settings(dest("pacs", scp.port, give_up_after="60s"))
        long_ago = time.time() - 3600
        queue(cfg, "pacs", make_instance(16, 16), queued_at=long_ago, received=long_ago)
        d = Dispatcher(cfg, "pacs")
        try:
            assert d.run_once() == 1
        finally:
            d.close()
        (sc,) = sidecars(Spool(cfg.spool.path).error_dir("pacs"))
        assert "gave up after 1m" in sc["error"]["reason"] and "0xA701" in sc["error"]["reason"]
        assert sc["history"][-1]["status"] == "0xA701"
        (o,) = events.of(Event.GAVE_UP)
        assert (o.sop, o.destination, o.fields["status"]) == \
            (sc["sop_instance_uid"], "pacs", "0xA701")
        assert o.fields["reason"] == sc["error"]["reason"]
        assert not events.of(Event.FAILED) and not events.of(Event.RETRIED)


# ---------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("accept", [[ImplicitVRLittleEndian], UNCOMPRESSED])
def test_compressed_reaches_an_uncompressed_only_destination(make_settings,
                                                             accept: list[str]) -> None:
    with ScriptedSCP(script=Script(transfer_syntaxes=accept)) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        sources = {}
        for kind in ("jpeg_baseline", "jpeg2000", "rle", "jpeg_ls"):
            ds = compressed_instance(kind)
            queue(cfg, "pacs", ds)
            sources[str(ds.SOPInstanceUID)] = ds
        explicit = make_instance(16, 16)
        queue(cfg, "pacs", explicit)
        sources[str(explicit.SOPInstanceUID)] = explicit
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 5, 60)
        assert scp.uids == set(sources)  # same SOP Instance UIDs
        for r in scp.received:
            assert r.transfer_syntax in accept
            ts = UID(r.transfer_syntax)
            got = read_dataset(BytesIO(r.data), ts.is_implicit_VR, ts.is_little_endian)
            src = sources[r.sop_instance_uid]
            assert str(got.SOPInstanceUID) == r.sop_instance_uid
            frames = int(src.get("NumberOfFrames", 1) or 1)
            assert len(got.PixelData) >= (src.Rows * src.Columns * src.SamplesPerPixel
                                          * (src.BitsAllocated // 8) * frames)
        for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs")):
            assert sc["delivered_as"] in accept


def test_storescp_uncompressed_only_gets_everything(make_settings, tmp_path: Path) -> None:
    with Storescp(tmp_path / "received", extra=()) as scp:
        cfg = make_settings(dest("pacs", scp.port, "STORESCP"))
        uids = series(cfg, "pacs", 5)
        for kind in ("jpeg_baseline", "jpeg2000", "rle"):
            ds = compressed_instance(kind)
            queue(cfg, "pacs", ds)
            uids.append(str(ds.SOPInstanceUID))
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 8, 60)
        wait_for(lambda: scp.uids() >= set(uids), 30, what="storescp wrote every file")
    assert not errored(cfg, "pacs")


def test_unaccepted_sop_class_fails_that_instance_only(make_settings) -> None:
    with ScriptedSCP(script=Script(sop_classes=[CTImageStorage])) as scp:
        cfg = make_settings(dest("pacs", scp.port))
        ct = series(cfg, "pacs", 3)
        series(cfg, "pacs", 2, sop_class=MRImageStorage, modality="MR")
        with serving(cfg, "pacs"):
            wait_for(lambda: len(delivered(cfg, "pacs")) + len(errored(cfg, "pacs")) == 5, 60)
            # a batch of MR only: the peer accepts no context at all
            series(cfg, "pacs", 2, sop_class=MRImageStorage, modality="MR")
            wait_for(lambda: len(errored(cfg, "pacs")) == 4, 60)
        assert scp.uids == set(ct)
        for sc in sidecars(Spool(cfg.spool.path).error_dir("pacs")):
            assert "does not accept SOP class MR Image Storage" in sc["error"]["reason"]
        assert state(cfg, "pacs")["state"] == "ok"  # the destination itself is fine


def test_many_sop_classes_are_split_over_associations(make_settings) -> None:
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:110]
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port, batch_size=200))
        uids = []
        for c in classes:
            ds = make_instance(8, 8, sop_class=str(c))
            queue(cfg, "pacs", ds)
            uids.append(str(ds.SOPInstanceUID))
        n_groups = len(plan(classes, lambda c: (str(c), ExplicitVRLittleEndian)))
        d = Dispatcher(cfg, "pacs")
        try:
            assert d.run_once() == 110
        finally:
            d.close()
        assert scp.uids == set(uids) and scp.associations == n_groups == 3


# ---------------------------------------------------------------- flags, workers, stop


def test_hold_sends_nothing_and_flush_ignores_every_timer(make_settings) -> None:
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        spool = Spool(cfg.spool.path)
        a = queue(cfg, "pacs", make_instance(16, 16))
        d = Dispatcher(cfg, "pacs")
        try:
            spool.flag("pacs", Flag.HOLD).touch()
            assert d.run_once() == 0 and scp.count() == 0 and a.exists()
            spool.flag("pacs", Flag.HOLD).unlink()
            assert d.run_once() == 1 and scp.count() == 1
            # not due for an hour, and the destination backed off for an hour
            b = queue(cfg, "pacs", make_instance(16, 16))
            Spool.set_next_attempt(b, time.time() + 3600)
            d.state.backoff_until = time.time() + 3600
            d.state.state = "backoff"
            assert d.run_once() == 0 and b.exists()
            spool.flag("pacs", Flag.FLUSH).touch()
            assert d.run_once() == 1 and scp.count() == 2
            assert not spool.flag("pacs", Flag.FLUSH).exists()
            assert state(cfg, "pacs")["state"] == "ok"
        finally:
            d.close()


def test_parallel_associations_never_stall(make_settings, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port, max_associations=3, batch_size=20))
        uids = series(cfg, "pacs", 120)
        with serving(cfg, "pacs") as d:
            assert len(d.slots) == 3
            assert len({id(s.dest.ae) for s in d.slots}) == 3  # an AE per worker
            wait_for(lambda: len(delivered(cfg, "pacs")) == 120, 90)
        assert scp.count() == 120 and scp.uids == set(uids)  # never twice
        assert "unexpected" not in caplog.text and "DIMSE timeout" not in caplog.text
        labels = {sc["history"][0]["association"].split("#")[0]
                  for sc in sidecars(Spool(cfg.spool.path).success_dir("pacs"))}
        assert len(labels) >= 2


def test_stop_between_instances_returns_every_claim(make_settings) -> None:
    with ScriptedSCP(script=Script(delay=0.02)) as scp:
        cfg = make_settings(dest("pacs", scp.port, max_associations=2))
        series(cfg, "pacs", 100)
        with serving(cfg, "pacs"):
            wait_for(lambda: scp.count() >= 5, 30)
        assert not claimed(cfg, "pacs")
        assert len(delivered(cfg, "pacs")) + len(queued(cfg, "pacs")) == 100
        assert 5 <= len(delivered(cfg, "pacs")) < 100


def test_delivered_instances_are_recorded_in_shared_flushes(make_settings) -> None:
    """More than two flushes' worth in one batch: every instance ends in success/ with
    its full sidecar, nothing stays claimed, no temp file is left."""
    n = 2 * SUCCESS_FLUSH_COUNT + 5
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port, batch_size=200))
        uids = series(cfg, "pacs", n)
        d = Dispatcher(cfg, "pacs")
        try:
            assert d.run_once() == n
        finally:
            d.close()
        assert scp.uids == set(uids) and scp.count() == n
    spool = Spool(cfg.spool.path)
    done = sidecars(spool.success_dir("pacs"))
    assert sorted(sc["sop_instance_uid"] for sc in done) == sorted(uids)
    assert all(sc["delivered_at"] and sc["attempts"] == 1 and sc["next_attempt"] is None
               for sc in done)
    assert not claimed(cfg, "pacs") and not queued(cfg, "pacs")
    assert not list((spool.active / "pacs").rglob("*.json"))
    assert temp_files(spool) == []


def test_delivered_but_unrecordable_goes_back_to_the_outbox(make_settings) -> None:
    """If success/ cannot be written, the sent instances are not lost or stuck: they
    return to the outbox (and are sent again later: at-least-once)."""
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        uids = series(cfg, "pacs", 3)
        spool = Spool(cfg.spool.path)
        d = Dispatcher(cfg, "pacs")
        try:
            d.start()
            spool.success_dir("pacs").rmdir()
            spool.success_dir("pacs").write_text("not a folder")  # every rename into it fails
            assert d.run_once() == 3
            assert scp.count() == 3
            assert sorted(sc["sop_instance_uid"] for sc in sidecars(spool.outbox("pacs"))) \
                == sorted(uids)
            assert not claimed(cfg, "pacs")
            spool.success_dir("pacs").unlink()
            spool.success_dir("pacs").mkdir()
            assert d.run_once() == 3
        finally:
            d.close()
        assert scp.count() == 6 and scp.uids == set(uids)
    assert len(delivered(cfg, "pacs")) == 3 and not queued(cfg, "pacs")
    assert temp_files(spool) == []


def test_scu_socket_has_nodelay_and_the_stall_guard(make_settings) -> None:
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        scu = DicomDestination(cfg.destinations["pacs"])
        groups = plan([(CTImageStorage, ExplicitVRLittleEndian)], lambda x: x)
        assoc, failure = scu.associate(groups[0][1])
        assert assoc is not None and failure is None
        try:
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert "_serve_request" in vars(assoc)  # patched on this object only
            assert assoc.requestor.ae_title == "HERMES"
            # its threads wait for work (pynetdicom_wake); a fresh DUL is pynetdicom's own
            assert "_hermes_waker" in vars(assoc.dul) and assoc._hermes_woken
            assert "_hermes_waker" not in vars(DULServiceProvider(assoc))
            assert loops_per_second(assoc) < 2 * (2 / pynetdicom_wake.WAIT_MAX)
        finally:
            assoc.release()


def test_a_response_taken_by_the_reactor_goes_back_to_the_waiting_sender(
        make_settings) -> None:
    """The stall of issue 4: pynetdicom's reactor can dequeue the C-STORE-RSP that
    send_c_store waits for; unguarded it logs "Received unexpected C-STORE service
    message", drops it, and the sender waits out its DIMSE timeout."""
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        scu = DicomDestination(cfg.destinations["pacs"])
        groups = plan([(CTImageStorage, ExplicitVRLittleEndian)], lambda x: x)
        assoc, _ = scu.associate(groups[0][1])
        assert assoc is not None
        try:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = 7
            rsp.AffectedSOPClassUID = CTImageStorage
            rsp.AffectedSOPInstanceUID = "1.2.3.4"
            rsp.Status = 0x0000
            assert rsp.is_valid_response and not rsp.is_valid_request
            # exactly what the reactor does with a message it dequeued (_run_reactor)
            assoc._serve_request(rsp, 1)
            cx_id, got = assoc.dimse.msg_queue.get(timeout=10)
            assert got is rsp and cx_id == 1
        finally:
            assoc.release()


def test_backoff_grows_exponentially_with_jitter_up_to_max_delay() -> None:
    retry = RetryPolicy(initial_delay=1.0, max_delay=60.0)
    rng = random.Random(4)
    for n, base in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0)):
        for _ in range(50):
            assert 0.8 * base <= backoff_delay(n, retry, rng) <= 1.2 * base
    assert all(48.0 <= backoff_delay(n, retry, rng) <= 60.0 for n in (7, 8, 100, 10**6))
    assert len({round(backoff_delay(3, retry, rng), 6) for _ in range(20)}) > 10  # jitter


def test_file_without_preamble_is_still_delivered(make_settings) -> None:
    # pynetdicom can only stream a full Part-10 file; anything else is read and encoded.
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        spool = Spool(cfg.spool.path)
        ds = make_instance(16, 16)
        ds.preamble = None
        raw = BytesIO()
        dcmwrite(raw, ds, enforce_file_format=False)
        assert raw.getvalue()[128:132] != b"DICM"
        queue(spool, "pacs", raw.getvalue(), sop=str(ds.SOPInstanceUID),
              sop_class_uid=str(ds.SOPClassUID), transfer_syntax=ExplicitVRLittleEndian)
        d = Dispatcher(cfg, "pacs")
        try:
            assert d.run_once() == 1
        finally:
            d.close()
        assert scp.uids == {str(ds.SOPInstanceUID)}
        (sc,) = sidecars(spool.success_dir("pacs"))
        assert sc["delivered_as"] == ExplicitVRLittleEndian


def test_unreadable_file_goes_to_error_with_reason(make_settings) -> None:
    with ScriptedSCP() as scp:
        cfg = make_settings(dest("pacs", scp.port))
        spool = Spool(cfg.spool.path)
        queue(spool, "pacs", b"not dicom at all", sop="1.2.3")
        good = series(cfg, "pacs", 1)
        d = Dispatcher(cfg, "pacs")
        try:
            d.run_once()
        finally:
            d.close()
        (sc,) = sidecars(spool.error_dir("pacs"))
        assert "not a readable DICOM file" in sc["error"]["reason"]
        assert scp.uids == set(good)
        assert os.listdir(spool.outbox("pacs")) == ["urgent"]


def test_source_address_is_where_associations_come_from(make_settings,
                                                        tmp_path) -> None:
    """A PACS allow-list sees one address: the destination's ``source_address``."""
    from hermes_py.receiver import Receiver
    from tests.support.config import receiver

    port = free_port()
    rx = Receiver(make_settings(receiver=receiver(port), spool={"path": "rx-spool",
                                                                 "min_free_mb": 0})).start()
    try:
        cfg = make_settings(dest("pacs", port, "HERMES", source_address="127.0.0.2"),
                            spool={"path": "tx-spool", "min_free_mb": 0})
        spool = Spool(cfg.spool.path)
        queue(spool, "pacs", make_instance(8, 8))
        with Dispatcher(cfg, "pacs") as d:
            assert d.run_once() == 1
        (got,) = wait_for(lambda: list(rx.spool.incoming.glob("*.dcm")), 10,
                          what="the instance at the receiver")
        side = rx.spool.read_sidecar(got)
        assert side["peer_address"] == "127.0.0.2"
    finally:
        rx.stop(grace=1)
