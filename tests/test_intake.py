"""The drop folder: complete files become instances in incoming/, the rest go to error/.

Real files on a real filesystem, real watchdog events; the clock is injected only
where a test must show that time alone (not an event) decides.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from hermes_py.config import IntakeSettings
from hermes_py.dicomfile import inspect
from hermes_py.intake import DropIntake
from hermes_py.spool import Spool, is_name
from tests.support import dicomgen
from tests.support.dicomgen import uid_of
from tests.support.peers import wait_for
from tests.support.spool import sidecar

# ---------------------------------------------------------------- helpers


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


INCOMPLETE_AFTER = 60.0


def make_intake(spool: Spool, stable_for: float = 0.0, rescan: float = 0.2,
                incomplete_after: float = INCOMPLETE_AFTER) -> DropIntake:
    return DropIntake(spool, IntakeSettings(stable_for=stable_for, rescan_interval=rescan,
                                            incomplete_after=incomplete_after))


@pytest.fixture
def running(spool: Spool) -> Iterator[Callable[..., DropIntake]]:
    """An intake with watchdog on and a poll loop in a thread, stopped at the end."""
    stops: list[tuple[DropIntake, threading.Event, threading.Thread]] = []

    def start(stable_for: float, rescan: float = 0.5) -> DropIntake:
        intake = make_intake(spool, stable_for, rescan)
        intake.start()
        stop = threading.Event()
        t = threading.Thread(target=intake.serve, args=(stop,), daemon=True)
        t.start()
        stops.append((intake, stop, t))
        return intake

    yield start
    for intake, stop, t in stops:
        stop.set()
        intake.wakeup.set()
        t.join(10)
        intake.stop()


def incoming(spool: Spool) -> list[Path]:
    return sorted(spool.incoming.glob("*.dcm"))


def errors(spool: Spool) -> list[Path]:
    return sorted(spool.error.glob("*.dcm"))


def files_in_drop(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.drop.rglob("*") if not p.is_dir())


def ct(tmp_path: Path, name: str = "ct.dcm", **kw: Any) -> Path:
    return dicomgen.save(dicomgen.make_instance(**kw), tmp_path / "src" / name)


# ---------------------------------------------------------------- accepted files


def test_part10_files_are_copied_in_with_a_sidecar(spool: Spool, tmp_path: Path) -> None:
    """The spool's copy is its own inode: a writer still holding the dropped file (or a
    hard link outside the spool) can never change what was checked and delivered."""
    files = dicomgen.mixed_set(tmp_path / "src")
    inodes = {}
    for f in files:
        dst = spool.drop / "study 1" / "series:a" / f.name.upper()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        inodes[uid_of(f)] = dst.stat().st_ino
    intake = make_intake(spool)
    assert intake.poll() == len(files)

    got = {uid_of(p): p for p in incoming(spool)}
    assert len(got) == len(files)
    for f in files:
        uid = uid_of(f)
        dst = got[uid]
        assert dst.read_bytes() == f.read_bytes()  # a Part-10 file is copied, not rewritten
        assert dst.stat().st_ino != inodes[uid] and dst.stat().st_nlink == 1
        meta = dcmread(f, stop_before_pixels=True).file_meta
        sc = sidecar(dst)
        assert sc["name"] == dst.stem and is_name(dst.stem)
        assert sc["source"] == "drop"
        assert sc["original_path"] == f"drop/study 1/series:a/{f.name.upper()}"
        assert sc["sop_instance_uid"] == uid
        assert sc["sop_class_uid"] == str(meta.MediaStorageSOPClassUID)
        assert sc["transfer_syntax"] == str(meta.TransferSyntaxUID)
        assert sc["size"] == dst.stat().st_size
        assert sc["received_at"].endswith("Z")
    assert files_in_drop(spool) == [] and errors(spool) == []
    assert intake.accepted == len(files)


def _meta_without_preamble(f: Path) -> bytes:
    return f.read_bytes()[132:]


def _dicm_without_preamble(f: Path) -> bytes:
    return f.read_bytes()[128:]


@pytest.mark.parametrize("variant,ts", [
    ("raw explicit", ExplicitVRLittleEndian),
    ("raw implicit", "1.2.840.10008.1.2"),
    ("meta, no preamble", ExplicitVRLittleEndian),
    ("DICM, no preamble", ExplicitVRLittleEndian),
    ("meta, no preamble, jpeg2000", "1.2.840.10008.1.2.4.90"),
    ("deflated, meta, no preamble", DeflatedExplicitVRLittleEndian),
])
def test_files_without_preamble_are_accepted(spool: Spool, tmp_path: Path, variant: str,
                                             ts: str) -> None:
    if "jpeg2000" in variant:
        f = dicomgen.save(dicomgen.compressed_instance("jpeg2000"), tmp_path / "src" / "j.dcm")
    else:
        f = ct(tmp_path, transfer_syntax=ts)
    if variant.startswith("raw"):
        data = dicomgen.dataset_bytes(f)
    elif variant.startswith("DICM"):
        data = _dicm_without_preamble(f)
    else:
        data = _meta_without_preamble(f)
    dropped = spool.drop / "IM0001"
    dropped.write_bytes(data)

    assert make_intake(spool).poll() == 1
    [dst] = incoming(spool)
    out = dcmread(dst)  # a proper Part-10 file now
    assert dst.read_bytes()[128:132] == b"DICM"
    assert str(out.file_meta.TransferSyntaxUID) == ts
    assert out.file_meta.MediaStorageSOPInstanceUID == uid_of(f)
    assert dicomgen.dataset_bytes(dst) == dicomgen.dataset_bytes(f)  # data set bytes unchanged
    sc = sidecar(dst)
    assert sc["transfer_syntax"] == ts
    assert sc["sop_instance_uid"] == uid_of(f)
    assert sc["original_path"] == "drop/IM0001"
    assert sc["size"] == dst.stat().st_size
    assert not dropped.exists() and errors(spool) == []
    assert os.listdir(spool.tmp) == []


def test_undefined_length_sequences_are_walked(spool: Spool, tmp_path: Path) -> None:
    f = ct(tmp_path, rows=8, cols=8)
    (spool.drop / "sq.dcm").write_bytes(f.read_bytes() + _undefined_sq(complete=True))
    assert make_intake(spool).poll() == 1
    assert len(incoming(spool)) == 1 and errors(spool) == []


# ---------------------------------------------------------------- rejected files


def _undefined_sq(complete: bool) -> bytes:
    """(FFFA,FFFA) DigitalSignaturesSequence, undefined length, after the pixel data."""
    item = struct.pack("<HH2sH", 0x0400, 0x0005, b"US", 2) + b"\x01\x00"
    out = (struct.pack("<HH2sHL", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF)
           + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
           + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
    return out + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) if complete else out


def _cut_before_pixel_delimiter(f: Path) -> bytes:
    data = f.read_bytes()
    i = data.rindex(b"\xfe\xff\xdd\xe0")  # (FFFE,E0DD) closing the encapsulated pixel data
    return data[:i]


def _no_sop_instance(tmp_path: Path) -> bytes:
    ds = dicomgen.make_instance(8, 8)
    del ds.SOPInstanceUID
    return dicomgen.save(ds, tmp_path / "src" / "nosop.dcm").read_bytes()


def _deflated_truncated(tmp_path: Path) -> bytes:
    data = ct(tmp_path, transfer_syntax=DeflatedExplicitVRLittleEndian).read_bytes()
    return data[: len(data) - 200]


def _dicomdir(tmp_path: Path) -> bytes:
    path = get_testdata_file("DICOMDIR")
    assert path is not None
    return Path(path).read_bytes()


def _raw_compressed(tmp_path: Path) -> bytes:
    f = dicomgen.save(dicomgen.compressed_instance("rle"), tmp_path / "src" / "rle.dcm")
    return dicomgen.dataset_bytes(f)


# Cut short, or not written yet: a writer may still be at it, so these wait incomplete_after.
INCOMPLETE = {"pixel data cut", "cut inside a header", "sequence never ends",
              "encapsulated pixel data never ends", "raw data set cut", "deflated cut", "empty"}
REJECTS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "pixel data cut": (lambda t: ct(t).read_bytes()[:-100],
                       "element (7FE0,0010) PixelData at byte"),
    "cut inside a header": (lambda t: ct(t, rows=8, cols=8).read_bytes()[:360], "truncated"),
    "sequence never ends": (
        lambda t: ct(t, rows=8, cols=8).read_bytes() + _undefined_sq(complete=False),
        "sequence (FFFA,FFFA) DigitalSignaturesSequence starting at byte"),
    "encapsulated pixel data never ends": (
        lambda t: _cut_before_pixel_delimiter(
            dicomgen.save(dicomgen.compressed_instance("jpeg2000"), t / "src" / "j.dcm")),
        "encapsulated pixel data (7FE0,0010) PixelData starting at byte"),
    "raw data set cut": (lambda t: dicomgen.dataset_bytes(ct(t))[:-10], "truncated"),
    "deflated cut": (_deflated_truncated, "truncated"),
    "text": (lambda t: b"Patient list, do not lose\n" * 50, "not DICOM"),
    "random": (lambda t: os.urandom(4096), "not DICOM"),
    "zeros": (lambda t: b"\0" * 4096, "not DICOM"),
    "empty": (lambda t: b"", "empty file"),
    "DICOMDIR": (_dicomdir, "DICOMDIR"),
    "no SOP Instance UID": (_no_sop_instance, "no SOP Instance UID"),
    "compressed without meta": (_raw_compressed, "transfer syntax it is compressed with"),
}


@pytest.mark.parametrize("case", list(REJECTS))
def test_junk_and_truncated_files_go_to_error_with_a_reason(spool: Spool, tmp_path: Path,
                                                            case: str,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    build, reason = REJECTS[case]
    data = build(tmp_path)
    dropped = spool.drop / "from_cd" / "FILE0001"
    dropped.parent.mkdir()
    dropped.write_bytes(data)
    intake = make_intake(spool)
    now = time.time()
    if case in INCOMPLETE:
        assert intake.poll(now) == 0 and errors(spool) == []  # its writer may be slow
        assert intake.poll(now + INCOMPLETE_AFTER / 2) == 0
        now += INCOMPLETE_AFTER + 1
    assert intake.poll(now) == 1
    [err] = errors(spool)
    assert err.read_bytes() == data  # kept as it was, for a person to look at
    sc = sidecar(err)
    assert reason in sc["error"]["reason"], sc["error"]["reason"]
    if case in INCOMPLETE:
        assert "(unchanged for 1m)" in sc["error"]["reason"], sc["error"]["reason"]
    assert sc["error"]["stage"] == "intake"
    assert sc["original_path"] == "drop/from_cd/FILE0001"
    assert sc["source"] == "drop"
    assert incoming(spool) == [] and files_in_drop(spool) == []
    assert intake.rejected == 1
    assert any(m.startswith("rejected") and "FILE0001" in m for m in caplog.messages)
    # the intake goes on: the next good file is taken
    shutil.copyfile(ct(tmp_path, "good.dcm"), spool.drop / "good.dcm")
    assert intake.poll(now + 1) == 1
    assert len(incoming(spool)) == 1


def test_symlink_is_not_followed(spool: Spool, tmp_path: Path) -> None:
    target = ct(tmp_path)
    (spool.drop / "link.dcm").symlink_to(target)
    assert make_intake(spool).poll() == 1
    [err] = errors(spool)
    assert "not a regular file" in sidecar(err)["error"]["reason"]
    assert target.exists()  # the target is never touched


def test_hidden_files_are_left_alone(spool: Spool, tmp_path: Path) -> None:
    """rsync/SMB write '.name.XXXX' and rename when done: never take those."""
    f = ct(tmp_path)
    shutil.copyfile(f, spool.drop / ".IM1.dcm.partial")
    (spool.drop / ".sync").mkdir()
    shutil.copyfile(f, spool.drop / ".sync" / "x.dcm")
    (spool.drop / ".DS_Store").write_bytes(b"junk")
    intake = make_intake(spool)
    assert intake.poll() == 0
    assert intake.poll(time.time() + 100) == 0
    assert len(files_in_drop(spool)) == 3 and incoming(spool) == [] and errors(spool) == []


def test_inspect_mixed_set(tmp_path: Path) -> None:
    for f in dicomgen.mixed_set(tmp_path / "src"):
        info = inspect(f)
        meta = dcmread(f, stop_before_pixels=True).file_meta
        assert info.part10
        assert info.sop_instance_uid == uid_of(f)
        assert info.transfer_syntax == str(meta.TransferSyntaxUID)
        assert f.read_bytes()[info.dataset_offset:] == dicomgen.dataset_bytes(f)


# ---------------------------------------------------------------- completeness


def test_stability_decides_without_events(spool: Spool, tmp_path: Path) -> None:
    """No watchdog: a file is taken only once unchanged for stable_for (our clock)."""
    data = ct(tmp_path).read_bytes()
    dropped = spool.drop / "slow.dcm"
    intake = make_intake(spool, stable_for=10.0, rescan=1.0)
    t = 1_000_000.0
    with open(dropped, "wb") as w:
        w.write(data[:1000])
        w.flush()
        assert intake.poll(t) == 0
        assert intake.poll(t + 9) == 0  # unchanged, but not for long enough
        w.write(data[1000:5000])
        w.flush()
        assert intake.poll(t + 11) == 0  # it changed: the clock restarts
        w.write(data[5000:])
        w.flush()
        assert intake.poll(t + 12) == 0
        assert intake.poll(t + 21) == 0
        assert dropped.exists() and incoming(spool) == [] and errors(spool) == []
        assert intake.poll(t + 22.5) == 1  # writer never closed: stability alone decides
    [dst] = incoming(spool)
    assert dst.read_bytes() == data


def test_stalled_partial_copy_ends_in_error_not_incoming(spool: Spool, tmp_path: Path) -> None:
    """A copy that died half-way looks stable; the structure check catches it, and once it
    stayed so for incomplete_after it is truncated, not a writer that paused."""
    data = ct(tmp_path).read_bytes()
    (spool.drop / "died.dcm").write_bytes(data[: len(data) // 2])
    intake = make_intake(spool, stable_for=5.0, rescan=1.0, incomplete_after=30.0)
    assert intake.poll(100.0) == 0
    assert intake.poll(106.0) == 0  # stable, not whole: waits for its writer
    assert intake.poll(125.0) == 0 and errors(spool) == []
    assert intake.poll(131.0) == 1
    [err] = errors(spool)
    assert "truncated" in sidecar(err)["error"]["reason"]
    assert incoming(spool) == []


def test_slowly_written_file_is_not_taken_before_complete(spool: Spool, tmp_path: Path,
                                                          running: Any) -> None:
    """Written in pieces over ~2 s and kept open: untouched until the writer closes it."""
    running(stable_for=30.0, rescan=0.2)  # only the close event can make it complete
    data = ct(tmp_path, rows=256, cols=256).read_bytes()
    dropped = spool.drop / "incoming_from_smb" / "IM0001"
    dropped.parent.mkdir()
    pieces = 10
    step = len(data) // pieces + 1
    with open(dropped, "wb") as w:
        for i in range(pieces):
            w.write(data[i * step:(i + 1) * step])
            w.flush()
            os.fsync(w.fileno())
            time.sleep(0.2)  # a slow writer (this is the test's input, not synchronisation)
            assert dropped.exists(), f"taken after piece {i + 1} of {pieces}"
            assert incoming(spool) == [] and errors(spool) == []
    wait_for(lambda: len(incoming(spool)) == 1, what="the closed file to be taken")
    assert incoming(spool)[0].read_bytes() == data
    assert errors(spool) == []


def test_writer_that_never_closes_is_taken_once_stable(spool: Spool, tmp_path: Path,
                                                       running: Any) -> None:
    running(stable_for=1.0, rescan=0.2)
    data = ct(tmp_path).read_bytes()
    dropped = spool.drop / "IM0002"
    with open(dropped, "wb") as w:
        w.write(data)
        w.flush()
        wait_for(lambda: len(incoming(spool)) == 1, what="the stable file to be taken")
    assert incoming(spool)[0].read_bytes() == data


def test_close_write_and_rename_in_are_taken_at_once(spool: Spool, tmp_path: Path,
                                                     running: Any) -> None:
    running(stable_for=3600.0, rescan=3600.0)  # no stability, no rescan: events only
    f = ct(tmp_path)
    shutil.copyfile(f, spool.drop / "copied.dcm")
    wait_for(lambda: len(incoming(spool)) == 1, what="the closed file to be taken")
    # the rsync way: a hidden temp file, renamed when done
    tmp = spool.drop / ".copied2.dcm.XXXX"
    shutil.copyfile(ct(tmp_path, "b.dcm"), tmp)
    os.rename(tmp, spool.drop / "copied2.dcm")
    wait_for(lambda: len(incoming(spool)) == 2, what="the renamed file to be taken")
    assert files_in_drop(spool) == [] and errors(spool) == []


def test_truncated_file_renamed_in_is_rejected_without_the_wait(spool: Spool, tmp_path: Path,
                                                             running: Any) -> None:
    """``hermes-py send`` renames whole copies into drop/: a cut file there will not grow,
    so it goes to error/ at once (incomplete_after is 60 s here), naming why."""
    running(stable_for=3600.0, rescan=3600.0)
    data = ct(tmp_path, rows=64, cols=64).read_bytes()
    tmp = tmp_path / "cut.dcm"
    tmp.write_bytes(data[:_pixel_data_offset(data)])
    spool.deposit(tmp, spool.drop / "cut.dcm")
    wait_for(lambda: len(errors(spool)) == 1, 10, what="the renamed cut file in error/")
    [err] = errors(spool)
    reason = json.loads(err.with_suffix(".json").read_text())["error"]["reason"]
    assert "renamed into drop/" in reason and incoming(spool) == []


def test_thousand_files_copied_in_while_running(spool: Spool, tmp_path: Path,
                                                running: Any) -> None:
    src = tmp_path / "src"
    originals: list[Path] = []
    for s in range(10):
        originals += dicomgen.write_series(src / f"series{s}", 100, rows=8, cols=8)
    intake = running(stable_for=1.0, rescan=0.5)
    for i, f in enumerate(originals):  # nested folders, names without .dcm
        dst = spool.drop / f"patient{i % 3}" / f"study{i % 7}" / f"series{i % 10}" / f"IM{i:05d}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    wait_for(lambda: len(incoming(spool)) == len(originals), timeout=120, interval=0.2,
             what=f"{len(originals)} files in incoming/")
    got = {sidecar(p)["sop_instance_uid"] for p in incoming(spool)}
    assert got == {uid_of(f) for f in originals}
    assert errors(spool) == [] and files_in_drop(spool) == []
    intake.empty_dir_age = 0.0  # (not while copying: the copier's mkdir must not race us)
    wait_for(lambda: list(spool.drop.iterdir()) == [], interval=0.2,
             what="the emptied sub-folders to be removed")
    assert spool.drop.is_dir()


def test_emptied_subfolders_stay_for_a_while(spool: Spool, tmp_path: Path) -> None:
    (spool.drop / "a" / "b").mkdir(parents=True)
    shutil.copyfile(ct(tmp_path), spool.drop / "a" / "b" / "x")
    intake = make_intake(spool)
    assert intake.poll() == 1
    assert (spool.drop / "a" / "b").is_dir()  # a person may be about to copy into it
    intake.empty_dir_age = 0.0
    intake.poll(time.time() + 10)
    assert list(spool.drop.iterdir()) == []


def _sparse_instance(path: Path, pixel_bytes: int, raw: bool) -> None:
    """A big instance without writing its bytes: the pixel data is a sparse hole."""
    ds = dicomgen.make_instance(8, 8)
    del ds.PixelData
    dicomgen.save(ds, path)
    head = dicomgen.dataset_bytes(path) if raw else path.read_bytes()
    with open(path, "wb") as f:
        f.write(head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        f.truncate(f.tell() + pixel_bytes)


@pytest.mark.parametrize("raw", [False, True], ids=["part10", "no preamble"])
def test_big_files_are_streamed_not_read(spool: Spool, raw: bool) -> None:
    import tracemalloc

    size = 64 << 20
    dropped = spool.drop / "big"
    _sparse_instance(dropped, size, raw)
    expected = dicomgen.dataset_bytes(dropped) if not raw else None
    intake = make_intake(spool)
    tracemalloc.start()
    try:
        assert intake.poll() == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak Python memory {peak / 2**20:.1f} MiB for a 64 MiB file"
    [dst] = incoming(spool)
    assert dst.stat().st_size >= size
    if expected is not None:
        assert dicomgen.dataset_bytes(dst) == expected


def test_odd_file_names(spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Names that are not UTF-8 or hold a newline: taken, and logged on one line."""
    f = ct(tmp_path)
    drop = os.fsencode(spool.drop)
    shutil.copyfile(f, os.path.join(drop, b"IM\xff\n01"))
    with open(os.path.join(drop, b"junk\xfe"), "wb") as w:
        w.write(b"x" * 200)
    assert make_intake(spool).poll() == 2
    assert len(incoming(spool)) == 1 and len(errors(spool)) == 1
    assert sidecar(incoming(spool)[0])["original_path"] == "drop/IM\udcff\n01"
    assert all("\n" not in m for m in caplog.messages)


# ---------------------------------------------------------------- writers that pause


def _pixel_data_offset(data: bytes) -> int:
    """Where the top-level (7FE0,0010) element starts in an explicit VR LE Part-10 file."""
    at = data.rfind(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    assert at > 0
    return at


def test_writer_pausing_before_the_pixel_data_is_waited_for(spool: Spool, tmp_path: Path
                                                             ) -> None:
    """A slow share that stops after the header (past stable_for) and then writes the
    pixels: never taken as an image without its Pixel Data; taken whole once written."""
    data = ct(tmp_path, rows=64, cols=64).read_bytes()
    cut = _pixel_data_offset(data)
    dropped = spool.drop / "IM0001"
    intake = make_intake(spool, stable_for=5.0, rescan=1.0)
    with open(dropped, "wb") as w:  # held open, never closed in between (SMB)
        w.write(data[:cut])
        w.flush()
        assert intake.poll(100.0) == 0
        assert intake.poll(108.0) == 0  # stable for 8 s: but an image without pixels
        assert incoming(spool) == [] and errors(spool) == []
        w.write(data[cut:])
        w.flush()
    assert intake.poll(110.0) == 0  # it changed: stable_for starts again
    assert intake.poll(116.0) == 1
    [got] = incoming(spool)
    assert got.read_bytes() == data


def test_writer_pausing_inside_the_pixel_data_is_not_sent_to_error(spool: Spool,
                                                                    tmp_path: Path) -> None:
    """Pieces 6.5 s apart with stable_for 5 s: each pause looks stable and cut short; the
    file waits for its writer instead of going to error/ as truncated."""
    data = ct(tmp_path, rows=256, cols=256).read_bytes()
    dropped = spool.drop / "slow2.dcm"
    intake = make_intake(spool, stable_for=5.0, rescan=0.1)  # every poll a full rescan
    t = 100.0
    with open(dropped, "wb") as w:
        for piece in range(5):
            w.write(data[piece * len(data) // 5:(piece + 1) * len(data) // 5])
            w.flush()
            os.utime(dropped, ns=(int(t * 1e9), int(t * 1e9)))  # mtime changes each piece
            assert intake.poll(t) == 0
            assert intake.poll(t + 6.5) == (1 if piece == 4 else 0)
            t += 7.0
    assert errors(spool) == []
    [got] = incoming(spool)
    assert got.read_bytes() == data


def test_hard_link_into_drop_leaves_no_inode_shared_with_the_spool(spool: Spool,
                                                                   tmp_path: Path) -> None:
    outside = ct(tmp_path, "orig.dcm")
    os.link(outside, spool.drop / "linked.dcm")
    assert outside.stat().st_nlink == 2
    assert make_intake(spool).poll() == 1
    [got] = incoming(spool)
    assert outside.stat().st_nlink == 1  # the drop link is gone, the original untouched
    assert got.stat().st_ino != outside.stat().st_ino
    assert got.read_bytes() == outside.read_bytes()


def test_file_changed_while_copied_is_not_published(spool: Spool, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy is published only if the dropped file is the same, unchanged, afterwards."""
    data = ct(tmp_path).read_bytes()
    dropped = spool.drop / "busy.dcm"
    dropped.write_bytes(data)
    real = shutil.copyfileobj

    def copy_then_touch(src: Any, dst: Any, length: int = 0) -> None:
        real(src, dst, length)
        os.utime(dropped, (1e9, 1e9))  # its writer was not done after all

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_touch)
    intake = make_intake(spool)
    assert intake.poll() == 0
    assert incoming(spool) == [] and dropped.exists()
    assert os.listdir(spool.tmp) == []  # the copy did not stay behind
    monkeypatch.setattr(shutil, "copyfileobj", real)
    assert intake.poll(time.time() + 1) == 1
    [got] = incoming(spool)
    assert got.read_bytes() == data
