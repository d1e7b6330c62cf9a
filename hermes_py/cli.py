"""The ``hermes-py`` verbs: parse, load the config, call one function, print.

Each verb lives in the module that owns it; this file only wires argparse to
them, so every error a user can cause (missing config, unknown destination, no
spool) comes out as one line and exit code 2, the same for every verb.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hermes_py import __version__, log, process
from hermes_py.config import DEFAULT_CONFIG, ConfigError, Settings, load, parse
from hermes_py.errors import HermesError
from hermes_py.spool import Spool

if TYPE_CHECKING:
    from hermes_py.admin import Result

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=DEFAULT_CONFIG, type=Path,
                        help=f"rules.toml to use (default ./{DEFAULT_CONFIG})")
    common.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--log-format", default="text", choices=["text", "json"])

    p = argparse.ArgumentParser(prog="hermes-py", description="A store-and-forward DICOM router.")
    p.add_argument("--version", action="version", version=f"hermes-py {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    add("serve", "run receiver, router, dispatchers and cleaner under one supervisor")
    add("receive", "run only the C-STORE/C-ECHO receiver")
    add("intake", "run only the drop-folder intake (drop/ -> incoming/)")
    add("route", "run only the router (incoming/ -> outboxes)")
    d = add("dispatch", "run only the dispatcher of one destination")
    d.add_argument("name", help="destination name from rules.toml")
    add("clean", "run only the cleaner (old success/ and discard/ entries, stale temp files)")
    add("web", "run only the web page and HTTP API ([web] in rules.toml)")
    add("alert", "run only the alert watcher and sender ([alerts] in rules.toml)")

    s = add("status", "queues per destination, counts per folder, free space")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--spools", metavar="A,B", help="several routers' spools at once "
                                                  "(read-only; this rules.toml's destinations)")
    f = add("find", "where every instance of a study/series/SOP Instance UID is, and its history")
    f.add_argument("uid")
    f.add_argument("--json", action="store_true")
    r = add("retry", "move instances from error/<dest>/ back to the outbox, counters reset")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("name", nargs="?", help="destination name")
    g.add_argument("--all", action="store_true", help="every destination")
    r.add_argument("--study", metavar="UID", help="only this study")
    for verb, text in (("hold", "pause a destination (instances keep queueing)"),
                       ("release", "resume a held destination"),
                       ("flush", "retry a destination now, ignoring backoff")):
        add(verb, text).add_argument("name", help="destination name")
    pg = add("purge", "delete instances from error/ or discard/ (needs --yes)")
    pg.add_argument("where", choices=["error", "discard"])
    pg.add_argument("name", nargs="?", help="destination (error/<name>/); omit for error/ itself")
    pg.add_argument("--study", metavar="UID", help="only this study")
    pg.add_argument("--older-than", metavar="DURATION", help='e.g. "7d"')
    pg.add_argument("--all", action="store_true", help="select everything in that folder")
    pg.add_argument("--yes", action="store_true", help="really delete (otherwise: list only)")
    e = add("echo", "C-ECHO destinations and report latency or the exact failure")
    ge = e.add_mutually_exclusive_group(required=True)
    ge.add_argument("name", nargs="?")
    ge.add_argument("--all", action="store_true")
    add("drain", "refuse new associations (transient) while the queues empty: out of rotation")
    add("undrain", "accept new associations again")
    ad = add("adopt", "take over the queues of another (retired or fenced) router's spool")
    ad.add_argument("path", type=Path, help="the other spool's folder")
    ad.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                    help="send the old spool's destination OLD's work to NEW (repeatable)")
    ad.add_argument("--dry-run", action="store_true", help="only count what would move")
    ad.add_argument("--json", action="store_true")
    rs = add("resend", "queue copies of instances still in the spool for a destination")
    rs.add_argument("names", nargs="*", metavar="NAME",
                    help="spool names or SOP Instance UIDs")
    rs.add_argument("--to", required=True, metavar="DEST", help="the destination to send to")
    gr = rs.add_mutually_exclusive_group()
    gr.add_argument("--study", metavar="UID", help="every instance of this study")
    gr.add_argument("--series", metavar="UID", help="every instance of this series")
    rs.add_argument("--from", dest="source", metavar="DEST",
                    help="only copies held for this destination (delivered, failed, queued)")
    sd = add("send", "put files and folders into the spool safely (works with serve stopped)")
    sd.add_argument("paths", nargs="+", type=Path)
    sd.add_argument("--no-progress", action="store_true")

    users = sub.add_parser("user", help="web users: add, passwd, del, list, token")
    usub = users.add_subparsers(dest="user_verb", required=True, metavar="VERB")
    ua = usub.add_parser("add", parents=[common], help="add a web user (password asked for)")
    ua.add_argument("user", metavar="NAME")
    ua.add_argument("--role", required=True, choices=["admin", "viewer"])
    for uv, uhelp in (("passwd", "set a web user's password (ends their sessions)"),
                      ("del", "delete a web user (ends their sessions, revokes their tokens)"),
                      ("token", "print a new API token for a web user (stored hashed)")):
        usub.add_parser(uv, parents=[common], help=uhelp).add_argument("user", metavar="NAME")
    usub.add_parser("list", parents=[common], help="list the web users")

    alerts = sub.add_parser("alerts", help="alert channels: test")
    asub = alerts.add_subparsers(dest="alerts_verb", required=True, metavar="VERB")
    asub.add_parser("test", parents=[common],
                    help="send a test alert to every channel and print each answer")

    rules = sub.add_parser("rules", help="check or dry-run rules.toml")
    rsub = rules.add_subparsers(dest="rules_verb", required=True, metavar="VERB")
    rsub.add_parser("check", parents=[common], help="validate rules.toml")
    rt = rsub.add_parser("test", parents=[common], help="which rules match these files, and why")
    rt.add_argument("files", nargs="+", type=Path)
    return p


def _run(args: argparse.Namespace, cfg: Settings) -> int:
    v = args.verb
    if v == "serve":
        from hermes_py import supervisor
        return supervisor.serve(cfg, log_level=args.log_level, log_format=args.log_format)
    if v == "receive":
        from hermes_py import receiver
        return receiver.run(cfg)
    if v == "intake":
        from hermes_py import intake
        return intake.run(cfg)
    if v == "route":
        from hermes_py import router
        return router.run(cfg)
    if v == "dispatch":
        cfg.destination(args.name)
        from hermes_py import dispatcher
        return dispatcher.run(cfg, args.name)
    if v == "clean":
        from hermes_py import cleaner
        return cleaner.run(cfg)
    if v == "web":
        from hermes_py.web import app
        return app.run(cfg)
    if v == "alert":
        from hermes_py import alerts
        return alerts.run(cfg)
    if v == "user":
        from hermes_py.web import users
        return users.cli(cfg, args.user_verb, getattr(args, "user", None),
                         getattr(args, "role", None))
    name = getattr(args, "name", None)
    if name and v in ("retry", "hold", "release", "flush", "echo", "purge") \
            and name not in cfg.destinations:
        # A destination removed from rules.toml may still have instances in error/<name>/.
        on_disk = Spool(cfg.spool.path).error_dir(name).is_dir()
        if v not in ("retry", "purge") or not on_disk:
            cfg.destination(name)
    if v == "echo":
        return _echo(cfg, None if args.all else args.name)
    return _show(_admin(args, cfg), getattr(args, "json", False))


def _admin(args: argparse.Namespace, cfg: Settings) -> Result:
    """The admin verb's result (admin/ owns what each verb does and says)."""
    from hermes_py.admin import find, queue, rules_verbs, send, status
    v = args.verb
    if v == "rules":
        if args.rules_verb == "check":
            return rules_verbs.check(cfg)
        return rules_verbs.dry_run(cfg, args.files)
    if v == "status":
        if args.spools:
            return status.statuses(cfg, [p for p in args.spools.split(",") if p])
        return status.status(cfg)
    if v == "alerts":
        from hermes_py.admin import alerts
        return alerts.test(cfg)
    if v == "find":
        return find.find(cfg, args.uid)
    if v == "retry":
        return queue.retry(cfg, None if args.all else args.name, study=args.study)
    if v == "hold":
        return queue.hold(cfg, args.name)
    if v == "release":
        return queue.release(cfg, args.name)
    if v == "flush":
        return queue.flush(cfg, args.name)
    if v == "purge":
        return queue.purge(cfg, args.where, args.name, study=args.study,
                           older_than=args.older_than, everything=args.all, yes=args.yes)
    if v == "send":
        return send.send(cfg, args.paths, progress=not args.no_progress)
    if v in ("drain", "undrain"):
        from hermes_py.admin import drain
        return drain.drain(cfg) if v == "drain" else drain.undrain(cfg)
    if v == "adopt":
        from hermes_py.admin import adopt
        return adopt.adopt(cfg, args.path, args.map, dry_run=args.dry_run)
    if v == "resend":
        from hermes_py.admin import resend
        return resend.resend(cfg, args.to, args.names, study=args.study, series=args.series,
                             source=args.source)
    raise HermesError(f"unknown verb {v!r}")


def _show(result: Result, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        print(result.text())
    return result.exit_code


def _echo(cfg: Settings, name: str | None) -> int:
    """Probe each destination, printing each answer as it comes (a timeout takes seconds)."""
    from hermes_py.admin import echo
    names = echo.targets(cfg, name)
    echo.quiet_pynetdicom()
    width = max(len(n) for n in names)
    failed = 0
    for n in names:
        answer = echo.probe_one(cfg, n)
        failed += not answer.probe.ok
        print(answer.line(width), flush=True)
    return 1 if failed else 0


def load_config(path: Path) -> Settings:
    """Load rules.toml; a child of serve falls back to the last configuration serve ran.

    Without this, a piece restarted after an invalid edit (a crash, a kill) would exit
    on the file it cannot use and stay down, although serve and its siblings keep the
    old rules running. The fallback is parsed with the real path, so relative spool
    paths resolve the same; hot reload picks up the file once it is valid again.
    """
    try:
        return load(path)
    except ConfigError as e:
        fallback = os.environ.get(process.LAST_GOOD_ENV)
        if not (process.supervised() and fallback):
            raise
        try:
            cfg = parse(Path(fallback).read_text(encoding="utf-8"), Path(path).resolve())
        except (OSError, ConfigError):
            raise e from None
        logging.getLogger("hermes_py.cli").error(
            "%s; running with the last valid configuration serve loaded", e)
        return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verb = args.verb if args.verb != "rules" else f"rules-{args.rules_verb}"
    verb = verb if verb != "user" else f"user-{args.user_verb}"
    verb = verb if verb != "alerts" else f"alerts-{args.alerts_verb}"
    log.setup(args.log_level, args.log_format,
              process=verb + (f":{args.name}" if verb == "dispatch" else ""))
    if process.supervised():
        process.child_setup()
    try:
        cfg = load_config(args.config)
        return _run(args, cfg)
    except HermesError as e:
        print(f"hermes-py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as e:
        print(f"hermes-py: error: permission denied: {e.filename or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # the last line of defence: say what failed, never a bare traceback
        logging.getLogger("hermes_py").exception("%s failed", verb)
        return 1
