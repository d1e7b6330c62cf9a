"""Shared by the dispatcher tests: queue instances the way the router does, run a dispatcher.

(No tests here; the name only keeps it among the files the dispatcher owns.)
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from hermes_py.config import Settings
from hermes_py.dispatcher import Dispatcher
from hermes_py.spool import Spool, new_name, now_iso
from tests.dicomgen import save


def dest_toml(name: str, port: int, ae: str = "DEST", **extra: Any) -> str:
    """A [destinations.NAME] table with short test durations; ``extra`` overrides keys."""
    keys: dict[str, Any] = {
        "ae_title": ae, "host": "127.0.0.1", "port": port,
        "connection_timeout": "2s", "acse_timeout": "5s", "dimse_timeout": "5s",
        "network_timeout": "10s", "initial_delay": "200ms", "max_delay": "1s",
        "give_up_after": "1h", "batch_size": 50,
    }
    keys.update(extra)
    lines = [f"[destinations.{name}]"]
    for k, v in keys.items():
        if isinstance(v, dict):
            inner = ", ".join(f'"{a}" = {json.dumps(b)}' for a, b in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def enqueue(cfg: Settings, dest: str, ds: Dataset, priority: str = "normal",
            queued_at: float | None = None, received: float | None = None,
            **sidecar: Any) -> Path:
    """Publish ``ds`` into outgoing/DEST/ with a sidecar like the router writes.

    ``received`` backdates the spool name (receive time), ``queued_at`` the queueing.
    """
    spool = Spool(cfg.spool.path)
    sop = str(ds.SOPInstanceUID)
    name = new_name(sop, when=received)
    tmp = spool.tmp_path(".dcm")
    save(ds, tmp)
    data: dict[str, Any] = {
        "name": name,
        "sop_instance_uid": sop,
        "sop_class_uid": str(ds.SOPClassUID),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "source": "network",
        "received_at": now_iso(received),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "destination": dest,
        "priority": priority,
        "queued_at": now_iso(queued_at),
        "attempts": 0,
    }
    data.update(sidecar)
    folder = spool.outbox(dest, priority)
    folder.mkdir(parents=True, exist_ok=True)
    return spool.publish(tmp, folder, name, data, fsync_data=False)


def dcms(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def sidecars(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.with_suffix(".json").read_text()) for p in dcms(folder)]


def queued(cfg: Settings, dest: str) -> list[Path]:
    spool = Spool(cfg.spool.path)
    return [p for f in spool.outboxes(dest) for p in dcms(f)]


def active(cfg: Settings, dest: str) -> list[Path]:
    return sorted((Spool(cfg.spool.path).active / dest).rglob("*.dcm"))


def state(cfg: Settings, dest: str) -> dict[str, Any]:
    return Spool(cfg.spool.path).read_json(Spool(cfg.spool.path).state_file(dest))


@contextlib.contextmanager
def serving(cfg: Settings, dest: str, poll: float = 0.1) -> Iterator[Dispatcher]:
    """A dispatcher serving in a thread; stopped (and its claims returned) on exit."""
    d = Dispatcher(cfg, dest, poll=poll)
    d.start()  # workers exist (and claims are recovered) before the test looks
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            d.serve(stop)
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    t = threading.Thread(target=target, name=f"test-serve-{dest}", daemon=True)
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(60)
        assert not t.is_alive(), "dispatcher did not stop within 60s"
        if errors:
            raise errors[0]
