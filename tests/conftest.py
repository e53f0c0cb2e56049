"""Shared fixtures: a tiny tokenizer and model built offline in well under a second."""

from __future__ import annotations

import os
import socket

import pytest

from coevo_lib.config import TinyModelConfig
from coevo_lib.records import Episode, Pair
from coevo_lib.tiny_model import build_tiny_model, train_tiny_tokenizer

SYSTEM = {"role": "system", "content": "You shop. Answer with Thought and Action."}


def conversation(task: str, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """system, user task, then assistant/observation turns (the last observation omitted)."""
    messages = [SYSTEM, {"role": "user", "content": f"Instruction: {task}"}]
    for action, observation in turns:
        messages += [{"role": "assistant", "content": f"Thought: go\nAction: {action}"},
                     {"role": "user", "content": observation}]
    return messages[:-1]


CORPUS = [
    "Instruction: buy a red mug", "Thought: go Action: search[red mug] click[buy now]",
    "Observation: [B0AAAA] red mug | $10.00 [B0BBBB] blue mug | $12.00 Invalid action",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    config = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=512)
    return build_tiny_model(config, tiny_tokenizer, seed=0)


def make_episode(eid: str, task: str, turns, reward: float, agent: str = "target") -> Episode:
    return Episode(episode_id=eid, task_id=task, split="train", agent=agent, iteration=1,
                   messages=conversation(task, turns), actions=[a for a, _ in turns], reward=reward,
                   success=reward == 1.0, steps=len(turns), seed=0, temperature=1.0)


@pytest.fixture()
def shop_pairs() -> list[Pair]:
    from coevo_lib.pairs import make_pair

    expert = make_episode("e", "buy a red mug", [("search[red mug]", "[B0AAAA] red mug | $10.00"),
                                                  ("click[B0AAAA]", "red mug [Buy Now]"), ("click[buy now]", "")],
                          1.0, "expert")
    failure = make_episode("f", "buy a red mug", [("search[mug]", "[B0BBBB] blue mug | $12.00"),
                                                   ("click[B0BBBB]", "blue mug [Buy Now]"), ("click[buy now]", "")],
                           0.5)
    return [make_pair("eto", expert, failure), make_pair("eto", expert, failure)]


@pytest.fixture(scope="session")
def vllm_bin():
    """vLLM's python (.venv-vllm); the tests that need it skip without it, unless COEVO_REQUIRE_VLLM is set (CI)."""
    from coevo_lib.serving import VLLMServerError, vllm_python

    try:
        return vllm_python()
    except VLLMServerError as missing:
        if os.environ.get("COEVO_REQUIRE_VLLM"):
            raise
        pytest.skip(f"{missing} (COEVO_REQUIRE_VLLM=1 makes this a failure)")


@pytest.fixture()
def taken_port():
    """A port another socket holds, as a second study worker's server or rendezvous would, between its bind
    and its listen: a bind there fails with EADDRINUSE, and a health probe is refused at once rather than
    left waiting for its timeout."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]
