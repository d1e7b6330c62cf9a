"""``alerts/``: the alert outbox, with the same discipline as instances.

An alert is a promise to tell a person, so it is written before anything is
sent: into ``alerts/pending/`` (temp file, fsync, rename, fsync of the folder),
where it waits until every channel that wants it accepted it, across crashes
and restarts. Then it moves to ``alerts/sent/`` (the last ``KEEP_SENT`` are
kept, for an admin who asks "what did it tell us"), or after the sender's
give-up time to ``alerts/failed/``, where a person finds it with the answers
the channels gave.

One file per alert, ``<stamp>_<event>_<dest>_<id>.json``: sorted by name is
sorted by creation, and the payload id (the receivers' idempotency key) is in
the name, so writing an alert whose id is already here, pending, sent or
failed, is a no-op. That makes "write the alert, then remember it was
written" safe to repeat after a kill -9 between the two steps.

``state/alerts.json`` (the open conditions, :mod:`hermes_py.alerts.watcher`)
lives beside the destinations' state files; its path is here with the rest of
the layout.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hermes_py.spool.durable import dump_json, fsync_dir, read_json
from hermes_py.spool.names import sanitize, stamp

if TYPE_CHECKING:
    from hermes_py.spool import Spool

KEEP_SENT = 500


class AlertOutbox:
    """The verbs on ``alerts/``: put, list, update, finish (sent), set aside (failed)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.root = spool.root / "alerts"
        self.pending = self.root / "pending"
        self.sent = self.root / "sent"
        self.failed = self.root / "failed"
        self.state_file = spool.state / "alerts.json"

    def ensure(self) -> None:
        for d in (self.pending, self.sent, self.failed):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _named(folder: Path, alert_id: str) -> Path | None:
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.endswith(f"_{alert_id}.json"):
                        return Path(e.path)
        except FileNotFoundError:
            pass
        return None

    def find(self, alert_id: str) -> Path | None:
        """Where the alert with this id is (pending, sent or failed), or None."""
        for folder in (self.pending, self.sent, self.failed):
            found = self._named(folder, alert_id)
            if found is not None:
                return found
        return None

    def put(self, item: dict[str, Any], event: str, dest: str | None, alert_id: str,
            when: float | None = None) -> Path | None:
        """Write one alert durably into pending/; None when its id is here already."""
        if self.find(alert_id) is not None:
            return None
        self.ensure()
        name = (f"{stamp(time.time() if when is None else when)}_{sanitize(event, 40)}_"
                f"{sanitize(dest or '-', 64)}_{alert_id}.json")
        target = self.pending / name
        self.spool.write_json(target, item)
        fsync_dir(self.pending)
        return target

    def items(self, folder: Path | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """The alerts in ``folder`` (pending/ by default), oldest first."""
        folder = self.pending if folder is None else folder
        try:
            names = sorted(e.name for e in os.scandir(folder)
                           if e.name.endswith(".json") and not e.name.startswith("."))
        except FileNotFoundError:
            return
        for name in names:
            data = read_json(folder / name)
            if data:
                yield folder / name, data

    def version(self) -> tuple[str, ...]:
        """The names in pending/: they change with every put and removal (a listing, not
        an mtime, whose coarse clock could miss a put in the same few milliseconds)."""
        try:
            return tuple(sorted(e.name for e in os.scandir(self.pending)
                                if e.name.endswith(".json")))
        except FileNotFoundError:
            return ()

    def count(self, folder: Path) -> int:
        try:
            with os.scandir(folder) as it:
                return sum(1 for e in it if e.name.endswith(".json"))
        except FileNotFoundError:
            return 0

    def update(self, path: Path, item: dict[str, Any]) -> None:
        """Rewrite a pending alert (its deliveries) in place, atomically."""
        self.spool.write_json(path, item)

    def finish(self, path: Path, item: dict[str, Any]) -> None:
        """Every channel accepted it: to sent/ (with the final answers), oldest pruned."""
        self._move(path, item, self.sent)
        self._prune()

    def set_aside(self, path: Path, item: dict[str, Any]) -> Path:
        """A channel never accepted it within the give-up time: to failed/ for a person."""
        return self._move(path, item, self.failed)

    def drop(self, path: Path) -> None:
        """Remove a pending alert another one replaced (a merged down+recovered pair)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fsync_dir(self.pending)

    def _move(self, path: Path, item: dict[str, Any], folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        # the final record first (a temp renamed over nothing), then the pending one goes.
        # Only failed/ is fsynced: a person must find it there. A sent/ record lost to a
        # power cut is an archive line lost; the pending one's going is what must last
        # (or the alert is sent again, which the receivers deduplicate by id anyway).
        self.spool.write_bytes_atomic(target, dump_json(item))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if folder == self.failed:
            fsync_dir(folder)
        fsync_dir(self.pending)
        return target

    def _prune(self) -> None:
        try:
            names = sorted(e.name for e in os.scandir(self.sent) if e.name.endswith(".json"))
        except FileNotFoundError:
            return
        for name in names[: max(0, len(names) - KEEP_SENT)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sent / name)
