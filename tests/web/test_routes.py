"""Every route of the web app, for every role: 401 (or the login page), 403, 200.

The table ``WHO`` names each route with who may call it; the test reads the routes from
the app itself, so a route added without an entry here fails
``test_every_route_has_a_role`` (hiding a button is not authorization: dcm4chee
discussion #4124; Hermes' and mercure's holes were routes nobody checked). The same
run checks that openapi.json lists exactly the /api/v1 routes and every answer they
gave, and that every API error is ``{"error", "detail"}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

pytest.importorskip("starlette")

from starlette.routing import Mount, Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from hermes_py.config import Settings  # noqa: E402
from hermes_py.spool import Spool  # noqa: E402
from hermes_py.web.app import create_app  # noqa: E402
from tests.support.spool import put  # noqa: E402
from tests.support.web import (  # noqa: E402
    ORIGIN,
    WEB_PACKAGE,
    Browsers,
    bearer,
    session,
)

OPENAPI = WEB_PACKAGE / "static" / "openapi.json"

# Who may call each route: "public" (anyone), "read" (viewer and admin), "act" (admin).
WHO: dict[tuple[str, str], str] = {
    ("GET", "/static"): "public",
    ("GET", "/login"): "public",
    ("POST", "/login"): "public",
    ("GET", "/api/v1/openapi.json"): "public",
    ("GET", "/api/v1/status"): "read",
    ("GET", "/api/v1/destinations/{name}"): "read",
    ("GET", "/api/v1/destinations/{name}/instances"): "read",
    ("GET", "/api/v1/instances/{name}"): "read",
    ("GET", "/api/v1/instances/{name}/rules"): "read",
    ("GET", "/api/v1/find"): "read",
    ("GET", "/api/v1/events"): "read",
    ("POST", "/api/v1/destinations/{name}/hold"): "act",
    ("POST", "/api/v1/destinations/{name}/release"): "act",
    ("POST", "/api/v1/destinations/{name}/flush"): "act",
    ("POST", "/api/v1/destinations/{name}/echo"): "act",
    ("POST", "/api/v1/destinations/{name}/retry"): "act",
    ("POST", "/api/v1/destinations/{name}/resend"): "act",
    ("POST", "/api/v1/purge"): "act",
    ("GET", "/"): "read",
    ("GET", "/destinations/{name}"): "read",
    ("GET", "/instances/{name}"): "read",
    ("GET", "/instances/{name}/rules"): "read",
    ("GET", "/find"): "read",
    ("GET", "/errors"): "read",
    ("GET", "/events"): "read",
    ("POST", "/logout"): "read",
    ("POST", "/destinations/{name}/hold"): "act",
    ("POST", "/destinations/{name}/release"): "act",
    ("POST", "/destinations/{name}/flush"): "act",
    ("POST", "/destinations/{name}/echo"): "act",
    ("POST", "/destinations/{name}/retry"): "act",
    ("POST", "/destinations/{name}/resend"): "act",
    ("POST", "/purge"): "act",
}
QUERY = {"/api/v1/find": "?uid=1.2.3", "/find": "?uid=1.2.3", "/api/v1/events": "?follow=0"}


def app_routes(app: Any) -> set[tuple[str, str]]:
    out = set()
    for r in app.routes:
        if isinstance(r, Mount):
            out.add(("GET", r.path))
        elif isinstance(r, Route):
            out |= {(m, r.path) for m in (r.methods or ()) if m != "HEAD"}
    return out


def test_every_route_has_a_role(cfg: Settings) -> None:
    routes = app_routes(create_app(cfg))
    missing = routes - set(WHO)
    assert not missing, f"routes with no entry in WHO (say who may call them): {missing}"
    assert not set(WHO) - routes, "WHO names routes the app no longer has"


class Call:
    """One route made concrete: its URL and, for a POST, what a client would send."""

    def __init__(self, method: str, template: str, instance: str):
        self.method, self.template = method, template
        dest = "ris" if template.endswith("/resend") else "pacs"
        path = template.replace("/destinations/{name}", f"/destinations/{dest}")
        self.path = path.replace("/instances/{name}", f"/instances/{instance}")
        self.url = ("/static/app.js" if template == "/static" else self.path
                    + QUERY.get(template, ""))
        self.api = template.startswith("/api/")
        self.body: dict[str, Any] = {}
        if template.endswith("/resend"):
            self.body = {"names": [instance]}
        if template.endswith("/purge"):
            self.body = {"destination": "pacs", "all": True, "expect_count": 0}

    def send(self, c: TestClient, headers: dict[str, str] | None = None,
             csrf: str | None = None) -> Any:
        if self.method == "GET":
            return c.get(self.url, headers=headers)
        if self.api:
            return c.post(self.url, json=self.body, headers={
                **({"X-CSRF-Token": csrf, **ORIGIN} if csrf else {}), **(headers or {})})
        form = {"csrf": csrf or "", "next": "/", **{
            k: (v[0] if isinstance(v, list) else str(v)) for k, v in self.body.items()}}
        if self.template.endswith("/resend"):
            form["name"] = form.pop("names")
        return c.post(self.url, data=form, headers={**ORIGIN, **(headers or {})})


def _error_shape(r: Any, call: Call) -> None:
    if call.api and r.status_code >= 400:
        assert set(r.json()) >= {"error", "detail"}, (call.url, r.text)


def test_every_route_for_every_role(cfg: Settings, client: Browsers) -> None:
    """Anonymous, viewer and admin, by bearer token (API) and by session (pages and API)."""
    instance = put(cfg, dest="pacs").stem
    calls = [Call(m, t, instance) for (m, t) in sorted(WHO) if WHO[(m, t)] != "public"
             or m == "GET"]
    seen: dict[tuple[str, str], set[int]] = {}
    tokens = {"vic": bearer(cfg, "vic"), "ada": bearer(cfg, "ada")}
    anon = client()
    for call in calls:
        if call.template == "/logout":
            continue  # below, once every other call is done with the sessions
        need = WHO[(call.method, call.template)]
        r = call.send(anon)
        if need == "public":
            assert r.status_code == 200, call.url
        elif call.api:
            assert r.status_code == 401, call.url
        else:
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), call.url
        _error_shape(r, call)
        seen.setdefault((call.method, call.template), set()).add(r.status_code)
        for who, allowed in (("vic", need != "act"), ("ada", True)):
            ok = 303 if call.method == "POST" and not call.api else 200
            s, csrf = session(client, who)
            if call.method == "POST" and allowed:  # a session's POST: its token, our Origin
                for forged in (call.send(s, csrf="forged"),
                               call.send(s, headers={"Origin": "http://evil.example"},
                                         csrf=csrf)):
                    assert forged.status_code == 403, (who, call.url, forged.text[:200])
            by_session = call.send(s, csrf=csrf if call.method == "POST" else None)
            by_token = call.send(anon, headers=tokens[who]) if call.api else by_session
            for r in (by_session, by_token):
                want = ok if allowed else 403
                assert r.status_code == want, (who, call.method, call.url, r.text[:300])
                _error_shape(r, call)
                seen[(call.method, call.template)].add(r.status_code)
            if call.api and call.method == "POST" and allowed:
                assert by_token.json()["by"] == f"web:{who}", call.url
    for who in ("vic", "ada"):
        s, csrf = session(client, who)
        r = s.post("/logout", data={"csrf": csrf}, headers=ORIGIN)
        assert r.status_code == 303 and s.get("/").headers["location"].startswith("/login")
    assert anon.post("/logout", data={}).headers["location"].startswith("/login")
    # what the API answered, openapi.json must describe
    spec = json.loads(OPENAPI.read_text())
    for (method, template), statuses in seen.items():
        if template.startswith("/api/v1/"):
            op = spec["paths"][_spec_path(template)][method.lower()]
            undocumented = {str(s) for s in statuses} - set(op["responses"])
            assert not undocumented, (template, undocumented)


def _spec_path(template: str) -> str:
    path = template.removeprefix("/api/v1")
    return re.sub(r"^/destinations/\{name\}", "/destinations/{d}", path)


def test_openapi_lists_exactly_the_api_routes(cfg: Settings, client: Browsers) -> None:
    spec = json.loads(OPENAPI.read_text())
    assert spec["openapi"].startswith("3.") and spec["servers"] == [{"url": "/api/v1"}]
    api = {(m.lower(), _spec_path(t)) for (m, t) in app_routes(create_app(cfg))
           if t.startswith("/api/v1/")}
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert api == documented
    for (m, p) in documented:
        op = spec["paths"][p][m]
        params = {x["name"] for x in op.get("parameters", []) if x["in"] == "path"}
        assert params == set(re.findall(r"\{(\w+)\}", p)), p
        if p != "/openapi.json":
            assert {"401", "403"} <= set(op["responses"]), p
    for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', OPENAPI.read_text()):
        assert ref in spec["components"]["schemas"]
    # the file served is the file checked, and without credentials (scripts read it first)
    assert client().get("/api/v1/openapi.json").json() == spec
    # the documented required keys are in real answers
    c, h = client(), bearer(cfg, "vic")
    put(cfg, dest="pacs")
    for path, schema in (("/status", "Snapshot"),):
        body = c.get("/api/v1" + path, headers=h).json()
        assert set(spec["components"]["schemas"][schema]["required"]) <= set(body)
    err = c.get("/api/v1/destinations/nope", headers=h)
    assert err.status_code == 404 and set(err.json()) == {"error", "detail"}
    for bad in ("/api/v1/destinations/pacs/instances?limit=x",
                "/api/v1/destinations/pacs/instances?in=elsewhere", "/api/v1/find"):
        r = c.get(bad, headers=h)
        assert r.status_code == 400 and set(r.json()) == {"error", "detail"}, bad
    assert c.get("/api/v1/nothing", headers=h).json()["error"] == "http"
    assert Spool(cfg.spool.path).root.is_dir()


def test_a_cookie_session_may_use_the_api_with_its_csrf_header(cfg: Settings,
                                                               client: Browsers) -> None:
    s, csrf = session(client, "ada")
    assert s.get("/api/v1/status").status_code == 200
    assert s.post("/api/v1/destinations/pacs/hold").status_code == 403
    r = s.post("/api/v1/destinations/pacs/hold", headers={"X-CSRF-Token": csrf, **ORIGIN})
    assert r.status_code == 200 and r.json()["by"] == "web:ada"


def test_every_post_form_carries_the_csrf_token() -> None:
    """Each ``<form method="post">`` in the templates sends the session's token (the login
    form its own login token: there is no session yet)."""
    templates = WEB_PACKAGE / "templates"
    forms = 0
    for t in templates.glob("*.html"):
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", t.read_text(), re.S):
            forms += 1
            token = 'name="login_token"' if t.name == "login.html" else 'name="csrf"'
            assert token in form, (t.name, form[:120])
    assert forms >= 5
