"""``hermes-py serve``: the pieces as child processes, restarted when they die.

Why processes and not threads: a receiver is GIL-bound, a dispatcher stuck in
a slow peer must never delay another, and a crash (or a kill -9) of one piece
must cost nothing but a restart: everything it was doing is in the spool.

The supervisor:

- holds ``locks/serve.lock`` (flock) for its life, so a second ``serve`` on the
  same spool refuses to start, and a crashed one never leaves a stale lock;
- starts ``receive`` (``[receiver] processes`` of them, sharing the port),
  ``intake`` (when ``[intake] enabled``), ``route``, one ``dispatch NAME`` per
  destination, ``clean`` and ``web`` (when ``[web] port`` is set) as
  ``python -m hermes_py VERB -c CONFIG``; they stay
  in its process group and get SIGTERM if the supervisor dies
  (PR_SET_PDEATHSIG, ``process.child_setup``), so no orphan keeps a port or a
  claim;
- restarts a child that exits, after 1, 2, 4 ... 60 s (reset once it ran a
  minute), and logs each exit and restart;
- on SIGTERM/SIGINT stops the receiver first (it stops accepting and finishes
  the C-STOREs in flight), then the others (dispatchers stop between
  instances), waits a bounded time, SIGKILLs stragglers and exits 0;
- on SIGHUP re-reads rules.toml: keeps the old one if the new one is invalid,
  forwards SIGHUP to the router (which reloads its rules), starts dispatchers
  for new destinations, stops removed ones, and restarts a piece whose own
  settings changed;
- reads the children's log lines (JSON on a pipe), turns their events back into
  ``events.Occurrence`` for its own hub (the metrics subscribe there), and writes
  every line to its stderr in the format the admin chose;
- records itself and its children in ``state/serve.json`` for ``status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from hermes_py import health, ownership
from hermes_py.alerts.aggregate import Aggregator
from hermes_py.config import Settings, parse
from hermes_py.errors import HermesError
from hermes_py.events import Hub, Occurrence
from hermes_py.log import local_stamp, text_line, write_line
from hermes_py.metrics import Counters, MetricsServer
from hermes_py.process import LAST_GOOD_ENV, SUPERVISED_ENV, start_thread
from hermes_py.spool import Spool, now_iso
from hermes_py.spool.eventlog import EventLog

LOG = logging.getLogger(__name__)

# The text of the last rules.toml serve validated (see process.LAST_GOOD_ENV).
LAST_GOOD_FILE = "config.last-good.toml"

RESTART_MIN = 1.0
RESTART_MAX = 60.0
HEALTHY_AFTER = 60.0         # a child that ran this long restarts fast again
RECEIVER_GRACE = 30.0        # in-flight C-STOREs finish within this, or are dropped unacked
OTHERS_GRACE = 30.0          # dispatchers finish the instance they are sending
POLL = 0.2

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


@dataclass
class Child:
    """One supervised piece: its argv tail, its process, its restart bookkeeping."""

    name: str                      # "receive" (or "receive:1"...), "route", "dispatch:pacs"
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    started_at: str | None = None
    restarts: int = 0
    failures: int = 0              # consecutive short runs (drives the backoff)
    restart_at: float = 0.0
    last_exit: str | None = None
    retired: bool = False          # removed from config: do not restart
    planned: bool = False          # stopped by a reload to pick up new settings
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, cfg: Settings, log_level: str = "INFO", log_format: str = "text"):
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path)
        self.log_level = log_level.upper()
        self.log_format = log_format
        self.user_level = logging.getLevelName(self.log_level)
        if not isinstance(self.user_level, int):
            self.user_level = logging.INFO
        self.children: dict[str, Child] = {}
        self.counters = Counters()
        # The children's events, as this process learns them from their log records.
        self.events = Hub()
        self.events.connect(self.counters.observe)
        # The web child's live feed reads them back from the spool (spool/eventlog.py).
        self.event_log = EventLog(self.spool.events_log)
        self.events.connect(lambda o: self.event_log.append(o.record()))
        # serve's own alerts (gave_up, receiving_refused, process_flapping): alerts/aggregate.py
        self.alerting = Aggregator(lambda: self.cfg, lambda: self.spool)
        self.events.connect(self.alerting.observe)
        self._alerting_stop = threading.Event()
        self.metrics: MetricsServer | None = None
        self._health: health.HealthServer | None = None
        self.epoch = 0   # ownership.take() at start
        self._stop_signal: int | None = None
        self._signals = 0
        self._reload = False
        self._started_at = now_iso()
        self._metrics_url: str | None = None
        self._remember_config()

    # ------------------------------------------------------------ children

    def _wanted(self, cfg: Settings) -> dict[str, list[str]]:
        """Postfix's master.cf, from rules.toml: which children, under which names."""
        n = cfg.receiver.processes
        want = {"receive": ["receive"]} if n == 1 else {
            f"receive:{i}": ["receive"] for i in range(1, n + 1)}
        if cfg.intake.enabled:
            want["intake"] = ["intake"]
        want["route"] = ["route"]
        for name in cfg.destinations:
            want[f"dispatch:{name}"] = ["dispatch", name]
        want["clean"] = ["clean"]
        if cfg.alerts.enabled:
            want["alert"] = ["alert"]   # its own process: a slow channel never slows routing
        if cfg.web.enabled:
            want["web"] = ["web"]   # niced by itself (web/app.py): a page never slows a C-STORE
        return want

    def _argv(self, child: Child) -> list[str]:
        # Children always log JSON at INFO or finer: the events feed the metrics;
        # the supervisor applies the admin's level and format when it re-emits.
        level = self.log_level if self.user_level < logging.INFO else "INFO"
        return [sys.executable, "-m", "hermes_py", *child.args, "-c", str(self.cfg.path),
                "--log-level", level, "--log-format", "json"]

    def _start(self, child: Child) -> None:
        env = dict(os.environ)
        env[SUPERVISED_ENV] = str(os.getpid())
        env[ownership.EPOCH_ENV] = str(self.epoch)
        if (self.spool.state / LAST_GOOD_FILE).exists():
            env[LAST_GOOD_ENV] = str(self.spool.state / LAST_GOOD_FILE)
        env["PYTHONUNBUFFERED"] = "1"
        # The child inherits a blocked SIGHUP until child_setup() ignores it: a reload
        # signal forwarded while it starts must not kill it. Ours is only delayed.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            child.proc = subprocess.Popen(self._argv(child), env=env, stdin=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, close_fds=True)
        except OSError as e:
            LOG.error("cannot start %s: %s", child.name, e)
            self._schedule_restart(child, time.monotonic())
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.started = time.monotonic()
        child.started_at = now_iso()
        assert child.proc.stderr is not None
        child.reader = start_thread(self._pump, f"log-{child.name}",
                                    (child.name, child.proc.stderr))
        LOG.info("started %s (pid %d)", child.name, child.proc.pid)
        self._write_state()

    def _schedule_restart(self, child: Child, now: float) -> None:
        ran = now - child.started if child.started else 0.0
        child.failures = 0 if ran >= HEALTHY_AFTER else child.failures + 1
        delay = min(RESTART_MAX, RESTART_MIN * 2 ** max(0, child.failures - 1))
        child.restart_at = now + delay
        child.restarts += 1
        self.alerting.restarted(child.name, now)
        LOG.warning("%s: restarting in %gs (restart %d)", child.name, delay, child.restarts)

    def _reap(self, now: float) -> None:
        for child in list(self.children.values()):
            if child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started
            child.last_exit = f"{_describe_exit(code)} at {now_iso()} after {ran:.1f}s"
            pid = child.proc.pid
            child.proc = None
            if child.reader is not None:
                child.reader.join(2.0)
            if child.retired:
                LOG.info("%s (pid %d) %s; not restarted (no longer configured)",
                         child.name, pid, _describe_exit(code))
                del self.children[child.name]
            elif child.planned:
                child.planned = False
                child.restart_at = now
                LOG.info("%s (pid %d) stopped for the reload; starting it again", child.name,
                         pid)
            else:
                LOG.error("%s (pid %d) %s after %.1fs", child.name, pid, _describe_exit(code),
                          ran)
                self._schedule_restart(child, now)
            self._write_state()

    # ------------------------------------------------------------ child logs

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        """Count and re-emit one child's log lines until it closes stderr."""
        try:
            for raw in iter(stream.readline, b""):
                self._emit(name, raw)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                stream.close()

    def _emit(self, name: str, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line:
            return
        rec: dict[str, Any] | None = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                rec = parsed if isinstance(parsed, dict) else None
        if rec is None:  # a traceback or other text not from our logging: pass it through
            out = line if self.log_format != "json" else json.dumps(
                {"time": now_iso(), "level": "error", "process": name, "message": line})
        else:
            occurrence = Occurrence.from_record(rec)
            if occurrence is not None:
                self.events.send(occurrence)
            level = _LEVELS.get(str(rec.get("level", "info")).lower(), logging.INFO)
            if level < self.user_level:
                return
            if self.log_format == "json":
                out = json.dumps({**rec, "process": name}, default=str)
            else:
                out = self._text(name, rec)
        write_line(out)

    @staticmethod
    def _text(name: str, rec: dict[str, Any]) -> str:
        """The same shape log.setup's text format gives the supervisor's own lines."""
        text = text_line(local_stamp(rec.get("time")), str(rec.get("level", "info")), name,
                         str(rec.get("logger", "?")), str(rec.get("message", "")))
        if rec.get("exception"):
            text += "\n" + str(rec["exception"])
        return text

    # ------------------------------------------------------------ state for `status`

    def _write_state(self, stopped: bool = False) -> None:
        data: dict[str, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(), "config": str(self.cfg.path),
            "started_at": self._started_at,
            "children": [{"name": c.name, "pid": c.proc.pid if c.alive and c.proc else None,
                          "started_at": c.started_at, "restarts": c.restarts,
                          "last_exit": c.last_exit} for c in self.children.values()],
        }
        if self._metrics_url:
            data["metrics"] = self._metrics_url
        if stopped:
            data["stopped_at"] = now_iso()
        try:
            self.spool.write_json(self.spool.serve_state, data)
        except OSError as e:
            LOG.warning("cannot write %s: %s", self.spool.serve_state, e)

    def _extra_metrics(self) -> list[str]:
        out = ["# HELP hermes_child_up 1 if the supervised process runs",
               "# TYPE hermes_child_up gauge"]
        kids = list(self.children.values())
        out += [f'hermes_child_up{{process="{c.name}"}} {1 if c.alive else 0}' for c in kids]
        out += ["# HELP hermes_child_restarts_total Restarts of a supervised process",
                "# TYPE hermes_child_restarts_total counter"]
        out += [f'hermes_child_restarts_total{{process="{c.name}"}} {c.restarts}' for c in kids]
        return out

    # ------------------------------------------------------------ signals

    def _on_stop(self, signum: int, frame: object) -> None:
        self._signals += 1
        if self._stop_signal is None:
            self._stop_signal = signum
        elif self._signals >= 2:
            # A second Ctrl-C / SIGTERM: the admin does not want to wait.
            for c in self.children.values():
                if c.alive and c.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.kill()

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload = True

    def _remember_config(self, text: str | None = None) -> None:
        """Keep the text of the configuration we run, for children restarted later."""
        try:
            if text is None:
                text = self.cfg.path.read_text(encoding="utf-8")
                parse(text, self.cfg.path)  # the file may have changed since cli loaded it
            for d in (self.spool.state, self.spool.tmp):
                d.mkdir(parents=True, exist_ok=True)
            self.spool.write_bytes_atomic(self.spool.state / LAST_GOOD_FILE, text.encode())
        except (OSError, UnicodeDecodeError, HermesError) as e:
            LOG.warning("cannot keep a copy of the running configuration: %s", e)

    def reload(self) -> None:
        """SIGHUP: apply an edited rules.toml without dropping what works."""
        self._reload = False
        try:
            text = self.cfg.path.read_text(encoding="utf-8")
            new = parse(text, self.cfg.path)
        except (OSError, UnicodeDecodeError) as e:
            LOG.error("reload: keeping the running configuration: %s: %s", self.cfg.path, e)
            return
        except HermesError as e:
            LOG.error("reload: keeping the running configuration: %s", e)
            return
        self._remember_config(text)
        old = self.cfg
        self.cfg = new
        self.spool = Spool(new.spool.path)
        if new.spool.path != old.spool.path:
            LOG.error("reload: [spool] path changed; restart serve to move to %s "
                      "(still serving %s)", new.spool.path, old.spool.path)
        self.spool.ensure(list(new.destinations))
        want = self._wanted(new)
        for name, args in want.items():
            if name not in self.children:
                LOG.info("reload: new destination, starting %s", name)
                self.children[name] = Child(name, args)
                self._start(self.children[name])
        for name, child in list(self.children.items()):
            if name in want:
                continue
            child.retired = True
            if child.alive and child.proc is not None:
                LOG.info("reload: %s is no longer configured, stopping it", name)
                child.proc.terminate()
            elif child.proc is None:
                del self.children[name]
        # Pieces whose own settings changed restart (gracefully) to pick them up;
        # the router reloads its rules itself on SIGHUP.
        changed: list[str] = []
        if new.receiver != old.receiver:
            changed += [n for n in want if n == "receive" or n.startswith("receive:")]
        for name, d in new.destinations.items():
            if name in old.destinations and old.destinations[name] != d:
                changed.append(f"dispatch:{name}")
        if new.intake != old.intake:
            changed.append("intake")
        if new.spool != old.spool:
            changed.append("clean")
        if new.web != old.web and "web" in want:
            changed.append("web")
        if new != old and "alert" in want:
            changed.append("alert")   # it reads destinations, [spool] and [alerts]
        for name in changed:
            c = self.children.get(name)
            if c is not None and c.alive and c.proc is not None:
                LOG.info("reload: settings of %s changed, restarting it", name)
                c.planned = True
                c.proc.terminate()
        r = self.children.get("route")
        if r is not None and r.alive and r.proc is not None and "route" not in changed:
            r.proc.send_signal(signal.SIGHUP)
        if (new.metrics_port, new.metrics_bind) != (old.metrics_port, old.metrics_bind):
            LOG.warning("reload: [metrics] changed; restart serve to apply it")
        LOG.info("reload: %s applied (%d destination(s))", new.path, len(new.destinations))

    # ------------------------------------------------------------ run

    def _stop_children(self) -> None:
        def stop(kids: list[Child], grace: float) -> None:
            for c in kids:
                if c.alive and c.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.terminate()
            deadline = time.monotonic() + grace
            for c in kids:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    LOG.error("%s (pid %d) did not stop within %gs; killing it", c.name,
                              c.proc.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.kill()
                    c.proc.wait()
                code = c.proc.returncode
                if code not in (0, -signal.SIGTERM):
                    LOG.warning("%s stopped: %s", c.name, _describe_exit(code))

        kids = list(self.children.values())
        receivers = [c for c in kids if c.args == ["receive"]]
        stop(receivers, RECEIVER_GRACE)
        stop([c for c in kids if c not in receivers], OTHERS_GRACE)
        for c in kids:
            if c.reader is not None:
                c.reader.join(2.0)

    def run(self) -> int:
        lock = self.spool.lock("serve")
        if not lock.acquire():
            state = self.spool.read_json(self.spool.serve_state)
            who = f" (pid {state['pid']} on {state.get('host', '?')})" if state.get("pid") else ""
            raise HermesError(f"another hermes-py serve is already running on spool "
                              f"{self.spool.root}{who}; stop it first")
        try:
            self.spool.ensure(list(self.cfg.destinations))
            self.epoch = ownership.take(self.spool)
            old_handlers = {s: signal.signal(s, self._on_stop)
                            for s in (signal.SIGTERM, signal.SIGINT)}
            old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
            try:
                return self._serve()
            finally:
                for s, h in old_handlers.items():
                    signal.signal(s, h)
        finally:
            lock.release()

    def _start_health(self) -> None:
        h = self.cfg.health
        if not h.port:
            return
        def check() -> str | None:
            return health.verdict(self.spool, self.cfg.spool.min_free_mb,
                                  {n: c.alive for n, c in self.children.items()})
        try:
            self._health = health.HealthServer(h.bind, h.port, check).start()
        except OSError as e:
            LOG.error("health: cannot listen on %s:%d (%s); serving without /healthz",
                      h.bind, h.port, e.strerror or e)

    def _serve(self) -> int:
        if self.cfg.metrics_port:
            self.metrics = MetricsServer(self.cfg, self.counters, self._extra_metrics)
            try:
                self.metrics.start()
                self._metrics_url = f"http://{self.cfg.metrics_bind}:{self.metrics.port}/metrics"
            except OSError as e:
                LOG.error("metrics: cannot listen on %s:%d (%s); serving without metrics",
                          self.cfg.metrics_bind, self.cfg.metrics_port, e.strerror or e)
                self.metrics = None
        self._start_health()
        self.alerting.start(self._alerting_stop)
        LOG.info("serving %s with spool %s (id %s, owner epoch %d): %d destination(s)%s",
                 self.cfg.path, self.spool.root, ownership.identity(self.spool), self.epoch,
                 len(self.cfg.destinations),
                 "" if self.cfg.destinations else " (nothing will be forwarded)")
        for name, args in self._wanted(self.cfg).items():
            self.children[name] = Child(name, args)
            self._start(self.children[name])
        try:
            while self._stop_signal is None:
                if self._reload:
                    self.reload()
                now = time.monotonic()
                self._reap(now)
                for c in list(self.children.values()):
                    if (c.proc is None and not c.retired and now >= c.restart_at
                            and self._stop_signal is None):
                        self._start(c)
                time.sleep(POLL)
            LOG.info("received %s: stopping (receiver first)",
                     signal.Signals(self._stop_signal).name)
            self._stop_children()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            if self._health is not None:
                self._health.stop()
                self._health = None
            self._alerting_stop.set()
            self._write_state(stopped=True)
        LOG.info("stopped")
        return 0


def serve(cfg: Settings, log_level: str = "INFO", log_format: str = "text") -> int:
    return Supervisor(cfg, log_level, log_format).run()

