"""Paired differences between methods on the same test tasks: estimate, 95% interval, minimum detectable effect.

Design. Every method of a seed starts from that seed's shared SFT checkpoint and is evaluated on the same test
tasks, so a task's score under a method and under a reference method of the same seed form a pair. The per-task
difference d[s, t] = method[s, t] - reference[s, t] cancels what the seed's SFT checkpoint and the task's
difficulty contribute to both; the estimate is the mean of d, each seed weighted equally.

Interval: a random-effects model of the differences, not a bootstrap. minishop's test tasks are the same in
every seed (env.kwargs.seed stays 0 whatever the run seed), so seeds and tasks (by task id) are crossed:
d[s, t] = delta + a_s + b_t + e_st, and Var(mean d) = var_a / S + var_b / T + var_e / (S T), estimated from the
two-way ANOVA mean squares (Searle, Casella & McCulloch 1992, ch. 4) with Satterthwaite's (1946) degrees of
freedom; the 95% interval is estimate +- t(0.975, df) * SE. With one seed it is the paired t-interval over tasks
(conditional on that seed's training run: seed-to-seed variation is not in it); when seeds were evaluated on
different task sets (nested), the t-interval over seed means (df S - 1).
Why not a two-stage bootstrap (seeds, then tasks within seed): in simulated 5-seed studies (300 each) its
percentile interval covered about 87-91% of true differences when the effect varied across seeds (a percentile
over 5 seeds cannot see the tails that t(0.975, 4) = 2.78 accounts for) and 98% when it did not, and resampling
tasks within each seed ignores that the same tasks recur in every seed. This interval covered 93-97% in the same
simulations with 2, 3 and 5 seeds (up to 99% on 0/1 success data with 2 seeds; tests/test_paired_stats.py checks
its coverage). One seed's interval is about that seed: when the effect varied across seeds it held the mean over
seeds only 51-88% of the time, so a one-seed study shows task noise, not seed-to-seed variation.

Minimum detectable effect (MDE): (t(0.975, df) + t(0.80, df)) * SE, the true difference this design detects with
80% power at two-sided alpha 0.05 (normal approximation to the noncentral t; (1.960 + 0.842) * SE = 2.80 SE for
large df). Both use the SE estimated from the study itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from coevo_lib.analysis import loading
from coevo_lib.analysis.tables import T_975, Z_975, markdown_table, order_methods, t_from_normal_quantile

REFERENCES = ("sft", "eto", "eto_sft")  # eto_sft: ETO with the SFT term of coevo's loss (loss-matched)
METRICS = {"reward": "reward (x100)", "success": "success (%)"}
Z_80 = 0.841621
# One-sided 80% Student-t quantiles t(0.80, df) for df = 1..30 (standard tables).
T_80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)
PAIR_KEYS = ["seed", "split", "task_id"]
NO_COMPARISON = ("no paired comparison: needs final evaluations of a reference method (" + ", ".join(REFERENCES)
                 + ") and of another method on the same seed's test tasks")
ZERO_WIDTH = ("† Every task scored the same difference (e.g. 0% success under both methods): the interval and the "
              "MDE have no width because the sample shows no variation, not because the difference is known.")


class NotPairedError(ValueError):
    """Scores that cannot be paired task by task: a missing method or task, or two environments in one seed."""


# -- per-task scores --------------------------------------------------------------------------


def load_task_scores(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Each run's final evaluation: one row per run, split and task (see task_scores), with the run's env."""
    run_dirs = list(run_dirs)
    envs = loading.runs_table(run_dirs)[["run", "env"]]
    return task_scores(loading.load_episodes(run_dirs, kinds=("eval",))).merge(envs, on="run")


def task_scores(episodes: pd.DataFrame) -> pd.DataFrame:
    """Evaluation episodes at each run's last evaluated iteration -> reward x100 and success % per task.

    best_of_n scores each task by its highest-reward sample, as its evaluation does (an oracle selector:
    evaluate.best_of_n_metrics); any other method evaluated with several samples scores their mean.
    """
    final = episodes[episodes["iteration"] == episodes.groupby("run")["iteration"].transform("max")]
    final = final.assign(reward=100.0 * final["reward"].astype(float), success=100.0 * final["success"].astype(float))
    keys = ["run", "method", *PAIR_KEYS]
    oracle = final["method"] == "best_of_n"
    # A stable sort keeps the first of equal-reward samples, the one best_of_n_metrics keeps.
    best = final[oracle].sort_values("reward", ascending=False, kind="stable").drop_duplicates(keys)
    scored = [best[keys + list(METRICS)], final[~oracle].groupby(keys, as_index=False)[list(METRICS)].mean()]
    return pd.concat([s for s in scored if not s.empty] or scored[1:], ignore_index=True)


def method_scores(scores: pd.DataFrame, method: str) -> pd.DataFrame:
    """One method's task scores; an error when it has none or two runs of one seed (pairs would be ambiguous)."""
    rows = scores[scores["method"] == method]
    if rows.empty:
        raise NotPairedError(f"no final-evaluation episodes of method {method!r} in these runs "
                             f"(methods present: {', '.join(sorted(scores['method'].unique())) or 'none'})")
    twice = rows[rows.duplicated(PAIR_KEYS)]
    if not twice.empty:
        raise NotPairedError(f"{method}: seed {twice['seed'].iloc[0]} has more than one run "
                             f"({', '.join(sorted(rows['run'].unique()))}); keep one run per method and seed")
    return rows


# -- pairing ----------------------------------------------------------------------------------


def comparisons(methods: Iterable[str], references: Sequence[str] = REFERENCES) -> list[tuple[str, str]]:
    """(method, reference) for every method against every reference present, reference by reference.

    Between two references only the later one minus the earlier (eto - sft, not also sft - eto).
    """
    ordered = list(order_methods(pd.DataFrame({"method": sorted(set(methods))}))["method"])
    present = [r for r in references if r in ordered]
    return [(method, reference) for reference in present for method in ordered
            if method != reference and not (method in present and present.index(method) < present.index(reference))]


def paired_task_differences(scores: pd.DataFrame, method: str, reference: str) -> pd.DataFrame:
    """Per seed, split and task: both methods' scores and the difference (columns reward, success).

    Only seeds and splits both methods were evaluated on; within those, every task must be in both.
    """
    joined = method_scores(scores, method).merge(method_scores(scores, reference), on=PAIR_KEYS, how="outer",
                                                 suffixes=("_method", "_reference"))
    # (seed, split) groups in which each method has at least one task: the seeds and splits both were evaluated on
    both = joined.groupby(["seed", "split"])[["run_method", "run_reference"]].transform("count").min(axis=1) > 0
    joined = joined[both]
    check_paired(joined, method, reference)
    for metric in METRICS:
        joined[metric] = joined[f"{metric}_method"] - joined[f"{metric}_reference"]
    return joined.sort_values(PAIR_KEYS).reset_index(drop=True)


def check_paired(joined: pd.DataFrame, method: str, reference: str) -> None:
    """Every task in both methods' evaluation, in the same environment (a task id alone names a task per env)."""
    unmatched = joined[joined["run_method"].isna() | joined["run_reference"].isna()]
    if not unmatched.empty:
        row = unmatched.iloc[0]
        raise NotPairedError(f"{method} vs {reference}, seed {row['seed']}, {row['split']}: {len(unmatched)} "
                             f"task(s) evaluated under one method only (e.g. {row['task_id']}); not paired")
    if "env_method" in joined and (joined["env_method"] != joined["env_reference"]).any():
        seed = joined.loc[joined["env_method"] != joined["env_reference"], "seed"].iloc[0]
        raise NotPairedError(f"{method} vs {reference}, seed {seed}: the runs use different environments")


# -- intervals --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A mean (difference) with its standard error and degrees of freedom; the 95% interval and MDE follow."""

    estimate: float
    se: float
    df: float
    seeds: int
    tasks: int
    design: str

    @property
    def half_width(self) -> float:
        return critical_values(self.df)[0] * self.se

    @property
    def mde(self) -> float:
        return minimum_detectable_effect(self.se, self.df)


def critical_values(df: float) -> tuple[float, float]:
    """(t(0.975, df), t(0.80, df)); a fractional (Satterthwaite) df is rounded down, which widens the interval."""
    if not df >= 1:
        return math.nan, math.nan
    if math.isinf(df):
        return Z_975, Z_80
    whole = int(df)
    if whole <= len(T_80):
        return T_975[whole - 1], T_80[whole - 1]
    return t_from_normal_quantile(Z_975, whole), t_from_normal_quantile(Z_80, whole)


def minimum_detectable_effect(se: float, df: float = math.inf) -> float:
    """Smallest true difference detected with 80% power by a two-sided 5% test whose estimate has this SE."""
    t_975, t_80 = critical_values(df)
    return (t_975 + t_80) * se


def satterthwaite(terms: np.ndarray, dfs: np.ndarray, count: int) -> tuple[float, float]:
    """(SE, df) of a mean whose variance is sum(terms) / count, each term a mean square with its dfs."""
    variance = float(np.sum(terms))
    if variance <= 0:
        return 0.0, float(count - 1)  # every difference equal: a zero-width interval at that value
    # A difference of mean squares can have fewer df than any of them; 1 is the fewest a mean square has here.
    return math.sqrt(variance / count), max(1.0, variance**2 / float(np.sum(terms**2 / dfs)))


def crossed_terms(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-square terms of Var(mean) * S * T for a seeds x tasks matrix, and their degrees of freedom.

    E[MS_seed] = var_e + T var_a, E[MS_task] = var_e + S var_b, E[MS_resid] = var_e, so S T Var(mean) =
    MS_seed + MS_task - MS_resid. The task component is dropped when its estimate MS_task - MS_resid is negative
    (truncated at zero, as REML would). The seed term is never dropped: with few seeds MS_seed falls below
    MS_resid by chance too often, and dropping it then covered 89% with 2 seeds in simulation.
    """
    seeds, tasks = matrix.shape
    grand, seed_means, task_means = matrix.mean(), matrix.mean(axis=1), matrix.mean(axis=0)
    residuals = matrix - seed_means[:, None] - task_means[None, :] + grand
    mean_squares = np.array([tasks * np.sum((seed_means - grand) ** 2) / (seeds - 1),
                             seeds * np.sum((task_means - grand) ** 2) / (tasks - 1),
                             np.sum(residuals**2) / ((seeds - 1) * (tasks - 1))])
    task_term = float(mean_squares[1] > mean_squares[2])
    weights = np.array([1.0, task_term, -task_term])
    return weights * mean_squares, np.array([seeds - 1, tasks - 1, (seeds - 1) * (tasks - 1)], dtype=float)


TASKS_ONLY, NESTED, CROSSED = "tasks (1 seed)", "seed means (tasks nested)", "seeds x tasks (crossed)"


def design_of(matrix: pd.DataFrame) -> str:
    """The model a seeds x tasks layout allows: one seed, tasks not shared by every seed, or crossed."""
    if len(matrix) == 1:
        return TASKS_ONLY
    return NESTED if matrix.isna().any().any() or matrix.shape[1] < 2 else CROSSED


def interval(values: pd.DataFrame, column: str) -> Interval:
    """Mean of ``column`` over seeds and tasks (columns seed, task_id), each seed weighted equally, with its SE."""
    matrix = values.pivot(index="seed", columns="task_id", values=column)
    observed, design = matrix.to_numpy()[matrix.notna().to_numpy()], design_of(matrix)
    estimate, (seeds, tasks) = float(matrix.mean(axis=1).mean()), matrix.shape
    if len(observed) < 2:
        return Interval(estimate, math.nan, math.nan, seeds, tasks, "too few tasks")
    if np.ptp(observed) <= 1e-9 * (1.0 + np.abs(observed).max()):  # equal but for float rounding: no variation
        return Interval(estimate, 0.0, len(observed) - 1.0, seeds, tasks, design)
    return Interval(estimate, *standard_error(matrix, design), seeds, tasks, design)


def standard_error(matrix: pd.DataFrame, design: str) -> tuple[float, float]:
    """(SE, df) of the mean under the design's model (module docstring), for values that are not all equal."""
    se, df = model_standard_error(matrix, design)
    if se > 0:
        return se, df
    # Seed means tied exactly (success rates are discrete; few seeds) while tasks differ: a zero variance would
    # claim the difference is known. Fall back to the spread of all values, keeping the seeds' df.
    observed = matrix.to_numpy()[matrix.notna().to_numpy()]
    return satterthwaite(np.array([observed.var(ddof=1)]), np.array([len(matrix) - 1.0]), len(observed))


def model_standard_error(matrix: pd.DataFrame, design: str) -> tuple[float, float]:
    if design == CROSSED:
        return satterthwaite(*crossed_terms(matrix.to_numpy()), matrix.size)
    units = matrix.iloc[0].dropna().to_numpy() if design == TASKS_ONLY else matrix.mean(axis=1).to_numpy()
    return satterthwaite(np.array([units.var(ddof=1)]), np.array([len(units) - 1.0]), len(units))


def unpaired_half_width(differences: pd.DataFrame, metric: str) -> float:
    """What the 95% half-width would be if the two methods' scores were not paired (Welch-Satterthwaite df)."""
    sides = [interval(differences, f"{metric}_{side}") for side in ("method", "reference")]
    se = math.sqrt(sum(side.se**2 for side in sides))
    if se == 0:
        return 0.0
    df = se**4 / sum(side.se**4 / side.df for side in sides if side.se > 0)
    return critical_values(df)[0] * se


# -- the study's comparisons ------------------------------------------------------------------

SUMMARY_COLUMNS = ["comparison", "method", "reference", "split", "metric", "difference", "ci_low", "ci_high",
                   "ci95", "se", "df", "mde", "unpaired_ci95", "seeds", "tasks", "design"]


def paired_differences(scores: pd.DataFrame, references: Sequence[str] = REFERENCES) -> pd.DataFrame:
    """Every method minus every reference present, per split and metric (reward x100, success %).

    One row per comparison, split and metric: difference, 95% interval, SE, df, MDE, the unpaired half-width for
    contrast, and the design the interval assumed. Empty (with the columns) when nothing can be compared.
    """
    rows = []
    for method, reference in comparisons(scores["method"].unique(), references):
        differences = paired_task_differences(scores, method, reference)
        for split, pairs in differences.groupby("split", sort=True):
            rows += [summary_row(method, reference, split, metric, pairs) for metric in METRICS]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_row(method: str, reference: str, split: str, metric: str, pairs: pd.DataFrame) -> dict:
    result = interval(pairs, metric)
    return {"comparison": f"{method} − {reference}", "method": method, "reference": reference, "split": split,
            "metric": metric, "difference": result.estimate, "ci_low": result.estimate - result.half_width,
            "ci_high": result.estimate + result.half_width, "ci95": result.half_width, "se": result.se,
            "df": result.df, "mde": result.mde, "unpaired_ci95": unpaired_half_width(pairs, metric),
            "seeds": result.seeds, "tasks": result.tasks, "design": result.design}


def seeds_phrase(seeds: int) -> str:
    """"1 seed", "3 seeds": how many seeds a comparison pairs over, as tables and figure labels say it."""
    return f"{seeds} seed{'' if seeds == 1 else 's'}"


def differences_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per comparison and split; per metric the difference [95% interval], the MDE and unpaired +-."""
    rows = []
    for (comparison, split), group in summary.groupby(["comparison", "split"], sort=False):
        row = {"comparison": comparison, "split": split}
        for r in group.itertuples():
            flag = " †" if r.se == 0 else ""  # no variation among the tasks: see ZERO_WIDTH
            row[f"Δ {METRICS[r.metric]} [95% CI]"] = f"{r.difference:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]{flag}"
            row[f"MDE {r.metric}"] = f"{r.mde:.1f}"
            row[f"unpaired ± {r.metric}"] = f"{r.unpaired_ci95:.1f}"
        first = group.iloc[0]
        rows.append({**row, "seeds": int(first["seeds"]), "tasks": int(first["tasks"]), "interval": first["design"]})
    return pd.DataFrame(rows)


def differences_markdown(summary: pd.DataFrame) -> str:
    """The table of paired differences with a paragraph saying what the interval and the MDE are."""
    if summary.empty:
        return NO_COMPARISON + ".\n"
    intro = ("Method − reference on the same seed's test tasks (final evaluation). Interval: paired 95% t-interval "
             "from a random-effects model of the per-task differences (seeds x tasks crossed; one seed: tasks "
             "only, conditional on that seed), Satterthwaite df. MDE: true difference detected with 80% power at "
             "two-sided alpha 0.05, (t(0.975, df) + t(0.80, df)) x SE. Unpaired ±: the half-width without pairing.")
    table = differences_table(summary)
    note = f"\n{ZERO_WIDTH}\n" if (summary["se"] == 0).any() else ""
    return f"# Paired differences\n\n{intro}\n\n{markdown_table(table)}{note}"
