"""The alerts serve itself raises: gave_up, receiving_refused, process_flapping.

These are about instances and processes, not a state file, so they come from
the one place that sees them all: serve's hub (every child's events) and its
restart bookkeeping. The hub subscriber only counts in memory under a lock
(a child's log pump must never wait for a disk); a thread of serve writes the
outbox items once a second. A serve killed inside a window loses that window's
counts, never an instance: error/<dest>/ still holds each with its reason.

- gave_up (given up after give_up_after, or failed permanently: either way in
  error/<dest>/ now): per destination, the first ones after a quiet spell are told after
  ``GROUP_WAIT`` (a batch that gave up together is one alert), then at most one
  alert per ``WINDOW`` (15 min) with the counts by reason;
- receiving_refused: when the receiver begins refusing (0xA7xx), at most one per
  ``WINDOW``; receiving_resumed ends the episode;
- process_flapping: a child restarted more than ``FLAP_RESTARTS`` times in
  ``FLAP_PERIOD``, once per episode (it ends after a quiet ``FLAP_PERIOD``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hermes_py.alerts import payload as pl
from hermes_py.alerts.sender import new_item
from hermes_py.config import Settings
from hermes_py.events import Occurrence, emit
from hermes_py.lifecycle import Event
from hermes_py.process import start_thread
from hermes_py.spool import Spool, now_iso

LOG = logging.getLogger(__name__)

GROUP_WAIT = 5.0
WINDOW = 900.0
FLAP_RESTARTS = 5
FLAP_PERIOD = 600.0
MAX_REASONS = 10


@dataclass
class _Window:
    opened: float
    send_at: float
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class _Pending:
    event: str
    dest: str | None
    key: str
    summary: str
    at: float
    details: dict[str, object]


_OBSERVED = frozenset({Event.GAVE_UP, Event.FAILED, Event.RECEIVING_REFUSED,
                       Event.RECEIVING_RESUMED})
_ATTEMPTS = re.compile(r"\s*\(still failing after \d+ attempts\)")


def _reason(o: Occurrence, uids: bool) -> str:
    """The bucket a failed instance is counted in: its status and the reason, without the
    per-instance attempt count (one bucket per cause, not per instance)."""
    status = o.fields.get("status")
    text = _ATTEMPTS.sub("", str(o.fields.get("reason") or "unknown"))
    return pl.clean(f"{status} {text}" if status and str(status) not in text else text, 80,
                    uids)


class Aggregator:
    def __init__(self, cfg: Callable[[], Settings], spool: Callable[[], Spool],
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.spool = spool
        self.clock = clock
        self._lock = threading.Lock()
        self._gave_up: dict[str, _Window] = {}
        self._refusing = False
        self._refused_at = -WINDOW
        self._restarts: dict[str, deque[float]] = {}
        self._flapping: set[str] = set()
        self._todo: list[_Pending] = []

    # ------------------------------------------------------------ in memory, any thread

    def observe(self, o: Occurrence) -> None:
        """A subscriber of serve's hub: counts only, never touches the disk."""
        if o.event not in _OBSERVED:   # sent, routed ...: thousands a second, not ours
            return
        now = self.clock()
        uids = self.cfg().alerts.include_uids
        with self._lock:
            if o.event in (Event.GAVE_UP, Event.FAILED) and o.destination:
                w = self._gave_up.get(o.destination)
                if w is None:
                    w = self._gave_up[o.destination] = _Window(now, now + GROUP_WAIT)
                reason = _reason(o, uids)
                if reason not in w.counts and len(w.counts) >= MAX_REASONS:
                    reason = "other"
                w.counts[reason] += 1
            elif o.event is Event.RECEIVING_REFUSED:
                if not self._refusing and now - self._refused_at >= WINDOW:
                    self._refused_at = now
                    status = pl.clean(o.fields.get("status") or "", 12)
                    reason = pl.clean(o.fields.get("reason") or "", 120, uids)
                    self._todo.append(_Pending(
                        "receiving_refused", None, "receiver:-",
                        f"the receiver is REFUSING C-STOREs ({status} {reason}); senders keep "
                        "their copies and retry", now, {"status": status, "reason": reason}))
                self._refusing = True
            elif o.event is Event.RECEIVING_RESUMED:
                self._refusing = False

    def restarted(self, child: str, now: float | None = None) -> None:
        """serve is restarting ``child`` (its restart bookkeeping calls this)."""
        now = time.monotonic() if now is None else now
        flapping = 0
        with self._lock:
            times = self._restarts.setdefault(child, deque())
            times.append(now)
            while times and now - times[0] > FLAP_PERIOD:
                times.popleft()
            if len(times) > FLAP_RESTARTS and child not in self._flapping:
                self._flapping.add(child)
                flapping = len(times)
                self._todo.append(_Pending(
                    "process_flapping", None, f"process:{child}",
                    f"serve restarted {child} {flapping} times in "
                    f"{FLAP_PERIOD / 60:g} minutes", self.clock(),
                    {"process": child, "restarts": flapping}))
        if flapping:  # outside the lock: a log line may wait on a full pipe, the hub must not
            emit(LOG, Event.PROCESS_FLAPPING, level=logging.ERROR, process=child,
                 restarts=flapping)

    def _quiet(self, now: float) -> None:
        for child, times in self._restarts.items():
            if child in self._flapping and (not times or now - times[-1] > FLAP_PERIOD):
                self._flapping.discard(child)

    # ------------------------------------------------------------ to the outbox, one thread

    def due(self, now: float) -> list[_Pending]:
        out: list[_Pending] = []
        with self._lock:
            out, self._todo = self._todo, []
            self._quiet(time.monotonic())
            for dest, w in list(self._gave_up.items()):
                if now < w.send_at:
                    continue
                if not w.counts:
                    del self._gave_up[dest]
                    continue
                n = sum(w.counts.values())
                out.append(_Pending(
                    "gave_up", dest, f"gave_up:{dest}",
                    f"destination {dest}: {n} instance(s) moved to error/{dest}/ (gave up "
                    f"or failed permanently) since {now_iso(w.opened)}", w.opened,
                    {"count": n, "by_reason": dict(w.counts.most_common()),
                     "window_s": int(now - w.opened)}))
                w.counts = Counter()
                w.opened = now
                w.send_at = now + WINDOW
        return out

    def flush(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        written = 0
        cfg, spool = self.cfg(), self.spool()
        todo = self.due(now)
        if not cfg.alerts.enabled:
            return 0
        for p in todo:
            ident = pl.alert_id(p.key, p.event, now_iso(p.at))
            payload = pl.build(cfg, spool, p.event, p.dest, ident=ident, summary=p.summary,
                               details=dict(p.details), now=now,
                               record=spool.read_json(spool.state_file(p.dest))
                               if p.dest else None)
            try:
                if spool.alerts.put(dict(new_item(p.key, now_iso(p.at), payload, now)),
                                    p.event, p.dest, ident, now) is not None:
                    written += 1
                    LOG.info("alerts: %s%s written to the outbox (id %s)", p.event,
                             f" of {p.dest}" if p.dest else "", ident)
            except OSError as e:
                LOG.error("alerts: cannot write %s to the outbox: %s", p.event, e)
        return written

    def start(self, stop: threading.Event, every: float = 1.0) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.flush()
                except Exception:  # alerting must never take serve down
                    LOG.exception("alerts: writing serve's alerts failed")
        return start_thread(loop, "alerts-aggregate")
