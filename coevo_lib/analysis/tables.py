"""Result tables: main (methods x splits), ablation, compute; mean and 95% t-interval over seeds.

Each seed is its own run (STYLE.md, rule 12), so a table cell aggregates one number per run: the
run's final evaluation. The interval is mean +- t(0.975, n-1) * sd / sqrt(n); with one seed only
the mean and n=1 are shown.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

METHOD_ORDER = ("sft", "rft", "best_of_n", "srlm", "agent_r", "eto", "eto_sft", "coevo", "coevo_frozen_failure",
                "positive_agent")
ABLATION_METHODS = ("coevo", "coevo_frozen_failure", "positive_agent")
# Two-sided 95% Student-t critical values t(0.975, df) for df = 1..30 (standard tables).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
Z_975 = 1.959964


def t_critical(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return T_975[df - 1] if df <= len(T_975) else t_from_normal_quantile(Z_975, df)


def t_from_normal_quantile(z: float, df: float) -> float:
    """Student t's quantile from the normal one z, Cornish-Fisher (Abramowitz & Stegun 26.7.5); for df > 30."""
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n); the half-width is NaN for a single value."""
    data = np.asarray([v for v in values if not pd.isna(v)], dtype=float)
    n = len(data)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(data[0]), float("nan"), 1
    return float(data.mean()), t_critical(n - 1) * float(data.std(ddof=1)) / math.sqrt(n), n


def summarise(data: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """mean, ci95 and n of ``value`` per group (one value per run in each group)."""
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))),
             **dict(zip(("mean", "ci95", "n"), mean_ci(group[value])))}
            for key, group in data.groupby(by, sort=True)]
    return order_methods(pd.DataFrame(rows, columns=[*by, "mean", "ci95", "n"]))


def order_methods(data: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order of methods (unknown labels last, alphabetically)."""
    if "method" not in data or data.empty:
        return data
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = data["method"].map(lambda m: (rank.get(m, len(rank)), m))
    return data.iloc[sorted(range(len(data)), key=lambda i: keys.iloc[i])].reset_index(drop=True)


def final_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """Each run's evaluation at its last iteration."""
    last = evals.groupby("run")["iteration"].transform("max")
    return evals[evals["iteration"] == last]


def learning_curves(evals: pd.DataFrame, metric: str = "reward") -> pd.DataFrame:
    """Per method, split and iteration: mean and 95% CI over seeds (input of plots.learning_curves)."""
    return summarise(evals, ["method", "split", "iteration"], metric)


def main_table(evals: pd.DataFrame, metric: str = "reward", methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Methods x splits of the final evaluation, long form (method, split, mean, ci95, n)."""
    final = final_evals(evals)
    if methods is not None:
        final = final[final["method"].isin(methods)]
    return summarise(final, ["method", "split"], metric)


def ablation_table(evals: pd.DataFrame, metric: str = "reward") -> pd.DataFrame:
    """coevo vs its two ablations (frozen failure agent, positive agent)."""
    return main_table(evals, metric, ABLATION_METHODS)


def format_cell(mean: float, ci95: float, n: int, digits: int = 1) -> str:
    if n == 0 or pd.isna(mean):
        return "-"
    if pd.isna(ci95):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {ci95:.{digits}f} (n={n})"


def wide(summary: pd.DataFrame, columns: str = "split") -> pd.DataFrame:
    """Long summary -> one row per method, one formatted "mean ± ci (n)" cell per ``columns`` value."""
    cells = summary.assign(cell=[format_cell(m, c, n) for m, c, n in
                                 zip(summary["mean"], summary["ci95"], summary["n"])])
    table = cells.pivot(index="method", columns=columns, values="cell").fillna("-")
    table = table.reset_index().rename_axis(columns=None)
    return order_methods(table)


# -- compute ----------------------------------------------------------------------------------


def stage_family(stage: str) -> str:
    """base / expert / sft / rollout / pairs / train / eval from a stage name like it2-rollout-failure."""
    parts = stage.split("-")
    return parts[1] if stage.startswith("it") and len(parts) > 1 else stage


# Stages that generate text to build training data: every method's rollouts, SRLM's judge, Agent-R's tree
# search and step verifier. Counting rollouts alone showed Agent-R generating nothing for training.
TRAINING_GENERATION_FAMILIES = ("rollout", "judge", "search", "revise")
COMPUTE_COLUMNS = ["training_tokens_generated", "eval_tokens", "tokens_trained", "stage_wall_s"]


def run_compute(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run and iteration: tokens generated (for training data, in evaluation), tokens trained, wall time."""
    data = metrics.copy()
    family = data["stage"].map(stage_family)
    eval_token_columns = [c for c in data.columns if c.endswith("_tokens_generated")]
    generated = data["tokens_generated"] if "tokens_generated" in data else pd.Series(0.0, index=data.index)
    data["training_tokens_generated"] = generated.where(family.isin(TRAINING_GENERATION_FAMILIES), 0.0).fillna(0.0)
    data["eval_tokens"] = data[eval_token_columns].fillna(0.0).sum(axis=1) if eval_token_columns else 0.0
    data["tokens_trained"] = data["tokens_trained"].fillna(0.0) if "tokens_trained" in data else 0.0
    data["iteration"] = data["iteration"].fillna(0).astype(int)
    return data.groupby(["run", "method", "seed", "iteration"], sort=True)[COMPUTE_COLUMNS].sum().reset_index()


def compute_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean over seeds of each run's total tokens generated, tokens trained and wall time."""
    per_run = run_compute(metrics).groupby(["run", "method", "seed"]).sum(numeric_only=True).reset_index()
    table = per_run.groupby("method").agg(
        runs=("run", "size"), **{column: (column, "mean") for column in COMPUTE_COLUMNS}).reset_index()
    table["wall_min"] = table["stage_wall_s"] / 60.0
    return order_methods(table.drop(columns="stage_wall_s").round({"wall_min": 2}))


def compute_by_iteration(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method and iteration (0 = base, experts, SFT and its evaluation): means over seeds."""
    per_iteration = run_compute(metrics)
    return order_methods(per_iteration.groupby(["method", "iteration"])[COMPUTE_COLUMNS].mean().reset_index())


ROLLOUT_COLUMNS = ("run", "iteration", "agent", "episodes", "successes", "failures", "hard_negatives",
                   "mean_reward", "mean_failure_reward", "failure_diversity", "tokens_generated", "stage_wall_s")


def rollout_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The accounting logged by every rollout stage (coevo_lib.accounting), one row per agent and iteration."""
    rollouts = metrics[metrics["stage"].map(stage_family) == "rollout"]
    table = rollouts[[c for c in ROLLOUT_COLUMNS if c in rollouts]].reset_index(drop=True)
    return table.astype({c: int for c in ("iteration", "episodes", "successes", "failures", "hard_negatives",
                                          "tokens_generated") if c in table})


# -- markdown ---------------------------------------------------------------------------------


def markdown_table(data: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which coevo does not depend on)."""
    def cell(value) -> str:
        if not isinstance(value, float):
            return str(value).replace("|", "\\|")  # a pipe would end the cell
        if math.isnan(value):
            return "-"
        if value.is_integer() or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"

    header = "| " + " | ".join(map(str, data.columns)) + " |"
    rule = "|" + "|".join("---" for _ in data.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in data.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"
