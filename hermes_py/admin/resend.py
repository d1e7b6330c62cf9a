"""``hermes-py resend --to DEST``: queue copies of instances still in the spool for another
destination, the "re-submit the job to a backup gateway" an admin does by hand.

A copy is a hard link of a copy the spool already holds (delivered, failed, or queued
for another destination), so nothing is re-read or re-encoded; its sidecar records
where it came from and who asked. What ``DEST`` already has queued or in flight is
left alone, so running the same resend twice queues nothing new.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hermes_py.admin import Result, current_user, open_spool
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.events import emit
from hermes_py.lifecycle import Event, Stage
from hermes_py.spool import DCM, Spool
from hermes_py.spool import sidecar as sc
from hermes_py.spool.places import Place

LOG = logging.getLogger(__name__)

# Where a copy to resend may come from, in order of preference for one instance: a
# delivered copy is known good; a failed or queued one is still the instance received.
SOURCES = (Stage.SUCCESS, Stage.DIVERTED, Stage.ERROR, Stage.URGENT, Stage.OUTGOING,
           Stage.FAILOVER, Stage.DISCARD)


@dataclass
class Resent(Result):
    to: str
    queued: int = 0
    already: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    selection: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.queued or self.already else 1

    def text(self) -> str:
        if not (self.queued or self.already):
            return f"nothing to resend: no copy of {self.selection} in the spool"
        where = ", ".join(f"{k}: {v}" for k, v in sorted(self.sources.items()))
        out = f"queued {self.queued} instance(s) for {self.to}"
        if where:
            out += f" (from {where})"
        if self.already:
            out += f"; {self.already} already queued or being sent there"
        return out


def _matches(place: Place, dcm: Path, data: sc.Sidecar, names: set[str], study: str | None,
             series: str | None) -> bool:
    if names:
        stem = dcm.name[: -len(DCM)]
        return stem in names or str(data.get("sop_instance_uid") or "") in names
    if study is not None:
        return data.get("study_instance_uid") == study
    return data.get("series_instance_uid") == series


def resend(cfg: Settings, to: str, names: list[str] | None = None, study: str | None = None,
           series: str | None = None, source: str | None = None,
           by: str | None = None) -> Resent:
    cfg.destination(to)
    if source is not None and source not in cfg.destinations \
            and not Spool(cfg.spool.path).error_dir(source).is_dir():
        cfg.destination(source)
    if not names and study is None and series is None:
        raise HermesError("say what to resend: spool names or SOP Instance UIDs, --study UID "
                          "or --series UID")
    spool = open_spool(cfg)
    who = by or current_user()
    wanted = set(names or [])
    selection = (", ".join(sorted(wanted)) if wanted else
                 f"study {study}" if study is not None else f"series {series}")
    out = Resent(to=to, selection=selection)
    seen: set[str] = set()
    sources: Counter[str] = Counter()
    now = time.time()
    target = spool.outbox(to)
    touched = False
    for stage in SOURCES:
        for place in spool.places(stage):
            if place.dest is None:
                continue  # error/ itself: unreadable files, nothing to send
            if source is not None and place.dest != spool.dest_folder(source):
                continue
            for e in list(spool.scan(place.path)):
                if e.name in seen:
                    continue
                dcm = Path(e.path)
                data = spool.read_sidecar(dcm)
                if not _matches(place, dcm, data, wanted, study, series):
                    continue
                seen.add(e.name)
                if spool.has_copy(to, e.name, queued=True):
                    out.already += 1
                    continue
                origin = place.rel(spool.root)
                priority = str(data.get("priority") or "normal")
                folder = spool.outbox(to, priority)
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    spool.link(dcm, folder, sc.resent(data, to, priority, now, origin, who))
                except FileNotFoundError:
                    seen.discard(e.name)  # moved on meanwhile: found in a later stage
                    continue
                touched = True
                out.queued += 1
                sources[origin] += 1
                emit(LOG, Event.RESENT, str(data.get("sop_instance_uid") or e.name), to,
                     source=origin, by=who, name=e.name[: -len(DCM)])
    if touched:
        spool.sync_dirs([target, spool.outbox(to, "urgent")])
    out.sources = dict(sources)
    return out
