"""The installed ``hermes-py`` as an admin (or systemd) runs it: a subprocess, its exit code,
its output.

``HERMES_PY_CMD`` overrides the command (e.g. ``"python -m hermes_py"`` with a
``PYTHONPATH`` pointing at a mutated copy of the package, for mutation testing).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.peers import ToolMissing


def hermes_cmd() -> list[str]:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    override = os.environ.get("HERMES_PY_CMD")
    if override:
        return shlex.split(override)
    exe = Path(sys.executable).parent / "hermes-py"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("hermes-py")
    if not found:
        raise ToolMissing("hermes-py is not installed (make test installs it)")
    return [found]


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 120,
        input: str | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run ``hermes-py ARGS``; stdout and stderr captured as text."""
    return subprocess.run([*hermes_cmd(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, input=input, env=env)


def one_error_line(cp: subprocess.CompletedProcess[str]) -> str:
    """The error output must be exactly one line (no traceback) and say 'error'."""
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{cp.stderr}"
    assert "error" in lines[0]
    return lines[0]
