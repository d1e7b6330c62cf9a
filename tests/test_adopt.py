"""``hermes-py adopt PATH``: another spool's queues into this one, with two real spools.

An old spool holds every kind of work (queued, urgent, failover, a dead worker's
claim, error/, error/<dest>/, committing/, incoming/, a pending batch, and a
destination this config calls by another name); adopt moves it, each sidecar saying
where it came from. A live spool, this spool itself and unmapped destinations are
refused; --dry-run only counts. A subprocess killed -9 after N instances at each step
leaves every instance in at least one spool, and adopt run again finishes the job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hermes_py.admin.adopt import adopt
from hermes_py.config import Settings
from hermes_py.errors import HermesError
from hermes_py.lifecycle import Stage
from hermes_py.spool import Spool, now_iso
from tests.support.cli import run
from tests.support.config import dest
from tests.support.spool import dcms, put, queue, sidecar

ROOT = Path(__file__).resolve().parents[1]


def fill(old: Spool) -> dict[str, Path]:
    """One instance (or a few) in every folder adopt takes from; name -> where it was."""
    old.ensure(["pacs", "ris_old"])
    old.write_json(old.state / "spool.json", {"id": "oldspool0001", "created": now_iso()})
    made: dict[str, Path] = {}

    def add(dcm: Path) -> None:
        made[dcm.stem] = dcm

    for _ in range(3):
        add(queue(old, "pacs"))
    add(queue(old, "pacs", priority="urgent"))
    add(queue(old, "ris_old"))
    add(queue(old, "ris_old"))
    add(put(old, old.failover_queue("pacs", "ris_old"), dest="pacs",
            failover={"from": "ris_old", "to": "pacs", "mode": "divert", "at": now_iso(),
                      "reason": "backoff"}))
    worker = old.folder(Stage.ACTIVE, "pacs", "deadhost-1-abc")
    (worker.parent / "deadhost-1-abc.lock").touch()       # its holder is gone
    add(put(old, worker, dest="pacs", attempts=2))
    add(put(old, old.error_dir("pacs"), dest="pacs",
            error={"stage": "dispatch", "reason": "0xA900", "at": now_iso()}))
    add(put(old, old.error_dir(None), error={"stage": "intake", "reason": "not DICOM"}))
    add(put(old, old.folder(Stage.COMMITTING, "pacs"), dest="pacs"))
    add(put(old, None, routing={"at": now_iso(), "destinations": ["pacs"], "rules": ["x"]}))
    add(put(old, old.pending / "series_1.2.3_whole-abc",
            hold={"key": "series_1.2.3_whole-abc", "rule": "whole", "level": "series",
                  "destinations": ["pacs", "ris_old"],
                  "priorities": {"pacs": "normal", "ris_old": "urgent"}, "held_at": now_iso()}))
    return made


@pytest.fixture
def spools(make_settings: Any, tmp_path: Path) -> tuple[Settings, Spool, dict[str, Path]]:
    cfg = make_settings(dest("pacs"), dest("ris"), spool={"path": "spool", "min_free_mb": 0})
    old = Spool(tmp_path / "old")
    return cfg, old, fill(old)


def copies(*spools: Spool) -> Counter[str]:
    """Spool name -> how many stage folders hold it (temp files are not copies)."""
    out: Counter[str] = Counter()
    for s in spools:
        for p in s.root.rglob("*.dcm"):
            if p.relative_to(s.root).parts[0] != "tmp":
                out[p.stem] += 1
    return out


def test_adopt_moves_every_queue_and_records_where_from(spools: Any) -> None:
    cfg, old, made = spools
    new = Spool(cfg.spool.path)
    data = {n: p.read_bytes() for n, p in made.items()}
    res = adopt(cfg, old.root, ["ris_old=ris"], by="tester")
    assert res.total == len(made) and res.already == 0, res.text()
    assert "oldspool0001" in res.text() and "ris_old -> ris" in res.text()
    assert not [n for n, c in copies(old).items() if c], "the old spool still holds work"
    where: dict[str, list[str]] = {}
    for p in new.root.rglob("*.dcm"):
        rel = p.parent.relative_to(new.root).as_posix()
        where.setdefault(p.stem, []).append(rel)
        assert p.read_bytes() == data[p.stem]
        sc = sidecar(p)
        assert sc["adopted"]["from_spool_id"] == "oldspool0001"
        assert sc["adopted"]["from_path"] == str(old.root.resolve())
        assert sc["adopted"]["by"] == "tester" and sc["adopted"]["at"]
    assert set(where) == set(made)
    by_folder = Counter(f for fs in where.values() for f in fs)
    assert by_folder["outgoing/pacs"] == 3 + 1 + 1 + 1   # queued, claim, commitment, pending
    assert by_folder["outgoing/pacs/urgent"] == 1
    assert by_folder["outgoing/ris"] == 2
    assert by_folder["outgoing/ris/urgent"] == 1          # the pending copy, its priority
    assert by_folder["outgoing/pacs/failover/ris"] == 1
    assert by_folder["error/pacs"] == 1 and by_folder["error"] == 1
    assert by_folder["incoming"] == 1
    inc = sidecar(next(new.incoming.glob("*.dcm")))
    assert "routing" not in inc, "this router's rules decide again"
    for p in (new.root / "outgoing" / "ris").glob("*.dcm"):
        assert sidecar(p)["destination"] == "ris"
    fo = sidecar(next((new.root / "outgoing/pacs/failover/ris").glob("*.dcm")))
    assert fo["failover"]["from"] == "ris" and fo["failover"]["to"] == "pacs"
    rel = json.loads((old.state / "adopted.json").read_text())
    assert rel["instances"] == len(made) and rel["by"] == "tester"


def test_unmapped_destinations_are_refused_with_their_list(spools: Any) -> None:
    cfg, old, made = spools
    with pytest.raises(HermesError, match=r"ris_old .*--map OLD=NEW"):
        adopt(cfg, old.root)
    assert sum(copies(old).values()) == len(made), "nothing moved"
    with pytest.raises(HermesError, match="unknown destination 'nope'"):
        adopt(cfg, old.root, ["ris_old=nope"])


def test_dry_run_only_counts(spools: Any) -> None:
    cfg, old, made = spools
    res = adopt(cfg, old.root, ["ris_old=ris"], dry_run=True)
    assert res.total == len(made) and "would adopt" in res.text()
    assert sum(copies(old).values()) == len(made)
    assert not copies(Spool(cfg.spool.path))


@pytest.mark.parametrize("lock", ["locks/serve.lock", "active/pacs/w1.lock", "tmp/r1.lock"])
def test_a_live_spool_is_refused(spools: Any, lock: str) -> None:
    from hermes_py.spool import Lock
    cfg, old, made = spools
    held = Lock(old.root / lock)
    assert held.acquire()
    try:
        with pytest.raises(HermesError, match=f"is alive: {lock} is locked"):
            adopt(cfg, old.root, ["ris_old=ris"])
    finally:
        held.release()
    assert sum(copies(old).values()) == len(made)


def test_own_spool_and_non_spools_are_refused(spools: Any, tmp_path: Path) -> None:
    cfg, _, _ = spools
    with pytest.raises(HermesError, match="own spool"):
        adopt(cfg, cfg.spool.path)
    (tmp_path / "junk").mkdir()
    with pytest.raises(HermesError, match="not a hermes-py spool"):
        adopt(cfg, tmp_path / "junk")


def test_the_cli_prints_counts(spools: Any) -> None:
    cfg, old, made = spools
    cp = run("adopt", old.root, "--map", "ris_old=ris", "--dry-run", "-c", cfg.path)
    assert cp.returncode == 0, cp.stderr
    assert f"would adopt {len(made)} instance(s)" in cp.stdout
    assert re.search(r"^  outgoing +pacs -> pacs: 3$", cp.stdout, re.M), cp.stdout
    cp = run("adopt", old.root, "-c", cfg.path)
    assert cp.returncode == 2 and "ris_old" in cp.stderr


KILLER = """
import os, signal, sys
from hermes_py.admin.adopt import adopt
from hermes_py.config import load
step, after = sys.argv[2], int(sys.argv[3])
seen = 0
def on_step(name, path):
    global seen
    if name == step:
        seen += 1
        if seen == after:
            os.kill(os.getpid(), signal.SIGKILL)
adopt(load(sys.argv[1]), sys.argv[4], ["ris_old=ris"], on_step=on_step)
"""


@pytest.mark.parametrize("step, after", [("copied", 1), ("linked", 4), ("removed", 6),
                                         ("linked", 12)])
def test_kill_9_mid_adopt_loses_nothing(spools: Any, step: str, after: int) -> None:
    cfg, old, made = spools
    new = Spool(cfg.spool.path)
    cp = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(cfg.path), step,
                         str(after), str(old.root)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == -9, cp.stderr
    both = copies(old, new)
    assert not [n for n in made if both[n] == 0], "an instance is in neither spool"
    if (step, after) == ("copied", 1):   # killed with the first copy still a temp file
        assert not copies(new) and list(new.tmp.glob("*.dcm"))
    else:
        assert copies(new), "the killed adopt had moved something"
    res = adopt(cfg, old.root, ["ris_old=ris"])      # again, to the end
    assert not copies(old)
    after_all = copies(new)
    pending = next(n for n, p in made.items() if p.parent.parent == old.pending)
    for n in made:
        assert after_all[n] == (2 if n == pending else 1), (n, after_all[n])
    assert res.total + res.already >= len(made) - after
    assert dcms(new.outbox("ris")) and not dcms(old.outbox("ris_old"))
