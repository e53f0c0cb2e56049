"""Decision-boundary views on hand-made log-prob tables with known answers (no model is loaded).

A table scorer gives every assistant turn a fixed log-prob per token and a fixed token count, so the
summed, per-token and step margins of a pair can be worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coevo_lib.analysis import boundary, boundary_views, negatives, perturb
from coevo_lib.config import PromptConfig
from coevo_lib.envs import make_env
from coevo_lib.records import Episode, write_json_atomic, write_jsonl_atomic
from coevo_lib.rollout import expert_episode

SYSTEM = {"role": "system", "content": "You shop."}
TOKENS_PER_TURN = 5


def episode(eid: str, actions: list[str], reward: float, agent: str = "target", iteration: int = 1,
            split: str = "test_seen", temperature: float = 0.0, task: str = "t") -> Episode:
    messages = [SYSTEM, {"role": "user", "content": f"Instruction: task {task}"}]
    for action in actions:
        messages += [{"role": "assistant", "content": f"Action: {action}"}, {"role": "user", "content": "ok"}]
    return Episode(episode_id=eid, task_id=task, split=split, agent=agent, iteration=iteration,
                   messages=messages[:-1], actions=actions, reward=reward, success=reward == 1.0,
                   steps=len(actions), seed=0, temperature=temperature)


def table_scorer(per_token: dict[str, float], default: float = -1.0, tokens=lambda text: TOKENS_PER_TURN):
    """(prompt, completion) -> (sum over assistant turns of per-token log-prob x tokens, tokens)."""
    def score_one(completion):
        turns = [m["content"] for m in completion if m["role"] == "assistant"]
        return (sum(per_token.get(t, default) * tokens(t) for t in turns), sum(tokens(t) for t in turns))
    return lambda requests: [score_one(completion) for _, completion in requests]


def rows_for(expert: Episode, negative: Episode, policy, reference, beta: float = 0.5) -> dict:
    item = boundary.boundary_item(expert, negative, "run")
    [scores], [ref] = boundary.score_items(policy, [item]), boundary.score_items(reference, [item])
    return boundary.margin_row(item, 1, scores, ref, beta)


# -- length -----------------------------------------------------------------------------------


def test_a_length_only_difference_shows_in_summed_margins_and_vanishes_per_token():
    """The negative is the expert's first two turns: every turn equally likely, only the length differs."""
    expert = episode("expert/t", ["a", "b", "c", "d"], 1.0, "expert", 0)
    negative = episode("n", ["a", "b"], 0.0)
    row = rows_for(expert, negative, table_scorer({}, -2.0), table_scorer({}, -3.0), beta=0.5)
    assert row["expert_tokens"] == 20 and row["negative_tokens"] == 10
    assert row["loglik_margin"] == pytest.approx(-40.0 - -20.0)  # the shorter negative "wins" by 20 nats
    assert row["loglik_margin_per_token"] == pytest.approx(0.0)
    assert row["implicit_margin"] == pytest.approx(0.5 * ((-40 + 60) - (-20 + 30)))  # 5: length again
    assert row["implicit_margin_per_token"] == pytest.approx(0.0)
    assert row["step_gap"] is None  # the negative has no turn where it leaves the path


def test_a_worse_turn_shows_per_token_even_when_the_negative_is_shorter():
    expert = episode("expert/t", ["a", "b", "c", "d"], 1.0, "expert", 0)
    negative = episode("n", ["a", "x"], 0.0)
    row = rows_for(expert, negative, table_scorer({"Action: x": -5.0}, -1.0), table_scorer({}, -1.0))
    assert row["loglik_margin"] == pytest.approx(-20.0 - (-5.0 - 25.0))  # +10: here the turn dominates length
    assert row["loglik_margin_per_token"] == pytest.approx(-1.0 - (-30.0 / 10))
    assert row["divergence_step"] == 1 and row["step_gap"] == pytest.approx(-5.0 - -25.0)
    assert row["step_gap_per_token"] == pytest.approx(-1.0 - -5.0)


def test_the_batched_model_scorer_equals_the_trainers_sequence_logps(tiny_model, tiny_tokenizer):
    from coevo_lib.train.dpo import sequence_logps

    expert = episode("expert/t", ["search[red mug]", "click[B0AAAA]", "click[buy now]"], 1.0, "expert", 0)
    requests = [(expert.messages[:2], expert.messages[2:k]) for k in (3, 5, 7)]  # 1, 2 and 3 turns: padding
    scored = boundary.model_scorer(tiny_model, tiny_tokenizer, batch_size=2)(requests)
    expected = [sequence_logps(tiny_model, tiny_tokenizer, p, c) for p, c in requests]
    assert [logp for logp, _ in scored] == pytest.approx(expected, abs=1e-4)
    assert scored[0][1] < scored[1][1] < scored[2][1]


def test_per_token_margins_refuse_an_empty_completion():
    with pytest.raises(ValueError, match="assistant tokens"):
        boundary.per_token(-3.0, 0)


# -- perturbed experts --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop():
    return make_env("minishop", n_train=16, n_test_seen=8, n_test_unseen=8, max_steps=8)


def option_task(shop) -> str:
    return next(t for t in shop.task_ids("test_seen") if shop.goal(t)["options"])


@pytest.mark.parametrize("kind, step", [("wrong_option", 2), ("wrong_item", 1)])
def test_a_perturbed_expert_differs_at_its_known_step_and_is_a_real_trajectory(shop, kind, step):
    task = option_task(shop)
    expert = expert_episode(shop, task, "test_seen", PromptConfig())
    negative = perturb.perturbed_episode(shop, task, "test_seen", PromptConfig(), kind)
    differing = [i for i, (a, b) in enumerate(zip(expert.actions, negative.actions)) if a != b]
    assert differing == [step] and len(negative.actions) == len(expert.actions)
    assert negative.agent == f"perturbed_{kind}" and 0.0 < negative.reward < 1.0 and not negative.success
    assert boundary.boundary_item(expert, negative, "").divergence_step == step
    # The observation after the changed action is the environment's answer to it, not the expert's.
    turn = [i for i, m in enumerate(negative.messages) if m["role"] == "assistant"][step]
    assert negative.messages[turn + 1] != expert.messages[turn + 1]


def test_a_wrong_option_misses_exactly_one_part_of_the_reward(shop):
    task = option_task(shop)
    goal = shop.goal(task)
    parts = len(goal["attributes"]) + len(goal["options"]) + 1
    negative = perturb.perturbed_episode(shop, task, "test_seen", PromptConfig(), "wrong_option")
    assert negative.reward == pytest.approx((parts - 1) / parts)


@pytest.mark.parametrize("expert_turn, negative_turn, sign", [(-1.0, -3.0, 1), (-3.0, -1.0, -1)])
def test_a_perturbed_negative_gives_the_step_gap_sign_of_its_table(shop, expert_turn, negative_turn, sign):
    """The two trajectories share every turn but the perturbed one, so the step gap is that turn's gap."""
    task = option_task(shop)
    expert = expert_episode(shop, task, "test_seen", PromptConfig())
    negative = perturb.perturbed_episode(shop, task, "test_seen", PromptConfig(), "wrong_option")
    step = perturb.FIRST_OPTION_STEP
    turn = lambda ep: [m["content"] for m in ep.messages if m["role"] == "assistant"][-ep.steps:][step]  # noqa: E731
    table = table_scorer({turn(expert): expert_turn, turn(negative): negative_turn}, -1.0)
    row = rows_for(expert, negative, table, table_scorer({}, -1.0))
    assert row["divergence_step"] == step and np.sign(row["step_gap"]) == sign
    assert row["step_gap"] == pytest.approx(TOKENS_PER_TURN * (expert_turn - negative_turn))
    assert np.sign(row["loglik_margin_per_token"]) == sign and row["expert_tokens"] == row["negative_tokens"]


def test_environments_without_a_perturbation_give_none(shop):
    class Other:
        name = "scienceworld"

    assert perturb.perturbation(Other(), "t", "wrong_option") is None
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb.perturbation(shop, option_task(shop), "wrong_colour")


def test_word_swap_leaves_words_that_contain_the_value_alone():
    assert perturb.swap_word("I need size s.", "s", "m") == "I need size m."
    with pytest.raises(ValueError, match="does not occur"):
        perturb.swap_word("I need size xl.", "s", "m")


# -- sources and self-generation ----------------------------------------------------------------


def write_run(root: Path, name: str, files: dict[str, list[Episode]], stages: dict[str, dict]) -> Path:
    run = root / name
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text("env: {name: minishop}\nprompt: {react: true}\n")
    for file_name, records in files.items():
        write_jsonl_atomic(run / "episodes" / f"{file_name}.jsonl", records)
    for stage, payload in stages.items():
        write_json_atomic(run / "stages" / f"{stage}.json", payload)
    return run


def test_negatives_are_labelled_by_source_and_generating_checkpoint(tmp_path):
    shared = {"sft": {"shared_sft": "/study/_shared/sft-abc"}}
    coevo = write_run(tmp_path, "coevo-seed0", {
        "it0-eval-test_seen-target": [episode("e0", ["a"], 0.2, iteration=0)],
        "it1-eval-test_seen-target": [episode("e1", ["b"], 0.7), episode("ok", ["c"], 1.0)],
        "it1-train-target": [episode("s1", ["d"], 0.3, split="train", temperature=0.7)],
        "it2-train-target": [episode("s2", ["e"], 0.1, split="train", iteration=2, temperature=0.7)],
        "it2-train-failure": [episode("f2", ["f"], 0.8, "failure", 2, "train", 0.7)],
        "it1-train-positive": [episode("p1", ["g"], 0.1, "positive", 1, "train", 0.7)]},
        {**shared, "it1-train-target": {"checkpoint": "/x/coevo-seed0/checkpoints/target-it1"},
         "it1-train-failure": {"checkpoint": "/x/coevo-seed0/checkpoints/sft"}})  # a frozen failure agent
    eto = write_run(tmp_path, "eto-seed0", {"it0-eval-test_seen-target": [episode("e0", ["a"], 0.2, iteration=0)]},
                    shared)
    found = negatives.natural_negatives(negatives.compatible_runs(coevo, [eto]))
    by_id = {n.episode.episode_id: n for n in found}
    assert set(by_id) == {"e0", "e1", "s1", "s2", "f2"}  # successes, positive agents, duplicates dropped
    assert [by_id[i].source for i in ("e0", "e1", "s1", "f2")] == [
        "greedy_eval", "greedy_eval", "sampled_target", "sampled_failure_agent"]
    sft = "sft:/study/_shared/sft-abc"
    assert by_id["e0"].generator == by_id["s1"].generator == by_id["f2"].generator == sft
    assert by_id["e1"].generator == by_id["s2"].generator == "coevo-seed0/target-it1"
    assert negatives.model_identity(eto, "target", 0) == sft  # shared SFT: the same model in every run


def test_a_row_knows_whether_the_scored_checkpoint_generated_its_negative():
    expert = episode("expert/t", ["a", "b"], 1.0, "expert", 0)
    item = boundary.boundary_item(expert, episode("n", ["a", "x"], 0.3), "run", "greedy_eval", "run/target-it1")
    [scores] = boundary.score_items(table_scorer({}), [item])
    assert boundary.margin_row(item, 1, scores, scores, 0.1, "run/target-it1")["self_generated"]
    assert not boundary.margin_row(item, 2, scores, scores, 0.1, "run/target-it2")["self_generated"]


def test_the_cap_applies_to_each_source():
    pool = [negatives.Negative(episode(f"{s}{i}", ["a"], 0.1 * i), "run", s, "g")
            for s in ("greedy_eval", "perturbed_item") for i in range(6)]
    kept = negatives.capped_per_source(pool, 4)
    assert [sum(n.source == s for n in kept) for s in ("greedy_eval", "perturbed_item")] == [4, 4]
    uncapped = negatives.capped_per_source(pool, None)  # every negative, in a fixed order that mixes runs
    assert sorted(n.episode.episode_id for n in uncapped) == sorted(n.episode.episode_id for n in pool)
    assert uncapped == negatives.capped_per_source(list(reversed(pool)), None)


# -- length-matched comparison and regression ---------------------------------------------------


def frame(rows: list[dict]) -> pd.DataFrame:
    base = {"run": "r", "method": "coevo", "iteration": 1, "expert_tokens": 20, "self_generated": False,
            "source": "greedy_eval", "step_gap": np.nan, "implicit_margin": np.nan}
    return boundary_views.margins_long(pd.DataFrame([{**base, **row} for row in rows]))


def test_length_matching_removes_a_difference_that_only_length_makes():
    """Margin = -0.1 x negative length; hard negatives are the long ones. Raw: hard look closer to the
    boundary; within a length bin the classes are equal."""
    rows = []
    for tokens, n_hard, n_ordinary in ((10, 1, 5), (20, 2, 4), (30, 4, 2), (40, 5, 1)):
        for hard in [True] * n_hard + [False] * n_ordinary:
            margin = -0.1 * tokens
            rows.append({"negative_tokens": tokens, "hard_negative": hard, "negative_reward": 0.7 if hard else 0.2,
                         "loglik_margin": margin, "loglik_margin_per_token": margin,
                         "implicit_margin_per_token": margin})
    result = boundary_views.length_matched_difference(frame(rows)).set_index("view")
    assert result.loc["loglik_margin", "raw_difference"] < -0.5
    assert result.loc["loglik_margin", "matched_difference"] == pytest.approx(0.0)
    assert result.loc["loglik_margin", "bins_with_both"] == 2  # bins where each class has >= 2 pairs


def test_regression_recovers_known_coefficients_with_intervals_that_cover_them():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        reward, tokens, perturbed = rng.uniform(0, 0.95), int(rng.integers(5, 80)), i % 3 == 0
        margin = 1.0 - 2.0 * reward + 0.5 * (tokens - 20) / 100 + 0.8 * perturbed + rng.normal(0, 0.05)
        rows.append({"negative_tokens": tokens, "negative_reward": reward, "hard_negative": reward >= 0.6,
                     "source": "perturbed_item" if perturbed else "greedy_eval", "loglik_margin": margin,
                     "loglik_margin_per_token": margin, "implicit_margin_per_token": margin})
    fit = boundary_views.margin_regression(frame(rows), views=("loglik_margin",)).set_index("term")
    collinear = frame([{**row, "self_generated": row["source"] == "greedy_eval"} for row in rows])
    assert "self_generated" not in set(boundary_views.margin_regression(collinear, views=("loglik_margin",))["term"])
    truth = {"intercept": 1.0, "negative_reward": -2.0, "length_difference": 0.5, "source=perturbed_item": 0.8}
    assert set(fit.index) == set(truth)  # self_generated is constant here: dropped
    for term, value in truth.items():
        assert fit.loc[term, "ci_low"] < value < fit.loc[term, "ci_high"]
        assert fit.loc[term, "coef"] == pytest.approx(value, abs=0.05)
    assert boundary_views.regression_table(fit.reset_index())["term"].tolist() == [
        "negative_reward", "length_difference"]


def test_old_boundary_files_still_summarise():
    """Rows written before sources and token counts existed: greedy_eval, NaN where they lack data."""
    old = pd.DataFrame([{"run": "r", "method": "eto", "iteration": 1, "hard_negative": True,
                         "negative_reward": 0.7, "implicit_margin": 0.2, "loglik_margin": 3.0, "step_gap": 1.0}])
    margins = boundary_views.margins_long(old)
    assert margins.loc[0, "source_label"] == "greedy_eval" and np.isnan(margins.loc[0, "length_difference"])
    summary = boundary_views.source_summary(margins).set_index("view")
    assert summary.loc["step_gap", "mean"] == 1.0 and "loglik_margin_per_token" not in summary.index
    assert boundary_views.margin_regression(margins).empty
    assert json.dumps(boundary_views.length_matched_difference(margins).to_dict())  # no error, NaN differences


def test_paired_boundary_differences_pair_methods_on_the_same_perturbed_experts():
    rows = []
    for seed in (0, 1):
        for method, last, shift in (("sft", 0, 0.0), ("eto_sft", 2, 1.0), ("coevo", 2, 3.0), ("best_of_n", 0, 0.0)):
            for iteration in range(last + 1):
                for n, source in enumerate(["perturbed_item", "perturbed_item", "perturbed_option", "greedy_eval"]):
                    base = [2.0, -1.0, 0.5, -4.0][n] + seed
                    outlier = 100.0 if source == "greedy_eval" and method == "coevo" else 0.0
                    rows.append({"run": f"{method}-seed{seed}", "method": method, "seed": seed, "iteration": iteration,
                                 "task_id": f"t{n}", "negative_run": "" if n < 3 else "eto_sft-seed0",
                                 "negative_id": f"neg{n}", "source": source, "self_generated": None,
                                 "hard_negative": False, "negative_reward": 0.5,
                                 "step_gap": base + (shift if iteration == last else 0.0) + outlier})
    summary = boundary_views.paired_boundary_differences(pd.DataFrame(rows)).set_index(["comparison", "split", "metric"])
    gap = "step gap (nats)"
    assert summary.loc[("coevo − eto_sft", "perturbed_item", gap), "difference"] == pytest.approx(2.0)
    assert summary.loc[("coevo − eto_sft", "perturbed_item", gap), "ci_high"] == pytest.approx(2.0)  # constant
    assert summary.loc[("coevo − sft", "perturbed_option", gap), "difference"] == pytest.approx(3.0)
    # item 1 moves from -1 / 0 (seeds 0 / 1), not above 0, to +2 / +3 under coevo: 1 of 2 items more, +50 points
    assert summary.loc[("coevo − sft", "perturbed_item", "ranked correctly (%)"), "difference"] == pytest.approx(50.0)
    assert not summary.index.get_level_values("split").isin(["greedy_eval"]).any()  # generated negatives stay out
    assert not summary.index.get_level_values("comparison").str.startswith("best_of_n").any()  # SFT's own weights
