"""``hermes-py echo NAME | --all``: does each destination answer, and if not, exactly why.

Each destination type's sender has the probe (DICOM: a C-ECHO with the
destination's own calling AE and timeouts); this verb runs it and lines up the
answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hermes_py import destinations
from hermes_py.admin import Result
from hermes_py.config import Settings
from hermes_py.destinations.base import Probe
from hermes_py.errors import HermesError


@dataclass
class Echoed:
    destination: str
    address: str
    probe: Probe

    def line(self, width: int = 0) -> str:
        failed = "" if self.probe.ok else "FAILED "
        return f"{self.destination:<{width}}  {self.address}  {failed}{self.probe.text}"


@dataclass
class Echoes(Result):
    answers: list[Echoed] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if all(a.probe.ok for a in self.answers) else 1

    def text(self) -> str:
        width = max((len(a.destination) for a in self.answers), default=0)
        return "\n".join(a.line(width) for a in self.answers)


def probe_one(cfg: Settings, name: str) -> Echoed:
    settings = cfg.destination(name)
    dest = destinations.create(settings)
    try:
        return Echoed(name, destinations.describe(settings), dest.probe())
    finally:
        dest.close()


def targets(cfg: Settings, name: str | None) -> list[str]:
    """The destinations ``echo NAME | --all`` probes (an unknown NAME is an error)."""
    if name is not None:
        cfg.destination(name)
        return [name]
    if not cfg.destinations:
        raise HermesError(f"no destinations defined in {cfg.path}")
    return sorted(cfg.destinations)


def echo(cfg: Settings, name: str | None) -> Echoes:
    return Echoes([probe_one(cfg, n) for n in targets(cfg, name)])


def quiet_pynetdicom() -> None:
    """Our line says what failed; pynetdicom's own error lines would only repeat it."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
