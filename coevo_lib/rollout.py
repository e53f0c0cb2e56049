"""Batched lockstep rollouts: many episodes advance together, one batched generation per turn.

Tasks are processed in fixed chunks of ``batch_size`` episodes. Each chunk samples with its own
seed derived from (run seed, agent, iteration, chunk), and is appended to the episodes file when
it finishes, so a killed rollout resumes at the first unfinished chunk and reproduces exactly
what an unbroken run would have sampled.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from coevo_lib.config import PromptConfig, RolloutConfig
from coevo_lib.envs.base import TextEnv
from coevo_lib.models import stop_token_ids
from coevo_lib.progress import progress_bar
from coevo_lib.prompting import expert_messages, initial_messages, parse_action, render_ids
from coevo_lib.records import Episode, append_jsonl, read_episodes, write_jsonl_atomic


@dataclass
class TaskRef:
    task_id: str
    split: str
    sample_index: int = 0


@dataclass
class LiveEpisode:
    """Mutable state of one episode while it is being rolled out."""

    ref: TaskRef
    env: TextEnv
    messages: list[dict[str, str]]
    actions: list[str]
    prompt_messages: int = 0
    tokens_generated: int = 0
    reward: float = 0.0
    success: bool = False
    done: bool = False
    end_reason: str = "done"


def replay_episode(env: TextEnv, task_id: str, split: str, prompt: PromptConfig, thoughts: list[str],
                   actions: list[str], agent: str) -> Episode:
    """Play fixed (thought, action) turns through the environment and record them as an episode."""
    first = env.reset(task_id)
    steps, reward, info, done = [], 0.0, {}, False
    for thought, action in zip(thoughts, actions, strict=True):
        if done:
            break
        observation, reward, done, info = env.step(action)
        steps.append((thought, action, observation))
    messages = expert_messages(env.task_spec(), first, steps, prompt)
    return Episode(
        episode_id=f"{agent}/{task_id}", task_id=task_id, split=split, agent=agent, iteration=0,
        messages=messages, actions=[a for _, a, _ in steps], reward=float(reward),
        success=bool(info.get("success", False)), steps=len(steps), seed=0, temperature=0.0, end_reason=agent,
        prompt_messages=len(initial_messages(env.task_spec(), first, prompt)),
    )


def expert_episode(env: TextEnv, task_id: str, split: str, prompt: PromptConfig) -> Episode:
    """Replay the expert's actions through the environment and record them as an episode."""
    return replay_episode(env, task_id, split, prompt, env.expert_thoughts(task_id), env.expert_actions(task_id),
                          "expert")


def expert_corpus(env: TextEnv, prompt: PromptConfig, max_tasks: int) -> list[str]:
    """Text the tiny tokenizer learns from: expert trajectories of training tasks as prompts, and the
    environment's vocabulary (coevo_lib.tiny_model trains on it)."""
    texts = []
    for task_id in env.task_ids("train")[:max_tasks]:
        texts.extend(message["content"] for message in expert_episode(env, task_id, "train", prompt).messages)
    texts.extend(env.vocabulary_text())
    texts.append("user assistant system Invalid action. Thought: Action: Observation:")
    return texts


class HFGenerator:
    """One batched ``generate`` call per turn with left padding and the KV cache."""

    def __init__(self, model, tokenizer, config: RolloutConfig, max_prompt_tokens: int):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_prompt_tokens = max_prompt_tokens
        self.stop_ids = stop_token_ids(tokenizer)
        # Replies whose text does not re-tokenise to the generated ids (as engine.TokenCheck counts for
        # served rollouts): pairs are re-tokenised from text, so the agent would train on tokens it did not
        # generate. The tiny model's byte-level BPE round-trips exactly; a real BPE tokenizer may not.
        self.token_checks = self.token_mismatches = 0

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return render_ids(self.tokenizer, messages, add_generation_prompt=True)

    def generate(self, prompts: list[list[int]], temperature: float, seed: int) -> list[tuple[str, int]]:
        """Lockstep sampling: one global seed for the whole batch (exactly reproducible batch by batch)."""
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": self.config.top_p}
        rows = self.generate_ids(prompts, **(sampling if temperature > 0 else {"do_sample": False}))
        return [self.decode(row) for row in rows]

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], logits_processor=None, **sampling) -> list[list[int]]:
        """New token ids of each prompt (left padded into one batch), stop and pad tokens included."""
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        # A static cache writes each new key/value in place; the default dynamic cache concatenates,
        # copying the whole cache every token, which made batched decoding copy-bound on CPU.
        output = self.model.generate(
            **batch, max_new_tokens=self.config.max_new_tokens, eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id, cache_implementation="static",
            logits_processor=logits_processor, **(sampling or {"do_sample": False}),
        )
        return output[:, batch["input_ids"].shape[1]:].tolist()

    def cut_at_stop(self, row: list[int]) -> tuple[list[int], bool]:
        """The tokens before the first stop token, and whether a stop token ended the reply."""
        cut = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        return (row, False) if cut is None else (row[:cut], True)

    def decode(self, row: list[int]) -> tuple[str, int]:
        """Text up to (not including) the first stop token, and the number of tokens generated."""
        kept, stopped = self.cut_at_stop(row)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        self.token_checks += 1
        self.token_mismatches += self.tokenizer.encode(text, add_special_tokens=False) != kept
        return text, len(kept) + stopped

def chunk_seed(seed: int, agent: str, iteration: int, chunk: int) -> int:
    # crc32, not hash(): Python salts string hashes per process, which would break resume.
    return zlib.crc32(f"{seed}/{agent}/{iteration}/{chunk}".encode()) & 0x7FFFFFFF


def episode_id(agent: str, iteration: int, ref: TaskRef, kind: str = "train") -> str:
    return f"{agent}/it{iteration}/{kind}/{ref.task_id}/s{ref.sample_index}"


def expand_tasks(task_ids: list[str], split: str, samples: int) -> list[TaskRef]:
    return [TaskRef(t, split, s) for t in task_ids for s in range(samples)]


def start_episode(env: TextEnv, ref: TaskRef, prompt: PromptConfig) -> LiveEpisode:
    first = env.reset(ref.task_id)
    messages = initial_messages(env.task_spec(), first, prompt)
    return LiveEpisode(ref=ref, env=env, messages=messages, actions=[], prompt_messages=len(messages))


def advance(live: list[LiveEpisode], generator: HFGenerator, temperature: float, seed: int) -> None:
    """One lockstep turn: a batched generation over every live episode, then one env step each."""
    prompts = [generator.prompt_ids(ep.messages) for ep in live]
    for ep, ids in zip(live, prompts):
        if len(ids) + generator.config.max_new_tokens > generator.max_prompt_tokens:
            ep.done, ep.end_reason = True, "context_limit"
    active = [(ep, ids) for ep, ids in zip(live, prompts) if not ep.done]
    if not active:
        return
    replies = generator.generate([ids for _, ids in active], temperature, seed)
    for (ep, _), (text, n_tokens) in zip(active, replies):
        apply_reply(ep, text, n_tokens)


def apply_reply(ep: LiveEpisode, text: str, n_tokens: int) -> None:
    action = parse_action(text)
    ep.messages.append({"role": "assistant", "content": text})
    ep.actions.append(action)
    ep.tokens_generated += n_tokens
    observation, reward, done, info = ep.env.step(action)
    ep.reward, ep.success = float(reward), bool(info.get("success", False))
    if done:
        ep.done = True
        ep.end_reason = "max_steps" if len(ep.actions) >= ep.env.max_steps and not ep.success else "done"
    else:
        ep.messages.append({"role": "user", "content": observation})


def run_chunk(
    envs: list[TextEnv], refs: list[TaskRef], generator: HFGenerator, prompt: PromptConfig,
    temperature: float, seed: int,
) -> list[LiveEpisode]:
    episodes = [start_episode(env, ref, prompt) for env, ref in zip(envs, refs)]
    for turn in range(max(env.max_steps for env in envs)):
        live = [ep for ep in episodes if not ep.done]
        if not live:
            break
        advance(live, generator, temperature, seed + turn)
    return episodes


def to_record(ep: LiveEpisode, agent: str, iteration: int, seed: int, temperature: float, kind: str) -> Episode:
    return Episode(
        episode_id=episode_id(agent, iteration, ep.ref, kind), task_id=ep.ref.task_id, split=ep.ref.split,
        agent=agent, iteration=iteration, messages=ep.messages, actions=ep.actions, reward=ep.reward,
        success=ep.success, steps=len(ep.actions), seed=seed, temperature=temperature,
        tokens_generated=ep.tokens_generated, end_reason=ep.end_reason, sample_index=ep.ref.sample_index,
        prompt_messages=ep.prompt_messages,
    )


def completed_chunks(out_path: Path, chunks: list[list[TaskRef]], ids_of) -> tuple[set[int], list[Episode]]:
    """Chunks already fully written; rewrites the file without a partially written chunk."""
    existing = {ep.episode_id: ep for ep in read_episodes(out_path)}
    done, kept = set(), []
    for index, chunk in enumerate(chunks):
        ids = ids_of(chunk)
        if all(i in existing for i in ids):
            done.add(index)
            kept.extend(existing[i] for i in ids)
    if len(kept) != len(existing):
        write_jsonl_atomic(out_path, kept)
    return done, kept


def rollout(
    envs: list[TextEnv], refs: list[TaskRef], generator: HFGenerator, *, agent: str, iteration: int,
    prompt: PromptConfig, seed: int, temperature: float, out_path: Path | None = None, kind: str = "train",
) -> list[Episode]:
    """Roll out every task reference with ``len(envs)`` episodes in lockstep; resume from ``out_path``."""
    size = len(envs)
    chunks = [refs[i:i + size] for i in range(0, len(refs), size)]
    ids_of = lambda chunk: [episode_id(agent, iteration, ref, kind) for ref in chunk]  # noqa: E731
    done, records = completed_chunks(out_path, chunks, ids_of) if out_path else (set(), [])
    with progress_bar(len(refs), f"rollout {agent} it{iteration} {kind}", initial=len(records), unit="episode") as bar:
        for index, chunk in enumerate(chunks):
            if index in done:
                continue
            s = chunk_seed(seed, agent, iteration, index)
            finished = run_chunk(envs[: len(chunk)], chunk, generator, prompt, temperature, s)
            new = [to_record(ep, agent, iteration, s, temperature, kind) for ep in finished]
            if out_path:
                append_jsonl(out_path, new)
            records.extend(new)
            bar.update(len(chunk))
    order = {eid: i for i, eid in enumerate(i for chunk in chunks for i in ids_of(chunk))}
    return sorted(records, key=lambda ep: order[ep.episode_id])
