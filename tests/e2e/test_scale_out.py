"""Two routers, each with its own spool, behind HAProxy in TCP mode health-checked through
/healthz: the supported active/active shape (README, "One spool has one owner").

Six dcmsend runs go through HAProxy; one router's whole process group is killed -9
mid-transfer and restarted; every acknowledged instance reaches the PACS behind
(duplicates counted and bounded); then ``drain`` of one router sends new associations
to the other while its own queue empties. A second serve on a spool that has a live
owner refuses, and a dispatcher whose owner epoch was taken over stops sending.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import sent_index, wait_delivered
from tests.e2e.test_health import healthz
from tests.support.config import Dest, rule
from tests.support.dicomgen import make_corpus, make_instance, save
from tests.support.peers import LOOPBACK, Modality, free_port, wait_for, wait_port
from tests.support.serve import Hermes

pytestmark = [pytest.mark.e2e, pytest.mark.network]

HAPROXY_CFG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 2m
    timeout server 2m
frontend dicom
    bind {host}:{port}
    default_backend routers
backend routers
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    server a {host}:{a_port} check port {a_health} inter 300ms fall 1 rise 1
    server b {host}:{b_port} check port {b_health} inter 300ms fall 1 rise 1
"""


def received(h: Hermes) -> int:
    """Instances this router took in (whatever stage they are in now)."""
    return sum(1 for p in h.spool.root.glob("*/pacs/*.dcm")) + len(h.dcm_in(h.spool.incoming))


@pytest.mark.timeout(300)
def test_two_routers_behind_haproxy_kill_and_drain(tmp_path: Path, hermes, scp) -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    pacs = Dest("pacs", ae_title="PACS", options={"batch_size": 20})
    peer = scp(pacs)
    routers = [hermes([pacs], rules=rule("all", ["pacs"]), health={"port": free_port()})
               for _ in range(2)]
    a, b = routers
    for h in routers:
        h.start()
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(host=LOOPBACK, port=front, a_port=a.port,
                                      b_port=b.port, a_health=a.config.health["port"],
                                      b_health=b.config.health["port"]))
    proxy = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_port(front)
        for h in routers:
            wait_for(lambda h=h: healthz(int(h.config.health["port"]))[0] == 200, 30, 0.1,
                     "both routers healthy")
        files = make_corpus(tmp_path / "corpus", 300, per_series=50)
        sent = sent_index(files)
        runs = [Modality(front, files[i::6], tmp_path / f"run{i}.report") for i in range(6)]
        wait_for(lambda: received(a) >= 10, 60, 0.05, "router a to be taking instances")
        a.kill9()
        acked: set[str] = set()
        for run in runs:
            acked |= run.result().acked
        a.start()
        assert acked, "some instances were acknowledged before and around the kill"
        # The modality resends what was not acknowledged (through HAProxy again).
        rest = [p for p in files if str(sent_index([p]).popitem()[0]) not in acked]
        if rest:
            acked |= Modality(front, rest, tmp_path / "rest.report").result().acked
        assert acked == set(sent)
        wait_delivered(lambda: peer.uids, acked, what="every acknowledged instance at the "
                       "PACS behind both routers", hermes=a)
        dupes = peer.count() - len(peer.uids)
        assert dupes <= 2 * 20 + 6, f"{dupes} duplicates (bound: the batches in flight)"

        # drain b: HAProxy stops sending it associations; a takes them; b's queue empties
        assert b.cli("drain").returncode == 0
        wait_for(lambda: healthz(int(b.config.health["port"]))[0] == 503, 10, 0.1,
                 "b's /healthz to say 503")
        before_a, before_b = received(a), received(b)
        more = [save(make_instance(8, 8), tmp_path / f"more{i}.dcm") for i in range(10)]
        late: set[str] = set()
        tries = 0

        def resend_until_acked() -> bool:
            """A modality's retry: b refuses (transient) until HAProxy has seen its 503."""
            nonlocal late, tries
            tries += 1
            todo = [p for p in more if sent_index([p]).popitem()[0] not in late]
            late |= Modality(front, todo, tmp_path / f"late{tries}.report").result().acked
            return len(late) == len(more)
        wait_for(resend_until_acked, 30, 0.1, "the new instances acknowledged via a")
        assert received(b) == before_b, "a draining router took new associations"
        assert received(a) >= before_a + 10
        wait_for(lambda: b.queued("pacs") == 0, 60, 0.2, "b's queue to empty while draining")
        wait_delivered(lambda: peer.uids, late, what="the late instances via a", hermes=a)
        both = a.cli("status", "--spools", f"{a.spool.root},{b.spool.root}")
        assert both.returncode == 0, both.stderr
        assert f"== {a.spool.root.resolve()}" in both.stdout
        assert f"== {b.spool.root.resolve()}" in both.stdout and "DRAINING" in both.stdout
    finally:
        proxy.terminate()
        proxy.wait(10)


def test_a_second_serve_refuses_and_a_taken_over_epoch_stops_sending(tmp_path: Path,
                                                                     hermes, scp) -> None:
    pacs = Dest("pacs", ae_title="PACS")
    peer = scp(pacs)
    h = hermes([pacs], rules=rule("all", ["pacs"]))
    h.start()
    status = h.cli("status").stdout
    assert "spool id " in status and "(epoch 1," in status, status
    again = h.cli("serve", timeout=30)
    assert again.returncode == 2 and "already running" in again.stderr
    # Another node took the spool over (its serve wrote owner epoch 2)
    owner = h.spool.state / "owner.json"
    rec = __import__("json").loads(owner.read_text())
    rec.update(epoch=rec["epoch"] + 1, host="other-node", pid=1)
    h.spool.write_json(owner, rec)
    wait_for(lambda: "STOPPED SENDING" in h.log_text(), 30, 0.2,
             "the dispatcher to see the new owner and stop")
    files = [save(make_instance(8, 8), tmp_path / f"x{i}.dcm") for i in range(3)]
    res = h.send(files)
    assert len(res.acked) == 3
    wait_for(lambda: h.queued("pacs") == 3, 30, 0.2, "the instances queued, not sent")
    assert not peer.uids & res.acked, "a fenced dispatcher sent"
    assert "other-node" in h.log_text()


HAPROXY_PROXY_CFG = """\
global
    maxconn 50
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
frontend v1
    bind {host}:{v1}
    default_backend plain_v1
frontend v2
    bind {host}:{v2}
    default_backend plain_v2
frontend tls
    bind {host}:{tls}
    default_backend tls_v2
backend plain_v1
    server r {host}:{port} send-proxy source {lb}
backend plain_v2
    server r {host}:{port} send-proxy-v2 source {lb}
backend tls_v2
    server r {host}:{tls_port} send-proxy-v2 source {lb}
"""


def _store_from(port: int, bind: str, tls_args: object = None) -> str:
    """One C-STORE from a pynetdicom modality bound to ``bind``: its SOP Instance UID."""
    from pynetdicom import AE
    ae = AE(ae_title="CT1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = 15
    ds = make_instance(8, 8)
    kw: dict[str, object] = {"tls_args": tls_args} if tls_args is not None else {}
    assoc = ae.associate(LOOPBACK, port, ae_title="HERMES", bind_address=(bind, 0), **kw)
    assert assoc.is_established, f"association via {port} from {bind} failed"
    try:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    return str(ds.SOPInstanceUID)


@pytest.mark.timeout(120)
def test_haproxy_send_proxy_v1_v2_and_tls_name_the_modality(tmp_path: Path, hermes,
                                                            scp) -> None:
    """HAProxy (``send-proxy``, ``send-proxy-v2``, and v2 in front of the TLS port) connects
    from 127.0.0.2, the listed balancer; the sidecars and the PeerAddress rule see the
    modalities (127.0.0.5, .6, .7), not HAProxy. serve's own C-ECHO (from 127.0.0.1,
    unlisted) is plain DICOM."""
    import ssl

    import trustme
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    pacs = Dest("pacs", ae_title="PACS")
    peer = scp(pacs)
    modalities = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
    tls_port = free_port()
    h = hermes([pacs], rules=rule("modalities", ["pacs"], match={"PeerAddress": modalities}),
               receiver={"proxy_protocol": True, "load_balancers": ["127.0.0.2"],
                         "tls": {"port": tls_port, "cert_file": str(cert),
                                 "key_file": str(key)}})
    h.start()
    ports = {"v1": free_port(), "v2": free_port(), "tls": free_port()}
    cfg = tmp_path / "haproxy-pp.cfg"
    cfg.write_text(HAPROXY_PROXY_CFG.format(host=LOOPBACK, port=h.port, tls_port=tls_port,
                                            lb="127.0.0.2", **ports))
    proxy = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        for p in ports.values():
            wait_port(p)
        client = ssl.create_default_context(cafile=None)
        ca.configure_trust(client)
        sent = {_store_from(ports["v1"], modalities[0]): modalities[0],
                _store_from(ports["v2"], modalities[1]): modalities[1],
                _store_from(ports["tls"], modalities[2], (client, "localhost")): modalities[2]}
        wait_delivered(lambda: peer.uids, set(sent), what="the three instances at the PACS "
                       "(routed by PeerAddress)", hermes=h)
        # at the PACS first, then recorded in success/ (the dispatcher's batched flush)
        wait_for(lambda: len(list(h.spool.success_dir("pacs").glob("*.json"))) == len(sent),
                 what="the three recorded in success/pacs/")
        seen = {}
        for side in h.spool.success_dir("pacs").glob("*.json"):
            data = __import__("json").loads(side.read_text())
            seen[data["sop_instance_uid"]] = data["peer_address"]
        assert seen == sent, "peer_address is the modality's, not HAProxy's 127.0.0.2"
        log = h.log_text()
        for uid, address in sent.items():
            line = next(x for x in log.splitlines() if "received" in x and uid in x)
            assert f"CT1@{address}" in line, line
    finally:
        proxy.terminate()
        proxy.wait(10)
