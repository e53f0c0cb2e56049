"""Paired differences (coevo_lib.analysis.paired) on hand-made scores with known answers and on simulated studies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from coevo_lib import plots
from coevo_lib.analysis import paired
from coevo_lib.records import write_json_atomic, write_jsonl_atomic

ENV = "minishop[('seed', 0)]"


def scores_frame(method: str, values: np.ndarray, split: str = "test_seen", env: str = ENV,
                 task_ids: list[list[str]] | None = None) -> pd.DataFrame:
    """Task scores of one method: ``values[s, t]`` is seed s's reward on task t (success = reward > 50)."""
    rows = []
    for seed, seed_values in enumerate(np.atleast_2d(values)):
        tasks = task_ids[seed] if task_ids else [f"t{t}" for t in range(len(seed_values))]
        rows += [{"run": f"{method}-seed{seed}", "method": method, "seed": seed, "split": split, "task_id": task,
                  "reward": float(v), "success": 100.0 * (v > 50), "env": env} for task, v in zip(tasks, seed_values)]
    return pd.DataFrame(rows)


def summary_of(method: pd.DataFrame, reference: pd.DataFrame, metric: str = "reward") -> pd.Series:
    summary = paired.paired_differences(pd.concat([method, reference]))
    return summary[summary["metric"] == metric].iloc[0]


# -- intervals with known answers -------------------------------------------------------------


def test_constant_difference_gives_a_zero_width_interval_at_that_value():
    reference = np.random.default_rng(0).uniform(0, 100, (3, 10))
    row = summary_of(scores_frame("coevo", reference + 7.0), scores_frame("sft", reference))
    assert row["difference"] == pytest.approx(7.0)
    assert row["ci_low"] == pytest.approx(7.0) and row["ci_high"] == pytest.approx(7.0) and row["mde"] == 0.0
    assert row["unpaired_ci95"] > 10  # the same scores unpaired: seeds and tasks vary a lot


def test_one_seed_is_the_paired_t_interval_over_tasks():
    eto, sft = scores_frame("eto", np.array([[11.0, 12, 13, 14, 15]])), scores_frame("sft", np.full((1, 5), 10.0))
    row = summary_of(eto, sft)
    se = math.sqrt(2.5 / 5)  # differences 1..5: mean 3, variance 2.5
    assert (row["difference"], row["se"], row["df"]) == pytest.approx((3.0, se, 4.0))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((3 - 2.776 * se, 3 + 2.776 * se))
    assert row["design"] == "tasks (1 seed)" and row["seeds"] == 1 and row["tasks"] == 5


def test_crossed_seeds_and_tasks_follow_the_anova_formula():
    # Differences [[1, 2, 6], [3, 5, 7]]: MS_seed = 6, MS_task = 10.5, MS_resid = 0.5, so Var(mean) =
    # (6 + 10.5 - 0.5) / 6 and Satterthwaite df = 16^2 / (6^2/1 + 10.5^2/2 + 0.5^2/2) = 2.81 -> t(0.975, 2).
    differences = np.array([[1.0, 2, 6], [3, 5, 7]])
    row = summary_of(scores_frame("coevo", differences + 20), scores_frame("eto", np.full((2, 3), 20.0)))
    assert (row["difference"], row["se"], row["df"]) == pytest.approx((4.0, math.sqrt(16 / 6), 256 / 91.25))
    assert row["ci95"] == pytest.approx(4.303 * math.sqrt(16 / 6))
    assert row["design"] == "seeds x tasks (crossed)"


def test_seeds_with_their_own_tasks_use_the_t_interval_over_seed_means():
    differences = np.array([[1.0, 3], [5, 7], [3, 5]])  # seed means 2, 6, 4
    tasks = [["a", "b"], ["c", "d"], ["e", "f"]]
    row = summary_of(scores_frame("coevo", differences, task_ids=tasks),
                     scores_frame("sft", 0 * differences, task_ids=tasks))
    assert (row["difference"], row["se"], row["df"]) == pytest.approx((4.0, 2 / math.sqrt(3), 2.0))
    assert row["ci95"] == pytest.approx(4.303 * 2 / math.sqrt(3)) and row["design"] == "seed means (tasks nested)"


def test_seed_means_tied_exactly_do_not_give_a_zero_width_interval():
    # Success differences [[100, 0, 0, 0], [0, 100, 0, 0]]: both seeds +25, MS_task < MS_resid, so the model's
    # variance is 0 although tasks differ; the fallback is the spread of all 8 values, with the seeds' 1 df.
    method = np.array([[100.0, 0, 0, 0], [0, 100, 0, 0]])
    row = summary_of(scores_frame("coevo", method), scores_frame("sft", np.zeros((2, 4))))
    se = math.sqrt((2 * 75**2 + 6 * 25**2) / 7 / 8)
    assert (row["difference"], row["se"], row["df"]) == pytest.approx((25.0, se, 1.0))
    assert row["ci95"] == pytest.approx(12.706 * se)


def test_pairing_narrows_the_interval_when_scores_share_seed_and_task_effects():
    rng = np.random.default_rng(1)
    reference = 50 + rng.normal(0, 10, (5, 1)) + rng.normal(0, 20, (1, 60)) + rng.normal(0, 5, (5, 60))
    method = reference + 3.0 + rng.normal(0, 2, (5, 60))
    row = summary_of(scores_frame("coevo", method), scores_frame("sft", reference))
    assert row["difference"] == pytest.approx(method.mean() - reference.mean())
    assert row["ci95"] < 0.25 * row["unpaired_ci95"]
    assert row["ci_low"] > 0  # 3 points: detected when paired, lost in the unpaired half-width (> 10)
    assert row["unpaired_ci95"] > 10


# -- calibration ------------------------------------------------------------------------------


def coverage(studies: int, seeds: int, tasks: int, sd_seed: float, sd_task: float, sd_noise: float,
             ignore_seeds: bool = False) -> float:
    """Share of simulated studies whose 95% interval holds the true difference (here 2.0)."""
    rng = np.random.default_rng(seeds * 1000 + tasks)
    hits = 0
    for _ in range(studies):
        d = (2.0 + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_task, (1, tasks))
             + rng.normal(0, sd_noise, (seeds, tasks)))
        values = pd.DataFrame({"seed": np.repeat(np.arange(seeds), tasks),
                               "task_id": np.tile(np.arange(tasks), seeds), "d": d.ravel()})
        if ignore_seeds:  # every (seed, task) as an independent task of one seed: the mistake to catch
            values = values.assign(task_id=values["seed"] * tasks + values["task_id"], seed=0)
        result = paired.interval(values, "d")
        hits += abs(result.estimate - 2.0) <= result.half_width
    return hits / studies


@pytest.mark.parametrize("seeds, tasks, sd_seed, sd_task, sd_noise", [
    (5, 60, 6.0, 10.0, 30.0),  # the results study's shape: seed, task and residual variation
    (5, 60, 2.0, 15.0, 20.0),  # tasks that favour one method in every seed (t-over-seed-means covers ~82%)
    (3, 40, 10.0, 5.0, 30.0),  # few seeds, the seed effect dominating (a z-interval covers ~83%)
    (1, 60, 0.0, 0.0, 30.0),   # the demo: one seed, tasks only
])
def test_interval_covers_the_truth_at_about_the_nominal_rate(seeds, tasks, sd_seed, sd_task, sd_noise):
    # 300 studies: the binomial sd of a 95% coverage is 1.3 points; the band is about +-3 sd.
    assert 0.91 <= coverage(300, seeds, tasks, sd_seed, sd_task, sd_noise) <= 0.99


def test_coverage_check_catches_an_interval_that_ignores_seed_variation():
    assert coverage(300, 5, 60, 6.0, 10.0, 30.0, ignore_seeds=True) < 0.85


def test_minimum_detectable_effect_formula_and_its_power():
    assert paired.minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621)
    assert paired.minimum_detectable_effect(2.0, 4.0) == pytest.approx(2 * (2.776 + 0.941))
    assert paired.minimum_detectable_effect(1.0, 4.9) == paired.minimum_detectable_effect(1.0, 4)  # df rounded down
    assert paired.critical_values(31) < paired.critical_values(30)  # the expansion continues the tables
    assert paired.critical_values(29) < paired.critical_values(4)
    # 5 seeds whose true mean difference is the MDE: a two-sided t-test rejects about 80% of the time.
    rng = np.random.default_rng(2)
    draws = rng.normal(paired.minimum_detectable_effect(1 / math.sqrt(5), 4), 1.0, (4000, 5))
    t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / math.sqrt(5))
    assert 0.76 <= np.mean(np.abs(t) > 2.776) <= 0.84


# -- comparisons and what is missing ----------------------------------------------------------


def test_comparisons_pair_every_method_with_every_reference_present():
    assert paired.comparisons(["coevo", "eto_sft", "sft", "eto"]) == [
        ("eto", "sft"), ("eto_sft", "sft"), ("coevo", "sft"), ("eto_sft", "eto"), ("coevo", "eto"),
        ("coevo", "eto_sft")]
    assert paired.comparisons(["coevo", "positive_agent"]) == []


def test_no_reference_method_gives_an_empty_summary_that_says_why():
    summary = paired.paired_differences(pd.concat([scores_frame("coevo", np.ones((1, 3))),
                                                   scores_frame("positive_agent", np.ones((1, 3)))]))
    assert summary.empty and list(summary.columns) == paired.SUMMARY_COLUMNS
    assert "no paired comparison" in paired.differences_markdown(summary)
    assert plots.paired_differences(summary).texts[0].get_text() == paired.NO_COMPARISON


def test_what_cannot_be_paired_is_a_clear_error():
    sft = scores_frame("sft", np.ones((1, 3)))
    with pytest.raises(paired.NotPairedError, match="no final-evaluation episodes of method 'eto_sft'"):
        paired.paired_task_differences(sft, "eto_sft", "sft")
    short = scores_frame("eto", np.ones((1, 2)))
    with pytest.raises(paired.NotPairedError, match="seed 0, test_seen: 1 task.*under one method only"):
        paired.paired_task_differences(pd.concat([sft, short]), "eto", "sft")
    other_env = scores_frame("eto", np.ones((1, 3)), env="minishop[('seed', 1)]")
    with pytest.raises(paired.NotPairedError, match="different environments"):
        paired.paired_task_differences(pd.concat([sft, other_env]), "eto", "sft")
    twice = pd.concat([sft, sft.assign(run="sft-seed0-again")])
    with pytest.raises(paired.NotPairedError, match="more than one run"):
        paired.paired_task_differences(pd.concat([twice, scores_frame("eto", np.ones((1, 3)))]), "eto", "sft")


def test_only_seeds_and_splits_both_methods_have_are_compared():
    sft = pd.concat([scores_frame("sft", np.zeros((2, 4))), scores_frame("sft", np.zeros((2, 4)), "test_unseen")])
    rft = scores_frame("rft", np.array([[1.0, 2, 3, 4]]))  # seed 0 and test_seen only
    summary = paired.paired_differences(pd.concat([rft, sft]))
    assert set(summary["split"]) == {"test_seen"} and set(summary["seeds"]) == {1}
    assert summary.loc[summary["metric"] == "reward", "difference"].item() == pytest.approx(2.5)


# -- from run directories to the table and figure ---------------------------------------------


def write_eval_run(root: Path, method: str, iterations: int, rewards_by_iteration: dict[int, list[float]]) -> Path:
    """A finished run with only what the paired analysis reads: config.yaml, eval episodes, the last stage marker."""
    run = root / f"{method}-seed0"
    config = {"method": method, "seed": 0, "label": None, "env": {"name": "minishop", "kwargs": {"seed": 0}},
              "dpo": {"beta": 0.1}, "loop": {"iterations": iterations, "second_agent": "failure"}}
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for iteration, rewards in rewards_by_iteration.items():
        episodes = [{"episode_id": f"target/it{iteration}/eval/t{t}", "task_id": f"t{t}", "split": "test_seen",
                     "agent": "target", "iteration": iteration, "messages": [], "actions": [], "reward": r,
                     "success": r == 1.0, "steps": 1} for t, r in enumerate(rewards)]
        write_jsonl_atomic(run / "episodes" / f"it{iteration}-eval-test_seen-target.jsonl", episodes)
    write_json_atomic(run / "stages" / f"it{iterations if method != 'sft' else 0}-eval.json", {})
    return run


def test_paired_differences_from_saved_runs_use_each_runs_final_evaluation(tmp_path):
    sft = write_eval_run(tmp_path, "sft", 0, {0: [0.2, 0.5, 1.0, 0.0]})
    eto = write_eval_run(tmp_path, "eto", 2, {0: [0.2, 0.5, 1.0, 0.0], 2: [0.4, 0.5, 1.0, 1.0]})
    scores = paired.load_task_scores([sft, eto])
    assert set(scores.loc[scores["method"] == "eto", "reward"]) == {40.0, 50.0, 100.0}  # iteration 2, x100
    summary = paired.paired_differences(scores)
    reward, success = (summary[summary["metric"] == m].iloc[0] for m in ("reward", "success"))
    assert reward["comparison"] == "eto − sft" and reward["difference"] == pytest.approx(30.0)  # (20 + 100) / 4
    assert success["difference"] == pytest.approx(25.0)
    text = paired.differences_markdown(summary)
    assert "| eto − sft | test_seen | +30.0 [" in text and "random-effects" in text
    assert plots.paired_differences(summary)._repr_png_().startswith(b"\x89PNG")


def test_best_of_n_scores_each_task_by_its_best_sample_and_other_methods_by_the_mean():
    def episode(method, task, reward):
        return {"run": f"{method}-seed0", "method": method, "seed": 0, "split": "test_seen", "task_id": task,
                "iteration": 0, "reward": reward, "success": reward == 1.0}
    samples = {"t0": [0.2, 1.0, 0.5, 0.0], "t1": [0.3, 0.3, 0.1, 0.6]}
    episodes = pd.DataFrame([episode(m, task, r) for m in ("best_of_n", "sft") for task, rs in samples.items()
                             for r in rs])
    scores = paired.task_scores(episodes).set_index(["method", "task_id"])
    assert scores.loc[("best_of_n", "t0"), ["reward", "success"]].tolist() == [100.0, 100.0]
    assert scores.loc[("best_of_n", "t1"), ["reward", "success"]].tolist() == [60.0, 0.0]
    assert scores.loc[("sft", "t0"), "reward"] == pytest.approx(42.5)  # mean of 20, 100, 50, 0
    assert scores.loc[("sft", "t0"), "success"] == pytest.approx(25.0)


def test_the_boundary_analysis_keeps_the_methods_asked_for_and_names_those_there_are(tmp_path):
    from coevo_lib.analysis import boundary
    from coevo_lib.analysis.loading import NoRunsError

    runs = [write_eval_run(tmp_path, method, 1, {1: [0.5]}) for method in ("coevo", "eto", "rft")]
    assert boundary.select_methods(runs, None) == runs
    assert [r.name for r in boundary.select_methods(runs, ["eto", "coevo", "best_of_n"])] == ["coevo-seed0", "eto-seed0"]
    with pytest.raises(NoRunsError, match="methods there: coevo, eto, rft"):
        boundary.select_methods(runs, ["coevo_lsft0"])


def test_paired_difference_labels_name_the_seeds_only_when_rows_differ_in_them():
    summary = pd.DataFrame({"comparison": ["eto − sft", "eto − sft", "coevo − sft"], "seeds": [1, 1, 3]})
    comparisons = ["eto − sft", "coevo − sft"]
    assert plots.comparison_labels(summary, comparisons) == ["eto − sft (1 seed)", "coevo − sft (3 seeds)"]
    summary["seeds"] = 3
    assert plots.comparison_labels(summary, comparisons) == comparisons
