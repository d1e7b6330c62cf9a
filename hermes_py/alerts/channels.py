"""Alert channels: one ``send(payload) -> Answer`` per ``type``, no retries of their own.

The outbox owns retries, backoff and giving up (:mod:`hermes_py.alerts.sender`),
so a channel makes exactly one attempt and says what happened in one line,
which ``hermes-py alerts test`` prints and the item records.

- webhook: stdlib ``urllib.request``. A JSON POST with an HMAC header is all it
  takes; requests/httpx would be a dependency (and a supply chain) for 40 lines.
  Only 2xx counts; redirects are not followed for a POST (urllib would turn it
  into a GET that drops the body).
- email: stdlib ``smtplib`` with STARTTLS (default on) and a login whose
  password is read from a file at send time.
- apprise: the optional extra ``hermes-py[alerts]``, imported when first used,
  called once per attempt with its own retries off.
- command: argv (no shell), the JSON on stdin, exit 0 = sent; for Mirth, Nagios,
  a pager script.

Secrets are read from their files on every attempt (a rotated secret needs no
restart) and never appear in an answer or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from hermes_py.alerts.payload import AlertPayload, clean, subject
from hermes_py.config_alerts import ChannelSettings
from hermes_py.errors import HermesError

SIGNATURE_HEADER = "X-Hermes-Signature"


@dataclass(frozen=True)
class Answer:
    ok: bool
    text: str


class Channel(Protocol):
    settings: ChannelSettings

    def send(self, payload: AlertPayload) -> Answer: ...


def body_of(payload: AlertPayload) -> bytes:
    """The exact bytes posted and signed (sorted keys: the same alert, the same bytes)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _secret(path: str) -> bytes:
    return Path(path).read_bytes().strip()


def _text(payload: AlertPayload) -> str:
    """The human-readable body of a mail or chat message."""
    lines = [str(payload.get("summary", "")), ""]
    dest = payload.get("destination") or {}
    if dest:
        lines.append(f"destination: {dest.get('name')} ({dest.get('target')})")
    st = payload.get("state") or {}
    if st:
        lines.append(f"state: {st.get('from')} -> {st.get('to')} since {st.get('since')}"
                     f" ({st.get('duration_s')} s)")
    err = payload.get("last_error") or {}
    if err:
        lines.append(f"last error: {err.get('kind')}: {err.get('detail')}")
    q = payload.get("queue") or {}
    if q:
        lines.append(f"queue: {q.get('queued')} queued, {q.get('due')} due, oldest "
                     f"{q.get('oldest_age_s')} s, {q.get('error_24h')} in error/ (24 h)")
    if payload.get("failover"):
        lines.append(f"failover: {payload['failover']}")
    lines += [f"hint: {payload.get('hint')}", "", "-- hermes-alert/1 --",
              json.dumps(payload, indent=2, sort_keys=True)]
    return "\n".join(lines)


def tls_context(settings: ChannelSettings) -> ssl.SSLContext:
    """The system's trust store, or only ``ca_file`` (an internal relay's private CA)."""
    return ssl.create_default_context(cafile=settings.ca_file or None)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Webhook:
    def __init__(self, settings: ChannelSettings):
        self.settings = settings
        self._opener = urllib.request.build_opener(
            _NoRedirect, urllib.request.HTTPSHandler(context=tls_context(settings)))

    def _url(self) -> str:
        s = self.settings
        return s.url or Path(s.url_file).read_text(encoding="utf-8").strip()

    def send(self, payload: AlertPayload) -> Answer:
        s = self.settings
        body = body_of(payload)
        headers = {"Content-Type": "application/json", "User-Agent": "hermes-py",
                   "X-Hermes-Alert-Id": str(payload.get("id", "")),
                   "X-Hermes-Event": str(payload.get("event", ""))}
        try:
            if s.hmac_secret_file:
                headers[SIGNATURE_HEADER] = signature(_secret(s.hmac_secret_file), body)
            req = urllib.request.Request(self._url(), data=body, headers=headers,
                                         method="POST")
            with self._opener.open(req, timeout=s.timeout) as resp:
                code = resp.status
                reason = resp.reason
        except urllib.error.HTTPError as e:
            code, reason = e.code, e.reason
            e.close()
        except (OSError, ValueError, ssl.SSLError) as e:
            return Answer(False, f"not sent: {clean(getattr(e, 'reason', None) or e, 160)}")
        ok = 200 <= code < 300
        return Answer(ok, f"HTTP {code} {clean(reason, 80)}")


class Email:
    def __init__(self, settings: ChannelSettings):
        self.settings = settings

    def send(self, payload: AlertPayload) -> Answer:
        s = self.settings
        msg = EmailMessage()
        msg["Subject"] = subject(payload)
        msg["From"] = s.mail_from
        msg["To"] = ", ".join(s.to)
        msg["X-Hermes-Alert-Id"] = str(payload.get("id", ""))
        msg.set_content(_text(payload))
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as smtp:
                if s.starttls:
                    smtp.starttls(context=tls_context(s))
                if s.username:
                    smtp.login(s.username, _secret(s.password_file).decode())
                refused = smtp.send_message(msg)
        except smtplib.SMTPResponseException as e:
            return Answer(False, f"SMTP {e.smtp_code} {clean(e.smtp_error, 120)}")
        except (smtplib.SMTPException, OSError) as e:
            return Answer(False, f"not sent: {clean(e, 160)}")
        if refused:
            return Answer(False, f"refused for {', '.join(sorted(refused))}")
        return Answer(True, f"accepted by {s.host}:{s.port} for {len(s.to)} recipient(s)")


class Apprise:
    def __init__(self, settings: ChannelSettings):
        self.settings = settings

    def send(self, payload: AlertPayload) -> Answer:
        try:
            import apprise  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return Answer(False, "apprise is not installed: pip install 'hermes-py[alerts]'")
        try:
            urls = [u.strip() for u in Path(self.settings.urls_file).read_text().splitlines()
                    if u.strip() and not u.lstrip().startswith("#")]
        except OSError as e:
            return Answer(False, f"cannot read urls_file: {e.strerror or e}")
        ap = apprise.Apprise()
        for u in urls:
            ap.add(u)
        try:
            ok = bool(ap.notify(title=subject(payload), body=_text(payload)))
        except Exception as e:  # a plugin's bug is a failed attempt, not a dead sender
            return Answer(False, f"apprise failed: {clean(e, 160)}")
        return Answer(ok, f"apprise: {'sent' if ok else 'not sent'} to {len(urls)} URL(s)")


class Command:
    def __init__(self, settings: ChannelSettings):
        self.settings = settings

    def send(self, payload: AlertPayload) -> Answer:
        s = self.settings
        try:
            r = subprocess.run(list(s.argv), input=body_of(payload), capture_output=True,
                               timeout=s.timeout, check=False)
        except subprocess.TimeoutExpired:
            return Answer(False, f"timed out after {s.timeout:g}s")
        except OSError as e:
            return Answer(False, f"cannot run {s.argv[0]}: {e.strerror or e}")
        tail = clean((r.stdout or r.stderr).decode("utf-8", "replace"), 120)
        return Answer(r.returncode == 0, f"exit {r.returncode}" + (f": {tail}" if tail else ""))


_TYPES: dict[str, type[Webhook] | type[Email] | type[Apprise] | type[Command]] = {
    "webhook": Webhook, "email": Email, "apprise": Apprise, "command": Command}


def make(settings: ChannelSettings) -> Channel:
    kind = _TYPES.get(settings.type)
    if kind is None:
        raise HermesError(f"alerts channel {settings.name}: unknown type {settings.type!r}")
    return kind(settings)
