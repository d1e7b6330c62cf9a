"""The ``hermes-py`` verbs: parse, load the config, call one function, print.

Each verb lives in the module that owns it; this file only wires argparse to
them, so every error a user can cause (missing config, unknown destination, no
spool) comes out as one line and exit code 2, the same for every verb.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hermes_py import __version__, log
from hermes_py.config import DEFAULT_CONFIG, ConfigError, Settings, load, parse
from hermes_py.errors import HermesError
from hermes_py.spool import Spool

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
    add("route", "run only the router (incoming/ and drop/ -> outboxes)")
    d = add("dispatch", "run only the dispatcher of one destination")
    d.add_argument("name", help="destination name from rules.toml")
    add("clean", "run only the cleaner (old success/ and discard/ entries, stale temp files)")

    s = add("status", "queues per destination, counts per folder, free space")
    s.add_argument("--json", action="store_true", help="machine-readable output")
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
    sd = add("send", "put files and folders into the spool safely (works with serve stopped)")
    sd.add_argument("paths", nargs="+", type=Path)
    sd.add_argument("--no-progress", action="store_true")

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
    if v == "route":
        from hermes_py import router
        return router.run(cfg)
    if v == "dispatch":
        if args.name not in cfg.destinations:
            raise HermesError(_unknown_dest(cfg, args.name))
        from hermes_py import dispatcher
        return dispatcher.run(cfg, args.name)
    if v == "clean":
        from hermes_py import cleaner
        return cleaner.run(cfg)
    if v == "rules":
        from hermes_py import rules
        if args.rules_verb == "check":
            return rules.check(cfg)
        return rules.dry_run(cfg, args.files)

    from hermes_py import admin
    name = getattr(args, "name", None)
    if name and v in ("retry", "hold", "release", "flush", "echo", "purge") \
            and name not in cfg.destinations:
        # A destination removed from rules.toml may still have instances in error/<name>/.
        on_disk = Spool(cfg.spool.path).error_dir(name).is_dir()
        if v not in ("retry", "purge") or not on_disk:
            raise HermesError(_unknown_dest(cfg, name))
    if v == "status":
        return admin.status(cfg, as_json=args.json)
    if v == "find":
        return admin.find(cfg, args.uid, as_json=args.json)
    if v == "retry":
        return admin.retry(cfg, None if args.all else args.name, study=args.study)
    if v == "hold":
        return admin.hold(cfg, args.name)
    if v == "release":
        return admin.release(cfg, args.name)
    if v == "flush":
        return admin.flush(cfg, args.name)
    if v == "purge":
        return admin.purge(cfg, args.where, args.name, study=args.study,
                           older_than=args.older_than, everything=args.all, yes=args.yes)
    if v == "echo":
        return admin.echo(cfg, None if args.all else args.name)
    if v == "send":
        return admin.send(cfg, args.paths, progress=not args.no_progress)
    raise HermesError(f"unknown verb {v!r}")


def _unknown_dest(cfg: Settings, name: str) -> str:
    known = ", ".join(sorted(cfg.destinations)) or "none defined"
    return f"unknown destination {name!r} in {cfg.path} (defined: {known})"


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
        from hermes_py.supervisor import LAST_GOOD_ENV, SUPERVISED_ENV
        fallback = os.environ.get(LAST_GOOD_ENV)
        if not (os.environ.get(SUPERVISED_ENV) and fallback):
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
    log.setup(args.log_level, args.log_format,
              process=verb + (f":{args.name}" if verb == "dispatch" else ""))
    if os.environ.get("HERMES_PY_SUPERVISOR_PID"):
        from hermes_py.supervisor import child_setup
        child_setup()
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
