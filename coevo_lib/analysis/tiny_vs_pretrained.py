"""What changed from the tiny model: a tiny-model study's numbers beside a pretrained model's, in one table.

Rows, in order: the SFT model's level per test split (reward and success, mean ± 95% t-interval over seeds);
every method minus sft and minus eto_sft, reward (x100) per split, as coevo_lib.analysis.paired computes them
(paired interval, MDE, seeds); the failure agent's drift (share of its failures near reward 0 per iteration,
hard_negatives.failure_drift); and the hard-negative shares among ETO's and the failure agent's rollouts
(hard_negatives.trajectory_quality). Each column is computed from its own study's runs alone: the two studies
train different models, so no task score pairs across them, and their numbers stand side by side, never subtracted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from coevo_lib.analysis import hard_negatives, loading, paired, sensitivity, tables

COLUMNS = ["quantity", "where", "tiny", "pretrained"]
REFERENCES = ("sft", "eto_sft")
DRIFT_SOURCE = "coevo/failure"
QUALITY_SOURCES = ("eto/target", "coevo/failure")  # the paper's trajectory-quality comparison
MISSING = "-"
Row = tuple[str, str, str]  # (quantity, where: a split or an iteration, the formatted value)


def uses_tiny_model(run_dir: Path) -> bool:
    """True for a run of the embedded tiny model (model.name_or_path: tiny)."""
    return loading.read_raw_config(run_dir)["model"]["name_or_path"] == "tiny"


def sft_rows(evals: pd.DataFrame) -> list[Row]:
    """(quantity, split, "mean ± ci (n=seeds)") of the SFT model's final reward and success."""
    rows = []
    for metric, name in paired.METRICS.items():
        summary = tables.main_table(evals, metric, ["sft"])
        rows += [(f"sft {name}", r.split, tables.format_cell(r.mean, r.ci95, r.n)) for r in summary.itertuples()]
    return rows


def difference_rows(runs: Sequence[Path]) -> list[Row]:
    """(method − reference, split, "difference [95% CI], MDE m (n seeds)") in reward x100, references sft, eto_sft."""
    scores = sensitivity.without_sweep(paired.load_task_scores(runs))
    summary = paired.paired_differences(scores, REFERENCES)
    reward = summary[summary["metric"] == "reward"]
    return [(f"{r.comparison} {paired.METRICS['reward']}", r.split, f"{r.difference:+.1f} [{r.ci_low:+.1f}, "
             f"{r.ci_high:+.1f}], MDE {r.mde:.1f} ({paired.seeds_phrase(r.seeds)})") for r in reward.itertuples()]


def drift_rows(episodes: pd.DataFrame) -> list[Row]:
    """The failure agent's failures near 0 and hard, per iteration (% of its failures)."""
    drift = hard_negatives.failure_drift(episodes)
    drift = drift[drift["source"] == DRIFT_SOURCE]
    rows = []
    for column in hard_negatives.DRIFT_SHARES.values():
        rows += [(f"{DRIFT_SOURCE} {column}", f"it{r.iteration}", f"{r[column]:.1f} (of {r.failures})")
                 for _, r in drift.iterrows()]
    return rows


def quality_rows(episodes: pd.DataFrame) -> list[Row]:
    """Hard negatives among ETO's and the failure agent's rollouts per iteration (% of rollouts)."""
    quality = hard_negatives.trajectory_quality(episodes)
    return [(f"{source} hard negative % of rollouts", f"it{r.iteration}", f"{r['hard negative %']:.1f} "
             f"(of {r.rollouts})") for source in QUALITY_SOURCES
            for _, r in quality[quality["source"] == source].sort_values("iteration").iterrows()]


def study_sections(runs: Sequence[Path]) -> list[list[Row]]:
    """The rows one study contributes, section by section in the table's order."""
    episodes = loading.load_episodes(runs, kinds=("train",))
    return [sft_rows(loading.load_eval(runs)), difference_rows(runs), drift_rows(episodes), quality_rows(episodes)]


def side_by_side(tiny: list[list[Row]], pretrained: list[list[Row]]) -> pd.DataFrame:
    """Section by section, one row per (quantity, where) either study has, the tiny study's first; "-" where a
    study lacks it."""
    rows = []
    for tiny_rows, pretrained_rows in zip(tiny, pretrained):
        values = [{(quantity, where): value for quantity, where, value in s} for s in (tiny_rows, pretrained_rows)]
        keys = dict.fromkeys((quantity, where) for quantity, where, _ in tiny_rows + pretrained_rows)
        rows += [(q, w, values[0].get((q, w), MISSING), values[1].get((q, w), MISSING)) for q, w in keys]
    return pd.DataFrame(rows, columns=COLUMNS)


def tiny_vs_pretrained(tiny_runs: Sequence[Path], pretrained_runs: Sequence[Path]) -> pd.DataFrame:
    """The side-by-side table (columns quantity, where, tiny, pretrained) of two studies' finished runs."""
    return side_by_side(study_sections(tiny_runs), study_sections(pretrained_runs))


def study_name(runs: Sequence[Path]) -> str:
    """The folder that holds a study's runs (its runs_root), as figures name the group."""
    return ", ".join(sorted({Path(run).parent.name for run in runs}))


def iterations_of(runs: Sequence[Path]) -> str:
    """The loop iterations the study's iterating runs performed, e.g. "3 iterations" ("1 or 3 iterations" when
    they differ: rft runs one; sft runs none): the two studies need not train for as long."""
    counts = sorted({loading.final_iteration(loading.read_raw_config(run)) for run in runs} - {0})
    return f"{' or '.join(map(str, counts)) or 'no'} iteration{'' if counts == [1] else 's'}"


def tiny_vs_pretrained_markdown(tiny_runs: Sequence[Path], pretrained_runs: Sequence[Path]) -> str:
    """tiny_vs_pretrained.md: the table with a paragraph saying where each column comes from."""
    table = tiny_vs_pretrained(tiny_runs, pretrained_runs)
    intro = (f"Tiny model: {len(tiny_runs)} finished runs under `{study_name(tiny_runs)}` "
             f"({iterations_of(tiny_runs)}). Pretrained model: {len(pretrained_runs)} finished runs under "
             f"`{study_name(pretrained_runs)}` ({iterations_of(pretrained_runs)}). Each column comes from "
             "its own study's runs (different models: no task score pairs across them), so the columns are read "
             "side by side, not subtracted. Differences are paired within a study (paired_differences.md: 95% "
             "interval, MDE at 80% power); rollout shares pool seeds (trajectory_quality.md, failure_drift.md); "
             "`-`: that study has no such runs.")
    return f"# What changed from the tiny model\n\n{intro}\n\n{tables.markdown_table(table)}"


def compare_with_tiny(tiny_runs_root: str | Path | None, runs: Sequence[Path]) -> str:
    """The markdown for notebook 40: the table, or one line saying what is missing."""
    if tiny_runs_root is None:
        return "No tiny-model study to compare with: set `tiny_runs_root` (e.g. `runs/results`).\n"
    tiny_runs = loading.find_runs(loading.resolve_path(tiny_runs_root))
    if not tiny_runs:
        return f"No finished runs under `{tiny_runs_root}` (the tiny model's study: `make study-results`).\n"
    return tiny_vs_pretrained_markdown(tiny_runs, runs)
