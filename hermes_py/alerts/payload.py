"""The alert payload, ``hermes-alert/1``: what an on-call admin needs, nothing about a patient.

Built only from what the router knows about itself (state files, folder counts,
settings, the events' facts); no DICOM file is ever opened here, so no name, ID,
accession number, description or date can reach a payload. UIDs appear only
with ``include_uids``; without it anything UID-shaped is masked even inside
error text. Text that came from a peer (an ErrorComment, an HTTP body) is
hostile: control characters are stripped, it is cut to 200 characters, and
credentials in URLs are masked.

Ids are derived (uuid5) from what the alert is about (event, destination, the
start of the episode, the reminder number), never random: the same alert
written twice after a crash has the same id, which is what lets the outbox
ignore the second write and the receivers deduplicate.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from typing import Any, TypedDict

from hermes_py import __version__, destinations, failover
from hermes_py.config import Settings
from hermes_py.durations import DAY
from hermes_py.lifecycle import Stage
from hermes_py.spool import Spool, now_iso, parse_iso, received_at

SCHEMA = "hermes-alert/1"
DETAIL_MAX = 200
_NAMESPACE = uuid.UUID("5b0c6f4e-8a43-4c36-9d51-2f3f1d6a7e01")

SEVERITY = {
    "destination_down": "critical", "destination_misconfigured": "critical",
    "destination_recovered": "info", "failover_started": "warning", "failback": "info",
    "gave_up": "error", "queue_delayed": "warning", "disk_low": "critical",
    "receiving_refused": "critical", "process_flapping": "error", "test": "info",
    "destination_not_committing": "error", "cert_expiring": "warning",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|key|secret|password|sig|signature|code)=)[^&\s]+")
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def _mask_uid(m: re.Match[str]) -> str:
    """A UID is masked; an IPv4 address (four parts, each at most 255) is not one."""
    parts = m.group(0).split(".")
    if len(parts) == 4 and all(len(x) <= 3 and int(x) <= 255 for x in parts):
        return m.group(0)
    return "<uid>"


class AlertState(TypedDict, total=False):
    to: str
    since: str | None
    duration_s: int | None
    # "from" is a Python keyword: set with item access (payload["state"]["from"])


class AlertPayload(TypedDict, total=False):
    schema: str
    id: str
    event: str
    severity: str
    at: str
    host: str
    hermes_version: str
    summary: str
    destination: dict[str, Any] | None
    state: dict[str, Any] | None
    last_error: dict[str, Any] | None
    queue: dict[str, Any] | None
    failover: dict[str, Any] | None
    details: dict[str, Any]
    hint: str


def alert_id(*parts: object) -> str:
    """The idempotency key of an alert about ``parts``: the same parts, the same id."""
    return str(uuid.uuid5(_NAMESPACE, "|".join(str(p) for p in parts)))


def clean(text: object, limit: int = DETAIL_MAX, uids: bool = False) -> str:
    """Peer or error text made safe to forward: one line, no control characters, no
    credentials, UIDs masked unless asked for, at most ``limit`` characters."""
    s = _CONTROL.sub(" ", str(text))
    s = _USERINFO.sub(r"\1***@", s)
    s = _SECRET_QUERY.sub(r"\1***", s)
    if not uids:
        s = _UID.sub(_mask_uid, s)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def _count(folder: Any) -> int:
    return sum(1 for _ in Spool.scan(folder))


def queue_facts(spool: Spool, dest: str, now: float) -> dict[str, Any]:
    """queued, due, oldest_age_s, error_24h: one listing per folder, one stat per entry.

    Only when an alert is built (rare), never per tick.
    """
    queued = due = 0
    oldest: str | None = None
    folders = [*spool.outboxes(dest), *(p.path for p in spool.places(Stage.ACTIVE, dest))]
    for folder in folders:
        for e in Spool.scan(folder):
            queued += 1
            if oldest is None or e.name < oldest:
                oldest = e.name
            if Spool.next_attempt(e.path) <= now:
                due += 1
    born = received_at(oldest) if oldest else None
    errors = sum(1 for e in Spool.scan(spool.error_dir(dest))
                 if (Spool.landed_at(e.path) or 0.0) >= now - DAY)
    return {"queued": queued, "due": due,
            "oldest_age_s": None if born is None else max(0, int(now - born)),
            "error_24h": errors}


def oldest_age(spool: Spool, dest: str, now: float) -> float | None:
    """Age of the oldest queued instance of ``dest`` (by name = receive time), or None."""
    folders = [*spool.outboxes(dest), *(p.path for p in spool.places(Stage.ACTIVE, dest))]
    names = [p.stem for f in folders for p in spool.oldest(f, 1)]
    born = [t for t in (received_at(n) for n in names) if t is not None]
    return max(0.0, now - min(born)) if born else None


def _destination(cfg: Settings, dest: str | None) -> dict[str, Any] | None:
    if dest is None:
        return None
    d = cfg.destinations.get(dest)
    if d is None:
        return {"name": dest, "type": None, "target": None}
    return {"name": dest, "type": d.type, "target": clean(destinations.describe(d), 120,
                                                          uids=True)}


def _failover(spool: Spool, dest: str | None) -> dict[str, Any] | None:
    if dest is None:
        return None
    rec = failover.read(spool, dest)
    if rec is None:
        return None
    return {"to": rec.get("to"), "mode": rec.get("mode"), "since": rec.get("since")}


def _last_error(record: dict[str, Any] | None, uids: bool) -> dict[str, Any] | None:
    err = (record or {}).get("last_error")
    if not isinstance(err, dict):
        return None
    return {"at": err.get("at"), "kind": clean(err.get("kind", ""), 80, uids),
            "detail": clean(err.get("detail", ""), DETAIL_MAX, uids)}


HINTS = {
    "destination_down": "hermes-py status; hermes-py echo {dest}",
    "destination_misconfigured": "hermes-py echo {dest}: check AE titles, host, port, "
                                 "certificates, credentials",
    "destination_recovered": "hermes-py status",
    "failover_started": "hermes-py status; hermes-py echo {dest}",
    "failback": "hermes-py status",
    "gave_up": "hermes-py status; hermes-py retry {dest} once it is fixed",
    "queue_delayed": "hermes-py status",
    "disk_low": "free space on the spool's filesystem; hermes-py status",
    "receiving_refused": "free space on the spool's filesystem; hermes-py status",
    "process_flapping": "journalctl / the serve log for the child's exit reason",
    "test": "nothing to do: hermes-py alerts test",
}


def build(cfg: Settings, spool: Spool, event: str, dest: str | None, *, ident: str,
          summary: str, state: dict[str, Any] | None = None,
          record: dict[str, Any] | None = None, details: dict[str, Any] | None = None,
          now: float | None = None, queue: bool = True) -> AlertPayload:
    """One payload; ``record`` is the destination's state file (for last_error)."""
    now = time.time() if now is None else now
    uids = cfg.alerts.include_uids
    return AlertPayload(
        schema=SCHEMA, id=ident, event=event, severity=SEVERITY.get(event, "warning"),
        at=now_iso(now), host=socket.gethostname(), hermes_version=__version__,
        summary=clean(summary, 300, uids), destination=_destination(cfg, dest), state=state,
        last_error=_last_error(record, uids),
        queue=queue_facts(spool, dest, now) if (dest is not None and queue) else None,
        failover=_failover(spool, dest), details=details or {},
        hint=HINTS.get(event, "hermes-py status").format(dest=dest or ""))


def state_change(frm: str, to: str, since: object, now: float) -> dict[str, Any]:
    """``{"from", "to", "since", "duration_s"}`` of a state that began at ``since``."""
    t = parse_iso(since) if isinstance(since, str) else None
    return {"from": frm, "to": to, "since": since if isinstance(since, str) else None,
            "duration_s": None if t is None else max(0, int(now - t))}


def subject(p: AlertPayload) -> str:
    """One line for a mail subject or a chat title: event, destination, host; never PHI."""
    dest = (p.get("destination") or {}).get("name")
    what = f"{p.get('event')}" + (f" {dest}" if dest else "")
    return f"[hermes {p.get('severity', '?')}] {what} on {p.get('host', '?')}"
