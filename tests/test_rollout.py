"""Batched lockstep rollouts: typed records, chunk resume, expert replay through the same path."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from coevo_lib.config import ModelConfig, PromptConfig, RolloutConfig, TinyModelConfig
from coevo_lib.envs import make_env
from coevo_lib.models import load_model, load_tokenizer
from coevo_lib.records import Episode, read_episodes
from coevo_lib.rollout import HFGenerator, expand_tasks, expert_corpus, expert_episode, rollout
from coevo_lib.tiny_model import create_tiny_agent

PROMPT = PromptConfig(max_prompt_tokens=768)
SMALL = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                         vocab_size=512, tokenizer_tasks_per_split=30))


@pytest.fixture(scope="module")
def env():
    return make_env("minishop")


@pytest.fixture(scope="module")
def generator(env, tmp_path_factory):
    corpus = expert_corpus(env, PROMPT, SMALL.tiny.tokenizer_tasks_per_split)
    path = create_tiny_agent(SMALL.tiny, corpus, tmp_path_factory.mktemp("base"), seed=0)
    model = load_model(path, SMALL).eval()
    return HFGenerator(model, load_tokenizer(path), RolloutConfig(max_new_tokens=16), PROMPT.max_prompt_tokens)


def test_expert_episode_is_a_successful_record(env):
    task = env.task_ids("train")[0]
    episode = expert_episode(env, task, "train", PROMPT)
    assert episode.success and episode.reward == 1.0 and episode.agent == "expert"
    roles = [m["role"] for m in episode.messages]
    assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
    assert roles.count("assistant") == episode.steps == len(episode.actions)


def test_rollout_records_are_complete_and_ordered(env, generator, tmp_path):
    refs = expand_tasks(env.task_ids("test_seen")[:5], "test_seen", samples=2)
    envs = [make_env("minishop") for _ in range(4)]
    out = tmp_path / "episodes.jsonl"
    episodes = rollout(envs, refs, generator, agent="target", iteration=1, prompt=PROMPT, seed=7,
                       temperature=1.0, out_path=out)
    assert [(e.task_id, e.sample_index) for e in episodes] == [(r.task_id, r.sample_index) for r in refs]
    assert len({e.episode_id for e in episodes}) == 10
    row = json.loads(out.read_text().splitlines()[0])
    assert set(row) == {f.name for f in fields(Episode)}
    for ep in episodes:
        assert ep.split == "test_seen" and ep.agent == "target" and ep.iteration == 1 and ep.temperature == 1.0
        assert 0.0 <= ep.reward <= 1.0 and ep.success == (ep.reward == 1.0)
        assert 1 <= ep.steps <= env.max_steps and ep.tokens_generated > 0
        assert [m["role"] for m in ep.messages].count("assistant") == ep.steps


def test_rollout_resumes_from_complete_chunks_identically(env, generator, tmp_path):
    refs = expand_tasks(env.task_ids("train")[:6], "train", samples=1)
    envs = [make_env("minishop") for _ in range(2)]
    kwargs = dict(agent="failure", iteration=2, prompt=PROMPT, seed=3, temperature=1.0)
    full = rollout(envs, refs, generator, out_path=tmp_path / "full.jsonl", **kwargs)
    partial = tmp_path / "partial.jsonl"
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # chunk 0 whole, chunk 1 torn mid-line
    resumed = rollout(envs, refs, generator, out_path=partial, **kwargs)
    assert [e.actions for e in resumed] == [e.actions for e in full]
    assert [e.episode_id for e in read_episodes(partial)] == [e.episode_id for e in full]


def test_greedy_rollouts_are_deterministic(env, generator):
    refs = expand_tasks(env.task_ids("test_unseen")[:3], "test_unseen", samples=1)
    envs = [make_env("minishop") for _ in range(3)]
    first = rollout(envs, refs, generator, agent="t", iteration=0, prompt=PROMPT, seed=0, temperature=0.0)
    second = rollout(envs, refs, generator, agent="t", iteration=0, prompt=PROMPT, seed=99, temperature=0.0)
    assert [e.messages for e in first] == [e.messages for e in second]
