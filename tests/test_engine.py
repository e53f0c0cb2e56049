"""Asynchronous rollouts on the in-process hf backend: per-request seeds, resume after a real kill."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from coevo_lib.backends import HFBatcher, SeededSampling, top_p_filter
from coevo_lib.config import ModelConfig, PromptConfig, RolloutConfig, TinyModelConfig
from coevo_lib.engine import RolloutTask, rollout_async, run_async
from coevo_lib.envs import make_env
from coevo_lib.models import load_model, load_tokenizer
from coevo_lib.records import read_episodes
from coevo_lib.rollout import HFGenerator, expand_tasks, expert_corpus
from coevo_lib.tiny_model import create_tiny_agent

PROMPT = PromptConfig(max_prompt_tokens=768)
SMALL = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                         vocab_size=512, tokenizer_tasks_per_split=30))
TASK = RolloutTask(agent="target", iteration=1, kind="train", prompt=PROMPT, seed=3, temperature=1.0,
                   max_new_tokens=16, max_prompt_tokens=PROMPT.max_prompt_tokens)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    corpus = expert_corpus(make_env("minishop"), PROMPT, SMALL.tiny.tokenizer_tasks_per_split)
    return str(create_tiny_agent(SMALL.tiny, corpus, tmp_path_factory.mktemp("base"), seed=0))


@pytest.fixture(scope="module")
def generator(checkpoint):
    return HFGenerator(load_model(checkpoint, SMALL).eval(), load_tokenizer(checkpoint),
                       RolloutConfig(max_new_tokens=16), PROMPT.max_prompt_tokens)


def roll(generator, refs, concurrent: int, out: Path | None = None, task: RolloutTask = TASK):
    envs = [make_env("minishop") for _ in range(concurrent)]
    return rollout_async(envs, refs, lambda: HFBatcher(generator, concurrent), generator.tokenizer, task, out)


def test_seeded_sampling_ignores_batch_mates():
    # Row 0's draw must not depend on what else is in the batch or on the batch's size.
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = SeededSampling([11], 1.0, 1.0)(None, logits[:1].clone())
    together = SeededSampling([11, 5, 7], 1.0, 1.0)(None, logits.clone())
    assert alone.argmax(-1).item() == together[0].argmax(-1).item()
    assert torch.isinf(together).sum().item() == 3 * 49  # exactly one token left per row
    filtered = top_p_filter(torch.tensor([[0.5, 0.3, 0.2]]), top_p=0.6)
    assert torch.allclose(filtered, torch.tensor([[0.5, 0.3, 0.0]]))


def test_async_replies_do_not_depend_on_concurrency(env_tasks, generator):
    refs = expand_tasks(env_tasks[:6], "train", samples=2)
    narrow, narrow_stats = roll(generator, refs, concurrent=2)
    wide, wide_stats = roll(generator, refs, concurrent=6)
    assert [ep.episode_id for ep in narrow] == [ep.episode_id for ep in wide]
    assert [ep.actions for ep in narrow] == [ep.actions for ep in wide]
    assert len({ep.seed for ep in narrow}) == len(refs)  # a seed per episode, not per batch
    assert narrow_stats["requests"] == sum(ep.steps for ep in narrow)
    assert wide_stats["generate_batches"] < narrow_stats["generate_batches"]
    # Each sample of a task is its own episode: two samples of one task differ somewhere.
    assert any(a.actions != b.actions for a, b in zip(narrow[::2], narrow[1::2]))


def test_greedy_async_equals_lockstep_replies(env_tasks, generator):
    from coevo_lib.rollout import rollout

    refs = expand_tasks(env_tasks[:4], "test_seen", samples=1)
    greedy = RolloutTask(**{**TASK.__dict__, "temperature": 0.0, "kind": "eval"})
    episodes, _ = roll(generator, refs, concurrent=4, task=greedy)
    lockstep = rollout([make_env("minishop") for _ in range(4)], refs, generator, agent="target", iteration=1,
                       prompt=PROMPT, seed=3, temperature=0.0, kind="eval")
    assert [ep.actions for ep in episodes] == [ep.actions for ep in lockstep]
    assert [ep.tokens_generated for ep in episodes] == [ep.tokens_generated for ep in lockstep]


def test_resume_skips_finished_episodes_and_drops_a_torn_line(env_tasks, generator, tmp_path):
    refs = expand_tasks(env_tasks[:5], "train", samples=1)
    out = tmp_path / "episodes.jsonl"
    full, _ = roll(generator, refs, concurrent=3, out=out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # two whole episodes and a torn third
    resumed, stats = roll(generator, refs, concurrent=3, out=out)
    assert stats["episodes_resumed"] == 2 and stats["episodes_run"] == 3
    assert [ep.actions for ep in resumed] == [ep.actions for ep in full]
    assert Counter(ep.episode_id for ep in read_episodes(out)) == Counter(ep.episode_id for ep in full)


def test_run_async_works_inside_a_running_event_loop():
    async def inside() -> int:
        return run_async(asyncio.sleep(0, result=7))  # a Jupyter kernel's situation

    assert asyncio.run(inside()) == 7


KILLED_ROLLOUT = """
import sys
from pathlib import Path
from coevo_lib.backends import HFBatcher
from coevo_lib.config import RolloutConfig
from coevo_lib.engine import rollout_async
from coevo_lib.envs import make_env
from coevo_lib.models import load_model, load_tokenizer
from coevo_lib.rollout import HFGenerator, expand_tasks, expert_corpus
sys.path.insert(0, {tests!r})
from test_engine import SMALL, PROMPT, TASK
generator = HFGenerator(load_model({checkpoint!r}, SMALL).eval(), load_tokenizer({checkpoint!r}),
                        RolloutConfig(max_new_tokens=16), PROMPT.max_prompt_tokens)
refs = expand_tasks(make_env("minishop").task_ids("train")[:10], "train", 1)
envs = [make_env("minishop") for _ in range(3)]
rollout_async(envs, refs, lambda: HFBatcher(generator, 3), generator.tokenizer, TASK, Path({out!r}))
"""


def test_sigkilled_rollout_resumes_with_no_episode_lost_or_duplicated(env_tasks, checkpoint, generator, tmp_path):
    out = tmp_path / "episodes.jsonl"
    script = KILLED_ROLLOUT.format(tests=str(Path(__file__).parent), checkpoint=checkpoint, out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    while process.poll() is None and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.02)
    assert process.poll() is None, f"the rollout ended before it could be killed: {process.stderr.read()[-2000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {ep.episode_id: ep.actions for ep in read_episodes(out)}
    assert 3 <= len(before) < 10

    refs = expand_tasks(env_tasks[:10], "train", samples=1)
    resumed, stats = roll(generator, refs, concurrent=3, out=out)
    unbroken, _ = roll(generator, refs, concurrent=3)
    assert stats["episodes_resumed"] == len(before)
    assert all(before[ep.episode_id] == ep.actions for ep in resumed if ep.episode_id in before)
    assert [ep.actions for ep in resumed] == [ep.actions for ep in unbroken]
    assert Counter(ep.episode_id for ep in read_episodes(out)) == Counter(ep.episode_id for ep in unbroken)


@pytest.fixture(scope="module")
def env_tasks() -> list[str]:
    return make_env("minishop").task_ids("train")


SMOKE = [
    "rollout.max_tasks=6", "rollout.max_new_tokens=16", "eval.max_tasks=4", "sft.epochs=1", "dpo.epochs=1",
    "loop.failure_dpo.epochs=1", "loop.iterations=1", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
    "model.tiny.num_heads=1", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=512",
    "model.tiny.tokenizer_tasks_per_split=30", "sft.share=false",
]


def test_a_coevo_run_on_the_async_hf_schedule_records_engine_statistics(tmp_path):
    from coevo_lib.api import run

    run_dir = run("configs/minishop/coevo.yaml", SMOKE + ["rollout.schedule=async", "rollout.max_concurrent=3"],
                  run_dir=tmp_path / "run")
    metrics = {row["stage"]: row for row in run_dir.metrics()}
    rollout = metrics["it1-rollout-failure"]
    assert rollout["engine"]["backend"] == "hf" and rollout["engine"]["episodes_run"] == rollout["episodes"] == 6
    assert rollout["engine"]["requests"] == round(rollout["mean_steps"] * 6)
    assert metrics["it1-eval"]["test_seen_engine"]["episodes_run"] == metrics["it1-eval"]["test_seen_n"] == 4


def test_http_replies_are_decoded_from_the_engines_ids_when_a_tokenizer_is_given(generator):
    from coevo_lib.backends import parse_completion

    tokenizer = generator.tokenizer
    ids = tokenizer.encode("Thought: ok\nAction: click[b]", add_special_tokens=False)
    cut = tokenizer.encode("é", add_special_tokens=False)  # a character the byte-level BPE may split
    body = {"choices": [{"text": "Thought: ok\nAction: click[b]", "token_ids": ids + [tokenizer.eos_token_id],
                         "finish_reason": "stop"}], "usage": {"completion_tokens": len(ids) + 1}}
    reply = parse_completion(body, lambda row: tokenizer.decode(row, skip_special_tokens=True))
    assert reply.token_ids == ids and reply.tokens == len(ids) + 1  # the stop token counted, not kept
    assert reply.text == tokenizer.decode(ids, skip_special_tokens=True)
    partial = {"choices": [{"text": "", "token_ids": cut[:1], "finish_reason": "length"}],
               "usage": {"completion_tokens": 1}}
    assert parse_completion(partial, tokenizer.decode).text == tokenizer.decode(cut[:1])
    assert parse_completion(partial).text == ""  # without a tokenizer, the server's own text
