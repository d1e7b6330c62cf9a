"""Make DICOM test instances: small and CT-like uncompressed, compressed, private.

Used by the tests and by ``make bench`` (corpora are generated, never committed).
No pytest here: the benchmark imports it.
Compressed instances come from pydicom's bundled test files (JPEG baseline,
JPEG 2000, JPEG-LS, RLE) with fresh UIDs, so their pixel data is real codec output.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.1.99"  # not in any standard list

COMPRESSED_SAMPLES = {
    "jpeg_baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg2000": "MR_small_jp2klossless.dcm",
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "rle": "MR_small_RLE.dcm",
}


def make_instance(
    rows: int = 64,
    cols: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class: str = CTImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "CT",
    patient_id: str = "PAT001",
    study_description: str = "HEAD ROUTINE",
    series_description: str = "AXIAL",
    instance_number: int = 1,
    seed: int | None = None,
) -> Dataset:
    """An uncompressed 16-bit monochrome image; 64x64 is ~8 KB, 512x512 ~0.5 MB."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "TEST^HERMES"
    ds.Modality = modality
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.StudyDate = "20261128"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed if seed is not None else instance_number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def big_image(path: Path, mib: int, **kw: object) -> Dataset:
    """A 16-bit image of about ``mib`` MiB at ``path``, its Pixel Data written in 1 MiB
    pieces (never whole in memory, here or in pydicom); returns its header."""
    side = math.isqrt(mib * 1024 * 1024 // 2) & ~1
    ds = make_instance(2, 2, **kw)  # type: ignore[arg-type]
    ds.Rows = ds.Columns = side
    del ds.PixelData
    save(ds, path)
    remaining = side * side * 2
    chunk = bytes(range(256)) * 4096
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, remaining))
        while remaining:
            n = f.write(chunk[:remaining])
            remaining -= n
    return ds


def compressed_instance(kind: str, **uids: str) -> Dataset:
    """A real compressed sample (see COMPRESSED_SAMPLES) with fresh or given UIDs."""
    path = get_testdata_file(COMPRESSED_SAMPLES[kind])
    assert path is not None, f"pydicom test file for {kind} missing"
    ds = dcmread(path)
    ds.SOPInstanceUID = uids.get("sop_uid") or generate_uid()
    ds.StudyInstanceUID = uids.get("study_uid") or generate_uid()
    ds.SeriesInstanceUID = uids.get("series_uid") or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def private_instance(**kw: object) -> Dataset:
    ds = make_instance(sop_class=PRIVATE_SOP_CLASS, **kw)  # type: ignore[arg-type]
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int, rows: int = 64, cols: int = 64,
                 study_uid: str | None = None, series_uid: str | None = None,
                 transfer_syntax: str = ExplicitVRLittleEndian, **kw: object) -> list[Path]:
    """``n`` instances of one series as files ``folder/0000.dcm`` ..."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for i in range(n):
        ds = make_instance(rows, cols, study_uid=study_uid, series_uid=series_uid,
                           instance_number=i + 1, transfer_syntax=transfer_syntax,
                           **kw)  # type: ignore[arg-type]
        out.append(save(ds, folder / f"{i:05d}.dcm"))
    return out


def make_corpus(folder: Path, n: int, rows: int = 16, cols: int = 16, per_series: int = 100,
                **kw: object) -> list[Path]:
    """``n`` small uncompressed instances of one study, each with its own pixels,
    ``per_series`` to a series, as files ``folder/00000.dcm`` ..."""
    files = []
    study = generate_uid()
    series = generate_uid()
    base = int.from_bytes(os.urandom(4), "big")
    for i in range(n):
        if i and i % per_series == 0:
            series = generate_uid()
        ds = make_instance(rows, cols, study_uid=study, series_uid=series,
                           instance_number=i % per_series + 1, seed=base + i,
                           **kw)  # type: ignore[arg-type]
        files.append(save(ds, folder / f"{i:05d}.dcm"))
    return files


def mixed_set(folder: Path) -> list[Path]:
    """Uncompressed CT (explicit and implicit), every compressed kind, a private class."""
    files = [
        save(make_instance(128, 128), folder / "ct_explicit.dcm"),
        save(make_instance(64, 64, transfer_syntax=ImplicitVRLittleEndian),
             folder / "ct_implicit.dcm"),
        save(private_instance(), folder / "private.dcm"),
        save(make_instance(sop_class=SecondaryCaptureImageStorage, modality="OT"),
             folder / "sc.dcm"),
    ]
    for kind in COMPRESSED_SAMPLES:
        files.append(save(compressed_instance(kind), folder / f"{kind}.dcm"))
    return files


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta: what must survive the router unchanged."""
    with open(path, "rb") as f:
        data = f.read()
    fp = BytesIO(data)
    read_preamble(fp, force=True)
    _read_file_meta_info(fp)
    return data[fp.tell():]


def uid_of(path: Path) -> str:
    """The SOP Instance UID of a DICOM file."""
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
               .SOPInstanceUID)


def iter_uids(paths: list[Path]) -> Iterator[str]:
    for p in paths:
        yield uid_of(p)


def deflate_bomb(path: Path, inflated: int, sop_uid: str | None = None) -> Path:
    """A Deflated Explicit VR LE Part-10 file whose Pixel Data (OB) inflates to ``inflated``
    zero bytes: a few MB on disk for GBs inflated. Written in pieces, never held whole."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "BOMB"
    ds.Rows = ds.Columns = 1
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + head.getvalue())
        f.write(c.compress(body.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0,
                                                         inflated)))
        zeros = bytes(1 << 24)
        left = inflated
        while left > 0:
            f.write(c.compress(zeros[:min(left, len(zeros))]))
            left -= len(zeros)
        f.write(c.flush())
    return path
