"""A real small filesystem, so ENOSPC comes from the kernel and not from us."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


class CannotMount(Exception):
    """This machine does not let us mount a tmpfs (not root, no CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def small_filesystem(mnt: Path, size_mb: float) -> Iterator[Path]:
    """A ``size_mb`` tmpfs mounted on ``mnt`` (created) for the block; unmounted after it,
    waiting a moment for a killed process still holding a file open."""
    mnt.mkdir(parents=True, exist_ok=True)
    size = f"{int(size_mb * 1024)}k"
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CannotMount(f"cannot mount a small tmpfs here: {e}") from None
    if res.returncode != 0:
        raise CannotMount(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): "
                          f"{res.stderr.strip()}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True,
                              timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
