"""Redraw every figure and table from saved runs: ``python -m coevo_lib.figures --runs runs --out figures``.

Reads run directories only (metrics, episodes, pairs, analysis/boundary.jsonl): no training, no
sampling, no model loading. Runs are grouped by the folder that holds them (a study's runs_root,
e.g. runs/demo), and each group gets ``<out>/<group>/`` with PNGs, markdown tables and a README.md
saying what each file shows; ``<out>/README.md`` indexes the groups.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; must precede any pyplot import (there is none in coevo_lib.plots)

import pandas as pd  # noqa: E402

from coevo_lib import plots  # noqa: E402
from coevo_lib.analysis import (baselines, boundary_views, hard_negatives, loading, paired, sensitivity,  # noqa: E402
                                 tables, tiny_vs_pretrained)

log = logging.getLogger(__name__)


@dataclass
class Frames:
    """The tidy frames of one group of runs, each loaded on first use."""

    runs: list[Path]
    tiny_runs: list[Path] = field(default_factory=list)  # a tiny-model study set beside a pretrained one

    @cached_property
    def pretrained(self) -> bool:
        return not any(tiny_vs_pretrained.uses_tiny_model(run) for run in self.runs)

    @cached_property
    def info(self) -> pd.DataFrame:
        return loading.runs_table(self.runs)

    @cached_property
    def task_scores(self) -> pd.DataFrame:
        return paired.load_task_scores(self.runs)

    @cached_property
    def paired_summary(self) -> pd.DataFrame:
        # The headline compares the main methods; the sweep variants have their own product (sensitivity.*).
        return paired.paired_differences(sensitivity.without_sweep(self.task_scores))

    @cached_property
    def sensitivity_summary(self) -> pd.DataFrame:
        return sensitivity.sensitivity(self.task_scores)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return loading.load_metrics(self.runs)

    @cached_property
    def evals(self) -> pd.DataFrame:
        return loading.load_eval(self.runs)

    @cached_property
    def episodes(self) -> pd.DataFrame:
        return loading.load_episodes(self.runs, kinds=("expert", "train"))

    @cached_property
    def pairs(self) -> pd.DataFrame:
        return loading.load_pairs(self.runs)

    @cached_property
    def boundary(self) -> pd.DataFrame:
        return boundary_views.margins_long(loading.load_boundary(self.runs))

    @cached_property
    def boundary_summary(self) -> pd.DataFrame:
        return boundary_views.source_summary(self.boundary)

    @cached_property
    def regression(self) -> pd.DataFrame:
        return boundary_views.margin_regression(self.boundary)

    def triplet_episodes(self) -> pd.DataFrame:
        wanted = [r for r, m in zip(self.runs, self.info["method"]) if m in ("eto", "coevo")]
        return loading.load_episodes(wanted, kinds=("expert", "train"), messages=True)


@dataclass
class Product:
    """One file in a group folder: a figure (.png) or a markdown table (.md)."""

    name: str
    description: str
    build: Callable[[Frames], object]  # -> matplotlib Figure or markdown text
    # which data must exist: runs | boundary | baselines (srlm or agent_r runs) | tiny (a tiny-model study to set
    # beside this group, whose runs use a pretrained model)
    needs: str = "runs"


def md(frame: pd.DataFrame) -> str:
    return tables.markdown_table(frame)


PRODUCTS = [
    Product("paired_differences.png", "Headline: each main method (the sensitivity variants are in "
            "sensitivity.png) minus each reference (sft, eto, eto_sft) on the same seed's test tasks, per split, "
            "reward (x100) and success (%): paired 95% intervals (random-effects model over seeds x tasks), grey "
            "band = the minimum detectable effect (80% power); a hollow dot = every task scored the same "
            "difference (no width, which is not certainty).",
            lambda f: plots.paired_differences(f.paired_summary)),
    Product("paired_differences.md", "The numbers behind paired_differences.png: difference [95% CI], minimum "
            "detectable effect, the unpaired half-width for contrast, seeds, tasks and the interval's design.",
            lambda f: paired.differences_markdown(f.paired_summary)),
    Product("sensitivity.png", "coevo's sensitivity, one row per axis: each lambda_SFT (0, 0.25, 0.5 = coevo, 1), "
            "target pair-mix variant (own failures; + failure agent's, the default; + v1 failure > failure pairs) "
            "and failure-agent loss (DPO only, the default; DPO + SFT) minus eto_sft on the same seed's test "
            "tasks, reward (x100) per split: paired 95% intervals, grey band = minimum detectable effect; "
            "variants without runs are marked (no runs).",
            lambda f: plots.sensitivity(f.sensitivity_summary)),
    Product("sensitivity.md", "The numbers behind sensitivity.png, reward and success: difference to eto_sft "
            "[95% CI], minimum detectable effect, the unpaired half-width, seeds and tasks per variant and split.",
            lambda f: sensitivity.sensitivity_markdown(f.sensitivity_summary)),
    Product("learning_curves.png", "Evaluation reward (x100) per iteration and test split; mean over seeds, "
            "band = 95% t-interval.", lambda f: plots.learning_curves(tables.learning_curves(f.evals))),
    Product("main_table.md", "Final evaluation reward (x100) per method and split: mean ± 95% CI (n seeds).",
            lambda f: md(tables.wide(tables.main_table(f.evals)))),
    Product("success_table.md", "Final success rate (%) per method and split: mean ± 95% CI (n seeds).",
            lambda f: md(tables.wide(tables.main_table(f.evals, "success")))),
    Product("ablation_table.md", "coevo vs w/o co-evolution (frozen failure agent) vs w/o failure agent "
            "(positive agent): final reward (x100).", lambda f: md(tables.wide(tables.ablation_table(f.evals)))),
    Product("compute_table.md", "Per method, mean per run: tokens generated for training data (rollouts, SRLM's "
            "judge, Agent-R's search and verifier) and in evaluation, tokens trained, wall time.",
            lambda f: md(tables.compute_table(f.metrics))),
    Product("compute_by_iteration.md", "The same compute accounting per iteration (0 = base, experts, SFT).",
            lambda f: md(tables.compute_by_iteration(f.metrics))),
    Product("compute.png", "Compute per method (bars of compute_table.md).",
            lambda f: plots.compute_bars(tables.compute_table(f.metrics))),
    Product("interaction_table.md", "Model calls and environment work per method and iteration (mean over seeds) "
            "of the training-side stages: rollouts, SRLM's judge, Agent-R's search and verifier (revise); "
            "generations, env steps, resets, tokens, wall time. Runs saved before these counts existed show -.",
            lambda f: md(baselines.interaction_table(f.metrics))),
    Product("judge_table.md", "SRLM's self-judge per run and iteration: parse rate of 'Score: n', share scored by "
            "the expected-score fallback, Spearman with the env reward per task, how often the judge's best episode "
            "is the env's best, and how many of its pairs the env reward agrees with.",
            lambda f: md(baselines.judge_table(f.metrics)), "baselines"),
    Product("verifier_table.md", "Agent-R per run and iteration: trees with a reward, pairs, revision and good "
            "trajectories, the step verifier's parse rate, where it puts the first error (share at step 1).",
            lambda f: md(baselines.verifier_table(f.metrics)), "baselines"),
    Product("reflections.md", "Agent-R's agents at evaluation: share of episodes with a reflection turn "
            "(Action: wait) and the success rate of those episodes.",
            lambda f: md(baselines.reflection_table(f.runs)), "baselines"),
    Product("failure_reward_histograms.png", "Reward histograms of failed training rollouts per agent "
            "(method/agent) and iteration; dotted line = hard-negative cut 0.6.",
            lambda f: plots.failure_reward_histograms(hard_negatives.failure_reward_histogram(f.episodes))),
    Product("threshold_curves.png", "Share of failures with reward >= t for t = 0.5..0.9, per agent and "
            "iteration.", lambda f: plots.threshold_curves(hard_negatives.threshold_curve(f.episodes))),
    Product("outcome_mix.png", "Successes / ordinary failures / hard negatives (0.6 <= r < 1) per agent and "
            "iteration, summed over seeds.",
            lambda f: plots.outcome_mix(hard_negatives.outcome_mix(hard_negatives.outcome_counts(f.episodes)))),
    Product("outcome_counts.md", "The counts behind outcome_mix.png, per run.",
            lambda f: md(hard_negatives.outcome_counts(f.episodes))),
    Product("trajectory_quality.md", "The paper's trajectory-quality table: per agent and iteration (seeds "
            "pooled), the shares (%) of rollouts that succeed, fail below 0.6 and are hard negatives (0.6 <= r < 1); "
            "the paper sets ETO's rollouts (eto/target) beside the failure agent's (coevo/failure).",
            lambda f: md(hard_negatives.trajectory_quality(f.episodes))),
    Product("failure_drift.md", "Drift of each agent's failures over iterations (seeds pooled): mean failure "
            "reward and the shares (%) of failures near 0 (r < 0.1) and hard (r >= 0.6); a failure agent that "
            "drifts away from hard negatives shows the first share rising and the second falling.",
            lambda f: md(hard_negatives.failure_drift(f.episodes))),
    Product("pair_mix.png", "Preference pairs of each kind per method and iteration, summed over seeds.",
            lambda f: plots.pair_mix(hard_negatives.pair_mix(hard_negatives.pair_counts(f.pairs)))),
    Product("pair_counts.md", "Pairs per run, iteration and kind, and how many reject a hard negative.",
            lambda f: md(hard_negatives.pair_counts(f.pairs))),
    Product("closeness_to_expert.png", "Failures' normalised action edit distance to the expert trajectory of "
            "the same task, and the first step where they leave it.",
            lambda f: plots.closeness_to_expert(hard_negatives.closeness_to_expert(f.episodes))),
    Product("collapse_monitor.png", "Second agent over iterations: its own success rate (drift into success?) "
            "and the diversity of its failures (collapse into repetition?).",
            lambda f: plots.collapse_monitor(hard_negatives.collapse_monitor(f.episodes))),
    Product("triplets.md", "Matched triplets on one task: expert / ETO failure / coevo failure-agent hard "
            "negative (same seed and environment).",
            lambda f: hard_negatives.triplets_markdown(hard_negatives.select_triplets(f.triplet_episodes(), f.info))),
    Product("step_gaps.png", "Headline boundary view: at the first step a negative leaves the expert path, "
            "log pi(expert turn) - log pi(negative turn) from the same prefix (length-free), mean and 95% CI per "
            "iteration, one line per negative source (dashed: the scored checkpoint generated them).",
            lambda f: plots.step_gaps(f.boundary_summary), "boundary"),
    Product("margins_by_source.png", "Final checkpoints: every margin view per negative source (greedy eval, "
            "sampled target / failure-agent rollouts, perturbed experts; self vs other model), per method.",
            lambda f: plots.margins_by_source(f.boundary_summary), "boundary"),
    Product("boundary_paired.md", "Does a method move the boundary more than its reference? Last checkpoint minus "
            "sft and minus eto_sft on the same perturbed experts (no model generated them; the expert's length) and "
            "seed: step gap (nats) and share ranked correctly, paired 95% interval over seeds x negatives (as "
            "paired_differences.md), MDE at 80% power.",
            lambda f: md(boundary_views.paired_boundary_differences(f.boundary)), "boundary"),
    Product("margins_by_source.md", "The numbers behind margins_by_source.png and step_gaps.png, every iteration.",
            lambda f: md(f.boundary_summary), "boundary"),
    Product("length_confound.png", "The SFT model's log-lik margin against the negative's length minus the "
            "expert's: summed (length-driven) vs per token.",
            lambda f: plots.length_confound(f.boundary), "boundary"),
    Product("length_matched.png", "Final checkpoints, natural negatives: hard vs ordinary mean margin within "
            "quantile bins of the negative's length.",
            lambda f: plots.length_matched(boundary_views.length_matched(f.boundary)), "boundary"),
    Product("length_matched.md", "Hard - ordinary mean margin per method and view: raw, and within length bins "
            "(bin-weighted, 95% CI).",
            lambda f: md(boundary_views.length_matched_difference(f.boundary)), "boundary"),
    Product("margin_regression.png", "margin ~ reward + length + self-generated + source per method (final "
            "checkpoint): reward and length coefficients with 95% CIs.",
            lambda f: plots.regression_coefficients(boundary_views.regression_table(f.regression)), "boundary"),
    Product("margin_regression.md", "Every coefficient of that regression, per method, iteration and view.",
            lambda f: md(f.regression), "boundary"),
    Product("preference_accuracy.png", "Greedy evaluation negatives (the original set): share of pairs each view "
            "ranks correctly, hard vs ordinary negatives (implicit views undefined at iteration 0).",
            lambda f: plots.preference_accuracy(boundary_views.preference_accuracy(f.boundary)), "boundary"),
    Product("preference_accuracy.md", "The numbers behind preference_accuracy.png.",
            lambda f: md(boundary_views.preference_accuracy(f.boundary)), "boundary"),
    Product("margin_vs_reward.png", "Final checkpoints, all sources: step gap, per-token and summed log-lik margin "
            "against the negative's reward.",
            lambda f: plots.margin_vs_reward(boundary_views.final_margins(f.boundary)), "boundary"),
    Product("tiny_vs_pretrained.md", "What changed from the tiny model: the tiny model's study (`--tiny-runs`, a "
            "study's tiny_runs_root) beside this pretrained model's, one row per quantity: SFT level per split, each "
            "method − sft and − eto_sft (paired, with interval and MDE), the failure agent's drift, hard-negative "
            "shares among ETO's and the failure agent's rollouts.",
            lambda f: tiny_vs_pretrained.tiny_vs_pretrained_markdown(f.tiny_runs, f.runs), "tiny"),
]


def group_runs(runs_root: Path) -> dict[str, list[Path]]:
    """Finished runs by the folder that holds them; runs directly in runs_root form its own group."""
    groups: dict[str, list[Path]] = {}
    for run in loading.find_runs(runs_root):
        parent = run.parent.relative_to(runs_root)
        name = runs_root.resolve().name if parent == Path(".") else parent.as_posix().replace("/", "__")
        groups.setdefault(name, []).append(run)
    return groups


def write_product(product: Product, frames: Frames, out_dir: Path) -> None:
    result = product.build(frames)
    if isinstance(result, str):
        (out_dir / product.name).write_text(result)
    else:
        result.savefig(out_dir / product.name, dpi=110)


def build_group(name: str, runs: list[Path], out_dir: Path, tiny_runs: list[Path] | None = None) -> list[Path]:
    """Every product of one group, then the group's README.md; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = Frames(runs, tiny_runs or [])
    available = {"runs": True, "boundary": not frames.boundary.empty,
                 "baselines": baselines.has_baseline_runs(frames.info),
                 "tiny": bool(frames.tiny_runs) and frames.pretrained}
    written, skipped = [], []
    for product in PRODUCTS:
        if not available[product.needs]:
            skipped.append(product)
            continue
        write_product(product, frames, out_dir)
        written.append(out_dir / product.name)
    (out_dir / "README.md").write_text(group_readme(name, frames.info, written, skipped))
    return written


def group_readme(name: str, info: pd.DataFrame, written: list[Path], skipped: list[Product]) -> str:
    described = {p.name: p.description for p in PRODUCTS}
    intro = f"Drawn from {len(info)} finished runs by `python -m coevo_lib.figures` (saved runs only)."
    runs = tables.markdown_table(info[["run", "method", "seed", "iterations"]])
    lines = [f"# Figures and tables: {name}", "", intro, "", runs, "## Files", ""]
    lines += [f"- [{p.name}]({p.name}): {described[p.name]}" for p in written]
    if skipped:
        lines += ["", "Not drawn (no `analysis/boundary.jsonl` in these runs, made by "
                  "`coevo_lib.analysis.boundary.compute_boundaries` or notebook 30; or no srlm / agent_r runs; or "
                  "no tiny-model study set beside a pretrained model's): " + ", ".join(p.name for p in skipped)]
    return "\n".join(lines) + "\n"


def write_index(out_dir: Path) -> None:
    """``<out>/README.md``: the groups present on disk and what each file in a group shows."""
    groups = sorted(p.parent.name for p in out_dir.glob("*/README.md"))
    intro = ("Build products of saved runs, redrawn by `make figures` (`python -m coevo_lib.figures`) without "
             "training or sampling. One folder per group of runs (a study's runs_root):")
    lines = ["# figures/", "", intro, ""]
    lines += [f"- [{g}/]({g}/README.md)" for g in groups]
    lines += ["", "## What each file shows", ""] + [f"- `{p.name}`: {p.description}" for p in PRODUCTS]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def build_figures(runs_root: str | Path, out_dir: str | Path = "figures",
                  tiny_runs_root: str | Path | None = None) -> list[Path]:
    """Draw every group under ``runs_root`` into ``out_dir``; raises if there is no finished run.

    With ``tiny_runs_root`` (a tiny-model study's runs), each group whose runs use a pretrained model also gets
    tiny_vs_pretrained.md; without finished runs there, the file is listed as not drawn."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    groups = group_runs(runs_root)
    if not groups:
        raise FileNotFoundError(f"no finished runs under {runs_root} (a run is finished when its last "
                                "evaluation stage is marked done); run `make demo` first")
    tiny_runs = loading.find_runs(tiny_runs_root) if tiny_runs_root is not None else []
    written = [path for name, runs in groups.items() for path in build_group(name, runs, out_dir / name, tiny_runs)]
    write_index(out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coevo_lib.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder holding run directories")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="where figures and tables go")
    parser.add_argument("--tiny-runs", type=Path, default=None,
                        help="a tiny-model study's runs (runs/results): groups of pretrained-model runs get "
                             "tiny_vs_pretrained.md")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        written = build_figures(args.runs, args.out, args.tiny_runs)
    except FileNotFoundError as error:
        print(f"figures: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {args.out}/ in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
