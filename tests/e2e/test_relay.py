"""Interoperability: a modality (DCMTK dcmsend) -> hermes-py serve -> real destinations.

The mixed set is what a hospital sends: uncompressed CT (explicit and implicit VR), every
compressed kind (JPEG baseline, JPEG 2000, JPEG-LS, RLE), a secondary capture and a private
SOP class nobody's standard list knows. Each must arrive with the same SOP Instance UID
and the same pixel data bytes: a store-and-forward router never re-encodes.
"""

from __future__ import annotations

import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from tests.e2e.harness import (
    assert_delivered,
    folder_arrivals,
    scp_arrivals,
    sent_index,
    wait_delivered,
)
from tests.support.config import Dest
from tests.support.dicomgen import (
    COMPRESSED_SAMPLES,
    compressed_instance,
    make_corpus,
    mixed_set,
    save,
)
from tests.support.peers import LOOPBACK, Orthanc, Script, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def test_relay_mixed_set_to_storescp(tmp_path: Path, hermes, storescp) -> None:
    dest = Dest("store", ae_title="STORESCP")
    h = hermes([dest])
    peer = storescp(dest)
    files = mixed_set(tmp_path / "corpus")
    sent = sent_index(files)
    h.start()

    res = h.send(files)
    assert res.acked == set(sent), res.describe()

    wait_delivered(peer.uids, set(sent), what="the mixed set at storescp", hermes=h)
    arrived = folder_arrivals(peer.folder)
    assert_delivered(sent, arrived, where="storescp")
    wait_for(lambda: len(h.delivered("store")) == len(sent) and h.queued("store") == 0, 60,
             what="every instance in success/store/ and none left queued")
    assert not h.all_errors(), f"instances in error/: {h.all_errors()}"
    h.stop()


@pytest.mark.timeout(240)
def test_relay_to_orthanc_as_pacs(tmp_path: Path, hermes) -> None:
    """Orthanc (the Debian package) as the real PACS: compare by its REST API."""
    pacs = Orthanc(tmp_path / "orthanc", ae_title="ORTHANC")
    pacs.start()
    try:
        dest = Dest("pacs", port=pacs.dicom_port, ae_title="ORTHANC")
        h = hermes([dest])
        files = mixed_set(tmp_path / "corpus")
        sent = sent_index(files)
        h.start()
        res = h.send(files)
        assert res.acked == set(sent), res.describe()

        wait_delivered(pacs.sop_uids, set(sent), what="the mixed set in Orthanc", hermes=h)
        arrived = {}
        for iid in pacs.api("/instances"):
            url = f"http://{LOOPBACK}:{pacs.http_port}/instances/{iid}/file"
            with urllib.request.urlopen(url, timeout=30) as r:
                ds = dcmread(BytesIO(r.read()))
            arrived.setdefault(str(ds.SOPInstanceUID), []).append(ds)
        assert_delivered(sent, arrived, where="Orthanc")
        assert pacs.instance_count() == len(sent)
        assert not h.all_errors(), f"instances in error/: {h.all_errors()}"
        h.stop()
    finally:
        pacs.stop()


@pytest.mark.timeout(180)
def test_large_instances_and_resends(tmp_path: Path, hermes, scp) -> None:
    """2 MB instances stream through unchanged; a modality that sends the same instances
    again gets them delivered again (one spool name per reception, nothing overwritten)."""
    dest = Dest("pacs")
    h = hermes([dest])
    peer = scp(dest)
    files = make_corpus(tmp_path / "corpus", 4, rows=1024, cols=1024)
    sent = sent_index(files)
    h.start()
    assert h.send(files).acked == set(sent)
    assert h.send(files).acked == set(sent)
    wait_for(lambda: peer.count() >= 2 * len(sent), 120, interval=0.3,
             what="both receptions of every instance delivered")
    arrived = scp_arrivals(peer)
    assert_delivered(sent, arrived, where="pacs")
    assert all(len(v) == 2 for v in arrived.values()), {k: len(v) for k, v in arrived.items()}
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(180)
def test_dcmtk_uncompressed_only_destination(tmp_path: Path, hermes, storescp) -> None:
    """DCMTK storescp with its default (uncompressed only) as a real old workstation."""
    dest = Dest("ws", ae_title="STORESCP")
    h = hermes([dest])
    peer = storescp(dest, extra=())
    files = [save(compressed_instance(kind), tmp_path / "corpus" / f"{kind}.dcm")
             for kind in COMPRESSED_SAMPLES] + make_corpus(tmp_path / "plain", 2)
    sent = sent_index(files)
    h.start()
    assert h.send(files).acked == set(sent)
    wait_delivered(peer.uids, set(sent), what="decompressed delivery to storescp", hermes=h)
    arrived = folder_arrivals(peer.folder)
    for uid, copies in arrived.items():
        ts = UID(copies[0].file_meta.TransferSyntaxUID)
        assert not ts.is_compressed, f"{uid} stored by storescp as {ts.name}"
    assert_delivered(sent, arrived, where="storescp (uncompressed only)")
    assert not h.all_errors()
    h.stop()


@pytest.mark.timeout(180)
def test_destination_aborting_mid_association(tmp_path: Path, hermes, scp) -> None:
    """A destination that aborts every association after 7 stores: transient, all arrive."""
    dest = Dest("pacs", options={"batch_size": 20})
    h = hermes([dest])
    peer = scp(dest, Script(abort_after=7))
    files = make_corpus(tmp_path / "corpus", 40)
    sent = sent_index(files)
    h.start()
    assert h.send(files).acked == set(sent)
    wait_delivered(lambda: peer.uids, set(sent), what="delivery despite aborts", hermes=h)
    assert_delivered(sent, scp_arrivals(peer), where="pacs")
    assert not h.all_errors(), "an aborted association is transient"
    h.stop()
