"""Spool names and time stamps: what a file is called, and what its name tells.

``20261128T051703.123456_1.2.840.1_9f3c2a1b``: the receive time (UTC), the
sanitised SOP Instance UID and a random part. Unique per reception (the same UID
received twice gets two names, so a resend never overwrites an instance in
flight), sorted by receive time, readable by a person, and the same in every
folder an instance passes through, so ``ls */*/NAME.*`` finds all its copies.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import UTC, datetime

DCM = ".dcm"
JSON = ".json"

# Where a name's receive time ends: "20261128T051703.123456".
STAMP_LEN = 22
_RANDOM_LEN = 8
_UNSAFE = re.compile(r"[^0-9A-Za-z.]")
# drop/ folders the spool fills itself, by rename only: ``hermes-py send``'s batches
# (``send-<time>-<random>``) and the router's hand-back of files a person put into
# incoming/. A file in them is whole when it appears, so the intake never waits for
# more of it (inotify cannot say so for a file renamed into a folder it has not
# started watching yet).
SEND_BATCH = "send-"
FROM_INCOMING = "from-incoming"
_NAME_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}_[0-9A-Za-z._]{1,64}_[0-9a-f]{8}$")


def deposited(rel: str) -> bool:
    """Whether a path relative to drop/ lies in a folder only the spool writes to."""
    top, sep, _ = rel.partition(os.sep)
    return bool(sep) and (top == FROM_INCOMING or top.startswith(SEND_BATCH))


def sanitize(value: str | bytes | None, limit: int = 64, empty: str = "unknown") -> str:
    """Make wire data (a UID, an AE title, a tag) safe as one path component.

    Only ASCII letters, digits and '.' survive; everything else (slashes, NUL,
    spaces, non-ASCII) becomes '_', so ``../../etc/x`` can never leave its
    folder. A leading '.' is replaced too, so no result is hidden or ``..``.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    s = _UNSAFE.sub("_", (value or "").strip().rstrip("\0"))[:limit]
    if s.startswith("."):
        s = "_" + s[1:]
    return s or empty


def stamp(t: float) -> str:
    """The receive-time prefix a name made at time ``t`` has (names sort like these)."""
    return f"{datetime.fromtimestamp(t, UTC):%Y%m%dT%H%M%S.%f}"


def new_name(sop_instance_uid: str | bytes | None, when: float | None = None) -> str:
    """A name unique per reception, sortable by receive time, readable by a person."""
    t = time.time() if when is None else when
    return f"{stamp(t)}_{sanitize(sop_instance_uid)}_{secrets.token_hex(_RANDOM_LEN // 2)}"


def is_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def received_at(name: str) -> float | None:
    """Receive time encoded in a spool name (cheap 'oldest age' without a stat)."""
    try:
        dt = datetime.strptime(name[:STAMP_LEN], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return dt.timestamp()


def uid_of_name(stem: str) -> str | None:
    """The sanitised SOP Instance UID a spool name carries (between stamp and random part)."""
    return stem[STAMP_LEN + 1: -(_RANDOM_LEN + 1)] if is_name(stem) else None


def owner_id() -> str:
    """``host-pid-random``: who owns a claim area or a private temp folder.

    The random part means a reused pid never finds a dead owner's folder as its own.
    """
    raw = f"{os.uname().nodename[:20]}-{os.getpid()}-{secrets.token_hex(3)}"
    return sanitize(raw).replace(".", "_")


def now_iso(t: float | None = None) -> str:
    """``2026-11-28T05:17:03.123Z``: how every sidecar and state file writes a time."""
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: object) -> float | None:
    """Epoch seconds from a time written by now_iso; None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
