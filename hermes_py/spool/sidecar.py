"""The sidecar (``<name>.json`` beside ``<name>.dcm``): its one shape, and its builders.

Every stage extends the sidecar and none renames a key, so an admin (and
``find``) reads an instance's whole story in one file. The shape below is the
contract of docs/internals.md, where a test compares it key by key; a stage that
needs a new fact adds a key here first, then documents it there.

Sidecars come from disk and may have been edited by hand or cut short by a full
disk: the types say what the stages write, readers still check what they get.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, cast

from hermes_py.spool.names import now_iso


class HeldRecord(TypedDict, total=False):
    """One series/study batch a routing decision put the instance in (``routing.held``)."""

    key: str
    rule: str
    level: str
    uid: str
    quiet_for: float
    destinations: list[str]
    priorities: dict[str, str]


class Hold(HeldRecord, total=False):
    """``hold``: the batch entry, when it was held, and (in the outbox copy) when released."""

    held_at: str
    released_at: str
    batch: str


class Routing(TypedDict, total=False):
    """``routing``: the router's decision, recorded in incoming/ BEFORE any link is made."""

    at: str
    rules: list[str]
    destinations: list[str]
    discarded_by: str | None
    priorities: dict[str, str]
    held: list[HeldRecord]
    reason: str


class Discard(TypedDict, total=False):
    reason: str
    rule: str | None
    at: str


# "class" is a keyword, hence the functional form.
LastError = TypedDict("LastError", {
    "at": str, "class": str, "status": str | None, "reason": str, "detail": str,
}, total=False)


class Scope(enum.StrEnum):
    """``history[].scope``: what a failed attempt is blamed on, when not the instance's status."""

    DESTINATION = "destination"   # the destination failed as a whole; the batch never got its turn
    SEVERED = "severed"           # the association ended while this instance was on the wire


class Attempt(TypedDict, total=False):
    """One ``history`` entry: a try, or an admin's retry (then ``by`` and ``previous_error``)."""

    at: str
    outcome: str
    status: str | None
    reason: str
    detail: str
    scope: str
    association: str
    by: str
    previous_error: ErrorRecord


# "from" is a keyword, hence the functional form.
Failover = TypedDict("Failover", {
    "from": str, "to": str, "mode": str, "at": str, "reason": str,
}, total=False)
Failover.__doc__ = """``failover``: this copy took (backup's queue) or gave (diverted/) the other
path."""

Resent = TypedDict("Resent", {"from": str, "by": str, "at": str}, total=False)
Resent.__doc__ = """``resent``: an admin queued this copy from another copy (hermes-py resend)."""


class Adopted(TypedDict, total=False):
    """``adopted``: the instance came from another, retired spool (hermes-py adopt)."""

    from_spool_id: str
    from_path: str
    at: str
    by: str


class Coerced(TypedDict, total=False):
    """``coerced``: the keywords a destination's coercion set and removed (never values)."""

    set: list[str]
    removed: list[str]


class CommitFailed(TypedDict, total=False):
    """``commit_failed`` (advisory storage commitment): the report said it is not stored."""

    at: str
    reason: str


class ErrorRecord(TypedDict, total=False):
    """``error``: why the copy is in error/ or error/<dest>/."""

    stage: str
    reason: str
    at: str
    destination: str


class Received(TypedDict, total=False):
    """What the receiver or the intake knew when the instance arrived, and what the router read."""

    name: str
    sop_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax: str
    source: str
    received_at: str
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    received_by: str
    original_path: str
    size: int
    study_instance_uid: str | None
    series_instance_uid: str | None
    routing: Routing
    hold: Hold
    adopted: Adopted


class CopyFacts(TypedDict, total=False):
    """What belongs to one destination's copy; a copy for another destination never inherits it."""

    destination: str
    priority: str
    queued_at: str
    attempts: int
    last_attempt: str
    next_attempt: str | None
    last_error: LastError
    history: list[Attempt]
    history_dropped: int
    delivered_at: str
    delivered_as: str | None
    warnings: list[str]
    error: ErrorRecord
    discard: Discard
    failover: Failover
    resent: Resent
    coerced: Coerced
    committed_at: str
    commit_transaction: str
    commit_failed: CommitFailed


class Sidecar(Received, CopyFacts, total=False):
    """The whole sidecar: docs/internals.md, "Sidecar JSON"."""


PER_COPY = frozenset(CopyFacts.__annotations__)
# Attempts kept in a sidecar: the first one and the latest.
HISTORY_MAX = 200


def of(data: Mapping[str, Any]) -> Sidecar:
    """A sidecar from JSON read off disk (its values are only as good as the file)."""
    return cast(Sidecar, dict(data))


# ---------------------------------------------------------------- arrival


def network(name: str, sop: str, sop_class: str, transfer_syntax: str, *, calling_ae: str,
            called_ae: str, peer_address: str, peer_port: int, size: int,
            received_by: str, received_at: str | None = None) -> Sidecar:
    """The receiver's sidecar for an acknowledged C-STORE (received now, unless told)."""
    return Sidecar(name=name, sop_instance_uid=sop, sop_class_uid=sop_class,
                   transfer_syntax=transfer_syntax, source="network",
                   received_at=received_at or now_iso(),
                   calling_ae=calling_ae, called_ae=called_ae, peer_address=peer_address,
                   peer_port=peer_port, size=size, received_by=received_by)


def dropped(original_path: str, size: int, received_at: str | None = None) -> Sidecar:
    """What the intake knows of a dropped file before it reads it (also its error/ sidecar)."""
    return Sidecar(source="drop", original_path=original_path, size=size,
                   received_at=received_at or now_iso())


def accepted_drop(base: Sidecar, name: str, sop: str, sop_class: str,
                  transfer_syntax: str, size: int) -> Sidecar:
    """The intake's sidecar for a dropped file it publishes into incoming/."""
    return Sidecar(name=name, sop_instance_uid=sop, sop_class_uid=sop_class,
                   transfer_syntax=transfer_syntax, source="drop",
                   received_at=base.get("received_at") or now_iso(),
                   original_path=base.get("original_path", ""), size=size)


# ---------------------------------------------------------------- routing


def routed(sidecar: Sidecar, name: str, values: Mapping[str, str | None],
           routing: Routing) -> Sidecar:
    """The incoming sidecar with the router's decision and the UIDs it read."""
    out = of(sidecar)
    out.setdefault("name", name)
    out.setdefault("sop_instance_uid", values.get("SOPInstanceUID"))
    out.setdefault("sop_class_uid", values.get("SOPClassUID"))
    out["study_instance_uid"] = values.get("StudyInstanceUID")
    out["series_instance_uid"] = values.get("SeriesInstanceUID")
    out["routing"] = routing
    return out


def discarded(sidecar: Sidecar, reason: str, rule: str | None) -> Sidecar:
    out = of(sidecar)
    out["discard"] = Discard(reason=reason, rule=rule, at=now_iso())
    return out


def shared(base: Sidecar) -> Sidecar:
    """The instance's facts without any copy's own (the start of another copy's sidecar)."""
    return cast(Sidecar, {k: v for k, v in base.items() if k not in PER_COPY})


def queued(base: Sidecar, dest: str, priority: str, at: str,
           hold: Hold | None = None) -> Sidecar:
    """A new outbox copy's sidecar: the instance's facts, this destination, no attempts yet."""
    out = shared(base)
    out["destination"] = dest
    out["priority"] = priority
    out["queued_at"] = at
    out["attempts"] = 0
    if hold is not None:
        out["hold"] = hold
    return out


def batched(base: Sidecar, held: HeldRecord, at: str) -> Sidecar:
    """A copy in a pending/ batch: the batch entry and when it joined."""
    out = shared(base)
    hold = cast(Hold, dict(held))
    hold["held_at"] = at
    out["hold"] = hold
    return out


def released(hold: Mapping[str, Any], at: str, batch: str) -> Hold:
    """The ``hold`` of a copy a batch released: when, and which released folder it came from."""
    out = cast(Hold, dict(hold))
    out["released_at"] = at
    out["batch"] = batch
    return out


# ---------------------------------------------------------------- delivery


def attempted(data: Sidecar, dest: str, at: float, outcome: str, *, status: str | None,
              reason: str, detail: str = "", scope: str | None = None,
              association: str | None = None) -> Sidecar:
    """The sidecar after one more attempt (a new dict; history capped at HISTORY_MAX)."""
    d = of(data)
    d["destination"] = dest
    d["attempts"] = int(d.get("attempts") or 0) + 1
    d["last_attempt"] = now_iso(at)
    entry = Attempt(at=now_iso(at), outcome=outcome, status=status, reason=reason)
    if detail:
        entry["detail"] = detail
    if scope:
        entry["scope"] = scope
    if association:
        entry["association"] = association
    d["history"] = _capped(d, [*(d.get("history") or []), entry])
    if outcome != "success":
        d["last_error"] = LastError({"at": now_iso(at), "class": outcome, "status": status,
                                     "reason": reason, "detail": detail})
    return d


def _capped(d: Sidecar, hist: list[Attempt]) -> list[Attempt]:
    if len(hist) <= HISTORY_MAX:
        return hist
    d["history_dropped"] = int(d.get("history_dropped") or 0) + len(hist) - HISTORY_MAX
    return hist[:1] + hist[len(hist) - HISTORY_MAX + 1:]


def delivered(data: Sidecar, at: float, delivered_as: str | None,
              warnings: Iterable[str]) -> Sidecar:
    d = of(data)
    d["delivered_at"] = now_iso(at)
    d["delivered_as"] = delivered_as
    w = list(warnings)
    if w:
        d["warnings"] = list(d.get("warnings") or []) + w
    d["next_attempt"] = None
    return d


def requeued(data: Sidecar, dest: str, at: float, by: str) -> Sidecar:
    """An instance an admin sends back from error/<dest>/: counters reset, history kept.

    The history gets an entry saying who retried it and why it had failed, so
    ``find`` still tells the whole story; ``give_up_after`` counts from now.
    """
    new = of(data)
    err = new.pop("error", None)
    entry = Attempt(at=now_iso(at), outcome="retried",
                    reason="retried by admin (hermes-py retry)", by=by)
    if err:
        entry["previous_error"] = err
    new["history"] = [*(data.get("history") or []), entry]
    new["destination"] = dest
    new.setdefault("priority", "normal")
    new["attempts"] = 0
    new["queued_at"] = now_iso(at)
    new["next_attempt"] = now_iso(at)
    return new


def diverted(data: Sidecar, failover: Failover) -> Sidecar:
    """The primary's copy a divert moved to diverted/<dest>/: its record of the other path."""
    out = of(data)
    out["failover"] = failover
    out["next_attempt"] = None
    return out


def failed_over(data: Sidecar, failover: Failover) -> Sidecar:
    """The backup's copy of an instance failed over to it: queued there, saying from where."""
    out = queued(data, failover.get("to", ""), str(data.get("priority") or "normal"),
                 failover.get("at") or now_iso())
    out["failover"] = failover
    return out


def returned(diverted_record: Sidecar, dest: str, at: float) -> Sidecar:
    """A diverted copy given back to its destination at failback, before the backup sent it."""
    out = of(diverted_record)
    fo = out.pop("failover", None)
    entry = Attempt(at=now_iso(at), outcome="returned",
                    reason=f"failback: {fo.get('to') if fo else 'the backup'} had not sent it")
    out["history"] = _capped(out, [*(out.get("history") or []), entry])
    out["destination"] = dest
    out["next_attempt"] = now_iso(at)
    return out


def resent(base: Sidecar, dest: str, priority: str, at: float, source: str, by: str) -> Sidecar:
    """A copy an admin queues for ``dest`` from ``source`` (a stage and destination)."""
    out = queued(base, dest, priority, now_iso(at))
    out["resent"] = Resent({"from": source, "by": by, "at": now_iso(at)})
    return out


def quarantined(data: Mapping[str, Any], stage: str, reason: str,
                dest: str | None = None) -> Sidecar:
    """The sidecar of a copy moved to error/ (or error/<dest>/): the reason an admin reads."""
    out = of(data)
    err = ErrorRecord(stage=stage, reason=reason, at=now_iso())
    if dest:
        err["destination"] = dest
    out["error"] = err
    return out
