"""What a send attempt meant: delivered, try again later, or never.

The dispatcher's promise ("nothing is lost because a destination was down, and
error/ only for what can never succeed") stands or falls with this table, so it
lives in one place, is pure, and is tested code by code. Two levels:

- per instance (``Result``): the C-STORE status of one instance, or a reason it
  could not be sent (no usable presentation context, unconvertible transfer
  syntax, unreadable file);
- per destination (``LinkFailure``): the destination could not be talked to at
  all (refused, timed out, association rejected or aborted). These never burn an
  instance's own retry timer: the destination is backed off as a whole, and a
  permanent association rejection (an AE-title typo, the usual misconfiguration)
  keeps the whole queue waiting instead of dumping it into error/.

Sources: PS3.4 Annex B.2.3 (Storage statuses), PS3.7 Annex C (general
statuses), PS3.8 9.3.4 (A-ASSOCIATE-RJ).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Outcome(enum.StrEnum):
    """Per-instance class; the strings are what sidecars and ``status_classes`` use."""

    SUCCESS = "success"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


# Failure codes worth retrying a few times before believing them (PS3.7 C.4):
# 0x0110 Processing failure is what many archives answer for any internal hiccup;
# 0x0210 Duplicate invocation means a message-ID clash, cured by a new association.
RETRY_CAPS: dict[int, int] = {0x0110: 3, 0x0210: 2}

# Text for the codes a Storage SCP answers; ranges are handled in ``status_text``.
_STATUS_TEXT: dict[int, str] = {
    0x0000: "Success",
    0x0001: "Warning",
    0x0107: "Warning: Attribute List Error",
    0x0110: "Failure: Processing Failure",
    0x0111: "Failure: Duplicate SOP Instance",
    0x0116: "Warning: Attribute Value Out of Range",
    0x0117: "Failure: Invalid SOP Instance",
    0x0118: "Failure: No Such SOP Class",
    0x0119: "Failure: Class-Instance Conflict",
    0x0120: "Failure: Missing Attribute",
    0x0121: "Failure: Missing Attribute Value",
    0x0122: "Refused: SOP Class Not Supported",
    0x0124: "Refused: Not Authorised",
    0x0210: "Failure: Duplicate Invocation",
    0x0211: "Failure: Unrecognised Operation",
    0x0212: "Failure: Mistyped Argument",
    0x0213: "Failure: Resource Limitation",
    0xB000: "Warning: Coercion of Data Elements",
    0xB006: "Warning: Elements Discarded",
    0xB007: "Warning: Data Set Does Not Match SOP Class",
    0xFE00: "Cancel",
}

_TRANSIENT_CODES = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})


def hex_status(code: int) -> str:
    return f"0x{code:04X}"


def status_text(code: int) -> str:
    """``"0xA700 Refused: Out of Resources"``: code and meaning, as an admin reads it."""
    if code in _STATUS_TEXT:
        text = _STATUS_TEXT[code]
    elif 0xA700 <= code <= 0xA7FF:
        text = "Refused: Out of Resources"
    elif 0xA900 <= code <= 0xA9FF:
        text = "Error: Data Set Does Not Match SOP Class"
    elif 0xC000 <= code <= 0xCFFF:
        text = "Error: Cannot Understand"
    elif 0xB000 <= code <= 0xBFFF:
        text = "Warning"
    elif 0xFF00 <= code <= 0xFFFF:
        text = "Pending (not valid for C-STORE)"
    else:
        text = "Unknown status"
    return f"{hex_status(code)} {text}"


def is_warning(code: int) -> bool:
    return code == 0x0001 or code in (0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF


def default_class(code: int) -> Outcome:
    """The class of a C-STORE status before per-destination overrides.

    Unknown failure codes are permanent: retrying what we do not understand for
    days hides the problem, while error/ shows it to an admin with the code.
    0x0111 (duplicate SOP instance) means the destination already has it.
    """
    if code == 0x0000 or is_warning(code) or code == 0x0111:
        return Outcome.SUCCESS
    if 0xA700 <= code <= 0xA7FF or code in _TRANSIENT_CODES:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT  # 0xA9xx, 0xCxxx, the refusals above, and every unknown code


def classify_status(code: int, overrides: Mapping[int, str] | None = None) -> Outcome:
    """Class of a status, honouring a destination's ``status_classes`` map.

    Some archives answer 0xC0xx for a transient database error; the map lets an
    admin say so for that destination only.
    """
    if overrides and code in overrides:
        return Outcome(overrides[code])
    return default_class(code)


def escalate(outcome: Outcome, code: int | None, earlier_same_code: int) -> Outcome:
    """A capped transient code becomes permanent once it has been seen often enough."""
    if outcome is Outcome.TRANSIENT and code in RETRY_CAPS \
            and earlier_same_code + 1 >= RETRY_CAPS[code]:
        return Outcome.PERMANENT
    return outcome


@dataclass
class Result:
    """What happened to one instance in one attempt."""

    outcome: Outcome
    reason: str
    status: int | None = None          # the C-STORE status, when there was an answer
    detail: str = ""                   # ErrorComment, exception text, ...
    delivered_as: str | None = None    # transfer syntax actually sent
    warnings: list[str] = field(default_factory=list)
    association: str | None = None     # which association (for the history)
    # The connection ended while this instance was being sent, on an association the
    # destination had accepted: possibly this instance's doing (a data set the peer
    # chokes on), so the dispatcher blames the instance, not the destination, and
    # sends it alone from then on (see dispatcher._record).
    severed: bool = False
    # Delivered as a coerced copy: the keywords set and removed (coerce.py)
    coerced: dict[str, list[str]] | None = None

    @property
    def status_hex(self) -> str | None:
        return None if self.status is None else hex_status(self.status)


def from_status(code: int, overrides: Mapping[int, str] | None = None, *,
                error_comment: str = "", delivered_as: str | None = None) -> Result:
    """A Result for a C-STORE answer."""
    outcome = classify_status(code, overrides)
    text = status_text(code)
    warnings: list[str] = []
    if outcome is Outcome.SUCCESS and code != 0x0000:
        warnings.append(text + (f": {error_comment}" if error_comment else ""))
    return Result(outcome=outcome, reason=text, status=code, detail=error_comment,
                  delivered_as=delivered_as if outcome is Outcome.SUCCESS else None,
                  warnings=warnings)


# ---------------------------------------------------------------- destination level


class LinkKind(enum.StrEnum):
    """Why a DICOM destination could not be talked to; the ``kind`` in its state file.

    Another destination type names its own kinds (any StrEnum) and says which of
    them are a misconfiguration (``LinkFailure.misconfigured``).
    """

    REFUSED = "connection refused"
    CONNECT_TIMEOUT = "connection timed out"
    CONNECT_FAILED = "connection failed"
    NO_RESPONSE = "no association response"
    REJECTED_TRANSIENT = "association rejected (transient)"
    REJECTED_PERMANENT = "association rejected (permanent)"
    ABORTED = "association aborted"
    DIMSE_TIMEOUT = "no response (DIMSE timeout)"
    TLS_FAILED = "TLS failed"      # a certificate or handshake problem: misconfigured
    BUSY = "destination out of resources"


@dataclass
class LinkFailure:
    """The destination as a whole failed; instances not yet answered stay queued."""

    kind: enum.StrEnum
    detail: str = ""
    reject: tuple[int, int, int] | None = None   # A-ASSOCIATE-RJ (result, source, reason)
    # Our config or theirs is wrong, not the network (a permanent association rejection,
    # an AE-title typo): the queue is kept, nothing expires, an admin must act.
    misconfigured: bool = False
    # Seconds the destination asked us to wait (HTTP Retry-After): the backoff is at
    # least this, so a throttling server is not probed again before it said to.
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else str(self.kind)


_RJ_SOURCE = {1: "service user", 2: "service provider (ACSE)",
              3: "service provider (presentation)"}
_RJ_REASON = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def classify_reject(result: int, source: int, reason: int) -> LinkFailure:
    """An A-ASSOCIATE-RJ: result 1 is permanent (misconfiguration), 2 transient.

    A permanent rejection is almost always an AE title we send that the
    destination does not know (or the reverse): the fix is in a config file, so
    the queue is kept and the destination marked misconfigured.
    """
    why = _RJ_REASON.get((source, reason), f"reason {reason}")
    detail = (f"result {result} ({'permanent' if result == 1 else 'transient'}), "
              f"source {source} ({_RJ_SOURCE.get(source, '?')}), {why}")
    kind = LinkKind.REJECTED_PERMANENT if result == 1 else LinkKind.REJECTED_TRANSIENT
    return LinkFailure(kind, detail, (result, source, reason), misconfigured=result == 1)


def reject_text(result: int, source: int, reason: int) -> str:
    """``rejected (permanent) by Service User: Called AE title not recognised [result 1, ...]``."""
    kind = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
    who = _RJ_SOURCE.get(source, f"source {source}").split(" (")[0].title()
    why = _RJ_REASON.get((source, reason), f"reason {reason}")
    return (f"rejected ({kind}) by {who}: {why[:1].upper()}{why[1:]} "
            f"[result {result}, source {source}, reason {reason}]")
