"""The HTML pages: plain forms and links, no script but the live feed's.

Every page is a GET that changes nothing; every action is a POST form carrying
the session's CSRF token, answered with a redirect (so a reload never repeats
it) and a one-line flash of the admin function's own ``text()``. Jinja2
autoescapes everything: strings from DICOM files, AE titles and remote error
texts are the sender's to choose, and none is ever marked safe. Patient names
and IDs are not shown by default: the sidecars hold UIDs, AE titles and spool
names, and that is what the pages show; with ``[web] show_patient = true`` an
admin may ask for them on an instance's page, read from its header and audited.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from hermes_py.admin import find
from hermes_py.admin.status import error_text, failover_text, human_mb
from hermes_py.durations import human_age
from hermes_py.errors import HermesError
from hermes_py.lifecycle import DestinationStatus
from hermes_py.web import api, data
from hermes_py.web.auth import COOKIE, LOGIN_COOKIE, AuthError, Principal, origin_ok
from hermes_py.web.state import blocking, need, state_of

LOGIN_LOG = logging.getLogger("hermes_py.web.login")
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True, trim_blocks=True, lstrip_blocks=True)
ENV.filters["age"] = human_age


def safe_next(value: object, default: str = "/") -> str:
    """A same-site path to go back to: never another host (``//evil``, ``\\evil``)."""
    s = str(value or "")
    if not s.startswith("/") or s.startswith("//") or "\\" in s:
        return default
    return s


def render(request: Request, template: str, who: Principal | None, status: int = 200,
           **ctx: Any) -> HTMLResponse:
    flash: list[str] = []
    if who is not None and who.session is not None:
        flash, who.session.flash = who.session.flash, []
    html = ENV.get_template(template).render(
        who=who, csrf=who.session.csrf if who and who.session else "", flash=flash,
        path=request.url.path, **ctx)
    return HTMLResponse(html, status_code=status)


def _why(d: dict[str, Any], now: float) -> str:
    """The sentence behind a state: a queue that does not move must say why (dcm4chee #4355)."""
    st = d.get("state")
    if st == DestinationStatus.HELD:
        return "held by an admin: instances keep queueing, nothing is sent until released"
    if st == DestinationStatus.BACKOFF and d.get("backoff_until_epoch"):
        return (f"unreachable: next probe in {human_age(d['backoff_until_epoch'] - now)} "
                f"({error_text(d.get('last_error'), now, 200)})")
    if st == DestinationStatus.MISCONFIGURED:
        return f"it rejects us permanently: {error_text(d.get('last_error'), now, 200)}"
    try:
        text = DestinationStatus(str(st)).meaning
    except ValueError:
        text = str(st)
    if d.get("flush_requested"):
        text += "; a flush is requested"
    return text


async def dashboard(request: Request) -> Response:
    who = await need(request, "read")
    result = await blocking(state_of(request).status)
    snap = result.to_json()
    now = time.time()
    cards = [{"name": n, "d": d, "why": _why(d, now),
              "oldest": human_age(d.get("oldest_age")) if d.get("oldest_age") is not None
              else "-", "last_error": error_text(d.get("last_error"), now, 200),
              "failover": failover_text(d, now)}
             for n, d in snap["destinations"].items()]
    return render(request, "dashboard.html", who, snap=snap, cards=cards,
                  free=human_mb(snap["free_mb"]))


async def destination(request: Request) -> Response:
    who = await need(request, "read")
    name = request.path_params["name"]
    st = state_of(request)
    if name not in st.cfg.destinations:
        raise AuthError(404, "not_found", f"unknown destination {name!r}")
    q = request.query_params
    where = q.get("in", "outgoing")
    if where not in data.WHERE:
        where = "outgoing"
    limit = api.int_param(q.get("limit"), "limit", data.DEFAULT_LIMIT)
    page = await blocking(data.page, st.spool, name, where, q.get("after", ""), limit)
    groups: dict[tuple[str, str], list[data.Row]] = {}
    for r in page.rows:
        key = (str(r.sidecar.get("study_instance_uid") or "?"),
               str(r.sidecar.get("series_instance_uid") or "?"))
        groups.setdefault(key, []).append(r)
    return render(request, "destination.html", who, name=name, page=page, groups=groups,
                  where_all=data.WHERE, quote=quote)


async def instance(request: Request) -> Response:
    who = await need(request, "read")
    name = request.path_params["name"]
    st = state_of(request)
    found = await blocking(data.copies, st.spool, name)
    if not found.copies:
        raise AuthError(404, "not_found", f"no instance named {name!r} in the spool")
    try:
        shown = api.patient_wanted(request, who)
    except api.ApiError as e:
        raise AuthError(e.status, str(e.body["error"]), str(e.body["detail"])) from None
    patient = await blocking(data.patient, found, name, who.by) if shown else None
    return render(request, "instance.html", who, name=name, found=found, text=found.text(),
                  patient=patient, show_patient=st.cfg.web.show_patient,
                  destinations=sorted(st.cfg.destinations), quote=quote)


async def rules_page(request: Request) -> Response:
    """The rules dry-run on an instance in the spool: ``hermes-py rules test`` on its file."""
    who = await need(request, "read")
    name = request.path_params["name"]
    st = state_of(request)
    tested = await blocking(data.dry_run, st.cfg, st.spool, name)
    if tested is None:
        raise AuthError(404, "not_found", f"no instance named {name!r} in the spool")
    return render(request, "rules.html", who, name=name, text=tested.text(), quote=quote)


async def find_page(request: Request) -> Response:
    who = await need(request, "read")
    uid = request.query_params.get("uid", "").strip()
    found = await blocking(find.find, state_of(request).cfg, uid) if uid else None
    return render(request, "find.html", who, uid=uid, found=found)


async def errors(request: Request) -> Response:
    who = await need(request, "read")
    st = state_of(request)
    names = [None, *sorted(st.cfg.destinations)]
    pages = [await blocking(data.page, st.spool, n, "error", "", 20) for n in names]
    return render(request, "errors.html", who, pages=pages)


async def events(request: Request) -> Response:
    who = await need(request, "read")
    return render(request, "events.html", who)


async def action(request: Request, verb: str) -> Response:
    who = await need(request, "act")
    name = request.path_params["name"]
    form = await request.form()
    back = safe_next(form.get("next"))
    if name not in state_of(request).cfg.destinations:
        raise AuthError(404, "not_found", f"no destination {name!r}")
    args = {k: form.get(k) for k in ("study", "name")}
    try:
        result = await api.act(request, verb, name, args, who.by)
        message = _summary(verb, name, result)
    except (HermesError, api.ApiError) as e:
        message = f"{verb} {name}: {e}"
    state_of(request).forget_status()
    assert who.session is not None
    who.session.flash.append(message)
    return RedirectResponse(back, status_code=303)


def _summary(verb: str, name: str, result: Any) -> str:
    if verb == "echo":
        a = result["answers"][0]
        return f"echo {name}: {'ok' if a['probe']['ok'] else 'FAILED'} {a['probe']['text']}"
    if verb == "retry":
        moved = sum(r["moved"] for r in result["destinations"])
        return f"retry {name}: moved {moved} instance(s) back to outgoing/{name}/"
    if verb == "resend":
        return (f"resend to {name}: queued {result['queued']} instance(s), "
                f"{result['already']} already queued there")
    changed = "" if result.get("changed") else " (nothing to change)"
    return f"{verb} {name}: done{changed}"


async def purge(request: Request) -> Response:
    who = await need(request, "act")
    form = await request.form()
    args = {k: v for k, v in form.items() if k not in ("csrf", "next")}
    args["all"] = "1"
    assert who.session is not None
    try:
        _, result = await api.run_purge(request, args, who.by)
        who.session.flash.append(result.text())
    except api.ApiError as e:
        who.session.flash.append(f"purge: {e}")
    except HermesError as e:
        who.session.flash.append(f"purge: {e}")
    return RedirectResponse("/errors", status_code=303)


# ---------------------------------------------------------------- login, logout


async def login_form(request: Request, status: int = 200, message: str = "") -> Response:
    st = state_of(request)
    token = secrets.token_urlsafe(24)
    has_users = bool(await blocking(st.users.load))
    resp = render(request, "login.html", None, status=status, message=message, token=token,
                  has_users=has_users, config=str(st.cfg.path),
                  next=safe_next(request.query_params.get("next")))
    resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                    secure=st.cfg.web.tls, path="/login")
    return resp


async def login(request: Request) -> Response:
    if request.method == "GET":
        return await login_form(request)
    st = state_of(request)
    form = await request.form()
    sent = str(form.get("login_token") or "")
    if (not sent or sent != request.cookies.get(LOGIN_COOKIE)
            or not origin_ok(request, st.allowed_hosts)):
        return await login_form(request, 403, "The form expired or came from another site; "
                                              "try again.")
    name = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    client = request.client.host if request.client else "?"
    keys = (f"ip:{client}", f"user:{name}")
    wait = st.throttle.wait(*keys)
    if wait > 0:
        return await login_form(request, 429, f"Too many failed logins: try again in "
                                              f"{human_age(wait)}.")
    async with st.verifiers:
        user = await blocking(st.users.verify, name, password)
    if user is None:
        st.throttle.failed(*keys)
        LOGIN_LOG.warning("web login failed for %r from %s", name, client)
        return await login_form(request, 401, "Wrong user name or password.")
    st.throttle.succeeded(name)
    session = st.sessions.create(user)
    LOGIN_LOG.info("web login %r (%s) from %s", user.name, user.role, client)
    resp = RedirectResponse(safe_next(form.get("next")), status_code=303)
    resp.set_cookie(COOKIE, session.sid, httponly=True, samesite="strict",
                    secure=st.cfg.web.tls, path="/")
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


async def logout(request: Request) -> Response:
    who = await need(request, "read")
    if who.session is not None:
        state_of(request).sessions.revoke(who.session.sid)
        LOGIN_LOG.info("web logout %r", who.name)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


def routes() -> list[BaseRoute]:
    return [
        Route("/", dashboard),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/destinations/{name}", destination),
        *[Route(f"/destinations/{{name}}/{verb}", api.verb_endpoint(action, verb),
                methods=["POST"]) for verb in api.VERBS],
        Route("/instances/{name}", instance),
        Route("/instances/{name}/rules", rules_page),
        Route("/find", find_page),
        Route("/errors", errors),
        Route("/events", events),
        Route("/purge", purge, methods=["POST"]),
    ]
