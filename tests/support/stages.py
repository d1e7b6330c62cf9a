"""Stages run in the test's own process: a real Dispatcher serving in a thread.

For tests that watch one stage closely (its spool moves, its state file, its
peer) without the rest of ``serve``; tests/support/serve.py runs the whole
router as an operator does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from hermes_py.config import Settings
from hermes_py.dispatcher import Dispatcher


@contextlib.contextmanager
def serving(cfg: Settings, dest: str, poll: float = 0.1) -> Iterator[Dispatcher]:
    """A dispatcher serving in a thread; stopped (and its claims returned) on exit.

    An exception in the dispatcher's loop is raised here, in the test, on exit.
    """
    d = Dispatcher(cfg, dest, poll=poll)
    d.start()  # workers exist (and claims are recovered) before the test looks
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            d.serve(stop)
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    t = threading.Thread(target=target, name=f"test-serve-{dest}", daemon=True)
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(60)
        assert not t.is_alive(), "dispatcher did not stop within 60s"
        if errors:
            raise errors[0]
