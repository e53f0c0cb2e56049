"""The episode explorer's data: a run directory with real minishop episodes (expert and replayed failures)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coevo_lib.analysis.episode_view import RunEpisodes, task_view_html
from coevo_lib.analysis.hard_negatives import normalised_edit_distance
from coevo_lib.config import load_config
from coevo_lib.envs import make_env
from coevo_lib.records import write_jsonl_atomic
from coevo_lib.rollout import expert_episode, replay_episode
from coevo_lib.runs import init_run_dir

TASKS = ["train-0000", "train-0001"]


def replayed(env, config, task, actions, agent, sample):
    episode = replay_episode(env, task, "train", config.prompt, ["go"] * len(actions), actions, agent)
    return dataclasses.replace(episode, iteration=1, episode_id=f"{agent}/it1/{task}/{sample}", end_reason="done")


def write_run(tmp_path, method_recipe="configs/minishop/coevo.yaml"):
    """A finished one-iteration run: experts for two tasks, target and failure-agent rollouts on them."""
    config = load_config(method_recipe, {"loop.iterations": 1})
    run = init_run_dir(config, tmp_path / "coevo-seed0")
    env = make_env(config.env.name, **config.env.kwargs)
    experts = [expert_episode(env, task, "train", config.prompt) for task in TASKS]
    rollouts = {"target": [], "failure": []}
    for expert in experts:
        a = expert.actions  # search, click item, click size, click colour, buy
        rollouts["target"] += [replayed(env, config, expert.task_id, a[:2] + a[-1:], "target", 0),  # no options
                               replayed(env, config, expert.task_id, [a[0], a[-1]], "target", 1)]  # invalid buy
        rollouts["failure"] += [replayed(env, config, expert.task_id, a[:3] + a[-1:], "failure", 0)]  # no colour
    rollouts["failure"][1] = dataclasses.replace(expert_episode(env, TASKS[1], "train", config.prompt),
                                                 agent="failure", iteration=1, episode_id="failure/it1/ok")
    env.close()
    write_jsonl_atomic(run.episodes("expert"), experts)
    for agent, episodes in rollouts.items():
        write_jsonl_atomic(run.episodes(f"it1-train-{agent}"), episodes)
    run.mark_done("it1-eval")
    return run.path, experts, rollouts


@pytest.fixture()
def coevo_run(tmp_path):
    return write_run(tmp_path)


def test_agents_iterations_and_tasks_ranked_by_best_failure(coevo_run):
    path, _, rollouts = coevo_run
    view = RunEpisodes(path)
    assert view.agents() == ["target", "failure"]
    assert view.iterations("failure") == [1]
    # target failed both tasks; best failure per task is the 0.6 one (no options chosen)
    assert view.tasks("target", 1) == [("train-0000", 0.6), ("train-0001", 0.6)]
    # the failure agent succeeded on train-0001: only train-0000 is listed
    assert [task for task, _ in view.tasks("failure", 1)] == ["train-0000"]
    assert view.tasks("failure", 1)[0][1] == rollouts["failure"][0].reward > 0.6


def test_task_view_columns_turns_and_divergence(coevo_run):
    path, experts, rollouts = coevo_run
    view = RunEpisodes(path).task_view(1, "train-0000")
    expert, target, failure = view.columns
    assert [c.title for c in view.columns] == ["expert", "coevo target: best hard negative",
                                               "coevo failure agent: best hard negative"]
    assert view.instruction.startswith("Instruction: ")
    assert expert.divergence is None and all(t.on_expert_path for t in expert.turns)
    assert [t.reward for t in expert.turns][-1] == 1.0 and expert.turns[-1].observation == ""
    # the target's best failure skips both options: it leaves the expert path at step 3 (index 2)
    assert target.episode["episode_id"] == "target/it1/train-0000/0"
    assert target.divergence == 2
    assert [t.on_expert_path for t in target.turns] == [True, True, False]
    assert [t.reward for t in target.turns] == [0.0, 0.0, 0.6]
    assert target.distance == normalised_edit_distance(target.episode["actions"], experts[0].actions)
    assert failure.divergence == 3 and failure.turns[-1].reward == rollouts["failure"][0].reward
    recorded = rollouts["target"][0].messages
    assert target.turns[0].observation == recorded[-4]["content"]  # the answer to the search


def test_agent_without_failure_and_replay_mismatch(tmp_path):
    path, _, rollouts = write_run(tmp_path)
    view = RunEpisodes(path).task_view(1, "train-0001")
    assert view.columns[2].episode is None and "did not fail" in view.columns[2].note
    # a record whose reward no replay reproduces: per-turn rewards are withheld, with a note
    episodes_file = path / "episodes" / "it1-train-target.jsonl"
    rows = [json.loads(line) for line in episodes_file.read_text().splitlines()]
    rows[0]["reward"] = 0.7
    episodes_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tampered = RunEpisodes(path).task_view(1, "train-0000").columns[1]
    assert tampered.episode["reward"] == 0.7
    assert all(t.reward is None for t in tampered.turns) and "replay ends at reward 0.6" in tampered.note


def test_run_without_rollouts_has_no_agents(tmp_path):
    config = load_config("configs/minishop/sft.yaml")
    run = init_run_dir(config, tmp_path / "sft-seed0")
    run.mark_done("it0-eval")
    assert RunEpisodes(run.path).agents() == []


def test_task_view_html_shows_every_column(coevo_run):
    path, _, _ = coevo_run
    html = task_view_html(RunEpisodes(path).task_view(1, "train-0000"))
    assert html.count("<ol") == 3 and "leaves the expert path" in html
    assert "click[buy now]" in html and "r=0.60" in html and "[Search]" in html


def test_explorer_widget_follows_the_pickers(coevo_run):
    pytest.importorskip("ipywidgets")
    from coevo_lib.explorer import Explorer

    path, _, _ = coevo_run
    explorer = Explorer(path.parent)
    assert list(explorer.runs) == ["coevo-seed0"]
    assert explorer.agent.value == "target" and explorer.task.value == "train-0000"
    explorer.agent.value = "failure"
    assert explorer.task.options == (("train-0000 (best failure 0.80)", "train-0000"),)
    assert "coevo failure agent" in explorer.view.value
