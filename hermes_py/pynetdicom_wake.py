"""pynetdicom's two polling loops, made to wait for their work instead (pynetdicom 3.0.4).

Each association runs two threads that poll. The DUL thread loops "anything to
send? any data on the socket? any event?" and sleeps ``_run_loop_delay`` (1 ms)
after a loop that found nothing (dul.py:389-447); the association's reactor sleeps
a fixed 1 ms before every look at the DIMSE queue (association.py:713-731). So
every C-STORE waits for up to a millisecond to be noticed on each side, and, worse
on a 2-core router, every open association wakes its threads a thousand times a
second or more. Those wakeups are CPU and GIL hand-offs taken from the receiver's
own handlers and from the router and dispatchers beside it; with four busy
associations in one process the C-STORE handler took 12 ms instead of 1.

Here the same loops block until there is something for them, each bounded by
``WAIT_MAX`` so that pynetdicom's own checks (ARTIM and idle timers, a DUL that
died, a kill flag) still run at least that often:

- the DUL thread, in its "data on the socket?" step (``_is_transport_event``),
  waits in ``select`` on the socket and on a wake-up pipe, but only when nothing
  is queued for it to send and no event waits (otherwise it runs at once). What
  gives it work wakes it: a primitive put on ``to_provider_queue`` (a response, a
  request, a release or abort), ``kill_dul``/``stop_dul``.
- the reactor, in its non-blocking ``dimse.get_msg`` (called from the reactor
  thread only), waits on an Event set when a DIMSE message is queued, when a
  primitive reaches ``to_user_queue`` (a release or abort request) and when a
  sender pauses the reactor (``_reactor_checkpoint.clear``, what every
  ``send_c_*`` does first). Its fixed 1 ms sleep before that is skipped: that
  sleep is what let the reactor poll, and it stood between each C-STORE's
  response and the next request.

Waking early is always safe for a polling loop: pynetdicom's own code runs
unchanged after each wait and looks for itself. A wake-up we did not foresee costs
at most ``WAIT_MAX`` of latency, never a lost message. Only the association
objects handed to :func:`wake_on_work` are changed, never pynetdicom's classes;
the one module-wide change, ``pynetdicom.association.time``, behaves as the
``time`` module for every other thread and call.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association
from pynetdicom import evt
from pynetdicom.association import Association

# The longest either loop waits before pynetdicom's own checks run again.
WAIT_MAX = 0.05
# What the DUL sleeps after a loop that found nothing: the hop from a woken wait to
# the send step (pynetdicom's 1 ms would be added to every response).
DUL_LOOP_DELAY = 0.0001
# The reactor's own sleep (association.py:714), the only ``time.sleep(0.001)`` there.
REACTOR_SLEEP = 0.001


class _ReactorTime:
    """``pynetdicom.association``'s ``time``: its reactor sleep skipped on woken associations."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == REACTOR_SLEEP and getattr(threading.current_thread(), "_hermes_woken",
                                                False):
            return   # wait_then_get waits instead, for work
        time.sleep(seconds)


if not isinstance(getattr(_association, "time", None), _ReactorTime):
    _association.time = _ReactorTime()  # type: ignore[assignment]


class _Waker:
    """One association's wake-ups: a pipe the DUL's select sees, an Event for the reactor.

    The pipe is closed when the connection closes (``EVT_CONN_CLOSE``), or when the
    waker is collected. Writes and reads hold the lock and look at ``closed`` first:
    a closed descriptor's number may already be another file's, which must never get
    our byte or lose one of its own to us.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.reactor = threading.Event()
        self.closed = False
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close, self.read_fd, self.write_fd)

    def wake_dul(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError, OSError):
            if not self.closed:
                os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError, OSError):
            while not self.closed and os.read(self.read_fd, 512):
                pass

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._finalizer()
        self.reactor.set()


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _after(obj: Any, name: str, then: Callable[[], None]) -> None:
    """Make ``obj.name(...)`` (this object's, not its class's) call ``then()`` afterwards."""
    original = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            then()

    setattr(obj, name, wrapped)


def wake_on_work(assoc: Association, wait_max: float = WAIT_MAX) -> None:
    """Let this association's DUL thread and reactor wait for work instead of polling.

    Call it before the association's threads wait for anything (an acceptor's
    ``EVT_CONN_OPEN``; a requestor's, which runs on its DUL thread). Calling it
    twice for one association does nothing more.
    """
    dul = assoc.dul
    if getattr(dul, "_hermes_waker", None) is not None:
        return
    waker = _Waker()
    dul._hermes_waker = waker  # type: ignore[attr-defined]
    dul._run_loop_delay = DUL_LOOP_DELAY
    _after(dul.to_provider_queue, "put", waker.wake_dul)
    _after(dul, "kill_dul", waker.wake_dul)
    stop_dul = dul.stop_dul

    def stop() -> bool:
        # Flag first, then wake: the woken loop must see the flag (stop_dul sets it
        # again and waits for the thread).
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            waker.wake_dul()
        return bool(stop_dul())

    dul.stop_dul = stop  # type: ignore[method-assign]
    is_transport_event = dul._is_transport_event

    def wait_then_look() -> bool:
        _wait_for_dul_work(dul, waker, wait_max)
        return bool(is_transport_event())

    dul._is_transport_event = wait_then_look  # type: ignore[method-assign]

    reactor = waker.reactor
    msgs = assoc.dimse.msg_queue
    _after(msgs, "put", reactor.set)
    _after(dul.to_user_queue, "put", reactor.set)
    _after(assoc._reactor_checkpoint, "clear", reactor.set)
    get_msg = assoc.dimse.get_msg

    def wait_then_get(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc and msgs.empty():
            reactor.clear()
            # Looked at again after clear(): a put in between has set the Event.
            if (not waker.closed and msgs.empty() and dul.to_user_queue.empty()
                    and assoc._reactor_checkpoint.is_set()):
                reactor.wait(wait_max)   # closed: the connection is gone, look at once
        return get_msg(block=block)

    assoc.dimse.get_msg = wait_then_get  # type: ignore[method-assign]
    assoc._hermes_woken = True  # type: ignore[attr-defined]
    assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: waker.close())


def _wait_for_dul_work(dul: Any, waker: _Waker, wait_max: float) -> None:
    """Block until the socket is readable or someone woke us, unless work is queued already."""
    if dul._kill_thread or not dul.event_queue.empty() or not dul.to_provider_queue.empty():
        return
    if dul.state_machine.current_state in ("Sta1", "Sta13"):
        return   # no connection to wait on, or pynetdicom closing it: its own step decides
    transport = dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None or not getattr(transport, "_is_connected", False):
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return   # decrypted bytes already buffered: select would not see them
    if waker.closed:
        return
    try:
        readable, _, _ = select.select([sock, waker.read_fd], [], [], wait_max)
    except (OSError, ValueError):
        return   # the socket closed under us: pynetdicom's step finds out (Evt17)
    if waker.read_fd in readable:
        waker.drain()
