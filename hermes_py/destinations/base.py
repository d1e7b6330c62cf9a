"""The interface every destination type implements behind the dispatcher.

The dispatcher owns the queue (claims, sidecars, backoff, moves between
folders); a destination owns only the wire. That split is what lets DICOMweb
STOW-RS, a folder, or TLS DICOM slot in later without touching retry logic:
they answer the same two questions, "what happened to each instance" and "could
the destination be reached at all".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


# Called once per answered instance, as soon as the answer is known, so the
# dispatcher can move it at once (a crash then resends at most what is in flight).
Report = Callable[[Item, Result], None]


class Destination(ABC):
    """A place instances are delivered to. One object per worker thread.

    Objects are not shared between threads: pynetdicom in particular stalls when
    an AE or association is used from two threads (see ``dicom.py``).
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

    def close(self) -> None:  # noqa: B027 - optional hook, most types hold nothing
        """Release what the destination holds (connections, sessions)."""
