"""DICOM C-STORE SCU: one AE and one association at a time, per worker thread.

Why each piece is here:

- One ``AE`` per object, and objects are never shared between threads.
  pynetdicom's ``send_c_store`` pauses the association's reactor thread, sends,
  waits for the response on a shared queue, and un-pauses the reactor. A second
  thread on the same association un-pauses the reactor while the first is still
  waiting; the reactor then takes the first thread's C-STORE-RSP off the queue,
  finds it is not a request, logs "Received unexpected C-STORE service message"
  and drops it, and the first thread waits out its whole DIMSE timeout (the
  association is then aborted). pynetdicom issues #137 and #842 are this.
- ``_return_stolen_responses``: the same theft happens with a single thread. The
  pause handshake trusts a flag (``_is_paused``) that the reactor sets *before*
  it blocks and clears only *after* it wakes, so right after one C-STORE
  un-pauses it, the next C-STORE can see the stale "paused" flag, send, and the
  waking reactor grabs the fast reply. We measured it: one stall per ~800
  C-STOREs to an in-process SCP with two busy threads contending for the GIL,
  none in 3,000 with this guard (it handed 11 stolen responses back). The guard
  makes the reactor put any *response* it picks up back on the queue, where
  ``send_c_store`` is blocked waiting for it; requests are served as before.
  Only our own association objects are patched, never the class.
- ``connection_timeout`` so a black-holed host costs seconds, not minutes;
  ``TCP_NODELAY`` on our socket (pynetdicom never sets it; with Nagle and the
  peer's delayed ACK every small C-STORE stalls ~40 ms); a 0.1 ms DUL poll on
  our associations (``BUSY_LOOP_DELAY``) instead of 1 ms; message IDs that
  increment per association; the calling AE title from the destination.
- An association that drops mid-batch is re-opened and only what was not
  answered is sent again; the instance in flight is a per-instance transient
  failure (so an instance that kills the peer cannot block the queue head).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from hermes_py import negotiation, outcomes
from hermes_py.config import DestinationSettings
from hermes_py.destinations.base import Destination, Item, Report
from hermes_py.outcomes import LinkFailure, LinkKind, Outcome, Result

LOG = logging.getLogger(__name__)

# Our receive PDU size (we only receive small responses; 256 KiB is the measured sweet spot
# for the peer's side, which is what it advertises to us).
MAX_PDU = 262144
# This many transient statuses in a row on one association = the destination is busy as a
# whole (disk full, database down): back it off instead of cycling the backlog through it.
TRANSIENT_RUN = 3
# pynetdicom's DUL thread sleeps _run_loop_delay (1 ms) after every loop that found
# nothing to do, so each C-STORE waited up to 1 ms for its PDUs to be picked up from the
# send queue and again for the response to be noticed. Our associations live for one
# batch and are busy throughout, so 0.1 ms costs little (~8 % of a core while open).
BUSY_LOOP_DELAY = 0.0001


def configure_pynetdicom() -> None:
    """The process-wide pynetdicom knobs a dispatcher needs (pynetdicom offers no other way).

    Chunked sending streams a file's bytes after the meta instead of decoding
    and re-encoding it; without the "standard" log handlers pynetdicom stops
    formatting (and copying) every DIMSE message.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"


def _return_stolen_responses(assoc: Association) -> None:
    """Make this association's reactor hand back any DIMSE *response* it dequeues.

    See the module docstring: the reactor may win the race for a C-STORE-RSP
    that ``send_c_store`` is waiting for. Putting it back on the queue wakes
    the waiting sender; nothing else on a C-STORE SCU association expects
    responses. Relies on pynetdicom 3.0.4 internals (pinned in pyproject.toml).
    """
    original = assoc._serve_request
    queue = assoc.dimse.msg_queue

    def serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and getattr(msg, "is_valid_response", False):
            queue.put((context_id, msg))
            return
        original(msg, context_id)

    assoc._serve_request = serve  # type: ignore[method-assign]


def _fast_loop(assoc: Association) -> None:
    """This association's DUL polls every BUSY_LOOP_DELAY (its own object, not the class)."""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = BUSY_LOOP_DELAY


def _set_nodelay(assoc: Association) -> bool:
    try:
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is None:
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
    except (AttributeError, OSError):
        return False


class DicomDestination(Destination):
    """C-STORE to one ``[destinations.NAME]``; see the module docstring."""

    def __init__(self, settings: DestinationSettings, label: str = ""):
        configure_pynetdicom()
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
            _set_nodelay(event.assoc)
            _fast_loop(event.assoc)  # the negotiation is quicker too

        t0 = time.monotonic()
        assoc = self.ae.associate(s.host, s.port, contexts=contexts, ae_title=s.ae_title,
                                  max_pdu=MAX_PDU, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        if assoc.is_established:
            _set_nodelay(assoc)
            _return_stolen_responses(assoc)
            return assoc, None
        self._last_rejected = list(assoc.rejected_contexts)
        p = assoc.acceptor.primitive
        if assoc.is_rejected and p is not None:
            return None, outcomes.classify_reject(int(p.result or 0), int(p.result_source or 0),
                                                  int(p.diagnostic or 0))
        if not opened.is_set():
            return None, self._connect_failure(time.monotonic() - t0)
        if p is not None and self._last_rejected and not assoc.accepted_contexts:
            return None, None
        return None, LinkFailure(
            LinkKind.NO_RESPONSE,
            f"{s.host}:{s.port} accepted the connection but sent no A-ASSOCIATE answer within "
            f"acse_timeout ({s.acse_timeout:g}s), or aborted the negotiation")

    def _connect_failure(self, elapsed: float) -> LinkFailure:
        """Name the exact connect error (pynetdicom only logs it).

        A fast failure is checked once more with a plain connect, which fails
        just as fast and tells refused from unreachable; a slow one was the
        connection timeout, and is not waited out twice.
        """
        s = self.settings
        where = f"{s.host}:{s.port}"
        if elapsed >= s.connection_timeout * 0.9:
            return LinkFailure(LinkKind.CONNECT_TIMEOUT, f"{where}: no answer within "
                               f"connection_timeout ({s.connection_timeout:g}s)")
        try:
            with socket.create_connection((s.host, s.port), timeout=s.connection_timeout):
                pass
        except ConnectionRefusedError as e:
            return LinkFailure(LinkKind.REFUSED, f"{where}: {e.strerror or e}")
        except TimeoutError:
            return LinkFailure(LinkKind.CONNECT_TIMEOUT, f"{where}: no answer within "
                               f"connection_timeout ({s.connection_timeout:g}s)")
        except OSError as e:
            return LinkFailure(LinkKind.CONNECT_FAILED, f"{where}: {e.strerror or e}")
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
        while pending:
            if should_stop():
                return None
            if not assoc.is_established:
                if answered:
                    return None
                return LinkFailure(LinkKind.ABORTED, "the association ended before any "
                                                     "instance was answered")
            item = pending[0]
            try:
                choice = negotiation.choose(assoc.accepted_contexts, assoc.rejected_contexts,
                                            item.sop_class_uid, item.transfer_syntax)
                payload = negotiation.prepare(item.path, choice)
            except negotiation.Unsendable as e:
                pending.pop(0)
                report(item, Result(Outcome.PERMANENT, str(e), association=label))
                continue
            except (OSError, InvalidDicomError, ValueError, AttributeError, EOFError) as e:
                pending.pop(0)
                report(item, Result(Outcome.PERMANENT, f"cannot read the instance file: "
                                    f"{type(e).__name__}: {e}", association=label))
                continue
            msg_id = msg_id % 65535 + 1
            t0 = time.monotonic()
            try:
                status, delivered_as = self._store(assoc, payload, choice, msg_id)
            except negotiation.Unsendable as e:
                pending.pop(0)
                report(item, Result(Outcome.PERMANENT, str(e), association=label))
                continue
            except RuntimeError as e:
                if not assoc.is_established:
                    continue  # the association is gone; the loop head decides
                pending.pop(0)
                report(item, Result(Outcome.PERMANENT, f"cannot send: {e}", association=label))
                continue
            except (OSError, EOFError) as e:
                # Reading our own file failed while streaming it: half a message may be on
                # the wire, so this association is unusable; the rest goes on a new one.
                pending.pop(0)
                answered += 1  # handled: not the destination's fault
                report(item, Result(Outcome.PERMANENT, f"cannot read the instance file while "
                                    f"sending it: {type(e).__name__}: {e}", association=label))
                assoc.abort()
                continue
            if not status:
                pending.pop(0)
                waited = time.monotonic() - t0
                if s.dimse_timeout and waited >= s.dimse_timeout * 0.9:
                    kind = LinkKind.DIMSE_TIMEOUT
                    why = f"no C-STORE response within dimse_timeout ({s.dimse_timeout:g}s)"
                else:
                    kind = LinkKind.ABORTED
                    why = "the association was aborted or the connection lost during the send"
                report(item, Result(Outcome.TRANSIENT, why, association=label))
                if answered:
                    return None
                return LinkFailure(kind, why)
            code = int(status.Status)
            res = outcomes.from_status(code, s.status_classes,
                                       error_comment=str(status.get("ErrorComment", "") or ""),
                                       delivered_as=delivered_as)
            res.association = label
            pending.pop(0)
            answered += 1
            report(item, res)
            if res.outcome is Outcome.TRANSIENT:
                transient_run += 1
                if transient_run >= TRANSIENT_RUN:
                    return LinkFailure(LinkKind.BUSY, f"{res.reason} for {transient_run} "
                                                      "instances in a row")
            else:
                transient_run = 0
        return None

    def _store(self, assoc: Association, payload: Path | Dataset, choice: negotiation.Choice,
               msg_id: int) -> tuple[Dataset, str]:
        """One C-STORE; a file pynetdicom cannot stream is re-read and sent as a Dataset."""
        if isinstance(payload, Path):
            try:
                return assoc.send_c_store(payload, msg_id=msg_id), choice.transfer_syntax
            except (ValueError, AttributeError, InvalidDicomError) as e:
                # Raised before anything is sent: no preamble/meta, or a meta transfer syntax
                # that disagrees with the sidecar's. Read the file properly and convert.
                LOG.debug("streaming %s failed (%s); sending it decoded", payload, e)
                ds = dcmread(payload, force=True)
                meta = getattr(ds, "file_meta", None)
                ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
                if not ts:
                    raise negotiation.Unsendable(
                        "the file has no transfer syntax in its meta header") from e
                choice = negotiation.choose(assoc.accepted_contexts, assoc.rejected_contexts,
                                            str(ds.get("SOPClassUID", "")), ts)
                payload = negotiation.convert(ds, choice)
        try:
            return assoc.send_c_store(payload, msg_id=msg_id), choice.transfer_syntax
        except (ValueError, AttributeError) as e:
            raise negotiation.Unsendable(f"cannot send: {e}") from e
