"""Destination types by name: what ``type = "..."`` in ``[destinations.NAME]`` may say.

A new type is a module here with a ``TYPE`` (a ``base.DestinationType``) and one
line in ``_MODULES``; nothing else in the router changes. Modules are imported
when a configuration names their type, so config loading (and every admin
command) pays only for the types in use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from hermes_py.config import DestinationSettings
    from hermes_py.destinations.base import Destination, DestinationType, Workspace

_MODULES = {
    "dicom": "hermes_py.destinations.dicom",
    "folder": "hermes_py.destinations.folder",
    "dicomweb": "hermes_py.destinations.dicomweb",
}
TYPE_NAMES = tuple(_MODULES)


def type_named(name: str) -> DestinationType | None:
    module = _MODULES.get(name)
    if module is None:
        return None
    return cast("DestinationType", importlib.import_module(module).TYPE)


def type_of(settings: DestinationSettings) -> DestinationType:
    kind = type_named(settings.type)
    if kind is None:  # config.parse accepts only registered types
        raise ValueError(f"destination {settings.name!r}: unknown type {settings.type!r}")
    return kind


def create(settings: DestinationSettings, label: str = "",
           workspace: Workspace | None = None) -> Destination:
    """A new sender for one worker thread (never share them)."""
    kind = type_of(settings)
    sender = kind.create(settings, label) if workspace is None \
        else kind.create(settings, label, workspace)
    if settings.coerce is not None:
        from hermes_py.destinations.base import SYSTEM_TEMP
        from hermes_py.destinations.coerced import CoercedDestination
        return CoercedDestination(sender, settings.coerce, workspace or SYSTEM_TEMP)
    return sender


def describe(settings: DestinationSettings) -> str:
    """``PACS@10.0.0.9:104``: where a destination sends, in one line."""
    return type_of(settings).describe(settings)
