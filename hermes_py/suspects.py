"""Instances a stage held when it died: tried again alone, quarantined after the second death.

A hostile or broken file can kill the process that reads it (memory, a parser
bug, the OOM killer), and a restart reads the same file again: a crash loop that
stops everyone's routing. So before a stage works a chunk it writes the chunk's
names to ``state/<stage>.inhand.json`` and removes the record when the chunk is
done. A record found at start names what was in hand at a death: each is tried
again alone, so that a death is surely one instance's own. Those deaths alone
are counted (``state/<stage>.deaths.json``); at ``DEATHS`` of them an instance
goes to error/ with the reason instead of being read again. So a file that kills
its reader costs one death in its chunk and two alone, and a crash with another
cause (kill -9, the OOM killer choosing us for another's memory) clears the
innocent when they pass alone.

(The record is written like every state file, fsynced; a power loss in the
middle of a chunk costs its instances one alone try each, nothing else.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

from hermes_py.spool import Spool

LOG = logging.getLogger(__name__)

DEATHS = 2


class Suspects:
    """One stage's record of what it was holding, and of the deaths it caused."""

    def __init__(self, spool: Spool, stage: str) -> None:
        self.spool = spool
        self.inhand = spool.state / f"{stage}.inhand.json"
        self.deaths_file = spool.state / f"{stage}.deaths.json"
        self.stage = stage
        self._unrecorded = False
        raw = spool.read_json(self.deaths_file).get("deaths")
        self.deaths: dict[str, int] = {str(k): int(v) for k, v in raw.items()
                                       if isinstance(v, int)} if isinstance(raw, dict) else {}
        held = spool.read_json(self.inhand).get("names")
        names = [str(n) for n in held] if isinstance(held, list) else []
        # Each is tried alone next, so that the next death is the one instance's for sure;
        # the innocent of a chunk survive that and are cleared.
        self.alone: set[str] = set(names)
        if len(names) == 1:  # only a death alone is surely that instance's own
            self.deaths[names[0]] = self.deaths.get(names[0], 0) + 1
            LOG.error("%s died while working on %s (death %d of %d before it goes to error/)",
                      stage, names[0], self.deaths[names[0]], DEATHS)
        elif names:
            LOG.error("%s died while working on %d instances: each is tried again alone", stage,
                      len(names))
        if names:
            self._save()
            self._try(spool.remove_state, self.inhand.name)

    def deadly(self, name: str) -> bool:
        """This instance killed the stage DEATHS times: do not read it again."""
        return self.deaths.get(name, 0) >= DEATHS

    @contextlib.contextmanager
    def holding(self, names: Iterable[str]) -> Iterator[None]:
        """Record ``names`` as in hand for the block (a death inside it is theirs)."""
        names = list(names)
        recorded = self._try(self.spool.write_json, self.inhand, {"names": names})
        yield
        if recorded:
            self._try(self.spool.remove_state, self.inhand.name)
        survived = [n for n in names if n in self.deaths or n in self.alone]
        for n in survived:
            self.deaths.pop(n, None)
            self.alone.discard(n)
        if survived:
            self._save()

    def forget(self, name: str) -> None:
        """The instance left (quarantined): its deaths are history."""
        if self.deaths.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.deaths:
            self._try(self.spool.write_json, self.deaths_file, {"deaths": self.deaths})
        else:
            self._try(self.spool.remove_state, self.deaths_file.name)

    def _try(self, write: Callable[..., object], *args: object) -> bool:
        """The record is a safety net, never a reason to stop: on a full or read-only
        spool the stage goes on unprotected (said once per outage) and the stage's
        own handling of that spool applies."""
        try:
            write(*args)
        except OSError as e:
            if not self._unrecorded:
                LOG.warning("%s: cannot record what it is working on (%s); a file that "
                            "crashes it is not recognised until this is fixed", self.stage, e)
            self._unrecorded = True
            return False
        if self._unrecorded:
            LOG.info("%s: recording what it is working on again", self.stage)
        self._unrecorded = False
        return True
