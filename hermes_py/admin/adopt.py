"""``hermes-py adopt PATH``: take over the queues of another router's spool, retired or fenced.

dcm4chee's "reschedule to newDeviceName", done with folders: the other spool's
outboxes, claims, error/ and unfinished commitments come into this spool, at least
once (spool/adopt.py says how and why a crash costs nothing). Refused while
anything holds a lock there (its serve is alive: stop it, or fence its node
first), for this spool itself, and for destinations this rules.toml does not
have unless ``--map OLD=NEW`` says where their work goes. ``--dry-run`` only
counts.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from hermes_py.admin import Result, current_user, open_spool
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.spool import Spool, now_iso
from hermes_py.spool import sidecar as sc
from hermes_py.spool.adopt import Adoption, SpoolBusy, Step, Tally, hold_locks

LOG = logging.getLogger(__name__)


@dataclass
class Adopted(Result):
    source: str
    source_id: str
    dry_run: bool
    moves: list[dict[str, object]] = field(default_factory=list)   # stage, from, to, count
    already: int = 0
    warning: str = ""

    @property
    def total(self) -> int:
        return sum(int(str(m["count"])) for m in self.moves)

    def text(self) -> str:
        verb = "would adopt" if self.dry_run else "adopted"
        lines = [f"{verb} {self.total} instance(s) from {self.source} "
                 f"(spool id {self.source_id or '?'})"]
        if self.warning:
            lines.append(f"warning: {self.warning}")
        width = max((len(str(m["stage"])) for m in self.moves), default=5)
        for m in self.moves:
            lines.append(f"  {str(m['stage']).ljust(width)}  {m['from']} -> {m['to']}: "
                         f"{m['count']}")
        if self.already:
            lines.append(f"  {self.already} already here (an earlier, interrupted adopt): "
                         "removed from the old spool only")
        return "\n".join(lines)


def parse_map(cfg: Settings, pairs: list[str]) -> dict[str, str]:
    """``--map OLD=NEW`` (repeatable): NEW must be one of this rules.toml's destinations."""
    out: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise HermesError(f"--map {pair!r}: write OLD=NEW (a destination of the old "
                              "spool, one of this rules.toml)")
        cfg.destination(new.strip())
        out[Spool.dest_folder(old.strip())] = new.strip()
    return out


def _fenced_warning(old: Spool) -> str:
    rec = old.read_json(old.state / "owner.json")
    host = rec.get("host")
    if host and host != socket.gethostname():
        return (f"its last owner was serve pid {rec.get('pid')} on {host} (epoch "
                f"{rec.get('epoch')}): its locks are not visible from here, so make sure "
                "that node is fenced or stopped")
    return ""


def adopt(cfg: Settings, path: Path | str, mapping: list[str] | None = None,
          dry_run: bool = False, by: str | None = None,
          on_step: Step | None = None) -> Adopted:
    spool = open_spool(cfg)
    root = Path(path).expanduser().resolve()
    if not (root / "state").is_dir() or not (root / "outgoing").is_dir():
        raise HermesError(f"{root} is not a hermes-py spool (no state/ and outgoing/ there)")
    if root == spool.root.resolve():
        raise HermesError(f"{root} is this router's own spool ({cfg.path})")
    old = Spool(root)
    source_id = str(old.read_json(old.state / "spool.json").get("id") or "")
    own_id = str(spool.read_json(spool.state / "spool.json").get("id") or "")
    if source_id and source_id == own_id:
        raise HermesError(f"{root} has this spool's id {own_id}: a copy of it, not another "
                          "spool")
    dest_map = {Spool.dest_folder(n): n for n in cfg.destinations}
    dest_map.update(parse_map(cfg, mapping or []))
    who = by or current_user()
    record = sc.Adopted(from_spool_id=source_id, from_path=str(root), at=now_iso(), by=who)
    try:
        locks = hold_locks(old)
    except SpoolBusy as e:
        raise HermesError(f"{root} is alive: {e.path.relative_to(root)} is locked (its serve, "
                          "a router or a dispatcher runs); stop it, or fence its node, "
                          "then adopt") from None
    try:
        adoption = Adoption(spool, old, dest_map, record, on_step)
        plan = adoption.plan()
        if plan.unknown:
            known = ", ".join(sorted(cfg.destinations)) or "none"
            raise HermesError(f"{root} holds work for destination(s) this rules.toml does not "
                              f"have: {', '.join(sorted(plan.unknown))} (defined: {known}); "
                              "add them, or say where it goes with --map OLD=NEW")
        tally = plan if dry_run else adoption.run()
        if not dry_run:
            old.write_json(old.state / "adopted.json",
                           {"by_spool": own_id, "into": str(spool.root), "at": record["at"],
                            "by": who, "pid": os.getpid(),
                            "instances": sum(tally.moved.values())})
            LOG.warning("adopted %d instance(s) from spool %s (%s), asked by %s",
                        sum(tally.moved.values()), root, source_id or "?", who)
    finally:
        for lock in locks:
            lock.release()
    return _result(str(root), source_id, dry_run, tally, _fenced_warning(old))


def _result(source: str, source_id: str, dry_run: bool, tally: Tally, warning: str) -> Adopted:
    moves: list[dict[str, object]] = [
        {"stage": stage, "from": old, "to": new, "count": n}
        for (stage, old, new), n in sorted(tally.moved.items())]
    return Adopted(source, source_id, dry_run, moves, tally.already, warning)
