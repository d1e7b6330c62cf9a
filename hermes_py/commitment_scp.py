"""Storage commitment on the wire: our N-ACTION out, the N-EVENT-REPORT in (on disk, then answered).

A report is the destination's word that it took responsibility for instances;
once we answer it Success the destination may never send it again. So the
handler treats it like a C-STORE: it writes the report as JSON into
``state/commitments/reports/`` (temp file, fsync, rename, directory fsync) and
only then answers 0x0000; when it cannot (disk full, a bug) it answers 0x0110
Processing Failure and the destination retries (dcm4chee-arc#4263 expects
exactly that). Nothing else happens here: the dispatcher of the destination
that asked (it knows the Transaction UID) applies the report in its upkeep,
because it owns that destination's queue.

The same handler serves both paths a report can take (PS3.4 J.3.3): a new
association to our receiver (what Orthanc does, ~0.1 s after the N-ACTION) and
the association that carried the N-ACTION (bound there by ``commitment.py``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pydicom.dataset import Dataset

from hermes_py.config import DestinationSettings
from hermes_py.outcomes import hex_status
from hermes_py.spool import JSON, Spool, now_iso, sanitize

if TYPE_CHECKING:   # pynetdicom is imported when something is sent or received, not by status
    from pynetdicom import AE, evt

LOG = logging.getLogger(__name__)

PUSH_MODEL = "1.2.840.10008.1.20.1"   # Storage Commitment Push Model SOP Class

# How long our N-ACTION's association stays open for a report on it (PS3.4 J.3.3 lets
# the SCP use it); a report on a new association to the receiver ends the wait too.
SAME_ASSOCIATION_WAIT = 1.0

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
# EventTypeID 1: every reference committed; 2: some (or all) failed.
ALL_COMMITTED, SOME_FAILED = 1, 2


class Reference(TypedDict, total=False):
    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int   # only in ``failed``


class Report(TypedDict, total=False):
    """``state/commitments/reports/<tx>.<token>.json``: one N-EVENT-REPORT as received."""

    transaction_uid: str
    event_type: int
    committed: list[Reference]
    failed: list[Reference]
    received_at: str
    calling_ae: str
    peer: str


def reports_dir(spool: Spool) -> Path:
    return spool.state / "commitments" / "reports"


def add_context(ae: AE) -> None:
    """Let a destination call us to report: it proposes the SCP role of the Push Model."""
    ae.add_supported_context(PUSH_MODEL, scu_role=False, scp_role=True)


def only_reports(rq: Any) -> bool:
    """An A-ASSOCIATE-RQ proposing nothing but the Push Model: a destination reporting."""
    cxs = list(getattr(rq, "presentation_context_definition_list", None) or [])
    return bool(cxs) and all(cx.abstract_syntax == PUSH_MODEL for cx in cxs)


def _uid(value: object) -> str:
    return str(value or "").rstrip("\0 ").strip()


def _refs(seq: Any, failed: bool) -> list[Reference]:
    out: list[Reference] = []
    for item in seq or []:
        ref = Reference(sop_class_uid=_uid(item.get("ReferencedSOPClassUID")),
                        sop_instance_uid=_uid(item.get("ReferencedSOPInstanceUID")))
        if failed:
            ref["failure_reason"] = int(item.get("FailureReason", PROCESSING_FAILURE) or 0)
        out.append(ref)
    return out


def parse(info: Dataset, event_type: int) -> Report:
    return Report(transaction_uid=_uid(info.get("TransactionUID")), event_type=event_type,
                  committed=_refs(info.get("ReferencedSOPSequence"), False),
                  failed=_refs(info.get("FailedSOPSequence"), True), received_at=now_iso())


def store(spool: Spool, report: Report) -> Path:
    """The report durable in reports/ (a unique name: a repeated report is applied twice,
    which is harmless, rather than overwriting one being applied)."""
    folder = reports_dir(spool)
    folder.mkdir(parents=True, exist_ok=True)
    tx = sanitize(report.get("transaction_uid") or "unknown")
    path = folder / f"{tx}.{secrets.token_hex(4)}.json"
    spool.write_json(path, report)
    spool.sync_dirs([folder])
    return path


def handler(spool: Spool) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """The EVT_N_EVENT_REPORT handler writing into ``spool``; never raises."""

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        assoc = event.assoc
        peer = f"{(assoc.requestor.ae_title or '').strip()}@{assoc.requestor.address}"
        try:
            report = parse(event.event_information, int(event.event_type or 0))
            report["calling_ae"] = (assoc.requestor.ae_title or "").strip()
            report["peer"] = peer
            if not report.get("transaction_uid"):
                LOG.warning("storage commitment report from %s without a Transaction UID: "
                            "ignored", peer)
                return SUCCESS, None
            path = store(spool, report)
        except Exception:  # the destination must hear a failure, and retry
            LOG.exception("cannot store the storage commitment report from %s: answering "
                          "0x0110 so it is sent again", peer)
            return PROCESSING_FAILURE, None
        LOG.info("storage commitment report from %s: transaction %s, %d committed, %d failed "
                 "(%s)", peer, report.get("transaction_uid"), len(report.get("committed", [])),
                 len(report.get("failed", [])), path.name)
        return SUCCESS, None

    return on_report


# ---------------------------------------------------------------- the N-ACTION


def send_n_action(spool: Spool, settings: DestinationSettings, uid: str,
                  refs: Sequence[Mapping[str, Any]]) -> str | None:
    """One N-ACTION (Request Storage Commitment) on an association of its own; None = sent.

    A report the peer sends back on this association before we release it is
    stored like one that comes to the receiver; after a Success we keep the
    association up to SAME_ASSOCIATION_WAIT for one, unless the report came to
    the receiver first (Orthanc's way, ~0.1 s).
    """
    from pynetdicom import evt
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    from hermes_py.destinations.dicom import DicomSettings
    from hermes_py.destinations.dicom_scu import DicomDestination

    if not isinstance(settings, DicomSettings):
        return "storage commitment needs a dicom destination"
    ds = Dataset()
    ds.TransactionUID = uid
    items = []
    for r in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = r["sop_class_uid"]
        item.ReferencedSOPInstanceUID = r["sop_instance_uid"]
        items.append(item)
    ds.ReferencedSOPSequence = items
    dest = DicomDestination(settings, label=f"{settings.name}-commit")
    try:
        assoc, failure = dest.associate([build_context(StorageCommitmentPushModel)])
        if assoc is None:
            return (str(failure) if failure is not None else
                    "the destination does not accept the Storage Commitment Push Model")
        store = handler(spool)
        came = threading.Event()

        def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
            answer: tuple[int, Dataset | None] = store(event)
            came.set()
            return answer

        code, status = -1, None
        try:
            assoc.bind(evt.EVT_N_EVENT_REPORT, on_report)
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel,
                                            StorageCommitmentPushModelInstance)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == 0:
                deadline = time.monotonic() + SAME_ASSOCIATION_WAIT
                stored = reports_dir(spool)
                while (assoc.is_established and time.monotonic() < deadline
                       and not came.wait(0.02)
                       and not any(stored.glob(f"{sanitize(uid)}.*{JSON}"))):
                    pass
        finally:
            if assoc.is_established:
                assoc.release()
        if not status:
            return "no N-ACTION response (timeout or abort)"
        return None if code == 0 else f"N-ACTION answered {hex_status(code)}"
    except Exception as e:  # a failed request is retried; it must not stop the upkeep
        LOG.debug("N-ACTION to %s failed", settings.name, exc_info=True)
        return f"{type(e).__name__}: {e}"
    finally:
        dest.close()
