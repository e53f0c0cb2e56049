"""SRLM and Agent-R end to end with the tiny model on a few minishop tasks: SRLM judges RFT's very episodes,
Agent-R's search resumes chunk by chunk to the same trees, and revision trajectories train with the bad
prefix masked out of the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coevo_lib.api import run
from coevo_lib.config import SFTStageConfig
from coevo_lib.methods.agent_r_revision import revision_messages
from coevo_lib.records import Episode, read_episodes, read_jsonl, write_jsonl_atomic
from coevo_lib.train import train_sft
from tests.test_agent_r import BAD, GOOD, PROMPT

TINY = {
    "env.kwargs.n_train": 8, "env.kwargs.n_test_seen": 2, "env.kwargs.n_test_unseen": 2, "env.kwargs.max_steps": 5,
    "rollout.max_tasks": 2, "rollout.batch_size": 4, "rollout.max_new_tokens": 16, "eval.max_tasks": 1,
    "eval.splits": ["test_seen"], "sft.epochs": 1, "dpo.epochs": 1, "loop.iterations": 1,
    "model.tiny.hidden_size": 32, "model.tiny.num_layers": 1, "model.tiny.num_heads": 2,
    "model.tiny.intermediate_size": 64, "model.tiny.vocab_size": 512, "model.tiny.tokenizer_tasks_per_split": 8,
    "srlm.judge_max_new_tokens": 8, "agent_r.verifier_max_new_tokens": 8, "agent_r.passes": 1,
    "agent_r.children": 2, "agent_r.sft.epochs": 1,
}


def metrics(run_dir: Path) -> dict[str, dict]:
    return {row["stage"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}


def episodes(run_dir: Path, name: str) -> list[tuple]:
    return [(ep.episode_id, tuple(ep.actions), ep.reward, ep.seed) for ep in read_episodes(run_dir / "episodes" / name)]


def test_srlm_judges_rfts_episodes_and_resumes(tmp_path):
    rft, srlm = tmp_path / "rft", tmp_path / "srlm"
    run("configs/minishop/rft.yaml", TINY, rft)
    run("configs/minishop/srlm.yaml", TINY, srlm)
    shared = episodes(srlm, "it1-train-target.jsonl")
    assert shared == episodes(rft, "it1-train-target.jsonl") and len(shared) == 2 * 4  # 4 samples per task
    judge = metrics(srlm)["it1-judge-target"]
    # The tiny model never writes "Score: n": every episode is scored by the fallback, and that is reported.
    assert (judge["episodes"], judge["scored"], judge["generations"]) == (8, 8, 8 * 3)
    assert judge["judge_parse_rate"] == 0.0 and judge["judge_fallback_share"] == 1.0
    rows = read_jsonl(srlm / "judge" / "it1-target.jsonl")
    assert all(0 <= row["score"] <= 5 and row["source"] == "expected" and len(row["replies"]) == 3 for row in rows)
    assert metrics(srlm)["it1-pairs-target"]["pairs"] <= 2
    before = read_jsonl(srlm / "metrics.jsonl")
    run("configs/minishop/srlm.yaml", TINY, srlm)
    assert read_jsonl(srlm / "metrics.jsonl") == before


def test_agent_r_search_resumes_to_the_same_trees(tmp_path):
    run_dir = tmp_path / "agent_r"
    settings = {**TINY, "rollout.max_tasks": 3, "rollout.batch_size": 2}  # 1 tree per chunk: 3 chunks
    run("configs/minishop/agent_r.yaml", settings, run_dir)
    trees = run_dir / "trees" / "it1-target.jsonl"
    full = read_jsonl(trees)
    search = metrics(run_dir)["it1-search-target"]
    assert [row["task_id"] for row in full] == ["train-0000", "train-0001", "train-0002"]
    assert search["generations"] == sum(row["counts"]["generations"] for row in full) > 0
    assert search["env_resets"] > search["tasks"] and search["env_steps"] >= search["generations"] / 2
    # A search killed after its first chunk: the stage reruns the missing chunks only, to the same trees.
    write_jsonl_atomic(trees, full[:1])
    for stage in ("it1-search-target", "it1-revise-target", "it1-train-target", "it1-eval"):
        (run_dir / "stages" / f"{stage}.json").unlink()
    run("configs/minishop/agent_r.yaml", settings, run_dir)
    assert read_jsonl(trees) == full


def test_revision_trajectory_trains_with_its_bad_prefix_masked(tiny_model, tiny_tokenizer, tmp_path):
    messages = revision_messages(PROMPT, BAD, GOOD, 3, "I made an error.")
    episode = Episode(episode_id="r", task_id="t", split="train", agent="revision", iteration=1, messages=messages,
                      actions=["go", "look", "x", "wait", "win"], reward=1.0, success=True, steps=5, seed=0,
                      temperature=0.0, prompt_messages=1)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    stage = SFTStageConfig(epochs=1, learning_rate=1e-2, batch_size=1, warmup_ratio=0.0)
    stats = train_sft(tiny_model, tiny_tokenizer, [episode], stage, tmp_path / "tb", seed=0,
                      gradient_checkpointing=False)
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    # Only the reflection turn and the good continuation are trained on (see test_agent_r's mask test).
    assert stats["assistant_tokens"] == len(tiny_tokenizer("Thought: I made an error.\nAction: wait<|im_end|>"
                                                           "Action: win<|im_end|>")["input_ids"])
    assert any(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters())


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    """Recipes are named relative to the repository root (shared SFT stages land beside the runs, in tmp_path)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
