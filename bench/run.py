"""``python -m bench.run`` (what ``make bench`` runs): every scenario, the table, the JSON.

Scenarios are kinds (direct, receive, relay, pynetdicom-receive, orthanc-receive,
orthanc-relay) times corpora (small, ct, compressed), plus one 512 MiB instance relayed
by us and by Orthanc (peak RSS compared), run in rounds (each scenario
once per round, ``--reps`` rounds, median reported), then the backlog once.

Options: ``--quick`` (tiny corpora, one round, 500-instance backlog: a smoke run),
``--only X`` (a kind such as ``relay``, a corpus such as ``small``, one scenario such
as ``relay-small``, ``orthanc``, ``backlog`` or ``profile``; repeatable or
comma-separated), ``--reps N``, ``--profile`` (py-spy over two small-instance relays
after the rest: all threads, then GIL holders only), ``--keep`` (keep the run
folders under bench/results/work-*/). ``BENCH_SCALE`` multiplies the backlog
(20,000 x scale). Progress goes to stderr, the report to stdout.

Everything binds and sends on 127.0.0.1 only, and everything started is stopped on
the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests.support (peers, dicomgen) is imported from the repo
    sys.path.insert(0, str(REPO))

KINDS = ("direct", "receive", "relay", "pynetdicom-receive", "orthanc-receive", "orthanc-relay")
CORPORA = ("small", "ct", "compressed", "big")
# The big instance is about memory, not rate: relayed by us and by Orthanc only.
ORDER: list[tuple[str, str]] = [(k, c) for k in KINDS for c in CORPORA if c != "big"] + [
    ("receive4", "small"), ("orthanc-receive4", "small"),  # four modalities at once
    ("pynetdicom-receive4", "small"),
    ("relay", "big"), ("orthanc-relay", "big"), ("backlog", "backlog")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- peers


def orthanc_path() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc")
                                       else None)


def dcmtk_present() -> bool:
    return all(shutil.which(t) for t in ("storescp", "dcmsend", "echoscu"))


def ensure_peers() -> None:
    """Install DCMTK and Orthanc from Debian when missing and we are root; else carry on.

    A temporary policy-rc.d keeps the package's own Orthanc service from starting:
    the benchmark runs its own Orthanc on free ports and must leave nothing running.
    """
    need = [pkg for pkg, ok in (("dcmtk", dcmtk_present()), ("orthanc", bool(orthanc_path())))
            if not ok]
    if not need:
        return
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        log(f"bench: {', '.join(need)} not installed and cannot install it here "
            f"(needs root and apt-get): apt-get install -y {' '.join(need)}")
        return
    log(f"bench: installing {' '.join(need)} with apt-get ...")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# written by hermes_py bench: no service starts\nexit 101\n")
        policy.chmod(policy.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run([apt, "update", "-qq"], env=env, check=False, timeout=600)
        r = subprocess.run([apt, "install", "-y", "-qq", "--no-install-recommends", *need],
                           env=env, check=False, timeout=1200)
        if r.returncode != 0:
            log(f"bench: apt-get install {' '.join(need)} failed ({r.returncode})")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


# ---------------------------------------------------------------- selection


def select(only: Sequence[str], orthanc: bool, profile: bool) -> tuple[list[tuple[str, str]], bool]:
    """Scenarios to run, in order, and whether to profile."""
    wanted = [w.strip().lower() for item in only for w in item.split(",") if w.strip()]
    if not wanted:
        chosen = list(ORDER)
    else:
        chosen = []
        for kind, corpus in ORDER:
            keys = {kind, corpus, f"{kind}-{corpus}", f"{kind} {corpus}"}
            if kind.startswith("orthanc"):
                keys.add("orthanc")
            if any(w in keys for w in wanted):
                chosen.append((kind, corpus))
        known = {k for kc in ORDER for k in (*kc, f"{kc[0]}-{kc[1]}")} | {"orthanc", "profile"}
        unknown = [w for w in wanted if w not in known and w.replace(" ", "-") not in known]
        if unknown:
            raise SystemExit(f"bench: unknown --only value(s) {unknown}; known: "
                             f"{', '.join(sorted(known))}")
        profile = profile or "profile" in wanted
    if not orthanc:
        chosen = [kc for kc in chosen if not kc[0].startswith("orthanc")]
    return chosen, profile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny corpora, one run each, small backlog: a smoke run")
    p.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                   help="kind, corpus or kind-corpus (repeatable, comma-separated)")
    p.add_argument("--reps", type=int, default=None, help="runs per scenario (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one small-instance relay with py-spy")
    p.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc columns")
    p.add_argument("--receiver-processes", type=int, default=None,
                   help="[receiver] processes for hermes_py (default: its own default)")
    p.add_argument("--keep", action="store_true", help="keep run folders (spools, logs)")
    return p


# ---------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import psutil  # noqa: F401
    except ImportError as e:
        log(f"bench: {e.name} missing; run `make bench` (installs the bench extra)")
        return 2
    ensure_peers()
    if not dcmtk_present():
        log("bench: DCMTK (storescp, dcmsend, echoscu) is required: apt-get install dcmtk")
        return 2
    orthanc = bool(orthanc_path()) and not args.no_orthanc
    orthanc_msg = None
    if not orthanc:
        orthanc_msg = ("Orthanc columns SKIPPED: " + ("--no-orthanc" if args.no_orthanc else
                       "Orthanc is not installed (apt-get install orthanc)"))
        log(f"bench: {orthanc_msg}")
    chosen, profile = select(args.only, orthanc, args.profile)

    from bench import corpus, procs, report, scenarios

    quick = args.quick
    reps = args.reps or (1 if quick else 3)
    scale = float(os.environ.get("BENCH_SCALE", "1") or 1)
    backlog_n = int((500 if quick else 20_000) * scale)

    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    work = report.RESULTS / f"work-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    results: list[report.Result] = []
    profile_summary: dict[str, Any] | None = None
    interrupted = False
    versions = report.versions()
    load_start = os.getloadavg()
    ctx = scenarios.Context(work=work, corpora={}, reps=reps, backlog_count=backlog_n,
                            receiver_processes=args.receiver_processes, keep=args.keep, log=log)
    try:
        needed = {c for _, c in chosen if c != "backlog"} | ({"small"} if profile else set())
        specs = corpus.default_specs(quick)
        for name in CORPORA:
            if name in needed:
                t0 = time.monotonic()
                ctx.corpora[name] = corpus.generate(specs[name])
                log(f"bench: corpus {name}: {ctx.corpora[name].description} "
                    f"({time.monotonic() - t0:.1f} s)")
        log(f"bench: {reps} run(s) per scenario, median reported; TCP_NODELAY=1 for the "
            "DCMTK and Orthanc peers")
        measured = [kc for kc in chosen if kc[0] != "backlog"]
        if measured:
            log(f"bench: {', '.join(f'{k} {c}' for k, c in measured)}")
            scenarios.run_rounds(ctx, measured, results)
        if ("backlog", "backlog") in chosen:
            log(f"bench: backlog of {backlog_n:,}")
            results.append(scenarios.backlog(ctx))
        if profile:
            from bench import profiling
            profile_summary = {}
            for gil in (False, True):
                mode = "gil" if gil else "wall"
                log(f"bench: profiling one small-instance relay with py-spy ({mode})")
                try:
                    profile_summary[mode] = profiling.profile_relay(
                        ctx, "small", report.RESULTS / f"profile-{stamp}", gil=gil)
                except procs.FAILURES as e:  # a profiler problem must not lose the figures
                    log(f"bench: profiling ({mode}) failed: {e}")
                    profile_summary[mode] = {"error": str(e)}
    except KeyboardInterrupt:
        interrupted = True
        log("bench: interrupted; everything started was stopped; partial results follow")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    tgts = report.targets(results, ctx.rss_peak_mb, ctx.status_seconds,
                          backlog_n if any(r.kind == "backlog" for r in results) else None)
    notes = [
        "MB = 10^6 bytes; each figure is the median of the runs; ratios are taken within "
        "this one run on the same corpus.",
        "receive: hermes_py answers C-STORE Success only after fsync + rename into "
        "spool/incoming/, so dcmsend finishing = the last instance durable in the spool.",
        f"backlog: {backlog_n:,} instances written straight into spool/outgoing/dest/ "
        "(sidecar + .dcm renamed in, as the router leaves them; not sent over the network) "
        "while storescp was down; drain = first to last arrival at storescp.",
        "RSS: peak resident memory per hermes_py process (serve and every child), sampled "
        "every 0.25 s with psutil.",
    ]
    if orthanc_msg:
        notes.append(orthanc_msg)
    if interrupted:
        notes.append("INTERRUPTED: partial results")
    meta: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "args": {"quick": quick, "reps": reps, "only": args.only, "bench_scale": scale,
                 "receiver_processes": args.receiver_processes},
        "versions": versions,
        "machine": {**report.machine(), "loadavg_start": list(load_start)},
        "corpora": {k: c.summary() for k, c in ctx.corpora.items()},
        "peak_rss_mb": {k: round(v, 1) for k, v in ctx.rss_peak_mb.items()},
        "peer_peak_rss_mb": {k: round(v, 1) for k, v in ctx.other_rss_peak_mb.items()},
        "status_seconds": ctx.status_seconds,
        "profile": profile_summary,
        "notes": notes,
    }
    doc = report.to_json(results, tgts, meta=meta)
    path = report.write_json(doc)
    print(report.render(doc, results, tgts))
    from bench import profiling
    for summary in (profile_summary or {}).values():
        if "processes" in summary:
            print()
            print(profiling.format_summary(summary))
    print(f"\nresults: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
