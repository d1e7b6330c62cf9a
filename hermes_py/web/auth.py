"""Who is asking, and may they: sessions, API tokens, CSRF and Origin checks, throttling, roles.

- Sessions are server-side (a random id in an HttpOnly, SameSite=Strict cookie),
  not Starlette's signed cookie, which is readable, lives 14 days and cannot be
  revoked. They live in the web child's memory: logout, ``user passwd`` and
  ``user del`` end them at once, and a restart of the web child logs everyone out
  (harmless, and it never leaves a stale session file with a secret behind).
- A cookie session's POST needs the session's CSRF token (a form field or the
  ``X-CSRF-Token`` header) and, when the browser sends one, an Origin (or Referer)
  naming one of our hosts. A bearer token needs neither: no browser attaches it
  on its own, so no other site can make it ride along.
- One table says what a role may do; every route asks it (hiding a button is not
  authorization: dcm4chee discussion #4124).
- Failed logins are counted per client address and per user name; past
  ``FAILURES`` in ``WINDOW`` seconds the login is refused (429) until the window
  slides on. At most ``VERIFIERS`` argon2 checks run at once, in threads.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

from hermes_py.web.users import User, Users

COOKIE = "hermes_session"
LOGIN_COOKIE = "hermes_login"
CSRF_HEADER = "x-csrf-token"
ABSOLUTE_LIFETIME = 12 * 3600.0
FAILURES = 5
WINDOW = 300.0
VERIFIERS = 2

PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "admin": frozenset({"read", "act"}),
}


class AuthError(Exception):
    """401 (who are you), 403 (you may not), 429 (slow down): rendered as JSON or a page."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass
class Session:
    sid: str
    user: str
    role: str
    stamp: str                       # the user's changed_at when they logged in
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    flash: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    session: Session | None = None   # None: an API token

    @property
    def by(self) -> str:
        """What the sidecar history and the log line record as who did it."""
        return f"web:{self.name}"

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())


class Sessions:
    def __init__(self, idle_timeout: float):
        self.idle = idle_timeout
        self._by_id: dict[str, Session] = {}

    def create(self, user: User) -> Session:
        self._expire()
        s = Session(secrets.token_urlsafe(32), user.name, user.role, user.changed_at)
        self._by_id[s.sid] = s
        return s

    def get(self, sid: str | None, users: dict[str, User]) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = time.monotonic()
        u = users.get(s.user)
        if (now - s.seen > self.idle or now - s.created > ABSOLUTE_LIFETIME or u is None
                or u.changed_at != s.stamp or u.role != s.role):
            self._by_id.pop(sid, None)
            return None
        s.seen = now
        return s

    def revoke(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self._by_id.items()):
            if now - s.seen > self.idle or now - s.created > ABSOLUTE_LIFETIME:
                del self._by_id[sid]


class Throttle:
    """Failed logins per key (client address, user name) in a sliding window."""

    def __init__(self, limit: int = FAILURES, window: float = WINDOW):
        self.limit = limit
        self.window = window
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        cutoff = time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def wait(self, *keys: str) -> float:
        """Seconds until a login for these keys is tried again (0: now)."""
        out = 0.0
        for k in keys:
            q = self._recent(k)
            if len(q) >= self.limit:
                out = max(out, q[0] + self.window - time.monotonic())
        return out

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for k in keys:
            self._recent(k).append(now)
        if len(self._fails) > 10_000:  # a scan of many addresses must not grow memory
            self._fails = {k: q for k, q in self._fails.items() if self._recent(k)}

    def succeeded(self, name: str) -> None:
        self._fails.pop(f"user:{name}", None)


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    scheme, _, value = h.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def identify(request: Request, users: Users, sessions: Sessions) -> Principal | None:
    token = bearer(request)
    if token is not None:
        u = users.by_token(token)
        return None if u is None else Principal(u.name, u.role)
    s = sessions.get(request.cookies.get(COOKIE), users.load())
    return None if s is None else Principal(s.user, s.role, s)


def origin_ok(request: Request, allowed: list[str]) -> bool:
    """The Origin (or Referer) of an unsafe request names this listener: no cross-site POST.

    Compared with the Host header (already checked against ``allowed``) and the
    allowed names, never with ``request.url``, which Starlette builds from Host.
    Without either header (an old client, a privacy proxy) the CSRF token decides.
    """
    origin = request.headers.get("origin")
    if origin is None:
        ref = request.headers.get("referer")
        if ref is None:
            return True
        origin = ref
    if origin == "null":
        return False
    parts = urlsplit(origin)
    host = (parts.hostname or "").lower()
    return host in allowed and parts.netloc.lower() == request.headers.get("host", "").lower()


def check_csrf(request: Request, session: Session, sent: str | None,
               allowed: list[str]) -> None:
    if not origin_ok(request, allowed):
        raise AuthError(403, "csrf", "cross-origin request refused (Origin is not this site)")
    if not sent or not hmac.compare_digest(sent, session.csrf):
        raise AuthError(403, "csrf", "missing or wrong CSRF token (reload the page)")
