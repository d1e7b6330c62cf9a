"""The end-to-end harness: the installed ``hermes-py serve`` as a subprocess, fed by DCMTK.

The router is tested the way a hospital runs it: a rules.toml on disk, ``hermes-py serve``
as its own process group, a modality (DCMTK ``dcmsend``) on one side and real destinations
on the other. Nothing here imports a router stage: the tests see only what an operator
sees (the spool folders, the sidecars, the state files, the logs, the CLI) and what the
peers received, so the same tests judge any implementation of the documented contracts
(docs/internals.md).

``HERMES_PY_CMD`` overrides the command (e.g. ``"python -m hermes_py"`` with a
``PYTHONPATH`` pointing at a mutated copy of the package, for mutation testing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from hermes_py.spool import Spool
from tests.dicomgen import make_instance, save
from tests.peers import (
    LOOPBACK,
    Received,
    ScriptedSCP,
    echoscu,
    free_port,
    peer_env,
    require_tool,
    wait_for,
)

HERMES_PY = Path(sys.executable).parent / "hermes-py"

# Generous: 2 shared cores, 4-5 other engineers' test runs at the same time.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
DELIVERY_TIMEOUT = float(os.environ.get("HERMES_E2E_DELIVERY_TIMEOUT", "180"))

LIVE: weakref.WeakSet[Hermes] = weakref.WeakSet()


def hermes_cmd() -> list[str]:
    override = os.environ.get("HERMES_PY_CMD")
    if override:
        return shlex.split(override)
    return [str(HERMES_PY)]


# ---------------------------------------------------------------- rules.toml


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}"
                                for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def toml_table(header: str, values: Mapping[str, object]) -> str:
    lines = [f"[{header}]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Dest:
    """A destination as rules.toml names it; the peer behind ``port`` is the test's business."""

    name: str
    port: int = field(default_factory=free_port)
    ae_title: str = "DEST"
    options: dict[str, object] = field(default_factory=dict)

    def toml(self) -> str:
        values: dict[str, object] = {
            "ae_title": self.ae_title, "host": LOOPBACK, "port": self.port,
            "connection_timeout": "3s", "acse_timeout": "15s", "dimse_timeout": "30s",
            "network_timeout": "30s",
        }
        values.update(self.options)
        return toml_table(f"destinations.{self.name}", values)


def route_all(dests: Iterable[Dest | str], name: str = "everything") -> str:
    names = [d.name if isinstance(d, Dest) else d for d in dests]
    return f'[[rules]]\nname = "{name}"\nto = {toml_value(names)}\n'


# ---------------------------------------------------------------- the modality (dcmsend)


_SENT_OK = re.compile(r"^0x(0000|b[0-9a-f]{3})$", re.I)


@dataclass
class SendResult:
    """What dcmsend was answered, per SOP Instance UID (its +crf report)."""

    returncode: int
    statuses: dict[str, str]  # uid -> "0x0000" / "0xa700" / "<not sent>" ...
    stdout: str
    stderr: str

    @property
    def acked(self) -> set[str]:
        """Instances the modality was answered Success (or Warning) for: now the router's."""
        return {u for u, s in self.statuses.items() if _SENT_OK.match(s)}

    def with_status(self, status: int) -> set[str]:
        want = f"0x{status:04x}"
        return {u for u, s in self.statuses.items() if s.lower() == want}

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for s in self.statuses.values():
            counts[s] = counts.get(s, 0) + 1
        return (f"dcmsend rc={self.returncode} statuses={counts} "
                f"stderr={self.stderr.strip()[-800:]!r}")


def parse_dcmsend_report(text: str) -> dict[str, str]:
    """``SOP Instance : uid`` ... ``DIMSE Status : 0x0000 (Success)`` blocks -> {uid: status}.

    An instance listed twice (it cannot be with one dcmsend run, but be safe) keeps its
    best answer, so a Success is never hidden by a later line.
    """
    out: dict[str, str] = {}
    uid: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        value = value.strip()
        if key == "SOP Instance":
            uid = value
        elif key == "DIMSE Status" and uid is not None:
            status = value.split(" ", 1)[0] if value.startswith("0x") else value
            if not (uid in out and _SENT_OK.match(out[uid])):
                out[uid] = status
            uid = None
    return out


class Modality:
    """DCMTK dcmsend as a modality: proposes each file's own transfer syntax.

    Same options as tests.peers.dcmsend, but asynchronous (a scenario kills the router
    while the modality is sending) and with the report in a file of its own.
    """

    def __init__(self, port: int, files: Sequence[Path], report: Path, calling: str = "MODALITY",
                 called: str = "HERMES"):
        exe = require_tool("dcmsend")
        self.files = list(files)
        self.report = report
        self.uids = {p: uid_of(p) for p in self.files}
        args = [exe, "-aet", calling, "-aec", called, "-dn", "-nuc", "+ma", "-nh",
                "-to", "10", "-ta", "30", "-td", "60", "+crf", str(report),
                LOOPBACK, str(port)]
        if self.files:
            listing = report.with_suffix(".files")
            listing.write_text("".join(f"{p}\n" for p in self.files))
        self.proc = subprocess.Popen(
            [*args, *[str(f) for f in self.files]], env=peer_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 300.0) -> SendResult:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"dcmsend did not finish within {timeout:g}s: {err[-800:]}")
        try:
            text = self.report.read_text()
        except FileNotFoundError:
            text = ""  # never connected: nothing was answered
        statuses = parse_dcmsend_report(text)
        for uid in self.uids.values():
            statuses.setdefault(uid, "<no answer>")
        return SendResult(self.proc.returncode, statuses, text, err)


# ---------------------------------------------------------------- instances


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True,
                       specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def make_corpus(folder: Path, n: int, rows: int = 16, cols: int = 16, per_series: int = 100,
                **kw: Any) -> list[Path]:
    """``n`` small uncompressed instances, each with its own pixels, ``per_series`` a series."""
    from pydicom.uid import generate_uid
    files = []
    study = generate_uid()
    series = generate_uid()
    base = int.from_bytes(os.urandom(4), "big")
    for i in range(n):
        if i and i % per_series == 0:
            series = generate_uid()
        ds = make_instance(rows, cols, study_uid=study, series_uid=series,
                           instance_number=i % per_series + 1, seed=base + i, **kw)
        files.append(save(ds, folder / f"{i:05d}.dcm"))
    return files


def sent_index(files: Iterable[Path]) -> dict[str, Dataset]:
    out = {}
    for p in files:
        ds = dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def decode_received(rec: Received) -> Dataset:
    """A ScriptedSCP record (dataset bytes as received on the wire) as a Dataset."""
    ts = UID(rec.transfer_syntax)
    ds = read_dataset(io.BytesIO(rec.data), ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def scp_arrivals(scp: ScriptedSCP) -> dict[str, list[Dataset]]:
    with scp._lock:
        recs = list(scp.received)
    out: dict[str, list[Dataset]] = {}
    for r in recs:
        out.setdefault(r.sop_instance_uid, []).append(decode_received(r))
    return out


def folder_arrivals(folder: Path) -> dict[str, list[Dataset]]:
    """Instances a storescp wrote (one file per reception)."""
    out: dict[str, list[Dataset]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = dcmread(p)
        except Exception:
            continue  # storescp still writing it
        out.setdefault(str(ds.SOPInstanceUID), []).append(ds)
    return out


IDENTITY = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
            "InstanceNumber", "Rows", "Columns")


def difference(sent: Dataset, got: Dataset) -> str | None:
    """None when ``got`` is ``sent`` (same identity, same pixels), else what differs.

    Same pixel data bytes when both are uncompressed or both carry the same compressed
    syntax (no re-encoding allowed); equal decoded pixel arrays when the router had to
    decompress for a destination that accepts only uncompressed.
    """
    for kw in IDENTITY:
        if sent.get(kw) != got.get(kw):
            return f"{kw}: sent {sent.get(kw)!r}, got {got.get(kw)!r}"
    if "PixelData" not in sent:
        return None if "PixelData" not in got else "PixelData appeared"
    if "PixelData" not in got:
        return "PixelData missing"
    s_ts = UID(sent.file_meta.TransferSyntaxUID)
    g_ts = UID(got.file_meta.TransferSyntaxUID)
    if s_ts.is_compressed and g_ts.is_compressed and s_ts != g_ts:
        return f"re-encoded: sent {s_ts.name}, got {g_ts.name}"
    if s_ts.is_compressed == g_ts.is_compressed:
        if bytes(sent.PixelData) != bytes(got.PixelData):
            return f"pixel data bytes differ ({s_ts.name} -> {g_ts.name})"
        return None
    if g_ts.is_compressed:
        return f"compressed on the way: sent {s_ts.name}, got {g_ts.name}"
    if not np.array_equal(sent.pixel_array, got.pixel_array):
        return f"decoded pixel arrays differ ({s_ts.name} -> {g_ts.name})"
    return None


def assert_delivered(sent: Mapping[str, Dataset], arrived: Mapping[str, Sequence[Dataset]],
                     expect: Iterable[str] | None = None, where: str = "destination") -> None:
    """Every expected instance arrived, and every copy of it is what was sent."""
    want = set(sent if expect is None else expect)
    missing = sorted(want - set(arrived))
    assert not missing, (f"{len(missing)} of {len(want)} instances never reached {where}, "
                         f"e.g. {missing[:3]}")
    bad = []
    for uid in sorted(want):
        for got in arrived[uid]:
            why = difference(sent[uid], got)
            if why:
                bad.append(f"{uid}: {why}")
    assert not bad, f"{len(bad)} instance(s) at {where} differ from what was sent: {bad[:5]}"


def duplicates(arrived: Mapping[str, Sequence[Dataset]]) -> int:
    return sum(len(v) - 1 for v in arrived.values())


# ---------------------------------------------------------------- processes


def _proc_pgrp(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[2]), rest[0]  # (pgrp, state)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_pgrp(int(entry))
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
        info = _proc_pgrp(int(entry))
        if needle.encode() in cmd and info and info[1] != "Z":
            out.append(int(entry))
    return out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((LOOPBACK, port)) == 0


class Hermes:
    """One router under test: a rules.toml, a spool, and ``hermes-py serve`` when started."""

    def __init__(self, workdir: Path, destinations: Sequence[Dest], *, rules: str | None = None,
                 spool_dir: Path | None = None, port: int | None = None,
                 receiver: Mapping[str, object] | None = None,
                 spool: Mapping[str, object] | None = None,
                 intake: Mapping[str, object] | None = None,
                 retry: Mapping[str, object] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.destinations = list(destinations)
        self.port = port or free_port()
        self.ae_title = "HERMES"
        self.spool_dir = spool_dir or self.workdir / "spool"
        self.config = self.workdir / "rules.toml"
        self.log_path = self.workdir / "serve.log"
        self.spool = Spool(self.spool_dir)
        self.receiver_opts: dict[str, object] = {
            "ae_title": self.ae_title, "bind": LOOPBACK, "port": self.port,
            "max_associations": 10}
        self.receiver_opts.update(receiver or {})
        self.spool_opts: dict[str, object] = {
            "path": str(self.spool_dir), "min_free_mb": 0, "keep_success": "1d",
            "keep_discard": "1d"}
        self.spool_opts.update(spool or {})
        self.intake_opts: dict[str, object] = {"stable_for": "1s", "rescan_interval": "1s"}
        self.intake_opts.update(intake or {})
        self.retry_opts: dict[str, object] = {"initial_delay": "300ms", "max_delay": "2s",
                                              "give_up_after": "1d"}
        self.retry_opts.update(retry or {})
        self.rules = rules if rules is not None else route_all(self.destinations)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.sends = 0
        self.escaped: list[int] = []
        self.write_config()
        LIVE.add(self)

    # ------------------------------------------------------------ config

    def render(self) -> str:
        parts = [toml_table("receiver", self.receiver_opts), toml_table("spool", self.spool_opts),
                 toml_table("intake", self.intake_opts), toml_table("retry", self.retry_opts)]
        parts += [d.toml() for d in self.destinations]
        parts.append(self.rules)
        return "\n".join(parts)

    def write_config(self, text: str | None = None) -> None:
        """Replace rules.toml atomically (an editor's save, never a half-written file)."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.render() if text is None else text)
        os.replace(tmp, self.config)

    # ------------------------------------------------------------ process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _mark(self, text: str) -> None:
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== [e2e {time.strftime('%H:%M:%S')}] {text} =====\n".encode())

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start serve and wait until the receiver answers a C-ECHO."""
        assert not self.running, "already running"
        self.starts += 1
        self._mark(f"start #{self.starts}: {' '.join(hermes_cmd())} serve -c {self.config}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen(
                [*hermes_cmd(), "serve", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, cwd=self.workdir,
                env=peer_env())
        finally:
            log.close()

        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the receiver answers a C-ECHO; fail at once if serve exits meanwhile."""
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True
            return port_open(self.port) and echoscu(self.port, self.ae_title).returncode == 0

        wait_for(ready, timeout, interval=0.3, what=f"hermes-py serve to answer C-ECHO on "
                                                    f"{self.port}")
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            pytest.fail(f"hermes-py serve exited with {rc}\n{self.log_tail(60)}")

    def stop(self, timeout: float = STOP_TIMEOUT, expect: int | None = 0) -> int:
        """SIGTERM to serve (what systemd and Ctrl-C do); it must exit ``expect``, children too."""
        assert self.proc is not None, "not started"
        pgid = self.proc.pid
        self._mark("SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(pgid)
            pytest.fail(f"hermes-py serve did not exit within {timeout:g}s of SIGTERM\n"
                        f"{self.log_tail(60)}")
        self._mark(f"exited rc={rc}")
        deadline = time.monotonic() + 15
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_members(pgid) + processes_mentioning(str(self.config))
        self._kill_pids(left)
        self._kill_group(pgid)
        self.proc = None
        assert not left, (f"serve exited rc={rc} but its children {left} were still running "
                          f"15s later\n{self.log_tail(40)}")
        if expect is not None:
            assert rc == expect, (f"hermes-py serve exited {rc} on SIGTERM, expected {expect}\n"
                                  f"{self.log_tail(60)}")
        return rc

    def reload(self) -> None:
        """SIGHUP to serve: what ``systemctl reload`` does after an admin edited rules.toml."""
        assert self.proc is not None, "not started"
        self._mark("SIGHUP")
        self.proc.send_signal(signal.SIGHUP)

    def kill9(self) -> None:
        """kill -9 of the whole process group: a power cut for every stage at once."""
        assert self.proc is not None, "not started"
        pgid = self.proc.pid
        self._mark("kill -9 of the process group")
        self._kill_group(pgid)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # A child that left the process group (setsid) survives a group kill: that is a bug
        # (the next serve would find the port busy), reported, then cleaned up.
        escaped = processes_mentioning(str(self.config))
        self._kill_pids(escaped)
        self.escaped += escaped
        assert not escaped, (f"processes {escaped} of serve survived kill -9 of its process "
                             "group (they left the group)")
        wait_for(lambda: not port_open(self.port), 15, what="receiver port to close after kill")

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    @staticmethod
    def _kill_pids(pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def children(self, verb: str) -> list[int]:
        """Pids of serve's children running ``verb`` (``route``, ``receive``, ``dispatch``...)."""
        out = []
        for pid in processes_mentioning(str(self.config)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if verb.encode() in argv and (self.proc is None or pid != self.proc.pid):
                out.append(pid)
        return out

    def cleanup(self) -> None:
        """Always: nothing we started outlives the test."""
        if self.proc is not None:
            self._kill_group(self.proc.pid)
            with contextlib.suppress(Exception):
                self.proc.wait(10)
            self.proc = None
        self._kill_pids(processes_mentioning(str(self.config)))
        LIVE.discard(self)

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
        return subprocess.run([*hermes_cmd(), *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, env=peer_env(),
                              cwd=self.workdir)

    @staticmethod
    def dcm_in(folder: Path) -> list[Path]:
        return [Path(e.path) for e in Spool.scan(folder)]

    def queued(self, dest: str) -> int:
        """In the outbox (urgent included) or claimed by a worker: not yet delivered."""
        n = sum(len(self.dcm_in(f)) for f in self.spool.outboxes(dest))
        active = self.spool.active / dest
        if active.is_dir():
            n += sum(len(self.dcm_in(d)) for d in active.iterdir() if d.is_dir())
        return n

    def in_error(self, dest: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
        folder = self.spool.error_dir(dest)
        return [(p, self.spool.read_sidecar(p)) for p in sorted(self.dcm_in(folder))]

    def all_errors(self) -> list[Path]:
        return sorted(self.spool.error.rglob("*.dcm")) if self.spool.error.is_dir() else []

    def delivered(self, dest: str) -> list[Path]:
        return self.dcm_in(self.spool.success_dir(dest))

    def state(self, dest: str) -> dict[str, Any]:
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


def wait_delivered(get: Any, want: set[str], timeout: float = DELIVERY_TIMEOUT,
                   what: str = "delivery", hermes: Hermes | None = None) -> None:
    """Poll ``get()`` (a set of UIDs at a destination) until it holds ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        have = set(get())
        if want <= have:
            return
        if time.monotonic() > deadline:
            missing = sorted(want - have)
            extra = f"\nspool: {hermes.spool_listing()}" if hermes else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}: {len(missing)} of "
                        f"{len(want)} missing, e.g. {missing[:3]}{extra}")
        time.sleep(0.2)
