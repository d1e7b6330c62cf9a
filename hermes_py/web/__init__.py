"""The web page and the HTTP API (``hermes-py web``, a child of serve when ``[web] port`` is set).

Another client of the admin functions, never a second implementation of them: a
page or an API call that changes something calls ``admin.queue.hold`` (retry,
purge ...) with ``by="web:<user>"``, exactly what the CLI calls, so locks,
refusals and the sidecar history are the CLI's. Reading is listings and the
sidecars a page shows, nothing else. Its own process at a lower CPU priority,
because an argon2 login burst or a slow page must never delay a C-STORE answer.

- ``app.py``: the Starlette app, its middleware (Host check, security headers,
  body limit) and ``run`` under uvicorn;
- ``auth.py``: sessions, CSRF and Origin checks, login throttling, roles;
- ``users.py``: the users file and ``hermes-py user ...``;
- ``api.py``: ``/api/v1``; ``pages.py``: the HTML pages; ``data.py``: paged
  listings and copies by spool name; ``feed.py``: the live events (SSE).

It needs the ``web`` extra (``pip install 'hermes-py[web]'``); without it,
``hermes-py web`` and ``user`` say so in one line.
"""

from __future__ import annotations

import importlib.util

from hermes_py.errors import HermesError

_NEEDS = ("starlette", "uvicorn", "jinja2", "argon2", "multipart")
_missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
if _missing:
    raise HermesError(f"the web page needs the web extra ({', '.join(_missing)} missing): "
                      "pip install 'hermes-py[web]'")
