"""What every stage process does the same way: stop on signals, die with its supervisor.

Each stage (receive, intake, route, dispatch, clean) runs as its own process,
under ``serve`` or alone under systemd; SIGTERM and SIGINT ask it to stop after
the instance in hand, and a child of ``serve`` never outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# Set by serve in its children's environment: the supervisor's pid.
SUPERVISED_ENV = "HERMES_PY_SUPERVISOR_PID"
# The last rules.toml serve validated: a child restarted while the file on disk is
# invalid starts with it instead of crash-looping (see cli.load_config).
LAST_GOOD_ENV = "HERMES_PY_LAST_GOOD_CONFIG"


def stop_on_signals(stop: threading.Event, also: Callable[[], None] | None = None,
                    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """SIGTERM/SIGINT set ``stop`` (and call ``also``, e.g. to end a wait now)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if also is not None:
            also()
    for sig in signals:
        signal.signal(sig, handler)


# Signals a stage handles; Python runs their handlers only in the main thread.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def start_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()
                 ) -> threading.Thread:
    """Start a daemon thread that never takes a signal meant for the process.

    The kernel hands a process-directed signal (kill, PR_SET_PDEATHSIG) to any thread
    not blocking it. CPython's C handler then only sets a flag, and a main thread
    blocked in an untimed wait is not woken to run the Python handler: a receiver
    whose DUL thread took serve's SIGTERM kept running. Threads inherit their
    creator's mask, so blocking here also covers the threads this one starts
    (pynetdicom's association and DUL threads under the server thread).
    """
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def orphaned() -> bool:
    """A child of serve whose supervisor is gone (reparented: getppid changed)."""
    parent = os.environ.get(SUPERVISED_ENV)
    return bool(parent) and str(os.getppid()) != parent


def wait_until_stopped(stop: threading.Event, period: float = 1.0) -> None:
    """Block until ``stop`` is set, waking every ``period`` to run pending signal
    handlers and to stop a child whose supervisor died without signalling it (a
    thread started without start_thread may still take the signal)."""
    while not stop.wait(period):
        if orphaned():
            stop.set()


def supervised() -> bool:
    return bool(os.environ.get(SUPERVISED_ENV))


def child_setup() -> None:
    """In a child of serve: die with the supervisor instead of living on as an orphan.

    Called by ``cli.main`` when SUPERVISED_ENV is set. prctl is Linux-only; where
    it is missing the child simply outlives a kill -9 of its supervisor.
    """
    parent = os.environ.get(SUPERVISED_ENV)
    if not parent:
        return
    # serve started us with SIGHUP blocked: one that arrived while we were starting
    # is discarded here, not fatal (the default action). A stage that reloads on
    # SIGHUP (the router) installs its own handler; the others ignore it, terminal
    # hangups included.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:
        # The supervisor died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)
