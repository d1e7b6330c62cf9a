"""The PROXY protocol on the receiver: the parser (v1, v2, LOCAL, truncated, garbage,
oversize, byte-exact, deadline), the config keys, and a receiver behind a scripted
balancer (a TCP relay that writes the header, then pipes bytes both ways) with a
pynetdicom SCU: the sidecar names the header's client, a listed address without a
header is closed, an unlisted one with a header fails, a silent balancer connection
blocks nobody. The same against real HAProxy: tests/e2e/test_scale_out.py.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from hermes_py.config import ConfigError
from hermes_py.proxy_protocol import (
    V2_SIGNATURE,
    Header,
    ProxyError,
    Truncated,
    listed,
    networks,
    parse_v1,
    read_from,
    read_header,
)
from hermes_py.receiver import Receiver
from tests.support.config import Config, receiver
from tests.support.dicomgen import make_instance
from tests.support.peers import LOOPBACK, free_port, wait_for
from tests.support.spool import sidecar

# ---------------------------------------------------------------- headers


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def v2_tcp4(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 11112,
            tlvs: bytes = b"") -> bytes:
    return v2(1, 0x11, socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!HH", sport, dport) + tlvs)


def v2_tcp6(src: str, sport: int, dst: str = "::1", dport: int = 11112) -> bytes:
    return v2(1, 0x21, socket.inet_pton(socket.AF_INET6, src)
              + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport))


class feed:  # noqa: N801 - used as a function
    """``recv(n)`` over a byte string (then end-of-file); ``pos`` is how far it was read."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def __call__(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


def parse(data: bytes) -> Header:
    """read_header over a byte string, checking it consumed exactly the header."""
    recv = feed(data)
    header = read_header(recv)
    assert data[recv.pos:] == b"DICOM", f"read {recv.pos} bytes of {len(data)}"
    return header


def test_v1_tcp4_tcp6_unknown() -> None:
    h = parse(b"PROXY TCP4 10.1.2.3 10.0.0.1 40001 11112\r\nDICOM")
    assert h == Header(1, ("10.1.2.3", 40001), ("10.0.0.1", 11112))
    h = parse(b"PROXY TCP6 2001:db8::5 2001:db8::1 40002 104\r\nDICOM")
    assert h.source == ("2001:db8::5", 40002)
    assert parse(b"PROXY UNKNOWN\r\nDICOM").source is None
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nDICOM").source is None


def test_v2_tcp4_tcp6_local_and_tlvs() -> None:
    assert parse(v2_tcp4("10.9.8.7", 5000) + b"DICOM") == Header(
        2, ("10.9.8.7", 5000), ("127.0.0.1", 11112))
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"      # PP2_TYPE_NOOP, skipped
    assert parse(v2_tcp4("10.9.8.7", 5000, tlvs=tlv) + b"DICOM").source == ("10.9.8.7", 5000)
    assert parse(v2_tcp6("2001:db8::7", 6000) + b"DICOM").source == ("2001:db8::7", 6000)
    assert parse(v2(0, 0x00, b"") + b"DICOM") == Header(2, None)          # LOCAL
    assert parse(v2(1, 0x00, b"") + b"DICOM").source is None              # UNSPEC


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 10.1.2.3 10.0.0.1 40001",                # no CRLF, then the end
    b"PROXY TC",
    v2_tcp4("10.1.2.3", 1)[:20],                          # body cut short
    V2_SIGNATURE[:8],
])
def test_truncated(data: bytes) -> None:
    with pytest.raises(Truncated):
        read_header(feed(data))


@pytest.mark.parametrize("data, why", [
    (b"\x01\x00\x00\x00\x00\xcdDICOM A-ASSOCIATE", "no PROXY header"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "no PROXY header"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "expected TCP4"),
    (b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n", "bad address"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "not an IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "out of range"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "4 fields"),
    (b"PROXY " + b"A" * 200, "within 107 bytes"),                        # oversize v1
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000), "over the"),  # oversize v2
    (V2_SIGNATURE + struct.pack("!BBH", 0x11, 0x11, 0), "version 1"),
    (v2(1, 0x12, bytes(12)), "not a stream"),
    (v2(1, 0x11, bytes(8)), "cut short"),
    (v2(5, 0x11, bytes(12)), "unknown command"),
])
def test_garbage_and_oversize(data: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        read_header(feed(data))


def test_v1_line_is_bounded() -> None:
    with pytest.raises(ProxyError):
        parse_v1(b"PROXY TCP4 " + b"1" * 120 + b"\r\n")


def test_read_from_a_socket_is_byte_exact_and_has_a_deadline() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"PROXY TCP4 10.1.1.1 10.0.0.1 1234 104\r\n\x01\x00rest")
        assert read_from(a, 2.0).source == ("10.1.1.1", 1234)
        assert a.recv(100) == b"\x01\x00rest"
    a, b = socket.socketpair()
    with a, b:
        b.sendall(v2_tcp4("10.1.1.1", 1)[:10])     # a peer that stops inside its header
        t0 = time.monotonic()
        with pytest.raises(Truncated, match="within 0.3s"):
            read_from(a, 0.3)
        assert time.monotonic() - t0 < 2.0


def test_listed_addresses_and_networks() -> None:
    nets = networks(["127.0.0.1", "10.0.0.0/24", "2001:db8::/64"])
    assert listed("127.0.0.1", nets) and listed("10.0.0.77", nets)
    assert listed("::ffff:10.0.0.3", nets), "a dual-stack listener's view of an IPv4 balancer"
    assert listed("2001:db8::9", nets)
    assert not listed("127.0.0.2", nets) and not listed("10.0.1.1", nets)
    assert not listed("not-an-address", nets)
    with pytest.raises(ValueError, match="10.0.0.1/24"):
        networks(["10.0.0.1/24"])          # host bits set: a typo for .0/24 or for /32?


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("keys, key, message", [
    ({"proxy_protocol": True}, "receiver.proxy_protocol", "needs load_balancers"),
    ({"proxy_protocol": True, "load_balancers": ["10.0.0.300"]}, "receiver.load_balancers",
     "not an address or network"),
    ({"proxy_protocol": True, "load_balancers": [5]}, "receiver.load_balancers",
     "list of addresses"),
    ({"load_balancers": ["10.0.0.1"]}, "receiver.load_balancers", "without proxy_protocol"),
])
def test_config_errors_name_the_line(tmp_path: Path, keys: dict[str, Any], key: str,
                                     message: str) -> None:
    from hermes_py.config import load
    path = Config(receiver=receiver(**keys)).write(tmp_path)
    with pytest.raises(ConfigError) as err:
        load(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith(key.split(".")[1]))
    assert str(err.value).startswith(f"{path.resolve()}:{line}: {key}: "), err.value
    assert message in str(err.value)


# ---------------------------------------------------------------- a receiver behind a balancer


class Balancer:
    """A scripted L4 balancer: accepts on a free port, connects to the receiver from
    ``source`` and writes ``header`` (bytes, or a function of the client's address) first."""

    def __init__(self, target: int, header: Any, source: str = LOOPBACK):
        self.target, self.header, self.source = target, header, source
        self.port = free_port()
        self.sock = socket.create_server((LOOPBACK, self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, addr), daemon=True).start()

    def _pipe(self, client: socket.socket, addr: tuple[str, int]) -> None:
        up = socket.create_connection((LOOPBACK, self.target), source_address=(self.source, 0))
        head = self.header(addr) if callable(self.header) else self.header
        with client, up, contextlib.suppress(OSError):
            up.sendall(head)
            socks = [client, up]
            while not self._stop.is_set():
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (up if s is client else client).sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def behind(make_settings: Any) -> Iterator[Any]:
    made: list[Any] = []

    def make(header: Any, load_balancers: tuple[str, ...] = (LOOPBACK,),
             source: str = LOOPBACK) -> tuple[Receiver, Balancer]:
        cfg = make_settings(receiver=receiver(proxy_protocol=True,
                                              load_balancers=list(load_balancers),
                                              acse_timeout="5s"),
                            spool={"path": "spool", "min_free_mb": 0})
        r = Receiver(cfg).start()
        made.append(r)
        lb = Balancer(r.port, header, source)
        made.append(lb)
        return r, lb

    yield make
    for thing in reversed(made):
        if isinstance(thing, Receiver):
            thing.stop(grace=2)
        else:
            thing.close()


def store(port: int, bind: str = "127.0.0.5") -> tuple[int | None, int]:
    """One C-STORE from a modality on ``bind``: (status or None, the modality's port)."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOOPBACK, port, ae_title="HERMES", bind_address=(bind, 0))
    if not assoc.is_established:
        return None, 0
    try:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        local_port = sock.getsockname()[1] if sock is not None else 0
        status = assoc.send_c_store(make_instance(8, 8))
        return int(status.Status) if status else None, local_port
    finally:
        assoc.release()


def only_sidecar(r: Receiver) -> dict[str, Any]:
    wait_for(lambda: len(list(r.spool.incoming.glob("*.dcm"))) == 1, 10)
    return sidecar(next(r.spool.incoming.glob("*.dcm")))


def test_v1_from_a_listed_balancer_names_the_modality(behind: Any) -> None:
    r, lb = behind(lambda a: f"PROXY TCP4 {a[0]} 127.0.0.1 {a[1]} 11112\r\n".encode())
    status, port = store(lb.port)
    assert status == 0x0000
    sc = only_sidecar(r)
    assert (sc["peer_address"], sc["peer_port"]) == ("127.0.0.5", port)


def test_v2_from_a_listed_network_names_the_modality(behind: Any) -> None:
    r, lb = behind(v2_tcp6("2001:db8::42", 40123), load_balancers=("127.0.0.0/29",),
                   source="127.0.0.3")
    assert store(lb.port)[0] == 0x0000
    sc = only_sidecar(r)
    assert (sc["peer_address"], sc["peer_port"]) == ("2001:db8::42", 40123)


def test_a_listed_balancer_without_a_header_is_closed(behind: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    r, lb = behind(b"")
    with caplog.at_level(logging.WARNING, "hermes_py.proxy_protocol"):
        assert store(lb.port)[0] is None
    assert "no valid PROXY header" in caplog.text and "127.0.0.1" in caplog.text
    assert not list(r.spool.incoming.glob("*.dcm"))


def test_a_header_from_an_unlisted_address_is_not_trusted(behind: Any) -> None:
    r, lb = behind(b"PROXY TCP4 10.6.6.6 127.0.0.1 1 11112\r\n", load_balancers=("127.0.0.9",))
    assert store(lb.port)[0] is None, "a PROXY header from anyone else is no DICOM"
    assert not list(r.spool.incoming.glob("*.dcm"))
    # ... and a plain association from that address still works, as itself
    assert store(r.port, bind="127.0.0.6")[0] == 0x0000
    assert only_sidecar(r)["peer_address"] == "127.0.0.6"


def test_a_silent_balancer_connection_blocks_nobody(behind: Any) -> None:
    r, lb = behind(lambda a: f"PROXY TCP4 {a[0]} 127.0.0.1 {a[1]} 11112\r\n".encode())
    with contextlib.ExitStack() as stack:
        for _ in range(3):   # from the balancer's address, saying nothing
            stack.enter_context(socket.create_connection((LOOPBACK, r.port)))
        t0 = time.monotonic()
        assert store(lb.port)[0] == 0x0000
        assert time.monotonic() - t0 < 3.0
