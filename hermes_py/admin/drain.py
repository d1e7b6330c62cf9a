"""``hermes-py drain`` / ``undrain``: take this router out of a load balancer's rotation and
put it back, without stopping it (health.py says what draining does)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hermes_py.admin import Result, current_user, open_spool
from hermes_py.config import Settings
from hermes_py.spool import now_iso

LOG = logging.getLogger(__name__)


@dataclass
class Drained(Result):
    draining: bool
    changed: bool
    spool: str

    def text(self) -> str:
        if self.draining:
            return ("draining: the receivers refuse new associations (transient, so senders "
                    "and the load balancer go elsewhere); queued instances still go out; "
                    "/healthz says 503" + ("" if self.changed else " (it already was)"))
        return ("not draining: new associations are accepted again"
                + ("" if self.changed else " (it was not draining)"))


def drain(cfg: Settings, by: str | None = None) -> Drained:
    spool = open_spool(cfg)
    was = spool.drain_file.exists()
    if not was:
        spool.write_json(spool.drain_file, {"at": now_iso(), "by": by or current_user()})
        LOG.warning("spool %s: DRAINING, asked by %s", spool.root, by or current_user())
    return Drained(True, not was, str(spool.root))


def undrain(cfg: Settings, by: str | None = None) -> Drained:
    spool = open_spool(cfg)
    changed = spool.remove_state(spool.drain_file.name)
    if changed:
        LOG.warning("spool %s: draining ended, asked by %s", spool.root, by or current_user())
    return Drained(False, changed, str(spool.root))
