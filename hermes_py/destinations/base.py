"""The interface every destination type implements behind the dispatcher.

The dispatcher owns the queue (claims, sidecars, backoff, moves between
folders); a destination owns only the wire. That split is what lets DICOMweb
STOW-RS, a folder, or TLS DICOM slot in without touching retry logic: they
answer the same questions, "what happened to each instance", "could the
destination be reached at all" and, for ``hermes-py echo`` (and a failed-over
destination's recovery), "does it answer right now".

A type is one module in this package with a :class:`DestinationType` named
``TYPE``, registered by name in ``hermes_py.destinations``: its settings (a
subclass of ``config.DestinationSettings`` whose fields are its TOML keys), how
they are validated, the one line that describes a destination of that type, and
the :class:`Destination` that sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hermes_py.config import DestinationSettings, Limits, ReceiverSettings
from hermes_py.config_reader import Reader, keys_of
from hermes_py.outcomes import LinkFailure, Result


@dataclass(frozen=True)
class Item:
    """One claimed instance, with the facts a destination needs to send it."""

    path: Path               # the claimed .dcm (read-only for the destination)
    name: str                # spool name, for logs
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study: str = ""
    series: str = ""
    # What the receiver knew (calling_ae, called_ae, peer_address): coercion templates
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workspace:
    """What the dispatcher lends a destination besides its settings.

    ``scratch`` is the dispatcher's private folder in the spool's tmp/: on the
    spool's file system (a converted copy never fills another disk unseen), and
    removed whole by the tmp sweep once its owner is dead, so a conversion
    killed half-way leaves nothing behind. None (tests, ``hermes-py echo``)
    means the system temp folder.
    """

    scratch: Path | None = None
    max_inflated: int = Limits().max_inflated   # bytes; ``[limits] max_inflated_mb``


SYSTEM_TEMP = Workspace()   # no spool at hand: the system temp folder, default limits


# Called once per answered instance, as soon as the answer is known, so the
# dispatcher can move it at once (a crash then resends at most what is in flight).
Report = Callable[[Item, Result], None]


@dataclass(frozen=True)
class Probe:
    """Whether a destination answers right now, and exactly what failed when it does not."""

    ok: bool
    text: str
    latency_ms: float | None = None


class Destination(ABC):
    """A place instances are delivered to. One object per worker thread.

    Objects are not shared between threads: pynetdicom in particular stalls when
    an AE or association is used from two threads (see ``dicom_scu.py``).
    """

    name: str

    @abstractmethod
    def deliver(self, items: Sequence[Item], report: Report,
                should_stop: Callable[[], bool]) -> LinkFailure | None:
        """Send ``items`` in order; ``report`` each answered one exactly once.

        Items never reported are "unanswered": the dispatcher puts them back in
        the queue untouched (their own retry timers are not pushed out). Return
        a LinkFailure when the destination as a whole failed (could not connect,
        rejected the association, dropped it before answering anything, kept
        refusing for lack of resources); None when every item was reported or
        ``should_stop()`` became true, which is checked between instances.
        """

    @abstractmethod
    def probe(self) -> Probe:
        """Talk to the destination without sending an instance (DICOM: a C-ECHO)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most types hold nothing
        """Release what the destination holds (connections, sessions)."""


class DestinationType(ABC):
    """One ``type = "..."`` of ``[destinations.NAME]``."""

    name: ClassVar[str]
    settings: ClassVar[type[DestinationSettings]]

    def keys(self) -> set[str]:
        """The TOML keys of this type beyond the common ones (its settings' own fields)."""
        return keys_of(self.settings) - keys_of(DestinationSettings)

    def parse(self, reader: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
              common: dict[str, Any], receiver: ReceiverSettings) -> DestinationSettings:
        """The settings of one destination table (``common`` already read and checked)."""
        own = reader.fields(table, data, self.settings, skip=tuple(keys_of(DestinationSettings)))
        return self.settings(**common, **own)

    @abstractmethod
    def describe(self, settings: DestinationSettings) -> str:
        """One line that says where it sends (DICOM: ``PACS@10.0.0.9:104 as HERMES``)."""

    @abstractmethod
    def create(self, settings: DestinationSettings, label: str = "",
               workspace: Workspace = SYSTEM_TEMP) -> Destination:
        """A new sender (one per worker thread; never share them)."""

