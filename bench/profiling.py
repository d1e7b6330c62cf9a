"""Profile the hermes_py processes under the small-instance relay with py-spy.

py-spy samples every process of ``serve`` (``--subprocesses``) from outside, so the
code under test is not changed. Idle threads (pynetdicom's 1 ms polling sleeps,
blocking reads) are not sampled, so a process's sample count over the sampling
rate times the wall time is roughly the CPU it used, in cores.

The raw output has one line per distinct stack::

    process 1:"hermes-py serve -c x";process 2:"... receive -c x";fn (pkg/mod.py);... 17

and ``summarize`` turns it into, per process, the functions that use the most CPU
themselves (self) and including what they call (inclusive), plus the share per
package (pynetdicom, pydicom, hermes_py, stdlib).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench import procs

RATE = 100


def pyspy_exe() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record`` attached to a running process tree; SIGINT makes it write."""

    def __init__(self, pid: int, out: Path, rate: int = RATE):
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.wall = 0.0

    def __enter__(self) -> PySpy:
        exe = pyspy_exe()
        if exe is None:
            raise procs.BenchError("py-spy not installed (pip install py-spy; it is in the "
                                   "bench extra)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out.with_suffix(".log"), "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "record", "--pid", str(self.pid), "--subprocesses", "--format", "raw",
                 "--nolineno", "--rate", str(self.rate), "--output", str(self.out)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # py-spy needs a moment to attach to every process
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.started
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _split(line: str) -> tuple[str, list[str], int] | None:
    """(process label, python frames root first, samples) of one raw line."""
    stack, _, n = line.rstrip("\n").rpartition(" ")
    if not stack or not n.isdigit():
        return None
    frames = stack.split(";")
    proc = "?"
    i = 0
    while i < len(frames) and frames[i].startswith("process "):
        cmd = frames[i].split(":", 1)[1].strip('"') if ":" in frames[i] else frames[i]
        proc = procs.label(cmd.split())
        i += 1
    return proc, frames[i:], int(n)


def category(frame: str) -> str:
    """Package of a ``fn (pkg/mod.py)`` frame: a third-party package, hermes_py or stdlib."""
    where = frame[frame.rfind("(") + 1:].rstrip(")") if "(" in frame else frame
    top = where.split("/", 1)[0]
    top = top[:-3] if top.endswith(".py") else top
    if where.startswith("<") or top in sys.stdlib_module_names or top.startswith("_"):
        return "stdlib"
    return top


def _generic(frame: str) -> bool:
    """Frames every stack has (thread bootstrap, runpy, the CLI): no information."""
    return category(frame) == "stdlib" or frame.startswith(
        ("<module>", "main (hermes_py/cli.py)", "_run (hermes_py/cli.py)"))


def summarize(raw: Path, wall: float, rate: int = RATE, top: int = 12) -> dict[str, Any]:
    per_self: dict[str, Counter[str]] = defaultdict(Counter)
    per_incl: dict[str, Counter[str]] = defaultdict(Counter)
    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        parsed = _split(line)
        if parsed is None:
            continue
        proc, frames, n = parsed
        if not frames:
            continue
        totals[proc] += n
        per_self[proc][frames[-1]] += n
        per_cat[proc][category(frames[-1])] += n
        for f in set(frames):
            if not _generic(f):
                per_incl[proc][f] += n
    out: dict[str, Any] = {"wall_seconds": round(wall, 2), "rate_hz": rate, "processes": {}}
    for proc, total in totals.most_common():
        out["processes"][proc] = {
            "samples": total,
            "cpu_cores": round(total / (rate * wall), 2) if wall else None,
            "by_package_pct": {k: round(100 * v / total, 1)
                               for k, v in per_cat[proc].most_common()},
            "self_top": [(f, v, round(100 * v / total, 1))
                         for f, v in per_self[proc].most_common(top)],
            "inclusive_top": [(f, v, round(100 * v / total, 1))
                              for f, v in per_incl[proc].most_common(top)],
        }
    return out


def format_summary(s: dict[str, Any], top: int = 8) -> str:
    lines = [f"py-spy: {s['rate_hz']} Hz over {s['wall_seconds']} s (idle threads not "
             "sampled: samples = CPU)"]
    for proc, p in s["processes"].items():
        cats = ", ".join(f"{k} {v}%" for k, v in p["by_package_pct"].items())
        lines.append(f"\n[{proc}] {p['samples']} samples ~ {p['cpu_cores']} cores; {cats}")
        lines.append("  self:")
        lines += [f"    {pct:5.1f}%  {f}" for f, _, pct in p["self_top"][:top]]
        lines.append("  inclusive:")
        lines += [f"    {pct:5.1f}%  {f}" for f, _, pct in p["inclusive_top"][:top]]
    return "\n".join(lines)


def profile_relay(ctx: Any, name: str, out_dir: Path) -> dict[str, Any]:
    """One relay run of corpus ``name`` with py-spy on serve and all its children."""
    from bench import scenarios
    from tests import peers

    c = ctx.corpora[name]
    d = ctx.run_dir(f"profile-{name}")
    raw = out_dir / f"relay-{name}.raw.txt"
    try:
        port = peers.free_port()
        with scenarios._storescp(d / "storescp") as scp:
            cfg = procs.write_config(d, port, scp.port,
                                     receiver_processes=ctx.receiver_processes)
            with procs.HermesProc(["serve"], cfg, d / "hermes.log") as h:
                h.wait_ready(port)
                with PySpy(h.pid, raw) as spy:
                    t0 = time.time()
                    with scenarios._dcmsend_thread(port, c, "HERMES", ctx):
                        _, last = scenarios.wait_arrivals(d / "storescp", c.count, ctx.stall,
                                                          h.check_alive)
        if not raw.exists():
            raise procs.BenchError(f"py-spy wrote nothing; see {raw.with_suffix('.log')}:\n"
                                   f"{procs.tail(raw.with_suffix('.log'))}")
        s = summarize(raw, spy.wall)
        s["raw"] = str(raw)
        s["relay_seconds_under_profiler"] = round(last - t0, 2)
        s["relay_rate_under_profiler"] = round(c.count / max(last - t0, 1e-9), 1)
        return s
    finally:
        with contextlib.suppress(Exception):
            ctx.done_with(d)
