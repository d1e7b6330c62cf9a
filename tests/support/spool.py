"""Spools with known contents, built with the package's own verbs, and read back.

``put`` is the one way a test places an instance (a ``.dcm`` and its sidecar) in
a spool folder: the sidecar comes from the builders the stages use
(``hermes_py.spool.sidecar``: ``network`` as the receiver writes it, ``queued``
for a destination's copy as the router writes it) and the instance goes in with
``Spool.publish`` (sidecar first, the ``.dcm`` renamed in last). So status, find,
the cleaner, the router and the dispatchers read what a running router would
have left.

The readers (``sidecar``, ``dcms``, ``queued`` ...) look at the folders and
sidecars only: what an operator sees with ``ls`` and ``cat``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from hermes_py.config import Settings
from hermes_py.spool import Spool, carried, new_name, now_iso
from hermes_py.spool import sidecar as sc
from tests.support.dicomgen import make_instance, save
from tests.support.peers import LOOPBACK

Where = Spool | Settings | Path


def spool_of(where: Where) -> Spool:
    """The spool of a Settings (its [spool] path), of a root folder, or itself."""
    if isinstance(where, Spool):
        return where
    if isinstance(where, Settings):
        return Spool(where.spool.path)
    return Spool(where)


def put(where: Where, folder: Path | None = None, content: Dataset | bytes | None = None, *,
        sop: str | None = None, study: str | None = None, series: str | None = None,
        dest: str | None = None, priority: str = "normal", received: float | None = None,
        queued_at: float | None = None, mtime: float | None = None, calling_ae: str = "CT1",
        **facts: Any) -> Path:
    """Put one instance in ``folder`` (default: ``dest``'s outbox, else incoming/) as a stage
    would; returns its ``.dcm``.

    ``content``: a Dataset (saved as a Part-10 file), raw bytes (``sop`` names it), or
    None: a small generated instance with UIDs ``sop``/``study``/``series``.
    The sidecar is the receiver's for a C-STORE from ``calling_ae`` at time ``received``
    (the spool name carries it too); with ``dest``, the router's copy for that
    destination (study and series UIDs, priority, queued at ``queued_at``, no attempts
    yet); ``study``/``series`` given are recorded either way; ``facts`` add or replace
    keys. ``mtime`` is the sidecar's mtime: the next attempt in an outbox, the
    time it landed in success/, error/ and discard/.
    """
    spool = spool_of(where)
    if folder is None:
        folder = spool.outbox(dest, priority) if dest else spool.incoming
    folder.mkdir(parents=True, exist_ok=True)
    spool.tmp.mkdir(parents=True, exist_ok=True)
    tmp = spool.tmp_path(".dcm")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
        sop_class = ts = ""
    else:
        ds = content if content is not None else make_instance(
            8, 8, sop_uid=sop, study_uid=study, series_uid=series)
        save(ds, tmp)
        sop = str(ds.SOPInstanceUID)
        sop_class, ts = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        if dest:  # a routed copy: the router read them from the file (sidecar.routed)
            study = study or str(ds.get("StudyInstanceUID", "")) or None
            series = series or str(ds.get("SeriesInstanceUID", "")) or None
    name = new_name(sop, when=received)
    data = sc.network(name, sop or "", sop_class, ts, calling_ae=calling_ae, called_ae="HERMES",
                      peer_address=LOOPBACK, peer_port=40000, size=tmp.stat().st_size,
                      received_by=f"{socket.gethostname()}:{os.getpid()}",
                      received_at=now_iso(received))
    for key in ("sop_instance_uid", "sop_class_uid", "transfer_syntax"):
        if not data.get(key):
            del data[key]  # type: ignore[misc]  # raw bytes: only the file could tell
    if study:
        data["study_instance_uid"] = study
    if series:
        data["series_instance_uid"] = series
    if dest:
        data = sc.queued(data, dest, priority, now_iso(queued_at))
    data.update(facts)  # type: ignore[typeddict-item]
    dcm = spool.publish(tmp, folder, name, data, fsync_data=False)
    if mtime is not None:
        if spool.sidecar_of(dcm).exists():
            os.utime(spool.sidecar_of(dcm), (mtime, mtime))
        else:  # carried (incoming/): a .json with that mtime, as a later stage writes one
            spool.write_json(spool.sidecar_of(dcm), data, mtime)
    return dcm


def queue(where: Where, dest: str, content: Dataset | bytes | None = None,
          priority: str = "normal", **kw: Any) -> Path:
    """``put`` into ``dest``'s outbox, as the router queues a copy for it."""
    return put(where, None, content, dest=dest, priority=priority, **kw)


# ---------------------------------------------------------------- reading back


def sidecar(dcm: Path) -> dict[str, Any]:
    """The sidecar beside ``dcm``, or the one it carries (fresh in incoming/): a missing
    one is an error, not an empty dict."""
    js = dcm.with_suffix(".json")
    if not js.exists():
        data = carried.carried(dcm)
        if not data:
            raise FileNotFoundError(f"no sidecar beside or carried by {dcm}")
        return data
    loaded: dict[str, Any] = json.loads(js.read_text())
    return loaded


def dcms(folder: Path) -> list[Path]:
    """The instances in one folder, by name (= receive time)."""
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def sidecars(folder: Path) -> list[dict[str, Any]]:
    return [sidecar(p) for p in dcms(folder)]


def queued(where: Where, dest: str) -> list[Path]:
    """In ``dest``'s outbox, urgent first: not yet claimed."""
    spool = spool_of(where)
    return [p for f in spool.outboxes(dest) for p in dcms(f)]


def claimed(where: Where, dest: str) -> list[Path]:
    """Claimed by one of ``dest``'s dispatcher workers (active/<dest>/<worker>/)."""
    spool = spool_of(where)
    folder = spool.active / spool.dest_folder(dest)
    return sorted(folder.rglob("*.dcm")) if folder.is_dir() else []


def delivered(where: Where, dest: str) -> list[Path]:
    return dcms(spool_of(where).success_dir(dest))


def errored(where: Where, dest: str | None = None) -> list[Path]:
    return dcms(spool_of(where).error_dir(dest))


def state(where: Where, dest: str) -> dict[str, Any]:
    """state/<dest>.json as the dispatcher last wrote it ({} before it did)."""
    spool = spool_of(where)
    return spool.read_json(spool.state_file(dest))


def temp_files(where: Where) -> list[str]:
    """Temp files under tmp/, a stage's own tmp/<owner>/ included (relative paths); the
    owner folders and their .lock files are the layout, not leftovers."""
    spool = spool_of(where)
    out = []
    for root, _dirs, files in os.walk(spool.tmp):
        top = Path(root) == spool.tmp
        out += [os.path.relpath(os.path.join(root, f), spool.tmp) for f in files
                if not (top and f.endswith(".lock"))]
    return sorted(out)
