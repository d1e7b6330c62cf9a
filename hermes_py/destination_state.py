"""A destination's reachability: ok, backing off, or misconfigured, shared by its dispatchers.

``state/<dest>.json`` (written here, read by ``status`` and the metrics) is the
one record of it; several dispatcher processes of one destination share the
file and whoever wrote it last is believed, so one process's backoff holds the
others back too and a success anywhere releases everyone. The edges between
states (down, misconfigured, recovered) are events (``lifecycle.Event``): the
log line says it to a person, the metrics count it, the alerts will send it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, TypedDict, cast

from hermes_py.config import DestinationSettings, RetryPolicy
from hermes_py.durations import fmt_duration
from hermes_py.events import emit
from hermes_py.lifecycle import DestinationStatus, Event
from hermes_py.outcomes import LinkFailure
from hermes_py.spool import Spool, now_iso, parse_iso

LOG = logging.getLogger(__name__)

POLL = 0.5               # how long a worker waits for its turn to probe
HEARTBEAT_EVERY = 30.0   # state file rewritten at least this often (updated_at)
SUCCESS_WRITE_EVERY = 5.0  # last_success in the state file lags at most this much


class LinkError(TypedDict, total=False):
    at: str
    kind: str
    detail: str


class DestinationRecord(TypedDict, total=False):
    """``state/<dest>.json``: docs/internals.md, "Destination state"."""

    destination: str
    state: str                  # a recorded DestinationStatus
    backoff_until: float | None  # epoch seconds
    consecutive_failures: int
    last_error: LinkError | None
    last_success: str | None
    down_since: str | None      # the first failure of the current outage
    up_since: str | None        # when it last recovered (failback counts from here)
    updated_at: str


def backoff_delay(failures: int, retry: RetryPolicy, rng: random.Random) -> float:
    """initial_delay * 2^(failures-1), at most max_delay, +-20 % jitter (never above max).

    The jitter spreads a backlog that came due at once (after an outage) and
    several dispatchers probing one destination.
    """
    base = min(retry.max_delay, retry.initial_delay * 2.0 ** min(max(failures - 1, 0), 60))
    return min(retry.max_delay, base * rng.uniform(0.8, 1.2))


class DestinationState:
    """Reachability of one destination, shared by the workers and written to state/NAME.json."""

    def __init__(self, spool: Spool, dest: DestinationSettings, rng: random.Random):
        self.spool = spool
        self.dest = dest
        self.path = spool.state_file(dest.name)
        self.rng = rng
        self.lock = threading.Lock()
        self.state = DestinationStatus.OK
        self.backoff_until: float | None = None
        self.failures = 0
        self.failed_at: float | None = None
        self.last_error: LinkError | None = None
        self.last_success: str | None = None
        self.down_since: float | None = None
        self.up_since: float | None = None
        self._probing = False
        self._written: str | None = None
        self._written_at = 0.0
        self.refresh(force=True)
        # A (re)started dispatcher probes at once instead of sitting out a backoff a
        # previous process chose: after an admin fixed an AE title and restarted, the
        # queue should move now, not in max_delay.
        self.backoff_until = None

    def record(self, now: float) -> DestinationRecord:
        return DestinationRecord(
            destination=self.dest.name, state=str(self.state),
            backoff_until=self.backoff_until if self.state != DestinationStatus.OK else None,
            consecutive_failures=self.failures, last_error=self.last_error,
            last_success=self.last_success,
            down_since=now_iso(self.down_since) if self.down_since is not None else None,
            up_since=now_iso(self.up_since) if self.up_since is not None else None,
            updated_at=now_iso(now))

    def _write(self, now: float) -> None:
        snap = self.record(now)
        try:
            self.spool.write_json(self.path, snap)
        except OSError as e:  # a full disk must not stop deliveries
            LOG.warning("destination %s: cannot write %s: %s", self.dest.name, self.path, e)
            return
        self._written = snap["updated_at"]
        self._written_at = now

    def refresh(self, force: bool = False) -> None:
        """Adopt the state file if another process wrote it after our last write.

        Read and compared under the lock, so a worker's write cannot slip in
        between and be overwritten by an older file's content.
        """
        with self.lock:
            data = self.spool.read_json(self.path)
            stamp = data.get("updated_at")
            if not data or not isinstance(stamp, str):
                return
            if not force and self._written is not None and stamp <= self._written:
                return  # ours, or older than ours (ISO-8601 UTC strings sort by time)
            try:
                st = DestinationStatus(str(data.get("state")))
            except ValueError:
                st = self.state
            if st.recorded:
                self.state = st
            bu = data.get("backoff_until")
            self.backoff_until = float(bu) if isinstance(bu, int | float) else None
            cf = data.get("consecutive_failures")
            self.failures = int(cf) if isinstance(cf, int) else 0
            le = data.get("last_error")
            self.last_error = cast(LinkError, le) if isinstance(le, dict) else None
            ls = data.get("last_success")
            self.last_success = ls if isinstance(ls, str) else None
            self.down_since = parse_iso(data.get("down_since"))
            self.up_since = parse_iso(data.get("up_since"))
            if self.state != DestinationStatus.OK:
                self.failed_at = parse_iso((self.last_error or {}).get("at")) or time.time()
            self._written = stamp

    def begin(self, now: float) -> tuple[float, bool]:
        """(seconds to wait, is_probe). One probe at a time while in backoff."""
        with self.lock:
            if self.backoff_until is not None and self.backoff_until > now:
                return self.backoff_until - now, False
            if self.state == DestinationStatus.OK:
                return 0.0, False
            if self._probing:
                return POLL, False
            self._probing = True
            return 0.0, True

    def end_probe(self) -> None:
        with self.lock:
            self._probing = False

    def failure(self, link: LinkFailure, now: float, queued: int) -> float:
        """Back the destination off; returns the delay. Loud on change, and always when
        misconfigured (someone must fix a config file)."""
        with self.lock:
            self._probing = False
            self.failures += 1
            if link.misconfigured:
                new = DestinationStatus.MISCONFIGURED
                delay = self.dest.retry.max_delay * self.rng.uniform(0.9, 1.0)
            else:
                new = DestinationStatus.BACKOFF
                delay = backoff_delay(self.failures, self.dest.retry, self.rng)
            if link.retry_after is not None:   # the destination said when (Retry-After)
                delay = max(delay, link.retry_after)
            changed = new != self.state
            if self.state == DestinationStatus.OK or self.down_since is None:
                self.down_since = now
            self.up_since = None
            self.state = new
            self.backoff_until = now + delay
            self.failed_at = now
            self.last_error = LinkError(at=now_iso(now), kind=str(link.kind), detail=link.detail)
            self._write(now)
            failures = self.failures
        name = self.dest.name
        facts: dict[str, Any] = {"kind": str(link.kind), "detail": link.detail,
                                 "queued": queued, "next_probe_in": fmt_duration(delay)}
        if link.misconfigured:
            text = (f"destination {name} is MISCONFIGURED: {link}. Keeping all {queued} queued "
                    f"instance(s); fix the AE titles/host/port in rules.toml or at the "
                    f"destination. Retrying in {fmt_duration(delay)}.")
            if changed:
                emit(LOG, Event.DESTINATION_MISCONFIGURED, dest=name, level=logging.ERROR,
                     message=text, **facts)
            else:  # loud on every attempt: someone must fix a config file
                LOG.error("%s", text)
        elif changed:
            emit(LOG, Event.DESTINATION_DOWN, dest=name, level=logging.WARNING,
                 message=f"destination {name} is UNAVAILABLE: {link}. Backing off (next probe "
                         f"in {fmt_duration(delay)}); {queued} instance(s) stay queued.",
                 **facts)
        else:
            LOG.info("destination %s still unavailable after %d attempt(s): %s; next probe "
                     "in %s", name, failures, link, fmt_duration(delay))
        return delay

    def success(self, now: float, started_at: float) -> None:
        """A destination answered. It only clears a backoff if the association that
        answered was opened after the failure (an older one proves nothing new)."""
        with self.lock:
            self._probing = False
            first = self.last_success is None
            self.last_success = now_iso(now)
            recovered = self.state != DestinationStatus.OK and (self.failed_at is None
                                                    or started_at >= self.failed_at)
            if recovered:
                old, failures = self.state, self.failures
                self.state = DestinationStatus.OK
                self.failures = 0
                self.backoff_until = None
                self.failed_at = None
                self.down_since = None
                self.up_since = now
            if recovered or first or now - self._written_at >= SUCCESS_WRITE_EVERY:
                self._write(now)
        if recovered:
            emit(LOG, Event.DESTINATION_RECOVERED, dest=self.dest.name, level=logging.WARNING,
                 message=f"destination {self.dest.name} is AVAILABLE again (was {old}, "
                         f"{failures} failed attempt(s)); draining the queue",
                 was=str(old), failures=failures)

    def flush(self, now: float) -> None:
        with self.lock:
            self.backoff_until = None
            self._probing = False
            self._write(now)

    def heartbeat(self, now: float) -> None:
        with self.lock:
            if now - self._written_at >= HEARTBEAT_EVERY:
                self._write(now)
