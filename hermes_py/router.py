"""The router: incoming/ -> every matched outbox, pending/ (series/study holds), discard/, error/.

One router per spool: it holds ``locks/router.lock`` (flock) for life and a second
one waits as standby, so the fan-out below never races itself. It also runs the
drop-folder intake, which only ever has one writer for the same reason.

Fan-out protocol, per instance (see docs/internals.md)::

    1. decide (header read once, rules evaluated) and RECORD the decision in the
       incoming sidecar (temp, fsync, rename), fsync incoming/
    2. hard-link into each outbox / pending batch, each link with its own sidecar
       (temp, fsync, rename, then the link)
    3. fsync those folders
    4. unlink the incoming copy

A crash anywhere leaves the instance in incoming/ with either no decision (start
over: nothing was linked) or a recorded one, which a restart finishes AS RECORDED
(the rules may have changed since) without making a link that already exists or
whose instance already moved on (active/, success/, error/). So each instance ends
in every matched outbox exactly once. Each step runs over a chunk of instances
before the next starts, so the fsyncs of a step are taken together
(``spool.Writes``: the chunk's temps written, fsynced one after the other behind
one syncfs that wrote them all out, then renamed). A chunk then costs a few
journal commits instead of two per instance: those were most of the router's
time and slowed the receiver and dispatchers too (their creates and renames
wait for every commit). Instances that trickle in are let collect for GATHER
seconds first, or every chunk would hold one instance.

Series/study rules hold instances in ``pending/<key>/`` (hard links too). The
batch is released when nothing joined it for ``quiet_for``: the folder is renamed
to ``<key>@releasing-<hex>`` (so a late instance starts a new batch, never lost)
and drained into the outboxes with the same link-fsync-unlink steps. The held
state is only folders and sidecars, so it survives restarts.

The loop is asyncio: watchdog events on incoming/ are a wake-up hint, a periodic
scandir pass is the source of truth; a chunk's sidecars and headers (pydicom, stop
before the pixel data) are read in one worker-thread call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
from pydicom import config as pydicom_config

from hermes_py import config, log, rules
from hermes_py.config import ConfigError, Settings
from hermes_py.spool import (
    DCM,
    JSON,
    URGENT,
    Spool,
    Writes,
    disk_full,
    fsync_dir,
    now_iso,
    sanitize,
)

LOG = logging.getLogger(__name__)

# The full scandir of incoming/ that catches whatever watchdog missed (it can drop events).
RESCAN_INTERVAL = 5.0
# Instances per commit: their decisions, links and unlinks share one fsync per folder.
CHUNK = 64
# Longest wait for more arrivals before routing what trickles in (see Router._gather).
GATHER = 0.1
# Longest idle sleep: bounds how late a rules.toml edit or a due batch is noticed.
IDLE_TICK = 1.0
STANDBY_RETRY = 1.0
# An edited rules.toml is reloaded once its stat stopped changing for this long, so an
# editor's half-written file is not taken for the new rules.
RELOAD_SETTLE = 0.3
PAUSE_ON_DISK_FULL = 5.0
INTAKE_TICK = 0.5
RELEASING = "@releasing-"
# Fault injection for the crash tests: exit abruptly after this many links (0 = never).
CRASH_ENV = "HERMES_PY_ROUTER_CRASH_AFTER_LINKS"

# Keys that belong to one destination's copy; never inherited by another copy.
_PER_DESTINATION = ("destination", "priority", "queued_at", "attempts", "last_attempt",
                    "next_attempt", "last_error", "history", "delivered_at", "delivered_as",
                    "warnings", "error", "discard")


@dataclass
class _Batch:
    last: float  # wall-clock time the last instance joined (the folder's mtime after a restart)
    quiet_for: float

    @property
    def due(self) -> float:
        return self.last + self.quiet_for


@dataclass
class _Plan:
    dcm: Path
    sop: str
    sidecar: dict[str, Any]
    decision: rules.Decision
    recovering: bool  # the decision was recorded by an earlier run: links may exist


@dataclass
class _Commit:
    """What one chunk made durable, and what to log once it is."""

    dirs: set[Path] = field(default_factory=set)
    remove: list[Path] = field(default_factory=list)
    events: list[tuple[str, str | None, str | None, dict[str, Any]]] = field(default_factory=list)
    done: int = 0


@dataclass
class _Link:
    """One link a job makes: into ``folder``, with this sidecar, logged as ``events``."""

    folder: Path
    sidecar: dict[str, Any]
    events: list[tuple[str, str | None, str | None, dict[str, Any]]]
    hold: rules.Hold | None = None  # a pending/ batch the instance joins


@dataclass
class _Job:
    """An instance to link into folders, then remove from where it is."""

    dcm: Path
    sop: str
    sidecar: dict[str, Any]
    links: list[_Link] = field(default_factory=list)


@dataclass
class _Loaded:
    """What the worker thread read for one incoming instance."""

    dcm: Path
    sidecar: dict[str, Any]
    recorded: rules.Decision | None = None  # a decision an earlier run recorded
    recorded_error: str | None = None
    values: dict[str, Any] | None = None  # header values, when a decision is to be made
    gone: bool = False
    unreadable: str | None = None
    oserror: OSError | None = None


def _recorded(sidecar: dict[str, Any]) -> tuple[rules.Decision | None, str | None]:
    """The decision recorded in a sidecar, if it is one a restart must finish."""
    recorded = sidecar.get("routing")
    if not (isinstance(recorded, dict) and recorded.get("destinations")):
        return None, None
    try:
        decision = rules.Decision.from_routing(recorded)
    except (ValueError, KeyError, TypeError) as e:
        return None, str(e)
    return (None, None) if decision.discard else (decision, None)


def _load_chunk(paths: list[Path], keywords: Sequence[str]) -> list[_Loaded]:
    """Sidecars, and headers where a decision is to be made, of a chunk (a worker thread).

    One call per chunk: a thread hand-off per file cost the router a quarter of
    its CPU.
    """
    out = []
    for dcm in paths:
        item = _Loaded(dcm, Spool.read_json(dcm.with_suffix(JSON)))
        item.recorded, item.recorded_error = _recorded(item.sidecar)
        if item.recorded is None:
            try:
                item.values = rules.read_header(dcm, keywords)
            except FileNotFoundError:
                item.gone = True
            except rules.UnreadableError as e:
                item.unreadable = str(e)
            except OSError as e:
                item.oserror = e
        out.append(item)
    return out


def _read_sidecars(paths: list[Path]) -> list[dict[str, Any]]:
    return [Spool.read_json(p.with_suffix(JSON)) for p in paths]


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def _read_json(path: Path) -> dict[str, Any]:
    """A sidecar via aiofiles, or {} when missing/unreadable (the .dcm is what counts)."""
    try:
        async with aiofiles.open(path, "rb") as f:
            raw = await f.read()
        data = json.loads(raw)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _scanning(entries: Iterator[os.DirEntry[str]]) -> Iterator[Iterator[os.DirEntry[str]]]:
    """Close a Spool.scan generator (its scandir) even when we stop reading early."""
    try:
        yield entries
    finally:
        close = getattr(entries, "close", None)
        if close is not None:
            close()


def _copy_for(base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data = {k: v for k, v in base.items() if k not in _PER_DESTINATION}
    data.update(extra)
    return data


class Router:
    """``hermes-py route``; ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path)
        self.rules = cfg.rules
        self.keywords = rules.keywords_for(cfg.rules)
        self.active = threading.Event()  # set once this router holds the lock
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._poke_pending = False
        self._intake: Any = None
        self._batches: dict[str, _Batch] = {}
        self._unfinished: set[Path] = set()  # releasing folders still to drain
        self._made: set[Path] = set()  # folders known to exist (saves a mkdir per link)
        self._cfg_stat = _stat(cfg.path)
        self._cfg_seen: tuple[int, int, int] | None = None
        self._cfg_changed_at: float | None = None
        self._paused_until = 0.0
        self._took_over = False
        self._drain_retry_at = 0.0
        self._links = 0
        self._crash_after = int(os.environ.get(CRASH_ENV) or 0)

    # ------------------------------------------------------------ control (any thread)

    def stop(self) -> None:
        """Finish the instance in hand, commit, and return from run() with 0."""
        self._stop.set()
        intake = self._intake
        if intake is not None:
            intake.wakeup.set()  # end its wait now, not at the next tick
        self._poke()

    def reload(self) -> None:
        """Re-read rules.toml now (what SIGHUP does)."""
        self._reload.set()
        self._poke()

    def _poke(self) -> None:
        loop = self._loop
        if loop is None or self._poke_pending:
            return
        self._poke_pending = True
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(self._on_poke)

    def _on_poke(self) -> None:
        self._poke_pending = False
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        previous = pydicom_config.settings.reading_validation_mode
        # Vendor headers are often slightly off; warnings per instance are noise and cost.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        try:
            return asyncio.run(self._main())
        finally:
            pydicom_config.settings.reading_validation_mode = previous

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        installed = self._install_signals()
        lock = self.spool.lock("router")
        try:
            if not await self._acquire(lock):
                return 0
            try:
                self.active.set()
                await self._serve()
            finally:
                lock.release()
        finally:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
            self._loop = None
        LOG.info("router stopped")
        return 0

    def _install_signals(self) -> list[int]:
        if threading.current_thread() is not threading.main_thread() or self._loop is None:
            return []  # a router run in a thread (tests) is stopped with stop()
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGHUP: self.reload}
        for sig, fn in handlers.items():
            self._loop.add_signal_handler(sig, fn)
        return list(handlers)

    async def _acquire(self, lock: Any) -> bool:
        standby = False
        while not self._stop.is_set():
            if lock.acquire(blocking=False):
                if standby:
                    LOG.info("router lock %s acquired: this router is now active", lock.path)
                    self._took_over = True
                return True
            if not standby:
                LOG.warning("another router is active on spool %s (%s is locked): waiting as "
                            "standby", self.spool.root, lock.path)
                standby = True
            self._clear_wake()
            await self._sleep(STANDBY_RETRY)
        return False

    async def _serve(self) -> None:
        if self._took_over:
            # A standby may have waited for hours: take over with today's rules.
            self._do_reload("taking over from another router")
        self.spool.ensure(list(self.cfg.destinations))
        self.spool.use_private_tmp()  # its creates never queue behind the receiver's
        observer = self._watch()
        intake = self._make_intake()
        intake_task = asyncio.create_task(self._intake_loop(intake)) if intake else None
        LOG.info("router active on %s: %d rule(s), %d destination(s), intake %s",
                 self.spool.root, len(self.rules), len(self.cfg.destinations),
                 "on" if intake else "off")
        try:
            self._sweep_incoming_leftovers()
            await self._recover_pending()
            await self._work()
        finally:
            self._stop.set()
            if intake_task is not None:
                with contextlib.suppress(Exception):
                    await intake_task
            if intake is not None:
                try:
                    await asyncio.to_thread(intake.stop)
                except Exception:
                    LOG.exception("drop-folder intake did not stop cleanly")
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.spool.release_private_tmp()

    def _clear_wake(self) -> None:
        if self._wake is not None:
            self._wake.clear()

    async def _sleep(self, timeout: float) -> bool:
        """Wait for a poke (stop, reload, a new file) or the timeout; True if poked."""
        assert self._wake is not None
        if timeout <= 0:
            return self._wake.is_set()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _work(self) -> None:
        next_scan = 0.0
        woken = True
        behind = True  # at start: route what is there at once
        while not self._stop.is_set():
            self._check_reload()
            now = time.monotonic()
            paused = now < self._paused_until
            if not paused and (woken or now >= next_scan):
                if not behind:
                    await self._gather()
                self._clear_wake()
                routed = await self._pass()
                # Something was routed: more may have arrived unseen, look again at once.
                next_scan = time.monotonic() + (0.0 if routed else RESCAN_INTERVAL)
                behind = routed >= CHUNK
            elif paused and woken:
                self._clear_wake()  # remembered: a pass follows the pause
                next_scan = min(next_scan, self._paused_until)
            await self._release_due()
            if self._stop.is_set():
                break
            timeout = min(IDLE_TICK, max(next_scan, self._paused_until) - time.monotonic())
            if self._batches:
                timeout = min(timeout, min(b.due for b in self._batches.values()) - time.time())
            if self._cfg_changed_at is not None:
                timeout = min(timeout, RELOAD_SETTLE)
            woken = await self._sleep(max(0.0, timeout))

    async def _gather(self) -> None:
        """Let instances arriving one by one collect for GATHER seconds before a pass.

        A pass pays a few flushes whatever its size (see _route_chunk): routing
        each instance the moment it lands would pay them per instance, in
        journal commits that the receiver's own fsyncs then queue behind. A
        backlog (a full chunk routed) is routed without this pause.
        """
        end = time.monotonic() + GATHER
        while not self._stop.is_set() and not self._reload.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.02))

    # ------------------------------------------------------------ hints: watchdog, intake

    def _watch(self) -> Any:
        """watchdog on incoming/: only a hint to scan now; the periodic pass is the truth.

        Only creations and renames are asked for: by default inotify also reports
        every open, close, attribute change and unlink, about ten events per
        instance here (the router's own reads, its links, its unlinks), and
        watchdog's handling of them cost the router a quarter of its CPU.
        """
        try:
            from watchdog.events import (
                FileCreatedEvent,
                FileMovedEvent,
                FileSystemEvent,
                FileSystemEventHandler,
            )
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - a dependency; rescans still work
            LOG.warning("watchdog is not installed: incoming/ is rescanned every %gs",
                        RESCAN_INTERVAL)
            return None
        poke = self._poke

        class _Hint(FileSystemEventHandler):
            def on_created(self, event: FileSystemEvent) -> None:
                if str(event.src_path).endswith(DCM):
                    poke()

            def on_moved(self, event: FileSystemEvent) -> None:
                if str(event.dest_path).endswith(DCM):
                    poke()

        observer = Observer()
        try:
            observer.schedule(_Hint(), str(self.spool.incoming), recursive=False,
                              event_filter=[FileCreatedEvent, FileMovedEvent])
            observer.daemon = True
            observer.start()
        except OSError as e:  # inotify watch limit and friends
            LOG.warning("cannot watch %s (%s): relying on rescans every %gs",
                        self.spool.incoming, e, RESCAN_INTERVAL)
            return None
        return observer

    def _make_intake(self) -> Any:
        if not self.cfg.intake.enabled:
            return None
        try:
            module = importlib.import_module("hermes_py.intake")
        except ImportError as e:
            LOG.warning("drop-folder intake is not available (%s): %s is not watched",
                        e, self.spool.drop)
            return None
        try:
            intake = module.DropIntake(self.spool, self.cfg.intake)
            intake.start()
        except Exception:
            # Routing what is already in incoming/ matters more than the drop folder.
            LOG.exception("drop-folder intake failed to start: %s is not watched",
                          self.spool.drop)
            return None
        self._intake = intake
        return intake

    async def _intake_loop(self, intake: Any) -> None:
        """``wakeup.clear(); poll(); wakeup.wait(next_check())`` in a worker thread.

        poll() may copy a big file: in a thread it never stalls routing, and the
        files it publishes wake the router through the incoming/ watch.
        """
        wakeup: threading.Event = intake.wakeup
        while not self._stop.is_set():
            wakeup.clear()
            try:
                accepted = await asyncio.to_thread(intake.poll)
            except Exception:
                LOG.exception("drop-folder intake failed; retrying in 5 s")
                await asyncio.to_thread(self._stop.wait, 5.0)
                continue
            if accepted:
                self._poke()
            next_check = getattr(intake, "next_check", None)
            wait = min(IDLE_TICK, next_check()) if next_check is not None else INTAKE_TICK
            await asyncio.to_thread(wakeup.wait, wait)

    # ------------------------------------------------------------ hot reload

    def _check_reload(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self._cfg_changed_at = None
            self._do_reload("SIGHUP")
            return
        st = _stat(self.cfg.path)
        if st == self._cfg_stat:
            self._cfg_changed_at = None
            return
        now = time.monotonic()
        if self._cfg_changed_at is None or st != self._cfg_seen:
            self._cfg_changed_at, self._cfg_seen = now, st
        elif now - self._cfg_changed_at >= RELOAD_SETTLE:
            self._cfg_changed_at = None
            self._do_reload("file changed")

    def _do_reload(self, why: str) -> None:
        path = self.cfg.path
        self._cfg_stat = _stat(path)
        try:
            new = config.load(path)
        except ConfigError as e:
            LOG.error("rules not reloaded (%s), the previous rules stay in effect: %s", why, e)
            return
        if new.spool.path.resolve() != self.cfg.spool.path.resolve():
            LOG.warning("[spool] path changed in %s: takes effect after a restart", path)
            new = dataclasses.replace(new, spool=self.cfg.spool)
        if new.intake != self.cfg.intake:
            LOG.warning("[intake] changed in %s: takes effect after a restart", path)
        self.cfg = new
        self.rules = new.rules
        self.keywords = rules.keywords_for(new.rules)
        self.spool.ensure(list(new.destinations))
        LOG.info("reloaded %s (%s): %d rule(s), %d destination(s)", path, why,
                 len(new.rules), len(new.destinations))

    # ------------------------------------------------------------ incoming/

    async def _pass(self) -> int:
        """Route everything one scandir of incoming/ yields; returns how many left it.

        The scan is consumed lazily in chunks, never sorted or held in memory, so a
        backlog of any size costs the same per instance.
        """
        done = 0
        chunk: list[Path] = []
        with _scanning(self.spool.scan(self.spool.incoming)) as entries:
            for entry in entries:
                chunk.append(Path(entry.path))
                if len(chunk) < CHUNK:
                    continue
                done += await self._route_chunk(chunk)
                chunk = []
                if self._stop.is_set() or time.monotonic() < self._paused_until:
                    return done
                self._check_reload()
                await self._release_due()
            if chunk:
                done += await self._route_chunk(chunk)
        return done

    def _pause(self, err: OSError) -> None:
        LOG.error("spool %s is full (%s): routing paused for %gs", self.spool.root,
                  err.strerror or err, PAUSE_ON_DISK_FULL)
        self._paused_until = time.monotonic() + PAUSE_ON_DISK_FULL

    async def _route_chunk(self, paths: list[Path]) -> int:
        """Decide, record, link and commit one chunk (see the module docstring).

        The chunk's sidecars and headers are read in ONE worker-thread call, and
        its writes go through two ``Writes`` batches (decisions, then outbox
        sidecars), each fsynced together, in the same order as before:
        decisions durable, then links durable, then the incoming copies go.
        """
        commit = _Commit()
        loaded = await asyncio.to_thread(_load_chunk, paths, self.keywords)
        decisions = self.spool.writes()
        plans: list[_Plan] = []
        for item in loaded:
            if self._stop.is_set():
                break
            try:
                plan = self._decide(item, decisions, commit)
            except OSError as e:
                if disk_full(e):
                    self._pause(e)
                    break
                LOG.warning("cannot route %s now (%s); it stays in incoming/ for the next pass",
                            item.dcm.name, e)
                continue
            if plan is not None:
                plans.append(plan)
        if len(decisions):
            try:
                decisions.commit()
                fsync_dir(self.spool.incoming)  # the decisions are durable before any link
            except OSError as e:
                # Not recorded (or not durably): link none of them; the next pass decides again.
                plans = [p for p in plans if p.recovering]
                if disk_full(e):
                    self._pause(e)
                else:
                    LOG.warning("cannot record routing decisions now (%s); the instances stay "
                                "in incoming/ for the next pass", e)
        jobs: list[_Job] = []
        for plan in plans:
            try:
                jobs.append(self._fan_out(plan, commit))
            except OSError as e:  # an outbox folder that cannot be made
                if disk_full(e):
                    self._pause(e)
                    break
                LOG.warning("cannot link %s now (%s); the recorded decision is finished on "
                            "the next pass", plan.dcm.name, e)
        self._link_all(jobs, commit)
        self._commit(commit)
        return commit.done

    def _decide(self, item: _Loaded, decisions: Writes, commit: _Commit) -> _Plan | None:
        dcm, sidecar = item.dcm, item.sidecar
        sop = str(sidecar.get("sop_instance_uid") or "") or None
        if item.recorded_error is not None:
            LOG.warning("%s: recorded routing decision unreadable (%s): deciding again",
                        dcm.name, item.recorded_error)
        if item.recorded is not None:
            return _Plan(dcm, sop or dcm.stem, sidecar, item.recorded, recovering=True)
        if item.gone:
            return None  # gone meanwhile (an admin moved it): nothing to do
        if item.oserror is not None:
            raise item.oserror
        if item.unreadable is not None:
            self._quarantine(dcm, item.unreadable, sidecar, commit, sop)
            return None
        values = item.values or {}
        sop = sop or values.get("SOPInstanceUID") or dcm.stem
        decision = rules.evaluate(self.rules, {**values, **rules.receive_facts(sidecar)})
        sidecar.setdefault("name", dcm.name[: -len(DCM)])
        sidecar.setdefault("sop_instance_uid", values.get("SOPInstanceUID"))
        sidecar.setdefault("sop_class_uid", values.get("SOPClassUID"))
        sidecar["study_instance_uid"] = values.get("StudyInstanceUID")
        sidecar["series_instance_uid"] = values.get("SeriesInstanceUID")
        sidecar["routing"] = decision.to_routing(now_iso())
        if decision.discard:
            self._discard(dcm, sidecar, decision, commit, sop)
            return None
        decisions.write_json(dcm.with_suffix(JSON), sidecar)  # recorded BEFORE linking
        return _Plan(dcm, sop, sidecar, decision, recovering=False)

    def _discard(self, dcm: Path, sidecar: dict[str, Any], decision: rules.Decision,
                 commit: _Commit, sop: str) -> None:
        data = dict(sidecar)
        data["discard"] = {"reason": decision.reason, "rule": decision.discarded_by,
                           "at": now_iso()}
        try:
            self.spool.move(dcm, self.spool.discard, sidecar=data)
        except FileNotFoundError:
            return
        commit.dirs.add(self.spool.discard)
        commit.done += 1
        commit.events.append(("discarded", sop, None, {"reason": decision.reason,
                                                       "name": dcm.stem}))

    def _quarantine(self, dcm: Path, reason: str, sidecar: dict[str, Any], commit: _Commit,
                    sop: str | None) -> None:
        try:
            dst = self.spool.quarantine(dcm, reason, "route", sidecar=sidecar)
        except FileNotFoundError:
            return
        commit.done += 1
        # quarantine() made it durable already: say so now, not after the chunk.
        log.event(LOG, "error", sop, None, level=logging.ERROR, reason=reason,
                  name=dst.stem)

    def _folder(self, path: Path, commit: _Commit) -> Path:
        if path not in self._made:
            try:
                path.mkdir()
                commit.dirs.add(path.parent)  # the new folder's own entry must be durable
            except FileExistsError:
                pass
            except FileNotFoundError:
                path.mkdir(parents=True, exist_ok=True)
                commit.dirs.add(path.parent)
            self._made.add(path)
        return path

    def _fan_out(self, plan: _Plan, commit: _Commit) -> _Job:
        """The links ``plan`` still needs (a recovered plan skips those already made)."""
        at = now_iso()
        name = plan.dcm.stem
        d = plan.decision
        job = _Job(plan.dcm, plan.sop, plan.sidecar)
        for dest, prio in d.destinations.items():
            folder = self._folder(self.spool.outbox(dest, prio), commit)
            if plan.recovering and self._is_at(dest, plan.dcm.name):
                continue
            job.links.append(_Link(folder, _copy_for(
                plan.sidecar, destination=dest, priority=prio, queued_at=at, attempts=0),
                [("routed", plan.sop, dest, {"priority": prio, "rules": ",".join(d.rules),
                                             "name": name})]))
        for hold in d.holds:
            if plan.recovering and self._is_held(hold, plan.dcm.name):
                continue  # its batch was learnt from pending/ at start, or already released
            folder = self._folder(self.spool.pending / hold.key, commit)
            job.links.append(_Link(folder, _copy_for(
                plan.sidecar, hold={**hold.to_json(), "held_at": at}),
                [("held", plan.sop, dest, {"batch": hold.key,
                                           "quiet_for": f"{hold.quiet_for:g}s", "name": name})
                 for dest in hold.destinations], hold))
        return job

    def _link_all(self, jobs: list[_Job], commit: _Commit) -> None:
        """Sidecars of every link (one shared flush), then the links; a finished job's
        incoming copy is queued for removal in ``commit``.

        A job whose sidecars cannot be written is left for the next pass as a
        whole; its recorded decision is finished then.
        """
        sidecars = self.spool.writes()
        ready: list[_Job] = []
        for job in jobs:
            mark = len(sidecars)
            try:
                for link in job.links:
                    sidecars.write_json(link.folder / (job.dcm.stem + JSON), link.sidecar)
            except OSError as e:
                sidecars.rollback(mark)
                if disk_full(e):
                    self._pause(e)
                    break
                LOG.warning("cannot link %s now (%s); the recorded decision is finished on the "
                            "next pass", job.dcm.name, e)
                continue
            ready.append(job)
        try:
            sidecars.commit()
        except OSError as e:
            if disk_full(e):
                self._pause(e)
            else:
                LOG.warning("cannot write outbox sidecars now (%s); the recorded decisions are "
                            "finished on the next pass", e)
            return
        for job in ready:
            try:
                for link in job.links:
                    self.spool.link_file(job.dcm, link.folder)
                    commit.dirs.add(link.folder)
                    self._linked()
                    if link.hold is not None:
                        self._join_batch(link.hold)
                    commit.events.extend(link.events)
            except FileExistsError as e:
                # A different file already has this name in an outbox: never overwrite it.
                self._quarantine(job.dcm, f"name clash while linking: {e}", job.sidecar,
                                 commit, job.sop)
                continue
            except OSError as e:
                if disk_full(e):
                    self._pause(e)
                    break
                LOG.warning("cannot link %s now (%s); the recorded decision is finished on the "
                            "next pass", job.dcm.name, e)
                continue
            commit.remove.append(job.dcm)
            commit.done += 1

    def _linked(self) -> None:
        self._links += 1
        if self._crash_after and self._links >= self._crash_after:
            LOG.critical("%s=%d reached: exiting abruptly (fault injection)", CRASH_ENV,
                         self._crash_after)
            os._exit(70)

    def _is_at(self, dest: str, fname: str) -> bool:
        """Whether ``dest`` already has this instance (queued, claimed, delivered or failed).

        Checked in the order an instance moves (outbox -> active -> success/error),
        so a dispatcher moving it during the checks cannot make it look absent.
        """
        sp = self.spool
        if (sp.outbox(dest) / fname).exists() or (sp.outbox(dest, URGENT) / fname).exists():
            return True
        try:
            with os.scandir(sp.active / sanitize(dest)) as it:
                workers = [e.path for e in it if e.is_dir()]
        except FileNotFoundError:
            workers = []
        if any(os.path.exists(os.path.join(w, fname)) for w in workers):
            return True
        return (sp.success_dir(dest) / fname).exists() or (sp.error_dir(dest) / fname).exists()

    def _is_held(self, hold: rules.Hold, fname: str) -> bool:
        if (self.spool.pending / hold.key / fname).exists():
            return True
        if any((f / fname).exists() for f in self._releasing(hold.key)):
            return True
        return any(self._is_at(dest, fname) for dest in hold.destinations)

    def _releasing(self, key: str) -> list[Path]:
        try:
            with os.scandir(self.spool.pending) as it:
                return [Path(e.path) for e in it if e.name.startswith(key + RELEASING)]
        except FileNotFoundError:
            return []

    def _commit(self, commit: _Commit) -> None:
        """Links durable, then the copies they replace removed, then the log lines."""
        for d in commit.dirs:
            fsync_dir(d)
        parents = set()
        for dcm in commit.remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dcm)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dcm.with_suffix(JSON))
            parents.add(dcm.parent)
        for p in parents:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(p)
        for what, sop, dest, fields in commit.events:
            log.event(LOG, what, sop, dest, **fields)

    def _sweep_incoming_leftovers(self) -> None:
        """Remove sidecars a crash left in incoming/ between unlinking a .dcm and its .json.

        Only sidecars with a recorded routing decision go: only the router writes
        one, so a reception in progress (sidecar published before its .dcm) is safe.
        Runs once at start; costs one scandir.
        """
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.spool.incoming) as it:
            for e in it:
                if not e.name.endswith(JSON) or os.path.exists(e.path[: -len(JSON)] + DCM):
                    continue
                if "routing" in Spool.read_json(Path(e.path)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        removed += 1
        if removed:
            LOG.info("removed %d sidecar(s) of already routed instances from %s", removed,
                     self.spool.incoming)

    # ------------------------------------------------------------ pending/ (held batches)

    def _join_batch(self, hold: rules.Hold) -> None:
        b = self._batches.get(hold.key)
        if b is None:
            self._batches[hold.key] = _Batch(time.time(), hold.quiet_for)
        else:
            b.last = time.time()
            b.quiet_for = hold.quiet_for

    async def _recover_pending(self) -> None:
        """At start: learn the held batches from disk and finish interrupted releases."""
        try:
            with os.scandir(self.spool.pending) as it:
                folders = [(e.name, Path(e.path), e.stat().st_mtime) for e in it if e.is_dir()]
        except FileNotFoundError:
            return
        for name, path, mtime in folders:
            if RELEASING in name:
                self._unfinished.add(path)
                continue
            quiet_for = await self._batch_quiet_for(path)
            if quiet_for is None:
                with contextlib.suppress(OSError):
                    path.rmdir()  # an empty batch folder left by a crash
                continue
            self._batches[name] = _Batch(mtime, quiet_for)
        if self._batches or self._unfinished:
            LOG.info("pending/: %d held batch(es), %d interrupted release(s) to finish",
                     len(self._batches), len(self._unfinished))
        await self._drain_unfinished()

    async def _batch_quiet_for(self, folder: Path) -> float | None:
        with _scanning(self.spool.scan(folder)) as entries:
            first = next(entries, None)
        if first is None:
            return None
        hold = (await _read_json(Path(first.path).with_suffix(JSON))).get("hold")
        try:
            return rules.Hold.from_json(hold).quiet_for
        except (ValueError, KeyError, TypeError):
            return 60.0

    async def _release_due(self) -> None:
        if time.monotonic() < self._paused_until:
            return
        await self._drain_unfinished()
        now = time.time()
        for key, b in list(self._batches.items()):
            if self._stop.is_set():
                return
            if b.due <= now:
                await self._release(key)

    async def _drain_unfinished(self) -> None:
        if time.monotonic() < self._drain_retry_at:
            return
        for folder in sorted(self._unfinished):
            if self._stop.is_set() or time.monotonic() < self._paused_until:
                return
            await self._drain(folder, recovering=True)

    async def _release(self, key: str) -> None:
        src = self.spool.pending / key
        dst = self.spool.pending / f"{key}{RELEASING}{secrets.token_hex(4)}"
        self._batches.pop(key, None)
        self._made.discard(src)
        try:
            self.spool.rename_folder(src, dst)
        except FileNotFoundError:
            return
        except OSError as e:
            LOG.error("cannot release held batch %s (%s); retrying in %gs", key, e,
                      RESCAN_INTERVAL)
            self._batches[key] = _Batch(time.time() + RESCAN_INTERVAL, 0.0)
            return
        await self._drain(dst, recovering=False)

    async def _drain(self, folder: Path, recovering: bool) -> None:
        """Move a released batch into its outboxes; the folder goes when it is empty."""
        self._unfinished.add(folder)
        try:
            with _scanning(self.spool.scan(folder)) as entries:
                while not self._stop.is_set():
                    paths = [Path(e.path) for e in itertools.islice(entries, CHUNK)]
                    if not paths:
                        break
                    sidecars = await asyncio.to_thread(_read_sidecars, paths)
                    commit = _Commit()
                    try:
                        jobs = [job for dcm, sidecar in zip(paths, sidecars, strict=True)
                                if (job := self._release_one(dcm, sidecar, commit, recovering))]
                        self._link_all(jobs, commit)
                    finally:
                        self._commit(commit)
                    if time.monotonic() < self._paused_until:
                        return
        except OSError as e:
            if disk_full(e):
                self._pause(e)
            else:
                LOG.error("releasing %s failed (%s); retrying in %gs", folder.name, e,
                          RESCAN_INTERVAL)
                self._drain_retry_at = time.monotonic() + RESCAN_INTERVAL
            return
        if self._stop.is_set():
            return
        with _scanning(self.spool.scan(folder)) as entries:
            left = next(entries, None)
        if left is not None:  # an instance that could not be linked (logged): try again
            self._drain_retry_at = time.monotonic() + RESCAN_INTERVAL
            return
        self._unfinished.discard(folder)
        self.spool.sweep_orphan_sidecars(folder, 0)
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:  # stray non-instance files: leave them to a person
            LOG.warning("released batch folder %s still holds other files (%s): left in place",
                        folder, e)

    def _release_one(self, dcm: Path, sidecar: dict[str, Any], commit: _Commit,
                     recovering: bool) -> _Job | None:
        sop = str(sidecar.get("sop_instance_uid") or dcm.stem)
        try:
            hold = rules.Hold.from_json(sidecar.get("hold"))
        except (ValueError, KeyError, TypeError) as e:
            self._quarantine(dcm, f"held instance without a readable hold record: {e}",
                             sidecar, commit, sop)
            return None
        at = now_iso()
        job = _Job(dcm, sop, sidecar)
        for dest, prio in hold.destinations.items():
            folder = self._folder(self.spool.outbox(dest, prio), commit)
            if recovering and self._is_at(dest, dcm.name):
                continue
            job.links.append(_Link(folder, _copy_for(
                sidecar, destination=dest, priority=prio, queued_at=at, attempts=0,
                hold={**sidecar["hold"], "released_at": at, "batch": dcm.parent.name}),
                [("released", sop, dest, {"priority": prio, "batch": hold.key,
                                          "name": dcm.stem})]))
        return job


def run(cfg: Settings) -> int:
    """``hermes-py route``: returns 0 on SIGTERM/SIGINT after finishing the instance in hand."""
    return Router(cfg).run()
