"""What the web tests share: a spool with two users, browsers on one app, logging in as a
browser does (the login form, its token, our Origin), and API tokens.

Nothing here bypasses authentication: a session is made by posting the login form,
a token by ``Users.new_token`` exactly as ``hermes-py user token`` makes one. The only
shortcut is argon2id at test-cheap parameters (``cheap_argon2``); the CLI test in
tests/web/test_web.py runs the real ones. tests/web/conftest.py makes the fixtures of
every web test from these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from starlette.testclient import TestClient

import hermes_py.web
from hermes_py.config import Settings, load
from hermes_py.spool import Spool
from hermes_py.web import users as users_mod
from hermes_py.web.app import create_app
from hermes_py.web.users import Users
from tests.support.config import pacs_and_ris, toml_table

BASE = "http://127.0.0.1:8080"
ORIGIN = {"Origin": BASE}
PASSWORD = "correct horse battery"
WEB_PACKAGE = Path(hermes_py.web.__file__).parent   # templates/, static/

Browsers = Callable[[], TestClient]


def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id still, at parameters a test suite on 2 cores can afford per login."""
    monkeypatch.setattr(users_mod, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024,
                                                            parallelism=1))
    monkeypatch.setattr(users_mod, "_DUMMY", [])


def write_config(folder: Path, rules: str = "", **web: object) -> Settings:
    """pacs and ris (``rules`` before the one sending everything to both), ``[web] web``."""
    base = pacs_and_ris()
    base.rules = rules + base.rules
    text = base.render() + "\n" + toml_table("web", {"port": 8080, **web})
    (folder / "rules.toml").write_text(text)
    cfg = load(folder / "rules.toml")
    Spool(cfg.spool.path).ensure(list(cfg.destinations))
    return cfg


def with_users(cfg: Settings) -> Settings:
    """An admin ada and a viewer vic."""
    users = Users(Spool(cfg.spool.path))
    users.add("ada", "admin", PASSWORD)
    users.add("vic", "viewer", PASSWORD)
    return cfg


def browsers(cfg: Settings) -> Iterator[Browsers]:
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


def session(make: Browsers, name: str) -> tuple[TestClient, str]:
    """A logged-in browser and its CSRF token (read from a page, as a form has it)."""
    c = make()
    assert login(c, name).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/").text)
    assert csrf
    return c, csrf.group(1)


def bearer(cfg: Settings, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {Users(Spool(cfg.spool.path)).new_token(name)}"}
