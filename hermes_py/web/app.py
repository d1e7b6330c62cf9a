"""``hermes-py web``: the Starlette app and its listener (uvicorn, one worker, niced).

Middleware, outermost first, and why each:

- Host check (``TrustedHostMiddleware``): a DNS-rebinding page reaches a loopback
  listener through a victim's browser under its own name; the bound names only.
- Security headers: CSP ``default-src 'self'`` with no inline script at all (the
  pages have none, so the policy holds), no framing, ``Referrer-Policy:
  same-origin`` (URLs carry UIDs; ``no-referrer`` would make browsers send
  ``Origin: null`` on our own forms and fail the Origin check), no caching of
  pages, HSTS only under TLS.
- A request body limit: nothing here takes an upload.

uvicorn runs without its access log (URLs carry UIDs, and the audit that matters
is the admin functions' own event lines, with ``by``), with bounded concurrency,
and a short graceful stop so an open event stream never holds up serve's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hermes_py.admin import open_spool
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.web import api, pages
from hermes_py.web.auth import AuthError, identify
from hermes_py.web.state import WebState, state_of

LOG = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
NICENESS = 10
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
       "object-src 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp, tls: bool):
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                extra = [(b"content-security-policy", CSP.encode()),
                         (b"x-content-type-options", b"nosniff"),
                         (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"same-origin")]
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def on_auth(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    if _api(request):
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)
    if exc.status == 401:
        target = pages.safe_next(request.url.path) if request.method == "GET" else "/"
        return RedirectResponse(f"/login?next={target}", status_code=303)
    st = state_of(request)
    who = identify(request, st.users, st.sessions)
    return pages.render(request, "error.html", who, status=exc.status, error=exc.error,
                        detail=exc.detail)


async def on_api(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.ApiError)
    return JSONResponse(exc.body, status_code=exc.status)


async def on_hermes(request: Request, exc: Exception) -> Response:
    """A user-fixable refusal of an admin function (the CLI's one-line error)."""
    return await on_auth(request, AuthError(400, "bad_request", str(exc)))


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _api(request) or exc.status_code >= 500:
        return JSONResponse({"error": "http", "detail": str(exc.detail)},
                            status_code=exc.status_code)
    return await on_auth(request, AuthError(exc.status_code, "http", str(exc.detail)))


def create_app(cfg: Settings) -> Starlette:
    app = Starlette(
        debug=False,
        routes=[*api.routes(), *pages.routes(),
                Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=cfg.web.allowed_hosts(),
                       www_redirect=False),
            Middleware(SecurityHeaders, tls=cfg.web.tls),
            Middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY),
        ],
        exception_handlers={AuthError: on_auth, api.ApiError: on_api,
                            HermesError: on_hermes, HTTPException: on_http})
    app.state.web = WebState(cfg)
    return app


def run(cfg: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean stop, like every other stage."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the stop signal once it has shut down gracefully, so the
        process would end "killed by SIGTERM" and serve would log a stopped-as-asked child
        as a crash; the same handlers, without the re-raise."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            stops = (signal.SIGTERM, signal.SIGINT)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    w = cfg.web
    if w.port is None:
        raise HermesError(f"[web] port is not set in {cfg.path}: the web page is off")
    open_spool(cfg)  # fail now, in one line, rather than on the first request
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    server = Server(uvicorn.Config(
        create_app(cfg), host=w.bind, port=w.port,
        ssl_certfile=w.tls_cert_file or None, ssl_keyfile=w.tls_key_file or None,
        log_config=None, access_log=False, server_header=False, proxy_headers=False,
        limit_concurrency=64, timeout_graceful_shutdown=3, lifespan="off"))
    LOG.info("web page on %s://%s:%d/ (users: hermes-py user list -c %s)",
             "https" if w.tls else "http", w.bind, w.port, cfg.path)
    server.run()
    if not server.started:
        raise HermesError(f"web: cannot listen on {w.bind}:{w.port} (in use? see the log)")
    return 0
