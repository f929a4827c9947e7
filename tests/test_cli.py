"""The ``nbparallel`` command: kernel install, demo (success and a failing cell), bad usage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from nbparallel.cli import main

DEMO_TIMEOUT = 900
SUMMARY = re.compile(r"(\d+) of (\d+) checks passed")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m nbparallel ARGS`` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "nbparallel", *args], cwd=cwd, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT)


def read_spec(kernels_dir: Path) -> dict:
    return json.loads((kernels_dir / "nbparallel" / "kernel.json").read_text())


def test_kernel_install_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path)]) == 0
    kernels = tmp_path / "share" / "jupyter" / "kernels"
    spec = read_spec(kernels)
    assert "--ext=nbparallel" in spec["argv"]
    assert spec["argv"][0] == sys.executable  # the interpreter that has nbparallel installed
    assert spec["display_name"] == "Python 3 (nbparallel)"
    assert str(kernels / "nbparallel") in capsys.readouterr().out


def test_kernel_install_user_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))  # where --user installs go
    assert main(["kernel", "install", "--user", "--name", "nbp-test"]) == 0
    assert main(["kernel", "install", "--user", "--name", "nbp-test"]) == 0  # again: replaced
    spec = json.loads((tmp_path / "kernels" / "nbp-test" / "kernel.json").read_text())
    assert "--ext=nbparallel" in spec["argv"]


@pytest.mark.parametrize("argv", [["frobnicate"], ["kernel", "uninstall-everything"]])
def test_unknown_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert f"invalid choice: '{argv[-1]}'" in err
    assert "usage: nbparallel" in err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) != 0
    err = capsys.readouterr().err
    assert "demo" in err and "kernel" in err


@pytest.mark.cluster
def test_demo(tmp_path: Path) -> None:
    out = tmp_path / "out.ipynb"
    proc = run_cli("demo", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed, total = map(int, SUMMARY.search(proc.stdout).groups())
    assert passed == total > 0, proc.stdout
    assert "2 engines" in proc.stdout
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert any(c.outputs for c in code)


def test_demo_names_failing_cell(tmp_path: Path) -> None:
    notebook = tmp_path / "broken.ipynb"
    check = new_code_cell("assert True")
    check.metadata["tags"] = ["check"]
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("y = x / 0"),
                                       check]), notebook)
    proc = run_cli("demo", "--notebook", str(notebook), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 of 1 checks passed" in proc.stdout
    assert "code cell 2 of 3 (`y = x / 0`): ZeroDivisionError" in proc.stderr
    assert (tmp_path / "broken.executed.ipynb").is_file()  # written as far as it ran
