from pathlib import Path

import pytest

from coevo_lib.cli import main
from coevo_lib.config import ConfigError, RunConfig, load_config

RECIPES = sorted(Path("configs/minishop").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    config = load_config(recipe)
    assert isinstance(config, RunConfig)
    assert config.env.name == "minishop"


def test_base_inheritance_and_deltas():
    frozen = load_config("configs/minishop/coevo_frozen_failure.yaml")
    assert frozen.method == "coevo"
    assert frozen.loop.second_agent == "failure"  # from coevo.yaml
    assert frozen.loop.freeze_second_agent_after == 1  # its own delta
    assert frozen.rollout.batch_size == 32  # from base.yaml
    assert load_config("configs/minishop/eto.yaml").dpo.lambda_sft == 0.0


def test_overrides_parse_yaml_scalars():
    config = load_config("configs/minishop/coevo.yaml", ["dpo.beta=0.25", "seed=3", "eval.splits=[test_seen]"])
    assert config.dpo.beta == 0.25 and config.seed == 3 and config.eval.splits == ["test_seen"]


def test_nested_override_keeps_section_defaults():
    config = load_config("configs/minishop/coevo.yaml", {"loop.failure_dpo.beta": 0.3})
    assert config.loop.failure_dpo.beta == 0.3
    assert config.loop.failure_dpo.lambda_sft == 0.0  # the failure agent's default, not DPOStageConfig's


@pytest.mark.parametrize(
    "override, message",
    [
        ({"dpo.betta": 0.1}, "dpo.betta"),
        ({"loop.pairs.nonsense": True}, "loop.pairs.nonsense"),
        ({"dpo.beta": "high"}, "dpo.beta"),
        ({"method": "ppo"}, "ppo"),
        ({"dpo.sft_reduction": "max"}, "sft_reduction"),
        ({"loop.second_agent": "adversary"}, "second_agent"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/minishop/coevo.yaml", override)


def test_missing_recipe_and_bad_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(child)


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    code = main(["run", "configs/minishop/coevo.yaml", "--set", "rollout.tempreature=0.5",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "rollout.tempreature" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not validate


def test_a_run_saved_before_a_key_existed_resumes_and_a_changed_value_still_refuses(tmp_path):
    import yaml

    from coevo_lib.runs import init_run_dir

    config = RunConfig(runs_root=str(tmp_path))
    run = init_run_dir(config, tmp_path / "run")
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["loop"]["pairs"]["failure_within_agent"]  # as written by a coevo that had no such key yet
    run.config_path.write_text(yaml.safe_dump(saved))
    init_run_dir(config, tmp_path / "run")  # the key's default is the behaviour the run was started with
    saved["loop"]["pairs"]["failure_within_agent"] = True
    run.config_path.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="loop.pairs.failure_within_agent: True -> False"):
        init_run_dir(config, tmp_path / "run")


def test_env_json_records_the_cpu_and_kernels_a_run_computed_on(tmp_path):
    """Float rounding differs between CPUs, so a run's record says which CPU and torch kernel level ran it."""
    import json
    import platform

    import torch

    from coevo_lib.runs import init_run_dir

    run = init_run_dir(RunConfig(runs_root=str(tmp_path)), tmp_path / "run")
    env = json.loads(run.sub("env.json").read_text())
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if platform.system() == "Linux":
        assert env["cpu_model"] and env["cpu_model"] in Path("/proc/cpuinfo").read_text()
    assert env["packages"]["accelerate"]


def test_env_json_records_the_lock_the_environment_was_installed_from(tmp_path):
    """Which exact package set a run computed with: the sha256 of the lock make setup installed."""
    import hashlib
    import json

    from coevo_lib.lockfile import installed_lock
    from coevo_lib.runs import init_run_dir

    lock = installed_lock()
    assert lock is not None, "this environment was not installed by make setup (no coevo-lock.txt in the venv)"
    env = json.loads(init_run_dir(RunConfig(runs_root=str(tmp_path)), tmp_path / "run").sub("env.json").read_text())
    assert env["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert env["lock"]["sha256"] in {hashlib.sha256(p.read_bytes()).hexdigest() for p in Path("locks").glob("*.txt")}
