"""``nbparallel bench``: the report's structure, its ratios, its renderings and the command.

Benchmarks are not tests: nothing here asserts that anything is fast, only that every case ran (or
says why not), that every ratio is the ratio of the times it names, and that the output parses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbparallel import bench

pytestmark = pytest.mark.cluster

HAVE_DASK = importlib.util.find_spec("distributed") is not None
PMAP_CASES = ["nbparallel", "nbparallel, telemetry off", "nbparallel, a list of items",
              "ipyparallel chunksize=1",
              "ipyparallel chunksize=100", "dask", "joblib (loky)", "multiprocessing",
              # the efficiency case, 1000 items of 2 ms of CPU each
              "nbparallel", "joblib (loky)", "multiprocessing", "ideal ({n} engines, no dispatch)"]
ROUNDTRIP_CASES = ["nbparallel", "ipyparallel %px pass"]
CELL = re.compile(r"(?<!\\)\|")  # a cell border: a pipe that is not escaped


@pytest.fixture(scope="module")
def report(pool):
    return bench.run(pool, size_mb=4, items=50, repeat=1, only=["pmap", "roundtrip"])


def key(case: dict) -> str:
    return f"{case['group']}/{case['name']}/{case['what']}"


def test_every_case_has_a_time_or_an_error(report, pool) -> None:
    assert report["engines"] == len(pool.ids)
    assert report["groups"] == ["pmap", "roundtrip"]
    names = {g: [c["name"] for c in report["cases"] if c["group"] == g] for g in report["groups"]}
    pmap = [name.format(n=len(pool.ids)) for name in PMAP_CASES]
    assert names == {"pmap": pmap, "roundtrip": ROUNDTRIP_CASES}
    for case in report["cases"]:
        if case["error"] is None:
            assert 0 < case["seconds_best"] <= case["seconds_median"], case
        else:
            assert case["seconds_best"] is None and case["seconds_median"] is None, case
        if case["group"] == "pmap":
            assert (case["items_per_s"] is None) == (case["error"] is not None)
            items = bench.WORK_ITEMS if case["what"] == bench.WORK else 50
            if case["error"] is None:
                assert case["items_per_s"] == pytest.approx(items / case["seconds_best"])


def test_cases_that_need_only_this_environment_succeed(report) -> None:
    # ipyparallel and multiprocessing are always there, so their rows must carry times.
    by_name = {(c["group"], c["name"]): c for c in report["cases"]}
    for case in [("pmap", "ipyparallel chunksize=1"), ("pmap", "ipyparallel chunksize=100"),
                 ("pmap", "multiprocessing"), ("roundtrip", "ipyparallel %px pass")]:
        assert by_name[case]["error"] is None, by_name[case]


def test_dask_row(report) -> None:
    dask = next(c for c in report["cases"] if c["group"] == "pmap" and c["name"] == "dask")
    if HAVE_DASK:
        assert dask["error"] is None, dask
        assert report["machine"]["dask"]
    else:
        assert dask["error"] == "not installed"


def test_ratios_are_ratios_of_the_measured_times(report) -> None:
    cases = {key(c): c for c in report["cases"]}
    ratios = report["ratios"]
    # one ratio per other case, against nbparallel's row of the same group
    assert sorted(r["baseline"] for r in ratios.values()) == sorted(
        k for k, c in cases.items() if c["name"] != "nbparallel")
    for label, ratio in ratios.items():
        mine, other = cases[ratio["case"]], cases[ratio["baseline"]]
        assert mine["name"] == "nbparallel" and mine["group"] == other["group"], label
        stat = ratio["statistic"]
        median = mine["group"] == "roundtrip" or other["name"] == bench.NO_TELEMETRY
        assert stat == ("seconds_median" if median else "seconds_best")
        if mine["error"] or other["error"]:
            assert ratio["value"] is None
        else:
            assert ratio["unit"] == "x"
            assert ratio["value"] == pytest.approx(other[stat] / mine[stat])


def test_format_table_names_every_case(report) -> None:
    text = bench.format_table(report)
    for case in report["cases"]:
        assert case["name"] in text and case["what"] in text
    assert report["date"] in text and f"{report['engines']} engines" in text


def test_markdown_table_is_a_table(report) -> None:
    lines = bench.markdown_table(report).splitlines()
    assert report["date"] in lines[0] and report["machine"]["python"] in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert lines[lines.index(table[0]) - 1] == ""  # a blank line before the table
    widths = {len(CELL.split(line.strip())) for line in table}
    assert len(widths) == 1, table  # the same number of cells on every row
    assert re.fullmatch(r"\|(---\|)+", table[1])
    assert len(table) == 2 + len(report["cases"])
    for row, case in zip(table[2:], report["cases"]):
        assert f"| {case['name']} |" in row


def test_markdown_escapes_pipes(report) -> None:
    broken = dict(report, cases=[dict(report["cases"][0], error="error: X: a | b")])
    table = [line for line in bench.markdown_table(broken).splitlines() if line.startswith("|")]
    assert len({len(CELL.split(line)) for line in table}) == 1


def test_a_failing_case_is_reported_and_the_rest_runs(pool, monkeypatch) -> None:
    import nbparallel

    def broken(*args, **kwargs):
        raise RuntimeError("no data plane today")

    monkeypatch.setattr(nbparallel, "scatter", broken)
    report = bench.run(pool, repeat=1, only=["roundtrip"])
    mine, other = report["cases"]
    assert mine["error"] == "error: RuntimeError: no data plane today"
    assert other["error"] is None and other["seconds_median"] > 0
    assert [r["value"] for r in report["ratios"].values()] == [None]
    assert "error: RuntimeError: no data plane today" in bench.format_table(report)


def test_run_rejects_bad_options(pool) -> None:
    import nbparallel

    with pytest.raises(nbparallel.UsageError, match="groups"):
        bench.run(pool, only=["nope"])


def test_command_prints_json(tmp_path: Path) -> None:
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nbparallel", "bench", "--json", "--size-mb", "4", "--items", "50",
         "--repeat", "1", "--only", "roundtrip", "-n", "2", "--output", str(out)],
        cwd=tmp_path, env=env, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    report = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert report == json.loads(out.read_text())
    assert report["engines"] == 2 and report["groups"] == ["roundtrip"]
    failed = any(c["error"] for c in report["cases"] if c["name"] == "nbparallel")
    assert proc.returncode == (1 if failed else 0), proc.stderr
    assert "bench: roundtrip" in proc.stderr  # progress goes to stderr


def test_pipeline_group_times_the_hop_and_the_overhead(pool) -> None:
    user_stages = dict(pool.pipeline.stages)
    report = bench.run(pool, size_mb=8, repeat=1, only=["pipeline"])
    rows = {(c["name"], c["what"]): c for c in report["cases"]}
    assert set(rows) == {("nbparallel", "activation hop"), ("nbparallel", "per micro-batch"),
                         ("nbparallel over sockets", "activation hop"),
                         ("numpy.copyto", "activation hop")}
    for case in rows.values():
        assert case["error"] is None, case
    hop = rows[("nbparallel", "activation hop")]
    assert hop["gbps"] == pytest.approx(8 * 10**6 / hop["seconds_best"] / 10**9, rel=1e-3)
    assert 0 < rows[("nbparallel", "per micro-batch")]["seconds_median"] < 0.1
    ratios = {r["baseline"]: r for r in report["ratios"].values()}
    assert ratios["pipeline/numpy.copyto/activation hop"]["unit"] == "%"
    # The bench's stages are its own: the user's pipeline is untouched.
    assert pool.pipeline.stages == user_stages


def test_comm_group_runs_beside_mpi4py(pool) -> None:
    import shutil

    report = bench.run(pool, repeat=1, only=["comm"])
    rows = {(c["name"].split(" (")[0], c["what"]): c for c in report["cases"]}
    for what in ("allreduce 8 B", "allreduce 1 MB", "allreduce 64 MB", "halo 32 KiB"):
        mine = rows[("nbparallel", what)]
        assert mine["error"] is None and mine["seconds_median"] > 0, mine
    have_mpi = shutil.which("mpiexec") and importlib.util.find_spec("mpi4py")
    if os.environ.get("CI") == "true":
        assert have_mpi, ".ci/run installs Open MPI and nbparallel[mpi]"
    theirs = rows[("mpi4py", "allreduce 64 MB")]
    if have_mpi:
        assert theirs["error"] is None, theirs
        labels = [k for k in report["ratios"] if k.startswith("comm allreduce 64 MB: nbparallel vs mpi4py")]
        assert labels and report["ratios"][labels[0]]["value"] > 0
    else:
        assert theirs["error"].startswith("not installed")


def test_tables_group_runs_beside_dataframe_copy(pool) -> None:
    pytest.importorskip("pandas")
    report = bench.run(pool, size_mb=4, repeat=1, only=["tables"])
    rows = {(c["name"], c["what"]): c for c in report["cases"]}
    for what in ("numeric scatter", "numeric gather", "numeric round trip", "mixed round trip",
                 "shuffle"):
        mine = rows[("nbparallel", what)]
        assert mine["error"] is None and mine["gbps"] > 0, mine
    for what in ("numeric scatter", "numeric gather", "numeric round trip"):
        assert rows[("DataFrame.copy", what)]["error"] is None
    ratios = {r["baseline"]: r for r in report["ratios"].values()}
    assert ratios["tables/DataFrame.copy/numeric gather"]["unit"] == "%"
    dask = rows[("dask", "shuffle")]
    assert dask["error"] is None or dask["error"] == "not installed", dask
