"""The study runner: a failing entry is reported with its run and notebook, the others finish, reruns skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from coevo_lib import study as study_module
from coevo_lib.analysis.loading import is_finished, resolve_path
from coevo_lib.config import ConfigError
from coevo_lib.study import SMOKE_OVERRIDES, load_study, plan, run_overrides, run_study, study_runs_root


def write_study(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def test_run_overrides_precedence():
    merged = run_overrides({"sft.epochs": 3, "seed": 9}, seed=2, smoke=True)
    assert merged["sft.epochs"] == 3 and merged["seed"] == 2  # smoke < given overrides < seed
    assert merged["rollout.max_tasks"] == SMOKE_OVERRIDES["rollout.max_tasks"]
    assert run_overrides({}, seed=0, smoke=False) == {"seed": 0}


def test_plan_expands_entries_and_seeds(tmp_path):
    study = load_study(write_study(
        tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"), seeds=[0, 1], overrides={"sft.epochs": 1},
        entries=[{"recipe": "configs/minishop/sft.yaml"},
                 {"name": "hot", "recipe": "configs/minishop/eto.yaml", "seeds": [5], "overrides": {"sft.epochs": 2}}]))
    runs = plan(study)
    assert [(r.entry, r.seed, r.run_dir.name) for r in runs] == [
        ("sft", 0, "sft-seed0"), ("sft", 1, "sft-seed1"), ("hot", 5, "hot-seed5")]
    assert runs[0].overrides == {"sft.epochs": 1} and runs[2].overrides == {"sft.epochs": 2}
    assert runs[0].recipe.is_absolute() and runs[0].run_dir.parent == tmp_path / "runs"


@pytest.mark.parametrize("fields, message", [
    ({"name": "s", "entries": [{"recipe": "x.yaml"}], "seedz": [1]}, "unknown config key 'seedz'"),
    ({"entries": [{"recipe": "x.yaml"}]}, "'name' is required"),
    ({"name": "s", "entries": []}, "at least one recipe"),
    ({"name": "s", "entries": [{"recipe": "a/x.yaml"}, {"recipe": "b/x.yaml"}]}, "unique"),
    ({"name": "s", "entries": [{"name": "x"}]}, r"entries\[0\].recipe is required"),
    ({"name": "s", "entries": [{"recipe": "x.yaml"}], "workers": 0}, "workers must be >= 1, got 0"),
])
def test_bad_study_files_name_the_problem(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path / "s.yaml", **fields))


def test_study_files_in_the_repo_load():
    for path in sorted(Path("configs/studies").glob("*.yaml")):
        study = load_study(path)
        assert all(run.recipe.is_file() for run in plan(study)), path
    assert {e.name for e in load_study("configs/studies/demo.yaml").entries} == {
        "sft", "eto", "coevo", "coevo_frozen_failure", "positive_agent"}
    # Every method recipe is in the full study; base and the quickstart's small SFT recipe are not methods.
    methods = [p for p in Path("configs/minishop").glob("*.yaml") if p.stem not in ("base", "quickstart")]
    assert len(plan(load_study("configs/studies/minishop.yaml"))) == 3 * len(methods)


def test_results_and_sensitivity_studies_agree_on_their_shared_settings():
    # The sweep pairs its variants with the results study's runs in the same runs_root: same sizes, same SFT.
    results, sweep = load_study("configs/studies/results.yaml"), load_study("configs/studies/sensitivity.yaml")
    assert results.runs_root == sweep.runs_root and results.overrides == sweep.overrides
    # SRLM and Agent-R: the same settings and the results study's recipes for the methods both run, but their
    # own runs root, so that drawing them never redraws figures/results/ without its ablation rows.
    baselines = load_study("configs/studies/baselines.yaml")
    assert results.overrides == baselines.overrides
    assert study_runs_root(baselines).name == "baselines" != study_runs_root(results).name
    recipes = {entry.name: (entry.recipe, entry.overrides) for entry in results.entries}
    shared = [entry for entry in baselines.entries if entry.name in recipes]
    assert {e.name for e in shared} >= {"sft", "eto", "eto_sft", "coevo"}
    assert all((e.recipe, e.overrides) == recipes[e.name] for e in shared)
    assert len(results.seeds) >= 5 and results.overrides["rollout.samples_per_task"] > 1


def makefile_parts(prefix: str) -> dict[str, list[str]]:
    """Make targets named ``prefix``-<part> and the entries their --only flags pick."""
    parts, target = {}, None
    for line in Path("Makefile").read_text().splitlines():
        if line.startswith(f"{prefix}-") and ":" in line:
            target = line.split(":")[0]
        elif target and line.startswith("\t"):
            only = re.findall(r"--only (\S+)", line)
            if only:
                parts[target] = only
            target = None
    return parts


def test_smollm2_study_runs_in_named_parts_that_hold_every_entry_once_in_order():
    study, results = load_study("configs/studies/smollm2.yaml"), load_study("configs/studies/results.yaml")
    names = [entry.name for entry in study.entries]
    assert names[:3] == ["sft", "eto_sft", "coevo"]  # the core comparison first: a study cut short holds it
    assert all(entry.recipe.startswith("configs/smollm2/") for entry in study.entries)
    # its own runs and figures folder (figures are drawn into <figures_dir>/<runs_root's folder name>)
    assert study_runs_root(study).name == "smollm2" != study_runs_root(results).name
    assert study.tiny_runs_root == results.runs_root and len(study.seeds) >= 3 and study.workers == 1
    same = ("env.kwargs.max_steps", "env.kwargs.n_test_seen", "env.kwargs.n_test_unseen", "rollout.max_tasks",
            "rollout.samples_per_task", "eval.every_iteration")
    assert {k: study.overrides[k] for k in same} == {k: results.overrides[k] for k in same}  # set beside results
    # fewer iterations than the tiny study's 3 for time (its header), but enough for drift and the frozen ablation
    assert 2 <= study.overrides["loop.iterations"] <= results.overrides["loop.iterations"]
    assert study.overrides["rollout.backend"] == "vllm"
    parts = makefile_parts("study-smollm2")
    picked = [name for part in parts.values() for name in part]  # study-smollm2-analysis runs nothing
    assert picked == names, parts
    assert "--analysis-only" in Path("Makefile").read_text().split("study-smollm2-analysis:")[1].split("\n")[1]


def test_analysis_only_starts_no_run_and_renders_the_finished_ones(tmp_path, monkeypatch):
    executed = []

    def execute(notebook, output, parameters) -> int:
        executed.append(notebook.name)
        return 0  # kernels replaced

    monkeypatch.setattr(study_module, "execute", execute)
    runs = tmp_path / "runs"
    study = write_study(tmp_path / "s.yaml", name="s", runs_root=str(runs), figures_dir=None,
                        entries=[{"recipe": "configs/minishop/sft.yaml"}], analysis=["notebooks/40-results.ipynb"])
    assert run_study(study, runs=False) == 1  # nothing finished yet: says so, starts nothing
    assert executed == [] and not list(runs.glob("*-seed*"))
    monkeypatch.setattr(study_module, "is_finished", lambda run_dir: True)
    assert run_study(study, runs=False) == 0
    assert executed == ["40-results.ipynb"]  # the analysis notebook only, not the run notebook


def test_analysis_notebooks_get_the_tiny_study_where_they_declare_it(tmp_path, monkeypatch):
    executed = {}

    def execute(notebook, output, parameters) -> int:
        executed[notebook.name] = parameters
        return 0  # kernels replaced

    monkeypatch.setattr(study_module, "execute", execute)
    study = load_study(write_study(
        tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"), tiny_runs_root="runs/results",
        entries=[{"recipe": "configs/minishop/sft.yaml"}],
        analysis=["notebooks/20-hard-negatives.ipynb", "notebooks/40-results.ipynb"]))
    assert study_module.run_analysis(study) == ([], 0)
    assert executed["40-results.ipynb"]["tiny_runs_root"] == str(resolve_path("runs/results"))
    assert "tiny_runs_root" not in executed["20-hard-negatives.ipynb"]


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": [7]}, r"--seeds names seeds the study does not plan: \[7\]"),
    ({"workers": 0}, "--workers must be >= 1, got 0"),
    ({"only": ["nope"]}, "--only names unknown entries"),
])
def test_bad_command_line_selections_are_refused_before_running(tmp_path, kwargs, message):
    study = write_study(tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"),
                        entries=[{"recipe": "configs/minishop/sft.yaml"}])
    with pytest.raises(ConfigError, match=message):
        run_study(study, **kwargs)
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_is_refused_before_running(tmp_path):
    study = write_study(tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"),
                        entries=[{"recipe": "configs/minishop/nope.yaml"}])
    with pytest.raises(ConfigError, match="nope.yaml"):
        run_study(study)


def test_unknown_analysis_parameter_is_refused_before_running(tmp_path):
    study = write_study(tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"),
                        entries=[{"recipe": "configs/minishop/sft.yaml"}], analysis_parameters={"max_negativez": 5})
    with pytest.raises(ConfigError, match="max_negativez"):
        run_study(study)


def test_bad_entry_config_is_refused_before_any_run(tmp_path):
    entries = [{"name": "good", "recipe": "configs/minishop/sft.yaml"},
               {"name": "bad", "recipe": "configs/minishop/sft.yaml", "overrides": {"rollout.temperature": -1}}]
    study = write_study(tmp_path / "s.yaml", name="s", runs_root=str(tmp_path / "runs"), entries=entries)
    with pytest.raises(ConfigError, match="entry bad seed 0: config key 'rollout.temperature' must be >= 0"):
        run_study(study)
    assert not (tmp_path / "runs").exists()


def test_failing_entry_is_reported_and_the_other_finishes_then_reruns_skip(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's tiny model: see test_notebooks.one_torch_thread
    runs = tmp_path / "runs"
    broken_model = tmp_path / "broken-model"  # passes the input checks (a directory with a config.json), fails to load
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{}")
    bad = {"name": "bad", "recipe": "configs/minishop/sft.yaml", "overrides": {"model.name_or_path": str(broken_model)}}
    fields = {"name": "two", "runs_root": str(runs), "smoke": True, "analysis": [], "figures_dir": None,
              "entries": [bad, {"name": "good", "recipe": "configs/minishop/sft.yaml"}]}
    study = write_study(tmp_path / "two.yaml", **fields)

    assert run_study(study) == 1
    err = capsys.readouterr().err
    assert "run bad seed 0" in err and "notebook 10-run.ipynb failed" in err
    assert str(runs / "bad-seed0" / "10-run.ipynb") in err  # the executed copy shows the failing cell
    assert is_finished(runs / "good-seed0") and not is_finished(runs / "bad-seed0")
    executed = runs / "good-seed0" / "10-run.ipynb"
    first_mtime = executed.stat().st_mtime

    assert run_study(study, only=["good"]) == 0  # finished with the same config: skipped, nothing fails
    assert executed.stat().st_mtime == first_mtime

    fields["overrides"] = {"sft.epochs": 2}  # the finished run no longer matches the study: refuse, keep it
    assert run_study(write_study(study, **fields), only=["good"]) == 1
    assert "good seed 0" in capsys.readouterr().err and executed.stat().st_mtime == first_mtime
