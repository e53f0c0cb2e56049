"""Tables of the paper's other baselines (docs/baselines.md): SRLM's judge against the environment,
Agent-R's verifier, the model calls and environment work each method spends per iteration, and how
often an Agent-R agent reflects ("Action: wait") at evaluation and then succeeds. Saved runs only."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from coevo_lib.analysis.loading import EVAL_FILE, find_runs, frame, run_info, with_run
from coevo_lib.analysis.tables import TRAINING_GENERATION_FAMILIES, order_methods, stage_family
from coevo_lib.envs.base import NOOP_ACTION
from coevo_lib.records import read_jsonl

BASELINE_METHODS = ("srlm", "agent_r")
JUDGE_COLUMNS = ("run", "method", "seed", "iteration", "episodes", "scored", "judge", "judge_parse_rate",
                 "judge_fallback_share", "judge_env_spearman", "judge_env_spearman_tasks", "judge_best_is_env_best",
                 "judge_tasks", "pairs_env_agree", "pairs_env_tie")
VERIFIER_COLUMNS = ("run", "method", "seed", "iteration", "trees_with_reward", "pairs", "revisions",
                    "good_trajectories", "verifier_calls", "verifier_parse_rate", "error_at_step1_share",
                    "mean_error_step", "no_error_found", "error_step_counts")
INTERACTION_COLUMNS = ("generations", "env_steps", "env_resets", "tokens_generated", "stage_wall_s")


def has_baseline_runs(info: pd.DataFrame) -> bool:
    return bool(info["method"].isin(BASELINE_METHODS).any()) if "method" in info else False


def stage_rows(metrics: pd.DataFrame, family: str, columns: tuple[str, ...]) -> pd.DataFrame:
    rows = metrics[metrics["stage"].map(stage_family) == family] if not metrics.empty else metrics
    table = rows[[c for c in columns if c in rows]].reset_index(drop=True)
    return order_methods(table.astype({"iteration": int})) if "iteration" in table and not table.empty else table


def judge_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """SRLM's judge stage per run and iteration: parse rate, fallback share, agreement with the env reward."""
    return stage_rows(metrics, "judge", JUDGE_COLUMNS)


def verifier_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Agent-R's revise stage per run and iteration: pairs, the verifier's parse rate and where it blames."""
    return stage_rows(metrics, "revise", VERIFIER_COLUMNS)


def interaction_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method and iteration, mean over seeds: generations, env steps, resets, tokens and wall time of
    the training-side stages (rollouts, SRLM's judge, Agent-R's search and verifier; evaluation excluded)."""
    data = metrics.copy()
    data["family"] = data["stage"].map(stage_family)
    data = data[data["family"].isin(TRAINING_GENERATION_FAMILIES)]
    if data.empty:
        return pd.DataFrame(columns=["method", "iteration", "stage", *INTERACTION_COLUMNS])
    for column in INTERACTION_COLUMNS:
        data[column] = pd.to_numeric(data[column], errors="coerce") if column in data else float("nan")
    per_run = data.groupby(["method", "seed", "iteration", "family"])[list(INTERACTION_COLUMNS)].sum(min_count=1)
    table = per_run.groupby(["method", "iteration", "family"]).mean().reset_index().rename(columns={"family": "stage"})
    return order_methods(table.astype({"iteration": int}))


def reflection_rows(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Per run and evaluation split: episodes, the share with a reflection turn (a ``wait`` action) and the
    success rate of those episodes (the trained agent recovering, Agent-R's claim)."""
    rows = []
    for run_dir in run_dirs:
        info = run_info(run_dir)
        for path in sorted((Path(run_dir) / "episodes").glob("it*-eval-*-target.jsonl")):
            name = EVAL_FILE.match(path.stem)
            summary = reflection_summary(read_jsonl(path), int(name["iteration"]), name["split"])
            rows += with_run([summary], info)
    return frame(rows, ("run", "method", "seed", "iteration", "split", "episodes", "reflected", "reflected_share",
                        "reflected_success", "success"))


def reflection_summary(episodes: list[dict], iteration: int, split: str) -> dict:
    reflected = [ep for ep in episodes if any(a.strip().lower() == NOOP_ACTION for a in ep["actions"])]
    return {"iteration": iteration, "split": split, "episodes": len(episodes), "reflected": len(reflected),
            "reflected_share": len(reflected) / len(episodes) if episodes else float("nan"),
            "reflected_success": sum(ep["success"] for ep in reflected) / len(reflected) if reflected else float("nan"),
            "success": sum(ep["success"] for ep in episodes) / len(episodes) if episodes else float("nan")}


def reflection_table(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """reflection_rows of the Agent-R runs only."""
    runs = [run for run in run_dirs if run_info(run)["method"] == "agent_r"]
    return order_methods(reflection_rows(runs))


def baseline_runs(runs_root: Path) -> list[Path]:
    return [run for run in find_runs(runs_root) if run_info(run)["method"] in BASELINE_METHODS]
