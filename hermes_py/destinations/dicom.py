"""``type = "dicom"``: a C-STORE SCP, its settings, and what they must be.

The sender itself is ``dicom_scu.DicomDestination`` (pynetdicom is imported only
when something is sent or echoed, not to read a configuration).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hermes_py.config import DestinationSettings, ReceiverSettings
from hermes_py.config_reader import AETitle, Duration, Port, Reader
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, DestinationType, Workspace
from hermes_py.outcomes import Outcome


@dataclass(frozen=True, kw_only=True)
class DicomSettings(DestinationSettings):
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle = "HERMES"   # default: [receiver] ae_title
    connection_timeout: Duration = 10.0
    acse_timeout: Duration = 30.0
    dimse_timeout: Duration = 60.0
    network_timeout: Duration = 60.0
    # Per-destination overrides of the status-code classification: code -> class.
    status_classes: Mapping[int, str] = field(default_factory=dict)


_TIMEOUTS = ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout")


class DicomType(DestinationType):
    name = "dicom"
    settings = DicomSettings

    def parse(self, reader: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
              common: dict[str, Any], receiver: ReceiverSettings) -> DicomSettings:
        reader.required(table, data, ("ae_title", "host", "port"))
        own = reader.fields(table, data, DicomSettings,
                            skip=(*common, "retry", "status_classes", "calling_ae_title"))
        d = DicomSettings(
            **common, **own,
            calling_ae_title=reader.ae_title(table, data, "calling_ae_title", receiver.ae_title),
            status_classes=_status_classes(reader, table, data))
        if not d.host.strip():
            raise reader.err(table, "host", "must not be empty")
        if d.port == 0:
            raise reader.err(table, "port", "must be 1-65535")
        for k in _TIMEOUTS:
            reader.positive(table, k, getattr(d, k))
        return d

    def describe(self, settings: DestinationSettings) -> str:
        s = _dicom(settings)
        return f"{s.ae_title}@{s.host}:{s.port} as {s.calling_ae_title}"

    def create(self, settings: DestinationSettings, label: str = "",
               workspace: Workspace = SYSTEM_TEMP) -> Destination:
        from hermes_py.destinations.dicom_scu import DicomDestination
        return DicomDestination(_dicom(settings), label=label, workspace=workspace)


def _dicom(settings: DestinationSettings) -> DicomSettings:
    if not isinstance(settings, DicomSettings):
        raise TypeError(f"destination {settings.name!r} is not a DICOM destination")
    return settings


def _status_classes(reader: Reader, table: tuple[str | int, ...],
                    data: Mapping[str, Any]) -> dict[int, str]:
    raw = reader.get(table, data, "status_classes", dict, {})
    classes = [str(o) for o in Outcome]
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            code = int(k, 16) if k.lower().startswith("0x") else int(k)
        except ValueError:
            raise reader.err(table, "status_classes", f"{k!r} is not a status code "
                                                      "(write it as \"0xC001\")") from None
        if v not in classes:
            raise reader.err(table, "status_classes",
                             f"{k} = {v!r}: class must be one of {', '.join(classes)}")
        out[code] = v
    return out


TYPE = DicomType()
