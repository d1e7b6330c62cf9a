"""``type = "folder"``: the layout, hostile values kept inside the folder, identical and
different files already there, a folder that is not writable, and rules check errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from hermes_py.config import ConfigError, load
from hermes_py.dispatcher import Dispatcher
from hermes_py.lifecycle import DestinationStatus
from hermes_py.spool import Spool
from tests.support.config import Config, TypedDest, rule
from tests.support.dicomgen import make_instance
from tests.support.spool import put


def folder_router(make_settings: Any, path: Path, **options: object) -> Any:
    return make_settings(TypedDest("export", options={"path": str(path), **options}),
                         rules=rule("all", ["export"]))


def test_layout_fills_in_sanitised_header_values(make_settings: Any, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    cfg = folder_router(make_settings, out, layout="{PatientID}/{Modality}/{SOPInstanceUID}.dcm")
    spool = Spool(cfg.spool.path)
    ds = make_instance(8, 8)
    ds.PatientID = "../../etc/passwd"
    ds.Modality = "CT"
    src = put(spool, None, ds, dest="export")
    with Dispatcher(cfg, "export") as d:
        assert d.run_once() == 1
    written = list(out.rglob("*.dcm"))
    assert len(written) == 1
    rel = written[0].relative_to(out)
    assert rel.parts[0] == "_._.._etc_passwd" and rel.parts[1] == "CT"  # one component
    assert rel.name == f"{ds.SOPInstanceUID}.dcm"
    assert dcmread(written[0]).SOPInstanceUID == ds.SOPInstanceUID
    assert written[0].read_bytes() == (spool.success_dir("export") / src.name).read_bytes()
    assert not list(out.rglob(".*")), "a temp file was left behind"


def test_identical_file_is_delivered_a_different_one_is_refused(make_settings: Any,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    cfg = folder_router(make_settings, out)
    spool = Spool(cfg.spool.path)
    same = put(spool, dest="export")
    other = put(spool, dest="export")
    ds_same, ds_other = dcmread(same), dcmread(other)
    for ds, content in ((ds_same, same.read_bytes()), (ds_other, b"not this")):
        target = out / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    with Dispatcher(cfg, "export") as d:
        d.run_once()
    assert (spool.success_dir("export") / same.name).exists()
    side = json.loads((spool.success_dir("export") / same.name).with_suffix(".json").read_text())
    assert any("identical" in w for w in side.get("warnings", []))
    failed = spool.error_dir("export") / other.name
    assert failed.exists()
    err = json.loads(failed.with_suffix(".json").read_text())["error"]["reason"]
    assert "a different file is already at" in err


def test_symlink_planted_inside_is_not_followed(make_settings: Any, tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "export", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    cfg = folder_router(make_settings, out, layout="{PatientID}/{SOPInstanceUID}.dcm")
    spool = Spool(cfg.spool.path)
    ds = make_instance(8, 8)
    ds.PatientID = "P1"
    src = put(spool, None, ds, dest="export")
    os.symlink(elsewhere, out / "P1")
    with Dispatcher(cfg, "export") as d:
        d.run_once()
    assert not list(elsewhere.iterdir())
    assert (spool.error_dir("export") / src.name).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_unwritable_folder_is_misconfigured_and_keeps_the_queue(make_settings: Any,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    out.chmod(0o500)
    try:
        cfg = folder_router(make_settings, out)
        spool = Spool(cfg.spool.path)
        put(spool, dest="export")
        with Dispatcher(cfg, "export") as d:
            d.run_once()
            assert d.state.state is DestinationStatus.MISCONFIGURED
        assert len(list(spool.outbox("export").glob("*.dcm"))) == 1
    finally:
        out.chmod(0o700)


def test_missing_folder_is_misconfigured_and_keeps_the_queue(make_settings: Any,
                                                             tmp_path: Path) -> None:
    cfg = folder_router(make_settings, tmp_path / "not-mounted")
    spool = Spool(cfg.spool.path)
    put(spool, dest="export")
    with Dispatcher(cfg, "export") as d:
        d.run_once()
        assert d.state.state is DestinationStatus.MISCONFIGURED
        assert "not-mounted" in str((d.state.last_error or {}).get("detail"))
    assert len(list(spool.outbox("export").glob("*.dcm"))) == 1


@pytest.mark.parametrize(("layout", "message"), [
    ("/abs/{SOPInstanceUID}.dcm", "must be a relative path"),
    ("{StudyInstanceUID}/../{SOPInstanceUID}.dcm", "'..' parts are not allowed"),
    ("{StudyInstanceUID}/file.dcm", "must contain {SOPInstanceUID}"),
    ("{StudyUID}/{SOPInstanceUID}.dcm", "unknown DICOM keyword {StudyUID}"),
])
def test_bad_layouts_are_config_errors(tmp_path: Path, layout: str, message: str) -> None:
    path = Config(destinations=[TypedDest("export", options={"path": "out", "layout": layout})],
                  rules=rule("all", ["export"])).write(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert message in str(e.value) and "destinations.export.layout" in str(e.value)
