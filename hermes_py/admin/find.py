"""``hermes-py find UID``: where every copy of an instance, series or study is, and its story.

SOP Instance UIDs are in the file names, so that pass is listings only. Study
and series UIDs are only in sidecars (the router writes them): that pass reads
each sidecar, and checks the raw bytes for the UID before parsing, so an
investigation of a large spool stays in seconds. drop/ is not searched (files
there have no sidecar yet).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes_py import dicomfile
from hermes_py.admin import Result, open_spool
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.lifecycle import Stage
from hermes_py.spool import DCM, JSON, Place, Spool
from hermes_py.spool import sidecar as sc
from hermes_py.spool.names import uid_of_name


@dataclass
class Location:
    """One copy: its stage and folder (relative to the spool root), file and sidecar."""

    stage: Stage
    folder: str                 # e.g. "outgoing/pacs/urgent"
    destination: str | None
    path: Path
    sidecar: sc.Sidecar
    worker: str | None = None   # the claiming worker, in active/

    @classmethod
    def of(cls, spool: Spool, place: Place, dcm: Path, sidecar: sc.Sidecar) -> Location:
        worker = place.part if place.stage is Stage.ACTIVE else None
        return cls(place.stage, place.rel(spool.root), place.dest, dcm, sidecar, worker)


def locate(spool: Spool, uid: str) -> tuple[str, list[Location]]:
    """Every copy of the instances ``uid`` names, and which kind of UID it was."""
    found = [Location.of(spool, place, dcm, spool.read_sidecar(dcm))
             for place, dcm in spool.copies(uid=uid)]
    if found:
        return "sop", found
    needle = uid.encode()
    kind = "study"
    for place in spool.places():
        for e in spool.scan(place.path):
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
                data = {**dicomfile.header_uids(dcm), **data}
            for key, what in (("study_instance_uid", "study"), ("series_instance_uid", "series"),
                              ("sop_instance_uid", "sop")):
                if data.get(key) == uid:
                    kind = what
                    found.append(Location.of(spool, place, dcm, sc.of(data)))
                    break
    return kind, found


def _sop_key(loc: Location) -> str:
    return str(loc.sidecar.get("sop_instance_uid")
               or uid_of_name(loc.path.name[: -len(DCM)]) or loc.path.name)


def _received_line(s: sc.Sidecar) -> str:
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


def _state_words(loc: Location) -> list[str]:
    """What this copy's stage means for it, in the words of its own sidecar."""
    s = loc.sidecar
    st = loc.stage
    if st in (Stage.OUTGOING, Stage.URGENT):
        bits = ["queued" + (" (urgent)" if st is Stage.URGENT else ""),
                f"attempts {s.get('attempts', 0)}"]
        if s.get("next_attempt"):
            bits.append(f"next attempt {s.get('next_attempt')}")
        return bits
    if st is Stage.FAILOVER:
        took = s.get("failover") or {}
        return [f"queued here as the failover of {took.get('from', '?')} "
                f"({took.get('mode', '?')}, {took.get('at', '?')})",
                f"attempts {s.get('attempts', 0)}"]
    if st is Stage.DIVERTED:
        gave = s.get("failover") or {}
        return [f"diverted: delivered via {gave.get('to', '?')} (failed over "
                f"{gave.get('at', '?')}: {gave.get('reason', '')})"]
    if st is Stage.ACTIVE:
        return [f"being sent (claimed by worker {loc.worker})"]
    if st is Stage.COMMITTING:
        return [f"stored {s.get('delivered_at', '?')}, awaiting the destination's storage "
                "commitment", f"attempts {s.get('attempts', '?')}"]
    if st is Stage.SUCCESS:
        bits = [f"delivered {s.get('delivered_at', '?')}"]
        if s.get("delivered_as"):
            bits.append(f"as {s.get('delivered_as')}")
        bits.append(f"attempts {s.get('attempts', '?')}")
        if s.get("warnings"):
            bits.append(f"warnings {', '.join(map(str, s.get('warnings') or []))}")
        fo = s.get("failover")
        if fo and fo.get("to") == loc.destination:
            bits.append(f"as the failover of {fo.get('from', '?')} ({fo.get('mode', '?')})")
        if s.get("committed_at"):
            bits.append(f"committed {s.get('committed_at')}")
        if s.get("commit_failed"):
            bits.append(f"NOT committed: {(s.get('commit_failed') or {}).get('reason', '?')}")
        again = s.get("resent")
        if again:
            bits.append(f"resent from {again.get('from', '?')} by {again.get('by', '?')}")
        return bits
    if st is Stage.ERROR:
        err = s.get("error") or {}
        return [f"FAILED ({err.get('stage', '?')}) at {err.get('at', '?')}: "
                f"{err.get('reason', 'no reason recorded')}"]
    if st is Stage.DISCARD:
        r = s.get("routing") or {}
        return [f"discarded ({r.get('discarded_by') or 'no rule matched'})"]
    if st is Stage.INCOMING:
        return ["waiting for the router"]
    return [st.facts.meaning]


def _location_lines(loc: Location) -> list[str]:
    out = [f"  {(loc.destination or '-'):<12} {loc.folder + '/':<28} "
           f"{', '.join(_state_words(loc))}"]
    for h in loc.sidecar.get("history") or []:
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
            key = "/".join(loc.folder.split("/")[:2]) if loc.stage is Stage.ACTIVE \
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
            lines.extend(_location_lines(loc))
        for loc in locs:
            lines.append(f"  file     {loc.path.relative_to(root)}")
    return "\n".join(lines)


@dataclass
class Found(Result):
    uid: str
    kind: str
    root: Path
    copies: list[Location] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.copies else 1

    def text(self) -> str:
        if self.copies:
            return format_find(self.uid, self.kind, self.copies, self.root)
        return (f"no instance with UID {self.uid} in {self.root} (looked for a SOP Instance, "
                "series or study UID in every folder but drop/)")

    def to_json(self) -> Any:
        return {"uid": self.uid, "kind": self.kind if self.copies else None, "copies": [
            {"folder": x.folder, "stage": str(x.stage), "destination": x.destination,
             "path": str(x.path), "sidecar": x.sidecar} for x in self.copies]}


def find(cfg: Settings, uid: str) -> Found:
    spool = open_spool(cfg)
    uid = uid.strip()
    if not uid:
        raise HermesError("find needs a UID")
    kind, found = locate(spool, uid)
    return Found(uid, kind, spool.root, found)
