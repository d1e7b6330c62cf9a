"""The live event feed: serve's ring file (spool/eventlog.py) tailed into memory, served as SSE.

Why this design (and not tailing serve's log, or polling folders): serve already
sees every child's event as a record, so it appends each to a bounded file in the
spool; this child only reads that file. Nothing couples the two processes: either
restarts alone, a reader that reconnects with ``since`` (or the browser's
``Last-Event-ID``) gets what it missed while the ring still holds it, and the cost
is one small read per half second, whatever the backlog. Polling success/ would
cost a listing of a week of deliveries per tick and would miss every event that
is not a delivery.

One tail per web child, shared by every stream; the streams only look at the
in-memory ring. ``follow=0`` answers with what is there and closes (curl, tests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request

from hermes_py.spool.eventlog import EventTail

RING = 2000
POLL = 0.5
KEEPALIVE = 15.0
BACKLOG = 50         # what a new stream without since= starts with


class Feed:
    def __init__(self, path: Path):
        self._tail = EventTail(path)
        self._ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self._polled = 0.0

    def refresh(self) -> None:
        """Read what serve appended (at most once per POLL, whoever asks)."""
        now = time.monotonic()
        if now - self._polled < POLL * 0.8:
            return
        self._polled = now
        for rec in self._tail.poll():
            if isinstance(rec.get("seq"), int):
                if self._ring and rec["seq"] <= self._ring[-1]["seq"]:
                    self._ring.clear()  # the log started over (removed by hand)
                self._ring.append(rec)

    @property
    def last_seq(self) -> int:
        return int(self._ring[-1]["seq"]) if self._ring else 0

    def after(self, seq: int, destination: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self._ring if r["seq"] > seq
                and (destination is None or r.get("destination") == destination)]


def _frame(rec: dict[str, Any]) -> str:
    return f"id: {rec['seq']}\nevent: hermes\ndata: {json.dumps(rec, default=str)}\n\n"


async def stream(request: Request, feed: Feed, since: int | None, destination: str | None,
                 follow: bool) -> AsyncIterator[str]:
    feed.refresh()
    last = feed.last_seq - BACKLOG if since is None else since
    if last > feed.last_seq:
        last = 0  # a seq from before the log started over
    yield "retry: 3000\n\n"
    quiet = time.monotonic()
    while True:
        feed.refresh()
        for rec in feed.after(last, destination):
            last = int(rec["seq"])
            quiet = time.monotonic()
            yield _frame(rec)
        if not follow or await request.is_disconnected():
            return
        if time.monotonic() - quiet > KEEPALIVE:
            quiet = time.monotonic()
            yield ": keepalive\n\n"
        await asyncio.sleep(POLL)
