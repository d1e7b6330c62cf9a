"""Every reach into pynetdicom's internals, in one place (pynetdicom 3.0.4, pinned).

pynetdicom's public API does not offer what a router needs at its speed and
safety, so a few private attributes are set or wrapped. Each is here, with why,
so an upgrade of the pin is checked against one file:

- ``_config`` knobs, process-wide. Receiving: chunked C-STORE receive (the data
  set streams into a file, never held in memory or decoded), every storage SOP
  class accepted (``UNRESTRICTED_STORAGE_SERVICE``) and no "standard" log
  handlers (which format and copy every DIMSE message). Sending: chunked sends
  (a file's bytes streamed after its meta, never decoded and re-encoded).
- ``dimse_messages.NamedTemporaryFile``: where chunked receive writes, swapped for
  a factory that puts the file into the receiving process's own spool folder.
  Associations of any other AE in the process (a test's SCP) keep pynetdicom's
  own temp file, and the swap is undone when the last receiver stops.
- the DUL's and the reactor's polling loops: see ``pynetdicom_wake`` (our own
  associations wait for work instead of polling every millisecond).
- ``dimse_messages.encode``: command sets encoded without pydicom's general writer,
  byte for byte the same (``dimse_codec``), installed when this module is imported.
- ``dul.socket.socket``: TCP_NODELAY on our SCU sockets (pynetdicom never sets
  it; with Nagle and the peer's delayed ACK every small C-STORE stalls).
- ``dul.send_pdu`` / ``dul.to_provider_queue`` / the acceptor's Maximum Length
  item: see :func:`bound_send_queue` (chunked send is only bounded in memory if
  the sender waits for the DUL thread).
- ``Association._serve_request``: see :func:`return_stolen_responses`.
- ``AE._servers``: a server we build ourselves (``make_server``) is registered
  there, so ``AssociationServer.shutdown()`` can remove itself.
- ``C_STORE._dataset_file`` / ``_dataset_path``: the file chunked receive wrote
  (``received_file``).
- ``AssociationSocket.recv`` of each accepted connection (its own object): bounded
  in time and in the PDU length it accepts, see :func:`guard_reads`; the socket's
  timeout (``network_timeout``) for sends.
- ``dul.to_user_queue`` / ``dul.state_machine.current_state``: an association
  thread waiting for an A-ASSOCIATE-RQ that can no longer come is woken
  (:func:`end_unrequested`); ``requestor.primitive``: whether the RQ has arrived.
- ``ThreadingMixIn.request_queue_size``: a listen backlog for bursts
  (:class:`ReceiverServer`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE, _config, dimse_messages, sop_class
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA, MaximumLengthNotification
from pynetdicom.transport import ThreadedAssociationServer

from hermes_py import dimse_codec

LOG = logging.getLogger(__name__)
dimse_codec.install()

# pynetdicom generates its SOP class constants at import, so they carry no types.
VERIFICATION: str = sop_class.Verification  # type: ignore[attr-defined]


def set_nodelay(assoc: Association) -> bool:
    try:
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is None:
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
    except (AttributeError, OSError):
        return False


def return_stolen_responses(assoc: Association) -> None:
    """Make this association's reactor hand back any DIMSE *response* it dequeues.

    ``send_c_store`` pauses the association's reactor, sends, and waits for the
    response on a shared queue. The pause handshake trusts a flag (``_is_paused``)
    that the reactor sets *before* it blocks and clears only *after* it wakes,
    so right after one C-STORE un-pauses it the next one can see the stale flag,
    send, and the waking reactor grabs the fast reply, logs "Received unexpected
    C-STORE service message", drops it, and the sender waits out its whole DIMSE
    timeout (pynetdicom #137, #842; it happens under GIL contention, and not with
    this guard). Requests are served as before; nothing else on a C-STORE SCU
    association expects responses. Only our own association objects are patched,
    never the class.
    """
    original = assoc._serve_request
    queue = assoc.dimse.msg_queue

    def serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and getattr(msg, "is_valid_response", False):
            queue.put((context_id, msg))
            return
        original(msg, context_id)

    assoc._serve_request = serve  # type: ignore[method-assign]


# Most bytes of P-DATA queued for the DUL thread at once (per association).
SEND_QUEUE_BYTES = 4 * 1024 * 1024
# The PDU size we send in when the peer says "no limit" (Maximum Length 0).
UNLIMITED_PEER_PDU = 1024 * 1024
_SEND_POLL = 0.0002


class SendGate:
    """What :func:`bound_send_queue` saw on one association (read by the dispatcher)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit            # P-DATA primitives allowed in the queue
        self.stalled = False          # the peer took nothing for stall_timeout: we cut it
        self.dropped = 0              # P-DATA not queued because the DUL was already gone


def bound_send_queue(assoc: Association, stall_timeout: float | None,
                     max_bytes: int = SEND_QUEUE_BYTES) -> SendGate:
    """Make a chunked send wait for the wire instead of queueing the whole file.

    Why: ``send_c_store(path)`` reads the file one PDU at a time
    (``dimse_messages.py:607-634``), but ``DIMSEServiceProvider.send_msg``
    (``dimse.py:335-336``) puts every P-DATA on the DUL's unbounded
    ``to_provider_queue`` (``dul.py:487``) without waiting, and only the DUL thread
    takes them off, one per reactor loop, as fast as the socket drains. Reading
    from the page cache outruns the socket, so the queue holds most of the file:
    400 MB of a 1 GiB instance against a local storescp, 794 MB when the peer
    paused for 8 s, i.e. the whole file for a slow or stalled peer. Here the
    sending thread waits while ``limit`` P-DATA are queued, so at most
    ``max_bytes`` (plus the PDU being built) are in memory.

    While waiting it watches the DUL: if the DUL thread has ended (peer abort,
    connection lost) the rest is dropped, not queued, and pynetdicom's
    ``get_msg`` then returns at once (the state machine posted ``(None, None)``,
    ``fsm.py:815-894``). If the peer takes nothing for ``stall_timeout`` seconds
    (the socket is blocking, ``transport.py:421``, so the DUL would sit in
    ``send()`` forever and ``Association.kill()`` would then wait for it forever)
    the socket is shut down: the DUL's send fails (Evt17), the association
    ends, and ``gate.stalled`` says why.

    A peer advertising Maximum Length 0 ("unlimited") would make chunked send
    read the whole data set as one PDV (``dimse_messages.py:614-617``); we send
    in ``UNLIMITED_PEER_PDU`` pieces instead, which the peer must accept.

    Only this association's DUL object is patched. Non-P-DATA primitives
    (A-ABORT, A-RELEASE) are never held back.
    """
    dul = assoc.dul
    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification) and not item.maximum_length_received:
            item.maximum_length_received = UNLIMITED_PEER_PDU
    pdu = int(assoc.acceptor.maximum_length or UNLIMITED_PEER_PDU)
    gate = SendGate(max(2, max_bytes // pdu))
    original = dul.send_pdu
    queue = dul.to_provider_queue

    def dul_gone() -> bool:
        return bool(dul._kill_thread) or not dul.is_alive()

    def wait_for_room() -> bool:
        """True when there is room; False when the link is gone (or we cut it)."""
        if queue.qsize() < gate.limit:
            return not dul_gone()
        last = queue.qsize()
        since = time.monotonic()
        while queue.qsize() >= gate.limit:
            if dul_gone():
                return False
            now = time.monotonic()
            size = queue.qsize()
            if size < last:
                last, since = size, now
            elif stall_timeout and now - since > stall_timeout:
                gate.stalled = True
                _cut(assoc)
                return False
            time.sleep(_SEND_POLL)
        return True

    def send_pdu(primitive: Any) -> None:
        if isinstance(primitive, P_DATA) and not wait_for_room():
            gate.dropped += 1
            return
        original(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]
    return gate


def _cut(assoc: Association) -> None:
    """Shut the socket so a DUL blocked in ``send()`` fails and the association ends."""
    with contextlib.suppress(AttributeError, OSError):
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def configure_sending() -> None:
    """The process-wide knobs a sending process needs (a dispatcher is one; idempotent)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog that absorbs a burst of connects.

    socketserver listens with a backlog of 5. Its one accept thread starts two
    threads per connection; when connections come faster than that, the kernel
    drops SYNs and each dropped peer's connect waits out a 1 s retransmission (then
    3 s, 7 s): 200 connect+close in a loop took 32 s, and a modality connecting
    during such a burst waits seconds for nothing. The kernel caps the value at
    net.core.somaxconn.
    """

    request_queue_size = 128


class ReusePortServer(ReceiverServer):
    """Our server, binding with SO_REUSEPORT so several receivers share a port."""

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class TLSServer(ReceiverServer):
    """The TLS listener: the handshake runs in the connection's own thread, with a deadline.

    pynetdicom wraps each accepted socket in ``get_request``, in the one accept thread,
    with no timeout (transport.py:952-975): a client that connects and says nothing
    blocks every association after it for as long as it stays. Here ``get_request``
    hands back the raw socket and ``process_request_thread`` (already a thread per
    connection) does the handshake within ``handshake_timeout``; at most
    ``MAX_HANDSHAKES`` run at once, more are closed at once, so silent clients cost a
    bounded number of threads.
    """

    handshake_timeout = 10.0
    MAX_HANDSHAKES = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshakes = threading.BoundedSemaphore(self.MAX_HANDSHAKES)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        ctx = self.ssl_context
        if ctx is None or not self._handshakes.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.close()
            return
        try:
            request.settimeout(self.handshake_timeout)
            tls = ctx.wrap_socket(request, server_side=True)
            tls.settimeout(None)
        except (OSError, ValueError) as e:
            LOG.warning("TLS handshake with %s:%s failed: %s", *client_address[:2],
                        getattr(e, "reason", None) or e)
            with contextlib.suppress(OSError):
                request.close()
            return
        finally:
            self._handshakes.release()
        super().process_request_thread(tls, client_address)


class TLSReusePortServer(TLSServer, ReusePortServer):
    """The TLS listener shared by several receiver processes."""


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    ae._servers.append(server)


# ---------------------------------------------------------------- hostile peers

# The A-ASSOCIATE-RQ is not bounded by our max PDU (the peer has not read it yet):
# a real one is a few KiB (100 presentation contexts with 10 syntaxes each ~ 70 KiB).
ASSOCIATE_RQ_CAP = 1 << 20
# Over the max PDU we advertise: the length field counts the PDV item headers
# (4 + 2 bytes each), which a peer may not subtract, and several PDVs may share a PDU.
PDU_TOLERANCE = 4096
_READ_CHUNK = 1 << 16
_PDU_TYPES = range(0x01, 0x08)   # pynetdicom's, dul.py:_PDU_TYPES

_OPENED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_HUNG_UP: weakref.WeakSet[Any] = weakref.WeakSet()


def guard_reads(assoc: Association, max_pdu: int) -> None:
    """Bound what one accepted connection's PDU reads can cost, in time and in memory.

    pynetdicom's DUL thread reads a PDU in ``DULServiceProvider._read_pdu_data``:
    ``AssociationSocket.recv(6)`` for the header (dul.py:271), then
    ``recv(pdu_length)`` for the body (dul.py:302), whatever length the header
    announces; ``recv`` is a loop of blocking ``socket.recv(4096)`` calls into one
    bytearray (transport.py:570-612). The accepted socket has no timeout
    (``socket.accept()`` makes it blocking although the listening socket has
    network_timeout, transport.py:1001), and the ARTIM and idle timers are checked
    only between reads (dul.py:410, association.py:765). So a peer that sends a
    header and stalls holds that DUL thread forever, and its association thread too
    (``kill()`` waits for a DUL that is not in Sta1, association.py:541); and a 3 GB
    P-DATA-TF is 3 GB of RSS before anything looks at it (6 GB: ``_decode_pdu``
    copies it, dul.py:133).

    So this association's socket object (never the class) gets a ``recv`` that:

    - completes the first PDU (the A-ASSOCIATE-RQ) within acse_timeout of the
      connect, the ARTIM timer's rule (PS3.8 9.1.5), and each later read within
      network_timeout (a peer stalled that long inside a PDU is as dead as an idle
      one, and the idle timer cannot see it);
    - refuses a PDU whose header announces more than ``ASSOCIATE_RQ_CAP`` (an
      A-ASSOCIATE-RQ) or the max PDU we advertised plus ``PDU_TOLERANCE`` (any other
      type; none when ``max_pdu`` is 0, "unlimited"): it sends an A-ABORT (invalid
      PDU parameter value) and hands pynetdicom a short header, which pynetdicom
      takes for a closed connection (Evt17, dul.py:280-289) without reading the
      body: AA-5 before the association, AA-4 (EVT_ABORTED) after;
    - on a timeout returns what it has: pynetdicom takes a short PDU for a closed
      connection too (dul.py:311-320).

    After either, every read returns nothing (end-of-file): what the peer still sends
    is never parsed as further PDUs.

    The socket's own timeout becomes network_timeout, so a peer that stops reading
    cannot hold the DUL thread in ``send()`` forever either (a failed send is Evt17,
    transport.py:637). Reads of 64 KiB instead of pynetdicom's 4 KiB: the same
    bytes, fewer loops. Call at EVT_CONN_OPEN (before the DUL thread starts).
    """
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if transport is None or sock is None:
        return
    opened = time.monotonic()
    _OPENED[assoc] = opened
    pdu_cap = max_pdu + PDU_TOLERANCE if max_pdu > 0 else None
    body: int | None = None   # the length the last header announced: the next read's
    first = True              # the first PDU (the A-ASSOCIATE-RQ) is not complete yet
    cut = False               # refused or timed out: the connection reads as closed
    with contextlib.suppress(OSError):
        sock.settimeout(assoc.network_timeout)

    def peer() -> str:
        info = assoc.requestor.address_info
        return f"{info.address}:{info.port}" if info is not None else "?"

    def recv(nr_bytes: int) -> bytearray:
        nonlocal body, first, cut
        if cut:  # the rest of a refused PDU must not be read as further PDUs
            return bytearray()
        timeout = assoc.acse_timeout if first else assoc.network_timeout
        deadline = None if timeout is None else (opened if first else time.monotonic()) + timeout
        buf = bytearray()
        try:
            while len(buf) < nr_bytes:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                chunk = sock.recv(min(nr_bytes - len(buf), _READ_CHUNK))
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            LOG.warning("closing the connection from %s: %s %d of %d bytes within %gs",
                        peer(), "its A-ASSOCIATE-RQ sent" if first else "a PDU sent only",
                        len(buf), nr_bytes, timeout)
            cut = True
            return buf
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(assoc.network_timeout)
        if body is not None and nr_bytes == body:      # a body pynetdicom asked for
            body = None
            first = first and len(buf) < nr_bytes
            return buf
        if nr_bytes == 6 and len(buf) == 6:            # a header
            pdu_type, _, length = struct.unpack(">BBL", buf)
            if pdu_type in _PDU_TYPES:
                cap = ASSOCIATE_RQ_CAP if pdu_type == 0x01 else pdu_cap
                if cap is not None and length > cap:
                    LOG.warning("aborting the association from %s: a PDU (type 0x%02X) of "
                                "%d bytes, over the %d we accept", peer(), pdu_type, length,
                                cap)
                    abort = A_ABORT_RQ()
                    abort.source = 0x02             # service provider
                    abort.reason_diagnostic = 0x06  # invalid PDU parameter value
                    transport.send(abort.encode())
                    cut = True
                    return buf[:5]
                body = length
        return buf

    transport.recv = recv  # type: ignore[method-assign]


def unrequested(ae: AE) -> list[Association]:
    """``ae``'s accepted connections whose A-ASSOCIATE-RQ has not arrived, oldest first
    (not the ones already hung up by :func:`hang_up`)."""
    waiting = [a for a in ae.active_associations
               if a.is_acceptor and a.requestor.primitive is None and a not in _HUNG_UP]
    return sorted(waiting, key=lambda a: _OPENED.get(a, 0.0))


def hang_up(assoc: Association) -> None:
    """Close a connection from another thread: ``shutdown`` (never ``close``, whose fd
    number the DUL thread could then read as another connection's) ends its DUL's
    select/recv with end-of-file; the DUL then closes it (Evt17)."""
    _HUNG_UP.add(assoc)
    _cut(assoc)


def end_unrequested(assoc: Association) -> None:
    """At EVT_CONN_CLOSE: end the association thread of a connection closed before its
    A-ASSOCIATE-RQ arrived, now instead of after acse_timeout.

    The acceptor's thread waits ``acse_timeout`` for the RQ on ``dul.to_user_queue``
    (association.py:653) even when the DUL has already seen the connection close
    (Sta2 + Evt17/Evt18: AA-5/AA-2 stop the DUL but tell that queue nothing), so every
    connect+close (a health check, a scan) left a thread for 30 s. ``None`` is what
    that wait returns on its timeout: the thread takes its own timeout path. Only in
    Sta2 (no RQ received, so nothing else is queued); runs on the DUL thread.
    """
    with contextlib.suppress(AttributeError):
        dul = assoc.dul
        if (assoc.is_acceptor and assoc.requestor.primitive is None
                and dul.state_machine.current_state == "Sta2"):
            dul.to_user_queue.put(cast(Any, None))


def received_file(request: Any) -> tuple[Any, str | None]:
    """The temp file object a chunked C-STORE was written into, and its path."""
    return getattr(request, "_dataset_file", None), getattr(request, "_dataset_path", None)


# ---------------------------------------------------------------- chunked receive

TempFactory = Callable[[Any], Any]   # association -> an object pynetdicom writes into

_RECEIVING: weakref.WeakKeyDictionary[Any, TempFactory] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_SAVED: dict[str, Any] = {}
_ORIGINAL_NTF = dimse_messages.NamedTemporaryFile


def _temp_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile, redirected for the associations of a receiving AE.

    Runs on the DUL thread of the association being received (a
    ``DULServiceProvider`` with ``.assoc``).
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    factory = _RECEIVING.get(getattr(assoc, "ae", None)) if assoc is not None else None
    if factory is None:
        return _ORIGINAL_NTF(*args, **kwargs)
    return factory(assoc)


def start_receiving(ae: AE, new_temp_file: TempFactory) -> None:
    """Chunked receive into ``new_temp_file(assoc)`` for ``ae``'s associations.

    The knobs are process-global: set while at least one receiver runs, restored
    after the last, because another SCP in the same process (a test's) reads
    ``request.DataSet`` and would see it empty under chunked receive.
    """
    with _LOCK:
        if not _RECEIVING:
            _SAVED.update(
                chunked=_config.STORE_RECV_CHUNKED_DATASET,
                unrestricted=_config.UNRESTRICTED_STORAGE_SERVICE,
                log_level=_config.LOG_HANDLER_LEVEL,
                ntf=dimse_messages.NamedTemporaryFile,
            )
            _config.STORE_RECV_CHUNKED_DATASET = True
            _config.UNRESTRICTED_STORAGE_SERVICE = True
            _config.LOG_HANDLER_LEVEL = "none"
            dimse_messages.NamedTemporaryFile = _temp_file
        _RECEIVING[ae] = new_temp_file


def stop_receiving(ae: AE) -> None:
    with _LOCK:
        if _RECEIVING.pop(ae, None) is None:
            return
        if not _RECEIVING and _SAVED:
            _config.STORE_RECV_CHUNKED_DATASET = _SAVED["chunked"]
            _config.UNRESTRICTED_STORAGE_SERVICE = _SAVED["unrestricted"]
            _config.LOG_HANDLER_LEVEL = _SAVED["log_level"]
            dimse_messages.NamedTemporaryFile = _SAVED["ntf"]
            _SAVED.clear()
