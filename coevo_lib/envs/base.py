"""The environment protocol every coevo environment follows.

An episode is: ``reset(task_id)`` gives the first observation (the instruction included), then
``step(action)`` until ``done``. Rewards are final rewards in [0, 1]; ``info["success"]`` is true
iff the final reward is exactly 1. Any string is a legal call to ``step``: a malformed action is
answered with an observation, never an exception, so that a model's output can go straight in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

StepResult = tuple[str, float, bool, dict[str, Any]]


# Agent-R's reflection turn ("Thought: <I made a mistake...>\nAction: wait") needs an action that changes nothing:
# environments that offer it answer NOOP_OBSERVATION and count it as a step (docs/baselines.md).
NOOP_ACTION = "wait"
NOOP_OBSERVATION = "ok."


def is_noop(action: str) -> bool:
    return action.strip().lower() == NOOP_ACTION


class EnvError(ValueError):
    """Raised for misuse of an environment by the caller (unknown split or task id), never for agent actions."""


@dataclass
class TaskSpec:
    """What the prompt builder needs to know about an environment besides the observations."""

    name: str
    system_prompt: str
    # A worked example shown to real (non-tiny) models; the tiny model learns the format from SFT.
    few_shot: list[dict[str, str]] = field(default_factory=list)


EpisodeT = TypeVar("EpisodeT")


def live_episode(episode: EpisodeT | None) -> EpisodeT:
    """The episode in progress; stepping without one is caller misuse (EnvError), not a bad action."""
    if episode is None:
        raise EnvError("call reset(task_id) before step()")
    if episode.done:
        raise EnvError("the episode is over; call reset(task_id) to start another")
    return episode


class TextEnv(ABC):
    """Base class of all coevo environments.

    Subclasses implement the abstract methods; ``expert_thoughts`` has a templated default because
    the benchmarks ship gold actions without the ReAct "Thought" text.
    """

    name: str = "env"
    max_steps: int = 15
    # How the final reward is computed, in one line (recorded in run directories by protocol()).
    reward_rule: str = "final reward in [0, 1]"
    # The no-op action this environment answers with NOOP_OBSERVATION (one step), or None without one.
    noop_action: str | None = NOOP_ACTION

    @abstractmethod
    def splits(self) -> list[str]:
        """Names of the splits this environment offers (e.g. train, test_seen, test_unseen)."""

    @abstractmethod
    def task_ids(self, split: str) -> list[str]:
        """Stable, ordered task ids of ``split``; raises EnvError for an unknown split."""

    @abstractmethod
    def reset(self, task_id: str) -> str:
        """Start an episode on ``task_id``; return the first observation with the instruction in it."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply ``action``; return (observation, reward, done, info). Never raises on a bad action."""

    @abstractmethod
    def expert_actions(self, task_id: str) -> list[str]:
        """Action strings of an expert trajectory that solves ``task_id`` (final reward 1)."""

    @abstractmethod
    def task_spec(self) -> TaskSpec:
        """System prompt and format hints for agents acting in this environment."""

    def expert_thoughts(self, task_id: str) -> list[str]:
        """One short "Thought" per expert action; the default is a template over the action."""
        return [f"I should {action}." for action in self.expert_actions(task_id)]

    def vocabulary_text(self) -> list[str]:
        """Text naming the environment's objects (catalogue items, tables...), for training a tokenizer.

        The default is none: the tiny model's tokenizer then learns only from training trajectories.
        """
        return []

    def split_of(self, task_id: str) -> str:
        """The split a task id belongs to."""
        for split in self.splits():
            if task_id in set(self.task_ids(split)):
                return split
        raise EnvError(f"unknown task id {task_id!r} for environment {self.name!r}")

    def protocol(self) -> dict[str, Any]:
        """The benchmark protocol this environment applies: split sizes, step limit, reward rule.

        Written to ``<run>/protocol.json`` so a run says which rules produced its numbers."""
        return {"env": self.name, "split_sizes": {split: len(self.task_ids(split)) for split in self.splits()},
                "max_steps": self.max_steps, "reward_rule": self.reward_rule, "noop_action": self.noop_action,
                "noop_observation": NOOP_OBSERVATION if self.noop_action else None}

    def close(self) -> None:
        """Release external resources (JVMs, database connections). Safe to call twice."""
