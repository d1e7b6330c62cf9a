"""The pytest side of tests/support: skips for missing peers, and the shared fixtures.

- ``make_settings(*dests, **tables)``: a rules.toml (``support.config.Config``) in the
  test's folder, loaded, with its spool created.
- ``serve(config)``: a ``support.serve.Hermes`` (not started) in the test's folder,
  always cleaned up; when a test fails, its serve logs are attached to the report.
- ``events``: the occurrences this process emits (``hermes_py.events.HUB``) during the test.
- ``small_fs(size_mb)``: a real small filesystem, skipped where it cannot be mounted.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_py.config import Settings, load
from hermes_py.events import HUB, Occurrence
from hermes_py.lifecycle import Event
from hermes_py.spool import Spool
from tests.support.config import Config, Dest
from tests.support.fs import CannotMount, small_filesystem
from tests.support.peers import ToolMissing, in_ci
from tests.support.serve import LIVE, Hermes

# ---------------------------------------------------------------- peers that are not installed


def _missing(e: ToolMissing) -> None:
    """A missing peer skips the test here, and fails it in CI (where it is a bug)."""
    if in_ci():
        pytest.fail(str(e))
    pytest.skip(str(e))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except ToolMissing as e:
        _missing(e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except ToolMissing as e:
        _missing(e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed:
        for h in list(LIVE):
            rep.sections.append((f"hermes-py serve log: {h.workdir}", h.log_tail()))
            rep.sections.append((f"spool: {h.spool_dir}", h.spool_listing()))


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """``make_settings(*dests, **tables)``: write ``tmp_path/rules.toml`` from a Config
    with these destinations and tables (``spool={...}``, ``receiver={...}``, ``rules=...``),
    load it and create its spool."""
    def make(*dests: Dest, **tables: Any) -> Settings:
        cfg = load(Config(destinations=list(dests), **tables).write(tmp_path))
        Spool(cfg.spool.path).ensure(list(cfg.destinations))
        return cfg
    return make


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Config], Hermes]]:
    """``serve(config) -> Hermes`` (not started), in its own folder; always cleaned up."""
    made: list[Hermes] = []

    def make(config: Config) -> Hermes:
        h = Hermes(tmp_path / f"router{len(made)}", config)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.cleanup()


class Events(list[Occurrence]):
    """What this process emitted during a test, in order."""

    def of(self, event: Event) -> list[Occurrence]:
        return [o for o in list(self) if o.event is event]

    def names(self) -> list[Event]:
        return [o.event for o in list(self)]


@pytest.fixture
def events() -> Iterator[Events]:
    got = Events()
    handler = got.append  # the same object for connect and disconnect
    HUB.connect(handler)
    try:
        yield got
    finally:
        HUB.disconnect(handler)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[float], Path]]:
    """``small_fs(size_mb) -> Path``: a tmpfs of that size, unmounted at the end (after the
    fixtures requested after this one, such as a serve using it, are gone)."""
    n = itertools.count()
    with contextlib.ExitStack() as mounted:
        def mount(size_mb: float) -> Path:
            try:
                return mounted.enter_context(small_filesystem(tmp_path / f"fs{next(n)}", size_mb))
            except CannotMount as e:
                pytest.skip(str(e))
        yield mount
