"""The notebook in a real browser: JupyterLab, headless Chromium, the nbparallel kernel.

One test starts a JupyterLab server on 127.0.0.1 (a free port, a token, a throwaway root dir and
Jupyter dirs), opens a generated notebook in headless Chromium through Playwright, runs all its
cells on the "nbparallel" kernel (installed into a temporary prefix as README "The kernel" says),
and checks what the page shows:

* while a ~10 s ``%%pmap`` runs, the live dashboard (``.nbp-dashboard``) changes at least
  ``MIN_MUTATIONS`` times, over more than a second (a MutationObserver installed before the page
  loads counts the DOM changes inside it between two markers the notebook prints);
* a pipeline run of about a second gets its own dashboard; its final ``.nbp-summary`` (the last in
  the page) shows the engine count and the bytes that run moved, as the notebook's last cell
  prints them from ``pool.transfers`` (the ``TELEMETRY`` line, read back from the rendered output).

A screenshot is saved to ``$NBP_ARTIFACTS/dashboard.png`` (else into the test's tmp_path) and, with
``NBP_UPDATE_SCREENSHOT=1``, copied to ``docs/dashboard.png`` for the README.

Needs Playwright's Python package and a Chromium binary (Debian: ``apt-get install chromium``;
``NBP_CHROMIUM=/path`` picks another); no ``playwright install`` download. Skipped when either is
missing; ``.ci/run`` installs both.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.cluster, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "browser.ipynb"
KERNEL_NAME = "nbparallel"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

SERVER_START_TIMEOUT = 60.0   # JupyterLab answering /api/status
KERNEL_READY_TIMEOUT = 60.0   # the notebook open and its nbparallel kernel idle
RUN_ALL_TIMEOUT = 120.0       # every cell executed
SUMMARY_TIMEOUT = 10.0        # the dashboard catching up with the last transfers
GONE_TIMEOUT = 20.0           # kernel, controller and engines gone after shutdown

PMAP_ITEMS, PMAP_SLEEP = 400, 0.05   # 400 x 50 ms on 2 engines: about 10 s of %%pmap
MIN_MUTATIONS = 5
MIN_MUTATION_SPAN_S = 1.0

# Per-task debug lines ipyparallel's controller and engines write into the kernel's (so the
# server's) log: hundreds per %%pmap, left out of the log tail printed on failure.
NOISE = re.compile(r"task::task|queue::(request|client)|Handling apply_request")

# Markers are printed as concatenations, so the cell sources shown in the editor never contain
# them and only the rendered outputs do.
START, END, TELEMETRY = "NBP-BROWSER-PMAP-START", "NBP-BROWSER-PMAP-END", "TELEMETRY"
TRAIN_START, TRAIN_END = "NBP-BROWSER-TRAIN-START", "NBP-BROWSER-TRAIN-END"
MIN_CHART_CHANGES = 3  # distinct busy-share charts drawn while the ~10 s %%pmap ran
MIN_TRAIN_CHART_CHANGES = 2  # ... and while the ~3 s training step ran


def _split(marker: str) -> str:
    half = len(marker) // 2
    return f"{marker[:half]!r} + {marker[half:]!r}"


CELLS = [
    "%nbp start -n 2",
    f"print({_split(START)})",
    f"%%pmap x in range({PMAP_ITEMS}) -> slow\nimport time\ntime.sleep({PMAP_SLEEP})\nx * x",
    f"assert slow == [x * x for x in range({PMAP_ITEMS})]\nprint({_split(END)})",
    # A training step slow enough (8 x 0.25 s forward, 8 x 0.1 s backward) for its dashboard's
    # charts to move on a few times, with activations large enough (800 KB) to go engine to
    # engine through shared memory.
    "%%stage double1 --engine 0\nimport time\ndef forward(x, ctx):\n    time.sleep(0.25)\n"
    "    return x * 2\ndef backward(g, ctx):\n    time.sleep(0.1)\n    return g * 2",
    "%%stage double2 --engine 1\nimport numpy as np\ndef forward(x, ctx):\n    return x * 2\n"
    "def backward(g, ctx):\n    return g * 2\ndef loss(y, t):\n"
    "    return float((y - t).sum()), np.ones_like(y)",
    "import numpy as np, nbparallel\nX = np.ones((16, 50_000))\n"
    "cursor = nbparallel.current().transfers.cursor",
    f"print({_split(TRAIN_START)})",
    "%pipeline train --input X --target X --microbatches 8 --out L",
    f"assert L == [float(16 * 50_000 * 3)], L\nprint({_split(TRAIN_END)})",
    # What the pipeline run's dashboard must show: the engines and the bytes of that run.
    ("p = nbparallel.current()\n"
     f"print({_split(TELEMETRY)}, len(p.ids), sum(t.nbytes for t in p.transfers.since(cursor)[0]))"),
    # Last: the monitor in a side panel beside the notebook (sidecar).
    "%nbp monitor --side",
]

# Runs before any page script: counts DOM mutations inside .nbp-dashboard elements (or adding or
# removing one), and notes in
# which phase they happened. The phase moves to "pmap" when the START marker is rendered in an
# output area and to "after" when END is; DOM updates follow the kernel's message order, so the
# "pmap" phase is exactly the %%pmap cell's run as the page saw it.
OBSERVER_JS = """
(() => {
  const S = window.__nbp = {phase: "before", total: 0, during: 0, times: [], markers: {},
                           charts: {pmap: [], train: []}};
  // The busy-share charts of the newest dashboard in the notebook, as their path data.
  const charts = () => {
    const all = document.querySelectorAll(".jp-Notebook .nbp-history");
    const svg = all[all.length - 1];
    return svg ? Array.from(svg.querySelectorAll("path.nbp-busy")).map((p) => p.getAttribute("d")).join("|") : "";
  };
  const noteChart = (phase) => {
    const d = charts(), seen = S.charts[phase];
    if (d && !seen.includes(d) && seen.length < 200) seen.push(d);
  };
  const inDashboard = (node) => {
    const el = node && (node.nodeType === 1 ? node : node.parentElement);
    return !!(el && el.closest && el.closest(".nbp-dashboard"));
  };
  // A dashboard re-rendered whole (an HTML widget's value set again) replaces its root element:
  // the record's target is then the container, and the dashboard is among the nodes it moved.
  const holdsDashboard = (nodes) => Array.from(nodes).some((n) => n.nodeType === 1
    && (n.matches(".nbp-dashboard") || !!n.querySelector(".nbp-dashboard")));
  const touchesDashboard = (r) => inDashboard(r.target)
    || (r.type === "childList" && (holdsDashboard(r.addedNodes) || holdsDashboard(r.removedNodes)));
  const marker = (text, name) => {
    if (!S.markers[name] && text && text.includes(name)) {
      S.markers[name] = performance.now();
      return true;
    }
    return false;
  };
  const observer = new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (el && el.closest && el.closest(".jp-OutputArea")) {
        const nodes = r.type === "characterData" ? [r.target] : Array.from(r.addedNodes);
        for (const n of nodes) {
          if (S.phase === "before" && marker(n.textContent, "%START%")) S.phase = "pmap";
          if (S.phase === "pmap" && marker(n.textContent, "%END%")) S.phase = "after";
          if (S.phase === "after" && marker(n.textContent, "%TRAIN_START%")) S.phase = "train";
          if (S.phase === "train" && marker(n.textContent, "%TRAIN_END%")) S.phase = "done";
        }
      }
      if (touchesDashboard(r)) {
        S.total += 1;
        if (S.phase === "pmap") { S.during += 1; S.times.push(performance.now()); }
        if (S.phase === "pmap" || S.phase === "train") noteChart(S.phase);
      }
    }
  });
  observer.observe(document, {subtree: true, childList: true, attributes: true,
                              characterData: true});
})();
""".replace("%START%", START).replace("%END%", END).replace(
    "%TRAIN_START%", TRAIN_START).replace("%TRAIN_END%", TRAIN_END)

# JupyterLab state read through window.jupyterapp (the server runs with expose_app_in_browser).
KERNEL_STATUS_JS = """
() => {
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  const ctx = w && w.sessionContext;
  if (!ctx || !w.content || !w.content.model) return "no notebook yet";
  const kernel = ctx.session && ctx.session.kernel;
  if (!kernel) return "no kernel yet";
  return kernel.name + ":" + kernel.status;
}
"""

RUN_ALL_JS = """
() => {
  const app = window.jupyterapp;
  window.__nbpRun = {done: false, result: null, error: null};
  app.commands.execute("notebook:run-all-cells").then(
    (r) => { window.__nbpRun.done = true; window.__nbpRun.result = r; },
    (e) => { window.__nbpRun.done = true; window.__nbpRun.error = String(e); });
}
"""

CELLS_JS = """
() => {
  const w = window.jupyterapp.shell.currentWidget;
  const out = [];
  for (const cell of w.content.widgets) {
    const m = cell.model;
    if (m.type !== "code") continue;
    out.push({source: m.sharedModel.getSource(), count: m.executionCount,
              outputs: m.outputs.toJSON()});
  }
  return out;
}
"""

SUMMARY_JS = """
() => {
  const all = document.querySelectorAll(".jp-Notebook .nbp-summary");
  const s = all[all.length - 1];
  return s ? {engines: s.getAttribute("data-engines"), bytes: s.getAttribute("data-bytes"),
              count: all.length, text: s.textContent} : null;
}
"""


# -- skips ----------------------------------------------------------------------------------------
def _chromium() -> str:
    override = os.environ.get("NBP_CHROMIUM")
    if override:
        if not os.access(override, os.X_OK):
            pytest.fail(f"NBP_CHROMIUM={override} is not an executable")
        return override
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    _skip_or_fail("no Chromium at /usr/bin/chromium (Debian: apt-get install chromium; "
                  "or set NBP_CHROMIUM=/path/to/chrome)")


def _sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


def _skip_or_fail(reason: str) -> None:
    # CI (.ci/run) installs both, so there a missing one is a broken set-up, not a reason to skip.
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


# -- the JupyterLab server -----------------------------------------------------------------------
@dataclass
class Lab:
    proc: subprocess.Popen
    url: str
    token: str
    root: Path
    log: Path
    # Everything it spawned, noted while alive; psutil checks identity, so a reused pid is safe.
    spawned: dict[int, psutil.Process] = field(default_factory=dict)

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def note_children(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            self.spawned.setdefault(p.pid, p)

    def log_tail(self, lines: int = 60) -> str:
        """The log's last lines, without the controller's and engines' per-task chatter."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no JupyterLab log: {exc})"
        kept = [line for line in text if not NOISE.search(line)]
        return "\n".join(kept[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(config: Path) -> None:
    """User settings in the throwaway config dir: every cell attached, no news prompt."""
    settings = config / "lab" / "user-settings" / "@jupyterlab"
    for ext, name, values in [
        ("notebook-extension", "tracker", {"windowingMode": "none"}),
        ("apputils-extension", "notification",
         {"fetchNews": "false", "checkForUpdates": False}),
    ]:
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(values))


def _install_kernel(prefix: Path) -> Path:
    """`python -m nbparallel kernel install --prefix PREFIX`, as README "The kernel" says."""
    done = subprocess.run([sys.executable, "-m", "nbparallel", "kernel", "install",
                           "--prefix", str(prefix)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kernel install failed:\n{done.stdout}\n{done.stderr}"
    spec = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    assert spec.is_file(), f"kernel install wrote no {spec}:\n{done.stdout}"
    return prefix / "share" / "jupyter"


def _start_lab(tmp_path: Path, root: Path) -> Lab:
    jupyter_path = _install_kernel(tmp_path / "prefix")
    config = tmp_path / "jupyter-config"
    _write_settings(config)
    env = dict(os.environ,
               JUPYTER_PATH=str(jupyter_path),            # first: our nbparallel kernel spec
               JUPYTER_CONFIG_DIR=str(config),
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               PYTHONUNBUFFERED="1")
    token = secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    last_error = ""
    for _attempt in range(3):                        # a free port can be taken before we bind it
        port = _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
                 "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
                 f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                 "--LabApp.expose_app_in_browser=True",
                 "--ServerApp.open_browser=False"],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        lab = Lab(proc, f"http://127.0.0.1:{port}", token, root, log)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                lab.api("GET", "/api/status")
                return lab
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                last_error = str(exc)
                time.sleep(0.25)
        _stop_lab(lab)
    pytest.fail(f"JupyterLab did not answer /api/status ({last_error}); its log:\n"
                f"{Lab(proc, '', '', root, log).log_tail()}")


def _stop_lab(lab: Lab) -> list[str]:
    """Shut the kernels down through the API, then the server's process group; return survivors.

    Shutting a kernel down politely lets nbparallel stop the cluster it started; the server gets
    SIGTERM (then SIGKILL) for its whole process group. Anything it spawned that is still alive
    after GONE_TIMEOUT is killed by pid and reported.
    """
    lab.note_children()
    if lab.proc.poll() is None:
        try:
            for kernel in lab.api("GET", "/api/kernels") or []:
                lab.api("DELETE", f"/api/kernels/{kernel['id']}")
        except (urllib.error.URLError, OSError, ValueError):
            pass
        lab.note_children()
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(lab.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                lab.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    survivors = _wait_gone(list(lab.spawned.values()), GONE_TIMEOUT)
    for p in survivors:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [f"{p.pid} {_cmdline(p)}" for p in survivors]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in alive if running(p)]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:200]
    except psutil.Error:
        return "?"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A running JupyterLab whose root dir holds the test notebook; stopped even on failure."""
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (nbparallel)",
                                 "language": "python"}
    nbformat.write(nb, root / NOTEBOOK)
    server = _start_lab(tmp_path, root)
    try:
        yield server
    finally:
        survivors = _stop_lab(server)
        print(f"--- JupyterLab log ({server.log}), last lines ---\n{server.log_tail()}")
        assert not survivors, ("processes outlived the kernel and server shutdown (killed now):\n"
                               + "\n".join(survivors))


@pytest.fixture
def chromium() -> tuple[str, Any]:
    """The Chromium executable and Playwright's sync_playwright; skips before any server starts."""
    return _chromium(), _sync_playwright()


@pytest.fixture
def page(chromium: tuple[str, Any], lab: Lab) -> Iterator[Any]:
    """A headless Chromium page with the mutation counter installed; closed even on failure."""
    executable, sync_playwright = chromium
    console: list[str] = []
    with sync_playwright() as pw:
        # As root Chromium needs --no-sandbox, which chromium_sandbox=False (the default) adds.
        # Chromium's shared memory goes to /tmp: /dev/shm is small in containers and nbparallel
        # uses it for its segments.
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     chromium_sandbox=False,
                                     args=["--disable-dev-shm-usage", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_init_script(OBSERVER_JS)
            pg = context.new_page()
            pg.on("console", lambda m: console.append(f"console.{m.type}: {m.text}")
                  if m.type in ("error", "warning") else None)
            pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            yield pg
        finally:
            browser.close()
            if console:
                print("--- browser console errors and warnings ---\n" + "\n".join(console[-40:]))


# -- helpers for the test -------------------------------------------------------------------------
def _cell_report(cells: list[dict[str, Any]]) -> str:
    lines = []
    for i, c in enumerate(cells):
        lines.append(f"[{c['count']}] cell {i}: {c['source'].splitlines()[0] if c['source'] else ''}")
        for o in c["outputs"]:
            if o["output_type"] == "error":
                lines.append(f"    ERROR {o['ename']}: {o['evalue']}")
            elif o["output_type"] == "stream":
                text = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                lines.append("    " + text.strip().replace("\n", "\n    ")[-400:])
            else:
                lines.append(f"    ({o['output_type']}: {sorted(o.get('data', {}))})")
    return "\n".join(lines)


def _wait(page: Any, js: str, timeout: float, what: Callable[[], str], lab: Lab) -> Any:
    """Poll ``js`` in the page until it returns something truthy; fail with ``what()`` if not."""
    from playwright.sync_api import Error as PlaywrightError  # its TimeoutError is one too

    try:
        return page.wait_for_function(js, timeout=timeout * 1000, polling=250).json_value()
    except PlaywrightError as exc:
        try:
            message = what()
        except PlaywrightError as again:
            message = f"(and the page could not be read: {again})"
        pytest.fail(f"{message}\n(after {timeout:.0f} s: {exc})\n--- JupyterLab log ---\n"
                    f"{lab.log_tail(30)}")


def _save_screenshot(page: Any, tmp_path: Path) -> Path:
    directory = Path(os.environ.get("NBP_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    page.evaluate("""() => {
        const app = window.jupyterapp;
        app.shell.collapseLeft(); app.shell.collapseRight();
        const all = document.querySelectorAll(".jp-Notebook .nbp-dashboard");
        const target = all.length ? all[all.length - 1]  // the training run's, with its timeline
            : document.querySelectorAll(".jp-Notebook .jp-Cell")[2];
        if (target) target.scrollIntoView({block: "center"});
    }""")
    page.wait_for_timeout(500)
    path = directory / "dashboard.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def _save_side_screenshot(page: Any, tmp_path: Path) -> Path:
    directory = Path(os.environ.get("NBP_ARTIFACTS") or tmp_path)
    page.wait_for_timeout(500)
    path = directory / "dashboard-side.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


# -- the test -------------------------------------------------------------------------------------
def test_dashboard_in_jupyterlab(page: Any, lab: Lab, tmp_path: Path) -> None:
    t0 = time.monotonic()
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?reset&token={lab.token}",
              wait_until="domcontentloaded", timeout=60_000)
    _wait(page, "() => !!(window.jupyterapp && window.jupyterapp.shell)", KERNEL_READY_TIMEOUT,
          lambda: "JupyterLab did not start in the page (no window.jupyterapp)", lab)
    status = _wait(page, f"""() => {{
        const s = ({KERNEL_STATUS_JS})();
        return s === "{KERNEL_NAME}:idle" ? s : false;
    }}""", KERNEL_READY_TIMEOUT,
        lambda: f"the notebook's {KERNEL_NAME!r} kernel did not become idle "
                f"(last: {page.evaluate(KERNEL_STATUS_JS)!r})", lab)
    lab.note_children()
    print(f"kernel {status} after {time.monotonic() - t0:.1f} s")

    page.evaluate(RUN_ALL_JS)
    _wait(page, "() => window.__nbpRun && window.__nbpRun.done", RUN_ALL_TIMEOUT,
          lambda: "Run All Cells did not finish; the cells so far:\n"
                  + _cell_report(page.evaluate(CELLS_JS)), lab)
    lab.note_children()
    run = page.evaluate("() => window.__nbpRun")
    cells = page.evaluate(CELLS_JS)
    print(f"all cells ran after {time.monotonic() - t0:.1f} s\n{_cell_report(cells)}")
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert run["error"] is None and not errors and all(c["count"] for c in cells), (
        f"not every cell ran cleanly (run-all: {run}):\n{_cell_report(cells)}")

    # The TELEMETRY line as the page rendered it.
    rendered = page.locator(".jp-OutputArea-output", has_text=TELEMETRY).last.inner_text()
    match = re.search(rf"{TELEMETRY} (\d+) (\d+)", rendered)
    assert match, f"no '{TELEMETRY} <engines> <bytes>' line in the rendered output: {rendered!r}"
    engines, nbytes = match.group(1), match.group(2)
    assert engines == "2", f"the notebook asked for 2 engines, TELEMETRY says {engines}"

    observed = page.evaluate("() => window.__nbp")
    dashboards = page.locator(".nbp-dashboard").count()
    screenshot = _save_screenshot(page, tmp_path)
    if dashboards and os.environ.get("NBP_UPDATE_SCREENSHOT") == "1":
        docs = REPO / "docs" / "dashboard.png"
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, docs)
        print(f"screenshot copied to {docs}")
    print(f"markers seen: {sorted(observed['markers'])}; dashboard mutations: "
          f"{observed['during']} during the %%pmap, {observed['total']} in all; "
          f"{dashboards} .nbp-dashboard elements; TELEMETRY {engines} engines {nbytes} bytes; "
          f"{time.monotonic() - t0:.1f} s")
    assert set(observed["markers"]) == {START, END, TRAIN_START, TRAIN_END}, (
        f"the page never rendered the %%pmap markers (saw {sorted(observed['markers'])})")

    # -- the dashboard ---------------------------------------------------------------------------
    assert dashboards, ("no .nbp-dashboard element appeared in the page after running "
                        f"%%pmap and %pipeline run (screenshot: {screenshot})")
    times = observed["times"]
    span = (times[-1] - times[0]) / 1000 if times else 0.0
    assert observed["during"] >= MIN_MUTATIONS, (
        f"the dashboard changed {observed['during']} times while the ~10 s %%pmap ran "
        f"(want at least {MIN_MUTATIONS}; {observed['total']} changes in all): it is not live")
    assert span >= MIN_MUTATION_SPAN_S, (
        f"the dashboard's {observed['during']} changes during the %%pmap all came within "
        f"{span:.2f} s (want them spread over at least {MIN_MUTATION_SPAN_S} s): not live")

    # -- the charts over time move while the work goes on ------------------------------------
    charts = observed["charts"]
    assert len(charts["pmap"]) >= MIN_CHART_CHANGES, (
        f"the busy-share chart (.nbp-history path.nbp-busy) took {len(charts['pmap'])} "
        f"different shapes while the ~10 s %%pmap ran (want at least {MIN_CHART_CHANGES})")
    assert len(charts["train"]) >= MIN_TRAIN_CHART_CHANGES, (
        f"the busy-share chart took {len(charts['train'])} different shapes while the ~3 s "
        f"training step ran (want at least {MIN_TRAIN_CHART_CHANGES})")

    # -- %nbp monitor --side: the monitor in a JupyterLab side panel -----------------------------
    _wait(page, "() => !!document.querySelector('.jupyterlab-sidecar .nbp-dashboard')", 20.0,
          lambda: "`%nbp monitor --side` opened no side panel with a dashboard (.jupyterlab-sidecar "
                  ".nbp-dashboard); the cells:\n" + _cell_report(page.evaluate(CELLS_JS)), lab)
    side = page.evaluate("""() => {
        const panel = document.querySelector('.jupyterlab-sidecar');
        const notebook = document.querySelector('.jp-Notebook');
        const a = panel.getBoundingClientRect(), b = notebook.getBoundingClientRect();
        return {left: a.left, notebookRight: b.right, width: a.width,
                history: !!panel.querySelector('.nbp-history')};
    }""")
    assert side["width"] > 200 and side["left"] >= side["notebookRight"] - 5, (
        f"the side panel is not beside the notebook: {side}")
    assert side["history"], "the monitor in the side panel has no charts over time"
    side_shot = _save_side_screenshot(page, tmp_path)
    if os.environ.get("NBP_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(side_shot, REPO / "docs" / "dashboard-side.png")

    summary = page.evaluate(SUMMARY_JS)
    assert summary is not None, "the .nbp-dashboard has no .nbp-summary element"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:  # the dashboard may refresh on a timer: give it a moment to catch up
        page.wait_for_function(
            f"""() => {{ const s = ({SUMMARY_JS})();
                return s && s.engines === "{engines}" && s.bytes === "{nbytes}"; }}""",
            timeout=SUMMARY_TIMEOUT * 1000, polling=250)
    except PlaywrightTimeout:
        pass  # the assert below says what it shows instead
    summary = page.evaluate(SUMMARY_JS)
    assert (summary["engines"], summary["bytes"]) == (engines, nbytes), (
        f"the last .nbp-summary shows data-engines={summary['engines']!r} "
        f"data-bytes={summary['bytes']!r} ({summary['text']!r}); the notebook's telemetry says "
        f"{engines} engines and {nbytes} bytes")
