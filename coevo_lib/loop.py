"""The study loop: SFT, then iterations of rollouts -> pairs -> training -> evaluation.

Every stage is named, writes atomically, logs one metrics record and marks itself done; rerunning
``Workbench.run`` on the same directory skips finished stages (resume after any kill). Each method
is one iteration function in ``ITERATIONS``; recipes choose one by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from coevo_lib.accounting import rollout_accounting
from coevo_lib.config import RunConfig, final_iteration
from coevo_lib.envs import make_env
from coevo_lib.envs.base import TextEnv
from coevo_lib.evaluate import best_of_n_metrics, split_metrics
from coevo_lib.methods.agent_r import agent_r_iteration
from coevo_lib.methods.srlm import srlm_iteration
from coevo_lib.model_store import provenance, resolve_model
from coevo_lib.models import (computes_in_bf16, is_peft_checkpoint, load_model, load_tokenizer, local_or_hub,
                              save_agent, set_adapter_base)
from coevo_lib.pairs import eto_pairs, expert_pairs, failure_pairs, target_pairs
from coevo_lib.records import Episode, Pair, read_episodes, read_pairs, write_json_atomic, write_jsonl_atomic
from coevo_lib.rollout import HFGenerator, TaskRef, expand_tasks, expert_corpus, expert_episode, rollout
from coevo_lib.rollout_service import RolloutService
from coevo_lib.runs import RunDir, atomic_dir, link_tree
from coevo_lib.tiny_model import create_tiny_agent
from coevo_lib.train import train_dpo, train_sft
from coevo_lib.train.launch import run_stage, section_config

log = logging.getLogger(__name__)


class Workbench:
    """One run: a config, its run directory, the environments and the stages over them."""

    def __init__(self, config: RunConfig, run: RunDir):
        self.config, self.run_dir = config, run
        self.env: TextEnv = make_env(config.env.name, **config.env.kwargs)
        self._pool: list[TextEnv] = []
        self.rollouts = RolloutService(config, run.sub("serving"))

    # -- plumbing ---------------------------------------------------------------------------

    def stage(self, name: str, compute: Callable[[], dict[str, Any]], **labels: Any) -> dict[str, Any]:
        """Run ``compute`` once: skipped when its done-marker exists, logged to metrics.jsonl."""
        if self.run_dir.is_done(name):
            return self.run_dir.stage_result(name)
        log.info("stage %s", name)
        start = time.time()
        result = {**labels, **compute()}
        result["stage_wall_s"] = round(time.time() - start, 3)
        self.run_dir.log_metrics({"stage": name, **result})
        self.run_dir.mark_done(name, result)
        return result

    def pool(self) -> list[TextEnv]:
        """One environment per episode in flight: batch_size in lockstep, max_concurrent when async."""
        rollout = self.config.rollout
        size = rollout.max_concurrent if rollout.is_async else rollout.batch_size
        self._pool = self._pool or [self.env]
        self._pool += [make_env(self.config.env.name, **self.config.env.kwargs) for _ in range(size - len(self._pool))]
        return self._pool[:size]

    def checkpoint(self, agent: str, iteration: int) -> str:
        """The agent's weights after ``iteration`` (0 = the shared SFT model)."""
        if iteration == 0:
            return str(self.run_dir.checkpoint("sft"))
        return self.run_dir.stage_result(f"it{iteration}-train-{agent}")["checkpoint"]

    def generator(self, checkpoint: str) -> HFGenerator:
        model = load_model(checkpoint, self.config.model).eval()
        return HFGenerator(model, load_tokenizer(checkpoint), self.config.rollout, self.config.prompt.max_prompt_tokens)

    def train_tasks(self) -> list[str]:
        return self.env.task_ids("train")[: self.config.rollout.max_tasks]

    def experts(self) -> dict[str, Episode]:
        return {ep.task_id: ep for ep in read_episodes(self.run_dir.episodes("expert"))}

    def close(self) -> None:
        self.rollouts.close()
        for env in self._pool or [self.env]:
            env.close()

    # -- stages shared by every method ------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        self.warn_if_freeze_is_a_no_op()
        self.stage("base", self.build_base)
        self.stage("expert", self.record_experts)
        self.stage("sft", self.initial_sft, iteration=0)
        self.stage("it0-eval", lambda: self.evaluate(0), iteration=0, kind="eval")
        last = self.iterations()
        for iteration in range(1, last + 1):
            ITERATIONS[self.config.method](self, iteration)
            if self.config.eval.every_iteration or iteration == last:
                self.stage(f"it{iteration}-eval", lambda i=iteration: self.evaluate(i), iteration=iteration,
                           kind="eval")
        return self.run_dir.metrics()

    def iterations(self) -> int:
        return final_iteration(self.config.method, self.config.loop.iterations)

    def warn_if_freeze_is_a_no_op(self) -> None:
        # The second agent's update in iteration i first shows in the rollouts of iteration i + 1, so
        # freezing it after iteration f changes nothing unless the run has at least f + 2 iterations.
        freeze = self.config.loop.freeze_second_agent_after
        if self.config.method == "coevo" and freeze is not None and self.iterations() < freeze + 2:
            log.warning("loop.freeze_second_agent_after=%d with %d iterations equals the unfrozen run; "
                        "the ablation needs loop.iterations >= %d", freeze, self.iterations(), freeze + 2)

    def build_base(self) -> dict[str, Any]:
        checkpoint = starting_checkpoint(self.config, self.env, self.run_dir.checkpoint("base"))
        return {"checkpoint": checkpoint, "provenance": provenance(self.config.model.name_or_path)}

    def record_experts(self) -> dict[str, Any]:
        """Expert trajectories of the training tasks; ones that do not succeed (a gold path longer than
        the step limit, a simulator quirk) are dropped and counted, never trained on."""
        # The rules the experts (and later the agents) are scored by: splits, step limits, reward rule.
        write_json_atomic(self.run_dir.sub("protocol.json"), self.env.protocol())
        # Every training task's expert (the scarce ground truth); rollout.max_tasks only caps rollouts.
        episodes = [expert_episode(self.env, t, "train", self.config.prompt) for t in self.env.task_ids("train")]
        solved = [ep for ep in episodes if ep.success]
        dropped = [ep.task_id for ep in episodes if not ep.success]
        if dropped:
            log.warning("dropping %d expert trajectories that do not succeed, e.g. %s", len(dropped), dropped[:3])
        if not solved:
            raise RuntimeError(f"no expert trajectory succeeds on the {len(episodes)} training tasks")
        write_jsonl_atomic(self.run_dir.episodes("expert"), solved)
        return {"experts": len(solved), "experts_dropped": len(dropped),
                "mean_expert_steps": sum(ep.steps for ep in solved) / len(solved)}

    def list_experts(self) -> list[Episode]:
        return read_episodes(self.run_dir.episodes("expert"))

    def initial_sft(self) -> dict[str, Any]:
        """The SFT model both agents start from, trained once per identical setting and shared."""
        if not self.config.sft.share:
            return self.train_supervised(self.list_experts(), "sft")
        shared = shared_sft_dir(self.config, self.run_dir.path.parent)
        if not (shared / "result.json").exists():
            stats = self.train_supervised(self.list_experts(), "sft")
            atomic_dir(shared, lambda tmp: copy_checkpoint(self.run_dir.checkpoint("sft"), tmp, stats))
            return {**stats, "shared_sft": str(shared), "reused": False}
        atomic_dir(self.run_dir.checkpoint("sft"), lambda tmp: self.copy_shared_sft(shared / "checkpoint", tmp))
        stats = json.loads((shared / "result.json").read_text())
        return {**stats, "checkpoint": str(self.run_dir.checkpoint("sft")), "shared_sft": str(shared), "reused": True}

    def copy_shared_sft(self, shared: Path, out: Path) -> None:
        link_tree(shared, out)
        if is_peft_checkpoint(out):  # on this run's base, equal to the one it was trained on (same shared key)
            set_adapter_base(out, self.run_dir.stage_result("base")["checkpoint"])

    def train_supervised(self, episodes: list[Episode], name: str) -> dict[str, Any]:
        """SFT from the base model on ``episodes`` into checkpoint ``name``."""
        base = self.run_dir.stage_result("base")["checkpoint"]
        stats: dict[str, Any] = {}

        def build(tmp: Path) -> None:
            if self.config.sft.epochs == 0:  # zero-shot: the base as a checkpoint (a fresh, inert LoRA adapter)
                save_agent(load_model(base, self.config.model, trainable=True), load_tokenizer(base), tmp)
                stats.update({"examples": len(episodes), "steps": 0, "tokens_trained": 0, "train_loss": None})
                return
            if self.launched():
                stats.update(self.launch_training("sft", name, base, episodes, "sft", self.config.seed, tmp))
                return
            model, tokenizer = load_model(base, self.config.model, trainable=True), load_tokenizer(base)
            stats.update(train_sft(model, tokenizer, episodes, self.config.sft, self.run_dir.sub("tb", name),
                                   self.config.seed, self.config.train.gradient_checkpointing, self.cpu_bf16(),
                                   self.config.train.compile))
            save_agent(model, tokenizer, tmp)

        atomic_dir(self.run_dir.checkpoint(name), build)
        return {**stats, "checkpoint": str(self.run_dir.checkpoint(name))}

    def cpu_bf16(self) -> bool:
        """Train under bf16 autocast on this CPU (model.cpu_bf16 and native bf16); GPUs decide for themselves."""
        return computes_in_bf16(self.config.model, torch.device("cpu"))

    def launched(self) -> bool:
        return self.config.train.launcher != "inprocess"

    def launch_training(self, kind: str, name: str, start: str, examples: list, section: str, seed: int,
                        out: Path) -> dict[str, Any]:
        """Train ``examples`` from ``start`` into ``out`` as a launched stage (coevo_lib.train.launch)."""
        if not examples:  # nothing to train on: the checkpoint is the start, as train_dpo returns it
            link_tree(Path(start), out)
            return {"pairs": 0, "steps": 0, "tokens_trained": 0, "wall_s": 0.0, "train_loss": None}
        job = {"kind": kind, "run_dir": str(self.run_dir.path.resolve()), "stage_section": section,
               "start": str(Path(start).resolve()), "seed": seed, "out": str(out.resolve()),
               "tb_dir": str(self.run_dir.sub("tb", name).resolve())}
        stats = run_stage(self.config.train, self.run_dir.sub("launch", name), job, examples)
        return {**stats, "launcher": self.config.train.launcher}

    def roll(self, agent: str, checkpoint: str, iteration: int, refs: list[TaskRef], temperature: float,
             kind: str) -> tuple[list[Episode], dict[str, Any]]:
        """Episodes of ``agent`` at ``checkpoint`` on ``refs`` (resumed from its file), and engine statistics.

        Rollouts of the shared SFT model are shared too: the methods of a seed evaluate the same SFT
        and (at iteration 1) roll out the same target, so the first run computes them and the others
        copy its episodes (``_shared/rollout-<key>``), which also makes their starting points identical.
        """
        out = self.run_dir.episodes(f"it{iteration}-{kind}-{agent}")
        if self.config.sft.share and checkpoint == str(self.run_dir.checkpoint("sft")):
            shared = self.shared_rollout_dir(agent, iteration, refs, temperature, kind)
            if (shared / "engine.json").exists():
                shutil.copyfile(shared / "episodes.jsonl", out)
                engine = json.loads((shared / "engine.json").read_text())
                return read_episodes(out), {**engine, "reused": str(shared)}
            episodes, engine = self.fresh_roll(agent, checkpoint, iteration, refs, temperature, kind, out)
            publish_rollout(out, engine, shared)
            return episodes, engine
        return self.fresh_roll(agent, checkpoint, iteration, refs, temperature, kind, out)

    def shared_rollout_dir(self, agent: str, iteration: int, refs: list[TaskRef], temperature: float,
                           kind: str) -> Path:
        """Everything that decides a rollout of the shared SFT model, hashed next to that model."""
        sft = shared_sft_dir(self.config, self.run_dir.path.parent)
        # The tasks, samples and temperature are in refs and temperature; the rest of rollout (engine,
        # batch size, token limits) can change episodes too.
        rollout = {k: v for k, v in dataclasses.asdict(self.config.rollout).items()
                   if k not in ("temperature", "samples_per_task", "max_tasks")}
        inputs = {"sft": sft.name, "rollout": rollout, "agent": agent, "iteration": iteration,
                  "temperature": temperature, "kind": kind, "refs": [dataclasses.astuple(r) for r in refs]}
        return sft.parent / f"rollout-{digest_of(inputs)}"

    def fresh_roll(self, agent: str, checkpoint: str, iteration: int, refs: list[TaskRef], temperature: float,
                   kind: str, out: Path) -> tuple[list[Episode], dict[str, Any]]:
        if self.config.rollout.is_async:
            task = self.rollouts.task(agent, iteration, kind, temperature)
            return self.rollouts.rollout(self.pool(), refs, checkpoint, task, out)
        start, generator = time.perf_counter(), self.generator(checkpoint)
        episodes = rollout(self.pool(), refs, generator, agent=agent, iteration=iteration,
                           prompt=self.config.prompt, seed=self.config.seed, temperature=temperature,
                           out_path=out, kind=kind)
        return episodes, {"backend": "hf", "schedule": "lockstep", "wall_s": round(time.perf_counter() - start, 3),
                          "token_checks": generator.token_checks, "token_mismatches": generator.token_mismatches}

    def rollout_stage(self, agent: str, iteration: int, samples: int | None = None) -> list[Episode]:
        """Roll out ``agent`` (as of the start of ``iteration``) on the training tasks; logged with accounting."""
        name = f"it{iteration}-rollout-{agent}"
        refs = expand_tasks(self.train_tasks(), "train", samples or self.config.rollout.samples_per_task)
        checkpoint = self.checkpoint(agent, iteration - 1)
        temperature = self.config.rollout.temperature

        def compute() -> dict[str, Any]:
            episodes, engine = self.roll(agent, checkpoint, iteration, refs, temperature, "train")
            return {**rollout_accounting(episodes), "engine": engine}

        self.stage(name, compute, iteration=iteration, agent=agent)
        return read_episodes(self.run_dir.episodes(f"it{iteration}-train-{agent}"))

    def pairs_stage(self, name: str, iteration: int, build: Callable[[], list[Pair]]) -> list[Pair]:
        def compute() -> dict[str, Any]:
            pairs = build()
            write_jsonl_atomic(self.run_dir.pairs(f"it{iteration}-{name}"), pairs)
            return {"pairs": len(pairs), "pair_kinds": count_kinds(pairs)}

        self.stage(f"it{iteration}-pairs-{name}", compute, iteration=iteration, kind="pairs")
        return read_pairs(self.run_dir.pairs(f"it{iteration}-{name}"))

    def dpo_stage(self, agent: str, iteration: int, pairs_name: str, frozen: bool = False) -> None:
        """DPO of ``agent`` on the iteration's pairs; the reference is the agent at the iteration start."""
        start = self.checkpoint(agent, iteration - 1)
        section = "dpo" if agent == "target" else "loop.failure_dpo"
        stage_config = section_config(self.config, section)

        def compute() -> dict[str, Any]:
            if frozen:
                return {"checkpoint": start, "frozen": True, "pairs": 0}
            pairs = read_pairs(self.run_dir.pairs(f"it{iteration}-{pairs_name}"))
            out, stats = self.run_dir.checkpoint(f"{agent}-it{iteration}"), {}

            def build(tmp: Path) -> None:
                if self.launched():
                    stats.update(self.launch_training("dpo", f"{agent}-it{iteration}", start, pairs, section,
                                                      self.config.seed + iteration, tmp))
                    return
                model, tokenizer = load_model(start, self.config.model, trainable=True), load_tokenizer(start)
                stats.update(train_dpo(model, tokenizer, pairs, stage_config,
                                       self.run_dir.sub("tb", f"{agent}-it{iteration}"), self.config.seed + iteration,
                                       self.config.train.gradient_checkpointing, self.cpu_bf16(),
                                       self.config.train.compile))
                save_agent(model, tokenizer, tmp)

            atomic_dir(out, build)
            return {**stats, "checkpoint": str(out)}

        self.stage(f"it{iteration}-train-{agent}", compute, iteration=iteration, agent=agent, kind="train")

    def evaluate(self, iteration: int) -> dict[str, Any]:
        checkpoint = self.checkpoint("target", iteration)
        best_of_n = self.config.method == "best_of_n"
        samples = self.config.loop.best_of_n if best_of_n else 1
        temperature = self.config.rollout.temperature if best_of_n else self.config.eval.temperature
        metrics: dict[str, Any] = {}
        for split in self.config.eval.splits:
            refs = expand_tasks(self.env.task_ids(split)[: self.config.eval.max_tasks], split, samples)
            episodes, metrics[f"{split}_engine"] = self.roll("target", checkpoint, iteration, refs, temperature,
                                                              f"eval-{split}")
            summary = best_of_n_metrics(episodes) if best_of_n else split_metrics(episodes)
            metrics.update({f"{split}_{key}": value for key, value in summary.items()})
            metrics[f"{split}_tokens_generated"] = sum(ep.tokens_generated for ep in episodes)
        return metrics


def starting_checkpoint(config: RunConfig, env: TextEnv, tiny_dir: Path) -> str:
    """The model every agent starts from: the tiny model built into ``tiny_dir``, or a pretrained model used
    where it is (a provisioned name resolves to its cache directory, a local path to an absolute one: stages
    and launched subprocesses read it from other working directories; nothing is copied)."""
    model = config.model
    if model.name_or_path != "tiny":
        return local_or_hub(resolve_model(model.name_or_path))
    corpus = expert_corpus(env, config.prompt, model.tiny.tokenizer_tasks_per_split)
    atomic_dir(tiny_dir, lambda tmp: create_tiny_agent(model.tiny, corpus, tmp, config.seed))
    return str(tiny_dir)


def shared_sft_dir(config: RunConfig, runs_parent: Path) -> Path:
    """``<parent of the run dir>/_shared/sft-<key>``: runs side by side (a study) share their SFT stage.

    The key holds everything that determines the SFT weights (deterministic on CPU for a fixed seed).
    """
    inputs = {"env": config.env, "model": config.model, "prompt": config.prompt, "sft": config.sft,
              "seed": config.seed}
    return runs_parent / "_shared" / f"sft-{digest_of(inputs)}"


def digest_of(inputs: dict[str, Any]) -> str:
    """A short stable hash of a stage's inputs (dataclasses as dicts): the name of what it shares."""
    return hashlib.sha256(json.dumps(inputs, default=asdict_or_str, sort_keys=True).encode()).hexdigest()[:16]


def asdict_or_str(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def publish_rollout(episodes: Path, engine: dict[str, Any], shared: Path) -> None:
    """Put a rollout where the seed's other runs find it; a run in parallel may publish the same one
    first (a study with workers > 1), so the temp name is this process's and the first one stays."""
    tmp = shared.with_name(f"{shared.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(episodes, tmp / "episodes.jsonl")
    (tmp / "engine.json").write_text(json.dumps(engine))
    try:
        os.replace(tmp, shared)
    except OSError:  # published first by the other run: it stays, this run keeps its own copy
        shutil.rmtree(tmp, ignore_errors=True)


def copy_checkpoint(source: Path, target: Path, stats: dict[str, Any]) -> None:
    link_tree(source, target / "checkpoint")
    (target / "result.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "checkpoint"}))


def count_kinds(pairs: list[Pair]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.kind] = counts.get(pair.kind, 0) + 1
    return counts


# -- one iteration per method ---------------------------------------------------------------


def eto_iteration(bench: Workbench, iteration: int) -> None:
    """ETO: expert > own failure, DPO with the reference reset to the current target."""
    pairs_config = bench.config.loop.pairs
    target = bench.rollout_stage("target", iteration)
    bench.pairs_stage("target", iteration, lambda: eto_pairs(
        bench.experts(), target, pairs_config.eto_truncate, pairs_config.eto_extra_turns))
    bench.dpo_stage("target", iteration, "target")


def coevo_iteration(bench: Workbench, iteration: int) -> None:
    """Co-evolution: both agents roll out; the second agent is updated first, then the target."""
    loop = bench.config.loop
    second_name = loop.second_agent  # "failure" or "positive"
    target = bench.rollout_stage("target", iteration)
    second = bench.rollout_stage(second_name, iteration)
    experts = bench.experts()
    if second_name == "failure":
        bench.pairs_stage("second", iteration, lambda: failure_pairs(target, second, loop.pairs.failure_within_agent))
    else:  # positive-agent ablation: the second agent is pushed toward success instead
        bench.pairs_stage("second", iteration, lambda: expert_pairs("positive_expert_vs_own_failure", experts, second))
    bench.pairs_stage("target", iteration, lambda: target_pairs(
        experts, target, second, include_target=loop.pairs.include_target_failures,
        include_second=loop.pairs.include_failure_agent_failures, add_failure_pairs=loop.pairs.target_failure_pairs))
    frozen = loop.freeze_second_agent_after is not None and iteration > loop.freeze_second_agent_after
    # The second agent's update first shows in the next iteration's rollouts, so after the last iteration
    # nothing would use it (it was 34-131 s per run in the results study). A run extended by more iterations
    # trains it then: no stage marker is written here, so the resumed iteration finds the stage to run.
    if iteration < bench.iterations():
        bench.dpo_stage(second_name, iteration, "second", frozen=frozen)
    else:
        log.info("it%d-train-%s skipped: the last iteration's update of the %s agent reaches no rollout",
                 iteration, second_name, second_name)
    bench.dpo_stage("target", iteration, "target")


def rft_iteration(bench: Workbench, iteration: int) -> None:
    """Rejection-sampling fine-tuning: SFT from the base on experts plus the target's own successes."""
    samples = bench.config.loop.best_of_n
    target = bench.rollout_stage("target", iteration, samples=samples)

    def compute() -> dict[str, Any]:
        successes = unique_successes(target)
        stats = bench.train_supervised(bench.list_experts() + successes, f"target-it{iteration}")
        return {**stats, "own_successes": len(successes)}

    bench.stage(f"it{iteration}-train-target", compute, iteration=iteration, agent="target", kind="train")


def unique_successes(episodes: list[Episode]) -> list[Episode]:
    seen, kept = set(), []
    for ep in episodes:
        key = (ep.task_id, tuple(ep.actions))
        if ep.success and key not in seen:
            seen.add(key)
            kept.append(ep)
    return kept


ITERATIONS: dict[str, Callable[[Workbench, int], None]] = {
    "eto": eto_iteration,
    "coevo": coevo_iteration,
    "rft": rft_iteration,
    "srlm": srlm_iteration,  # coevo_lib.methods.srlm
    "agent_r": agent_r_iteration,  # coevo_lib.methods.agent_r
}
