"""The verbs that change a queue: retry, hold, release, flush (postsuper/postqueue) and purge.

Each records who asked (``by``), in the sidecar history and in its event.
``purge`` deletes only from error/ and discard/, only what an explicit
selection names, and only with ``yes``; without it, it says what it would delete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hermes_py import dicomfile
from hermes_py.admin import Result, current_user, open_spool
from hermes_py.admin.status import destination_state
from hermes_py.config import Settings
from hermes_py.durations import parse_duration
from hermes_py.errors import HermesError
from hermes_py.events import emit
from hermes_py.lifecycle import DestinationStatus, Event
from hermes_py.spool import Flag, Spool, received_at
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)


def _study_matches(dcm: Path, data: sc.Sidecar, study: str | None) -> bool:
    if study is None:
        return True
    have = data.get("study_instance_uid") or dicomfile.header_uids(dcm).get("study_instance_uid")
    return have == study


# ---------------------------------------------------------------- retry


@dataclass
class Requeued:
    destination: str
    moved: int
    state: str          # the destination's state right after (held/backoff need a hint)
    backoff_until: str | None = None


@dataclass
class Retried(Result):
    destinations: list[Requeued] = field(default_factory=list)
    study: str | None = None
    only: str | None = None

    @property
    def total(self) -> int:
        return sum(r.moved for r in self.destinations)

    def text(self) -> str:
        lines = []
        for r in self.destinations:
            if not r.moved:
                continue
            lines.append(f"{r.destination}: moved {r.moved} instance(s) from "
                         f"error/{r.destination}/ back to outgoing/{r.destination}/ "
                         "(attempts reset)")
            if r.state == DestinationStatus.HELD:
                lines.append(f"{r.destination}: note: the destination is held; "
                             f"`hermes-py release {r.destination}` to send")
            elif r.state == DestinationStatus.BACKOFF:
                lines.append(f"{r.destination}: note: backing off until {r.backoff_until}; "
                             f"`hermes-py flush {r.destination}` to try now")
        if not self.total:
            what = f" of study {self.study}" if self.study else ""
            where = f"error/{self.only}/" if self.only else "error/<destination>/"
            lines.append(f"nothing to retry: no instance{what} in {where}")
        return "\n".join(lines)


def retry(cfg: Settings, name: str | None, study: str | None = None,
          by: str | None = None) -> Retried:
    """error/<dest>/ back to the outbox, counters reset, history kept (one destination or all)."""
    spool = open_spool(cfg)
    if name is not None and name not in cfg.destinations:
        raise HermesError(f"destination {name!r} is no longer in {cfg.path}: retried instances "
                          "would wait in an outbox no dispatcher serves (add it back, or "
                          f"`hermes-py purge error {name} ...`)")
    who = by or current_user()
    out = Retried(study=study, only=name)
    for dest in [name] if name else sorted(cfg.destinations):
        moved = 0
        now = time.time()
        for e in list(spool.scan(spool.error_dir(dest))):
            dcm = Path(e.path)
            data = spool.read_sidecar(dcm)
            if not _study_matches(dcm, data, study):
                continue
            new = sc.requeued(data, dest, now, who)
            outbox = spool.outbox(dest, str(new.get("priority")))
            outbox.mkdir(parents=True, exist_ok=True)
            try:
                spool.move(dcm, outbox, sidecar=new, mtime=now)
            except FileNotFoundError:
                continue  # another admin moved it first
            moved += 1
            emit(LOG, Event.RETRIED, str(data.get("sop_instance_uid") or dcm.stem), dest,
                 by=who, name=dcm.stem)
        if moved:
            spool.sync_dirs(spool.outboxes(dest))
        st = destination_state(spool, dest, now)
        out.destinations.append(Requeued(dest, moved, st.get("state", ""),
                                         st.get("backoff_until")))
    return out


# ---------------------------------------------------------------- hold, release, flush


@dataclass
class Flagged(Result):
    destination: str
    verb: str           # "hold", "release", "flush"
    changed: bool       # False: already held / was not held
    since: str | None = None
    held: bool = False  # the destination is held (a flush waits for the release)

    def text(self) -> str:
        d = self.destination
        if self.verb == "hold":
            if not self.changed:
                return f"{d}: already held (since {self.since or '?'})"
            return (f"{d}: held. Instances keep queueing in outgoing/{d}/; nothing is sent "
                    f"until `hermes-py release {d}`.")
        if self.verb == "release":
            return f"{d}: released; the dispatcher sends what is due" if self.changed \
                else f"{d}: was not held"
        text = (f"{d}: flush requested; the dispatcher ignores backoff and next-attempt times "
                "once, then removes the flag")
        if self.held:
            text += f"\n{d}: note: the destination is held; nothing is sent until " \
                    f"`hermes-py release {d}`"
        return text


def hold(cfg: Settings, name: str, by: str | None = None) -> Flagged:
    cfg.destination(name)
    spool = open_spool(cfg)
    if spool.has_flag(name, Flag.HOLD):
        since = spool.read_json(spool.flag(name, Flag.HOLD)).get("at")
        return Flagged(name, "hold", False, since=since, held=True)
    who = by or current_user()
    spool.set_flag(name, Flag.HOLD, who)
    emit(LOG, Event.DESTINATION_HELD, dest=name, by=who)
    return Flagged(name, "hold", True, held=True)


def release(cfg: Settings, name: str, by: str | None = None) -> Flagged:
    cfg.destination(name)
    spool = open_spool(cfg)
    if not spool.clear_flag(name, Flag.HOLD):
        return Flagged(name, "release", False)
    emit(LOG, Event.DESTINATION_RELEASED, dest=name, by=by or current_user())
    return Flagged(name, "release", True)


def flush(cfg: Settings, name: str, by: str | None = None) -> Flagged:
    """Ask the dispatcher to forget the backoff and every next-attempt time, once.

    The dispatcher does it (and says so, as ``destination_flushed``); this only
    leaves the flag.
    """
    cfg.destination(name)
    spool = open_spool(cfg)
    spool.set_flag(name, Flag.FLUSH, by or current_user())
    return Flagged(name, "flush", True, held=spool.has_flag(name, Flag.HOLD))


# ---------------------------------------------------------------- purge


@dataclass
class Doomed:
    name: str
    reason: str


@dataclass
class Purged(Result):
    folder: str               # relative to the spool root
    deleted: bool             # False: only listed (no --yes)
    instances: list[Doomed] = field(default_factory=list)

    def text(self) -> str:
        if self.deleted:
            return f"deleted {len(self.instances)} instance(s) from {self.folder}/"
        lines = [f"would delete {self.folder}/{d.name}" + (f"  ({d.reason})" if d.reason else "")
                 for d in self.instances]
        lines.append(f"{len(self.instances)} instance(s) in {self.folder}/ match; nothing "
                     "deleted (run again with --yes to delete them)")
        return "\n".join(lines)


def purge(cfg: Settings, where: str, name: str | None, study: str | None = None,
          older_than: str | None = None, everything: bool = False, yes: bool = False,
          by: str | None = None) -> Purged:
    """Delete from error/ or discard/ only, only what the selection names, only with ``yes``."""
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
    rel = folder.relative_to(spool.root).as_posix()
    if not folder.is_dir():
        raise HermesError(f"{folder} does not exist")
    chosen = _select(spool, folder, min_age, study)
    out = Purged(rel, yes, [Doomed(dcm.name, _why(data)) for dcm, data in chosen])
    if not yes:
        return out
    who = by or current_user()
    out.instances = []
    for dcm, data in chosen:
        if not spool.remove(dcm):
            continue
        out.instances.append(Doomed(dcm.name, _why(data)))
        emit(LOG, Event.PURGED, str(data.get("sop_instance_uid") or dcm.stem), name,
             folder=rel, by=who)
    if out.instances:
        spool.sync_dirs([folder])
    return out


def _select(spool: Spool, folder: Path, min_age: float | None,
            study: str | None) -> list[tuple[Path, sc.Sidecar]]:
    now = time.time()
    chosen: list[tuple[Path, sc.Sidecar]] = []
    for entry in spool.scan(folder):
        dcm = Path(entry.path)
        data = spool.read_sidecar(dcm)
        if min_age is not None:
            # time it landed here: the sidecar is written on the move into error/ or discard/
            since = spool.landed_at(dcm) or received_at(dcm.stem) or entry.stat().st_mtime
            if now - since < min_age:
                continue
        if not _study_matches(dcm, data, study):
            continue
        chosen.append((dcm, data))
    chosen.sort(key=lambda c: c[0].name)
    return chosen


def _why(data: sc.Sidecar) -> str:
    return str((data.get("error") or {}).get("reason")
               or (data.get("routing") or {}).get("discarded_by") or "")
