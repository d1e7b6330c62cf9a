"""The router on a real spool: fan-out by hard links, discard, error/, series holds,
hot reload, standby, and crashes (fault injection and kill -9) that must not lose or
double an instance.

Incoming instances are made the way the receiver makes them: tests.support.dicomgen
instances handed over with Spool.publish and the receiver's sidecar
(tests.support.spool.put). The router runs in a thread (Router.run / stop) or as the
installed ``hermes-py route``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from hermes_py import batches, fanout, router
from hermes_py.config import Settings, load
from hermes_py.intake import DropIntake
from hermes_py.spool import URGENT, Spool, carried, is_name
from tests.support.cli import hermes_cmd
from tests.support.config import Config, Dest
from tests.support.dicomgen import dataset_bytes, make_instance, save
from tests.support.peers import wait_for
from tests.support.spool import put
from tests.support.spool import sidecar as read_sidecar


def destinations(intake: dict[str, object] | None = None) -> Config:
    """Three destinations a, b, c (nothing listens: only the router runs here), no
    drop-folder intake unless asked."""
    return Config(destinations=[Dest("a", 1, "A"), Dest("b", 2, "B"), Dest("c", 3, "C")],
                  intake=intake or {"enabled": False})


# ---------------------------------------------------------------- helpers


def wait(cond: Any, what: str, timeout: float = 60.0) -> Any:
    """wait_for with a deadline generous enough for a machine shared with other test runs."""
    return wait_for(cond, timeout=timeout, what=what)



class Env:
    """A rules.toml (``config`` with ``rules``), its spool, and a way to put instances into
    incoming/."""

    def __init__(self, root: Path, rules: str, config: Config | None = None):
        self.root = root
        self.config = config or destinations()
        self.write(rules)
        self.path = root / "rules.toml"
        self.cfg: Settings = load(self.path)
        self.spool = Spool(self.cfg.spool.path)
        self.spool.ensure(list(self.cfg.destinations))

    def write(self, rules: str) -> None:
        """Save rules.toml with these rules, atomically (as an editor saves)."""
        self.config.rules = rules
        self.config.write(self.root)

    def publish(self, ds: Dataset, **facts: Any) -> str:
        """``ds`` into incoming/ as the receiver leaves it; its spool name."""
        return put(self.spool, self.spool.incoming, ds, **facts).stem

    def names(self, folder: Path) -> set[str]:
        return {e.name[:-4] for e in self.spool.scan(folder)}

    def incoming_empty(self) -> bool:
        return not any(os.scandir(self.spool.incoming))

    def sidecar(self, folder: Path, name: str) -> dict[str, Any]:
        return read_sidecar(folder / f"{name}.dcm")


@contextlib.contextmanager
def running(cfg: Settings) -> Iterator[router.Router]:
    r = router.Router(cfg)
    result: list[int] = []
    th = threading.Thread(target=lambda: result.append(r.run()), name="router", daemon=True)
    th.start()
    try:
        wait(lambda: r.active.is_set() or not th.is_alive(), what="router to start")
        assert th.is_alive(), "router thread died"
        yield r
    finally:
        r.stop()
        th.join(60)
    assert not th.is_alive(), "router did not stop"
    assert result == [0]


def start_route(env: Env, log: Path, extra_env: dict[str, str] | None = None
                ) -> subprocess.Popen[bytes]:
    e = dict(os.environ)
    e.update(extra_env or {})
    with open(log, "ab") as f:
        return subprocess.Popen([*hermes_cmd(), "route", "-c", str(env.path)], stdout=f,
                                stderr=subprocess.STDOUT, env=e)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- fan-out, discard, error


def test_fan_out_two_destinations_one_inode(tmp_path: Path) -> None:
    env = Env(tmp_path, """
[[rules]]
name = "CT to a and b"
match = { Modality = "CT" }
to = ["a", "b"]

[[rules]]
name = "CT1 to b too"
match = { CallingAE = "CT1" }
to = ["b"]
""")
    series = generate_uid()
    sources = {}
    for i in range(3):
        ds = make_instance(32, 32, series_uid=series, instance_number=i + 1)
        name = env.publish(ds)
        sources[name] = ds
    us = env.publish(make_instance(16, 16, modality="US"), calling_ae="US1")
    # as received: the sidecar carried by the .dcm (an xattr), no .json yet
    assert all(carried.carried(env.spool.incoming / f"{n}.dcm") for n in [*sources, us])
    with running(env.cfg):
        wait(env.incoming_empty, what="incoming/ to drain")
    sp = env.spool
    for name, ds in sources.items():
        a, b = sp.outbox("a") / f"{name}.dcm", sp.outbox("b") / f"{name}.dcm"
        assert a.stat().st_ino == b.stat().st_ino  # one inode ...
        assert a.stat().st_nlink == 2  # ... two links, no incoming copy left
        assert os.listxattr(a) == []   # the router took the carried sidecar off (4 KiB)
        with open(a, "rb") as f:
            assert b"DICM" in f.read(132)
        for dest, path in (("a", a), ("b", b)):
            sc = env.sidecar(path.parent, name)
            assert sc["destination"] == dest and sc["priority"] == "normal"
            assert sc["attempts"] == 0 and sc["queued_at"]
            assert sc["routing"]["rules"] == ["CT to a and b", "CT1 to b too"]
            assert sc["routing"]["destinations"] == ["a", "b"]
            assert sc["series_instance_uid"] == series
            assert sc["calling_ae"] == "CT1" and sc["sop_instance_uid"] == ds.SOPInstanceUID
    # the bytes are the ones received
    some = next(iter(sources))
    tmp_copy = save(sources[some], tmp_path / "orig.dcm")
    assert dataset_bytes(sp.outbox("a") / f"{some}.dcm") == dataset_bytes(tmp_copy)
    # no rule matched: discard/, with the reason beside it
    assert env.names(sp.discard) == {us}
    sc = env.sidecar(sp.discard, us)
    assert sc["discard"]["reason"] == "no rule matched" and sc["discard"]["rule"] is None
    assert sc["routing"]["destinations"] == []
    assert (sp.discard / f"{us}.dcm").stat().st_nlink == 1
    assert os.listxattr(sp.discard / f"{us}.dcm") == []
    assert env.names(sp.outbox("c")) == set()


def test_urgent_priority_and_discard_rule(tmp_path: Path) -> None:
    env = Env(tmp_path, """
[[rules]]
name = "stat CT"
match = { Modality = "CT", StudyDescription = { regex = "stat", ignore_case = true } }
to = ["a"]
priority = "urgent"

[[rules]]
name = "all CT"
match = { Modality = "CT" }
to = ["a", "b"]

[[rules]]
name = "test patients"
match = { PatientID = "TEST*" }
action = "discard"
""")
    stat = env.publish(make_instance(16, 16, study_description="CT HEAD STAT"))
    test = env.publish(make_instance(16, 16, patient_id="TEST42"))
    with running(env.cfg):
        wait(env.incoming_empty, what="incoming/ to drain")
    sp = env.spool
    assert env.names(sp.outbox("a", URGENT)) == {stat}
    assert env.names(sp.outbox("a")) == set()
    assert env.names(sp.outbox("b")) == {stat}
    assert env.sidecar(sp.outbox("a", URGENT), stat)["priority"] == "urgent"
    assert env.sidecar(sp.outbox("b"), stat)["priority"] == "normal"
    assert env.names(sp.discard) == {test}
    d = env.sidecar(sp.discard, test)["discard"]
    assert d["rule"] == "test patients" and "test patients" in d["reason"]


def test_unreadable_goes_to_error_and_never_blocks(tmp_path: Path) -> None:
    env = Env(tmp_path, '[[rules]]\nname = "all"\nto = ["a"]\n')
    sp = env.spool
    # truncated copy (cut inside the pixel data) and plain garbage, published like instances
    whole = save(make_instance(64, 64), tmp_path / "whole.dcm").read_bytes()
    bad = []
    for data in (whole[:-500], b"garbage" * 100):
        bad.append(put(sp, sp.incoming, data, sop="1.2.3.999", calling_ae="X").stem)
    good = [env.publish(make_instance(16, 16)) for _ in range(3)]
    with running(env.cfg):
        wait(env.incoming_empty, what="incoming/ to drain")
    assert env.names(sp.outbox("a")) == set(good)
    assert env.names(sp.error) == set(bad)
    e0 = env.sidecar(sp.error, bad[0])["error"]
    assert e0["stage"] == "route" and e0["reason"].startswith("truncated: Pixel Data needs")
    e1 = env.sidecar(sp.error, bad[1])
    assert "not a DICOM Part-10 file" in e1["error"]["reason"]
    assert e1["calling_ae"] == "X"  # the receive facts stay with it


# ---------------------------------------------------------------- series / study holds


SERIES_RULES = """
[[rules]]
name = "CT now"
match = { Modality = "CT" }
to = ["a"]

[[rules]]
name = "whole series"
match = { Modality = "CT" }
to = ["b"]
level = "series"
quiet_for = "{quiet}"
"""


def test_series_hold_release_and_late_instance(tmp_path: Path) -> None:
    env = Env(tmp_path, SERIES_RULES.replace("{quiet}", "500ms"))
    sp = env.spool
    series = generate_uid()
    first = {env.publish(make_instance(16, 16, series_uid=series, instance_number=i))
             for i in range(5)}
    other = env.publish(make_instance(16, 16))  # another series: its own batch
    with running(env.cfg):
        wait(lambda: env.names(sp.outbox("b")) >= first | {other},
                 what="the series to be released to b")
        assert env.names(sp.outbox("a")) >= first | {other}  # instance rule: at once
        batches = {env.sidecar(sp.outbox("b"), n)["hold"]["batch"] for n in first}
        assert len(batches) == 1  # released together, as one batch
        (batch,) = batches
        assert batch.startswith(f"series_{series}_whole_series-")
        assert env.sidecar(sp.outbox("b"), other)["hold"]["batch"] != batch
        # a late instance of the released series starts a new batch; never dropped
        late = env.publish(make_instance(16, 16, series_uid=series, instance_number=99))
        wait(lambda: late in env.names(sp.outbox("b")), what="the late instance")
        hold = env.sidecar(sp.outbox("b"), late)["hold"]
        assert hold["batch"] != batch and hold["key"] == batch.split("@")[0]
        assert hold["released_at"] >= hold["held_at"]
        wait(lambda: not any(os.scandir(sp.pending)), what="pending/ to be empty")
    for n in first | {late, other}:
        assert (sp.outbox("a") / f"{n}.dcm").stat().st_nlink == 2


def test_outbox_that_cannot_be_linked_into_loses_nothing_and_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """b's outbox is broken (a file where the folder should be): instances routed at once
    to a are unaffected, b's released batch stays in pending/ (nothing lost, nothing
    half-done), however often the release is tried, and once the outbox is back the
    release is finished."""
    monkeypatch.setattr(router, "RESCAN_INTERVAL", 0.5)
    monkeypatch.setattr(batches, "RETRY_AFTER", 0.2)  # the failed release is retried soon
    caplog.set_level(logging.WARNING, logger="hermes_py")
    env = Env(tmp_path, SERIES_RULES.replace("{quiet}", "300ms"))
    sp = env.spool
    series = generate_uid()
    with running(env.cfg):
        sp.outbox("b", URGENT).rmdir()
        sp.outbox("b").rmdir()
        sp.outbox("b").write_text("not a folder")
        names = {env.publish(make_instance(16, 16, series_uid=series, instance_number=i))
                 for i in range(3)}
        wait(lambda: env.names(sp.outbox("a")) == names and env.incoming_empty(),
             what="the instances to reach a")

        def releasing() -> list[Path]:
            return [p for p in sp.pending.iterdir() if fanout.RELEASING in p.name]
        wait(lambda: len(releasing()) == 1, what="the batch to be released (and fail)")

        def failed_tries() -> int:  # each try says it could not write into b's outbox
            return sum(1 for m in caplog.messages
                       if "cannot write outbox sidecars" in m and "/outgoing/b/" in m)
        wait(lambda: failed_tries() >= 3, what="three failed tries of the release")
        assert env.names(releasing()[0]) == names
        sp.outbox("b").unlink()
        sp.outbox("b").mkdir()
        wait(lambda: env.names(sp.outbox("b")) == names, what="the retried release")
        wait(lambda: not any(os.scandir(sp.pending)), what="pending/ to be empty")
    for n in names:
        assert env.sidecar(sp.outbox("b"), n)["hold"]["batch"].startswith("series_")
        assert (sp.outbox("a") / f"{n}.dcm").stat().st_nlink == 2


def test_held_batch_survives_restart(tmp_path: Path) -> None:
    env = Env(tmp_path, SERIES_RULES.replace("{quiet}", "1h"))
    sp = env.spool
    series = generate_uid()
    names = {env.publish(make_instance(16, 16, series_uid=series, instance_number=i))
             for i in range(3)}
    with running(env.cfg):
        wait(env.incoming_empty, what="incoming/ to drain")
    (batch,) = list(sp.pending.iterdir())
    assert env.names(batch) == names and env.names(sp.outbox("b")) == set()
    assert env.names(sp.outbox("a")) == names
    held = env.sidecar(batch, next(iter(names)))["hold"]
    assert held["quiet_for"] == 3600 and held["destinations"] == ["b"]

    # restart: the batch is still held (and joined by a new instance of the series)
    with running(env.cfg):
        late = env.publish(make_instance(16, 16, series_uid=series, instance_number=7))
        wait(lambda: late in env.names(batch), what="the new instance to join the batch")
    assert env.names(sp.outbox("b")) == set()

    # make the batch look quiet for 2 h (its folder's mtime is its last arrival): a restart
    # releases it at once, all four together
    old = time.time() - 7200
    os.utime(batch, (old, old))
    with running(env.cfg):
        wait(lambda: env.names(sp.outbox("b")) == names | {late}, what="release")
        wait(lambda: not any(os.scandir(sp.pending)), what="pending/ to be empty")
    released = {env.sidecar(sp.outbox("b"), n)["hold"]["batch"] for n in names | {late}}
    assert len(released) == 1


# ---------------------------------------------------------------- hot reload


def test_hot_reload_valid_and_invalid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hermes_py")
    to_a = '[[rules]]\nname = "r"\nmatch = { Modality = "CT" }\nto = ["a"]\n'
    env = Env(tmp_path, to_a)
    sp = env.spool
    with running(env.cfg) as r:
        n1 = env.publish(make_instance(16, 16))
        wait(lambda: n1 in env.names(sp.outbox("a")), what="routing to a")

        env.write(to_a.replace('to = ["a"]', 'to = ["b"]'))
        wait(lambda: r.rules[0].to == ("b",), what="the valid edit to be loaded")
        n2 = env.publish(make_instance(16, 16))
        wait(lambda: n2 in env.names(sp.outbox("b")), what="routing to b")

        env.write(to_a.replace("Modality", "Modalty"))  # invalid
        wait(lambda: any("rules not reloaded" in m for m in caplog.messages),
                 what="the invalid edit to be refused")
        msg = next(m for m in caplog.messages if "rules not reloaded" in m)
        assert f"{env.path.resolve()}:" in msg and "rules[0].match.Modalty" in msg
        n3 = env.publish(make_instance(16, 16))
        wait(lambda: n3 in env.names(sp.outbox("b")), what="old rules still routing")
        assert r.rules[0].to == ("b",)
    assert env.names(sp.outbox("a")) == {n1}


def test_route_process_sighup_standby_sigterm(tmp_path: Path,
                                              procs: list[subprocess.Popen[bytes]]) -> None:
    to_a = '[[rules]]\nname = "r"\nmatch = { Modality = "CT" }\nto = ["a"]\n'
    env = Env(tmp_path, to_a)
    sp = env.spool
    log1, log2 = tmp_path / "r1.log", tmp_path / "r2.log"
    p1 = start_route(env, log1)
    procs.append(p1)
    wait(lambda: "router active" in log1.read_text(), timeout=60, what="router 1 active")
    p2 = start_route(env, log2)
    procs.append(p2)
    wait(lambda: "waiting as standby" in log2.read_text(), timeout=60,
             what="router 2 on standby")

    # SIGHUP reloads. The edit keeps inode, size and mtime, so the stat check cannot
    # see it: only the signal can make router 1 route to c.
    st = env.path.stat()
    env.config.rules = to_a.replace('to = ["a"]', 'to = ["c"]')
    env.path.write_text(env.config.render())
    os.utime(env.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (env.path.stat().st_ino, env.path.stat().st_size) == (st.st_ino, st.st_size)
    p1.send_signal(signal.SIGHUP)
    wait(lambda: "(SIGHUP)" in log1.read_text(), timeout=60, what="reload on SIGHUP")
    n1 = env.publish(make_instance(16, 16))
    wait(lambda: n1 in env.names(sp.outbox("c")), timeout=60, what="routing to c")

    assert stop(p1) == 0
    wait(lambda: "now active" in log2.read_text(), timeout=60, what="standby takes over")
    n2 = env.publish(make_instance(16, 16))
    wait(lambda: n2 in env.names(sp.outbox("c")), timeout=60, what="router 2 routing")
    assert stop(p2) == 0
    assert "router stopped" in log2.read_text()


# ---------------------------------------------------------------- crashes

CRASH_RULES = """
[[rules]]
name = "CT to a and b"
match = { Modality = "CT" }
to = ["a", "b"]

[[rules]]
name = "whole series to c"
match = { Modality = "CT" }
to = ["c"]
level = "series"
quiet_for = "300ms"
"""


def _publish_many(env: Env, n: int, series: int = 4) -> set[str]:
    uids = [generate_uid() for _ in range(series)]
    return {env.publish(make_instance(8, 8, series_uid=uids[i % series], instance_number=i))
            for i in range(n)}


def _settled(env: Env) -> bool:
    return env.incoming_empty() and not any(os.scandir(env.spool.pending))


def _assert_exactly_once(env: Env, names: set[str]) -> None:
    sp = env.spool
    assert env.incoming_empty(), sorted(os.listdir(sp.incoming))[:5]
    assert not any(os.scandir(sp.pending)), os.listdir(sp.pending)
    for dest in ("a", "b", "c"):
        folder = sp.outbox(dest)
        assert env.names(folder) == names, dest
        assert env.names(sp.outbox(dest, URGENT)) == set()
        jsons = {p.name[:-5] for p in folder.glob("*.json")}
        assert jsons == names, f"{dest}: sidecars without instance or missing"
    for n in names:
        inode = {(sp.outbox(d) / f"{n}.dcm").stat().st_ino for d in ("a", "b", "c")}
        assert len(inode) == 1
        # three links and no fourth: nothing left in incoming/, pending/, or elsewhere
        assert (sp.outbox("a") / f"{n}.dcm").stat().st_nlink == 3
        sc = env.sidecar(sp.outbox("c"), n)
        assert sc["destination"] == "c" and sc["attempts"] == 0
    assert env.names(sp.error) == set() and env.names(sp.discard) == set()


def test_crash_between_links_fault_injection(tmp_path: Path,
                                             procs: list[subprocess.Popen[bytes]]) -> None:
    """Exit abruptly after every 37th link (mid fan-out, mid hold, mid release), restart."""
    env = Env(tmp_path, CRASH_RULES)
    names = _publish_many(env, 200)
    log = tmp_path / "route.log"
    crashes = 0
    for _ in range(60):
        p = start_route(env, log, {fanout.CRASH_ENV: "37"})
        procs.append(p)
        wait(lambda p=p: p.poll() is not None or _settled(env), timeout=120,
                 what="a crash or the end")
        if p.poll() is None:
            assert stop(p) == 0
            break
        assert p.returncode == 70, log.read_text()[-2000:]
        crashes += 1
    else:
        pytest.fail("the router never finished")
    assert crashes >= 10  # 600 links / 37: it really crashed all along the way
    assert "fault injection" in log.read_text()
    _assert_exactly_once(env, names)


def test_kill_9_while_routing(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    env = Env(tmp_path, CRASH_RULES)
    names = _publish_many(env, 300)
    log = tmp_path / "route.log"
    sp = env.spool
    for target in (40, 120, 200):
        p = start_route(env, log)
        procs.append(p)
        wait(lambda t=target: len(env.names(sp.outbox("a"))) >= t, timeout=120,
                 what=f"{target} instances routed")
        p.kill()  # SIGKILL: no cleanup at all
        p.wait()
        assert p.returncode == -signal.SIGKILL
    p = start_route(env, log)
    procs.append(p)
    wait(lambda: _settled(env) and len(env.names(sp.outbox("c"))) == len(names),
             timeout=120, what="the restarted router to finish")
    assert stop(p) == 0
    _assert_exactly_once(env, names)


# ---------------------------------------------------------------- drop-folder intake


def test_dropped_file_goes_from_intake_through_the_router(tmp_path: Path) -> None:
    """The intake (its own process under serve; a thread here) publishes into incoming/,
    and the router routes it like a received instance, by the receive fact Source."""
    env = Env(tmp_path, '[[rules]]\nname = "dropped"\nmatch = { Source = "drop" }\nto = ["a"]\n',
              destinations({"enabled": True, "stable_for": "200ms", "rescan_interval": "1s"}))
    ds = make_instance(16, 16)
    intake = DropIntake(env.spool, env.cfg.intake)
    stop = threading.Event()
    with running(env.cfg):
        intake.start()
        th = threading.Thread(target=intake.serve, args=(stop,), daemon=True)
        th.start()
        try:
            staged = save(ds, tmp_path / "staged.dcm")
            (env.spool.drop / "study1").mkdir(parents=True, exist_ok=True)
            os.replace(staged, env.spool.drop / "study1" / "IM0001")
            wait(lambda: env.names(env.spool.outbox("a")), timeout=60,
                 what="the dropped file to be routed")
        finally:
            stop.set()
            intake.wakeup.set()
            th.join(10)
            intake.stop()
    (name,) = env.names(env.spool.outbox("a"))
    sc = env.sidecar(env.spool.outbox("a"), name)
    assert sc["source"] == "drop" and sc["sop_instance_uid"] == ds.SOPInstanceUID


def test_an_instance_that_kills_the_router_goes_to_error_after_two_deaths_alone(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A file that crashes its reader (memory, a parser bug) is read alone after the first
    death and quarantined after its second death alone, instead of crash-looping
    everyone's routing."""
    env = Env(tmp_path, CRASH_RULES)
    names = sorted(_publish_many(env, 20))
    deadly = names[7]
    log = tmp_path / "route.log"
    for death in (1, 2, 3):
        p = start_route(env, log, {fanout.CRASH_ON_ENV: deadly})
        procs.append(p)
        assert p.wait(120) == 71, log.read_text()[-2000:]
        record = json.loads((env.spool.state / "router.inhand.json").read_text())
        # the first death was in a chunk of many (each then goes alone), the others alone
        assert (len(record["names"]) > 1) if death == 1 else (record["names"] == [deadly])
    p = start_route(env, log, {fanout.CRASH_ON_ENV: deadly})  # it would die a third time
    procs.append(p)
    wait(lambda: _settled(env) and len(env.names(env.spool.outbox("c"))) == len(names) - 1,
         timeout=120, what="the other 19 routed")
    assert stop(p) == 0
    [err] = list(env.spool.error.glob("*.dcm"))
    assert err.stem == deadly
    reason = env.sidecar(env.spool.error, deadly)["error"]["reason"]
    assert "the router died 2 times" in reason
    assert not (env.spool.state / "router.deaths.json").exists()
    assert "died while working on" in log.read_text()


@pytest.mark.parametrize("intake_on", [True, False])
def test_files_put_into_incoming_by_hand_are_taken_in_or_refused(tmp_path: Path,
                                                                 intake_on: bool) -> None:
    """``IM0001`` (media names have no extension), ``notes.txt`` and a ``.dcm`` of a person's
    own naming, put straight into incoming/: the router hands them to the intake, which
    gives the instances spool names (and moves the junk to error/); without an intake they
    go to error/ with the reason. None stays invisible in incoming/."""
    env = Env(tmp_path, '[[rules]]\nname = "all"\nto = ["a"]\n',
              destinations({"enabled": True, "stable_for": "200ms", "rescan_interval": "1s"}
                           if intake_on else None))
    sp = env.spool
    a, b = make_instance(8, 8), make_instance(8, 8)
    save(a, sp.incoming / "IM0001")
    save(b, sp.incoming / "nosidecar.dcm")
    (sp.incoming / "notes.txt").write_text("hello, these are my notes\n" * 20)
    status = subprocess.run([*hermes_cmd(), "status", "--json", "-c", str(env.path)],
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["folders"]["incoming"] == 3  # seen, not hidden
    intake = DropIntake(sp, env.cfg.intake)
    stop_intake = threading.Event()
    th = threading.Thread(target=intake.serve, args=(stop_intake,), daemon=True)
    with running(env.cfg):
        if intake_on:
            intake.start()
            th.start()
        try:
            wait(lambda: not any(p.name != ".gitkeep" for p in sp.incoming.iterdir())
                 and not any(p.is_file() for p in sp.drop.rglob("*")),
                 timeout=60, what="incoming/ and drop/ emptied")
            if intake_on:
                wait(lambda: len(env.names(sp.outbox("a"))) == 2, timeout=60,
                     what="both instances routed")
        finally:
            stop_intake.set()
            intake.wakeup.set()
            if intake_on:
                th.join(10)
                intake.stop()
    errors = {p.name: env.sidecar(sp.error, p.stem) for p in sp.error.glob("*.dcm")}
    if intake_on:
        routed = {env.sidecar(sp.outbox("a"), n)["sop_instance_uid"]
                  for n in env.names(sp.outbox("a"))}
        assert routed == {a.SOPInstanceUID, b.SOPInstanceUID}
        assert all(is_name(n) for n in env.names(sp.outbox("a")))  # spool names, always
        [(_, err)] = errors.items()
        assert "not DICOM" in err["error"]["reason"]
        assert err["original_path"].endswith("from-incoming/notes.txt")
    else:
        assert len(errors) == 3
        assert all("put into incoming/ by hand" in e["error"]["reason"] for e in errors.values())
        assert env.names(sp.outbox("a")) == set()
