"""Ages out what is finished, sweeps what crashes leave behind; never touches error/.

- copies in a stage with a ``keep`` (lifecycle.StageFacts: success/<dest>/ after
  ``[spool] keep_success``, discard/ after ``keep_discard``) are deleted. Age is
  the sidecar's mtime:
  the dispatcher writes a fresh sidecar when it moves an instance into
  success/ (so the mtime is the delivery time, the same instant as
  ``delivered_at``) and a stat is all it costs, where parsing every JSON of a
  week of deliveries each pass would not be. Without a sidecar, the .dcm's
  mtime counts. The .dcm goes first: a crash in between leaves an orphan
  sidecar, which the next pass removes.
- tmp/ files older than ``tmp_max_age`` belong to dead writers, and a stage's own
  ``tmp/<owner>/`` goes whole once its owner is dead (spool.sweep_tmp: the owner's
  flock tells).
- Orphan sidecars (a .json whose .dcm is gone: a crash between the two renames
  of a move) are removed only after being seen orphaned, unchanged, on two
  passes at least ORPHAN_GRACE apart, in the stages marked ``swept``. Age alone
  is not safe: in an outbox a sidecar's mtime is a retry time, not an age, and
  every move renames the .dcm a moment before its .json, so a one-pass sweep
  could delete the sidecar of an instance that is merely being claimed. error/
  and active/ are never swept (error/ is the admin's; active/ is Worker.recover's).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hermes_py.config import Settings
from hermes_py.lifecycle import Stage
from hermes_py.process import stop_on_signals
from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

CLEAN_EVERY = 600.0
ORPHAN_GRACE = 60.0


@dataclass
class CleanReport:
    success: int = 0
    discard: int = 0
    tmp: int = 0
    orphans: int = 0

    @property
    def total(self) -> int:
        return self.success + self.discard + self.tmp + self.orphans


class Cleaner:
    """Keeps the orphan suspects between passes; one per ``hermes-py clean`` process."""

    def __init__(self, cfg: Settings, orphan_grace: float = ORPHAN_GRACE):
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path)
        self.orphan_grace = orphan_grace
        # path -> (inode, mtime, first seen orphaned)
        self._suspects: dict[Path, tuple[int, float, float]] = {}

    def clean_once(self, now: float | None = None) -> CleanReport:
        now = time.time() if now is None else now
        s = self.spool
        r = CleanReport()
        for st in Stage:
            keep = st.facts.keep
            if keep is None:
                continue
            seconds = float(getattr(self.cfg.spool, keep))
            removed = sum(s.remove_older(p.path, seconds, now) for p in s.places(st))
            if st is Stage.SUCCESS:
                r.success += removed
            else:
                r.discard += removed
        r.tmp = s.sweep_tmp(self.cfg.spool.tmp_max_age, now)
        r.orphans = self._orphans(now)
        if r.total:
            LOG.info("cleaned: %d delivered (older than %gs), %d discarded (older than %gs), "
                     "%d stale temp file(s), %d orphan sidecar(s)", r.success,
                     self.cfg.spool.keep_success, r.discard, self.cfg.spool.keep_discard,
                     r.tmp, r.orphans)
        return r

    def _orphans(self, now: float) -> int:
        removed = 0
        seen: dict[Path, tuple[int, float, float]] = {}
        for st in Stage:
            if not st.facts.swept:
                continue
            for place in self.spool.places(st):
                for path, stat in self.spool.orphan_sidecars(place.path):
                    prev = self._suspects.get(path)
                    if prev and prev[0] == stat.st_ino and prev[1] == stat.st_mtime:
                        if now - prev[2] >= self.orphan_grace:
                            removed += self.spool.remove_orphan_sidecar(path, prev[0], prev[1])
                            continue
                        seen[path] = prev
                    else:
                        seen[path] = (stat.st_ino, stat.st_mtime, now)
        self._suspects = seen
        return removed


def clean_once(cfg: Settings, now: float | None = None) -> CleanReport:
    """One pass with no memory: ages out and sweeps tmp/; orphans are only noted."""
    return Cleaner(cfg).clean_once(now)


def run(cfg: Settings) -> int:
    """``hermes-py clean``: a pass every CLEAN_EVERY seconds until SIGTERM/SIGINT."""
    stop = threading.Event()
    stop_on_signals(stop)
    Spool(cfg.spool.path).ensure()
    cleaner = Cleaner(cfg)
    LOG.info("cleaner: keep success %gs, discard %gs; every %gs", cfg.spool.keep_success,
             cfg.spool.keep_discard, CLEAN_EVERY)
    while not stop.is_set():
        try:
            cleaner.clean_once()
        except OSError:
            LOG.exception("cleaner pass failed; trying again in %gs", CLEAN_EVERY)
        stop.wait(CLEAN_EVERY)
    return 0
