"""Agent-R's revision trajectories (BASELINES.md 1.4-1.5), model-free: the step-verifier prompt and its
parsing, the walk that finds a bad path's first error, and the splice

    prompt + bad steps 1..t' (not trained on) + reflection turn ("Action: wait" -> "ok.") + the good
    path's continuation after their shared prefix (capped at t').

The spliced conversation is training text, never an episode that happened: after the splice its
observations come from the good branch, whose states never saw the bad actions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from coevo_lib.envs.base import NOOP_ACTION, NOOP_OBSERVATION
from coevo_lib.methods.agent_r_tree import Node
from coevo_lib.prompting import LOSS_KEY, format_turn

# Ten reflection thoughts in the spirit of Agent-R's Table 5 (the first two are its examples; the
# rest are ours): one is drawn per revision trajectory.
REFLECTIONS = (
    "I realize my approach was flawed. I need to revise it.",
    "I made an error. I must determine how to correct it.",
    "My previous actions led me away from the goal. I should reconsider them.",
    "This is not going well; I took a wrong turn earlier and need to fix it.",
    "I notice a mistake in what I did. Let me correct my course.",
    "My earlier choice was wrong. I should go back to a better plan.",
    "I see that my actions do not match the task. I need to change them.",
    "Something went wrong in my last steps. I will reconsider and try again.",
    "I was heading in the wrong direction. I must revise my plan.",
    "I recognize my mistake. Let me think again about what the task needs.",
)

VERIFIER_PROMPT = (
    "You verify the log of an agent acting in an environment. Each step of the log is an action (\"Action: "
    "...\") and what the environment answered (\"Observation: ...\").\n"
    "A good action helps a lot to solve the task. A bad action harms the attempt a lot. An uncertain action "
    "is neither, or cannot be judged from what is shown.\n"
    "Task: {task}\n"
    "Steps so far:\n{history}\n"
    "Current step:\n{current}\n"
    "Judge only the current step. Give your reasons first, then end with one line: \"Judgement: Good\", "
    "\"Judgement: Bad\" or \"Judgement: Uncertain\"."
)
_MARKER = re.compile(r"judge?ment\s*:", re.IGNORECASE)  # the code spells "Judgement", the paper "Judgment"
_VERDICT = re.compile(r"\W*(good|bad|uncertain)\b", re.IGNORECASE)


def step_text(node: Node) -> str:
    return f"Action: {node.action}\nObservation: {node.observation}"


def verifier_messages(task: str, path: list[Node], step: int) -> list[dict[str, str]]:
    """The prompt judging step ``step`` (1-based) of ``path``, with the steps before it as history."""
    history = "\n".join(step_text(node) for node in path[: step - 1]) or "(none)"
    content = VERIFIER_PROMPT.format(task=task, history=history, current=step_text(path[step - 1]))
    return [{"role": "user", "content": content}]


@dataclass
class Verdict:
    label: str  # good | uncertain | bad
    parsed: bool  # a marker followed by one of the three words


def parse_verdict(reply: str) -> Verdict:
    """Agent-R's rule: the text after the last marker (the whole reply without one); "good" or "uncertain"
    in it keeps the step, anything else (an unparseable reply included) counts as bad."""
    markers = list(_MARKER.finditer(reply))
    tail = reply[markers[-1].end():] if markers else reply
    lowered = tail.lower()
    label = "good" if "good" in lowered else "uncertain" if "uncertain" in lowered else "bad"
    return Verdict(label, bool(markers) and _VERDICT.match(tail) is not None)


@dataclass
class ErrorSearch:
    """The verifier's walk over one bad path: the blamed step (None: no step blamed) and its replies."""

    path: list[Node]
    error_step: int | None = None
    verdicts: list[Verdict] | None = None


def find_first_errors(walked: list[tuple[str, list[Node]]],
                      judge: Callable[[list[list[dict[str, str]]]], list[str]]) -> list[ErrorSearch]:
    """Walk every (task, bad path) step by step, one verifier call per step, all paths of a step in one
    batch; a path stops at its first step not judged good or uncertain."""
    walks = [ErrorSearch(path, verdicts=[]) for _, path in walked]
    tasks = [task for task, _ in walked]
    step = 1
    while active := [i for i, w in enumerate(walks) if w.error_step is None and step <= len(w.path)]:
        replies = judge([verifier_messages(tasks[i], walks[i].path, step) for i in active])
        for i, reply in zip(active, replies, strict=True):
            verdict = parse_verdict(reply)
            walks[i].verdicts.append(verdict)
            if verdict.label == "bad":
                walks[i].error_step = step
        step += 1
    return walks


def shared_prefix(bad: list[Node], good: list[Node]) -> int:
    """Leading steps of the two paths with equal replies (siblings are deduplicated by text, so these are
    the same nodes: the fork is after them)."""
    count = 0
    for b, g in zip(bad, good):
        if b.response != g.response:
            break
        count += 1
    return count


def turn(role: str, content: str, loss: bool = True) -> dict:
    message = {"role": role, "content": content}
    if role == "assistant" and not loss:
        message[LOSS_KEY] = False
    return message


def revision_messages(prompt: list[dict[str, str]], bad: list[Node], good: list[Node], error_step: int | None,
                      reflection: str, react: bool = True) -> list[dict]:
    """The spliced conversation. ``error_step`` None (no step blamed) keeps the whole bad path."""
    cut = len(bad) if error_step is None else error_step
    resume = min(shared_prefix(bad, good), cut)  # the good path's steps the revision skips
    messages = list(prompt)
    for node in bad[:cut]:
        messages += [turn("assistant", node.response, loss=False), turn("user", node.observation)]
    messages += [turn("assistant", format_turn(reflection, NOOP_ACTION, react)), turn("user", NOOP_OBSERVATION)]
    for node in good[resume:]:
        messages += [turn("assistant", node.response), turn("user", node.observation)]
    return messages[:-1]  # the last observation is not something the agent answers


def path_messages(prompt: list[dict[str, str]], path: list[Node]) -> list[dict]:
    """A good path as a conversation, every assistant turn trained on."""
    messages = list(prompt)
    for node in path:
        messages += [turn("assistant", node.response), turn("user", node.observation)]
    return messages[:-1]
