"""``hermes-py status``: every destination's state and queue, the shared folders, free space.

Cost: one listing per folder and one stat per queued instance (for "due"); no
sidecar is opened except the per-destination state files. Ages come from the
names (receive time), compared as strings against precomputed bucket bounds, so
no date parsing and no JSON per instance. The same snapshot is what ``metrics``
exports as gauges.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

from hermes_py import commitment, destinations, failover, ownership, tls
from hermes_py.admin import Result, open_spool
from hermes_py.admin.alerts import alerts_text, open_alerts
from hermes_py.config import Settings
from hermes_py.destination_state import HEARTBEAT_EVERY
from hermes_py.durations import DAY, human_age
from hermes_py.lifecycle import DestinationStatus, Stage
from hermes_py.spool import Flag, Spool, now_iso, parse_iso, received_at
from hermes_py.spool.names import STAMP_LEN, stamp

# qshape's age buckets (minutes): each column counts instances at most that old
# and older than the previous column; the last one is everything older.
AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
# `drop/` can hold anything a person copied; status counts at most this many files there.
DROP_COUNT_CAP = 100_000
# A dispatcher rewrites state/<dest>.json at least every heartbeat: three missed, it is
# stopped, hung or gone.
STALE_AFTER = 3 * HEARTBEAT_EVERY


class ServeChild(TypedDict, total=False):
    name: str
    pid: int | None
    started_at: str | None
    restarts: int
    last_exit: str | None


class ServeState(TypedDict, total=False):
    """``state/serve.json`` as serve wrote it, plus ``running`` (None: another host)."""

    pid: int
    host: str
    config: str
    started_at: str
    metrics: str
    children: list[ServeChild]
    stopped_at: str
    running: bool | None


class DestinationRow(TypedDict, total=False):
    configured: bool
    queued: int
    urgent: int
    active: int
    due: int
    oldest_received_at: str | None
    oldest_age: float | None
    age_buckets: list[int]
    error: int
    success_24h: int
    address: str
    state: str
    reported_state: str | None
    held: bool
    flush_requested: bool
    backoff_until: str | None
    backoff_until_epoch: float | None
    consecutive_failures: int | None
    last_error: dict[str, Any] | None
    last_success: str | None
    state_updated_at: str | None
    state_updated_epoch: float | None
    failover: FailoverRow | None
    # storage commitment (commitment.summary): mode, awaiting, oldest_wait (s),
    # requests_open, not_committing_since, last_report_at, unsent; None when off
    commitment: dict[str, Any] | None


class FailoverRow(TypedDict):
    """state/<dest>.failover.json, and how many instances took the other path."""

    to: str
    mode: str
    since: str
    reason: str
    diverted: int
    at_backup: int


class Folders(TypedDict):
    incoming: int
    pending: int
    drop: int
    drop_capped: bool
    error: int
    discard: int


class Snapshot(TypedDict):
    spool: str
    config: str
    at: str
    free_mb: float
    min_free_mb: int
    low_space: bool
    serve: ServeState | None
    age_buckets_minutes: list[int]
    destinations: dict[str, DestinationRow]
    folders: Folders
    tls_certificate_expires: str | None   # [receiver.tls] cert_file's notAfter
    draining: dict[str, Any] | None       # state/drain: since when, asked by whom
    spool_id: str | None                  # state/spool.json
    owner: dict[str, Any] | None          # state/owner.json: the serve that owns the spool
    alerts: dict[str, Any] | None         # state/alerts.json + alerts/ counts (admin/alerts)


@dataclass
class _Tally:
    """Counts of one set of folders, gathered from directory listings (+ one stat when due)."""

    queued: int = 0
    due: int = 0
    oldest: str | None = None          # smallest name = oldest receive time
    buckets: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS_MIN) + 1))

    def add(self, folder: Path, bounds: list[str], now: float | None) -> None:
        """Count ``*.dcm`` in one folder: queue depth, due (sidecar mtime <= now), ages."""
        for e in Spool.scan(folder):
            name = e.name
            self.queued += 1
            if self.oldest is None or name < self.oldest:
                self.oldest = name
            # bounds ascend (oldest first): a name newer than all of them is bucket 0
            # (at most 5 min old), one older than all of them the last (1280+ min)
            self.buckets[len(bounds) - bisect.bisect_right(bounds, name[:STAMP_LEN])] += 1
            if now is not None and Spool.next_attempt(e.path) <= now:
                self.due += 1


def _count(folder: Path) -> int:
    return sum(1 for _ in Spool.scan(folder))


def _count_files(folder: Path, cap: int) -> tuple[int, bool]:
    """Files under ``folder`` (recursive), stopping at ``cap``; (count, capped)."""
    n = 0
    for _root, _dirs, files in os.walk(folder):
        n += sum(1 for f in files if not f.startswith("."))
        if n >= cap:
            return n, True
    return n, False


def _success_24h(folder: Path, now: float) -> int:
    """Instances delivered in the last 24 h: success sidecars written since then.

    The success sidecar is written when the instance moves there, so its mtime is
    the delivery time. A name received in the last 24 h was necessarily
    delivered in the last 24 h and is counted from the listing alone; only older
    names (delivered late, after an outage or a hold) cost a stat.
    """
    cutoff = now - DAY
    recent = stamp(cutoff)
    n = 0
    for e in Spool.scan(folder):
        if e.name[:STAMP_LEN] >= recent or (Spool.landed_at(e.path) or 0.0) >= cutoff:
            n += 1
    return n


def read_serve_state(spool: Spool) -> ServeState | None:
    """What ``serve`` last wrote about itself (state/serve.json), with a liveness verdict."""
    data = cast(ServeState, spool.read_json(spool.serve_state))
    if not data:
        return None
    running: bool | None
    pid = data.get("pid")
    if data.get("stopped_at"):
        running = False
    elif data.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
            running = True
        except ProcessLookupError:
            running = False
        except PermissionError:
            running = True
    else:
        running = None  # another host: we cannot tell from here
    data["running"] = running
    return data


def destination_state(spool: Spool, name: str, now: float) -> DestinationRow:
    """state/<dest>.json as written by the dispatcher, plus the flags, as one verdict."""
    raw = spool.read_json(spool.state_file(name))
    held = spool.has_flag(name, Flag.HOLD)
    flush = spool.has_flag(name, Flag.FLUSH)
    try:
        recorded = DestinationStatus(str(raw.get("state")))
    except ValueError:
        recorded = DestinationStatus.UNKNOWN
    until = raw.get("backoff_until")
    until_f = float(until) if isinstance(until, int | float) else None
    updated = parse_iso(raw.get("updated_at"))
    if held:
        verdict = DestinationStatus.HELD
    elif updated is not None and now - updated > STALE_AFTER:
        verdict = DestinationStatus.STALLED   # a live dispatcher rewrites it every heartbeat
    elif recorded is DestinationStatus.BACKOFF and until_f is not None and until_f <= now:
        verdict = DestinationStatus.RETRYING   # backoff over, the dispatcher is due to try
    else:
        verdict = recorded
    return DestinationRow(
        state=str(verdict), reported_state=raw.get("state"), held=held, flush_requested=flush,
        backoff_until=None if until_f is None else now_iso(until_f),
        backoff_until_epoch=until_f, consecutive_failures=raw.get("consecutive_failures"),
        state_updated_epoch=updated,
        last_error=raw.get("last_error"), last_success=raw.get("last_success"),
        state_updated_at=raw.get("updated_at"))


def _failover_row(spool: Spool, name: str) -> FailoverRow | None:
    rec = failover.read(spool, name)
    if rec is None:
        return None
    to = rec.get("to", "?")
    diverted, at_backup = failover.counts(spool, name, to)
    return FailoverRow(to=to, mode=rec.get("mode", "?"), since=rec.get("since", "?"),
                       reason=rec.get("reason", ""), diverted=diverted, at_backup=at_backup)


def snapshot(cfg: Settings, spool: Spool, now: float | None = None,
             success: bool = True) -> Snapshot:
    """Everything ``status`` shows, as plain data (also what metrics exports)."""
    now = time.time() if now is None else now
    bounds = sorted(stamp(now - m * 60) for m in AGE_BUCKETS_MIN)  # ascending
    configured = {spool.dest_folder(n): n for n in cfg.destinations}
    on_disk = [*spool.destinations_on_disk(),
               *(p.dest for p in spool.places(Stage.ERROR) if p.dest)]
    names = list(dict.fromkeys([*cfg.destinations, *(configured.get(f, f) for f in on_disk)]))
    dests: dict[str, DestinationRow] = {}
    for name in names:
        t = _Tally()
        t.add(spool.outbox(name, "urgent"), bounds, now)
        urgent = t.queued
        for place in spool.places(Stage.FAILOVER, name):
            t.add(place.path, bounds, now)
        t.add(spool.outbox(name), bounds, now)
        active = _Tally()
        for place in spool.places(Stage.ACTIVE, name):
            active.add(place.path, bounds, None)
        oldest_names = [n for n in (t.oldest, active.oldest) if n]
        oldest = received_at(min(oldest_names)) if oldest_names else None
        d = DestinationRow(
            configured=name in cfg.destinations, queued=t.queued + active.queued,
            urgent=urgent, active=active.queued, due=t.due,
            oldest_received_at=None if oldest is None else now_iso(oldest),
            oldest_age=None if oldest is None else max(0.0, now - oldest),
            age_buckets=[a + b for a, b in zip(t.buckets, active.buckets, strict=True)],
            error=_count(spool.error_dir(name)))
        if success:
            d["success_24h"] = _success_24h(spool.success_dir(name), now)
        if name in cfg.destinations:
            d["address"] = destinations.describe(cfg.destinations[name])
            d.update(destination_state(spool, name, now))
            d["failover"] = _failover_row(spool, name)
        else:
            d.update(DestinationRow(state=str(DestinationStatus.NOT_CONFIGURED), held=False,
                                    last_error=None))
        d["commitment"] = commitment.summary(spool, name, cfg.destinations.get(name), now)
        dests[name] = d
    drop, drop_capped = _count_files(spool.drop, DROP_COUNT_CAP)
    free = spool.free_mb()
    return Snapshot(
        spool=str(spool.root), config=str(cfg.path), at=now_iso(now), free_mb=round(free, 1),
        min_free_mb=cfg.spool.min_free_mb, low_space=free < cfg.spool.min_free_mb,
        serve=read_serve_state(spool), age_buckets_minutes=list(AGE_BUCKETS_MIN),
        destinations=dests,
        folders=Folders(
            # and files put there by hand (the router hands them to the intake)
            incoming=_count(spool.incoming) + sum(
                1 for p in spool.misplaced(spool.incoming) if p.suffix not in (".json", ".dcm")),
            pending=sum(_count(p.path) for p in spool.places(Stage.PENDING)),
            drop=drop, drop_capped=drop_capped, error=_count(spool.error_dir()),
            discard=_count(spool.discard)),
        tls_certificate_expires=_cert_expiry(cfg),
        draining=spool.read_json(spool.drain_file) or None,
        spool_id=str(spool.read_json(spool.state / "spool.json").get("id") or "") or None,
        owner=ownership.owner(spool) or None,
        alerts=open_alerts(spool))


def _cert_expiry(cfg: Settings) -> str | None:
    t = cfg.receiver.tls
    when = tls.not_after(t.cert_file) if t is not None else None
    return None if when is None else now_iso(when)


# ---------------------------------------------------------------- text


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _state_text(d: DestinationRow, now: float) -> str:
    st = d.get("state")
    until = d.get("backoff_until_epoch")
    if st == DestinationStatus.BACKOFF and until:
        return f"backoff, retry in {human_age(until - now)}"
    if st == DestinationStatus.HELD:
        return "HELD"
    if st == DestinationStatus.MISCONFIGURED:
        return "MISCONFIGURED"
    if st == DestinationStatus.UNKNOWN:
        return "no report yet"
    if st == DestinationStatus.STALLED:
        return f"STALLED (no report for {human_age(now - (d.get('state_updated_epoch') or now))})"
    if d.get("flush_requested"):
        return f"{st}, flush asked"
    return str(st)


def failover_text(d: DestinationRow, now: float) -> str | None:
    """``failed over to backup since ... (divert), 312 diverted``."""
    fo = d.get("failover")
    if not fo:
        return None
    since = parse_iso(fo["since"])
    ago = f" ({human_age(now - since)} ago)" if since is not None else ""
    moved = f"{fo['diverted']} diverted, " if fo["mode"] == "divert" else ""
    return (f"failed over to {fo['to']} since {fo['since']}{ago} ({fo['mode']}), "
            f"{moved}{fo['at_backup']} waiting at {fo['to']}")


def commitment_text(d: DestinationRow, now: float) -> str | None:
    """``storage commitment required: 12 awaiting, oldest 3m``, NOT COMMITTING when silent."""
    c = d.get("commitment")
    if not c:
        return None
    text = (f"storage commitment {c.get('mode')}: {c.get('awaiting', 0)} awaiting commitment"
            + (f", oldest {human_age(c['oldest_wait'])}" if c.get("oldest_wait") else ""))
    if c.get("unsent"):
        text += f", {c['unsent']} request(s) not sent yet"
    if c.get("not_committing_since"):
        text += (f" - NOT COMMITTING since {c['not_committing_since']} (no report, asked "
                 "twice; nothing is resent: `hermes-py flush` asks again)")
    return text


def error_text(err: object, now: float, width: int = 70) -> str:
    """``3m ago: connection refused: ...``: an old error must not read as a current one."""
    if not isinstance(err, dict):
        return "-"
    parts = [str(err[k]) for k in ("kind", "class", "status", "reason", "detail")
             if err.get(k)]
    text = ": ".join(dict.fromkeys(parts)) or "-"
    at = parse_iso(err.get("at"))
    if at is not None:
        text = f"{human_age(now - at)} ago: {text}"
    return text if len(text) <= width else text[: width - 3] + "..."


def _serve_line(serve: ServeState | None) -> str:
    if serve is None:
        return "serve: never started on this spool"
    since = serve.get("started_at", "?")
    where = f"pid {serve.get('pid')} on {serve.get('host')}"
    if serve.get("running") is True:
        kids = serve.get("children") or []
        restarts = sum(int(c.get("restarts", 0)) for c in kids)
        down = [str(c.get("name")) for c in kids if not c.get("pid")]
        extra = f", {restarts} child restart(s)" if restarts else ""
        extra += f", DOWN: {', '.join(down)}" if down else ""
        return f"serve: running ({where}, since {since}{extra})"
    if serve.get("running") is None:
        return f"serve: {where} (another host; cannot check from here)"
    return (f"serve: NOT running (last: {where}, "
            f"stopped {serve.get('stopped_at') or 'without a clean stop'})")


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]], left: int) -> list[str]:
    """Columns padded to their widest cell: the first ``left`` left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in (head, *rows)]


def format_status(snap: Snapshot, now: float) -> str:
    free = f"free {human_mb(snap['free_mb'])}"
    if snap["low_space"]:
        free += f" - BELOW min_free_mb {snap['min_free_mb']}: the receiver refuses C-STOREs"
    lines = [f"spool {snap['spool']}  ({free})", _serve_line(snap["serve"])]
    own = snap.get("owner")
    if own:
        lines.append(f"spool id {snap.get('spool_id') or '?'}, owned by serve pid "
                     f"{own.get('pid')} on {own.get('host')} (epoch {own.get('epoch')}, "
                     f"since {own.get('since')})")
    drained = snap.get("draining")
    if drained:
        lines.append(f"DRAINING since {drained.get('at', '?')} (by {drained.get('by', '?')}): "
                     "new associations are refused; `hermes-py undrain` ends it")
    expires = snap.get("tls_certificate_expires")
    if expires:
        left = (parse_iso(expires) or now) - now
        warn = " - RENEW IT" if left < 30 * DAY else ""
        lines.append(f"receiver TLS certificate expires {expires} "
                     f"({'in ' + human_age(left) if left > 0 else 'EXPIRED'}){warn}")
    lines.append("")
    dests = snap["destinations"]
    if not dests:
        lines.append("no destinations configured")
    else:
        head = ("DESTINATION", "STATE", "QUEUED", "DUE", "ACTIVE", "OLDEST", "ERROR",
                "SENT 24H")
        rows = [(name, _state_text(d, now), str(d.get("queued")), str(d.get("due")),
                 str(d.get("active")), human_age(d.get("oldest_age")), str(d.get("error")),
                 str(d.get("success_24h", "-"))) for name, d in dests.items()]
        table = _table(head, rows, left=2)
        errors = ["LAST ERROR", *(error_text(d.get("last_error"), now) for d in dests.values())]
        lines += [f"{row}  {err}" for row, err in zip(table, errors, strict=True)]
        lines += [f"{name}: {t}" for name, d in dests.items()
                  if (t := failover_text(d, now)) is not None]
        lines += [f"{name}: {t}" for name, d in dests.items()
                  if (t := commitment_text(d, now)) is not None]
        # qshape: how old the queued instances are, per destination
        lines.append("")
        bhead = ("AGE (min)", "TOTAL", *(str(m) for m in AGE_BUCKETS_MIN),
                 f"{AGE_BUCKETS_MIN[-1]}+")
        brows = [(n, str(d.get("queued")), *(str(x) for x in d.get("age_buckets", [])))
                 for n, d in dests.items()]
        lines += _table(bhead, brows, left=1)
    alert_lines = alerts_text(snap.get("alerts"))
    if alert_lines:
        lines += ["", *alert_lines]
    f = snap["folders"]
    drop = f"{f['drop']}+" if f["drop_capped"] else str(f["drop"])
    lines.append("")
    lines.append(f"incoming/ {f['incoming']}   pending/ {f['pending']}   drop/ {drop}   "
                 f"error/ (unreadable) {f['error']}   discard/ {f['discard']}")
    return "\n".join(lines)


@dataclass
class Status(Result):
    snapshot: Snapshot
    now: float

    def text(self) -> str:
        return format_status(self.snapshot, self.now)

    def to_json(self) -> Any:
        return json.loads(json.dumps(self.snapshot, default=str))


def status(cfg: Settings) -> Status:
    spool = open_spool(cfg)
    now = time.time()
    return Status(snapshot(cfg, spool, now), now)


@dataclass
class Statuses(Result):
    """``status --spools A,B``: several routers' spools (same rules.toml) in one view."""

    each: dict[str, Status]

    def text(self) -> str:
        return "\n\n".join(f"== {path}\n{st.text()}" for path, st in self.each.items())

    def to_json(self) -> Any:
        return {path: st.to_json() for path, st in self.each.items()}


def statuses(cfg: Settings, spools: list[str]) -> Statuses:
    """Read-only: each spool with this configuration's destinations (plus what is on disk)."""
    each = {}
    for raw in spools:
        path = Path(raw).expanduser().resolve()
        other = dataclasses.replace(cfg, spool=dataclasses.replace(cfg.spool, path=path))
        each[str(path)] = status(other)
    return Statuses(each)
