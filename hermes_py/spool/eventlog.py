"""``state/events.jsonl``: a bounded ring of the recent events, written by serve, tailed by web.

Why a file and not a socket, a pipe or polling the folders: every event of every
child already reaches serve's hub (that is how the metrics count them), so one
more subscriber appending a line costs a buffered write and couples nothing; the
web child only reads a file in the spool, so it can crash, restart or not run at
all without serve noticing; a reader that reconnects with ``since`` finds what it
missed. Polling success/ instead would cost a listing of a folder that holds a
week of deliveries, on every tick.

Bounded: past ``MAX_BYTES`` the file is renamed to ``events.jsonl.1`` (the one
before is dropped), so the ring holds between one and two files' worth. No
fsync: a lost tail after a power cut is a gap in a live feed, never in the
spool's truth. Each line is ``{"seq", "at", "event", ...}``; ``seq`` counts up
across serve restarts (read back from the last line at start).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import IO, Any

from hermes_py.spool.names import now_iso

MAX_BYTES = 1 << 20
TAIL_START = 256 * 1024   # what a new reader reads back of the current file


def _last_seq(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for raw in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError):
            return int(json.loads(raw).get("seq", 0))
    return 0


class EventLog:
    """The writing end: one per serve, called from every child's log-reading thread."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._f: IO[bytes] | None = None
        self._seq = _last_seq(path)

    def append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            line = json.dumps({"seq": self._seq, "at": now_iso(), **record}, default=str)
            try:
                if self._f is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._f = open(self.path, "ab")  # noqa: SIM115 (held for the life of serve)
                self._f.write(line.encode() + b"\n")
                self._f.flush()
                if self._f.tell() >= self.max_bytes:
                    self._f.close()
                    self._f = None
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            except OSError:
                # a full disk costs the live feed, never the stage that emitted
                if self._f is not None:
                    with contextlib.suppress(OSError):
                        self._f.close()
                self._f = None

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


class EventTail:
    """The reading end: new complete lines since the last ``poll``, across rotations."""

    def __init__(self, path: Path):
        self.path = path
        self._f: IO[bytes] | None = None
        self._partial = b""
        self._first = True

    def _open(self) -> bool:
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 (held across polls)
        except OSError:
            return False
        if self._first:  # a new reader starts near the end, not at a megabyte of history
            size = os.fstat(self._f.fileno()).st_size
            if size > TAIL_START:
                self._f.seek(size - TAIL_START)
                self._f.readline()  # the cut line
        self._first = False
        self._partial = b""
        return True

    def _read(self) -> list[dict[str, Any]]:
        assert self._f is not None
        data = self._partial + self._f.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for raw in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(raw)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def poll(self) -> list[dict[str, Any]]:
        if self._f is None and not self._open():
            return []
        out = self._read()
        try:
            st = os.stat(self.path)
            rotated = st.st_ino != os.fstat(self._f.fileno()).st_ino  # type: ignore[union-attr]
        except FileNotFoundError:
            rotated = True
        if rotated:
            out += self._read()  # what the writer added before it renamed the file away
            self.close()
            self._first = False
            if self._open():
                out += self._read()
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
