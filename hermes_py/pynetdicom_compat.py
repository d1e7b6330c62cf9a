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
- ``dul._run_loop_delay``: pynetdicom's DUL thread sleeps this long (1 ms) after
  every loop that found nothing to do, so each C-STORE waits up to 1 ms for its
  data to be noticed and again for its response to be sent. We set 0.1 ms on our
  own busy associations (each its own DUL object, never the class), and give an
  idle one the 1 ms back: the poll costs a little CPU per open association.
- ``dul.socket.socket``: TCP_NODELAY on our SCU sockets (pynetdicom never sets
  it; with Nagle and the peer's delayed ACK every small C-STORE stalls).
- ``Association._serve_request``: see :func:`return_stolen_responses`.
- ``AE._servers``: a server we build ourselves (``make_server``) is registered
  there, so ``AssociationServer.shutdown()`` can remove itself.
- ``C_STORE._dataset_file`` / ``_dataset_path``: the file chunked receive wrote
  (``received_file``); ``dul.is_alive()``: whether a peer's connection still
  runs (``connection_alive``), which pynetdicom's own association count ignores.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE, _config, dimse_messages, sop_class
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

BUSY_LOOP_DELAY = 0.0001
IDLE_LOOP_DELAY = 0.001   # pynetdicom's own

# pynetdicom generates its SOP class constants at import, so they carry no types.
VERIFICATION: str = sop_class.Verification  # type: ignore[attr-defined]


def set_loop_delay(assoc: Any, delay: float) -> None:
    """Per association (its own DUL object), never pynetdicom's class or module."""
    with contextlib.suppress(AttributeError):
        assoc.dul._run_loop_delay = delay


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


def configure_sending() -> None:
    """The process-wide knobs a sending process needs (a dispatcher is one; idempotent)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server, binding with SO_REUSEPORT so several receivers share a port."""

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    ae._servers.append(server)


def connection_alive(assoc: Association) -> bool:
    return bool(assoc.dul.is_alive())


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
