"""One HTTP(S) connection per worker thread, bodies streamed from files, every failure named.

Why the standard library's ``http.client`` and not requests (or dicomweb-client,
which sits on requests): requests decides between Content-Length and chunked
from the body object's shape. An object whose ``tell`` fails silently became
chunked, and an added Content-Length header then went out beside
Transfer-Encoding, which Orthanc answers 400. dicomweb-client also builds the
whole multipart message in memory and retries 408/429/503 inside the call,
which hides Retry-After from the dispatcher's backoff. With ``putrequest`` /
``putheader`` / ``send`` every header is the one the caller wrote, the body is
whatever the caller's function sends (files read ``CHUNK`` at a time), and
nothing between us and the socket retries. No new dependency.

- Keep-alive: the connection is reused while the server keeps it; a reused one
  the server had closed while idle gets the request again on a fresh one, but
  only when nothing of an answer was read (a resend is then harmless).
- A server may answer early (401, 413) and close before reading the whole body:
  the answer is read when the send fails, so it is not mistaken for a lost link.
- Connect errors, timeouts and TLS failures become ``LinkFailure`` with a
  ``HttpKind``; a certificate problem is a misconfiguration (queue kept), not an
  outage.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import http.client
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hermes_py.outcomes import LinkFailure

CHUNK = 1 << 20                 # file bytes read and sent per step
MAX_RESPONSE = 16 << 20         # response bodies longer than this are not kept
MAX_RETRY_AFTER = 6 * 3600.0    # a Retry-After beyond this is believed only this far

Send = Callable[[bytes], None]


class HttpKind(enum.StrEnum):
    """Why an HTTP destination could not be talked to (``kind`` in its state file)."""

    REFUSED = "connection refused"
    CONNECT_TIMEOUT = "connection timed out"
    CONNECT_FAILED = "connection failed"
    TLS_FAILED = "TLS failed"                       # misconfigured
    NO_RESPONSE = "no response (timeout)"
    LOST = "connection lost"


@dataclass
class Reply:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class LocalRead(Exception):
    """Our own file failed while its bytes were being sent (not the server's doing)."""

    def __init__(self, path: Path, error: OSError | EOFError):
        super().__init__(str(error))
        self.path = path
        self.error = error


class HttpLink:
    """Requests to one server; not shared between threads."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float,
                 where: str):
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self.where = where     # the URL, for messages
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connected HTTP(S) connection, and whether it is a reused one."""
        if self._conn is not None:
            return self._conn, True
        conn: http.client.HTTPConnection
        if self.context is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()   # raises: _connect_failure names it
        self._conn = conn
        return conn, False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def exchange(self, method: str, path: str, headers: dict[str, str],
                 body: Callable[[Send], None] | None) -> Reply | LinkFailure:
        """One request and its answer. LocalRead propagates (the connection is closed:
        half a body is on the wire)."""
        for attempt in (1, 2):
            try:
                conn, reused = self._connection()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                return self._connect_failure(e)
            t0 = time.monotonic()
            sent = False
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                if body is not None:
                    body(conn.send)
                sent = True
                resp = conn.getresponse()
            except LocalRead:
                self.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                early = _early_answer(conn) if not sent else None
                self.close()
                if early is not None:
                    return early
                if reused and attempt == 1 and _stale(e):
                    continue        # the server closed the idle connection: once more
                return self._lost(e, time.monotonic() - t0)
            try:
                data = resp.read(MAX_RESPONSE + 1)
            except (OSError, http.client.HTTPException) as e:
                self.close()
                return self._lost(e, time.monotonic() - t0)
            if len(data) > MAX_RESPONSE or resp.will_close:
                self.close()
            return Reply(resp.status, resp.reason, resp.headers,
                         data if len(data) <= MAX_RESPONSE else b"")
        raise AssertionError("unreachable")

    def _connect_failure(self, e: BaseException) -> LinkFailure:
        where = f"{self.host}:{self.port}"
        if isinstance(e, ssl.SSLCertVerificationError):
            return LinkFailure(HttpKind.TLS_FAILED, f"{where}: the server's certificate is not "
                               f"trusted: {e.verify_message} (ca_file?)", misconfigured=True)
        if isinstance(e, ssl.SSLError):
            return LinkFailure(HttpKind.TLS_FAILED, f"{where}: TLS handshake failed: "
                               f"{e.reason or e}", misconfigured=True)
        if isinstance(e, ConnectionRefusedError):
            return LinkFailure(HttpKind.REFUSED, f"{where}: {e.strerror or e}")
        if isinstance(e, TimeoutError):
            return LinkFailure(HttpKind.CONNECT_TIMEOUT,
                               f"{where}: no answer within timeout ({self.timeout:g}s)")
        if isinstance(e, socket.gaierror):
            return LinkFailure(HttpKind.CONNECT_FAILED,
                               f"cannot resolve host {self.host!r}: {e.strerror or e}")
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return LinkFailure(HttpKind.CONNECT_FAILED, f"cannot connect to {where}: {text}")

    def _lost(self, e: BaseException, waited: float) -> LinkFailure:
        if isinstance(e, TimeoutError):
            return LinkFailure(HttpKind.NO_RESPONSE, f"{self.where}: nothing for timeout "
                               f"({self.timeout:g}s) after {waited:.0f}s of the request")
        if isinstance(e, ssl.SSLError):
            return LinkFailure(HttpKind.TLS_FAILED, f"{self.where}: {e.reason or e} "
                               "(a client certificate the server refused?)",
                               misconfigured=True)
        return LinkFailure(HttpKind.LOST, f"{self.where}: {type(e).__name__}: {e}")


def _early_answer(conn: http.client.HTTPConnection) -> Reply | None:
    try:
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE)
    except Exception:  # nothing readable: the connection was just lost
        return None
    return Reply(resp.status, resp.reason, resp.headers, data)


def _stale(e: BaseException) -> bool:
    return isinstance(e, http.client.RemoteDisconnected | BrokenPipeError
                      | ConnectionResetError | ConnectionAbortedError)


def send_file(send: Send, path: Path, size: int) -> None:
    """Exactly ``size`` bytes of ``path``, CHUNK at a time; LocalRead if the file fails."""
    remaining = size
    try:
        f = open(path, "rb")  # noqa: SIM115 - errors of our file and of the socket differ
    except OSError as e:
        raise LocalRead(path, e) from e
    with f:
        while remaining:
            try:
                chunk = f.read(min(CHUNK, remaining))
            except OSError as e:
                raise LocalRead(path, e) from e
            if not chunk:
                raise LocalRead(path, EOFError(f"the file shrank to {size - remaining} of "
                                               f"{size} bytes"))
            send(chunk)
            remaining -= len(chunk)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most
    MAX_RETRY_AFTER; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(int(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return min(max(secs, 0.0), MAX_RETRY_AFTER)


def snippet(body: bytes, limit: int = 300) -> str:
    """The start of a response body on one line, for a reason or a detail."""
    text = " ".join(body[:limit * 4].decode("utf-8", "replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")
