"""The admin verbs: a glance at the queues, an investigation tool, and safe fixes.

Postfix is the model: ``status`` is qshape (destinations x age, from directory
listings only), ``find`` is the investigation tool that may read sidecars,
``retry``/``hold``/``release``/``flush`` are postsuper/postqueue, ``purge`` deletes
only what an explicit selection names and only with ``--yes``.

Each verb is a function that returns a result object: the CLI prints its
``text()`` (or its ``to_json()`` with ``--json``) and exits with its
``exit_code``; an HTTP API serialises the same objects. Every verb works on the
spool folders and flags alone, so it works the same whether ``serve`` runs or
not. None of them creates a spool: a mistyped ``-c`` must not grow an empty
spool that nothing serves. A verb that changes something records who asked
(``by``: the logged-in user, or the web user who clicked).

- ``status.py``: status (also what ``metrics`` exports); ``find.py``: find;
  ``queue.py``: retry, hold, release, flush, purge; ``send.py``: send;
  ``echo.py``: echo; ``rules_verbs.py``: rules check and rules test.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
from typing import Any

from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.spool import Spool


def open_spool(cfg: Settings) -> Spool:
    """The configured spool, or a one-line error; never creates it."""
    root = cfg.spool.path
    if not root.is_dir():
        raise HermesError(f"spool folder {root} does not exist (is serve running with this "
                          f"config? {cfg.path})")
    return Spool(root)


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container: still record something
        return str(os.getuid())


class Result:
    """What a verb did: ``text()`` for a person, ``to_json()`` for a program."""

    @property
    def exit_code(self) -> int:
        return 0

    def text(self) -> str:
        raise NotImplementedError

    def to_json(self) -> Any:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
