"""rules.toml -> typed, validated settings.

Every stage reads its settings from here and nothing else parses the TOML, so a
mistake in the file is reported once, the same way, by ``hermes-py rules check``
and by every process at start: one line naming the file, the line (where TOML
lets us find it) and the key. A running process that reloads an edited file keeps
its old settings when the new ones do not validate.

A section's keys, their kinds and their defaults are its dataclass's fields
(``Duration``, ``Port`` and ``AETitle`` say how a value is read and checked), so
a new key is one new field. Each destination type owns the keys of its own
table (``hermes_py.destinations``); the keys every type shares are here.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes_py import destinations
from hermes_py.coerce import Coercion
from hermes_py.coerce import parse as parse_coercion
from hermes_py.config_alerts import AlertSettings, parse_alerts
from hermes_py.config_reader import (
    AE_RE,
    AETitle,
    ConfigError,
    Duration,
    Port,
    Reader,
    keys_of,
)
from hermes_py.config_rules import parse_rule
from hermes_py.config_web import WebSettings, parse_web
from hermes_py.durations import parse_duration
from hermes_py.errors import HermesError
from hermes_py.failover_policy import FailoverMode, FailoverPolicy
from hermes_py.rules import Rule
from hermes_py.spool import Spool
from hermes_py.tls import ReceiverTLS, parse_receiver

__all__ = ["AETitle", "ConfigError", "DestinationSettings", "Duration", "IntakeSettings",
           "Limits", "Port", "Reader", "ReceiverSettings", "RetryPolicy", "Settings",
           "SpoolSettings", "load", "parse", "parse_duration"]

DEFAULT_CONFIG = "rules.toml"

# ---------------------------------------------------------------- settings types


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: Duration = 30.0
    max_delay: Duration = 3600.0
    give_up_after: Duration = 3 * 86400.0


@dataclass(frozen=True)
class ReceiverSettings:
    ae_title: AETitle = "HERMES"
    bind: str = "127.0.0.1"  # nothing listens beyond loopback unless configured
    port: Port = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    # Receive PDU size we advertise; 128-256 KiB is measured fastest, 0 is slow and huge.
    max_pdu_size: int = 262144
    # Receiver processes sharing the port (SO_REUSEPORT), started by serve: one is GIL-bound.
    processes: int = 1
    acse_timeout: Duration = 30.0
    dimse_timeout: Duration = 60.0
    network_timeout: Duration = 120.0
    tls: ReceiverTLS | None = None   # [receiver.tls]: a TLS listener beside the plain port
    # PROXY protocol v1/v2 (proxy_protocol.py), only from these addresses/networks
    proxy_protocol: bool = False
    load_balancers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    min_free_mb: int = 500
    keep_success: Duration = 7 * 86400.0
    keep_discard: Duration = 7 * 86400.0
    # A temp file untouched this long belongs to a dead writer (dropped association).
    tmp_max_age: Duration = 3600.0


@dataclass(frozen=True)
class IntakeSettings:
    """The drop folder: files people copy in by hand."""

    enabled: bool = True
    # A file whose size and mtime did not change for this long is complete even if its
    # writer never closed it (SMB clients, rsync --inplace) - if it is also whole.
    stable_for: Duration = 5.0
    rescan_interval: Duration = 10.0
    # A file that is not whole (cut inside an element, an image without its pixels yet)
    # is waited for; only once unchanged this long is it moved to error/ as truncated.
    incomplete_after: Duration = 600.0


@dataclass(frozen=True)
class Limits:
    """What an instance may cost us, whoever sent it."""

    # A deflated data set (1.2.840.10008.1.2.1.99) that inflates past this is refused or
    # quarantined with the reason: 4 MB on the wire can inflate to many GB (a bomb).
    max_inflated_mb: int = 4096

    @property
    def max_inflated(self) -> int:
        return self.max_inflated_mb * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class DestinationSettings:
    """What every destination type has; each type's own settings extend this class."""

    name: str
    type: str = "dicom"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_associations: int = 1
    # Instances per batch (for DICOM: per association, then release and re-associate).
    batch_size: int = 200
    # Another destination that takes this one's work when it stays down (failover.py).
    failover_to: str = ""
    failover_mode: str = ""               # "divert" or "copy": the admin must choose
    failover_after: Duration = 900.0      # unreachable or misconfigured without a break
    failback_after: Duration = 120.0      # reachable without a break before work returns
    # [destinations.NAME.coerce]: header edits in this destination's copy only (coerce.py)
    coerce: Coercion | None = None

    @property
    def failover(self) -> FailoverPolicy | None:
        if not self.failover_to:
            return None
        return FailoverPolicy(self.failover_to, FailoverMode(self.failover_mode),
                              self.failover_after, self.failback_after)


@dataclass(frozen=True)
class HealthSettings:
    """``[health]``: ``GET /healthz`` for a load balancer (health.py); off without a port."""

    port: Port = 0
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    path: Path
    receiver: ReceiverSettings
    spool: SpoolSettings
    retry: RetryPolicy
    destinations: Mapping[str, DestinationSettings]
    rules: tuple[Rule, ...]
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    web: WebSettings = field(default_factory=WebSettings)
    health: HealthSettings = field(default_factory=lambda: HealthSettings())
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def destination(self, name: str) -> DestinationSettings:
        """The settings of destination ``name``, or the one-line error every verb gives."""
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none defined"
            raise HermesError(f"unknown destination {name!r} in {self.path} "
                              f"(defined: {known})") from None


RETRY_KEYS = keys_of(RetryPolicy)
COMMON_DEST_KEYS = keys_of(DestinationSettings, ("name", "retry")) | RETRY_KEYS


# ---------------------------------------------------------------- sections


def _parse_retry(p: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
                 base: RetryPolicy) -> RetryPolicy:
    r = dataclasses.replace(base, **p.fields(table, data, RetryPolicy))
    if r.initial_delay <= 0:
        raise p.err(table, "initial_delay", "must be greater than 0")
    if r.max_delay < r.initial_delay:
        raise p.err(table, "max_delay", f"must be at least initial_delay ({r.initial_delay:g}s)")
    return r


def _parse_receiver(p: Reader, rd: Mapping[str, Any]) -> ReceiverSettings:
    table = ("receiver",)
    p.check_keys(table, rd, keys_of(ReceiverSettings))
    aets = p.get(table, rd, "allowed_calling_aets", list, [])
    for a in aets:
        if not isinstance(a, str) or not AE_RE.match(a):
            raise p.err(table, "allowed_calling_aets", f"invalid AE title {a!r}")
    tls = parse_receiver(p, (*table, "tls"), rd["tls"]) if "tls" in rd else None
    balancers = _parse_balancers(p, table, rd)
    receiver = ReceiverSettings(allowed_calling_aets=tuple(a.strip() for a in aets), tls=tls,
                                load_balancers=balancers,
                                **p.fields(table, rd, ReceiverSettings,
                                           skip=("allowed_calling_aets", "tls",
                                                 "load_balancers")))
    p.at_least_one(table, "max_associations", receiver.max_associations)
    p.at_least_one(table, "processes", receiver.processes)
    if receiver.max_pdu_size != 0 and receiver.max_pdu_size < 4096:
        raise p.err(table, "max_pdu_size", "must be at least 4096 (262144 recommended)")
    if tls is not None and tls.port == receiver.port:
        raise p.err((*table, "tls"), "port", f"must differ from [receiver] port {receiver.port}")
    return receiver


def _parse_balancers(p: Reader, table: tuple[str | int, ...],
                     rd: Mapping[str, Any]) -> tuple[str, ...]:
    """``load_balancers``: who may speak the PROXY protocol; only with ``proxy_protocol``."""
    entries = p.get(table, rd, "load_balancers", list, [])
    if not all(isinstance(e, str) for e in entries):
        raise p.err(table, "load_balancers", "expected a list of addresses or networks "
                                             '(e.g. ["10.0.0.5", "10.0.1.0/24"])')
    # imported here: proxy_protocol pulls in pynetdicom, which the web and alert
    # children (and every `hermes-py status`) would otherwise load for nothing
    from hermes_py import proxy_protocol
    try:
        proxy_protocol.networks(entries)
    except ValueError as e:
        raise p.err(table, "load_balancers", str(e)) from None
    on = p.get(table, rd, "proxy_protocol", bool, False)
    if on and not entries:
        raise p.err(table, "proxy_protocol", "needs load_balancers (the addresses whose "
                                             "PROXY header is trusted)")
    if entries and not on:
        raise p.err(table, "load_balancers", "has no effect without proxy_protocol = true")
    return tuple(e.strip() for e in entries)


def _parse_spool(p: Reader, sd: Mapping[str, Any], config_path: Path) -> SpoolSettings:
    table = ("spool",)
    p.check_keys(table, sd, keys_of(SpoolSettings))
    spool_path = Path(p.get(table, sd, "path", str, "spool"))
    if not spool_path.is_absolute():
        spool_path = config_path.parent / spool_path
    spool = SpoolSettings(path=spool_path, **p.fields(table, sd, SpoolSettings, skip=("path",)))
    there = next((a for a in (spool_path, *spool_path.parents) if a.exists()), None)
    if there is not None and not there.is_dir():
        raise p.err(table, "path", f"{there} is a file, not a folder: the spool is a folder "
                                   "(it is created if missing)")
    if spool.min_free_mb < 0:
        raise p.err(table, "min_free_mb", "must be 0 or more")
    return spool


def _parse_limits(p: Reader, data: Mapping[str, Any]) -> Limits:
    p.check_keys(("limits",), data, keys_of(Limits))
    limits = Limits(**p.fields(("limits",), data, Limits))
    p.positive(("limits",), "max_inflated_mb", limits.max_inflated_mb)
    return limits


def _parse_intake(p: Reader, idata: Mapping[str, Any]) -> IntakeSettings:
    p.check_keys(("intake",), idata, keys_of(IntakeSettings))
    intake = IntakeSettings(**p.fields(("intake",), idata, IntakeSettings))
    p.positive(("intake",), "rescan_interval", intake.rescan_interval)
    return intake


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_folders(p: Reader, dests: Mapping[str, DestinationSettings]) -> None:
    """Each destination gets folders of its own: names that become the same folder name
    (``pacs-web`` and ``pacs_web``; ``PACS`` and ``pacs`` on a case-blind filesystem)
    would share a queue, a state file and flags."""
    seen: dict[str, str] = {}
    for name in dests:
        folder = Spool.dest_folder(name).casefold()
        if folder in seen:
            raise ConfigError(p.path, f"destinations.{name}",
                              f"would share its folders with destination {seen[folder]!r} "
                              "(names become folder names: '-' and '_' are the same there, "
                              "and so are upper and lower case): rename one",
                              p.loc.line(("destinations", name)))
        seen[folder] = name


def _parse_destination(p: Reader, name: str, data: Any, retry: RetryPolicy,
                       receiver: ReceiverSettings) -> DestinationSettings:
    table: tuple[str | int, ...] = ("destinations", name)
    if not isinstance(data, dict):
        raise p.err(("destinations",), name, "expected a table [destinations.NAME]")
    if not _NAME_RE.match(name):
        raise p.err(("destinations",), name, "destination names are letters, digits, '_', '-', "
                                             "'.', at most 64, and become folder names")
    dtype = p.get(table, data, "type", str, "dicom")
    kind = destinations.type_named(dtype)
    if kind is None:
        raise p.err(table, "type", f"unknown destination type {dtype!r} "
                                   f"(supported: {', '.join(destinations.TYPE_NAMES)})")
    p.check_keys(table, data, COMMON_DEST_KEYS | kind.keys())
    common: dict[str, Any] = {
        "name": name, "type": dtype, "retry": _parse_retry(p, table, data, retry),
        "coerce": parse_coercion(p, table, data["coerce"]) if "coerce" in data else None,
        **p.fields(table, data, DestinationSettings, skip=("name", "type", "retry", "coerce"))}
    settings = kind.parse(p, table, data, common, receiver)
    p.at_least_one(table, "max_associations", settings.max_associations)
    p.at_least_one(table, "batch_size", settings.batch_size)
    if settings.failover_to:
        modes = ", ".join(repr(str(m)) for m in FailoverMode)
        if not settings.failover_mode:
            raise p.err(table, "failover_mode", f"missing: with failover_to, choose {modes} "
                                                "(divert: another path to the same archive, "
                                                "instances move; copy: a backup site that gets "
                                                "them too)", line_key="failover_to")
        if settings.failover_mode not in set(FailoverMode):
            raise p.err(table, "failover_mode", f"expected one of {modes}, "
                                                f"got {settings.failover_mode!r}")
        p.positive(table, "failover_after", settings.failover_after)
    elif settings.failover_mode:
        raise p.err(table, "failover_mode", "needs failover_to (the backup destination)")
    return settings


def _check_failover(p: Reader, dests: Mapping[str, DestinationSettings]) -> None:
    """One level deep: a known backup, not itself, and a backup that has no backup of its own
    (which also rules out cycles)."""
    for name, d in dests.items():
        if not d.failover_to:
            continue
        table: tuple[str | int, ...] = ("destinations", name)
        backup = dests.get(d.failover_to)
        if backup is None:
            known = ", ".join(sorted(n for n in dests if n != name)) or "none"
            raise p.err(table, "failover_to", f"unknown destination {d.failover_to!r} "
                                              f"(defined: {known})")
        if backup.name == name:
            raise p.err(table, "failover_to", "a destination cannot fail over to itself")
        if backup.failover_to:
            raise p.err(table, "failover_to", f"{backup.name!r} fails over to "
                                              f"{backup.failover_to!r} itself: failover is one "
                                              "level deep (a backup has no backup)")


_TOP_KEYS = {"receiver", "spool", "retry", "destinations", "rules", "intake", "limits",
             "metrics", "web", "health", "alerts"}
_METRICS_KEYS = {"port", "bind"}


def parse(text: str, path: Path) -> Settings:
    """Validate ``text`` (the content of ``path``) into Settings, or raise ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, "", f"not valid TOML: {e}", line) from None
    p = Reader(path, text)
    p.check_keys((), data, _TOP_KEYS)
    for t in ("receiver", "spool", "retry", "destinations", "intake", "limits", "metrics",
              "web", "health", "alerts"):
        if t in data and not isinstance(data[t], dict):
            raise p.err((), t, f"expected a table [{t}]")
    receiver = _parse_receiver(p, data.get("receiver", {}))
    spool = _parse_spool(p, data.get("spool", {}), path)
    p.check_keys(("retry",), data.get("retry", {}), RETRY_KEYS)
    retry = _parse_retry(p, ("retry",), data.get("retry", {}), RetryPolicy())
    intake = _parse_intake(p, data.get("intake", {}))
    limits = _parse_limits(p, data.get("limits", {}))
    dests = {name: _parse_destination(p, name, dd, retry, receiver)
             for name, dd in data.get("destinations", {}).items()}
    _check_folders(p, dests)
    _check_failover(p, dests)
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise p.err((), "rules", "write rules as [[rules]] tables")
    seen: dict[str, int] = {}
    rules = tuple(parse_rule(p, i, r, dests, seen) for i, r in enumerate(rules_raw))
    md = data.get("metrics", {})
    p.check_keys(("metrics",), md, _METRICS_KEYS)
    metrics_port = p.port(("metrics",), md, "port", 0) if "port" in md else None
    return Settings(path=path, receiver=receiver, spool=spool, retry=retry,
                    destinations=dests, rules=rules, intake=intake, limits=limits,
                    metrics_port=metrics_port,
                    metrics_bind=p.get(("metrics",), md, "bind", str, "127.0.0.1"),
                    web=parse_web(p, data.get("web", {})),
                    health=_parse_health(p, data.get("health", {})),
                    alerts=parse_alerts(p, data.get("alerts", {}), dests))


def _parse_health(p: Reader, data: Mapping[str, Any]) -> HealthSettings:
    p.check_keys(("health",), data, keys_of(HealthSettings))
    return HealthSettings(**p.fields(("health",), data, HealthSettings))


def load(path: Path | str = DEFAULT_CONFIG) -> Settings:
    """Read and validate a config file; every failure is a ConfigError with one clear line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "config file not found (pass -c PATH)") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied reading the config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason}") from None
    return parse(text, path.resolve())
