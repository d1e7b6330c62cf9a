"""A destination's sender behind its coercion: each instance is sent as a coerced temp copy.

Any destination type gets coercion this way without knowing of it: the wrapper
hands the sender items whose path is the coerced copy in the dispatcher's scratch
folder, and maps each answer back to the claimed instance (the dispatcher files
answers by the claimed path), adding which keywords changed. Why send time and
not routing time: ``hermes_py.coerce``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from hermes_py import coerce
from hermes_py.destinations.base import Destination, Item, Probe, Report, Workspace
from hermes_py.destinations.transcode import ConversionRefused, inflate_to_file
from hermes_py.outcomes import LinkFailure, Outcome, Result
from hermes_py.spool.tempfiles import scratch_file


class CoercedDestination(Destination):
    def __init__(self, inner: Destination, coercion: coerce.Coercion, workspace: Workspace):
        self.inner = inner
        self.coercion = coercion
        self.workspace = workspace
        self.name = inner.name

    def deliver(self, items: Sequence[Item], report: Report,
                should_stop: Callable[[], bool]) -> LinkFailure | None:
        with contextlib.ExitStack() as temps:
            originals: dict[Path, tuple[Item, dict[str, list[str]]]] = {}
            ready: list[Item] = []
            for item in items:
                copy = self._coerced(item, temps, report)
                if copy is not None:
                    originals[copy[0].path] = (item, copy[1])
                    ready.append(copy[0])

            def answered(sent: Item, result: Result) -> None:
                item, changes = originals[sent.path]
                if result.outcome is Outcome.SUCCESS:
                    result = dataclasses.replace(result, coerced=changes)
                report(item, result)

            return self.inner.deliver(ready, answered, should_stop) if ready else None

    def _coerced(self, item: Item, temps: contextlib.ExitStack, report: Report
                 ) -> tuple[Item, dict[str, list[str]]] | None:
        src, ts = item.path, item.transfer_syntax
        try:
            if ts == DeflatedExplicitVRLittleEndian:
                src = temps.enter_context(scratch_file(self.workspace.scratch))
                inflate_to_file(item.path, src, self.workspace.max_inflated)
                ts = ExplicitVRLittleEndian
            out = temps.enter_context(scratch_file(self.workspace.scratch))
            changes = coerce.apply(src, out, self.coercion, item.facts)
        except (coerce.CoercionFailed, ConversionRefused) as e:
            report(item, Result(Outcome.PERMANENT, str(e)))
            return None
        except (InvalidDicomError, ValueError, KeyError, AttributeError) as e:
            report(item, Result(Outcome.PERMANENT, f"coerce: cannot read or write the "
                                                   f"header: {type(e).__name__}: {e}"))
            return None
        except OSError as e:
            report(item, Result(Outcome.TRANSIENT, f"coerce: cannot write the coerced copy: "
                                                   f"{e.strerror or e}"))
            return None
        return dataclasses.replace(item, path=out, transfer_syntax=ts), changes

    def probe(self) -> Probe:
        return self.inner.probe()

    def close(self) -> None:
        self.inner.close()
