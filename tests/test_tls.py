"""DICOM TLS both ways, against DCMTK: storescu +tls -> our TLS port, our dispatcher ->
storescp +tls; a silent socket in the handshake blocks nobody; certificate mistakes are
misconfigurations with the real reason, and rules check names their line.

Certificates come from one trustme CA made per test session (ECDSA, like a current
site PKI); the server certificate names localhost and 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from pynetdicom import AE

from hermes_py import tls
from hermes_py.config import ConfigError, load
from hermes_py.dispatcher import Dispatcher
from hermes_py.lifecycle import DestinationStatus
from hermes_py.pynetdicom_compat import VERIFICATION
from hermes_py.receiver import Receiver
from hermes_py.spool import Spool
from tests.support.config import Config, Dest, receiver, rule
from tests.support.dicomgen import make_instance, save
from tests.support.peers import LOOPBACK, Storescp, free_port, storescu, wait_for
from tests.support.spool import put

pytestmark = pytest.mark.network


@dataclass
class Pki:
    ca: Path
    cert: Path      # server and client certificate (localhost, 127.0.0.1)
    key: Path
    other_ca: Path  # a CA nobody trusts
    other_cert: Path
    other_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    stranger = other.issue_cert("localhost", "127.0.0.1")
    out = Pki(d / "ca.pem", d / "cert.pem", d / "key.pem", d / "other-ca.pem",
              d / "other-cert.pem", d / "other-key.pem")
    ca.cert_pem.write_to_path(str(out.ca))
    leaf.cert_chain_pems[0].write_to_path(str(out.cert))
    leaf.private_key_pem.write_to_path(str(out.key))
    other.cert_pem.write_to_path(str(out.other_ca))
    stranger.cert_chain_pems[0].write_to_path(str(out.other_cert))
    stranger.private_key_pem.write_to_path(str(out.other_key))
    return out


def tls_receiver(make_settings: Any, pki: Pki, **tls_keys: object) -> Receiver:
    t = {"port": free_port(), "cert_file": str(pki.cert), "key_file": str(pki.key),
         "client_ca_file": str(pki.ca), "handshake_timeout": "3s", **tls_keys}
    cfg = make_settings(receiver=receiver(free_port(), tls=t),
                        spool={"path": "spool", "min_free_mb": 0})
    return Receiver(cfg).start()


def tls_storescu(port: int, files: list[Path], pki: Pki, cert: Path | None, key: Path | None,
                 ) -> Any:
    extra = ["+tls", str(key), str(cert)] if cert and key else ["+tla"]  # +tla: no certificate
    return storescu(port, files, extra=[*extra, "+cf", str(pki.ca)], timeout=60)


def test_storescu_over_tls_with_a_client_certificate_is_stored(make_settings: Any, pki: Pki,
                                                               tmp_path: Path) -> None:
    r = tls_receiver(make_settings, pki)
    try:
        f = save(make_instance(8, 8), tmp_path / "a.dcm")
        cp = tls_storescu(r.tls_port or 0, [f], pki, pki.cert, pki.key)
        assert cp.returncode == 0, cp.stderr
        wait_for(lambda: len(list(r.spool.incoming.glob("*.dcm"))) == 1, 10,
                 what="the instance in incoming/")
        # a client without a certificate, and plain DICOM on the TLS port, are refused
        anon = tls_storescu(r.tls_port or 0, [f], pki, None, None)
        assert anon.returncode != 0
        plain = storescu(r.tls_port or 0, [f], timeout=30)
        assert plain.returncode != 0
        assert len(list(r.spool.incoming.glob("*.dcm"))) == 1
    finally:
        r.stop(grace=1)


@pytest.mark.timeout(60)  # pynetdicom's own TLS server hangs here (its accept loop blocks)
def test_a_silent_client_in_the_handshake_blocks_nobody(make_settings: Any, pki: Pki) -> None:
    r = tls_receiver(make_settings, pki)
    silent = [socket.create_connection((LOOPBACK, r.tls_port or 0)) for _ in range(3)]
    try:
        ae = AE(ae_title="ECHO")
        ae.add_requested_context(VERIFICATION)
        ctx = tls.client_context(tls.DestinationTLS(ca_file=str(pki.ca), cert_file=str(pki.cert),
                                                    key_file=str(pki.key)))
        t0 = time.monotonic()
        assoc = ae.associate(LOOPBACK, r.tls_port or 0, ae_title="HERMES",
                             tls_args=(ctx, "localhost"))
        took = time.monotonic() - t0
        assert assoc.is_established, "a TLS association behind three silent sockets"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert took < 1.0, f"established after {took:.2f}s with silent sockets open"
        # the silent ones are dropped at handshake_timeout (3 s)
        for s in silent:
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in silent:
            s.close()
        r.stop(grace=1)


def tls_dest(port: int, **t: object) -> Dest:
    return Dest("pacs", port=port, ae_title="STORESCP", options={"tls": t})


def test_dispatcher_sends_to_storescp_over_tls(make_settings: Any, pki: Pki,
                                               tmp_path: Path) -> None:
    peer = Storescp(tmp_path / "pacs", extra=("+xa", "-pm", "+tls", str(pki.key), str(pki.cert),
                                              "+cf", str(pki.ca)))
    with peer:
        cfg = make_settings(tls_dest(peer.port, ca_file=str(pki.ca), cert_file=str(pki.cert),
                                     key_file=str(pki.key), server_name="localhost"),
                            rules=rule("all", ["pacs"]))
        spool = Spool(cfg.spool.path)
        put(spool, dest="pacs")
        with Dispatcher(cfg, "pacs") as d:
            assert d.run_once() == 1
            assert d.state.state is DestinationStatus.OK
        wait_for(lambda: len(peer.files()) == 1, 10, what="the instance at storescp +tls")


@pytest.mark.parametrize(("keys", "reason"), [
    ({"ca_file": "other_ca", "cert_file": "cert", "key_file": "key"},
     "certificate is not trusted"),
    ({"ca_file": "ca"}, "client certificate"),
])
def test_certificate_mistakes_are_misconfigured_with_the_reason(
        make_settings: Any, pki: Pki, tmp_path: Path, keys: dict[str, str],
        reason: str) -> None:
    peer = Storescp(tmp_path / "pacs", extra=("+xa", "-pm", "+tls", str(pki.key), str(pki.cert),
                                              "+cf", str(pki.ca)))
    files = {"ca": pki.ca, "other_ca": pki.other_ca, "cert": pki.cert, "key": pki.key}
    with peer:
        t = {k: str(files[v]) for k, v in keys.items()}
        cfg = make_settings(tls_dest(peer.port, server_name="localhost", **t),
                            rules=rule("all", ["pacs"]))
        spool = Spool(cfg.spool.path)
        put(spool, dest="pacs")
        with Dispatcher(cfg, "pacs") as d:
            d.run_once()
            assert d.state.state is DestinationStatus.MISCONFIGURED
            detail = str((d.state.last_error or {}).get("detail"))
            assert reason in detail, detail
        assert len(list(spool.outbox("pacs").glob("*.dcm"))) == 1, "the queue is kept"
        assert not peer.files()


def test_rules_check_names_the_tls_line(tmp_path: Path, pki: Pki) -> None:
    text = Config(receiver=receiver(11112)).render() + (
        f'\n[receiver.tls]\nport = 2762\ncert_file = "{pki.cert}"\n'
        f'key_file = "{tmp_path / "missing.key"}"\n')
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    line = text.splitlines().index(f'key_file = "{tmp_path / "missing.key"}"') + 1
    assert f"rules.toml:{line}: receiver.tls.key_file: cannot read" in str(e.value)
    # a key that is not the certificate's
    path.write_text(text.replace(str(tmp_path / "missing.key"), str(pki.other_key)))
    with pytest.raises(ConfigError, match="cannot use the certificate and key"):
        load(path)


def test_status_shows_the_receiver_certificate_expiry(make_settings: Any, pki: Pki) -> None:
    from hermes_py.admin.status import format_status, snapshot

    t = {"port": free_port(), "cert_file": str(pki.cert), "key_file": str(pki.key)}
    cfg = make_settings(receiver=receiver(free_port(), tls=t))
    snap = snapshot(cfg, Spool(cfg.spool.path))
    assert snap["tls_certificate_expires"]
    assert "receiver TLS certificate expires" in format_status(snap, time.time())
