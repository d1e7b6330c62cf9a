"""The web child's own rules through Starlette's TestClient, never bypassing auth: ``[web]``
in rules.toml, login and sessions, CSRF, Origin and Host checks, security headers, the
``hermes-py user`` commands (real argon2id). The route x role matrix is in
tests/web/test_routes.py; pages, actions, hostile values and cost in tests/web/test_pages.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient  # noqa: E402

from hermes_py import supervisor  # noqa: E402
from hermes_py.config import ConfigError, Settings, load  # noqa: E402
from hermes_py.spool import Flag, Spool  # noqa: E402
from hermes_py.web.app import create_app  # noqa: E402
from hermes_py.web.users import Users  # noqa: E402
from tests.support.cli import run  # noqa: E402
from tests.support.config import pacs_and_ris  # noqa: E402
from tests.support.web import (  # noqa: E402
    BASE,
    ORIGIN,
    PASSWORD,
    Browsers,
    bearer,
    login,
    session,
    write_config,
)

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
               'hosts = ["router.example"]\nsession_idle_timeout = "15m"\n'
               'show_patient = true\n')
    ok = load(tmp_path / "rules.toml")
    assert "router.example" in ok.web.allowed_hosts() and ok.web.session_idle_timeout == 900
    assert ok.web.show_patient and not on.web.show_patient
    assert "web.show_patient" in refused('port = 8080\nshow_patient = "yes"\n')


# ---------------------------------------------------------------- login, sessions


def test_login_page_names_the_command_for_the_first_admin(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with TestClient(create_app(cfg), base_url=BASE, follow_redirects=False) as c:
        r = c.get("/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        page = c.get("/login").text
        assert "hermes-py user add NAME --role admin" in page and str(cfg.path) in page
        assert login(c, "admin", "admin").status_code == 401  # no default user


def test_logout_revokes_the_session(client: Browsers) -> None:
    c, csrf = session(client, "ada")
    cookie = c.cookies.get("hermes_session")
    assert c.get("/api/v1/status").status_code == 200
    assert c.post("/logout", data={"csrf": csrf}, headers=ORIGIN).status_code == 303
    thief = client()
    thief.cookies.set("hermes_session", str(cookie))
    assert thief.get("/api/v1/status").status_code == 401
    assert thief.get("/").headers["location"].startswith("/login")


def test_password_change_and_deletion_end_sessions(cfg: Settings,
                                                   client: Browsers) -> None:
    a, _ = session(client, "ada")
    v, _ = session(client, "vic")
    users = Users(Spool(cfg.spool.path))
    users.passwd("ada", "another password")
    users.delete("vic")
    assert a.get("/api/v1/status").status_code == 401
    assert v.get("/api/v1/status").status_code == 401


def test_idle_session_expires(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, session_idle_timeout="10m")
    Users(Spool(cfg.spool.path)).add("ada", "admin", PASSWORD)
    app = create_app(cfg)
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        login(c, "ada")
        s = app.state.web.sessions._by_id[c.cookies["hermes_session"]]
        s.seen -= 9 * 60  # used 9 minutes ago: still on, and now used again
        assert c.get("/api/v1/status").status_code == 200
        s.seen -= 10 * 60 + 1  # left alone past the idle timeout
        assert c.get("/api/v1/status").status_code == 401
        login(c, "ada")
        app.state.web.sessions._by_id[c.cookies["hermes_session"]].created -= 12 * 3600 + 1
        assert c.get("/api/v1/status").status_code == 401  # the absolute lifetime


def test_login_is_rate_limited(client: Browsers) -> None:
    c = client()
    for _ in range(5):
        assert login(c, "ada", "wrong password!").status_code == 401
    r = login(c, "ada")
    assert r.status_code == 429 and "Too many failed logins" in r.text


def test_login_form_needs_its_token_and_our_origin(client: Browsers) -> None:
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


# ---------------------------------------------------------------- CSRF, Origin, Host


def test_a_cookie_post_needs_the_csrf_token_and_our_origin(
        cfg: Settings, client: Browsers) -> None:
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


def test_host_header_is_checked(cfg: Settings, client: Browsers) -> None:
    c = client()
    assert c.get("/login", headers={"Host": "evil.example"}).status_code == 400
    assert c.get("/login", headers={"Host": "evil.example:8080"}).status_code == 400
    assert c.get("/login", headers={"Host": "localhost:8080"}).status_code == 200
    assert c.get("/api/v1/status", headers={"Host": "rebind.attacker", **bearer(cfg, "vic")}
                 ).status_code == 400


def test_security_headers(client: Browsers) -> None:
    r = client().get("/login")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "same-origin"
    cookie = login(client(), "ada").headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")


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


def test_the_shipped_rules_toml_turns_the_page_on_at_loopback_8080(tmp_path: Path) -> None:
    repo = Path(__file__).parent.parent.parent
    shipped = (repo / "rules.toml").read_text()
    (tmp_path / "rules.toml").write_text(shipped)
    web = load(tmp_path / "rules.toml").web
    assert (web.bind, web.port, web.tls, web.allow_plain_http) == ("127.0.0.1", 8080, False,
                                                                   False)
    assert "hermes-py user add NAME --role admin" in shipped
    make = (repo / "Makefile").read_text()
    assert re.search(r"\$\(VENV\)/\.installed:.*\n\t\$\(BIN\)/pip install .*\[[^]]*web", make)
    assert re.search(r"^run: \$\(VENV\)/\.installed$", make, re.M)
