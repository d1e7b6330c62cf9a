"""The benchmark stays importable and its arithmetic right (no timing: ``make bench`` times).

Generates tiny corpora and a tiny backlog, then formats a table, the targets and the
JSON from hand-made results whose ratios are known.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from bench import corpus, procs, profiling, report, run
from bench.report import Result
from hermes_py import spool as spool_mod


def test_corpus_is_generated_once_and_reused(tmp_path: Path) -> None:
    spec = corpus.CorpusSpec("small", 5, 16, studies=2, series_per_study=1)
    c = corpus.generate(spec, tmp_path)
    assert c.count == 5 and len(set(c.uids)) == 5
    assert c.bytes == sum(f.stat().st_size for f in c.files)
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in c.files}
    assert len(studies) == 2
    assert [str(dcmread(f).SOPInstanceUID) for f in c.files] == c.uids
    mtime = c.files[0].stat().st_mtime_ns
    again = corpus.generate(spec, tmp_path)
    assert again.uids == c.uids and c.files[0].stat().st_mtime_ns == mtime
    # a different spec in the same folder name is regenerated, not reused
    comp = corpus.generate(corpus.CorpusSpec("compressed", 4), tmp_path)
    kinds = {str(dcmread(f).file_meta.TransferSyntaxUID) for f in comp.files}
    assert len(kinds) == 4


def test_fill_outbox_leaves_instances_as_the_router_does(tmp_path: Path) -> None:
    bl = corpus.fill_outbox(tmp_path / "spool", "dest", 7, per_study=3)
    sp = spool_mod.Spool(tmp_path / "spool")
    dcms = sorted(Path(e.path) for e in sp.scan(sp.outbox("dest")))
    assert len(dcms) == 7 == bl.count
    uids, studies = set(), set()
    for p in dcms:
        assert spool_mod.is_name(p.stem), p.name
        side = sp.read_sidecar(p)
        ds = dcmread(p)
        assert side["sop_instance_uid"] == str(ds.SOPInstanceUID) \
            == str(ds.file_meta.MediaStorageSOPInstanceUID)
        assert side["destination"] == "dest" and side["attempts"] == 0
        assert side["study_instance_uid"] == str(ds.StudyInstanceUID)
        assert side["size"] == p.stat().st_size
        assert ds.pixel_array.shape == (64, 64)
        uids.add(side["sop_instance_uid"])
        studies.add(side["study_instance_uid"])
    assert len(uids) == 7 and len(studies) == 3
    assert not list(sp.tmp.iterdir())


def _results() -> list[Result]:
    return [
        Result("direct", "small", 100, 1_000_000, [1.0, 2.0, 1.0]),     # 100/s
        Result("receive", "small", 100, 1_000_000, [4.0]),              # 25/s
        Result("relay", "small", 100, 1_000_000, [2.0, 2.0, 5.0]),      # 50/s
        Result("orthanc-relay", "small", 100, 1_000_000, [10.0]),       # 10/s
        Result("direct", "ct", 10, 5_000_000, [1.0]),                   # 5 MB/s
        Result("relay", "ct", 10, 5_000_000, [4.0]),                    # 1.25 MB/s
        Result("orthanc-receive", "ct", 10, 5_000_000, [2.0]),
        Result("receive", "ct", 10, 5_000_000, [1.0]),
        Result("pynetdicom-receive", "small", 100, 1_000_000, [2.0]),   # 50/s
        Result("receive4", "small", 100, 1_000_000, [2.0]),             # 50/s
        Result("orthanc-receive4", "small", 100, 1_000_000, [2.5]),     # 40/s
        Result("backlog", "backlog", 101, 909_000, [2.5], rate_instances=100),  # 40/s
        Result("relay", "compressed", 4, 100, [], error="BenchError: stalled"),
    ]


def test_ratios_targets_table_and_json(tmp_path: Path) -> None:
    res = _results()
    by = {r.name: r for r in res}
    assert by["relay small"].rate == 50.0
    assert report.ratio_direct(res, by["relay small"]) == 0.5
    assert report.ratio_orthanc(res, by["relay small"]) == 5.0
    assert report.ratio_direct(res, by["backlog backlog"]) == 0.4  # against direct small
    assert report.ratio_orthanc(res, by["receive ct"]) == 2.0
    assert by["relay compressed"].rate is None

    tg = {t.name: t for t in report.targets(res, {"serve": 40.0, "dispatch dest": 160.0}, 0.4,
                                            20_000)}
    assert tg["relay small vs Orthanc+Lua relay small"].met is False
    assert tg["relay small vs direct small"].met is True
    assert tg["receive 0.5 MB vs Orthanc receive 0.5 MB"].measured == 2.0
    assert tg["relay 0.5 MB vs direct 0.5 MB (MB/s)"].measured == 0.25
    assert tg["backlog drain vs steady relay small"].measured == 0.8
    assert tg["receive small vs bare pynetdicom SCP small"].measured == 0.5
    assert tg["receive small vs bare pynetdicom SCP small"].met is False
    assert tg["four modalities at once: receive vs Orthanc"].measured == 1.25
    assert tg["receive 0.5 MB vs bare pynetdicom SCP 0.5 MB"].verdict == "not measured"
    rss = tg["every hermes_py process RSS"]
    assert rss.met is False and "dispatch dest" in rss.detail
    assert tg["hermes-py status at 20,000 queued"].verdict == "met"

    text = report.table(res)
    assert "relay small" in text and "0.50" in text and "5.00" in text
    assert "FAILED: BenchError: stalled" in text
    tt = report.targets_table(list(tg.values()))
    assert "MISSED" in tt and "met" in tt

    meta = {"versions": report.versions(), "machine": report.machine(), "notes": ["n1"]}
    doc = report.to_json(res, list(tg.values()), meta=meta)
    path = report.write_json(doc, tmp_path)
    back = json.loads(path.read_text())
    assert back["versions"]["pynetdicom"] and back["machine"]["nproc"]
    row = next(r for r in back["scenarios"] if r["name"] == "relay small")
    assert row["instances_per_s"] == 50.0 and row["ratio_orthanc"] == 5.0
    assert report.PEER_NOTE in back["notes"] and "n1" in back["notes"]
    assert (tmp_path / "latest.json").read_text() == path.read_text()
    assert "targets (reported, not asserted)" in report.render(doc, res, list(tg.values()))


def test_selection_and_process_labels() -> None:
    chosen, prof = run.select(["relay,orthanc"], orthanc=True, profile=False)
    assert ("relay", "ct") in chosen and ("orthanc-relay", "small") in chosen
    assert ("direct", "small") not in chosen and not prof
    chosen, prof = run.select(["relay-small", "profile"], orthanc=False, profile=False)
    assert chosen == [("relay", "small")] and prof
    assert run.select([], orthanc=False, profile=False)[0][-1] == ("backlog", "backlog")
    assert procs.label(["/v/bin/python", "/v/bin/hermes-py", "dispatch", "pacs", "-c", "x"]) \
        == "dispatch pacs"
    assert procs.label(["/v/bin/python", "-m", "hermes_py", "receive", "-c", "x"]) == "receive"


def test_profile_summary_parses_pyspy_raw(tmp_path: Path) -> None:
    serve = 'process 1:"/v/bin/python /v/bin/hermes-py serve -c x"'
    recv = serve + ';process 2:"/v/bin/python -m hermes_py receive -c x"'
    raw = tmp_path / "p.txt"
    raw.write_text(
        f"{recv};run (threading.py:1);recv (pynetdicom/transport.py:598) 30\n"
        f"{recv};run (threading.py:1);handle (hermes_py/receiver.py:9);"
        "fsync_path (hermes_py/spool.py:120) 10\n"
        f"{recv};run (threading.py:1);DULServiceProvider.run_reactor (pynetdicom/dul.py:403) 50\n"
        f"{recv};run (threading.py:1);Condition.wait (threading.py:320) 10\n"
        f"{serve};_pump (hermes_py/supervisor.py:226) 5\n")
    s = profiling.summarize(raw, wall=2.0)
    rec = s["processes"]["receive"]
    assert rec["samples"] == 100 and rec["busy_samples"] == 40
    assert rec["waiting_pct"] == 60.0 and rec["busy_cores"] == 0.2
    assert rec["self_top"][0][:2] == ("recv (pynetdicom/transport.py)", 30)
    assert rec["self_lines_top"][1][0] == "fsync_path (hermes_py/spool.py:120)"
    assert rec["by_package_pct"] == {"pynetdicom": 75.0, "hermes_py": 25.0}
    incl = {f: n for f, n, _ in rec["inclusive_top"]}
    assert incl == {"recv (pynetdicom/transport.py)": 30, "handle (hermes_py/receiver.py)": 10,
                    "fsync_path (hermes_py/spool.py)": 10}  # thread bootstrap left out
    assert {f for f, _, _ in rec["waiting_top"]} == {
        "DULServiceProvider.run_reactor (pynetdicom/dul.py)", "Condition.wait (threading.py)"}
    assert list(s["processes"]) == ["receive", "serve"]
    assert "[receive] busy ~0.2 cores" in profiling.format_summary(s)


BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_imports_only_tests_support_and_runs_without_pytest() -> None:
    """The bench extra has no pytest: bench/ may use tests.support, never a test module."""
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "tests" or name.startswith("tests."):
                    assert name.startswith("tests.support"), f"{path.name} imports {name}"
    code = ("import sys\n"
            "sys.modules['pytest'] = sys.modules['_pytest'] = None  # import pytest fails\n"
            "import bench.corpus, bench.floor, bench.procs, bench.profiling, bench.run\n"
            "import bench.scenarios\n"
            "import tests.support.cli, tests.support.config, tests.support.fs\n"
            "import tests.support.serve, tests.support.spool\n")
    cp = subprocess.run([sys.executable, "-c", code], cwd=BENCH.parent, capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
