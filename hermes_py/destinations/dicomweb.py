"""``type = "dicomweb"``: a DICOMweb STOW-RS service, its settings, and what they must be.

Secrets live in files (``password_file``, ``token_file``, the client key) so that
rules.toml can be shown, versioned and logged without them; the settings hold only
the paths (never the secret itself, so no repr or log line can leak one). The files
are opened here once, so a missing or unreadable one, an empty secret or a key that
does not fit its certificate is a ``rules check`` error with its line rather than a
misconfigured destination discovered at the first send. The sender reads them again
when it needs them (a rotated token is picked up at the next 401).

The sender is ``stow.StowDestination`` (http.client and the transcode machinery
are imported only when something is sent or probed, not to read a configuration).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from hermes_py.config import DestinationSettings, ReceiverSettings
from hermes_py.config_reader import Duration, Reader
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, DestinationType, Workspace
from hermes_py.tls import MIN_VERSION

DEFAULT_MAX_BYTES = 50 * 1000 * 1000


@dataclass(frozen=True, kw_only=True)
class DicomwebSettings(DestinationSettings):
    url: str                        # the STOW-RS base: instances go to {url}/studies
    username: str = ""              # HTTP basic, with password_file
    password_file: str = ""
    token_file: str = ""            # bearer token, read again after a 401
    cert_file: str = ""             # a client certificate (mutual TLS), with key_file
    key_file: str = ""
    ca_file: str = ""               # empty: the system's trusted CAs
    timeout: Duration = 60.0        # connect, and every wait for the server
    max_instances: int = 20         # per request (one study per request)
    max_bytes: int = DEFAULT_MAX_BYTES   # per request; a larger instance goes alone


_FILE_KEYS = ("password_file", "token_file", "cert_file", "key_file", "ca_file")


def read_secret(path: str) -> str:
    """The first line of a secret file, without its newline (editors add one)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def client_context(s: DicomwebSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=s.ca_file or None)
    ctx.minimum_version = MIN_VERSION
    if s.cert_file:
        ctx.load_cert_chain(s.cert_file, s.key_file)
    return ctx


class DicomwebType(DestinationType):
    name = "dicomweb"
    settings = DicomwebSettings

    def parse(self, reader: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
              common: dict[str, Any], receiver: ReceiverSettings) -> DicomwebSettings:
        reader.required(table, data, ("url",))
        own = reader.fields(table, data, DicomwebSettings, skip=(*common, "retry"))
        url = str(own.pop("url")).strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise reader.err(table, "url", f"expected an http:// or https:// URL, got {url!r}")
        if parts.query or parts.fragment:
            raise reader.err(table, "url", "the STOW-RS base URL takes no ?query or #fragment "
                                           "(instances are POSTed to {url}/studies)")
        if parts.username or parts.password:
            raise reader.err(table, "url", "no credentials in the URL (it is logged): use "
                                           "username and password_file")
        for key in _FILE_KEYS:
            if own.get(key):
                own[key] = reader.readable(table, key, str(own[key]), nonempty=True)
        s = DicomwebSettings(**common, **own, url=url)
        _check_auth(reader, table, s)
        if parts.scheme == "http":
            for key in ("cert_file", "ca_file"):
                if getattr(s, key):
                    raise reader.err(table, key, "needs an https:// url")
        else:
            try:
                client_context(s)
            except (ssl.SSLError, ValueError, OSError) as e:
                raise reader.err(table, "cert_file" if s.cert_file else "ca_file",
                                 f"cannot build the TLS context: {e}") from None
        reader.positive(table, "timeout", s.timeout)
        reader.at_least_one(table, "max_instances", s.max_instances)
        reader.at_least_one(table, "max_bytes", s.max_bytes)
        return s

    def describe(self, settings: DestinationSettings) -> str:
        s = _dicomweb(settings)
        auth = ("basic" if s.username else "bearer" if s.token_file else "")
        if s.cert_file:
            auth = f"{auth}+client certificate" if auth else "client certificate"
        return f"STOW-RS {s.url}/studies" + (f" ({auth})" if auth else "")

    def create(self, settings: DestinationSettings, label: str = "",
               workspace: Workspace = SYSTEM_TEMP) -> Destination:
        from hermes_py.destinations.stow import StowDestination
        return StowDestination(_dicomweb(settings), label=label, workspace=workspace)


def _check_auth(reader: Reader, table: tuple[str | int, ...], s: DicomwebSettings) -> None:
    if bool(s.username) != bool(s.password_file):
        raise reader.err(table, "password_file" if s.username else "username",
                         "username and password_file go together (HTTP basic)")
    if s.username and s.token_file:
        raise reader.err(table, "token_file", "choose one: username + password_file (basic) "
                                              "or token_file (bearer)")
    if bool(s.cert_file) != bool(s.key_file):
        raise reader.err(table, "key_file" if s.cert_file else "cert_file",
                         "cert_file and key_file go together (our client certificate)")
    for key in ("password_file", "token_file"):
        path = getattr(s, key)
        if not path:
            continue
        try:
            secret = read_secret(path)
        except OSError as e:
            raise reader.err(table, key, f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise reader.err(table, key, f"{path}: not UTF-8 text") from None
        if not secret.strip():
            raise reader.err(table, key, f"{path}: the first line is empty")
        if any(c in secret for c in "\r\n\0"):
            raise reader.err(table, key, f"{path}: control characters in the secret")


def _dicomweb(settings: DestinationSettings) -> DicomwebSettings:
    if not isinstance(settings, DicomwebSettings):
        raise TypeError(f"destination {settings.name!r} is not a DICOMweb destination")
    return settings


TYPE = DicomwebType()
