"""Readable logs: one line per instance event, the same shape from every stage.

``received sop=1.2.3 from=CT1@10.0.0.5 ts=1.2.840.10008.1.2.1 name=...`` is what an
admin greps for; ``--log-format json`` gives the same fields to a log shipper.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# The verbs every stage uses, so a person can grep one word per lifecycle step.
EVENTS = ("received", "refused", "accepted", "rejected", "routed", "held", "released",
          "discarded", "sent", "retried", "failed", "deferred", "error")


class _JsonFormatter(logging.Formatter):
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
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        tag = f" {process}" if process else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)-7s{tag} %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pynetdicom", "pydicom", "watchdog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _fmt(v: object) -> str:
    s = str(v)
    return f'"{s}"' if (" " in s or not s) else s


def event(logger: logging.Logger, what: str, sop: str | None = None, dest: str | None = None,
          level: int = logging.INFO, **fields: Any) -> None:
    """Log one instance event: ``<what> sop=<uid> dest=<name> key=value ...``."""
    if not logger.isEnabledFor(level):
        return
    parts = [what]
    data: dict[str, Any] = {"event": what}
    if sop is not None:
        parts.append(f"sop={sop}")
        data["sop_instance_uid"] = sop
    if dest is not None:
        parts.append(f"dest={dest}")
        data["destination"] = dest
    for k, v in fields.items():
        if v is None:
            continue
        parts.append(f"{k}={_fmt(v)}")
        data[k] = v
    logger.log(level, " ".join(parts), extra={"hermes": data})
