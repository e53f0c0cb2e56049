"""Asynchronous rollouts: each episode sends its next request as soon as its own last step is done.

Lockstep batches (coevo_lib.rollout) wait for their slowest episode every turn; here up to
``rollout.max_concurrent`` episodes are in flight, each one a coroutine that alternates a request
to a backend (coevo_lib.backends) and an environment step on a worker thread, so a JVM step or
reset never stalls the event loop. A finished episode is appended to the episodes file at once;
a killed rollout resumes with the episodes on disk and runs only the missing ones, none twice.

Every request carries a seed derived from (run seed, episode id, turn), not from its position in
a batch, so a resumed rollout asks the same questions with the same seeds as an unbroken one.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from coevo_lib.backends import Reply, Request
from coevo_lib.config import PromptConfig
from coevo_lib.envs.base import TextEnv
from coevo_lib.progress import progress_bar
from coevo_lib.prompting import render_ids
from coevo_lib.records import Episode, append_jsonl, read_episodes, write_jsonl_atomic
from coevo_lib.rollout import LiveEpisode, TaskRef, apply_reply, episode_id, start_episode, to_record

T = TypeVar("T")


def request_seed(seed: int, episode: str, turn: int) -> int:
    # crc32, not hash(): Python salts string hashes per process, which would break resume.
    return zlib.crc32(f"{seed}/{episode}/{turn}".encode()) & 0x7FFFFFFF


@dataclass
class RolloutTask:
    """What every episode of one rollout shares."""

    agent: str
    iteration: int
    kind: str
    prompt: PromptConfig
    seed: int
    temperature: float
    max_new_tokens: int
    max_prompt_tokens: int


class TokenCheck:
    """Counts replies whose text does not re-tokenise to the ids the engine generated.

    Pairs are re-tokenised from messages, so a mismatch means the agent is trained on tokens it did
    not generate; the tiny model's byte-level BPE round-trips exactly, real tokenizers may not.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.checked, self.mismatches = tokenizer, 0, 0

    def __call__(self, reply: Reply) -> None:
        if reply.token_ids is None:
            return
        self.checked += 1
        self.mismatches += self.tokenizer.encode(reply.text, add_special_tokens=False) != reply.token_ids


async def play(live: LiveEpisode, backend, tokenizer, task: RolloutTask, step: Callable[..., Awaitable],
               check: TokenCheck) -> LiveEpisode:
    """One episode from its first observation to its end, one request and one env step per turn."""
    name = episode_id(task.agent, task.iteration, live.ref, task.kind)
    while not live.done:
        ids = render_ids(tokenizer, live.messages, add_generation_prompt=True)
        if len(ids) + task.max_new_tokens > task.max_prompt_tokens:
            live.done, live.end_reason = True, "context_limit"
            break
        turn = len(live.actions)
        reply = await backend.complete(Request(ids, task.temperature, request_seed(task.seed, name, turn)))
        check(reply)
        await step(apply_reply, live, reply.text, reply.tokens)
    return live


async def rollout_episodes(envs: list[TextEnv], refs: list[TaskRef], backend, tokenizer, task: RolloutTask,
                           out_path: Path | None) -> tuple[list[Episode], dict[str, Any]]:
    """Roll out every reference with at most ``len(envs)`` episodes in flight; resume from ``out_path``."""
    ids = [episode_id(task.agent, task.iteration, ref, task.kind) for ref in refs]
    records = resume_records(out_path, set(ids)) if out_path else {}
    todo = [ref for ref, name in zip(refs, ids) if name not in records]
    free: asyncio.Queue[TextEnv] = asyncio.Queue()
    for env in envs:
        free.put_nowait(env)
    check, start = TokenCheck(tokenizer), time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(envs), 8), thread_name_prefix="env") as pool:
        loop = asyncio.get_running_loop()

        async def step(fn: Callable[..., T], *args) -> T:
            return await loop.run_in_executor(pool, fn, *args)

        async def one(ref: TaskRef) -> None:
            env = await free.get()
            try:
                live = await step(start_episode, env, ref, task.prompt)
                live = await play(live, backend, tokenizer, task, step, check)
                record = to_record(live, task.agent, task.iteration, episode_seed(task, live.ref), task.temperature,
                                   task.kind)
                if out_path:
                    append_jsonl(out_path, [record])
                records[record.episode_id] = record
                bar.update(1)
            finally:
                free.put_nowait(env)

        label = f"rollout {task.agent} it{task.iteration} {task.kind}"
        with progress_bar(len(refs), label, initial=len(refs) - len(todo), unit="episode") as bar:
            await gather_or_cancel([one(ref) for ref in todo])
    elapsed = time.perf_counter() - start
    stats = {**backend.stats.as_dict(), "episodes_run": len(todo), "episodes_resumed": len(refs) - len(todo),
             "wall_s": round(elapsed, 3), "episodes_per_s": round(len(todo) / elapsed, 3) if todo else None,
             "token_checks": check.checked, "token_mismatches": check.mismatches}
    return [records[name] for name in ids], stats


def episode_seed(task: RolloutTask, ref: TaskRef) -> int:
    """The seed of the episode's first request; turn t uses request_seed(seed, episode id, t)."""
    return request_seed(task.seed, episode_id(task.agent, task.iteration, ref, task.kind), 0)


async def gather_or_cancel(coroutines: list[Awaitable]) -> None:
    """Run all; on the first error cancel the rest (their finished episodes are already on disk)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def resume_records(out_path: Path, wanted: set[str]) -> dict[str, Episode]:
    """Episodes of this rollout already on disk; rewrites the file without a torn line or strays."""
    kept: dict[str, Episode] = {}
    for ep in read_episodes(out_path):
        if ep.episode_id in wanted:
            kept.setdefault(ep.episode_id, ep)
    if out_path.exists():
        write_jsonl_atomic(out_path, kept.values())  # appends after a torn line would corrupt the next one
    return kept


def run_async(coroutine: Awaitable[T]) -> T:
    """``asyncio.run`` that also works under a running event loop (a Jupyter kernel) via a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def rollout_async(envs: list[TextEnv], refs: list[TaskRef], make_backend: Callable[[], Any], tokenizer,
                  task: RolloutTask, out_path: Path | None = None) -> tuple[list[Episode], dict[str, Any]]:
    """Blocking entry point: builds the backend inside the event loop (HTTP clients belong to one loop)."""

    async def main() -> tuple[list[Episode], dict[str, Any]]:
        backend = make_backend()
        try:
            return await rollout_episodes(envs, refs, backend, tokenizer, task, out_path)
        finally:
            await backend.aclose()

    return run_async(main())
