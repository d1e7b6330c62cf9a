"""Fixtures of the end-to-end suite: routers under test and the peers around them.

Everything started here is stopped here, whatever the test did: serve's process group,
scripted destinations, storescp, Orthanc. When a test fails, the serve log (errors first,
then the tail) is attached to the report, since it is the first thing anyone will need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import LIVE, Dest, Hermes
from tests.peers import Script, ScriptedSCP, Storescp


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed:
        for h in list(LIVE):
            rep.sections.append((f"hermes-py serve log: {h.workdir}", h.log_tail()))
            rep.sections.append((f"spool: {h.spool_dir}", h.spool_listing()))


@pytest.fixture
def hermes(tmp_path: Path) -> Iterator[Callable[..., Hermes]]:
    """``hermes(dests, **options) -> Hermes`` (not started); always cleaned up."""
    made: list[Hermes] = []

    def make(dests: list[Dest], **kw: Any) -> Hermes:
        h = Hermes(tmp_path / f"router{len(made)}", dests, **kw)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.cleanup()


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
