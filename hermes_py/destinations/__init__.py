"""Destination types: ``create(settings)`` builds the one a ``[destinations.NAME]`` asks for."""

from __future__ import annotations

from hermes_py.config import DestinationSettings
from hermes_py.destinations.base import Destination, Item, Report
from hermes_py.errors import HermesError

__all__ = ["Destination", "Item", "Report", "create"]


def create(settings: DestinationSettings, label: str = "") -> Destination:
    """A new destination object (one per worker thread; never share them)."""
    if settings.type == "dicom":
        from hermes_py.destinations.dicom import DicomDestination
        return DicomDestination(settings, label=label)
    raise HermesError(f"destination {settings.name!r}: unknown type {settings.type!r} "
                      "(supported: dicom)")
