"""The C-STORE / C-ECHO SCP: the front door, and the one place that says Success.

A Success answer is a promise: the modality may delete its copy the next
millisecond. So each C-STORE is streamed by pynetdicom into a temp file inside
``spool/tmp`` (chunked receive: never held in memory, never decoded), and the
handler answers 0x0000 only after ``Spool.publish`` has fsynced the data, written
the sidecar and renamed the ``.dcm`` into ``incoming/`` with a directory fsync.
Anything that gets in the way (free space below ``min_free_mb``, ENOSPC, EIO,
EACCES, a bug) answers 0xA700 or 0xC211 instead, with one log line and no file
left behind: the modality keeps its copy and retries.

Decisions worth knowing:

- Every storage SOP class, private and unknown ones included, is accepted through
  ``_config.UNRESTRICTED_STORAGE_SERVICE``. In that mode pynetdicom accepts the
  *requestor's first proposed* transfer syntax of each storage context, which is
  the preference order we want: a modality lists the syntax its data is in first,
  so we store exactly what it has. An acceptor-side order ("compressed first")
  could make a modality compress on the fly, lossy even, to please us.
- Temp files: for associations of a running :class:`Receiver`, pynetdicom's
  chunked receive writes into a ``SpoolTempFile`` in that receiver's own folder
  ``spool/tmp/<owner>/`` (same filesystem, so publishing is a rename; its own, so
  its creates never queue behind the router's and dispatchers' on one directory),
  which turns write errors into a recorded failure instead of an exception in
  pynetdicom's network thread (``pynetdicom_compat.start_receiving``). The
  receiver tracks those files per association and removes the ones a dropped
  connection leaves behind; ``Spool.sweep_tmp`` at start and periodically is the
  safety net for a kill -9 (it removes the folder of a dead receiver whole: its
  flock is gone).
- ``[receiver] processes > 1``: serve starts that many ``hermes-py receive``
  children, each binding the port with SO_REUSEPORT (the kernel spreads
  connections); one Python process is bound by the GIL.
  ``max_associations`` is per process, and counts only associations we admitted
  (EVT_REQUESTED passed): a connection that has not sent its A-ASSOCIATE-RQ (a
  health check, a scan, a hostile peer) never takes a slot. Those wait in a
  bounded pool instead (``MAX_UNREQUESTED``, oldest hung up first when it is full;
  a real modality sends its RQ within milliseconds), each for at most acse_timeout,
  and a PDU is bounded in time and length (``pynetdicom_compat.guard_reads``).
  The sidecar's ``received_by`` (host:pid) says which process took it.
- Refusing is an edge too: the first C-STORE refused for lack of space or a write
  error is a ``receiving_refused`` event, the first one stored again
  ``receiving_resumed`` (each refused instance is its own ``refused`` event).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from hermes_py import commitment_scp, proxy_protocol, pynetdicom_compat, pynetdicom_wake, tls
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.events import emit
from hermes_py.health import Drain
from hermes_py.lifecycle import Event
from hermes_py.outcomes import hex_status
from hermes_py.process import start_thread, stop_on_signals, wait_until_stopped
from hermes_py.spool import DCM, Spool, new_name
from hermes_py.spool import sidecar as sc
from hermes_py.spool.tempfiles import SpoolTempFile

LOG = logging.getLogger(__name__)

# C-STORE statuses we answer.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the modality keeps its copy and retries later
CANNOT_UNDERSTAND = 0xC211  # a bug in our handler; pynetdicom uses the same code

# A-ASSOCIATE-RJ (result, source, reason) for a calling AE title not on the list.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_TOO_MANY = (0x02, 0x03, 0x02)
REJECT_DRAINING = (0x02, 0x03, 0x01)   # transient, temporary congestion: try elsewhere

PROBE_ALLOWANCE = 1000  # headroom over max_associations for pynetdicom's own check (it counts
# every acceptor thread: the unrequested ones, the ones rejected and still ending)
# Connections without an A-ASSOCIATE-RQ yet: beyond this many, the oldest of the peer
# address holding the most is hung up.
MAX_UNREQUESTED = 100
# ``max_pdu_size = 0`` advertises "unlimited"; a PDU beyond this is still refused (held
# whole in memory by pynetdicom, it would be a way to exhaust it).
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
EVICT_LOG_INTERVAL = 10.0
STOP_GRACE = 10.0  # seconds in-flight associations get to finish on SIGTERM
SWEEP_INTERVAL_MAX = 300.0


# ---------------------------------------------------------------- the server


def _uid(value: object) -> str:
    return str(value or "").rstrip("\0 ").strip()


class Receiver:
    """One receiving process's SCP, runnable in-process (tests) or by :func:`run`.

    ``start()`` sweeps stale temp files, binds and serves in background threads;
    ``port`` is the bound port (useful with ``port = 0``); ``stop()`` stops
    accepting, lets running associations finish for up to ``grace`` seconds, then
    aborts what is left (nothing unanswered was acknowledged, so nothing is lost).
    """

    def __init__(self, cfg: Settings, reuse_port: bool = False, port: int | None = None):
        self.cfg = cfg
        self.settings = cfg.receiver
        self.spool = Spool(cfg.spool.path)
        self._drain = Drain(self.spool)
        self.reuse_port = reuse_port
        self._port = self.settings.port if port is None else port
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._serve_thread: threading.Thread | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._tls_thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._stopped = threading.Event()
        self._closing = False
        self._lock = threading.Lock()
        self._temp_files: dict[int, set[SpoolTempFile]] = {}
        self._in_handler = 0
        # Associations EVT_REQUESTED admitted: what max_associations counts (under _lock).
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()
        self._evicted = 0
        self._evict_logged = 0.0
        self._receiving = False
        self._refusing = False   # refused for space or a write error since the last store
        self.received = 0
        self.refused = 0
        self.identity = f"{os.uname().nodename}:{os.getpid()}"

    # ------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is None:
            return self.settings.tls.port if self.settings.tls else None
        return int(self._tls_server.server_address[1])

    def start(self) -> Receiver:
        self.spool.ensure()
        self.spool.sweep_tmp(self.cfg.spool.tmp_max_age)
        # Our own tmp/<owner>/: no create or rename of ours waits on another stage's.
        self.spool.use_private_tmp()
        try:
            return self._start()
        except BaseException:
            self.spool.release_private_tmp()
            raise

    def _start(self) -> Receiver:
        rs = self.settings
        ae = AE(ae_title=rs.ae_title)
        ae.maximum_pdu_size = rs.max_pdu_size
        # pynetdicom's own limit counts every acceptor thread; ours (EVT_REQUESTED) does not.
        ae.maximum_associations = rs.max_associations + PROBE_ALLOWANCE
        ae.acse_timeout = rs.acse_timeout
        ae.dimse_timeout = rs.dimse_timeout
        ae.network_timeout = rs.network_timeout
        # Any called AE title is accepted: rules may route on CalledAE.
        ae.require_called_aet = False
        ae.add_supported_context(pynetdicom_compat.VERIFICATION)
        commitment_scp.add_context(ae)   # destinations call back with commitment reports
        self._ae = ae
        pynetdicom_compat.start_receiving(ae, self._new_temp_file)
        self._receiving = True
        # No TCP_NODELAY on accepted sockets: our side only sends one small response
        # PDU per C-STORE, and it made receiving no faster (see the commit that chose this).
        server_class: type[ThreadedAssociationServer] = (
            pynetdicom_compat.ReusePortServer if self.reuse_port
            else pynetdicom_compat.ReceiverServer)
        server_class = proxy_protocol.behind(server_class, rs)   # when proxy_protocol is on
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ABORTED, self._on_conn_close),
            # a storage commitment report: stored durably before it is answered
            (evt.EVT_N_EVENT_REPORT, commitment_scp.handler(self.spool)),
        ]
        try:
            server = ae.make_server((rs.bind, self._port), evt_handlers=handlers,
                                    server_class=server_class)
        except OSError as e:
            self._release_process_config()
            raise HermesError(f"receiver cannot listen on {rs.bind}:{self._port}: "
                              f"{e.strerror or e}") from None
        except BaseException:
            self._release_process_config()
            raise
        pynetdicom_compat.register_server(ae, server)
        self._server = server
        self._serve_thread = start_thread(server.serve_forever, f"hermes-receiver:{self.port}")
        if rs.tls is not None:
            self._start_tls(ae, rs.tls, handlers)
        self._sweeper = start_thread(self._sweep_loop, "hermes-tmp-sweeper")
        LOG.info("receiver %s listening on %s:%d (pid %d, max PDU %d, max associations %d%s)",
                 rs.ae_title, rs.bind, self.port, os.getpid(), rs.max_pdu_size,
                 rs.max_associations, ", SO_REUSEPORT" if self.reuse_port else "")
        return self

    def _start_tls(self, ae: AE, t: tls.ReceiverTLS,
                   handlers: list[evt.EventHandlerType]) -> None:
        """The TLS listener: the same AE (one max_associations for both), its own port."""
        server_class: type[pynetdicom_compat.TLSServer] = (
            pynetdicom_compat.TLSReusePortServer if self.reuse_port
            else pynetdicom_compat.TLSServer)
        server_class = proxy_protocol.behind(server_class, self.settings)   # before TLS
        try:
            server = ae.make_server((self.settings.bind, t.port), evt_handlers=handlers,
                                    server_class=server_class,
                                    ssl_context=tls.server_context(t))
        except OSError as e:
            self._stop_servers()
            self._release_process_config()
            raise HermesError(f"receiver cannot listen for TLS on {self.settings.bind}:"
                              f"{t.port}: {e.strerror or e}") from None
        assert isinstance(server, pynetdicom_compat.TLSServer)
        server.handshake_timeout = t.handshake_timeout
        pynetdicom_compat.register_server(ae, server)
        self._tls_server = server
        self._tls_thread = start_thread(server.serve_forever, f"hermes-receiver-tls:{t.port}")
        LOG.info("receiver %s listening for TLS on %s:%d (%s)", self.settings.ae_title,
                 self.settings.bind, self.tls_port,
                 "client certificates required" if t.client_ca_file
                 else "no client certificate asked")

    def _stop_servers(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.shutdown()

    def stop(self, grace: float = STOP_GRACE) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopped.set()
        server.shutdown()  # no new associations from here on
        tls_server, self._tls_server = self._tls_server, None
        if tls_server is not None:
            tls_server.shutdown()
            active = [*server.active_associations, *tls_server.active_associations]
        else:
            active = server.active_associations
        port = int(server.server_address[1]) if server.server_address else self._port
        deadline = time.monotonic() + grace

        def busy() -> list[Association]:
            # Only established associations can have a C-STORE in flight; a bare TCP
            # connect (a port probe) waits out acse_timeout and needs no grace.
            return [a for a in active if a.is_alive() and a.is_established]

        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = busy()
        if left:
            # Refuse what arrives from now on, let a running handler finish, then abort.
            self._closing = True
            end = time.monotonic() + 5.0
            while self._in_handler and time.monotonic() < end:
                time.sleep(0.02)
            LOG.warning("receiver stopping: aborting %d association(s) still open after %gs; "
                        "their unanswered instances stay with the sender", len(left), grace)
            for assoc in left:
                with contextlib.suppress(Exception):
                    assoc.abort()
        for thread in (self._serve_thread, self._tls_thread):
            if thread is not None:
                thread.join(5)
        if self._sweeper is not None:
            self._sweeper.join(5)
        with self._lock:
            leftovers = [f for files in self._temp_files.values() for f in files]
            self._temp_files.clear()
        for f in leftovers:
            f.discard()
        self.spool.release_private_tmp()
        self._release_process_config()
        LOG.info("receiver on port %d stopped (%d received, %d refused)", port, self.received,
                 self.refused)

    def _release_process_config(self) -> None:
        if self._receiving and self._ae is not None:
            self._receiving = False
            pynetdicom_compat.stop_receiving(self._ae)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sweep_loop(self) -> None:
        """Housekeeping: now and then sweep tmp/."""
        interval = min(max(self.cfg.spool.tmp_max_age / 4, 1.0), SWEEP_INTERVAL_MAX)
        while not self._stopped.wait(interval):
            try:
                self.spool.sweep_tmp(self.cfg.spool.tmp_max_age)
            except OSError as e:
                LOG.warning("sweeping %s failed: %s", self.spool.tmp, e)

    # ------------------------------------------------------------ temp files

    def _new_temp_file(self, assoc: Association) -> SpoolTempFile:
        f = SpoolTempFile(self.spool.tmp_dir)
        with self._lock:
            self._temp_files.setdefault(id(assoc), set()).add(f)
        return f

    def _forget(self, assoc: Association, f: SpoolTempFile) -> None:
        with self._lock:
            files = self._temp_files.get(id(assoc))
            if files is not None:
                files.discard(f)
                if not files:
                    del self._temp_files[id(assoc)]

    def _on_conn_open(self, event: evt.Event) -> None:
        """A new connection: bounded PDU reads, and room for it among the unrequested.

        Runs on the server's request thread before the association's threads start,
        so ``assoc`` is not among ``active_associations`` yet.
        """
        assoc = event.assoc
        pynetdicom_compat.guard_reads(assoc, self.settings.max_pdu_size or UNLIMITED_PDU_CAP)
        # Its two threads wait for data or work instead of polling (a connection that
        # never sends its RQ, a scan or a flood, costs no CPU either).
        pynetdicom_wake.wake_on_work(assoc)
        waiting = pynetdicom_compat.unrequested(assoc.ae)  # oldest first
        excess = []
        while len(waiting) >= MAX_UNREQUESTED:
            # The peer holding the most loses its oldest: a flood from a few addresses
            # cannot push out a modality's connection on another one.
            held = Counter(a.requestor.address for a in waiting)
            held[assoc.requestor.address] += 1
            top = max(held, key=held.__getitem__)
            old = next((a for a in waiting if a.requestor.address == top), waiting[0])
            waiting.remove(old)
            excess.append(old)
            pynetdicom_compat.hang_up(old)
        if excess:
            with self._lock:
                self._evicted += len(excess)
                now = time.monotonic()
                log = now - self._evict_logged > EVICT_LOG_INTERVAL
                if log:
                    self._evict_logged = now
                evicted = self._evicted
            if log:
                LOG.warning("more than %d connections without an A-ASSOCIATE-RQ: hung up the "
                            "oldest (%d so far)", MAX_UNREQUESTED, evicted)

    def _on_conn_close(self, event: evt.Event) -> None:
        """A dropped connection leaves a partly received instance: delete it now."""
        pynetdicom_compat.end_unrequested(event.assoc)
        with self._lock:
            self._admitted.discard(event.assoc)
        with self._lock:
            files = self._temp_files.pop(id(event.assoc), set())
        removed = sum(1 for f in files if f.discard())
        if removed:
            req = event.assoc.requestor
            LOG.warning("connection from %s@%s closed in the middle of a C-STORE: removed %d "
                        "partial instance(s); the sender still has them", req.ae_title,
                        req.address, removed)

    # ------------------------------------------------------------ events

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = (rq.calling_ae_title if rq is not None else "").strip()
        allowed = self.settings.allowed_calling_aets
        reason = None
        # A drained router still takes the commitment reports for what it sent.
        if self._drain.active() and not commitment_scp.only_reports(rq):
            reason, rsd = "draining (hermes-py drain): try another router", REJECT_DRAINING
        elif allowed and calling not in allowed:
            reason, rsd = "calling AE title not allowed", REJECT_CALLING_AE
        else:
            # Count the associations we admitted and whose thread runs, nothing else: a
            # connection that never sent an A-ASSOCIATE-RQ (a health check, a scan, a
            # peer stalling inside its RQ) must not lock modalities out. Count and admit
            # under one lock: concurrent requests cannot both take the last slot.
            with self._lock:
                admitted = [a for a in self._admitted if a is not assoc and a.is_alive()]
                if len(admitted) >= self.settings.max_associations:
                    reason, rsd = (f"too many associations (max_associations "
                                   f"{self.settings.max_associations})"), REJECT_TOO_MANY
                else:
                    self._admitted.add(assoc)
        if reason is not None:
            emit(LOG, Event.REJECTED, level=logging.WARNING, calling=calling,
                 peer=f"{assoc.requestor.address}:{assoc.requestor.port}", reason=reason)
            assoc.acse.send_reject(*rsd)
            # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out,
            # or the reactor closes the socket first and the peer sees an abort.
            assoc.kill()
            return

    def _refuse(self, sop: str, reason: str, peer: str, code: int = OUT_OF_RESOURCES,
                cannot_store: bool = False) -> int:
        """Answer a failure status; ``cannot_store`` (no space, a write error) is the receiver's
        own trouble, and the first such refusal after a store is a ``receiving_refused``."""
        with self._lock:
            self.refused += 1
            began = cannot_store and not self._refusing
            if cannot_store:
                self._refusing = True
        fields: dict[str, Any] = {"from": peer}  # "from" is a keyword in Python
        emit(LOG, Event.REFUSED, sop, level=logging.WARNING, status=hex_status(code),
             reason=reason, **fields)
        if began:
            emit(LOG, Event.RECEIVING_REFUSED, level=logging.ERROR, status=hex_status(code),
                 reason=reason, message=f"receiver {self.identity} is REFUSING C-STOREs: "
                                        f"{reason}; senders keep their copies and retry")
        return code

    def _on_store(self, event: evt.Event) -> int:
        """Publish the received temp file durably, then answer; never raise."""
        with self._lock:
            self._in_handler += 1
        try:
            return self._store(event)
        finally:
            with self._lock:
                self._in_handler -= 1

    def _store(self, event: evt.Event) -> int:
        req: Any = event.request
        assoc = event.assoc
        sop = _uid(req.AffectedSOPInstanceUID)
        sop_class = _uid(req.AffectedSOPClassUID)
        ts = _uid(event.context.transfer_syntax)
        calling = (assoc.requestor.ae_title or "").strip()
        # The title the sender called us by (rules may route on it), not our own.
        rq = assoc.requestor.primitive
        called = (rq.called_ae_title if rq is not None else "").strip()
        peer = f"{calling}@{assoc.requestor.address}"
        tmp, _ = pynetdicom_compat.received_file(req)
        published: Path | None = None
        name = ""
        try:
            if not isinstance(tmp, SpoolTempFile):
                # Not created by our factory (should not happen): bring it into the spool.
                tmp = self._adopt_foreign_temp(req)
            else:
                self._forget(assoc, tmp)
                if not tmp.claim():
                    return self._refuse(sop, "connection closed before the instance was "
                                             "stored", peer)
            if tmp.error is not None:
                return self._write_failed(sop, tmp.error, peer)
            tmp.close()
            if tmp.error is not None:
                return self._write_failed(sop, tmp.error, peer)
            if self._closing:
                return self._refuse(sop, "receiver shutting down", peer)
            free = self.spool.free_mb()
            if free < self.cfg.spool.min_free_mb:
                return self._refuse(
                    sop, f"spool free space {free:.0f} MB is below min_free_mb "
                         f"{self.cfg.spool.min_free_mb} MB", peer, cannot_store=True)
            size = os.stat(tmp.path).st_size
            name = new_name(sop)
            sidecar = sc.network(name, sop, sop_class, ts, calling_ae=calling, called_ae=called,
                                 peer_address=assoc.requestor.address,
                                 peer_port=assoc.requestor.port, size=size,
                                 received_by=self.identity)
            published = self.spool.publish(tmp.path, self.spool.incoming, name, sidecar)
            with self._lock:
                self.received += 1
                resumed, self._refusing = self._refusing, False
            fields: dict[str, Any] = {"from": peer}
            emit(LOG, Event.RECEIVED, sop, name=name, ts=ts, size=size, **fields)
            if resumed:
                emit(LOG, Event.RECEIVING_RESUMED, level=logging.WARNING,
                     message=f"receiver {self.identity} stores C-STOREs again")
            return SUCCESS
        except OSError as e:
            self._unpublish(name)
            return self._write_failed(sop, e, peer)
        except Exception as e:  # a bug must cost one instance's answer, never the server
            self._unpublish(name)
            LOG.exception("C-STORE handler failed for sop=%s from=%s", sop, peer)
            return self._refuse(sop, f"internal error: {type(e).__name__}: {e}", peer,
                                CANNOT_UNDERSTAND)
        finally:
            if published is None and isinstance(tmp, SpoolTempFile):
                tmp.discard(force=True)

    def _write_failed(self, sop: str, err: OSError, peer: str) -> int:
        what = {errno.ENOSPC: "spool disk full", errno.EDQUOT: "spool quota exceeded",
                errno.EIO: "spool I/O error", errno.EACCES: "spool permission denied",
                errno.EPERM: "spool permission denied", errno.EROFS: "spool read-only"}
        reason = f"{what.get(err.errno or 0, 'spool write error')}: {err.strerror or err}"
        if err.filename:
            reason += f" ({err.filename})"
        return self._refuse(sop, reason, peer, cannot_store=True)

    def _unpublish(self, name: str) -> None:
        """A failure after the sidecar/rename: we answer a refusal, so remove what we made."""
        if name:
            try:
                self.spool.remove(self.spool.incoming / (name + DCM))
            except OSError as e:
                LOG.error("cannot remove %s from incoming/ after refusing it (%s): it will be "
                          "routed although the sender was told it failed", name, e)

    def _adopt_foreign_temp(self, req: Any) -> SpoolTempFile:
        _, path = pynetdicom_compat.received_file(req)
        src = Path(path or "")
        f = SpoolTempFile(self.spool.tmp_dir)
        f.claim()
        if f.error is None:
            try:
                with open(src, "rb") as fi:
                    while chunk := fi.read(1 << 20):
                        f.write(chunk)
            except OSError as e:
                f.fail(e)
        return f


# ---------------------------------------------------------------- process


def run(cfg: Settings) -> int:
    """``hermes-py receive``: serve until SIGTERM/SIGINT, then stop cleanly and return 0.

    With ``[receiver] processes`` > 1 this is one of the receivers on the port
    (SO_REUSEPORT): serve starts them all; run alone, start as many yourself.
    """
    stop = threading.Event()
    stop_on_signals(stop)
    receiver = Receiver(cfg, reuse_port=cfg.receiver.processes > 1).start()
    try:
        wait_until_stopped(stop)
    finally:
        receiver.stop()
    return 0
