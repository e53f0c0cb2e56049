"""Summaries of decision-boundary rows (coevo_lib.analysis.boundary), each answering one question.

``VIEWS`` are the margins a row carries. Which view answers what:

- ``step_gap`` (headline): does the model prefer the expert's turn over the negative's at the step
  where they split, from the same prefix? One turn against one turn: length cannot drive it.
- ``*_per_token``: the whole trajectories compared per assistant token: length-free, but still a
  mean over the turns the two share and the turns where they differ.
- ``loglik_margin`` / ``implicit_margin`` (summed, as DPO sums): kept to show the length confound.

``source`` and ``self_generated`` hold the self-generation confound apart (coevo_lib.analysis.negatives);
``length_matched`` compares hard and ordinary negatives of similar length, and ``margin_regression``
fits margin ~ reward + length + source + self_generated per method and checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from coevo_lib.analysis.tables import mean_ci, order_methods, t_critical

VIEWS = {
    "step_gap": "step gap (expert turn - negative turn, same prefix)",
    "loglik_margin_per_token": "log-lik margin per token",
    "implicit_margin_per_token": "implicit margin per token",
    "loglik_margin": "log-lik margin, summed",
    "implicit_margin": "implicit margin, summed",
}
IMPLICIT_VIEWS = ("implicit_margin_per_token", "implicit_margin")  # 0 at iteration 0 by construction
NATURAL_SOURCES = ("greedy_eval", "sampled_target", "sampled_failure_agent")
LENGTH_UNIT = 100  # regression length covariate: (negative - expert) assistant tokens / 100
FILLED = {"source": "greedy_eval", "self_generated": np.nan, "negative_tokens": np.nan, "expert_tokens": np.nan,
          "negative_run": "", "negative_id": "",
          **{view: np.nan for view in VIEWS}}


def negative_class(boundary: pd.DataFrame) -> pd.Series:
    return boundary["hard_negative"].astype(bool).map({True: "hard negative", False: "ordinary failure"})


def source_label(boundary: pd.DataFrame) -> pd.Series:
    """The source, with natural negatives split by whether the scored checkpoint generated them."""
    natural = boundary["source"].isin(NATURAL_SOURCES) & boundary["self_generated"].notna()
    suffix = boundary["self_generated"].map({True: ", self", False: ", other model"}).fillna("")
    return boundary["source"] + suffix.where(natural, "")


def margins_long(boundary: pd.DataFrame) -> pd.DataFrame:
    """The per-pair frame with negative class, source label and length difference.

    Rows written before sources and token counts were recorded get source ``greedy_eval`` (the only
    one then) and NaN for what they lack, so old analysis files still draw.
    """
    data = boundary.copy()
    for column, default in FILLED.items():
        if column not in data:
            data[column] = default
    data["self_generated"] = data["self_generated"].astype(object).where(data["self_generated"].notna())
    data["negative_class"] = negative_class(data)
    data["source_label"] = source_label(data)
    data["length_difference"] = data["negative_tokens"].astype(float) - data["expert_tokens"].astype(float)
    return data


def final_margins(boundary: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last checkpoint."""
    last = boundary.groupby("run")["iteration"].transform("max")
    return boundary[boundary["iteration"] == last]


def view_summary(margins: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group and view: pairs, mean margin with its 95% t-interval, and the share > 0 (accuracy).

    Implicit views at iteration 0 are 0 by construction (pi = pi_ref): left out.
    """
    rows = []
    for key, group in margins.groupby(by, sort=True):
        for view in VIEWS:
            values = group[view].astype(float)
            if view in IMPLICIT_VIEWS:
                values = values[group["iteration"] > 0]
            mean, ci95, n = mean_ci(values)
            if n:
                rows.append({**dict(zip(by, key)), "view": view, "pairs": n, "mean": mean, "ci95": ci95,
                             "accuracy": float((values.dropna() > 0).mean())})
    return order_methods(pd.DataFrame(rows, columns=[*by, "view", "pairs", "mean", "ci95", "accuracy"]))


def source_summary(margins: pd.DataFrame) -> pd.DataFrame:
    """Every view per method, iteration and source label."""
    return view_summary(margins, ["method", "iteration", "source_label"])


def preference_accuracy(boundary: pd.DataFrame) -> pd.DataFrame:
    """Greedy evaluation negatives (the original set) per method, iteration and class: share of pairs each
    view ranks correctly (implicit views: NaN at iteration 0, where pi = pi_ref)."""
    data = margins_long(boundary)
    data = data[data["source"] == "greedy_eval"]
    wide = []
    for key, group in data.groupby(["method", "iteration", "negative_class"], sort=True):
        row = dict(zip(("method", "iteration", "negative_class"), key), pairs=len(group))
        for view in VIEWS:
            values = group[view].dropna().astype(float)
            undefined = values.empty or (view in IMPLICIT_VIEWS and key[1] == 0)
            row[f"{view}_accuracy"] = float("nan") if undefined else float((values > 0).mean())
        wide.append(row)
    columns = ["method", "iteration", "negative_class", "pairs", *(f"{v}_accuracy" for v in VIEWS)]
    return order_methods(pd.DataFrame(wide, columns=columns))


# -- length ------------------------------------------------------------------------------------


def length_bins(margins: pd.DataFrame, bins: int = 4) -> pd.Series:
    """Quantile bins of the negative's assistant-token count, shared by every method (same edges)."""
    tokens = margins["negative_tokens"].astype(float)
    if tokens.notna().sum() < bins:
        return pd.Series("all lengths", index=margins.index)
    cut = pd.qcut(tokens, bins, duplicates="drop")
    return cut.map(lambda b: f"{int(np.floor(b.left)) + 1}-{int(b.right)} tokens").astype(str)


def length_matched(margins: pd.DataFrame) -> pd.DataFrame:
    """Final checkpoints, natural negatives: mean margin per method, length bin and class, per view."""
    data = final_margins(margins[margins["source"].isin(NATURAL_SOURCES)])
    data = data.assign(length_bin=length_bins(data))
    return view_summary(data, ["method", "length_bin", "negative_class"])


def stratified_difference(cells: pd.DataFrame) -> tuple[float, float, int]:
    """Hard - ordinary mean margin within each length bin, averaged with weights = pairs in the bin;
    (difference, 95% half-width from the cell variances, bins with both classes, each of >= 2 pairs)."""
    cells = cells[cells["pairs"] >= 2]
    wide = cells.pivot_table(index="length_bin", columns="negative_class", values=["mean", "ci95", "pairs"])
    if {"hard negative", "ordinary failure"} - set(wide.columns.get_level_values(1)):
        return float("nan"), float("nan"), 0
    both = wide.dropna(subset=[("mean", "hard negative"), ("mean", "ordinary failure")])
    if both.empty:
        return float("nan"), float("nan"), 0
    weights = both[("pairs", "hard negative")] + both[("pairs", "ordinary failure")]
    weights = weights / weights.sum()
    difference = (weights * (both[("mean", "hard negative")] - both[("mean", "ordinary failure")])).sum()
    # Each cell's ci95 is t * se; the normal 1.96 turns back into an se (cells hold >= 2 pairs, often many).
    variance = (weights**2 * ((both[("ci95", "hard negative")] / 1.96) ** 2
                              + (both[("ci95", "ordinary failure")] / 1.96) ** 2)).sum()
    return float(difference), float(1.96 * np.sqrt(variance)), len(both)


def length_matched_difference(margins: pd.DataFrame) -> pd.DataFrame:
    """Per method and view: hard - ordinary mean margin, raw (all lengths) and within length bins."""
    cells = length_matched(margins)
    raw = view_summary(final_margins(margins[margins["source"].isin(NATURAL_SOURCES)]),
                       ["method", "negative_class"])
    rows = []
    for (method, view), group in cells.groupby(["method", "view"], sort=False):
        means = raw[(raw["method"] == method) & (raw["view"] == view)].set_index("negative_class")["mean"]
        difference, ci95, n_bins = stratified_difference(group)
        rows.append({"method": method, "view": view,
                     "raw_difference": means.get("hard negative", np.nan) - means.get("ordinary failure", np.nan),
                     "matched_difference": difference, "matched_ci95": ci95, "bins_with_both": n_bins})
    return pd.DataFrame(rows, columns=["method", "view", "raw_difference", "matched_difference", "matched_ci95",
                                       "bins_with_both"])


# -- regression -------------------------------------------------------------------------------


def design_matrix(data: pd.DataFrame) -> pd.DataFrame:
    """Intercept, reward, length difference (per 100 tokens), source dummies (baseline: the first source
    in SOURCES order) and self_generated. A column that adds no rank is dropped: e.g. at iteration 0
    every natural negative is self-generated, so self_generated is the complement of the perturbed
    sources and their dummies already carry it."""
    columns = {"intercept": 1.0, "negative_reward": data["negative_reward"].astype(float),
               "length_difference": data["length_difference"].astype(float) / LENGTH_UNIT}
    sources = sorted(data["source"].unique(), key=lambda s: (s not in NATURAL_SOURCES, s))
    columns.update({f"source={s}": (data["source"] == s).astype(float) for s in sources[1:]})
    columns["self_generated"] = data["self_generated"].fillna(False).astype(float)
    design = pd.DataFrame(columns, index=data.index)
    kept: list[str] = []
    for column in design:
        if np.linalg.matrix_rank(design[kept + [column]].to_numpy(dtype=float)) == len(kept) + 1:
            kept.append(column)
    return design[kept]


def ols(design: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """Least squares with classical standard errors and 95% t-intervals (numpy only)."""
    x = design.to_numpy(dtype=float)
    n, p = x.shape
    if n <= p or np.linalg.matrix_rank(x) < p:
        return pd.DataFrame(columns=["term", "coef", "se", "ci_low", "ci_high", "n"])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    sigma2 = residual @ residual / (n - p)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    half = t_critical(n - p) * se
    return pd.DataFrame({"term": list(design.columns), "coef": coef, "se": se, "ci_low": coef - half,
                         "ci_high": coef + half, "n": n})


def margin_regression(margins: pd.DataFrame, views=("step_gap", "loglik_margin_per_token", "loglik_margin",
                                                      "implicit_margin_per_token")) -> pd.DataFrame:
    """margin ~ reward + length + self_generated + source, per method, iteration and view.

    The reward coefficient is the test of "margins shrink as the negative's reward nears 1" with
    length and source held fixed: negative = shrinks. Rows lacking a covariate are dropped.
    """
    results = []
    for (method, iteration), group in margins.groupby(["method", "iteration"], sort=True):
        for view in views:
            if view in IMPLICIT_VIEWS and iteration == 0:
                continue
            data = group.dropna(subset=[view, "negative_reward", "length_difference"])
            fit = ols(design_matrix(data), data[view].to_numpy(dtype=float)) if len(data) else pd.DataFrame()
            if not fit.empty:
                results.append(fit.assign(method=method, iteration=iteration, view=view))
    if not results:
        return pd.DataFrame(columns=["method", "iteration", "view", "term", "coef", "se", "ci_low", "ci_high", "n"])
    data = pd.concat(results, ignore_index=True)
    return order_methods(data[["method", "iteration", "view", "term", "coef", "se", "ci_low", "ci_high", "n"]])


def regression_table(regression: pd.DataFrame, terms=("negative_reward", "length_difference")) -> pd.DataFrame:
    """The coefficients a reader needs (reward, length) at each run's final checkpoint."""
    last = regression.groupby("method")["iteration"].transform("max")
    return regression[(regression["iteration"] == last) & regression["term"].isin(terms)].reset_index(drop=True)


# -- paired across methods ---------------------------------------------------------------------

PERTURBED_SOURCES = ("perturbed_option", "perturbed_item")
PAIRED_METRICS = {"reward": "step gap (nats)", "success": "ranked correctly (%)"}
PAIRED_COLUMNS = ["comparison", "split", "metric", "difference", "ci_low", "ci_high", "mde", "seeds", "tasks"]


def paired_boundary_differences(boundary: pd.DataFrame, references=("sft", "eto_sft"),
                                sources=PERTURBED_SOURCES) -> pd.DataFrame:
    """Each method's last checkpoint minus a reference's on the same negatives and seed, per source: the step
    gap and the share of negatives it ranks below the expert, with paired.py's seeds x negatives interval.

    Perturbed experts by default: no model generated them and they have the expert's length, so neither
    confound enters the difference. Every run of a root is scored on the same negatives (boundary.SharedWork),
    so they pair across methods like test tasks do. Methods whose last checkpoint is the SFT model (best_of_n)
    are left out: their difference to sft is 0 by construction. ``split`` holds the source.
    """
    from coevo_lib.analysis import paired

    data = final_margins(margins_long(boundary))
    data = data[data["source"].isin(sources) & data["step_gap"].notna()
                & ((data["iteration"] > 0) | (data["method"] == "sft"))]
    gap = data["step_gap"].astype(float)
    scores = pd.DataFrame({"run": data["run"], "method": data["method"], "seed": data["seed"], "split": data["source"],
                           "task_id": data["negative_run"].astype(str) + "/" + data["negative_id"].astype(str),
                           "reward": gap, "success": 100.0 * (gap > 0)})
    if scores.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    summary = paired.paired_differences(scores, references)
    return summary.assign(metric=summary["metric"].map(PAIRED_METRICS))[PAIRED_COLUMNS]
