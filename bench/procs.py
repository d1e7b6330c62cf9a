"""The hermes_py processes the benchmark starts, and their memory.

Every process is a context manager, so a scenario that fails or a Ctrl-C unwinds
them all. hermes-py runs in its own session (process group) so that Ctrl-C reaches
the benchmark only, which then stops ``serve`` with SIGTERM (its clean stop, which
stops its children) and, if anything of that group is still there after the grace
period, kills that group by its id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from tests.support import peers
from tests.support.cli import hermes_cmd
from tests.support.config import Config, Dest, rule


class BenchError(Exception):
    """A scenario could not run or did not complete; the message says why."""


# What a scenario counts as its own failure (the others go on): its errors, and those
# of tests.support.peers (WaitTimeout, ToolMissing, PeerError are Exceptions too).
# Never KeyboardInterrupt.
FAILURES: tuple[type[BaseException], ...] = (Exception,)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def write_config(folder: Path, recv_port: int, dest_port: int, *, dest_ae: str = "STORESCP",
                 receiver_processes: int | None = None, retry_fast: bool = True) -> Path:
    """rules.toml for one run: receiver and destination on 127.0.0.1, one rule to ``dest``.

    Everything else is the default a user gets. The retry delays are short so the
    backlog scenario does not measure backoff policy.
    """
    recv: dict[str, object] = {"ae_title": "HERMES", "bind": peers.LOOPBACK, "port": recv_port,
                               "max_associations": 10}
    if receiver_processes:
        recv["processes"] = receiver_processes
    dest = Dest("dest", dest_port, dest_ae, {"calling_ae_title": "HERMES"},
                short_timeouts=False)
    return Config(destinations=[dest], rules=rule("everything to dest", ["dest"]),
                  receiver=recv, spool={"path": "spool", "min_free_mb": 0},
                  retry={"initial_delay": "1s", "max_delay": "2s", "give_up_after": "1d"}
                  if retry_fast else None).write(folder)


class HermesProc:
    """``hermes-py VERB -c CONFIG`` with its log in the run folder."""

    def __init__(self, args: list[str], config: Path, log: Path):
        self.args = args
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> HermesProc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*hermes_cmd(), *self.args, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.config.parent,
                start_new_session=True)
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"hermes-py {' '.join(self.args)} exited with "
                             f"{self.proc.returncode}; log {self.log}:\n{tail(self.log)}")

    def wait_ready(self, port: int, ae_title: str = "HERMES", timeout: float = 60.0) -> None:
        """Ready = answers a C-ECHO (a listening socket alone is not a working receiver)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            r = peers.echoscu(port, called=ae_title, timeout=10)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"hermes-py {' '.join(self.args)} did not answer C-ECHO on "
                                 f"port {port} within {timeout:g}s; log:\n{tail(self.log)}")
            time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (clean stop), then SIGKILL to the whole group this process leads."""
        p = self.proc
        if p is None:
            return None
        self.proc = None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # children that outlived their parent (a crash) are still in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, 0)
            os.killpg(p.pid, signal.SIGTERM)
            time.sleep(1.0)
            os.killpg(p.pid, signal.SIGKILL)
        return p.returncode

    def __enter__(self) -> HermesProc:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def label(cmdline: list[str]) -> str:
    """``serve``, ``receive``, ``route``, ``dispatch dest``... from a hermes_py command line."""
    for i, tok in enumerate(cmdline):
        base = os.path.basename(tok)
        if base in ("hermes-py", "hermes_py"):
            words = []
            for w in cmdline[i + 1:]:
                if w.startswith("-"):
                    break
                words.append(w)
            return " ".join(words) or base
        if base == "hermes_py.__main__" or tok.endswith("hermes_py/__main__.py"):
            return " ".join(w for w in cmdline[i + 1:i + 3] if not w.startswith("-")) or base
    if any("multiprocessing" in t for t in cmdline):
        return "multiprocessing child"
    return os.path.basename(cmdline[0]) if cmdline else "?"


class RssSampler:
    """Peak RSS per process label of a process tree, sampled every ``interval`` s.

    psutil walks the children of the root each time, so processes the supervisor
    starts (or restarts) later are seen too.
    """

    def __init__(self, root_pid: int, interval: float = 0.25, name: str | None = None):
        self.root_pid = root_pid
        self.interval = interval
        self.name = name
        self.peak_mb: dict[str, float] = {}
        self.pids: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss / 1e6
                lab = self.name if (self.name and p.pid == self.root_pid) else label(p.cmdline())
            except psutil.Error:
                continue
            self.peak_mb[lab] = max(self.peak_mb.get(lab, 0.0), rss)
            self.pids.setdefault(lab, set()).add(p.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def merge_peaks(into: dict[str, float], new: dict[str, float]) -> None:
    for k, v in new.items():
        into[k] = max(into.get(k, 0.0), v)
