"""DICOM C-STORE SCU (and C-ECHO probe): one AE and one association at a time, per worker thread.

Why each piece is here:

- One ``AE`` per object, and objects are never shared between threads.
  pynetdicom's ``send_c_store`` pauses the association's reactor thread, sends,
  waits for the response on a shared queue, and un-pauses the reactor. A second
  thread on the same association un-pauses the reactor while the first is still
  waiting; the reactor then takes the first thread's C-STORE-RSP off the queue,
  finds it is not a request, logs "Received unexpected C-STORE service message"
  and drops it, and the first thread waits out its whole DIMSE timeout (the
  association is then aborted). pynetdicom issues #137 and #842 are this.
- The same theft happens with a single thread; ``pynetdicom_compat`` has the
  guard (``return_stolen_responses``), TCP_NODELAY and the fast DUL poll, all
  applied to our own association objects only.
- ``connection_timeout`` so a black-holed host costs seconds, not minutes;
  message IDs that increment per association; the calling AE title from the
  destination.
- An association that drops mid-batch is re-opened and only what was not
  answered is sent again; the instance in flight is a per-instance transient
  failure marked ``severed`` (so an instance that kills the peer cannot block the
  queue head, nor back the destination off). Only when the associations of
  SEVERED_DISTINCT different instances in a row end that way, with nothing
  answered between, is it the destination's failure (a peer that aborts
  everything, or restarts).
- Memory does not grow with the instance: sends stream from a file (the stored
  one, or a converted temp copy, see ``negotiation.prepare``) and
  ``pynetdicom_compat.bound_send_queue`` keeps pynetdicom from queueing the
  whole file ahead of the socket; a peer that stops reading is cut after
  ``network_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from hermes_py import outcomes, pynetdicom_compat, pynetdicom_wake, tls
from hermes_py.destinations import negotiation, transcode
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, Item, Probe, Report, Workspace
from hermes_py.destinations.dicom import DicomSettings
from hermes_py.outcomes import LinkFailure, LinkKind, Outcome, Result

LOG = logging.getLogger(__name__)

# Our receive PDU size (we only receive small responses; 256 KiB is the measured sweet spot
# for the peer's side, which is what it advertises to us).
MAX_PDU = 262144
# This many transient statuses in a row on one association = the destination is busy as a
# whole (disk full, database down): back it off instead of cycling the backlog through it.
TRANSIENT_RUN = 3
# Different instances whose sends ended their association, with nothing answered since:
# this many and the destination, not the instances, is failing.
SEVERED_DISTINCT = 2


class DicomDestination(Destination):
    """C-STORE to one ``[destinations.NAME]``; see the module docstring."""

    def __init__(self, settings: DicomSettings, label: str = "",
                 workspace: Workspace = SYSTEM_TEMP):
        pynetdicom_compat.configure_sending()
        # Where conversions write their temp copy (the spool's file system) and the
        # inflate cap; from the configuration.
        self.workspace = workspace
        self._gate: pynetdicom_compat.SendGate | None = None
        self.settings = settings
        self.name = settings.name
        self.label = label or settings.name
        self.ae = AE(ae_title=settings.calling_ae_title)
        self.ae.connection_timeout = settings.connection_timeout
        self.ae.acse_timeout = settings.acse_timeout
        self.ae.dimse_timeout = settings.dimse_timeout
        self.ae.network_timeout = settings.network_timeout
        self.ae.maximum_pdu_size = MAX_PDU
        self._associations = 0
        self._assoc_label = ""
        self._last_rejected: list[PresentationContext] = []
        # SOP Instance UIDs whose send ended the association since the last answer.
        self._severed: set[str] = set()
        t = settings.tls
        self._tls = ((tls.client_context(t), t.server_name or settings.host)
                     if t is not None else None)

    # ------------------------------------------------------------ the batch

    def deliver(self, items: Sequence[Item], report: Report,
                should_stop: Callable[[], bool]) -> LinkFailure | None:
        groups = negotiation.plan(items, key=lambda i: (i.sop_class_uid, i.transfer_syntax))
        for group, contexts in groups:
            pending = list(group)
            while pending:
                if should_stop():
                    return None
                assoc, failure = self.associate(contexts)
                if assoc is None:
                    if failure is None:  # the peer accepted none of the contexts
                        self._no_contexts(pending, report)
                        break
                    return failure
                try:
                    failure = self._send_all(assoc, pending, report, should_stop)
                finally:
                    self._finish(assoc)
                if failure is not None:
                    return failure
        return None

    def close(self) -> None:
        self.ae.shutdown()

    def _no_contexts(self, pending: list[Item], report: Report) -> None:
        rejected = self._last_rejected
        for item in pending:
            try:
                negotiation.choose([], rejected, item.sop_class_uid, item.transfer_syntax)
                reason = "destination accepted no presentation context"
            except negotiation.Unsendable as e:
                reason = str(e)
            report(item, Result(Outcome.PERMANENT, reason, association=self._assoc_label))
        pending.clear()

    # ------------------------------------------------------------ the probe (C-ECHO)

    def probe(self) -> Probe:
        """C-ECHO with our calling AE and timeouts; say exactly what failed, for a person."""
        s = self.settings
        t0 = time.monotonic()
        assoc, failure = self.associate([build_context(pynetdicom_compat.VERIFICATION)])
        if assoc is None:
            if failure is None:
                return Probe(False, "association accepted but the Verification SOP class was "
                                    "rejected (the peer does not answer C-ECHO)")
            return Probe(False, self._failure_text(failure))
        t1 = time.monotonic()
        try:
            st = assoc.send_c_echo()
        finally:
            self._finish(assoc)
        t2 = time.monotonic()
        if not st:
            return Probe(False, "association accepted but no C-ECHO response (timeout after "
                                f"{s.dimse_timeout:g}s or abort)")
        code = int(getattr(st, "Status", -1))
        if code != 0:
            return Probe(False, f"C-ECHO answered status 0x{code:04X}")
        total = (t2 - t0) * 1000
        return Probe(True, f"OK {total:.0f} ms (association {(t1 - t0) * 1000:.0f} ms, C-ECHO "
                           f"{(t2 - t1) * 1000:.0f} ms)", total)

    def _failure_text(self, f: LinkFailure) -> str:
        s = self.settings
        where = f"{s.host}:{s.port}"
        if f.kind is LinkKind.REFUSED:
            return f"connection refused by {where} (nothing listens there)"
        if f.kind is LinkKind.CONNECT_TIMEOUT:
            return f"timeout: no TCP connection to {where} within {s.connection_timeout:g}s"
        if f.reject is not None:
            _, source, reason = f.reject
            hint = (" - check ae_title / calling_ae_title"
                    if source == 1 and reason in (3, 7) else "")
            return outcomes.reject_text(*f.reject) + hint
        if f.kind is LinkKind.NO_RESPONSE and f.detail.startswith("no A-ASSOCIATE"):
            return (f"timeout: connected, but no association answer within acse_timeout "
                    f"{s.acse_timeout:g}s")
        if f.kind is LinkKind.NO_RESPONSE:
            return "connected, but the peer aborted or closed the association request"
        return f.detail

    # ------------------------------------------------------------ association

    def associate(self, contexts: list[PresentationContext]
                  ) -> tuple[Association | None, LinkFailure | None]:
        """An established association, or (None, why); (None, None) = no context accepted."""
        s = self.settings
        self._associations += 1
        self._assoc_label = f"{self.label}#{self._associations}"
        opened = threading.Event()

        def on_open(event: evt.Event) -> None:
            opened.set()
            pynetdicom_compat.set_nodelay(event.assoc)
            # its threads wait for work instead of polling (the negotiation too)
            pynetdicom_wake.wake_on_work(event.assoc)

        t0 = time.monotonic()
        assoc = self.ae.associate(s.host, s.port, contexts=contexts, ae_title=s.ae_title,
                                  max_pdu=MAX_PDU, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
                                  tls_args=self._tls,
                                  bind_address=(s.source_address, 0) if s.source_address
                                  else None)
        if assoc.is_established:
            pynetdicom_compat.set_nodelay(assoc)
            pynetdicom_compat.return_stolen_responses(assoc)
            self._gate = pynetdicom_compat.bound_send_queue(assoc, s.network_timeout)
            return assoc, None
        waited = time.monotonic() - t0
        self._last_rejected = list(assoc.rejected_contexts)
        p = assoc.acceptor.primitive
        if assoc.is_rejected and p is not None:
            return None, outcomes.classify_reject(int(p.result or 0), int(p.result_source or 0),
                                                  int(p.diagnostic or 0))
        if self._tls is not None:
            # pynetdicom only logs a TLS failure; it looks like refused or an abort.
            why = tls.diagnose(s.host, s.port, self._tls[0], self._tls[1],
                               s.connection_timeout)
            if why is not None:
                return None, LinkFailure(LinkKind.TLS_FAILED, f"{s.host}:{s.port}: {why}",
                                         misconfigured=True)
        if not opened.is_set():
            return None, self._connect_failure(waited)
        if p is not None and self._last_rejected and not assoc.accepted_contexts:
            return None, None
        if waited >= s.acse_timeout * 0.9:
            why = f"no A-ASSOCIATE answer within acse_timeout ({s.acse_timeout:g}s)"
        else:
            why = "the peer aborted or closed the association request"
        return None, LinkFailure(LinkKind.NO_RESPONSE, f"{why}: {s.host}:{s.port}")

    def _connect_failure(self, elapsed: float) -> LinkFailure:
        """Name the exact connect error (pynetdicom only logs it).

        A fast failure is checked once more with a plain connect, which fails
        just as fast and tells refused from unreachable; a slow one was the
        connection timeout, and is not waited out twice.
        """
        s = self.settings
        where = f"{s.host}:{s.port}"
        timeout = LinkFailure(LinkKind.CONNECT_TIMEOUT, f"{where}: no answer within "
                              f"connection_timeout ({s.connection_timeout:g}s)")
        if elapsed >= s.connection_timeout * 0.9:
            return timeout
        try:
            with socket.create_connection((s.host, s.port), timeout=s.connection_timeout):
                pass
        except ConnectionRefusedError as e:
            return LinkFailure(LinkKind.REFUSED, f"{where}: {e.strerror or e}")
        except TimeoutError:
            return timeout
        except socket.gaierror as e:
            return LinkFailure(LinkKind.CONNECT_FAILED,
                               f"cannot resolve host {s.host!r}: {e.strerror or e}")
        except OSError as e:
            return LinkFailure(LinkKind.CONNECT_FAILED,
                               f"cannot connect to {where}: {e.strerror or e}")
        return LinkFailure(LinkKind.CONNECT_FAILED, f"{where}: the connection failed, then a "
                           "second attempt succeeded (overloaded or flapping?)")

    def _finish(self, assoc: Association) -> None:
        try:
            if assoc.is_established:
                assoc.release()
            elif not (assoc.is_aborted or assoc.is_released):
                assoc.abort()
        except Exception:  # tearing down a dead link must never fail a batch
            LOG.debug("closing association %s", self._assoc_label, exc_info=True)

    # ------------------------------------------------------------ sending

    def _send_all(self, assoc: Association, pending: list[Item], report: Report,
                  should_stop: Callable[[], bool]) -> LinkFailure | None:
        """Send ``pending`` on ``assoc``, removing each item as it is answered.

        Returns None to go on (done, stopped, or dropped after progress: the
        caller re-associates for the rest) or the LinkFailure that ends the batch.
        """
        s = self.settings
        label = self._assoc_label
        answered = 0
        transient_run = 0
        msg_id = 0

        def settle(result: Result) -> None:
            """The head of ``pending`` is answered (or judged) with ``result``."""
            result.association = label
            report(pending.pop(0), result)

        while pending:
            if should_stop():
                return None
            if not assoc.is_established:
                if answered:
                    return None
                return LinkFailure(LinkKind.ABORTED, "the association ended before any "
                                                     "instance was answered")
            item = pending[0]
            with contextlib.ExitStack() as temps:   # a converted copy lives until answered
                try:
                    choice = negotiation.choose(assoc.accepted_contexts,
                                                assoc.rejected_contexts,
                                                item.sop_class_uid, item.transfer_syntax)
                    payload = temps.enter_context(
                        negotiation.prepare(item.path, choice, self.workspace))
                except negotiation.Unsendable as e:
                    settle(Result(Outcome.PERMANENT, str(e)))
                    continue
                except transcode.TempSpaceError as e:
                    settle(Result(Outcome.TRANSIENT, str(e)))
                    continue
                except (OSError, InvalidDicomError, ValueError, AttributeError, EOFError) as e:
                    settle(Result(Outcome.PERMANENT, f"cannot read the instance file: "
                                                     f"{type(e).__name__}: {e}"))
                    continue
                msg_id = msg_id % 65535 + 1
                t0 = time.monotonic()
                try:
                    status, delivered_as = self._store(assoc, payload, choice, msg_id, temps)
                except negotiation.Unsendable as e:
                    settle(Result(Outcome.PERMANENT, str(e)))
                    continue
                except transcode.TempSpaceError as e:
                    settle(Result(Outcome.TRANSIENT, str(e)))
                    continue
                except RuntimeError as e:
                    if not assoc.is_established:
                        continue  # the association is gone; the loop head decides
                    settle(Result(Outcome.PERMANENT, f"cannot send: {e}"))
                    continue
                except (OSError, EOFError) as e:
                    # Reading our own file failed while streaming it: half a message may be
                    # on the wire, so this association is unusable; the rest goes on a new one.
                    answered += 1  # handled: not the destination's fault
                    settle(Result(Outcome.PERMANENT, f"cannot read the instance file while "
                                                     f"sending it: {type(e).__name__}: {e}"))
                    assoc.abort()
                    continue
            if not status:
                waited = time.monotonic() - t0
                if self._gate is not None and self._gate.stalled:
                    kind = LinkKind.DIMSE_TIMEOUT
                    why = (f"the peer stopped reading the data set for network_timeout "
                           f"({s.network_timeout:g}s); connection closed")
                elif s.dimse_timeout and waited >= s.dimse_timeout * 0.9:
                    kind = LinkKind.DIMSE_TIMEOUT
                    why = f"no C-STORE response within dimse_timeout ({s.dimse_timeout:g}s)"
                else:
                    why = "the association was aborted or the connection lost during the send"
                    self._severed.add(item.sop_instance_uid)
                    settle(Result(Outcome.TRANSIENT, why, severed=True))
                    if len(self._severed) < SEVERED_DISTINCT:
                        return None           # blamed on the instance: go on with the rest
                    n, self._severed = len(self._severed), set()
                    return LinkFailure(LinkKind.ABORTED, f"{why}, for {n} different instances "
                                                         "in a row")
                settle(Result(Outcome.TRANSIENT, why))
                return None if answered else LinkFailure(kind, why)
            res = outcomes.from_status(int(status.Status), s.status_classes,
                                       error_comment=str(status.get("ErrorComment", "") or ""),
                                       delivered_as=delivered_as)
            answered += 1
            self._severed.clear()
            settle(res)
            if res.outcome is Outcome.TRANSIENT:
                transient_run += 1
                if transient_run >= TRANSIENT_RUN:
                    return LinkFailure(LinkKind.BUSY, f"{res.reason} for {transient_run} "
                                                      "instances in a row")
            else:
                transient_run = 0
        return None

    def _store(self, assoc: Association, payload: Path | Dataset, choice: negotiation.Choice,
               msg_id: int, temps: contextlib.ExitStack) -> tuple[Dataset, str]:
        """One C-STORE; a file pynetdicom cannot stream as is is rewritten and streamed.

        The fallback used to ``dcmread`` the whole file (with a deflated one, that
        inflates it in memory, ``pydicom/filereader.py:897-903``); now only the
        small elements are read to choose a context, and the copy goes through
        a temp file (``temps`` removes it after the answer). Only decompression
        still builds a Dataset.
        """
        if isinstance(payload, Path):
            try:
                return assoc.send_c_store(payload, msg_id=msg_id), choice.transfer_syntax
            except (ValueError, AttributeError, InvalidDicomError) as e:
                # Raised before anything is sent: no preamble/meta, or a meta transfer syntax
                # that disagrees with the sidecar's.
                LOG.debug("streaming %s failed (%s); rewriting it", payload, e)
                payload, choice = self._fallback(assoc, payload, temps, e)
        try:
            return assoc.send_c_store(payload, msg_id=msg_id), choice.transfer_syntax
        except (ValueError, AttributeError) as e:
            raise negotiation.Unsendable(f"cannot send: {e}") from e

    def _fallback(self, assoc: Association, path: Path, temps: contextlib.ExitStack,
                  cause: Exception) -> tuple[Path | Dataset, negotiation.Choice]:
        """What to send for a file whose own meta pynetdicom could not stream from."""
        meta0: Dataset = Dataset()
        with contextlib.suppress(Exception):   # no preamble: dcmread(force=True) below
            meta0 = transcode.read_meta(path)[0]
        stored = str(meta0.get("TransferSyntaxUID", "") or "")
        if stored == DeflatedExplicitVRLittleEndian:
            # Never dcmread a deflated file (whole-file inflate); its meta is readable,
            # so choose by it and convert by streaming like any other.
            sop = str(meta0.get("MediaStorageSOPClassUID", "") or "")
            choice = negotiation.choose(assoc.accepted_contexts, assoc.rejected_contexts,
                                        sop, stored)
            return temps.enter_context(negotiation.prepare(path, choice, self.workspace)), choice
        try:
            ds = dcmread(path, force=True, defer_size=transcode.DEFER_SIZE)  # small values
        except (InvalidDicomError, ValueError, EOFError, AttributeError) as e:
            raise negotiation.Unsendable(f"cannot read the instance file: "
                                         f"{type(e).__name__}: {e}") from cause
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if not ts:
            raise negotiation.Unsendable(
                "the file has no transfer syntax in its meta header") from cause
        choice = negotiation.choose(assoc.accepted_contexts, assoc.rejected_contexts,
                                    str(ds.get("SOPClassUID", "")), ts)
        target = choice.transfer_syntax
        if choice.mode is negotiation.Mode.DECOMPRESS or target not in negotiation.UNCOMPRESSED:
            # Decompression (and a compressed file with a broken meta) still go via a
            # Dataset: the whole file in memory.
            return negotiation.convert(dcmread(path, force=True), choice), choice
        return temps.enter_context(negotiation.rewrite(path, target, self.workspace)), choice
