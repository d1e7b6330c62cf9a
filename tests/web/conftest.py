"""What every web test starts from: cheap argon2, a config with two users, browsers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from hermes_py.config import Settings  # noqa: E402
from tests.support.web import Browsers, browsers, cheap_argon2, with_users, write_config  # noqa: E402


@pytest.fixture(autouse=True)
def _argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_argon2(monkeypatch)


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    """pacs and ris, ``[web] port = 8080``, an admin ada and a viewer vic."""
    return with_users(write_config(tmp_path))


@pytest.fixture
def client(cfg: Settings) -> Iterator[Browsers]:
    yield from browsers(cfg)
