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

from tests.dicomgen import mixed_set
from tests.e2e.harness import (
    Dest,
    assert_delivered,
    folder_arrivals,
    sent_index,
    wait_delivered,
)
from tests.peers import LOOPBACK, Orthanc, wait_for

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
