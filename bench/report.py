"""Results, ratios, targets, the printed table and the JSON file.

Pure functions over ``Result`` objects, so the smoke test can check the arithmetic
and the formatting without timing anything.

Ratios are rate over rate on the same corpus, measured in the same run: "x direct"
divides by DCMTK dcmsend -> storescp, "x Orthanc" by Orthanc doing the same job
(receive-only or Lua autorouting relay). On one corpus instances/s and MB/s give
the same ratio, so one column each is enough.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

KINDS = {
    "direct": "DCMTK dcmsend -> DCMTK storescp (the native limit)",
    "receive": "dcmsend -> hermes-py receive, until dcmsend has every C-STORE Success "
               "(Success = fsynced and renamed into spool/incoming/)",
    "relay": "dcmsend -> hermes-py serve -> storescp, until the last instance is at storescp",
    "pynetdicom-receive": "dcmsend -> a bare pynetdicom SCP (in memory, no disk, logging "
                          "off): the library's floor, for reference",
    "orthanc-receive": "dcmsend -> Orthanc (no Lua), until dcmsend has every Success",
    "orthanc-relay": "dcmsend -> Orthanc + Lua Delete(SendToModality(id,'dest')) -> storescp, "
                     "until the last instance is at storescp",
    "receive4": "four dcmsend at once (MOD1..MOD4, a quarter of the corpus each) -> hermes-py "
                "receive x [receiver] processes, until the last dcmsend has every Success",
    "orthanc-receive4": "the same four dcmsend at once -> Orthanc (no Lua)",
    "pynetdicom-receive4": "the same four dcmsend at once -> bare pynetdicom SCPs, one per "
                           "receiver process: the library's own ceiling there",
    "backlog": "queued in spool/outgoing/<dest>/ while storescp is down, then storescp "
               "starts: first to last arrival at storescp",
}

PEER_NOTE = ("TCP_NODELAY=1 is set in the environment of every DCMTK tool and of Orthanc "
             "(Debian builds keep Nagle on otherwise: each small C-STORE would stall ~90 ms "
             "on loopback and their columns would measure TCP stalls, not the software).")


@dataclass
class Result:
    """One scenario: per-run wall times and what was moved."""

    kind: str
    corpus: str
    instances: int
    nbytes: int
    seconds: list[float] = field(default_factory=list)
    error: str | None = None
    # Instances the rate counts when it differs from ``instances`` (backlog: the
    # first-to-last-arrival span holds count-1 intervals).
    rate_instances: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind} {self.corpus}"

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def rate(self) -> float | None:
        m = self.median
        if not m:
            return None
        n = self.rate_instances if self.rate_instances is not None else self.instances
        return n / m

    @property
    def mbps(self) -> float | None:
        r = self.rate
        return None if r is None or not self.instances else r * self.nbytes / self.instances / 1e6


def _ref_corpus(r: Result) -> str:
    return "small" if r.corpus == "backlog" else r.corpus


def _find(results: list[Result], kind: str, corpus: str) -> Result | None:
    for r in results:
        if r.kind == kind and r.corpus == corpus and r.rate:
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_direct(results: list[Result], r: Result) -> float | None:
    if r.kind == "direct":
        return 1.0 if r.rate else None
    ref = _find(results, "direct", _ref_corpus(r))
    return _div(r.rate, ref.rate if ref else None)


def ratio_orthanc(results: list[Result], r: Result) -> float | None:
    other = {"receive": "orthanc-receive", "relay": "orthanc-relay",
             "receive4": "orthanc-receive4", "pynetdicom-receive4": "orthanc-receive4"}.get(r.kind)
    if other is None:
        return None
    ref = _find(results, other, r.corpus)
    return _div(r.rate, ref.rate if ref else None)


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    goal: str
    measured: float | None
    unit: str
    met: bool | None  # None: not measured
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "MISSED")


def targets(results: list[Result], rss_peak_mb: dict[str, float],
            status_seconds: float | None, backlog_count: int | None) -> list[Target]:
    """The project's goals from the issue, each met / MISSED / not measured (never asserted)."""
    out: list[Target] = []

    def ratio(name: str, goal: float, num: tuple[str, str], den: tuple[str, str],
              what: str = "rate") -> None:
        a, b = _find(results, *num), _find(results, *den)
        va = getattr(a, what) if a else None
        vb = getattr(b, what) if b else None
        v = _div(va, vb)
        missing = [f"{k} {c}" for (k, c), x in ((num, a), (den, b)) if x is None]
        out.append(Target(name, f">= {goal:g}x", v, "x", None if v is None else v >= goal,
                          f"needs {', '.join(missing)}" if missing else ""))

    # issue 16: receive at pynetdicom's own speed (a bare SCP that stores nothing)
    ratio("receive small vs bare pynetdicom SCP small", 0.7, ("receive", "small"),
          ("pynetdicom-receive", "small"))
    ratio("receive 0.5 MB vs bare pynetdicom SCP 0.5 MB", 0.7, ("receive", "ct"),
          ("pynetdicom-receive", "ct"))
    ratio("relay small vs Orthanc+Lua relay small", 6, ("relay", "small"),
          ("orthanc-relay", "small"))
    ratio("relay small vs direct small", 0.25, ("relay", "small"), ("direct", "small"))
    ratio("receive 0.5 MB vs Orthanc receive 0.5 MB", 1.2, ("receive", "ct"),
          ("orthanc-receive", "ct"))
    ratio("relay 0.5 MB vs direct 0.5 MB (MB/s)", 0.3, ("relay", "ct"), ("direct", "ct"),
          "mbps")
    ratio("four modalities at once: receive vs Orthanc", 1.0, ("receive4", "small"),
          ("orthanc-receive4", "small"))
    ratio("backlog drain vs steady relay small", 0.9, ("backlog", "backlog"), ("relay", "small"))
    big, obig = _find(results, "relay", "big"), _find(results, "orthanc-relay", "big")
    ours = max(big.extra.get("peak_rss_mb") or [0.0]) if big else None
    theirs = max(obig.extra.get("peak_rss_mb") or [0.0]) if obig else None
    v = _div(ours, theirs)
    out.append(Target("relay big: largest hermes_py process RSS vs Orthanc's", "<= 0.25x", v,
                      "x", None if v is None else v <= 0.25,
                      f"{ours} MB vs {theirs} MB" if v is not None else
                      "needs relay big and orthanc-relay big"))
    if rss_peak_mb:
        worst = max(rss_peak_mb, key=lambda k: rss_peak_mb[k])
        v = rss_peak_mb[worst]
        out.append(Target("every hermes_py process RSS", "< 150 MB", v, "MB", v < 150,
                          f"largest: {worst}"))
    else:
        out.append(Target("every hermes_py process RSS", "< 150 MB", None, "MB", None,
                          "no hermes_py process was sampled"))
    n = f"{backlog_count:,}" if backlog_count else "the backlog"
    out.append(Target(f"hermes-py status at {n} queued", "< 1 s", status_seconds, "s",
                      None if status_seconds is None else status_seconds < 1.0))
    return out


# ---------------------------------------------------------------- formatting


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: list[Result]) -> str:
    head = ("scenario", "n", "inst/s", "MB/s", "x direct", "x Orthanc", "runs", "note")
    rows: list[tuple[str, ...]] = []
    for r in results:
        note = (f"FAILED: {r.error}" if r.error and not r.seconds
                else r.error or ("" if r.seconds else "not run"))
        rows.append((r.name, str(r.instances), _f(r.rate), _f(r.mbps, "{:.2f}"),
                     _f(ratio_direct(results, r), "{:.2f}"),
                     _f(ratio_orthanc(results, r), "{:.2f}"), str(len(r.seconds)), note))
    return _grid(head, rows)


def targets_table(tgts: list[Target]) -> str:
    head = ("target", "goal", "measured", "result", "detail")
    rows: list[tuple[str, ...]] = [
        (t.name, t.goal, "-" if t.measured is None else f"{t.measured:.2f} {t.unit}",
         t.verdict, t.detail) for t in tgts]
    return _grid(head, rows)


def _grid(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(len(head))]
    numeric = {i for i in range(len(head)) if rows and all(
        re.fullmatch(r"-|[\d.,]+", r[i]) for r in rows)}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def legend() -> str:
    return "\n".join(f"  {k:16s} {v}" for k, v in KINDS.items())


# ---------------------------------------------------------------- machine and versions


def _first_line(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0]) or (cmd[0] if os.path.exists(cmd[0]) else None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for ln in (out.stdout + out.stderr).splitlines():
        if ln.strip():
            return ln.strip()
    return None


def versions() -> dict[str, str | None]:
    import pydicom
    import pynetdicom

    import hermes_py
    dcmtk = _first_line(["storescp", "--version"])
    m = re.search(r"v(\d+\.\d+\.\d+)", dcmtk or "")
    orth = _first_line(["/usr/sbin/Orthanc", "--version"]) or _first_line(["Orthanc",
                                                                           "--version"])
    mo = re.search(r"(\d+\.\d+\.\d+)", orth or "")
    return {
        "hermes_py": hermes_py.__version__,
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "python": platform.python_version(),
        "dcmtk": m.group(1) if m else dcmtk,
        "orthanc": mo.group(1) if mo else orth,
    }


def machine() -> dict[str, Any]:
    mem = None
    try:
        import psutil
        mem = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    cpu = None
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "kernel": platform.release(),
        "system": platform.system(),
        "loadavg": list(os.getloadavg()),
    }


# ---------------------------------------------------------------- JSON


def to_json(results: list[Result], tgts: list[Target], *, meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in results:
        d = asdict(r)
        d.update(name=r.name, median_seconds=r.median, instances_per_s=r.rate, mb_per_s=r.mbps,
                 ratio_direct=ratio_direct(results, r), ratio_orthanc=ratio_orthanc(results, r))
        rows.append(d)
    return {**meta, "notes": [PEER_NOTE, *meta.get("notes", [])], "scenarios": rows,
            "targets": [{**asdict(t), "result": t.verdict} for t in tgts]}


def write_json(doc: dict[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    latest = folder / "latest.json"
    latest.write_text(path.read_text())
    return path


def render(doc: dict[str, Any], results: list[Result], tgts: list[Target]) -> str:
    """The whole printed report: header, table, legend, memory, targets."""
    v, m = doc.get("versions", {}), doc.get("machine", {})
    out = [
        "hermes_py benchmark (provisional on a shared machine: compare ratios, not rates)",
        f"  machine: {m.get('nproc')} CPU ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
        f"kernel {m.get('kernel')}, load at start {m.get('loadavg_start')}",
        f"  versions: hermes_py {v.get('hermes_py')}, pynetdicom {v.get('pynetdicom')}, "
        f"pydicom {v.get('pydicom')}, python {v.get('python')}, dcmtk {v.get('dcmtk')}, "
        f"Orthanc {v.get('orthanc')}",
        f"  {PEER_NOTE}",
    ]
    for name, c in doc.get("corpora", {}).items():
        out.append(f"  corpus {name}: {c['description']}")
    out += ["", table(results), "", "scenarios:", legend()]
    out += [f"  {n}" for n in doc.get("notes", [])]
    rss = doc.get("peak_rss_mb") or {}
    if rss:
        out.append("")
        out.append("peak RSS (MB), hermes_py: " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(rss.items())))
    peer = doc.get("peer_peak_rss_mb") or {}
    if peer:
        out.append("peak RSS (MB), for comparison: " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(peer.items())))
    out += ["", "targets (reported, not asserted):", targets_table(tgts)]
    return "\n".join(out)
