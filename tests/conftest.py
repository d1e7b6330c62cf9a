"""Shared fixtures: a temporary spool with its rules.toml, and the corpus helpers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hermes_py.config import Settings, load
from hermes_py.spool import Spool


def write_config(folder: Path, body: str) -> Path:
    """Write ``folder/rules.toml`` (dedented) and return its path; spool = folder/spool."""
    text = textwrap.dedent(body)
    if "[spool]" not in text:
        text = '[spool]\npath = "spool"\nmin_free_mb = 0\n' + text
    path = folder / "rules.toml"
    path.write_text(text)
    return path


@pytest.fixture
def make_settings(tmp_path: Path):
    def make(body: str = "") -> Settings:
        cfg = load(write_config(tmp_path, body))
        Spool(cfg.spool.path).ensure(list(cfg.destinations))
        return cfg
    return make
