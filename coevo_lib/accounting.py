"""Per-iteration accounting of rollouts (reviewers' points 1, 2, 6, 7 in PAPER.md)."""

from __future__ import annotations

from statistics import mean
from typing import Any

from coevo_lib.records import HARD_NEGATIVE_MIN, Episode

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def threshold_shares(failures: list[Episode], thresholds=THRESHOLDS) -> dict[str, float]:
    """Share of failures with reward >= t, for each t: a curve, not a single cut."""
    if not failures:
        return {f"share_ge_{t}": float("nan") for t in thresholds}
    return {f"share_ge_{t}": mean(ep.reward >= t for ep in failures) for t in thresholds}


def distinct_action_share(episodes: list[Episode]) -> float:
    """Distinct action sequences / episodes: 1.0 = all different, near 0 = collapsed repetition."""
    if not episodes:
        return float("nan")
    return len({tuple(ep.actions) for ep in episodes}) / len(episodes)


def rollout_accounting(episodes: list[Episode]) -> dict[str, Any]:
    failures = [ep for ep in episodes if not ep.success]
    return {
        "episodes": len(episodes),
        "successes": len(episodes) - len(failures),
        "failures": len(failures),
        "hard_negatives": sum(HARD_NEGATIVE_MIN <= ep.reward < 1.0 for ep in failures),
        "success_rate": (len(episodes) - len(failures)) / len(episodes) if episodes else float("nan"),
        "mean_reward": mean(ep.reward for ep in episodes) if episodes else float("nan"),
        "mean_failure_reward": mean(ep.reward for ep in failures) if failures else float("nan"),
        "failure_diversity": distinct_action_share(failures),
        "tokens_generated": sum(ep.tokens_generated for ep in episodes),
        **interaction_counts(episodes),
        "mean_steps": mean(ep.steps for ep in episodes) if episodes else float("nan"),
        **threshold_shares(failures),
    }


def interaction_counts(episodes: list[Episode]) -> dict[str, int]:
    """Model calls and environment work of plain rollouts: one generation and one step per turn, one reset
    per episode (the units Agent-R's tree search and SRLM's judge are counted in too, docs/baselines.md)."""
    steps = sum(ep.steps for ep in episodes)
    return {"generations": steps, "env_steps": steps, "env_resets": len(episodes)}
