"""The prepared GPU check (scripts/device-check.sh) runs end to end here, as its dry run.

On a machine without a GPU every step must still pass: the GPU tests skip, the gpu bench group
says why it did not run, notebook 05 runs its NumPy path, and ``%nbp status`` prints. So a session
lent a device runs a script that is known to work everywhere but on the device itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device-check.sh"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="a GPU machine runs the real check, not the dry run")
def test_the_device_check_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)
    log = (tmp_path / "device-check.log").read_text()
    assert proc.returncode == 0, log + proc.stderr
    assert "every step passed" in log
    for step in ("pytest-gpu", "bench-gpu", "notebook-05", "nbp-status"):
        assert f"== {step}: exit 0" in log, log
    rows = json.loads((tmp_path / "bench-gpu.json").read_text())["cases"]
    assert rows and all("bound to GPUs" in r["error"] for r in rows)
    assert "skipped" in (tmp_path / "pytest-gpu.log").read_text()
    assert (tmp_path / "05-gpu.executed.ipynb").is_file()
    status = (tmp_path / "nbp-status.log").read_text()
    assert "engine" in status and "cpu" in status


def test_the_device_check_refuses_to_run_without_its_wheels(tmp_path):
    # Device mode installs from .whl/; with none there it says how to make them, and stops.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    work = tmp_path / "tree"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, work / "scripts" / SCRIPT.name)
    proc = subprocess.run(["bash", str(work / "scripts" / SCRIPT.name)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "run scripts/device-check.sh --prepare first" in proc.stderr
