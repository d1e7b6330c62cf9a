"""Readable logs: one line per event, the same shape from every stage and from serve.

``received sop=1.2.3 from=CT1@10.0.0.5 ts=1.2.840.10008.1.2.1 name=...`` is what an
admin greps for (the events themselves are ``events.py``); ``--log-format json``
gives the same fields to a log shipper. Under ``serve`` the children log JSON,
and the supervisor re-emits each record in the admin's format with
:func:`text_line`, the same function this process's own text lines go through.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime
from typing import Any

NOISY = ("pynetdicom", "pydicom", "watchdog")


def text_line(stamp: str, level: str, process: str, logger: str, message: str) -> str:
    """``2026-11-28 05:39:07 INFO    route hermes_py.router: routed sop=...``."""
    tag = f" {process}" if process else ""
    return f"{stamp} {level.upper():<7}{tag} {logger}: {message}"


def local_stamp(iso: object) -> str:
    """A record's UTC ISO time as local ``YYYY-mm-dd HH:MM:SS`` (now, when unreadable)."""
    if isinstance(iso, str):
        try:
            return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone() \
                .strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass
    return time.strftime("%Y-%m-%d %H:%M:%S")


class TextFormatter(logging.Formatter):
    def __init__(self, process: str = ""):
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        text = text_line(self.formatTime(record, self.datefmt), record.levelname, self.process,
                         record.name, record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "hermes", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "text", process: str = "") -> None:
    """Configure the root logger for one process; pynetdicom's per-PDU chatter stays off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
