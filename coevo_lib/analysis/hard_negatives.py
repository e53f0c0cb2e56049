"""Hard-negative quality (PAPER.md, reviewers' points 1, 2, 4 and 6).

Inputs are the frames of coevo_lib.analysis.loading (``load_episodes``, ``load_pairs``); outputs are
tidy frames that coevo_lib.plots draws. Groups are (method, agent, iteration) with the agent's
``source`` label "<method>/<agent>"; failures of all seeds of a method are pooled, since a share or a
histogram over pooled failures is what the paper's trajectory-mix numbers are.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from itertools import combinations
from typing import Any, Sequence

import numpy as np
import pandas as pd

from coevo_lib.accounting import THRESHOLDS
from coevo_lib.escaping import markdown_block, markdown_code, markdown_text, one_line
from coevo_lib.records import HARD_NEGATIVE_MIN

GROUP = ["method", "agent", "source", "iteration"]
# A failure below this reward got almost nothing right (failure_drift; the histograms' lowest bin).
NEAR_ZERO = 0.1
# failure_drift's share columns: failures near 0, and hard ones.
DRIFT_SHARES = {"near_zero": f"failures < {NEAR_ZERO} %", "hard": f"failures >= {HARD_NEGATIVE_MIN} %"}
# Pairwise diversity is quadratic; a fixed, deterministic subsample keeps `make figures` fast.
MAX_DIVERSITY_EPISODES = 60


# -- sequence distances -----------------------------------------------------------------------


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance between two sequences (here: whole actions are the symbols)."""
    previous = list(range(len(b) + 1))
    for i, item in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other)))
        previous = current
    return previous[-1]


def normalised_edit_distance(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Edit distance / length of the longer sequence: 0 = identical, 1 = nothing in common."""
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else edit_distance(a, b) / longest


def first_divergence(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Index of the first step where the sequences differ (a prefix diverges at its end); None if equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


# -- counts, shares, histograms ---------------------------------------------------------------


def rollout_failures(episodes: pd.DataFrame) -> pd.DataFrame:
    """Failed training rollouts: the episodes pairs are built from."""
    return episodes[(episodes["kind"] == "train") & ~episodes["success"].astype(bool)]


def outcome_counts(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per run, agent and iteration: episodes, successes, failures, hard negatives, success rate."""
    train = episodes[episodes["kind"] == "train"]
    grouped = train.groupby(["run", "seed", *GROUP], sort=True)
    counts = grouped.agg(episodes=("reward", "size"), successes=("success", "sum"),
                         hard_negatives=("hard_negative", "sum")).reset_index()
    counts["failures"] = counts["episodes"] - counts["successes"]
    counts["success_rate"] = counts["successes"] / counts["episodes"]
    return counts


def pair_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per run, iteration and pair kind: pairs, and how many reject a hard negative."""
    grouped = pairs.groupby(["run", "method", "seed", "iteration", "kind"], sort=True)
    return grouped.agg(pairs=("kind", "size"), hard_negative_pairs=("rejected_hard_negative", "sum")).reset_index()


def outcome_mix(counts: pd.DataFrame) -> pd.DataFrame:
    """``outcome_counts`` summed over seeds, split into successes / ordinary failures / hard negatives."""
    summed = counts.groupby(GROUP, sort=True)[["successes", "failures", "hard_negatives"]].sum().reset_index()
    summed["ordinary_failures"] = summed["failures"] - summed["hard_negatives"]
    summed["label"] = summed["source"] + " it" + summed["iteration"].astype(str)
    return summed


def pair_mix(counts: pd.DataFrame) -> pd.DataFrame:
    """``pair_counts`` summed over seeds, one column per pair kind, one row per method and iteration."""
    if counts.empty:
        return pd.DataFrame(columns=["label"])
    summed = counts.groupby(["method", "iteration", "kind"])["pairs"].sum().reset_index()
    summed["label"] = summed["method"] + " it" + summed["iteration"].astype(str)
    table = summed.pivot(index="label", columns="kind", values="pairs").fillna(0).reset_index()
    return table.rename_axis(columns=None)


def trajectory_quality(episodes: pd.DataFrame) -> pd.DataFrame:
    """The paper's trajectory-quality table: per agent and iteration (seeds pooled), the shares (%) of rollouts
    that succeed, fail below the hard-negative cut (r < 0.6) and are hard negatives (0.6 <= r < 1).

    The paper compares ETO's rollouts with the failure agent's (WebShop: 22.7% -> 25.0% hard negatives); every
    agent is listed, so eto/target beside coevo/failure is two rows of one iteration."""
    mix = outcome_mix(outcome_counts(episodes))
    rollouts = mix["successes"] + mix["failures"]
    shares = {"success %": mix["successes"], f"failure < {HARD_NEGATIVE_MIN} %": mix["ordinary_failures"],
              "hard negative %": mix["hard_negatives"]}
    table = mix[GROUP].assign(rollouts=rollouts, **{name: 100.0 * count / rollouts for name, count in shares.items()})
    return table.round(1)


def failure_drift(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per agent and iteration (seeds pooled): failures, their mean reward and the shares (%) near 0
    (r < NEAR_ZERO, the histograms' lowest bin) and hard (r >= 0.6).

    The failure agent is meant to keep failing close to success; on the tiny model it drifted toward 0
    (docs/findings.md). A target's own failures are the contrast: they are not trained to fail."""
    failures = rollout_failures(episodes)
    rewards = failures["reward"].astype(float)
    flagged = failures.assign(near_zero=100.0 * (rewards < NEAR_ZERO), hard=100.0 * (rewards >= HARD_NEGATIVE_MIN))
    table = flagged.groupby(GROUP, sort=True).agg(
        failures=("reward", "size"), mean_failure_reward=("reward", "mean"), near_zero=("near_zero", "mean"),
        hard=("hard", "mean")).reset_index()
    return table.rename(columns=DRIFT_SHARES).round({"mean_failure_reward": 3,
                                                      **{name: 1 for name in DRIFT_SHARES.values()}})


def threshold_curve(episodes: pd.DataFrame, thresholds: Sequence[float] = THRESHOLDS) -> pd.DataFrame:
    """Share of failures with reward >= t for each threshold t (a curve, not the paper's single 0.6 cut)."""
    rows = []
    for key, group in rollout_failures(episodes).groupby(GROUP, sort=True):
        rewards = group["reward"].to_numpy()
        rows += [{**dict(zip(GROUP, key)), "threshold": t, "share": float(np.mean(rewards >= t)),
                  "failures": len(rewards)} for t in thresholds]
    return pd.DataFrame(rows, columns=[*GROUP, "threshold", "share", "failures"])


def failure_reward_histogram(episodes: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Counts and shares of failure rewards in [0, 0.1), ..., [0.9, 1.0) per group."""
    rows = []
    # k / bins, not linspace: linspace's 0.6000000000000001 would put a reward of exactly 0.6 (3 of 5
    # attributes right) in the bin below, outside the hard negatives it belongs to.
    edges = np.arange(bins + 1) / bins
    for key, group in rollout_failures(episodes).groupby(GROUP, sort=True):
        counts, _ = np.histogram(group["reward"].clip(upper=np.nextafter(1.0, 0)), bins=edges)
        rows += [{**dict(zip(GROUP, key)), "bin_left": float(edges[i]), "count": int(c),
                  "share": c / len(group)} for i, c in enumerate(counts)]
    return pd.DataFrame(rows, columns=[*GROUP, "bin_left", "count", "share"])


# -- closeness to the expert, diversity, collapse ---------------------------------------------


def closeness_to_expert(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per failed rollout: normalised edit distance of its actions to the expert's, and first divergence."""
    experts = episodes[episodes["kind"] == "expert"][["run", "task_id", "actions"]]
    merged = rollout_failures(episodes).merge(experts, on=["run", "task_id"], suffixes=("", "_expert"))
    merged["expert_distance"] = [normalised_edit_distance(a, e) for a, e in
                                 zip(merged["actions"], merged["actions_expert"])]
    merged["divergence_step"] = [first_divergence(a, e) for a, e in zip(merged["actions"], merged["actions_expert"])]
    return merged[["run", "seed", *GROUP, "task_id", "reward", "hard_negative", "expert_distance", "divergence_step"]]


def mean_pairwise_distance(action_sequences: Sequence[tuple]) -> float:
    pairs = list(combinations(action_sequences[:MAX_DIVERSITY_EPISODES], 2))
    if not pairs:
        return float("nan")
    return float(np.mean([normalised_edit_distance(a, b) for a, b in pairs]))


def failure_diversity(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per run, agent and iteration: distinct action sequences / failures and mean pairwise distance.

    A failure agent collapsing into one repetitive failure shows as both numbers falling.
    """
    rows = []
    for key, group in rollout_failures(episodes).groupby(["run", "seed", *GROUP], sort=True):
        sequences = list(group.sort_values("episode_id")["actions"])
        rows.append({**dict(zip(["run", "seed", *GROUP], key)), "failures": len(sequences),
                     "distinct_share": len(set(sequences)) / len(sequences),
                     "mean_pairwise_distance": mean_pairwise_distance(sequences)})
    return pd.DataFrame(rows, columns=["run", "seed", *GROUP, "failures", "distinct_share", "mean_pairwise_distance"])


def distance_to_target_failures(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per second-agent failure: normalised edit distance to the target's failure on the same task and
    iteration (do the hard negatives add something the target does not already produce?)."""
    failures = rollout_failures(episodes)
    target = failures[failures["agent"] == "target"][["run", "iteration", "task_id", "actions"]]
    second = failures[failures["agent"] != "target"]
    merged = second.merge(target, on=["run", "iteration", "task_id"], suffixes=("", "_target"))
    merged["target_distance"] = [normalised_edit_distance(a, t) for a, t in
                                 zip(merged["actions"], merged["actions_target"])]
    return merged[["run", "seed", *GROUP, "task_id", "reward", "target_distance"]]


def collapse_monitor(episodes: pd.DataFrame) -> pd.DataFrame:
    """Second agents over iterations: own success rate (drift into success?), failure diversity
    (collapse into repetition?) and mean distance of their failures to the target's on the same task."""
    keys = ["run", "seed", *GROUP]
    counts = outcome_counts(episodes)
    merged = counts.merge(failure_diversity(episodes), on=keys, how="left", suffixes=("", "_div"))
    distance = distance_to_target_failures(episodes).groupby(keys)["target_distance"].mean().rename(
        "mean_target_distance").reset_index()
    merged = merged.merge(distance, on=keys, how="left")
    return merged[merged["agent"] != "target"].reset_index(drop=True)


# -- matched triplets -------------------------------------------------------------------------


def matched_run_pairs(runs: pd.DataFrame, left: str = "eto", right: str = "coevo") -> pd.DataFrame:
    """Runs of ``left`` and ``right`` with the same seed and environment (so tasks match)."""
    merged = runs[runs["method"] == left].merge(runs[runs["method"] == right], on=["seed", "env"],
                                                suffixes=("_eto", "_coevo"))
    return merged[["seed", "env", "run_eto", "run_coevo"]]


def best_by_task(episodes: pd.DataFrame) -> pd.DataFrame:
    """The highest-reward episode per task (ties broken by episode id, so selection is stable)."""
    ordered = episodes.sort_values(["task_id", "reward", "episode_id"], ascending=[True, False, True])
    return ordered.drop_duplicates("task_id").set_index("task_id")


def select_triplets(episodes: pd.DataFrame, runs: pd.DataFrame, iteration: int | None = None,
                    per_seed: int = 3) -> list[dict[str, Any]]:
    """Expert / ETO target failure / failure-agent hard negative on the same training task.

    Tasks are ranked by the hard negative's reward; for each task the ETO failure shown is its
    highest-reward one. ``iteration`` defaults to the last iteration both runs rolled out.
    """
    triplets = []
    for _, match in matched_run_pairs(runs).iterrows():
        failures = rollout_failures(episodes)
        eto = failures[(failures["run"] == match["run_eto"]) & (failures["agent"] == "target")]
        hard = failures[(failures["run"] == match["run_coevo"]) & (failures["agent"] == "failure")
                        & failures["hard_negative"]]
        it = iteration if iteration is not None else min(eto["iteration"].max(), hard["iteration"].max())
        triplets += triplets_for(episodes, match, eto[eto["iteration"] == it], hard[hard["iteration"] == it],
                                 per_seed)
    return triplets


def triplets_for(episodes: pd.DataFrame, match: pd.Series, eto: pd.DataFrame, hard: pd.DataFrame,
                 limit: int) -> list[dict[str, Any]]:
    experts = episodes[(episodes["kind"] == "expert") & (episodes["run"] == match["run_coevo"])]
    expert_by_task = experts.set_index("task_id")
    eto_best, hard_best = best_by_task(eto), best_by_task(hard)
    tasks = [t for t in hard_best.sort_values("reward", ascending=False).index
             if t in eto_best.index and t in expert_by_task.index]
    return [{"seed": match["seed"], "task_id": task, "iteration": int(hard_best.loc[task, "iteration"]),
             "expert": expert_by_task.loc[task], "eto_failure": eto_best.loc[task],
             "hard_negative": hard_best.loc[task]} for task in tasks[:limit]]


def own_turns(messages: list[dict[str, str]], steps: int) -> list[int]:
    """Indices of the episode's own assistant turns: the last ``steps`` ones (a few-shot example precedes them)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return assistant[len(assistant) - steps:] if steps else []


def instruction_of(messages: list[dict[str, str]], steps: int) -> str:
    """The observation that opens the episode (it holds the instruction)."""
    turns = own_turns(messages, steps)
    return messages[turns[0] - 1]["content"] if turns else messages[-1]["content"]


def trajectory_markdown(title: str, episode: Any, max_observation: int = 160) -> list[str]:
    """One trajectory as a numbered list of actions, each with the observation it produced.

    Actions and observations are environment text: escaped (coevo_lib.escaping), so prices and
    markup in observations render as written, not as LaTeX or emphasis."""
    lines = [f"**{markdown_text(title)}** (reward {episode['reward']:.2f}, {episode['steps']} steps)", ""]
    messages = episode["messages"]
    for step, (index, action) in enumerate(zip(own_turns(messages, len(episode["actions"])), episode["actions"])):
        after = one_line(messages[index + 1]["content"], max_observation) if index + 1 < len(messages) else None
        shown = markdown_text(after) if after is not None else "(episode ends)"
        lines.append(f"{step + 1}. {markdown_code(action)} -> {shown}")
    return lines + [""]


def episode_markdown(episode: Any, title: str = "Episode") -> str:
    """An Episode record (or a row of ``load_episodes(..., messages=True)``) as readable markdown."""
    row = asdict(episode) if is_dataclass(episode) else episode
    return markdown_block("\n".join(trajectory_markdown(title, row)))


def triplets_markdown(triplets: list[dict[str, Any]]) -> str:
    """Readable side-by-side dump of matched triplets (reviewers' point 4)."""
    if not triplets:
        return ("No matched triplets: needs an ETO run and a coevo run with the same seed and environment, "
                f"and a failure-agent failure with reward >= {HARD_NEGATIVE_MIN} on a task ETO also failed.\n")
    lines = ["# Matched triplets: expert / ETO failure / failure-agent hard negative", ""]
    for t in triplets:
        instruction = instruction_of(t["expert"]["messages"], t["expert"]["steps"])
        lines += [f"## Task {markdown_text(t['task_id'])} (seed {t['seed']}, iteration {t['iteration']})", "",
                  f"> {markdown_text(one_line(instruction))}", ""]
        lines += trajectory_markdown("Expert", t["expert"])
        lines += trajectory_markdown("ETO target failure", t["eto_failure"])
        lines += trajectory_markdown("coevo failure-agent hard negative", t["hard_negative"])
    return markdown_block("\n".join(lines))
