"""rules.toml for the tests and the benchmark: one builder, rendered to TOML text.

A :class:`Config` is the file as data: its tables (``[receiver]``, ``[spool]``,
``[intake]``, ``[retry]``, ``[metrics]``), its destinations (:class:`Dest`) and its
``[[rules]]`` (TOML text: a rule is what the tests read most, so it stays
readable as written). ``write`` saves it the way an editor does (a temp file
renamed over the old one), so a router watching the file never reads half of
it. A test that edits the configuration changes the object and writes again;
one that tests the parser's messages writes its own text instead.

The defaults are short timeouts and delays for tests on a shared 2-core machine;
everything else is what a user gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.peers import LOOPBACK, free_port

# Every destination of a test: the peer is on 127.0.0.1, or nothing listens at all.
DEST_TIMEOUTS: dict[str, object] = {
    "connection_timeout": "3s", "acse_timeout": "15s", "dimse_timeout": "30s",
    "network_timeout": "30s"}
# Retries fast enough that a test sees several, and nothing expires by accident.
RETRY: dict[str, object] = {"initial_delay": "200ms", "max_delay": "1s", "give_up_after": "1d"}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}"
                                for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def toml_table(header: str, values: Mapping[str, object]) -> str:
    return f"[{header}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


@dataclass
class Dest:
    """A destination as rules.toml names it; the peer behind ``port`` is the test's business.

    ``options`` are further keys of its table (they win over the defaults):
    ``batch_size``, ``give_up_after``, ``status_classes``, ``calling_ae_title`` ...
    ``short_timeouts`` False leaves the timeouts at what a user gets (the benchmark).
    """

    name: str
    port: int = field(default_factory=free_port)
    ae_title: str = "DEST"
    options: dict[str, object] = field(default_factory=dict)
    short_timeouts: bool = True

    def toml(self) -> str:
        values: dict[str, object] = {"ae_title": self.ae_title, "host": LOOPBACK,
                                     "port": self.port}
        if self.short_timeouts:
            values.update(DEST_TIMEOUTS)
        values.update(self.options)
        return toml_table(f"destinations.{self.name}", values)


@dataclass
class TypedDest(Dest):
    """A destination of another type than dicom: ``type`` and its ``options`` only."""

    type: str = "folder"

    def toml(self) -> str:
        return toml_table(f"destinations.{self.name}", {"type": self.type, **self.options})


def dest(name: str, port: int | None = None, ae_title: str = "DEST", **options: object) -> Dest:
    """``Dest`` with its options as keywords: ``dest("pacs", scp.port, batch_size=200)``."""
    return Dest(name, free_port() if port is None else port, ae_title, dict(options))


def rule(name: str, to: Iterable[str] = (), **keys: object) -> str:
    """One ``[[rules]]`` table: ``rule("CT", ["pacs"], match={"Modality": "CT"})``."""
    values: dict[str, object] = {"name": name}
    if to:
        values["to"] = list(to)
    values.update(keys)
    return "[[rules]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def route_all(dests: Iterable[Dest | str], name: str = "everything") -> str:
    """The one rule that sends everything to every destination named."""
    return rule(name, [d.name if isinstance(d, Dest) else d for d in dests])


@dataclass
class Config:
    """A rules.toml. Tables left ``None`` are left out (the package's defaults apply)."""

    destinations: list[Dest] = field(default_factory=list)
    rules: str = ""                      # [[rules]] tables as TOML text (rule(), route_all())
    receiver: dict[str, object] | None = None
    spool: dict[str, object] = field(default_factory=lambda: {"path": "spool",
                                                              "min_free_mb": 0})
    intake: dict[str, object] | None = None
    retry: dict[str, object] | None = field(default_factory=lambda: dict(RETRY))
    metrics: dict[str, object] | None = None
    health: dict[str, object] | None = field(default_factory=dict)

    @property
    def port(self) -> int:
        """The receiver's port (the one a modality sends to)."""
        assert self.receiver is not None and "port" in self.receiver, "no [receiver] port"
        return int(self.receiver["port"])  # type: ignore[call-overload]

    def destination(self, name: str) -> Dest:
        return next(d for d in self.destinations if d.name == name)

    def render(self) -> str:
        parts = [toml_table(header, values) for header, values in (
            ("receiver", self.receiver), ("spool", self.spool), ("intake", self.intake),
            ("retry", self.retry), ("metrics", self.metrics), ("health", self.health))
            if values is not None]
        parts += [d.toml() for d in self.destinations]
        if self.rules:
            parts.append(self.rules)
        return "\n".join(parts)

    def write(self, folder: Path, text: str | None = None) -> Path:
        """Save as ``folder/rules.toml`` atomically (``text`` instead of the rendering:
        a test's hand edit); returns the path. The spool path is relative to it."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "rules.toml"
        tmp = folder / f".rules.toml.{os.getpid()}.tmp"
        tmp.write_text(self.render() if text is None else text)
        os.replace(tmp, path)
        return path


def receiver(port: int | None = None, **keys: object) -> dict[str, object]:
    """A ``[receiver]`` table on 127.0.0.1, AE title HERMES, on a free port."""
    return {"ae_title": "HERMES", "bind": LOOPBACK,
            "port": free_port() if port is None else port, **keys}


def pacs_and_ris(pacs_port: int | None = None, ris_port: int | None = None,
                 **tables: object) -> Config:
    """The admin's everyday router: a receiver, two destinations ``pacs`` (AE PACS) and
    ``ris`` (AE RIS) on free ports where nothing listens unless the test starts a
    peer there, and one rule sending everything to both."""
    pacs = dest("pacs", pacs_port, "PACS")
    ris = dest("ris", ris_port, "RIS")
    cfg = Config(destinations=[pacs, ris], rules=route_all([pacs, ris]), receiver=receiver())
    for k, v in tables.items():
        setattr(cfg, k, v)
    return cfg
