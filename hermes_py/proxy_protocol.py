"""The PROXY protocol (v1 text, v2 binary) on the receiver: the modality's address behind
a load balancer.

A proxying balancer (HAProxy ``mode tcp``) hides the modality: every association comes
from the balancer's address, so ``peer_address`` in the sidecar, the log line and every
rule on PeerAddress would see HAProxy. With ``send-proxy`` / ``send-proxy-v2`` on its
server line HAProxy first writes one header naming the client; we read it and the
association's requestor becomes that client.

Trust is the whole point, so it is narrow (``[receiver] proxy_protocol = true`` with
``load_balancers``): a connection from a listed address MUST start with a header (none,
or a broken one: logged and closed, since without it we would record the balancer as
the sender), and a connection from any other address is plain DICOM, where a PROXY
header is just an invalid PDU (anyone could otherwise claim any address).

The header is read in the connection's own thread (as TLS handshakes are, see
``pynetdicom_compat.TLSServer``), byte-exact (never a byte of the DICOM stream after it
consumed), within ``HEADER_TIMEOUT``: a balancer writes it at once, so a connection that
stays silent is hung up and holds nobody up in the accept loop. Before TLS: the balancer
passes TLS through, so the header precedes the handshake.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pynetdicom.transport import ThreadedAssociationServer

from hermes_py.events import emit
from hermes_py.lifecycle import Event

if TYPE_CHECKING:
    from hermes_py.config import ReceiverSettings

LOG = logging.getLogger(__name__)

HEADER_TIMEOUT = 5.0
MAX_READERS = 100          # headers being read at once; more connections are closed at once
V1_MAX = 107               # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_BODY = 2048         # addresses (216 bytes at most) plus TLVs; more is not a balancer
V1_PREFIX = b"PROXY "

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyError(ValueError):
    """Not a valid PROXY header (the connection is closed)."""


class Truncated(ProxyError):
    """The connection ended, or the deadline passed, inside the header."""


@dataclass(frozen=True)
class Header:
    """What a header said: the client's address, or None (LOCAL / UNKNOWN: the balancer's
    own connection, a health check: the real peer address stays)."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


def networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``load_balancers`` as networks (an address is a /32 or /128); ValueError names it."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as e:
            raise ValueError(f"{entry!r} is not an address or network ({e})") from None
    return tuple(out)


def listed(address: str, nets: Iterable[Network]) -> bool:
    """Whether the connection's own address is one of the load balancers."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # a dual-stack listener sees IPv4 balancers as ::ffff:a.b.c.d
    return any(ip.version == n.version and ip in n for n in nets)


# ---------------------------------------------------------------- parsing


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range")
    return port


def _address(text: bytes, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"bad address {text[:40]!r}") from None
    if ip.version != version:
        raise ProxyError(f"{ip} is not an IPv{version} address")
    return str(ip)


def parse_v1(line: bytes) -> Header:
    """One v1 line, ``PROXY TCP4 src dst sport dport\\r\\n`` (its CRLF included)."""
    if not line.endswith(b"\r\n") or len(line) > V1_MAX:
        raise ProxyError("v1 header without CRLF within 107 bytes")
    parts = line[:-2].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyError("not a v1 header")
    if parts[1] == b"UNKNOWN":
        return Header(1, None)
    families = {b"TCP4": 4, b"TCP6": 6}
    if parts[1] not in families or len(parts) != 6:
        raise ProxyError(f"v1: expected TCP4, TCP6 or UNKNOWN and 4 fields, got "
                         f"{line[:40]!r}")
    version = families[parts[1]]
    src, dst = _address(parts[2], version), _address(parts[3], version)
    return Header(1, (src, _port(parts[4])), (dst, _port(parts[5])))


def parse_v2(head: bytes, body: bytes) -> Header:
    """A v2 header: its 16 fixed bytes, then the ``len`` bytes they announce."""
    if len(head) != 16 or head[:12] != V2_SIGNATURE:
        raise ProxyError("not a v2 header")
    ver_cmd, fam, length = struct.unpack("!BBH", head[12:])
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2: version {ver_cmd >> 4}")
    if length != len(body):
        raise Truncated(f"v2: {len(body)} of {length} bytes")
    command = ver_cmd & 0x0F
    if command == 0x0:        # LOCAL: the balancer speaking for itself
        return Header(2, None)
    if command != 0x1:
        raise ProxyError(f"v2: unknown command {command}")
    family, proto = fam >> 4, fam & 0x0F
    if family == 0x0 or proto == 0x0:   # UNSPEC: keep the connection's address
        return Header(2, None)
    if proto != 0x1:
        raise ProxyError("v2: not a stream (TCP) connection")
    if family == 0x1:
        if length < 12:
            raise ProxyError("v2: TCP4 addresses cut short")
        s, d, sp, dp = struct.unpack("!4s4sHH", body[:12])
        return Header(2, (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp))
    if family == 0x2:
        if length < 36:
            raise ProxyError("v2: TCP6 addresses cut short")
        s, d, sp, dp = struct.unpack("!16s16sHH", body[:36])
        return Header(2, (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp))
    if family == 0x3:
        return Header(2, None)     # a UNIX socket client: no address to record
    raise ProxyError(f"v2: unknown address family {family}")


def read_header(recv: Callable[[int], bytes]) -> Header:
    """Read exactly one header through ``recv(n)`` (returns at most n bytes, b"" at the end).

    Byte-exact: v1 is read one byte at a time up to its CRLF, v2 by the length it
    announces, so the first byte of the DICOM stream is still unread.
    """
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = recv(n - len(buf))
            if not chunk:
                raise Truncated(f"connection ended after {len(buf)} of {n} header bytes")
            buf += chunk
        return buf

    first = exactly(12)
    if first == V2_SIGNATURE:
        head = first + exactly(4)
        length = struct.unpack("!H", head[14:16])[0]
        if length > V2_MAX_BODY:
            raise ProxyError(f"v2: a {length}-byte header, over the {V2_MAX_BODY} we accept")
        return parse_v2(head, exactly(length) if length else b"")
    if not first.startswith(V1_PREFIX):
        raise ProxyError(f"no PROXY header (the connection starts with {first[:6]!r})")
    line = first
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyError("v1 header without CRLF within 107 bytes")
        line += exactly(1)
    return parse_v1(line)


def read_from(sock: socket.socket, timeout: float = HEADER_TIMEOUT) -> Header:
    """The header at the start of an accepted socket, within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout

    def recv(n: int) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Truncated(f"no complete header within {timeout:g}s")
        sock.settimeout(left)
        try:
            return sock.recv(n)
        except TimeoutError:
            raise Truncated(f"no complete header within {timeout:g}s") from None

    try:
        return read_header(recv)
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


# ---------------------------------------------------------------- the server


class ProxyProtocolServer(ThreadedAssociationServer):
    """A receiver server that reads a PROXY header from its listed load balancers.

    Mixed in front of our server classes (:func:`behind`): ``process_request_thread``
    (one thread per connection already) reads the header and hands pynetdicom the
    client's address instead of the balancer's, before a TLS server class behind it
    in the MRO does its handshake. ``get_request`` is left as is: it only accepts.
    """

    load_balancers: tuple[Network, ...] = ()
    header_timeout = HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._readers = threading.BoundedSemaphore(MAX_READERS)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = client_address
        if listed(str(client_address[0]), self.load_balancers):
            peer = f"{client_address[0]}:{client_address[1]}"
            if not self._readers.acquire(blocking=False):
                self._refuse(request, peer, f"{MAX_READERS} PROXY headers already being read")
                return
            try:
                header = read_from(request, self.header_timeout)
            except (ProxyError, OSError) as e:
                self._refuse(request, peer, f"no valid PROXY header: {e}")
                return
            finally:
                self._readers.release()
            if header.source is not None:
                address = header.source
                LOG.debug("PROXY v%d from %s:%s: client %s:%s", header.version,
                          *client_address[:2], *header.source)
        super().process_request_thread(request, address)

    @staticmethod
    def _refuse(request: Any, peer: str, detail: str) -> None:
        """Close it, and say so as the receiver's other rejections do (a ``rejected`` event)."""
        emit(LOG, Event.REJECTED, level=logging.WARNING, peer=peer,
             reason="load balancer connection without a valid PROXY header", detail=detail,
             message=f"closing the connection from load balancer {peer}: {detail}")
        with contextlib.suppress(OSError):
            request.close()


S = TypeVar("S", bound=ThreadedAssociationServer)


def behind(base: type[S], receiver: ReceiverSettings) -> type[S]:
    """``base`` (ReceiverServer, TLSServer, their SO_REUSEPORT kinds), reading PROXY headers
    from ``receiver.load_balancers`` when ``receiver.proxy_protocol`` is on."""
    if not receiver.proxy_protocol:
        return base
    LOG.info("receiver: PROXY protocol (v1, v2) from %s only",
             ", ".join(receiver.load_balancers))
    return cast(type[S], type(f"Proxied{base.__name__}", (ProxyProtocolServer, base),
                              {"load_balancers": networks(receiver.load_balancers)}))
