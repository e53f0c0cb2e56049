"""The data behind the episode explorer (coevo_lib.explorer): one task of one run, side by side.

For a finished run, an iteration and a training task: the expert's trajectory and each agent's best
failure on that task (the target's failure, the failure agent's hard negative), turn by turn with
action, observation and the environment's reward after the action, and where each leaves the
expert's path (coevo_lib.analysis.hard_negatives.first_divergence). Per-turn rewards are not stored
in episode records (only the final one), so they come from replaying the actions through the run's
environment; a replay whose final reward differs from the recorded one is flagged, never trusted.
Rendering is plain escaped HTML (coevo_lib.escaping), so it is testable without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from coevo_lib.analysis.hard_negatives import first_divergence, instruction_of, normalised_edit_distance, own_turns
from coevo_lib.analysis.loading import load_episodes, read_raw_config, run_info
from coevo_lib.envs import make_env
from coevo_lib.envs.base import TextEnv
from coevo_lib.escaping import html_block, html_text, one_line
from coevo_lib.records import HARD_NEGATIVE_MIN


@dataclass
class Turn:
    step: int  # 1-based
    action: str
    observation: str  # what the environment answered ("" after the last action)
    reward: float | None  # environment reward right after this action (replayed); None when not replayed
    on_expert_path: bool  # every action so far equals the expert's


@dataclass
class EpisodeColumn:
    title: str
    episode: dict[str, Any] | None  # the episode row (load_episodes(..., messages=True)); None: nothing to show
    note: str = ""  # why there is nothing to show, or a replay warning
    turns: list[Turn] = field(default_factory=list)
    divergence: int | None = None  # 0-based step where it leaves the expert's path; None: it never does
    distance: float = 0.0  # normalised edit distance of the action sequences to the expert's


@dataclass
class TaskView:
    run: str
    method: str
    iteration: int
    task_id: str
    instruction: str
    columns: list[EpisodeColumn]


class RunEpisodes:
    """A finished run's expert and training-rollout episodes, indexed for browsing."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.info = run_info(self.run_dir)
        self.episodes = load_episodes([self.run_dir], kinds=("expert", "train"), messages=True)
        self._env: TextEnv | None = None

    @property
    def rollouts(self) -> pd.DataFrame:
        return self.episodes[self.episodes["kind"] == "train"]

    def agents(self) -> list[str]:
        """Agents with training rollouts, the target first (an SFT run has none)."""
        return sorted(set(self.rollouts["agent"]), key=lambda agent: (agent != "target", agent))

    def iterations(self, agent: str) -> list[int]:
        return sorted(int(i) for i in set(self.rollouts.loc[self.rollouts["agent"] == agent, "iteration"]))

    def tasks(self, agent: str, iteration: int) -> list[tuple[str, float]]:
        """(task, best failure reward) where ``agent`` failed at ``iteration``, closest to success first."""
        failures = self.failures(agent, iteration)
        best = failures.groupby("task_id")["reward"].max().reset_index()
        best = best.sort_values(["reward", "task_id"], ascending=[False, True])
        return [(row.task_id, float(row.reward)) for row in best.itertuples()]

    def failures(self, agent: str, iteration: int) -> pd.DataFrame:
        rollouts = self.rollouts
        chosen = (rollouts["agent"] == agent) & (rollouts["iteration"] == iteration)
        return rollouts[chosen & ~rollouts["success"].astype(bool)]

    def expert(self, task_id: str) -> dict[str, Any] | None:
        experts = self.episodes[(self.episodes["kind"] == "expert") & (self.episodes["task_id"] == task_id)]
        return experts.iloc[0].to_dict() if len(experts) else None

    def best_failure(self, agent: str, iteration: int, task_id: str) -> dict[str, Any] | None:
        """The agent's highest-reward failure on the task (ties: the lowest episode id, a stable choice)."""
        failures = self.failures(agent, iteration)
        failures = failures[failures["task_id"] == task_id].sort_values(["reward", "episode_id"],
                                                                         ascending=[False, True])
        return failures.iloc[0].to_dict() if len(failures) else None

    def env(self) -> TextEnv:
        """The run's environment (from its saved config), built on first use for replays."""
        if self._env is None:
            env = read_raw_config(self.run_dir)["env"]
            self._env = make_env(env["name"], **env.get("kwargs", {}))
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def task_view(self, iteration: int, task_id: str, replay: bool = True) -> TaskView:
        """Expert, then every agent's best failure on ``task_id`` at ``iteration``."""
        expert = self.expert(task_id)
        env = self.env() if replay else None
        columns = [expert_column(expert, env)]
        for agent in self.agents():
            columns.append(failure_column(agent, self.best_failure(agent, iteration, task_id), expert, env,
                                          self.info["method"]))
        anchor = expert or next((c.episode for c in columns if c.episode is not None), None)
        instruction = instruction_of(anchor["messages"], anchor["steps"]) if anchor else ""
        return TaskView(self.info["run"], self.info["method"], iteration, task_id, instruction, columns)


def column_title(agent: str, method: str, episode: dict[str, Any] | None) -> str:
    kind = "hard negative" if episode is not None and HARD_NEGATIVE_MIN <= episode["reward"] < 1 else "failure"
    role = {"target": "target", "failure": "failure agent", "positive": "positive agent"}.get(agent, agent)
    return f"{method} {role}: best {kind}"


def expert_column(expert: dict[str, Any] | None, env: TextEnv | None) -> EpisodeColumn:
    if expert is None:
        return EpisodeColumn("expert", None, "no expert trajectory for this task (dropped: it did not succeed)")
    return episode_column("expert", expert, expert, env)


def failure_column(agent: str, failure: dict[str, Any] | None, expert: dict[str, Any] | None,
                   env: TextEnv | None, method: str) -> EpisodeColumn:
    title = column_title(agent, method, failure)
    if failure is None:
        return EpisodeColumn(title, None, f"the {agent} agent did not fail on this task at this iteration")
    return episode_column(title, failure, expert, env)


def episode_column(title: str, episode: dict[str, Any], expert: dict[str, Any] | None,
                   env: TextEnv | None) -> EpisodeColumn:
    actions = list(episode["actions"])
    expert_actions = list(expert["actions"]) if expert is not None else None
    divergence = first_divergence(actions, expert_actions) if expert_actions is not None else None
    rewards, note = replayed_rewards(env, episode) if env is not None else ([None] * len(actions), "")
    turns = [Turn(step + 1, action, observation, reward,
                  expert_actions is not None and (divergence is None or step < divergence))
             for step, (action, observation, reward) in enumerate(zip(actions, observations(episode), rewards))]
    distance = normalised_edit_distance(actions, expert_actions) if expert_actions is not None else float("nan")
    return EpisodeColumn(title, episode, note, turns, divergence, distance)


def observations(episode: dict[str, Any]) -> list[str]:
    """The environment's answer to each of the episode's own actions ("" after the last one)."""
    messages = episode["messages"]
    turns = own_turns(messages, len(episode["actions"]))
    return [messages[i + 1]["content"] if i + 1 < len(messages) else "" for i in turns]


def replayed_rewards(env: TextEnv, episode: dict[str, Any]) -> tuple[list[float | None], str]:
    """The reward after each action, from replaying the actions on the task; a note when the replay disagrees."""
    env.reset(episode["task_id"])
    rewards, done = [], False
    for action in episode["actions"]:
        if done:  # the recorded episode cannot continue past the end; a replay that ends early disagrees
            rewards.append(None)
            continue
        _, reward, done, _ = env.step(action)
        rewards.append(float(reward))
    if rewards and rewards[-1] is not None and abs(rewards[-1] - float(episode["reward"])) < 1e-9:
        return rewards, ""
    return [None] * len(rewards), (f"replay ends at reward {rewards[-1] if rewards else None}, the record says "
                                   f"{episode['reward']:.2f}: per-turn rewards not shown")


# -- rendering (plain HTML; every piece of environment text goes through html_text) -------------

ON_PATH, OFF_PATH = "#2e7d32", "#c62828"


def task_view_html(view: TaskView, max_observation: int = 400) -> str:
    """The task's columns side by side, one numbered turn per row, inside a block MathJax leaves alone."""
    header = (f"<div><b>{html_text(view.run)}</b> ({html_text(view.method)}), iteration {view.iteration}, "
              f"task <code>{html_text(view.task_id)}</code></div>"
              f"<blockquote style='margin:4px 0'>{html_text(one_line(view.instruction, 300))}</blockquote>")
    columns = "".join(column_html(column, max_observation) for column in view.columns)
    grid = f"<div style='display:flex;gap:10px;align-items:flex-start'>{columns}</div>"
    return html_block(header + grid, style="font-size:12px;line-height:1.35")


def column_summary(column: EpisodeColumn) -> str:
    episode = column.episode
    parts = [f"reward {episode['reward']:.2f}", f"{episode['steps']} steps", html_text(episode["end_reason"])]
    if column.title != "expert":
        where = "" if column.divergence is None else f" at step {column.divergence + 1}"
        parts += [f"{'never leaves' if not where else 'leaves'} the expert path{where}",
                  f"edit distance {column.distance:.2f}"]
    return " · ".join(parts)


def column_html(column: EpisodeColumn, max_observation: int) -> str:
    style = "flex:1;min-width:0;border:1px solid #bbb;border-radius:4px;padding:6px"
    title = f"<div style='font-weight:bold'>{html_text(column.title)}</div>"
    if column.episode is None:
        return f"<div style='{style}'>{title}<div><i>{html_text(column.note)}</i></div></div>"
    note = f"<div style='color:{OFF_PATH}'>{html_text(column.note)}</div>" if column.note else ""
    turns = "".join(turn_html(turn, column.divergence, max_observation) for turn in column.turns)
    return (f"<div style='{style}'>{title}<div style='color:#555'>{column_summary(column)}</div>{note}"
            f"<ol style='padding-left:22px;margin:4px 0'>{turns}</ol></div>")


def turn_html(turn: Turn, divergence: int | None, max_observation: int) -> str:
    colour = ON_PATH if turn.on_expert_path else OFF_PATH
    leaves = " <b>← leaves the expert path</b>" if divergence is not None and turn.step == divergence + 1 else ""
    reward = "" if turn.reward is None else f" <span style='color:#555'>r={turn.reward:.2f}</span>"
    observation = html_text(one_line(turn.observation, max_observation)) if turn.observation else "<i>(episode ends)</i>"
    return (f"<li style='border-left:3px solid {colour};padding-left:4px;margin-bottom:3px'>"
            f"<code style='word-break:break-all'>{html_text(turn.action)}</code>{reward}{leaves}<br>{observation}</li>")
