"""The web page and /api/v1 (hermes_py.web) through Starlette's TestClient, never bypassing auth.

Each test builds a real spool with the package's own verbs (tests.support.spool.put),
real users in state/web/users.json (argon2 at test-cheap parameters; the CLI test uses
the real ones), and logs in through the login form as a browser does. What is checked
is what the issue asks: every route for every role (401/403/200), CSRF, Origin and
Host checks, logout revoking, hostile values inert, actions equal to the CLI's, paging
by spool name, the event feed, and the dashboard at 100,000 queued within a second.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from argon2 import PasswordHasher  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from hermes_py import supervisor  # noqa: E402
from hermes_py.admin.status import status as status_verb  # noqa: E402
from hermes_py.config import ConfigError, Settings, load  # noqa: E402
from hermes_py.spool import Flag, Spool, new_name  # noqa: E402
from hermes_py.spool.eventlog import EventLog, EventTail  # noqa: E402
from hermes_py.web import users as users_mod  # noqa: E402
from hermes_py.web.app import create_app  # noqa: E402
from hermes_py.web.users import Users  # noqa: E402
from tests.support.cli import run  # noqa: E402
from tests.support.config import pacs_and_ris, toml_table  # noqa: E402
from tests.support.dicomgen import make_instance  # noqa: E402
from tests.support.spool import put, sidecar  # noqa: E402

BASE = "http://127.0.0.1:8080"
ORIGIN = {"Origin": BASE}
PASSWORD = "correct horse battery"
HOSTILE = "<script>alert(1)</script>"
HOSTILE_AE = "<img src=x onerror=alert(2)>"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id still, at parameters a test suite on 2 cores can afford per login."""
    monkeypatch.setattr(users_mod, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024,
                                                            parallelism=1))
    monkeypatch.setattr(users_mod, "_DUMMY", [])


def write_config(folder: Path, **web: object) -> Settings:
    text = pacs_and_ris().render() + "\n" + toml_table("web", {"port": 8080, **web})
    (folder / "rules.toml").write_text(text)
    cfg = load(folder / "rules.toml")
    Spool(cfg.spool.path).ensure(list(cfg.destinations))
    return cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    cfg = write_config(tmp_path)
    users = Users(Spool(cfg.spool.path))
    users.add("ada", "admin", PASSWORD)
    users.add("vic", "viewer", PASSWORD)
    return cfg


@pytest.fixture
def client(cfg: Settings) -> Iterator[Callable[[], TestClient]]:
    """New browsers (each its own cookie jar) on one app, as several people would be."""
    app = create_app(cfg)
    made: list[TestClient] = []

    def make() -> TestClient:
        c = TestClient(app, base_url=BASE, follow_redirects=False)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def login(c: TestClient, name: str, password: str = PASSWORD) -> Any:
    page = c.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token, page.text
    return c.post("/login", data={"username": name, "password": password,
                                  "login_token": token.group(1), "next": "/"}, headers=ORIGIN)


def session(make: Callable[[], TestClient], name: str) -> tuple[TestClient, str]:
    """A logged-in browser and its CSRF token (read from a page, as a form has it)."""
    c = make()
    assert login(c, name).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/").text)
    assert csrf
    return c, csrf.group(1)


def bearer(cfg: Settings, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {Users(Spool(cfg.spool.path)).new_token(name)}"}


# ---------------------------------------------------------------- [web] in rules.toml


def test_web_section_defaults_and_refusals(tmp_path: Path) -> None:
    base = pacs_and_ris().render()
    (tmp_path / "rules.toml").write_text(base)
    off = load(tmp_path / "rules.toml")
    assert off.web.port is None and off.web.bind == "127.0.0.1"
    assert "web" not in supervisor.Supervisor._wanted(supervisor.Supervisor.__new__(
        supervisor.Supervisor), off)
    on = write_config(tmp_path)
    assert on.web.port == 8080 and "web" in supervisor.Supervisor._wanted(
        supervisor.Supervisor.__new__(supervisor.Supervisor), on)
    assert {"127.0.0.1", "localhost"} <= set(on.web.allowed_hosts())

    def refused(extra: str) -> str:
        (tmp_path / "rules.toml").write_text(base + "\n[web]\n" + extra)
        with pytest.raises(ConfigError) as e:
            load(tmp_path / "rules.toml")
        return str(e.value)
    err = refused('port = 8080\nbind = "0.0.0.0"\n')
    assert "web.bind" in err and "allow_plain_http" in err and re.search(r"rules.toml:\d+:", err)
    assert "tls_key_file" in refused('port = 8080\ntls_cert_file = "c.pem"\n')
    assert "did you mean 'port'" in refused("prot = 8080\n")
    assert "1-65535" in refused("port = 0\n")
    (tmp_path / "rules.toml").write_text(
        base + '\n[web]\nport = 8080\nbind = "0.0.0.0"\nallow_plain_http = true\n'
               'hosts = ["router.example"]\nsession_idle_timeout = "15m"\n')
    ok = load(tmp_path / "rules.toml")
    assert "router.example" in ok.web.allowed_hosts() and ok.web.session_idle_timeout == 900


# ---------------------------------------------------------------- login, sessions


def test_login_page_names_the_command_for_the_first_admin(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with TestClient(create_app(cfg), base_url=BASE, follow_redirects=False) as c:
        r = c.get("/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        page = c.get("/login").text
        assert "hermes-py user add NAME --role admin" in page and str(cfg.path) in page
        assert login(c, "admin", "admin").status_code == 401  # no default user


def test_logout_revokes_the_session(client: Callable[[], TestClient]) -> None:
    c, csrf = session(client, "ada")
    cookie = c.cookies.get("hermes_session")
    assert c.get("/api/v1/status").status_code == 200
    assert c.post("/logout", data={"csrf": csrf}, headers=ORIGIN).status_code == 303
    thief = client()
    thief.cookies.set("hermes_session", str(cookie))
    assert thief.get("/api/v1/status").status_code == 401
    assert thief.get("/").headers["location"].startswith("/login")


def test_password_change_and_deletion_end_sessions(cfg: Settings,
                                                   client: Callable[[], TestClient]) -> None:
    a, _ = session(client, "ada")
    v, _ = session(client, "vic")
    users = Users(Spool(cfg.spool.path))
    users.passwd("ada", "another password")
    users.delete("vic")
    assert a.get("/api/v1/status").status_code == 401
    assert v.get("/api/v1/status").status_code == 401


def test_idle_session_expires(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, session_idle_timeout="1s")
    Users(Spool(cfg.spool.path)).add("ada", "admin", PASSWORD)
    with TestClient(create_app(cfg), base_url=BASE, follow_redirects=False) as c:
        login(c, "ada")
        assert c.get("/api/v1/status").status_code == 200
        time.sleep(1.2)
        assert c.get("/api/v1/status").status_code == 401


def test_login_is_rate_limited(client: Callable[[], TestClient]) -> None:
    c = client()
    for _ in range(5):
        assert login(c, "ada", "wrong password!").status_code == 401
    r = login(c, "ada")
    assert r.status_code == 429 and "Too many failed logins" in r.text


def test_login_form_needs_its_token_and_our_origin(client: Callable[[], TestClient]) -> None:
    c = client()
    c.get("/login")
    r = c.post("/login", data={"username": "ada", "password": PASSWORD, "login_token": "x"},
               headers=ORIGIN)
    assert r.status_code == 403 and "hermes_session" not in c.cookies
    page = c.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', page)
    assert token
    r = c.post("/login", data={"username": "ada", "password": PASSWORD,
                               "login_token": token.group(1)},
               headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


# ---------------------------------------------------------------- every route, every role

GETS = ["/api/v1/status", "/api/v1/destinations/pacs", "/api/v1/destinations/pacs/instances",
        "/api/v1/destinations/pacs/instances?in=error", "/api/v1/find?uid=1.2.3",
        "/api/v1/events?follow=0"]
PAGES = ["/", "/destinations/pacs", "/destinations/pacs?in=success", "/errors", "/events",
         "/find?uid=1.2.3"]
POSTS = [f"/api/v1/destinations/pacs/{v}" for v in ("hold", "release", "flush", "retry")]


def test_every_route_for_every_role(cfg: Settings, client: Callable[[], TestClient]) -> None:
    dcm = put(cfg, dest="pacs")
    name = dcm.stem
    gets = [*GETS, f"/api/v1/instances/{name}"]
    pages = [*PAGES, f"/instances/{name}"]
    anon = client()
    for path in gets:
        r = anon.get(path)
        assert r.status_code == 401, path
        assert set(r.json()) == {"error", "detail"}, path
    for path in pages:
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    for path in [*POSTS, "/api/v1/purge"]:
        assert anon.post(path, json={}).status_code == 401, path
    viewer, admin = bearer(cfg, "vic"), bearer(cfg, "ada")
    for path in gets:
        assert anon.get(path, headers=viewer).status_code == 200, path
    for path in [*POSTS, "/api/v1/destinations/pacs/echo"]:
        r = anon.post(path, headers=viewer)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", path
    assert anon.post("/api/v1/purge", headers=viewer,
                     json={"expect_count": 0}).status_code == 403
    for path in POSTS:
        r = anon.post(path, headers=admin)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["by"] == "web:ada"
    assert anon.post("/api/v1/purge", headers=admin,
                     json={"destination": "pacs", "all": True,
                           "expect_count": 0}).status_code == 200
    assert anon.get("/api/v1/destinations/nope", headers=viewer).status_code == 404
    assert anon.post("/api/v1/destinations/nope/hold", headers=admin).status_code == 404
    assert anon.get("/api/v1/instances/nope", headers=viewer).status_code == 404
    assert anon.get("/api/v1/openapi.json").json()["openapi"].startswith("3.")
    # the pages, with a viewer's and an admin's session
    v, vcsrf = session(client, "vic")
    for path in pages:
        assert v.get(path).status_code == 200, path
    page = v.get("/").text
    assert 'data-verb="hold"' not in page  # a viewer sees no buttons ...
    r = v.post("/destinations/pacs/hold", data={"csrf": vcsrf}, headers=ORIGIN)
    assert r.status_code == 403  # ... and the server refuses the form anyway
    r = v.post("/purge", data={"csrf": vcsrf, "expect_count": "0"}, headers=ORIGIN)
    assert r.status_code == 403
    a, acsrf = session(client, "ada")
    for path in pages:
        assert a.get(path).status_code == 200, path
    assert 'data-verb="hold"' in a.get("/").text


# ---------------------------------------------------------------- CSRF, Origin, Host


def test_a_cookie_post_needs_the_csrf_token_and_our_origin(
        cfg: Settings, client: Callable[[], TestClient]) -> None:
    spool = Spool(cfg.spool.path)
    a, csrf = session(client, "ada")
    assert a.post("/destinations/pacs/hold", data={}, headers=ORIGIN).status_code == 403
    assert a.post("/destinations/pacs/hold", data={"csrf": "forged"},
                  headers=ORIGIN).status_code == 403
    assert a.post("/api/v1/destinations/pacs/hold").status_code == 403  # cookie, no header
    assert a.post("/destinations/pacs/hold", data={"csrf": csrf},
                  headers={"Origin": "http://evil.example"}).status_code == 403
    assert a.post("/destinations/pacs/hold", data={"csrf": csrf},
                  headers={"Origin": "null"}).status_code == 403
    assert not spool.has_flag("pacs", Flag.HOLD)
    r = a.post("/destinations/pacs/hold", data={"csrf": csrf, "next": "//evil.example/"},
               headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/"  # never off-site
    assert spool.read_json(spool.flag("pacs", Flag.HOLD))["by"] == "web:ada"
    assert "pacs: done" in a.get("/").text or "hold pacs" in a.get("/").text
    r = a.post("/api/v1/destinations/pacs/release", headers={"X-CSRF-Token": csrf, **ORIGIN})
    assert r.status_code == 200 and not spool.has_flag("pacs", Flag.HOLD)
    # a bearer token needs no CSRF token: no browser attaches it by itself
    anon = client()
    assert anon.post("/api/v1/destinations/pacs/hold",
                     headers=bearer(cfg, "ada")).status_code == 200


def test_host_header_is_checked(cfg: Settings, client: Callable[[], TestClient]) -> None:
    c = client()
    assert c.get("/login", headers={"Host": "evil.example"}).status_code == 400
    assert c.get("/login", headers={"Host": "evil.example:8080"}).status_code == 400
    assert c.get("/login", headers={"Host": "localhost:8080"}).status_code == 200
    assert c.get("/api/v1/status", headers={"Host": "rebind.attacker", **bearer(cfg, "vic")}
                 ).status_code == 400


def test_security_headers(client: Callable[[], TestClient]) -> None:
    r = client().get("/login")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "same-origin"
    cookie = login(client(), "ada").headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")


# ---------------------------------------------------------------- hostile values


def test_hostile_values_are_shown_inert(cfg: Settings, client: Callable[[], TestClient]) -> None:
    spool = Spool(cfg.spool.path)
    ds = make_instance(8, 8, study_description=HOSTILE, patient_id=HOSTILE)
    ds.PatientName = HOSTILE
    err = put(cfg, spool.error_dir("pacs"), ds, dest="pacs", calling_ae=HOSTILE_AE,
              error={"stage": "dispatch", "reason": f"0xC000 {HOSTILE}",
                     "at": "2026-01-01T00:00:00Z", "destination": "pacs"},
              last_error={"at": "2026-01-01T00:00:00Z", "class": "permanent",
                          "status": "0xC000", "reason": "=HYPERLINK(\"http://x\")"})
    spool.write_json(spool.state_file("pacs"), {
        "destination": "pacs", "state": "backoff", "backoff_until": time.time() + 60,
        "last_error": {"at": "2026-01-01T00:00:00Z", "kind": "connection refused",
                       "detail": HOSTILE}, "updated_at": "2099-01-01T00:00:00Z"})
    a, _ = session(client, "ada")
    for path in ["/", "/errors", "/destinations/pacs?in=error", f"/instances/{err.stem}",
                 f"/find?uid={ds.SOPInstanceUID}"]:
        body = a.get(path).text
        assert "<script>alert" not in body and "<img src=x" not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in a.get("/").text  # shown, escaped
    assert "&lt;img src=x onerror" in a.get(f"/instances/{err.stem}").text
    assert "PatientName" not in a.get(f"/instances/{err.stem}").text
    csv_text = a.get("/api/v1/destinations/pacs/instances?in=error&format=csv").text
    assert "'=HYPERLINK" not in csv_text  # the error reason wins; it starts with 0xC000
    assert HOSTILE_AE in csv_text  # CSV is data, not HTML: only formulas are neutralised
    put(cfg, spool.error_dir("pacs"), dest="pacs", calling_ae="=cmd|'/c calc'!A1")
    csv_text = a.get("/api/v1/destinations/pacs/instances?in=error&format=csv").text
    assert "'=cmd|" in csv_text and ",=cmd" not in csv_text


# ---------------------------------------------------------------- actions = the CLI's


def test_actions_do_what_the_cli_does(cfg: Settings, client: Callable[[], TestClient]) -> None:
    spool = Spool(cfg.spool.path)
    admin = bearer(cfg, "ada")
    c = client()
    assert c.post("/api/v1/destinations/pacs/hold", headers=admin).status_code == 200
    assert "HELD" in status_verb(cfg).text()
    failed = [put(cfg, spool.error_dir("pacs"), dest="pacs",
                  error={"stage": "dispatch", "reason": "0xC000 nope", "at": "x",
                         "destination": "pacs"}) for _ in range(3)]
    r = c.post("/api/v1/destinations/pacs/retry", headers=admin)
    assert r.json()["result"]["destinations"][0]["moved"] == 3
    back = spool.outbox("pacs") / failed[0].name
    assert sidecar(back)["history"][-1]["by"] == "web:ada"
    for _ in range(2):
        put(cfg, spool.error_dir("ris"), dest="ris")
    body = {"destination": "ris", "all": True, "expect_count": 5}
    r = c.post("/api/v1/purge", headers=admin, json=body)
    assert r.status_code == 409 and r.json()["count"] == 2
    assert len(list(spool.error_dir("ris").glob("*.dcm"))) == 2
    assert c.post("/api/v1/purge", headers=admin,
                  json={"destination": "ris", "all": True}).status_code == 400
    r = c.post("/api/v1/purge", headers=admin, json={**body, "expect_count": 2})
    assert r.status_code == 200 and len(r.json()["result"]["instances"]) == 2
    assert not list(spool.error_dir("ris").glob("*.dcm"))
    r = c.post("/api/v1/destinations/pacs/echo", headers=admin)
    assert r.status_code == 200 and r.json()["result"]["answers"][0]["probe"]["ok"] is False
    # the page's purge: the count typed must be the count listed
    a, csrf = session(client, "ada")
    put(cfg, spool.error_dir("ris"), dest="ris")
    a.post("/purge", data={"csrf": csrf, "destination": "ris", "expect_count": "7"},
           headers=ORIGIN)
    assert len(list(spool.error_dir("ris").glob("*.dcm"))) == 1
    assert "not 7: nothing deleted" in a.get("/errors").text
    a.post("/purge", data={"csrf": csrf, "destination": "ris", "expect_count": "1"},
           headers=ORIGIN)
    assert not list(spool.error_dir("ris").glob("*.dcm"))


# ---------------------------------------------------------------- paging, instances, find


def test_queue_pages_by_spool_name(cfg: Settings, client: Callable[[], TestClient]) -> None:
    made = sorted(put(cfg, dest="pacs", received=time.time() - 100 + i).stem for i in range(7))
    viewer = bearer(cfg, "vic")
    c = client()
    seen: list[str] = []
    after = ""
    while True:
        r = c.get(f"/api/v1/destinations/pacs/instances?limit=3&after={after}", headers=viewer)
        page = r.json()
        assert page["total"] == 7
        seen += [i["name"] for i in page["instances"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == made
    one = c.get(f"/api/v1/instances/{made[0]}", headers=viewer).json()
    assert one["copies"][0]["folder"] == "outgoing/pacs"
    sop = one["copies"][0]["sidecar"]["sop_instance_uid"]
    cli = json.loads(run("find", sop, "--json", "-c", cfg.path).stdout)
    assert c.get(f"/api/v1/find?uid={sop}", headers=viewer).json() == cli
    assert c.get("/api/v1/status", headers=viewer).json()["destinations"]["pacs"]["queued"] == 7
    assert c.get("/api/v1/destinations/pacs/instances?in=elsewhere",
                 headers=viewer).status_code == 400
    a, _ = session(client, "vic")
    html = a.get("/destinations/pacs?limit=3").text
    assert made[0] in html and made[3] not in html and 'id="next"' in html


# ---------------------------------------------------------------- events


def test_event_feed_from_the_ring_file(cfg: Settings, client: Callable[[], TestClient]) -> None:
    spool = Spool(cfg.spool.path)
    log = EventLog(spool.events_log)
    for i in range(3):
        log.append({"event": "sent", "sop_instance_uid": f"1.2.{i}", "destination": "pacs"})
    log.append({"event": "routed", "sop_instance_uid": "1.2.9", "destination": "ris"})
    c = client()
    viewer = bearer(cfg, "vic")
    r = c.get("/api/v1/events?follow=0&since=0", headers=viewer)
    assert r.headers["content-type"].startswith("text/event-stream")
    ids = re.findall(r"^id: (\d+)$", r.text, re.M)
    assert ids == ["1", "2", "3", "4"]
    r = c.get("/api/v1/events?follow=0&since=2&destination=pacs", headers=viewer)
    recs = [json.loads(x) for x in re.findall(r"^data: (.+)$", r.text, re.M)]
    assert [x["sop_instance_uid"] for x in recs] == ["1.2.2"]
    log.close()
    assert EventLog(spool.events_log)._seq == 4  # seq goes on across serve restarts


def test_event_ring_is_bounded_and_tail_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2000)
    tail = EventTail(path)
    got: list[int] = []
    for i in range(100):
        log.append({"event": "sent", "sop_instance_uid": f"1.{i}", "pad": "x" * 40})
        if i % 7 == 0:
            got += [r["seq"] for r in tail.poll()]
    got += [r["seq"] for r in tail.poll()]
    assert got == list(range(1, 101))
    line = 200  # rotation happens after the line that crossed the bound
    assert path.stat().st_size <= 2000 + line
    assert (tmp_path / "events.jsonl.1").stat().st_size <= 2000 + line


# ---------------------------------------------------------------- users CLI (real argon2)


def test_user_commands(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    c = ["-c", str(cfg.path)]
    r = run("user", "add", "root", "--role", "admin", *c, input="short\n")
    assert r.returncode == 2 and "at least 8" in r.stderr
    assert run("user", "add", "root", "--role", "admin", *c, input=PASSWORD + "\n"
               ).returncode == 0
    assert run("user", "add", "root", "--role", "viewer", *c, input=PASSWORD + "\n"
               ).returncode == 2
    token = run("user", "token", "root", *c).stdout.strip()
    assert token.startswith("hpy_")
    stored = (cfg.spool.path / "state" / "web" / "users.json").read_text()
    assert token not in stored and PASSWORD not in stored and "$argon2id$" in stored
    assert oct(os.stat(cfg.spool.path / "state" / "web").st_mode & 0o777) == "0o700"
    assert "root" in run("user", "list", *c).stdout
    with TestClient(create_app(load(cfg.path)), base_url=BASE) as web:
        auth = {"Authorization": f"Bearer {token}"}
        assert web.get("/api/v1/status", headers=auth).status_code == 200
        assert run("user", "del", "root", *c).returncode == 0
        assert web.get("/api/v1/status", headers=auth).status_code == 401
    assert run("user", "passwd", "nobody", *c, input=PASSWORD + "\n").returncode == 2


# ---------------------------------------------------------------- cost at 100,000 queued

N_BIG = 100_000


def _fill(folder: Path, n: int) -> None:
    """n empty instance pairs with real spool names: enough for counting, made in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = new_name("1.2.826.0.1.3680043.2.1125.1", when=time.time() - 3600)
    head = stem[: stem.rindex("_")]
    flags = os.O_CREAT | os.O_WRONLY
    for i in range(n):
        base = f"{folder}/{head}_{i:08x}"
        os.close(os.open(base + ".json", flags))
        os.close(os.open(base + ".dcm", flags))


def test_dashboard_at_100000_queued_within_a_second(cfg: Settings,
                                                    client: Callable[[], TestClient],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(cfg.spool.path)
    t0 = time.perf_counter()
    _fill(spool.outbox("pacs"), N_BIG)
    took_fill = time.perf_counter() - t0
    c, _ = session(client, "vic")
    c.get("/errors")  # templates compiled once, as in a running child
    c.app.state.web.forget_status()  # type: ignore[attr-defined]
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *a, **kw)
    monkeypatch.setattr(builtins, "open", counting_open)
    t0 = time.perf_counter()
    r = c.get("/")  # the snapshot is not cached yet: a full listing and one stat each
    took = time.perf_counter() - t0
    assert r.status_code == 200 and f">{N_BIG}<" in r.text
    sidecars = [f for f in opened if str(spool.outbox("pacs")) in f]
    assert sidecars == [], sidecars[:3]  # counts come from listings, not sidecars
    t0 = time.perf_counter()
    r = c.get("/destinations/pacs?limit=50")
    took_page = time.perf_counter() - t0
    assert r.status_code == 200
    assert len([f for f in opened if str(spool.outbox("pacs")) in f]) == 50
    print(f"\n{N_BIG} pairs made in {took_fill:.1f}s; dashboard at {N_BIG} queued: "
          f"{took * 1000:.0f} ms; queue page of 50: {took_page * 1000:.0f} ms")
    assert took < 1.0, f"dashboard took {took:.2f}s at {N_BIG} queued"
