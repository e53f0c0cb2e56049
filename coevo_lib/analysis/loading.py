"""Read run directories into pandas DataFrames (one row per metric record, episode, pair or margin).

Every frame carries the columns ``run`` (directory name), ``method`` (see ``method_label``) and
``seed``, so analyses can group by method and aggregate over seeds. Configs are read as plain
YAML here, not through the strict dataclass loader: an analysis must still open runs saved by an
older or newer version of the config schema, and it only needs a handful of keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from coevo_lib.config import final_iteration as loop_final_iteration
from coevo_lib.records import HARD_NEGATIVE_MIN, read_jsonl

# Methods whose loop has no iterations (coevo_lib.loop.Workbench.iterations): their last eval is it0.
EVAL_FILE = re.compile(r"^it(?P<iteration>\d+)-eval-(?P<split>.+)-(?P<agent>[A-Za-z_]+)$")
TRAIN_FILE = re.compile(r"^it(?P<iteration>\d+)-train-(?P<agent>[A-Za-z_]+)$")
BOUNDARY_FILE = Path("analysis") / "boundary.jsonl"


def project_root() -> Path:
    """The checkout coevo_lib lives in (holds configs/ and notebooks/)."""
    return Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against the project root.

    Notebooks open with their own folder as working directory (JupyterLab, papermill), so a
    default like ``runs/demo`` must not depend on where the kernel started.
    """
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def read_raw_config(run_dir: Path) -> dict[str, Any]:
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
    return yaml.safe_load(config_path.read_text())


def final_iteration(raw_config: dict[str, Any]) -> int:
    """Number of loop iterations a run performs (the rule Workbench.run follows)."""
    return loop_final_iteration(raw_config["method"], int(raw_config["loop"]["iterations"]))


def final_eval_stage(raw_config: dict[str, Any]) -> str:
    """Name of the run's last stage, ``it<N>-eval`` (Workbench.run ends with it)."""
    return f"it{final_iteration(raw_config)}-eval"


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished when the done-marker of its last evaluation stage exists."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return False
    return (run_dir / "stages" / f"{final_eval_stage(read_raw_config(run_dir))}.json").is_file()


def find_runs(runs_root: str | Path, finished_only: bool = True) -> list[Path]:
    """Run directories (folders with a config.yaml) anywhere under ``runs_root``, sorted."""
    root = Path(runs_root)
    runs = sorted(p.parent for p in root.glob("**/config.yaml") if (p.parent / "stages").is_dir())
    return [r for r in runs if is_finished(r)] if finished_only else runs


class NoRunsError(FileNotFoundError):
    """No finished run where one was needed: the user's next step, not a bug.

    A notebook cell that raises it shows this one line (IPython renders ``_render_traceback_`` instead of
    a traceback) and stops there; the CLI prints it as a one-line error like any missing file.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


def require_runs(runs_root: str | Path) -> list[Path]:
    """Finished runs under ``runs_root`` (resolved against the project root); an error says how to make some."""
    root = resolve_path(runs_root)
    runs = find_runs(root)
    if not runs:
        raise NoRunsError(f"no finished runs under {root}: run the demo study first (`make demo`, i.e. "
                          "`coevo study configs/studies/demo.yaml`) or set the runs_root parameter")
    return runs


def method_label(raw_config: dict[str, Any]) -> str:
    """The recipe a run follows: its ``label`` if set (a YAML-only variant), else the loop's method,
    with coevo's two ablations told apart."""
    if raw_config.get("label"):
        return raw_config["label"]
    if raw_config["method"] != "coevo":
        return raw_config["method"]
    loop = raw_config["loop"]
    if loop["second_agent"] == "positive":
        return "positive_agent"
    if loop.get("freeze_second_agent_after") is not None:
        return "coevo_frozen_failure"
    return "coevo"


def run_info(run_dir: str | Path) -> dict[str, Any]:
    raw = read_raw_config(Path(run_dir))
    env = raw["env"]
    return {
        "run": Path(run_dir).name, "run_path": str(Path(run_dir).resolve()), "method": method_label(raw),
        "seed": raw["seed"], "env": f"{env['name']}{sorted(env.get('kwargs', {}).items())}",
        "beta": raw["dpo"]["beta"], "iterations": final_iteration(raw),
    }


def runs_table(run_dirs: Iterable[Path]) -> pd.DataFrame:
    return pd.DataFrame([run_info(r) for r in run_dirs], columns=list(RUN_COLUMNS))


RUN_COLUMNS = ("run", "run_path", "method", "seed", "env", "beta", "iterations")


def with_run(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    tags = {k: info[k] for k in ("run", "method", "seed")}
    return [{**tags, **row} for row in rows]


def frame(rows: list[dict[str, Any]], columns: Iterable[str]) -> pd.DataFrame:
    """A DataFrame that keeps its columns even when empty, so downstream groupbys never KeyError."""
    data = pd.DataFrame(rows)
    for column in columns:
        if column not in data:
            data[column] = pd.Series(dtype=object)
    return data


def load_metrics(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Every metrics.jsonl record, tagged with run, method and seed."""
    rows = []
    for run_dir in run_dirs:
        rows += with_run(read_jsonl(Path(run_dir) / "metrics.jsonl"), run_info(run_dir))
    return frame(rows, ("run", "method", "seed", "stage", "iteration", "kind", "agent", "stage_wall_s"))


def load_eval(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Evaluation metrics in long form: one row per run, iteration and split."""
    rows = []
    for run_dir in run_dirs:
        info = run_info(run_dir)
        for record in read_jsonl(Path(run_dir) / "metrics.jsonl"):
            if record.get("kind") == "eval":
                rows += with_run(eval_rows(record), info)
    return frame(rows, ("run", "method", "seed", "iteration", "split", "reward", "success", "n"))


def eval_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """``{test_seen_reward: .., test_seen_n: ..}`` -> one row per split."""
    splits = sorted(key[: -len("_reward")] for key in record if key.endswith("_reward"))
    return [{"iteration": record["iteration"], "split": split, "reward": record[f"{split}_reward"],
             "success": record[f"{split}_success"], "n": record[f"{split}_n"]} for split in splits]


EPISODE_COLUMNS = ("run", "method", "seed", "source", "kind", "agent", "iteration", "split", "task_id",
                   "episode_id", "reward", "success", "hard_negative", "steps", "actions", "end_reason",
                   "tokens_generated")


def episode_kind(path: Path) -> str | None:
    if path.stem == "expert":
        return "expert"
    if TRAIN_FILE.match(path.stem):
        return "train"
    return "eval" if EVAL_FILE.match(path.stem) else None


def episode_row(record: dict[str, Any], kind: str, method: str, messages: bool) -> dict[str, Any]:
    row = {key: record[key] for key in EPISODE_COLUMNS[5:] if key in record}
    row.update(kind=kind, actions=tuple(record["actions"]), source=f"{method}/{record['agent']}",
               hard_negative=HARD_NEGATIVE_MIN <= record["reward"] < 1.0)
    if messages:
        row["messages"] = record["messages"]
    return row


def load_episodes(run_dirs: Iterable[Path], kinds: tuple[str, ...] = ("expert", "train", "eval"),
                  messages: bool = False) -> pd.DataFrame:
    """One row per episode; ``source`` is "<method>/<agent>" (e.g. eto/target, coevo/failure).

    ``kind`` is expert, train (rollouts the pairs are built from) or eval (test splits).
    Messages are heavy and only loaded on request (triplets, boundary).
    """
    rows = []
    for run_dir in run_dirs:
        info = run_info(run_dir)
        for path in sorted((Path(run_dir) / "episodes").glob("*.jsonl")):
            kind = episode_kind(path)
            if kind in kinds:
                rows += with_run([episode_row(r, kind, info["method"], messages) for r in read_jsonl(path)], info)
    return frame(rows, EPISODE_COLUMNS + (("messages",) if messages else ()))


PAIR_COLUMNS = ("run", "method", "seed", "iteration", "file", "kind", "task_id", "chosen_agent",
                "rejected_agent", "chosen_reward", "rejected_reward", "rejected_hard_negative")


def load_pairs(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """One row per preference pair (messages dropped); ``file`` is "target" or "second"."""
    rows = []
    for run_dir in run_dirs:
        info = run_info(run_dir)
        for path in sorted((Path(run_dir) / "pairs").glob("it*-*.jsonl")):
            iteration, name = path.stem[2:].split("-", 1)
            rows += with_run([pair_row(r, int(iteration), name) for r in read_jsonl(path)], info)
    return frame(rows, PAIR_COLUMNS)


def pair_row(record: dict[str, Any], iteration: int, file: str) -> dict[str, Any]:
    row = {key: record[key] for key in PAIR_COLUMNS[5:-1]}
    row.update(iteration=iteration, file=file,
               rejected_hard_negative=HARD_NEGATIVE_MIN <= record["rejected_reward"] < 1.0)
    return row


def load_boundary(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Margins written by coevo_lib.analysis.boundary (runs without the file contribute nothing)."""
    rows = []
    for run_dir in run_dirs:
        rows += with_run(read_jsonl(Path(run_dir) / BOUNDARY_FILE), run_info(run_dir))
    return frame(rows, ("run", "method", "seed", "iteration", "task_id", "negative_reward", "hard_negative",
                        "implicit_margin", "loglik_margin", "step_gap"))
