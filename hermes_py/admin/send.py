"""``hermes-py send PATH...``: put files and folder trees into the spool, each whole or not at all.

Each file is copied into tmp/ (same filesystem as drop/), fsynced, then renamed
into ``drop/send-<time>-<random>/<its relative path>`` (``Spool.deposit``): the
intake never sees a half-copied file, and validates these like any dropped file
(non-DICOM files end in error/ with a reason). The batch folder keeps two sends
of files with the same names from overwriting each other.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from hermes_py.admin import Result, open_spool
from hermes_py.admin.status import read_serve_state
from hermes_py.config import Settings
from hermes_py.errors import HermesError


def _walk(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(source file, relative name in the drop batch) for files and folder trees."""
    for p in paths:
        if p.is_dir():
            base = p.resolve().name or "root"
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    src = Path(root) / f
                    yield src, Path(base) / src.relative_to(p)
        else:
            yield p, Path(p.name)


class _Progress:
    """A one-line progress bar on a terminal; nothing at all otherwise."""

    def __init__(self, total_files: int, total_bytes: int, stream: TextIO, enabled: bool):
        self.files = total_files
        self.bytes = total_bytes
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, done_files: int, done_bytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        frac = done_bytes / self.bytes if self.bytes else (done_files / max(self.files, 1))
        width = 30
        bar = "#" * int(frac * width)
        rate = done_bytes / max(now - self.t0, 1e-6) / 1e6
        self.stream.write(f"\r[{bar:<{width}}] {frac * 100:5.1f}%  {done_files}/{self.files} "
                          f"files  {done_bytes / 1e6:.1f} MB  {rate:.1f} MB/s ")
        if final:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class Sent(Result):
    files: int
    bytes: int
    folder: str          # the drop batch, relative to the spool root
    serve_running: bool

    def text(self) -> str:
        after = ("the router picks them up from there" if self.serve_running else
                 "serve is not running: they are routed once `hermes-py serve` (or "
                 "`hermes-py intake` and `hermes-py route`) runs")
        return (f"sent {self.files} file(s), {self.bytes / 1e6:.1f} MB into {self.folder}/; "
                f"{after}")


def _items(paths: list[Path]) -> list[tuple[Path, Path, int]]:
    """(source, relative target, size) of every file to send; same names kept apart."""
    items: list[tuple[Path, Path, int]] = []
    for src, rel in _walk(paths):
        try:
            st = src.stat()
        except OSError as e:
            raise HermesError(f"cannot read {src}: {e.strerror}") from None
        if not os.path.isfile(src):
            continue  # sockets, fifos: nothing to send
        items.append((src, rel, st.st_size))
    if not items:
        raise HermesError("nothing to send: no files under " + ", ".join(map(str, paths)))
    # Two command-line paths may end in the same name: keep both.
    seen: set[Path] = set()
    for i, (src, rel, size) in enumerate(items):
        n = 1
        cand = rel
        while cand in seen:
            n += 1
            cand = rel.with_name(f"{rel.stem}~{n}{rel.suffix}")
        seen.add(cand)
        items[i] = (src, cand, size)
    return items


def send(cfg: Settings, paths: list[Path], progress: bool = True) -> Sent:
    """Copy files and folder trees into drop/, each file whole or not at all."""
    spool = open_spool(cfg)
    if not cfg.intake.enabled:
        raise HermesError(f"the drop folder intake is disabled ([intake] enabled = false in "
                          f"{cfg.path}): sent files would never be routed")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise HermesError(f"no such file or folder: {missing[0]}")
    root = spool.root.resolve()
    for p in paths:
        here = p.resolve()
        if here == root or root in here.parents or (p.is_dir() and here in root.parents):
            raise HermesError(f"{p} is the spool or inside it ({spool.root}): sending it "
                              "would send again every instance it holds; send the files "
                              "you mean, from outside the spool")
    items = _items(paths)
    spool.tmp.mkdir(exist_ok=True)
    batch = spool.send_batch()
    bar = _Progress(len(items), sum(s for _, _, s in items), sys.stderr,
                    progress and sys.stderr.isatty())
    done = done_bytes = 0
    dirs: set[Path] = set()
    try:
        for src, rel, size in items:
            target = batch / rel
            if target.parent not in dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(target.parent)
            try:
                spool.deposit(src, target)
            except OSError as e:
                raise HermesError(f"cannot copy {src}: {e.strerror or e}") from None
            done += 1
            done_bytes += size
            bar.update(done, done_bytes)
    finally:
        spool.sync_dirs([*dirs, spool.drop])
        bar.update(done, done_bytes, final=True)
    serve = read_serve_state(spool)
    return Sent(done, done_bytes, batch.relative_to(spool.root).as_posix(),
                bool(serve and serve.get("running") is not False))
