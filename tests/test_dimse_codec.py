"""The command-set encoder must write exactly what pydicom writes, for every message."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread, filewriter
from pydicom.filebase import DicomFileLike
from pynetdicom import dimse_messages, dsutils
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import create_file_meta

from hermes_py import dimse_codec

UIDS = st.from_regex(r"\A[12](\.[1-9][0-9]{0,8}){1,12}\Z").filter(lambda u: len(u) <= 64)
AES = st.from_regex(r"\A[A-Z0-9_]{1,16}\Z")
IDS = st.integers(0, 0xFFFF)


def _same(message: Any, primitive: Any) -> bytes:
    message.primitive_to_message(primitive)
    ours = dimse_codec.encode(message.command_set, True, True)
    assert ours == dsutils.encode(message.command_set, True, True)
    assert ours is not None
    return ours


@settings(max_examples=60, deadline=None)
@given(IDS, UIDS, UIDS, st.sampled_from([0, 1, 2]), st.one_of(st.none(), AES), IDS)
def test_c_store_request(msg_id: int, cls: str, sop: str, priority: int, mover: str | None,
                         move_id: int) -> None:
    p = C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = msg_id, cls, sop
    p.Priority = priority
    if mover:
        p.MoveOriginatorApplicationEntityTitle = mover
        p.MoveOriginatorMessageID = move_id
    _same(dimse_messages.C_STORE_RQ(), p)


@settings(max_examples=60, deadline=None)
@given(IDS, UIDS, UIDS, st.sampled_from([0x0000, 0xA700, 0xB000, 0xC211, 0x0111]),
       st.one_of(st.none(), st.from_regex(r"\A[ -\[\]-~]{1,60}\Z")))
def test_c_store_response(msg_id: int, cls: str, sop: str, status: int,
                          comment: str | None) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID = msg_id, cls
    p.AffectedSOPInstanceUID, p.Status = sop, status
    if comment:
        p.ErrorComment = comment
    _same(dimse_messages.C_STORE_RSP(), p)


def test_echo_event_report_and_action() -> None:
    e = C_ECHO()
    e.MessageID, e.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    _same(dimse_messages.C_ECHO_RQ(), e)
    r = C_ECHO()
    r.MessageIDBeingRespondedTo, r.AffectedSOPClassUID, r.Status = 1, "1.2.840.10008.1.1", 0
    _same(dimse_messages.C_ECHO_RSP(), r)
    n = N_EVENT_REPORT()
    n.MessageID, n.AffectedSOPClassUID = 3, "1.2.840.10008.1.20.1"
    n.AffectedSOPInstanceUID, n.EventTypeID = "1.2.840.10008.1.20.1.1", 1
    _same(dimse_messages.N_EVENT_REPORT_RQ(), n)
    a = N_ACTION()
    a.MessageID, a.RequestedSOPClassUID = 4, "1.2.840.10008.1.20.1"
    a.RequestedSOPInstanceUID, a.ActionTypeID = "1.2.840.10008.1.20.1.1", 1
    _same(dimse_messages.N_ACTION_RQ(), a)


def test_what_it_does_not_know_goes_to_pydicom() -> None:
    """An AT element (OffendingElement) is pydicom's to write; the bytes are the same."""
    p = C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID = 1, "1.2.3"
    p.AffectedSOPInstanceUID, p.Status = "1.2.3.4", 0xA900
    p.OffendingElement = [0x00100010, 0x00100020]
    _same(dimse_messages.C_STORE_RSP(), p)


def test_installed_for_pynetdicom() -> None:
    import hermes_py.pynetdicom_compat  # noqa: F401  (installs it)

    assert dimse_messages.encode is dimse_codec.encode
    assert dimse_messages.write_file_meta_info is dimse_codec.write_file_meta_info


@settings(max_examples=60, deadline=None)
@given(UIDS, UIDS, st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5"]))
def test_file_meta_of_a_received_instance(cls: str, sop: str, ts: str) -> None:
    """What chunked receive puts before each received data set: pydicom's bytes."""
    meta = create_file_meta(sop_class_uid=cls, sop_instance_uid=sop, transfer_syntax=ts)
    ours, theirs = BytesIO(), BytesIO()
    dimse_codec.write_file_meta_info(ours, meta)
    filewriter.write_file_meta_info(DicomFileLike(theirs),
                                    create_file_meta(sop_class_uid=cls, sop_instance_uid=sop,
                                                     transfer_syntax=ts))
    assert ours.getvalue() == theirs.getvalue()
    assert dcmread(BytesIO(b"\0" * 128 + b"DICM" + ours.getvalue()),
                   force=True).file_meta.MediaStorageSOPInstanceUID == sop
