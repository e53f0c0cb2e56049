"""The lambda_SFT / pair-mix sensitivity (coevo_lib.analysis.sensitivity) on hand-made task scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_paired_stats import scores_frame

from coevo_lib import figures, plots
from coevo_lib.analysis import paired, sensitivity

SPLITS = ("test_seen", "test_unseen")
REFERENCE_REWARDS = np.random.default_rng(0).uniform(0, 90, (2, 6))  # 2 seeds x 6 tasks


def study(offsets: dict[str, float], splits=SPLITS) -> pd.DataFrame:
    """eto_sft's scores and, per method, eto_sft's scores + that offset on every task, in every split."""
    methods = {"eto_sft": 0.0, **offsets}
    return pd.concat([scores_frame(method, REFERENCE_REWARDS + offset, split)
                      for method, offset in methods.items() for split in splits], ignore_index=True)


def row(summary: pd.DataFrame, method: str, axis: str, split: str = "test_seen", metric: str = "reward"):
    rows = summary[(summary["method"] == method) & (summary["axis"] == axis) & (summary["split"] == split)
                   & (summary["metric"] == metric)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_a_variant_ten_points_above_eto_sft_differs_by_ten_with_a_zero_width_interval():
    summary = sensitivity.sensitivity(study({"coevo_lsft0.25": 10.0, "coevo": -4.0}))
    lsft = row(summary, "coevo_lsft0.25", "lambda_SFT", "test_unseen")
    assert (lsft["difference"], lsft["ci_low"], lsft["ci_high"], lsft["mde"]) == pytest.approx((10, 10, 10, 0))
    assert (lsft["value"], lsft["comparison"]) == ("0.25", "coevo_lsft0.25 − eto_sft")
    assert row(summary, "coevo", "lambda_SFT")["difference"] == pytest.approx(-4.0)
    assert list(summary.columns) == ["axis", "value", *paired.SUMMARY_COLUMNS]


def test_the_standard_coevo_run_is_the_default_of_every_axis_with_the_same_numbers():
    summary = sensitivity.sensitivity(study({"coevo": 3.0, "coevo_v1_pairs": 1.0}))
    on_lambda, on_mix = row(summary, "coevo", "lambda_SFT"), row(summary, "coevo", "target pair mix")
    on_loss = row(summary, "coevo", "failure agent's loss")
    assert (on_lambda["value"], on_mix["value"], on_loss["value"]) == ("0.5", "+ failure agent's failures", "DPO only")
    assert on_lambda["difference"] == on_mix["difference"] == on_loss["difference"] == pytest.approx(3.0)


def test_variants_without_runs_are_skipped_and_the_rest_keep_the_axis_order():
    summary = sensitivity.sensitivity(study({"coevo_lsft1": 2.0, "coevo_lsft0": 5.0, "coevo_own_failures": 1.0}))
    reward_seen = summary[(summary["metric"] == "reward") & (summary["split"] == "test_seen")]
    assert list(zip(reward_seen["axis"], reward_seen["method"])) == [
        ("lambda_SFT", "coevo_lsft0"), ("lambda_SFT", "coevo_lsft1"), ("target pair mix", "coevo_own_failures")]
    assert len(summary) == 3 * len(SPLITS) * len(paired.METRICS)


def test_nothing_to_compare_gives_an_empty_frame_that_says_why():
    no_reference = study({"coevo_lsft0": 5.0}).query("method != 'eto_sft'")
    for scores in (no_reference, study({}), study({"coevo": 2.0})):  # coevo alone is no sweep
        summary = sensitivity.sensitivity(scores)
        assert summary.empty and list(summary.columns) == sensitivity.COLUMNS
    assert sensitivity.sensitivity_markdown(summary) == sensitivity.NO_SENSITIVITY + ".\n"
    assert sensitivity.sensitivity_table(summary).empty  # the notebook shows it on studies without a sweep
    assert plots.sensitivity(summary).texts[0].get_text() == sensitivity.NO_SENSITIVITY


def test_sweep_only_labels_are_every_sweep_label_but_coevo():
    assert sensitivity.SWEEP_ONLY == {"coevo_lsft0", "coevo_lsft0.25", "coevo_lsft1", "coevo_own_failures",
                                      "coevo_v1_pairs", "coevo_failure_sft"}


def test_the_headline_paired_summary_leaves_the_sweep_variants_out():
    frames = figures.Frames(runs=[])
    frames.task_scores = study({"coevo": 3.0, "coevo_lsft0": 5.0, "coevo_v1_pairs": 1.0, "sft": -20.0})
    assert set(frames.paired_summary["method"]) == {"coevo", "eto_sft"}
    assert set(frames.sensitivity_summary["method"]) == {"coevo", "coevo_lsft0", "coevo_v1_pairs"}


def test_sensitivity_products_follow_the_paired_differences():
    names = [product.name for product in figures.PRODUCTS]
    assert names.index("sensitivity.png") == names.index("paired_differences.md") + 1
    assert names.index("sensitivity.md") == names.index("sensitivity.png") + 1


def test_markdown_names_the_reference_and_one_row_per_axis_value_and_split():
    summary = sensitivity.sensitivity(study({"coevo_lsft0.25": 10.0, "coevo": 3.0}))
    text = sensitivity.sensitivity_markdown(summary)
    assert "paired on the same seed's test tasks" in text and "minus eto_sft" in text
    assert "| lambda_SFT | 0.25 | coevo_lsft0.25 − eto_sft | test_seen | +10.0 [+10.0, +10.0] † |" in text
    assert "| target pair mix | + failure agent's failures | coevo − eto_sft | test_unseen | +3.0" in text
    assert len(sensitivity.sensitivity_table(summary)) == 4 * len(SPLITS)  # coevo on every axis


@pytest.mark.parametrize("splits, panels", [(SPLITS, 6), (("test_seen",), 3)])  # 3 axes x splits
def test_the_figure_has_a_panel_per_axis_and_split(splits, panels):
    summary = sensitivity.sensitivity(study({"coevo_lsft0": 5.0, "coevo": 3.0}, splits))
    figure = plots.sensitivity(summary)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == panels
    ticks = [tick.get_text() for tick in visible[0].get_xticklabels()]
    assert ticks[0].endswith("coevo_lsft0") and ticks[1].endswith("(no runs)") and len(ticks) == 4
    width, height = figure.get_size_inches() * 110
    assert max(width, height) <= 3000 and max(width / height, height / width) <= 4
    assert figure._repr_png_().startswith(b"\x89PNG")
