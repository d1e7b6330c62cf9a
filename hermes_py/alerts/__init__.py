"""``hermes-py alert``: tell a person when a destination stays down, and when it is back.

A process of its own under serve (started only when ``[alerts]`` has channels),
so a slow SMTP server or a dead webhook can never delay a C-STORE or a
delivery: routing does not know alerting exists. It only reads what the stages
already write (state files, queue folders) and the outbox serve's own
aggregator writes (:mod:`.aggregate`), and it writes only ``alerts/`` and
``state/alerts.json``.

- :mod:`.watcher`: conditions (level) -> alerts (edges), written to the outbox;
- :mod:`.sender`: the outbox -> the channels, with retries, order and merging;
- :mod:`.channels`: webhook, email, apprise, command;
- :mod:`.payload`: the ``hermes-alert/1`` payload and its PHI rules.
"""

from __future__ import annotations

import logging
import threading
import time

from hermes_py.alerts import channels
from hermes_py.alerts.sender import Sender
from hermes_py.alerts.watcher import Watcher
from hermes_py.config import Settings
from hermes_py.process import orphaned, stop_on_signals
from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

TICK = 0.5


def sender_for(cfg: Settings, spool: Spool) -> Sender:
    return Sender(cfg.alerts, spool, [channels.make(c) for c in cfg.alerts.channels])


def _failed(what: str, now: float, quiet: dict[str, float]) -> None:
    """Log the exception being handled, with its traceback at most once a minute per step."""
    if now - quiet.get(what, -60.0) >= 60.0:
        quiet[what] = now
        LOG.exception("alerts: %s failed; trying again every tick", what)


def run(cfg: Settings) -> int:
    """Watch and send every TICK until SIGTERM/SIGINT; alerts left pending wait on disk."""
    stop = threading.Event()
    stop_on_signals(stop)
    spool = Spool(cfg.spool.path)
    spool.ensure()
    spool.alerts.ensure()
    watcher = Watcher(cfg, spool)
    sender = sender_for(cfg, spool)
    pending = spool.alerts.count(spool.alerts.pending)
    LOG.info("alerts: %d channel(s) (%s); alert_after %gs; %d alert(s) pending from before",
             len(cfg.alerts.channels), ", ".join(c.name for c in cfg.alerts.channels),
             cfg.alerts.alert_after, pending)
    quiet: dict[str, float] = {}
    while not stop.is_set():
        now = time.time()
        # Any failure is logged and tried again next tick, not a crash: a restart would
        # meet the same file, and a child that keeps dying is an alert of its own.
        try:
            watcher.tick(now)
        except Exception:
            _failed("looking at the state files", now, quiet)
        try:
            sender.tick(time.time(), stop)
        except Exception:
            _failed("sending", now, quiet)
        if orphaned():
            break
        stop.wait(TICK)
    return 0
