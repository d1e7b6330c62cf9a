"""The drop-folder verbs of :class:`hermes_py.spool.Spool`: what ``send`` deposits, what a
person put where the spool's own names belong, and what the intake takes away."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from hermes_py.spool.names import DCM, FROM_INCOMING, JSON, SEND_BATCH, is_name


class Drops:
    drop: Path

    def copy_in(self, src: Path, suffix: str = DCM) -> Path:
        raise NotImplementedError

    def discard_temp(self, path: Path) -> None:
        raise NotImplementedError

    def deposit(self, src: Path, target: Path) -> None:
        """Put a copy of ``src`` at ``target`` under drop/, whole or not at all."""
        tmp = self.copy_in(src, suffix=".send")
        try:
            os.replace(tmp, target)
        except BaseException:
            self.discard_temp(tmp)
            raise

    def misplaced(self, folder: Path) -> list[Path]:
        """Files in a stage folder whose names the spool did not make (put there by hand).

        Hidden files are left alone (an editor's, a sync tool's), like the intake does.
        """
        try:
            with os.scandir(folder) as it:
                return sorted(Path(e.path) for e in it
                              if not e.name.startswith(".") and e.is_file(follow_symlinks=False)
                              and not (e.name.endswith((DCM, JSON))
                                       and is_name(e.name.rsplit(".", 1)[0])))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def send_batch(self) -> Path:
        """A new drop/ folder for one ``hermes-py send`` (filled by ``deposit`` only)."""
        return self.drop / f"{SEND_BATCH}{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"

    def to_drop(self, path: Path) -> Path:
        """Hand a misplaced file to the intake: into ``drop/from-incoming/``, a free name kept."""
        folder = self.drop / FROM_INCOMING
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        n = 1
        while target.exists():
            n += 1
            target = folder / f"{path.stem}~{n}{path.suffix}"
        os.rename(path, target)
        return target

    def take_dropped(self, path: Path) -> None:
        """Remove a dropped file the intake has published a copy of."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

