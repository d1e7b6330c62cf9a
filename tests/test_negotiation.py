"""Presentation-context planning and transfer-syntax conversion, with real pydicom data."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext, build_context

from hermes_py.destinations import negotiation
from hermes_py.destinations.base import Workspace
from hermes_py.destinations.negotiation import MAX_CONTEXTS, Mode, Unsendable, choose, plan, prepare
from tests.support.dicomgen import compressed_instance, make_instance, save


def key(it: tuple[str, str]) -> tuple[str, str]:
    return it


def accepted(sop: str, ts: str) -> PresentationContext:
    """A context as an acceptor returns it: one transfer syntax, result accepted."""
    cx = build_context(sop, [ts])
    cx.result = 0x00
    cx._as_scu = True
    return cx


def rejected(sop: str, ts: str, status: int) -> PresentationContext:
    cx = build_context(sop, [ts])
    cx.result = status
    return cx


def test_plan_one_context_per_stored_syntax_plus_one_fallback_per_class() -> None:
    items = [(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, ExplicitVRLittleEndian),
             (CTImageStorage, JPEGBaseline8Bit), (MRImageStorage, RLELossless)]
    groups = plan(items, key)
    assert len(groups) == 1
    got, contexts = groups[0]
    assert got == items
    pairs = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in contexts]
    fallback = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert pairs == [
        (CTImageStorage, (ExplicitVRLittleEndian,)),
        (CTImageStorage, (JPEGBaseline8Bit,)),
        (CTImageStorage, fallback),
        (MRImageStorage, (RLELossless,)),
        (MRImageStorage, fallback),
    ]


def test_plan_splits_past_the_context_limit_and_keeps_order() -> None:
    # 120 SOP classes, each needing 2 contexts: 50 classes fit per association.
    items = [(f"1.2.826.0.1.3680043.9.7433.2.{i}", ExplicitVRLittleEndian) for i in range(120)]
    groups = plan(items, key)
    assert [len(g) for g, _ in groups] == [50, 50, 20]
    assert [it for g, _ in groups for it in g] == items
    assert all(len(cxs) <= MAX_CONTEXTS for _, cxs in groups)


def test_plan_reuses_contexts_of_a_class_already_in_the_association() -> None:
    items = [(CTImageStorage, ExplicitVRLittleEndian)] * 500
    groups = plan(items, key)
    assert len(groups) == 1 and len(groups[0][1]) == 2


def test_choose_exact_match_streams_as_stored() -> None:
    acc = [accepted(CTImageStorage, JPEGBaseline8Bit), accepted(CTImageStorage,
                                                                ImplicitVRLittleEndian)]
    c = choose(acc, [], CTImageStorage, JPEGBaseline8Bit)
    assert c.mode is Mode.AS_STORED and c.transfer_syntax == JPEGBaseline8Bit


def test_choose_reencodes_uncompressed_and_decompresses_compressed() -> None:
    acc = [accepted(CTImageStorage, ImplicitVRLittleEndian)]
    rej = [rejected(CTImageStorage, JPEG2000Lossless, 4)]
    c = choose(acc, rej, CTImageStorage, ExplicitVRLittleEndian)
    assert c.mode is Mode.REENCODE and c.transfer_syntax == ImplicitVRLittleEndian
    assert choose(acc, rej, CTImageStorage, DeflatedExplicitVRLittleEndian).mode is Mode.REENCODE
    c = choose(acc, rej, CTImageStorage, JPEG2000Lossless)
    assert c.mode is Mode.DECOMPRESS and c.transfer_syntax == ImplicitVRLittleEndian


def test_choose_unknown_sop_class_names_it() -> None:
    rej = [rejected(MRImageStorage, ExplicitVRLittleEndian, 3)]
    with pytest.raises(Unsendable, match="MR Image Storage.*abstract syntax"):
        choose([accepted(CTImageStorage, ExplicitVRLittleEndian)], rej, MRImageStorage,
               ExplicitVRLittleEndian)


def test_unconvertible_transfer_syntax_is_named() -> None:
    acc = [accepted(CTImageStorage, ExplicitVRLittleEndian)]
    with pytest.raises(Unsendable, match=r"MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"):
        choose(acc, [], CTImageStorage, MPEG2MPML)
    with pytest.raises(Unsendable, match="Big Endian"):
        choose(acc, [], CTImageStorage, ExplicitVRBigEndian)


@pytest.mark.parametrize("kind", ["jpeg_baseline", "jpeg2000", "jpeg_ls", "rle"])
def test_decompress_keeps_the_sop_instance_uid(tmp_path: Path, kind: str) -> None:
    src = compressed_instance(kind)
    path = save(src, tmp_path / f"{kind}.dcm")
    uid = str(src.SOPInstanceUID)
    c = choose([accepted(str(src.SOPClassUID), ExplicitVRLittleEndian)], [],
               str(src.SOPClassUID), str(src.file_meta.TransferSyntaxUID))
    assert c.mode is Mode.DECOMPRESS
    with prepare(path, c) as ds:
        assert not isinstance(ds, Path)
        assert str(ds.SOPInstanceUID) == uid
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)


def test_as_stored_is_the_path_itself(tmp_path: Path) -> None:
    path = save(make_instance(8, 8), tmp_path / "a.dcm")
    c = choose([accepted(CTImageStorage, ExplicitVRLittleEndian)], [], CTImageStorage,
               ExplicitVRLittleEndian)
    with prepare(path, c) as payload:
        assert payload == path


def test_broken_compressed_data_is_unsendable_with_the_syntax_named(tmp_path: Path) -> None:
    src = compressed_instance("jpeg2000")
    src.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00" \
        + b"junk" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = save(src, tmp_path / "bad.dcm")
    c = negotiation.Choice(Mode.DECOMPRESS, accepted(str(src.SOPClassUID),
                                                     ExplicitVRLittleEndian))
    with pytest.raises(Unsendable, match="JPEG 2000"), prepare(path, c):
        pass
    assert dcmread(path).SOPInstanceUID == src.SOPInstanceUID  # the file is untouched


# ---------------------------------------------------------------- deflated, streamed conversions

SC = "1.2.840.10008.5.1.4.1.1.7"


def _deflate_bomb(path: Path, n: int) -> str:
    """A small Deflated Explicit VR LE file whose OB inflates to ``n`` zero bytes."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head, body = DicomBytesIO(), DicomBytesIO()
    for b in (head, body):
        b.is_little_endian, b.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    with open(path, "wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM" + head.getvalue())
        fp.write(comp.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OB", 0, n)))
        zeros = bytes(1 << 20)
        for _ in range(n >> 20):
            fp.write(comp.compress(zeros))
        fp.write(comp.flush())
    return str(ds.SOPInstanceUID)


def test_odd_deflate_stream_is_sent_from_a_padded_copy() -> None:
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("image_dfl.dcm"))    # 4303-byte deflate stream: odd
    c = choose([accepted(SC, DeflatedExplicitVRLittleEndian)], [], SC,
               DeflatedExplicitVRLittleEndian)
    assert c.mode is Mode.AS_STORED
    with prepare(path, c) as payload:
        assert isinstance(payload, Path) and payload != path
        assert payload.stat().st_size == path.stat().st_size + 1
        assert dcmread(payload).SOPInstanceUID == dcmread(path).SOPInstanceUID
    assert not payload.exists()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_deflated_to_uncompressed_only_is_inflated_to_a_temp_file(tmp_path: Path,
                                                                  ts: str) -> None:
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("image_dfl.dcm"))
    c = choose([accepted(SC, ts)], [], SC, DeflatedExplicitVRLittleEndian)
    assert c.mode is Mode.REENCODE
    with prepare(path, c, Workspace(scratch=tmp_path)) as payload:
        assert isinstance(payload, Path) and payload.parent == tmp_path
        out, ref = dcmread(payload), dcmread(path)
        assert out.file_meta.TransferSyntaxUID == ts
        assert out.file_meta.MediaStorageSOPInstanceUID == ref.SOPInstanceUID
        assert out.PixelData == ref.PixelData
    assert list(tmp_path.iterdir()) == []


def test_deflate_bomb_is_refused_past_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    _deflate_bomb(path, 64 << 20)
    work = tmp_path / "work"
    work.mkdir()
    c = choose([accepted(SC, ExplicitVRLittleEndian)], [], SC, DeflatedExplicitVRLittleEndian)
    with pytest.raises(Unsendable, match=r"\[limits\] max_inflated_mb"), \
            prepare(path, c, Workspace(scratch=work, max_inflated=8 << 20)):
        pass
    assert list(work.iterdir()) == []
