"""Which conditions are true now, and which alerts that makes: level in, edges out.

Why level-triggered over the state files, not edge-triggered on the
dispatchers' events: an event missed (the alert child restarting, serve killed
between a dispatcher's log line and its reading) would be an alert never sent or
a recovery never told. ``state/<dest>.json`` and ``state/<dest>.failover.json``
say what is true; comparing them with the open alerts of ``state/alerts.json``
on every tick turns "what is true" into exactly one alert per change, however
often this process restarts, however many probes an outage takes.

Per destination (key ``<family>:<dest>``):

- ``destination``: not ok without a break for ``alert_after`` (judged from
  ``down_since``) opens ``destination_down``; misconfigured opens
  ``destination_misconfigured`` at once; ok again closes it with
  ``destination_recovered`` (only ever after a down or misconfigured was written);
- ``failover``: the failover file appearing is ``failover_started``, its going
  ``failback``;
- ``queue``: the oldest queued instance older than ``delay_warning`` is
  ``queue_delayed``, once per episode (looked at every ``QUEUE_EVERY``: it costs
  a listing of the queue);

- ``commitment``: ``state/<dest>.commitment.json`` naming ``not_committing_since``
  (asked twice, no report within ``commit_timeout``) is
  ``destination_not_committing``, cleared when a report comes;

``cert:<whose>``: a certificate we present (``[receiver.tls]``, a destination's
client certificate) expiring within ``CERT_WARN`` is ``cert_expiring``, cleared
when the file is renewed (looked at every ``CERT_EVERY``);

and for the spool, ``disk:-``: free space under twice ``min_free_mb`` is
``disk_low``, cleared at three times. Down, misconfigured and disk_low repeat
every ``repeat_every`` while they last.

Order of writes: the alert into the outbox first, then ``state/alerts.json``. A
crash between the two makes the next tick write the same alert again, with the
same derived id, which the outbox ignores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypedDict, cast

from hermes_py import commitment, failover, tls
from hermes_py.alerts import payload as pl
from hermes_py.alerts.sender import new_item
from hermes_py.config import Settings
from hermes_py.durations import human_age
from hermes_py.events import emit
from hermes_py.lifecycle import DestinationStatus, Event
from hermes_py.spool import Spool, now_iso, parse_iso

LOG = logging.getLogger(__name__)

QUEUE_EVERY = 30.0
DISK_EVERY = 5.0
CERT_EVERY = 3600.0
CERT_WARN = 30 * 86400.0
REMINDED = ("destination_down", "destination_misconfigured", "disk_low",
            "destination_not_committing", "cert_expiring")
_STATE_OF = {"destination_down": "backoff", "destination_misconfigured": "misconfigured",
             "disk_low": "low"}


class OpenAlert(TypedDict, total=False):
    event: str                  # the alert that opened it (or the last that changed it)
    destination: str | None
    since: str | None           # when the condition began (the episode)
    opened_at: str              # when the alert was written
    last_sent_at: str           # the alert or its latest reminder
    reminders: int
    id: str


class AlertsState(TypedDict, total=False):
    """``state/alerts.json``: docs/internals.md, "Alerts"."""

    open: dict[str, OpenAlert]
    updated_at: str


class Watcher:
    def __init__(self, cfg: Settings, spool: Spool, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.spool = spool
        self.outbox = spool.alerts
        self.clock = clock
        data = cast(AlertsState, spool.read_json(self.outbox.state_file))
        self.open: dict[str, OpenAlert] = dict(data.get("open") or {})
        self._first_seen_down: dict[str, float] = {}
        self._queue_at = 0.0
        self._disk_at = 0.0
        self._cert_at: float | None = None

    # ------------------------------------------------------------ bookkeeping

    def save(self, now: float) -> None:
        self.spool.write_json(self.outbox.state_file,
                              AlertsState(open=self.open, updated_at=now_iso(now)))

    def _write(self, key: str, event: str, dest: str | None, since: str | None, ident: str,
               summary: str, now: float, state: dict[str, Any] | None = None,
               record: dict[str, Any] | None = None,
               details: dict[str, Any] | None = None) -> None:
        p = pl.build(self.cfg, self.spool, event, dest, ident=ident, summary=summary,
                     state=state, record=record, details=details, now=now)
        if self.outbox.put(dict(new_item(key, since, p, now)), event, dest, ident,
                           now) is not None:
            LOG.info("alerts: %s%s written to the outbox (id %s)", event,
                     f" of {dest}" if dest else "", ident)

    def _open(self, key: str, event: str, dest: str | None, since: str | None, now: float,
              summary: str, **kw: Any) -> None:
        ident = pl.alert_id(key, event, since)
        self._write(key, event, dest, since, ident, summary, now, **kw)
        self.open[key] = OpenAlert(event=event, destination=dest, since=since,
                                   opened_at=now_iso(now), last_sent_at=now_iso(now),
                                   reminders=0, id=ident)

    def _close(self, key: str, event: str | None, now: float, summary: str,
               **kw: Any) -> None:
        rec = self.open.pop(key)
        if event is not None:
            since = rec.get("since")
            self._write(key, event, rec.get("destination"), since,
                        pl.alert_id(key, event, since), summary, now, **kw)

    # ------------------------------------------------------------ conditions

    def _destination(self, name: str, now: float) -> bool:
        key = f"destination:{name}"
        rec = self.spool.read_json(self.spool.state_file(name))
        st = rec.get("state")
        cur = self.open.get(key)
        err = rec.get("last_error") if isinstance(rec.get("last_error"), dict) else {}
        since = rec.get("down_since") or (err or {}).get("at")
        if st == DestinationStatus.OK:
            self._first_seen_down.pop(name, None)
            if cur is None:
                return False
            began = cur.get("since")
            was = "misconfigured" if cur.get("event") == "destination_misconfigured" \
                else "backoff"
            t = parse_iso(began)
            took = f" after {human_age(now - t)} {'down' if was == 'backoff' else was}" \
                if t is not None else ""
            self._close(key, "destination_recovered", now, f"destination {name} recovered"
                        f"{took}", state=pl.state_change(was, "ok", began, now), record=rec)
            return True
        if st not in (DestinationStatus.BACKOFF, DestinationStatus.MISCONFIGURED):
            return False
        if not isinstance(since, str):
            since = now_iso(self._first_seen_down.setdefault(name, now))
        detail = pl.clean((err or {}).get("kind") or "unreachable", 80)
        if st == DestinationStatus.MISCONFIGURED:
            if cur is not None and cur.get("event") == "destination_misconfigured":
                return False
            self._open(key, "destination_misconfigured", name, since, now,
                       f"destination {name} is MISCONFIGURED: it rejects us permanently "
                       f"({detail}); its queue is kept",
                       state=pl.state_change("ok" if cur is None else "backoff",
                                             "misconfigured", since, now), record=rec)
            return True
        if cur is not None:
            return False
        t = parse_iso(since)
        if t is None or now - t < self.cfg.alerts.alert_after:
            return False
        self._open(key, "destination_down", name, since, now,
                   f"destination {name} is DOWN for {human_age(now - t)}: {detail}; "
                   "instances are kept and retried",
                   state=pl.state_change("ok", "backoff", since, now), record=rec)
        return True

    def _failover(self, name: str, now: float) -> bool:
        key = f"failover:{name}"
        fo = failover.read(self.spool, name)
        cur = self.open.get(key)
        if fo is not None and cur is None:
            since = fo.get("since")
            self._open(key, "failover_started", name, since, now,
                       f"destination {name} FAILED OVER to {fo.get('to')} "
                       f"({fo.get('mode')}): {pl.clean(fo.get('reason', ''), 120)}",
                       state=pl.state_change("ok", "failed over", since, now))
            return True
        if fo is None and cur is not None:
            self._close(key, "failback", now, f"destination {name} took its work back from "
                        "its backup (failback)",
                        state=pl.state_change("failed over", "ok", cur.get("since"), now))
            return True
        return False

    def _queue(self, name: str, now: float) -> bool:
        key = f"queue:{name}"
        age = pl.oldest_age(self.spool, name, now)
        limit = self.cfg.alerts.delay_warning
        late = age is not None and age > limit
        cur = self.open.get(key)
        if late and cur is None and age is not None:
            since = now_iso(round(now - age + limit))
            self._open(key, "queue_delayed", name, since, now,
                       f"destination {name}: the oldest queued instance waits for "
                       f"{human_age(age)} (delay_warning {human_age(limit)})",
                       state=pl.state_change("ok", "delayed", since, now))
            emit(LOG, Event.QUEUE_DELAYED, dest=name, level=logging.WARNING,
                 oldest_age_s=int(age))
            return True
        if not late and cur is not None:
            self._close(key, None, now, "")
            return True
        return False

    def _disk(self, now: float) -> bool:
        key = "disk:-"
        least = self.cfg.spool.min_free_mb
        if least <= 0:
            return False
        free = self.spool.free_mb()
        cur = self.open.get(key)
        if cur is None and free < 2 * least:
            since = now_iso(now)
            self._open(key, "disk_low", None, since, now,
                       f"spool free space is {free:.0f} MB, under twice min_free_mb "
                       f"({least} MB); at {least} MB the receiver refuses C-STOREs",
                       state=pl.state_change("ok", "low", since, now),
                       details={"free_mb": round(free, 1), "min_free_mb": least})
            emit(LOG, Event.DISK_LOW, level=logging.WARNING, free_mb=round(free, 1),
                 min_free_mb=least)
            return True
        if cur is not None and free >= 3 * least:
            self._close(key, None, now, "")
            return True
        return False

    def _commitment(self, name: str, now: float) -> bool:
        key = f"commitment:{name}"
        since = commitment.read_state(self.spool, name).get("not_committing_since")
        cur = self.open.get(key)
        if isinstance(since, str) and cur is None:
            self._open(key, "destination_not_committing", name, since, now,
                       f"destination {name} sends no storage commitment reports (asked twice "
                       "within commit_timeout); its instances wait in committing/, none resent",
                       state=pl.state_change("committing", "not committing", since, now))
            return True
        if not isinstance(since, str) and cur is not None:
            self._close(key, None, now, "")
            return True
        return False

    def _certificates(self, now: float) -> bool:
        """``cert_expiring`` per certificate we present; a renewed file clears it."""
        certs: dict[str, tuple[str | None, str]] = {}
        if self.cfg.receiver.tls is not None:
            certs["receiver"] = (None, self.cfg.receiver.tls.cert_file)
        for name, d in self.cfg.destinations.items():
            t = getattr(d, "tls", None)
            if isinstance(t, tls.DestinationTLS) and t.cert_file:
                certs[name] = (name, t.cert_file)
        changed = False
        for whose, (dest, path) in certs.items():
            key = f"cert:{whose}"
            expires = tls.not_after(path)
            cur = self.open.get(key)
            soon = expires is not None and expires - now < CERT_WARN
            if soon and cur is None and expires is not None:
                since = now_iso(expires)
                left = "EXPIRED" if expires <= now else f"expires in {human_age(expires - now)}"
                self._open(key, "cert_expiring", dest, since, now,
                           f"the TLS certificate of {'the receiver' if dest is None else dest} "
                           f"{left} ({now_iso(expires)}): renew it, then reload",
                           state=pl.state_change("valid", "expiring", now_iso(now), now),
                           details={"expires_at": now_iso(expires), "certificate": whose})
                emit(LOG, Event.CERT_EXPIRING, dest=dest, level=logging.WARNING,
                     expires_at=now_iso(expires))
                changed = True
            elif not soon and cur is not None:
                self._close(key, None, now, "")
                changed = True
        for key in [k for k in self.open if k.startswith("cert:") and k[5:] not in certs]:
            del self.open[key]   # no longer configured
            changed = True
        return changed

    def _remind(self, now: float) -> bool:
        every = self.cfg.alerts.repeat_every
        changed = False
        for key, cur in list(self.open.items()):
            event = str(cur.get("event"))
            last = parse_iso(cur.get("last_sent_at"))
            if every <= 0 or event not in REMINDED or last is None or now - last < every:
                continue
            n = int(cur.get("reminders") or 0) + 1
            since = cur.get("since")
            dest = cur.get("destination")
            t = parse_iso(since)
            lasting = f" for {human_age(now - t)}" if t is not None else ""
            record = self.spool.read_json(self.spool.state_file(dest)) if dest else None
            self._write(key, event, dest, since, pl.alert_id(key, event, since, "reminder", n),
                        f"reminder {n}: {event}{' of ' + dest if dest else ''} still "
                        f"true{lasting}", now, record=record,
                        state=pl.state_change("ok", _STATE_OF.get(event, event), since, now),
                        details={"reminder": n})
            cur["reminders"] = n
            cur["last_sent_at"] = now_iso(now)
            changed = True
        return changed

    def tick(self, now: float | None = None) -> bool:
        """One look at every condition; True when state/alerts.json changed."""
        now = self.clock() if now is None else now
        changed = False
        for name in self.cfg.destinations:
            changed |= self._destination(name, now)
            changed |= self._failover(name, now)
            changed |= self._commitment(name, now)
        if now - self._queue_at >= min(QUEUE_EVERY, max(1.0, self.cfg.alerts.delay_warning / 4)):
            self._queue_at = now
            for name in self.cfg.destinations:
                changed |= self._queue(name, now)
        if now - self._disk_at >= DISK_EVERY:
            self._disk_at = now
            changed |= self._disk(now)
        if self._cert_at is None or now - self._cert_at >= CERT_EVERY:
            self._cert_at = now
            changed |= self._certificates(now)
        changed |= self._remind(now)
        for key in [k for k, v in self.open.items()
                    if v.get("destination") and v.get("destination") not in self.cfg.destinations]:
            del self.open[key]   # no longer configured: nothing left to recover
            changed = True
        if changed:
            self.save(now)
        return changed
