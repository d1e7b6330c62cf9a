"""Web users: ``state/web/users.json``, argon2id password hashes, hashed API tokens, the CLI.

Why in the spool's state and not beside rules.toml: the users belong to the router
that serves this spool (a standby that takes the spool over takes its users), and
rules.toml stays a file that can be shown and versioned without secrets.

- No seed user, no default password: the first admin is made on the router host
  with ``hermes-py user add NAME --role admin`` (Hermes and mercure shipped
  admin/router). Passwords come from the terminal (getpass) or, when stdin is not
  a terminal, from its first line, so scripts and tests need no pty.
- argon2id through argon2-cffi (passlib is unmaintained and breaks with bcrypt 5).
- API tokens are 256 random bits, shown once and stored as SHA-256: a slow hash
  buys nothing against a value nobody can guess, and a lookup must stay cheap.
- Every change is a read-modify-write under ``locks/web-users.lock`` and an atomic
  replace, so two admins editing at once never lose a user. ``changed_at`` is the
  password's stamp: a session made before it ended (``user passwd`` logs out).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from hermes_py.admin import open_spool
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.spool import Spool, now_iso

ROLES = ("admin", "viewer")
MIN_PASSWORD = 8
TOKEN_PREFIX = "hpy_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

# argon2-cffi's defaults (argon2id, 64 MiB, t=3, p=4: above OWASP's minimum). Tests swap
# in a cheaper one; a hash records its own parameters, so verification needs none.
HASHER = PasswordHasher()
# Verified when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY: list[str] = []


@dataclass
class User:
    name: str
    role: str
    hash: str
    changed_at: str
    tokens: list[dict[str, str]] = field(default_factory=list)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The users file of one spool; re-read only when it changed on disk."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.path = spool.web_dir / "users.json"
        self._cache: tuple[tuple[int, int, int], dict[str, User]] | None = None

    def load(self) -> dict[str, User]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        raw = self.spool.read_json(self.path).get("users", {})
        users = {}
        for name, u in (raw.items() if isinstance(raw, dict) else ()):
            with contextlib.suppress(TypeError, KeyError):
                users[name] = User(name=name, role=u["role"], hash=u["hash"],
                                   changed_at=u["changed_at"], tokens=list(u.get("tokens", [])))
        self._cache = (key, users)
        return users

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, User]]:
        lock = self.spool.lock("web-users")
        lock.acquire(blocking=True)
        try:
            self._cache = None
            users = dict(self.load())
            yield users
            self.spool.web_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            data: dict[str, Any] = {"users": {
                n: {k: v for k, v in asdict(u).items() if k != "name"}
                for n, u in sorted(users.items())}}
            self.spool.write_json(self.path, data)
            os.chmod(self.path, 0o600)
        finally:
            lock.release()

    def add(self, name: str, role: str, password: str) -> User:
        if not _NAME_RE.match(name):
            raise HermesError(f"invalid user name {name!r}: letters, digits, '_', '.', '@', "
                              "'-', at most 64")
        if role not in ROLES:
            raise HermesError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        _check_password(password)
        with self._editing() as users:
            if name in users:
                raise HermesError(f"user {name!r} exists (`hermes-py user passwd {name}` sets "
                                  "its password; `user del` first to change its role)")
            users[name] = User(name, role, HASHER.hash(password), now_iso())
            return users[name]

    def passwd(self, name: str, password: str) -> None:
        _check_password(password)
        with self._editing() as users:
            u = self._get(users, name)
            u.hash, u.changed_at = HASHER.hash(password), now_iso()

    def delete(self, name: str) -> None:
        with self._editing() as users:
            self._get(users, name)
            del users[name]

    def new_token(self, name: str) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._editing() as users:
            self._get(users, name).tokens.append(
                {"id": _sha(token)[:8], "sha256": _sha(token), "created_at": now_iso()})
        return token

    @staticmethod
    def _get(users: dict[str, User], name: str) -> User:
        try:
            return users[name]
        except KeyError:
            raise HermesError(f"no web user {name!r} (`hermes-py user list`)") from None

    def verify(self, name: str, password: str) -> User | None:
        """The user if the password is theirs (slow on purpose: run it off the event loop)."""
        user = self.load().get(name)
        if user is None:
            if not _DUMMY:
                _DUMMY.append(HASHER.hash(secrets.token_hex(8)))
            with contextlib.suppress(VerificationError, InvalidHashError):
                HASHER.verify(_DUMMY[0], password)
            return None
        try:
            HASHER.verify(user.hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return user

    def by_token(self, token: str) -> User | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = _sha(token)
        found = None
        for user in self.load().values():
            for t in user.tokens:
                if hmac.compare_digest(t.get("sha256", ""), digest):
                    found = user
        return found


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise HermesError(f"the password must have at least {MIN_PASSWORD} characters")


def read_password(confirm: bool = True) -> str:
    """From the terminal (asked twice), or the first line of stdin when it is not one."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != first:
        raise HermesError("the passwords differ; nothing changed")
    return first


def users_of(cfg: Settings) -> Users:
    return Users(open_spool(cfg))


def cli(cfg: Settings, verb: str, name: str | None, role: str | None) -> int:
    """``hermes-py user add|passwd|del|list|token``; what each prints is its whole answer."""
    users = users_of(cfg)
    if verb == "list":
        rows = sorted(users.load().values(), key=lambda u: u.name)
        if not rows:
            print(f"no web users yet: hermes-py user add NAME --role admin -c {cfg.path}")
        for u in rows:
            print(f"{u.name:<20} {u.role:<7} password set {u.changed_at}, "
                  f"{len(u.tokens)} API token(s)")
        return 0
    assert name is not None
    if verb == "add":
        users.add(name, role or "", read_password())
        print(f"added {role} {name!r} ({Path(users.path)})")
    elif verb == "passwd":
        users.passwd(name, read_password())
        print(f"password of {name!r} set; their open sessions end")
    elif verb == "del":
        users.delete(name)
        print(f"deleted {name!r}; their sessions and API tokens no longer work")
    elif verb == "token":
        token = users.new_token(name)
        print(token)
        print(f"(API token for {name!r}: shown once, stored hashed; send it as "
              "'Authorization: Bearer TOKEN')", file=sys.stderr)
    else:
        raise HermesError(f"unknown user verb {verb!r}")
    return 0
