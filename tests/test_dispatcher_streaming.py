"""Deflated data sets, big instances and stalled peers: DicomDestination against storescp.

F7: an odd-length deflate stream (pydicom's image_dfl.dcm) is sent from a padded
copy; to an uncompressed-only peer a deflated file is inflated to a temp file.
F8: a big send keeps at most ``SEND_QUEUE_BYTES`` of P-DATA queued, and a peer
that stops reading is cut after network_timeout. F2: a deflate bomb is refused
past ``max_inflated`` without being inflated in memory.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from hermes_py import pynetdicom_compat
from hermes_py.destinations import transcode
from hermes_py.destinations.base import SYSTEM_TEMP, Item, Workspace
from hermes_py.destinations.dicom import DicomSettings
from hermes_py.destinations.dicom_scu import DicomDestination
from hermes_py.outcomes import Outcome, Result
from tests.support.peers import Storescp, wait_for

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

SC = "1.2.840.10008.5.1.4.1.1.7"
DFL = Path(get_testdata_file("image_dfl.dcm"))


def _part10(path: Path, ds: Dataset, ts: str, body: bytes, n_zeros: int) -> None:
    """``ds`` then an OB (7FE0,0010) of ``n_zeros`` zeros, encoded for ``ts``, streamed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, \
        ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15) if ts == DeflatedExplicitVRLittleEndian \
        else None
    with open(path, "wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM" + head.getvalue())

        def put(b: bytes) -> None:
            fp.write(comp.compress(b) if comp else b)
        put(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n_zeros))
        zeros = bytes(1 << 20)
        for _ in range(n_zeros >> 20):
            put(zeros)
        if comp:
            tail = comp.flush()
            fp.write(tail)


def instance(path: Path, ts: str, n_zeros: int) -> Item:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    ds.PatientID = "STREAM"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    _part10(path, ds, ts, body.getvalue(), n_zeros)
    return Item(path=path, name=path.name, sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=SC, transfer_syntax=ts)


def item_of(path: Path) -> Item:
    m = dcmread(path, stop_before_pixels=True).file_meta
    return Item(path=path, name=path.name, sop_instance_uid=str(m.MediaStorageSOPInstanceUID),
                sop_class_uid=str(m.MediaStorageSOPClassUID),
                transfer_syntax=str(m.TransferSyntaxUID))


def send(port: int, items: list[Item], workspace: Workspace = SYSTEM_TEMP,
         **timeouts: float) -> list[Result]:
    d = DicomDestination(DicomSettings(name="pacs", ae_title="STORESCP", host="127.0.0.1",
                                       port=port, **timeouts), workspace=workspace)
    got: list[Result] = []
    try:
        d.deliver(items, lambda it, r: got.append(r), lambda: False)
    finally:
        d.close()
    return got


def test_odd_deflate_stream_reaches_storescp_deflated(tmp_path: Path) -> None:
    with Storescp(tmp_path / "rx") as scp:
        [r] = send(scp.port, [item_of(DFL)], Workspace(scratch=tmp_path))
        assert r.outcome is Outcome.SUCCESS, r.reason
        assert r.delivered_as == DeflatedExplicitVRLittleEndian
        [f] = scp.files()
        got, ref = dcmread(f), dcmread(DFL)
        assert got.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert got.SOPInstanceUID == ref.SOPInstanceUID and got.PixelData == ref.PixelData
    assert [p.name for p in tmp_path.iterdir()] == ["rx"]   # the padded copy is gone


@pytest.mark.parametrize("extra,ts", [((), ExplicitVRLittleEndian),
                                      (("+xi",), ImplicitVRLittleEndian)])
def test_deflated_to_an_uncompressed_only_peer_is_inflated(tmp_path: Path, extra: tuple[str],
                                                           ts: str) -> None:
    with Storescp(tmp_path / "rx", extra=extra) as scp:
        [r] = send(scp.port, [item_of(DFL)], Workspace(scratch=tmp_path))
        assert r.outcome is Outcome.SUCCESS, r.reason
        assert r.delivered_as == ts
        [f] = scp.files()
        got, ref = dcmread(f), dcmread(DFL)
        assert got.SOPInstanceUID == ref.SOPInstanceUID and got.PixelData == ref.PixelData
    assert [p.name for p in tmp_path.iterdir()] == ["rx"]


def test_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path) -> None:
    bomb = instance(tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian, 256 << 20)
    assert bomb.path.stat().st_size < 1 << 20
    work = tmp_path / "work"
    work.mkdir()
    with Storescp(tmp_path / "rx", extra=()) as scp:   # no deflate: must convert
        [r] = send(scp.port, [bomb], Workspace(scratch=work, max_inflated=32 << 20))
    assert r.outcome is Outcome.PERMANENT
    assert "max_inflated_mb" in r.reason and "deflate bomb" in r.reason
    assert list(work.iterdir()) == []


def _watch_queue(monkeypatch: pytest.MonkeyPatch, on_assoc: Callable[[], None] = lambda: None
                 ) -> tuple[list[int], threading.Event]:
    """Sample the most P-DATA bytes waiting in our association's DUL queue.

    ``on_assoc`` runs right after the association is set up (before any data).
    """
    peak = [0]
    stop = threading.Event()
    original = pynetdicom_compat.bound_send_queue

    def wrapped(assoc: Any, *a: Any, **k: Any) -> pynetdicom_compat.SendGate:
        gate = original(assoc, *a, **k)
        q = assoc.dul.to_provider_queue

        def watch() -> None:
            while not stop.is_set():
                n = sum(len(p.presentation_data_value_list[0][1])
                        for p in list(q.queue) if isinstance(p, P_DATA))
                peak[0] = max(peak[0], n)
                time.sleep(0.002)
        threading.Thread(target=watch, daemon=True).start()
        on_assoc()
        return gate

    monkeypatch.setattr(pynetdicom_compat, "bound_send_queue", wrapped)
    return peak, stop


def test_a_big_send_queues_at_most_the_send_budget(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    big = instance(tmp_path / "big.dcm", ExplicitVRLittleEndian, 256 << 20)
    peak, stop = _watch_queue(monkeypatch)
    with Storescp(tmp_path / "rx", extra=("+xa", "-pm", "+B")) as scp:
        try:
            [r] = send(scp.port, [big])
        finally:
            stop.set()
        assert r.outcome is Outcome.SUCCESS, r.reason
        [f] = scp.files()
        assert transcode.dataset_length(f)[1] == transcode.dataset_length(big.path)[1]
    assert 0 < peak[0] <= pynetdicom_compat.SEND_QUEUE_BYTES + 131072


def test_a_peer_that_stops_reading_is_cut_after_network_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = instance(tmp_path / "big.dcm", ExplicitVRLittleEndian, 128 << 20)
    with Storescp(tmp_path / "rx", extra=("+xa", "-pm", "+B")) as scp:
        assert scp.proc is not None
        pid = scp.proc.pid
        peak, stop = _watch_queue(monkeypatch, lambda: os.kill(pid, signal.SIGSTOP))
        t0 = time.monotonic()
        try:
            [r] = send(scp.port, [big], network_timeout=2.0, dimse_timeout=30.0)
        finally:
            stop.set()
            os.kill(pid, signal.SIGCONT)
        took = time.monotonic() - t0
    assert r.outcome is Outcome.TRANSIENT
    assert "stopped reading" in r.reason
    assert took < 15
    assert peak[0] <= pynetdicom_compat.SEND_QUEUE_BYTES + 131072
    wait_for(lambda: not [t for t in threading.enumerate()
                          if isinstance(t, DULServiceProvider)], 10, what="the DUL thread ended")
