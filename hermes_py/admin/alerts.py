"""``hermes-py alerts test``, the open alerts ``status`` shows, what ``rules check`` says.

``alerts test`` sends one ``test`` alert straight to every channel, not through
the outbox: the admin wants each channel's answer now (a wrong password, a 404,
a firewall), not a retry in 30 s. It works with serve stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hermes_py.admin import Result
from hermes_py.alerts import payload as pl
from hermes_py.alerts import sender_for
from hermes_py.alerts.sender import new_item
from hermes_py.config import Settings
from hermes_py.durations import fmt_duration
from hermes_py.errors import HermesError
from hermes_py.spool import Spool, now_iso


@dataclass
class AlertsTest(Result):
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if all(a["ok"] for a in self.answers) else 1

    def text(self) -> str:
        width = max((len(a["channel"]) for a in self.answers), default=0)
        return "\n".join(f"{a['channel'].ljust(width)}  {a['type']:8}  "
                         f"{'OK    ' if a['ok'] else 'FAILED'}  {a['answer']}"
                         for a in self.answers)


def test(cfg: Settings) -> AlertsTest:
    if not cfg.alerts.channels:
        raise HermesError(f"no [alerts.channels.NAME] in {cfg.path}: nothing to test")
    spool = Spool(cfg.spool.path)
    now = time.time()
    ident = pl.alert_id("test", now)
    payload = pl.build(cfg, spool, "test", None, ident=ident, now=now,
                       summary="test alert from hermes-py alerts test: this channel works")
    sender = sender_for(cfg, spool)
    kinds = {c.name: c.type for c in cfg.alerts.channels}
    return AlertsTest([{"channel": name, "type": kinds[name], "ok": a.ok, "answer": a.text}
                       for name, a in sender.send_now(new_item("test", None, payload, now))])


def describe(cfg: Settings) -> list[str]:
    """What ``rules check`` says about [alerts]: each channel, where to, which events."""
    a = cfg.alerts
    if not a.channels:
        return []
    out = [f"alerts ({len(a.channels)} channel(s); down after {fmt_duration(a.alert_after)}, "
           f"reminders every {fmt_duration(a.repeat_every) if a.repeat_every else 'never'}"
           f"{', with UIDs' if a.include_uids else ''}):"]
    width = max(len(c.name) for c in a.channels)
    for c in a.channels:
        where = {"webhook": c.url or f"url from {c.url_file}",
                 "email": f"{', '.join(c.to)} via {c.host}:{c.port}",
                 "apprise": f"URLs from {c.urls_file}",
                 "command": " ".join(c.argv)}.get(c.type, "")
        which = ", ".join(c.events) + (f" of {', '.join(c.destinations)}"
                                       if c.destinations else "")
        out.append(f"  {c.name:<{width}}  {c.type} {pl.clean(where, 120, uids=True)} ({which})")
    return out


def open_alerts(spool: Spool) -> dict[str, Any] | None:
    """state/alerts.json's open conditions and the outbox counts; None: alerts never ran."""
    box = spool.alerts
    data = spool.read_json(box.state_file)
    pending, failed = box.count(box.pending), box.count(box.failed)
    if not data and not pending and not failed:
        return None
    opened = data.get("open") or {}
    rows = [{"key": k, "event": v.get("event"), "destination": v.get("destination"),
             "since": v.get("since"), "reminders": v.get("reminders", 0)}
            for k, v in sorted(opened.items())]
    return {"open": rows, "pending": pending, "failed": failed,
            "updated_at": data.get("updated_at")}


def alerts_text(info: dict[str, Any] | None) -> list[str]:
    """The few lines ``status`` prints: open alerts and an outbox that is not draining."""
    if not info:
        return []
    lines = [f"alert: {r['event']}{' ' + r['destination'] if r['destination'] else ''} "
             f"since {r['since']}" for r in info["open"]]
    if info["pending"]:
        lines.append(f"alerts: {info['pending']} waiting in alerts/pending/ for a channel")
    if info["failed"]:
        lines.append(f"alerts: {info['failed']} NOT DELIVERED, in alerts/failed/ "
                     "(a channel refused them for give_up_after)")
    return lines or [f"alerts: none open (checked {info.get('updated_at') or now_iso()})"]


__all__ = ["AlertsTest", "alerts_text", "describe", "open_alerts", "test"]
