"""Readable logs: one line per event, the same shape from every stage and from serve.

``received sop=1.2.3 from=CT1@10.0.0.5 ts=1.2.840.10008.1.2.1 name=...`` is what an
admin greps for (the events themselves are ``events.py``); ``--log-format json``
gives the same fields to a log shipper. Under ``serve`` the children log JSON,
and the supervisor re-emits each record in the admin's format with
:func:`text_line`, the same function this process's own text lines go through.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import threading
import time
from datetime import datetime
from typing import Any, TextIO

from hermes_py.process import start_thread

NOISY = ("pynetdicom", "pydicom", "watchdog")
# Lines a process may have waiting for its stderr before it drops (and counts) them.
QUEUE_LINES = 10_000


def printable(s: object) -> str:
    """Wire data (a UID, a file name) as it may appear in a one-line log: a newline cannot
    forge a second line, a NUL cannot make the log binary (control characters escaped)."""
    text = str(s)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def text_line(stamp: str, level: str, process: str, logger: str, message: str) -> str:
    """``2026-11-28 05:39:07 INFO    route hermes_py.router: routed sop=...``: one line,
    whatever the message carries (its control characters are escaped here, for every
    line of every process, so no stage has to remember to)."""
    tag = f" {process}" if process else ""
    return f"{stamp} {level.upper():<7}{tag} {logger}: {printable(message)}"


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


class _Writer:
    """Lines to a stream from a thread of their own, through a bounded queue.

    Logging must never block the data path: a stage's stderr is a pipe to serve,
    and a serve that stops reading it (suspended, a blocked terminal) would
    otherwise stop every stage at its next log line, the receiver before it
    answers a C-STORE. When the queue is full a line is dropped and counted; the
    count is written as soon as the stream takes lines again.
    """

    def __init__(self, stream: TextIO, size: int = QUEUE_LINES):
        self.stream = stream
        self.queue: queue.Queue[str | threading.Event | None] = queue.Queue(size)
        self.dropped = 0
        self._lock = threading.Lock()
        self._thread = start_thread(self._run, "log-writer")
        atexit.register(self.close)

    def put(self, line: str) -> None:
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            line = self.queue.get()
            if line is None:
                return
            if isinstance(line, threading.Event):  # flush(): all before it is written
                with contextlib.suppress(OSError, ValueError):
                    self.stream.flush()
                line.set()
                continue
            with self._lock:
                dropped, self.dropped = self.dropped, 0
            try:
                if dropped:
                    self.stream.write(f"{dropped} log line(s) dropped: stderr was not being "
                                      "read\n")
                self.stream.write(line + "\n")
                if self.queue.empty():
                    self.stream.flush()
            except (OSError, ValueError):  # a closed stream: nothing more to say
                return

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until what is queued now is written."""
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (at exit), waiting at most ``timeout``."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


class QueuedHandler(logging.Handler):
    def __init__(self, writer: _Writer):
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.put(self.format(record))
        except Exception:
            self.handleError(record)


_WRITER: _Writer | None = None


def flush(timeout: float = 2.0) -> None:
    """Write out queued log lines now: before an abrupt exit (``os._exit``) skips atexit."""
    if _WRITER is not None:
        _WRITER.flush(timeout)


def write_line(line: str) -> None:
    """One line to stderr without ever blocking the caller (serve re-emits its children's)."""
    writer = _WRITER
    if writer is None:
        sys.stderr.write(line + "\n")
    else:
        writer.put(line)


def setup(level: str = "INFO", fmt: str = "text", process: str = "") -> None:
    """Configure the root logger for one process; pynetdicom's per-PDU chatter stays off."""
    global _WRITER
    if _WRITER is None or _WRITER.stream is not sys.stderr:
        _WRITER = _Writer(sys.stderr)
    handler = QueuedHandler(_WRITER)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
