"""Tag coercion: only the coerced destination's copy changes; pixels and UIDs stay equal,
compressed pixels are copied as bytes, and rules check refuses what cannot be coerced.

Two folder destinations from one rule share one file by hard link, as the fan-out
makes them; one of them coerces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from hermes_py.config import ConfigError, load
from hermes_py.dispatcher import Dispatcher
from hermes_py.spool import Spool
from hermes_py.spool import sidecar as sc
from tests.support.config import Config, TypedDest, rule
from tests.support.dicomgen import make_instance
from tests.support.spool import put

COERCE = {"set": {"InstitutionName": "Hospital B", "PatientID": "${CallingAE}-${PatientID}"},
          "remove": ["PatientComments"]}


def two_folders(make_settings: Any, tmp_path: Path) -> Any:
    plain, coerced = tmp_path / "plain", tmp_path / "coerced"
    plain.mkdir()
    coerced.mkdir()
    return make_settings(
        TypedDest("plain", options={"path": str(plain), "layout": "{SOPInstanceUID}.dcm"}),
        TypedDest("research", options={"path": str(coerced), "layout": "{SOPInstanceUID}.dcm",
                                       "coerce": COERCE}),
        rules=rule("both", ["plain", "research"]))


def fan_out(spool: Spool, ds: Any) -> Path:
    """One file in both outboxes, linked (what the router does)."""
    a = put(spool, None, ds, dest="plain", calling_ae="CT1")
    data = spool.read_sidecar(a)
    spool.link(a, spool.outbox("research"), sc.queued(data, "research", "normal", "t"))
    return a


def send_both(cfg: Any) -> None:
    for name in ("plain", "research"):
        with Dispatcher(cfg, name) as d:
            assert d.run_once() == 1


def test_only_the_coerced_destination_copy_changes(make_settings: Any, tmp_path: Path) -> None:
    cfg = two_folders(make_settings, tmp_path)
    spool = Spool(cfg.spool.path)
    ds = make_instance(16, 16)
    ds.PatientID = "P42"
    ds.InstitutionName = "Hospital A"
    ds.PatientComments = "private note"
    src = fan_out(spool, ds)
    original = src.read_bytes()
    send_both(cfg)

    name = f"{ds.SOPInstanceUID}.dcm"
    plain = tmp_path / "plain" / name
    coerced = tmp_path / "coerced" / name
    assert plain.read_bytes() == original, "the other destination got the instance as received"
    assert (spool.success_dir("plain") / src.name).read_bytes() == original, "spool untouched"
    got = dcmread(coerced)
    assert got.InstitutionName == "Hospital B"
    assert got.PatientID == "CT1-P42"
    assert "PatientComments" not in got
    for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert getattr(got, kw) == getattr(ds, kw)
    assert got.PixelData == ds.PixelData
    side = json.loads((spool.success_dir("research") / src.name).with_suffix(".json")
                      .read_text())
    assert side["coerced"] == {"set": ["InstitutionName", "PatientID"],
                               "removed": ["PatientComments"]}
    assert "Hospital" not in json.dumps(side["coerced"]), "values are never recorded"


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm"])
def test_compressed_pixels_are_copied_as_bytes(make_settings: Any, tmp_path: Path,
                                               name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    cfg = two_folders(make_settings, tmp_path)
    spool = Spool(cfg.spool.path)
    local = tmp_path / name
    shutil.copy(str(path), local)
    ds = dcmread(local)
    fan_out(spool, ds)
    send_both(cfg)
    got = dcmread(tmp_path / "coerced" / f"{ds.SOPInstanceUID}.dcm")
    assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert got.PixelData == ds.PixelData
    assert got.InstitutionName == "Hospital B"


@pytest.mark.parametrize(("coerce", "message"), [
    ({"set": {"StudyInstanceUID": "1.2.3"}}, "StudyInstanceUID is never coerced"),
    ({"set": {"InstitutionNam": "x"}}, "unknown DICOM keyword 'InstitutionNam'"),
    ({"set": {"PatientSex": "MALE AND FEMALE AND MORE"}}, "PatientSex"),
    ({"set": {"PatientID": "${Nope}-x"}}, "unknown placeholder ${Nope}"),
    ({"remove": ["PixelData"]}, "PixelData is never coerced"),
    ({"set": {"PatientID": "a"}, "remove": ["PatientID"]}, "both set and removed"),
])
def test_rules_check_refuses_what_cannot_be_coerced(tmp_path: Path, coerce: dict[str, Any],
                                                    message: str) -> None:
    path = Config(destinations=[TypedDest("research", options={"path": "out",
                                                               "coerce": coerce})],
                  rules=rule("all", ["research"])).write(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert message in str(e.value) and "destinations.research.coerce" in str(e.value)
