"""The router: incoming/ -> every matched outbox, pending/ (series/study batches), discard/, error/.

One router per spool: it holds ``locks/router.lock`` (flock) for life and a second
one waits as standby, so the fan-out never races itself. This module is the
process: the loop, the standby, signals, the hints that wake it, and hot reload
of rules.toml. What it does to each instance is ``fanout.py``; what it does to
series/study batches is ``batches.py``.

The loop is asyncio: watchdog events on incoming/ are a wake-up hint, a periodic
scandir pass is the source of truth; a chunk's sidecars and headers (pydicom,
stop before the pixel data) are read in one worker-thread call. Instances that
trickle in are let collect for GATHER seconds first, or every chunk would hold
one instance and pay a chunk's fsyncs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes_py import config, dicomfile, fanout, rules
from hermes_py.batches import Batches
from hermes_py.config import ConfigError, Settings
from hermes_py.log import printable as _printable
from hermes_py.spool import DCM, Spool, is_name
from hermes_py.suspects import DEATHS, Suspects

LOG = logging.getLogger(__name__)

# The full scandir of incoming/ that catches whatever watchdog missed (it can drop events).
RESCAN_INTERVAL = 5.0
# Instances per commit: their decisions, links and unlinks share one fsync per folder.
CHUNK = 64
# Longest wait for more arrivals before routing what trickles in (see Router._gather).
GATHER = 0.1
# Longest idle sleep: bounds how late a rules.toml edit or a due batch is noticed.
IDLE_TICK = 1.0
# An edited rules.toml is reloaded once its stat stopped changing for this long, so an
# editor's half-written file is not taken for the new rules.
RELOAD_SETTLE = 0.3
PAUSE_ON_DISK_FULL = 5.0
# Where files put into incoming/ by hand are handed to the intake (a sub-folder of drop/).


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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
        self._cfg_stat = _stat(cfg.path)
        self._cfg_seen: tuple[int, int, int] | None = None
        self._cfg_changed_at: float | None = None
        self._paused_until = 0.0
        self.fanout = fanout.Fanout(self.spool, self._pause, self._joined)
        self.batches = Batches(self.spool, self.fanout, self._stop.is_set, self._paused)
        self.suspects: Suspects | None = None  # learnt at start, under the router lock
        self._misplaced_at = 0.0

    # ------------------------------------------------------------ control (any thread)

    def stop(self) -> None:
        """Finish the instance in hand, commit, and return from run() with 0."""
        self._stop.set()
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

    def _joined(self, batch: rules.Batch) -> None:
        self.batches.join(batch)

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _pause(self, err: OSError) -> None:
        LOG.error("spool %s is full (%s): routing paused for %gs", self.spool.root,
                  err.strerror or err, PAUSE_ON_DISK_FULL)
        self._paused_until = time.monotonic() + PAUSE_ON_DISK_FULL

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        with dicomfile.lenient():
            return asyncio.run(self._main())

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        installed = self._install_signals()
        try:
            lock, took_over = await asyncio.to_thread(self.spool.take_lock, "router", self._stop)
            if lock is None:
                return 0
            try:
                self.active.set()
                if took_over:
                    # A standby may have waited for hours: take over with today's rules.
                    self._do_reload("taking over from another router")
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

    async def _serve(self) -> None:
        self.spool.ensure(list(self.cfg.destinations))
        self.spool.use_private_tmp()  # its creates never queue behind the receiver's
        self.suspects = Suspects(self.spool, "router")
        observer = self._watch()
        LOG.info("router active on %s: %d rule(s), %d destination(s)", self.spool.root,
                 len(self.rules), len(self.cfg.destinations))
        try:
            # Sidecars a crash left in incoming/ between unlinking a .dcm and its .json;
            # only those with a recorded decision (only the router writes one), so a
            # reception in progress (sidecar published before its .dcm) is safe.
            removed = self.spool.sweep_orphan_sidecars(self.spool.incoming, float("-inf"),
                                                       only=self.spool.has_routing)
            if removed:
                LOG.info("removed %d sidecar(s) of already routed instances from %s", removed,
                         self.spool.incoming)
            await self.batches.recover()
            await self._work()
        finally:
            self._stop.set()
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
            await self.batches.release_due()
            if self._stop.is_set():
                break
            timeout = min(IDLE_TICK, max(next_scan, self._paused_until) - time.monotonic())
            due = self.batches.next_due()
            if due is not None:
                timeout = min(timeout, due - time.time())
            if self._cfg_changed_at is not None:
                timeout = min(timeout, RELOAD_SETTLE)
            woken = await self._sleep(max(0.0, timeout))

    async def _gather(self) -> None:
        """Let instances arriving one by one collect for GATHER seconds before a pass.

        A pass pays a few flushes whatever its size: routing each instance the
        moment it lands would pay them per instance, in journal commits that the
        receiver's own fsyncs then queue behind. A backlog (a full chunk routed)
        is routed without this pause.
        """
        end = time.monotonic() + GATHER
        while not self._stop.is_set() and not self._reload.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.02))

    async def _pass(self) -> int:
        """Route everything one scandir of incoming/ yields; returns how many left it.

        The scan is consumed lazily in chunks, never sorted or held in memory, so a
        backlog of any size costs the same per instance.
        """
        done = self._hand_misplaced()
        chunk: list[Path] = []
        with self.spool.scan(self.spool.incoming) as entries:
            for entry in entries:
                path = Path(entry.path)
                if not is_name(path.stem):
                    continue  # put here by hand: handed to the intake (_hand_misplaced)
                if self._deadly(path):
                    done += 1
                    continue
                if self.suspects is not None and path.stem in self.suspects.alone:
                    done += await self._route_chunk([path])  # alone: a death is its own
                    continue
                chunk.append(path)
                if len(chunk) < CHUNK:
                    continue
                done += await self._route_chunk(chunk)
                chunk = []
                if self._stop.is_set() or self._paused():
                    return done
                self._check_reload()
                await self.batches.release_due()
            if chunk:
                done += await self._route_chunk(chunk)
        return done

    async def _route_chunk(self, paths: list[Path]) -> int:
        assert self.suspects is not None
        with self.suspects.holding(p.stem for p in paths):
            loaded = await asyncio.to_thread(fanout.load_chunk, self.spool, paths,
                                             self.keywords)
            return self.fanout.route_chunk(loaded, self.rules, self._stop.is_set)

    def _hand_misplaced(self) -> int:
        """Files a person put straight into incoming/ (``IM0001``, ``notes.txt``, a ``.dcm``
        of their own naming): the intake validates them and gives them a spool name, as
        if dropped; without an intake they go to error/ with the reason. At most every
        RESCAN_INTERVAL: one more listing of incoming/."""
        now = time.monotonic()
        if now < self._misplaced_at:
            return 0
        self._misplaced_at = now + RESCAN_INTERVAL
        moved = 0
        for path in self.spool.misplaced(self.spool.incoming):
            try:
                if self.cfg.intake.enabled:
                    to = self.spool.to_drop(path)
                    LOG.warning("%s was put into incoming/ by hand: handed to the intake as "
                                "%s", _printable(path.name), to.relative_to(self.spool.root))
                else:
                    self.spool.quarantine(path, "put into incoming/ by hand, and the drop "
                                                "folder intake that would check it is off",
                                          "route")
            except FileNotFoundError:
                continue
            except OSError as e:
                LOG.warning("cannot move %s out of incoming/: %s", _printable(path.name), e)
                continue
            moved += 1
        return moved

    def _deadly(self, path: Path) -> bool:
        """In hand at DEATHS router deaths: to error/, never read again."""
        s = self.suspects
        if s is None or not s.deadly(path.stem):
            return False
        self.fanout.quarantine(
            path, f"the router died {DEATHS} times while reading or routing this instance "
                  "(a malformed or hostile file?); it is not read again",
            self.spool.read_sidecar(path), fanout.Commit(), None)
        s.forget(path.stem)
        return True

    # ------------------------------------------------------------ hints

    def _watch(self) -> Any:
        """watchdog on incoming/: only a hint to scan now; the periodic pass is the truth.

        Only creations and renames are asked for: by default inotify also reports
        every open, close, attribute change and unlink, about ten events per
        instance here (the router's own reads, its links, its unlinks), and
        handling them costs more than the routing they announce.
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
        """Take the new rules; the rest of the file is serve's to apply (it restarts what
        changed), so a changed ``[spool] path`` only takes effect at a restart."""
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
        self.cfg = new
        self.rules = new.rules
        self.keywords = rules.keywords_for(new.rules)
        self.spool.ensure(list(new.destinations))
        LOG.info("reloaded %s (%s): %d rule(s), %d destination(s)", path, why,
                 len(new.rules), len(new.destinations))


def run(cfg: Settings) -> int:
    """``hermes-py route``: returns 0 on SIGTERM/SIGINT after finishing the instance in hand."""
    return Router(cfg).run()
