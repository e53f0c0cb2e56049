"""Launched SFT and DPO stages on 2 CPU ranks (gloo) against the in-process single-process path, a
short coevo run on 2 ranks, a killed stage that resumes, and launcher settings refused up front.

Tolerance: per-step losses of 2 ranks match 1 process to 1e-4 relative. The math is the same
(global batch split 2 x half, gradients averaged; SFT token counts summed over ranks); only the
float summation order differs, which moves fp32 losses by ~1e-6 over these few steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coevo_lib.config import ConfigError, DPOStageConfig, RunConfig, SFTStageConfig, TrainLaunchConfig, load_config
from coevo_lib.models import load_model, load_tokenizer, save_agent
from coevo_lib.records import read_jsonl
from coevo_lib.runs import init_run_dir
from coevo_lib.train import train_dpo, train_sft
from coevo_lib.train import launch
from coevo_lib.train.launch import StageLaunchError, launch_command, run_stage

from conftest import make_episode

RELATIVE_TOLERANCE = 1e-4
TWO_RANKS = TrainLaunchConfig(launcher="accelerate", num_processes=2)


def shop_episodes(n: int):
    items = ["red mug", "blue mug", "green cup", "black pen"]
    return [make_episode(f"e{i}", f"buy a {items[i % 4]}", [(f"search[{items[i % 4]}]", f"[B0AAA{i}] {items[i % 4]}"),
                                                             (f"click[B0AAA{i}]", "[Buy Now]"), ("click[buy now]", "")],
                         1.0, "expert") for i in range(n)]


def shop_pairs(n: int):
    from coevo_lib.pairs import make_pair

    experts = shop_episodes(n)
    failures = [make_episode(f"f{i}", e.task_id.replace("buy a ", ""), [("search[mug]", "[B0BBBB] blue mug"),
                                                                        ("click[B0BBBB]", "[Buy Now]")], 0.0)
                for i, e in enumerate(experts)]
    for failure, expert in zip(failures, experts):
        failure.task_id, failure.messages[1] = expert.task_id, expert.messages[1]
    return [make_pair("eto", e, f) for e, f in zip(experts, failures)]


@pytest.fixture()
def stage_run(tiny_model, tiny_tokenizer, tmp_path):
    """A run directory whose config holds the stage settings, and a saved start checkpoint."""
    config = RunConfig(
        sft=SFTStageConfig(epochs=2, batch_size=4, learning_rate=1e-2, max_length=256, warmup_ratio=0.0),
        dpo=DPOStageConfig(epochs=2, batch_size=4, learning_rate=1e-2, max_length=256, warmup_ratio=0.0),
    )
    run = init_run_dir(config, tmp_path / "run")
    save_agent(tiny_model, tiny_tokenizer, run.checkpoint("start"))
    return config, run


def in_process(kind: str, config: RunConfig, run, examples) -> dict:
    start = run.checkpoint("start")
    model, tokenizer = load_model(start, config.model, trainable=True), load_tokenizer(start)
    train, stage = (train_sft, config.sft) if kind == "sft" else (train_dpo, config.dpo)
    return train(model, tokenizer, examples, stage, run.sub("tb", "one"), seed=0)


def launched(kind: str, run, examples, train=TWO_RANKS) -> dict:
    out = run.checkpoint(f"{kind}-two.tmp")
    job = {"kind": kind, "run_dir": str(run.path), "stage_section": kind, "start": str(run.checkpoint("start")),
           "seed": 0, "out": str(out), "tb_dir": str(run.sub("tb", "two"))}
    stats = run_stage(train, run.sub("launch", kind), job, examples)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()  # HF layout, loads as usual
    load_model(out, RunConfig().model)
    return stats


def assert_same_steps(one: dict, two: dict) -> None:
    assert two["processes"] == 2 and two["per_device_batch"] * 2 == one["per_device_batch"]
    assert one["effective_batch"] == two["effective_batch"] == 4
    assert one["steps"] == two["steps"] == len(one["step_losses"]) == len(two["step_losses"])
    assert two["step_losses"] == pytest.approx(one["step_losses"], rel=RELATIVE_TOLERANCE)
    assert two["step_losses"][0] != two["step_losses"][-1]  # the weights moved between steps


def test_sft_stage_on_two_ranks_matches_one_process(stage_run):
    config, run = stage_run
    episodes = shop_episodes(8)
    shipped_ddp = TrainLaunchConfig(launcher="accelerate", num_processes=2, accelerate_config="ddp")
    one, two = in_process("sft", config, run, episodes), launched("sft", run, episodes, train=shipped_ddp)
    assert two["distributed_type"] == "MULTI_CPU"
    assert_same_steps(one, two)


def test_dpo_stage_with_precomputed_reference_on_two_ranks_matches_one_process(stage_run):
    """Masked collator, precomputed reference log-probs and the summed SFT term (lambda_sft > 0) under DDP."""
    config, run = stage_run
    assert config.dpo.sft_reduction == "sum" and config.dpo.lambda_sft > 0
    pairs = shop_pairs(8)
    one, two = in_process("dpo", config, run, pairs), launched("dpo", run, pairs)
    assert_same_steps(one, two)


def test_torchrun_launcher_and_a_dying_rank_fail_the_stage_cleanly(stage_run):
    _, run = stage_run
    torchrun = TrainLaunchConfig(launcher="torchrun", num_processes=2)
    assert "torch.distributed.run" in launch_command(torchrun, Path("job.json"))
    with pytest.raises(StageLaunchError, match="exited with code"):
        launched("sft", run, ["not an episode"], train=torchrun)  # rank 0 raises while reading it
    assert not run.checkpoint("sft-two.tmp").joinpath("model.safetensors").exists()
    assert not (run.sub("launch", "sft") / "stats.json").exists()
    assert "Traceback" in (run.sub("launch", "sft") / "launch.log").read_text()


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_launchers_store_binds_its_own_port_so_a_port_taken_meanwhile_cannot_kill_the_stage(
        stage_run, taken_port, monkeypatch, launcher):
    """A port picked free by coevo and handed to the launcher could be taken before the launcher bound it
    (two study workers launching stages at once): the launcher died of EADDRINUSE. Here every port coevo
    would pick is taken; the stage still trains, its rendezvous store having bound a port itself."""
    _, run = stage_run
    # coevo used to pick the port with launch.free_port; were it still called, it would get the taken one
    monkeypatch.setattr(launch, "free_port", lambda: taken_port, raising=False)
    train = TrainLaunchConfig(launcher=launcher, num_processes=2)
    assert not {str(taken_port)} & set(launch_command(train, Path("job.json")))
    stats = launched("sft", run, shop_episodes(4), train=train)
    assert stats["processes"] == 2 and stats["steps"] > 0


def test_the_users_rendezvous_port_taken_fails_the_stage_without_retrying(stage_run, taken_port):
    _, run = stage_run
    train = TrainLaunchConfig(launcher="torchrun", num_processes=2, main_process_port=taken_port)
    with pytest.raises(StageLaunchError, match="exited with code"):
        launched("sft", run, shop_episodes(4), train=train)
    assert (run.sub("launch", "sft") / "launch.log").read_text().count("\n=== ") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_sharded_config_is_refused_on_cpu_ranks_rather_than_run_as_ddp(stage_run):
    _, run = stage_run
    fsdp2 = TrainLaunchConfig(launcher="accelerate", num_processes=2, accelerate_config="fsdp2")
    with pytest.raises(StageLaunchError):
        launched("sft", run, shop_episodes(4), train=fsdp2)
    assert "FSDP / DeepSpeed accelerate configs need CUDA GPUs" in (run.sub("launch", "sft") / "launch.log").read_text()


# -- the loop ------------------------------------------------------------------------------------

SMOKE = [
    "rollout.max_tasks=8", "rollout.batch_size=4", "rollout.max_new_tokens=16", "eval.max_tasks=2",
    "eval.splits=[test_seen]", "sft.epochs=1", "dpo.epochs=1", "loop.failure_dpo.epochs=1", "loop.iterations=1",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "model.tiny.vocab_size=512", "model.tiny.tokenizer_tasks_per_split=40",
    "sft.share=false", "train.launcher=accelerate", "train.num_processes=2",
]


def coevo_run(run_dir: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "coevo_lib.cli", "run", "configs/minishop/coevo.yaml", "--run-dir", str(run_dir)]
    for item in SMOKE + list(extra):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(")")[-1].split()[0] == "Z")


def wait_until(condition, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_two_rank_run_killed_mid_stage_resumes_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    job_dir = run_dir / "launch" / "sft"
    process = coevo_run(run_dir)
    # Mid-stage: both ranks are up and rank 0 has tokenised the experts.
    wait_until(lambda: (job_dir / "dataset").exists() and len(list((job_dir / "ranks").glob("*.pid"))) == 2)
    ranks = [int(p.read_text()) for p in (job_dir / "ranks").glob("*.pid")]
    os.killpg(int((job_dir / "launcher.pid").read_text()), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "StageLaunchError" in err
    wait_until(lambda: not any(alive(pid) for pid in ranks), timeout=10)
    assert not (run_dir / "stages" / "sft.json").exists() and not (run_dir / "checkpoints" / "sft").exists()

    process = coevo_run(run_dir)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    rows = {row["stage"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}
    assert {"sft", "it1-train-target", "it1-eval"} <= set(rows)
    assert "it1-train-failure" not in rows  # the last iteration's failure agent update reaches no rollout
    trained = [rows[s] for s in ("sft", "it1-train-target") if rows[s].get("steps")]
    assert trained and all(r["launcher"] == "accelerate" and r["processes"] == 2 for r in trained)
    assert (job_dir / "launch.log").read_text().count("\n=== ") == 2  # one header per attempt


@pytest.mark.parametrize("override, message", [
    ("train.launcher=slurm", "train.launcher must be one of"),
    ("train.num_processes=2", "needs train.launcher = accelerate or torchrun"),
    ("train.accelerate_config=nope", "train.accelerate_config needs train.launcher = accelerate"),
])
def test_bad_launcher_setting_is_a_one_line_error_before_any_run_dir(tmp_path, override, message):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "coevo_lib.cli", "run", "configs/minishop/coevo.yaml", "--run-dir", str(run_dir),
            "--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not run_dir.exists()


def test_launcher_config_validation():
    with pytest.raises(ConfigError, match="must be one of ddp, fsdp2, zero3 or an existing file"):
        TrainLaunchConfig(launcher="accelerate", accelerate_config="fsdp3")
    with pytest.raises(ConfigError, match="sft.batch_size=3 is the global batch and must divide"):
        load_config("configs/minishop/coevo.yaml", ["train.launcher=torchrun", "train.num_processes=2",
                                                    "sft.batch_size=3"])
    config_file = launch_command(TrainLaunchConfig(launcher="accelerate", num_processes=4, accelerate_config="fsdp2"),
                                 Path("job.json"))
    assert str(Path("configs/accelerate/fsdp2.yaml").resolve()) in config_file and "4" in config_file
