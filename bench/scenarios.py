"""What is timed, and how. Every scenario starts fresh peers and a fresh spool per run.

Clocks: a run starts just before dcmsend is launched (``time.time()``). It ends when
dcmsend exits (direct, receive-only: every C-STORE was answered Success) or at the
mtime of the last file storescp wrote (relay, Orthanc relay, backlog): the folder is
polled every 0.2 s only to know when to stop, so polling never adds to a figure.

"Durable in the spool" for receive-only: hermes_py answers Success only after the
instance is fsynced and renamed into spool/incoming/ (and the directory fsynced), so
dcmsend exiting with every instance answered Success IS the moment the last one is
durable; the run then checks that incoming/ holds exactly the corpus.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import corpus as corpus_mod
from bench.procs import (
    FAILURES,
    BenchError,
    HermesProc,
    RssSampler,
    hermes_cmd,
    merge_peaks,
    tail,
    write_config,
)
from bench.report import Result
from tests.support import peers

ORTHANC_LUA = ("function OnStoredInstance(instanceId, tags, metadata, origin)\n"
               "  Delete(SendToModality(instanceId, 'dest'))\n"
               "end\n")

POLL = 0.2


@dataclass
class Context:
    work: Path
    corpora: dict[str, corpus_mod.Corpus]
    reps: int = 3
    backlog_count: int = 20_000
    receiver_processes: int | None = None
    keep: bool = False
    # no progress for this long = the scenario failed (generous: the machine is shared)
    stall: float = 90.0
    # filled while running
    rss_peak_mb: dict[str, float] = field(default_factory=dict)
    other_rss_peak_mb: dict[str, float] = field(default_factory=dict)
    status_seconds: float | None = None
    log: Callable[[str], None] = print
    _seq: int = 0

    def run_dir(self, name: str) -> Path:
        self._seq += 1
        d = self.work / f"{self._seq:03d}-{name.replace(' ', '-')}"
        d.mkdir(parents=True)
        return d

    def done_with(self, d: Path) -> None:
        if not self.keep:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def _dcmsend(port: int, c: corpus_mod.Corpus, called: str, ctx: Context
             ) -> subprocess.CompletedProcess[str]:
    return peers.dcmsend(port, c.files, called=called, calling="BENCHSCU",
                         timeout=ctx.stall + c.count * 2.0)


def _check_dcmsend(r: subprocess.CompletedProcess[str], n: int) -> None:
    """dcmsend's report (+crf) says how many instances were answered Success or Warning."""
    if r.returncode != 0:
        raise BenchError(f"dcmsend exited {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
    ok = sum(int(m) for m in re.findall(r"\* with status (?:SUCCESS|WARNING)\s*:\s*(\d+)",
                                        r.stdout))
    if ok != n:
        raise BenchError(f"dcmsend: {ok} of {n} instances answered Success")


def _count(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.is_file() and not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def _count_dcm(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(".dcm"))
    except FileNotFoundError:
        return 0


def wait_arrivals(folder: Path, n: int, stall: float,
                  check: Callable[[], None] | None = None) -> tuple[float, float]:
    """Wait until ``folder`` holds ``n`` files; (first, last) file mtime.

    Fails when the count has not moved for ``stall`` seconds (a hang, not a slow run).
    """
    last, moved = -1, time.monotonic()
    while True:
        c = _count(folder)
        if c >= n:
            break
        if c != last:
            last, moved = c, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise BenchError(f"stalled: {c} of {n} instances at storescp, none for {stall:g}s")
        if check:
            check()
        time.sleep(POLL)
    time.sleep(0.3)  # the newest file may still be being written; its final mtime counts
    mtimes = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file():
                mtimes.append(e.stat().st_mtime)
    return min(mtimes), max(mtimes)


def missing_at_storescp(folder: Path, uids: list[str] | set[str]) -> int:
    """storescp names files ``<modality>.<SOP Instance UID>``: how many UIDs are absent."""
    got = set()
    with os.scandir(folder) as it:
        for e in it:
            if "." in e.name:
                got.add(e.name.split(".", 1)[1])
    return len(set(uids) - got)


@contextmanager
def _dcmsend_thread(port: int, c: corpus_mod.Corpus, called: str, ctx: Context
                    ) -> Iterator[dict[str, Any]]:
    """Run dcmsend in a thread while the caller polls; the dict gets result and end time."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["result"] = _dcmsend(port, c, called, ctx)
        except BaseException as e:  # surfaced by the caller
            box["error"] = e
        box["end"] = time.time()

    t = threading.Thread(target=go, name="dcmsend", daemon=True)
    t.start()
    try:
        yield box
    finally:
        t.join(ctx.stall + c.count * 2.0 + 30)


def _storescp(folder: Path) -> peers.Storescp:
    return peers.Storescp(folder, ae_title="STORESCP")


# ---------------------------------------------------------------- scenarios


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else repr(e)


@dataclass
class Run:
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


def _check_storescp(d: Path, c: corpus_mod.Corpus) -> None:
    miss = missing_at_storescp(d / "storescp", c.uids)
    if miss:
        raise BenchError(f"{miss} of {c.count} instances missing at storescp")


def direct(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    with _storescp(d / "storescp") as scp:
        t0 = time.time()
        r = _dcmsend(scp.port, c, "STORESCP", ctx)
        dt = time.time() - t0
    _check_dcmsend(r, c.count)
    _check_storescp(d, c)
    return Run(dt)


def receive(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    """``hermes-py receive`` alone; with ``--receiver-processes N``, N of them on the port
    (what serve starts), each binding it with SO_REUSEPORT."""
    port = peers.free_port()
    cfg = write_config(d, port, peers.free_port(), receiver_processes=ctx.receiver_processes)
    with contextlib.ExitStack() as stack:
        hs = [stack.enter_context(HermesProc(["receive"], cfg, d / f"hermes-{i}.log"))
              for i in range(max(1, ctx.receiver_processes or 1))]
        for h in hs:
            h.wait_ready(port)
        samplers = [stack.enter_context(RssSampler(h.pid)) for h in hs]
        t0 = time.time()
        r = _dcmsend(port, c, "HERMES", ctx)
        dt = time.time() - t0
    for rss in samplers:
        merge_peaks(ctx.rss_peak_mb, rss.peak_mb)
    _check_dcmsend(r, c.count)
    got = _count_dcm(d / "spool" / "incoming")
    if got != c.count:
        raise BenchError(f"spool/incoming/ holds {got} instances, sent {c.count}")
    return Run(dt)


# The four-modality scenario: this many dcmsend at once, each a quarter of the corpus.
SENDERS = 4
# [receiver] processes for hermes_py there unless --receiver-processes says otherwise.
PARALLEL_PROCESSES = 2


def _send_parallel(port: int | list[int], c: corpus_mod.Corpus, called: str,
                   ctx: Context) -> float:
    """SENDERS dcmsend at once (calling MOD1..MOD4), each its share of ``c`` (to the ports
    in turn, given several); the seconds until the last one exits, every instance
    answered Success."""
    ports = port if isinstance(port, list) else [port]
    shares = [c.files[i::SENDERS] for i in range(SENDERS)]
    box: dict[int, Any] = {}

    def go(i: int) -> None:
        try:
            box[i] = peers.dcmsend(ports[i % len(ports)], shares[i], called=called,
                                   calling=f"MOD{i + 1}",
                                   timeout=ctx.stall + c.count * 2.0)
        except BaseException as e:  # surfaced below
            box[i] = e

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(SENDERS)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(ctx.stall + c.count * 2.0 + 30)
    dt = time.time() - t0
    for i, share in enumerate(shares):
        r = box.get(i)
        if not isinstance(r, subprocess.CompletedProcess):
            raise BenchError(f"dcmsend MOD{i + 1}: {r!r}")
        _check_dcmsend(r, len(share))
    return dt


def receive_parallel(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    """Four modalities at once into ``hermes-py receive`` x PARALLEL_PROCESSES (SO_REUSEPORT,
    what serve starts with ``[receiver] processes``)."""
    n = ctx.receiver_processes or PARALLEL_PROCESSES
    port = peers.free_port()
    cfg = write_config(d, port, peers.free_port(), receiver_processes=n)
    with contextlib.ExitStack() as stack:
        hs = [stack.enter_context(HermesProc(["receive"], cfg, d / f"hermes-{i}.log"))
              for i in range(n)]
        for h in hs:
            h.wait_ready(port)
        samplers = [stack.enter_context(RssSampler(h.pid)) for h in hs]
        dt = _send_parallel(port, c, "HERMES", ctx)
    for rss in samplers:
        merge_peaks(ctx.rss_peak_mb, rss.peak_mb)
    got = _count_dcm(d / "spool" / "incoming")
    if got != c.count:
        raise BenchError(f"spool/incoming/ holds {got} instances, sent {c.count}")
    return Run(dt, {"receiver_processes": n})


def orthanc_receive_parallel(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    with peers.Orthanc(d / "orthanc") as orth:
        dt = _send_parallel(orth.dicom_port, c, "ORTHANC", ctx)
        got = orth.instance_count()
    if got != c.count:
        raise BenchError(f"Orthanc holds {got} instances, sent {c.count}")
    return Run(dt)


def relay(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    port = peers.free_port()
    with _storescp(d / "storescp") as scp:
        cfg = write_config(d, port, scp.port, receiver_processes=ctx.receiver_processes)
        with HermesProc(["serve"], cfg, d / "hermes.log") as h:
            h.wait_ready(port)
            with RssSampler(h.pid) as rss:
                t0 = time.time()
                with _dcmsend_thread(port, c, "HERMES", ctx) as box:
                    _, last = wait_arrivals(d / "storescp", c.count, ctx.stall, h.check_alive)
            merge_peaks(ctx.rss_peak_mb, rss.peak_mb)
    if "error" in box:
        raise BenchError(f"dcmsend: {box['error']}")
    _check_dcmsend(box["result"], c.count)
    _check_storescp(d, c)
    # when the modality was done: the receive side's share of the relay time
    return Run(last - t0, {"dcmsend_done_seconds": round(box["end"] - t0, 3),
                           "peak_rss_mb": round(max(rss.peak_mb.values(), default=0.0), 1)})


@contextlib.contextmanager
def _floor(d: Path, name: str = "floor") -> Iterator[int]:
    """A bare pynetdicom SCP (bench.floor) in a process of its own; yields its port."""
    port = peers.free_port()
    with open(d / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.floor", str(port)],
                                cwd=Path(__file__).resolve().parent.parent,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while peers.echoscu(port, called="HERMES", timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"bench.floor did not come up: {tail(d / f'{name}.log')}")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pynetdicom_receive(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    """The same transfer into a bare pynetdicom SCP (bench.floor): the library's floor."""
    with _floor(d) as port:
        t0 = time.time()
        r = _dcmsend(port, c, "HERMES", ctx)
        dt = time.time() - t0
    _check_dcmsend(r, c.count)
    return Run(dt)


def pynetdicom_receive_parallel(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    """The four senders into PARALLEL_PROCESSES bare pynetdicom SCPs (the senders spread
    over them as SO_REUSEPORT would): the library's own ceiling for receive4."""
    n = ctx.receiver_processes or PARALLEL_PROCESSES
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(_floor(d, f"floor-{i}")) for i in range(n)]
        dt = _send_parallel(ports, c, "HERMES", ctx)
    return Run(dt, {"processes": n})


def orthanc_receive(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    with peers.Orthanc(d / "orthanc") as orth:
        assert orth.proc is not None
        with RssSampler(orth.proc.pid, name="Orthanc") as rss:
            t0 = time.time()
            r = _dcmsend(orth.dicom_port, c, "ORTHANC", ctx)
            dt = time.time() - t0
        merge_peaks(ctx.other_rss_peak_mb, rss.peak_mb)
        n = orth.instance_count()
    _check_dcmsend(r, c.count)
    if n != c.count:
        raise BenchError(f"Orthanc holds {n} instances, sent {c.count}")
    return Run(dt)


def orthanc_relay(ctx: Context, c: corpus_mod.Corpus, d: Path) -> Run:
    with _storescp(d / "storescp") as scp:
        orth = peers.Orthanc(d / "orthanc", lua=ORTHANC_LUA,
                             modalities={"dest": ("STORESCP", peers.LOOPBACK, scp.port)})
        with orth:
            assert orth.proc is not None
            proc = orth.proc

            def alive() -> None:
                if proc.poll() is not None:
                    raise BenchError(f"Orthanc exited {proc.returncode}")

            with RssSampler(proc.pid, name="Orthanc") as rss:
                t0 = time.time()
                with _dcmsend_thread(orth.dicom_port, c, "ORTHANC", ctx) as box:
                    _, last = wait_arrivals(d / "storescp", c.count, ctx.stall, alive)
            merge_peaks(ctx.other_rss_peak_mb, rss.peak_mb)
    if "error" in box:
        raise BenchError(f"dcmsend: {box['error']}")
    _check_dcmsend(box["result"], c.count)
    _check_storescp(d, c)
    return Run(last - t0, {"dcmsend_done_seconds": round(box["end"] - t0, 3),
                           "peak_rss_mb": round(max(rss.peak_mb.values(), default=0.0), 1)})


RUNNERS: dict[str, Callable[[Context, corpus_mod.Corpus, Path], Run]] = {
    "direct": direct, "receive": receive, "relay": relay, "pynetdicom-receive": pynetdicom_receive,
    "orthanc-receive": orthanc_receive, "orthanc-relay": orthanc_relay,
    "receive4": receive_parallel, "orthanc-receive4": orthanc_receive_parallel,
    "pynetdicom-receive4": pynetdicom_receive_parallel,
}


def run_rounds(ctx: Context, chosen: list[tuple[str, str]], out: list[Result]) -> None:
    """Run every chosen scenario once per round, ``ctx.reps`` rounds.

    Interleaving (rather than all runs of one scenario, then the next) spreads the
    load other work puts on a shared machine over every scenario alike, so the
    ratios of medians stay fair. A scenario that fails is not retried. Results are
    appended to ``out`` before the first run, so a Ctrl-C keeps what was measured.
    """
    results = []
    for kind, name in chosen:
        c = ctx.corpora[name]
        results.append(Result(kind, name, c.count, c.bytes))
    out += results
    for rnd in range(ctx.reps):
        for res in results:
            if res.error:
                continue
            d = ctx.run_dir(f"{res.name}-{rnd + 1}")
            load = os.getloadavg()[0]
            try:
                run = RUNNERS[res.kind](ctx, ctx.corpora[res.corpus], d)
            except FAILURES as e:  # one scenario failing must not lose the others
                res.error = _first_line(e)
                ctx.log(f"  {res.name} run {rnd + 1}: FAILED: {e}")
                continue
            finally:
                ctx.done_with(d)
            res.seconds.append(run.seconds)
            res.extra.setdefault("loadavg_1min", []).append(round(load, 2))
            for k, v in run.extra.items():
                res.extra.setdefault(k, []).append(v)
            ctx.log(f"  round {rnd + 1}/{ctx.reps} {res.name}: {run.seconds:.2f} s "
                    f"({res.instances / run.seconds:.1f} inst/s, load {load:.1f})")


def time_status(cfg: Path, times: int = 3) -> tuple[float, str]:
    """Median wall time of ``hermes-py status`` (a fresh process, as an admin runs it)."""
    walls = []
    out = ""
    for _ in range(times):
        t0 = time.monotonic()
        r = subprocess.run([*hermes_cmd(), "status", "-c", str(cfg)], capture_output=True,
                           text=True, timeout=300, cwd=cfg.parent)
        walls.append(time.monotonic() - t0)
        if r.returncode != 0:
            raise BenchError(f"hermes-py status exited {r.returncode}: {r.stderr.strip()[-300:]}")
        out = r.stdout
    walls.sort()
    return walls[len(walls) // 2], out


def backlog(ctx: Context) -> Result:
    """The outbox is filled on disk (see corpus.fill_outbox), serve starts with the
    destination down, status is timed with the full backlog, then storescp starts and
    the drain rate is first-to-last arrival at storescp (the backoff wait before the
    first send is retry policy, not throughput, and is reported apart)."""
    n = ctx.backlog_count
    res = Result("backlog", "backlog", n, 0, rate_instances=max(n - 1, 1))
    d = ctx.run_dir("backlog")
    try:
        port, dest_port = peers.free_port(), peers.free_port()
        cfg = write_config(d, port, dest_port, receiver_processes=ctx.receiver_processes)
        ctx.log(f"  backlog: writing {n:,} instances into spool/outgoing/dest/ ...")
        bl = corpus_mod.fill_outbox(d / "spool", "dest", n, rule="everything to dest")
        res.nbytes = bl.bytes
        res.extra["fill_seconds"] = round(bl.fill_seconds, 2)
        ctx.log(f"  backlog: written in {bl.fill_seconds:.1f} s; starting serve, "
                "destination down")
        with HermesProc(["serve"], cfg, d / "hermes.log") as h, RssSampler(h.pid) as rss:
            h.wait_ready(port)
            # let the dispatcher meet the dead destination before status is asked
            t_wait = time.monotonic()
            while not (d / "spool" / "state" / "dest.json").exists() \
                    and time.monotonic() - t_wait < 15:
                h.check_alive()
                time.sleep(POLL)
            try:
                ctx.status_seconds, out = time_status(cfg)
                res.extra["status_seconds"] = round(ctx.status_seconds, 3)
                res.extra["status_output_head"] = out.splitlines()[:12]
                ctx.log(f"  backlog: hermes-py status took {ctx.status_seconds:.2f} s "
                        f"with {n:,} queued")
            except (BenchError, subprocess.TimeoutExpired) as e:
                res.extra["status_error"] = str(e)
                ctx.log(f"  backlog: status failed: {e}")
            with peers.Storescp(d / "storescp", ae_title="STORESCP", port=dest_port):
                t_up = time.time()
                # ignore the backoff now (if `flush` does not exist yet, the short retry
                # delays of the bench config do the same within ~2 s)
                subprocess.run([*hermes_cmd(), "flush", "dest", "-c", str(cfg)],
                               capture_output=True, timeout=60, cwd=d)
                first, last = wait_arrivals(d / "storescp", n, ctx.stall, h.check_alive)
            merge_peaks(ctx.rss_peak_mb, rss.peak_mb)
        res.seconds.append(last - first)
        res.extra["first_arrival_after_up_seconds"] = round(first - t_up, 3)
        res.extra["up_to_last_arrival_seconds"] = round(last - t_up, 3)
        res.extra["peak_rss_mb"] = {k: round(v, 1) for k, v in rss.peak_mb.items()}
        miss = missing_at_storescp(d / "storescp",
                                   {f"{bl.uids_prefix}.{100_000_000 + i}" for i in range(n)})
        if miss:
            res.error = f"{miss} instances missing at storescp"
        ctx.log(f"  backlog: drained {n:,} in {last - first:.1f} s "
                f"({(n - 1) / max(last - first, 1e-9):.1f} inst/s)")
    except FAILURES as e:
        res.error = _first_line(e)
        ctx.log(f"  backlog: FAILED: {e}")
    finally:
        ctx.done_with(d)
    return res
