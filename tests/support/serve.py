"""``hermes-py serve`` under test: the installed console script as its own process group.

The router is run the way a hospital runs it: a rules.toml on disk (a
:class:`~tests.support.config.Config`), ``hermes-py serve`` in a session of its
own (so a test can kill -9 the whole group, and nothing outlives the test), a
modality (DCMTK ``dcmsend``) on one side and real destinations on the other.
Nothing here imports a router stage: a test sees only what an operator sees (the
spool folders, the sidecars, the state files, the log, the CLI, ``ps``) and what
the peers received, so the same tests judge any implementation of the documented
contracts (docs/internals.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hermes_py.spool import Spool
from tests.support.cli import hermes_cmd
from tests.support.config import Config
from tests.support.peers import (
    LOOPBACK,
    Modality,
    SendResult,
    echoscu,
    peer_env,
    wait_for,
)

# Generous: 2 shared cores, other engineers' test runs at the same time, and serve
# starting five or more Python processes that each import pydicom.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0

# Every Hermes not yet cleaned up: a failing test gets their logs in its report.
LIVE: weakref.WeakSet[Hermes] = weakref.WeakSet()


class ServeFailed(AssertionError):
    """serve did not start, did not stop, or left processes behind."""


# ---------------------------------------------------------------- processes, as ps shows them


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(process group, state letter) of a process; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[2]), rest[0]


def alive(pid: int | None) -> bool:
    """The process runs (a zombie waiting for its parent to reap it does not)."""
    if not pid:
        return False
    info = _proc_stat(pid)
    return info is not None and info[1] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info and info[0] == pgid and info[1] != "Z":
                out.append(int(entry))
    return out


def processes_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (our unique config path)."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmd and alive(int(entry)):
            out.append(int(entry))
    return out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((LOOPBACK, port)) == 0


def kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- the router under test


class Hermes:
    """One router under test: ``workdir/rules.toml`` from ``config``, its spool, and
    ``hermes-py serve`` once started (its log in ``workdir/serve.log``)."""

    def __init__(self, workdir: Path, config: Config):
        assert config.receiver is not None, "serve needs a [receiver] (config.receiver())"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = self.workdir / "rules.toml"
        spool = Path(str(config.spool.get("path", "spool")))
        self.spool_dir = spool if spool.is_absolute() else self.workdir / spool
        self.spool = Spool(self.spool_dir)
        self.log_path = self.workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.sends = 0
        self.write_config()
        LIVE.add(self)

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def ae_title(self) -> str:
        return str((self.config.receiver or {}).get("ae_title", "HERMES"))

    def write_config(self, text: str | None = None) -> None:
        """Save rules.toml from ``config`` (or ``text``, a hand edit) as an editor does."""
        self.config.write(self.workdir, text)

    # ------------------------------------------------------------ process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mark(self, text: str) -> None:
        """A line in serve.log saying what the test did, for whoever reads it after a failure."""
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== [test {time.strftime('%H:%M:%S')}] {text} =====\n".encode())

    def start(self, wait: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Start serve; with ``wait``, until the receiver answers a C-ECHO."""
        assert not self.running, "already running"
        self.starts += 1
        self.mark(f"start #{self.starts}: {' '.join(hermes_cmd())} serve -c {self.path}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen(
                [*hermes_cmd(), "serve", "-c", str(self.path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, cwd=self.workdir,
                env=peer_env())
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)

    def _check_serving(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise ServeFailed(f"hermes-py serve exited with {rc}\n{self.log_tail(60)}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the receiver answers a C-ECHO (how a modality finds out; a bare TCP probe
        would hold an unfinished association); at once if serve exits meanwhile."""
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True
            return port_open(self.port) and echoscu(self.port, self.ae_title).returncode == 0

        wait_for(ready, timeout, interval=0.3,
                 what=f"hermes-py serve to answer C-ECHO on {self.port}")
        self._check_serving()

    def stop(self, timeout: float = STOP_TIMEOUT, expect: int | None = 0,
             sig: int = signal.SIGTERM) -> int:
        """SIGTERM to serve (what systemd and Ctrl-C do); it must exit ``expect``, and every
        child must be gone soon after. Returns its exit code."""
        assert self.proc is not None, "not started"
        pgid = self.proc.pid
        self.mark(f"signal {signal.Signals(sig).name}")
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(pgid)
            raise ServeFailed(f"hermes-py serve did not exit within {timeout:g}s of "
                              f"{signal.Signals(sig).name}\n{self.log_tail(60)}") from None
        self.mark(f"exited rc={rc}")
        deadline = time.monotonic() + 15
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_members(pgid) + processes_mentioning(str(self.path))
        kill(left)
        kill_group(pgid)
        self.proc = None
        if left:
            raise ServeFailed(f"serve exited rc={rc} but its children {left} were still "
                              f"running 15s later\n{self.log_tail(40)}")
        if expect is not None and rc != expect:
            raise ServeFailed(f"hermes-py serve exited {rc} on {signal.Signals(sig).name}, "
                              f"expected {expect}\n{self.log_tail(60)}")
        return rc

    def reload(self) -> None:
        """SIGHUP to serve: what ``systemctl reload`` does after an admin edited rules.toml."""
        assert self.proc is not None, "not started"
        self.mark("SIGHUP")
        self.proc.send_signal(signal.SIGHUP)

    def kill9(self) -> None:
        """kill -9 of the whole process group: a power cut for every stage at once."""
        assert self.proc is not None, "not started"
        pgid = self.proc.pid
        self.mark("kill -9 of the process group")
        kill_group(pgid)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # A child that left the process group (setsid) survives a group kill: that is a bug
        # (the next serve would find the port busy), reported, then cleaned up.
        escaped = processes_mentioning(str(self.path))
        kill(escaped)
        if escaped:
            raise ServeFailed(f"processes {escaped} of serve survived kill -9 of its process "
                              "group (they left the group)")
        wait_for(lambda: not port_open(self.port), 15, what="receiver port to close after kill")

    def kill_serve(self) -> int:
        """kill -9 of the supervisor alone (an OOM killer's choice); returns its pid, the
        process group its children are in."""
        assert self.proc is not None, "not started"
        pgid = self.proc.pid
        self.mark("kill -9 of serve alone")
        os.kill(pgid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        return pgid

    def kill(self, pids: Iterable[int]) -> None:
        """kill -9 of some of serve's children (what a crash of one piece looks like)."""
        pids = list(pids)
        self.mark(f"kill -9 of {pids}")
        kill(pids)

    def cleanup(self) -> None:
        """Always: nothing we started outlives the test."""
        if self.proc is not None:
            kill_group(self.proc.pid)
            with contextlib.suppress(Exception):
                self.proc.wait(10)
            self.proc = None
        kill(processes_mentioning(str(self.path)))
        LIVE.discard(self)

    # ------------------------------------------------------------ serve's children

    def pids(self, verb: str) -> list[int]:
        """Pids of serve's children running ``verb`` (``route``, ``receive``, ``dispatch``...),
        as ``ps`` shows them."""
        out = []
        for pid in processes_mentioning(str(self.path)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if verb.encode() in argv and (self.proc is None or pid != self.proc.pid):
                out.append(pid)
        return out

    def serve_state(self) -> dict[str, Any]:
        """state/serve.json: serve and its children as it last wrote them."""
        return self.spool.read_json(self.spool.serve_state)

    def children(self) -> dict[str, dict[str, Any]]:
        """serve.json's children by name (``receive``, ``receive:2``, ``dispatch:pacs``...);
        empty while the file is still an earlier serve's."""
        state = self.serve_state()
        if self.proc is None or state.get("pid") != self.proc.pid:
            return {}
        return {c["name"]: c for c in state.get("children", [])}

    def pid(self, name: str) -> int | None:
        c = self.children().get(name)
        return c.get("pid") if c else None

    def wait_children(self, names: Iterable[str],
                      timeout: float = START_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Until every child in ``names`` runs (serve.json's pid is alive); the children."""
        names = set(names)

        def up() -> dict[str, dict[str, Any]] | None:
            self._check_serving()
            kids = self.children()
            return kids if all(alive(kids.get(n, {}).get("pid")) for n in names) else None
        result: dict[str, dict[str, Any]] = wait_for(up, timeout, 0.2,
                                                     f"children {sorted(names)} to run")
        return result

    # ------------------------------------------------------------ feeding

    def send_async(self, files: Sequence[Path], calling: str = "MODALITY") -> Modality:
        self.sends += 1
        return Modality(self.port, files, self.workdir / f"dcmsend.{self.sends}.report",
                        calling=calling, called=self.ae_title)

    def send(self, files: Sequence[Path], calling: str = "MODALITY",
             timeout: float = 300.0) -> SendResult:
        return self.send_async(files, calling).result(timeout)

    # ------------------------------------------------------------ observing

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``hermes-py ARGS -c rules.toml``, as an admin on this machine runs it."""
        return subprocess.run([*hermes_cmd(), *args, "-c", str(self.path)],
                              capture_output=True, text=True, timeout=timeout, env=peer_env(),
                              cwd=self.workdir)

    @staticmethod
    def dcm_in(folder: Path) -> list[Path]:
        return [Path(e.path) for e in Spool.scan(folder)]

    def queued(self, dest: str) -> int:
        """In the outbox (urgent included) or claimed by a worker: not yet delivered."""
        n = sum(len(self.dcm_in(f)) for f in self.spool.outboxes(dest))
        active = self.spool.active / self.spool.dest_folder(dest)
        if active.is_dir():
            n += sum(len(self.dcm_in(d)) for d in active.iterdir() if d.is_dir())
        return n

    def in_error(self, dest: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
        folder = self.spool.error_dir(dest)
        return [(p, dict(self.spool.read_sidecar(p))) for p in sorted(self.dcm_in(folder))]

    def all_errors(self) -> list[Path]:
        return sorted(self.spool.error.rglob("*.dcm")) if self.spool.error.is_dir() else []

    def delivered(self, dest: str) -> list[Path]:
        return self.dcm_in(self.spool.success_dir(dest))

    def state(self, dest: str) -> dict[str, Any]:
        """state/<dest>.json as the destination's dispatcher last wrote it."""
        return self.spool.read_json(self.spool.state_file(dest))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 150) -> str:
        lines = self.log_text().splitlines()
        bad = [ln for ln in lines if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", ln)]
        head = ""
        if bad:
            head = "-- first error lines --\n" + "\n".join(bad[:40]) + "\n"
        return (f"-- serve log {self.log_path} ({len(lines)} lines) --\n{head}"
                f"-- last {n} lines --\n" + "\n".join(lines[-n:]))

    def spool_listing(self) -> str:
        """Counts per folder: what an operator would `ls` first."""
        out = []
        if self.spool_dir.is_dir():
            for d in sorted(p for p in self.spool_dir.rglob("*") if p.is_dir()):
                n = len(list(d.glob("*.dcm")))
                if n:
                    out.append(f"{d.relative_to(self.spool_dir)}: {n}")
        return ", ".join(out) or "(no instances in the spool)"
