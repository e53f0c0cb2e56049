"""ScienceWorld: splits, gold replays of every task, bad actions, the step limit, JVM recovery.

Needs the scienceworld package and Java >= 11; the module is skipped without them. The variation
lists are built once into a temporary cache (one JVM, a few seconds). Gold replays (the first variation
of a task in a split): each of ETO's 24 default tasks in every split; the 6 tasks excluded by default
(the slowest: Mendelian genetics generates its gold path in 4 s) in one split each, rotating (task k in
split k mod 3), so every split still sees them. COEVO_SCIENCEWORLD_FULL_GOLD=1 replays all 30 x 3.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("scienceworld", reason="the scienceworld package is not installed (pip install -e '.[envs]')")

from coevo_lib.envs import EnvError, make_env  # noqa: E402
from coevo_lib.envs import scienceworld_splits as sws  # noqa: E402
from coevo_lib.envs.scienceworld import (  # noqa: E402
    JavaMissingError, check_java, java_major_version, same_observation, thought_for,
)

if (java_major_version() or 0) < 11:
    pytest.skip("ScienceWorld needs Java >= 11 (apt-get install openjdk-17-jre-headless)", allow_module_level=True)

FULL_GOLD = os.environ.get("COEVO_SCIENCEWORLD_FULL_GOLD") == "1"
# ETO's test_indices.json: per task, min(10, test variations), 211 in all.
ETO_UNSEEN_COUNTS = {"boil": 9, "melt": 9, "freeze": 9, "change-the-state-of-matter-of": 9, "use-thermometer": 10,
                     "measure-melting-point-known-substance": 10, "power-component": 5,
                     "power-component-renewable-vs-nonrenewable-energy": 5, "test-conductivity": 10,
                     "test-conductivity-of-unknown-substances": 10, "find-living-thing": 10,
                     "find-non-living-thing": 10, "find-plant": 10, "find-animal": 10, "grow-plant": 10,
                     "grow-fruit": 10, "chemistry-mix": 8, "chemistry-mix-paint-secondary-color": 9,
                     "chemistry-mix-paint-tertiary-color": 9, "lifespan-longest-lived": 10,
                     "lifespan-shortest-lived": 10, "lifespan-longest-lived-then-shortest-lived": 10,
                     "identify-life-stages-1": 5, "identify-life-stages-2": 4}
KILL_TASK = "find-plant"  # replays of its gold path give the same observations (up to listing order)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coevo_cache")


@pytest.fixture(scope="module")
def drawn_env(cache_dir):
    """Splits drawn by ETO's convention (split="drawn"); building it fills the variation cache."""
    env = make_env("scienceworld", cache_dir=cache_dir, split="drawn")
    yield env
    env.close()


@pytest.fixture(scope="module")
def all_env(cache_dir, drawn_env):
    """All 30 tasks and a step budget that fits the longest gold path (~200 actions)."""
    env = make_env("scienceworld", cache_dir=cache_dir, split="drawn", exclude_tasks=(), max_steps=400)
    yield env
    env.close()


def task_of(task_id: str) -> str:
    return sws.parse_task_id(task_id)[0]


def first_of(env, split: str, task_name: str) -> str:
    return next(t for t in env.task_ids(split) if task_of(t) == task_name)


def play(env, task_id: str, actions: list[str]) -> tuple[list[str], float, dict]:
    """Observations (first one included), final reward and info of playing ``actions`` until done."""
    observations, reward, info = [env.reset(task_id)], 0.0, {}
    for action in actions:
        observation, reward, done, info = env.step(action)
        observations.append(observation)
        if done:
            break
    return observations, reward, info


# --- splits -----------------------------------------------------------------------------------------------

def test_drawn_splits_follow_eto_convention(drawn_env, cache_dir):
    variations = json.loads(sws.variation_cache_path(cache_dir).read_text())["tasks"]
    ids = {split: drawn_env.task_ids(split) for split in drawn_env.splits()}
    assert drawn_env.tasks == [t for t in sws.TASK_NAMES if t not in sws.ETO_EXCLUDED_TASKS] and len(drawn_env.tasks) == 24
    assert {split: len(v) for split, v in ids.items()} == {"train": 2286, "test_seen": 194, "test_unseen": 211}
    assert Counter(map(task_of, ids["test_unseen"])) == ETO_UNSEEN_COUNTS
    for split, source in sws.VARIATION_SET.items():
        assert all(sws.parse_task_id(t)[1] in variations[task_of(t)][source] for t in ids[split])
    assert len(set().union(*ids.values())) == sum(map(len, ids.values()))  # disjoint, no duplicates
    assert drawn_env.split_of(ids["test_seen"][0]) == "test_seen"


def test_draw_split_is_balanced_and_seeded():
    pools = {"boil": list(range(9)), "melt": list(range(3)), "freeze": list(range(20))}
    drawn = sws.draw_split(pools, 12, random.Random(0))
    counts = Counter(map(task_of, drawn))
    assert counts["melt"] == 3 and sorted(counts.values()) == [3, 4, 5]  # melt used up, then round-robin
    assert drawn == sws.draw_split(pools, 12, random.Random(0))
    assert drawn == sorted(drawn, key=lambda t: sws.sort_key(sws.parse_task_id(t)))
    assert len(sws.draw_split(pools, None, random.Random(0))) == 32
    with pytest.raises(EnvError):
        sws.draw_split(pools, 33, random.Random(0))


def test_splits_are_deterministic_and_sized(cache_dir, drawn_env):
    again = make_env("scienceworld", cache_dir=cache_dir, split="drawn")
    assert again.jvm_pid() is None  # a warm cache: building the splits started no JVM
    assert all(again.task_ids(s) == drawn_env.task_ids(s) for s in drawn_env.splits())
    other = make_env("scienceworld", cache_dir=cache_dir, split="drawn", seed=1, n_train=1483)
    assert other.task_ids("test_seen") != drawn_env.task_ids("test_seen")
    assert len(other.task_ids("train")) == 1483
    per_task = Counter(map(task_of, other.task_ids("train")))
    pools = {t: len(json.loads(sws.variation_cache_path(cache_dir).read_text())["tasks"][t]["train"]) for t in per_task}
    level = max(per_task.values())
    assert all(count == pools[t] or count >= level - 1 for t, count in per_task.items())  # water-filling


def test_index_file_round_trip_and_eto_names(cache_dir, drawn_env, tmp_path):
    for name in ("index.json", "index.jsonl"):
        path = drawn_env.write_index(tmp_path / name)
        loaded = make_env("scienceworld", cache_dir=cache_dir, index_file=path)
        assert all(loaded.task_ids(s) == drawn_env.task_ids(s) for s in drawn_env.splits())
    eto_style = {"train": [["task-1-boil", 3]],
                 "test_unseen": [["task-10-measure-melting-point-(known-substance)", 327]]}
    (tmp_path / "eto.json").write_text(json.dumps(eto_style))
    loaded = make_env("scienceworld", cache_dir=cache_dir, index_file=tmp_path / "eto.json")
    assert loaded.task_ids("test_unseen") == ["measure-melting-point-known-substance|327"]
    assert loaded.task_ids("test_seen") == []
    for bad in ({"train": ["boil|3"], "test_seen": ["boil|3"]}, {"train": ["boil|999"]}, {"dev": ["boil|3"]}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(EnvError):
            make_env("scienceworld", cache_dir=cache_dir, index_file=tmp_path / "bad.json")


def test_misuse_raises_env_error(cache_dir, drawn_env):
    with pytest.raises(EnvError):
        drawn_env.task_ids("dev")
    with pytest.raises(EnvError):
        drawn_env.reset("boil|999")
    with pytest.raises(EnvError):
        drawn_env.reset("no-such-task|1")
    fresh = make_env("scienceworld", cache_dir=cache_dir)
    with pytest.raises(EnvError):
        fresh.step("look around")
    for bad in ({"max_steps": 0}, {"max_steps": "ETO"}, {"simplification": "hard"}, {"jvm_heap": "lots"},
                {"exclude_tasks": ["nope"]}, {"split": "dev"}, {"reward_rule": "best"}, {"eto_train_overlap": "no"},
                {"split": "drawn", "exclude_tasks": ()}):  # ETO has no step limit for the tasks it excluded
        with pytest.raises(EnvError):
            make_env("scienceworld", cache_dir=cache_dir, **bad)


def test_check_java_names_the_package_to_install():
    assert check_java() >= 11
    with pytest.raises(JavaMissingError, match="openjdk-17-jre-headless"):
        check_java("no-such-java-binary")


# --- episodes -----------------------------------------------------------------------------------------

def gold_cases() -> list[tuple[str, str]]:
    splits = sws.SPLITS
    return [(task, split) for k, task in enumerate(sws.TASK_NAMES) for split in splits
            if FULL_GOLD or task not in sws.ETO_EXCLUDED_TASKS or split == splits[k % len(splits)]]


@pytest.mark.parametrize(("task_name", "split"), gold_cases())
def test_gold_path_scores_100(all_env, task_name, split):
    task_id = first_of(all_env, split, task_name)
    all_env.reset(task_id)  # caches the gold path: generating it costs a load (4 s for Mendelian genetics)
    actions = all_env.expert_actions(task_id)
    for action in actions:
        _, reward, done, info = all_env.step(action)
        if done:
            break
    assert (reward, info["success"], info["score"]) == (1.0, True, 100), task_id
    assert len(all_env.expert_thoughts(task_id)) == len(actions)


def test_fast_reset_without_gold_path_replays_the_same(all_env, monkeypatch):
    monkeypatch.setattr(all_env, "gold_path_on_reset", False)
    task_id = first_of(all_env, "test_unseen", "chemistry-mix-paint-secondary-color")
    _, reward, info = play(all_env, task_id, all_env.expert_actions(task_id))
    assert (reward, info["success"]) == (1.0, True)


def test_bad_actions_are_answered_with_observations(all_env):
    first = all_env.reset(first_of(all_env, "train", "boil"))
    assert first.startswith("Task Description:") and "This " in first
    for action in ["", "   ", "asdf qwer", "Action: open door", "x" * 5000, "é漢字🙂\n\t", "\x00", "pick up", "999",
                   "' OR 1=1; --", "go to the moon", "focus on"]:
        observation, reward, done, info = all_env.step(action)
        assert isinstance(observation, str) and observation, action
        assert (reward, done, info["success"]) == (0.0, False, False)
    assert "look around" in all_env.valid_actions()


def test_step_limit_ends_the_episode(all_env, monkeypatch):
    monkeypatch.setattr(all_env, "flat_limit", 3)
    all_env.reset(first_of(all_env, "train", "boil"))
    results = [all_env.step("look around") for _ in range(3)]
    assert [done for _, _, done, _ in results] == [False, False, True]
    assert results[-1][1] == 0.0 and results[-1][3]["truncated"]
    with pytest.raises(EnvError):
        all_env.step("look around")


def test_valid_actions_every_step_on_request(all_env, monkeypatch):
    monkeypatch.setattr(all_env, "include_valid_actions", True)
    all_env.reset(first_of(all_env, "train", "find-plant"))
    _, _, _, info = all_env.step("look around")
    assert "look around" in info["valid_actions"] and len(info["valid_actions"]) > 50


def test_expert_lookup_and_task_spec_keep_the_episode(all_env):
    task_id = first_of(all_env, "train", KILL_TASK)
    actions = all_env.expert_actions(task_id)
    all_env.reset(task_id)
    for action in actions[:3]:
        all_env.step(action)
    all_env.expert_actions(first_of(all_env, "test_seen", "melt"))  # loads another task on the same JVM
    spec = all_env.task_spec()
    assert "focus on" in spec.system_prompt and "400 actions" in spec.system_prompt
    roles = [m["role"] for m in spec.few_shot]
    assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) > 3
    assert spec.few_shot[1]["content"].startswith("Thought: ")
    for action in actions[3:]:
        _, reward, done, info = all_env.step(action)
        if done:
            break
    assert (reward, info["success"]) == (1.0, True)


def test_thoughts_name_the_verb():
    assert thought_for("open door to kitchen") == "The kitchen is behind a door; I should open it."
    assert thought_for("move ice to metal pot") == "I should move the ice to the metal pot."
    assert thought_for("focus on red wire").startswith("The red wire is what the task is about")
    assert thought_for("0") == "Several objects match that; I mean option 0."
    assert thought_for("flush toilet") == "I should flush toilet."


# --- ETO's protocol: its split files, per-task step limits, max-score reward ----------------------------

ETO_FILES = sws.ETO_DATA_DIR


def eto_ids(file_name: str) -> list[str]:
    return [sws.make_task_id(sws.canonical_task_name(name), variation)
            for name, variation in json.loads((ETO_FILES / file_name).read_text())]


@pytest.fixture(scope="module")
def eto_env(cache_dir, drawn_env):
    """The default configuration: ETO's split files, ETO's step limits, ETO's reward rule."""
    env = make_env("scienceworld", cache_dir=cache_dir)
    yield env
    env.close()


def test_eto_split_is_exactly_etos_files(eto_env, cache_dir):
    expected = {"train": eto_ids("train_indices.json"), "test_seen": eto_ids("dev_indices.json"),
                "test_unseen": eto_ids("test_indices.json")}
    assert {split: eto_env.task_ids(split) for split in sws.SPLITS} == expected
    assert {split: len(ids) for split, ids in expected.items()} == {"train": 1483, "test_seen": 194, "test_unseen": 211}
    variations = json.loads(sws.variation_cache_path(cache_dir).read_text())["tasks"]
    outside_train = [t for t in expected["train"] if sws.parse_task_id(t)[1] not in variations[task_of(t)]["train"]]
    assert len(outside_train) == 357  # as the data README found
    protocol = eto_env.protocol()
    assert protocol["split_overlaps"] == {"train&test_seen": 54}  # ETO trains on 54 of its seen test ids
    assert protocol["step_limit"]["rule"] == "eto" and protocol["reward_rule"] == "max"
    dropped = make_env("scienceworld", cache_dir=cache_dir, eto_train_overlap="drop")
    assert len(dropped.task_ids("train")) == 1483 - 54 and dropped.protocol()["split_overlaps"] == {}
    sample = make_env("scienceworld", cache_dir=cache_dir, n_train=48, n_test_seen=24, n_test_unseen=24)
    assert [len(sample.task_ids(s)) for s in sws.SPLITS] == [48, 24, 24]
    assert all(set(sample.task_ids(s)) <= set(expected[s]) for s in sws.SPLITS)
    assert len(set(map(task_of, sample.task_ids("test_seen")))) == 24  # balanced: one id per task


def test_eto_step_limits_end_episodes_at_the_tasks_limit(eto_env):
    limits = sws.eto_step_limits()
    assert len(limits) == 24 and min(limits.values()) == 10 and limits["measure-melting-point-known-substance"] == 120
    for task_name in ("lifespan-longest-lived", "find-plant"):
        eto_env.reset(first_of(eto_env, "test_seen", task_name))
        assert eto_env.max_steps == limits[task_name]
        dones = [eto_env.step("look at agent")[2] for _ in range(limits[task_name])]
        assert dones == [False] * (limits[task_name] - 1) + [True], task_name


def gain_then_fail(env, task_id: str) -> tuple[float, dict]:
    """Follow the gold path until the score is positive, then focus on a door: ScienceWorld's failure state."""
    gold = env.expert_actions(task_id)
    env.reset(task_id)
    for action in gold:
        _, _, _, info = env.step(action)
        if info["score"] > 0:
            break
    wrong = next(a for a in env.valid_actions() if a.startswith("focus on door"))
    _, reward, done, info = env.step(wrong)
    assert done and info["score"] < 0 and 0 < info["best_score"] < 100
    return reward, info


def test_reward_rules_on_progress_then_a_failure_state(eto_env, cache_dir):
    task_id = first_of(eto_env, "train", "chemistry-mix-paint-secondary-color")
    reward, info = gain_then_fail(eto_env, task_id)
    assert reward == info["best_score"] / 100 and not info["success"]  # ETO: the best score reached counts
    final = make_env("scienceworld", cache_dir=cache_dir, reward_rule="final")
    reward, info = gain_then_fail(final, task_id)
    assert reward == 0.0 and not info["success"]  # today's option: the score at the end, 0 after a failure
    final.close()


def predicted_reward(all_env, task_id: str, limit: int) -> float:
    """What ETO's rules give the gold path: 1 if it fits the limit, else the best score within the limit."""
    gold = all_env.expert_actions(task_id)
    all_env.reset(task_id)
    scores = []
    for action in gold:
        _, _, done, info = all_env.step(action)
        scores.append(info["score"])
        if done:
            break
    return 1.0 if len(gold) <= limit else max(max(scores[:limit], default=0), 0) / 100


@pytest.mark.parametrize("split", ["test_seen", "test_unseen"])
def test_held_out_gold_replays_score_what_the_rules_predict(eto_env, all_env, split):
    # find-living-thing's gold path (16 steps) exceeds its ETO limit (15); the other two fit.
    for task_name in ("find-living-thing", "lifespan-longest-lived", "power-component"):
        task_id = first_of(eto_env, split, task_name)
        expected = predicted_reward(all_env, task_id, eto_env.step_limit(task_name))
        _, reward, info = play(eto_env, task_id, eto_env.expert_actions(task_id))
        assert reward == pytest.approx(expected), task_id
        assert info["success"] == (expected == 1.0)


# --- the JVM --------------------------------------------------------------------------------------------

def test_killed_jvm_is_replaced_and_the_episode_replayed(cache_dir, drawn_env):
    env = make_env("scienceworld", cache_dir=cache_dir)
    task_id = first_of(env, "train", KILL_TASK)
    actions = env.expert_actions(task_id)
    reference, _, _ = play(env, task_id, actions)
    half = len(actions) // 2
    observations = [env.reset(task_id)] + [env.step(action)[0] for action in actions[:half]]
    old_pid = env.jvm_pid()
    os.kill(old_pid, signal.SIGKILL)
    observations.append(env.step(actions[half])[0])
    assert env.restarts == 1 and env.jvm_pid() != old_pid and env.last_replay_mismatches == 0
    for action in actions[half + 1:]:
        observation, reward, done, info = env.step(action)
        observations.append(observation)
        if done:
            break
    assert (reward, info["success"]) == (1.0, True)
    assert len(observations) == len(reference)
    assert all(same_observation(seen, expected) for seen, expected in zip(observations, reference, strict=True))
    env.close()


def test_jvm_dead_between_episodes_and_its_options(cache_dir, drawn_env):
    env = make_env("scienceworld", cache_dir=cache_dir, jvm_heap="512m")
    env.reset(first_of(env, "train", KILL_TASK))
    pid = env.jvm_pid()
    assert "-Xmx512m" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert "-Xmx512m" not in os.environ.get("JAVA_TOOL_OPTIONS", "")  # only the JVM's launch saw it
    os.kill(pid, signal.SIGKILL)
    first = env.reset(first_of(env, "train", KILL_TASK))
    assert first.startswith("Task Description:") and env.restarts == 1
    env.close()
    env.close()  # safe twice
