"""Health for a load balancer, and draining: what HAProxy (or an admin) asks of one router.

``GET /healthz`` answers 200 ``ok`` only when this router can take and keep an
instance: the spool is writable, free space is above the refusal threshold
(``min_free_mb``), the receiver and every dispatcher run, and it is not draining;
otherwise 503 with the one reason. It says nothing else (no names, no counts), needs
no login, and listens on loopback unless ``[health] bind`` says otherwise.

Draining (``hermes-py drain``) is a file, ``state/drain``, like the destination
flags: the receivers answer new associations with a transient rejection, so a
modality or the load balancer tries another router, while the dispatchers go on
until the queue is empty. ``hermes-py undrain`` removes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hermes_py.process import start_thread
from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

CHECK_EVERY = 1.0   # a receiver looks at the drain file at most this often


class Drain:
    """Whether the spool is draining, read at most every CHECK_EVERY (one stat)."""

    def __init__(self, spool: Spool):
        self.path = spool.drain_file
        self._at = 0.0
        self._on = False
        self._lock = threading.Lock()

    def active(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._at >= CHECK_EVERY:
                self._at = now
                self._on = self.path.exists()
            return self._on


def verdict(spool: Spool, min_free_mb: int, alive: dict[str, bool]) -> str | None:
    """None when healthy, else the one reason a load balancer's log should show."""
    if spool.drain_file.exists():
        return "draining"
    for folder in (spool.root, spool.tmp, spool.incoming):
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"spool not writable ({folder.name})"
    try:
        free = spool.free_mb()
    except OSError as e:
        return f"spool unreadable: {e.strerror or e}"
    if free < min_free_mb:
        return f"free space {free:.0f} MB below min_free_mb {min_free_mb}"
    down = sorted(n for n, up in alive.items() if not up
                  and n.startswith(("receive", "dispatch:")))
    if down:
        return f"not running: {', '.join(down)}"
    return None


class HealthServer:
    """``GET /healthz`` on a stdlib HTTP server in a daemon thread of serve."""

    def __init__(self, bind: str, port: int, check: Callable[[], str | None]):
        self.bind = bind
        self.check = check
        self._server = ThreadingHTTPServer((bind, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/healthz":
                    code, body = 404, b"not found\n"
                else:
                    try:
                        why = owner.check()
                    except Exception as e:  # a check that fails is not a healthy router
                        why = f"health check failed: {type(e).__name__}"
                    code, body = (200, b"ok\n") if why is None else (503, f"{why}\n".encode())
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                LOG.debug("health: " + format, *args)

        return Handler

    def start(self) -> HealthServer:
        self._thread = start_thread(self._server.serve_forever, "health")
        LOG.info("health: GET http://%s:%d/healthz", self.bind, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
