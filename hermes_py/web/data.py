"""What the pages read beyond the admin functions: one page of a queue, the copies of a name.

Cost flat in the backlog: a page is one listing of its folders (names only, kept
as a bounded heap) plus the sidecars of the rows it shows, never the whole
queue's sidecars (mercure re-read every task file on every refresh). Pages are
cursors on the spool name, which sorts by receive time, so a page stays stable
while instances move (an offset would skip or repeat rows).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes_py import dicomfile
from hermes_py.admin.find import Found, Location
from hermes_py.admin.rules_verbs import Tested
from hermes_py.admin.rules_verbs import dry_run as rules_dry_run
from hermes_py.config import Settings
from hermes_py.lifecycle import Stage
from hermes_py.spool import DCM, Spool, is_name
from hermes_py.spool import sidecar as sc

AUDIT = logging.getLogger("hermes_py.web.audit")
PATIENT_KEYWORDS = ("PatientName", "PatientID")
WHERE = ("outgoing", "active", "error", "success")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


@dataclass
class Row:
    name: str
    folder: str            # relative to the spool root
    sidecar: sc.Sidecar

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "folder": self.folder, "sidecar": self.sidecar}


@dataclass
class Page:
    destination: str | None
    where: str
    after: str
    limit: int
    total: int             # instances in these folders (from the listing)
    rows: list[Row] = field(default_factory=list)
    next: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "in": self.where, "after": self.after or None,
                "limit": self.limit, "total": self.total, "next": self.next,
                "instances": [r.to_json() for r in self.rows]}


def folders(spool: Spool, dest: str | None, where: str) -> list[Path]:
    """The folders of ``where`` for ``dest`` (``error`` without one: error/ itself)."""
    if where == "error":
        return [spool.error_dir(dest)]
    if dest is None:
        raise ValueError(f"{where} needs a destination")
    if where == "outgoing":
        return list(spool.outboxes(dest))
    if where == "active":
        return [p.path for p in spool.places(Stage.ACTIVE, dest)]
    if where == "success":
        return [spool.success_dir(dest)]
    raise ValueError(f"in= must be one of {', '.join(WHERE)}, not {where!r}")


def page(spool: Spool, dest: str | None, where: str, after: str = "",
         limit: int = DEFAULT_LIMIT) -> Page:
    limit = max(1, min(MAX_LIMIT, limit))
    total = 0

    def names() -> Any:
        nonlocal total
        for folder in folders(spool, dest, where):
            for e in spool.scan(folder):
                total += 1
                stem = e.name[: -len(DCM)]
                if stem > after:
                    yield stem, folder
    first = heapq.nsmallest(limit + 1, names())
    out = Page(dest, where, after, limit, total)
    for stem, folder in first[:limit]:
        dcm = folder / (stem + DCM)
        out.rows.append(Row(stem, folder.relative_to(spool.root).as_posix(),
                            spool.read_sidecar(dcm)))
    if len(first) > limit:
        out.next = first[limit - 1][0]
    return out


def copies(spool: Spool, name: str) -> Found:
    """Every copy of one spool name, as ``find`` reports them: one stat per folder, no listing
    of any queue (the name is the same in every folder it passes through)."""
    found: list[Location] = []
    if is_name(name):
        for place in spool.places():
            dcm = place.path / (name + DCM)
            if dcm.exists():
                found.append(Location.of(spool, place, dcm, spool.read_sidecar(dcm)))
    sop = next((str(x.sidecar.get("sop_instance_uid")) for x in found
                if x.sidecar.get("sop_instance_uid")), name)
    return Found(sop, "sop", spool.root, found)


def dry_run(cfg: Settings, spool: Spool, name: str) -> Tested | None:
    """``rules test`` on a copy of the name in the spool: what the router would do with it now
    (the copies are links of one file, so any copy answers for all); None: no such name."""
    found = copies(spool, name)
    if not found.copies:
        return None
    return rules_dry_run(cfg, [found.copies[0].path])


def patient(found: Found, name: str, by: str) -> dict[str, str | None]:
    """Patient name and ID from the header of a copy, for an admin who asked; every read is
    an audit line (who, which instance; never the values themselves)."""
    AUDIT.warning("%s read the patient name and ID of %s", by, name)
    for c in found.copies:
        try:
            values = dicomfile.read_header(c.path, PATIENT_KEYWORDS)
        except (OSError, dicomfile.UnreadableError):
            continue  # moved on meanwhile, or unreadable: the next copy
        return {"name": values.get("PatientName"), "id": values.get("PatientID")}
    return {"name": None, "id": None}
