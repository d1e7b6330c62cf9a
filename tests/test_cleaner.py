"""The cleaner deletes only what is finished and old, and never error/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hermes_py.cleaner import ORPHAN_GRACE, Cleaner, clean_once
from hermes_py.config import Settings
from hermes_py.spool import Spool
from tests.support.config import dest
from tests.support.peers import wait_for
from tests.support.spool import put

DAY = 86400.0


def landed(spool: Spool, folder: Path, age: float, sidecar: bool = True) -> Path:
    """An instance that landed in ``folder`` ``age`` seconds ago (its sidecar's mtime);
    without ``sidecar``, a bare .dcm of that age."""
    t = time.time() - age
    dcm = put(spool, folder, b"DICM", sop="1.2.3", mtime=t)
    if not sidecar:
        spool.sidecar_of(dcm).unlink()
        os.utime(dcm, (t, t))
    return dcm


def cfg_with(make_settings, keep_success: str = "7d", keep_discard: str = "2d") -> Settings:
    return make_settings(dest("pacs", 11112), spool={
        "path": "spool", "min_free_mb": 0, "keep_success": keep_success,
        "keep_discard": keep_discard, "tmp_max_age": "1h"})


def test_ages_out_success_and_discard_but_never_error(make_settings) -> None:
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    old_ok = landed(s, s.success_dir("pacs"), 8 * DAY)
    new_ok = landed(s, s.success_dir("pacs"), 6 * DAY)
    gone_dest = landed(s, s.success_dir("removed-dest"), 30 * DAY)
    old_disc = landed(s, s.discard, 3 * DAY)
    new_disc = landed(s, s.discard, 1 * DAY)
    no_sidecar = landed(s, s.discard, 3 * DAY, sidecar=False)
    errs = [landed(s, s.error_dir("pacs"), 365 * DAY), landed(s, s.error_dir(), 365 * DAY)]
    queued = landed(s, s.outbox("pacs"), 365 * DAY)

    r = clean_once(cfg)
    assert (r.success, r.discard) == (2, 2)
    for p in (old_ok, gone_dest, old_disc, no_sidecar):
        assert not p.exists() and not p.with_suffix(".json").exists()
    for p in (new_ok, new_disc, queued, *errs):
        assert p.exists()
    for p in errs:
        assert p.with_suffix(".json").exists()


def test_age_is_the_sidecar_time_not_the_file_time(make_settings) -> None:
    # A file received a month ago but delivered an hour ago is kept.
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    p = landed(s, s.success_dir("pacs"), 3600)
    os.utime(p, (time.time() - 30 * DAY,) * 2)
    assert clean_once(cfg).success == 0 and p.exists()


def test_sweeps_stale_tmp_files(make_settings) -> None:
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    stale, fresh = s.tmp / "dead.writer", s.tmp / "live.writer"
    for f in (stale, fresh):
        f.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert clean_once(cfg).tmp == 1
    assert not stale.exists() and fresh.exists()


def test_sweeps_dead_stages_tmp_folders_never_a_live_ones_lock(make_settings) -> None:
    """A stage's own tmp/<owner>/ goes whole when its owner died; a live owner's folder
    and lock file stay however old they are (only its stale files go)."""
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    code = ("import os, sys\nfrom hermes_py.spool import Spool\n"
            "s = Spool(sys.argv[1]); s.use_private_tmp()\n"
            "s.tmp_path('.dcm').write_bytes(b'half')\nprint(s.tmp_dir.name)\nos._exit(9)\n")
    dead = subprocess.run([sys.executable, "-c", code, str(s.root)], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    assert dead and (s.tmp / dead).is_dir()
    live = Spool(cfg.spool.path)
    own = live.use_private_tmp()
    try:
        lock = s.tmp / f"{own.name}.lock"
        kept = live.tmp_path(".json")
        kept.write_bytes(b"x")
        for p in (lock, own):
            os.utime(p, (time.time() - 7200,) * 2)  # older than tmp_max_age, yet alive
        assert clean_once(cfg).tmp == 1  # the dead stage's half instance
        assert not (s.tmp / dead).exists() and not (s.tmp / f"{dead}.lock").exists()
        assert lock.exists() and own.is_dir() and kept.exists()
    finally:
        live.release_private_tmp()
    assert os.listdir(s.tmp) == []


def test_orphan_sidecars_go_only_after_two_passes(make_settings) -> None:
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    orphans = []
    for folder in (s.outbox("pacs"), s.outbox("pacs", "urgent"), s.incoming, s.discard):
        p = landed(s, folder, 10)
        p.unlink()
        orphans.append(p.with_suffix(".json"))
    err_orphan = landed(s, s.error_dir("pacs"), 10 * DAY)
    err_orphan.unlink()
    healthy = landed(s, s.outbox("pacs"), 10 * DAY)  # old mtime = long due, not an age
    c = Cleaner(cfg)
    now = time.time()
    assert c.clean_once(now).orphans == 0  # first sight: only noted
    assert all(o.exists() for o in orphans)
    assert c.clean_once(now + 1).orphans == 0  # not long enough
    assert c.clean_once(now + ORPHAN_GRACE + 1).orphans == len(orphans)
    assert not any(o.exists() for o in orphans)
    assert err_orphan.with_suffix(".json").exists()  # error/ is never touched
    assert healthy.exists() and healthy.with_suffix(".json").exists()


def test_a_sidecar_that_changed_between_passes_is_not_an_orphan(make_settings) -> None:
    cfg = cfg_with(make_settings)
    s = Spool(cfg.spool.path)
    p = landed(s, s.outbox("pacs"), 10)
    p.unlink()
    c = Cleaner(cfg)
    now = time.time()
    c.clean_once(now)
    # its instance came back (a move finishing): rewritten sidecar, .dcm present again
    p.write_bytes(b"DICM")
    s.write_json(p.with_suffix(".json"), {"name": p.stem})
    assert c.clean_once(now + ORPHAN_GRACE + 1).orphans == 0
    assert p.with_suffix(".json").exists()


def test_clean_process_stops_on_sigterm(make_settings) -> None:
    cfg = cfg_with(make_settings, keep_success="1s")
    s = Spool(cfg.spool.path)
    old = landed(s, s.success_dir("pacs"), 60)
    proc = subprocess.Popen([sys.executable, "-m", "hermes_py", "clean", "-c", str(cfg.path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: not old.exists(), 30, what="the cleaner process to age it out")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read().decode() if proc.stderr else ""
