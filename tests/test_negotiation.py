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
    ds = prepare(path, c)
    assert not isinstance(ds, Path)
    assert str(ds.SOPInstanceUID) == uid
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)


def test_as_stored_is_the_path_itself(tmp_path: Path) -> None:
    path = save(make_instance(8, 8), tmp_path / "a.dcm")
    c = choose([accepted(CTImageStorage, ExplicitVRLittleEndian)], [], CTImageStorage,
               ExplicitVRLittleEndian)
    assert prepare(path, c) == path


def test_broken_compressed_data_is_unsendable_with_the_syntax_named(tmp_path: Path) -> None:
    src = compressed_instance("jpeg2000")
    src.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00" \
        + b"junk" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = save(src, tmp_path / "bad.dcm")
    c = negotiation.Choice(Mode.DECOMPRESS, accepted(str(src.SOPClassUID),
                                                     ExplicitVRLittleEndian))
    with pytest.raises(Unsendable, match="JPEG 2000"):
        prepare(path, c)
    assert dcmread(path).SOPInstanceUID == src.SOPInstanceUID  # the file is untouched
