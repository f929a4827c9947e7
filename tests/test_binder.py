"""Play Binder's build, then run every notebook in the environment it made.

repo2docker, given ``binder/``, makes a fresh environment, installs ``binder/requirements.txt``,
runs ``binder/postBuild`` from the repository root (which installs nbparallel and its kernel, since
repo2docker does not install the repository's package itself) and starts Jupyter through
``binder/start``. This test does the same in ``tmp_path``: a copy of the working tree (tracked and
untracked files, not ignored ones, so no build output lands in the checkout), a new venv with no
system site-packages, and every ``notebooks/*.ipynb`` executed on that venv's "Python 3
(nbparallel)" kernel, through ``binder/start``, with the shared-memory budget a Binder with
Docker's 64 MB ``/dev/shm`` gets (half of it). It needs PyPI and takes a few minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BINDER_SHM_BUDGET = "32M"  # half of Docker's default 64 MB /dev/shm, as on mybinder.org
MEMORY_LIMIT = 1 << 30  # mybinder.org gives 1-2 GB; one notebook's processes must fit in 1 GiB
SETUP_TIMEOUT = 900
NOTEBOOK_TIMEOUT = 600

# Runs inside the Binder venv: executes one notebook on the nbparallel kernel, samples the memory
# (PSS, so shared-memory pages are not counted once per process) of everything it starts, and
# writes what the test checks to a JSON file.
RUNNER = r'''
import json, sys, threading, time
from pathlib import Path

import nbformat, psutil
from nbclient import NotebookClient
from jupyter_client.kernelspec import KernelSpecManager
from nbclient.exceptions import CellExecutionError

path, report = Path(sys.argv[1]), Path(sys.argv[2])
nb = nbformat.read(path, as_version=4)
me = psutil.Process()
peak, done, kernels = [0], threading.Event(), set()

def sample():
    while not done.wait(0.5):
        total = 0
        for p in me.children(recursive=True):
            try:
                total += p.memory_full_info().pss
                argv = p.cmdline()
                if "ipykernel_launcher" in argv:
                    kernels.add(argv[0])  # not exe(): a venv's python is a symlink
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)

threading.Thread(target=sample, daemon=True).start()
client = NotebookClient(nb, timeout=int(sys.argv[3]), kernel_name="nbparallel",
                        resources={"metadata": {"path": str(path.parent)}})
spec = KernelSpecManager().get_kernel_spec("nbparallel")  # the lookup nbclient makes
started, error = time.perf_counter(), None
try:
    client.execute()
except CellExecutionError as exc:
    error = str(exc)[-4000:]
seconds = time.perf_counter() - started
done.set()

def tagged(tag):
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]

def errors(cell):
    return [f"{o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]

report.write_text(json.dumps({
    "seconds": seconds, "error": error, "peak_pss": peak[0], "kernel_python": sorted(kernels),
    "kernel_spec": {"resource_dir": spec.resource_dir, "argv": spec.argv},
    "checks": [{"ran": c.execution_count is not None, "errors": errors(c), "source": c.source}
               for c in tagged("check")],
    "raises": [{"errors": errors(c), "source": c.source} for c in tagged("raises-exception")],
}))
'''


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode:
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout


def _copy_worktree(dest: Path) -> None:
    """Tracked and untracked files of the checkout, without what .gitignore ignores."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        for rel in filter(None, out.decode().split("\0")):
            src = ROOT / rel
            if src.is_file():  # a tracked file deleted in the working tree is not copied
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
            ".hypothesis", "*.executed.ipynb", "*.nbconvert.ipynb"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def binder(tmp_path_factory):
    """A repo copy and a fresh venv built the way repo2docker builds a Binder image."""
    if not (ROOT / "binder" / "requirements.txt").is_file():
        pytest.skip("no binder/ directory (not a source checkout)")
    base = tmp_path_factory.mktemp("binder")
    repo, env_dir, home = base / "repo", base / "venv", base / "home"
    repo.mkdir()
    home.mkdir()
    _copy_worktree(repo)
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    bindir = env_dir / "bin"

    # pip's own settings (index, certificates, proxy) stay: they are how this machine reaches PyPI.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "JUPYTER", "NBPARALLEL_", "CONDA", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', os.defpath)}", VIRTUAL_ENV=str(env_dir),
        PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
        # Only the venv's kernel specs: no per-user spec (a `kernel install --user` of the dev
        # venv would shadow the one postBuild installed) and no config from the developer.
        JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(home / "ipython"), MPLCONFIGDIR=str(home / "mpl"),
    )
    python = str(bindir / "python")
    _run([python, "-m", "pip", "install", "--quiet", "-r", "binder/requirements.txt"],
         repo, env, SETUP_TIMEOUT)

    before = _files(repo)
    post_build = repo / "binder" / "postBuild"
    post_build.chmod(post_build.stat().st_mode | stat.S_IXUSR)  # repo2docker chmods it too
    _run(["./binder/postBuild"], repo, env, SETUP_TIMEOUT)
    left = sorted(_files(repo) - before)
    assert not left, f"postBuild left files in the repository: {left[:10]}"

    runner = base / "run_notebook.py"
    runner.write_text(RUNNER)
    return {"repo": repo, "env": env, "python": python, "bindir": bindir, "runner": runner,
            "base": base}


@pytest.mark.cluster
@pytest.mark.timeout(SETUP_TIMEOUT + 60)
def test_binder_environment(binder):
    """requirements.txt covers nbparallel's dependencies, and the kernel is the venv's."""
    env, python = binder["env"], binder["python"]
    _run([python, "-m", "pip", "check"], binder["repo"], env, 120)
    listed = json.loads(_run([str(binder["bindir"] / "jupyter"), "kernelspec", "list", "--json"],
                             binder["repo"], env, 120))["kernelspecs"]
    assert "nbparallel" in listed, f"postBuild installed no nbparallel kernel: {sorted(listed)}"
    spec = listed["nbparallel"]
    assert Path(spec["resource_dir"]).is_relative_to(binder["base"] / "venv"), spec["resource_dir"]
    assert spec["spec"]["argv"][0] == python, spec["spec"]["argv"]
    # The package came from the copy, not from the checkout this test runs in.
    origin = _run([python, "-c", "import nbparallel; print(nbparallel.__file__)"], binder["base"],
                  env, 60).strip()
    assert Path(origin).is_relative_to(binder["base"] / "venv"), origin


@pytest.mark.cluster
@pytest.mark.timeout(SETUP_TIMEOUT + NOTEBOOK_TIMEOUT + 60)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_binder_notebook(binder, notebook):
    """The notebook runs top to bottom in the Binder environment and every check passes."""
    repo, env = binder["repo"], dict(binder["env"])
    env["NBPARALLEL_SHM_BUDGET"] = BINDER_SHM_BUDGET
    report = binder["base"] / f"{notebook.stem}.json"
    cmd = [binder["python"], str(binder["runner"]), str(repo / "notebooks" / notebook.name),
           str(report), str(NOTEBOOK_TIMEOUT)]
    start = repo / "binder" / "start"
    if start.is_file():  # what Binder runs the notebook server under
        start.chmod(start.stat().st_mode | stat.S_IXUSR)
        cmd = [str(start), *cmd]
    _run(cmd, repo, env, NOTEBOOK_TIMEOUT + 60)
    result = json.loads(report.read_text())
    print(f"{notebook.name}: {result['seconds']:.1f} s, peak memory (PSS) of the kernel and "
          f"engines {result['peak_pss'] / 2**20:.0f} MiB")

    assert result["error"] is None, result["error"]
    venv_dir = binder["base"] / "venv"
    assert Path(result["kernel_spec"]["resource_dir"]).is_relative_to(venv_dir), result["kernel_spec"]
    assert result["kernel_python"] and all(Path(p).is_relative_to(venv_dir)
                                           for p in result["kernel_python"]), result["kernel_python"]
    assert result["checks"], f"{notebook.name} has no code cell tagged 'check'"
    for cell in result["checks"]:
        assert cell["ran"] and not cell["errors"], f"check cell failed: {cell}"
    for cell in result["raises"]:
        assert cell["errors"], f"cell tagged raises-exception did not raise:\n{cell['source']}"
    assert result["peak_pss"] < MEMORY_LIMIT, (
        f"{notebook.name} peaked at {result['peak_pss'] / 2**20:.0f} MiB, more than a Binder "
        f"container can spare")
