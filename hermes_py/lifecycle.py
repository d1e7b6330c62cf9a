"""The one list of names: where an instance copy can be, what a destination can be, what happens.

Everything that asks "which folders can hold an instance", "is this destination
ok", or "which events are there" derives the answer from the three enums here:
the spool layout, ``status``, ``find``, the metrics, the cleaner, the router's
crash recovery and the tables at the top of docs/internals.md (a test keeps that
document equal to :func:`markdown_tables`). A new stage (a diverted copy, one
awaiting storage commitment) is one member of :class:`Stage` with its
:class:`StageFacts`; the code that moves copies into and out of it is the only
other thing to write.

The values are what is on disk and in the logs, so they never change: a
``Stage`` value is a folder name, a ``DestinationStatus`` value is the ``state``
of ``state/<dest>.json`` or of ``status --json``, an ``Event`` value is the first
word of a log line and the ``event`` of a JSON record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Stage(enum.StrEnum):
    """Where one copy of an instance is; declared in the order a copy moves through them."""

    INCOMING = "incoming"
    PENDING = "pending"
    OUTGOING = "outgoing"
    URGENT = "urgent"
    FAILOVER = "failover"
    ACTIVE = "active"
    COMMITTING = "committing"
    SUCCESS = "success"
    ERROR = "error"
    DISCARD = "discard"
    DIVERTED = "diverted"

    @property
    def facts(self) -> StageFacts:
        return _STAGES[self]


@dataclass(frozen=True)
class StageFacts:
    """What a stage means, and which rules of the other stages apply to it.

    ``layout`` gives the stage's folders relative to the spool root: ``{dest}``
    is a destination's folder name, ``{batch}`` a series/study batch and
    ``{worker}`` a dispatcher worker's claim area (both found by listing).
    """

    layout: tuple[str, ...]
    meaning: str
    queued: bool = False       # counted in a destination's QUEUED (it will be sent)
    has_copy: bool = False     # a copy here means the destination already has the instance
    keep: str | None = None    # the [spool] key after which the cleaner removes copies
    swept: bool = False        # the cleaner removes sidecars left without their .dcm
    eager: bool = True         # created for every destination at start (else when first used)

    @property
    def per_destination(self) -> bool:
        return any("{dest}" in pattern for pattern in self.layout)


_STAGES: dict[Stage, StageFacts] = {
    Stage.INCOMING: StageFacts(("incoming",), "received and complete, waiting for the router",
                               swept=True),
    Stage.PENDING: StageFacts(("pending/{batch}",),
                              "held by a series/study rule until nothing joined for quiet_for"),
    Stage.OUTGOING: StageFacts(("outgoing/{dest}",), "queued for the destination",
                               queued=True, has_copy=True, swept=True),
    Stage.URGENT: StageFacts(("outgoing/{dest}/urgent",), "queued, sent before the rest",
                             queued=True, has_copy=True, swept=True),
    Stage.FAILOVER: StageFacts(("outgoing/{dest}/failover/{primary}",),
                               "queued for this destination as the backup of {primary}: "
                               "failed over there (divert or copy), sent after urgent/",
                               queued=True, has_copy=True, swept=True, eager=False),
    Stage.ACTIVE: StageFacts(("active/{dest}/{worker}",),
                             "claimed by a dispatcher worker, being sent",
                             queued=True, has_copy=True),
    Stage.COMMITTING: StageFacts(("committing/{dest}",),
                                 "stored (C-STORE Success) at a destination with "
                                 "storage_commitment = \"required\": waiting for its storage "
                                 "commitment report; claimed by nobody, never aged out",
                                 has_copy=True, eager=False),
    Stage.SUCCESS: StageFacts(("success/{dest}",), "delivered", has_copy=True,
                              keep="keep_success", swept=True),
    Stage.ERROR: StageFacts(("error", "error/{dest}"),
                            "unreadable input (error/); the destination failed it permanently "
                            "or we gave up (error/<dest>/); the reason is in the sidecar",
                            has_copy=True),
    Stage.DISCARD: StageFacts(("discard",), "no rule routed it, or a discard rule matched",
                              keep="keep_discard", swept=True),
    Stage.DIVERTED: StageFacts(("diverted/{dest}",),
                               "failed over (divert): the destination's backup took the "
                               "instance; the sidecar's failover names it",
                               has_copy=True, keep="keep_success", swept=True),
}


class DestinationStatus(enum.StrEnum):
    """What a destination is: recorded by its dispatcher, or derived by ``status``."""

    OK = "ok"
    BACKOFF = "backoff"
    MISCONFIGURED = "misconfigured"
    RETRYING = "retrying"
    HELD = "held"
    STALLED = "stalled"
    UNKNOWN = "unknown"
    NOT_CONFIGURED = "not configured"

    @property
    def recorded(self) -> bool:
        """Written by the dispatcher into state/<dest>.json (the others are status's verdicts)."""
        return self in _RECORDED

    @property
    def meaning(self) -> str:
        return _STATUS_MEANING[self]


_RECORDED = frozenset({DestinationStatus.OK, DestinationStatus.BACKOFF,
                       DestinationStatus.MISCONFIGURED})

_STATUS_MEANING: dict[DestinationStatus, str] = {
    DestinationStatus.OK: "the last attempt reached it",
    DestinationStatus.BACKOFF: "unreachable: one probe per backoff interval, queue kept",
    DestinationStatus.MISCONFIGURED: "it rejected us permanently (AE titles?): queue kept, "
                                     "nothing expires, retried every max_delay",
    DestinationStatus.RETRYING: "the backoff ran out: a probe is due",
    DestinationStatus.HELD: "an admin held it (state/<dest>.hold): queueing, sending nothing",
    DestinationStatus.STALLED: "its dispatcher stopped reporting (state/<dest>.json not "
                               "rewritten for 3 heartbeats): stopped, hung or not running",
    DestinationStatus.UNKNOWN: "no dispatcher has reported on it yet",
    DestinationStatus.NOT_CONFIGURED: "folders on disk for a destination rules.toml no "
                                      "longer names",
}


class Scope(enum.StrEnum):
    """What an event is about."""

    INSTANCE = "instance"
    DESTINATION = "destination"
    RECEIVER = "receiver"
    SPOOL = "spool"
    PROCESS = "process"
    ALERT = "alert"


class Event(enum.StrEnum):
    """Something that happened, as the log line, the metrics and the alerts know it."""

    RECEIVED = "received"
    REFUSED = "refused"
    REJECTED = "rejected"
    ROUTED = "routed"
    HELD = "held"
    RELEASED = "released"
    DISCARDED = "discarded"
    ERROR = "error"
    SENT = "sent"
    RETRIED = "retried"
    DEFERRED = "deferred"
    FAILED = "failed"
    GAVE_UP = "gave_up"
    PURGED = "purged"
    DIVERTED = "diverted"
    RETURNED = "returned"
    RESENT = "resent"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    DESTINATION_DOWN = "destination_down"
    DESTINATION_RECOVERED = "destination_recovered"
    DESTINATION_MISCONFIGURED = "destination_misconfigured"
    DESTINATION_HELD = "destination_held"
    DESTINATION_RELEASED = "destination_released"
    DESTINATION_FLUSHED = "destination_flushed"
    DESTINATION_NOT_COMMITTING = "destination_not_committing"
    RECEIVING_REFUSED = "receiving_refused"
    RECEIVING_RESUMED = "receiving_resumed"
    FAILOVER_STARTED = "failover_started"
    FAILBACK = "failback"
    QUEUE_DELAYED = "queue_delayed"
    DISK_LOW = "disk_low"
    CERT_EXPIRING = "cert_expiring"
    PROCESS_FLAPPING = "process_flapping"
    ALERT_SENT = "alert_sent"
    ALERT_FAILED = "alert_failed"

    @property
    def facts(self) -> EventFacts:
        return _EVENTS[self]


@dataclass(frozen=True)
class EventFacts:
    """``meaning`` is also the metric's HELP; ``reason`` events get a bounded reason label."""

    scope: Scope
    meaning: str
    reason: bool = False


_EVENTS: dict[Event, EventFacts] = {
    Event.RECEIVED: EventFacts(Scope.INSTANCE, "Instances received (C-STORE or drop folder) "
                                               "and acknowledged"),
    Event.REFUSED: EventFacts(Scope.INSTANCE, "C-STOREs the receiver answered with a failure "
                                              "status (the sender keeps its copy)", reason=True),
    Event.REJECTED: EventFacts(Scope.INSTANCE, "Associations the receiver rejected, and dropped "
                                               "files the intake moved to error/", reason=True),
    Event.ROUTED: EventFacts(Scope.INSTANCE, "Instance copies handed to a destination outbox"),
    Event.HELD: EventFacts(Scope.INSTANCE, "Instance copies that joined a series/study batch "
                                           "in pending/"),
    Event.RELEASED: EventFacts(Scope.INSTANCE, "Instance copies a quiet batch released to an "
                                               "outbox"),
    Event.DISCARDED: EventFacts(Scope.INSTANCE, "Instances no rule routed, or a discard rule "
                                                "matched"),
    Event.ERROR: EventFacts(Scope.INSTANCE, "Instances the router could not read (to error/)",
                            reason=True),
    Event.SENT: EventFacts(Scope.INSTANCE, "Instances delivered to a destination"),
    Event.RETRIED: EventFacts(Scope.INSTANCE, "Instances that failed and will be tried again, "
                                              "or that an admin sent back to the outbox",
                              reason=True),
    Event.DEFERRED: EventFacts(Scope.INSTANCE, "Instances not tried because the destination "
                                               "failed as a whole", reason=True),
    Event.FAILED: EventFacts(Scope.INSTANCE, "Instances a destination failed permanently (to "
                                             "error/<dest>/)", reason=True),
    Event.GAVE_UP: EventFacts(Scope.INSTANCE, "Instances still failing after give_up_after "
                                              "(to error/<dest>/)", reason=True),
    Event.PURGED: EventFacts(Scope.INSTANCE, "Instances an admin deleted from error/ or "
                                             "discard/"),
    Event.DIVERTED: EventFacts(Scope.INSTANCE, "Instance copies a failed-over destination "
                                               "handed to its backup"),
    Event.RETURNED: EventFacts(Scope.INSTANCE, "Diverted instances given back to their "
                                               "destination at failback, before the backup "
                                               "sent them"),
    Event.RESENT: EventFacts(Scope.INSTANCE, "Instance copies an admin queued again for a "
                                             "destination (hermes-py resend)"),
    Event.COMMITTED: EventFacts(Scope.INSTANCE, "Instances a destination's storage commitment "
                                                "report confirmed"),
    Event.COMMIT_FAILED: EventFacts(Scope.INSTANCE, "Instances a storage commitment report "
                                                    "failed (required: queued again)",
                                    reason=True),
    Event.DESTINATION_DOWN: EventFacts(Scope.DESTINATION, "A destination became unreachable "
                                                          "(backed off)", reason=True),
    Event.DESTINATION_RECOVERED: EventFacts(Scope.DESTINATION, "A destination that was down "
                                                               "or misconfigured answered again"),
    Event.DESTINATION_MISCONFIGURED: EventFacts(Scope.DESTINATION, "A destination rejected us "
                                                                   "permanently", reason=True),
    Event.DESTINATION_HELD: EventFacts(Scope.DESTINATION, "An admin held a destination"),
    Event.DESTINATION_RELEASED: EventFacts(Scope.DESTINATION, "An admin released a held "
                                                              "destination"),
    Event.DESTINATION_FLUSHED: EventFacts(Scope.DESTINATION, "A destination's queue was made due "
                                                             "now, its backoff cleared"),
    Event.DESTINATION_NOT_COMMITTING: EventFacts(Scope.DESTINATION, "No storage commitment "
                                                                    "report came within "
                                                                    "commit_timeout, asked "
                                                                    "twice"),
    Event.RECEIVING_REFUSED: EventFacts(Scope.RECEIVER, "The receiver began refusing C-STOREs "
                                                        "(low space, write errors)", reason=True),
    Event.RECEIVING_RESUMED: EventFacts(Scope.RECEIVER, "The receiver stores C-STOREs again"),
    Event.FAILOVER_STARTED: EventFacts(Scope.DESTINATION, "A destination down for "
                                                          "failover_after failed over to its "
                                                          "backup"),
    Event.FAILBACK: EventFacts(Scope.DESTINATION, "A failed-over destination, up for "
                                                  "failback_after, took its work back"),
    Event.QUEUE_DELAYED: EventFacts(Scope.DESTINATION, "A destination's oldest queued instance "
                                                       "waited longer than delay_warning"),
    Event.DISK_LOW: EventFacts(Scope.SPOOL, "Free spool space fell under twice min_free_mb"),
    Event.CERT_EXPIRING: EventFacts(Scope.PROCESS, "A TLS certificate the router presents "
                                                   "expires within 30 days"),
    Event.PROCESS_FLAPPING: EventFacts(Scope.PROCESS, "serve restarted a child more than 5 "
                                                      "times in 10 minutes"),
    Event.ALERT_SENT: EventFacts(Scope.ALERT, "Alerts a channel accepted (alerts/pending/ to "
                                              "alerts/sent/ once every channel did)"),
    Event.ALERT_FAILED: EventFacts(Scope.ALERT, "Alerts a channel did not accept within "
                                                "give_up_after (to alerts/failed/)"),
}


def markdown_tables() -> str:
    """The stage, destination-state and event tables of docs/internals.md, from the code."""
    out = ["| stage | folders | meaning |", "|---|---|---|"]
    for s in Stage:
        f = s.facts
        where = ", ".join(f"`{p}/`" for p in f.layout)
        rules = [r for r, on in (("counted as queued", f.queued),
                                 ("a copy here: the destination has it", f.has_copy),
                                 ("orphan sidecars swept", f.swept)) if on]
        if f.keep:
            rules.append(f"aged out after `{f.keep}`")
        extra = f" ({'; '.join(rules)})" if rules else ""
        out.append(f"| `{s}` | {where} | {f.meaning}{extra} |")
    out += ["", "| destination state | recorded by | meaning |", "|---|---|---|"]
    for d in DestinationStatus:
        who = "dispatcher (`state/<dest>.json`)" if d.recorded else "`status`"
        out.append(f"| `{d}` | {who} | {d.meaning} |")
    out += ["", "| event | about | meaning |", "|---|---|---|"]
    for e in Event:
        f2 = e.facts
        label = " (metric label `reason`)" if f2.reason else ""
        out.append(f"| `{e}` | {f2.scope} | {f2.meaning}{label} |")
    return "\n".join(out) + "\n"
