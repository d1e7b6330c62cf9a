"""What a DICOM file on disk is: read without ever holding more than its header.

A deflate bomb (a few MB inflating to GBs) is the hostile case: pydicom inflates a
deflated data set whole before reading its first element, even with
stop_before_pixels, so the router would take GBs for one header.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hermes_py import dicomfile
from tests.support.dicomgen import deflate_bomb

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def test_header_of_a_deflate_bomb_is_read_in_bounded_memory(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 2 * GIB)
    assert bomb.stat().st_size < 8 * 1024 * 1024
    code = (
        "import resource, sys\n"
        "from hermes_py import dicomfile\n"
        f"v = dicomfile.read_header({str(bomb)!r}, ['SOPInstanceUID', 'PatientID'])\n"
        "print(v['PatientID'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True).stdout.split()
    assert out[0] == "BOMB"
    assert int(out[1]) < 200, f"peak RSS {out[1]} MB reading one header"


def test_inspect_refuses_what_inflates_past_the_limit(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 64 * 1024 * 1024)
    with pytest.raises(dicomfile.TooLarge, match=r"inflates to more than 16 MB"):
        dicomfile.inspect(bomb, max_inflated=16 * 1024 * 1024)
    assert dicomfile.inspect(bomb, max_inflated=128 * 1024 * 1024).sop_instance_uid


def test_deflated_header_is_the_same_as_pydicoms(tmp_path: Path) -> None:
    small = deflate_bomb(tmp_path / "small.dcm", 4096)
    kws = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "Modality", "PatientID"]
    ours = dicomfile.read_header(small, kws)
    from pydicom import dcmread
    ds = dcmread(small)
    assert ours == {k: str(ds.get(k)) for k in kws}
