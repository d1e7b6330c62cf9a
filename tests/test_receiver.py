"""The C-STORE SCP with real peers: DCMTK dcmsend/echoscu and a pynetdicom SCU.

What a Success answer promises is checked on disk: the instance is in incoming/
with its sidecar, its data set bytes are exactly what went over the wire, and
nothing partial is ever left in incoming/ or tmp/.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from hermes_py import pynetdicom_compat, pynetdicom_wake
from hermes_py.config import Settings
from hermes_py.receiver import Receiver
from hermes_py.spool import Spool, is_name
from tests.support import dicomgen, peers
from tests.support.cli import hermes_cmd
from tests.support.config import receiver
from tests.support.dicomgen import uid_of
from tests.support.peers import LOOPBACK, loops_per_second, wait_for
from tests.support.spool import sidecar
from tests.support.spool import temp_files as tmp_files

pytestmark = pytest.mark.network


# ---------------------------------------------------------------- helpers


def _settings(make_settings: Any, port: int, spool: dict[str, object] | None = None,
              **keys: object) -> Settings:
    """A rules.toml with just a [receiver] on ``port`` (``keys`` added) and a spool."""
    return make_settings(receiver=receiver(port, **keys),
                         spool=spool or {"path": "spool", "min_free_mb": 0})


@pytest.fixture
def make_receiver(make_settings: Any) -> Iterator[Any]:
    started: list[Receiver] = []

    def make(spool: dict[str, object] | None = None, **keys: object) -> Receiver:
        r = Receiver(_settings(make_settings, peers.free_port(), spool, **keys)).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop(grace=2)


def incoming(r: Receiver) -> list[Path]:
    return sorted(r.spool.incoming.glob("*.dcm"))


@contextlib.contextmanager
def chunked_send() -> Iterator[None]:
    """The SCU streams each file's own bytes (no decode/re-encode): what is sent = the file."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def scu_ae(files: list[Path], calling: str = "PYSCU") -> AE:
    """One presentation context per (SOP class, the file's own transfer syntax)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.connection_timeout = 10
    pairs = {}
    for f in files:
        meta = dcmread(f, stop_before_pixels=True).file_meta
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    for cls, ts in pairs:
        ae.add_requested_context(cls, [ts])
    ae.add_requested_context(Verification)
    return ae


def send(port: int, files: list[Path], calling: str = "PYSCU",
         called: str = "HERMES") -> list[int | None]:
    """Send files over one association; the status of each (None = no answer)."""
    ae = scu_ae(files, calling)
    out: list[int | None] = []
    with chunked_send():
        assoc = ae.associate(LOOPBACK, port, ae_title=called)
        assert assoc.is_established, "association was not accepted"
        try:
            for f in files:
                rsp = assoc.send_c_store(f)
                out.append(int(rsp.Status) if "Status" in rsp else None)
        finally:
            assoc.release()
    return out


# ---------------------------------------------------------------- receiving


def test_pynetdicom_scu_mixed_set_byte_identical(make_receiver: Any, tmp_path: Path) -> None:
    r = make_receiver()
    files = dicomgen.mixed_set(tmp_path / "src")
    assert send(r.port, files) == [0x0000] * len(files)

    got = {uid_of(p): p for p in incoming(r)}
    assert len(got) == len(files)
    for f in files:
        meta = dcmread(f, stop_before_pixels=True).file_meta
        dst = got[uid_of(f)]
        assert dicomgen.dataset_bytes(dst) == dicomgen.dataset_bytes(f), f.name
        sc = sidecar(dst)
        assert sc["name"] == dst.stem and is_name(dst.stem)
        assert sc["sop_instance_uid"] == uid_of(f)
        assert sc["sop_class_uid"] == str(meta.MediaStorageSOPClassUID)
        assert sc["transfer_syntax"] == str(meta.TransferSyntaxUID)
        # the stored file says the same about itself
        assert str(dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == \
            str(meta.TransferSyntaxUID)
        assert sc["source"] == "network"
        assert sc["calling_ae"] == "PYSCU" and sc["called_ae"] == "HERMES"
        assert sc["peer_address"] == LOOPBACK and isinstance(sc["peer_port"], int)
        assert sc["size"] == dst.stat().st_size
        assert sc["received_at"].endswith("Z")
    assert tmp_files(r.spool) == []


def _dcmsend_report(stdout: str) -> dict[str, tuple[str, str, str]]:
    """SOP Instance -> (original TS, network TS, status) from dcmsend's report file."""
    out = {}
    for block in stdout.split("\n\n"):
        m = {k.strip(): v.strip() for k, _, v in
             (ln.partition(":") for ln in block.splitlines() if ":" in ln)}
        if "SOP Instance" in m and "Network Xfer" in m:
            out[m["SOP Instance"]] = (m["Original Xfer"].split()[0],
                                      m["Network Xfer"].split()[0], m.get("DIMSE Status", ""))
    return out


def _what_dcmsend_sends(files: list[Path]) -> dict[str, tuple[str, bytes]]:
    """SOP Instance -> (transfer syntax, data set bytes) as dcmsend puts them on the wire.

    DCMTK re-encodes while sending (drops (FFFC,FFFC) padding, writes encapsulated
    pixel data as OB), so "what was sent" is captured by a pynetdicom SCP that
    records the raw bytes it received, preferring Explicit VR LE for uncompressed
    data just as dcmsend's own first proposal (which is what we accept).
    """
    order = [ExplicitVRLittleEndian] + [t for t in ALL_TRANSFER_SYNTAXES
                                        if t != ExplicitVRLittleEndian]
    with peers.ScriptedSCP("HERMES", script=peers.Script(transfer_syntaxes=order)) as scp:
        res = peers.dcmsend(scp.port, files, calling="CT1")
        assert res.returncode == 0, res.stderr
        return {r.sop_instance_uid: (r.transfer_syntax, r.data) for r in scp.received}


def test_dcmsend_mixed_set(make_receiver: Any, tmp_path: Path) -> None:
    files = dicomgen.mixed_set(tmp_path / "src")
    wire = _what_dcmsend_sends(files)  # before our receiver switches pynetdicom to chunked
    assert len(wire) == len(files)
    r = make_receiver()
    res = peers.dcmsend(r.port, files, calling="CT1")
    assert res.returncode == 0, res.stderr
    report = _dcmsend_report(res.stdout)
    assert len(report) == len(files)

    got = {uid_of(p): p for p in incoming(r)}
    assert set(got) == set(report) == set(wire)
    for uid, dst in got.items():
        _, network_ts, status = report[uid]
        assert "Success" in status
        sc = sidecar(dst)
        assert sc["transfer_syntax"] == network_ts == wire[uid][0]
        assert sc["calling_ae"] == "CT1" and sc["called_ae"] == "HERMES"
        assert sc["peer_address"] == LOOPBACK
        # compressed ones included: stored exactly as they came over the wire
        assert dicomgen.dataset_bytes(dst) == wire[uid][1], dst.name
    assert tmp_files(r.spool) == []


def test_requestor_first_transfer_syntax_is_what_we_store(make_receiver: Any,
                                                          tmp_path: Path) -> None:
    """The acceptor takes the proposer's first choice: never a conversion we asked for."""
    r = make_receiver()
    j2k = dicomgen.save(dicomgen.compressed_instance("jpeg2000"), tmp_path / "j2k.dcm")
    ts = str(dcmread(j2k, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(dcmread(j2k).SOPClassUID, [ts, ExplicitVRLittleEndian])
    with chunked_send():
        assoc = ae.associate(LOOPBACK, r.port, ae_title="ANY_CALLED")
        assert assoc.is_established
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        assert int(assoc.send_c_store(j2k).Status) == 0
        assoc.release()
    assert accepted == [ts]
    [dst] = incoming(r)
    assert dicomgen.dataset_bytes(dst) == dicomgen.dataset_bytes(j2k)
    assert sidecar(dst)["called_ae"] == "ANY_CALLED"  # any called AE is accepted (rules use it)


def test_echo(make_receiver: Any) -> None:
    r = make_receiver()
    res = peers.echoscu(r.port)
    assert res.returncode == 0, res.stderr


def test_same_uid_twice_never_collides(make_receiver: Any, tmp_path: Path) -> None:
    r = make_receiver()
    f = dicomgen.save(dicomgen.make_instance(sop_uid="1.2.3.4.5"), tmp_path / "a.dcm")
    assert send(r.port, [f, f]) == [0, 0]
    assert send(r.port, [f]) == [0]
    files = incoming(r)
    assert len(files) == 3 and len({p.name for p in files}) == 3
    assert all(sidecar(p)["sop_instance_uid"] == "1.2.3.4.5" for p in files)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("uid", ["../../etc/x", "1.2.3\x00/../../evil", "../" * 21 + ".",
                                 "9" * 200, "../" * 100 + "etc/passwd", "/absolute/path",
                                 "..", ".hidden"])
def test_hostile_uid_stays_inside_the_spool(make_receiver: Any, tmp_path: Path,
                                            uid: str) -> None:
    r = make_receiver()
    f = dicomgen.save(dicomgen.make_instance(sop_uid=uid), tmp_path / "hostile.dcm")
    if len(uid) > 64:
        # pynetdicom will not encode it, a hostile peer would; pynetdicom's decoder
        # then aborts the association: nothing is stored and nothing is left behind.
        raw = RawStore(r.port, f, affected_uid=uid)
        raw.send(raw.pdus)
        assert raw.status() is None
        raw.drop()
        wait_for(lambda: tmp_files(r.spool) == [], what="the temp file to be removed")
        assert list(r.spool.incoming.iterdir()) == []
        assert send(r.port, [dicomgen.save(dicomgen.make_instance(), tmp_path / "ok.dcm")])\
            == [0]
        return
    assert send(r.port, [f]) == [0]
    [dst] = incoming(r)
    assert dst.parent.resolve() == r.spool.incoming.resolve()
    assert is_name(dst.stem)
    assert "/" not in dst.name and "\0" not in dst.name and not dst.name.startswith(".")
    everything = {p.resolve() for p in r.spool.root.rglob("*")}
    outside = [p for p in everything if r.spool.root.resolve() not in p.parents]
    assert outside == []
    assert sidecar(dst)["sop_instance_uid"] == uid.rstrip("\0 ").strip()


# ---------------------------------------------------------------- association policy


def test_disallowed_calling_ae_is_rejected(make_receiver: Any, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    r = make_receiver(allowed_calling_aets=["CT1", "MR2"])
    f = dicomgen.save(dicomgen.make_instance(), tmp_path / "a.dcm")
    ae = scu_ae([f], calling="INTRUDER")
    assoc = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert incoming(r) == []
    assert any("rejected" in m and "INTRUDER" in m for m in caplog.messages)
    # an allowed one gets in
    assert send(r.port, [f], calling="MR2") == [0]
    assert sidecar(incoming(r)[0])["calling_ae"] == "MR2"


def test_max_associations(make_receiver: Any) -> None:
    r = make_receiver(max_associations=1)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    first = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
    assert first.is_established
    try:
        second = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        first.release()


    def another_gets_in() -> bool:  # once the first association's thread has ended
        a = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
        ok = bool(a.is_established)
        if ok:
            a.release()
        return ok
    wait_for(another_gets_in, interval=0.2, what="a new association after the release")


def test_idle_associations_wait_for_work_instead_of_polling(make_receiver: Any,
                                                            tmp_path: Path) -> None:
    """pynetdicom's DUL and reactor each look for work every millisecond (2,000 looks a
    second per open association); ours wait in select/Event.wait, at most WAIT_MAX each,
    and a C-STORE after the quiet spell is still answered at once."""
    r = make_receiver()
    f = dicomgen.save(dicomgen.make_instance(16, 16), tmp_path / "a.dcm")
    ae = scu_ae([f])
    with chunked_send():
        assoc = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(f).Status) == 0
            (ours,) = r._ae.active_associations
            assert "_hermes_waker" not in vars(assoc.dul)  # another AE's association: untouched
            assert loops_per_second(ours) < 2 * (2 / pynetdicom_wake.WAIT_MAX)
            t0 = time.monotonic()
            assert int(assoc.send_c_store(f).Status) == 0
            assert time.monotonic() - t0 < pynetdicom_wake.WAIT_MAX * 10
        finally:
            assoc.release()
    wait_for(lambda: not ours.is_alive(), timeout=5, what="our association thread to end")
    assert ours.dul._hermes_waker.closed   # its wake-up pipe went with the connection
    assert len(incoming(r)) == 2


def test_wake_up_pipes_do_not_outlive_their_connections(make_receiver: Any) -> None:
    """Each of our associations has a wake-up pipe: closed with its connection, not left
    for the garbage collector (a busy receiver would run out of descriptors first)."""
    r = make_receiver()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def echo_once() -> None:
        assoc = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()

    echo_once()
    wait_for(lambda: not r._ae.active_associations, timeout=10, what="the first to end")
    before = open_fds()
    for _ in range(30):
        echo_once()
    wait_for(lambda: not r._ae.active_associations, timeout=10, what="all to end")
    wait_for(lambda: open_fds() <= before + 2, timeout=10,
             what=f"descriptors back to {before} (now {open_fds()})")


def test_port_probes_do_not_use_up_associations(make_receiver: Any) -> None:
    """A bare TCP connect (health check) must not hold a slot for acse_timeout (60 s here)."""
    r = make_receiver(max_associations=1, acse_timeout=60)
    for _ in range(3):
        with socket.create_connection((LOOPBACK, r.port)):
            pass
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)

    def gets_in() -> bool:
        a = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
        ok = bool(a.is_established)
        if ok:
            a.release()
        return ok
    wait_for(gets_in, timeout=20, interval=0.2, what="an association despite the probes")


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    a = ae.associate(LOOPBACK, port, ae_title="HERMES")
    if not a.is_established:
        return False
    try:
        return int(a.send_c_echo().Status) == 0
    finally:
        a.release()


def _closed_by_peer(s: socket.socket) -> bool:
    """EOF (or a reset) on a socket we only ever wrote to: the receiver hung up."""
    s.setblocking(False)
    try:
        return s.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_half_open_and_silent_connections_never_lock_modalities_out(make_receiver: Any) -> None:
    """Connections that send part of an A-ASSOCIATE-RQ (or nothing) take no association
    slot and are hung up at acse_timeout; a modality gets in at once (issue 11.3)."""
    r = make_receiver(max_associations=2, acse_timeout=3, network_timeout=60)
    held: list[socket.socket] = []
    try:
        for _ in range(10):   # the 6-byte header of a 1,000-byte RQ, then nothing
            s = socket.create_connection((LOOPBACK, r.port))
            s.sendall(struct.pack(">BBL", 0x01, 0, 1000))
            held.append(s)
        for _ in range(20):   # nothing at all
            held.append(socket.create_connection((LOOPBACK, r.port)))
        t0 = time.monotonic()
        assert _echo_ok(r.port) and _echo_ok(r.port)
        assert time.monotonic() - t0 < 3, "a modality waited behind the half-open connections"
        wait_for(lambda: all(_closed_by_peer(s) for s in held), timeout=15,
                 what="every half-open and silent connection closed by the receiver")
        assert _echo_ok(r.port)
    finally:
        for s in held:
            s.close()


def test_connect_and_close_leaves_no_thread_behind(make_receiver: Any) -> None:
    """A health check's connect+close ends its association thread at once, not after
    acse_timeout (60 s here): 100 of them leave the receiver as it was."""
    r = make_receiver(acse_timeout=60)
    assert _echo_ok(r.port)
    base = threading.active_count()
    for _ in range(100):
        with socket.create_connection((LOOPBACK, r.port)):
            pass
    wait_for(lambda: not r._ae.active_associations and threading.active_count() <= base,
             timeout=10, what=f"receiver threads back to {base} (now "
                              f"{threading.active_count()})")


@pytest.mark.parametrize("announced", [300 << 20, 3 << 30], ids=["300MB", "3GB"])
def test_a_pdu_larger_than_we_advertise_aborts_before_its_body(make_receiver: Any,
                                                               announced: int) -> None:
    """We advertise 256 KiB; a P-DATA-TF announcing hundreds of MB is refused with an
    A-ABORT as soon as its header arrives, its body never read (issue 11.4)."""
    r = make_receiver(network_timeout=60)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    assert sock is not None
    # Write below pynetdicom's DUL: a header, then 1 MiB of the promised body.
    sock.sendall(struct.pack(">BBL", 0x04, 0, announced))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # hung up already
        sock.sendall(b"\0" * (1 << 20))
    wait_for(lambda: assoc.is_aborted or not assoc.is_established, timeout=10,
             what="the receiver to abort the association")
    wait_for(lambda: not any(a.is_established for a in r._ae.active_associations), 10,
             what="the receiver's side of the association to end")
    assert _echo_ok(r.port)


# ---------------------------------------------------------------- refusals


def test_min_free_mb_above_free_space_refuses(make_receiver: Any, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    r = make_receiver(spool={"path": "spool", "min_free_mb": 100000000})
    files = dicomgen.mixed_set(tmp_path / "src")[:3]
    assert send(r.port, files) == [0xA700] * 3
    assert incoming(r) == [] and list(r.spool.incoming.iterdir()) == []
    assert tmp_files(r.spool) == []
    refused = [m for m in caplog.messages if m.startswith("refused")]
    assert len(refused) == 3 and "min_free_mb" in refused[0] and "0xA700" in refused[0]


def test_disk_full_for_real_refuses_and_leaves_nothing(small_fs: Any, make_receiver: Any,
                                                       tmp_path: Path) -> None:
    # (small_fs first: it is unmounted after the receiver using it has stopped)
    r = make_receiver(spool={"path": str(small_fs(2)), "min_free_mb": 0})
    big = dicomgen.save(dicomgen.make_instance(1024, 1536), tmp_path / "big.dcm")  # 3 MiB
    small = dicomgen.save(dicomgen.make_instance(), tmp_path / "small.dcm")
    assert send(r.port, [big, small, big]) == [0xA700, 0x0000, 0xA700]
    [dst] = incoming(r)
    assert uid_of(dst) == uid_of(small)
    assert dicomgen.dataset_bytes(dst) == dicomgen.dataset_bytes(small)
    assert tmp_files(r.spool) == []
    # the space of the refused instances is free again: the small one still fits
    assert send(r.port, [small]) == [0]


def test_write_error_refuses(make_receiver: Any, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO (a dying disk) while publishing: 0xA700, nothing visible, the server goes on."""
    r = make_receiver()
    f = dicomgen.save(dicomgen.make_instance(), tmp_path / "a.dcm")
    real_publish = r.spool.publish
    calls = {"n": 0}

    def failing_publish(*a: Any, **kw: Any) -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_publish(*a, **kw)

    monkeypatch.setattr(r.spool, "publish", failing_publish)
    assert send(r.port, [f, f]) == [0xA700, 0x0000]
    assert len(incoming(r)) == 1
    assert tmp_files(r.spool) == []


def test_handler_exception_answers_and_does_not_leak(make_receiver: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom leaks the chunked temp file when the handler raises; ours never raises."""
    r = make_receiver()
    f = dicomgen.save(dicomgen.make_instance(), tmp_path / "a.dcm")
    real_publish = r.spool.publish
    calls = {"n": 0}

    def buggy_publish(*a: Any, **kw: Any) -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug")
        return real_publish(*a, **kw)

    monkeypatch.setattr(r.spool, "publish", buggy_publish)
    assert send(r.port, [f, f]) == [0xC211, 0x0000]
    assert len(incoming(r)) == 1
    assert tmp_files(r.spool) == []


# ---------------------------------------------------------------- dropped associations


def _raw_c_store_pdus(path: Path, context_id: int, max_pdu: int,
                      affected_uid: str | None = None) -> list[bytes]:
    ds_bytes = dicomgen.dataset_bytes(path)
    meta = dcmread(path, stop_before_pixels=True).file_meta
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    if affected_uid is None:
        req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    else:  # what pynetdicom refuses to encode (> 64 chars): a hostile peer
        req._affected_sop_instance_uid = UID(affected_uid)
    req.DataSet = BytesIO(ds_bytes)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = []
    for primitive in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu.encode())
    return out


class RawStore:
    """A C-STORE whose P-DATA PDUs the test writes itself, on an association pynetdicom opened.

    Lets a test stop half-way (a dropped connection), pause between the halves, or
    send what pynetdicom would refuse to encode.
    """

    def __init__(self, port: int, path: Path, affected_uid: str | None = None):
        ae = AE(ae_title="RAWSCU")
        ae.dimse_timeout = ae.network_timeout = 60
        meta = dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        self.assoc = assoc = ae.associate(LOOPBACK, port, ae_title="HERMES")
        assert assoc.is_established
        cx = assoc.accepted_contexts[0].context_id
        self.pdus = _raw_c_store_pdus(path, cx, assoc.acceptor.maximum_length, affected_uid)
        self.sock = assoc.dul.socket.socket
        # keep pynetdicom's reactor off the response queue while we drive the socket
        assoc._reactor_checkpoint.clear()
        wait_for(lambda: assoc._is_paused, what="the SCU reactor to pause")

    def send(self, pdus: list[bytes]) -> None:
        for pdu in pdus:
            self.sock.sendall(pdu)

    def status(self) -> int | None:
        _, rsp = self.assoc.dimse.get_msg(block=True)
        return None if rsp is None else int(rsp.Status)

    def release(self) -> None:
        self.assoc._reactor_checkpoint.set()
        self.assoc.release()

    def drop(self) -> None:
        with contextlib.suppress(OSError):  # the peer may have closed it already
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        self.assoc._reactor_checkpoint.set()
        with contextlib.suppress(Exception):
            self.assoc.abort()


@pytest.mark.parametrize("cut", ["between_pdus", "inside_pdu"])
def test_connection_dropped_mid_instance_leaves_nothing(make_receiver: Any, tmp_path: Path,
                                                        cut: str) -> None:
    r = make_receiver()
    big = dicomgen.save(dicomgen.make_instance(1024, 1024), tmp_path / "big.dcm")  # 2 MiB
    raw = RawStore(r.port, big)
    half = len(raw.pdus) // 2
    assert half >= 2
    raw.send(raw.pdus[:half])
    if cut == "inside_pdu":
        raw.send([raw.pdus[half][: len(raw.pdus[half]) // 2]])
    # the partial instance is being written into spool/tmp (not the system temp dir)
    wait_for(lambda: tmp_files(r.spool) != [], what="a partial temp file in spool/tmp")
    # in the receiver's own folder, which its flock marks as alive
    assert [Path(f).parent for f in tmp_files(r.spool)] == [r.spool.tmp_dir.relative_to(
        r.spool.tmp)]
    raw.drop()
    wait_for(lambda: tmp_files(r.spool) == [], what="the partial temp file to be removed")
    assert list(r.spool.incoming.iterdir()) == []
    # the receiver is unharmed
    assert send(r.port, [big]) == [0]
    assert len(incoming(r)) == 1


def test_stale_temp_files_are_swept_at_start(make_settings: Any) -> None:
    cfg = _settings(make_settings, peers.free_port(),
                    spool={"path": "spool", "min_free_mb": 0, "tmp_max_age": "1h"})
    spool = Spool(cfg.spool.path)
    stale = spool.tmp / "12345.recv.deadbeef.dcm"
    fresh = spool.tmp / "12345.recv.cafebabe.dcm"
    stale.write_bytes(b"half an instance")
    fresh.write_bytes(b"someone is writing this")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with Receiver(cfg):
        assert not stale.exists()
        assert fresh.exists()


def test_stop_aborts_associations_left_open_after_grace(make_receiver: Any) -> None:
    r = make_receiver()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, r.port, ae_title="HERMES")
    assert assoc.is_established
    r.stop(grace=0.5)
    wait_for(lambda: assoc.is_aborted or not assoc.is_established,
             what="the idle association to be aborted")
    with socket.socket() as s:  # no longer listening
        assert s.connect_ex((LOOPBACK, r.port)) != 0


def test_in_process_receiver_restores_pynetdicom_config(make_receiver: Any) -> None:
    before = (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE)
    r = make_receiver()
    assert _config.STORE_RECV_CHUNKED_DATASET and _config.UNRESTRICTED_STORAGE_SERVICE
    r.stop()
    assert before == (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE)
    assert pynetdicom_compat.dimse_messages.NamedTemporaryFile is pynetdicom_compat._ORIGINAL_NTF


# ---------------------------------------------------------------- the real process


def _start_cli(cfg_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*hermes_cmd(), "receive", "-c", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop_cli(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(15)
    try:
        out, _ = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"hermes-py receive did not stop on SIGTERM:\n{out}")
    return proc.returncode, out


def test_hermes_py_receive_process(make_settings: Any, tmp_path: Path) -> None:
    port = peers.free_port()
    cfg = _settings(make_settings, port)
    proc = _start_cli(cfg.path)
    try:
        peers.wait_port(port, 30)
        files = dicomgen.mixed_set(tmp_path / "src")
        res = peers.dcmsend(port, files, calling="CT1")
        assert res.returncode == 0, res.stderr
    finally:
        code, out = _stop_cli(proc)
    assert code == 0, out
    assert len(list((cfg.spool.path / "incoming").glob("*.dcm"))) == len(files)
    assert len(re.findall(r"\breceived sop=", out)) == len(files)
    assert "from=CT1@127.0.0.1" in out


F_SETPIPE_SZ = 1031  # fcntl.h: Linux


def test_a_stderr_nobody_reads_never_stops_receiving(make_settings: Any, tmp_path: Path
                                                     ) -> None:
    """serve suspended (Ctrl-Z, a blocked terminal) stops reading its children's stderr: a
    pipe holds 64 KiB of log lines, then every write would block, the receiver's before it
    answers. Logging goes through a bounded non-blocking queue instead."""
    port = peers.free_port()
    cfg = _settings(make_settings, port)
    proc = subprocess.Popen([*hermes_cmd(), "receive", "-c", str(cfg.path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # never read
    assert proc.stderr is not None
    fcntl.fcntl(proc.stderr.fileno(), F_SETPIPE_SZ, 4096)  # the smallest pipe: a page
    try:
        peers.wait_port(port, 30)
        f = dicomgen.save(dicomgen.make_instance(8, 8), tmp_path / "a.dcm")
        n = 60  # ~330 bytes of log each: several times what the pipe holds
        statuses = send(port, [f] * n)
        assert statuses == [0] * n
    finally:
        proc.send_signal(15)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert err.decode().count("received sop=") == n  # queued, not lost, once read


def test_two_processes_share_the_port(make_settings: Any, tmp_path: Path) -> None:
    """``processes = 2``: each ``hermes-py receive`` binds with SO_REUSEPORT (serve starts
    them; here two are started by hand, as systemd units would), the kernel spreads the
    associations, and ``received_by`` says which process took each instance."""
    port = peers.free_port()
    cfg = _settings(make_settings, port, processes=2)
    procs = [_start_cli(cfg.path), _start_cli(cfg.path)]
    inc = cfg.spool.path / "incoming"
    try:
        f = dicomgen.save(dicomgen.make_instance(), tmp_path / "a.dcm")
        peers.wait_port(port, 30)
        # each association comes from a new source port; the kernel spreads them
        received_by: set[str] = set()
        deadline = time.monotonic() + 90
        sent = 0
        while len(received_by) < 2 and time.monotonic() < deadline:
            try:
                statuses = send(port, [f])
            except AssertionError:
                time.sleep(0.2)  # the second one may still be starting
                continue
            assert statuses == [0]
            sent += 1
            received_by = {sidecar(p)["received_by"] for p in inc.glob("*.dcm")}
        assert len(received_by) == 2, f"only {received_by} received after {sent} associations"
    finally:
        stopped = [_stop_cli(p) for p in procs]
    for code, out in stopped:
        assert code == 0, out
    assert len(list(inc.glob("*.dcm"))) == sent
    assert {int(x.rsplit(":", 1)[1]) for x in received_by} == {p.pid for p in procs}


def test_sigterm_lets_an_inflight_store_finish(make_settings: Any, tmp_path: Path) -> None:
    """SIGTERM during a transfer: no new associations, that C-STORE completes, exit 0."""
    port = peers.free_port()
    cfg = _settings(make_settings, port)
    proc = _start_cli(cfg.path)
    big = dicomgen.save(dicomgen.make_instance(1024, 1024), tmp_path / "big.dcm")
    try:
        peers.wait_port(port, 30)
        raw = RawStore(port, big)
        half = len(raw.pdus) // 2
        raw.send(raw.pdus[:half])
        spool = Spool(cfg.spool.path)
        wait_for(lambda: tmp_files(spool) != [], what="the transfer to start")
        proc.send_signal(15)

        def refused() -> bool:
            with socket.socket() as s:
                return s.connect_ex((LOOPBACK, port)) != 0
        wait_for(refused, what="the receiver to stop accepting associations")
        raw.send(raw.pdus[half:])
        status = raw.status()
        raw.release()
    finally:
        code, out = _stop_cli(proc)
    assert code == 0, out
    assert status == 0, out
    [dst] = (cfg.spool.path / "incoming").glob("*.dcm")
    assert dicomgen.dataset_bytes(dst) == dicomgen.dataset_bytes(big)
