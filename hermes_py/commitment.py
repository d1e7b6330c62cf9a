"""Storage commitment (Push Model) for one dicom destination: ask, wait, and apply the answer.

A C-STORE Success says the destination received the bytes; only its storage
commitment report says it took responsibility for them. With
``storage_commitment = "required"`` the dispatcher therefore moves an answered
instance to ``committing/<dest>/`` instead of success/, and this module (run
from the dispatcher's upkeep, the one thread that owns the queue besides the
workers, which only hand over what they delivered) does the rest:

- Ask: up to ``commit_batch`` waiting instances per N-ACTION, on an
  association of its own. The request (Transaction UID and the references) is
  written to ``state/commitments/<dest>/<tx>.json`` BEFORE it is sent, so a
  report that arrives after a kill -9, or after a restart, still finds what it
  is about. What a record lists is claimed by nobody and never aged out.
- Apply: reports are stored by whoever received them (``commitment_scp``, in
  the receiver or on our N-ACTION's association) under
  ``state/commitments/reports/``; we take the ones naming one of our
  transactions. Committed: to success/<dest>/ with ``committed_at``. Failed:
  back to the queue as a transient failure with the reason in its history
  (0x0119/0x0122, which can never succeed, to error/<dest>/). Applying is
  idempotent (an instance no longer in committing/ is skipped), so a crash half
  way through just applies the report again; the record and the report are
  removed last.
- Wait: no report ``commit_timeout`` after the request: ask once more for what is
  still waiting (a new Transaction UID in the same record, so a late answer to
  either is applied). Still none: ``destination_not_committing`` (once per
  record), the destination shows "not committing" in status, and nothing is
  resent: a peer that never reports must not make us send everything again.
- ``advisory``: instances go to success/ as before; the report adds
  ``committed_at`` (or ``commit_failed``) to their success/ sidecars.
- One asker per destination: a flock (``locks/commit-<dest>.lock``) makes a
  second dispatcher of the same destination leave commitment to the first,
  which finds what the other delivered into committing/ by listing it again
  every ``RESCAN_EVERY``.
- ``state/<dest>.commitment.json`` says, level-triggered, whether the
  destination is committing (``not_committing_since``, the last report): what
  status and an alert watcher read. A report applied later clears it and asks
  again, at once, about everything that stopped waiting for an answer.

Memory: the open records are kept in memory (each at most ``commit_batch``
references); committing/ is listed at start and every RESCAN_EVERY, otherwise
only what the workers hand over is new.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, TypedDict, cast

from pydicom.uid import generate_uid

from hermes_py import commitment_scp
from hermes_py.config import DestinationSettings, RetryPolicy
from hermes_py.destination_state import backoff_delay
from hermes_py.destinations.base import Item
from hermes_py.events import emit
from hermes_py.lifecycle import Event, Stage
from hermes_py.outcomes import Outcome, hex_status
from hermes_py.spool import DCM, JSON, Lock, Spool, now_iso, parse_iso, sanitize
from hermes_py.spool import sidecar as sc

LOG = logging.getLogger(__name__)

RETRY_UNSENT = 30.0      # an N-ACTION that could not be sent is tried again after this
REQUESTS_PER_UPKEEP = 4  # N-ACTIONs sent by one upkeep (the rest waits for the next)
RESCAN_EVERY = 60.0      # committing/ listed again (another dispatcher's deliveries)
ORPHAN_AFTER = 86400.0   # a report no request names is removed after this
# FailureReasons after which a resend cannot help (PS3.4 J.3.2.1.1): to error/<dest>/.
PERMANENT_REASONS = {0x0119: "Class / Instance conflict", 0x0122: "Referenced SOP Class "
                     "not supported"}
REASONS = {0x0110: "Processing failure", 0x0112: "No such object instance",
           0x0213: "Resource limitation", 0x0131: "Duplicate transaction UID",
           **PERMANENT_REASONS}


class Ref(TypedDict):
    name: str
    sop_class_uid: str
    sop_instance_uid: str


class Transaction(TypedDict, total=False):
    """``state/commitments/<dest>/<first tx>.json``: what we asked, written before asking."""

    transaction_uids: list[str]   # the first request's, then the second's (commit_timeout)
    destination: str
    mode: str
    created_at: str
    sent_at: str | None           # the N-ACTION-RSP said Success (None: not sent yet)
    last_tried: str | None
    asks: int
    last_error: str | None
    not_committing_since: str | None
    references: list[Ref]


def transactions_dir(spool: Spool, dest: str) -> Path:
    return spool.state / "commitments" / spool.dest_folder(dest)


def read_transactions(spool: Spool, dest: str) -> list[tuple[Path, Transaction]]:
    return read_transactions_in(spool, transactions_dir(spool, dest))


def read_transactions_in(spool: Spool, folder: Path) -> list[tuple[Path, Transaction]]:
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*" + JSON)):
        data = spool.read_json(p)
        if data:
            out.append((p, cast(Transaction, data)))
    return out


class CommitmentState(TypedDict, total=False):
    """``state/<dest>.commitment.json``: whether the destination answers commitment requests."""

    destination: str
    mode: str
    not_committing_since: str | None   # asked twice, no report (None: committing)
    last_report_at: str | None
    updated_at: str


def state_file(spool: Spool, dest: str) -> Path:
    return spool.state / f"{spool.dest_folder(dest)}.commitment.json"


def read_state(spool: Spool, dest: str) -> CommitmentState:
    return cast(CommitmentState, spool.read_json(state_file(spool, dest)))


def reason_text(code: int) -> str:
    return f"{hex_status(code)} {REASONS.get(code, 'failure')}"


class Commitments:
    """One destination's commitment bookkeeping (a no-op object when it is "off")."""

    def __init__(self, spool: Spool, settings: DestinationSettings):
        self.spool = spool
        self.settings = settings
        self.name = settings.name
        self.mode = str(getattr(settings, "storage_commitment", "off"))
        self.required = self.mode == "required"
        self.folder = spool.folder(Stage.COMMITTING, self.name)
        # Where the dispatcher moves an answered instance.
        self.landing = self.folder if self.required else spool.success_dir(self.name)
        self._arrived: collections.deque[Ref] = collections.deque()
        self._open: dict[Path, Transaction] = {}
        self._by_uid: dict[str, Path] = {}
        self._listed: set[str] = set()   # names some open record lists
        self._loaded = False
        self._lock = threading.Lock()
        self._asker = Lock(spool.locks / f"commit-{spool.dest_folder(self.name)}.lock")
        self._holder = False
        self._warned_other = False
        self._last_rescan = 0.0
        self._asked = 0   # N-ACTIONs sent by the running upkeep
        self.retry: RetryPolicy = settings.retry
        self.rng = random.Random()

    @property
    def enabled(self) -> bool:
        return self.mode in ("advisory", "required")

    def delivered(self, item: Item) -> None:
        """A worker moved ``item`` to ``landing``: it needs asking about (thread-safe)."""
        if self.enabled:
            self._arrived.append(Ref(name=item.name, sop_class_uid=item.sop_class_uid,
                                     sop_instance_uid=item.sop_instance_uid))

    # ------------------------------------------------------------ upkeep

    def upkeep(self, now: float) -> bool:
        """Apply reports, ask for new arrivals, chase silence; True when the queue changed."""
        if not self.enabled and (self._loaded or not any(True for _ in Spool.scan(self.folder))):
            self._loaded = True
            return False
        with self._lock:
            if not self._holder and not self._take_lock():
                return False
            if not self._loaded:
                if not self.required:
                    self._release_waiting()
                if not self.enabled:
                    self._loaded = True
                    return False
                self._load()
            elif self.required and now - self._last_rescan >= RESCAN_EVERY:
                self._rescan()
            changed = self._apply_reports(now)
            self._asked = 0
            self._request_new(now)
            self._chase(now)
            if self._asked:   # the report usually came while we waited (0.1 s): apply it now
                changed |= self._apply_reports(time.time())
            return changed

    def _take_lock(self) -> bool:
        self._holder = self._asker.acquire()
        if not self._holder:
            if not self._warned_other:
                self._warned_other = True
                LOG.info("destination %s: another dispatcher asks for storage commitment "
                         "(%s)", self.name, "it finds our deliveries in committing/"
                         if self.required else "ours delivered here go unrecorded")
            if not self.required:
                self._arrived.clear()   # advisory: delivered anyway; nobody to ask
        return self._holder

    def close(self) -> None:
        if self._holder:
            self._asker.release()
            self._holder = False

    def flush(self, now: float) -> int:
        """``hermes-py flush``: ask once more, now, about everything asked twice already."""
        with self._lock:
            if not self._holder or not self._loaded:
                return 0
            return self._reask(lambda tx: int(tx.get("asks", 1)) >= 2, "flush requested")

    def _load(self) -> None:
        """The open records, and what committing/ holds that no record lists (asked next)."""
        if self.required:
            self.folder.mkdir(parents=True, exist_ok=True)
        transactions_dir(self.spool, self.name).mkdir(parents=True, exist_ok=True)
        for path, tx in read_transactions(self.spool, self.name):
            self._remember(path, tx)
        if self.required:
            self._rescan()
        self._loaded = True
        if self._open or self._arrived:
            LOG.info("destination %s: %d storage commitment request(s) open, %d instance(s) "
                     "to ask about", self.name, len(self._open), len(self._arrived))

    def _release_waiting(self) -> None:
        """No longer "required" (rules.toml changed): what waits in committing/ was stored
        (C-STORE Success), so it is delivered, as it would be now."""
        moved = 0
        for e in list(Spool.scan(self.folder)):
            try:
                self.spool.move(Path(e.path), self.spool.success_dir(self.name))
                moved += 1
            except FileNotFoundError:
                continue
        if moved:
            self.spool.sync_dirs([self.spool.success_dir(self.name), self.folder])
            LOG.warning("destination %s: storage_commitment is %r now: %d instance(s) that "
                        "waited in committing/ moved to success/", self.name, self.mode, moved)

    def _rescan(self) -> None:
        """What committing/ holds that no record lists: asked next (a crash between the
        move and the record, another dispatcher's delivery)."""
        self._last_rescan = time.time()
        queued = {r["name"] for r in self._arrived}
        for e in Spool.scan(self.folder):
            stem = e.name[: -len(DCM)]
            if stem in self._listed or stem in queued:
                continue
            data = self.spool.read_sidecar(Path(e.path))
            self._arrived.append(Ref(name=stem,
                                     sop_class_uid=str(data.get("sop_class_uid") or ""),
                                     sop_instance_uid=str(data.get("sop_instance_uid") or "")))

    def _remember(self, path: Path, tx: Transaction) -> None:
        self._open[path] = tx
        for uid in tx.get("transaction_uids", []):
            self._by_uid[uid] = path
        self._listed.update(r["name"] for r in tx.get("references", []))

    def _forget(self, path: Path) -> None:
        tx = self._open.pop(path, None)
        if tx is None:
            return
        for uid in tx.get("transaction_uids", []):
            self._by_uid.pop(uid, None)
        self._listed.difference_update(r["name"] for r in tx.get("references", []))

    def _save(self, path: Path, tx: Transaction) -> None:
        self.spool.write_json(path, tx)
        self.spool.sync_dirs([path.parent])

    # ------------------------------------------------------------ asking

    def _request_new(self, now: float) -> None:
        batch = max(1, int(getattr(self.settings, "commit_batch", 500)))
        for _ in range(REQUESTS_PER_UPKEEP):
            refs: list[Ref] = []
            names: set[str] = set()
            while self._arrived and len(refs) < batch:
                ref = self._arrived.popleft()
                if ref["name"] not in self._listed and ref["name"] not in names \
                        and ref["sop_instance_uid"]:
                    refs.append(ref)
                    names.add(ref["name"])
            if not refs:
                return
            uid = str(generate_uid())
            tx = Transaction(transaction_uids=[uid], destination=self.name, mode=self.mode,
                             created_at=now_iso(now), sent_at=None, asks=1, last_error=None,
                             not_committing_since=None, references=refs)
            path = transactions_dir(self.spool, self.name) / f"{sanitize(uid)}{JSON}"
            try:
                self._save(path, tx)   # durable before the N-ACTION leaves
            except OSError:   # disk full: asked about at the next upkeep
                self._arrived.extendleft(reversed(refs))
                raise
            self._remember(path, tx)
            self._send(path, tx, now)

    def _send(self, path: Path, tx: Transaction, now: float) -> None:
        uid = tx["transaction_uids"][-1]
        err = commitment_scp.send_n_action(self.spool, self.settings, uid,
                                           tx.get("references", []))
        tx["last_error"] = err
        tx["last_tried"] = now_iso(now)
        self._asked += 1
        if err is None:
            tx["sent_at"] = now_iso(time.time())
            LOG.info("destination %s: storage commitment asked for %d instance(s) "
                     "(transaction %s, ask %d)", self.name, len(tx.get("references", [])),
                     uid, tx.get("asks", 1))
        else:
            LOG.warning("destination %s: storage commitment request %s not sent (%s); "
                        "tried again in %gs", self.name, uid, err, RETRY_UNSENT)
        self._save(path, tx)

    def _chase(self, now: float) -> None:
        """Resend unsent requests; on commit_timeout ask once more, then say so."""
        timeout = float(getattr(self.settings, "commit_timeout", 3600.0))
        sends = 0
        for path, tx in list(self._open.items()):
            sent = parse_iso(tx.get("sent_at"))
            if sent is None:
                tried = parse_iso(tx.get("last_tried")) or 0.0
                if now - tried >= RETRY_UNSENT and sends < REQUESTS_PER_UPKEEP:
                    sends += 1
                    self._send(path, tx, now)
                continue
            if now - sent <= timeout:
                continue
            if int(tx.get("asks", 1)) < 2:
                if not self._ask_again(path, tx, now, "no storage commitment report within "
                                                      "commit_timeout"):
                    continue
                sends += 1
                self._send(path, tx, now)
            elif not tx.get("not_committing_since"):
                tx["not_committing_since"] = now_iso(now)
                self._save(path, tx)
                waiting = len(tx.get("references", []))
                self._write_state(now, not_committing=True)
                emit(LOG, Event.DESTINATION_NOT_COMMITTING, dest=self.name,
                     level=logging.ERROR, waiting=waiting,
                     message=f"destination {self.name}: NOT COMMITTING: no storage commitment "
                             f"report for {waiting} instance(s), asked twice; they stay "
                             "waiting, nothing is resent (does the destination know our AE "
                             "title, host and port, and may it call us?)")

    def _ask_again(self, path: Path, tx: Transaction, now: float, why: str) -> bool:
        """The record's waiting references under a new Transaction UID, saved unsent (the
        old UIDs stay known: a late answer to them is applied too). False: none waits."""
        waiting = [r for r in tx.get("references", []) if self._waiting(r)]
        if not waiting:
            self._drop(path)
            return False
        tx["references"] = waiting
        tx["asks"] = int(tx.get("asks", 1)) + 1
        tx["sent_at"] = None
        tx["last_tried"] = None
        tx["not_committing_since"] = None
        tx["transaction_uids"] = [*tx.get("transaction_uids", []), str(generate_uid())]
        self._save(path, tx)
        self._forget(path)
        self._remember(path, tx)
        LOG.warning("destination %s: %s for %d instance(s): asking once more", self.name,
                    why, len(waiting))
        return True

    def _reask(self, which: Any, why: str) -> int:
        """Records ``which`` selects asked again (unsent: the next upkeeps send them)."""
        n = 0
        for path, tx in list(self._open.items()):
            if which(tx) and self._ask_again(path, tx, time.time(), why):
                n += 1
        return n

    def _write_state(self, now: float, *, not_committing: bool | None = None,
                     report: bool = False) -> None:
        old = read_state(self.spool, self.name)
        st = CommitmentState(destination=self.name, mode=self.mode,
                             not_committing_since=old.get("not_committing_since"),
                             last_report_at=old.get("last_report_at"), updated_at=now_iso(now))
        if not_committing is True:
            st["not_committing_since"] = st.get("not_committing_since") or now_iso(now)
        elif not_committing is False:
            st["not_committing_since"] = None
        if report:
            st["last_report_at"] = now_iso(now)
        self.spool.write_json(state_file(self.spool, self.name), st)

    def _waiting(self, ref: Ref) -> bool:
        if not self.required:
            return True
        return (self.folder / (ref["name"] + DCM)).exists()

    def _drop(self, path: Path) -> None:
        self._forget(path)
        self.spool.remove_state(str(path.relative_to(self.spool.state)))

    # ------------------------------------------------------------ applying

    def _apply_reports(self, now: float) -> bool:
        folder = commitment_scp.reports_dir(self.spool)
        if not folder.is_dir():
            return False
        changed = applied = False
        for p in sorted(folder.glob("*" + JSON)):
            report = cast(commitment_scp.Report, self.spool.read_json(p))
            path = self._by_uid.get(str(report.get("transaction_uid") or ""))
            if path is None or path not in self._open:
                self._orphan(p, report, now)   # another destination's, or nobody's
                continue
            changed |= self._apply(path, self._open[path], report, now)
            self.spool.remove_state(str(p.relative_to(self.spool.state)))
            applied = True
        if applied:
            silent = read_state(self.spool, self.name).get("not_committing_since")
            self._write_state(now, not_committing=False, report=True)
            if silent:
                n = self._reask(lambda tx: bool(tx.get("not_committing_since")),
                                "the destination reports again")
                LOG.warning("destination %s: storage commitment reports again (not "
                            "committing since %s); %d request(s) asked again", self.name,
                            silent, n)
        return changed

    def _orphan(self, p: Path, report: commitment_scp.Report, now: float) -> None:
        """A report no request of any destination names, a day after it came: removed
        (a peer's late duplicate, or a stranger's); kept while any record names it."""
        received = parse_iso(report.get("received_at"))
        if received is None or now - received < ORPHAN_AFTER:
            return
        uid = str(report.get("transaction_uid") or "")
        for folder in (self.spool.state / "commitments").iterdir():
            if folder.is_dir() and folder.name != "reports" and any(
                    uid in t.get("transaction_uids", [])
                    for _, t in read_transactions_in(self.spool, folder)):
                return
        LOG.warning("storage commitment report %s from %s names no open request of any "
                    "destination: removed", p.name, report.get("peer", "?"))
        self.spool.remove_state(str(p.relative_to(self.spool.state)))

    def _apply(self, path: Path, tx: Transaction, report: commitment_scp.Report,
               now: float) -> bool:
        committed = {r.get("sop_instance_uid") for r in report.get("committed", [])}
        failed = {r.get("sop_instance_uid"): int(r.get("failure_reason", 0x0110))
                  for r in report.get("failed", [])}
        tx_uid = str(report.get("transaction_uid"))
        left: list[Ref] = []
        done: list[tuple[Ref, Path]] = []
        queued = 0
        writes = self.spool.sidecar_batch()
        for ref in tx.get("references", []):
            uid = ref["sop_instance_uid"]
            try:
                if uid in committed:
                    dcm = self._committed(ref, tx_uid, now, writes)
                    if dcm is not None:
                        done.append((ref, dcm))
                elif uid in failed:
                    queued += self._failed(ref, failed[uid], tx_uid, now)
                else:
                    left.append(ref)
            except FileNotFoundError:
                continue   # moved by someone else (an admin) meanwhile
        # The success/ sidecars durable together (one flush for the report), then the
        # renames: a crash between leaves each .dcm in committing/ (applied again).
        writes.commit()
        for ref, dcm in done:
            if self.required:
                try:
                    self.spool.move(dcm, self.spool.success_dir(self.name), written=True)
                except FileNotFoundError:
                    continue
            emit(LOG, Event.COMMITTED, ref["sop_instance_uid"], self.name, transaction=tx_uid)
        self.spool.sync_dirs([self.folder, self.spool.success_dir(self.name),
                              *self.spool.outboxes(self.name)])
        if left:
            tx["references"] = left
            self._save(path, tx)
            self._forget(path)
            self._remember(path, tx)
        else:
            self._drop(path)
        LOG.info("destination %s: storage commitment report %s applied: %d committed, %d "
                 "failed, %d still waiting", self.name, tx_uid, len(done), queued, len(left))
        return queued > 0

    def _committed(self, ref: Ref, tx_uid: str, now: float, writes: Any) -> Path | None:
        where = self.folder if self.required else self.spool.success_dir(self.name)
        dcm = where / (ref["name"] + DCM)
        if not dcm.exists():
            return None
        data = self.spool.read_sidecar(dcm)
        data["committed_at"] = now_iso(now)
        data["commit_transaction"] = tx_uid
        data.pop("commit_failed", None)
        if self.required:
            writes.write(self.spool.success_dir(self.name) / (ref["name"] + JSON), data)
        else:   # keep the sidecar's mtime: it is when the copy landed (keep_success)
            writes.write(self.spool.sidecar_of(dcm), data, self.spool.landed_at(dcm))
        return dcm

    def _failed(self, ref: Ref, code: int, tx_uid: str, now: float) -> int:
        where = self.folder if self.required else self.spool.success_dir(self.name)
        dcm = where / (ref["name"] + DCM)
        if not dcm.exists():
            return 0
        reason = f"storage commitment failed: {reason_text(code)} (transaction {tx_uid})"
        data = self.spool.read_sidecar(dcm)
        if not self.required:
            data["commit_failed"] = sc.CommitFailed(at=now_iso(now), reason=reason)
            self.spool.write_json(self.spool.sidecar_of(dcm), data, self.spool.landed_at(dcm))
            emit(LOG, Event.COMMIT_FAILED, ref["sop_instance_uid"], self.name,
                 logging.WARNING, reason=reason, reason_code=hex_status(code))
            return 0
        permanent = code in PERMANENT_REASONS
        d = sc.attempted(data, self.name, now,
                         Outcome.PERMANENT if permanent else Outcome.TRANSIENT,
                         status=hex_status(code), reason=reason)
        queued_at = parse_iso(d.get("queued_at")) or now
        if not permanent and now - queued_at > self.retry.give_up_after:
            permanent = True
            reason = (f"gave up after give_up_after ({self.retry.give_up_after:g}s) queued; "
                      f"last error: {reason}")
        if permanent:
            d["next_attempt"] = None
            self.spool.quarantine(dcm, reason, stage="commitment", dest=self.name, sidecar=d)
        else:
            # Resent soon, and later each time the same instance fails again: a
            # destination that never keeps it must not turn into a send loop.
            tries = sum(1 for h in d.get("history") or []
                        if str(h.get("reason", "")).startswith("storage commitment failed"))
            due = now + (backoff_delay(tries - 1, self.retry, self.rng) if tries > 1 else 0.0)
            d["next_attempt"] = now_iso(due)
            self.spool.move(dcm, self.spool.queue_for(self.name, d), sidecar=d, mtime=due)
        emit(LOG, Event.COMMIT_FAILED, ref["sop_instance_uid"], self.name, logging.WARNING,
             reason=reason, reason_code=hex_status(code),
             moved_to="error" if permanent else "queue")
        return 1


def summary(spool: Spool, dest: str, settings: DestinationSettings | None,
            now: float) -> dict[str, Any] | None:
    """What status shows: waiting instances, the oldest wait, whether it stopped reporting."""
    mode = str(getattr(settings, "storage_commitment", "off"))
    folder = spool.folder(Stage.COMMITTING, dest)
    txs = read_transactions(spool, dest)
    if mode == "off" and not txs and not folder.is_dir():
        return None
    waiting, oldest = 0, None
    if mode == "required" or folder.is_dir():
        for e in Spool.scan(folder):
            waiting += 1
            at = Spool.landed_at(e.path)
            if at is not None and (oldest is None or at < oldest):
                oldest = at
    if mode == "advisory":
        waiting = sum(len(t.get("references", [])) for _, t in txs)
        starts = [parse_iso(t.get("created_at")) for _, t in txs]
        oldest = min((s for s in starts if s is not None), default=None)
    st = read_state(spool, dest)
    return {"mode": mode, "awaiting": waiting,
            "oldest_wait": None if oldest is None else max(0.0, now - oldest),
            "requests_open": len(txs), "not_committing_since": st.get("not_committing_since"),
            "last_report_at": st.get("last_report_at"),
            "unsent": sum(1 for _, t in txs if not t.get("sent_at"))}
