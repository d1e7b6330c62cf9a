"""DICOM TLS: the receiver's listener settings, a destination's, their SSL contexts, and a
diagnosis that tells a person which certificate is wrong.

Both sides verify certificates by default; a receiver with ``client_ca_file``
requires and verifies a client certificate. Contexts are built when the
configuration is read, so an unreadable file, a key that does not match its
certificate or a CA file that is not PEM is a ``rules check`` error with its line,
not a surprise at the first association.

Why a diagnosis: pynetdicom only logs a failed handshake and hands back a
non-established association, which looks exactly like "connection refused"; and
under TLS 1.3 a server that wants a client certificate we did not send lets our
handshake "succeed" and aborts afterwards, which looks like a transient abort.
Reconnecting once with the same context and reading one byte turns both into the
real reason, and a certificate problem is a misconfiguration (queue kept, nothing
expires), not an outage.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from hermes_py.config_reader import Duration, Port, Reader

MIN_VERSION = ssl.TLSVersion.TLSv1_2   # BCP 195, as DCMTK's default profile


@dataclass(frozen=True)
class ReceiverTLS:
    """``[receiver.tls]``: a TLS listener beside the plain port."""

    port: Port
    cert_file: str
    key_file: str
    client_ca_file: str = ""       # set: client certificates required and verified
    handshake_timeout: Duration = 10.0


@dataclass(frozen=True)
class DestinationTLS:
    """``tls = {...}`` of a dicom destination."""

    ca_file: str = ""              # empty: the system's trusted CAs
    cert_file: str = ""            # our client certificate, when the peer wants one
    key_file: str = ""
    server_name: str = ""          # the name its certificate must carry (default: host)
    check_hostname: bool = True


def parse_receiver(p: Reader, table: tuple[str | int, ...], data: object) -> ReceiverTLS:
    if not isinstance(data, dict):
        raise p.err(table[:-1], str(table[-1]), "expected a table [receiver.tls]")
    p.check_keys(table, data, {"port", "cert_file", "key_file", "client_ca_file",
                               "handshake_timeout"})
    p.required(table, data, ("port", "cert_file", "key_file"))
    t = ReceiverTLS(**p.fields(table, data, ReceiverTLS))
    t = ReceiverTLS(port=t.port, cert_file=p.readable(table, "cert_file", t.cert_file),
                    key_file=p.readable(table, "key_file", t.key_file),
                    client_ca_file=(p.readable(table, "client_ca_file", t.client_ca_file)
                                    if t.client_ca_file else ""),
                    handshake_timeout=t.handshake_timeout)
    p.positive(table, "handshake_timeout", t.handshake_timeout)
    if t.port == 0:
        raise p.err(table, "port", "must be 1-65535")
    try:
        server_context(t)
    except (ssl.SSLError, ValueError) as e:
        raise p.err(table, "cert_file", f"cannot use the certificate and key: {e}") from None
    return t


def parse_destination(p: Reader, table: tuple[str | int, ...], data: object) -> DestinationTLS:
    tt = (*table, "tls")
    if not isinstance(data, dict):
        raise p.err(table, "tls", "expected a table: tls = { ca_file = \"...\", ... }")
    p.check_keys(tt, data, {"ca_file", "cert_file", "key_file", "server_name",
                            "check_hostname"})
    t = DestinationTLS(**p.fields(tt, data, DestinationTLS))
    if bool(t.cert_file) != bool(t.key_file):
        raise p.err(tt, "key_file" if t.cert_file else "cert_file",
                    "cert_file and key_file go together (our client certificate)")
    t = DestinationTLS(ca_file=p.readable(tt, "ca_file", t.ca_file) if t.ca_file else "",
                       cert_file=p.readable(tt, "cert_file", t.cert_file) if t.cert_file else "",
                       key_file=p.readable(tt, "key_file", t.key_file) if t.key_file else "",
                       server_name=t.server_name, check_hostname=t.check_hostname)
    try:
        client_context(t)
    except (ssl.SSLError, ValueError) as e:
        raise p.err(tt, "ca_file" if t.ca_file else "cert_file",
                    f"cannot build the TLS context: {e}") from None
    return t


def server_context(t: ReceiverTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.load_cert_chain(t.cert_file, t.key_file)
    if t.client_ca_file:
        ctx.load_verify_locations(t.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(t: DestinationTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=t.ca_file or None)
    ctx.minimum_version = MIN_VERSION
    ctx.check_hostname = t.check_hostname
    if t.cert_file:
        ctx.load_cert_chain(t.cert_file, t.key_file)
    return ctx


def not_after(cert_file: str) -> float | None:
    """The certificate's expiry (epoch seconds), for ``status``; None if unreadable.

    The ssl module parses certificates only through a private helper; it has been in
    CPython since 3.4, and a failure here costs only the status line.
    """
    try:
        info = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
        return float(ssl.cert_time_to_seconds(info["notAfter"]))
    except Exception:
        return None


def diagnose(host: str, port: int, ctx: ssl.SSLContext, server_name: str,
             timeout: float) -> str | None:
    """Why a TLS association with this context fails at the TLS layer, or None when TLS
    itself works (then the failure was DICOM's, or the network's)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # not TLS's doing: the caller names the connect error
    try:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.settimeout(min(timeout, 2.0))
            deadline = time.monotonic() + min(timeout, 2.0)
            try:
                # A server that wants a certificate we did not send says so only now
                # (TLS 1.3 sends its alert after our handshake "succeeded").
                while time.monotonic() < deadline:
                    if not tls.recv(1):
                        break
            except TimeoutError:
                pass
    except ssl.SSLCertVerificationError as e:
        return f"the destination's certificate is not trusted: {e.verify_message}"
    except ssl.SSLError as e:
        reason = (e.reason or str(e)).lower()
        if "certificate_required" in reason or "handshake_failure" in reason:
            return ("the destination requires a client certificate we do not present "
                    f"(set tls.cert_file/key_file): {e.reason}")
        if "unknown_ca" in reason or "bad_certificate" in reason:
            return f"the destination does not trust our client certificate: {e.reason}"
        if "wrong_version" in reason or "record" in reason:
            return f"the destination does not speak TLS on this port: {e.reason}"
        return f"TLS handshake failed: {e.reason or e}"
    except OSError as e:
        if isinstance(e, ConnectionResetError):
            return "the destination reset the connection during the TLS handshake"
        return None
    return None


__all__ = ["DestinationTLS", "ReceiverTLS", "client_context", "diagnose",
           "not_after", "parse_destination", "parse_receiver", "server_context"]
