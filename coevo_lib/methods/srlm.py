"""SRLM for agents as a workbench method (``method: srlm``; docs/baselines.md).

One iteration: K = ``loop.best_of_n`` episodes per training task from the current agent (the very
rollout RFT's rejection sampling draws: same refs, seeds and shared-SFT copy, so the two differ only in
who scores), the agent judges each episode itself (coevo_lib.methods.srlm_judge), best vs worst judged
episode per task becomes a DPO pair, and the target trains with observation-masked DPO from the
current agent (the reference reset to it), with the recipe's loss (configs/minishop/srlm.yaml: beta
0.1, no SFT term).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from coevo_lib.config import SRLMConfig
from coevo_lib.methods.srlm_judge import (MAX_SCORE, expected_score, judge_agreement, judge_messages, parse_score,
                                          srlm_pairs)
from coevo_lib.records import Episode, read_jsonl, write_jsonl_atomic
from coevo_lib.rollout import HFGenerator, chunk_seed

if TYPE_CHECKING:
    from coevo_lib.loop import Workbench


def srlm_iteration(bench: Workbench, iteration: int) -> None:
    episodes = bench.rollout_stage("target", iteration, samples=bench.config.loop.best_of_n)
    bench.stage(f"it{iteration}-judge-target", lambda: judge_stage(bench, iteration, episodes), iteration=iteration,
                agent="target", kind="judge")
    scores = {row["episode_id"]: row["score"] for row in read_jsonl(judge_path(bench, iteration))}
    bench.pairs_stage("target", iteration, lambda: srlm_pairs(episodes, scores))
    bench.dpo_stage("target", iteration, "target")


def judge_path(bench: Workbench, iteration: int):
    return bench.run_dir.sub("judge", f"it{iteration}-target.jsonl")


def judge_stage(bench: Workbench, iteration: int, episodes: list[Episode]) -> dict[str, Any]:
    """The current agent judges every episode of the iteration; written whole, then summarised."""
    agent = bench.generator(bench.checkpoint("target", iteration - 1))
    judge = Judge(agent, bench.config.srlm, bench.config.rollout.batch_size,
                  lambda chunk: chunk_seed(bench.config.seed, "judge", iteration, chunk))
    rows = judge.score(episodes)
    write_jsonl_atomic(judge_path(bench, iteration), rows)
    scores = {row["episode_id"]: row["score"] for row in rows}
    return {**judge.counts(rows), **judge_agreement(episodes, scores)}


class Judge:
    """The agent as its own judge: sampled "Score: n" replies, and the expected-score fallback."""

    def __init__(self, agent: HFGenerator, config: SRLMConfig, batch_size: int, seed_of):
        rollout = dataclasses.replace(agent.config, max_new_tokens=config.judge_max_new_tokens)
        self.generator = HFGenerator(agent.model, agent.tokenizer, rollout, config.judge_max_prompt_tokens)
        self.config, self.batch_size, self.seed_of = config, batch_size, seed_of
        self.generations = self.tokens_generated = self.forward_passes = 0

    def score(self, episodes: list[Episode]) -> list[dict[str, Any]]:
        rows = [self.prompt_row(ep) for ep in episodes]
        fits = [row for row in rows if row["prompt_tokens"] <= self.config.judge_max_prompt_tokens]
        if self.config.judge != "expected":
            self.sample(fits)
        if self.config.judge != "sample":
            for row in (r for r in fits if r["score"] is None):
                row.update(score=self.expected(row.pop("ids")), source="expected")
        for row in rows:
            row.pop("ids", None)
        return rows

    def prompt_row(self, episode: Episode) -> dict[str, Any]:
        ids = self.generator.prompt_ids(judge_messages(episode, self.config.observation_chars))
        return {"episode_id": episode.episode_id, "task_id": episode.task_id, "reward": episode.reward,
                "prompt_tokens": len(ids), "ids": ids, "replies": [], "sample_scores": [], "score": None,
                "source": None}

    def sample(self, rows: list[dict[str, Any]]) -> None:
        """``judge_samples`` replies per episode in batches; the mean of the parsed scores (SRLM)."""
        samples = self.config.judge_samples
        flat = [(row, row["ids"]) for row in rows for _ in range(samples)]
        for chunk, start in enumerate(range(0, len(flat), self.batch_size)):
            batch = flat[start:start + self.batch_size]
            replies = self.generator.generate([ids for _, ids in batch], self.config.judge_temperature,
                                              self.seed_of(chunk))
            for (row, _), (text, tokens) in zip(batch, replies, strict=True):
                row["replies"].append(text)
                row["sample_scores"].append(parse_score(text))
                self.generations, self.tokens_generated = self.generations + 1, self.tokens_generated + tokens
        for row in rows:
            parsed = [s for s in row["sample_scores"] if s is not None]
            if parsed:
                row.update(score=sum(parsed) / len(parsed), source="sample")

    def expected(self, prompt_ids: list[int]) -> float:
        """sum n p(n) over the six continuations "Score: n" of the judge prompt (one batched forward pass)."""
        tokenizer, model = self.generator.tokenizer, self.generator.model
        continuations = [tokenizer.encode(f"Score: {n}", add_special_tokens=False) for n in range(MAX_SCORE + 1)]
        self.forward_passes += 1
        return expected_score(continuation_logps(model, tokenizer.pad_token_id, prompt_ids, continuations))

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        drawn = [s for row in rows for s in row["sample_scores"]]
        return {"episodes": len(rows), "scored": sum(row["score"] is not None for row in rows),
                "judge_parse_rate": sum(s is not None for s in drawn) / len(drawn) if drawn else None,
                "judge_fallback_share": sum(row["source"] == "expected" for row in rows) / len(rows) if rows else None,
                "judge_too_long": sum(row["prompt_tokens"] > self.config.judge_max_prompt_tokens for row in rows),
                "generations": self.generations, "tokens_generated": self.tokens_generated,
                "judge_forward_passes": self.forward_passes, "judge": self.config.judge}


@torch.no_grad()
def continuation_logps(model, pad_id: int, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
    """log p(continuation | prompt) for each continuation, left padded so every sequence ends together and
    only the last positions' logits are computed."""
    sequences = [prompt_ids + c for c in continuations]
    width, tail = max(map(len, sequences)), max(map(len, continuations))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=model.device)
    mask = (torch.arange(width).unsqueeze(0) >= torch.tensor([[width - len(s)] for s in sequences])).long()
    mask = mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=tail + 1).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position k predicts token k + 1 of the tail
    result = []
    for row, continuation in enumerate(continuations):
        targets = torch.tensor(continuation, device=model.device)
        picked = logps[row, tail - len(continuation):].gather(-1, targets.unsqueeze(-1))
        result.append(float(picked.sum()))
    return result
