"""``[alerts]`` and ``[alerts.channels.NAME]`` in rules.toml: who is told what, and how.

Its own module because a channel's rules are about secrets and reachability
more than routing:

- secrets (a webhook URL with a token in it, an HMAC key, an SMTP password, Apprise
  URLs) are read from files named here, never written in rules.toml, and never
  kept in the settings: the channel reads them when it sends, so a rotated
  secret needs no reload and no repr of the settings can leak one;
- a file that cannot be read is a ``rules check`` error now, not a silent
  failure at 3 a.m. when the first alert is due;
- an event name a channel subscribes to must exist: a typo would mean a channel
  that never fires;
- an apprise channel without apprise installed (it is the optional extra
  ``hermes-py[alerts]``) is an error here, not an alert that can never be sent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hermes_py.config_reader import Duration, Reader, keys_of

# The events a channel can subscribe to (lifecycle.Event values), and "test".
ALERT_EVENTS = ("destination_down", "destination_recovered", "destination_misconfigured",
                "failover_started", "failback", "gave_up", "queue_delayed", "disk_low",
                "receiving_refused", "process_flapping", "destination_not_committing",
                "cert_expiring")
CHANNEL_TYPES = ("webhook", "email", "apprise", "command")


@dataclass(frozen=True)
class ChannelSettings:
    """One ``[alerts.channels.NAME]``; which keys a type takes is ``_TYPE_KEYS``."""

    name: str
    type: str
    events: tuple[str, ...] = ("*",)
    destinations: tuple[str, ...] = ()      # empty: every destination (and the rest)
    timeout: Duration = 10.0
    ca_file: str = ""           # webhook (https) and email (STARTTLS): a private CA's PEM
    # webhook
    url: str = ""
    url_file: str = ""
    hmac_secret_file: str = ""
    # email (the TOML key "from" is a Python keyword: mail_from)
    host: str = ""
    port: int = 587
    starttls: bool = True
    username: str = ""
    password_file: str = ""
    mail_from: str = ""
    to: tuple[str, ...] = ()
    # apprise
    urls_file: str = ""
    # command
    argv: tuple[str, ...] = ()

    def wants(self, event: str, dest: str | None) -> bool:
        """Does this channel want ``event`` about ``dest`` (None: not about one)?"""
        if event == "test":
            return True
        if "*" not in self.events and event not in self.events:
            return False
        return not self.destinations or dest is None or dest in self.destinations


@dataclass(frozen=True)
class AlertSettings:
    alert_after: Duration = 300.0        # unreachable this long -> destination_down
    repeat_every: Duration = 43200.0     # a reminder while a condition lasts (0: none)
    include_uids: bool = False           # alerts never carry patient data; UIDs when asked
    delay_warning: Duration = 3600.0     # oldest queued instance older -> queue_delayed
    retry_min: Duration = 30.0           # a channel that failed is tried again after this,
    retry_max: Duration = 3600.0         # doubling up to this,
    give_up_after: Duration = 86400.0    # until the alert goes to alerts/failed/
    channels: tuple[ChannelSettings, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.channels)


_COMMON = {"type", "events", "destinations", "timeout"}
_TYPE_KEYS = {
    "webhook": _COMMON | {"url", "url_file", "hmac_secret_file", "ca_file"},
    "email": _COMMON | {"host", "port", "starttls", "username", "password_file", "from", "to",
                        "ca_file"},
    "apprise": _COMMON | {"urls_file"},
    "command": _COMMON | {"argv"},
}
_LISTS = ("events", "destinations", "to", "argv")


def _strings(p: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
             key: str) -> tuple[str, ...] | None:
    if key not in data:
        return None
    v = p.get(table, data, key, list, [])
    if not all(isinstance(x, str) and x for x in v):
        raise p.err(table, key, "expected a list of non-empty strings")
    return tuple(v)


def _channel(p: Reader, name: str, data: Any, dests: Mapping[str, object]) -> ChannelSettings:
    table: tuple[str | int, ...] = ("alerts", "channels", name)
    if not isinstance(data, dict):
        raise p.err(("alerts", "channels"), name, "expected a table [alerts.channels.NAME]")
    ctype = p.get(table, data, "type", str, "")
    if ctype not in _TYPE_KEYS:
        raise p.err(table, "type", f"expected one of {', '.join(CHANNEL_TYPES)}, got {ctype!r}"
                    if ctype else f"missing: one of {', '.join(CHANNEL_TYPES)}",
                    line_key=None if ctype else "type")
    p.check_keys(table, data, _TYPE_KEYS[ctype])
    lists: dict[str, Any] = {k: v for k in _LISTS
                             if (v := _strings(p, table, data, k)) is not None}
    skip = ("name", "type", "mail_from", *_LISTS)
    ch = ChannelSettings(name=name, type=ctype, **lists, **p.fields(table, data, ChannelSettings,
                                                                    skip=skip))
    if "from" in data:
        ch = dataclasses.replace(ch, mail_from=p.get(table, data, "from", str, ""))
    for ev in ch.events:
        if ev != "*" and ev not in ALERT_EVENTS:
            raise p.err(table, "events", f"unknown event {ev!r} (expected \"*\" or some of: "
                                         f"{', '.join(ALERT_EVENTS)})")
    for d in ch.destinations:
        if d not in dests:
            raise p.err(table, "destinations", f"unknown destination {d!r} (defined: "
                                               f"{', '.join(sorted(dests)) or 'none'})")
    p.positive(table, "timeout", ch.timeout)
    files: dict[str, Any] = {k: p.readable(table, k, getattr(ch, k), nonempty=True)
             for k in ("url_file", "hmac_secret_file", "password_file", "urls_file", "ca_file")
             if getattr(ch, k)}
    ch = dataclasses.replace(ch, **files)
    if ctype == "webhook":
        if bool(ch.url) == bool(ch.url_file):
            raise p.err(table, "url", "set url or url_file (one of them)", line_key="type")
        if ch.url and not ch.url.startswith(("http://", "https://")):
            raise p.err(table, "url", f"expected an http:// or https:// URL, got {ch.url!r}")
    elif ctype == "email":
        for key in ("host", "from", "to"):
            if key not in data:
                raise p.err(table, key, "missing (email needs host, from and to)",
                            line_key="type")
        if not ch.to:
            raise p.err(table, "to", "expected at least one address")
        if bool(ch.username) != bool(ch.password_file):
            raise p.err(table, "password_file" if ch.username else "username",
                        "username and password_file go together")
        if not 0 < ch.port <= 65535:
            raise p.err(table, "port", f"port out of range: {ch.port}")
    elif ctype == "apprise":
        if importlib.util.find_spec("apprise") is None:
            raise p.err(table, "type", "apprise is not installed: pip install "
                        "'hermes-py[alerts]' (or use a webhook, email or command channel)")
        if not ch.urls_file:
            raise p.err(table, "urls_file", "missing (a file with one Apprise URL a line)",
                        line_key="type")
    elif ctype == "command" and not ch.argv:
        raise p.err(table, "argv", "missing (the program and its arguments, a list)",
                    line_key="type")
    return ch


def parse_alerts(p: Reader, data: Mapping[str, Any], dests: Mapping[str, object]
                 ) -> AlertSettings:
    table = ("alerts",)
    if not isinstance(data, dict):
        raise p.err((), "alerts", "expected a table [alerts]")
    p.check_keys(table, data, keys_of(AlertSettings))
    raw = data.get("channels", {})
    if not isinstance(raw, dict):
        raise p.err(table, "channels", "expected tables [alerts.channels.NAME]")
    channels = tuple(_channel(p, name, cd, dests) for name, cd in raw.items())
    a = AlertSettings(channels=channels, **p.fields(table, data, AlertSettings,
                                                    skip=("channels",)))
    for key in ("alert_after", "delay_warning", "retry_min", "give_up_after"):
        p.positive(table, key, getattr(a, key))
    if a.retry_max < a.retry_min:
        raise p.err(table, "retry_max", f"must be at least retry_min ({a.retry_min:g}s)")
    return a


__all__ = ["ALERT_EVENTS", "AlertSettings", "ChannelSettings", "parse_alerts"]
