"""A file a C-STORE streams into: in the spool's temp folder, owned by one side at a time.

pynetdicom (chunked receive) writes each incoming data set into a temp file on
the association's network thread; the C-STORE handler later publishes it, or the
connection-closed cleanup deletes it. This is that file, made safe for both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hermes_py.spool.names import DCM


class SpoolTempFile:
    """What pynetdicom writes a C-STORE data set into, instead of a NamedTemporaryFile.

    pynetdicom calls ``write``, ``file.flush``, ``close`` and reads ``name``, all on
    the association's network (DUL) thread. A write error must not escape there:
    it would kill the DUL thread and the peer would get an abort instead of a
    status it understands. So the first OSError is recorded, the partial file is
    removed at once (freeing the space), later writes are dropped, and the C-STORE
    handler answers 0xA700 when it sees ``error``.

    ``claim``/``discard`` decide, under a lock, who owns the file: the handler
    (which publishes it) or the connection-closed cleanup (which deletes it).
    """

    def __init__(self, directory: Path):
        self.path = directory / f"{os.getpid()}.recv.{os.urandom(8).hex()}{DCM}"
        self.name = str(self.path)
        self.file = self  # pynetdicom calls ``tmp.file.flush()``
        self.error: OSError | None = None
        self.written = 0
        self._lock = threading.Lock()
        self._state = "open"  # open -> claimed | discarded
        self._f: IO[bytes] | None = None
        try:
            self._f = open(self.path, "xb")  # noqa: SIM115 - lives across pynetdicom calls
        except OSError as e:
            self.error = e

    def write(self, data: bytes) -> int:
        if self.error is None and self._f is not None:
            try:
                self._f.write(data)
                self.written += len(data)
            except OSError as e:
                self.fail(e)
        return len(data)

    def flush(self) -> None:
        if self.error is None and self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self.fail(e)

    def fail(self, err: OSError) -> None:
        self.error = err
        self._close_quietly()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _close_quietly(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:  # the buffered tail could not be written
                if self.error is None:
                    self.error = e

    def close(self) -> None:
        """Flush and close our handle; a failure becomes ``error`` like any write error."""
        self._close_quietly()

    def claim(self) -> bool:
        """The C-STORE handler takes the file; False if the connection cleanup got it."""
        with self._lock:
            if self._state != "open":
                return False
            self._state = "claimed"
            return True

    def discard(self, force: bool = False) -> bool:
        """Delete the file unless the handler owns it (or ``force``, the handler's own cleanup)."""
        with self._lock:
            if self._state == "claimed" and not force:
                return False
            self._state = "discarded"
        self._close_quietly()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        return True


@contextlib.contextmanager
def scratch_file(folder: Path | None, suffix: str = DCM) -> Iterator[Path]:
    """A fresh empty file in ``folder`` (a stage's private tmp folder; None: the system
    temp folder), removed on exit whatever happened: a converted copy of an instance
    lives exactly as long as its send. A kill -9 leaves it to ``sweep_tmp``."""
    fd, name = tempfile.mkstemp(prefix="hermes-conv-", suffix=suffix,
                                dir=os.fspath(folder) if folder else None)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
