"""A destination's failover settings as the config validates them (no spool, no I/O).

Apart from failover.py so that config.py can name them without importing the spool
machinery that failover.py drives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FailoverMode(enum.StrEnum):
    DIVERT = "divert"   # another path to the same archive: instances move to the backup
    COPY = "copy"       # a backup site: the backup gets them too, the primary keeps its queue


@dataclass(frozen=True)
class FailoverPolicy:
    to: str
    mode: FailoverMode
    after: float
    failback_after: float
