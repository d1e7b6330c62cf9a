"""Durations as people write them in rules.toml, and as the logs and ``status`` print them."""

from __future__ import annotations

import re

DAY = 86400.0
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"3d"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(
        f"not a duration: {value!r} (use seconds, or a number with ms, s, m, h or d, e.g. \"30s\")"
    )


def fmt_duration(seconds: float) -> str:
    """``250ms``, ``45s``, ``90s``, ``30m``, ``36h``, ``3d``: as one writes it in rules.toml."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= 2 * size or (seconds >= size and seconds % size == 0):
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


def human_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``2h13m``, ``3d04h``: an age that fits a column."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < DAY:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
