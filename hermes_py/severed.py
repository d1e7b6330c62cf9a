"""What a send that ended its association (``Result.severed``) means for the instance.

The association dying with one instance on the wire may be that instance's doing (a
data set the peer chokes on) or the destination's. The instance is blamed, sent alone
from then on, and after SEVERED_LIMIT such sends it is a permanent failure, but only
with proof the destination takes other instances; without that proof it stays
transient and give_up_after bounds it.
"""

from __future__ import annotations

from hermes_py.outcomes import Outcome, Result
from hermes_py.spool import parse_iso
from hermes_py.spool import sidecar as sc

# Sends that ended their association after which an instance is a permanent failure,
# once the destination has been seen accepting other instances.
SEVERED_LIMIT = 3


def severed_attempts(data: sc.Sidecar) -> int:
    return sum(1 for h in data.get("history") or [] if h.get("scope") == sc.Scope.SEVERED)


def judge_severed(data: sc.Sidecar, result: Result, others_answered: bool,
                  last_success: float | None) -> tuple[Outcome, str]:
    """The proof is answered instances before it in this batch, or a delivery recorded
    (``last_success``) after this instance's first severed send."""
    n = severed_attempts(data) + 1
    if n < SEVERED_LIMIT:
        return Outcome.TRANSIENT, f"{result.reason} ({n} of {SEVERED_LIMIT})"
    first = next((parse_iso(h.get("at")) for h in data.get("history") or []
                  if h.get("scope") == sc.Scope.SEVERED), None)
    if others_answered or (first is not None and last_success is not None
                           and last_success > first):
        return Outcome.PERMANENT, (
            f"{result.reason}, {n} times for this instance while the destination "
            f"accepted others: it cannot take this instance")
    return Outcome.TRANSIENT, (f"{result.reason} ({n} times; no other instance delivered "
                               "since, so the destination may be at fault)")
