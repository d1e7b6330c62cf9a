"""Alerts: conditions in the state files -> one alert per change -> the outbox -> real channels.

The watcher runs on a fake clock over state files written the way a dispatcher writes
them; the channels are real: a local ``http.server`` webhook (with a script of answers),
an aiosmtpd SMTP sink, a command that reads its stdin. No alert may carry the patient's
name or ID of an instance in the spool.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hermes_py import failover
from hermes_py.admin.alerts import alerts_text, open_alerts
from hermes_py.alerts import channels, sender_for
from hermes_py.alerts import payload as pl
from hermes_py.alerts.aggregate import FLAP_RESTARTS, GROUP_WAIT, Aggregator
from hermes_py.alerts.sender import OutboxItem
from hermes_py.alerts.watcher import AlertsState, Watcher
from hermes_py.config import ConfigError, Settings, load
from hermes_py.events import Occurrence
from hermes_py.lifecycle import Event
from hermes_py.spool import Spool, now_iso
from hermes_py.supervisor import Supervisor
from tests.support import cli
from tests.support.config import Config, Dest, toml_table
from tests.support.dicomgen import make_instance
from tests.support.peers import LOOPBACK, free_port, wait_for
from tests.support.spool import put, queue

PATIENT_NAME = "DOE^JANE^SECRETNAME"
PATIENT_ID = "PID-4711-SECRET"
T0 = 1_900_000_000.0     # the fake clock's epoch (2030)


# ---------------------------------------------------------------- a webhook receiver


@dataclass
class Post:
    at: float
    code: int
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class WebhookSink:
    """``http.server`` on 127.0.0.1 answering each POST from ``codes`` (then ``then``)."""

    def __init__(self, codes: list[int] | None = None, then: int = 200):
        self.codes = list(codes or [])
        self.then = then
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with sink._lock:
                    code = sink.codes.pop(0) if sink.codes else sink.then
                    sink.posts.append(Post(time.time(), code, dict(self.headers), body))
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/hooks/hermes"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def start(self) -> WebhookSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def accepted(self, event: str | None = None) -> list[Post]:
        with self._lock:
            posts = list(self.posts)
        return [p for p in posts if 200 <= p.code < 300
                and (event is None or p.payload.get("event") == event)]


@pytest.fixture
def webhook() -> Iterator[Any]:
    made: list[WebhookSink] = []

    def make(codes: list[int] | None = None, then: int = 200) -> WebhookSink:
        made.append(WebhookSink(codes, then).start())
        return made[-1]
    yield make
    for s in made:
        s.stop()


# ---------------------------------------------------------------- rules.toml with [alerts]


@dataclass
class AlertConfig(Config):
    """A Config with an ``[alerts]`` table and its channels (TOML text appended)."""

    alerts: str = ""

    def render(self) -> str:
        return super().render() + "\n" + self.alerts


def alerts_toml(channels: dict[str, dict[str, object]] | None = None,
                **keys: object) -> str:
    text = toml_table("alerts", keys)
    for name, values in (channels or {}).items():
        text += "\n" + toml_table(f"alerts.channels.{name}", values)
    return text


def settings(tmp_path: Path, alerts: str, dests: tuple[str, ...] = ("pacs",),
             **spool: object) -> Settings:
    cfg = AlertConfig(destinations=[Dest(n, ae_title=n.upper()) for n in dests],
                      spool={"path": "spool", "min_free_mb": 0, **spool}, alerts=alerts)
    loaded = load(cfg.write(tmp_path))
    s = Spool(loaded.spool.path)
    s.ensure(list(loaded.destinations))
    s.alerts.ensure()
    return loaded


def hook(url: str, **kw: object) -> dict[str, dict[str, object]]:
    return {"ops": {"type": "webhook", "url": url, **kw}}


def dest_state(spool: Spool, name: str, state: str, since: float | None, at: float,
               detail: str = "[Errno 111] Connection refused", failures: int = 1) -> None:
    """state/<dest>.json as the dispatcher writes it."""
    spool.write_json(spool.state_file(name), {
        "destination": name, "state": state,
        "backoff_until": None if state == "ok" else at + 1.0,
        "consecutive_failures": 0 if state == "ok" else failures,
        "last_error": None if state == "ok" else {"at": now_iso(at),
                                                 "kind": "connection refused",
                                                 "detail": detail},
        "last_success": None, "down_since": None if since is None else now_iso(since),
        "up_since": now_iso(at) if state == "ok" else None, "updated_at": now_iso(at)})


def pending(spool: Spool) -> list[OutboxItem]:
    return [OutboxItem(**d) for _, d in spool.alerts.items()]  # type: ignore[typeddict-item]


def events_of(spool: Spool, folder: Path | None = None) -> list[str]:
    return [str(d["payload"]["event"]) for _, d in spool.alerts.items(folder)]


# ---------------------------------------------------------------- the watcher


def test_down_after_alert_after_then_one_recovered_over_twenty_probes(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x"), alert_after="5m"))
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    dest_state(spool, "pacs", "backoff", T0, T0)
    for probe in range(20):   # twenty probes over 10 minutes: the state file rewritten each
        now = T0 + probe * 30
        dest_state(spool, "pacs", "backoff", T0, now, failures=probe + 1)
        w.tick(now)
        assert events_of(spool) == ([] if now - T0 < 300 else ["destination_down"]), probe
    state: AlertsState = spool.read_json(spool.alerts.state_file)  # type: ignore[assignment]
    assert list(state["open"]) == ["destination:pacs"]
    down = pending(spool)[0]["payload"]
    assert down["state"] == {"from": "ok", "to": "backoff", "since": now_iso(T0),
                             "duration_s": 300}
    assert f"127.0.0.1:{cfg.destinations['pacs'].port}" in down["destination"]["target"]
    assert down["severity"] == "critical" and down["queue"]["queued"] == 0

    # a restart of the alert process mid-outage: the open alert is on disk, no second down
    w = Watcher(cfg, spool)
    w.tick(T0 + 700)
    dest_state(spool, "pacs", "ok", None, T0 + 720)
    for t in (T0 + 721, T0 + 722, T0 + 900):
        w.tick(t)
    assert events_of(spool) == ["destination_down", "destination_recovered"]
    rec = pending(spool)[1]["payload"]
    assert rec["state"]["from"] == "backoff" and rec["state"]["to"] == "ok"
    assert rec["state"]["duration_s"] == 721
    assert pending(spool)[0]["payload"]["id"] != rec["id"]
    # a short blip under alert_after: nothing at all
    dest_state(spool, "pacs", "backoff", T0 + 1000, T0 + 1000)
    w.tick(T0 + 1100)
    dest_state(spool, "pacs", "ok", None, T0 + 1200)
    w.tick(T0 + 1201)
    assert len(events_of(spool)) == 2


def test_misconfigured_at_once_and_reminders_every_repeat_every(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x"), alert_after="5m",
                                         repeat_every="1h"))
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    dest_state(spool, "pacs", "misconfigured", T0, T0)
    w.tick(T0 + 1)
    assert events_of(spool) == ["destination_misconfigured"]
    for t in range(2, 3600, 300):
        w.tick(T0 + t)
    assert len(events_of(spool)) == 1
    w.tick(T0 + 3601)
    w.tick(T0 + 3700)
    w.tick(T0 + 7202)
    evs = pending(spool)
    assert [e["payload"]["event"] for e in evs] == ["destination_misconfigured"] * 3
    assert [e["payload"]["details"].get("reminder") for e in evs] == [None, 1, 2]
    assert len({e["payload"]["id"] for e in evs}) == 3
    assert evs[1]["payload"]["state"]["to"] == "misconfigured"
    dest_state(spool, "pacs", "ok", None, T0 + 8000)
    w.tick(T0 + 8001)
    assert events_of(spool)[-1] == "destination_recovered"


def test_a_crash_between_outbox_and_state_writes_the_same_alert_once(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x"), alert_after="5m"))
    spool = Spool(cfg.spool.path)
    dest_state(spool, "pacs", "backoff", T0, T0)
    Watcher(cfg, spool).tick(T0 + 400)
    spool.write_json(spool.alerts.state_file, {})   # state/alerts.json lost in the crash
    Watcher(cfg, spool).tick(T0 + 401)
    assert events_of(spool) == ["destination_down"]


def test_failover_started_and_failback(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x")), dests=("pacs", "backup"))
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    spool.write_json(spool.failover_file("pacs"), {
        "destination": "pacs", "to": "backup", "mode": "divert", "since": now_iso(T0),
        "reason": "pacs unavailable 15m: connection refused"})
    assert failover.read(spool, "pacs") is not None
    w.tick(T0 + 1)
    w.tick(T0 + 2)
    first = pending(spool)[0]["payload"]
    assert first["event"] == "failover_started"
    assert first["failover"] == {"to": "backup", "mode": "divert", "since": now_iso(T0)}
    spool.write_json(spool.failover_file("pacs"), {})
    w.tick(T0 + 3)
    w.tick(T0 + 4)
    assert events_of(spool) == ["failover_started", "failback"]


def test_queue_delayed_once_per_episode(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x"), delay_warning="1h"))
    spool = Spool(cfg.spool.path)
    now = time.time()
    old = queue(spool, "pacs", received=now - 7200)
    queue(spool, "pacs", received=now - 60)
    w = Watcher(cfg, spool)
    w.tick(now)
    w.tick(now + 100)
    assert events_of(spool) == ["queue_delayed"]
    p = pending(spool)[0]["payload"]
    assert p["queue"]["queued"] == 2 and p["queue"]["oldest_age_s"] >= 7199
    old.unlink()                           # delivered (as far as the queue can tell)
    old.with_suffix(".json").unlink()
    w.tick(now + 200)   # delivered: the episode ends silently
    assert "queue:pacs" not in (spool.read_json(spool.alerts.state_file).get("open") or {})


def test_disk_low_with_hysteresis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x")), min_free_mb=100)
    spool = Spool(cfg.spool.path)
    w = Watcher(cfg, spool)
    free = [500.0]
    monkeypatch.setattr(w.spool, "free_mb", lambda: free[0])
    seen = []
    for t, mb in enumerate([500, 190, 150, 250, 290, 301, 250, 199, 180]):
        free[0] = float(mb)
        w.tick(T0 + 10 * t)
        seen.append(len(events_of(spool)))
    # low under 200 (twice min_free_mb), cleared only at 300 (three times), low again
    assert seen == [0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert pending(spool)[0]["payload"]["details"] == {"free_mb": 190.0, "min_free_mb": 100}


# ---------------------------------------------------------------- payload: no patient data


def test_no_alert_or_mail_carries_patient_data(tmp_path: Path, webhook: Any) -> None:
    from aiosmtpd.controller import Controller
    mails: list[bytes] = []

    class Sink:
        async def handle_DATA(self, server: object, session: object,  # noqa: N802
                              envelope: Any) -> str:
            mails.append(envelope.content)
            return "250 OK"

    smtp = Controller(Sink(), hostname=LOOPBACK, port=free_port())
    smtp.start()
    try:
        sink = webhook()
        chans = {**hook(sink.url), "mail": {"type": "email", "host": LOOPBACK,
                                            "port": smtp.port, "starttls": False,
                                            "from": "hermes@example.org",
                                            "to": ["ops@example.org"]},
                 "pager": {"type": "command", "argv": [sys.executable, "-c",
                                                       "import sys; sys.stdin.read()"]}}
        cfg = settings(tmp_path, alerts_toml(chans, alert_after="1s", delay_warning="1s"),
                       dests=("pacs", "backup"))
        spool = Spool(cfg.spool.path)
        ds = make_instance(8, 8, patient_id=PATIENT_ID, study_description="SECRET STUDY")
        ds.PatientName = PATIENT_NAME
        ds.AccessionNumber = "ACC-998877"
        now = time.time()
        dcm = queue(spool, "pacs", ds, received=now - 30)
        put(spool, spool.error_dir("pacs"), ds.copy())
        assert PATIENT_ID.encode() in dcm.read_bytes()
        sop = str(ds.SOPInstanceUID)
        # a peer that echoes the patient and the UID back in its error text (hostile)
        dest_state(spool, "pacs", "backoff", now - 100, now,
                   detail=f"0xA900 {sop} rejected " + "x" * 1000)
        w = Watcher(cfg, spool)
        w.tick(now)
        agg = Aggregator(lambda: cfg, lambda: spool)
        agg.observe(Occurrence(Event.GAVE_UP, sop, "pacs", fields={
            "status": "0x0122", "reason": f"SOP class 1.2.840.10008.5.1.4.1.1.2 not "
                                          f"supported for {sop}"}))
        agg.flush(now + GROUP_WAIT + 1)
        sender = sender_for(cfg, spool)
        sender.tick(now + GROUP_WAIT + 2)
        wait_for(lambda: len(mails) >= 3, 10, what="three mails at the SMTP sink")
        texts = [p.body.decode() for p in sink.posts] + [m.decode("utf-8", "replace")
                                                          for m in mails]
        texts += [f.read_text() for f in spool.alerts.sent.glob("*.json")]
        assert {p.payload["event"] for p in sink.posts} == {"destination_down",
                                                            "queue_delayed", "gave_up"}
        for text in texts:
            for secret in (PATIENT_ID, "DOE^JANE", "SECRETNAME", "SECRET STUDY",
                           "ACC-998877", sop, "20261128"):
                assert secret not in text, f"{secret!r} in an alert:\n{text[:2000]}"
        down = next(p.payload for p in sink.posts if p.payload["event"] == "destination_down")
        assert len(down["last_error"]["detail"]) <= pl.DETAIL_MAX
        assert "<uid>" in down["last_error"]["detail"]
        gave = next(p.payload for p in sink.posts if p.payload["event"] == "gave_up")
        assert gave["details"]["count"] == 1
        assert "1.2.840.10008.5.1.4.1.1.2" not in json.dumps(gave)
        assert set(gave) >= {"schema", "id", "event", "severity", "at", "host", "destination",
                             "state", "last_error", "queue", "failover", "hint"}
        assert gave["queue"]["error_24h"] == 1
        assert "Subject: [hermes critical] destination_down pacs on" in mails[0].decode() \
            or any(b"destination_down pacs" in m for m in mails)
    finally:
        smtp.stop()


def test_uids_only_with_include_uids(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/x"), include_uids=True))
    spool = Spool(cfg.spool.path)
    agg = Aggregator(lambda: cfg, lambda: spool)
    agg.observe(Occurrence(Event.FAILED, "1.2.3.4.5.6", "pacs", fields={
        "status": "0x0122", "reason": "SOP class 1.2.840.10008.5.1.4.1.1.2 not supported"}))
    agg.flush(time.time() + GROUP_WAIT + 1)
    (item,) = pending(spool)
    assert "1.2.840.10008.5.1.4.1.1.2" in json.dumps(item["payload"])
    assert pl.clean("to 10.0.0.9:104 for 1.2.840.113619.2.1") == "to 10.0.0.9:104 for <uid>"
    assert pl.clean("https://user:pw@h/x?token=abc&b=1\x1b[31m") == \
        "https://***@h/x?token=***&b=1 [31m"


# ---------------------------------------------------------------- the sender and channels


def test_webhook_500_then_200_backs_off_then_delivers_signed(tmp_path: Path,
                                                           webhook: Any) -> None:
    sink = webhook([500, 500])
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret-key\n")
    cfg = settings(tmp_path, alerts_toml(hook(sink.url, hmac_secret_file=str(secret)),
                                         retry_min="30s", retry_max="1h"))
    spool = Spool(cfg.spool.path)
    dest_state(spool, "pacs", "backoff", T0, T0)
    Watcher(cfg, spool).tick(T0 + 400)
    s = sender_for(cfg, spool)
    assert s.tick(T0 + 400) == 1
    assert s.tick(T0 + 420) == 0           # backing off: 30 s
    assert s.tick(T0 + 431) == 1           # second 500; now 60 s
    assert s.tick(T0 + 480) == 0
    assert s.tick(T0 + 492) == 1
    assert [p.code for p in sink.posts] == [500, 500, 200]
    assert not list(spool.alerts.pending.iterdir())
    (done,) = [d for _, d in spool.alerts.items(spool.alerts.sent)]
    assert done["deliveries"]["ops"]["attempts"] == 3
    assert done["deliveries"]["ops"]["answer"] == "HTTP 200 OK"
    post = sink.posts[-1]
    want = "sha256=" + hmac.new(b"s3cret-key", post.body, hashlib.sha256).hexdigest()
    assert post.headers["X-Hermes-Signature"] == want
    assert post.payload["schema"] == "hermes-alert/1"
    assert {p.payload["id"] for p in sink.posts} == {post.payload["id"]}  # one idempotency key


def test_unsent_down_and_recovered_merge_into_one_flapped(tmp_path: Path, webhook: Any) -> None:
    sink = webhook([503])
    cfg = settings(tmp_path, alerts_toml(hook(sink.url), alert_after="1m", retry_min="30s"))
    spool = Spool(cfg.spool.path)
    w, s = Watcher(cfg, spool), sender_for(cfg, spool)
    dest_state(spool, "pacs", "backoff", T0, T0)
    w.tick(T0 + 61)
    s.tick(T0 + 61)                        # the down: 503
    dest_state(spool, "pacs", "ok", None, T0 + 70)
    w.tick(T0 + 71)
    s.tick(T0 + 100)
    assert [p.payload["event"] for p in sink.accepted()] == ["destination_recovered"]
    merged = sink.accepted()[0].payload
    assert merged["details"]["flapped"] is True and len(merged["details"]["merged_ids"]) == 1
    assert merged["summary"].startswith("flapped: destination_down pacs for 1m")
    assert not list(spool.alerts.pending.iterdir())
    # a down already delivered is not merged: its recovery goes alone
    dest_state(spool, "pacs", "backoff", T0 + 200, T0 + 200)
    w.tick(T0 + 300)
    s.tick(T0 + 300)
    dest_state(spool, "pacs", "ok", None, T0 + 310)
    w.tick(T0 + 311)
    s.tick(T0 + 311)
    assert [p.payload["event"] for p in sink.accepted()][1:] == ["destination_down",
                                                                 "destination_recovered"]


def test_give_up_after_moves_to_failed(tmp_path: Path, webhook: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    sink = webhook(then=500)
    cfg = settings(tmp_path, alerts_toml(hook(sink.url), retry_min="1s", retry_max="2s",
                                         give_up_after="10s"))
    spool = Spool(cfg.spool.path)
    dest_state(spool, "pacs", "misconfigured", T0, T0)
    Watcher(cfg, spool).tick(T0)
    s = sender_for(cfg, spool)
    for t in range(12):
        s.tick(T0 + t)
    assert events_of(spool) == []
    assert events_of(spool, spool.alerts.failed) == ["destination_misconfigured"]
    assert "not accepted by ops" in caplog.text
    info = open_alerts(spool)
    assert info is not None and info["failed"] == 1
    assert any("NOT DELIVERED" in line for line in alerts_text(info))


def test_command_channel_gets_the_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "paged.json"
    script = ("import sys, json; d = json.load(sys.stdin); "
              f"open({str(out)!r}, 'w').write(json.dumps(d)); print('paged', d['event'])")
    cfg = settings(tmp_path, alerts_toml({"pager": {
        "type": "command", "argv": [sys.executable, "-c", script]}}))
    spool = Spool(cfg.spool.path)
    dest_state(spool, "pacs", "misconfigured", T0, T0)
    Watcher(cfg, spool).tick(T0)
    sender_for(cfg, spool).tick(T0)
    assert json.loads(out.read_text())["event"] == "destination_misconfigured"
    (done,) = [d for _, d in spool.alerts.items(spool.alerts.sent)]
    assert done["deliveries"]["pager"]["answer"] == "exit 0: paged destination_misconfigured"
    fail = channels.make(load_channel(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"]))
    assert fail.send(pl.AlertPayload(event="test")) == channels.Answer(False, "exit 3")


def load_channel(tmp_path: Path, argv: list[str]) -> Any:
    cfg = settings(tmp_path / "other", alerts_toml({"c": {"type": "command", "argv": argv}}))
    return cfg.alerts.channels[0]


def test_email_logs_in_with_the_password_file(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
    got: list[tuple[bytes, bytes]] = []
    mails: list[Any] = []

    def auth(server: object, session: object, envelope: object, mechanism: str,
             data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        got.append((data.login, data.password))
        return AuthResult(success=data.password == b"mail-pw", handled=False)

    class Sink:
        async def handle_DATA(self, server: object, session: object,  # noqa: N802
                              envelope: Any) -> str:
            mails.append(envelope)
            return "250 OK"

    smtp = Controller(Sink(), hostname=LOOPBACK, port=free_port(), authenticator=auth,
                      auth_require_tls=False, auth_exclude_mechanism=["LOGIN"])
    smtp.start()
    try:
        pw = tmp_path / "mail.pw"
        pw.write_text("mail-pw\n")
        cfg = settings(tmp_path, alerts_toml({"mail": {
            "type": "email", "host": LOOPBACK, "port": smtp.port, "starttls": False,
            "username": "hermes", "password_file": str(pw), "from": "hermes@example.org",
            "to": ["a@example.org", "b@example.org"], "timeout": "5s"}}))
        answer = channels.make(cfg.alerts.channels[0]).send(pl.build(
            cfg, Spool(cfg.spool.path), "test", None, ident="t1", summary="hello"))
        assert answer.ok, answer
        assert got == [(b"hermes", b"mail-pw")]
        assert mails[0].rcpt_tos == ["a@example.org", "b@example.org"]
        assert b"X-Hermes-Alert-Id: t1" in mails[0].content
        pw.write_text("wrong\n")
        bad = channels.make(cfg.alerts.channels[0]).send(pl.AlertPayload(event="test"))
        assert not bad.ok and bad.text.startswith("SMTP 535"), bad
        assert "wrong" not in bad.text
    finally:
        smtp.stop()


def test_apprise_channel(tmp_path: Path, webhook: Any) -> None:
    """Without the extra: a rules check error that says how to get it. With it (not in the
    test extra: ten packages for one channel): a json:// URL to the local receiver."""
    sink = webhook()
    urls = tmp_path / "apprise.urls"
    urls.write_text("# the chat\n" + sink.url.replace("http://", "json://") + "\n")
    text = alerts_toml({"chat": {"type": "apprise", "urls_file": str(urls)}})
    try:
        import apprise  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"rules\.toml:\d+: alerts\.channels\.chat\.type: "
                                              r"apprise is not installed: pip install "
                                              r"'hermes-py\[alerts\]'"):
            settings(tmp_path, text)
        return
    cfg = settings(tmp_path, text)
    answer = channels.make(cfg.alerts.channels[0]).send(pl.build(
        cfg, Spool(cfg.spool.path), "test", None, ident="t2", summary="hello chat"))
    assert answer == channels.Answer(True, "apprise: sent to 1 URL(s)")
    (post,) = sink.posts
    assert post.payload["title"].startswith("[hermes info] test on ")
    assert "hello chat" in post.payload["message"]
    sink.then = 500
    assert not channels.make(cfg.alerts.channels[0]).send(pl.AlertPayload(event="test")).ok


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(("channel", "match"), [
    ({"type": "webhook", "url": "http://x/", "events": ["destination_down", "dest_down"]},
     r"alerts\.channels\.ops\.events: unknown event 'dest_down'"),
    ({"type": "webhook", "url": "http://x/", "hmac_secret_file": "/nonexistent/hook.secret"},
     r"alerts\.channels\.ops\.hmac_secret_file: cannot read /nonexistent/hook\.secret: "
     r"No such file"),
    ({"type": "pigeon", "url": "http://x/"},
     r"alerts\.channels\.ops\.type: expected one of webhook, email, apprise, command, "
     r"got 'pigeon'"),
    ({"type": "webhook", "url": "http://x/", "destinations": ["nowhere"]},
     r"alerts\.channels\.ops\.destinations: unknown destination 'nowhere'"),
    ({"type": "webhook"}, r"alerts\.channels\.ops\.url: set url or url_file"),
    ({"type": "email", "host": "h", "from": "a@b", "to": ["c@d"], "username": "u"},
     r"alerts\.channels\.ops\.password_file: username and password_file go together"),
])
def test_config_errors_name_file_line_and_key(tmp_path: Path, channel: dict[str, object],
                                              match: str) -> None:
    with pytest.raises(ConfigError, match=r"rules\.toml:\d+: " + match) as e:
        settings(tmp_path, alerts_toml({"ops": channel}))
    line = e.value.line
    assert line is not None
    text = (tmp_path / "rules.toml").read_text().splitlines()
    assert "alerts.channels.ops" in "\n".join(text[:line]), "the line is not in the table"


def test_unknown_alerts_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\.toml:\d+: alerts\.alert_afer: unknown key "
                                          r"\(did you mean 'alert_after'"):
        settings(tmp_path, alerts_toml(alert_afer="5m"))


# ---------------------------------------------------------------- admin and serve's wiring


def test_alerts_test_prints_every_answer_and_status_shows_open_alerts(tmp_path: Path,
                                                                      webhook: Any) -> None:
    sink = webhook()
    chans = {**hook(sink.url), "pager": {"type": "command", "argv": ["/bin/false"]}}
    cfg = settings(tmp_path, alerts_toml(chans, alert_after="1s"))
    check = cli.run("rules", "check", "-c", cfg.path)
    assert "alerts (2 channel(s); down after 1s, reminders every 12h):" in check.stdout
    assert f"  ops    webhook {sink.url} (*)" in check.stdout, check.stdout
    r = cli.run("alerts", "test", "-c", cfg.path)
    assert r.returncode == 1, r
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["ops", "webhook", "OK", "HTTP"], r.stdout
    assert lines[1].split()[:4] == ["pager", "command", "FAILED", "exit"], r.stdout
    assert sink.posts[0].payload["event"] == "test"
    assert not list(Spool(cfg.spool.path).alerts.pending.iterdir()), "a test is not queued"

    spool = Spool(cfg.spool.path)
    dest_state(spool, "pacs", "backoff", time.time() - 60, time.time())
    Watcher(cfg, spool).tick()
    st = cli.run("status", "-c", cfg.path)
    assert "alert: destination_down pacs since" in st.stdout, st.stdout
    assert "1 waiting in alerts/pending/" in st.stdout
    js = json.loads(cli.run("status", "--json", "-c", cfg.path).stdout)
    assert js["alerts"]["open"][0]["event"] == "destination_down"


def test_serve_starts_the_alert_child_only_with_channels(tmp_path: Path) -> None:
    with_channels = settings(tmp_path / "a", alerts_toml(hook("http://127.0.0.1:9/")))
    without = settings(tmp_path / "b", alerts_toml(alert_after="1m"))
    assert Supervisor(with_channels)._wanted(with_channels)["alert"] == ["alert"]
    assert "alert" not in Supervisor(without)._wanted(without)


def test_aggregator_gave_up_window_flapping_and_refusals(tmp_path: Path) -> None:
    cfg = settings(tmp_path, alerts_toml(hook("http://127.0.0.1:9/")))
    spool = Spool(cfg.spool.path)
    clock = [T0]
    agg = Aggregator(lambda: cfg, lambda: spool, clock=lambda: clock[0])
    for i in range(30):
        agg.observe(Occurrence(Event.GAVE_UP, f"2.25.{i}", "pacs", fields={
            "reason": f"last error: association aborted (still failing after {i} attempts)"}))
    agg.observe(Occurrence(Event.FAILED, "2.25.99", "pacs", fields={
        "status": "0xA900", "reason": "dataset does not match SOP class"}))
    assert agg.flush(T0 + 1) == 0                       # GROUP_WAIT: one batch, one alert
    assert agg.flush(T0 + GROUP_WAIT + 0.1) == 1
    for _ in range(3):
        agg.observe(Occurrence(Event.GAVE_UP, "2.25.7", "pacs", fields={"reason": "x"}))
    assert agg.flush(T0 + 600) == 0                     # at most one per 15 minutes
    assert agg.flush(T0 + GROUP_WAIT + 901) == 1
    counts = [d["payload"]["details"] for _, d in spool.alerts.items()]
    assert counts[0]["count"] == 31
    assert counts[0]["by_reason"] == {"last error: association aborted": 30,
                                      "0xA900 dataset does not match SOP class": 1}
    assert counts[1]["count"] == 3
    for i in range(FLAP_RESTARTS + 3):
        agg.restarted("dispatch:pacs", now=float(i))
    for _ in range(3):
        agg.observe(Occurrence(Event.RECEIVING_REFUSED, fields={
            "status": "0xA700", "reason": "free space under min_free_mb"}))
    agg.observe(Occurrence(Event.RECEIVING_RESUMED))
    agg.observe(Occurrence(Event.RECEIVING_REFUSED, fields={"status": "0xA700"}))
    agg.flush(T0 + 2000)
    assert events_of(spool) == ["gave_up", "gave_up", "process_flapping", "receiving_refused"]


def test_fsyncs_per_alert(tmp_path: Path, webhook: Any, monkeypatch: pytest.MonkeyPatch,
                          record_property: Any) -> None:
    """Measured, and bounded: writing an alert and delivering it costs a handful of fsyncs."""
    sink = webhook()
    cfg = settings(tmp_path, alerts_toml(hook(sink.url), alert_after="1s"))
    spool = Spool(cfg.spool.path)
    w, s = Watcher(cfg, spool), sender_for(cfg, spool)
    dest_state(spool, "pacs", "backoff", T0, T0)
    count = [0]
    real = os.fsync

    def counting(fd: int) -> None:
        count[0] += 1
        real(fd)
    monkeypatch.setattr(os, "fsync", counting)
    w.tick(T0 + 2)
    written = count[0]
    s.tick(T0 + 2)
    delivered = count[0] - written
    idle = count[0]
    for t in range(3, 23):
        w.tick(T0 + t)
        s.tick(T0 + t)
    assert count[0] == idle, "a tick with nothing new must not fsync"
    record_property("fsyncs_write", written)
    record_property("fsyncs_deliver", delivered)
    print(f"fsyncs per alert: {written} to write it, {delivered} to deliver it")
    assert len(sink.accepted()) == 1
    assert written <= 3 and delivered <= 2


def test_internals_doc_shows_the_alert_shapes() -> None:
    """docs/internals.md "Alerts": its JSON blocks are exactly state/alerts.json's and an
    outbox item's keys."""
    import re

    from hermes_py.alerts.sender import OutboxItem as Item
    from tests.test_internals_doc import DOC, _mismatches
    body = DOC[DOC.index("## Alerts"):]
    body = body[: body.index("\n## ")]
    blocks = re.findall(r"```json\n(.*?)```", body, re.S)
    parsed = [json.loads("\n".join(re.sub(r"\s*//.*$", "", ln) for ln in b.splitlines()))
              for b in blocks]
    assert len(parsed) == 2
    state = dict(parsed[0])
    state["open"] = next(iter(state["open"].values()))   # keyed by condition: one sample
    assert _mismatches(state, AlertsState, "alerts.json") == []
    item = dict(parsed[1])
    item["deliveries"] = next(iter(item["deliveries"].values()))
    item.pop("payload")   # documented in the README, its own shape
    assert _mismatches(item, Item, "outbox item") == ["outbox item: 'payload' in OutboxItem, "
                                                      "not documented"]


def test_a_damaged_item_does_not_stop_the_others_and_idle_passes_read_nothing(
        tmp_path: Path, webhook: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sink = webhook(then=500)
    cfg = settings(tmp_path, alerts_toml(hook(sink.url), retry_min="30s"))
    spool = Spool(cfg.spool.path)
    spool.write_json(spool.alerts.pending / "00000000T000000.000000_x_-_bad.json",
                     {"key": "k", "payload": "not a payload", "deliveries": []})
    dest_state(spool, "pacs", "misconfigured", T0, T0)
    spool.write_json(spool.failover_file("pacs"), {"to": "backup", "mode": "copy",
                                                   "since": now_iso(T0)})
    Watcher(cfg, spool).tick(T0)
    assert len(list(spool.alerts.pending.glob("*.json"))) == 3   # the bad one, two keys
    s = sender_for(cfg, spool)
    assert s.tick(T0) == 1
    assert "cannot send 00000000T000000.000000_x_-_bad.json" in caplog.text
    reads = [0]
    items = spool.alerts.items

    def counted(folder: Path | None = None) -> Any:
        reads[0] += 1
        return items(folder)
    monkeypatch.setattr(s.outbox, "items", counted)
    for t in range(1, 29):
        assert s.tick(T0 + t) == 0
    assert reads[0] == 0, "idle passes read the outbox"
    assert s.tick(T0 + 31) == 1 and reads[0] == 1   # the channel's rest is over
    Watcher(cfg, spool).tick(T0 + 32)               # nothing new: same names
    dest_state(spool, "pacs", "ok", None, T0 + 33)
    Watcher(cfg, spool).tick(T0 + 34)               # a recovery is put: read at once
    s.tick(T0 + 34)
    assert reads[0] == 2


def test_starttls_mail_and_https_webhook_with_a_private_ca(tmp_path: Path) -> None:
    """The realistic relay: STARTTLS, then the login; and an https hook. Both trust only
    ``ca_file`` (a trustme CA), and a certificate it did not sign is refused."""
    import ssl

    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mails: list[Any] = []

    class Sink:
        async def handle_DATA(self, server: object, session: Any,  # noqa: N802
                              envelope: Any) -> str:
            mails.append(envelope)
            return "250 OK"

    smtp = Controller(Sink(), hostname=LOOPBACK, port=free_port(), tls_context=server_ctx,
                      require_starttls=True, auth_require_tls=True,
                      authenticator=lambda *a: AuthResult(success=a[4].password == b"pw",
                                                          handled=False))
    smtp.start()
    sink = WebhookSink()
    sink.server.socket = server_ctx.wrap_socket(sink.server.socket, server_side=True)
    sink.start()
    try:
        pw = tmp_path / "pw"
        pw.write_text("pw")
        chans = {"mail": {"type": "email", "host": "127.0.0.1", "port": smtp.port,
                          "username": "hermes", "password_file": str(pw),
                          "from": "hermes@example.org", "to": ["ops@example.org"],
                          "ca_file": str(ca_file), "timeout": "5s"},
                 "ops": {"type": "webhook", "url": sink.url.replace("http://", "https://"),
                         "ca_file": str(ca_file), "timeout": "5s"}}
        cfg = settings(tmp_path, alerts_toml(chans))
        answers = {c.name: channels.make(c).send(pl.AlertPayload(event="test", id="x"))
                   for c in cfg.alerts.channels}
        assert answers["mail"].ok, answers
        assert answers["ops"] == channels.Answer(True, "HTTP 200 OK"), answers
        assert len(mails) == 1 and sink.posts[0].payload["id"] == "x"
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        cfg = settings(tmp_path / "b", alerts_toml({
            name: {**c, "ca_file": str(other)} for name, c in chans.items()}))
        for c in cfg.alerts.channels:
            bad = channels.make(c).send(pl.AlertPayload(event="test"))
            assert not bad.ok and "CERTIFICATE_VERIFY_FAILED" in bad.text.upper() \
                .replace(" ", "_"), (c.name, bad)
    finally:
        smtp.stop()
        sink.stop()
