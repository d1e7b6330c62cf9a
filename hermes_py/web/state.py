"""What the web child keeps between requests, and the one gate every route passes (``need``).

The configuration is re-read when rules.toml changes (checked at most every
``CONFIG_CHECK`` seconds; an invalid edit keeps the running one, as serve does),
so a destination added by a reload shows without restarting this child. The
status snapshot is cached for ``SNAPSHOT_TTL`` like the metrics gauges: a page
left open by ten people must not become ten scanners of a 100,000-deep queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from hermes_py.admin.status import Status, status
from hermes_py.config import Settings, load
from hermes_py.errors import HermesError
from hermes_py.spool import Spool
from hermes_py.web.auth import (
    CSRF_HEADER,
    VERIFIERS,
    AuthError,
    Principal,
    Sessions,
    Throttle,
    check_csrf,
    identify,
)
from hermes_py.web.feed import Feed
from hermes_py.web.users import Users

LOG = logging.getLogger(__name__)
SNAPSHOT_TTL = 2.0
CONFIG_CHECK = 2.0
T = TypeVar("T")


class WebState:
    def __init__(self, cfg: Settings):
        self._cfg = cfg
        self._cfg_key = self._stat(cfg)
        self._cfg_checked = time.monotonic()
        self.spool = Spool(cfg.spool.path)
        self.users = Users(self.spool)
        self.sessions = Sessions(cfg.web.session_idle_timeout)
        self.throttle = Throttle()
        self.feed = Feed(self.spool.events_log)
        self.verifiers = asyncio.Semaphore(VERIFIERS)
        self.allowed_hosts = cfg.web.allowed_hosts()
        self._status: tuple[float, Status] | None = None
        self._status_lock = threading.Lock()

    @staticmethod
    def _stat(cfg: Settings) -> tuple[int, int] | None:
        try:
            st = os.stat(cfg.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    @property
    def cfg(self) -> Settings:
        now = time.monotonic()
        if now - self._cfg_checked >= CONFIG_CHECK:
            self._cfg_checked = now
            key = self._stat(self._cfg)
            if key != self._cfg_key:
                self._cfg_key = key
                try:
                    self._cfg = load(self._cfg.path)
                    self._status = None
                except HermesError as e:
                    LOG.error("keeping the running configuration: %s", e)
        return self._cfg

    def status(self) -> Status:
        """``admin.status.status``, at most one run per SNAPSHOT_TTL (blocking: a thread)."""
        with self._status_lock:
            cached = self._status
            if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_TTL:
                return cached[1]
            result = status(self.cfg)
            self._status = (time.monotonic(), result)
            return result

    def forget_status(self) -> None:
        """After an action: the next page shows its effect, not a 2 s old snapshot."""
        self._status = None


def state_of(request: Request) -> WebState:
    st: WebState = request.app.state.web
    return st


async def need(request: Request, permission: str) -> Principal:
    """The caller, if they may ``permission``; for a cookie session's POST also CSRF + Origin."""
    st = state_of(request)
    who = identify(request, st.users, st.sessions)
    if who is None:
        raise AuthError(401, "unauthenticated",
                        "log in, or send 'Authorization: Bearer TOKEN' (hermes-py user token)")
    if not who.may(permission):
        raise AuthError(403, "forbidden", f"the {who.role} role may not do this "
                                          f"(it needs {permission!r}: an admin)")
    if request.method not in ("GET", "HEAD") and who.session is not None:
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf")
            sent = value if isinstance(value, str) else None
        check_csrf(request, who.session, sent, st.allowed_hosts)
    return who


async def blocking(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """An admin function (file I/O, a C-ECHO) off the event loop."""
    return await run_in_threadpool(fn, *args, **kw)
