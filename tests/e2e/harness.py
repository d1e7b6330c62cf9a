"""What only the end-to-end suite needs on top of tests/support: its router configuration,
and the judgement of what arrived against what was sent.

The router itself is ``tests.support.serve.Hermes`` (the installed ``hermes-py serve``
seen as an operator sees it), the modality ``tests.support.peers.Modality`` (dcmsend).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from tests.support.config import Config, Dest, receiver, route_all
from tests.support.peers import Received, ScriptedSCP
from tests.support.serve import Hermes

DELIVERY_TIMEOUT = float(os.environ.get("HERMES_E2E_DELIVERY_TIMEOUT", "180"))


def config(destinations: Sequence[Dest], *, rules: str | None = None,
           spool_dir: Path | None = None, **tables: Mapping[str, object]) -> Config:
    """An end-to-end router: everything to every destination unless ``rules`` says
    otherwise, a drop folder that takes files after 1 s, fast retries; ``tables``
    (``receiver``, ``spool``, ``intake``, ``retry``) add or replace keys."""
    cfg = Config(
        destinations=list(destinations),
        rules=route_all(destinations) if rules is None else rules,
        receiver=receiver(max_associations=10),
        spool={"path": str(spool_dir or "spool"), "min_free_mb": 0, "keep_success": "1d",
               "keep_discard": "1d"},
        intake={"stable_for": "1s", "rescan_interval": "1s", "incomplete_after": "3s"},
        retry={"initial_delay": "300ms", "max_delay": "2s", "give_up_after": "1d"})
    for name, values in tables.items():
        table = getattr(cfg, name)
        assert isinstance(table, dict), f"no [{name}] table to update"
        table.update(values)
    return cfg


# ---------------------------------------------------------------- what was sent, what arrived


def sent_index(files: Iterable[Path]) -> dict[str, Dataset]:
    out = {}
    for p in files:
        ds = dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def decode_received(rec: Received) -> Dataset:
    """A ScriptedSCP record (dataset bytes as received on the wire) as a Dataset."""
    ts = UID(rec.transfer_syntax)
    ds = read_dataset(io.BytesIO(rec.data), ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def scp_arrivals(scp: ScriptedSCP) -> dict[str, list[Dataset]]:
    with scp._lock:
        recs = list(scp.received)
    out: dict[str, list[Dataset]] = {}
    for r in recs:
        out.setdefault(r.sop_instance_uid, []).append(decode_received(r))
    return out


def folder_arrivals(folder: Path) -> dict[str, list[Dataset]]:
    """Instances a storescp wrote (one file per reception)."""
    out: dict[str, list[Dataset]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = dcmread(p)
        except Exception:
            continue  # storescp still writing it
        out.setdefault(str(ds.SOPInstanceUID), []).append(ds)
    return out


IDENTITY = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
            "InstanceNumber", "Rows", "Columns")


def difference(sent: Dataset, got: Dataset) -> str | None:
    """None when ``got`` is ``sent`` (same identity, same pixels), else what differs.

    Same pixel data bytes when both are uncompressed or both carry the same compressed
    syntax (no re-encoding allowed); equal decoded pixel arrays when the router had to
    decompress for a destination that accepts only uncompressed.
    """
    for kw in IDENTITY:
        if sent.get(kw) != got.get(kw):
            return f"{kw}: sent {sent.get(kw)!r}, got {got.get(kw)!r}"
    if "PixelData" not in sent:
        return None if "PixelData" not in got else "PixelData appeared"
    if "PixelData" not in got:
        return "PixelData missing"
    s_ts = UID(sent.file_meta.TransferSyntaxUID)
    g_ts = UID(got.file_meta.TransferSyntaxUID)
    if s_ts.is_compressed and g_ts.is_compressed and s_ts != g_ts:
        return f"re-encoded: sent {s_ts.name}, got {g_ts.name}"
    if s_ts.is_compressed == g_ts.is_compressed:
        if bytes(sent.PixelData) != bytes(got.PixelData):
            return f"pixel data bytes differ ({s_ts.name} -> {g_ts.name})"
        return None
    if g_ts.is_compressed:
        return f"compressed on the way: sent {s_ts.name}, got {g_ts.name}"
    if not np.array_equal(sent.pixel_array, got.pixel_array):
        return f"decoded pixel arrays differ ({s_ts.name} -> {g_ts.name})"
    return None


def assert_delivered(sent: Mapping[str, Dataset], arrived: Mapping[str, Sequence[Dataset]],
                     expect: Iterable[str] | None = None, where: str = "destination") -> None:
    """Every expected instance arrived, and every copy of it is what was sent."""
    want = set(sent if expect is None else expect)
    missing = sorted(want - set(arrived))
    assert not missing, (f"{len(missing)} of {len(want)} instances never reached {where}, "
                         f"e.g. {missing[:3]}")
    bad = []
    for uid in sorted(want):
        for got in arrived[uid]:
            why = difference(sent[uid], got)
            if why:
                bad.append(f"{uid}: {why}")
    assert not bad, f"{len(bad)} instance(s) at {where} differ from what was sent: {bad[:5]}"


def duplicates(arrived: Mapping[str, Sequence[Dataset]]) -> int:
    return sum(len(v) - 1 for v in arrived.values())


def wait_delivered(get: Any, want: set[str], timeout: float = DELIVERY_TIMEOUT,
                   what: str = "delivery", hermes: Hermes | None = None) -> None:
    """Poll ``get()`` (a set of UIDs at a destination) until it holds ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        have = set(get())
        if want <= have:
            return
        if time.monotonic() > deadline:
            missing = sorted(want - have)
            extra = f"\nspool: {hermes.spool_listing()}" if hermes else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}: {len(missing)} of "
                        f"{len(want)} missing, e.g. {missing[:3]}{extra}")
        time.sleep(0.2)
