"""Events as typed facts, and the one hook every consumer subscribes to.

In the spirit of pynetdicom's ``evt`` handlers and huey's signals: a stage says
what happened once, ``emit(LOG, Event.SENT, sop, dest, status=...)``, and
whoever cares subscribes to a :class:`Hub`. In every process the log line is the
first subscriber (connected here), so the one-line-per-event log needs nothing
else. Under ``serve`` the children's lines reach the supervisor as JSON records;
it turns each back into an :class:`Occurrence` (:meth:`Occurrence.from_record`)
and sends it to its own hub, where the metrics counters (and the alerts) listen.
A subscriber that raises is logged and never stops the stage that emitted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hermes_py.lifecycle import Event

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Occurrence:
    """One event that happened: what, to which instance and destination, and its facts.

    ``message`` replaces the ``event key=value ...`` text of the log line where a
    person needs a sentence (``destination pacs is UNAVAILABLE: ...``); the JSON
    record carries the same fields either way.
    """

    event: Event
    sop: str | None = None
    destination: str | None = None
    level: int = logging.INFO
    fields: Mapping[str, Any] = field(default_factory=dict)
    logger: str = "hermes_py"
    message: str | None = None

    def record(self) -> dict[str, Any]:
        """The JSON fields of the log record (what the supervisor reads back)."""
        data: dict[str, Any] = {"event": str(self.event)}
        if self.sop is not None:
            data["sop_instance_uid"] = self.sop
        if self.destination is not None:
            data["destination"] = self.destination
        data.update((k, v) for k, v in self.fields.items() if v is not None)
        return data

    def text(self) -> str:
        """``sent sop=1.2.3 dest=pacs status=0x0000 ...``: the line an admin greps."""
        if self.message is not None:
            return self.message
        parts = [str(self.event)]
        if self.sop is not None:
            parts.append(f"sop={self.sop}")
        if self.destination is not None:
            parts.append(f"dest={self.destination}")
        parts += [f"{k}={_quoted(v)}" for k, v in self.fields.items() if v is not None]
        return " ".join(parts)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Occurrence | None:
        """The occurrence a child's JSON log record carries; None for other lines."""
        try:
            event = Event(str(rec.get("event")))
        except ValueError:
            return None
        sop = rec.get("sop_instance_uid")
        dest = rec.get("destination")
        skip = {"event", "sop_instance_uid", "destination", "time", "level", "logger",
                "message", "process", "exception"}
        level = logging.getLevelName(str(rec.get("level", "info")).upper())
        return cls(event, None if sop is None else str(sop), None if dest is None else str(dest),
                   level if isinstance(level, int) else logging.INFO,
                   {k: v for k, v in rec.items() if k not in skip},
                   str(rec.get("logger") or "hermes_py"))


def _quoted(v: object) -> str:
    s = str(v)
    return f'"{s}"' if (" " in s or not s) else s


Handler = Callable[[Occurrence], None]


class Hub:
    """Subscribers of one process's events, called in the order they connected."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []
        self._lock = threading.Lock()

    def connect(self, handler: Handler) -> None:
        with self._lock:
            if handler not in self._handlers:
                self._handlers = [*self._handlers, handler]

    def disconnect(self, handler: Handler) -> None:
        with self._lock:
            self._handlers = [h for h in self._handlers if h != handler]

    def send(self, occurrence: Occurrence) -> None:
        for handler in self._handlers:
            try:
                handler(occurrence)
            except Exception:  # a consumer's bug must never cost a stage its work
                LOG.exception("event subscriber %r failed on %s", handler, occurrence.event)


def log_line(occurrence: Occurrence) -> None:
    """The subscriber that writes the event's log line, through the emitting stage's logger."""
    logger = logging.getLogger(occurrence.logger)
    if logger.isEnabledFor(occurrence.level):
        logger.log(occurrence.level, occurrence.text(), extra={"hermes": occurrence.record()})


# This process's events; the log line is always one of the subscribers.
HUB = Hub()
HUB.connect(log_line)


def emit(logger: logging.Logger, event: Event, sop: str | None = None, dest: str | None = None,
         level: int = logging.INFO, message: str | None = None, **fields: Any) -> None:
    """Say that ``event`` happened (to instance ``sop`` at destination ``dest``)."""
    HUB.send(Occurrence(event, sop, dest, level, fields, logger.name, message))
