"""Which queued instances a dispatcher worker sends next, claimed so nobody else does.

Its own module because it is the one place that reads an outbox as a queue: the
dispatcher decides what an answer means, the picker only what is due.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from hermes_py.spool import Spool
from hermes_py.spool.claims import Worker

RESCAN_EVERY = 5.0       # candidate list refreshed at least this often


class Picker:
    """Due instances, urgent first then oldest first, claimed for one worker.

    One scan of an outbox feeds many batches (a candidate list refreshed when
    used up or older than RESCAN_EVERY), so a large backlog costs one scandir
    per thousand instances, not one per batch (docs/internals.md, invariant 6). Every
    candidate is re-checked (one stat) and claimed by rename, so a stale list
    is harmless: another process may have taken or rescheduled an entry.
    """

    def __init__(self, spool: Spool, dest: str, size: int):
        self.spool = spool
        self.dest = dest
        self.size = size
        self.lock = threading.Lock()
        self._cache: dict[Path, tuple[deque[Path], float]] = {}

    def invalidate(self) -> None:
        with self.lock:
            self._cache.clear()

    def pick(self, worker: Worker, n: int, now: float) -> list[Path]:
        claimed: list[Path] = []
        with self.lock:
            for folder in self.spool.outboxes(self.dest):  # failover queues come and go
                rescanned = False
                while len(claimed) < n:
                    q, at = self._cache.get(folder, (deque(), 0.0))
                    if not q or now - at > RESCAN_EVERY:
                        if rescanned:
                            break
                        q = deque(self.spool.oldest(folder, self.size, due_before=now))
                        self._cache[folder] = (q, now)
                        rescanned = True
                        if not q:
                            break
                    p = q.popleft()
                    if self.spool.next_attempt(p) > now:
                        continue
                    c = worker.claim(p)
                    if c is not None:
                        claimed.append(c)
                if len(claimed) >= n:
                    break
        return claimed
