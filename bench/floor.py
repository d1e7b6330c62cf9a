"""``python -m bench.floor PORT``: a bare pynetdicom SCP, the library's own receive floor.

tests.support.peers.ScriptedSCP (answers Success, keeps nothing on disk) in a process of
its own, pynetdicom's per-message log handlers off. The ``pynetdicom-receive`` row
tells how much of the receive time is pynetdicom itself and how much is what
hermes_py adds (durable writes, sidecars, logging).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    from pynetdicom import _config

    from tests.support import peers

    _config.LOG_HANDLER_LEVEL = "none"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scp = peers.ScriptedSCP("HERMES", port=int(argv[0]))
    scp.start()
    try:
        stop.wait()
    finally:
        scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
