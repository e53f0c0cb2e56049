"""Negatives for the decision-boundary analysis, kept apart by where they come from.

The original negatives (greedy evaluation failures of models of the scored model's SFT lineage) sit
at high likelihood under the scored model by construction, and are usually shorter than the expert.
To tell a sharper boundary from that self-generation advantage, each run is scored on negatives
from several sources, reported separately (``SOURCES``):

- ``greedy_eval``: failed evaluation episodes (greedy, test tasks) of every run of the pool: the
  other methods' runs as well as the scored run itself (Best-of-N's sampled evaluations are left out);
- ``sampled_target``: failed training rollouts of target agents (temperature > 0, train tasks);
- ``sampled_failure_agent``: failed training rollouts of failure agents (temperature > 0, train tasks);
- ``perturbed_option`` / ``perturbed_item``: the expert with one wrong option or one wrong item at a
  known step (coevo_lib.analysis.perturb), replayed in the environment, on the evaluated test tasks.

Training rollouts are on training tasks, whose experts the SFT model was trained on: compare them
with each other, not with the test-task sources. Every negative records the checkpoint that
generated it (``generator``), so a row can say whether the scored checkpoint generated its own
negative (``self_generated``): runs of a study share one SFT model, so an SFT rollout of any run
counts as self-generated for every run's iteration 0.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from coevo_lib.analysis.loading import EVAL_FILE, TRAIN_FILE, read_raw_config
from coevo_lib.analysis.perturb import perturbed_episode
from coevo_lib.records import Episode, read_episodes

SOURCES = ("greedy_eval", "sampled_target", "sampled_failure_agent", "perturbed_option", "perturbed_item")
SAMPLED_AGENTS = {"target": "sampled_target", "failure": "sampled_failure_agent"}
PERTURBED = {"perturbed_option": "wrong_option", "perturbed_item": "wrong_item"}
NO_GENERATOR = "none (perturbed expert)"


class Negative(NamedTuple):
    episode: Episode
    run: str  # the run whose files hold it ("" for a perturbed expert)
    source: str  # one of SOURCES
    generator: str  # the checkpoint that generated it, see model_identity


def pool_key(raw_config: dict[str, Any]) -> tuple[str, str]:
    """Runs can share negatives when environment and prompt format match (same tasks, same prompt)."""
    return repr(raw_config["env"]), repr(raw_config["prompt"])


def compatible_runs(run_dir: Path, pool: Iterable[Path]) -> list[Path]:
    """``run_dir`` and the pool runs that share its environment and prompt, sorted (the same for every run)."""
    key = pool_key(read_raw_config(run_dir))
    compatible = {Path(p).resolve() for p in pool if pool_key(read_raw_config(Path(p))) == key}
    return sorted(compatible | {run_dir.resolve()})


# -- which model generated what ---------------------------------------------------------------


def stage_checkpoint(run_dir: Path, stage: str) -> str | None:
    marker = run_dir / "stages" / f"{stage}.json"
    return json.loads(marker.read_text()).get("checkpoint") if marker.is_file() else None


def model_identity(run_dir: Path, agent: str, iteration: int) -> str:
    """A name for the weights of ``agent`` after ``iteration`` of ``run_dir`` (0 = SFT), equal for equal weights.

    The SFT model is named by the shared SFT folder when the run reused one; a frozen agent's stage
    points at the checkpoint it kept, so it is named after that one.
    """
    checkpoint = None if iteration == 0 else stage_checkpoint(run_dir, f"it{iteration}-train-{agent}")
    if checkpoint is None or Path(checkpoint).name == "sft":
        marker = run_dir / "stages" / "sft.json"
        shared = json.loads(marker.read_text()).get("shared_sft") if marker.is_file() else None
        return f"sft:{shared or run_dir.resolve().name}"
    return f"{run_dir.resolve().name}/{Path(checkpoint).name}"


def generator_of(run_dir: Path, episode: Episode, kind: str) -> str:
    """Evaluation at iteration k uses the checkpoint after k; rollouts of iteration k the one after k - 1."""
    return model_identity(run_dir, episode.agent, episode.iteration - (kind == "train"))


# -- natural negatives ------------------------------------------------------------------------


def episode_files(run_dir: Path, kind: str) -> list[Path]:
    pattern = EVAL_FILE if kind == "eval" else TRAIN_FILE
    return [p for p in sorted((run_dir / "episodes").glob("it*.jsonl")) if pattern.match(p.stem)]


def run_failures(run_dir: Path, kind: str) -> list[Negative]:
    """Failures in a run's evaluation (greedy) or training (sampled) files, with their source."""
    negatives = []
    for path in episode_files(run_dir, kind):
        for episode in read_episodes(path):
            source = "greedy_eval" if kind == "eval" else SAMPLED_AGENTS.get(episode.agent)
            # Best-of-N evaluates by sampling: those episodes are neither greedy nor training rollouts.
            sampled = episode.temperature > 0
            if episode.success or source is None or sampled != (kind == "train"):
                continue
            negatives.append(Negative(episode, run_dir.name, source, generator_of(run_dir, episode, kind)))
    return negatives


def unique(negatives: Iterable[Negative]) -> list[Negative]:
    """The first of each (source, split, task, action sequence)."""
    seen, kept = set(), []
    for negative in negatives:
        key = (negative.source, negative.episode.split, negative.episode.task_id, tuple(negative.episode.actions))
        if key not in seen:
            seen.add(key)
            kept.append(negative)
    return kept


def natural_negatives(runs: list[Path]) -> list[Negative]:
    """Greedy evaluation and sampled training failures of ``runs``, deduplicated per source."""
    return unique(n for run in runs for kind in ("eval", "train") for n in run_failures(run, kind))


# -- perturbed experts and the cap ------------------------------------------------------------


def perturbed_negatives(env, prompt, tasks: list[tuple[str, str]]) -> list[Negative]:
    """Both perturbations of every (split, task) where the environment offers them."""
    negatives = []
    for source, kind in PERTURBED.items():
        for split, task_id in tasks:
            episode = perturbed_episode(env, task_id, split, prompt, kind)
            if episode is not None:
                negatives.append(Negative(episode, "", source, NO_GENERATOR))
    return negatives


def spread(negatives: list[Negative]) -> list[Negative]:
    """A fixed pseudo-random order (by a hash of run and episode id), so that a cap keeps negatives of
    every run and iteration rather than the first files in sorted order."""
    return sorted(negatives, key=lambda n: zlib.crc32(f"{n.run}/{n.episode.episode_id}".encode()))


def capped(negatives: list, max_negatives: int | None) -> list:
    """At most ``max_negatives`` (items whose [0] is an Episode), balanced between the two classes the
    analysis compares: up to half hard negatives (highest reward first), the rest ordinary failures
    (pool order); a class with too few leaves its share to the other. The result keeps pool order.

    Scoring costs a few forward passes per negative and checkpoint; the cap bounds that cost while
    keeping both hard negatives and the ordinary failures they are compared with.
    """
    if max_negatives is None or len(negatives) <= max_negatives:
        return negatives
    hard = sorted((i for i, n in enumerate(negatives) if n[0].is_hard_negative),
                  key=lambda i: (-negatives[i][0].reward, i))
    ordinary = [i for i, n in enumerate(negatives) if not n[0].is_hard_negative]
    n_ordinary = min(len(ordinary), max_negatives - min(len(hard), (max_negatives + 1) // 2))
    chosen = ordinary[:n_ordinary] + hard[: max_negatives - n_ordinary]
    return [negatives[i] for i in sorted(chosen)]


def capped_per_source(negatives: list[Negative], max_negatives: int | None) -> list[Negative]:
    """``capped`` applied to each source on its own, sources in SOURCES order."""
    return [n for source in SOURCES for n in capped(spread([n for n in negatives if n.source == source]),
                                                    max_negatives)]
