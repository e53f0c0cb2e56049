"""SRLM's judge prompt, reward stripping, score parsing and pair rule on hand-made episodes (no model)."""

from __future__ import annotations

import random
import zlib

import pytest

from coevo_lib.methods.srlm_judge import (expected_score, judge_agreement, judge_messages, mean_score,
                                          parse_score, spearman, srlm_pairs, strip_reward_text)
from tests.conftest import make_episode


def test_judge_prompt_holds_the_task_and_the_transcript_without_reward_text():
    episode = make_episode("x", "buy a red mug", [("search[red mug]", "[1] red mug | $10.00"),
                                                  ("click[1]", "Your reward is 0.50. red mug [Buy Now]"),
                                                  ("click[buy now]", "")], 0.5)
    content = judge_messages(episode, observation_chars=12)[0]["content"]
    assert "Task: Instruction: buy a red mug\nInteraction log:\n" in content
    assert ("Thought: go\nAction: search[red mug]\nObservation: [1] red mug\nThought: go\nAction: click[1]\n"
            "Observation: red mug [Buy\nThought: go\nAction: click[buy now]\nAfter examining") in content
    assert "0.50" not in content and content.rstrip().endswith('"Score: <total points>".')


@pytest.mark.parametrize(("text", "stripped"), [
    ("Thank you for shopping. Your reward is 0.87.", "Thank you for shopping."),
    ("Submitted. Reward: 0.50", "Submitted."),
    ("Your score is 87", ""),
    ("[2] rewarding mug | $3.00", "[2] rewarding mug | $3.00"),
])
def test_reward_text_is_stripped(text, stripped):
    assert strip_reward_text(text) == stripped


@pytest.mark.parametrize(("reply", "score"), [
    ("Relevant and complete. Score: 4", 4.0), ("Score: 3.5.", 3.5), ("Score: 2 then Score: 5", 5.0),
    ("Score: 7", None), ("four points", None), ("Score: .", None),
])
def test_score_parsing(reply, score):
    assert parse_score(reply) == score


def test_mean_score_drops_unparseable_samples():
    assert mean_score(["Score: 4", "no idea", "Score: 2"]) == 3.0
    assert mean_score(["no", "idea"]) is None


def test_expected_score_fallback():
    assert expected_score([0.0] * 6) == 2.5
    assert expected_score([-50.0, -50.0, -50.0, 0.0, -50.0, -50.0]) == pytest.approx(3.0)


def scored(task, rewards, scores):
    episodes = [make_episode(f"{task}/s{i}", task, [(f"a{i}", "o")] * 2, r) for i, r in enumerate(rewards)]
    return episodes, {ep.episode_id: s for ep, s in zip(episodes, scores)}


def test_pairs_best_vs_worst_ties_and_thin_tasks_dropped():
    a, scores_a = scored("A", [0.0, 1.0, 0.5, 0.2], [3.0, 1.0, 2.0, None])
    b, scores_b = scored("B", [0.0, 1.0], [2.0, 2.0])
    c, scores_c = scored("C", [0.0, 1.0], [None, 4.0])
    pairs = srlm_pairs(a + b + c, {**scores_a, **scores_b, **scores_c})
    assert [(p.kind, p.chosen_episode_id, p.rejected_episode_id) for p in pairs] == [("srlm", "A/s0", "A/s1")]
    # The judge preferred the env's worst episode: recorded, never corrected.
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward) == (0.0, 1.0)
    agreement = judge_agreement(a + b + c, {**scores_a, **scores_b, **scores_c})
    assert agreement["judge_tasks"] == 2 and agreement["pairs_env_agree"] == 0.0
    assert agreement["judge_best_is_env_best"] == 0.0  # A: no; B: the first of the tied scores (r=0.0): no
    assert agreement["judge_env_spearman"] == pytest.approx(-1.0)  # A only; B's judge scores are constant


def test_spearman_with_ties():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 2], [3, 2, 1]) == pytest.approx(-0.8660254)
    assert spearman([1, 1], [0, 1]) is None


def judge_by_text(episodes):
    """A scripted judge whose score is a function of what it is shown (the prompt text) only."""
    return {ep.episode_id: float(zlib.crc32(judge_messages(ep, 200)[0]["content"].encode()) % 6) for ep in episodes}


def test_permuting_env_rewards_leaves_srlm_pairs_unchanged():
    rng = random.Random(0)
    rewards = [round(rng.random(), 2) for _ in range(12)]

    def episodes_with(rewards):
        # The reward is also stated in an observation, as minishop's and InterCode's last observations do.
        return [make_episode(f"t{i // 4}/s{i % 4}", f"task {i // 4}",
                             [(f"search[item {i % 3}]", f"page. Your reward is {r:.2f}."), ("click[buy now]", "")], r)
                for i, r in enumerate(rewards)]

    original = episodes_with(rewards)
    permuted = episodes_with(rng.sample(rewards, len(rewards)))
    assert [ep.reward for ep in original] != [ep.reward for ep in permuted]
    assert pair_ids(original) == pair_ids(permuted) and pair_ids(original)


def pair_ids(episodes):
    return [(p.chosen_episode_id, p.rejected_episode_id) for p in srlm_pairs(episodes, judge_by_text(episodes))]


def test_continuation_logps_equal_unpadded_scoring(tiny_model, tiny_tokenizer):
    import torch

    from coevo_lib.methods.srlm import continuation_logps

    prompt = tiny_tokenizer.encode("Instruction: buy a red mug", add_special_tokens=False)
    continuations = [tiny_tokenizer.encode(text, add_special_tokens=False) for text in ("Score: 3", "mug", "Score")]
    assert len({len(c) for c in continuations}) > 1  # left padding is exercised
    batched = continuation_logps(tiny_model, tiny_tokenizer.pad_token_id, prompt, continuations)
    for continuation, value in zip(continuations, batched):
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logps = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        expected = sum(float(logps[len(prompt) - 1 + k, token]) for k, token in enumerate(continuation))
        assert value == pytest.approx(expected, abs=1e-4)
