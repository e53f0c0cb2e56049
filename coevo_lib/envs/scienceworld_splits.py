"""ScienceWorld task ids, the cached per-task variation lists, and the split index (which ids form which split).

A task id is ``"<task_name>|<variation>"`` with ScienceWorld's own task name (``"boil|21"``). The splits
follow ETO's convention (Song et al. 2024, its released ``eval_agent/data/sciworld/*_indices.json``):

* ``train``       from ScienceWorld's *train* variations (``get_variations_train``),
* ``test_seen``   from its *dev* variations (``get_variations_dev``): same tasks, unseen variations,
* ``test_unseen`` from its *test* variations (``get_variations_test``): held-out variations that
  ScienceWorld builds to differ (other substances, animals, rooms) from the train ones.

The three variation sets are disjoint, so the splits are too. Excluded by default, as in ETO's index
files: topics 9 (Forces: the three inclined-plane tasks) and 10 (Mendelian genetics: two tasks) of
ScienceWorld's paper numbering ("tasks 9-10"), and task 2-3 (melting point of an unknown substance),
which ETO's files also lack. That leaves ETO's 24 tasks; ``exclude_tasks=()`` keeps all 30.

Drawing rule (:func:`draw_split`): a balanced, seeded sample. ``random.Random("scienceworld/<seed>/<split>")``
shuffles each task's pool of variations and the order of the tasks; ids are then taken round-robin over
the tasks (one variation per task per round, tasks whose pool is used up drop out) until the split has
its size, and listed sorted by (task in paper order, variation). Per-task counts are therefore as equal
as the pools allow: with ETO's 24 tasks and 211 ids this gives exactly ETO's unseen counts
(min(10, test variations) per task; ETO took the lowest-numbered ones, we draw them at random).
ETO's 194 seen ids were a pooled (not per-task) sample, and its 1,483 train ids include some dev-range
variations (e.g. test-conductivity 673); we keep train strictly inside the train variations.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import scienceworld
from scienceworld.constants import ID2TASK
from scienceworld.utils import infer_task

from coevo_lib.envs.base import EnvError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test_seen", "test_unseen")
# ScienceWorld's variation set each split draws from.
VARIATION_SET = {"train": "train", "test_seen": "dev", "test_unseen": "test"}
# Paper order (1-1 boil ... 10-2 mendelian-genetics-unknown-plant); also the order ids are listed in.
TASK_NAMES = tuple(ID2TASK.values())
ETO_EXCLUDED_TASKS = (
    "measure-melting-point-unknown-substance",
    "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces",
    "inclined-plane-friction-unnamed-surfaces",
    "mendelian-genetics-known-plant", "mendelian-genetics-unknown-plant",
)

Variations = dict[str, dict[str, list[int]]]  # task name -> {"train"|"dev"|"test": variation indices}
Splits = dict[str, list[str]]


def make_task_id(task_name: str, variation: int) -> str:
    return f"{task_name}|{variation}"


def parse_task_id(task_id: str) -> tuple[str, int]:
    task_name, sep, variation = str(task_id).rpartition("|")
    if not sep or task_name not in TASK_NAMES or not variation.isdigit():
        raise EnvError(f"not a ScienceWorld task id: {task_id!r}; expected '<task name>|<variation>' "
                       f"with a task name among {', '.join(TASK_NAMES)}")
    return task_name, int(variation)


def canonical_task_name(name: str) -> str:
    """ScienceWorld's name for a task given by name, paper id ("2-3") or ETO's name ("task-1-boil")."""
    canonical = infer_task(str(name))
    if canonical not in TASK_NAMES:
        raise EnvError(f"unknown ScienceWorld task {name!r}; tasks are {', '.join(TASK_NAMES)}")
    return canonical


# --- the per-task variation lists, cached on disk ---------------------------------------------------

def variation_cache_path(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("COEVO_CACHE") or Path.home() / ".cache" / "coevo"
    return Path(root) / "scienceworld" / f"variations-{scienceworld.__version__}.json"


def load_variations(path: Path, fetch: Callable[[], Variations]) -> Variations:
    """The cached variation lists of ``path``, or ``fetch()``'s (which needs the JVM), then cached."""
    cached = read_variations(path)
    if cached is not None:
        return cached
    variations = fetch()
    payload = {"scienceworld_version": scienceworld.__version__, "tasks": variations}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)
    return variations


def read_variations(path: Path) -> Variations | None:
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError:  # the write is atomic, so only a hand edit gets here: rebuild it
        logger.warning("ignoring unreadable ScienceWorld variation cache %s", path)
        return None
    tasks = payload.get("tasks", {})
    if payload.get("scienceworld_version") != scienceworld.__version__ or set(tasks) != set(TASK_NAMES):
        return None
    return tasks


def all_variations(variations: Variations, task_name: str) -> set[int]:
    return {v for pool in variations[task_name].values() for v in pool}


# --- drawing ------------------------------------------------------------------------------------------

def draw_split(pools: dict[str, list[int]], size: int | None, rng: random.Random) -> list[str]:
    """``size`` ids (all when None) taken round-robin over the tasks of ``pools`` (see module doc)."""
    total = sum(len(pool) for pool in pools.values())
    size = total if size is None else size
    if not 0 <= size <= total:
        raise EnvError(f"cannot draw {size} ids from {total} variations of {len(pools)} tasks")
    queues = {task: rng.sample(pool, len(pool)) for task, pool in pools.items()}
    task_order = rng.sample(list(pools), len(pools))
    picked: list[tuple[str, int]] = []
    for depth in range(max((len(q) for q in queues.values()), default=0)):
        round_ids = [(task, queues[task][depth]) for task in task_order if depth < len(queues[task])]
        picked.extend(round_ids[: size - len(picked)])
    return [make_task_id(task, v) for task, v in sorted(picked, key=sort_key)]


def sort_key(pair: tuple[str, int]) -> tuple[int, int]:
    return TASK_NAMES.index(pair[0]), pair[1]


def draw_splits(variations: Variations, tasks: list[str], sizes: dict[str, int | None], seed: int) -> Splits:
    """Every split drawn with its own seeded generator, so one split's size never moves another's ids."""
    splits = {}
    for split in SPLITS:
        pools = {task: variations[task][VARIATION_SET[split]] for task in tasks}
        splits[split] = draw_split(pools, sizes[split], random.Random(f"scienceworld/{seed}/{split}"))
    return splits


# --- ETO's own split and step limits (copied files, see data/eto_scienceworld/README.md) ----------------

ETO_DATA_DIR = Path(__file__).resolve().parent / "data" / "eto_scienceworld"
ETO_FILES = {"train": "train_indices.json", "test_seen": "dev_indices.json", "test_unseen": "test_indices.json"}


def eto_splits(variations: Variations) -> Splits:
    """ETO's 1,483 train / 194 seen / 211 unseen ids, exactly as its files list them.

    Not disjoint: 54 of ETO's train ids are also seen-split ids (:func:`split_overlaps`). We keep them, as ETO
    trained and tested that way; ``ScienceWorldEnv(eto_train_overlap="drop")`` removes them from train."""
    return {split: [normalise_entry(entry, variations) for entry in json.loads((ETO_DATA_DIR / name).read_text())]
            for split, name in ETO_FILES.items()}


def eto_step_limits() -> dict[str, int]:
    """ETO's step limit per task (10 for the lifespan tasks ... 120 for measure-melting-point), by our task names."""
    limits = json.loads((ETO_DATA_DIR / "max_steps.json").read_text())
    return {canonical_task_name(name): int(limit) for name, limit in limits.items()}


def split_overlaps(splits: Splits) -> dict[str, list[str]]:
    """Ids listed in two splits, keyed "a&b" for each pair of splits that share any."""
    overlaps = {}
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1:]:
            shared = sorted(set(splits.get(first, [])) & set(splits.get(second, [])), key=id_sort_key)
            if shared:
                overlaps[f"{first}&{second}"] = shared
    return overlaps


def id_sort_key(task_id: str) -> tuple[int, int]:
    return sort_key(parse_task_id(task_id))


def subsample(ids: list[str], size: int | None, rng: random.Random) -> list[str]:
    """``size`` of ``ids`` drawn as :func:`draw_split` draws (balanced over tasks, seeded); all when None."""
    pools: dict[str, list[int]] = {}
    for task_id in ids:
        task_name, variation = parse_task_id(task_id)
        pools.setdefault(task_name, []).append(variation)
    return draw_split(pools, size, rng)


# --- a user's own index file ----------------------------------------------------------------------------

def read_index(path: str | Path, variations: Variations) -> Splits:
    """Splits listed in a JSON or JSONL file (see :func:`write_index`), checked against ScienceWorld."""
    path = Path(path)
    if not path.exists():
        raise EnvError(f"index file {path} does not exist")
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else None
    splits = splits_of_rows(rows) if rows is not None else splits_of_mapping(json.loads(text))
    checked = {split: [normalise_entry(entry, variations) for entry in splits.get(split, [])] for split in SPLITS}
    check_disjoint(checked)
    return checked


def splits_of_mapping(mapping: object) -> dict[str, list]:
    if not isinstance(mapping, dict):
        raise EnvError("a JSON index file must map split names to lists of task ids")
    unknown = sorted(set(mapping) - set(SPLITS))
    if unknown:
        raise EnvError(f"unknown splits {unknown} in the index file; splits are {', '.join(SPLITS)}")
    return mapping


def splits_of_rows(rows: list[dict]) -> dict[str, list]:
    splits: dict[str, list] = {}
    for row in rows:
        if row.get("split") not in SPLITS:
            raise EnvError(f"index row {row} needs a 'split' among {', '.join(SPLITS)}")
        entry = row["task_id"] if "task_id" in row else [row.get("task"), row.get("variation")]
        splits.setdefault(row["split"], []).append(entry)
    return splits


def normalise_entry(entry: object, variations: Variations) -> str:
    """A task id from "name|variation" or [name, variation] (ETO's files use ["task-1-boil", 21])."""
    if isinstance(entry, str):
        name, _, variation = entry.rpartition("|")
    elif isinstance(entry, list | tuple) and len(entry) == 2:
        name, variation = entry
    else:
        raise EnvError(f"index entry {entry!r} is neither 'task|variation' nor [task, variation]")
    task_name = canonical_task_name(name)
    if not str(variation).isdigit() or int(variation) not in all_variations(variations, task_name):
        raise EnvError(f"index entry {entry!r}: {task_name} has no variation {variation!r}")
    return make_task_id(task_name, int(variation))


def check_disjoint(splits: Splits) -> None:
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        for task_id in ids:
            if task_id in seen:
                raise EnvError(f"task id {task_id} is listed twice (in {seen[task_id]} and {split})")
            seen[task_id] = split


def write_index(splits: Splits, path: str | Path) -> Path:
    """Write the splits as JSON ({split: [ids]}) or, for a .jsonl path, one {"split", "task_id"} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        rows = [{"split": split, "task_id": task_id} for split in SPLITS for task_id in splits[split]]
        text = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        text = json.dumps({split: splits[split] for split in SPLITS}, indent=1) + "\n"
    path.write_text(text)
    return path
