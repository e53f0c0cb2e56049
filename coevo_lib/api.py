"""The library's front door for notebooks and the CLI: one call per step."""

from __future__ import annotations

from pathlib import Path

from coevo_lib.config import RunConfig, load_config
from coevo_lib.loop import Workbench
from coevo_lib.preflight import check_run_inputs
from coevo_lib.runs import RunDir, default_run_dir, init_run_dir
from coevo_lib.seeding import quiet_libraries, seed_everything


def run_recipe(config: RunConfig, run_dir: str | Path | None = None) -> RunDir:
    """Run (or resume) ``config`` in ``run_dir``; the directory is written before any compute, and only
    once the environment and the model path have been checked (a bad input leaves no directory behind)."""
    check_run_inputs(config)
    run = init_run_dir(config, Path(run_dir) if run_dir else default_run_dir(config))
    seed_everything(config.seed)
    quiet_libraries()
    bench = Workbench(config, run)
    try:
        bench.run()
    finally:
        bench.close()
    return run


def run(recipe: str | Path, overrides: dict | list | None = None, run_dir: str | Path | None = None) -> RunDir:
    """Load a recipe with overrides and run it: the call the run notebook makes."""
    return run_recipe(load_config(recipe, overrides), run_dir)
