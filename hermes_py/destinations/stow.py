"""DICOMweb STOW-RS sender: multipart/related POSTs streamed from the spool files.

Why each piece is here:

- The body is the spool files themselves, read 1 MiB at a time onto the socket
  (``http_link``, stdlib ``http.client``: why not requests or dicomweb-client is
  there), with a Content-Length computed from their sizes before the first byte
  goes out: memory does not grow with the instance, and no proxy or server has
  to cope with a chunked request.
- One request per study (the dispatcher's batch is sorted by study, then
  series) and at most ``max_instances`` / ``max_bytes``; an instance larger
  than ``max_bytes`` goes alone.
- Each instance is judged from the response's DICOM JSON: in
  ReferencedSOPSequence = delivered (WarningReason kept as a warning), in
  FailedSOPSequence = its FailureReason classified like a C-STORE status
  (``outcomes.from_status``), so 0xA7xx is transient and 0xA9xx/0xC000
  permanent exactly as for DIMSE.
- HTTP-level answers are the destination's: 401 once means the credentials are
  read again (a rotated token), twice means misconfigured, as are 403, 404,
  405, 415 and redirects (the queue is kept, nothing expires); 408, 429, 5xx
  and connection errors are transient, and Retry-After becomes the
  LinkFailure's ``retry_after`` so the backoff is at least that.
- A poison instance cannot block its study: a 400 (or any other 4xx) whose body
  names no instance is bisected until the instance is alone, and then it is a
  permanent failure of that instance only; instances a body leaves out (Orthanc
  answers 400 for a batch with one bad part and lists the good ones it stored)
  are sent again without the named ones; 413 halves the request.
- A transfer syntax the server refuses (FailureReason 0xC122, or 415 for a
  request holding compressed instances) is converted to Explicit VR Little
  Endian with the DIMSE machinery (``negotiation.prepare``: deflated and
  Implicit files file to file, compressed pixel data decoded with pydicom), and
  the converted copy is sent once.
- Keep-alive: one connection per worker, reused while the server keeps it; a
  reused connection the server had closed gets the request again on a fresh one
  (only when nothing of an answer was read).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import http.client
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hermes_py import __version__
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, Item, Probe, Report, Workspace
from hermes_py.destinations.dicomweb import DicomwebSettings, client_context, read_secret
from hermes_py.destinations.http_link import (
    HttpLink,
    LocalRead,
    Reply,
    retry_after,
    send_file,
    snippet,
)
from hermes_py.outcomes import LinkFailure, Outcome, Result, from_status

LOG = logging.getLogger(__name__)

# This many transient failures in a row (0xA7xx...) = the server is busy as a whole.
TRANSIENT_RUN = 3
TS_REFUSED = 0xC122             # PS3.18: Referenced Transfer Syntax not supported

_REFERENCED = "00081199"        # ReferencedSOPSequence
_FAILED = "00081198"            # FailedSOPSequence
_SOP_INSTANCE = "00081155"      # ReferencedSOPInstanceUID
_FAILURE = "00081197"           # FailureReason
_WARNING = "00081196"           # WarningReason

# STOW-RS's default syntax: a 415 for a request of only these is not about a syntax.
_PLAIN = ("1.2.840.10008.1.2.1",)

_MISCONFIGURED = {401: "check username/password_file or token_file",
                  403: "the credentials are not allowed to store here",
                  404: "check url (instances are POSTed to {url}/studies)",
                  405: "check url: this path does not take a POST",
                  415: "the server does not take multipart/related application/dicom here"}


class StowKind(enum.StrEnum):
    """Why a STOW-RS server refused us as a whole (``kind`` in its state file); the
    connection-level kinds are ``http_link.HttpKind``."""

    REJECTED = "request rejected"                   # 401/403/404/405/415/3xx: misconfigured
    THROTTLED = "throttled"                         # 408, 429
    SERVER_ERROR = "server error"                   # 5xx
    BUSY = "destination out of resources"


@dataclass
class _Part:
    """One instance of a request: the file that goes on the wire and what it is."""

    item: Item
    path: Path                  # the stored file, or its converted copy
    size: int
    delivered_as: str
    converted: bool = False


@dataclass
class _Reply:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes
    json: dict[str, Any] | None = None


@dataclass
class _Run:
    """One ``deliver`` call's bookkeeping."""

    report: Report
    temps: contextlib.ExitStack
    queue: deque[list[_Part]] = field(default_factory=deque)
    reauthed: bool = False
    transient_run: int = 0


class StowDestination(Destination):
    """STOW-RS to one ``[destinations.NAME]``; see the module docstring."""

    def __init__(self, settings: DicomwebSettings, label: str = "",
                 workspace: Workspace = SYSTEM_TEMP):
        self.settings = settings
        self.name = settings.name
        self.label = label or settings.name
        self.workspace = workspace
        u = urlsplit(settings.url)
        https = u.scheme == "https"
        self._path = (u.path or "").rstrip("/") + "/studies"
        self.link = HttpLink(u.hostname or "", u.port or (443 if https else 80),
                             client_context(settings) if https else None, settings.timeout,
                             self._where())
        self._requests = 0
        self._auth = self._authorization()

    # ------------------------------------------------------------ credentials

    def _authorization(self) -> str | None:
        """The Authorization header value, from the files (never logged)."""
        s = self.settings
        try:
            if s.username:
                pair = f"{s.username}:{read_secret(s.password_file)}".encode()
                return "Basic " + base64.b64encode(pair).decode("ascii")
            if s.token_file:
                return "Bearer " + read_secret(s.token_file).strip()
        except (OSError, UnicodeDecodeError) as e:
            LOG.error("destination %s: cannot read its credentials file: %s", self.name,
                      e.strerror if isinstance(e, OSError) else "not UTF-8 text")
        return None

    # ------------------------------------------------------------ the batch

    def deliver(self, items: Sequence[Item], report: Report,
                should_stop: Callable[[], bool]) -> LinkFailure | None:
        with contextlib.ExitStack() as temps:
            run = _Run(report, temps)
            parts = [p for p in (self._part(i, report) for i in items) if p is not None]
            for request in self._requests_of(parts):
                run.queue.append(request)
            while run.queue:
                if should_stop():
                    return None
                batch = run.queue.popleft()
                failure = self._one(batch, run)
                if failure is not None:
                    return failure
        return None

    def _part(self, item: Item, report: Report) -> _Part | None:
        try:
            size = os.stat(item.path).st_size
        except OSError as e:
            report(item, Result(Outcome.PERMANENT, f"cannot read the instance file: "
                                                   f"{e.strerror or e}"))
            return None
        return _Part(item, item.path, size, item.transfer_syntax)

    def _requests_of(self, parts: Iterable[_Part]) -> list[list[_Part]]:
        """Parts in order, cut at every study change, ``max_instances`` and ``max_bytes``."""
        s = self.settings
        out: list[list[_Part]] = []
        cur: list[_Part] = []
        size = 0
        for p in parts:
            if cur and (p.item.study != cur[0].item.study or len(cur) >= s.max_instances
                        or size + p.size > s.max_bytes):
                out.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += p.size
        if cur:
            out.append(cur)
        return out

    def _one(self, batch: list[_Part], run: _Run) -> LinkFailure | None:
        """POST one request and act on the answer; None to go on with the queue."""
        try:
            reply = self._post(batch)
        except LocalRead as e:
            (bad,) = [p for p in batch if p.path == e.path]
            self._settle(run, bad, Result(
                Outcome.PERMANENT, f"cannot read the instance file while sending it: "
                                   f"{type(e.error).__name__}: {e.error}"))
            rest = [p for p in batch if p is not bad]
            if rest:
                run.queue.appendleft(rest)
            return None
        if isinstance(reply, LinkFailure):
            return reply
        code = reply.status
        if code == 401 and not run.reauthed:
            run.reauthed = True           # a rotated token or password: read the files again
            self._auth = self._authorization()
            run.queue.appendleft(batch)
            return None
        run.reauthed = code == 401
        if code == 415:
            return self._unsupported(batch, reply, run)
        if code in _MISCONFIGURED or 300 <= code < 400:
            return self._rejected(reply)
        if code in (408, 429) or code >= 500:
            kind = StowKind.THROTTLED if code < 500 else StowKind.SERVER_ERROR
            after = retry_after(reply.headers.get("Retry-After"))
            return LinkFailure(kind, self._http_text(reply)
                               + (f"; Retry-After {after:g}s" if after is not None else ""),
                               retry_after=after)
        if code == 413:
            if len(batch) > 1:
                half = len(batch) // 2
                run.queue.extendleft([batch[half:], batch[:half]])
                return None
            self._settle(run, batch[0], Result(
                Outcome.PERMANENT, f"HTTP 413 Payload Too Large for this instance alone "
                                   f"({batch[0].size} bytes)", detail=snippet(reply.body)))
            return None
        return self._judge(batch, reply, run)

    def _judge(self, batch: list[_Part], reply: _Reply, run: _Run) -> LinkFailure | None:
        """Each instance from the body; what the body leaves out is sent again, smaller."""
        code = reply.status
        named = _named(reply.json)
        if not named and code == 200:
            # 200 = every instance stored (PS3.18 10.5.3); a server that says so without a
            # body naming them is believed.
            for p in batch:
                self._settle(run, p, _stored(0, p.delivered_as))
            return None
        unnamed: list[_Part] = []
        again: list[_Part] = []     # converted after the server refused their syntax
        for p in batch:
            verdict = named.get(p.item.sop_instance_uid)
            if verdict is None:
                unnamed.append(p)
            elif verdict[0]:
                self._settle(run, p, _stored(verdict[1], p.delivered_as))
            elif verdict[1] == TS_REFUSED:
                why = self._convert(p, run)
                if why is None:
                    again.append(p)
                else:
                    self._settle(run, p, Result(
                        Outcome.PERMANENT, "0xC122 Referenced Transfer Syntax not supported: "
                        f"the server refuses {p.delivered_as}, and {why}", status=TS_REFUSED))
            else:
                self._settle(run, p, from_status(verdict[1]))
        if len(batch) == 1 and unnamed:
            p = batch[0]
            if code == 200:
                self._settle(run, p, _stored(0, p.delivered_as))
            elif code == 202:
                self._settle(run, p, Result(Outcome.TRANSIENT, "HTTP 202: the answer does "
                                            "not name this instance",
                                            detail=snippet(reply.body)))
            else:
                self._settle(run, p, Result(Outcome.PERMANENT, f"{self._http_text(reply)} for "
                                            "this instance alone",
                                            detail=snippet(reply.body)))
        elif unnamed and len(unnamed) == len(batch):   # none named: halve, find the poison
            half = len(batch) // 2
            run.queue.extendleft([batch[half:], batch[:half]])
        elif unnamed:
            run.queue.appendleft(unnamed)
        if again:
            run.queue.appendleft(again)
        return self._busy(run)

    def _unsupported(self, batch: list[_Part], reply: _Reply, run: _Run) -> LinkFailure | None:
        """415: the media type, or (PS3.18 10.5.3) a transfer syntax the server will not
        take. Compressed instances are converted and the request sent again; one that
        cannot be converted is looked for by halving, and fails alone; a request of
        uncompressed instances refused is the server's configuration or ours."""
        suspects = [p for p in batch if not p.converted
                    and p.delivered_as not in _PLAIN]
        if not suspects:
            return self._rejected(reply)
        whys = {id(p): self._convert(p, run) for p in suspects}
        if any(w is None for w in whys.values()):
            run.queue.appendleft(batch)
            return None
        if len(batch) > 1:
            half = len(batch) // 2
            run.queue.extendleft([batch[half:], batch[:half]])
            return None
        p = batch[0]
        self._settle(run, p, Result(Outcome.PERMANENT, f"HTTP 415 for {p.delivered_as}, "
                                    f"and {whys[id(p)]}", detail=snippet(reply.body)))
        return None

    def _settle(self, run: _Run, part: _Part, result: Result) -> None:
        result.association = f"{self.label}#{self._requests}"
        if result.outcome is Outcome.TRANSIENT:
            run.transient_run += 1
        else:
            run.transient_run = 0
        run.report(part.item, result)

    def _busy(self, run: _Run) -> LinkFailure | None:
        if run.transient_run >= TRANSIENT_RUN:
            n, run.transient_run = run.transient_run, 0
            return LinkFailure(StowKind.BUSY, f"{n} instances in a row failed transiently")
        return None

    def _rejected(self, reply: _Reply) -> LinkFailure:
        code = reply.status
        hint = _MISCONFIGURED.get(code, "")
        if 300 <= code < 400:
            hint = f"the url redirects to {reply.headers.get('Location', '?')}: set url to it"
        if code == 401 and self._auth is None:
            hint = ("the server wants credentials: set username + password_file or token_file"
                    + (" (the credentials file could not be read)"
                       if self.settings.username or self.settings.token_file else ""))
        elif code == 401:
            hint += " (the credentials were read again and refused again)"
        return LinkFailure(StowKind.REJECTED, f"{self._http_text(reply)}: {hint}",
                           misconfigured=True)

    def _http_text(self, reply: _Reply) -> str:
        return (f"HTTP {reply.status} {reply.reason} from POST {self._where()}"
                + (f" ({snippet(reply.body, 120)})" if reply.body and reply.json is None
                   else ""))

    def _where(self) -> str:
        return f"{self.settings.url}/studies"

    # ------------------------------------------------------------ converting

    def _convert(self, part: _Part, run: _Run) -> str | None:
        """Replace ``part``'s file with an Explicit VR Little Endian copy, once.

        None when done; otherwise why it cannot be (then it goes as it is, or fails).
        The copy is a temp file in the dispatcher's scratch folder, removed when this
        ``deliver`` ends.
        """
        from pydicom.uid import UID, ExplicitVRLittleEndian
        from pynetdicom.presentation import build_context

        from hermes_py.destinations import negotiation, transcode
        from hermes_py.spool.tempfiles import scratch_file

        stored = UID(part.delivered_as)
        if part.converted or stored == ExplicitVRLittleEndian:
            return "it is already Explicit VR Little Endian"
        if not stored.is_little_endian:
            return "big endian cannot be converted"
        if stored.is_compressed and not negotiation.decodable(stored):
            return ("no decoder for it is installed (pydicom pixel decoders, "
                    "hermes-py[codecs])")
        mode = negotiation.Mode.DECOMPRESS if stored.is_compressed else negotiation.Mode.REENCODE
        cx = build_context(part.item.sop_class_uid, [ExplicitVRLittleEndian])
        try:
            with contextlib.ExitStack() as stack:
                payload = stack.enter_context(negotiation.prepare(
                    part.item.path, negotiation.Choice(mode, cx), self.workspace))
                if not isinstance(payload, Path):   # decompressed in memory (pydicom)
                    out = stack.enter_context(scratch_file(self.workspace.scratch))
                    payload.save_as(out, enforce_file_format=True)
                    payload = out
                part.path, part.size = payload, os.stat(payload).st_size
                run.temps.push(stack.pop_all())   # the copy lives until this deliver ends
        except (negotiation.Unsendable, transcode.TempSpaceError, OSError, ValueError) as e:
            LOG.info("destination %s: cannot convert %s: %s", self.name, part.item.name, e)
            return f"converting it failed: {e}"
        LOG.info("destination %s: the server refused %s; sending %s as %s", self.name,
                 negotiation.ts_name(str(stored)), part.item.name,
                 negotiation.ts_name(ExplicitVRLittleEndian))
        part.delivered_as = str(ExplicitVRLittleEndian)
        part.converted = True
        return None

    # ------------------------------------------------------------ HTTP

    def close(self) -> None:
        self.link.close()

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        h = {"User-Agent": f"hermes-py/{__version__}", "Accept": "application/dicom+json"}
        if self._auth:
            h["Authorization"] = self._auth
        h.update(extra)
        return h

    def _post(self, batch: list[_Part]) -> _Reply | LinkFailure:
        boundary = uuid.uuid4().hex
        heads = [(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
                 for _ in batch]
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + p.size + 2 for h, p in zip(heads, batch, strict=True)) + len(tail)
        headers = self._headers({
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length)})

        def body(send: Callable[[bytes], None]) -> None:
            for head, part in zip(heads, batch, strict=True):
                send(head)
                send_file(send, part.path, part.size)
                send(b"\r\n")
            send(tail)

        self._requests += 1
        return self._answer(self.link.exchange("POST", self._path, headers, body))

    @staticmethod
    def _answer(reply: Reply | LinkFailure) -> _Reply | LinkFailure:
        """The reply with its body read as DICOM JSON (when it is)."""
        if isinstance(reply, LinkFailure):
            return reply
        return _Reply(reply.status, reply.reason, reply.headers, reply.body, _json(reply.body))

    # ------------------------------------------------------------ the probe

    def probe(self) -> Probe:
        """An authenticated ``GET {url}/studies?limit=1``: reachable, and are we let in.

        A STOW-only service may have no QIDO-RS there: 405/501 still proves the
        server, the TLS and the credentials (those are checked first).
        """
        t0 = time.monotonic()
        reply = self._answer(self.link.exchange("GET", self._path + "?limit=1",
                                                self._headers({}), None))
        self.close()
        ms = (time.monotonic() - t0) * 1000
        if isinstance(reply, LinkFailure):
            return Probe(False, str(reply))
        code = reply.status
        text = f"GET {self._where()}?limit=1 answered HTTP {code} {reply.reason}"
        if 200 <= code < 300:
            return Probe(True, f"OK {ms:.0f} ms ({text})", ms)
        if code in (405, 501):
            return Probe(True, f"OK {ms:.0f} ms: reachable and let in ({text}: no QIDO-RS "
                               "there, STOW-RS not tried)", ms)
        if code == 401:
            self._auth = self._authorization()
        hint = _MISCONFIGURED.get(code, "")
        if 300 <= code < 400:
            hint = f"redirects to {reply.headers.get('Location', '?')}: set url to it"
        return Probe(False, text + (f": {hint}" if hint else ""))


# ---------------------------------------------------------------- helpers


def _stored(warning: int, delivered_as: str) -> Result:
    """Delivered, whatever code a server put in WarningReason (it did store it)."""
    res = from_status(warning, delivered_as=delivered_as)
    if res.outcome is not Outcome.SUCCESS:
        res = Result(Outcome.SUCCESS, "stored", status=0, delivered_as=delivered_as,
                     warnings=[f"WarningReason {res.reason}"])
    return res


def _json(body: bytes) -> dict[str, Any] | None:
    """The response as a DICOM JSON object, when it is one."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, list) and len(data) == 1:   # some servers wrap the one data set
        data = data[0]
    return data if isinstance(data, dict) else None


def _named(data: dict[str, Any] | None) -> dict[str, tuple[bool, int]]:
    """SOP Instance UID -> (stored, code): code is the WarningReason (0 for none) of a
    stored one, the FailureReason of a failed one (0x0110 when the server gave none)."""
    out: dict[str, tuple[bool, int]] = {}
    if not data:
        return out
    for key, ok, code_key, default in ((_FAILED, False, _FAILURE, 0x0110),
                                       (_REFERENCED, True, _WARNING, 0)):
        for entry in _items(data.get(key)):
            uid = _first(entry.get(_SOP_INSTANCE))
            if not isinstance(uid, str) or not uid:
                continue
            code = _code(_first(entry.get(code_key)), default)
            out[uid] = (ok, code)   # referenced wins over failed for a uid in both
    return out


def _items(element: Any) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _first(element: Any) -> Any:
    if isinstance(element, dict):
        value = element.get("Value")
        if isinstance(value, list) and value:
            return value[0]
    return None


def _code(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value, 16) if value.lower().startswith("0x") else int(value)
    return default
