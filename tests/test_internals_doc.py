"""docs/internals.md is the contract between the stages: it must say what the code does.

The module map lists every module, the three tables are the ones ``lifecycle`` makes,
and every JSON shape lists exactly the keys of its TypedDict. The code itself keeps
two rules of the design: only the spool package renames, links or unlinks, and no
module grows past what one person reads in a sitting.
"""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path
from typing import Any

from hermes_py.destination_state import DestinationRecord
from hermes_py.lifecycle import markdown_tables
from hermes_py.spool.sidecar import Sidecar

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hermes_py"
DOC = (ROOT / "docs" / "internals.md").read_text()
MAX_LINES = 600


def _section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start: end if end != -1 else len(DOC)]


def _json_block(title: str) -> dict[str, Any]:
    body = _section(title)
    block = body[body.index("```json") + len("```json"): body.index("```", body.index("```json")
                                                                     + 7)]
    text = "\n".join(re.sub(r"\s*//.*$", "", line) for line in block.splitlines())
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


def _typeddict_of(hint: Any) -> Any:
    """The TypedDict a field holds (itself, in a list, or optional), or None."""
    if typing.is_typeddict(hint):
        return hint
    for arg in typing.get_args(hint):
        inner = _typeddict_of(arg)
        if inner is not None:
            return inner
    return None


def _mismatches(doc: dict[str, Any], shape: Any, where: str) -> list[str]:
    keys = set(typing.get_type_hints(shape))
    out = [f"{where}: {k!r} documented, not in {shape.__name__}" for k in sorted(set(doc) - keys)]
    out += [f"{where}: {k!r} in {shape.__name__}, not documented" for k in sorted(keys - set(doc))]
    hints = typing.get_type_hints(shape)
    for key, value in doc.items():
        inner = _typeddict_of(hints.get(key))
        if inner is None:
            continue
        sample = value[0] if isinstance(value, list) and value else value
        if isinstance(sample, dict):
            out += _mismatches(sample, inner, f"{where}.{key}")
        else:
            out.append(f"{where}.{key}: documented without its keys ({inner.__name__})")
    return out


def test_sidecar_keys_are_the_documented_ones() -> None:
    assert _mismatches(_json_block("Sidecar JSON"), Sidecar, "sidecar") == []


def test_destination_state_keys_are_the_documented_ones() -> None:
    assert _mismatches(_json_block("Destination state"), DestinationRecord, "state") == []


def test_stage_state_and_event_tables_are_lifecycles() -> None:
    begin = DOC.index("<!-- lifecycle:begin")
    begin = DOC.index("\n", begin) + 1
    end = DOC.index("<!-- lifecycle:end -->")
    assert DOC[begin:end] == markdown_tables(), (
        "docs/internals.md differs from lifecycle.markdown_tables(); paste this between the "
        "markers:\n" + markdown_tables())


def _modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def test_module_map_lists_every_module_and_no_other() -> None:
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", _section("Module map"), re.M))
    assert listed == _modules(), (f"missing from the map: {sorted(_modules() - listed)}; "
                                  f"not modules: {sorted(listed - _modules())}")


def test_no_module_is_longer_than_a_sitting() -> None:
    long = {m: n for m in _modules()
            if (n := len((PACKAGE / m).read_text().splitlines())) > MAX_LINES}
    assert long == {}


# Calls that change what is in a folder: only the spool package makes them.
_MOVES = {"unlink", "remove", "rename", "replace", "link", "rmdir", "rmtree", "removedirs",
          "renames"}


def test_only_the_spool_package_renames_links_or_unlinks() -> None:
    found = []
    for module in sorted(_modules()):
        if module.startswith("spool/"):
            continue
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _MOVES
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("os", "shutil", "Path")):
                found.append(f"{module}:{node.lineno} {node.func.value.id}.{node.func.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("unlink", "rename", "rmdir", "replace")
                  and not node.args[1:] and _on_path(node)):
                found.append(f"{module}:{node.lineno} .{node.func.attr}()")
    assert found == []


def _on_path(node: ast.Call) -> bool:
    """``something.unlink()`` / ``.rename(x)``: a pathlib call (str.replace takes two args)."""
    func = node.func
    assert isinstance(func, ast.Attribute)
    if isinstance(func.value, ast.Name) and func.value.id == "dataclasses":
        return False
    if func.attr == "replace":
        return len(node.args) == 1 and not isinstance(node.args[0], ast.Constant)
    return True
