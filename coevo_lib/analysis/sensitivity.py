"""Sensitivity of coevo to lambda_SFT, the target's pair mix and the failure agent's loss: each variant minus
eto_sft, paired by task.

The sensitivity study runs coevo variants in the results study's runs root, so every variant of a seed shares
that seed's SFT checkpoint and test tasks with eto_sft (ETO's pairs with coevo's loss). Pairing each variant
with eto_sft, rather than with the standard coevo run, keeps one reference for every axis and puts the variants
on the scale of the headline comparison coevo − eto_sft. Intervals and MDEs are those of
coevo_lib.analysis.paired (random-effects paired interval); nothing is re-estimated here.
"""

from __future__ import annotations

import pandas as pd

from coevo_lib.analysis import paired
from coevo_lib.analysis.tables import markdown_table

REFERENCE = "eto_sft"
# Axis -> (run label, value shown) in the order drawn; the standard coevo run is the default of every axis.
AXES = {
    "lambda_SFT": [("coevo_lsft0", "0"), ("coevo_lsft0.25", "0.25"), ("coevo", "0.5"), ("coevo_lsft1", "1")],
    "target pair mix": [("coevo_own_failures", "own failures"), ("coevo", "+ failure agent's failures"),
                        ("coevo_v1_pairs", "+ v1 failure > failure")],
    "failure agent's loss": [("coevo", "DPO only"), ("coevo_failure_sft", "DPO 0.5 + SFT 0.5")],
}
SWEEP_ONLY = frozenset(label for variants in AXES.values() for label, _ in variants) - {"coevo"}
COLUMNS = ["axis", "value", *paired.SUMMARY_COLUMNS]
NO_SENSITIVITY = (f"no sensitivity comparison: needs final evaluations of {REFERENCE} and of at least one sweep "
                  f"variant ({', '.join(sorted(SWEEP_ONLY))}) on the same seed's test tasks")


def without_sweep(scores: pd.DataFrame) -> pd.DataFrame:
    """Task scores of the main methods only: the headline comparisons leave the sweep-only variants out."""
    return scores[~scores["method"].isin(SWEEP_ONLY)]


def sensitivity(scores: pd.DataFrame) -> pd.DataFrame:
    """Every variant present minus eto_sft, per axis, split and metric: paired's summary columns + axis, value.

    Variants without runs are skipped, so a partial sweep still shows what it has. Empty (with the columns)
    without eto_sft or without any sweep-only variant (the standard coevo run alone is no sweep).
    """
    present = set(scores["method"])
    if REFERENCE not in present or not present & SWEEP_ONLY:
        return pd.DataFrame(columns=COLUMNS)
    rows = [row for axis, variants in AXES.items() for label, value in variants if label in present
            for row in variant_rows(scores, axis, value, label)]
    return pd.DataFrame(rows, columns=COLUMNS)


def variant_rows(scores: pd.DataFrame, axis: str, value: str, label: str) -> list[dict]:
    differences = paired.paired_task_differences(scores, label, REFERENCE)
    return [{"axis": axis, "value": value, **paired.summary_row(label, REFERENCE, split, metric, pairs)}
            for split, pairs in differences.groupby("split", sort=True) for metric in paired.METRICS]


def sensitivity_table(summary: pd.DataFrame) -> pd.DataFrame:
    """paired.differences_table's rows, one per axis, value and split, with the axis and value in front."""
    if summary.empty:
        return pd.DataFrame(columns=["axis", "value", "comparison", "split"])
    parts = []
    for axis, rows in summary.groupby("axis", sort=False):
        # Per axis: the standard coevo run is on both, and differences_table groups rows by comparison.
        table = paired.differences_table(rows)
        values = dict(zip(rows["comparison"], rows["value"]))
        parts.append(table.assign(axis=axis, value=table["comparison"].map(values)))
    table = pd.concat(parts, ignore_index=True)
    return table[["axis", "value", *(c for c in table.columns if c not in ("axis", "value"))]]


def sensitivity_markdown(summary: pd.DataFrame) -> str:
    """The sensitivity table with a paragraph saying what each row compares."""
    if summary.empty:
        return NO_SENSITIVITY + ".\n"
    intro = (f"coevo's sensitivity to lambda_SFT (the weight of its SFT term; 0.5 is the standard coevo run) and "
             f"to the target's preference pairs (own failures only; + the failure agent's failures, the default; "
             f"+ v1 failure > failure pairs) and to the failure agent's loss (DPO only, the default; DPO + an SFT term "
             f"on the chosen failure, 0.5 each). Each row is one variant minus {REFERENCE} (ETO's pairs with coevo's "
             f"loss, the loss-matched reference), paired on the same seed's test tasks (final evaluation); the "
             f"standard coevo run appears on every axis. Interval and MDE as in paired_differences.md: paired 95% "
             f"t-interval from a random-effects model of the per-task differences, and the true difference "
             f"detected with 80% power at two-sided alpha 0.05. Variants without runs are left out.")
    note = f"\n{paired.ZERO_WIDTH}\n" if (summary["se"] == 0).any() else ""
    title = "# Sensitivity: lambda_SFT, pair mix, failure agent's loss"
    return f"{title}\n\n{intro}\n\n{markdown_table(sensitivity_table(summary))}{note}"
