"""Bad input, as a new user would type it, fails before anything is written: one line naming the key, value
or path, a non-zero exit, no run directory created, an existing run directory left byte for byte as it was."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from coevo_lib.cli import main
from coevo_lib.config import load_config
from coevo_lib.runs import init_run_dir

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "minishop" / "coevo.yaml"

# (override, what the one line must name)
BAD_OVERRIDES = [
    ("rollout.temperature=-1", "'rollout.temperature' must be >= 0"),
    ("env.kwargs.max_stepz=3", "'env.kwargs.max_stepz'"),
    ("model.name_or_path=/nonexistent", "no such model directory: /nonexistent"),
    ("model.name_or_path=someorg/no-such-model", "hub is unreachable"),
    ("dpo.beta=[1, 2]", "'dpo.beta' must be float, got [1, 2]"),
    ("method=ppo", "unknown method 'ppo'"),
    ("env.name=webshop", "unknown environment 'webshop'"),
    ("env.kwargs.max_steps=-2", "max_steps must be >= 5"),
    ("env.kwargs.n_train=ten", "n_train must be an integer, got 'ten'"),
    ("rollout.top_p=1.5", "'rollout.top_p' must be in (0, 1], got 1.5"),
    ("rollout.batch_size=0", "'rollout.batch_size' must be > 0, got 0"),
    ("eval.splits=[]", "'eval.splits' must be a non-empty list"),
    ("sft.lr_scheduler=cosin", "'sft.lr_scheduler' must be one of"),
    ("loop.failure_dpo.lambda_dpo=0", "'loop.failure_dpo.lambda_dpo'"),  # no loss term left; full key named
    ("loop.failure_dpo.beta=-0.1", "'loop.failure_dpo.beta' must be > 0"),
    ("model.device=gpu", "'model.device' must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    ("model.tiny.hidden_size=91", "'model.tiny.hidden_size' must be a multiple of num_heads (3), got 91"),
    ("seed=-1", "'seed' must be >= 0, got -1"),
    ("rollout.temprature=0.5", "unknown config key 'rollout.temprature'"),
    ("rollout.temperature=[", "override 'rollout.temperature=[': the value is not valid YAML"),
    ("prompt.style=fancy", "'prompt.style' must be one of chat, eto, got 'fancy'"),
    ("loop.iterations=-1", "'loop.iterations' must be >= 0, got -1"),
]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def existing_run(tmp_path) -> Path:
    """A run directory as a started run leaves it (config, env.json, folders), with a metrics line."""
    run = init_run_dir(load_config(RECIPE), tmp_path / "existing")
    (run.path / "metrics.jsonl").write_text('{"stage": "base"}\n')
    return run.path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("override", "named"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_and_writes_nothing(override, named, tmp_path, existing_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub case must not depend on this machine's network
    before = tree_digest(existing_run)
    for run_dir in (tmp_path / "fresh", existing_run):
        code, error = run_cli(capsys, RECIPE, "--set", override, "--run-dir", run_dir)
        assert code == 2 and "\n" not in error and error.startswith("coevo: error: "), error
        assert named in error, error
    assert not (tmp_path / "fresh").exists()
    assert tree_digest(existing_run) == before


@pytest.mark.parametrize(("text", "named"), [
    ("- minishop\n- coevo\n", "must be a mapping at top level"),  # a YAML list, not a mapping
    ("method: [eto\n", "is not valid YAML"),
    ("base: no_such_base.yaml\n", "recipe file not found"),
    ("env: minishop\n", "config section env must be a mapping, got str"),
])
def test_bad_recipe_file_is_one_line(text, named, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, error = run_cli(capsys, recipe, "--run-dir", tmp_path / "run")
    assert code == 2 and "\n" not in error and named in error and str(tmp_path / "run") not in error, error
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_model_directory_without_config(tmp_path, capsys):
    code, error = run_cli(capsys, tmp_path / "nope.yaml")
    assert code == 2 and f"recipe file not found: {tmp_path / 'nope.yaml'}" in error
    (tmp_path / "model").mkdir()
    code, error = run_cli(capsys, RECIPE, "--set", f"model.name_or_path={tmp_path / 'model'}",
                          "--run-dir", tmp_path / "run")
    assert code == 2 and "has no config.json" in error and not (tmp_path / "run").exists()


def test_changed_config_on_an_existing_run_is_refused_untouched(existing_run, capsys):
    before = tree_digest(existing_run)
    code, error = run_cli(capsys, RECIPE, "--set", "dpo.beta=0.3", "--run-dir", existing_run)
    assert code == 2 and "dpo.beta" in error and "\n" not in error
    assert tree_digest(existing_run) == before


def test_console_script_exit_code(tmp_path):
    """The installed entry point (not only main()) exits non-zero with the one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "coevo_lib.cli", "run", str(RECIPE), "--set",
                             "rollout.temperature=-1", "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "coevo: error: config key 'rollout.temperature' must be >= 0 (0 = greedy), got -1.0"]
    assert not (tmp_path / "run").exists()


def test_vllm_backend_inputs_are_checked_before_anything_is_written(tmp_path, capsys):
    code, err = run_cli(capsys, RECIPE, "--set", "rollout.backend=vllm", "--set", "model.tiny.num_heads=4",
                        "--set", "model.tiny.hidden_size=96", "--set", f"runs_root={tmp_path}")
    assert code != 0 and len(err.splitlines()) == 1
    assert "head size 96 / 4 = 24" in err or "make vllm" in err  # whichever is missing on this machine
    code, err = run_cli(capsys, RECIPE, "--set", "rollout.backend=vllm",
                        "--set", f"rollout.vllm.python={tmp_path}/nowhere/python", "--set", f"runs_root={tmp_path}")
    assert code != 0 and "make vllm" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_serve_without_vllm_names_make_vllm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COEVO_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert main(["serve", str(tmp_path)]) == 2
    assert "make vllm" in capsys.readouterr().err


def test_compile_without_a_cpp_compiler_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no g++, no c++
    monkeypatch.delenv("CXX", raising=False)
    code, err = run_cli(capsys, RECIPE, "--set", "train.compile=true", "--set", f"runs_root={tmp_path}/runs")
    assert code == 2 and len(err.splitlines()) == 1
    assert "'train.compile'" in err and "C++ compiler" in err
    assert not (tmp_path / "runs").exists()
