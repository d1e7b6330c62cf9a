"""The web child at a deep backlog: dashboard render time and RSS, idle and under load.

``python -m bench.web_dashboard [--n 100000] [--rounds 5]`` fills one destination's
outbox with N instance pairs (empty files with real spool names: the dashboard lists
and stats, it never opens a queued sidecar, which tests/test_web_pages.py proves by
counting), starts ``hermes-py web`` alone, logs in through the form as a browser does
and times ``GET /`` with the status snapshot expired (each round waits out the 2 s
cache, so every round is a full listing) and cached. RSS is read from /proc.

A timed figure belongs here, not in a unit test: on a shared 2-core machine a unit
test times its neighbours. The issue's bar is the dashboard at 100,000 queued within a
second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from hermes_py.config import load
from hermes_py.spool import Spool, new_name
from hermes_py.web.state import SNAPSHOT_TTL
from hermes_py.web.users import Users
from tests.support.cli import hermes_cmd
from tests.support.config import pacs_and_ris, toml_table
from tests.support.peers import free_port, wait_for
from tests.support.serve import port_open

PASSWORD = "bench password 1"


def fill(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = new_name("1.2.826.0.1.3680043.2.1125.1", when=time.time() - 3600)
    head = stem[: stem.rindex("_")]
    flags = os.O_CREAT | os.O_WRONLY
    for i in range(n):
        base = f"{folder}/{head}_{i:08x}"
        os.close(os.open(base + ".json", flags))
        os.close(os.open(base + ".dcm", flags))


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


class Browser:
    """One cookie, one connection at a time: enough to log in and fetch a page."""

    def __init__(self, port: int):
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: str | None = None
                ) -> tuple[int, str, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()),
                   "Origin": f"http://127.0.0.1:{self.port}"}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
        for h in r.headers.get_all("set-cookie") or []:
            k, _, v = h.split(";", 1)[0].partition("=")
            self.cookies[k.strip()] = v.strip().strip('"')
        conn.close()
        return r.status, text, r

    def login(self, name: str) -> None:
        _, page, _ = self.request("GET", "/login")
        m = re.search(r'name="login_token" value="([^"]+)"', page)
        assert m, page
        status, _, _ = self.request("POST", "/login", urlencode(
            {"username": name, "password": PASSWORD, "login_token": m.group(1), "next": "/"}))
        assert status == 303, status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hermes-web-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        (root / "rules.toml").write_text(pacs_and_ris().render() + "\n"
                                         + toml_table("web", {"port": port}))
        cfg = load(root / "rules.toml")
        spool = Spool(cfg.spool.path)
        spool.ensure(list(cfg.destinations))
        Users(spool).add("bench", "viewer", PASSWORD)
        t0 = time.perf_counter()
        fill(spool.outbox("pacs"), args.n)
        filled = time.perf_counter() - t0
        proc = subprocess.Popen([*hermes_cmd(), "web", "-c", str(root / "rules.toml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: port_open(port), 30, 0.1, "hermes-py web to listen")
            time.sleep(0.5)
            started = rss_mb(proc.pid)
            b = Browser(port)
            b.login("bench")  # argon2id at 64 MiB: the peak a login costs
            time.sleep(0.5)
            idle = rss_mb(proc.pid)
            cold, warm = [], []
            for _ in range(args.rounds):
                time.sleep(SNAPSHOT_TTL + 0.1)
                t0 = time.perf_counter()
                status, page, _ = b.request("GET", "/")
                cold.append(time.perf_counter() - t0)
                assert status == 200 and f'<dd class="queued">{args.n}</dd>' in page
                t0 = time.perf_counter()
                b.request("GET", "/")
                warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b.request("GET", "/destinations/pacs?limit=50")
            queue_page = time.perf_counter() - t0
            loaded = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    out = {"queued": args.n, "fill_s": round(filled, 1),
           "dashboard_cold_ms": sorted(round(x * 1000) for x in cold),
           "dashboard_cached_ms": sorted(round(x * 1000) for x in warm),
           "queue_page_50_ms": round(queue_page * 1000),
           "rss_started_mb": round(started[0], 1),
           "rss_idle_after_login_mb": round(idle[0], 1),
           "rss_peak_after_login_mb": round(idle[1], 1), "rss_after_mb": round(loaded[0], 1),
           "rss_peak_mb": round(loaded[1], 1)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
