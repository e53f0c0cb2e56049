"""ReAct prompting as chat messages, tolerant action parsing, and conversation tokenisation.

A trajectory is a list of chat messages: system, user (first observation with the instruction),
then assistant ("Thought: ...\\nAction: ...") / user (observation) turns. The boundaries between
messages are stored, never recovered by slicing strings.
"""

from __future__ import annotations

import re

from coevo_lib.config import PromptConfig
from coevo_lib.envs.base import TaskSpec

REACT_FORMAT = (
    "Answer every turn with one line 'Thought: <short reasoning>' and one line 'Action: <action>'."
)
PLAIN_FORMAT = "Answer every turn with one line 'Action: <action>'."

_ACTION_RE = re.compile(r"action\s*:\s*", re.IGNORECASE)
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def system_message(spec: TaskSpec, config: PromptConfig) -> dict[str, str]:
    fmt = REACT_FORMAT if config.react else PLAIN_FORMAT
    return {"role": "system", "content": f"{spec.system_prompt}\n{fmt}"}


ETO_ACKNOWLEDGEMENT = "OK"
ETO_EXAMPLE_INTRO = "Here is an example of a task solved step by step."
ETO_TASK_INTRO = "Now it is your turn. Here is your task."


def initial_messages(spec: TaskSpec, first_observation: str, config: PromptConfig) -> list[dict[str, str]]:
    """The prompt of an episode: the messages before the agent's first turn (``prompt.style``)."""
    if config.style == "eto":
        return eto_initial_messages(spec, first_observation, config)
    messages = [system_message(spec, config)] if config.system_prompt else []
    if config.few_shot:
        messages.extend(spec.few_shot)
    messages.append({"role": "user", "content": first_observation})
    return messages


def eto_initial_messages(spec: TaskSpec, first_observation: str, config: PromptConfig) -> list[dict[str, str]]:
    """ETO's prompt shape (Song et al. 2024, as its eval_agent builds it), in our words: the instruction as the
    first user turn, acknowledged by the assistant; with ``few_shot``, one training gold trajectory as
    conversation turns; then the task. Models without a system role (ETO's Llama-2) read it the same way."""
    messages = [{"role": "user", "content": system_message(spec, config)["content"]},
                {"role": "assistant", "content": ETO_ACKNOWLEDGEMENT}]
    example = spec.few_shot if config.few_shot else []
    if example:
        messages.append({"role": "user", "content": f"{ETO_EXAMPLE_INTRO}\n{example[0]['content']}"})
        messages.extend(example[1:])
    messages.append({"role": "user", "content": f"{ETO_TASK_INTRO}\n{first_observation}"})
    return messages


def format_turn(thought: str, action: str, react: bool = True) -> str:
    """The assistant text of one turn, in the format agents are trained to produce."""
    return f"Thought: {thought}\nAction: {action}" if react else f"Action: {action}"


def parse_action(text: str) -> str:
    """The action in a model reply: text after the last 'Action:' (any case), fences stripped.

    With no 'Action:' marker the last non-empty line is used, so a model that drops the marker
    still acts (and the environment answers an invalid action with an observation).
    """
    matches = list(_ACTION_RE.finditer(text))
    if matches:
        action = text[matches[-1].end():]
    else:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        action = lines[-1] if lines else ""
    return _FENCE_RE.sub("", action.strip()).strip()


def parse_thought(text: str) -> str:
    """The reasoning part of a reply (everything before the last 'Action:'), 'Thought:' removed."""
    matches = list(_ACTION_RE.finditer(text))
    head = text[: matches[-1].start()] if matches else ""
    return re.sub(r"^\s*thought\s*:\s*", "", head.strip(), flags=re.IGNORECASE)


def expert_messages(
    spec: TaskSpec, first_observation: str, steps: list[tuple[str, str, str]], config: PromptConfig
) -> list[dict[str, str]]:
    """Chat messages of an expert trajectory from (thought, action, observation-after) triples."""
    messages = initial_messages(spec, first_observation, config)
    for thought, action, observation in steps:
        messages.append({"role": "assistant", "content": format_turn(thought, action, config.react)})
        messages.append({"role": "user", "content": observation})
    # The observation after the last action is not something the agent answers; drop it.
    return messages[:-1] if messages[-1]["role"] == "user" and steps else messages


def render_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# A message may carry ``"loss": False``: an assistant turn kept as context but not trained on (Agent-R's
# revision trajectories keep the bad prefix to recover from, never to imitate; docs/baselines.md).
LOSS_KEY = "loss"


def trains_on(message: dict, index: int, prompt_messages: int) -> bool:
    return message["role"] == "assistant" and index >= prompt_messages and message.get(LOSS_KEY, True) is not False


def tokenize_conversation(
    tokenizer, messages: list[dict[str, str]], prompt_messages: int = 0
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a mask that is 1 exactly on the agent's assistant tokens.

    Assistant messages among the first ``prompt_messages`` (a worked example, ETO's "OK") are prompt, not
    the agent's: they stay 0, so SFT never trains on the in-context example. So do messages flagged
    ``"loss": False``.

    Works for any chat template (no {% generation %} markers needed): each assistant span is the
    difference between the rendering up to its generation prompt and the rendering including it.
    The end-of-turn token belongs to the span, so the model learns when to stop.
    """
    ids = render_ids(tokenizer, messages)
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if not trains_on(message, index, prompt_messages):
            continue
        start = len(render_ids(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(render_ids(tokenizer, messages[: index + 1]))
        check_prefix(ids, render_ids(tokenizer, messages[: index + 1]), index)
        mask[start:end] = [1] * (end - start)
    return ids, mask


def check_prefix(full_ids: list[int], partial_ids: list[int], index: int) -> None:
    # Masks are positions in the full rendering, so a template that re-renders history
    # differently (e.g. strips earlier reasoning) would silently mis-mask: refuse instead.
    if full_ids[: len(partial_ids)] != partial_ids:
        raise ValueError(
            f"chat template is not prefix-stable at message {index}: rendering a conversation prefix does not "
            "give a prefix of the full rendering, so assistant tokens cannot be located"
        )
