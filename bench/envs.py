"""Per-call times of each registered environment: reset, an expert step, an invalid action, and
(ScienceWorld) the valid-action list that its agents may ask for.

    python bench/envs.py [--tasks 20] [--envs minishop intercode_sql scienceworld]

Expert trajectories of ``--tasks`` test_seen tasks are replayed; times are medians per call, printed
as a table. An environment whose setup is missing (no Java, no SQL build) is reported and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any, Callable

from coevo_lib.config import load_config
from coevo_lib.envs import make_env
from coevo_lib.envs.base import EnvError

# Each environment with the settings of the recipe the numbers describe.
RECIPES = {
    "minishop": "configs/minishop/base.yaml",
    "intercode_sql": "configs/intercode_sql/smoke.yaml",
    "scienceworld": "configs/scienceworld/smoke.yaml",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--envs", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    return parser.parse_args()


def timed(times: list[float], call: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = call()
    times.append(time.perf_counter() - start)
    return result


def env_kwargs(name: str, n_tasks: int) -> dict[str, Any]:
    kwargs = dict(load_config(RECIPES[name]).env.kwargs)
    if name == "scienceworld":  # the smoke recipe draws only 4 test_seen variations
        kwargs["n_test_seen"] = n_tasks
    return kwargs


def time_env(name: str, n_tasks: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    kwargs = env_kwargs(name, n_tasks)
    env = timed(times["construct"], lambda: make_env(name, **kwargs))
    try:
        for task_id in env.task_ids("test_seen")[:n_tasks]:
            actions = env.expert_actions(task_id)
            timed(times["reset"], lambda: env.reset(task_id))
            timed(times["invalid action"], lambda: env.step("dance wildly[]"))
            for action in actions:
                if hasattr(env, "valid_actions"):
                    timed(times["valid_actions()"], env.valid_actions)
                _, _, done, _ = timed(times["expert step"], lambda: env.step(action))
                if done:
                    break
    finally:
        env.close()
    return times


def main() -> None:
    args = parse_args()
    print(f"{'environment':<15} {'call':<16} {'median':>10} {'calls':>6}")
    for name in args.envs:
        try:
            times = time_env(name, args.tasks)
        except (EnvError, FileNotFoundError) as error:  # no Java, no SQL build
            print(f"{name:<15} skipped: {error}")
            continue
        for call, values in times.items():
            median = statistics.median(values)
            shown = f"{median * 1e3:.2f} ms" if median >= 1e-3 else f"{median * 1e6:.0f} us"
            print(f"{name:<15} {call:<16} {shown:>10} {len(values):>6}")


if __name__ == "__main__":
    main()
