"""``type = "folder"``: instances written into a folder tree, for research exports and
hand-offs to tools that watch a directory.

The path of each instance comes from ``layout``, DICOM keywords in braces. Every
value is hostile (a PatientName of ``../../etc``): each becomes one sanitised path
component, so nothing leaves ``path``, and the result is checked against the real
path of the folder after creating it (a symlink planted inside cannot redirect it).
A file is written beside its name and linked into place only when complete and
fsynced; an identical file already there counts as delivered (the resend after a
crash), a different one is a permanent failure rather than an overwrite.
"""

from __future__ import annotations

import enum
import errno
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_py import dicomfile
from hermes_py.config import DestinationSettings, ReceiverSettings
from hermes_py.config_reader import Reader
from hermes_py.destinations.base import (
    SYSTEM_TEMP,
    Destination,
    DestinationType,
    Item,
    Probe,
    Report,
    Workspace,
)
from hermes_py.outcomes import LinkFailure, Outcome, Result
from hermes_py.spool.durable import export_copy
from hermes_py.spool.names import sanitize

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
_FIELD = re.compile(r"\{([A-Za-z0-9]+)\}")
# Errors of the folder as a whole: an admin must act (queue kept, nothing expires).
_MISCONFIGURED = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class FolderKind(enum.StrEnum):
    """Why a folder destination could not be written (``kind`` in its state file)."""

    NOT_WRITABLE = "folder not writable"
    FULL = "folder's disk full"
    IO_ERROR = "folder I/O error"


@dataclass(frozen=True, kw_only=True)
class FolderSettings(DestinationSettings):
    path: str
    layout: str = DEFAULT_LAYOUT

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_FIELD.findall(self.layout)))


class FolderType(DestinationType):
    name = "folder"
    settings = FolderSettings

    def parse(self, reader: Reader, table: tuple[str | int, ...], data: Mapping[str, Any],
              common: dict[str, Any], receiver: ReceiverSettings) -> FolderSettings:
        reader.required(table, data, ("path",))
        own = reader.fields(table, data, FolderSettings, skip=(*common, "retry"))
        raw = str(own.pop("path")).strip()
        if not raw:
            raise reader.err(table, "path", "must not be empty")
        path = Path(raw)
        if not path.is_absolute():
            path = reader.path.parent / path
        s = FolderSettings(**common, **own, path=str(path))
        _check_layout(reader, table, s.layout)
        return s

    def describe(self, settings: DestinationSettings) -> str:
        s = _folder(settings)
        return f"folder {s.path} as {s.layout}"

    def create(self, settings: DestinationSettings, label: str = "",
               workspace: Workspace = SYSTEM_TEMP) -> Destination:
        return FolderDestination(_folder(settings))


def _check_layout(reader: Reader, table: tuple[str | int, ...], layout: str) -> None:
    from pydicom.datadict import keyword_dict

    if layout.startswith("/") or not layout.strip():
        raise reader.err(table, "layout", "must be a relative path like " + DEFAULT_LAYOUT)
    parts = layout.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise reader.err(table, "layout", "empty, '.' or '..' parts are not allowed")
    if "{SOPInstanceUID}" not in parts[-1]:
        raise reader.err(table, "layout", "the file name must contain {SOPInstanceUID} (two "
                                          "instances would otherwise share one file)")
    for kw in _FIELD.findall(layout):
        if kw not in keyword_dict:
            raise reader.err(table, "layout", f"unknown DICOM keyword {{{kw}}}")
    if re.sub(_FIELD, "", layout).count("{") or re.sub(_FIELD, "", layout).count("}"):
        raise reader.err(table, "layout", "braces hold one DICOM keyword each, e.g. "
                                          "{StudyInstanceUID}")


def _folder(settings: DestinationSettings) -> FolderSettings:
    if not isinstance(settings, FolderSettings):
        raise TypeError(f"destination {settings.name!r} is not a folder destination")
    return settings


def relative_path(layout: str, values: Mapping[str, str | None]) -> Path:
    """The layout filled with sanitised values: each value is one path component."""
    parts = []
    for part in layout.split("/"):
        def fill(m: re.Match[str]) -> str:
            return sanitize(values.get(m.group(1)), limit=64, empty="UNKNOWN")
        parts.append(_FIELD.sub(fill, part))
    return Path(*parts)


def _symlink_on_the_way(base: Path, folder: Path) -> Path | None:
    """The first existing symbolic link between ``base`` and ``folder``: values are
    sanitised into single components, so only a link planted inside could lead out."""
    p = base
    for comp in folder.relative_to(base).parts:
        p = p / comp
        if p.is_symlink():
            return p
        if not p.exists():
            return None
    return None


class FolderDestination(Destination):
    def __init__(self, settings: FolderSettings):
        self.settings = settings
        self.name = settings.name
        self.base = Path(settings.path)

    def deliver(self, items: Sequence[Item], report: Report,
                should_stop: Callable[[], bool]) -> LinkFailure | None:
        try:
            real_base = self.base.resolve(strict=True)
        except OSError as e:
            return LinkFailure(FolderKind.NOT_WRITABLE, f"{self.base}: {e.strerror or e}",
                               misconfigured=True)
        for item in items:
            if should_stop():
                return None
            failure = self._one(item, real_base, report)
            if failure is not None:
                return failure
        return None

    def _one(self, item: Item, base: Path, report: Report) -> LinkFailure | None:
        try:
            values = dicomfile.read_header(item.path, self.settings.keywords)
        except dicomfile.UnreadableError as e:
            report(item, Result(Outcome.PERMANENT, f"cannot read the instance: {e}"))
            return None
        values.setdefault("SOPInstanceUID", item.sop_instance_uid)
        target = base / relative_path(self.settings.layout, values)
        try:
            link = _symlink_on_the_way(base, target.parent)
            if link is not None:
                report(item, Result(Outcome.PERMANENT, f"{link} is a symbolic link: refusing "
                                                       f"to write through it (it may leave "
                                                       f"{base})"))
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            written = export_copy(item.path, target)
        except FileExistsError as e:
            report(item, Result(Outcome.PERMANENT, str(e)))
            return None
        except OSError as e:
            if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
                return LinkFailure(FolderKind.FULL, f"{target.parent}: {e.strerror}")
            if e.errno in _MISCONFIGURED:
                return LinkFailure(FolderKind.NOT_WRITABLE, f"{target.parent}: {e.strerror}",
                                   misconfigured=True)
            return LinkFailure(FolderKind.IO_ERROR, f"{target}: {e.strerror or e}")
        warnings = [] if written else [f"already there, identical: {target}"]
        report(item, Result(Outcome.SUCCESS, "written" if written else "identical file there",
                            detail=str(target.relative_to(base)),
                            delivered_as=item.transfer_syntax, warnings=warnings))
        return None

    def probe(self) -> Probe:
        if not self.base.is_dir():
            return Probe(False, f"{self.base} is not a folder")
        if not os.access(self.base, os.W_OK | os.X_OK):
            return Probe(False, f"{self.base} is not writable by this user")
        return Probe(True, f"{self.base} is writable")


TYPE = FolderType()
