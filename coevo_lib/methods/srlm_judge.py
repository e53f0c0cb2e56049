"""SRLM's self-judging for agents (Yuan et al. 2024; BASELINES.md 2.2), model-free parts.

The agent judges each whole episode with SRLM's additive 5-point rubric (our wording of its Figure 2,
"question" -> "task", "response" -> "agent's interaction log") and ends with "Score: n". The judge sees
the task and the Thought / Action / Observation transcript with any reward text removed: left in, SRLM
would become Best-of-N. The environment's reward never enters a pair; it is kept only to measure how
the judge agrees with it.
"""

from __future__ import annotations

import math
import re
from statistics import mean

from coevo_lib.pairs import by_task, make_pair
from coevo_lib.records import Episode, Pair

JUDGE_PROMPT = (
    "Review the task and the agent's interaction log below and score the log with the additive 5-point "
    "system described here. Points accumulate for each criterion met:\n"
    "- Add 1 point if the agent's actions are relevant to the task and give some progress, even if incomplete.\n"
    "- Add another point if the agent accomplishes a substantial part of the task without completing it.\n"
    "- Award a third point if the agent completes the basic elements of the task in a useful way.\n"
    "- Grant a fourth point if the agent acts clearly and directly toward the goal, completes the task "
    "comprehensively and is well organized.\n"
    "- Bestow a fifth point if the interaction is impeccable: every step purposeful, no extraneous actions, "
    "an expert result that matches the task exactly.\n"
    "Task: {task}\n"
    "Interaction log:\n{log}\n"
    "After examining the task and the log, briefly justify your total score in up to 100 words, then "
    "conclude with the score in the format: \"Score: <total points>\"."
)
SCORE_RE = re.compile(r"Score:\s*([0-9.]+)")
MAX_SCORE = 5
# What environments say about the reward in observations: minishop's "Your reward is 0.87.", InterCode's
# "Reward: 0.50", a page's "Your score is 87". coevo's episode records already end before the last
# observation (where minishop and InterCode state it), so this guards any observation that shows one.
REWARD_TEXT = re.compile(r"\s*\b(your reward is|reward:|your score is|score:)\s*-?[0-9.]*[0-9]\.?", re.IGNORECASE)


def strip_reward_text(text: str) -> str:
    return REWARD_TEXT.sub("", text).strip()


def task_text(episode: Episode) -> str:
    """The last prompt message: the first observation, with the instruction in it."""
    prompt_end = episode.prompt_messages or next(i for i, m in enumerate(episode.messages) if m["role"] == "assistant")
    return strip_reward_text(episode.messages[prompt_end - 1]["content"])


def transcript(episode: Episode, observation_chars: int) -> str:
    """The agent's turns as written and each observation (reward text removed, cut to a fixed budget)."""
    prompt_end = episode.prompt_messages or next(i for i, m in enumerate(episode.messages) if m["role"] == "assistant")
    lines = []
    for message in episode.messages[prompt_end:]:
        if message["role"] == "assistant":
            lines.append(message["content"].strip())
        else:
            lines.append(f"Observation: {strip_reward_text(message['content'])[:observation_chars].strip()}")
    return "\n".join(lines)


def judge_messages(episode: Episode, observation_chars: int) -> list[dict[str, str]]:
    content = JUDGE_PROMPT.format(task=task_text(episode), log=transcript(episode, observation_chars))
    return [{"role": "user", "content": content}]


def parse_score(reply: str) -> float | None:
    """The last "Score: n" with 0 <= n <= 5; None when there is none (the sample is dropped)."""
    found = SCORE_RE.findall(reply)
    if not found:
        return None
    try:
        score = float(found[-1].rstrip("."))
    except ValueError:
        return None
    return score if 0 <= score <= MAX_SCORE else None


def mean_score(replies: list[str]) -> float | None:
    """SRLM averages its judge samples; unparseable ones are dropped, none parsed leaves the episode unscored."""
    scores = [s for s in map(parse_score, replies) if s is not None]
    return mean(scores) if scores else None


def expected_score(logps: list[float]) -> float:
    """The fallback for a judge that cannot write "Score: n": sum n p(n), with p the model's probabilities
    of the continuations "Score: 0" .. "Score: 5" renormalised over the six."""
    top = max(logps)
    weights = [math.exp(lp - top) for lp in logps]
    return sum(n * w for n, w in enumerate(weights)) / sum(weights)


def srlm_pairs(episodes: list[Episode], scores: dict[str, float | None]) -> list[Pair]:
    """Per task: chosen = best mean judge score, rejected = worst; ties and tasks with < 2 scored episodes
    give no pair (at most one pair per task). The first episode (by sample order) wins equal scores."""
    pairs = []
    for task_id, group in by_task(episodes).items():
        scored = [ep for ep in group if scores.get(ep.episode_id) is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda ep: scores[ep.episode_id])
        worst = min(scored, key=lambda ep: scores[ep.episode_id])
        if scores[best.episode_id] > scores[worst.episode_id]:
            pairs.append(make_pair("srlm", best, worst))
    return pairs


# -- how the judge agrees with the environment ----------------------------------------------------


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation; None when either side is constant (undefined)."""
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def judge_agreement(episodes: list[Episode], scores: dict[str, float | None]) -> dict[str, float | int | None]:
    """Per task with >= 2 scored episodes: Spearman(judge, env reward) and whether the judge's best episode
    has the best env reward there; the share of SRLM's pairs whose chosen side has the higher env reward."""
    correlations, top_hits = [], []
    for group in by_task(episodes).values():
        scored = [ep for ep in group if scores.get(ep.episode_id) is not None]
        if len(scored) < 2:
            continue
        rho = spearman([scores[ep.episode_id] for ep in scored], [ep.reward for ep in scored])
        if rho is not None:
            correlations.append(rho)
        best = max(scored, key=lambda ep: scores[ep.episode_id])
        top_hits.append(best.reward == max(ep.reward for ep in scored))
    pairs = srlm_pairs(episodes, scores)
    return {"judge_env_spearman": mean(correlations) if correlations else None,
            "judge_env_spearman_tasks": len(correlations),
            "judge_best_is_env_best": float(mean(top_hits)) if top_hits else None,
            "judge_tasks": len(top_hits),
            "pairs_env_agree": float(mean(p.chosen_reward > p.rejected_reward for p in pairs)) if pairs else None,
            "pairs_env_tie": float(mean(p.chosen_reward == p.rejected_reward for p in pairs)) if pairs else None}
