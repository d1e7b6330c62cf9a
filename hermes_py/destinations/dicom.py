"""``type = "dicom"``: a C-STORE SCP, its settings, and what they must be.

The sender itself is ``dicom_scu.DicomDestination`` (pynetdicom is imported only
when something is sent or echoed, not to read a configuration).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hermes_py.config import DestinationSettings, ReceiverSettings
from hermes_py.config_reader import AETitle, Duration, Port, Reader
from hermes_py.destinations.base import SYSTEM_TEMP, Destination, DestinationType, Workspace
from hermes_py.outcomes import Outcome
from hermes_py.tls import DestinationTLS, parse_destination


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
    tls: DestinationTLS | None = None
    # The local address outgoing associations come from (a PACS allow-list that must keep
    # seeing one address after a floating IP moved); empty: the kernel's choice.
    source_address: str = ""
    # Storage commitment (commitment.py): "off", "advisory" (committed_at recorded in
    # success/) or "required" (success/ only once the destination committed it).
    storage_commitment: str = "off"
    commit_timeout: Duration = 3600.0   # no report by then: ask once more, then alert
    commit_batch: int = 500             # references per N-ACTION


COMMITMENT_MODES = ("off", "advisory", "required")
_TIMEOUTS = ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout")


class DicomType(DestinationType):
    name = "dicom"
    settings = DicomSettings

    def parse(self, reader: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
              common: dict[str, Any], receiver: ReceiverSettings) -> DicomSettings:
        reader.required(table, data, ("ae_title", "host", "port"))
        own = reader.fields(table, data, DicomSettings,
                            skip=(*common, "retry", "status_classes", "calling_ae_title", "tls"))
        d = DicomSettings(
            **common, **own,
            calling_ae_title=reader.ae_title(table, data, "calling_ae_title", receiver.ae_title),
            status_classes=_status_classes(reader, table, data),
            tls=parse_destination(reader, table, data["tls"]) if "tls" in data else None)
        if not d.host.strip():
            raise reader.err(table, "host", "must not be empty")
        if d.port == 0:
            raise reader.err(table, "port", "must be 1-65535")
        for k in _TIMEOUTS:
            reader.positive(table, k, getattr(d, k))
        if d.storage_commitment not in COMMITMENT_MODES:
            raise reader.err(table, "storage_commitment",
                             f"must be one of {', '.join(COMMITMENT_MODES)}")
        reader.positive(table, "commit_timeout", d.commit_timeout)
        reader.at_least_one(table, "commit_batch", d.commit_batch)
        if d.source_address:
            try:
                ipaddress.ip_address(d.source_address)
            except ValueError:
                raise reader.err(table, "source_address", f"{d.source_address!r} is not an IP "
                                                          "address of this machine") from None
        return d

    def describe(self, settings: DestinationSettings) -> str:
        s = _dicom(settings)
        return (f"{s.ae_title}@{s.host}:{s.port} as {s.calling_ae_title}"
                + (" (TLS)" if s.tls is not None else "")
                + (f", storage commitment {s.storage_commitment}"
                   if s.storage_commitment != "off" else ""))

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
