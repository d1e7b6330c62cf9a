"""Storage commitment against a real archive: Orthanc commits what hermes-py serve sent it.

Orthanc finds where to send its N-EVENT-REPORT by looking up our calling AE title in
its DicomModalities, so that names our receiver; the report comes on a new
association to it, about 0.1 s after our N-ACTION (notes §3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hermes_py.lifecycle import Stage
from hermes_py.spool import parse_iso
from tests.support.config import dest
from tests.support.dicomgen import write_series
from tests.support.peers import LOOPBACK, Orthanc, free_port, wait_for
from tests.support.serve import Hermes
from tests.support.spool import sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.network, pytest.mark.timeout(180)]


def test_orthanc_commits_every_instance(hermes: Callable[..., Hermes], tmp_path: Path) -> None:
    port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities={"hermes": ("HERMES", LOOPBACK, port)}) as pacs:
        d = dest("pacs", pacs.dicom_port, "ORTHANC", storage_commitment="required",
                 commit_batch=100)
        h = hermes([d], receiver={"port": port})
        files = write_series(tmp_path / "in", 120, rows=16, cols=16)
        h.start()
        assert len(h.send(files).acked) == 120

        def committed() -> bool:
            done = h.delivered("pacs")
            return len(done) == 120 and all(sidecar(p).get("committed_at") for p in done)
        wait_for(committed, 90, what="120 instances committed by Orthanc")
        assert pacs.instance_count() == 120
        assert not h.dcm_in(h.spool.folder(Stage.COMMITTING, "pacs"))
        assert not h.all_errors() and h.queued("pacs") == 0
        sides = [sidecar(p) for p in h.delivered("pacs")]
        assert len({s["commit_transaction"] for s in sides}) >= 2   # commit_batch 100
        waits = [(parse_iso(s["committed_at"]) or 0) - (parse_iso(s["delivered_at"]) or 0)
                 for s in sides]
        assert max(waits) < 30, waits
        st = h.cli("status", "--json")
        assert st.returncode == 0, st.stderr
        shown = json.loads(st.stdout)["destinations"]["pacs"]["commitment"]
        assert shown["mode"] == "required" and shown["awaiting"] == 0
        assert shown["not_committing_since"] is None and shown["last_report_at"]
        h.stop()
