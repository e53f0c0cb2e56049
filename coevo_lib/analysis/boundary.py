"""Decision-boundary margins on held-out test-task pairs (PAPER.md, reviewers' point 5).

The paper claims that hard negatives give the target a "sharper decision boundary" but never measured
it. Here, for every test task with a failure, the expert trajectory is paired with that failure and
each target checkpoint pi_k (k = 0 is the SFT model) scores both:

    implicit DPO margin  beta * [(log pi_k - log pi_ref)(expert) - (log pi_k - log pi_ref)(negative)]
    log-likelihood margin           log pi_k(expert) - log pi_k(negative)

log pi sums assistant tokens only (coevo_lib.train.dpo.sequence_logps, the trainer's own masking).
Reference choice: pi_ref is the run's SFT checkpoint, not the per-iteration reference DPO trains
against. Training resets the reference every iteration, so margins against it would be measured
from a moving origin; the shared SFT model makes margins comparable across iterations and methods
(at k = 0 the implicit margin is 0 by construction). beta is the run's target DPO beta.

Step view: at the first step where the negative's actions leave the expert's, both assistant turns
are scored given the expert's prefix (same actions and observations up to there).

Negatives are the failures in the evaluation episodes (greedy target rollouts on test tasks) of this
run and of every run passed as ``pool`` that shares its environment and prompt config, deduplicated
by (task, action sequence); evaluation files of any agent count, so a failure agent evaluated on test
tasks would add failure-agent-like hard negatives. A shared pool scores coevo and ETO checkpoints on the
same negatives; at most ``max_negatives`` per run are scored, half hard negatives and half ordinary
failures (``capped``). Loading models makes this a cached step: ``<run>/analysis/boundary.jsonl`` is
written atomically and skipped when present; figures only read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from coevo_lib.analysis.hard_negatives import first_divergence, own_turns
from coevo_lib.analysis.loading import BOUNDARY_FILE, EVAL_FILE, find_runs, read_raw_config, run_info
from coevo_lib.pairs import make_pair
from coevo_lib.records import HARD_NEGATIVE_MIN, Episode, Pair, read_episodes, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

MAX_NEGATIVES = 200  # per run; see ``capped``


@dataclass
class BoundaryItem:
    """One held-out pair: expert > negative on a test task, plus the step-level turns where they split."""

    pair: Pair
    negative: Episode
    negative_run: str
    divergence_step: int | None
    step_prefix: list[dict[str, str]] | None = None
    step_expert_turn: dict[str, str] | None = None
    step_negative_turn: dict[str, str] | None = None


def implicit_margin(policy_chosen_logps: float, ref_chosen_logps: float, policy_rejected_logps: float,
                    ref_rejected_logps: float, beta: float) -> float:
    """beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] (DPO's implicit reward gap)."""
    return beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))


# -- negatives and experts --------------------------------------------------------------------


def pool_key(raw_config: dict[str, Any]) -> tuple[str, str]:
    """Runs can share negatives when environment and prompt format match (same tasks, same prompt)."""
    return repr(raw_config["env"]), repr(raw_config["prompt"])


def eval_failures(run_dir: Path) -> list[Episode]:
    """Failed evaluation episodes of a run, in file order."""
    episodes = []
    for path in sorted((run_dir / "episodes").glob("it*-eval-*.jsonl")):
        if EVAL_FILE.match(path.stem):
            episodes += [ep for ep in read_episodes(path) if not ep.success]
    return episodes


def pooled_negatives(run_dir: Path, pool: Iterable[Path]) -> list[tuple[Episode, str]]:
    """(negative, run name) from ``run_dir`` and the compatible pool runs, one per (task, actions).

    Sources are taken in sorted order, so every run of a pool is scored on the same negatives.
    """
    key = pool_key(read_raw_config(run_dir))
    compatible = {Path(p).resolve() for p in pool if pool_key(read_raw_config(Path(p))) == key}
    seen, negatives = set(), []
    for source in sorted(compatible | {run_dir.resolve()}):
        for episode in eval_failures(source):
            if (episode.task_id, tuple(episode.actions)) not in seen:
                seen.add((episode.task_id, tuple(episode.actions)))
                negatives.append((episode, source.name))
    return negatives


def capped(negatives: list[tuple[Episode, str]], max_negatives: int | None) -> list[tuple[Episode, str]]:
    """At most ``max_negatives``, balanced between the two classes the analysis compares: up to half
    hard negatives (highest reward first), the rest ordinary failures (pool order); a class with too
    few leaves its share to the other. The result keeps pool order.

    Scoring costs a few forward passes per negative and checkpoint; the cap bounds that cost while
    keeping both hard negatives and the ordinary failures they are compared with.
    """
    if max_negatives is None or len(negatives) <= max_negatives:
        return negatives
    hard = sorted((i for i, (ep, _) in enumerate(negatives) if HARD_NEGATIVE_MIN <= ep.reward < 1.0),
                  key=lambda i: (-negatives[i][0].reward, i))
    ordinary = [i for i, (ep, _) in enumerate(negatives) if not HARD_NEGATIVE_MIN <= ep.reward < 1.0]
    n_ordinary = min(len(ordinary), max_negatives - min(len(hard), (max_negatives + 1) // 2))
    chosen = ordinary[:n_ordinary] + hard[: max_negatives - n_ordinary]
    return [negatives[i] for i in sorted(chosen)]


def heldout_experts(config, tasks: set[tuple[str, str]]) -> dict[tuple[str, str], Episode]:
    """Expert episodes of (split, task) test tasks, replayed in the run's environment."""
    from coevo_lib.envs import make_env
    from coevo_lib.rollout import expert_episode

    env = make_env(config.env.name, **config.env.kwargs)
    try:
        experts = {(s, t): expert_episode(env, t, s, config.prompt) for s, t in sorted(tasks)}
    finally:
        env.close()
    unsolved = [key for key, ep in experts.items() if not ep.success]
    if unsolved:
        raise RuntimeError(f"the expert fails {len(unsolved)} test tasks, e.g. {unsolved[:3]}")
    return experts


def boundary_item(expert: Episode, negative: Episode, negative_run: str) -> BoundaryItem:
    item = BoundaryItem(pair=make_pair("heldout_expert_vs_failure", expert, negative), negative=negative,
                        negative_run=negative_run, divergence_step=first_divergence(expert.actions, negative.actions))
    step = item.divergence_step
    if step is not None and step < expert.steps and step < negative.steps:
        expert_turn = own_turns(expert.messages, expert.steps)[step]
        item.step_prefix = expert.messages[:expert_turn]
        item.step_expert_turn = expert.messages[expert_turn]
        item.step_negative_turn = negative.messages[own_turns(negative.messages, negative.steps)[step]]
    return item


def boundary_items(config, negatives: list[tuple[Episode, str]]) -> list[BoundaryItem]:
    experts = heldout_experts(config, {(ep.split, ep.task_id) for ep, _ in negatives})
    return [boundary_item(experts[(ep.split, ep.task_id)], ep, run) for ep, run in negatives]


# -- scoring ----------------------------------------------------------------------------------


def target_checkpoints(run_dir: Path, iterations: int) -> dict[int, Path]:
    """k -> the target after iteration k (0 = SFT); paths inside the run dir, so moved runs still work."""
    paths = {0: run_dir / "checkpoints" / "sft"}
    paths.update({k: run_dir / "checkpoints" / f"target-it{k}" for k in range(1, iterations + 1)})
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"run {run_dir} lacks target checkpoints {missing}; is the run finished?")
    return paths


def score_items(checkpoint: Path, model_config, items: list[BoundaryItem]) -> list[dict[str, float | None]]:
    """Summed assistant-token log-probs of every expert/negative (and step turn) under one checkpoint."""
    from coevo_lib.models import load_model, load_tokenizer
    from coevo_lib.train.dpo import sequence_logps

    model, tokenizer = load_model(checkpoint, model_config).eval(), load_tokenizer(checkpoint)
    expert_cache: dict[str, float] = {}
    scores = []
    def logp(prompt, completion) -> float:
        return sequence_logps(model, tokenizer, prompt, completion)

    for item in items:
        key = item.pair.chosen_episode_id
        if key not in expert_cache:
            expert_cache[key] = logp(item.pair.prompt_messages, item.pair.chosen_messages)
        has_step = item.step_prefix is not None
        scores.append({
            "expert_logp": expert_cache[key],
            "negative_logp": logp(item.pair.prompt_messages, item.pair.rejected_messages),
            "step_expert_logp": logp(item.step_prefix, [item.step_expert_turn]) if has_step else None,
            "step_negative_logp": logp(item.step_prefix, [item.step_negative_turn]) if has_step else None,
        })
    return scores


def margin_row(item: BoundaryItem, iteration: int, scores: dict, ref: dict, beta: float) -> dict[str, Any]:
    negative = item.negative
    row = {
        "iteration": iteration, "task_id": negative.task_id, "split": negative.split,
        "negative_id": negative.episode_id, "negative_run": item.negative_run,
        "negative_iteration": negative.iteration, "negative_reward": negative.reward,
        "hard_negative": HARD_NEGATIVE_MIN <= negative.reward < 1.0, "divergence_step": item.divergence_step,
        "beta": beta, "reference": "sft", **scores,
        "ref_expert_logp": ref["expert_logp"], "ref_negative_logp": ref["negative_logp"],
        "implicit_margin": implicit_margin(scores["expert_logp"], ref["expert_logp"], scores["negative_logp"],
                                           ref["negative_logp"], beta),
        "loglik_margin": scores["expert_logp"] - scores["negative_logp"],
        "step_gap": None, "step_implicit_gap": None,
    }
    if scores["step_expert_logp"] is not None:
        row["step_gap"] = scores["step_expert_logp"] - scores["step_negative_logp"]
        row["step_implicit_gap"] = implicit_margin(scores["step_expert_logp"], ref["step_expert_logp"],
                                                   scores["step_negative_logp"], ref["step_negative_logp"], beta)
    return row


def compute_boundary(run_dir: str | Path, pool: Iterable[str | Path] = (), force: bool = False,
                     max_negatives: int | None = MAX_NEGATIVES) -> Path:
    """Write ``<run>/analysis/boundary.jsonl`` (one row per checkpoint and held-out pair); cached."""
    from coevo_lib.runs import RunDir
    from coevo_lib.seeding import quiet_libraries

    run_dir = Path(run_dir)
    out = run_dir / BOUNDARY_FILE
    if out.exists() and not force:
        return out
    quiet_libraries()
    config = RunDir(run_dir).load_config()
    negatives = capped(pooled_negatives(run_dir, [Path(p) for p in pool]), max_negatives)
    items = boundary_items(config, negatives)
    checkpoints = target_checkpoints(run_dir, run_info(run_dir)["iterations"])
    scores = {k: score_items(path, config.model, items) for k, path in checkpoints.items()}
    rows = [margin_row(item, k, scores[k][i], scores[0][i], config.dpo.beta)
            for k in sorted(scores) for i, item in enumerate(items)]
    write_json_atomic(out.with_suffix(".json"), {
        "reference": "sft checkpoint", "beta": config.dpo.beta, "negatives": len(items),
        "max_negatives": max_negatives, "negative_runs": sorted({item.negative_run for item in items}),
        "checkpoints": {k: str(p) for k, p in checkpoints.items()}})
    write_jsonl_atomic(out, rows)
    log.info("boundary margins of %s: %d pairs x %d checkpoints", run_dir.name, len(items), len(checkpoints))
    return out


def compute_boundaries(runs_root: str | Path, force: bool = False,
                       max_negatives: int | None = MAX_NEGATIVES) -> list[Path]:
    """Margins for every finished run under ``runs_root``, each scored on the pooled negatives of all."""
    runs = find_runs(runs_root)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {runs_root}; run a study (`make demo`) first")
    return [compute_boundary(run, pool=runs, force=force, max_negatives=max_negatives) for run in runs]


# -- summaries (inputs of coevo_lib.plots) ---------------------------------------------------


def negative_class(boundary: pd.DataFrame) -> pd.Series:
    return boundary["hard_negative"].map({True: "hard negative", False: "ordinary failure"})


def preference_accuracy(boundary: pd.DataFrame) -> pd.DataFrame:
    """Per method, iteration and negative class: share of pairs whose margin favours the expert.

    Implicit-margin accuracy at k = 0 is undefined (pi = pi_ref gives margin 0) and shown as NaN.
    """
    data = boundary.assign(negative_class=negative_class(boundary))
    data["implicit_correct"] = (data["implicit_margin"] > 0).astype(float).where(data["iteration"] > 0)
    data["loglik_correct"] = (data["loglik_margin"] > 0).astype(float)
    grouped = data.groupby(["method", "iteration", "negative_class"], sort=True)
    return grouped.agg(pairs=("loglik_margin", "size"), implicit_accuracy=("implicit_correct", "mean"),
                       loglik_accuracy=("loglik_correct", "mean"), mean_implicit_margin=("implicit_margin", "mean"),
                       mean_loglik_margin=("loglik_margin", "mean")).reset_index()


def margins_long(boundary: pd.DataFrame) -> pd.DataFrame:
    """The per-pair frame with the negative class, ready for distribution plots."""
    return boundary.assign(negative_class=negative_class(boundary))


def final_margins(boundary: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last checkpoint, with the negative class."""
    last = boundary.groupby("run")["iteration"].transform("max")
    return margins_long(boundary[boundary["iteration"] == last])
