"""Reading rules.toml: every value checked by its kind, every error naming file, line and key.

tomllib keeps no positions, so :class:`Locator` finds the line a key was written
on by matching table headers and ``key =`` lines in the text (a best effort: a
key it cannot place is reported with its table's line). :class:`Reader` reads a
table's values by the kinds its settings dataclass declares (``Duration``,
``Port``, ``AETitle``, plain ``int``/``float``/``str``/``bool``), so a section's
keys and defaults are its fields, written once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from hermes_py.durations import parse_duration
from hermes_py.errors import HermesError

AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(HermesError):
    """A rules.toml problem, formatted as one line: ``file:line: key: message``."""

    def __init__(self, path: Path | str, key: str, message: str, line: int | None = None):
        self.path = str(path)
        self.key = key
        self.message = message
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class _Kind:
    def __init__(self, name: str):
        self.name = name


_DURATION, _PORT, _AE_TITLE = _Kind("duration"), _Kind("port"), _Kind("AE title")
Duration = Annotated[float, _DURATION]   # seconds, or "500ms", "30s", "5m", "2h", "3d"
Port = Annotated[int, _PORT]             # 0-65535
AETitle = Annotated[str, _AE_TITLE]      # 1-16 printable ASCII characters, no backslash


def keys_of(cls: type, exclude: tuple[str, ...] = ()) -> set[str]:
    """The TOML keys of a settings section: its dataclass's field names."""
    return {f.name for f in dataclasses.fields(cls) if f.name not in exclude}


class Reader:
    """Reads the values of one rules.toml, each checked, each error pointing at its line."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.loc = Locator(text)

    def err(self, table: tuple[str | int, ...], key: str, msg: str,
            line_key: str | None = None) -> ConfigError:
        dotted = ".".join(
            f"[{t}]" if isinstance(t, int) else str(t) for t in (*table, key) if t != ""
        ).replace(".[", "[")
        return ConfigError(self.path, dotted, msg, self.loc.line(table, line_key or key))

    def check_keys(self, table: tuple[str | int, ...], data: Mapping[str, Any],
                   allowed: set[str]) -> None:
        for k in data:
            if k not in allowed:
                expected = ", ".join(sorted(allowed))
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.err(table, k, f"unknown key ({hint}expected one of: {expected})")

    def fields(self, table: tuple[str | int, ...], data: Mapping[str, Any], cls: type,
               skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The keys of ``data`` that are fields of ``cls`` (but ``skip``), each read by its kind.

        Keys that are absent are left out, so the dataclass's defaults apply.
        """
        hints = typing.get_type_hints(cls, include_extras=True)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name not in data:
                continue
            out[f.name] = self.value(table, data, f.name, hints[f.name])
        return out

    def value(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
              hint: Any) -> Any:
        kind = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, _Kind)), None)
        if kind is _DURATION:
            return self.duration(table, data, key, 0.0)
        if kind is _PORT:
            return self.port(table, data, key, 0)
        if kind is _AE_TITLE:
            return self.ae_title(table, data, key, None)
        base = typing.get_origin(hint) or hint
        if base is float:
            return float(self.get(table, data, key, (int, float), 0.0))
        if base in (bool, int, str):
            return self.get(table, data, key, base, None)
        raise TypeError(f"{key}: no reader for {hint!r}")  # a settings field needs custom code

    def get(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
            typ: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        v = data[key]
        if isinstance(v, bool) and typ is not bool and (typ is int or int in (
                typ if isinstance(typ, tuple) else (typ,))):
            raise self.err(table, key, f"expected {self._tname(typ)}, got {v!r}")
        if not isinstance(v, typ):
            raise self.err(table, key, f"expected {self._tname(typ)}, got {v!r}")
        return v

    @staticmethod
    def _tname(typ: type | tuple[type, ...]) -> str:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                 list: "a list", dict: "a table"}
        ts = typ if isinstance(typ, tuple) else (typ,)
        return " or ".join(names.get(t, t.__name__) for t in ts)

    def duration(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
                 default: float) -> float:
        if key not in data:
            return default
        try:
            return parse_duration(data[key])
        except ValueError as e:
            raise self.err(table, key, str(e)) from None

    def port(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
             default: int) -> int:
        p = int(self.get(table, data, key, int, default))
        if not 0 <= p <= 65535:
            raise self.err(table, key, f"port out of range: {p}")
        return p

    def ae_title(self, table: tuple[str | int, ...], data: Mapping[str, Any], key: str,
                 default: str | None) -> str:
        v = self.get(table, data, key, str, default)
        if v is None:
            raise self.err(table, key, "missing (an AE title is required)", line_key=None)
        if not AE_RE.match(v) or v.strip() == "" or "\\" in v:
            raise self.err(table, key, f"invalid AE title {v!r}: 1-16 printable ASCII characters, "
                                       "no backslash")
        return str(v)

    def positive(self, table: tuple[str | int, ...], key: str, value: float) -> None:
        if value <= 0:
            raise self.err(table, key, f"must be greater than 0, got {value!r}")

    def at_least_one(self, table: tuple[str | int, ...], key: str, value: int) -> None:
        if value < 1:
            raise self.err(table, key, "must be at least 1")

    def readable(self, table: tuple[str | int, ...], key: str, value: str,
                 nonempty: bool = False) -> str:
        """A file rules.toml names, absolute (relative to rules.toml), checked readable now.

        Read at ``rules check``, not at 3 a.m. when it is first needed; only its first
        byte (``nonempty``: a secret file must hold something), never logged.
        """
        path = Path(value)
        if not path.is_absolute():
            path = self.path.parent / path
        try:
            with open(path, "rb") as f:
                empty = not f.read(1)
        except OSError as e:
            raise self.err(table, key, f"cannot read {path}: {e.strerror or e}") from None
        if nonempty and empty:
            raise self.err(table, key, f"{path} is empty")
        return str(path)

    def required(self, table: tuple[str | int, ...], data: Mapping[str, Any],
                 keys: tuple[str, ...]) -> None:
        dotted = ".".join(str(t) for t in table)
        for k in keys:
            if k not in data:
                raise ConfigError(self.path, f"{dotted}.{k}", "missing", self.loc.line(table))




class Locator:
    """Finds the line of a key in the TOML text; tomllib keeps no positions."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def _header_line(self, table: tuple[str | int, ...]) -> int | None:
        if not table:
            return 0
        if table[0] == "rules" and len(table) >= 2 and isinstance(table[1], int):
            seen = -1
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[\[\s*rules\s*\]\]", raw):
                    seen += 1
                    if seen == table[1]:
                        return i
            return None
        pat = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            r'"?' + re.escape(str(t)) + r'"?' for t in table) + r"\s*\]")
        for i, raw in enumerate(self.lines):
            if pat.match(raw):
                return i
        return None  # a dotted key inside a parent table, e.g. destinations = { ... }

    def line(self, table: tuple[str | int, ...], key: str | None = None) -> int | None:
        if key is not None and table and not isinstance(table[-1], int):
            sub = self._header_line((*table, key))  # the key is a sub-table: [receiver.tls]
            if sub is not None:
                return sub + 1
        start = self._header_line(table)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        inline_re = re.compile(r'[{,]\s*"?' + re.escape(key) + r'"?\s*=')
        if not table:
            # A top-level key is either written before the first table or is a table.
            head_re = re.compile(r'^\s*\[\[?\s*"?' + re.escape(key) + r'"?\s*[\].]')
            in_root = True
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[", raw):
                    in_root = False
                    if head_re.match(raw):
                        return i + 1
                elif in_root and key_re.match(raw):
                    return i + 1
            return None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                break
            if key_re.match(raw) or inline_re.search(raw):
                return i + 1
        return start + 1

    def rule_line(self, index: int, section: str, key: str | None = None) -> int | None:
        """Line of ``section`` (``match``/``exclude``) of rule ``index``, or of one of its keys.

        Handles both spellings: ``match = { Modality = "CT" }`` on the rule's
        own lines, and a ``[rules.match]`` sub-table below the ``[[rules]]``.
        """
        start = self._header_line(("rules", index))
        if start is None:
            return None
        q = r'\s*"?'
        sec = re.escape(section)
        inline_re = re.compile(rf'^{q}{sec}"?\s*=')
        dotted_re = re.compile(rf'^{q}{sec}"?\s*\.{q}{re.escape(key or "")}"?\s*=')
        sub_re = re.compile(rf'^\s*\[{q}rules"?\s*\.{q}{sec}"?\s*\]')
        key_re = re.compile(rf'^{q}{re.escape(key or "")}"?\s*=')
        in_sub = False
        sub_line: int | None = None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                if re.match(r"^\s*\[\[", raw) or not re.match(r'^\s*\[\s*"?rules"?\s*\.', raw):
                    break  # the next rule or another table: this rule ends here
                in_sub = bool(sub_re.match(raw))
                if in_sub:
                    sub_line = i + 1
                continue
            if in_sub:
                if key is None or key_re.match(raw):
                    return i + 1 if key else sub_line
            elif inline_re.match(raw) or (key and dotted_re.match(raw)):
                return i + 1
        return sub_line or start + 1
