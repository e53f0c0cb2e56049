"""Every notebook runs under papermill with smoke parameters; committed notebooks are thin and clean.

One smoke study (ETO + coevo, tiny sizes) is run once per session through ``coevo study``'s library
call: it executes 10-run per entry and then every analysis notebook on those runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from coevo_lib import study as study_module
from coevo_lib.analysis.loading import is_finished
from coevo_lib.study import ANALYSIS_NOTEBOOKS, KERNEL_NAME, execute, run_study

NOTEBOOKS = sorted(Path("notebooks").glob("*.ipynb"))
RUN_NOTEBOOK = "10-run.ipynb"
SELF_CONTAINED = {"00-quickstart.ipynb"}  # makes its own smoke run instead of reading runs_root


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def error_outputs(notebook) -> list:
    return [out for cell in code_cells(notebook) for out in cell.get("outputs", []) if out.output_type == "error"]


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"00-quickstart.ipynb", RUN_NOTEBOOK,
                                           *(Path(n).name for n in ANALYSIS_NOTEBOOKS)}


def in_git_checkout() -> bool:
    return subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode == 0


def as_committed(path: Path, as_path: Path | None = None) -> str:
    """What `git add` stores for ``path`` (named ``as_path`` in the tree): the file through the checkout's
    clean filter (nbstripout, installed by `make setup`), so outputs saved in JupyterLab stay local.
    Outside a git checkout, the file itself."""
    if not in_git_checkout():
        return path.read_text()
    blob = subprocess.run(["git", "hash-object", "-w", f"--path={as_path or path}", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    return subprocess.run(["git", "cat-file", "-p", blob], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean_and_thin(path):
    notebook = nbformat.reads(as_committed(path), as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path}: exactly one cell must be tagged 'parameters', found {len(tagged)}"
    for cell in code_cells(notebook):
        assert not cell.outputs and cell.execution_count is None, f"{path}: committed with outputs (strip them)"
        defines = [line for line in cell.source.splitlines() if line.lstrip().startswith(("def ", "class "))]
        assert not defines, f"{path}: logic belongs in coevo_lib, not in notebooks: {defines}"
    assert notebook.metadata.kernelspec.name == KERNEL_NAME


def test_saving_a_notebook_never_dirties_git(tmp_path):
    """A notebook saved with outputs, counts and the kernel's version is committed as the clean one."""
    if not in_git_checkout():
        pytest.skip("not a git checkout: nothing is committed from here")
    attributes = subprocess.run(["git", "check-attr", "filter", "--", *map(str, NOTEBOOKS)], capture_output=True,
                                text=True, check=True).stdout.splitlines()
    assert all(line.endswith(": nbstripout") for line in attributes), attributes
    configured = subprocess.run(["git", "config", "--get", "filter.nbstripout.clean"], capture_output=True)
    assert configured.returncode == 0, "the nbstripout git filter is not installed: run `make setup` (make git-filter)"
    original = NOTEBOOKS[0]
    saved = nbformat.read(original, as_version=4)
    for count, cell in enumerate(code_cells(saved), start=1):
        cell.outputs, cell.execution_count = [nbformat.v4.new_output("stream", text="ran in JupyterLab\n")], count
    saved.metadata["language_info"] = {"name": "python", "version": "3.11.2", "mimetype": "text/x-python"}
    nbformat.write(saved, tmp_path / original.name)
    assert as_committed(tmp_path / original.name, original) == as_committed(original)


@pytest.fixture(scope="session")
def one_torch_thread():
    """Kernels inherit this environment. The tiny model gains nothing from a second intra-op thread, and on a
    shared CPU machine torch's spinning worker threads slow it down many times over."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if previous is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = previous


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory, one_torch_thread) -> Path:
    """ETO and coevo smoke runs through the run notebook, then the analysis notebooks and figures."""
    root = tmp_path_factory.mktemp("smoke-study")
    study = {"name": "smoke", "runs_root": str(root / "runs"), "figures_dir": str(root / "figures"), "smoke": True,
             "entries": [{"recipe": "configs/minishop/eto.yaml"}, {"recipe": "configs/minishop/coevo.yaml"}]}
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    assert run_study(root / "study.yaml") == 0
    return root


@pytest.mark.parametrize("entry", ["eto", "coevo"])
def test_run_notebook_executed_into_its_run_dir(smoke_study, entry):
    run_dir = smoke_study / "runs" / f"{entry}-seed0"
    assert is_finished(run_dir)
    executed = nbformat.read(run_dir / RUN_NOTEBOOK, as_version=4)
    assert not error_outputs(executed)
    shown = [out for cell in code_cells(executed) for out in cell.outputs if out.output_type == "execute_result"]
    assert any("image/png" in out.data for out in shown)  # the learning curves
    assert any("text/html" in out.data for out in shown)  # the tables
    assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in executed.cells)
    # progress under papermill: plain text lines (training steps with the loss, rollouts), never widgets
    outputs = [out for cell in code_cells(executed) if "api.run(" in cell.source for out in cell.outputs]
    stderr = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    # coevo copies the target's first rollout from eto's run of the seed (the shared SFT model's): its failure
    # agent's rollout is the one computed
    rolled = "rollout failure it1 train: 100%" if entry == "coevo" else "rollout target it1 train: 100%"
    assert "target-it1: 100%" in stderr and "loss=" in stderr and rolled in stderr
    widgets = [out["data"].get("text/plain", "") for out in outputs
               if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    # coevo's bars are text here; trl's own reference log-prob bar (tqdm.auto) may still be a widget
    assert not [w for w in widgets if w.startswith(("sft", "rollout", "target-", "failure-"))], widgets


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in SELF_CONTAINED | {RUN_NOTEBOOK}],
                         ids=lambda p: p.stem)
def test_analysis_notebook_executed_on_the_smoke_runs(smoke_study, path):
    executed_path = smoke_study / "runs" / path.name
    if not executed_path.exists():  # a notebook the study does not list: execute it here
        execute(path.resolve(), executed_path, {"runs_root": str(smoke_study / "runs")})
    assert not error_outputs(nbformat.read(executed_path, as_version=4))


def test_results_notebook_sets_a_tiny_study_beside_its_runs(smoke_study, tmp_path):
    """Notebook 40's last section with tiny_runs_root given (here the smoke runs on both sides: its table's code
    path, not a comparison worth reading)."""
    runs = str(smoke_study / "runs")
    output = tmp_path / "40-results.ipynb"
    execute(Path("notebooks/40-results.ipynb").resolve(), output, {"runs_root": runs, "tiny_runs_root": runs})
    executed = nbformat.read(output, as_version=4)
    assert not error_outputs(executed)
    shown = "".join(out.get("data", {}).get("text/markdown", "")
                    for cell in code_cells(executed) for out in cell.outputs)
    assert "# What changed from the tiny model" in shown
    assert "| coevo/failure hard negative % of rollouts | it1 |" in shown


def test_boundary_work_shared_between_runs_and_processes_equals_each_run_scored_alone(smoke_study, tmp_path):
    from coevo_lib.analysis import boundary
    from coevo_lib.analysis.loading import BOUNDARY_FILE, require_runs

    root = tmp_path / "runs"
    shutil.copytree(smoke_study / "runs", root, symlinks=True)
    # A third run with its own SFT model (no shared_sft marker), so that two processes get one model each.
    shutil.copytree(root / "coevo-seed0", root / "coevo-own-sft", symlinks=True)
    marker = root / "coevo-own-sft" / "stages" / "sft.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "shared_sft"}))
    runs = require_runs(root)
    assert [len(batch) for batch in boundary.worker_batches(runs, 2)] == [2, 1]  # eto + coevo share an SFT model
    alone = {}
    for run in runs:  # no shared work: each run gathers its negatives and scores its SFT model itself
        boundary.compute_boundary(run, pool=runs, force=True, max_negatives=20)
        alone[run.name] = pd.read_json(run / BOUNDARY_FILE, lines=True)
    boundary.compute_boundaries(root, force=True, max_negatives=20, workers=2)
    for run in runs:
        shared = pd.read_json(run / BOUNDARY_FILE, lines=True)
        assert len(shared) > 0
        pd.testing.assert_frame_equal(shared, alone[run.name], rtol=1e-5)  # thread counts reorder float sums


def test_boundary_cache_is_scored_again_when_the_pool_grows(smoke_study, tmp_path):
    """A study run in parts: eto's margins scored while it is alone, then coevo's run joins the pool."""
    from coevo_lib.analysis import boundary
    from coevo_lib.analysis.loading import BOUNDARY_FILE

    root = tmp_path / "runs"
    shutil.copytree(smoke_study / "runs", root, symlinks=True)
    eto = root / "eto-seed0" / BOUNDARY_FILE
    meta = eto.with_suffix(".json")

    def pool_of_eto() -> list[str]:
        return json.loads(meta.read_text())["inputs"]["pool"]

    boundary.compute_boundaries(root, force=True, max_negatives=20, methods=["eto"])
    assert pool_of_eto() == ["eto-seed0"]
    written = eto.stat().st_mtime_ns
    boundary.compute_boundaries(root, max_negatives=20, methods=["eto"])  # same pool: the cache holds
    assert eto.stat().st_mtime_ns == written
    boundary.compute_boundaries(root, max_negatives=20)  # coevo joins: eto's file is stale
    assert pool_of_eto() == ["coevo-seed0", "eto-seed0"]
    assert set(pd.read_json(eto, lines=True)["negative_run"]) >= {"coevo-seed0"}
    boundary.compute_boundaries(root, max_negatives=30)  # another cap: stale too
    assert json.loads(meta.read_text())["inputs"]["max_negatives"] == 30


def test_boundary_margins_and_figures_written(smoke_study):
    for entry in ("eto", "coevo"):
        assert (smoke_study / "runs" / f"{entry}-seed0" / "analysis" / "boundary.jsonl").stat().st_size > 0
    figures = smoke_study / "figures" / "runs"
    assert (figures / "README.md").exists() and (figures / "preference_accuracy.png").exists()


def test_quickstart_notebook(tmp_path, one_torch_thread):
    output = tmp_path / "00-quickstart.ipynb"
    execute(Path("notebooks/00-quickstart.ipynb").resolve(), output,
            {"run_dir": str(tmp_path / "quickstart"), "smoke": True})
    assert is_finished(tmp_path / "quickstart")
    assert not error_outputs(nbformat.read(output, as_version=4))


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in SELF_CONTAINED | {RUN_NOTEBOOK}],
                         ids=lambda p: p.stem)
def test_analysis_notebook_without_runs_stops_at_the_one_line_message(tmp_path, path, one_torch_thread):
    """A fresh clone has no runs: each analysis notebook stops with NoRunsError (shown as one line), not a traceback."""
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as failure:
        execute(path.resolve(), tmp_path / path.name, {"runs_root": str(tmp_path / "no-runs")})
    assert failure.value.ename == "NoRunsError" and "no finished runs under" in failure.value.evalue
    assert not (tmp_path / "no-runs").exists()


def dying_kernel(tmp_path: Path, monkeypatch, deaths: int) -> Path:
    """A kernelspec, made the runner's kernel, whose first ``deaths`` kernels exit before they answer (as one
    that cannot bind its sockets does); the ones after are ipykernel. Returns the file counting the starts."""
    starts = tmp_path / "kernel-starts"
    launcher = tmp_path / "dying_kernel.py"
    launcher.write_text(f"import runpy, sys\nfrom pathlib import Path\nstarts = Path({str(starts)!r})\n"
                        "with starts.open('a') as log:\n    log.write('start\\n')\n"
                        f"if len(starts.read_text().splitlines()) <= {deaths}:\n    sys.exit(3)\n"
                        "runpy.run_module('ipykernel_launcher', run_name='__main__')\n")
    spec = tmp_path / "jupyter" / "kernels" / "dying"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(launcher), "-f", "{connection_file}"],
                                                  "display_name": "dying", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setattr(study_module, "execution_kernel", lambda: "dying")
    return starts


def printing_notebook(path: Path) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('ran')")])
    notebook.metadata["kernelspec"] = {"name": "dying", "display_name": "dying", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_a_kernel_that_dies_before_answering_is_replaced_and_counted(tmp_path, monkeypatch, caplog):
    """CI lost a whole study to one kernel that never answered; no cell had run, so another kernel can run it."""
    starts = dying_kernel(tmp_path, monkeypatch, deaths=1)
    assert execute(printing_notebook(tmp_path / "n.ipynb"), tmp_path / "out.ipynb", {}) == 1
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0].text == "ran\n"
    assert starts.read_text().count("start") == 2
    assert "its kernel did not start" in caplog.text and "retry 1 of 2" in caplog.text


def test_a_run_whose_kernels_never_start_fails_alone_with_the_kernels_error(tmp_path, monkeypatch, capsys):
    starts = dying_kernel(tmp_path, monkeypatch, deaths=99)
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "runs_root": str(tmp_path / "runs"), "smoke": True, "analysis": [],
                                     "figures_dir": None, "entries": [{"recipe": "configs/minishop/sft.yaml"}]}))
    assert run_study(study) == 1  # a failure message, not an exception out of the study
    printed = capsys.readouterr()
    assert "Kernel died before replying" in printed.err and "2 notebook kernels did not start" in printed.out
    assert starts.read_text().count("start") == 3  # the first and 2 replacements (KERNEL_START_RETRIES)


@pytest.mark.skipif(os.name == "nt", reason="ZeroMQ has no ipc transport on Windows")
def test_notebook_kernels_listen_on_their_own_unix_sockets_not_tcp_ports(tmp_path):
    """Two study workers starting kernels at once could be handed the same TCP port (CI: "Address already in
    use", then a 60 s wait and a failed run): each kernel listens on Unix sockets in a directory of its own,
    removed when its notebook is done."""
    cell = nbformat.v4.new_code_cell("import json\nfrom ipykernel import get_connection_info\n"
                                     "info = json.loads(get_connection_info())\nprint(info['transport'], info['ip'])")
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_NAME, "language": "python"}
    nbformat.write(notebook, tmp_path / "where.ipynb")
    execute(tmp_path / "where.ipynb", tmp_path / "out.ipynb", {})
    transport, ip = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0].text.split()
    assert transport == "ipc"
    assert Path(ip).parent.name.startswith("coevo-kernel-") and not Path(ip).parent.exists()


def test_notebook_runs_print_no_plain_tcp_warning(tmp_path, capfd):
    """ipykernel warned once per notebook that its sockets run over plain-text TCP (make demo printed it for
    every run): coevo's runner asks jupyter_client for an encrypted kernel, and the warning is gone."""
    parameters = nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})
    notebook = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell("print(x + 1)")])
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_NAME, "language": "python"}
    nbformat.write(notebook, tmp_path / "tiny.ipynb")
    execute(tmp_path / "tiny.ipynb", tmp_path / "out.ipynb", {"x": 5})
    printed = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0].text
    assert printed == "6\n"
    assert "without encryption" not in capfd.readouterr().err  # the kernel process writes to this process's fd 2
