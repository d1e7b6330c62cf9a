"""Benchmark corpora: generated on first use under bench/corpus/ (git-ignored), reused after.

Each corpus folder carries a manifest (spec, SOP Instance UIDs, total bytes) so a run
can check that every instance sent arrived, and so a changed spec regenerates the
folder instead of silently reusing a stale one.

The backlog is not sent over the network: ``fill_outbox`` writes instances straight
into ``spool/outgoing/<dest>/`` the way the router leaves them (``.dcm`` plus sidecar,
the ``.dcm`` renamed in last), because queueing 20,000 instances through the
receiver would take minutes and measure the receiver, not the drain.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from hermes_py import spool as spool_mod
from tests.support import dicomgen

ROOT = Path(__file__).resolve().parent / "corpus"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate. ``kind``: "small" / "ct" (uncompressed, rows x rows 16-bit) or
    "compressed" (pydicom's real JPEG, JPEG 2000, JPEG-LS and RLE samples, cycled)."""

    kind: str
    count: int
    rows: int = 64        # "big": MiB per instance
    studies: int = 4
    series_per_study: int = 2

    @property
    def folder_name(self) -> str:
        return f"{self.kind}-{self.count}" + (f"-{self.rows}" if self.kind != "compressed" else "")


@dataclass
class Corpus:
    name: str
    folder: Path
    files: list[Path]
    uids: list[str]
    bytes: int
    description: str

    @property
    def count(self) -> int:
        return len(self.files)

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "folder": str(self.folder),
                "description": self.description}


def default_specs(quick: bool = False) -> dict[str, CorpusSpec]:
    """The three corpora of issue 4, and one big instance (issue 11: no process grows
    with the instance); ``quick`` shrinks them for a smoke run."""
    if quick:
        return {"small": CorpusSpec("small", 60, 64, 2, 1),
                "ct": CorpusSpec("ct", 16, 512, 1, 1),
                "compressed": CorpusSpec("compressed", 8),
                "big": CorpusSpec("big", 1, 128, 1, 1)}
    return {"small": CorpusSpec("small", 1000, 64, 4, 2),
            "ct": CorpusSpec("ct", 500, 512, 2, 1),
            "compressed": CorpusSpec("compressed", 20),
            "big": CorpusSpec("big", 1, 512, 1, 1)}


def _describe(spec: CorpusSpec, nbytes: int) -> str:
    avg = nbytes / max(spec.count, 1) / 1000
    if spec.kind == "big":
        return f"{spec.count} uncompressed image(s) of {spec.rows} MiB"
    if spec.kind == "compressed":
        kinds = ", ".join(dicomgen.COMPRESSED_SAMPLES)
        return f"{spec.count} compressed instances ({kinds}), avg {avg:.1f} kB"
    return (f"{spec.count} {spec.rows}x{spec.rows} 16-bit Explicit VR LE over "
            f"{spec.studies} studies, avg {avg:.1f} kB")


def _load(folder: Path, spec: CorpusSpec, name: str) -> Corpus | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("spec") != asdict(spec):
        return None
    files = [folder / f for f in data["files"]]
    if not all(f.is_file() for f in files):
        return None
    return Corpus(name, folder, files, list(data["uids"]), int(data["bytes"]),
                  str(data["description"]))


def generate(spec: CorpusSpec, root: Path = ROOT, name: str | None = None) -> Corpus:
    """The corpus for ``spec`` under ``root``, generated unless an identical one exists."""
    name = name or spec.kind
    folder = root / spec.folder_name
    found = _load(folder, spec, name)
    if found is not None:
        return found
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files: list[Path] = []
    uids: list[str] = []
    if spec.kind == "compressed":
        kinds = list(dicomgen.COMPRESSED_SAMPLES)
        for i in range(spec.count):
            ds = dicomgen.compressed_instance(kinds[i % len(kinds)])
            files.append(dicomgen.save(ds, folder / f"{i:05d}.dcm"))
            uids.append(str(ds.SOPInstanceUID))
    elif spec.kind == "big":
        for i in range(spec.count):
            ds = dicomgen.big_image(folder / f"{i:05d}.dcm", spec.rows, instance_number=i + 1,
                                    patient_id="BENCHBIG", study_description="BENCH BIG")
            files.append(folder / f"{i:05d}.dcm")
            uids.append(str(ds.SOPInstanceUID))
    elif spec.kind in ("small", "ct"):
        groups = [(generate_uid(), [generate_uid() for _ in range(spec.series_per_study)])
                  for _ in range(spec.studies)]
        flat = [(st, se) for st, series in groups for se in series]
        for i in range(spec.count):
            study, series = flat[i * len(flat) // spec.count]
            ds = dicomgen.make_instance(
                spec.rows, spec.rows, study_uid=study, series_uid=series,
                instance_number=i + 1, seed=i, patient_id=f"BENCH{spec.kind.upper()}",
                study_description=f"BENCH {spec.kind.upper()}")
            files.append(dicomgen.save(ds, folder / f"{i:05d}.dcm"))
            uids.append(str(ds.SOPInstanceUID))
    else:
        raise ValueError(f"unknown corpus kind {spec.kind!r}")
    nbytes = sum(f.stat().st_size for f in files)
    desc = _describe(spec, nbytes)
    (folder / MANIFEST).write_text(json.dumps({
        "spec": asdict(spec), "files": [f.name for f in files], "uids": uids,
        "bytes": nbytes, "description": desc}, indent=1))
    return Corpus(name, folder, files, uids, nbytes, desc)


# ---------------------------------------------------------------- the backlog


@dataclass
class Backlog:
    dest: str
    count: int
    bytes: int
    uids_prefix: str
    fill_seconds: float


def _fixed_uid(base: str, i: int) -> str:
    """UIDs of one fixed length (no leading zero in the last component), so the
    template's bytes can be patched in place without touching any length field."""
    return f"{base}.{100_000_000 + i}"


def fill_outbox(spool_root: Path, dest: str, count: int, rule: str = "bench",
                per_study: int = 500) -> Backlog:
    """Queue ``count`` distinct small instances for ``dest`` as the router would leave them.

    One encoded 64x64 template, its SOP/Study/Series UIDs patched per instance (same
    length, so the encoding stays valid). Each instance: sidecar JSON first, then the
    ``.dcm`` written in tmp/ and renamed into the outbox (the commit point, as in
    spool.publish). No per-file fsync (this is test set-up, not an acknowledgement):
    one ``os.sync()`` at the end.
    """
    t0 = time.monotonic()
    sp = spool_mod.Spool(spool_root)
    sp.ensure([dest])
    folder = sp.outbox(dest)
    token = str(int(secrets.token_hex(5), 16) % 9_000_000_000 + 1_000_000_000)
    base = f"1.2.826.0.1.3680043.8.498.7433.{token}"
    sop0, study0, series0 = (_fixed_uid(base + ".1", 0), _fixed_uid(base + ".2", 0),
                             _fixed_uid(base + ".3", 0))
    ds = dicomgen.make_instance(64, 64, sop_uid=sop0, study_uid=study0, series_uid=series0,
                                patient_id="BENCHBACKLOG", study_description="BENCH BACKLOG")
    tpl_path = sp.tmp_path(".dcm")
    dicomgen.save(ds, tpl_path)
    template = tpl_path.read_bytes()
    tpl_path.unlink()
    for uid in (sop0, study0, series0):
        assert template.count(uid.encode()) >= 1, uid
    sop_class = str(ds.SOPClassUID)
    ts = str(ds.file_meta.TransferSyntaxUID)
    now = time.time()
    iso = spool_mod.now_iso(now)
    for i in range(count):
        sop = _fixed_uid(base + ".1", i)
        study = _fixed_uid(base + ".2", i // per_study)
        series = _fixed_uid(base + ".3", i // per_study)
        data = (template.replace(sop0.encode(), sop.encode())
                .replace(study0.encode(), study.encode())
                .replace(series0.encode(), series.encode()))
        name = spool_mod.new_name(sop, when=now - count * 1e-4 + i * 1e-4)
        sidecar = {
            "name": name, "sop_instance_uid": sop, "sop_class_uid": sop_class,
            "transfer_syntax": ts, "source": "network", "received_at": iso,
            "calling_ae": "BENCH", "called_ae": "HERMES", "peer_address": "127.0.0.1",
            "peer_port": 0, "size": len(data),
            "routing": {"at": iso, "rules": [rule], "destinations": [dest],
                        "discarded_by": None},
            "study_instance_uid": study, "series_instance_uid": series,
            "destination": dest, "priority": "normal", "queued_at": iso, "attempts": 0,
        }
        (folder / (name + spool_mod.JSON)).write_bytes(spool_mod.dump_json(sidecar))
        tmp = sp.tmp_path(spool_mod.DCM)
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, folder / (name + spool_mod.DCM))
    os.sync()
    return Backlog(dest, count, len(template) * count, base + ".1",
                   time.monotonic() - t0)
