"""Analysis library on hand-made episodes, pairs and run directories (test fixtures, not real runs)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from coevo_lib.analysis import boundary, boundary_views, hard_negatives as hn, loading, negatives, tables
from coevo_lib.config import dump_config, load_config
from coevo_lib.figures import PRODUCTS, build_figures
from coevo_lib.pairs import make_pair
from coevo_lib.records import Episode, write_json_atomic, write_jsonl_atomic

SYSTEM = {"role": "system", "content": "You shop."}


def episode(eid: str, task: str, actions: list[str], reward: float, agent: str = "target", iteration: int = 1,
            split: str = "train") -> Episode:
    """A hand-made episode: instruction, then one assistant turn and one observation per action."""
    messages = [SYSTEM, {"role": "user", "content": f"Instruction: task {task}"}]
    for action in actions:
        messages += [{"role": "assistant", "content": f"Thought: go\nAction: {action}"},
                     {"role": "user", "content": f"after {action}"}]
    return Episode(episode_id=eid, task_id=task, split=split, agent=agent, iteration=iteration,
                   messages=messages[:-1], actions=actions, reward=reward, success=reward == 1.0,
                   steps=len(actions), seed=0, temperature=1.0, tokens_generated=10 * len(actions))


# -- sequence distances -----------------------------------------------------------------------


def test_edit_distance_on_action_sequences():
    assert hn.edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert hn.edit_distance([], ["a", "b"]) == 2
    assert hn.normalised_edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 0.5
    assert hn.normalised_edit_distance([], []) == 0.0
    assert hn.normalised_edit_distance(["a"], ["b"]) == 1.0


def test_first_divergence():
    assert hn.first_divergence(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert hn.first_divergence(["a", "b"], ["a", "b"]) is None
    assert hn.first_divergence(["a", "b"], ["a", "b", "c"]) == 2  # a prefix leaves the path where it ends
    assert hn.first_divergence([], ["a"]) == 0


# -- shares, counts, histograms, diversity ----------------------------------------------------


def rollout_frame() -> pd.DataFrame:
    """One coevo run: target rollouts (one success, five failures) and failure-agent rollouts, experts."""
    rows = [episode("e1", "t1", ["a", "b", "c"], 1.0, "expert", 0), episode("e2", "t2", ["a", "b"], 1.0, "expert", 0)]
    rows += [episode(f"t{i}", "t1", ["a", "x", "c"], r) for i, r in enumerate([1.0, 0.0, 0.55, 0.65, 0.75, 0.95])]
    rows += [episode("f1", "t1", ["a", "b"], 0.7, "failure"), episode("f2", "t2", ["a", "b", "z"], 0.2, "failure"),
             episode("f3", "t2", ["a", "b", "z"], 0.2, "failure")]
    return episodes_frame(rows)


def episodes_frame(rows: list[Episode]) -> pd.DataFrame:
    """Episodes as the analysis reads them, all from one coevo run."""
    data = pd.DataFrame([{**r.__dict__, "actions": tuple(r.actions)} for r in rows])
    data["kind"] = ["expert" if a == "expert" else "train" for a in data["agent"]]
    data["hard_negative"] = (data["reward"] >= 0.6) & (data["reward"] < 1.0)
    data["run"], data["method"], data["seed"] = "coevo-seed0", "coevo", 0
    data["source"] = "coevo/" + data["agent"]
    return data


def by_agent(data: pd.DataFrame, agent: str) -> pd.DataFrame:
    return data[data["agent"] == agent].reset_index(drop=True)


def test_threshold_curve_shares():
    curve = by_agent(hn.threshold_curve(rollout_frame()), "target")
    assert list(curve["threshold"]) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert list(curve["share"]) == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])  # of 5 failures: .55 .65 .75 .95
    assert set(curve["failures"]) == {5}


def test_outcome_counts_and_mix():
    counts = by_agent(hn.outcome_counts(rollout_frame()), "target").iloc[0]
    assert (counts["episodes"], counts["successes"], counts["failures"], counts["hard_negatives"]) == (6, 1, 5, 3)
    assert counts["success_rate"] == pytest.approx(1 / 6)
    mix = by_agent(hn.outcome_mix(hn.outcome_counts(rollout_frame())), "failure").iloc[0]
    assert (mix["ordinary_failures"], mix["hard_negatives"], mix["label"]) == (2, 1, "coevo/failure it1")


def test_failure_reward_histogram_bins():
    histogram = by_agent(hn.failure_reward_histogram(rollout_frame()), "target")
    assert list(histogram["count"]) == [1, 0, 0, 0, 0, 1, 1, 1, 0, 1]
    assert histogram["share"].sum() == pytest.approx(1.0)


def test_failure_rewards_on_a_bin_edge_fall_in_the_bin_they_open():
    rows = [episode(f"t{i}", "t1", ["a"], reward) for i, reward in enumerate((0.3, 3 / 5, 0.7, 0.0))]
    histogram = by_agent(hn.failure_reward_histogram(episodes_frame(rows)), "target")
    assert list(histogram["count"]) == [1, 0, 0, 1, 0, 0, 1, 1, 0, 0]  # 0.6 opens [0.6, 0.7): a hard negative


def test_failure_diversity_and_collapse_monitor():
    diversity = by_agent(hn.failure_diversity(rollout_frame()), "failure").iloc[0]
    # (a,b), (a,b,z), (a,b,z): 2 distinct of 3; pairwise distances 1/3, 1/3, 0.
    assert diversity["distinct_share"] == pytest.approx(2 / 3)
    assert diversity["mean_pairwise_distance"] == pytest.approx(2 / 9)
    monitor = hn.collapse_monitor(rollout_frame())
    assert list(monitor["agent"]) == ["failure"]
    assert monitor.loc[0, "success_rate"] == 0.0
    # f1 (a,b) vs the target's five failures (a,x,c) on t1: distance 2/3 each; t2 has no target failure.
    assert monitor.loc[0, "mean_target_distance"] == pytest.approx(2 / 3)


def test_closeness_to_expert():
    closeness = hn.closeness_to_expert(rollout_frame())
    target = by_agent(closeness, "target")
    assert list(target["expert_distance"]) == pytest.approx([1 / 3] * 5) and set(target["divergence_step"]) == {1}
    failure = by_agent(closeness, "failure").set_index("reward")
    assert failure.loc[0.7, "expert_distance"] == pytest.approx(1 / 3) and failure.loc[0.7, "divergence_step"] == 2
    assert set(by_agent(closeness, "failure")["divergence_step"]) == {2}  # (a,b,z) vs expert (a,b)


def test_pair_counts():
    expert = episode("e", "t1", ["a", "b"], 1.0, "expert", 0)
    pairs = [make_pair("eto", expert, episode("n1", "t1", ["a"], 0.7)),
             make_pair("eto", expert, episode("n2", "t1", ["b"], 0.1))]
    frame = pd.DataFrame([{**p.__dict__, "iteration": 1, "run": "r", "method": "eto", "seed": 0,
                           "rejected_hard_negative": 0.6 <= p.rejected_reward < 1} for p in pairs])
    counts = hn.pair_counts(frame).iloc[0]
    assert (counts["kind"], counts["pairs"], counts["hard_negative_pairs"]) == ("eto", 2, 1)


# -- triplets ---------------------------------------------------------------------------------


def triplet_fixture() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([{"run": "eto-seed0", "method": "eto", "seed": 0, "env": "shop"},
                         {"run": "coevo-seed0", "method": "coevo", "seed": 0, "env": "shop"},
                         {"run": "coevo-seed1", "method": "coevo", "seed": 1, "env": "shop"}])
    made = {"eto-seed0": [episode("eto/a", "t1", ["x"], 0.2), episode("eto/b", "t1", ["y"], 0.4),
                          episode("eto/c", "t2", ["y"], 0.1)],
            "coevo-seed0": [episode(f"e{t}", t, ["a", "b"], 1.0, "expert", 0) for t in ("t1", "t2", "t3")]
            + [episode("f/t1", "t1", ["a"], 0.7, "failure"), episode("f/t2", "t2", ["a", "c"], 0.8, "failure"),
               episode("f/t2b", "t2", ["q"], 0.3, "failure"), episode("f/t3", "t3", ["a"], 0.9, "failure")],
            "coevo-seed1": [episode("g/t1", "t1", ["a"], 0.95, "failure")]}
    rows = []
    for run, episodes in made.items():
        for ep in episodes:
            rows.append({**ep.__dict__, "actions": tuple(ep.actions), "run": run, "seed": int(run[-1]),
                         "kind": "expert" if ep.agent == "expert" else "train",
                         "hard_negative": 0.6 <= ep.reward < 1.0})
    return pd.DataFrame(rows), runs


def test_select_triplets_matches_tasks_and_ranks_by_hard_negative():
    episodes, runs = triplet_fixture()
    triplets = hn.select_triplets(episodes, runs)
    # t3 has no ETO failure; seed 1 has no ETO run; t2's hard negative (0.8) outranks t1's (0.7).
    assert [t["task_id"] for t in triplets] == ["t2", "t1"]
    assert [t["hard_negative"]["episode_id"] for t in triplets] == ["f/t2", "f/t1"]
    assert [t["eto_failure"]["episode_id"] for t in triplets] == ["eto/c", "eto/b"]  # highest-reward ETO failure
    assert triplets[0]["expert"]["episode_id"] == "et2"
    text = hn.triplets_markdown(triplets)
    assert "## Task t2 (seed 0, iteration 1)" in text and "1. `a` -> after a" in text and "(reward 0.80" in text


def test_no_triplets_says_why():
    assert "No matched triplets" in hn.triplets_markdown([])


# -- tables -----------------------------------------------------------------------------------


def test_t_interval():
    mean, half, n = tables.mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    mean, half, n = tables.mean_ci([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(half)
    assert tables.t_critical(31) == pytest.approx(2.0395, abs=2e-4)
    assert tables.t_critical(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError):
        tables.t_critical(0)


def eval_frame() -> pd.DataFrame:
    rows = [("coevo-seed0", "coevo", 0, 0, 10.0), ("coevo-seed0", "coevo", 0, 2, 40.0),
            ("coevo-seed1", "coevo", 1, 0, 12.0), ("coevo-seed1", "coevo", 1, 2, 60.0),
            ("sft-seed0", "sft", 0, 0, 30.0), ("eto-seed0", "eto", 0, 2, 20.0)]
    return pd.DataFrame([{"run": r, "method": m, "seed": s, "iteration": i, "split": "test_seen", "reward": v,
                          "success": v, "n": 4} for r, m, s, i, v in rows])


def test_main_table_uses_final_iteration_and_formats_ci():
    table = tables.wide(tables.main_table(eval_frame()))
    assert list(table["method"]) == ["sft", "eto", "coevo"]  # the paper's order
    cells = dict(zip(table["method"], table["test_seen"]))
    half = 12.706 * math.sqrt(200.0) / math.sqrt(2)  # sd of (40, 60) = sqrt(200)
    assert cells["coevo"] == f"50.0 ± {half:.1f} (n=2)"
    assert cells["sft"] == "30.0 (n=1)"
    assert list(tables.ablation_table(eval_frame())["method"]) == ["coevo"]


def test_learning_curves_summary():
    curves = tables.learning_curves(eval_frame())
    coevo = curves[curves["method"] == "coevo"].set_index("iteration")
    assert coevo.loc[0, "mean"] == 11.0 and coevo.loc[2, "n"] == 2


def test_compute_table_sums_stages_per_run():
    metrics = pd.DataFrame([
        {"run": "r", "method": "eto", "seed": 0, "stage": "sft", "iteration": 0, "tokens_trained": 100,
         "stage_wall_s": 30.0},
        {"run": "r", "method": "eto", "seed": 0, "stage": "it0-eval", "iteration": 0, "test_seen_tokens_generated": 7,
         "stage_wall_s": 6.0},
        {"run": "r", "method": "eto", "seed": 0, "stage": "it1-rollout-target", "iteration": 1,
         "tokens_generated": 50, "stage_wall_s": 12.0},
        {"run": "r", "method": "eto", "seed": 0, "stage": "it1-train-target", "iteration": 1, "tokens_trained": 20,
         "stage_wall_s": 12.0}])
    row = tables.compute_table(metrics).iloc[0]
    assert (row["training_tokens_generated"], row["eval_tokens"], row["tokens_trained"], row["wall_min"]) == (
        50, 7, 120, 1.0)
    by_iteration = tables.compute_by_iteration(metrics).set_index("iteration")
    assert by_iteration.loc[1, "tokens_trained"] == 20 and by_iteration.loc[0, "stage_wall_s"] == 36.0


def test_compute_table_counts_judge_search_and_verifier_generations_as_training_side():
    # SRLM's judge and Agent-R's search and verifier generate text to build training data, as rollouts do.
    stages = [("it1-rollout-target", 40), ("it1-judge-target", 30), ("it1-search-target", 200),
              ("it1-revise-target", 9), ("it1-eval", 0)]
    metrics = pd.DataFrame([{"run": "r", "method": "agent_r", "seed": 0, "stage": stage, "iteration": 1,
                             "tokens_generated": tokens, "test_seen_tokens_generated": 5 if "eval" in stage else None,
                             "stage_wall_s": 1.0} for stage, tokens in stages])
    row = tables.compute_table(metrics).iloc[0]
    assert (row["training_tokens_generated"], row["eval_tokens"]) == (279, 5)


def test_markdown_table():
    text = tables.markdown_table(pd.DataFrame({"a": ["x"], "b": [1234567.0], "c": [0.12345], "d": [float("nan")]}))
    assert text == "| a | b | c | d |\n|---|---|---|---|\n| x | 1,234,567 | 0.123 | - |\n"


# -- decision boundary ------------------------------------------------------------------------


def test_implicit_margin_sign():
    # The policy raised the expert (+2 over the reference) and lowered the negative (-5): margin beta * 7.
    assert boundary.implicit_margin(-10.0, -12.0, -20.0, -15.0, beta=0.1) == pytest.approx(0.7)
    assert boundary.implicit_margin(-12.0, -10.0, -15.0, -20.0, beta=0.1) == pytest.approx(-0.7)
    assert boundary.implicit_margin(-3.0, -3.0, -8.0, -8.0, beta=0.5) == 0.0  # pi = pi_ref


def test_boundary_item_finds_the_step_where_the_negative_leaves_the_expert():
    expert = episode("expert/t", "t", ["a", "b", "c"], 1.0, "expert", 0, "test_seen")
    negative = episode("n", "t", ["a", "x"], 0.7, "target", 1, "test_seen")
    item = boundary.boundary_item(expert, negative, "run")
    assert item.divergence_step == 1
    assert item.step_prefix == expert.messages[:4]  # system, instruction, turn a, its observation
    assert item.step_expert_turn["content"].endswith("Action: b")
    assert item.step_negative_turn["content"].endswith("Action: x")
    assert item.pair.rejected_reward == 0.7


def test_margins_from_logps_on_a_constructed_case(tiny_model, tiny_tokenizer):
    """A negative = the expert's turns plus one more turn: its log-likelihood can only be lower."""
    expert = episode("expert/t", "t", ["search[red mug]", "click[buy now]"], 1.0, "expert", 0, "test_seen")
    negative = episode("n", "t", ["search[red mug]", "click[buy now]", "click[buy now]"], 0.65, "target", 1,
                       "test_seen")
    item = boundary.boundary_item(expert, negative, "run")
    assert item.divergence_step == 2 and item.step_prefix is None  # the expert has no turn there
    [scores] = boundary.score_items(boundary.model_scorer(tiny_model, tiny_tokenizer), [item])
    assert scores["negative_tokens"] > scores["expert_tokens"] > 0 and scores["step_expert_logp"] is None
    row = boundary.margin_row(item, 1, scores, scores, beta=0.1)  # pi = pi_ref
    assert row["loglik_margin"] > 0 and row["implicit_margin"] == 0.0 and row["hard_negative"]
    assert row["implicit_margin_per_token"] == 0.0 and row["step_gap"] is None


def test_margin_row_step_gap():
    expert = episode("expert/t", "t", ["a", "b"], 1.0, "expert", 0, "test_seen")
    item = boundary.boundary_item(expert, episode("n", "t", ["a", "x"], 0.2, "target", 0, "test_seen"), "run")
    tokens = {"expert_tokens": 10, "negative_tokens": 10, "step_expert_tokens": 5, "step_negative_tokens": 5}
    scores = {"expert_logp": -5.0, "negative_logp": -9.0, "step_expert_logp": -1.0, "step_negative_logp": -4.0,
              **tokens}
    ref = {"expert_logp": -6.0, "negative_logp": -7.0, "step_expert_logp": -2.0, "step_negative_logp": -2.0,
           **tokens}
    row = boundary.margin_row(item, 2, scores, ref, beta=0.5)
    assert row["loglik_margin"] == 4.0 and row["implicit_margin"] == pytest.approx(0.5 * (1.0 - (-2.0)))
    assert row["step_gap"] == 3.0 and row["step_implicit_gap"] == pytest.approx(0.5 * (1.0 - (-2.0)))
    assert not row["hard_negative"] and row["reference"] == "sft"


def test_negative_cap_balances_hard_and_ordinary_failures():
    def kept(rewards, cap):
        pool = [(episode(f"n{i}", "t", ["a"], r), "run") for i, r in enumerate(rewards)]
        return [ep.reward for ep, _ in negatives.capped(pool, cap)]

    rewards = [0.1, 0.7, 0.3, 0.9, 0.65, 0.0, 0.8]
    assert kept(rewards, 4) == [0.1, 0.3, 0.9, 0.8]  # the 2 best hard + the first 2 ordinary, pool order kept
    assert kept(rewards, 3) == [0.1, 0.9, 0.8]  # the odd one goes to the hard negatives
    assert kept([0.1, 0.7, 0.9, 0.65, 0.8], 4) == [0.1, 0.7, 0.9, 0.8]  # 1 ordinary: hard ones fill up
    assert kept([0.1, 0.7, 0.3, 0.0, 0.2], 4) == [0.1, 0.7, 0.3, 0.0]  # 1 hard: ordinary ones fill up
    assert kept(rewards, None) == rewards


def test_preference_accuracy_by_class():
    margins = pd.DataFrame([
        {"method": "coevo", "iteration": 0, "hard_negative": True, "implicit_margin": 0.0, "loglik_margin": 1.0},
        {"method": "coevo", "iteration": 1, "hard_negative": True, "implicit_margin": 0.3, "loglik_margin": -1.0},
        {"method": "coevo", "iteration": 1, "hard_negative": True, "implicit_margin": -0.1, "loglik_margin": 2.0},
        {"method": "coevo", "iteration": 1, "hard_negative": False, "implicit_margin": 0.2, "loglik_margin": 3.0}])
    accuracy = boundary_views.preference_accuracy(margins).set_index(["iteration", "negative_class"])
    assert math.isnan(accuracy.loc[(0, "hard negative"), "implicit_margin_accuracy"])
    assert accuracy.loc[(1, "hard negative"), "implicit_margin_accuracy"] == 0.5
    assert accuracy.loc[(1, "hard negative"), "loglik_margin_accuracy"] == 0.5
    assert accuracy.loc[(1, "ordinary failure"), "pairs"] == 1


# -- run directories (synthetic fixtures written in the real format) --------------------------


def write_run(root: Path, recipe: str, name: str, episodes: dict[str, list[Episode]], finished: bool = True,
              boundary_rows: list[dict] | None = None, recipes: str = "configs/minishop", seed: int = 0) -> Path:
    """A run directory in the real layout, from hand-made records (no training happened)."""
    run = root / name
    config = load_config(f"{recipes}/{recipe}.yaml", {"loop.iterations": 1, "seed": seed})
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    for file_name, records in episodes.items():
        write_jsonl_atomic(run / "episodes" / f"{file_name}.jsonl", records)
    rows = [{"stage": "sft", "iteration": 0, "tokens_trained": 100, "stage_wall_s": 2.0}]
    rows += [{"stage": f"it{i}-eval", "iteration": i, "kind": "eval", "test_seen_reward": 10.0 * (i + 1),
              "test_seen_success": 0.0, "test_seen_n": 2, "test_seen_tokens_generated": 5, "stage_wall_s": 1.0}
             for i in range(2 if finished else 1)]
    write_jsonl_atomic(run / "metrics.jsonl", rows)
    for row in rows:
        write_json_atomic(run / "stages" / f"{row['stage']}.json", row)
    if boundary_rows:
        write_jsonl_atomic(run / "analysis" / "boundary.jsonl", boundary_rows)
    return run


def synthetic_runs(root: Path) -> list[Path]:
    expert = [episode("expert/t1", "t1", ["a", "b"], 1.0, "expert", 0)]
    margin = {"iteration": 1, "task_id": "t9", "negative_reward": 0.7, "hard_negative": True,
              "implicit_margin": 0.2, "loglik_margin": 3.0, "step_gap": 1.0}
    eto = write_run(root, "eto", "eto-seed0", {
        "expert": expert, "it1-train-target": [episode("target/it1/train/t1/s0", "t1", ["a", "x"], 0.3)],
        "it1-eval-test_seen-target": [episode("target/it1/eval/t9/s0", "t9", ["a"], 0.0, split="test_seen")]},
        boundary_rows=[margin])
    coevo = write_run(root, "coevo", "coevo-seed0", {
        "expert": expert, "it1-train-target": [episode("target/it1/train/t1/s0", "t1", ["a", "y"], 0.2)],
        "it1-train-failure": [episode("failure/it1/train/t1/s0", "t1", ["a", "z"], 0.8, "failure")]},
        boundary_rows=[{**margin, "implicit_margin": 0.5}])
    unfinished = write_run(root, "positive_agent", "positive-seed0", {"expert": expert}, finished=False)
    return [eto, coevo, unfinished]


def test_loading_reads_the_run_contract(tmp_path):
    eto, coevo, unfinished = synthetic_runs(tmp_path / "study")
    assert loading.is_finished(eto) and not loading.is_finished(unfinished)
    assert loading.find_runs(tmp_path) == [coevo, eto]
    assert len(loading.find_runs(tmp_path, finished_only=False)) == 3
    assert loading.run_info(unfinished)["method"] == "positive_agent"
    evals = loading.load_eval([eto])
    assert list(evals["iteration"]) == [0, 1] and list(evals["reward"]) == [10.0, 20.0]
    episodes = loading.load_episodes([eto, coevo])
    assert sorted(set(episodes["kind"])) == ["eval", "expert", "train"]
    assert set(episodes["source"]) >= {"eto/target", "coevo/failure", "eto/expert"}
    assert episodes.set_index("episode_id").loc["failure/it1/train/t1/s0", "hard_negative"]
    assert len(loading.load_boundary([eto, coevo])) == 2
    with pytest.raises(FileNotFoundError, match="make demo"):
        loading.require_runs(tmp_path / "nothing")


def test_method_labels_of_the_ablations():
    raw = {name: yaml.safe_load(dump_config(load_config(f"configs/minishop/{name}.yaml")))
           for name in ("sft", "eto", "eto_sft", "coevo", "coevo_frozen_failure", "positive_agent")}
    assert {name: loading.method_label(config) for name, config in raw.items()} == {name: name for name in raw}
    assert loading.final_eval_stage(raw["sft"]) == "it0-eval" and loading.final_eval_stage(raw["eto"]) == "it2-eval"


def test_figures_are_redrawn_from_saved_runs(tmp_path):
    synthetic_runs(tmp_path / "runs" / "study")
    written = build_figures(tmp_path / "runs", tmp_path / "figures")
    group = tmp_path / "figures" / "study"
    # no srlm / agent_r runs in the synthetic study, no tiny-model study set beside it
    drawn = [p for p in PRODUCTS if p.needs not in ("baselines", "tiny")]
    assert {p.name for p in written} == {p.name for p in drawn}
    readme = (group / "README.md").read_text()
    assert all(f"[{p.name}]" in readme for p in drawn)
    assert "coevo-seed0" in readme and "positive-seed0" not in readme  # unfinished runs are left out
    assert "| eto |" in (group / "main_table.md").read_text()
    index = (tmp_path / "figures" / "README.md").read_text()
    assert "[study/](study/README.md)" in index and all(f"`{p.name}`" in index for p in PRODUCTS)


def test_figures_of_a_group_without_rollouts_pairs_or_margins(tmp_path):
    write_run(tmp_path / "runs" / "only-sft", "sft", "sft-seed0", {"expert": [episode("e", "t", ["a"], 1.0, "expert", 0)]})
    written = {p.name for p in build_figures(tmp_path / "runs", tmp_path / "figures")}
    assert {"learning_curves.png", "threshold_curves.png", "collapse_monitor.png"} <= written
    assert "preference_accuracy.png" not in written  # no boundary.jsonl: listed as not drawn instead
    assert "Not drawn" in (tmp_path / "figures" / "only-sft" / "README.md").read_text()


def test_plot_functions_return_figures_that_notebooks_show_as_png():
    from coevo_lib import plots

    figure = plots.learning_curves(tables.learning_curves(eval_frame()))
    assert figure._repr_png_().startswith(b"\x89PNG")
    assert plots.threshold_curves(hn.threshold_curve(rollout_frame().iloc[:0]))._repr_png_()  # empty: says so


def test_figures_without_runs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        build_figures(tmp_path, tmp_path / "figures")


def test_stacked_bars_leave_room_for_the_longest_bar_when_a_part_is_zero_everywhere():
    """A part that is 0 in every row (plain ETO pairs in a coevo-only study) must not pin the x axis at the
    longest bar's end, where the frame cuts it."""
    from coevo_lib import plots

    mix = pd.DataFrame({"label": ["a it1", "a it2"], "eto": [0.0, 0.0], "expert": [700.0, 1200.0],
                        "failure": [300.0, 1900.0], "positive": [0.0, 0.0]})
    figure = plots.pair_mix(mix)
    assert figure.axes[0].get_xlim()[1] > 3100.0
