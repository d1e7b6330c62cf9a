"""``type = "dicomweb"`` (STOW-RS) through the real Dispatcher.

Orthanc with its DICOMweb plugin is the real destination (held while it is down,
everything stored after, compressed instances included); ``ScriptedStow``, a stdlib
HTTP server in this process, answers what real servers answer in the bad cases
(401, 413, 429 with Retry-After, 503, a 400 that stored half the batch, a body naming
failed instances, a refused transfer syntax). The memory test sends a 200 MB instance
from a child process and reads that process's peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from hermes_py.config import ConfigError, Settings, load
from hermes_py.destinations import create
from hermes_py.destinations.http_link import retry_after
from hermes_py.dispatcher import Dispatcher
from hermes_py.spool import Spool, new_name, now_iso
from hermes_py.spool import sidecar as sc
from tests.support.config import Config, TypedDest, rule
from tests.support.dicomgen import big_image, compressed_instance, make_instance
from tests.support.peers import LOOPBACK, Orthanc, wait_for
from tests.support.spool import delivered, errored, queue, queued, sidecar, state
from tests.support.stages import serving

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

Answer = tuple[int, dict[str, str], Any]   # status, headers, JSON body (or bytes, or None)


# ---------------------------------------------------------------- a scripted STOW-RS server


@dataclass
class Part:
    sop: str
    ts: str
    size: int


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    parts: list[Part]


def stored_all(parts: list[Part], failed: dict[str, int] | None = None,
               warn: dict[str, int] | None = None, only: set[str] | None = None) -> Any:
    """A DICOM JSON STOW response: every part referenced, but ``failed`` (uid -> FailureReason)
    and those not in ``only``; ``warn`` adds a WarningReason."""
    failed, warn = failed or {}, warn or {}
    ref, bad = [], []
    for p in parts:
        if p.sop in failed:
            bad.append({"00081155": {"vr": "UI", "Value": [p.sop]},
                        "00081197": {"vr": "US", "Value": [failed[p.sop]]}})
        elif only is None or p.sop in only:
            item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [p.sop]}}
            if p.sop in warn:
                item["00081196"] = {"vr": "US", "Value": [warn[p.sop]]}
            ref.append(item)
    out: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": ref}}
    if bad:
        out["00081198"] = {"vr": "SQ", "Value": bad}
    return out


def ok(parts: list[Part]) -> Answer:
    return 200, {}, stored_all(parts)


class ScriptedStow:
    """``POST /dicom-web/studies`` answered by ``script(parts, request)`` (default: all
    stored). ``requests`` records every request; ``stored`` the SOP Instance UIDs (and
    their transfer syntaxes) a 200/202/400 answer listed as referenced. ``discard``
    reads the body without parsing it (the memory test); ``drop_idle`` closes each
    connection after its answer without saying so (an idle keep-alive timeout)."""

    def __init__(self, script: Callable[[list[Part], Request], Answer] | None = None,
                 token: str | None = None, discard: bool = False, drop_idle: bool = False):
        self.script = script or (lambda parts, req: ok(parts))
        self.token = token
        self.discard = discard
        self.drop_idle = drop_idle
        self.requests: list[Request] = []
        self.stored: dict[str, str] = {}
        self.lock = threading.Lock()
        outer = self

        self.connections = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer.lock:
                    outer.connections += 1

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(outer._auth(self) or (200, {}, []))

            def do_POST(self) -> None:
                assert "chunked" not in self.headers.get("Transfer-Encoding", "")
                length = int(self.headers["Content-Length"])
                parts = outer._parts(self.headers["Content-Type"], self.rfile, length)
                req = Request("POST", self.path, dict(self.headers), parts)
                with outer.lock:
                    outer.requests.append(req)
                answer = outer._auth(self) or outer.script(parts, req)
                if answer[0] in (200, 202, 400) and isinstance(answer[2], dict):
                    listed = {i["00081155"]["Value"][0] for i in
                              answer[2].get("00081199", {}).get("Value", [])}
                    with outer.lock:
                        outer.stored.update({p.sop: p.ts for p in parts if p.sop in listed})
                self._answer(answer)

            def _answer(self, answer: Answer) -> None:
                status, headers, body = answer
                data = (body if isinstance(body, bytes) else b"" if body is None
                        else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if outer.drop_idle:
                    self.close_connection = True

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _auth(self, h: BaseHTTPRequestHandler) -> Answer | None:
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"WWW-Authenticate": "Bearer"}, None
        return None

    def _parts(self, ctype: str, rfile: Any, length: int) -> list[Part]:
        if self.discard:
            left = length
            while left:
                got = len(rfile.read(min(left, 1 << 20)))
                assert got, "the body ended before its Content-Length"
                left -= got
            return [Part("", "", length)]
        body = rfile.read(length)
        assert len(body) == length
        boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
        assert 'type="application/dicom"' in ctype
        out = []
        for chunk in body.split(b"--" + boundary)[1:-1]:
            head, _, data = chunk.partition(b"\r\n\r\n")
            assert b"Content-Type: application/dicom" in head
            data = data[:-2]  # the CRLF before the next boundary
            try:
                ds = dcmread(BytesIO(data), stop_before_pixels=True)
                out.append(Part(str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                                len(data)))
            except Exception:
                out.append(Part("<not dicom>", "", len(data)))
        return out

    def sizes(self) -> list[int]:
        with self.lock:
            return [len(r.parts) for r in self.requests if r.method == "POST"]

    def __enter__(self) -> ScriptedStow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- helpers


def web(url: str, **options: object) -> TypedDest:
    return TypedDest("web", type="dicomweb", options={"url": url, "timeout": "10s", **options})


def stow_settings(make_settings: Any, url: str, **options: object) -> Settings:
    cfg: Settings = make_settings(web(url, **options), rules=rule("all", ["web"]))
    return cfg


def study(cfg: Settings, n: int, **kw: object) -> list[str]:
    """``n`` instances of one new study queued for ``web``; their SOP Instance UIDs."""
    st, se = generate_uid(), generate_uid()
    uids = []
    for i in range(n):
        ds = make_instance(8, 8, study_uid=st, series_uid=se, instance_number=i + 1,
                           **kw)  # type: ignore[arg-type]
        queue(cfg, "web", ds)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def delivered_uids(cfg: Settings) -> set[str]:
    return {sidecar(p)["sop_instance_uid"] for p in delivered(cfg, "web")}


def error_reasons(cfg: Settings) -> dict[str, str]:
    return {sidecar(p)["sop_instance_uid"]: sidecar(p)["error"]["reason"]
            for p in errored(cfg, "web")}


def drain(cfg: Settings, rounds: int = 20) -> None:
    """run_once until the queue is empty or nothing moves (no backoff in these tests)."""
    with Dispatcher(cfg, "web") as d:
        for _ in range(rounds):
            if not queued(cfg, "web") or not d.run_once():
                return


# ---------------------------------------------------------------- Orthanc, the real server


def test_orthanc_held_while_down_then_everything_stored(make_settings: Any,
                                                        tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True, users={"hermes": "s3cret-pw"})
    (tmp_path / "pw").write_text("s3cret-pw\n")
    cfg = stow_settings(make_settings, orthanc.dicomweb_url, username="hermes",
                        password_file="pw", max_instances=3)
    uids = study(cfg, 5) + study(cfg, 2, transfer_syntax=ImplicitVRLittleEndian)
    for kind in ("jpeg_baseline", "jpeg2000", "jpeg_ls", "rle"):
        ds = compressed_instance(kind)
        queue(cfg, "web", ds)
        uids.append(str(ds.SOPInstanceUID))
    probe = create(cfg.destination("web")).probe()
    assert not probe.ok and "connection refused" in probe.text
    with serving(cfg, "web"):
        wait_for(lambda: state(cfg, "web").get("state") == "backoff", 20, what="backoff")
        assert state(cfg, "web")["last_error"]["kind"] == "connection refused"
        # held, none lost or failed (a claim of the failed attempt may still be returning)
        wait_for(lambda: len(queued(cfg, "web")) == len(uids), 20, what="all queued again")
        assert not delivered(cfg, "web") and not errored(cfg, "web")
        with orthanc:
            wait_for(lambda: len(delivered(cfg, "web")) == len(uids), 60,
                     what=f"{len(uids)} delivered to Orthanc")
            assert orthanc.sop_uids() == set(uids)
            assert create(cfg.destination("web")).probe().ok
    for p in delivered(cfg, "web"):
        side = sidecar(p)
        assert side["delivered_as"] == side["transfer_syntax"]   # sent as stored
    assert state(cfg, "web")["state"] == "ok"


# ---------------------------------------------------------------- HTTP-level answers


def test_token_reread_on_401_and_misconfigured_while_refused(make_settings: Any,
                                                              tmp_path: Path,
                                                              caplog: Any) -> None:
    token = tmp_path / "token"
    token.write_text("old-token-1234\n")
    with ScriptedStow(token="new-token-5678") as srv:
        cfg = stow_settings(make_settings, srv.url, token_file=str(token))
        uids = study(cfg, 3)
        with serving(cfg, "web"):
            wait_for(lambda: state(cfg, "web").get("state") == "misconfigured", 20,
                     what="misconfigured")
            st = state(cfg, "web")["last_error"]
            assert "401" in st["detail"] and "read again" in st["detail"]
            assert len(queued(cfg, "web")) == 3 and not errored(cfg, "web")
            # the token was read again on the 401: rotating the file is enough
            token.write_text("new-token-5678\n")
            wait_for(lambda: len(delivered(cfg, "web")) == 3, 20, what="3 delivered")
        assert delivered_uids(cfg) == set(uids)
    everything = caplog.text + json.dumps(state(cfg, "web")) + "".join(
        p.with_suffix(".json").read_text() for p in delivered(cfg, "web"))
    assert "token-" not in everything   # a secret is never logged or recorded


def test_413_halves_the_request_until_it_fits(make_settings: Any) -> None:
    def script(parts: list[Part], req: Request) -> Answer:
        return (413, {}, b"too large") if len(parts) > 2 else ok(parts)

    with ScriptedStow(script) as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 7)
        drain(cfg)
        assert delivered_uids(cfg) == set(uids) == set(srv.stored)
        sizes = srv.sizes()   # 7 refused, then halves: 3 refused, 1, 2; 4 refused, 2, 2
        assert sizes[0] == 7 and sum(n for n in sizes if n <= 2) == 7
        assert srv.connections == 1   # keep-alive: one connection for all seven requests


def test_429_retry_after_and_503_back_the_destination_off(make_settings: Any) -> None:
    answers: list[Answer] = [(429, {"Retry-After": "30"}, None), (503, {}, b"down"), ]

    def script(parts: list[Part], req: Request) -> Answer:
        return answers.pop(0) if answers else ok(parts)

    with ScriptedStow(script) as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 2)
        with Dispatcher(cfg, "web") as d:
            d.run_once()
        st = state(cfg, "web")
        assert st["state"] == "backoff" and st["last_error"]["kind"] == "throttled"
        # max_delay is 1s in the tests: only Retry-After explains 30 s
        assert st["backoff_until"] - time.time() > 25
        with Dispatcher(cfg, "web") as d:   # a new dispatcher probes at once
            d.run_once()
        st = state(cfg, "web")
        assert st["last_error"]["kind"] == "server error"
        assert st["backoff_until"] - time.time() < 2    # no Retry-After: our own backoff
        assert len(queued(cfg, "web")) == 2 and not errored(cfg, "web")
        for p in queued(cfg, "web"):
            assert sidecar(p)["history"][-1]["scope"] == "destination"
        drain(cfg)
        assert delivered_uids(cfg) == set(uids)


def test_a_keep_alive_connection_the_server_dropped_is_not_an_outage(
        make_settings: Any) -> None:
    with ScriptedStow(drop_idle=True) as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 1) + study(cfg, 1) + study(cfg, 1)   # three requests
        with Dispatcher(cfg, "web") as d:
            assert d.run_once() == 3
        assert delivered_uids(cfg) == set(uids) and srv.sizes() == [1, 1, 1]
        assert srv.connections == 3   # each request after the first found its connection gone
        assert state(cfg, "web")["state"] == "ok"
        for p in delivered(cfg, "web"):
            assert sidecar(p)["attempts"] == 1


def test_400_that_stored_half_the_batch(make_settings: Any) -> None:
    first: list[bool] = []

    def script(parts: list[Part], req: Request) -> Answer:
        if not first:   # Orthanc's way: 400, the good half stored and listed
            first.append(True)
            return 400, {}, stored_all(parts, only={p.sop for p in parts[:2]})
        return ok(parts)

    with ScriptedStow(script) as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 4)
        drain(cfg)
        assert delivered_uids(cfg) == set(uids)
        assert srv.sizes() == [4, 2]   # only the two not listed went again


def test_400_without_a_body_is_bisected_to_the_bad_instance(make_settings: Any) -> None:
    with ScriptedStow() as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 6)
        poison = uids[3]
        srv.script = lambda parts, req: ((400, {}, b"") if any(p.sop == poison for p in parts)
                                         else ok(parts))
        drain(cfg)
        assert delivered_uids(cfg) == set(uids) - {poison}
        reasons = error_reasons(cfg)
        assert set(reasons) == {poison} and "400" in reasons[poison] \
            and "alone" in reasons[poison]
        assert len(srv.sizes()) <= 7   # bisection: a few requests, not one per instance


def test_body_naming_failed_and_warned_instances(make_settings: Any) -> None:
    with ScriptedStow() as srv:
        cfg = stow_settings(make_settings, srv.url)
        uids = study(cfg, 4)
        bad, busy, warned = uids[0], uids[1], uids[2]
        srv.script = lambda parts, req: (202, {}, stored_all(
            parts, failed={bad: 0xA900, busy: 0xA700}, warn={warned: 0xB000}))
        with Dispatcher(cfg, "web") as d:
            d.run_once()
        assert delivered_uids(cfg) == {uids[2], uids[3]}
        warned_side = next(sidecar(p) for p in delivered(cfg, "web")
                           if sidecar(p)["sop_instance_uid"] == warned)
        assert warned_side["warnings"] and warned_side["warnings"][0].startswith("0xB000")
        reasons = error_reasons(cfg)
        assert set(reasons) == {bad} and reasons[bad].startswith("0xA900")
        (left,) = queued(cfg, "web")   # 0xA700: transient, back in the queue with a timer
        side = sidecar(left)
        assert side["sop_instance_uid"] == busy and side["last_error"]["status"] == "0xA700"
        assert side["next_attempt"] and Spool.next_attempt(left) > time.time()
        assert state(cfg, "web")["state"] == "ok"


def test_refused_transfer_syntax_is_decompressed_and_sent_again(make_settings: Any) -> None:
    def script(parts: list[Part], req: Request) -> Answer:
        refused = {p.sop: 0xC122 for p in parts if p.ts != ExplicitVRLittleEndian}
        return 202 if refused else 200, {}, stored_all(parts, failed=refused)

    with ScriptedStow(script) as srv:
        cfg = stow_settings(make_settings, srv.url)
        plain = study(cfg, 1)
        shared = {"study_uid": generate_uid()}
        jpeg, rle = compressed_instance("jpeg_baseline", **shared), \
            compressed_instance("rle", **shared)
        for ds in (jpeg, rle):
            queue(cfg, "web", ds)
        implicit = make_instance(8, 8, transfer_syntax=ImplicitVRLittleEndian)
        queue(cfg, "web", implicit)
        drain(cfg)
        want = {*plain, str(jpeg.SOPInstanceUID), str(rle.SOPInstanceUID),
                str(implicit.SOPInstanceUID)}
        assert delivered_uids(cfg) == want and not errored(cfg, "web")
        assert set(srv.stored.values()) == {ExplicitVRLittleEndian}
        for p in delivered(cfg, "web"):
            assert sidecar(p)["delivered_as"] == ExplicitVRLittleEndian
        assert not list(Path(cfg.spool.path, "tmp").rglob("hermes-conv-*"))


# ---------------------------------------------------------------- memory


_CHILD = """
import sys
from pathlib import Path
from hermes_py.config import load
from hermes_py.dispatcher import Dispatcher
with Dispatcher(load(Path(sys.argv[1])), "web") as d:
    n = d.run_once()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(n, int(hwm.split()[1]))
"""


def test_a_200_mb_instance_is_streamed_in_bounded_memory(make_settings: Any,
                                                         tmp_path: Path) -> None:
    with ScriptedStow(discard=True) as srv:
        cfg = stow_settings(make_settings, srv.url)
        spool = Spool(cfg.spool.path)
        tmp = spool.tmp_path(".dcm")
        ds = big_image(tmp, 200)
        sop, size = str(ds.SOPInstanceUID), tmp.stat().st_size
        srv.script = lambda parts, req: (200, {}, stored_all([Part(sop, "", 0)]))
        name = new_name(sop)
        data = sc.network(name, sop, str(ds.SOPClassUID), ExplicitVRLittleEndian,
                          calling_ae="CT1", called_ae="HERMES", peer_address=LOOPBACK,
                          peer_port=40000, size=size, received_by="test")
        spool.publish(tmp, spool.outbox("web"), name, sc.queued(data, "web", "normal",
                                                                  now_iso()), fsync_data=False)
        out = subprocess.run([sys.executable, "-c", _CHILD, str(cfg.path)], capture_output=True,
                             text=True, timeout=90, cwd=Path(__file__).parents[1],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert out.returncode == 0, out.stderr[-2000:]
        n, hwm_kb = map(int, out.stdout.split())
        assert n == 1 and delivered_uids(cfg) == {sop}
        (req,) = srv.requests
        assert req.parts[0].size == int(req.headers["Content-Length"]) > size
        print(f"peak RSS sending {size / 1e6:.0f} MB: {hwm_kb / 1024:.1f} MiB")
        assert hwm_kb < 100 * 1024, f"peak RSS {hwm_kb / 1024:.0f} MiB"


# ---------------------------------------------------------------- rules check


def _check(tmp_path: Path, url: str = "https://pacs.example/dicom-web",
           **options: object) -> str:
    path = Config(destinations=[web(url, **options)], rules=rule("all", ["web"])).write(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(path)
    return str(e.value)


def test_rules_check_names_the_key_of_a_bad_secret_file(tmp_path: Path) -> None:
    msg = _check(tmp_path, username="u", password_file="missing.txt")
    assert "rules.toml:" in msg and "destinations.web.password_file: cannot read" in msg
    assert "\n" not in msg
    assert "username and password_file go together" in _check(tmp_path, username="u")
    (tmp_path / "empty").write_text("")
    assert "token_file" in _check(tmp_path, token_file="empty")
    (tmp_path / "tok").write_text("t\n")
    assert "choose one" in _check(tmp_path, username="u", password_file="tok",
                                  token_file="tok")
    assert "needs an https" in _check(tmp_path, "http://x/dicom-web", ca_file="tok")
    assert "expected an http" in _check(tmp_path, "ftp://x")
    assert "no credentials in the URL" in _check(tmp_path, "https://u:p@x/dicom-web")


def test_retry_after_header_values() -> None:
    assert retry_after("120") == 120.0
    assert retry_after(None) is None and retry_after("soon") is None
    now = time.time()
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 60))
    secs = retry_after(when, now)
    assert secs is not None and 58 <= secs <= 61
    assert retry_after("99999999") == 6 * 3600.0
