"""DICOM TLS both ways with Orthanc (Debian 1.10, DCMTK's TLS inside): issue 14's proof
with a PACS, not only DCMTK's own tools (tests/test_tls.py).

One Orthanc with ``DicomTlsEnabled`` (its SCP speaks only TLS, client certificates
required, trusting the test CA) is a TLS destination of hermes_py, which presents its
client certificate; the same Orthanc is a TLS sender to hermes_py's TLS port (hermes
requires and verifies Orthanc's certificate): an instance uploaded over Orthanc's REST
API is sent with ``/modalities/hermes/store`` and reaches the scripted PACS behind.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.e2e.harness import sent_index, wait_delivered
from tests.support.config import Dest, rule
from tests.support.dicomgen import make_instance, save
from tests.support.peers import LOOPBACK, Orthanc, echoscu, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def _post(orthanc: Orthanc, path: str, body: bytes | dict[str, Any]) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{LOOPBACK}:{orthanc.http_port}{path}", data=data,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.timeout(120)
def test_orthanc_tls_as_receiver_and_as_sender(tmp_path: Path, hermes, scp) -> None:
    ca = trustme.CA()
    files: dict[str, Path] = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for who in ("hermes", "orthanc"):
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        files[f"{who}.crt"] = tmp_path / f"{who}.crt"
        files[f"{who}.key"] = tmp_path / f"{who}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[f"{who}.crt"]))
        leaf.private_key_pem.write_to_path(str(files[f"{who}.key"]))
    hermes_tls = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(files["orthanc.crt"]),
        "DicomTlsPrivateKey": str(files["orthanc.key"]),
        "DicomTlsTrustedCertificates": str(files["ca"]),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"hermes": {"AET": "HERMES", "Host": LOOPBACK, "Port": hermes_tls,
                                       "UseDicomTls": True}},
    })
    pacs = Dest("pacs", ae_title="PACS")
    peer = scp(pacs)
    to_orthanc = Dest("orthanc", orthanc.dicom_port, "ORTHANC", options={
        "tls": {"ca_file": str(files["ca"]), "cert_file": str(files["hermes.crt"]),
                "key_file": str(files["hermes.key"])}})
    rules = (rule("from orthanc", ["pacs"], match={"CallingAE": "ORTHANC"})
             + rule("from modalities", ["orthanc"], match={"CallingAE": "MODALITY"}))
    h = hermes([pacs, to_orthanc], rules=rules, receiver={"tls": {
        "port": hermes_tls, "cert_file": str(files["hermes.crt"]),
        "key_file": str(files["hermes.key"]), "client_ca_file": str(files["ca"])}})
    with orthanc:
        h.start()
        plain = echoscu(orthanc.dicom_port, "ORTHANC")
        assert plain.returncode != 0, "Orthanc's SCP answered plain DICOM: TLS is not on"
        # hermes -> Orthanc over TLS (Orthanc's SCP refuses anything but TLS)
        sent = [save(make_instance(16, 16, instance_number=i), tmp_path / f"in{i}.dcm")
                for i in range(5)]
        res = h.send(sent)
        assert len(res.acked) == 5, res.describe()
        wait_for(lambda: orthanc.sop_uids() >= res.acked, 45, 0.3,
                 "the five instances in Orthanc, over DICOM TLS")
        assert h.cli("status").returncode == 0
        # Orthanc -> hermes' TLS port (client certificate required and verified)
        ds = make_instance(16, 16, instance_number=99)
        own = save(ds, tmp_path / "from-orthanc.dcm")
        uploaded = _post(orthanc, "/instances", own.read_bytes())
        answer = _post(orthanc, "/modalities/hermes/store",
                       {"Resources": [uploaded["ID"]], "Synchronous": True})
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        want = set(sent_index([own]))
        wait_delivered(lambda: peer.uids, want, timeout=45,
                       what="Orthanc's TLS C-STORE at the PACS behind hermes", hermes=h)
        side = next(h.spool.success_dir("pacs").glob("*.json"))
        assert json.loads(side.read_text())["calling_ae"] == "ORTHANC"
