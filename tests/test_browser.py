"""JupyterLab in headless Chromium, as a user meets it (`make test-browser`; skipped by plain `pytest`).

JupyterLab runs from .venv on a free port with a token; Debian's chromium (scripts/ensure_chromium.sh)
opens 00-quickstart, parameterised with smoke sizes the way papermill does it, on the `coevo` kernel,
runs all cells and saves. Checked: no error output, progress bars drawn as widgets, no LaTeX typeset
inside the rendered episodes (their observations carry dollar prices), and a tracked notebook run and
saved in the lab leaves `git status` as it was (the nbstripout filter). Screenshots are written to
.cache/test-artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from coevo_lib.analysis.loading import project_root
from coevo_lib.jupyter_hooks import refresh_git_index

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# The closed network here: no QUIC, no first-run, no background fetches; a fresh profile per run.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = project_root() / ".cache" / "test-artifacts" / "browser"
# JupyterLab, its kernel and Chromium share 2 cores here: generous limits, no timing asserts.
LOAD_TIMEOUT_MS = 300_000
RUN_TIMEOUT_S = 1_200
KERNEL_DISPLAY_NAME = "coevo (.venv)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server from .venv over the project root; yields its base URL and token."""
    state = tmp_path_factory.mktemp("jupyter-state")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "OMP_NUM_THREADS": "1"}
    env.pop("COEVO_PROGRESS", None)  # the lab's kernels decide: widgets
    command = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root",
               f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={project_root()}", "--LabApp.expose_app_in_browser=True",
               "--ContentsManager.allow_hidden=True",  # the smoke copy lives under .cache/ (ignored by git)
               f"--LabApp.workspaces_dir={state / 'workspaces'}", f"--LabApp.user_settings_dir={state / 'settings'}"]
    news = state / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the screenshots
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "jupyterlab.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}", token
        finally:
            server.terminate()
            server.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(lab):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="make test-browser installs the browser extra")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium`")
    with playwright_api.sync_playwright() as playwright:
        profile = ARTIFACTS / "profile"
        subprocess.run(["rm", "-rf", str(profile)], check=True)
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1800})
        try:
            yield context
        finally:
            context.close()


def open_notebook(context, lab, relative_path: str):
    """A page showing the notebook in JupyterLab, its kernel started and idle."""
    base, token = lab
    page = context.new_page()
    deadline = time.time() + LOAD_TIMEOUT_MS / 1000
    while True:  # the server may still be starting
        try:
            # reset: a fresh workspace, so the notebook opened before is not restored as the current tab
            page.goto(f"{base}/lab/tree/{relative_path}?reset&token={token}", timeout=LOAD_TIMEOUT_MS)
            break
        except Exception:  # noqa: BLE001 - connection refused until the server listens
            if time.time() > deadline:
                raise
            time.sleep(2)
    page.wait_for_function("window.jupyterapp !== undefined", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function(KERNEL_IDLE, timeout=LOAD_TIMEOUT_MS)
    return page


# The current notebook's kernel session is up and idle.
KERNEL_IDLE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session
                 && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle';
}"""
# Every code cell has run: an execution count and no pending "[*]".
ALL_RUN = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const busy = document.querySelectorAll('.jp-Notebook .jp-InputArea-prompt');
  const pending = Array.from(busy).some(p => p.textContent.includes('*'));
  return !pending && cells.every(c => c.model.executionCount !== null)
         && panel.sessionContext.session.kernel.status === 'idle';
}"""
STOPPED_ON_ERROR = """() => document.querySelectorAll('.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]')
  .length > 0 && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'"""


def run_all_and_save(page, stop_on_error: bool = False) -> None:
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    done = ALL_RUN if not stop_on_error else f"() => ({ALL_RUN})() || ({STOPPED_ON_ERROR})()"
    page.wait_for_function(done, timeout=RUN_TIMEOUT_S * 1000, polling=2000)
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=60_000)


def smoke_quickstart(tmp_run_dir: Path) -> Path:
    """00-quickstart with smoke parameters injected as papermill does, saved under the ignored .cache/."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(load_notebook_node(str(project_root() / "notebooks" / "00-quickstart.ipynb")),
                                     {"smoke": True, "run_dir": str(tmp_run_dir)})
    path = ARTIFACTS / "00-quickstart-smoke.ipynb"
    nbformat.write(notebook, path)
    return path


def error_outputs(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    return [f"{out['ename']}: {out['evalue']}" for cell in notebook["cells"] if cell["cell_type"] == "code"
            for out in cell.get("outputs", []) if out["output_type"] == "error"]


def test_quickstart_runs_in_jupyterlab(browser, lab, tmp_path):
    path = smoke_quickstart(tmp_path / "quickstart")
    page = open_notebook(browser, lab, str(path.relative_to(project_root())))
    assert page.locator(".jp-KernelName").first.inner_text().strip() == KERNEL_DISPLAY_NAME
    run_all_and_save(page)
    assert error_outputs(path) == []
    # live progress: tqdm's widget bars (training steps with the loss, evaluation episodes)
    bars = page.locator(".jp-OutputArea-output .widget-hprogress")
    assert bars.count() >= 3
    bars.first.scroll_into_view_if_needed()
    assert bars.first.is_visible()
    labels = " ".join(page.locator(".jp-OutputArea-output .widget-hbox").all_inner_texts())
    assert "sft" in labels and "loss=" in labels and "eval-test_seen" in labels
    # episodes render as written: dollar prices shown, nothing typeset as LaTeX
    episodes = page.locator('.jp-OutputArea-output[data-mime-type="text/markdown"]')
    assert episodes.count() >= 2
    text = " ".join(episodes.all_inner_texts())
    assert "$" in text and "Expert" in text
    typeset = page.locator(".jp-OutputArea-output:has(:is(mjx-container, .MathJax, .MathJax_Display))")
    assert typeset.count() == 0, f"LaTeX typeset in outputs: {typeset.all_inner_texts()}"
    episodes.first.scroll_into_view_if_needed()  # the expert episode, then the bars below it
    page.screenshot(path=str(ARTIFACTS / "00-quickstart.png"))


def git_status(path: str, refresh: bool = False) -> str:
    """`git status` of one path as a user sees it; ``refresh`` first brings the index's stat data up to date
    (a file rewritten with the same content would otherwise count as modified)."""
    if refresh:
        subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=project_root(), capture_output=True)
    return subprocess.run(["git", "status", "--porcelain", "--", path], cwd=project_root(), capture_output=True,
                          text=True, check=True).stdout


def test_saving_a_tracked_notebook_keeps_git_clean(browser, lab):
    """40-results run and saved in the lab: outputs land on disk, not in git (the nbstripout filter, and the
    post-save hook that refreshes git's index: coevo_lib.jupyter_hooks)."""
    notebook = "notebooks/40-results.ipynb"
    path = project_root() / notebook
    before, original = git_status(notebook, refresh=True), path.read_bytes()
    try:
        page = open_notebook(browser, lab, notebook)
        run_all_and_save(page, stop_on_error=True)
        page.screenshot(path=str(ARTIFACTS / "40-results.png"))
        saved = json.loads(path.read_text())
        assert any(cell.get("outputs") for cell in saved["cells"]), "the saved notebook should hold outputs"
        assert git_status(notebook) == before
        errors = error_outputs(path)
        # without runs/demo the notebook stops at the one-line NoRunsError, never a traceback
        assert len(errors) <= 1 and all(e.startswith("NoRunsError") for e in errors), errors
    finally:
        path.write_bytes(original)  # the working copy as it was
        refresh_git_index({"type": "notebook"}, str(path))  # and git's record of its size
