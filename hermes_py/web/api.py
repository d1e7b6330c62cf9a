"""``/api/v1``: the admin functions' results as JSON, for scripts and for the page's feed.

The bodies are exactly what ``status --json`` and ``find --json`` print (the same
``to_json()``), so one parser serves both faces. Errors are
``{"error": code, "detail": sentence}``: 401 without credentials, 403 for a role
that may not (or a cookie request without its CSRF token), 404 for an unknown
destination or name, 409 when a purge's ``expect_count`` is not what matches now.
Actions (hold, release, flush, echo, retry, resend, purge) are one route each, so the
route table is the list of what may be done; openapi.json and the role tests are
checked against it.
CSV (``?format=csv`` or ``Accept: text/csv``) neutralises cells a spreadsheet would
run as a formula: a calling AE title or a remote error text is the sender's to choose.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from hermes_py.admin import echo, find, queue, resend
from hermes_py.admin.queue import Purged
from hermes_py.web import data, feed
from hermes_py.web.auth import Principal
from hermes_py.web.state import blocking, need, state_of

STATIC = Path(__file__).parent / "static"
VERBS = ("hold", "release", "flush", "echo", "retry", "resend")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.body = {"error": error, "detail": detail, **extra}


def known(request: Request, name: str) -> None:
    if name not in state_of(request).cfg.destinations:
        raise ApiError(404, "not_found", f"unknown destination {name!r}")


async def body(request: Request) -> dict[str, Any]:
    """A JSON object body, a form, or nothing at all."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            got = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not valid JSON") from None
        if not isinstance(got, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return got
    if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return {k: v for k, v in (await request.form()).items() if k != "csrf"}
    return {}


def int_param(value: Any, name: str, default: int | None = None) -> int:
    if value in (None, "") and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", f"{name} must be an integer") from None


async def get_status(request: Request) -> Response:
    await need(request, "read")
    result = await blocking(state_of(request).status)
    return JSONResponse(result.to_json())


async def get_destination(request: Request) -> Response:
    await need(request, "read")
    name = request.path_params["name"]
    result = await blocking(state_of(request).status)
    row = result.to_json()["destinations"].get(name)
    if row is None:
        raise ApiError(404, "not_found", f"unknown destination {name!r}")
    return JSONResponse({"destination": name, **row})


_CSV_COLUMNS = ("name", "folder", "sop_instance_uid", "study_instance_uid",
                "series_instance_uid", "calling_ae", "attempts", "last_attempt", "reason")


def neutralise(cell: str) -> str:
    """OWASP: a cell starting with = + - @ tab or CR is a formula to a spreadsheet."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def to_csv(page: data.Page) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(_CSV_COLUMNS)
    for r in page.rows:
        s = r.sidecar
        reason = (s.get("error") or {}).get("reason") or (s.get("last_error") or {}).get("reason")
        values = [r.name, r.folder, s.get("sop_instance_uid"), s.get("study_instance_uid"),
                  s.get("series_instance_uid"), s.get("calling_ae"), s.get("attempts"),
                  s.get("last_attempt"), reason]
        w.writerow([neutralise("" if v is None else str(v)) for v in values])
    return out.getvalue()


async def get_instances(request: Request) -> Response:
    await need(request, "read")
    name = request.path_params["name"]
    known(request, name)
    q = request.query_params
    where = q.get("in", "outgoing")
    if where not in data.WHERE:
        raise ApiError(400, "bad_request", f"in= must be one of {', '.join(data.WHERE)}")
    limit = int_param(q.get("limit"), "limit", data.DEFAULT_LIMIT)
    st = state_of(request)
    page = await blocking(data.page, st.spool, name, where, q.get("after", ""), limit)
    if q.get("format") == "csv" or "text/csv" in request.headers.get("accept", ""):
        return Response(to_csv(page), media_type="text/csv; charset=utf-8")
    return JSONResponse(page.to_json())


def patient_wanted(request: Request, who: Principal) -> bool:
    """``?patient=1``: an admin's audited opt-in, and only where ``[web] show_patient`` allows."""
    if request.query_params.get("patient") not in ("1", "true", "yes"):
        return False
    if not state_of(request).cfg.web.show_patient:
        raise ApiError(403, "forbidden", "patient name and ID are off on this router "
                                         "([web] show_patient = true turns them on)")
    if not who.may("act"):
        raise ApiError(403, "forbidden", "only an admin may see patient name and ID")
    return True


async def get_instance(request: Request) -> Response:
    who = await need(request, "read")
    name = request.path_params["name"]
    found = await blocking(data.copies, state_of(request).spool, name)
    if not found.copies:
        raise ApiError(404, "not_found", f"no instance named {name!r} in the spool")
    out = found.to_json()
    if patient_wanted(request, who):
        out["patient"] = await blocking(data.patient, found, name, who.by)
    return JSONResponse(out)


async def get_rules(request: Request) -> Response:
    await need(request, "read")
    name = request.path_params["name"]
    st = state_of(request)
    tested = await blocking(data.dry_run, st.cfg, st.spool, name)
    if tested is None:
        raise ApiError(404, "not_found", f"no instance named {name!r} in the spool")
    return JSONResponse({"name": name, **tested.to_json()})


async def get_find(request: Request) -> Response:
    await need(request, "read")
    uid = request.query_params.get("uid", "").strip()
    if not uid:
        raise ApiError(400, "bad_request", "find needs ?uid=")
    result = await blocking(find.find, state_of(request).cfg, uid)
    return JSONResponse(result.to_json())


async def get_events(request: Request) -> Response:
    await need(request, "read")
    q = request.query_params
    raw = q.get("since") or request.headers.get("last-event-id")
    since = None if raw in (None, "") else int_param(raw, "since")
    follow = q.get("follow", "1") not in ("0", "false", "no")
    gen = feed.stream(request, state_of(request).feed, since, q.get("destination") or None,
                      follow)
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def act(request: Request, verb: str, name: str, args: dict[str, Any], by: str) -> Any:
    """Run one destination verb through the admin function the CLI calls; its result."""
    cfg = state_of(request).cfg
    if verb == "echo":
        return (await blocking(echo.echo, cfg, name)).to_json()
    if verb == "retry":
        study = args.get("study") or None
        return (await blocking(queue.retry, cfg, name, study=study, by=by)).to_json()
    if verb == "resend":
        names = args.get("names", args.get("name"))
        names = [names] if isinstance(names, str) and names else names or None
        if names is not None and not (isinstance(names, list)
                                      and all(isinstance(n, str) for n in names)):
            raise ApiError(400, "bad_request", "names must be a list of spool names or "
                                               "SOP Instance UIDs")
        return (await blocking(resend.resend, cfg, name, names=names,
                               study=args.get("study") or None,
                               series=args.get("series") or None,
                               source=args.get("from") or None, by=by)).to_json()
    fn = {"hold": queue.hold, "release": queue.release, "flush": queue.flush}[verb]
    return (await blocking(fn, cfg, name, by=by)).to_json()


async def post_action(request: Request, verb: str) -> Response:
    who = await need(request, "act")
    name = request.path_params["name"]
    known(request, name)
    result = await act(request, verb, name, await body(request), who.by)
    state_of(request).forget_status()
    return JSONResponse({"destination": name, "verb": verb, "by": who.by, "result": result})


def verb_endpoint(handler: Callable[[Request, str], Awaitable[Response]],
                  verb: str) -> Callable[[Request], Awaitable[Response]]:
    """One route per verb (not ``/{verb}``): the route table is then the list of what may
    be done, which the role tests and openapi.json are both checked against."""
    async def endpoint(request: Request) -> Response:
        return await handler(request, verb)
    endpoint.__name__ = f"{verb}_{handler.__name__}"
    return endpoint


async def run_purge(request: Request, args: dict[str, Any], by: str) -> tuple[int, Purged]:
    """A purge whose count the caller confirmed: list first, delete only if the count holds.

    The count is a confirmation that the caller saw what they delete, not a lock: an
    instance that lands in between is deleted too only if it matches the same selection.
    """
    where = str(args.get("where") or "error")
    dest = str(args.get("destination") or "") or None
    study = str(args.get("study") or "") or None
    older = str(args.get("older_than") or "") or None
    everything = str(args.get("all", "")).lower() in ("1", "true", "yes", "on")
    if "expect_count" not in args:
        raise ApiError(400, "bad_request", "purge needs expect_count: the number of instances "
                                           "you expect to delete (list them first)")
    expect = int_param(args.get("expect_count"), "expect_count")
    cfg = state_of(request).cfg

    def listed() -> Purged:
        return queue.purge(cfg, where, dest, study=study, older_than=older,
                           everything=everything, yes=False, by=by)
    dry = await blocking(listed)
    if len(dry.instances) != expect:
        raise ApiError(409, "count_mismatch", f"{len(dry.instances)} instance(s) in "
                                              f"{dry.folder}/ match, not {expect}: nothing "
                                              "deleted", count=len(dry.instances))

    def deleted() -> Purged:
        return queue.purge(cfg, where, dest, study=study, older_than=older,
                           everything=everything, yes=True, by=by)
    result = await blocking(deleted)
    state_of(request).forget_status()
    return expect, result


async def post_purge(request: Request) -> Response:
    who = await need(request, "act")
    _, result = await run_purge(request, await body(request), who.by)
    return JSONResponse({"by": who.by, "result": result.to_json()})


async def openapi(request: Request) -> Response:
    return FileResponse(STATIC / "openapi.json", media_type="application/json")


def routes() -> list[BaseRoute]:
    p = "/api/v1"
    return [
        Route(f"{p}/status", get_status),
        Route(f"{p}/destinations/{{name}}", get_destination),
        Route(f"{p}/destinations/{{name}}/instances", get_instances),
        *[Route(f"{p}/destinations/{{name}}/{verb}", verb_endpoint(post_action, verb),
                methods=["POST"]) for verb in VERBS],
        Route(f"{p}/instances/{{name}}", get_instance),
        Route(f"{p}/instances/{{name}}/rules", get_rules),
        Route(f"{p}/find", get_find),
        Route(f"{p}/events", get_events),
        Route(f"{p}/purge", post_purge, methods=["POST"]),
        Route(f"{p}/openapi.json", openapi),
    ]
