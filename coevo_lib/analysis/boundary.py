"""Decision-boundary margins on held-out pairs, with the length and self-generation confounds exposed.

The paper claims that hard negatives give the target a "sharper decision boundary" but never measured
it (PAPER.md, reviewers' point 5). Here an expert trajectory is paired with negatives on the same
task and each target checkpoint pi_k (k = 0 is the SFT model) scores both:

    implicit DPO margin  beta * [(log pi_k - log pi_ref)(expert) - (log pi_k - log pi_ref)(negative)]
    log-likelihood margin           log pi_k(expert) - log pi_k(negative)

log pi sums assistant tokens only (coevo_lib.train.dpo.sequence_logps, the trainer's own masking).
Reference choice: pi_ref is the run's SFT checkpoint, not the per-iteration reference DPO trains
against. Training resets the reference every iteration, so margins against it would be measured
from a moving origin; the shared SFT model makes margins comparable across iterations and methods
(at k = 0 the implicit margin is 0 by construction). beta is the run's target DPO beta.

Two confounds, and the views that hold them fixed:

- Length: a summed log-prob favours the shorter trajectory whatever its quality. Every margin is
  also given per token (each side's log-prob divided by its assistant-token count: ``*_per_token``),
  and the step gap below compares one turn with one turn.
- Self-generation: the scored model's own greedy outputs sit at high likelihood under it by
  construction. Negatives come from several sources (coevo_lib.analysis.negatives), including
  perturbed experts no model generated, and each row says whether the scored checkpoint generated
  its negative (``self_generated``).

Step view (the headline view): at the first step where the negative's actions leave the expert's,
both assistant turns are scored given the expert's prefix (same actions and observations up to
there): ``step_gap`` = log pi(expert turn) - log pi(negative turn). Loading models makes this a cached
step: ``<run>/analysis/boundary.jsonl`` is written atomically and skipped while what it was scored on (the
pool of runs, splits, task and negative caps: ``boundary_inputs``) is unchanged; figures only read it.
Summaries of the rows are in coevo_lib.analysis.boundary_views.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from coevo_lib.analysis.hard_negatives import first_divergence, own_turns
from coevo_lib.analysis.loading import BOUNDARY_FILE, NoRunsError, require_runs, run_info
from coevo_lib.analysis.negatives import (Negative, capped_per_source, compatible_runs, model_identity,
                                          natural_negatives, perturbed_negatives)
from coevo_lib.pairs import make_pair
from coevo_lib.records import HARD_NEGATIVE_MIN, Episode, Pair, write_json_atomic, write_jsonl_atomic
from coevo_lib.runs import RunDir

log = logging.getLogger(__name__)

MAX_NEGATIVES = 100  # per run and source; see negatives.capped

# [(prompt messages, completion messages)] -> [(summed assistant-token log-prob, assistant-token count)]
Scorer = Callable[[list[tuple[list[dict[str, str]], list[dict[str, str]]]]], list[tuple[float, int]]]


@dataclass
class BoundaryItem:
    """One pair: expert > negative on a task, plus the step-level turns where they split."""

    pair: Pair
    negative: Episode
    negative_run: str
    divergence_step: int | None
    step_prefix: list[dict[str, str]] | None = None
    step_expert_turn: dict[str, str] | None = None
    step_negative_turn: dict[str, str] | None = None
    source: str = "greedy_eval"  # see coevo_lib.analysis.negatives.SOURCES
    generator: str = ""  # the checkpoint that generated the negative (negatives.model_identity)


def implicit_margin(policy_chosen_logps: float, ref_chosen_logps: float, policy_rejected_logps: float,
                    ref_rejected_logps: float, beta: float) -> float:
    """beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] (DPO's implicit reward gap)."""
    return beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))


# -- experts and items ------------------------------------------------------------------------


def heldout_experts(env, prompt, tasks: set[tuple[str, str]]) -> dict[tuple[str, str], Episode]:
    """Expert episodes of (split, task) tasks, replayed in the run's environment."""
    from coevo_lib.rollout import expert_episode

    experts = {(s, t): expert_episode(env, t, s, prompt) for s, t in sorted(tasks)}
    unsolved = [key for key, ep in experts.items() if not ep.success]
    if unsolved:
        raise RuntimeError(f"the expert fails {len(unsolved)} tasks, e.g. {unsolved[:3]}")
    return experts


def boundary_item(expert: Episode, negative: Episode, negative_run: str, source: str = "greedy_eval",
                  generator: str = "") -> BoundaryItem:
    item = BoundaryItem(pair=make_pair("heldout_expert_vs_failure", expert, negative), negative=negative,
                        negative_run=negative_run, divergence_step=first_divergence(expert.actions, negative.actions),
                        source=source, generator=generator)
    step = item.divergence_step
    if step is not None and step < expert.steps and step < negative.steps:
        expert_turn = own_turns(expert.messages, expert.steps)[step]
        item.step_prefix = expert.messages[:expert_turn]
        item.step_expert_turn = expert.messages[expert_turn]
        item.step_negative_turn = negative.messages[own_turns(negative.messages, negative.steps)[step]]
    return item


def boundary_items(experts: dict[tuple[str, str], Episode], negatives: list[Negative]) -> list[BoundaryItem]:
    return [boundary_item(experts[(n.episode.split, n.episode.task_id)], n.episode, n.run, n.source, n.generator)
            for n in negatives]


def run_negatives(runs: list[Path], config, env, max_negatives: int | None) -> list[Negative]:
    """Every source's negatives from ``runs`` (capped per source); perturbed experts on the evaluated tasks."""
    tasks = [(split, t) for split in config.eval.splits for t in env.task_ids(split)[: config.eval.max_tasks]]
    negatives = natural_negatives(runs) + perturbed_negatives(env, config.prompt, tasks)
    return capped_per_source(negatives, max_negatives)


@dataclass
class SharedWork:
    """What the runs of one root would each repeat, done once: runs with the same environment and prompt
    draw the same negatives from the same pool, and the runs of a seed start from one SFT model, whose
    scores are the same for all of them. Keys hold everything the cached value depends on."""

    items: dict[tuple, list[BoundaryItem]] = field(default_factory=dict)
    scores: dict[tuple, list[dict[str, float | None]]] = field(default_factory=dict)
    tokens: dict[str, dict] = field(default_factory=dict)  # per SFT model: its checkpoints share its tokenizer


def run_items(run_dir: Path, pool: Iterable[Path], config, max_negatives: int | None,
              shared: SharedWork) -> tuple[tuple, list[BoundaryItem]]:
    """The pairs ``run_dir`` is scored on, and the key they are cached under in ``shared``."""
    from coevo_lib.envs import make_env

    runs = compatible_runs(run_dir, pool)
    key = (tuple(map(str, runs)), tuple(config.eval.splits), config.eval.max_tasks, max_negatives)
    if key not in shared.items:
        env = make_env(config.env.name, **config.env.kwargs)
        try:
            negatives = run_negatives(runs, config, env, max_negatives)
            experts = heldout_experts(env, config.prompt, {(n.episode.split, n.episode.task_id) for n in negatives})
        finally:
            env.close()
        shared.items[key] = boundary_items(experts, negatives)
    return key, shared.items[key]


# -- scoring ----------------------------------------------------------------------------------


def target_checkpoints(run_dir: Path, iterations: int) -> dict[int, Path]:
    """k -> the target after iteration k (0 = SFT); paths inside the run dir, so moved runs still work."""
    paths = {0: run_dir / "checkpoints" / "sft"}
    paths.update({k: run_dir / "checkpoints" / f"target-it{k}" for k in range(1, iterations + 1)})
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"run {run_dir} lacks target checkpoints {missing}; is the run finished?")
    return paths


def model_scorer(model, tokenizer, batch_size: int = 16, token_cache: dict | None = None) -> Scorer:
    """Summed assistant-token log-probs (the trainer's masking, coevo_lib.train.dpo.pair_features) and the
    number of tokens summed, for a list of (prompt, completion) requests; batched, shortest first.

    Rendering chat templates costs as much as the forward passes; checkpoints of one run share their
    tokenizer, so their scorers can share ``token_cache``.
    """
    from coevo_lib.train.dpo import pair_features

    cache = {} if token_cache is None else token_cache

    def tokens_of(prompt, completion) -> tuple[list[int], list[int]]:
        key = tuple((m["role"], m["content"]) for m in prompt + [{"role": "|", "content": ""}] + completion)
        if key not in cache:
            features = pair_features(tokenizer, prompt, completion, completion)
            cache[key] = (features["prompt_ids"] + features["chosen_ids"],
                          [0] * len(features["prompt_ids"]) + features["chosen_mask"])
        return cache[key]

    def score(requests: list[tuple[list[dict], list[dict]]]) -> list[tuple[float, int]]:
        rows = [tokens_of(prompt, completion) for prompt, completion in requests]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        results: dict[int, tuple[float, int]] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            results.update(zip(chunk, batch_logps(model, tokenizer.pad_token_id, [rows[i] for i in chunk])))
        return [results[i] for i in range(len(rows))]

    return score


def batch_logps(model, pad_id: int, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    """sequence_logps for a batch of (ids, assistant mask), right-padded (causal: padding comes after)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in rows], device=model.device)
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=model.device)
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    sums = (token_logps * mask[:, 1:]).sum(-1)
    return [(float(total), int(count)) for total, count in zip(sums, mask.sum(-1))]


def checkpoint_scorer(checkpoint: Path, model_config, token_cache: dict) -> Scorer:
    from coevo_lib.models import load_model, load_tokenizer

    return model_scorer(load_model(checkpoint, model_config).eval(), load_tokenizer(checkpoint),
                        token_cache=token_cache)


def score_items(scorer: Scorer, items: list[BoundaryItem]) -> list[dict[str, float | None]]:
    """Log-probs and token counts of every expert, negative and step turn, in one scorer call."""
    requests: dict[tuple, tuple[list[dict], list[dict]]] = {}  # experts and expert step turns repeat
    for index, item in enumerate(items):
        expert = (item.negative.split, item.pair.chosen_episode_id)
        requests[("expert", *expert)] = (item.pair.prompt_messages, item.pair.chosen_messages)
        requests[("negative", index)] = (item.pair.prompt_messages, item.pair.rejected_messages)
        if item.step_prefix is not None:
            requests[("step_expert", *expert, item.divergence_step)] = (item.step_prefix, [item.step_expert_turn])
            requests[("step_negative", index)] = (item.step_prefix, [item.step_negative_turn])
    scored = dict(zip(requests, scorer(list(requests.values()))))
    rows = []
    for index, item in enumerate(items):
        expert, has_step = (item.negative.split, item.pair.chosen_episode_id), item.step_prefix is not None
        row = logp_columns("expert", scored[("expert", *expert)])
        row.update(logp_columns("negative", scored[("negative", index)]))
        row.update(logp_columns("step_expert", scored[("step_expert", *expert, item.divergence_step)]
                                if has_step else None))
        row.update(logp_columns("step_negative", scored[("step_negative", index)] if has_step else None))
        rows.append(row)
    return rows


def logp_columns(side: str, score: tuple[float, int] | None) -> dict[str, float | int | None]:
    logp, tokens = score if score is not None else (None, None)
    return {f"{side}_logp": logp, f"{side}_tokens": tokens}


def per_token(logp: float, tokens: int) -> float:
    if tokens <= 0:
        raise ValueError(f"a scored completion has {tokens} assistant tokens; per-token log-probs need >= 1")
    return logp / tokens


def margin_columns(scores: dict, ref: dict, beta: float, prefix: str, chosen: str, rejected: str) -> dict:
    """Summed and per-token log-likelihood and implicit margins of ``chosen`` over ``rejected``.

    Per token, each side's log-prob is divided by its own assistant-token count (the reference scores
    the same tokens), so a length difference alone cannot move it.
    """
    names = ("gap", "gap_per_token", "implicit_gap", "implicit_gap_per_token")
    if scores[f"{chosen}_logp"] is None:
        return {f"{prefix}{name}": None for name in names}
    tokens = {side: scores[f"{side}_tokens"] for side in (chosen, rejected)}
    logp = {side: scores[f"{side}_logp"] for side in tokens}
    ref_logp = {side: ref[f"{side}_logp"] for side in tokens}
    mean = {side: per_token(logp[side], tokens[side]) for side in tokens}
    ref_mean = {side: per_token(ref_logp[side], tokens[side]) for side in tokens}
    values = (logp[chosen] - logp[rejected], mean[chosen] - mean[rejected],
              implicit_margin(logp[chosen], ref_logp[chosen], logp[rejected], ref_logp[rejected], beta),
              implicit_margin(mean[chosen], ref_mean[chosen], mean[rejected], ref_mean[rejected], beta))
    return {f"{prefix}{name}": value for name, value in zip(names, values)}


def assistant_turns(messages: list[dict[str, str]]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def margin_row(item: BoundaryItem, iteration: int, scores: dict, ref: dict, beta: float,
               scored_model: str = "") -> dict[str, Any]:
    """One row per checkpoint and pair: identities, lengths, and the summed, per-token and step margins."""
    negative = item.negative
    whole = margin_columns(scores, ref, beta, "", "expert", "negative")
    step = margin_columns(scores, ref, beta, "step_", "step_expert", "step_negative")
    return {
        "iteration": iteration, "task_id": negative.task_id, "split": negative.split,
        "negative_id": negative.episode_id, "negative_run": item.negative_run, "source": item.source,
        "negative_agent": negative.agent, "negative_iteration": negative.iteration,
        "negative_temperature": negative.temperature, "generator": item.generator, "scored_model": scored_model,
        "self_generated": bool(item.generator) and item.generator == scored_model,
        "negative_reward": negative.reward, "hard_negative": HARD_NEGATIVE_MIN <= negative.reward < 1.0,
        "divergence_step": item.divergence_step, "expert_steps": assistant_turns(item.pair.chosen_messages),
        "negative_steps": assistant_turns(item.pair.rejected_messages),
        "beta": beta, "reference": "sft", **scores,
        "ref_expert_logp": ref["expert_logp"], "ref_negative_logp": ref["negative_logp"],
        "loglik_margin": whole["gap"], "loglik_margin_per_token": whole["gap_per_token"],
        "implicit_margin": whole["implicit_gap"], "implicit_margin_per_token": whole["implicit_gap_per_token"],
        **step,
    }


def compute_boundary(run_dir: str | Path, pool: Iterable[str | Path] = (), force: bool = False,
                     max_negatives: int | None = MAX_NEGATIVES, shared: SharedWork | None = None) -> Path:
    """Write ``<run>/analysis/boundary.jsonl`` (one row per checkpoint and pair); cached.

    ``shared`` carries negatives and SFT scores from run to run (compute_boundaries passes one).
    """
    from coevo_lib.seeding import quiet_libraries

    run_dir = Path(run_dir)
    out = run_dir / BOUNDARY_FILE
    pool = [Path(p) for p in pool]
    config = RunDir(run_dir).load_config()
    inputs = boundary_inputs(run_dir, pool, config, max_negatives)
    if not force and boundary_current(run_dir, inputs):
        return out
    quiet_libraries()
    shared = SharedWork() if shared is None else shared
    items_key, items = run_items(run_dir, pool, config, max_negatives, shared)
    checkpoints = target_checkpoints(run_dir, run_info(run_dir)["iterations"])
    identities = {k: model_identity(run_dir, "target", k) for k in checkpoints}  # reads stage markers: once
    token_cache = shared.tokens.setdefault(identities[0], {})
    scores, reused = {}, 0
    for k, path in checkpoints.items():
        key = (identities[k], items_key)
        reused += key in shared.scores
        if key not in shared.scores:
            shared.scores[key] = score_items(checkpoint_scorer(path, config.model, token_cache), items)
        scores[k] = shared.scores[key]
    rows = [margin_row(item, k, scores[k][i], scores[0][i], config.dpo.beta, identities[k])
            for k in sorted(scores) for i, item in enumerate(items)]
    write_json_atomic(out.with_suffix(".json"), {
        "reference": "sft checkpoint", "beta": config.dpo.beta, "inputs": inputs, "negatives": len(items),
        "max_negatives_per_source": max_negatives, "negative_runs": sorted({i.negative_run for i in items} - {""}),
        "sources": {s: sum(i.source == s for i in items) for s in sorted({i.source for i in items})},
        "checkpoints": {k: str(p) for k, p in checkpoints.items()}})
    write_jsonl_atomic(out, rows)
    log.info("boundary margins of %s: %d pairs x %d checkpoints (%d scored before, by a run with the same model)",
             run_dir.name, len(items), len(checkpoints), reused)
    return out


def boundary_inputs(run_dir: Path, pool: Iterable[Path], config, max_negatives: int | None) -> dict[str, Any]:
    """What a run's margins were scored on besides its own checkpoints: the runs its negatives are drawn from
    (by name: a moved runs root stays current), the evaluated splits and the caps."""
    return {"pool": [run.name for run in compatible_runs(run_dir, pool)], "splits": list(config.eval.splits),
            "max_tasks": config.eval.max_tasks, "max_negatives": max_negatives}


def boundary_current(run_dir: Path, inputs: dict[str, Any]) -> bool:
    """Whether ``run_dir``'s cached margins were scored on ``inputs``. A study run in parts adds runs to the
    pool after earlier runs were scored: their files are then stale, and are scored again (logged)."""
    out, meta = run_dir / BOUNDARY_FILE, (run_dir / BOUNDARY_FILE).with_suffix(".json")
    if not (out.exists() and meta.exists()):
        return False
    stored = json.loads(meta.read_text()).get("inputs")
    if stored != inputs:
        log.info("boundary margins of %s are stale (scored on %s, now %s): scoring them again",
                 run_dir.name, stored or "inputs not recorded", inputs)
        return False
    return True


def compute_boundaries(runs_root: str | Path, force: bool = False, max_negatives: int | None = MAX_NEGATIVES,
                       workers: int = 1, methods: Sequence[str] | None = None) -> list[Path]:
    """Margins for every finished run under ``runs_root``, each scored on the pooled negatives of all.

    ``methods`` (labels, as in loading.method_label) keeps only those runs, as scored runs and as the pool:
    a study's analysis then does not change with what else shares its folder (e.g. the sensitivity sweep
    beside the results study). ``workers`` > 1 scores in that many processes (one torch thread each when
    they share the cores), the runs of one SFT model in the same process so that its scores are computed
    once. A run whose file is written stays written if another fails.
    """
    runs = select_methods(require_runs(runs_root), methods)  # NoRunsError: one line in a notebook
    todo = [run for run in runs if force or not boundary_current(
        run, boundary_inputs(run, runs, RunDir(run).load_config(), max_negatives))]
    batches = worker_batches(todo, workers)
    if len(batches) <= 1:
        boundary_batch(todo, runs, max_negatives)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // len(batches))
        # spawn, not fork: the parent (often a Jupyter kernel) has torch's thread pools running.
        with ProcessPoolExecutor(len(batches), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=set_torch_threads, initargs=(threads,)) as executor:
            futures = [executor.submit(boundary_batch, batch, runs, max_negatives) for batch in batches]
            for future in futures:
                for name in future.result():
                    log.info("boundary margins of %s written", name)
    return [run / BOUNDARY_FILE for run in runs]


def select_methods(runs: list[Path], methods: Sequence[str] | None) -> list[Path]:
    """``runs`` whose method label is in ``methods`` (all when None). Labels without runs are logged (a study
    run in parts lacks some); none left is an error naming the labels there are."""
    if methods is None:
        return runs
    labels = {run: run_info(run)["method"] for run in runs}
    present = sorted(set(labels.values()))
    missing = sorted(set(methods) - set(present))
    if missing:
        log.warning("no finished runs of method(s) %s under %s", ", ".join(missing), runs[0].parent)
    kept = [run for run in runs if labels[run] in set(methods)]
    if not kept:
        raise NoRunsError(f"none of the methods {', '.join(methods)} has finished runs under {runs[0].parent} "
                          f"(methods there: {', '.join(present)})")
    return kept


def worker_batches(runs: list[Path], workers: int) -> list[list[Path]]:
    """``runs`` in at most ``workers`` batches of about equal checkpoint counts (largest groups first), the
    runs of one SFT model in one batch."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        groups.setdefault(model_identity(run, "target", 0), []).append(run)
    batches: list[list[Path]] = [[] for _ in range(min(max(1, workers), len(groups)))]
    load = [0] * len(batches)
    cost = {name: sum(run_info(run)["iterations"] for run in group) + 1 for name, group in groups.items()}
    for name in sorted(groups, key=lambda n: -cost[n]):
        lightest = load.index(min(load))
        batches[lightest] += groups[name]
        load[lightest] += cost[name]
    return [batch for batch in batches if batch]


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def boundary_batch(batch: list[Path], pool: list[Path], max_negatives: int | None) -> list[str]:
    """compute_boundaries' work on ``batch`` in this process, sharing its work; the names of the runs it wrote.
    ``batch`` holds runs compute_boundaries found stale or was told to force: each is scored, not checked again."""
    shared = SharedWork()
    for run in batch:
        compute_boundary(run, pool=pool, force=True, max_negatives=max_negatives, shared=shared)
    return [run.name for run in batch]
