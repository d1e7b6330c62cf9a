"""Prometheus text metrics, served by ``serve`` when ``[metrics] port`` is set.

Two sources, neither of which asks anything new of the stages:

- Gauges (queue depth, due, oldest age, error/ counts, destination state, free
  space) are read from the spool at scrape time with the same cheap listings
  as ``status`` (cached for a couple of seconds so a busy scraper cannot turn
  into a scanner).
- Counters (instances received, routed, sent, failed... per destination and
  reason, and bytes; destination and receiver edges) come from the events the
  stages emit (``lifecycle.Event``): the supervisor reads its children's log
  records, turns each back into an ``events.Occurrence`` and sends it to its own
  hub, where :meth:`Counters.observe` is a subscriber. So the counters cover
  exactly what ran under this ``serve``, and reset when it restarts, which
  Prometheus handles like any process restart.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hermes_py.config import Settings
from hermes_py.events import Occurrence
from hermes_py.lifecycle import DestinationStatus, Event
from hermes_py.process import start_thread
from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SNAPSHOT_TTL = 2.0

# The label of a ``reason`` event (lifecycle.EventFacts) is bounded (a class, a status
# code, a link kind), never free text, so a label set cannot explode.
_REASON_KEYS = ("class", "outcome", "status", "kind", "reason_code")
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:-]")


def _label(value: object, limit: int = 48) -> str:
    return _LABEL_RE.sub("_", str(value))[:limit] or "unknown"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class Counters:
    """Monotonic counters keyed by (metric, labels); safe from many reader threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, metric: str, labels: Mapping[str, str] | None = None, n: float = 1) -> None:
        key = (metric, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + n

    def observe(self, occurrence: Occurrence) -> None:
        """Count one event (a subscriber of the supervisor's hub)."""
        event = occurrence.event
        record = occurrence.record()
        labels: dict[str, str] = {}
        dest = record.get("destination")
        if dest:
            labels["destination"] = _label(dest)
        if event is Event.RECEIVED:
            # the receiver's events carry no source; the drop intake's say "drop"
            labels["source"] = _label(record.get("source") or "network")
        if event.facts.reason:
            for k in _REASON_KEYS:
                if record.get(k) not in (None, ""):
                    labels["reason"] = _label(record[k], 32)
                    break
            else:
                # free text: keep its head ("too many associations (max 10)" -> the
                # words before any detail) so the label set stays small
                text = re.split(r"[:(\[0-9]", str(record.get("reason") or ""), maxsplit=1)[0]
                labels["reason"] = _label(text.strip().replace(" ", "_"), 32) if text.strip() \
                    else "unspecified"
        dests = record.get("destinations")
        if not dest and isinstance(dests, list | tuple) and dests:
            # one routing event naming several destinations: one copy each
            for d in dests:
                self.inc(f"hermes_{event}_total", {**labels, "destination": _label(d)})
        else:
            self.inc(f"hermes_{event}_total", labels)
        size = record.get("size", record.get("bytes"))
        if isinstance(size, int | float) and not isinstance(size, bool) and size >= 0:
            self.inc(f"hermes_{event}_bytes_total", labels, size)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        out: list[str] = []
        seen: set[str] = set()
        for (metric, labels), v in items:
            if metric not in seen:
                seen.add(metric)
                base = metric.removeprefix("hermes_").removesuffix("_total")
                bytes_ = base.endswith("_bytes")
                what = Event(base.removesuffix("_bytes")).facts.meaning
                out.append(f"# HELP {metric} {what}{' (bytes)' if bytes_ else ''}")
                out.append(f"# TYPE {metric} counter")
            out.append(f"{metric}{_fmt_labels(dict(labels))} {v:g}")
        return out


def spool_gauges(cfg: Settings, spool: Spool) -> list[str]:
    """Queue gauges from the spool, with the listings ``status`` uses (no success/ scan)."""
    from hermes_py.admin.status import snapshot

    snap = snapshot(cfg, spool, success=False)
    out: list[str] = []

    def gauge(metric: str, help_: str, rows: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {metric} {help_}")
        out.append(f"# TYPE {metric} gauge")
        out.extend(f"{metric}{_fmt_labels(lab)} {v:g}" for lab, v in rows)

    dests: dict[str, Any] = dict(snap["destinations"])
    folders: dict[str, Any] = dict(snap["folders"])
    gauge("hermes_queue_depth", "Instances queued for a destination (outbox + urgent + active)",
          [({"destination": n}, d["queued"]) for n, d in dests.items()])
    gauge("hermes_queue_due", "Queued instances whose next attempt time has come",
          [({"destination": n}, d["due"]) for n, d in dests.items()])
    gauge("hermes_queue_active", "Instances claimed by a dispatcher worker right now",
          [({"destination": n}, d["active"]) for n, d in dests.items()])
    gauge("hermes_queue_oldest_age_seconds", "Age (since receipt) of the oldest queued instance",
          [({"destination": n}, float(d.get("oldest_age") or 0)) for n, d in dests.items()])
    gauge("hermes_error_instances", "Instances in error/<destination>/ (gave up or permanent)",
          [({"destination": n}, d["error"]) for n, d in dests.items()])
    gauge("hermes_destination_state", "1 for the destination's current state",
          [({"destination": n, "state": s}, 1.0 if d.get("state") == s else 0.0)
           for n, d in dests.items() for s in DestinationStatus])
    gauge("hermes_destination_failed_over", "1 while the destination is failed over to its "
          "backup (label to)",
          [({"destination": n, "to": str((d.get("failover") or {}).get("to", ""))},
            1.0 if d.get("failover") else 0.0) for n, d in dests.items()])
    gauge("hermes_diverted_instances", "Instances the current failover diverted to the "
          "backup (0 when not failed over)",
          [({"destination": n}, float((d.get("failover") or {}).get("diverted", 0)))
           for n, d in dests.items()])
    committing = [(n, d["commitment"]) for n, d in dests.items() if d.get("commitment")]
    gauge("hermes_commitment_awaiting", "Instances delivered and waiting for the destination's "
          "storage commitment report",
          [({"destination": n}, float(c.get("awaiting") or 0)) for n, c in committing])
    gauge("hermes_commitment_oldest_wait_seconds", "How long the oldest instance awaiting "
          "storage commitment has waited",
          [({"destination": n}, float(c.get("oldest_wait") or 0)) for n, c in committing])
    gauge("hermes_destination_not_committing", "1 while a destination sends no storage "
          "commitment report (asked twice)",
          [({"destination": n}, 1.0 if c.get("not_committing_since") else 0.0)
           for n, c in committing])
    gauge("hermes_folder_instances", "Instances in the shared folders",
          [({"folder": k}, float(v)) for k, v in folders.items() if k != "drop_capped"])
    gauge("hermes_spool_free_bytes", "Free space on the spool filesystem",
          [({}, snap["free_mb"] * 1024 * 1024)])
    return out


class MetricsServer:
    """``GET /metrics`` on a stdlib HTTP server in a daemon thread of the supervisor."""

    def __init__(self, cfg: Settings, counters: Counters,
                 extra: Callable[[], list[str]] | None = None):
        self.cfg = cfg
        self.counters = counters
        self.extra = extra
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cache: tuple[float, list[str]] = (0.0, [])
        self._cache_lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def render(self) -> str:
        with self._cache_lock:
            t, gauges = self._cache
            if time.monotonic() - t > SNAPSHOT_TTL:
                try:
                    gauges = spool_gauges(self.cfg, Spool(self.cfg.spool.path))
                except OSError as e:
                    LOG.warning("metrics: cannot read the spool: %s", e)
                    gauges = []
                self._cache = (time.monotonic(), gauges)
        lines = [*gauges, *self.counters.render(), *(self.extra() if self.extra else [])]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] in ("/metrics", "/metrics/"):
                    body = owner.render().encode()
                    ctype = CONTENT_TYPE
                    code = 200
                elif self.path == "/":
                    body = b"hermes-py: metrics at /metrics\n"
                    ctype = "text/plain"
                    code = 200
                else:
                    body = b"not found\n"
                    ctype = "text/plain"
                    code = 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                LOG.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((self.cfg.metrics_bind, self.cfg.metrics_port or 0),
                                           Handler)
        self._server.daemon_threads = True
        self._thread = start_thread(self._server.serve_forever, "metrics")
        LOG.info("metrics: serving Prometheus text on http://%s:%d/metrics",
                 self.cfg.metrics_bind, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
