"""The router's fan-out protocol: incoming/ -> every matched outbox (and pending/ batch), once.

Per instance (docs/internals.md)::

    1. decide (header read once, rules evaluated) and RECORD the decision in the
       incoming sidecar (temp, fsync, rename), fsync incoming/
    2. hard-link into each outbox / pending batch, each link with its own sidecar
       (temp, fsync, rename, then the link)
    3. fsync those folders
    4. unlink the incoming copy

A crash anywhere leaves the instance in incoming/ with either no decision (start
over: nothing was linked) or a recorded one, which a restart finishes AS RECORDED
(the rules may have changed since) without making a link that already exists or
whose instance already moved on (``Spool.has_copy``). So each instance ends in
every matched outbox exactly once. Each step runs over a chunk of instances
before the next starts, so the fsyncs of a step are taken together
(``spool.SidecarBatch``): a chunk costs a few journal commits, not two per
instance. A released pending/ batch is drained into its outboxes with the same
link-fsync-unlink steps (``batches.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hermes_py import dicomfile, log, rules
from hermes_py.events import emit
from hermes_py.lifecycle import Event, Stage
from hermes_py.spool import JSON, SidecarBatch, Spool, carried, disk_full, now_iso
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)

# Fault injection for the crash tests: exit abruptly after this many links (0 = never),
# or when reading an instance whose name contains this text (a file that kills a reader).
CRASH_ENV = "HERMES_PY_ROUTER_CRASH_AFTER_LINKS"
CRASH_ON_ENV = "HERMES_PY_ROUTER_CRASH_ON"
# A released batch folder is renamed <key>@releasing-<hex> (see batches.py).
RELEASING = "@releasing-"


@dataclass
class Loaded:
    """What the worker thread read for one incoming instance."""

    dcm: Path
    sidecar: sc.Sidecar
    recorded: rules.Decision | None = None  # a decision an earlier run recorded
    recorded_error: str | None = None
    values: dict[str, str | None] | None = None  # header values, when a decision is to be made
    gone: bool = False
    unreadable: str | None = None
    oserror: OSError | None = None


@dataclass
class Plan:
    dcm: Path
    sop: str
    sidecar: sc.Sidecar
    decision: rules.Decision
    recovering: bool  # the decision was recorded by an earlier run: links may exist


EventArgs = tuple[Event, str | None, str | None, dict[str, Any]]


@dataclass
class Link:
    """One link a job makes: into ``folder``, with this sidecar, logged as ``events``."""

    folder: Path
    sidecar: sc.Sidecar
    events: list[EventArgs]
    batch: rules.Batch | None = None  # a pending/ batch the instance joins


@dataclass
class Job:
    """An instance to link into folders, then remove from where it is."""

    dcm: Path
    sop: str
    sidecar: sc.Sidecar
    links: list[Link] = field(default_factory=list)


@dataclass
class Commit:
    """What one chunk made durable, and what to log once it is."""

    dirs: set[Path] = field(default_factory=set)
    remove: list[Path] = field(default_factory=list)
    events: list[EventArgs] = field(default_factory=list)
    done: int = 0


def recorded(sidecar: sc.Sidecar) -> tuple[rules.Decision | None, str | None]:
    """The decision recorded in a sidecar, if it is one a restart must finish."""
    routing = sidecar.get("routing")
    if not (isinstance(routing, dict) and routing.get("destinations")):
        return None, None
    try:
        decision = rules.Decision.from_routing(routing)
    except (ValueError, KeyError, TypeError) as e:
        return None, str(e)
    return (None, None) if decision.discard else (decision, None)


def load_chunk(spool: Spool, paths: list[Path], keywords: Sequence[str]) -> list[Loaded]:
    """Sidecars, and headers where a decision is to be made, of a chunk (a worker thread).

    One call per chunk: a thread hand-off per file is costly.
    """
    out = []
    crash_on = os.environ.get(CRASH_ON_ENV)
    for dcm in paths:
        if crash_on and crash_on in dcm.name:
            LOG.critical("%s matches %s: exiting abruptly (fault injection)", dcm.name,
                         CRASH_ON_ENV)
            log.flush()
            os._exit(71)
        item = Loaded(dcm, spool.read_sidecar(dcm))
        item.recorded, item.recorded_error = recorded(item.sidecar)
        if item.recorded is None:
            try:
                item.values = dicomfile.read_header(dcm, keywords)
            except FileNotFoundError:
                item.gone = True
            except dicomfile.UnreadableError as e:
                item.unreadable = str(e)
            except OSError as e:
                item.oserror = e
        out.append(item)
    return out


class Fanout:
    """Decides, records, links and commits chunks for one router.

    ``pause(err)`` is called when the spool is full: the caller stops the chunk
    there and tries again later. ``joined(batch)`` is told of every instance that
    joins a pending/ batch.
    """

    def __init__(self, spool: Spool, pause: Callable[[OSError], None],
                 joined: Callable[[rules.Batch], None]) -> None:
        self.spool = spool
        self.pause = pause
        self.joined = joined
        self._made: set[Path] = set()  # folders known to exist (saves a mkdir per link)
        self._links = 0
        self._crash_after = int(os.environ.get(CRASH_ENV) or 0)

    def forget_folder(self, path: Path) -> None:
        self._made.discard(path)

    def trouble(self, e: OSError, what: str) -> bool:
        """A write failed: pause on a full disk (True: stop here), else warn and go on."""
        if disk_full(e):
            self.pause(e)
            return True
        LOG.warning("%s (%s); it is finished on the next pass", what, e)
        return False

    # ------------------------------------------------------------ incoming/

    def route_chunk(self, loaded: list[Loaded], rule_set: Sequence[rules.Rule],
                    stopping: Callable[[], bool]) -> int:
        """Decide, record, link and commit one chunk (see the module docstring).

        Its writes go through two sidecar batches (decisions, then outbox
        sidecars), each fsynced together, in the protocol's order: decisions
        durable, then links durable, then the incoming copies go.
        """
        commit = Commit()
        decisions = self.spool.sidecar_batch()
        plans: list[Plan] = []
        for item in loaded:
            if stopping():
                break
            try:
                plan = self._decide(item, rule_set, decisions, commit)
            except OSError as e:
                if self.trouble(e, f"cannot route {item.dcm.name} now"):
                    break
                continue
            if plan is not None:
                plans.append(plan)
        if len(decisions):
            try:
                decisions.commit()
                self.spool.sync_dirs([self.spool.incoming])  # durable before any link
            except OSError as e:
                # Not recorded (or not durably): link none of them; the next pass decides again.
                plans = [p for p in plans if p.recovering]
                self.trouble(e, "cannot record routing decisions now")
        for plan in plans:   # each decision .json holds the receive facts now
            carried.drop(plan.dcm)
        jobs: list[Job] = []
        for plan in plans:
            try:
                jobs.append(self._fan_out(plan, commit))
            except OSError as e:  # an outbox folder that cannot be made
                if self.trouble(e, f"cannot link {plan.dcm.name} now"):
                    break
        self.link_all(jobs, commit)
        self.commit(commit)
        return commit.done

    def _decide(self, item: Loaded, rule_set: Sequence[rules.Rule], decisions: SidecarBatch,
                commit: Commit) -> Plan | None:
        dcm, sidecar = item.dcm, item.sidecar
        sop = str(sidecar.get("sop_instance_uid") or "") or None
        if item.recorded_error is not None:
            LOG.warning("%s: recorded routing decision unreadable (%s): deciding again",
                        dcm.name, item.recorded_error)
        if item.recorded is not None:
            return Plan(dcm, sop or dcm.stem, sidecar, item.recorded, recovering=True)
        if item.gone:
            return None  # gone meanwhile (an admin moved it): nothing to do
        if item.oserror is not None:
            raise item.oserror
        if item.unreadable is not None:
            self.quarantine(dcm, item.unreadable, sidecar, commit, sop)
            return None
        values = item.values or {}
        sop = sop or values.get("SOPInstanceUID") or dcm.stem
        decision = rules.evaluate(rule_set, {**values, **rules.receive_facts(sidecar)})
        sidecar = sc.routed(sidecar, dcm.stem, values, decision.to_routing(now_iso()))
        if decision.discard:
            self._discard(dcm, sidecar, decision, commit, sop)
            return None
        decisions.write(dcm.with_suffix(JSON), sidecar)  # recorded BEFORE linking
        return Plan(dcm, sop, sidecar, decision, recovering=False)

    def _discard(self, dcm: Path, sidecar: sc.Sidecar, decision: rules.Decision,
                 commit: Commit, sop: str) -> None:
        try:
            kept = self.spool.move(dcm, self.spool.discard, sidecar=sc.discarded(
                sidecar, decision.reason, decision.discarded_by))
        except FileNotFoundError:
            return
        carried.drop(kept)
        commit.dirs.add(self.spool.discard)
        commit.done += 1
        commit.events.append((Event.DISCARDED, sop, None,
                              {"reason": decision.reason, "name": dcm.stem}))

    def quarantine(self, dcm: Path, reason: str, sidecar: sc.Sidecar, commit: Commit,
                   sop: str | None) -> None:
        try:
            dst = self.spool.quarantine(dcm, reason, "route", sidecar=sidecar)
        except FileNotFoundError:
            return
        carried.drop(dst)
        commit.done += 1
        # quarantine() made it durable already: say so now, not after the chunk.
        emit(LOG, Event.ERROR, sop, level=logging.ERROR, reason=reason, name=dst.stem)

    def folder(self, path: Path, commit: Commit) -> Path:
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

    def _fan_out(self, plan: Plan, commit: Commit) -> Job:
        """The links ``plan`` still needs (a recovered plan skips those already made)."""
        at = now_iso()
        name = plan.dcm.stem
        d = plan.decision
        job = Job(plan.dcm, plan.sop, plan.sidecar)
        for dest, prio in d.destinations.items():
            folder = self.folder(self.spool.outbox(dest, prio), commit)
            if plan.recovering and self.spool.has_copy(dest, plan.dcm.name):
                continue
            job.links.append(Link(folder, sc.queued(plan.sidecar, dest, prio, at),
                                  [(Event.ROUTED, plan.sop, dest,
                                    {"priority": prio, "rules": ",".join(d.rules),
                                     "name": name})]))
        for batch in d.batches:
            if plan.recovering and self.is_held(batch, plan.dcm.name):
                continue  # its batch was learnt from pending/ at start, or already released
            folder = self.folder(self.spool.folder(Stage.PENDING, part=batch.key),
                                 commit)
            job.links.append(Link(folder, sc.batched(plan.sidecar, batch.to_json(), at),
                                  [(Event.HELD, plan.sop, dest,
                                    {"batch": batch.key, "quiet_for": f"{batch.quiet_for:g}s",
                                     "name": name}) for dest in batch.destinations], batch))
        return job

    def is_held(self, batch: rules.Batch, fname: str) -> bool:
        """Whether the instance is in this batch already, released or not, or delivered on."""
        if any((p.path / fname).exists() for p in self.spool.places(Stage.PENDING)
               if p.part == batch.key or (p.part or "").startswith(batch.key + RELEASING)):
            return True
        return any(self.spool.has_copy(dest, fname) for dest in batch.destinations)

    # ------------------------------------------------------------ links and commits

    def link_all(self, jobs: list[Job], commit: Commit) -> None:
        """Sidecars of every link (one shared flush), then the links; a finished job's
        copy is queued for removal in ``commit``.

        A job whose sidecars cannot be written is left for the next pass as a
        whole; its recorded decision is finished then.
        """
        sidecars = self.spool.sidecar_batch()
        ready: list[Job] = []
        for job in jobs:
            mark = len(sidecars)
            try:
                for link in job.links:
                    sidecars.write(link.folder / (job.dcm.stem + JSON), link.sidecar)
            except OSError as e:
                sidecars.rollback(mark)
                if self.trouble(e, f"cannot link {job.dcm.name} now"):
                    break
                continue
            ready.append(job)
        try:
            sidecars.commit()
        except OSError as e:
            self.trouble(e, "cannot write outbox sidecars now")
            return
        for job in ready:
            try:
                for link in job.links:
                    self.spool.link(job.dcm, link.folder)
                    commit.dirs.add(link.folder)
                    self._linked()
                    if link.batch is not None:
                        self.joined(link.batch)
                    commit.events.extend(link.events)
            except FileExistsError as e:
                # A different file already has this name in an outbox: never overwrite it.
                self.quarantine(job.dcm, f"name clash while linking: {e}", job.sidecar,
                                commit, job.sop)
                continue
            except OSError as e:
                if self.trouble(e, f"cannot link {job.dcm.name} now"):
                    break
                continue
            commit.remove.append(job.dcm)
            commit.done += 1

    def _linked(self) -> None:
        self._links += 1
        if self._crash_after and self._links >= self._crash_after:
            LOG.critical("%s=%d reached: exiting abruptly (fault injection)", CRASH_ENV,
                         self._crash_after)
            log.flush()
            os._exit(70)

    def commit(self, commit: Commit) -> None:
        """Links durable, then the copies they replace removed, then the log lines."""
        self.spool.sync_dirs(commit.dirs)
        for dcm in commit.remove:
            self.spool.remove(dcm)
        self.spool.sync_dirs(dcm.parent for dcm in commit.remove)
        for event, sop, dest, fields in commit.events:
            emit(LOG, event, sop, dest, **fields)

