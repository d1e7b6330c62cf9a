"""Profile the hermes_py processes under the small-instance relay with py-spy.

py-spy samples every process of ``serve`` (``--subprocesses``) from outside, so the
code under test is not changed. Two recordings, one relay run each:

- ``wall``: every thread py-spy does not itself judge idle. It does count threads
  parked in ``Condition.wait``, a thread pool's queue, a blocking inotify read or
  pynetdicom's ``time.sleep(0.001)`` polling lines, so those leaf frames are
  classed as *waiting* here (``WAIT_FUNCS``/``WAIT_LINES``) and reported apart;
  what is left is where the threads work or block in I/O (fsync shows up as the
  line that calls it).
- ``gil`` (``--gil``): only the thread holding the GIL, i.e. Python CPU. A
  process's samples over rate x wall is the share of one core it spent in Python.

The raw output has one line per distinct stack::

    process 1:"hermes-py serve -c x";process 2:"... receive -c x";fn (pkg/mod.py:12);... 17

and ``summarize`` gives, per process, the busy functions and lines (self), the
busy functions including what they call (inclusive, thread bootstrap left out),
and the share per package.
"""

from __future__ import annotations

import contextlib
import re
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

# Leaf functions that mean "this thread is waiting", whatever py-spy thinks.
WAIT_FUNCS = frozenset({
    "Condition.wait (threading.py)", "Event.wait (threading.py)",
    "Thread.join (threading.py)", "Thread._wait_for_tstate_lock (threading.py)",
    "_worker (concurrent/futures/thread.py)", "Queue.get (queue.py)",
    "EpollSelector.select (selectors.py)", "_PollLikeSelector.select (selectors.py)",
    "SelectSelector.select (selectors.py)", "BaseSelector.select (selectors.py)",
    "InotifyFD._read_event_buffer (watchdog/observers/inotify_c.py)",
    "InotifyFD._check_inotify_fd (watchdog/observers/inotify_c.py)",
    "Popen.wait (subprocess.py)", "Popen._wait (subprocess.py)",
    "Popen._try_wait (subprocess.py)",
})
# pynetdicom 3.0.4 (pinned): the time.sleep() lines of its polling reactors.
WAIT_LINES = frozenset({
    "DULServiceProvider.run_reactor (pynetdicom/dul.py:403)",
    "Association._run_reactor (pynetdicom/association.py:714)",
})
_LINENO = re.compile(r":\d+\)$")


def pyspy_exe() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record`` attached to a running process tree; SIGINT makes it write."""

    def __init__(self, pid: int, out: Path, rate: int = RATE, gil: bool = False):
        self.pid = pid
        self.out = out
        self.rate = rate
        self.gil = gil
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
                 "--rate", str(self.rate), "--output", str(self.out),
                 *(["--gil"] if self.gil else [])],
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


def func(frame: str) -> str:
    """``fn (pkg/mod.py:12)`` -> ``fn (pkg/mod.py)``."""
    return _LINENO.sub(")", frame)


def category(frame: str) -> str:
    """Package of a ``fn (pkg/mod.py)`` frame: a third-party package, hermes_py or stdlib."""
    where = func(frame)
    where = where[where.rfind("(") + 1:].rstrip(")") if "(" in where else where
    top = where.split("/", 1)[0]
    top = top[:-3] if top.endswith(".py") else top
    if where.startswith("<") or top in sys.stdlib_module_names or top.startswith("_"):
        return "stdlib"
    return top


def waiting(leaf: str) -> bool:
    return func(leaf) in WAIT_FUNCS or leaf in WAIT_LINES


def _generic(frame: str) -> bool:
    """Frames every stack has (thread bootstrap, runpy, the CLI): no information."""
    return category(frame) == "stdlib" or frame.startswith(
        ("<module>", "main (hermes_py/cli.py", "_run (hermes_py/cli.py"))


def summarize(raw: Path, wall: float, rate: int = RATE, top: int = 12) -> dict[str, Any]:
    per_self: dict[str, Counter[str]] = defaultdict(Counter)
    per_line: dict[str, Counter[str]] = defaultdict(Counter)
    per_incl: dict[str, Counter[str]] = defaultdict(Counter)
    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    per_wait: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        parsed = _split(line)
        if parsed is None:
            continue
        proc, frames, n = parsed
        if not frames:
            continue
        totals[proc] += n
        leaf = frames[-1]
        if waiting(leaf):
            per_wait[proc][func(leaf)] += n
            continue
        busy[proc] += n
        per_self[proc][func(leaf)] += n
        per_line[proc][leaf] += n
        per_cat[proc][category(leaf)] += n
        for f in {func(f) for f in frames}:
            if not _generic(f):
                per_incl[proc][f] += n
    out: dict[str, Any] = {"wall_seconds": round(wall, 2), "rate_hz": rate, "processes": {}}

    def pct(c: Counter[str], total: int, k: int = top) -> list[tuple[str, int, float]]:
        return [(f, v, round(100 * v / total, 1)) for f, v in c.most_common(k)] if total else []

    for proc, total in sorted(totals.items(), key=lambda kv: -busy[kv[0]]):
        b = busy[proc]
        out["processes"][proc] = {
            "samples": total,
            "busy_samples": b,
            "waiting_pct": round(100 * (total - b) / total, 1),
            "busy_cores": round(b / (rate * wall), 2) if wall else None,
            "by_package_pct": {k: round(100 * v / b, 1) for k, v in per_cat[proc].most_common()}
            if b else {},
            "self_top": pct(per_self[proc], b),
            "self_lines_top": pct(per_line[proc], b),
            "inclusive_top": pct(per_incl[proc], b),
            "waiting_top": pct(per_wait[proc], total - b, 5),
        }
    return out


def format_summary(s: dict[str, Any], top: int = 8) -> str:
    mode = s.get("mode", "wall")
    lines = [f"py-spy ({mode}): {s['rate_hz']} Hz over {s['wall_seconds']} s; relay "
             f"{s.get('relay_rate_under_profiler', '?')} inst/s under the profiler. Shares "
             "are of each process's busy samples (waiting threads left out)."]
    for proc, p in s["processes"].items():
        if not p["busy_samples"]:
            continue
        cats = ", ".join(f"{k} {v}%" for k, v in p["by_package_pct"].items())
        lines.append(f"\n[{proc}] busy ~{p['busy_cores']} cores ({p['busy_samples']} samples, "
                     f"{p['waiting_pct']}% of all samples waiting); {cats}")
        lines.append("  self (function):")
        lines += [f"    {pc:5.1f}%  {f}" for f, _, pc in p["self_top"][:top]]
        lines.append("  self (line):")
        lines += [f"    {pc:5.1f}%  {f}" for f, _, pc in p["self_lines_top"][:top]]
        lines.append("  inclusive:")
        lines += [f"    {pc:5.1f}%  {f}" for f, _, pc in p["inclusive_top"][:top]]
    return "\n".join(lines)


def profile_relay(ctx: Any, name: str, out_dir: Path, gil: bool = False) -> dict[str, Any]:
    """One relay run of corpus ``name`` with py-spy on serve and all its children."""
    from bench import scenarios
    from tests.support import peers

    c = ctx.corpora[name]
    mode = "gil" if gil else "wall"
    d = ctx.run_dir(f"profile-{mode}-{name}")
    raw = out_dir / f"relay-{name}-{mode}.raw.txt"
    try:
        port = peers.free_port()
        with scenarios._storescp(d / "storescp") as scp:
            cfg = procs.write_config(d, port, scp.port,
                                     receiver_processes=ctx.receiver_processes)
            with procs.HermesProc(["serve"], cfg, d / "hermes.log") as h:
                h.wait_ready(port)
                with PySpy(h.pid, raw, gil=gil) as spy:
                    t0 = time.time()
                    with scenarios._dcmsend_thread(port, c, "HERMES", ctx):
                        _, last = scenarios.wait_arrivals(d / "storescp", c.count, ctx.stall,
                                                          h.check_alive)
        if not raw.exists():
            raise procs.BenchError(f"py-spy wrote nothing; see {raw.with_suffix('.log')}:\n"
                                   f"{procs.tail(raw.with_suffix('.log'))}")
        s = summarize(raw, spy.wall)
        s["mode"] = mode
        s["raw"] = str(raw)
        s["relay_seconds_under_profiler"] = round(last - t0, 2)
        s["relay_rate_under_profiler"] = round(c.count / max(last - t0, 1e-9), 1)
        return s
    finally:
        with contextlib.suppress(Exception):
            ctx.done_with(d)
