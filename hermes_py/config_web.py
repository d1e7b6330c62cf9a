"""``[web]`` in rules.toml: where the web page and the HTTP API listen, and how safely.

Its own module so config.py stays the map of sections and this one the rules a
web listener must obey, which are about security more than about routing:

- nothing listens unless ``port`` is set (the shipped rules.toml sets 8080), and
  ``bind`` defaults to loopback like ``[receiver]`` and ``[metrics]``;
- a non-loopback ``bind`` without TLS is refused unless ``allow_plain_http = true``
  says so in writing: passwords and session cookies would cross the LAN in clear,
  which is how Hermes and mercure shipped;
- the Host header is checked against the names the listener is reached by
  (:meth:`WebSettings.allowed_hosts`), so a DNS-rebinding page cannot talk to a
  loopback listener through the browser of someone who is logged in;
- patient name and ID stay off the page unless ``show_patient = true``, and then
  only an admin who asks sees them, each time written to the log (who, which name).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hermes_py.config_reader import Duration, Reader, keys_of

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class WebSettings:
    bind: str = "127.0.0.1"
    port: int | None = None                 # None: no web child
    tls_cert_file: str = ""
    tls_key_file: str = ""
    allow_plain_http: bool = False          # needed for a non-loopback bind without TLS
    session_idle_timeout: Duration = 1800.0  # HIPAA automatic logoff: 30 minutes idle
    hosts: tuple[str, ...] = ()             # further names the page is reached by (DNS, proxy)
    show_patient: bool = False              # admins may ask for patient name/ID (audited)

    @property
    def enabled(self) -> bool:
        return self.port is not None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def allowed_hosts(self) -> list[str]:
        """Host header values the listener answers to (ports are not part of the check)."""
        names = [self.bind, *self.hosts]
        if is_loopback(self.bind) or self.bind in ("0.0.0.0", "::", ""):
            names += LOOPBACK_NAMES
        if self.bind in ("0.0.0.0", "::", ""):
            # a wildcard bind is reached by this machine's own names
            names += [socket.gethostname(), socket.getfqdn()]
        return list(dict.fromkeys(n.lower() for n in names if n))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_web(p: Reader, data: Mapping[str, Any]) -> WebSettings:
    table = ("web",)
    p.check_keys(table, data, keys_of(WebSettings))
    hosts = p.get(table, data, "hosts", list, [])
    if not all(isinstance(h, str) and h and "/" not in h for h in hosts):
        raise p.err(table, "hosts", "expected a list of host names, e.g. [\"router.example\"]")
    port = p.port(table, data, "port", 0) if "port" in data else None
    w = WebSettings(port=port, hosts=tuple(hosts),
                    **p.fields(table, data, WebSettings, skip=("port", "hosts")))
    if port == 0:
        raise p.err(table, "port", "must be 1-65535 (leave port out to turn the web page off)")
    if bool(w.tls_cert_file) != bool(w.tls_key_file):
        raise p.err(table, "tls_key_file" if w.tls_cert_file else "tls_cert_file",
                    "missing: tls_cert_file and tls_key_file go together")
    if w.tls:
        cert = p.readable(table, "tls_cert_file", w.tls_cert_file)
        key = p.readable(table, "tls_key_file", w.tls_key_file)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as e:
            raise p.err(table, "tls_cert_file",
                        f"cannot use the certificate and key: {e}") from None
        w = dataclasses.replace(w, tls_cert_file=cert, tls_key_file=key)
    if w.enabled and not is_loopback(w.bind) and not w.tls and not w.allow_plain_http:
        raise p.err(table, "bind", f"{w.bind!r} is reachable from the network: set "
                                   "tls_cert_file and tls_key_file, or allow_plain_http = true "
                                   "(passwords and session cookies would travel in clear)")
    p.positive(table, "session_idle_timeout", w.session_idle_timeout)
    return w
