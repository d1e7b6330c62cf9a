"""A spool's identity and its one owner: who may send from it.

A spool has exactly one owner (docs: "One spool has one owner"). ``state/spool.json``
names the spool (an id made once, shown by ``status`` and in serve's first log
line); ``state/owner.json`` names the serve that owns it now: host, boot id, pid and
an epoch that grows by one at every takeover. serve writes it at start while it
holds ``locks/serve.lock``, and hands its epoch to its children
(``HERMES_PY_OWNER_EPOCH``). A dispatcher re-reads the record every
``CHECK_EVERY``; when it names another epoch (the spool's disk was moved to
another node and a serve started there, or an admin adopted it), the dispatcher
stops sending at once and says who owns the spool now: two owners sending one
queue is the failure a shared spool cannot prevent, so it must not go on quietly.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from hermes_py.spool import Spool, now_iso

LOG = logging.getLogger(__name__)

EPOCH_ENV = "HERMES_PY_OWNER_EPOCH"
CHECK_EVERY = 5.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def identity(spool: Spool) -> str:
    """The spool's id, made the first time it is asked for."""
    path = spool.state / "spool.json"
    data = spool.read_json(path)
    if isinstance(data.get("id"), str):
        return str(data["id"])
    new = {"id": uuid.uuid4().hex[:12], "created": now_iso()}
    spool.write_json(path, new)
    return str(new["id"])


def owner(spool: Spool) -> dict[str, Any]:
    return spool.read_json(spool.state / "owner.json")


def take(spool: Spool) -> int:
    """Record this process (serve, holding the serve lock) as the owner; returns its epoch."""
    old = owner(spool)
    epoch = int(old.get("epoch") or 0) + 1
    spool.write_json(spool.state / "owner.json",
                     {"epoch": epoch, "host": socket.gethostname(), "boot_id": _boot_id(),
                      "pid": os.getpid(), "since": now_iso(), "spool": identity(spool)})
    return epoch


class Fence:
    """A stage's check that it still works for the spool's owner (cheap: one read per
    CHECK_EVERY). Outside serve (no epoch in the environment) it never fences."""

    def __init__(self, spool: Spool, epoch: int | None = None):
        self.spool = spool
        env = os.environ.get(EPOCH_ENV)
        self.epoch = epoch if epoch is not None else (int(env) if env and env.isdigit()
                                                      else None)
        self._at = 0.0
        self.lost: str | None = None

    def check(self, name: str) -> bool:
        """True while this stage may send; says once, loudly, when it may no longer."""
        if self.epoch is None or self.lost is not None:
            return self.lost is None
        now = time.monotonic()
        if now - self._at < CHECK_EVERY:
            return True
        self._at = now
        rec = owner(self.spool)
        theirs = rec.get("epoch")
        if isinstance(theirs, int) and theirs != self.epoch:
            self.lost = (f"owner epoch {theirs} (serve pid {rec.get('pid')} on "
                         f"{rec.get('host')}, since {rec.get('since')})")
            LOG.error("%s: STOPPED SENDING: the spool %s now belongs to %s, not to our "
                      "epoch %d; restart this serve only after the other one stopped",
                      name, self.spool.root, self.lost, self.epoch)
            return False
        return True
