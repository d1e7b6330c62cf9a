"""Storage commitment (issue 15) against a scripted pynetdicom Storage + Storage Commitment SCP.

The peer is real: it stores what we C-STORE, answers our N-ACTION, and reports
(N-EVENT-REPORT) either on a new association to our receiver (what Orthanc does)
or on the N-ACTION's own association, committing what it stored and failing what
the test tells it to; or it never reports. Seconds stand for hours: commit_timeout
is 1 s where the test waits it out.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from hermes_py import commitment, commitment_scp
from hermes_py.admin.drain import drain
from hermes_py.admin.find import find
from hermes_py.admin.rules_verbs import check
from hermes_py.admin.status import status
from hermes_py.config import Settings
from hermes_py.dispatcher import Dispatcher
from hermes_py.lifecycle import Event, Stage
from hermes_py.metrics import spool_gauges
from hermes_py.receiver import Receiver
from hermes_py.spool import Flag, Spool, now_iso
from tests.support.config import Config, dest, receiver, route_all
from tests.support.dicomgen import make_instance, write_series
from tests.support.peers import LOOPBACK, Received, ScriptedSCP, wait_for
from tests.support.spool import dcms, delivered, errored, put, queue, queued, sidecar

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

NO_SUCH_OBJECT = 0x0112
SOP_CLASS_NOT_SUPPORTED = 0x0122


class CommitSCP(ScriptedSCP):
    """A Storage SCP that is also a Storage Commitment Push Model SCP.

    ``report``: "new" (a new association to ``report_to``, proposing the SCP role as
    Orthanc does), "same" (on the N-ACTION's association, after its response) or
    "never". ``fail_once``: UID -> FailureReason reported the first time it is asked
    about; ``hold``: when set, reports wait until it is cleared. What it did not store
    it fails with 0x0112, as an archive does.
    """

    def __init__(self, report: str = "new", report_to: tuple[str, int] = ("HERMES", 0),
                 **kw: Any):
        super().__init__(**kw)
        self.report = report
        self.report_to = report_to
        self.fail_once: dict[str, int] = {}
        self.actions: list[tuple[str, list[str]]] = []
        self.reports: list[tuple[str, list[str], list[str]]] = []   # tx, committed, failed
        self.hold = threading.Event()   # set: reports wait for release()
        self._released = threading.Event()

    def asked(self) -> dict[str, int]:
        """How many N-ACTIONs named each SOP Instance UID."""
        with self._lock:
            return dict(collections.Counter(u for _, us in self.actions for u in us))

    def release(self) -> None:
        self.hold.clear()
        self._released.set()

    def _build_ae(self) -> AE:
        ae = super()._build_ae()
        ae.add_supported_context(StorageCommitmentPushModel)
        return ae

    def start(self) -> CommitSCP:
        ae = self._build_ae()
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                          (evt.EVT_REQUESTED, self._on_requested),
                          (evt.EVT_N_ACTION, self._on_action)])
        return self

    def _on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        info = event.action_information
        tx = str(info.TransactionUID)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence]
        with self._lock:
            self.actions.append((tx, [u for _, u in refs]))
        if self.report != "never":
            threading.Thread(target=self._send_report, args=(event.assoc, tx, refs),
                             daemon=True).start()
        return 0x0000, None

    def _send_report(self, assoc: Any, tx: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(0.05)   # after our N-ACTION-RSP is out
        if self.hold.is_set():
            self._released.wait(60)
        ds = Dataset()
        ds.TransactionUID = tx
        ok, failed = [], []
        stored = self.uids
        with self._lock:
            for cls, uid in refs:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = uid
                code = self.fail_once.pop(uid, None)
                if code is None and uid not in stored:
                    code = NO_SUCH_OBJECT
                if code is None:
                    ok.append(item)
                else:
                    item.FailureReason = code
                    failed.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if failed:
            ds.FailedSOPSequence = failed
        with self._lock:
            self.reports.append((tx, [str(i.ReferencedSOPInstanceUID) for i in ok],
                                 [str(i.ReferencedSOPInstanceUID) for i in failed]))
        event_type = 2 if failed else 1
        if self.report == "same":
            if assoc.is_established:
                assoc.send_n_event_report(ds, event_type, StorageCommitmentPushModel,
                                          StorageCommitmentPushModelInstance)
            return
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        aet, port = self.report_to
        other = ae.associate(LOOPBACK, port, ae_title=aet,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        if other.is_established:
            other.send_n_event_report(ds, event_type, StorageCommitmentPushModel,
                                      StorageCommitmentPushModelInstance)
            other.release()


# ---------------------------------------------------------------- in-process helpers


@contextlib.contextmanager
def serving(cfg: Settings, name: str = "pacs") -> Iterator[Dispatcher]:
    d = Dispatcher(cfg, name, poll=0.1)
    stop = threading.Event()
    t = threading.Thread(target=d.serve, args=(stop,), daemon=True)
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(30)


@contextlib.contextmanager
def router(make_settings: Callable[..., Settings], mode: str = "required",
           report: str = "new", **opts: Any) -> Iterator[tuple[Settings, CommitSCP]]:
    """Our receiver (in this process, where reports come to) and the peer."""
    rx = receiver()
    scp = CommitSCP(report=report, report_to=(str(rx["ae_title"]), int(rx["port"])),  # type: ignore[call-overload]
                    ae_title="PACS")
    cfg = make_settings(dest("pacs", scp.port, "PACS", storage_commitment=mode, **opts),
                        receiver=rx)
    r = Receiver(cfg).start()
    scp.start()
    try:
        yield cfg, scp
    finally:
        scp.release()
        scp.stop()
        r.stop(grace=1)


def instances(cfg: Settings, n: int) -> list[str]:
    uids = []
    for i in range(n):
        ds = make_instance(8, 8, instance_number=i + 1)
        queue(cfg, "pacs", ds)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def committing(cfg: Settings) -> list[Path]:
    return dcms(Spool(cfg.spool.path).folder(Stage.COMMITTING, "pacs"))


def records(cfg: Settings) -> list[Path]:
    return sorted(commitment.transactions_dir(Spool(cfg.spool.path), "pacs").glob("*.json"))


def all_committed(cfg: Settings, n: int) -> bool:
    done = delivered(cfg, "pacs")
    return len(done) == n and all(sidecar(p).get("committed_at") for p in done)


# ---------------------------------------------------------------- required


def test_required_failed_references_are_resent_then_committed(make_settings, events) -> None:
    """Report on a new association to our receiver: what it committed to success/ with
    committed_at, what it failed back to the queue (reason in history), sent again and
    committed by the next report. Nothing is in success/ before its report."""
    with router(make_settings, commit_batch=4) as (cfg, scp):
        uids = instances(cfg, 6)
        scp.fail_once = {uids[1]: NO_SUCH_OBJECT, uids[4]: 0x0110}
        scp.hold.set()
        with serving(cfg):
            wait_for(lambda: len(committing(cfg)) == 6 and len(scp.actions) == 2, 30,
                     what="6 stored, awaiting commitment, asked in 2 batches (commit_batch 4)")
            assert not delivered(cfg, "pacs")
            assert sorted(len(u) for _, u in scp.actions) == [2, 4]
            assert len(records(cfg)) == 2   # recorded before asking
            snap = status(cfg).to_json()["destinations"]["pacs"]["commitment"]
            assert snap["mode"] == "required" and snap["awaiting"] == 6
            assert snap["oldest_wait"] is not None and snap["not_committing_since"] is None
            scp.release()
            wait_for(lambda: all_committed(cfg, 6) and not records(cfg), 30,
                     what="all 6 committed, records removed")
        assert not committing(cfg) and not queued(cfg, "pacs") and not errored(cfg, "pacs")
        assert not records(cfg)
        assert not list(commitment.commitment_scp.reports_dir(Spool(cfg.spool.path))
                        .glob("*.json"))
        # the two failed ones were stored twice, the others once
        sent = [r.sop_instance_uid for r in scp.received]
        assert sorted(sent) == sorted([*uids, uids[1], uids[4]])
        for p in delivered(cfg, "pacs"):
            s = sidecar(p)
            assert s["commit_transaction"] and s["committed_at"] >= s["delivered_at"]
            if s["sop_instance_uid"] in (uids[1], uids[4]):
                assert s["attempts"] == 3
                why = [h["reason"] for h in s["history"] if h["outcome"] == "transient"]
                assert len(why) == 1 and why[0].startswith("storage commitment failed: 0x01")
            else:
                assert s["attempts"] == 1
        assert len(events.of(Event.COMMITTED)) == 6
        assert len(events.of(Event.COMMIT_FAILED)) == 2


def test_required_report_on_the_same_association(make_settings) -> None:
    with router(make_settings, report="same") as (cfg, scp):
        instances(cfg, 3)
        with serving(cfg):
            wait_for(lambda: all_committed(cfg, 3) and not records(cfg), 30,
                     what="3 committed")
        assert len(scp.actions) == 1 and len(scp.reports) == 1
        assert not committing(cfg) and not records(cfg)


def test_a_drained_receiver_still_takes_reports(make_settings) -> None:
    with router(make_settings) as (cfg, scp):
        drain(cfg, by="test")
        instances(cfg, 2)
        with serving(cfg):
            wait_for(lambda: all_committed(cfg, 2) and not records(cfg), 30,
                     what="2 committed while draining")
        assert len(scp.reports) == 1


def test_permanent_failure_reason_goes_to_error(make_settings) -> None:
    with router(make_settings) as (cfg, scp):
        uids = instances(cfg, 2)
        scp.fail_once = {uids[0]: SOP_CLASS_NOT_SUPPORTED}
        with serving(cfg):
            wait_for(lambda: all_committed(cfg, 1) and errored(cfg, "pacs"), 30,
                     what="one committed, one in error/pacs/")
        err = sidecar(errored(cfg, "pacs")[0])
        assert err["sop_instance_uid"] == uids[0]
        assert "0x0122" in err["error"]["reason"] and err["error"]["stage"] == "commitment"
        assert scp.count() == 2   # not resent


def test_silent_destination_keeps_everything_waiting(make_settings, events) -> None:
    """No report: asked once more after commit_timeout, then "not committing" in status
    and its state file; nothing resent, nothing lost. A flush asks again; a report
    then commits everything and clears it."""
    with router(make_settings, report="never", commit_timeout="1s") as (cfg, scp):
        uids = instances(cfg, 5)
        spool = Spool(cfg.spool.path)
        with serving(cfg):
            def asked(times: int) -> bool:
                got = scp.asked()
                return len(got) == 5 and set(got.values()) == {times}
            wait_for(lambda: asked(2) and events.of(Event.DESTINATION_NOT_COMMITTING)
                     and all(t.get("not_committing_since")
                             for _, t in commitment.read_transactions(spool, "pacs")), 30,
                     what="each instance asked twice, then destination_not_committing")
            txs = [tx for tx, _ in scp.actions]
            assert len(set(txs)) == len(txs)   # the second ask is a new transaction
            assert len(committing(cfg)) == 5 and not delivered(cfg, "pacs")
            assert sorted(r.sop_instance_uid for r in scp.received) == sorted(uids)
            st = commitment.read_state(spool, "pacs")
            assert st["not_committing_since"]
            shown = status(cfg)
            c = shown.to_json()["destinations"]["pacs"]["commitment"]
            assert c["awaiting"] == 5 and c["not_committing_since"] and c["oldest_wait"] > 0
            assert "NOT COMMITTING" in shown.text() and "5 awaiting" in shown.text()
            gauges = "\n".join(spool_gauges(cfg, spool))
            assert 'hermes_commitment_awaiting{destination="pacs"} 5' in gauges
            assert 'hermes_destination_not_committing{destination="pacs"} 1' in gauges
            assert "awaiting the destination's storage commitment" in find(cfg, uids[0]).text()
            time.sleep(1.5)   # more commit_timeouts: still only two asks, nothing resent
            assert asked(2) and scp.count() == 5 and len(committing(cfg)) == 5
            # the destination is fixed; the admin asks again
            scp.report = "new"
            spool.set_flag("pacs", Flag.FLUSH, "test")
            wait_for(lambda: all_committed(cfg, 5) and not records(cfg)
                     and not commitment.read_state(spool, "pacs").get("not_committing_since"),
                     30, what="committed after flush, committing again")
        assert asked(3) and scp.count() == 5
        assert not commitment.read_state(spool, "pacs").get("not_committing_since")
        assert not records(cfg) and not committing(cfg)
        assert "committed 20" in find(cfg, uids[0]).text()


def test_instances_in_committing_without_a_record_are_asked(make_settings) -> None:
    """A crash after the move to committing/ and before the record: the next dispatcher
    finds them by listing the folder, and asks."""
    with router(make_settings) as (cfg, scp):
        spool = Spool(cfg.spool.path)
        folder = spool.folder(Stage.COMMITTING, "pacs")
        uids = []
        for _ in range(3):
            ds = make_instance(8, 8)
            put(cfg, folder, ds, dest="pacs")
            uids.append(str(ds.SOPInstanceUID))
        with scp._lock:   # the peer stored them in our previous life
            scp.received.extend(Received(u, "", "", "HERMES", b"") for u in uids)
        with serving(cfg):
            wait_for(lambda: all_committed(cfg, 3), 30, what="3 committed")
        assert sorted(scp.actions[0][1]) == sorted(uids)


# ---------------------------------------------------------------- advisory


def test_advisory_delivers_at_store_and_records_the_report(make_settings) -> None:
    with router(make_settings, mode="advisory") as (cfg, scp):
        uids = instances(cfg, 4)
        scp.fail_once = {uids[2]: NO_SUCH_OBJECT}
        scp.hold.set()
        with serving(cfg):
            wait_for(lambda: len(delivered(cfg, "pacs")) == 4 and scp.actions, 30,
                     what="4 delivered at C-STORE Success")
            assert not committing(cfg)
            scp.release()

            def recorded() -> bool:
                return not records(cfg) and all(
                    sidecar(p).get("committed_at") or sidecar(p).get("commit_failed")
                    for p in delivered(cfg, "pacs"))
            wait_for(recorded, 30, what="the report recorded in success/")
        by_uid = {sidecar(p)["sop_instance_uid"]: sidecar(p) for p in delivered(cfg, "pacs")}
        assert "0x0112" in by_uid[uids[2]]["commit_failed"]["reason"]
        assert all(by_uid[u]["committed_at"] for u in uids if u != uids[2])
        assert scp.count() == 4 and not queued(cfg, "pacs") and not records(cfg)


# ---------------------------------------------------------------- configuration


def test_rules_check_warns_when_the_receiver_would_refuse_the_report(make_settings) -> None:
    cfg = make_settings(dest("pacs", 11112, "PACS", storage_commitment="required"),
                        dest("ris", 11113, "RIS"),
                        receiver=receiver(allowed_calling_aets=["CT1"]),
                        rules=route_all(["pacs", "ris"]))
    text = check(cfg).text()
    assert "warning: destination 'pacs' has storage_commitment" in text
    assert "'ris'" not in text.split("warning")[-1]


# ---------------------------------------------------------------- kill -9 of serve


def test_kill9_between_store_and_report_loses_no_commitment(serve, tmp_path: Path) -> None:
    rx = receiver()
    scp = CommitSCP(report="new", report_to=("HERMES", int(rx["port"])),  # type: ignore[call-overload]
                    ae_title="PACS")
    pacs = dest("pacs", scp.port, "PACS", storage_commitment="required", commit_timeout="1h")
    h = serve(Config(destinations=[pacs], rules=route_all([pacs]), receiver=rx))
    files = write_series(tmp_path / "in", 5, rows=8, cols=8)
    scp.hold.set()
    scp.start()
    try:
        h.start()
        assert len(h.send(files).acked) == 5
        folder = h.spool.folder(Stage.COMMITTING, "pacs")
        wait_for(lambda: len(dcms(folder)) == 5 and sum(len(u) for _, u in scp.actions) == 5,
                 60, what="5 stored and asked about")
        h.kill9()
        assert len(dcms(folder)) == 5 and not h.delivered("pacs")
        assert list(commitment.transactions_dir(h.spool, "pacs").glob("*.json"))
        h.start()
        scp.release()   # the report comes now, to the new serve's receiver
        wait_for(lambda: len(h.delivered("pacs")) == 5, 60, what="5 committed after restart")
        assert all(sidecar(p).get("committed_at") for p in h.delivered("pacs"))
        assert not dcms(folder) and scp.count() == 5
        wait_for(lambda: not list(commitment.transactions_dir(h.spool, "pacs").glob("*.json")),
                 10, what="the applied request's record removed")
        h.stop()
    finally:
        scp.release()
        scp.stop()


def test_no_longer_required_releases_committing_and_drops_orphan_reports(make_settings) -> None:
    """rules.toml changed to advisory: what waited in committing/ was stored, so it is
    delivered; a report nobody asked for, a day old, is removed; a fresh one is kept."""
    cfg = make_settings(dest("pacs", 11112, "PACS", storage_commitment="advisory"))
    spool = Spool(cfg.spool.path)
    folder = spool.folder(Stage.COMMITTING, "pacs")
    waiting = [put(cfg, folder, dest="pacs") for _ in range(2)]
    old = commitment_scp.store(spool, commitment_scp.Report(
        transaction_uid="1.2.3.4", committed=[], failed=[],
        received_at=now_iso(time.time() - 2 * 86400)))
    new = commitment_scp.store(spool, commitment_scp.Report(
        transaction_uid="1.2.3.5", committed=[], failed=[], received_at=now_iso()))
    c = commitment.Commitments(spool, cfg.destination("pacs"))
    try:
        c.upkeep(time.time())
    finally:
        c.close()
    assert not dcms(folder)
    assert sorted(p.name for p in delivered(cfg, "pacs")) == sorted(p.name for p in waiting)
    assert not old.exists() and new.exists()
