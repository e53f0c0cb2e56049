"""Agent-R as a workbench method (``method: agent_r``; docs/baselines.md).

One iteration, all with the current agent (Agent-R's "within its current capability"):
1. search: a tree per training task (coevo_lib.methods.agent_r_tree), trees advancing together so each
   round of expansions is one batched generation; trees are appended per chunk (resumable);
2. revise: good leaves (reward > alpha) and (good, bad) pairs (gap > beta, capped per task); the agent as
   step verifier finds each bad path's first error; revision trajectories are spliced
   (coevo_lib.methods.agent_r_revision);
3. train: SFT continued from the current agent on revision + good trajectories + experts as Agent-R's
   "general data" (``agent_r.general_ratio`` per search example), the bad prefixes masked out of the loss.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

from coevo_lib.envs.base import NOOP_ACTION
from coevo_lib.methods.agent_r_revision import (REFLECTIONS, find_first_errors, path_messages, revision_messages,
                                                shared_prefix)
from coevo_lib.methods.agent_r_tree import (Node, TreeSearch, contrast_pairs, good_paths, leaf_paths,
                                            node_from_dict, run_searches)
from coevo_lib.models import load_model, load_tokenizer, save_agent
from coevo_lib.prompting import initial_messages
from coevo_lib.records import Episode, append_jsonl, read_episodes, read_jsonl, write_jsonl_atomic
from coevo_lib.rollout import HFGenerator, chunk_seed
from coevo_lib.runs import atomic_dir, link_tree
from coevo_lib.train import train_sft

if TYPE_CHECKING:
    from coevo_lib.loop import Workbench


def agent_r_iteration(bench: Workbench, iteration: int) -> None:
    labels = {"iteration": iteration, "agent": "target"}
    bench.stage(f"it{iteration}-search-target", lambda: search_stage(bench, iteration), kind="search", **labels)
    bench.stage(f"it{iteration}-revise-target", lambda: revise_stage(bench, iteration), kind="revise", **labels)
    bench.stage(f"it{iteration}-train-target", lambda: train_stage(bench, iteration), kind="train", **labels)


def trees_path(bench: Workbench, iteration: int) -> Path:
    return bench.run_dir.sub("trees", f"it{iteration}-target.jsonl")


# -- 1. search ------------------------------------------------------------------------------------


def search_stage(bench: Workbench, iteration: int) -> dict[str, Any]:
    config = bench.config.agent_r
    agent = bench.generator(bench.checkpoint("target", iteration - 1))
    per_chunk = max(1, bench.config.rollout.batch_size // config.children)
    tasks = bench.train_tasks()
    chunks = [tasks[i:i + per_chunk] for i in range(0, len(tasks), per_chunk)]
    out = trees_path(bench, iteration)
    done = finished_chunks(out, chunks)
    for index, chunk in enumerate(chunks):
        if index not in done:
            seed = chunk_seed(bench.config.seed, "search", iteration, index)
            append_jsonl(out, search_chunk(bench, agent, chunk, seed))
    return search_summary(read_jsonl(out))


def finished_chunks(out: Path, chunks: list[list[str]]) -> set[int]:
    """Chunks whose trees are all on disk; the file is rewritten without a partly written chunk."""
    rows = {row["task_id"]: row for row in read_jsonl(out)}
    done = {i for i, chunk in enumerate(chunks) if all(t in rows for t in chunk)}
    kept = [rows[t] for i in sorted(done) for t in chunks[i]]
    if len(kept) != len(rows):
        write_jsonl_atomic(out, kept)
    return done


def search_chunk(bench: Workbench, agent: HFGenerator, tasks: list[str], seed: int) -> list[dict[str, Any]]:
    config, prompt = bench.config.agent_r, bench.config.prompt
    envs = bench.pool()[: len(tasks)]
    max_depth = config.max_depth or bench.env.max_steps
    searches = [TreeSearch(env, task, children=config.children, passes=config.passes, max_depth=max_depth,
                           rng=random.Random(seed + i), c=config.exploration)
                for i, (env, task) in enumerate(zip(envs, tasks))]
    prompts = [initial_messages(env.task_spec(), s.root.observation, prompt) for env, s in zip(envs, searches)]
    sampler = ExpansionSampler(agent, dict(zip(map(id, searches), prompts)), config.children,
                               bench.config.rollout.temperature, seed)
    run_searches(searches, sampler)
    return [{"task_id": s.task_id, "prompt_messages": p, "counts": dataclasses.asdict(s.counts),
             "root": dataclasses.asdict(s.root)} for s, p in zip(searches, prompts)]


def conversation(prompt: list[dict[str, str]], path: list[Node]) -> list[dict[str, str]]:
    """The context a node's children are sampled in: the prompt, then every step's reply and observation."""
    messages = list(prompt)
    for node in path[1:]:
        messages += [{"role": "assistant", "content": node.response}, {"role": "user", "content": node.observation}]
    return messages


class ExpansionSampler:
    """All trees' expansion requests of a round: K samples each, one batched generation (seed per round)."""

    def __init__(self, agent: HFGenerator, prompts: dict[int, list[dict[str, str]]], children: int,
                 temperature: float, seed: int):
        self.agent, self.prompts, self.children = agent, prompts, children
        self.temperature, self.seed, self.rounds = temperature, seed, 0

    def __call__(self, requests: list[tuple[TreeSearch, list[Node]]]) -> list[list[tuple[str, int]] | None]:
        ids = [self.agent.prompt_ids(conversation(self.prompts[id(search)], path)) for search, path in requests]
        fits = [len(i) + self.agent.config.max_new_tokens <= self.agent.max_prompt_tokens for i in ids]
        flat = [i for i, ok in zip(ids, fits) if ok for _ in range(self.children)]
        replies = self.agent.generate(flat, self.temperature, self.seed + self.rounds) if flat else []
        self.rounds += 1
        grouped = iter([replies[k:k + self.children] for k in range(0, len(replies), self.children)])
        return [next(grouped) if ok else None for ok in fits]


def search_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter()
    for row in rows:
        counts.update(row["counts"])
    leaves = [path[-1].reward for row in rows for path in leaf_paths(node_from_dict(row["root"]))]
    return {"tasks": len(rows), **counts, "leaves": len(leaves), "mean_leaf_reward": mean(leaves) if leaves else None,
            "success_leaves": sum(r == 1.0 for r in leaves),
            "tasks_with_reward": sum(row["root"]["value"] > 0 for row in rows)}


# -- 2. revise ------------------------------------------------------------------------------------


def revise_stage(bench: Workbench, iteration: int) -> dict[str, Any]:
    config = bench.config.agent_r
    rng = random.Random(chunk_seed(bench.config.seed, "revise", iteration, 0))
    trees = [row for row in read_jsonl(trees_path(bench, iteration)) if row["root"]["value"] > 0]  # as Agent-R
    goods, pairs = [], []
    for row in trees:
        paths = leaf_paths(node_from_dict(row["root"]))
        goods += [(row, path) for path in good_paths(paths, config.alpha)]
        pairs += [(row, good, bad) for good, bad in contrast_pairs(paths, config.alpha, config.beta,
                                                                   config.max_pairs_per_task, rng)]
    verifier = Verifier(bench, iteration)
    walks = find_first_errors([(task_text(row), bad) for row, _, bad in pairs], verifier)
    react = bench.config.prompt.react
    revisions = [revision_episode(iteration, n, row, good, bad, walk.error_step, rng.choice(REFLECTIONS), react)
                 for n, ((row, good, bad), walk) in enumerate(zip(pairs, walks))]
    good_episodes = [path_episode(iteration, n, row, path) for n, (row, path) in enumerate(goods)]
    write_jsonl_atomic(bench.run_dir.episodes(f"it{iteration}-revision-target"), revisions + good_episodes)
    return {"trees_with_reward": len(trees), "pairs": len(pairs), "revisions": len(revisions),
            "good_trajectories": len(good_episodes), **verifier.counts(), **verifier_summary(walks)}


def task_text(row: dict[str, Any]) -> str:
    return row["root"]["observation"]


class Verifier:
    """The current agent as Agent-R's step verifier, sampled at the rollout temperature."""

    def __init__(self, bench: Workbench, iteration: int):
        agent = bench.generator(bench.checkpoint("target", iteration - 1))
        rollout = dataclasses.replace(agent.config, max_new_tokens=bench.config.agent_r.verifier_max_new_tokens)
        self.generator = HFGenerator(agent.model, agent.tokenizer, rollout, agent.max_prompt_tokens)
        self.batch, self.temperature = bench.config.rollout.batch_size, bench.config.rollout.temperature
        self.seed = chunk_seed(bench.config.seed, "verify", iteration, 0)
        self.calls = self.generations = self.tokens_generated = 0

    def __call__(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        replies = []
        for start in range(0, len(prompts), self.batch):
            ids = [self.generator.prompt_ids(p) for p in prompts[start:start + self.batch]]
            replies += self.generator.generate(ids, self.temperature, self.seed + self.calls)
            self.calls += 1
        self.generations += len(replies)
        self.tokens_generated += sum(tokens for _, tokens in replies)
        return [text for text, _ in replies]

    def counts(self) -> dict[str, int]:
        return {"generations": self.generations, "tokens_generated": self.tokens_generated}


def verifier_summary(walks) -> dict[str, Any]:
    """Where the verifier puts the first error (step -> count; "none": no step blamed) and its parse rate."""
    verdicts = [v for w in walks for v in w.verdicts]
    blamed = [w.error_step for w in walks if w.error_step is not None]
    steps = Counter(str(w.error_step or "none") for w in walks)
    return {"verifier_calls": len(verdicts),
            "verifier_parse_rate": float(mean(v.parsed for v in verdicts)) if verdicts else None,
            "error_step_counts": dict(sorted(steps.items())),
            "error_at_step1_share": float(mean(s == 1 for s in blamed)) if blamed else None,
            "mean_error_step": mean(blamed) if blamed else None,
            "no_error_found": sum(w.error_step is None for w in walks)}


def revision_episode(iteration: int, n: int, row: dict[str, Any], good: list[Node], bad: list[Node],
                     error_step: int | None, reflection: str, react: bool) -> Episode:
    messages = revision_messages(row["prompt_messages"], bad, good, error_step, reflection, react)
    cut = len(bad) if error_step is None else error_step
    continued = good[min(shared_prefix(bad, good), cut):]
    actions = [node.action for node in bad[:cut]] + [NOOP_ACTION] + [node.action for node in continued]
    return training_episode(f"revision/it{iteration}/{row['task_id']}/{n}", "revision", iteration, row, messages,
                            actions, good[-1].reward)


def path_episode(iteration: int, n: int, row: dict[str, Any], path: list[Node]) -> Episode:
    return training_episode(f"search_good/it{iteration}/{row['task_id']}/{n}", "search_good", iteration, row,
                            path_messages(row["prompt_messages"], path), [node.action for node in path],
                            path[-1].reward)


def training_episode(episode_id: str, agent: str, iteration: int, row: dict[str, Any], messages: list[dict],
                     actions: list[str], reward: float) -> Episode:
    """A search-derived training example as an Episode record (a revision's reward is its good path's)."""
    return Episode(episode_id=episode_id, task_id=row["task_id"], split="train", agent=agent, iteration=iteration,
                   messages=messages, actions=actions, reward=reward, success=reward == 1.0, steps=len(actions),
                   seed=0, temperature=0.0, end_reason=agent, prompt_messages=len(row["prompt_messages"]))


# -- 3. train -------------------------------------------------------------------------------------


def train_stage(bench: Workbench, iteration: int) -> dict[str, Any]:
    """SFT continued from the current agent; with no search data the agent stays as it is."""
    config = bench.config.agent_r
    searched = read_episodes(bench.run_dir.episodes(f"it{iteration}-revision-target"))
    experts = bench.list_experts()
    rng = random.Random(chunk_seed(bench.config.seed, "general", iteration, 0))
    general = rng.sample(experts, min(len(experts), round(config.general_ratio * len(searched))))
    examples = searched + general
    start, name = bench.checkpoint("target", iteration - 1), f"target-it{iteration}"
    stats: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        if not examples:
            link_tree(Path(start), tmp)
        elif bench.launched():
            stats.update(bench.launch_training("sft", name, start, examples, "agent_r.sft",
                                               bench.config.seed + iteration, tmp))
        else:
            model = load_model(start, bench.config.model, trainable=True)
            tokenizer = load_tokenizer(start)
            stats.update(train_sft(model, tokenizer, examples, config.sft, bench.run_dir.sub("tb", name),
                                   bench.config.seed + iteration, bench.config.train.gradient_checkpointing,
                                   bench.cpu_bf16(), bench.config.train.compile))
            save_agent(model, tokenizer, tmp)

    atomic_dir(bench.run_dir.checkpoint(name), build)
    kinds = Counter(ep.agent for ep in searched)
    return {**stats, "checkpoint": str(bench.run_dir.checkpoint(name)), "revision_examples": kinds["revision"],
            "good_examples": kinds["search_good"], "general_examples": len(general),
            "general_ratio": config.general_ratio}
