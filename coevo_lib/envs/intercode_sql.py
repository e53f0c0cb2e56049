"""InterCode-SQL rebuilt offline on SQLite: ``make_env("intercode_sql", ...)``.

Tasks are Spider-dev questions (built by ``python -m coevo_lib.envs.sql_build``). Each action is one
SQL statement, run read-only in :class:`~coevo_lib.envs.sql_sandbox.SqlSandbox`; the observation is
its result as a compact text table or the error message. ``submit`` ends the episode and scores the
result of the last statement executed (an error scores 0), as InterCode's ``SqlEnv`` does. Reaching
``max_steps`` without ``submit`` ends the episode with the same score: InterCode's n-turn evaluation
scores after every turn (and reports the best turn), so the last query is never left unscored.

Splits: questions on ``unseen_dbs`` form ``test_unseen``; the others are split into ``train`` and
``test_seen`` by a seeded shuffle of groups of questions sharing one gold query (Spider asks most
queries twice, paraphrased; splitting the pair would leak the answer into the test split).
``n_train`` keeps a seeded sample of that many training questions (smoke runs, scarce-expert studies).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from coevo_lib.envs.base import NOOP_OBSERVATION, EnvError, StepResult, TaskSpec, TextEnv, is_noop, live_episode
from coevo_lib.envs.sql_build import Question, database_path, load_questions, require_build
from coevo_lib.envs.sql_sandbox import QueryResult, SqlSandbox, result_reward

# Held out for test_unseen: four domains (sport, pets, music, TV) with 200 of the 1,034 questions.
DEFAULT_UNSEEN_DBS = ("battle_death", "dog_kennels", "orchestra", "tvshow")
# InterCode's MySQL dump has wta_1's tables but none of their rows: its 62 questions all have an empty
# or all-zero gold result, which any empty query matches. Pass exclude_dbs=() to keep them.
DEFAULT_EXCLUDED_DBS = ("wta_1",)
SPLITS = ("train", "test_seen", "test_unseen")
SCHEMA_QUERY = "SELECT name, sql FROM sqlite_master WHERE type = 'table'"
EXPERT_STEPS = 3  # schema, gold query, submit
GOLD_TIMEOUT_S = 10.0
MAX_CELL_CHARS = 1_500  # the widest CREATE TABLE statement is 1,404 characters
MAX_OBSERVATION_CHARS = 20_000

_CLOSED_FENCE = re.compile(r"```(.*?)```", re.DOTALL)
_STRAY_FENCE = re.compile(r"^```|```$")
# The language tag of a fence (```sql); no SQL statement starts with these words.
_LANGUAGE_TAG = re.compile(r"^(?:sql|sqlite|sqlite3|mysql)\b", re.IGNORECASE)

SYSTEM_PROMPT = (
    "You answer questions about a SQLite database by writing SQL. Each action is exactly one read-only "
    "SQLite statement (a SELECT query); the observation is its result table or an error. To see the "
    f"schema, query: {SCHEMA_QUERY}. When the result of your last query answers the question, reply with "
    "the action: submit. Only the last query's result is scored, against the result of the correct query "
    "(same rows; same order when the question asks for one)."
)


@dataclass
class EpisodeState:
    question: Question
    steps: int = 0
    last_result: QueryResult | None = None
    done: bool = False


def strip_fences(action: str) -> str:
    """The SQL inside a ```sql ...``` block if there is one, else the action without stray fences."""
    match = _CLOSED_FENCE.search(action)
    text = match.group(1) if match else _STRAY_FENCE.sub("", action.strip())
    return _LANGUAGE_TAG.sub("", text.strip()).strip()


def is_submit(sql: str) -> bool:
    return sql.strip().strip("`'\"; \t\n").lower() == "submit"


def format_cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = " ".join(str(value).split())  # one table row per line
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "..."


def render_result(result: QueryResult, max_rows: int) -> str:
    """A result as a compact '|'-separated table (at most ``max_rows`` rows), or its error message."""
    if not result.ok:
        return str(result.error)
    lines = [" | ".join(result.columns)]
    lines += [" | ".join(format_cell(v) for v in row) for row in result.rows[:max_rows]]
    hidden = len(result.rows) - max_rows
    if not result.rows:
        lines.append("(0 rows)")
    elif result.truncated:
        lines.append(f"(more than {max(hidden, 0)} more rows; fetching stopped at {len(result.rows)} rows)")
    elif hidden > 0:
        lines.append(f"({hidden} more rows)")
    text = "\n".join(lines)
    return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + "\n(output cut)"


def gold_sql_key(question: Question) -> tuple[str, str]:
    return question.db_id, " ".join(question.sql.lower().rstrip(";").split())


def split_seen_questions(questions: list[Question], test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test) ids: whole groups of questions with the same gold query go to one side."""
    groups: dict[tuple[str, str], list[str]] = {}
    for question in questions:
        groups.setdefault(gold_sql_key(question), []).append(question.id)
    ordered_groups = [groups[key] for key in sorted(groups)]
    random.Random(seed).shuffle(ordered_groups)
    target, test = round(test_fraction * len(questions)), []
    for group in ordered_groups:
        if len(test) >= target:
            break
        test.extend(group)
    test_ids = set(test)
    return sorted(q.id for q in questions if q.id not in test_ids), sorted(test_ids)


def make_splits(questions: list[Question], unseen_dbs: set[str], test_fraction: float, seed: int,
                n_train: int | None = None) -> dict:
    seen = [q for q in questions if q.db_id not in unseen_dbs]
    train, test_seen = split_seen_questions(seen, test_fraction, seed)
    if n_train is not None:  # a seeded sample across databases (the ids are ordered by database)
        if not 1 <= n_train <= len(train):
            raise EnvError(f"n_train must be in [1, {len(train)}] (the train split's size), got {n_train}")
        train = sorted(random.Random(f"train/{seed}").sample(train, n_train))
    test_unseen = sorted(q.id for q in questions if q.db_id in unseen_dbs)
    return {"train": train, "test_seen": test_seen, "test_unseen": test_unseen}


class InterCodeSQLEnv(TextEnv):
    """Spider-dev text-to-SQL as a multi-turn environment with InterCode's reward (see module doc)."""

    name = "intercode_sql"
    reward_rule = ("the last statement's result vs gold: multiset IoU of rows, x Kendall tau when the gold "
                   "orders (InterCode)")

    def __init__(
        self, seed: int = 0, data_dir: str | Path | None = None, unseen_dbs: list[str] | tuple[str, ...] | None = None,
        seen_test_fraction: float = 0.2, max_steps: int = 10, max_rows: int = 100, timeout_s: float = 2.0,
        exclude_dbs: list[str] | tuple[str, ...] = DEFAULT_EXCLUDED_DBS, n_train: int | None = None,
    ):
        check_settings(seen_test_fraction, max_steps, max_rows, timeout_s)
        self.data_dir = require_build(data_dir)
        self.max_steps, self.max_rows, self.timeout_s = max_steps, max_rows, timeout_s
        all_questions = load_questions(self.data_dir)
        check_known_dbs("exclude_dbs", exclude_dbs, {q.db_id for q in all_questions})
        questions = [q for q in all_questions if q.db_id not in set(exclude_dbs)]
        self.unseen_dbs = tuple(DEFAULT_UNSEEN_DBS if unseen_dbs is None else unseen_dbs)
        check_known_dbs("unseen_dbs", self.unseen_dbs, {q.db_id for q in questions})
        self._questions = {q.id: q for q in questions}
        self._splits = make_splits(questions, set(self.unseen_dbs), seen_test_fraction, seed, n_train)
        self._sandboxes: dict[tuple[str, float], SqlSandbox] = {}
        self._gold_results: dict[str, QueryResult] = {}
        self._tables: dict[str, list[str]] = {}
        self._episode: EpisodeState | None = None
        self._few_shot: list[dict[str, str]] | None = None

    # --- protocol -----------------------------------------------------------------------------------

    def splits(self) -> list[str]:
        return list(SPLITS)

    def task_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise EnvError(f"unknown split {split!r}; {self.name} has {', '.join(SPLITS)}")
        return list(self._splits[split])

    def reset(self, task_id: str) -> str:
        question = self.question(task_id)
        self._episode = EpisodeState(question)
        return self.first_observation(question)

    def step(self, action: str) -> StepResult:
        episode = live_episode(self._episode)
        episode.steps += 1
        sql = strip_fences(action)
        if is_submit(sql):
            return self._finish(episode, submitted=True)
        if is_noop(sql):  # Agent-R's reflection turn: the last result stays the one that would be scored
            return self._after_step(episode, NOOP_OBSERVATION, executed=False)
        episode.last_result = self._sandbox(episode.question.db_id, self.timeout_s).execute(sql)
        return self._after_step(episode, render_result(episode.last_result, self.max_rows), episode.last_result.ok)

    def _after_step(self, episode: EpisodeState, observation: str, executed: bool) -> StepResult:
        if episode.steps >= self.max_steps:
            return self._finish(episode, submitted=False, observation=observation)
        info = {"success": False, "steps": episode.steps, "action_executed": executed}
        return observation, 0.0, False, info

    def expert_actions(self, task_id: str) -> list[str]:
        return [SCHEMA_QUERY, self.question(task_id).sql, "submit"]

    def expert_thoughts(self, task_id: str) -> list[str]:
        db_id = self.question(task_id).db_id
        return [f"I should look at the tables of {db_id}.", "Now I can answer with a query.",
                "The result answers the question; submit."]

    def task_spec(self) -> TaskSpec:
        if self._few_shot is None:
            self._few_shot = self._expert_example(self._splits["train"][0]) if self._splits["train"] else []
        return TaskSpec(name=self.name, system_prompt=SYSTEM_PROMPT + f" You have at most {self.max_steps} "
                        "actions.", few_shot=list(self._few_shot))

    def close(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()
        self._sandboxes.clear()

    # --- helpers ------------------------------------------------------------------------------------

    def question(self, task_id: str) -> Question:
        if task_id not in self._questions:
            raise EnvError(f"unknown task id {task_id!r} for environment {self.name!r}")
        return self._questions[task_id]

    def first_observation(self, question: Question) -> str:
        tables = ", ".join(self.table_names(question.db_id))
        return f"Question: {question.question}\nDatabase: {question.db_id}. Tables: {tables}."

    def table_names(self, db_id: str) -> list[str]:
        if db_id not in self._tables:
            result = self._sandbox(db_id, GOLD_TIMEOUT_S).execute(f"{SCHEMA_QUERY} ORDER BY rowid")
            self._tables[db_id] = [str(row[0]) for row in result.rows]
        return self._tables[db_id]

    def gold_result(self, task_id: str) -> QueryResult:
        if task_id not in self._gold_results:
            question = self.question(task_id)
            result = self._sandbox(question.db_id, GOLD_TIMEOUT_S).execute(question.sql)
            if not result.ok:  # the build check ran every gold query, so this is a broken build
                raise RuntimeError(f"gold query of {task_id} failed: {result.error}; rebuild the data")
            self._gold_results[task_id] = result
        return self._gold_results[task_id]

    def score(self, task_id: str, result: QueryResult | None) -> float:
        """InterCode's reward of ``result`` for ``task_id``; no result or an error scores 0."""
        if result is None or not result.ok:
            return 0.0
        gold = self.gold_result(task_id)
        return result_reward(list(result.rows), list(gold.rows), self.question(task_id).ordered)

    def _sandbox(self, db_id: str, timeout_s: float) -> SqlSandbox:
        # Agent statements and gold queries use separate connections: gold gets a generous time limit.
        key = (db_id, timeout_s)
        if key not in self._sandboxes:
            self._sandboxes[key] = SqlSandbox(database_path(self.data_dir, db_id), timeout_s=timeout_s)
        return self._sandboxes[key]

    def _finish(self, episode: EpisodeState, submitted: bool, observation: str | None = None) -> StepResult:
        episode.done = True
        reward = self.score(episode.question.id, episode.last_result)
        if observation is None:
            observation = f"Submitted. Reward: {reward:.2f}"
        info = {"success": reward == 1.0, "steps": episode.steps, "submitted": submitted,
                "truncated": not submitted, "reward": reward}
        return observation, reward, True, info

    def _expert_example(self, task_id: str) -> list[dict[str, str]]:
        """The expert trajectory of one training task as chat messages (the worked example).

        Runs the actions on the sandbox directly, so an episode in progress is left untouched.
        """
        question = self.question(task_id)
        messages = [{"role": "user", "content": self.first_observation(question)}]
        turns = list(zip(self.expert_thoughts(task_id), self.expert_actions(task_id), strict=True))
        for thought, action in turns[:-1]:
            result = self._sandbox(question.db_id, self.timeout_s).execute(action)
            messages.append({"role": "assistant", "content": f"Thought: {thought}\nAction: {action}"})
            messages.append({"role": "user", "content": render_result(result, self.max_rows)})
        thought, action = turns[-1]
        messages.append({"role": "assistant", "content": f"Thought: {thought}\nAction: {action}"})
        return messages


def check_settings(seen_test_fraction: float, max_steps: int, max_rows: int, timeout_s: float) -> None:
    if not 0.0 <= seen_test_fraction < 1.0:
        raise EnvError(f"seen_test_fraction must be in [0, 1), got {seen_test_fraction}")
    if max_steps < EXPERT_STEPS:
        raise EnvError(f"max_steps must be >= {EXPERT_STEPS} (the expert looks at the schema, queries, submits)")
    if max_rows < 1 or timeout_s <= 0:
        raise EnvError(f"max_rows must be >= 1 and timeout_s > 0, got {max_rows} and {timeout_s}")


def check_known_dbs(argument: str, db_ids: list[str] | tuple[str, ...], known_dbs: set[str]) -> None:
    unknown = sorted(set(db_ids) - known_dbs)
    if unknown:
        raise EnvError(f"{argument} {unknown} are not among the databases in use: {sorted(known_dbs)}")
