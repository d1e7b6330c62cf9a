"""Fixtures of the end-to-end suite: routers under test and the peers around them.

Everything started here is stopped here, whatever the test did: serve's process group,
scripted destinations, storescp. When a test fails, the serve log (errors first, then
the tail) is attached to the report (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import config
from tests.support.config import Config, Dest
from tests.support.peers import Script, ScriptedSCP, Storescp
from tests.support.serve import Hermes


@pytest.fixture
def hermes(serve: Callable[[Config], Hermes]) -> Callable[..., Hermes]:
    """``hermes(dests, **options) -> Hermes`` (not started; see harness.config for the
    options); always cleaned up."""
    def make(dests: list[Dest], **kw: Any) -> Hermes:
        return serve(config(dests, **kw))
    return make


@pytest.fixture
def scp() -> Iterator[Callable[..., ScriptedSCP]]:
    """``scp(dest, script=None) -> ScriptedSCP`` started on the destination's port."""
    made: list[ScriptedSCP] = []

    def make(dest: Dest, script: Script | None = None) -> ScriptedSCP:
        s = ScriptedSCP(ae_title=dest.ae_title, port=dest.port, script=script)
        s.start()
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """``storescp(dest) -> Storescp`` (DCMTK, every transfer syntax) on the destination's port."""
    made: list[Storescp] = []

    def make(dest: Dest, **kw: Any) -> Storescp:
        s = Storescp(tmp_path / f"storescp-{dest.name}-{len(made)}", ae_title=dest.ae_title,
                     port=dest.port, **kw)
        made.append(s)
        s.start()
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()
