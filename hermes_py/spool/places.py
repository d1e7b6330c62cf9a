"""Where a stage's folders are on disk: the layout patterns of ``lifecycle`` made into paths.

``Place`` is one existing folder of a stage (for which destination, batch or
worker); ``Scan`` lists the instances in one folder and always closes its
directory handle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_py.lifecycle import Stage
from hermes_py.spool.names import DCM


@dataclass(frozen=True)
class Place:
    """One existing folder of a stage: for which destination, which batch or worker."""

    stage: Stage
    path: Path
    dest: str | None = None
    part: str | None = None   # the batch (pending/) or worker (active/) folder name

    def rel(self, root: Path) -> str:
        return self.path.relative_to(root).as_posix()


class Scan:
    """The ``*.dcm`` entries of one folder, read lazily; closes its scandir when done.

    ``for e in spool.scan(folder)`` reads to the end; ``with spool.scan(folder)
    as entries`` closes it even when the reader stops early. A missing folder
    is empty.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._it: Any = None
        try:
            self._it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            self._it = None

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        it = self._it
        if it is None:
            return
        try:
            for e in it:
                if e.name.endswith(DCM) and not e.name.startswith("."):
                    yield e
        finally:
            self.close()

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            it.close()

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self)

    def __exit__(self, *exc: object) -> None:
        self.close()


def expand(stage: Stage, base: Path, comps: list[str], dest: str | None,
           dest_folder: Callable[[str], str], part: str | None = None) -> Iterator[Place]:
    """The existing folders of one layout pattern, ``{dest}`` fixed or listed, the rest listed."""
    if not comps:
        if base.is_dir():
            yield Place(stage, base, dest, part)
        return
    comp, rest = comps[0], comps[1:]
    if comp == "{dest}" and dest is not None:
        yield from expand(stage, base / dest_folder(dest), rest, dest, dest_folder, part)
    elif comp.startswith("{"):
        for sub in subdirs(base):
            if comp == "{dest}":
                yield from expand(stage, sub, rest, sub.name, dest_folder, part)
            else:
                yield from expand(stage, sub, rest, dest, dest_folder, sub.name)
    else:
        yield from expand(stage, base / comp, rest, dest, dest_folder, part)


def subdirs(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []

