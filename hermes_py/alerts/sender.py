"""Sending what is in ``alerts/pending/``: each channel until it accepts, in order, durably.

The outbox is the truth, not this process: every attempt's outcome is written
into the item (atomically) before the next one, so a kill -9 costs at most one
repeat of an attempt whose answer was not recorded, and the receivers
deduplicate that by the payload id. After a restart whatever is still pending
is sent again; nothing is kept in memory.

Per channel:

- backoff ``retry_min`` doubling up to ``retry_max`` after each failed attempt
  (a dead chat service is asked once an hour, not once a tick);
- items of one key (a family and a destination: "destination:pacs") go out in
  the order they were written: a ``destination_recovered`` never overtakes its
  ``destination_down`` on a channel that has not taken the down yet;
- a channel that failed rests ``retry_min`` before any item is tried on it again
  (a dead webhook with a 10 s timeout and fifty items must not hold the sender
  for minutes, nor be asked fifty times a minute);
- after ``give_up_after`` an item a channel never took goes to
  ``alerts/failed/`` with an ERROR line; the channels that took it are recorded.

No storm after an outage of the alerting path: a down that no channel has taken
yet, followed by its recovery, becomes one "flapped" message (the recovery,
saying how long it was down) instead of two stale ones.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, TypedDict

from hermes_py.alerts.channels import Channel
from hermes_py.alerts.payload import AlertPayload
from hermes_py.config_alerts import AlertSettings
from hermes_py.durations import fmt_duration, human_age
from hermes_py.events import emit
from hermes_py.lifecycle import Event
from hermes_py.spool import Spool, now_iso
from hermes_py.spool.alerts import AlertOutbox

LOG = logging.getLogger(__name__)

OPENING = ("destination_down", "destination_misconfigured")
IDLE_MAX = 60.0   # a pass at least this often, whatever the outbox looks like


class Delivery(TypedDict, total=False):
    attempts: int
    next_at: float
    sent_at: str | None
    answer: str | None


class OutboxItem(TypedDict, total=False):
    """``alerts/pending/<stamp>_<event>_<dest>_<id>.json``: docs/internals.md, "Alerts"."""

    key: str                    # family:destination ("destination:pacs", "disk:-")
    episode: str | None         # the start of the condition it is about
    created: float              # epoch seconds (give_up_after counts from here)
    payload: AlertPayload
    deliveries: dict[str, Delivery]


def new_item(key: str, episode: str | None, payload: AlertPayload,
             created: float) -> OutboxItem:
    return OutboxItem(key=key, episode=episode, created=created, payload=payload,
                      deliveries={})


def backoff(attempts: int, a: AlertSettings) -> float:
    return float(min(a.retry_max, a.retry_min * 2.0 ** min(max(attempts - 1, 0), 30)))


def _dest(item: OutboxItem) -> str | None:
    d = item.get("payload", {}).get("destination") or {}
    name = d.get("name") if isinstance(d, dict) else None
    return str(name) if name else None


class Sender:
    def __init__(self, settings: AlertSettings, spool: Spool, channels: list[Channel]):
        self.settings = settings
        self.outbox: AlertOutbox = spool.alerts
        self.channels = channels
        # A channel that failed rests retry_min before any item is tried on it again
        # (in memory: a restart tries at once, which is what an admin restarting wants).
        self._resting: dict[str, float] = {}
        self._version: tuple[str, ...] | None = None   # pending/'s names after the last pass
        self._wake = 0.0                    # nothing pending can be due before this

    def wanted(self, item: OutboxItem) -> list[Channel]:
        event = str(item.get("payload", {}).get("event", ""))
        return [c for c in self.channels if c.settings.wants(event, _dest(item))]

    # ------------------------------------------------------------ merging

    def merge(self, items: list[tuple[Path, OutboxItem]]) -> list[tuple[Path, OutboxItem]]:
        """Fold each unsent down (and its unsent reminders) into the recovery that follows."""
        out = list(items)
        for i, (path, item) in enumerate(items):
            p = item.get("payload", {})
            if p.get("event") != "destination_recovered":
                continue
            downs = [(dp, d) for dp, d in items[:i]
                     if d.get("key") == item.get("key")
                     and d.get("episode") == item.get("episode")
                     and d.get("payload", {}).get("event") in OPENING
                     and not any(x.get("sent_at") for x in d.get("deliveries", {}).values())
                     and (dp, d) in out]
            if not downs:
                continue
            first = downs[0][1].get("payload", {})
            merged: AlertPayload = AlertPayload(**p)
            details = dict(merged.get("details") or {})
            details["flapped"] = True
            details["merged_ids"] = [d.get("payload", {}).get("id") for _, d in downs]
            merged["details"] = details
            st = merged.get("state") or {}
            took = st.get("duration_s")
            merged["summary"] = (f"flapped: {first.get('event')} "
                                 f"{(first.get('destination') or {}).get('name', '')} "
                                 f"for {human_age(float(took)) if took is not None else '?'}"
                                 f", recovered (the {first.get('event')} alert was never "
                                 "delivered)")
            new = OutboxItem(**item)
            new["payload"] = merged
            # the merged message first, then the stale ones go: a crash between leaves both,
            # and the next pass merges again
            self.outbox.update(path, dict(new))
            for dp, _ in downs:
                self.outbox.drop(dp)
            LOG.info("alerts: merged %d unsent %s alert(s) of %s into its recovery (flapped)",
                     len(downs), first.get("event"), _dest(item))
            out = [(q, new if q == path else x) for q, x in out
                   if q not in {dp for dp, _ in downs}]
        return out

    # ------------------------------------------------------------ sending

    def tick(self, now: float, stop: threading.Event | None = None) -> int:
        """One pass over pending/: every due attempt made; returns how many were made.

        Skipped while nothing can be due: the same names in pending/ as after the last
        pass (only this sender rewrites an item; the others only add) and no attempt,
        rest or give-up time reached (and at most IDLE_MAX). A channel down for a day
        with a hundred alerts waiting then costs a listing a tick, not a hundred reads.
        """
        if self.outbox.version() == self._version and now < self._wake:
            return 0
        raw: list[tuple[Path, OutboxItem]] = []
        for p, d in self.outbox.items():
            if isinstance(d.get("payload"), dict) and isinstance(d.get("deliveries", {}), dict):
                raw.append((p, OutboxItem(**d)))  # type: ignore[typeddict-item]
            else:   # one damaged item (edited by hand?) must not stop the others behind it
                LOG.error("alerts: cannot send %s: not an alert (no payload or deliveries)",
                          p.name)
        items = self.merge(raw)
        blocked: set[tuple[str, str]] = set()
        dead: set[str] = set()
        made = 0
        self._wake = now + IDLE_MAX
        for path, item in items:
            if stop is not None and stop.is_set():
                self._wake = 0.0
                break
            try:
                made += self._one(path, item, now, blocked, dead)
            except (OSError, TypeError, ValueError, AttributeError) as e:
                # one damaged item (edited by hand?) must not stop the others behind it
                LOG.error("alerts: cannot send %s: %s: %s", path.name, type(e).__name__, e)
        self._version = self.outbox.version()
        return made

    def _one(self, path: Path, item: OutboxItem, now: float,
             blocked: set[tuple[str, str]], dead: set[str]) -> int:
        payload = item.get("payload", AlertPayload())
        key = str(item.get("key", ""))
        deliveries = item.setdefault("deliveries", {})
        wanted = self.wanted(item)
        made = 0
        changed = False
        for ch in wanted:
            name = ch.settings.name
            d = deliveries.setdefault(name, Delivery(attempts=0, next_at=0.0, sent_at=None,
                                                     answer=None))
            if d.get("sent_at"):
                continue
            if (name, key) in blocked or now < float(d.get("next_at") or 0.0):
                blocked.add((name, key))   # later items of this key wait behind this one
                continue
            if name in dead or now < self._resting.get(name, 0.0):
                continue   # it just failed (or timed out) on another item: not yet
            answer = ch.send(payload)
            made += 1
            changed = True
            d["attempts"] = int(d.get("attempts") or 0) + 1
            d["answer"] = answer.text
            if answer.ok:
                self._resting.pop(name, None)
                d["sent_at"] = now_iso(now)
                emit(LOG, Event.ALERT_SENT, dest=_dest(item), channel=name,
                     alert=payload.get("event"), id=payload.get("id"), answer=answer.text,
                     attempts=d["attempts"])
            else:
                delay = backoff(d["attempts"], self.settings)
                d["next_at"] = now + delay
                blocked.add((name, key))
                dead.add(name)
                self._resting[name] = now + self.settings.retry_min
                LOG.warning("alerts: channel %s did not take %s %s (attempt %d): %s; trying "
                            "again in %s", name, payload.get("event"), payload.get("id"),
                            d["attempts"], answer.text, fmt_duration(delay))
        pending = [c.settings.name for c in wanted
                   if not deliveries.get(c.settings.name, {}).get("sent_at")]
        if pending:   # when this item can next be due: its attempt, the rest's end, giving up
            self._wake = min(self._wake, float(item.get("created") or now)
                             + self.settings.give_up_after)
            for n in pending:
                due = max(float(deliveries.get(n, {}).get("next_at") or 0.0),
                          self._resting.get(n, 0.0))
                if due > now or (n, key) not in blocked:   # blocked: its blocker's time
                    self._wake = min(self._wake, due)
        if not pending:
            self.outbox.finish(path, dict(item))
        elif now - float(item.get("created") or now) >= self.settings.give_up_after:
            where = self.outbox.set_aside(path, dict(item))
            emit(LOG, Event.ALERT_FAILED, dest=_dest(item), level=logging.ERROR,
                 alert=payload.get("event"), id=payload.get("id"), channels=",".join(pending),
                 message=f"alert {payload.get('event')} {payload.get('id')} was not accepted "
                         f"by {', '.join(pending)} within "
                         f"{fmt_duration(self.settings.give_up_after)}: moved to {where}")
        elif changed:
            self.outbox.update(path, dict(item))
        return made

    def send_now(self, item: OutboxItem) -> list[tuple[str, Any]]:
        """Every channel once, now (``alerts test``): (channel name, Answer)."""
        return [(c.settings.name, c.send(item["payload"])) for c in self.channels]
