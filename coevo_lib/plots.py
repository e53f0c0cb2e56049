"""Figure functions: each takes the tidy frames made by coevo_lib.analysis and returns a Figure.

No loading or aggregation happens here (STYLE.md: figure code apart from the code that makes data).
Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing accumulates in
pyplot's global state when ``coevo_lib.figures`` draws dozens of them; a notebook shows the returned
figure once, as a PNG (NotebookFigure).
"""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from coevo_lib.analysis import paired, sensitivity as sweep  # the module; plots.sensitivity is the figure

METHOD_COLORS = {"sft": "#7f7f7f", "rft": "#bcbd22", "best_of_n": "#17becf", "eto": "#1f77b4",
                 "eto_sft": "#9edae5", "coevo": "#d62728", "coevo_frozen_failure": "#ff7f0e",
                 "positive_agent": "#2ca02c", "srlm": "#9467bd", "agent_r": "#8c564b"}
AGENT_STYLES = {"target": "-", "failure": "--", "positive": ":"}
CLASS_COLORS = {"hard negative": "#d62728", "ordinary failure": "#7f7f7f"}


class NotebookFigure(Figure):
    """A Figure that shows itself as a PNG in Jupyter without pyplot or an inline backend."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()


def color(method: str) -> str:
    # Methods without a colour of their own (new methods, sensitivity variants) share black.
    return METHOD_COLORS.get(method, "#000000")


def grid(rows: int, cols: int, width: float = 4.0, height: float = 3.0, **kwargs) -> tuple[Figure, np.ndarray]:
    figure = NotebookFigure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False, **kwargs)
    return figure, axes


def panel_grid(count: int, cols: int = 3, width: float = 4.2, height: float = 3.2, **kwargs):
    """Enough panels for ``count`` items in rows of at most ``cols``; spare panels hidden."""
    cols = max(1, min(cols, count))
    rows = -(-count // cols)
    figure, axes = grid(rows, cols, width, height, **kwargs)
    panels = list(axes.flat)
    for ax in panels[count:]:
        ax.set_visible(False)
    return figure, panels


def empty(message: str) -> Figure:
    """A figure that says why there is nothing to draw (better than a silently missing file)."""
    figure = NotebookFigure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure


def iteration_ticks(ax, iterations) -> None:
    ax.set_xticks(sorted({int(i) for i in iterations}))


def learning_curves(curves: pd.DataFrame, metric: str = "reward (x100)") -> Figure:
    """Evaluation reward per iteration, one panel per split, mean over seeds with 95% CI band."""
    if curves.empty:
        return empty("no evaluation records")
    splits = sorted(curves["split"].unique())
    figure, axes = grid(1, len(splits), sharey=True)
    for ax, split in zip(axes[0], splits):
        for method, data in curves[curves["split"] == split].groupby("method", sort=False):
            data = data.sort_values("iteration")
            ax.plot(data["iteration"], data["mean"], marker="o", color=color(method), label=method)
            ax.fill_between(data["iteration"], data["mean"] - data["ci95"], data["mean"] + data["ci95"],
                            color=color(method), alpha=0.15)
        ax.set(title=split, xlabel="iteration", ylabel=metric)
        iteration_ticks(ax, curves["iteration"])
    axes[0, -1].legend(fontsize=8)
    return figure


def comparison_labels(summary: pd.DataFrame, comparisons: list[str]) -> list[str]:
    """Y labels of the paired-difference rows: the comparison, with its seed count when the rows differ in it (a
    study part run on fewer seeds: a 1-seed interval covers tasks only and reads narrower than it is)."""
    seeds = summary.groupby("comparison")["seeds"].max()
    if seeds.nunique() <= 1:
        return comparisons
    return [f"{c} ({paired.seeds_phrase(seeds[c])})" for c in comparisons]


def paired_differences(summary: pd.DataFrame) -> Figure:
    """Method - reference per row (analysis.paired): 95% interval, grey = +-MDE, hollow = every task tied."""
    if summary.empty:
        return empty(paired.NO_COMPARISON)
    splits, labels = sorted(summary["split"].unique()), list(dict.fromkeys(summary["comparison"]))
    tick_labels = comparison_labels(summary, labels)
    panels = [(metric, split) for metric in dict.fromkeys(summary["metric"]) for split in splits]
    figure, axes = panel_grid(len(panels), len(splits), 4.6, 0.3 * len(labels) + 1.4, sharey=True)
    for index, (ax, (metric, split)) in enumerate(zip(axes, panels)):
        rows = summary[(summary["metric"] == metric) & (summary["split"] == split)]
        y = np.array([labels.index(c) for c in rows["comparison"]])
        ax.barh(y, 2 * rows["mde"], left=-rows["mde"], height=0.7, color="#e4e4e4", label="± MDE (80% power)")
        for yi, row in zip(y, rows.itertuples()):
            ax.errorbar(row.difference, yi, xerr=[[row.difference - row.ci_low], [row.ci_high - row.difference]],
                        fmt="o", ms=4, capsize=3, color=color(row.method), mfc="white" if row.se == 0 else None)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)), tick_labels, fontsize=8)
        ax.tick_params(axis="y", labelleft=index % len(splits) == 0)
        ax.set(title=f"{split}: {metric}", xlabel=f"difference in {paired.METRICS[metric]}, 95% CI")
    axes[0].invert_yaxis()  # first comparison on top, as in the table (shared y: once)
    figure_legend(figure, axes[:1], ncols=1)
    return figure


def sensitivity(summary: pd.DataFrame) -> Figure:
    """Variant - eto_sft in reward along each sweep axis (rows) per split (columns): 95% interval, grey = +-MDE."""
    rewards = summary[summary["metric"] == "reward"]
    if rewards.empty:
        return empty(sweep.NO_SENSITIVITY)
    axes_drawn, splits = [a for a in sweep.AXES if a in set(rewards["axis"])], sorted(rewards["split"].unique())
    # y shared within an axis (row) only, and never past +-100: a reward difference cannot exceed that,
    # and a 2-seed interval that does would flatten every other variant of the row.
    figure, axes = grid(len(axes_drawn), len(splits), 4.8, 3.4, sharey="row")
    for (row, axis), (col, split) in ((a, b) for a in enumerate(axes_drawn) for b in enumerate(splits)):
        ax = axes[row, col]
        sweep_panel(ax, axis, rewards[(rewards["axis"] == axis) & (rewards["split"] == split)])
        ax.set_title(f"{split}: {axis}", fontsize=10)
        ax.tick_params(axis="y", labelleft=col == 0)
    for ax in axes[:, 0]:
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -100.0), min(high, 100.0))
        ax.set_ylabel(f"Δ {paired.METRICS['reward']} vs {sweep.REFERENCE}")
    figure_legend(figure, axes.flat, ncols=2)
    return figure


def sweep_panel(ax, axis: str, rows: pd.DataFrame) -> None:
    """One axis in one split: every value of the axis gets a tick, those without runs say so."""
    variants = sweep.AXES[axis]
    x = np.array([[label for label, _ in variants].index(m) for m in rows["method"]])
    ax.bar(x, 2 * rows["mde"], bottom=-rows["mde"], width=0.6, color="#e4e4e4", label="± MDE (80% power)")
    for xi, row in zip(x, rows.itertuples()):
        ax.errorbar(xi, row.difference, yerr=[[row.difference - row.ci_low], [row.ci_high - row.difference]],
                    fmt="o", ms=5, capsize=4, color=color("coevo"), mfc="white" if row.se == 0 else None,
                    label=f"variant − {sweep.REFERENCE}, 95% CI")
    ax.axhline(0.0, color="black", lw=0.8)
    present = set(rows["method"])
    ticks = [f"{textwrap.fill(value, 18)}\n{label if label in present else '(no runs)'}" for label, value in variants]
    ax.set_xticks(range(len(variants)), ticks, fontsize=8)
    ax.set_xlim(-0.6, len(variants) - 0.4)


def failure_reward_histograms(histogram: pd.DataFrame) -> Figure:
    """Share of failures per reward bin: one panel per agent (method/agent), one line per iteration (darker =
    later), panels in rows of 4 so that many methods stay a readable grid."""
    if histogram.empty:
        return empty("no failed rollouts")
    sources, iterations = sorted(histogram["source"].unique()), sorted(histogram["iteration"].unique())
    figure, axes = panel_grid(len(sources), 4, 3.2, 2.4, sharex=True, sharey=True)
    shades = np.linspace(0.35, 1.0, len(iterations))
    for ax, source in zip(axes, sources):
        for shade, iteration in zip(shades, iterations):
            data = histogram[(histogram["source"] == source) & (histogram["iteration"] == iteration)]
            ax.step(data["bin_left"] + 0.05, data["share"], where="mid", alpha=shade, lw=1.4,
                    color=color(source.split("/")[0]), ls=("-", "--", ":", "-.")[iteration % 4],
                    label=f"iteration {iteration}")
        ax.axvline(0.6, color="black", lw=0.8, ls=":")
        ax.set_title(source, fontsize=9)
        ax.set(xlabel="failure reward", ylabel="share of failures")
        ax.label_outer()
    figure_legend(figure, axes, ncols=len(iterations))
    return figure


def threshold_curves(curve: pd.DataFrame) -> Figure:
    """Share of failures with reward >= t against t, one panel per iteration, one line per agent."""
    if curve.empty:
        return empty("no failed rollouts")
    iterations = sorted(curve["iteration"].unique())
    figure, axes = panel_grid(len(iterations), 2, 4.0, 3.0, sharey=True)
    for ax, iteration in zip(axes, iterations):
        for (source, method, agent), data in curve[curve["iteration"] == iteration].groupby(
                ["source", "method", "agent"]):
            ax.plot(data["threshold"], data["share"], marker="o", color=color(method),
                    ls=AGENT_STYLES.get(agent, "-."), label=source)
        ax.set(title=f"iteration {iteration}", xlabel="threshold t", ylabel="share of failures with r >= t")
    # One legend for all panels: a one-iteration method (rft) draws in iteration 1's panel only.
    figure_legend(figure, axes[:len(iterations)], ncols=5)
    return figure


def stacked_bars(data: pd.DataFrame, parts: Sequence[str], colors: Sequence[str], xlabel: str) -> Figure:
    """One horizontal bar per row of ``data`` (labelled by its ``label`` column), split into ``parts``.

    Horizontal, so the figure grows taller, not wider, with the rows (a 5-seed study has dozens).
    """
    figure, axes = grid(1, 1, 7.0, max(3.0, 0.22 * len(data) + 1.2))
    ax, left = axes[0, 0], np.zeros(len(data))
    for part, part_color in zip(parts, colors):
        ax.barh(data["label"], data[part], left=left, color=part_color, label=part)
        left += data[part].to_numpy(dtype=float)
    # A part that is 0 in every row still draws zero-width bars at the row's total, whose sticky edges
    # stop autoscaling at the longest bar: the frame would cut it. Leave room explicitly.
    ax.set_xlim(0, max(float(np.nanmax(left)), 1.0) * 1.04)
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_xlabel(xlabel)
    figure_legend(figure, [ax], ncols=3)  # below the bars, which fill the panel's width
    return figure


def outcome_mix(mix: pd.DataFrame) -> Figure:
    """Successes, ordinary failures and hard negatives per agent and iteration (summed over seeds)."""
    if mix.empty:
        return empty("no rollouts")
    return stacked_bars(mix, ["successes", "ordinary_failures", "hard_negatives"], ["#2ca02c", "#7f7f7f", "#d62728"],
                        "episodes")


def pair_mix(pairs: pd.DataFrame) -> Figure:
    """Pairs of each kind per method and iteration (wide frame: one column per kind)."""
    if pairs.empty:
        return empty("no preference pairs")
    kinds = [c for c in pairs.columns if c != "label"]
    return stacked_bars(pairs, kinds, [f"C{i}" for i in range(len(kinds))], "pairs")


def boxes(ax, data: pd.DataFrame, by: str, value: str, horizontal: bool = False) -> None:
    """Box plot of ``value`` for each value of ``by`` (NaNs dropped); horizontal keeps long labels readable."""
    labels = sorted(data[by].unique())
    values = [data.loc[data[by] == label, value].dropna().astype(float).to_numpy() for label in labels]
    ax.boxplot(values, orientation="horizontal" if horizontal else "vertical")
    if horizontal:
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        if not ax.yaxis_inverted():  # axes sharing y share the inversion: flip once
            ax.invert_yaxis()  # first label on top, as in a table
    else:
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, fontsize=7)


def closeness_to_expert(closeness: pd.DataFrame) -> Figure:
    """Failures' normalised action edit distance to the expert, and the step where they leave its path."""
    if closeness.empty:
        return empty("no failed rollouts with an expert trajectory")
    data = closeness.assign(label=closeness["source"] + " it" + closeness["iteration"].astype(str))
    # One row per (agent, iteration): the height grows with their number so labels never overlap.
    figure, axes = grid(1, 2, 5.0, max(3.0, 0.2 * data["label"].nunique() + 1.0), sharey=True)
    boxes(axes[0, 0], data, "label", "expert_distance", horizontal=True)
    axes[0, 0].set_xlabel("normalised edit distance to expert")
    boxes(axes[0, 1], data, "label", "divergence_step", horizontal=True)
    axes[0, 1].set_xlabel("first step off the expert path")
    return figure


def collapse_monitor(monitor: pd.DataFrame) -> Figure:
    """Second agent per iteration: own success rate, distinct failures, pairwise and target distances."""
    if monitor.empty:
        return empty("no second-agent rollouts (only coevo-style methods have one)")
    panels = [("success_rate", "own success rate"), ("distinct_share", "distinct failures / failures"),
              ("mean_pairwise_distance", "mean pairwise edit distance"),
              ("mean_target_distance", "edit distance to target's failure")]
    figure, axes = panel_grid(len(panels), 2, 3.8, 3.0)
    for ax, (column, title) in zip(axes, panels):
        for (run, method, agent), data in monitor.groupby(["run", "method", "agent"]):
            data = data.sort_values("iteration")
            # one line per run, one legend entry per method: a study's seeds would hide a panel under the legend
            ax.plot(data["iteration"], data[column], marker="o", color=color(method), label=f"{method} ({agent})")
        ax.set(title=title, xlabel="iteration", ylim=(-0.02, 1.02))
        iteration_ticks(ax, monitor["iteration"])
    figure_legend(figure, axes, ncols=3)
    return figure


# -- decision boundary (inputs: coevo_lib.analysis.boundary_views) ------------------------------

SOURCE_COLORS = {"greedy_eval": "#1f77b4", "sampled_target": "#2ca02c", "sampled_failure_agent": "#d62728",
                 "perturbed_option": "#9467bd", "perturbed_item": "#8c564b"}
HEADLINE_VIEWS = {"step_gap": "step gap", "loglik_margin_per_token": "log-lik margin / token",
                  "implicit_margin_per_token": "implicit margin / token", "loglik_margin": "log-lik margin, summed"}
VIEW_TITLES = {**HEADLINE_VIEWS, "implicit_margin": "implicit margin, summed"}
NO_BOUNDARY = "no decision-boundary records (run coevo_lib.analysis.boundary first)"


def source_style(label: str) -> dict:
    """Colour by source; dashed when the scored checkpoint generated the negatives itself."""
    source = label.split(",")[0]
    return {"color": SOURCE_COLORS.get(source, "#7f7f7f"), "ls": "--" if label.endswith(", self") else "-"}


def step_gaps(summary: pd.DataFrame) -> Figure:
    """Headline view: mean step gap (95% CI) per iteration, one line per negative source, a panel per method."""
    data = summary[summary["view"] == "step_gap"] if not summary.empty else summary
    if data.empty:
        return empty("no negatives that leave the expert path at a shared step")
    methods, labels = list(dict.fromkeys(data["method"])), sorted(data["source_label"].unique())
    figure, axes = panel_grid(len(methods), sharey=True)
    for ax, method in zip(axes, methods):
        for label, rows in data[data["method"] == method].groupby("source_label"):
            rows = rows.sort_values("iteration")
            shift = 0.05 * (labels.index(label) - (len(labels) - 1) / 2)  # keeps overlapping intervals apart
            ax.errorbar(rows["iteration"] + shift, rows["mean"], yerr=rows["ci95"].fillna(0), marker="o", ms=4,
                        capsize=2, label=label, **source_style(label))
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set(title=method, xlabel="iteration", ylabel="step gap (nats)")
        iteration_ticks(ax, data["iteration"])
    figure_legend(figure, axes, ncols=3)
    return figure


def figure_legend(figure: Figure, axes, ncols: int) -> None:
    """One legend below the panels with every label any panel drew (panels may lack some)."""
    entries: dict = {}
    for ax in axes:
        entries.update(zip(*reversed(ax.get_legend_handles_labels())))
    figure.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=ncols, fontsize=7)


def margin_zero_line(ax, line_color: str) -> None:
    """The zero line of a horizontal margin axis, with tick labels that stay readable at any margin's scale."""
    ax.axvline(0.0, color=line_color, lw=0.8)
    # Per-token implicit margins and their coefficients are ~1e-3: plain tick labels that small overlap.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))


def margins_by_source(summary: pd.DataFrame) -> Figure:
    """Final checkpoints: mean margin (95% CI) per negative source, one marker per method, a panel per view."""
    if summary.empty:
        return empty(NO_BOUNDARY)
    last = summary.groupby("method")["iteration"].transform("max")
    data = summary[(summary["iteration"] == last) & summary["view"].isin(HEADLINE_VIEWS)]
    labels = sorted(data["source_label"].unique())
    methods = list(dict.fromkeys(data["method"]))
    figure, axes = panel_grid(len(HEADLINE_VIEWS), 2, 5.2, max(2.6, 0.45 * len(labels) + 1.2), sharey=True)
    for ax, (view, title) in zip(axes, HEADLINE_VIEWS.items()):
        for offset, method in enumerate(methods):
            rows = data[(data["view"] == view) & (data["method"] == method)]
            y = [labels.index(label) + 0.12 * (offset - (len(methods) - 1) / 2) for label in rows["source_label"]]
            ax.errorbar(rows["mean"], y, xerr=rows["ci95"].fillna(0), fmt="o", ms=4, capsize=2,
                        color=color(method), label=method)
        margin_zero_line(ax, "black")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title)
    figure_legend(figure, axes, ncols=min(len(methods), 5))
    return figure


def length_confound(margins: pd.DataFrame) -> Figure:
    """The SFT model (iteration 0): summed vs per-token log-lik margin against the length difference."""
    data = margins[margins["iteration"] == 0].dropna(subset=["length_difference", "loglik_margin_per_token"])
    if data.empty:
        return empty("no token counts in the decision-boundary records (recompute them)")
    data = data.drop_duplicates(["negative_id", "source", "scored_model"])
    figure, axes = grid(1, 2, 4.8, 3.6)
    for ax, view in zip(axes[0], ("loglik_margin", "loglik_margin_per_token")):
        for source, rows in data.groupby("source"):
            ax.scatter(rows["length_difference"], rows[view], s=9, alpha=0.5, label=source,
                       color=SOURCE_COLORS.get(source, "#7f7f7f"))
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axvline(0.0, color="black", lw=0.8, ls=":")
        ax.set(title=VIEW_TITLES[view], xlabel="negative - expert length (assistant tokens)", ylabel="nats")
    axes[0, 1].legend(fontsize=7)
    return figure


def length_matched(cells: pd.DataFrame) -> Figure:
    """Final checkpoints: hard vs ordinary negatives' mean margin within length bins (rows: views)."""
    if cells.empty or cells["length_bin"].eq("all lengths").all():
        return empty("no token counts in the decision-boundary records (recompute them)")
    views = [v for v in ("step_gap", "loglik_margin_per_token", "loglik_margin") if v in set(cells["view"])]
    methods = list(dict.fromkeys(cells["method"]))
    bins = sorted(cells["length_bin"].unique(), key=lambda b: int(b.split("-")[0]))
    figure, axes = grid(len(views), len(methods), 3.0, 2.6, sharex=True, sharey="row")
    for row, view in enumerate(views):
        for col, method in enumerate(methods):
            ax = axes[row, col]
            for negative_class, rows in cells[(cells["view"] == view) & (cells["method"] == method)].groupby(
                    "negative_class"):
                rows = rows.assign(x=[bins.index(b) for b in rows["length_bin"]]).sort_values("x")
                ax.errorbar(rows["x"], rows["mean"], yerr=rows["ci95"].fillna(0), marker="o", capsize=2,
                            color=CLASS_COLORS[negative_class], label=negative_class)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xticks(range(len(bins)), bins, rotation=40, fontsize=7)
            ax.set_title(f"{method}: {VIEW_TITLES[view]}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    return figure


def regression_coefficients(table: pd.DataFrame) -> Figure:
    """Reward and length coefficients (95% CI) of margin ~ reward + length + source per method and view."""
    if table.empty:
        return empty("too few decision-boundary records with token counts for the regression")
    views = [v for v in HEADLINE_VIEWS if v in set(table["view"])]
    terms = {"negative_reward": "reward coefficient", "length_difference": "length coefficient (per 100 tokens)"}
    methods = list(dict.fromkeys(table["method"]))
    figure, axes = grid(len(terms), len(views), 3.4, max(2.2, 0.35 * len(methods) + 1.0), sharey=True)
    for row, (term, label) in enumerate(terms.items()):
        for col, view in enumerate(views):
            ax, rows = axes[row, col], table[(table["term"] == term) & (table["view"] == view)]
            y = [methods.index(m) for m in rows["method"]]
            ax.errorbar(rows["coef"], y, xerr=[rows["coef"] - rows["ci_low"], rows["ci_high"] - rows["coef"]],
                        fmt="o", capsize=2, color="black")
            margin_zero_line(ax, "#d62728")
            ax.set_yticks(range(len(methods)), methods, fontsize=8)
            ax.set(title=VIEW_TITLES[view], xlabel=label)
    return figure


def preference_accuracy(accuracy: pd.DataFrame) -> Figure:
    """Greedy evaluation negatives: share ranked correctly per view; solid = hard negatives, dashed = ordinary."""
    if accuracy.empty:
        return empty("no decision-boundary records")
    figure, axes = panel_grid(len(HEADLINE_VIEWS), 2, 3.8, 3.0, sharey=True)
    for ax, (view, title) in zip(axes, HEADLINE_VIEWS.items()):
        for (method, negative_class), data in accuracy.groupby(["method", "negative_class"], sort=False):
            data = data.sort_values("iteration")
            ax.plot(data["iteration"], data[f"{view}_accuracy"], marker="o", color=color(method),
                    ls="-" if negative_class == "hard negative" else "--", label=f"{method}, {negative_class}")
        ax.set(title=title, xlabel="iteration", ylim=(-0.02, 1.02))
        iteration_ticks(ax, accuracy["iteration"])
    axes[0].set_ylabel("preference accuracy")
    figure_legend(figure, axes, ncols=4)
    return figure


def margin_vs_reward(margins: pd.DataFrame) -> Figure:
    """Margin against the negative's reward (final checkpoints), a panel per view."""
    if margins.empty:
        return empty("no decision-boundary records")
    views = [v for v in ("step_gap", "loglik_margin_per_token", "loglik_margin") if margins[v].notna().any()]
    if not views:
        return empty("no margins in the decision-boundary records")
    figure, axes = panel_grid(len(views), 2, 4.2, 3.4)
    for ax, view in zip(axes, views):
        for method, data in margins.dropna(subset=[view]).groupby("method", sort=False):
            # Faint points show the spread; the line joins the mean margin per reward bin of 0.05, since
            # many methods overlap on the few reward levels a task's reward can take.
            ax.scatter(data["negative_reward"], data[view], s=8, alpha=0.2, color=color(method))
            means = data.groupby((data["negative_reward"] / 0.05).round() * 0.05)[view].mean()
            ax.plot(means.index, means.to_numpy(), marker="o", color=color(method), label=method)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axvline(0.6, color="black", lw=0.8, ls=":")
        ax.set(title=VIEW_TITLES[view], xlabel="negative's reward", ylabel="nats")
    axes[len(views) - 1].legend(fontsize=8)
    return figure


def compute_bars(compute: pd.DataFrame) -> Figure:
    """Mean per run of tokens generated, tokens trained and wall time, per method."""
    if compute.empty:
        return empty("no metrics")
    panels = [("training_tokens_generated", "tokens generated for training data"),
              ("eval_tokens", "evaluation tokens generated"),
              ("tokens_trained", "tokens trained"), ("wall_min", "wall time (min)")]
    figure, axes = panel_grid(len(panels), 2, 3.6, 3.0)
    for ax, (column, title) in zip(axes, panels):
        ax.bar(compute["method"], compute[column], color=[color(m) for m in compute["method"]])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return figure
