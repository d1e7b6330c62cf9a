"""The admin verbs: a glance at the queues, an investigation tool, and safe fixes.

Postfix is the model: ``status`` is qshape (destinations x age, from directory
listings only), ``find`` is the investigation tool that may read sidecars,
``retry``/``hold``/``release``/``flush`` are postsuper/postqueue, ``purge`` deletes
only what an explicit selection names and only with ``--yes``.

Every verb works on the spool folders and flags alone, so it works the same
whether ``serve`` runs or not, on this host or another one sharing the spool.
None of them creates a spool: a mistyped ``-c`` must not grow an empty spool
that nothing serves.
"""

from __future__ import annotations

import bisect
import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from hermes_py import log
from hermes_py.config import DestinationSettings, Settings, parse_duration
from hermes_py.errors import HermesError
from hermes_py.spool import (
    DCM,
    JSON,
    URGENT,
    Spool,
    copy_into_tmp,
    fsync_dir,
    is_name,
    next_attempt_of,
    now_iso,
    parse_iso,
    received_at,
    sanitize,
)

LOG = logging.getLogger(__name__)

# qshape's age buckets (minutes): each column counts instances at most that old
# and older than the previous column; the last one is everything older.
AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
DAY = 86400.0
# Where a name's receive time ends: "20261128T051703.123456".
_STAMP = 22
# `drop/` can hold anything a person copied; status counts at most this many files there.
DROP_COUNT_CAP = 100_000
VERIFICATION = "1.2.840.10008.1.1"


def open_spool(cfg: Settings) -> Spool:
    """The configured spool, or a one-line error; never creates it."""
    root = cfg.spool.path
    if not root.is_dir():
        raise HermesError(f"spool folder {root} does not exist (is serve running with this "
                          f"config? {cfg.path})")
    return Spool(root)


def _dest_settings(cfg: Settings, name: str) -> DestinationSettings:
    try:
        return cfg.destinations[name]
    except KeyError:
        known = ", ".join(sorted(cfg.destinations)) or "none defined"
        raise HermesError(f"unknown destination {name!r} in {cfg.path} "
                          f"(defined: {known})") from None


def _stamp(t: float) -> str:
    """The receive-time prefix a spool name would have at time ``t`` (sorts like names)."""
    return f"{datetime.fromtimestamp(t, UTC):%Y%m%dT%H%M%S.%f}"


def _iso(t: float | None) -> str | None:
    return None if t is None else now_iso(t)


def human_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``2h13m``, ``3d04h``: an age that fits a column."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < DAY:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container: still record something
        return str(os.getuid())


# ---------------------------------------------------------------- status


@dataclass
class _Tally:
    """Counts of one set of folders, gathered from directory listings (+ one stat when due)."""

    queued: int = 0
    due: int = 0
    oldest: str | None = None          # smallest name = oldest receive time
    buckets: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS_MIN) + 1))


def _tally(folder: Path, into: _Tally, bounds: list[str], now: float | None) -> None:
    """Count ``*.dcm`` in one folder: queue depth, due (sidecar mtime <= now), ages.

    Ages come from the names (receive time), compared as strings against
    precomputed bucket bounds, so no date parsing and no JSON per instance;
    ``due`` costs one stat of the sidecar, the same one the dispatcher does.
    """
    try:
        it = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    with it:
        for e in it:
            name = e.name
            if not name.endswith(DCM) or name.startswith("."):
                continue
            into.queued += 1
            if into.oldest is None or name < into.oldest:
                into.oldest = name
            # bounds ascend (oldest first): a name newer than all of them is bucket 0
            # (at most 5 min old), one older than all of them the last (1280+ min)
            into.buckets[len(bounds) - bisect.bisect_right(bounds, name[:_STAMP])] += 1
            if now is not None and next_attempt_of(e.path) <= now:
                into.due += 1


def _count_dcm(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(DCM) and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _subdirs(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


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

    The dispatcher writes the success sidecar when it moves the instance, so its
    mtime is the delivery time. A name received in the last 24 h was necessarily
    delivered in the last 24 h and is counted from the listing alone; only older
    names (delivered late, after an outage or a hold) cost a stat.
    """
    cutoff = now - DAY
    recent = _stamp(cutoff)
    n = 0
    try:
        it = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with it:
        for e in it:
            name = e.name
            if not name.endswith(DCM) or name.startswith("."):
                continue
            if name[:_STAMP] >= recent:
                n += 1
                continue
            try:
                if os.stat(e.path[: -len(DCM)] + JSON).st_mtime >= cutoff:
                    n += 1
            except FileNotFoundError:
                continue
    return n


def read_serve_state(spool: Spool) -> dict[str, Any] | None:
    """What ``serve`` last wrote about itself (state/serve.json), with a liveness verdict."""
    data = spool.read_json(spool.state / "serve.json")
    if not data:
        return None
    running: bool | None
    if data.get("stopped_at"):
        running = False
    elif data.get("host") == socket.gethostname() and isinstance(data.get("pid"), int):
        try:
            os.kill(data["pid"], 0)
            running = True
        except ProcessLookupError:
            running = False
        except PermissionError:
            running = True
    else:
        running = None  # another host: we cannot tell from here
    data["running"] = running
    return data


def _dest_state(spool: Spool, name: str, now: float) -> dict[str, Any]:
    """state/<dest>.json as written by the dispatcher, plus the hold flag, as one verdict."""
    raw = spool.read_json(spool.state_file(name))
    held = spool.hold_flag(name).exists()
    flush = spool.flush_flag(name).exists()
    state = str(raw.get("state") or "unknown")
    until = raw.get("backoff_until")
    until_f = float(until) if isinstance(until, int | float) else None
    if held:
        verdict = "held"
    elif state == "backoff" and until_f is not None and until_f <= now:
        verdict = "retrying"   # backoff over, the dispatcher is due to try again
    else:
        verdict = state
    return {"state": verdict, "reported_state": raw.get("state"), "held": held,
            "flush_requested": flush, "backoff_until": _iso(until_f),
            "backoff_until_epoch": until_f,
            "consecutive_failures": raw.get("consecutive_failures"),
            "last_error": raw.get("last_error"), "last_success": raw.get("last_success"),
            "state_updated_at": raw.get("updated_at")}


def snapshot(cfg: Settings, spool: Spool, now: float | None = None,
             success: bool = True) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (also what metrics exports).

    Cost: one listing per folder and one stat per queued instance (for "due");
    no sidecar is opened except the per-destination state files.
    """
    now = time.time() if now is None else now
    bounds = sorted(_stamp(now - m * 60) for m in AGE_BUCKETS_MIN)  # ascending
    names = list(dict.fromkeys([*cfg.destinations, *spool.destinations_on_disk(),
                                *(p.name for p in _subdirs(spool.error))]))
    dests: dict[str, Any] = {}
    for name in names:
        t = _Tally()
        _tally(spool.outbox(name, URGENT), t, bounds, now)
        urgent = t.queued
        _tally(spool.outbox(name), t, bounds, now)
        active = _Tally()
        for wdir in _subdirs(spool.active / sanitize(name)):
            _tally(wdir, active, bounds, None)
        oldest_names = [n for n in (t.oldest, active.oldest) if n]
        oldest = received_at(min(oldest_names)) if oldest_names else None
        d: dict[str, Any] = {
            "configured": name in cfg.destinations,
            "queued": t.queued + active.queued,
            "urgent": urgent,
            "active": active.queued,
            "due": t.due,
            "oldest_received_at": _iso(oldest),
            "oldest_age": None if oldest is None else max(0.0, now - oldest),
            "age_buckets": [a + b for a, b in zip(t.buckets, active.buckets, strict=True)],
            "error": _count_dcm(spool.error_dir(name)),
        }
        if success:
            d["success_24h"] = _success_24h(spool.success_dir(name), now)
        if name in cfg.destinations:
            s = cfg.destinations[name]
            d["address"] = f"{s.ae_title}@{s.host}:{s.port}"
            d.update(_dest_state(spool, name, now))
        else:
            d.update({"state": "not configured", "held": False, "last_error": None})
        dests[name] = d
    pending = sum(_count_dcm(p) for p in _subdirs(spool.pending))
    drop, drop_capped = _count_files(spool.drop, DROP_COUNT_CAP)
    free = spool.free_mb()
    return {
        "spool": str(spool.root),
        "config": str(cfg.path),
        "at": now_iso(now),
        "free_mb": round(free, 1),
        "min_free_mb": cfg.spool.min_free_mb,
        "low_space": free < cfg.spool.min_free_mb,
        "serve": read_serve_state(spool),
        "age_buckets_minutes": list(AGE_BUCKETS_MIN),
        "destinations": dests,
        "folders": {
            "incoming": _count_dcm(spool.incoming),
            "pending": pending,
            "drop": drop,
            "drop_capped": drop_capped,
            "error": _count_dcm(spool.error),
            "discard": _count_dcm(spool.discard),
        },
    }


def _state_text(d: dict[str, Any], now: float) -> str:
    st = d.get("state")
    if st == "backoff" and d.get("backoff_until_epoch"):
        return f"backoff, retry in {human_age(d['backoff_until_epoch'] - now)}"
    if st == "held":
        return "HELD"
    if st == "misconfigured":
        return "MISCONFIGURED"
    if st == "unknown":
        return "no report yet"
    if d.get("flush_requested"):
        return f"{st}, flush asked"
    return str(st)


def _error_text(err: object, now: float, width: int = 70) -> str:
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


def format_status(snap: dict[str, Any], now: float) -> str:
    lines: list[str] = []
    serve = snap.get("serve")
    free = f"free {human_mb(snap['free_mb'])}"
    if snap["low_space"]:
        free += f" - BELOW min_free_mb {snap['min_free_mb']}: the receiver refuses C-STOREs"
    lines.append(f"spool {snap['spool']}  ({free})")
    if serve is None:
        lines.append("serve: never started on this spool")
    else:
        since = serve.get("started_at", "?")
        where = f"pid {serve.get('pid')} on {serve.get('host')}"
        if serve["running"] is True:
            kids = serve.get("children") or []
            restarts = sum(int(c.get("restarts", 0)) for c in kids)
            down = [c["name"] for c in kids if not c.get("pid")]
            extra = f", {restarts} child restart(s)" if restarts else ""
            extra += f", DOWN: {', '.join(down)}" if down else ""
            lines.append(f"serve: running ({where}, since {since}{extra})")
        elif serve["running"] is None:
            lines.append(f"serve: {where} (another host; cannot check from here)")
        else:
            lines.append(f"serve: NOT running (last: {where}, "
                         f"stopped {serve.get('stopped_at') or 'without a clean stop'})")
    lines.append("")
    dests = snap["destinations"]
    head = ("DESTINATION", "STATE", "QUEUED", "DUE", "ACTIVE", "OLDEST", "ERROR", "SENT 24H",
            "LAST ERROR")
    rows = []
    for name, d in dests.items():
        rows.append((name, _state_text(d, now), str(d["queued"]), str(d["due"]),
                     str(d["active"]), human_age(d["oldest_age"]), str(d["error"]),
                     str(d.get("success_24h", "-")), _error_text(d.get("last_error"), now)))
    if not rows:
        lines.append("no destinations configured")
    else:
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
        for r in (head, *rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:-1], widths[2:], strict=True)]
            lines.append("  ".join(cells) + "  " + r[-1])
        # qshape: how old the queued instances are, per destination
        lines.append("")
        bhead = ("AGE (min)", "TOTAL", *(str(m) for m in AGE_BUCKETS_MIN),
                 f"{AGE_BUCKETS_MIN[-1]}+")
        brows = [(n, str(d["queued"]), *(str(x) for x in d["age_buckets"]))
                 for n, d in dests.items()]
        bw = [max(len(r[i]) for r in (bhead, *brows)) for i in range(len(bhead))]
        for r in (bhead, *brows):
            lines.append("  ".join([r[0].ljust(bw[0])]
                                   + [c.rjust(w) for c, w in zip(r[1:], bw[1:], strict=True)]))
    f = snap["folders"]
    drop = f"{f['drop']}+" if f["drop_capped"] else str(f["drop"])
    lines.append("")
    lines.append(f"incoming/ {f['incoming']}   pending/ {f['pending']}   drop/ {drop}   "
                 f"error/ (unreadable) {f['error']}   discard/ {f['discard']}")
    return "\n".join(lines)


def status(cfg: Settings, as_json: bool = False) -> int:
    spool = open_spool(cfg)
    now = time.time()
    snap = snapshot(cfg, spool, now)
    if as_json:
        print(json.dumps(snap, indent=2, default=str))
    else:
        print(format_status(snap, now))
    return 0


# ---------------------------------------------------------------- find


@dataclass
class Location:
    folder: str                 # relative to the spool root, e.g. "outgoing/pacs"
    destination: str | None
    path: Path
    sidecar: dict[str, Any]


def _uid_of_name(stem: str) -> str | None:
    """The sanitised SOP Instance UID a spool name carries (between stamp and random)."""
    return stem[_STAMP + 1: -9] if is_name(stem) else None


def _where(spool: Spool) -> Iterator[tuple[str, str | None, Path]]:
    """Every folder an instance can be in: (relative name, destination, path)."""
    yield "incoming", None, spool.incoming
    for p in _subdirs(spool.pending):
        yield f"pending/{p.name}", None, p
    for d in _subdirs(spool.outgoing):
        yield f"outgoing/{d.name}/urgent", d.name, d / URGENT
        yield f"outgoing/{d.name}", d.name, d
    for d in _subdirs(spool.active):
        for w in _subdirs(d):
            yield f"active/{d.name}/{w.name}", d.name, w
    for d in _subdirs(spool.success):
        yield f"success/{d.name}", d.name, d
    yield "error", None, spool.error
    for d in _subdirs(spool.error):
        yield f"error/{d.name}", d.name, d
    yield "discard", None, spool.discard


def _header_uids(dcm: Path) -> dict[str, str]:
    """Study/series/SOP UIDs from the file itself, for sidecars written before routing."""
    try:
        from pydicom import dcmread
        ds = dcmread(dcm, stop_before_pixels=True, force=True,
                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    except Exception:
        return {}
    out = {}
    for kw, key in (("StudyInstanceUID", "study_instance_uid"),
                    ("SeriesInstanceUID", "series_instance_uid"),
                    ("SOPInstanceUID", "sop_instance_uid")):
        v = ds.get(kw)
        if v:
            out[key] = str(v)
    return out


def locate(spool: Spool, uid: str) -> tuple[str, list[Location]]:
    """Every copy of the instances ``uid`` names, and which kind of UID it was.

    SOP Instance UIDs are in the file names, so that pass is listings only.
    Study and series UIDs are only in sidecars (the router writes them): that
    pass reads each sidecar, and checks the raw bytes for the UID before
    parsing, so an investigation of a large spool stays in seconds.
    """
    target = sanitize(uid)
    found: list[Location] = []
    for rel, dest, folder in _where(spool):
        for e in spool.scan(folder):
            if _uid_of_name(e.name[: -len(DCM)]) == target:
                dcm = Path(e.path)
                found.append(Location(rel, dest, dcm, spool.read_sidecar(dcm)))
    if found:
        return "sop", found
    needle = uid.encode()
    kind = "study"
    for rel, dest, folder in _where(spool):
        for e in spool.scan(folder):
            dcm = Path(e.path)
            try:
                raw = Path(e.path[: -len(DCM)] + JSON).read_bytes()
            except OSError:
                raw = b""
            data: dict[str, Any] = {}
            if needle in raw:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw)
                    data = parsed if isinstance(parsed, dict) else {}
            elif b"study_instance_uid" in raw:
                continue  # the router read this one, and it is another study
            else:
                # not routed yet (incoming/, pending/, error/): ask the file itself
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw) if raw else {}
                    data = parsed if isinstance(parsed, dict) else {}
                data = {**_header_uids(dcm), **data}
            for key, what in (("study_instance_uid", "study"), ("series_instance_uid", "series"),
                              ("sop_instance_uid", "sop")):
                if data.get(key) == uid:
                    kind = what
                    found.append(Location(rel, dest, dcm, data))
                    break
    return kind, found


def _sop_key(loc: Location) -> str:
    return str(loc.sidecar.get("sop_instance_uid")
               or _uid_of_name(loc.path.name[: -len(DCM)]) or loc.path.name)


def _received_line(s: dict[str, Any]) -> str:
    src = s.get("source") or "?"
    if src == "network" or s.get("calling_ae"):
        peer = s.get("peer_address")
        port = s.get("peer_port")
        frm = f"{s.get('calling_ae', '?')}@{peer}" + (f":{port}" if port else "")
        text = f"from {frm} to {s.get('called_ae', '?')} (network)"
    else:
        text = f"from {s.get('original_path', '?')} ({src})"
    size = s.get("size")
    return f"{s.get('received_at', '?')} {text}" + (f", {size} bytes" if size else "")


def _location_line(loc: Location) -> list[str]:
    s = loc.sidecar
    state = loc.folder.split("/")[0]
    bits: list[str] = []
    if state == "outgoing":
        bits.append("queued" + (" (urgent)" if loc.folder.endswith("/urgent") else ""))
        bits.append(f"attempts {s.get('attempts', 0)}")
        if s.get("next_attempt"):
            bits.append(f"next attempt {s['next_attempt']}")
    elif state == "active":
        bits.append(f"being sent (claimed by worker {loc.folder.rsplit('/', 1)[-1]})")
    elif state == "success":
        bits.append(f"delivered {s.get('delivered_at', '?')}")
        if s.get("delivered_as"):
            bits.append(f"as {s['delivered_as']}")
        bits.append(f"attempts {s.get('attempts', '?')}")
        if s.get("warnings"):
            bits.append(f"warnings {', '.join(map(str, s['warnings']))}")
    elif state == "error":
        err = s.get("error") or {}
        bits.append(f"FAILED ({err.get('stage', '?')}) at {err.get('at', '?')}: "
                    f"{err.get('reason', 'no reason recorded')}")
    elif state == "discard":
        r = s.get("routing") or {}
        bits.append(f"discarded ({r.get('discarded_by') or 'no rule matched'})")
    elif state in ("incoming", "pending"):
        bits.append("waiting for the router" if state == "incoming"
                    else "held by a series/study rule until quiet")
    out = [f"  {(loc.destination or '-'):<12} {loc.folder + '/':<28} {', '.join(bits)}"]
    for h in s.get("history") or []:
        if isinstance(h, dict):
            words = [str(h[k]) for k in ("outcome", "status", "reason", "detail") if h.get(k)]
            # "0x0000" then "0x0000 Success": say it once
            words = [w for i, w in enumerate(words)
                     if not any(o.startswith(w) for o in words[i + 1:])]
            out.append(f"  {'':<12}   {h.get('at', '?')} {' '.join(words)}")
    return out


def format_find(uid: str, kind: str, found: list[Location], root: Path) -> str:
    groups: dict[str, list[Location]] = {}
    for loc in sorted(found, key=lambda x: x.path.name):
        groups.setdefault(_sop_key(loc), []).append(loc)
    what = {"sop": "SOP Instance", "study": "study", "series": "series"}[kind]
    lines = [f"{len(groups)} instance(s) of {what} {uid}, {len(found)} cop(ies) in the spool"]
    if len(groups) > 1:
        # a whole study at a glance before the per-instance detail
        where: dict[str, int] = {}
        for loc in found:
            key = "/".join(loc.folder.split("/")[:2]) if loc.folder.startswith("active/") \
                else loc.folder
            where[key] = where.get(key, 0) + 1
        lines.append("  " + ", ".join(f"{k}/ {n}" for k, n in sorted(where.items())))
    for sop, locs in groups.items():
        first = max((x.sidecar for x in locs), key=len)
        lines.append("")
        lines.append(f"SOP Instance {sop}")
        if first.get("study_instance_uid") or first.get("series_instance_uid"):
            lines.append(f"  study {first.get('study_instance_uid', '?')}  "
                         f"series {first.get('series_instance_uid', '?')}")
        lines.append(f"  received {_received_line(first)}")
        routing = first.get("routing")
        if isinstance(routing, dict):
            rules = ", ".join(f'"{r}"' for r in routing.get("rules") or []) or "no rule"
            to = ", ".join(routing.get("destinations") or []) or "nowhere"
            lines.append(f"  routed   {routing.get('at', '?')} by {rules} -> {to}")
        for loc in locs:
            lines.extend(_location_line(loc))
        for loc in locs:
            lines.append(f"  file     {loc.path.relative_to(root)}")
    return "\n".join(lines)


def find(cfg: Settings, uid: str, as_json: bool = False) -> int:
    spool = open_spool(cfg)
    uid = uid.strip()
    if not uid:
        raise HermesError("find needs a UID")
    kind, found = locate(spool, uid)
    if as_json:
        print(json.dumps({"uid": uid, "kind": kind if found else None, "copies": [
            {"folder": x.folder, "destination": x.destination,
             "path": str(x.path), "sidecar": x.sidecar} for x in found]}, indent=2, default=str))
    elif found:
        print(format_find(uid, kind, found, spool.root))
    else:
        print(f"no instance with UID {uid} in {spool.root} (looked for a SOP Instance, "
              "series or study UID in every folder but drop/)")
    return 0 if found else 1


# ---------------------------------------------------------------- retry, hold, release, flush


def _study_matches(spool: Spool, dcm: Path, data: dict[str, Any], study: str | None) -> bool:
    if study is None:
        return True
    have = data.get("study_instance_uid") or _header_uids(dcm).get("study_instance_uid")
    return have == study


def requeued_sidecar(data: dict[str, Any], dest: str, now: float) -> dict[str, Any]:
    """The sidecar of an instance an admin sends back to the outbox: counters reset.

    History is kept and gets an entry saying who retried it and why it had
    failed, so ``find`` still tells the whole story.
    """
    new = dict(data)
    err = new.pop("error", None)
    entry: dict[str, Any] = {"at": now_iso(now), "outcome": "retried",
                             "reason": "retried by admin (hermes-py retry)", "by": _user()}
    if err:
        entry["previous_error"] = err
    new["history"] = [*(data.get("history") or []), entry]
    new["destination"] = dest
    new.setdefault("priority", "normal")
    new["attempts"] = 0
    new["queued_at"] = now_iso(now)
    new["next_attempt"] = now_iso(now)
    return new


def retry(cfg: Settings, name: str | None, study: str | None = None) -> int:
    spool = open_spool(cfg)
    if name is not None and name not in cfg.destinations:
        raise HermesError(f"destination {name!r} is no longer in {cfg.path}: retried instances "
                          "would wait in an outbox no dispatcher serves (add it back, or "
                          f"`hermes-py purge error {name} ...`)")
    names = [name] if name else sorted(cfg.destinations)
    total = 0
    for dest in names:
        folder = spool.error_dir(dest)
        moved = 0
        now = time.time()
        for e in list(spool.scan(folder)):
            dcm = Path(e.path)
            data = spool.read_sidecar(dcm)
            if not _study_matches(spool, dcm, data, study):
                continue
            new = requeued_sidecar(data, dest, now)
            outbox = spool.outbox(dest, str(new.get("priority")))
            outbox.mkdir(parents=True, exist_ok=True)
            try:
                spool.move(dcm, outbox, sidecar=new, mtime=now)
            except FileNotFoundError:
                continue  # another admin moved it first
            moved += 1
            log.event(LOG, "retried", str(data.get("sop_instance_uid") or dcm.stem), dest,
                      by="admin", name=dcm.stem)
        if moved:
            fsync_dir(spool.outbox(dest))
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(spool.outbox(dest, URGENT))
            print(f"{dest}: moved {moved} instance(s) from error/{dest}/ back to "
                  f"outgoing/{dest}/ (attempts reset)")
            hint = _dest_state(spool, dest, now)
            if hint["state"] == "held":
                print(f"{dest}: note: the destination is held; `hermes-py release {dest}` "
                      "to send")
            elif hint["state"] == "backoff":
                print(f"{dest}: note: backing off until {hint['backoff_until']}; "
                      f"`hermes-py flush {dest}` to try now")
        total += moved
    if not total:
        what = f" of study {study}" if study else ""
        where = f"error/{name}/" if name else "error/<destination>/"
        print(f"nothing to retry: no instance{what} in {where}")
    return 0


def _flag(spool: Spool, path: Path, what: str) -> None:
    spool.state.mkdir(exist_ok=True)
    spool.write_json(path, {"flag": what, "at": now_iso(), "by": _user()})


def hold(cfg: Settings, name: str) -> int:
    _dest_settings(cfg, name)
    spool = open_spool(cfg)
    flag = spool.hold_flag(name)
    if flag.exists():
        print(f"{name}: already held (since {spool.read_json(flag).get('at', '?')})")
        return 0
    _flag(spool, flag, "hold")
    print(f"{name}: held. Instances keep queueing in outgoing/{name}/; nothing is sent "
          f"until `hermes-py release {name}`.")
    return 0


def release(cfg: Settings, name: str) -> int:
    _dest_settings(cfg, name)
    spool = open_spool(cfg)
    try:
        os.unlink(spool.hold_flag(name))
    except FileNotFoundError:
        print(f"{name}: was not held")
        return 0
    print(f"{name}: released; the dispatcher sends what is due")
    return 0


def flush(cfg: Settings, name: str) -> int:
    _dest_settings(cfg, name)
    spool = open_spool(cfg)
    _flag(spool, spool.flush_flag(name), "flush")
    print(f"{name}: flush requested; the dispatcher ignores backoff and next-attempt times "
          "once, then removes the flag")
    if spool.hold_flag(name).exists():
        print(f"{name}: note: the destination is held; nothing is sent until "
              f"`hermes-py release {name}`")
    return 0


# ---------------------------------------------------------------- purge


def purge(cfg: Settings, where: str, name: str | None, study: str | None = None,
          older_than: str | None = None, everything: bool = False, yes: bool = False) -> int:
    """Delete from error/ or discard/ only, only what the selection names, only with --yes."""
    if where not in ("error", "discard"):
        raise HermesError(f"purge deletes from error or discard only, not {where!r}")
    if where == "discard" and name:
        raise HermesError("discard/ has no per-destination folders: "
                          "purge discard (--all | --study UID | --older-than DURATION)")
    if not (everything or study or older_than):
        raise HermesError("say what to purge: --all, --study UID or --older-than DURATION "
                          "(nothing is deleted without a selection)")
    if everything and (study or older_than):
        raise HermesError("--all selects everything; it cannot be combined with --study or "
                          "--older-than")
    min_age: float | None = None
    if older_than:
        try:
            min_age = parse_duration(older_than)
        except ValueError as e:
            raise HermesError(f"--older-than: {e}") from None
    spool = open_spool(cfg)
    folder = spool.discard if where == "discard" else spool.error_dir(name)
    rel = folder.relative_to(spool.root)
    if not folder.is_dir():
        raise HermesError(f"{folder} does not exist")
    now = time.time()
    chosen: list[tuple[Path, dict[str, Any]]] = []
    for entry in spool.scan(folder):
        dcm = Path(entry.path)
        side = dcm.with_suffix(JSON)
        data = spool.read_json(side)
        if min_age is not None:
            # time it landed here: the sidecar is written on the move into error/ or discard/
            try:
                since = side.stat().st_mtime
            except FileNotFoundError:
                since = received_at(dcm.stem) or entry.stat().st_mtime
            if now - since < min_age:
                continue
        if not _study_matches(spool, dcm, data, study):
            continue
        chosen.append((dcm, data))
    chosen.sort(key=lambda c: c[0].name)
    if not yes:
        for dcm, data in chosen:
            reason = (data.get("error") or {}).get("reason") or \
                (data.get("routing") or {}).get("discarded_by") or ""
            print(f"would delete {rel}/{dcm.name}" + (f"  ({reason})" if reason else ""))
        print(f"{len(chosen)} instance(s) in {rel}/ match; nothing deleted "
              "(run again with --yes to delete them)")
        return 0
    deleted = 0
    for dcm, data in chosen:
        try:
            os.unlink(dcm)      # the .dcm is the commit point; then its sidecar
        except FileNotFoundError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dcm.with_suffix(JSON))
        deleted += 1
        log.event(LOG, "purged", str(data.get("sop_instance_uid") or dcm.stem), name,
                  folder=str(rel), by=_user())
    if deleted:
        fsync_dir(folder)
    print(f"deleted {deleted} instance(s) from {rel}/")
    return 0


# ---------------------------------------------------------------- echo


@dataclass
class EchoResult:
    name: str
    ok: bool
    text: str
    latency_ms: float | None = None


def echo_one(d: DestinationSettings) -> EchoResult:
    """C-ECHO one destination with its own calling AE and timeouts; say exactly what failed.

    A plain TCP connect comes first: pynetdicom reports "refused", "timed out" and
    "no route" all as the same aborted association, and an admin needs to know
    which one it was.
    """
    from pynetdicom import AE

    t0 = time.monotonic()
    try:
        with socket.create_connection((d.host, d.port), timeout=d.connection_timeout):
            pass
    except ConnectionRefusedError:
        return EchoResult(d.name, False, f"connection refused by {d.host}:{d.port} "
                                         "(nothing listens there)")
    except TimeoutError:
        return EchoResult(d.name, False, f"timeout: no TCP connection to {d.host}:{d.port} "
                                         f"within {d.connection_timeout:g}s")
    except socket.gaierror as e:
        return EchoResult(d.name, False, f"cannot resolve host {d.host!r}: {e.strerror}")
    except OSError as e:
        return EchoResult(d.name, False, f"cannot connect to {d.host}:{d.port}: "
                                         f"{e.strerror or e}")
    ae = AE(ae_title=d.calling_ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.connection_timeout = d.connection_timeout
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    ae.network_timeout = d.network_timeout
    t1 = time.monotonic()
    assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
    if assoc.is_established:
        t2 = time.monotonic()
        st = assoc.send_c_echo()
        t3 = time.monotonic()
        assoc.release()
        if not st:
            return EchoResult(d.name, False, "association accepted but no C-ECHO response "
                                             f"(timeout after {d.dimse_timeout:g}s or abort)")
        code = int(getattr(st, "Status", -1))
        if code != 0:
            return EchoResult(d.name, False, f"C-ECHO answered status 0x{code:04X}")
        total = (t3 - t0) * 1000
        return EchoResult(d.name, True, f"OK {total:.0f} ms (association {(t2 - t1) * 1000:.0f}"
                                        f" ms, C-ECHO {(t3 - t2) * 1000:.0f} ms)", total)
    prim = assoc.acceptor.primitive
    if assoc.is_rejected and prim is not None:
        kind = {1: "permanent", 2: "transient"}.get(prim.result or 0, f"result {prim.result}")
        return EchoResult(d.name, False,
                          f"rejected ({kind}) by {prim.source_str}: {prim.reason_str} "
                          f"[result {prim.result}, source {prim.result_source}, "
                          f"reason {prim.diagnostic}]"
                          + (" - check ae_title / calling_ae_title"
                             if prim.result_source == 1 and prim.diagnostic in (3, 7) else ""))
    if prim is not None and getattr(prim, "result", None) == 0:
        return EchoResult(d.name, False, "association accepted but the Verification SOP class "
                                         "was rejected (the peer does not answer C-ECHO)")
    waited = time.monotonic() - t1
    if waited >= d.acse_timeout * 0.9:
        return EchoResult(d.name, False, f"timeout: connected, but no association answer "
                                         f"within acse_timeout {d.acse_timeout:g}s")
    return EchoResult(d.name, False, "connected, but the peer aborted or closed the "
                                     "association request")


def echo(cfg: Settings, name: str | None) -> int:
    if name is not None:
        targets = [_dest_settings(cfg, name)]
    else:
        targets = [cfg.destinations[n] for n in sorted(cfg.destinations)]
        if not targets:
            raise HermesError(f"no destinations defined in {cfg.path}")
    # Our line says what failed; pynetdicom's own error lines would only repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    failed = 0
    width = max(len(t.name) for t in targets)
    for d in targets:
        r = echo_one(d)
        failed += not r.ok
        addr = f"{d.ae_title}@{d.host}:{d.port} as {d.calling_ae_title}"
        print(f"{d.name:<{width}}  {addr}  {'' if r.ok else 'FAILED '}{r.text}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- send


def _walk(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(source file, relative name in the drop batch) for files and folder trees."""
    for p in paths:
        if p.is_dir():
            base = p.resolve().name or "root"
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    src = Path(root) / f
                    yield src, Path(base) / src.relative_to(p)
        else:
            yield p, Path(p.name)


class _Progress:
    """A one-line progress bar on a terminal; nothing at all otherwise."""

    def __init__(self, total_files: int, total_bytes: int, stream: TextIO, enabled: bool):
        self.files = total_files
        self.bytes = total_bytes
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, done_files: int, done_bytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        frac = done_bytes / self.bytes if self.bytes else (done_files / max(self.files, 1))
        width = 30
        bar = "#" * int(frac * width)
        rate = done_bytes / max(now - self.t0, 1e-6) / 1e6
        self.stream.write(f"\r[{bar:<{width}}] {frac * 100:5.1f}%  {done_files}/{self.files} "
                          f"files  {done_bytes / 1e6:.1f} MB  {rate:.1f} MB/s ")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def send(cfg: Settings, paths: list[Path], progress: bool = True) -> int:
    """Copy files and folder trees into drop/, each file whole or not at all.

    Each file is copied into tmp/ (same filesystem as drop/), fsynced, then
    renamed into ``drop/send-<time>-<random>/<its relative path>``: the intake
    never sees a half-copied file, and validates these like any dropped file
    (non-DICOM files end in error/ with a reason). The batch folder keeps two
    sends of files with the same names from overwriting each other.
    """
    spool = open_spool(cfg)
    if not cfg.intake.enabled:
        raise HermesError(f"the drop folder intake is disabled ([intake] enabled = false in "
                          f"{cfg.path}): sent files would never be routed")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise HermesError(f"no such file or folder: {missing[0]}")
    items: list[tuple[Path, Path, int]] = []
    for src, rel in _walk(paths):
        try:
            st = src.stat()
        except OSError as e:
            raise HermesError(f"cannot read {src}: {e.strerror}") from None
        if not os.path.isfile(src):
            continue  # sockets, fifos: nothing to send
        items.append((src, rel, st.st_size))
    if not items:
        raise HermesError("nothing to send: no files under " + ", ".join(map(str, paths)))
    # Two command-line paths may end in the same name: keep both.
    seen: set[Path] = set()
    for i, (src, rel, size) in enumerate(items):
        n = 1
        cand = rel
        while cand in seen:
            n += 1
            cand = rel.with_name(f"{rel.stem}~{n}{rel.suffix}")
        seen.add(cand)
        items[i] = (src, cand, size)
    spool.tmp.mkdir(exist_ok=True)
    batch = spool.drop / f"send-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
    total_bytes = sum(s for _, _, s in items)
    bar = _Progress(len(items), total_bytes, sys.stderr, progress and sys.stderr.isatty())
    done = done_bytes = 0
    dirs: set[Path] = set()
    try:
        for src, rel, size in items:
            target = batch / rel
            if target.parent not in dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(target.parent)
            try:
                tmp = copy_into_tmp(spool, src, suffix=".send")
            except OSError as e:
                raise HermesError(f"cannot copy {src}: {e.strerror or e}") from None
            os.replace(tmp, target)
            done += 1
            done_bytes += size
            bar.update(done, done_bytes)
    finally:
        for d in dirs:
            with contextlib.suppress(OSError):
                fsync_dir(d)
        with contextlib.suppress(OSError):
            fsync_dir(spool.drop)
        bar.update(done, done_bytes, final=True)
    serve = read_serve_state(spool)
    running = bool(serve and serve.get("running") is not False)
    after = ("the router picks them up from there" if running else
             "serve is not running: they are routed once `hermes-py serve` (or "
             "`hermes-py route`) runs")
    print(f"sent {done} file(s), {done_bytes / 1e6:.1f} MB into "
          f"{batch.relative_to(spool.root)}/; {after}")
    return 0
