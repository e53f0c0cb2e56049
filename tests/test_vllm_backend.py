"""coevo runs on a real vLLM server (.venv-vllm, the CPU build): rollout.backend = vllm and openai.

A short coevo run (SFT, one iteration, eval) goes through backend=vllm (coevo starts its own server, swaps
in each new checkpoint); the same run through backend=openai against a session server; hf and vllm greedy
actions on the same checkpoint are compared; a server killed during a rollout is restarted and the rollout
ends with every episode once. Without .venv-vllm these skip, unless COEVO_REQUIRE_VLLM is set (CI).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from coevo_lib.api import run
from coevo_lib.config import load_config
from coevo_lib.envs import make_env
from coevo_lib.records import read_episodes
from coevo_lib.rollout import expand_tasks
from coevo_lib.rollout_service import RolloutService
from coevo_lib.serving import VLLMServer

pytestmark = pytest.mark.vllm

RECIPE = "configs/minishop/coevo.yaml"
# head_dim 32 (32 / 1): a size vLLM's CPU attention serves. Two SFT epochs give replies in the action format.
SMOKE = [
    "rollout.max_tasks=6", "rollout.max_new_tokens=16", "eval.max_tasks=4", "sft.epochs=2", "dpo.epochs=1",
    "loop.failure_dpo.epochs=1", "loop.iterations=1", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
    "model.tiny.num_heads=1", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=512",
    "model.tiny.tokenizer_tasks_per_split=30", "sft.share=false", "rollout.max_concurrent=4",
]


def stages(run_dir) -> dict[str, dict]:
    return {row["stage"]: row for row in run_dir.metrics()}


@pytest.fixture(scope="module")
def vllm_run(vllm_bin, tmp_path_factory):
    return run(RECIPE, SMOKE + ["rollout.backend=vllm", f"rollout.vllm.python={vllm_bin}"],
               run_dir=tmp_path_factory.mktemp("vllm") / "run")


@pytest.fixture(scope="module")
def session_server(vllm_bin, vllm_run, tmp_path_factory):
    """A server the user runs (as `openai` endpoints are), started on the run's SFT checkpoint."""
    sft = str(vllm_run.checkpoint("sft").resolve())
    with VLLMServer(sft, tmp_path_factory.mktemp("served") / "vllm.log", python=vllm_bin, max_model_len=1024,
                    dtype="float32", kv_cache_gib=1) as server:  # entering starts it
        yield server


def test_a_coevo_run_on_vllm_starts_the_engine_once_and_swaps_weights(vllm_run):
    metrics = stages(vllm_run)
    first, later = metrics["it0-eval"]["test_seen_engine"], metrics["it1-eval"]["test_seen_engine"]
    assert first["backend"] == "vllm" and first["engine_start_s"] > 0
    assert "engine_start_s" not in later and later["weight_swap_s"] < first["engine_start_s"]
    for name in ("it1-rollout-target", "it1-rollout-failure"):
        engine = metrics[name]["engine"]
        assert engine["episodes_run"] == metrics[name]["episodes"] == 6
        assert engine["requests"] == round(metrics[name]["mean_steps"] * 6) and engine["engine_restarts"] == 0
        assert engine["prefix_cache_hit_rate"] > 0.3  # turns share their history's prefix
    # Greedy replies of a trained checkpoint re-tokenise to exactly the ids the engine generated.
    assert first["token_checks"] > 0 and first["token_mismatches"] == 0
    log = (vllm_run.path / "serving" / "vllm.log").read_text()  # the server's output is kept with the run
    assert log.count("vllm.entrypoints.openai.api_server") >= 1 and "Application startup complete" in log


def actions_by_task(episodes) -> dict:
    """Actions keyed by task and sample: an async rollout writes episodes in the order they finish."""
    return {(ep.task_id, ep.sample_index): ep.actions for ep in episodes}


def test_the_same_run_through_openai_endpoints_gets_the_same_evaluation(vllm_run, session_server, tmp_path):
    openai_run = run(RECIPE, SMOKE + ["rollout.backend=openai", f"rollout.openai.urls=[{session_server.base_url}]"],
                     run_dir=tmp_path / "run")
    ours, theirs = stages(openai_run), stages(vllm_run)
    for split in ("test_seen", "test_unseen"):
        assert ours["it0-eval"][f"{split}_reward"] == theirs["it0-eval"][f"{split}_reward"]
        assert ours["it0-eval"][f"{split}_engine"]["backend"] == "openai"
    assert ours["it1-eval"]["test_seen_engine"]["weight_swap_s"] >= 0  # the new checkpoint went to the endpoint
    greedy = actions_by_task(read_episodes(openai_run.episodes("it0-eval-test_seen-target")))
    assert greedy == actions_by_task(read_episodes(vllm_run.episodes("it0-eval-test_seen-target")))


def test_hf_and_vllm_greedy_actions_agree_on_held_out_tasks(vllm_run, tmp_path):
    config = load_config(RECIPE, SMOKE + ["rollout.schedule=async"])
    env = make_env(config.env.name, **config.env.kwargs)
    service = RolloutService(config, tmp_path)
    agree, total = 0, 0
    for split in ("test_seen", "test_unseen"):
        refs = expand_tasks(env.task_ids(split)[:4], split, 1)
        envs = [make_env(config.env.name, **config.env.kwargs) for _ in range(4)]
        hf, _ = service.rollout(envs, refs, str(vllm_run.checkpoint("sft")),
                                service.task("target", 0, f"eval-{split}", 0.0), None)
        served = actions_by_task(read_episodes(vllm_run.episodes(f"it0-eval-{split}-target")))
        agree += sum(actions == served[key] for key, actions in actions_by_task(hf).items())
        total += len(hf)
    print(f"hf vs vllm greedy: {agree}/{total} episodes with identical actions")
    assert agree / total >= 0.75


def test_a_server_killed_during_a_rollout_is_restarted_and_no_episode_is_lost(session_server, vllm_run, tmp_path):
    config = load_config(RECIPE, SMOKE + ["rollout.backend=vllm"])
    env = make_env(config.env.name, **config.env.kwargs)
    service = RolloutService(config, tmp_path)
    service.server, service.checkpoint = session_server, session_server.model  # the server is the session's
    refs = expand_tasks(env.task_ids("train")[:10], "train", 1)
    out = tmp_path / "episodes.jsonl"
    restarts = session_server.restarts

    def kill_after_two_episodes() -> None:
        while not out.exists() or len(out.read_text().splitlines()) < 2:
            time.sleep(0.02)
        os.kill(session_server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_two_episodes, daemon=True)
    killer.start()
    envs = [make_env(config.env.name, **config.env.kwargs) for _ in range(4)]
    episodes, stats = service.rollout(envs, refs, session_server.model,
                                      service.task("target", 1, "train", 0.7), out)
    killer.join(timeout=1)
    assert session_server.restarts == restarts + 1 and stats["engine_restarts"] == restarts + 1
    assert stats["request_retries"] >= 1
    assert [ep.episode_id for ep in episodes] == [f"target/it1/train/{r.task_id}/s0" for r in refs]
    assert Counter(ep.episode_id for ep in read_episodes(out)) == Counter(ep.episode_id for ep in episodes)
    assert session_server.alive()
