"""Studies: methods x seeds through the run notebook, then the analysis notebooks, then figures.

A study file (configs/studies/*.yaml) names entries (a recipe, optional overrides, optional seeds),
study-level overrides and the notebooks to render. ``coevo study <file>`` executes
notebooks/10-run.ipynb with papermill once per entry and seed; the executed copy is saved as
``<run_dir>/10-run.ipynb``. Relative paths in a study file are relative to the project root.

Finished runs are skipped: a run is finished when the done-marker of its last evaluation stage
exists (coevo_lib.analysis.loading.is_finished) and its saved config equals the one the study
resolves now; a study that raises loop.iterations extends its finished runs in place. A finished
run whose config differs otherwise is reported as a failure and left untouched, so editing a study
never silently reuses stale results. An unfinished run is resumed by its notebook
(every stage is resumable). A failing notebook is reported with the run and the notebook, and the
other runs go on; the exit code is non-zero when anything failed.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError
from traitlets.config import Config

from coevo_lib.analysis.loading import is_finished, project_root, resolve_path
from coevo_lib.config import ConfigError, from_dict, load_config
from coevo_lib.preflight import check_run_inputs

log = logging.getLogger(__name__)

# Committed notebooks name the kernel `make setup` installs (.venv's interpreter, "coevo (.venv)"), so
# JupyterLab opens them on the project's environment whichever Python runs the lab server.
KERNEL_NAME = "coevo"
# Where that kernel is not installed (a plain `pip install -e .`), the native kernel: jupyter_client starts it
# with the interpreter that runs papermill.
FALLBACK_KERNEL = "python3"

# Smallest runs that still exercise every stage (tests, notebook defaults, `smoke: true` studies).
# Trainer batches of 4 give at least 2 optimizer steps: with one step the warmup keeps the learning rate
# at 0 and a checkpoint would equal its start. Rollouts run 8 episodes in one lockstep batch.
SMOKE_OVERRIDES: dict[str, Any] = {
    "env.kwargs.max_steps": 6, "rollout.max_tasks": 8, "rollout.batch_size": 8, "rollout.max_new_tokens": 24,
    "eval.max_tasks": 4,
    "sft.epochs": 1, "sft.batch_size": 4, "dpo.epochs": 1, "dpo.batch_size": 4, "loop.failure_dpo.epochs": 1,
    "loop.failure_dpo.batch_size": 4, "loop.iterations": 1,
    "model.tiny.hidden_size": 32, "model.tiny.num_layers": 1, "model.tiny.num_heads": 2,
    "model.tiny.intermediate_size": 64, "model.tiny.vocab_size": 512, "model.tiny.tokenizer_tasks_per_split": 40,
}

# jupyter_client provisions CurveZMQ keys when the kernelspec declares it can use them (ipykernel's does):
# the kernel's sockets are encrypted, and ipykernel no longer warns once per notebook that they run over
# plain-text TCP. A kernel that cannot encrypt starts as before, and its warning then still shows.
ENCRYPTED_KERNEL = {"transport_encryption": "auto"}

class KernelStartError(RuntimeError):
    """No kernel answered before its first reply, the first one and KERNEL_START_RETRIES replacements."""


# What jupyter_client's KernelClient.wait_for_ready raises when a kernel never answers (8.x messages).
KERNEL_START_FAILURES = ("Kernel didn't respond", "Kernel died before replying")
KERNEL_START_RETRIES = 2

ANALYSIS_NOTEBOOKS = ["notebooks/20-hard-negatives.ipynb", "notebooks/30-decision-boundary.ipynb",
                      "notebooks/40-results.ipynb"]


@dataclass
class StudyEntry:
    name: str = field(default="", metadata={"help": "run directory prefix; default: the recipe's file stem"})
    recipe: str = field(default="", metadata={"help": "recipe path (required)"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "on top of the study's"})
    seeds: list[int] | None = field(default=None, metadata={"help": "default: the study's seeds"})


@dataclass
class Study:
    name: str = field(default="", metadata={"help": "study name (required)"})
    entries: list[StudyEntry] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "applied to every entry"})
    smoke: bool = field(default=False, metadata={"help": "underlay SMOKE_OVERRIDES (tests, quick checks)"})
    runs_root: str | None = field(default=None, metadata={"help": "default: runs/<name>"})
    run_notebook: str = "notebooks/10-run.ipynb"
    analysis: list[str] = field(default_factory=lambda: list(ANALYSIS_NOTEBOOKS))
    analysis_parameters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "parameters for the analysis notebooks that declare them"})
    figures_dir: str | None = field(default="figures", metadata={"help": "null: draw no figures"})
    tiny_runs_root: str | None = field(
        default=None,
        metadata={"help": "a pretrained-model study: the tiny model's study (its runs_root) set beside it in "
                          "tiny_vs_pretrained.md (figures) and notebook 40 (its tiny_runs_root parameter)"},
    )
    workers: int = field(
        default=1,
        metadata={"help": "runs executed at once, each kernel with cpu_count / workers threads; a seed's first "
                          "run (which trains the shared SFT) finishes before that seed's other runs start"},
    )


@dataclass
class PlannedRun:
    entry: str
    seed: int
    recipe: Path
    overrides: dict[str, Any]
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.entry} seed {self.seed} ({self.run_dir})"


def run_overrides(overrides: dict[str, Any], seed: int, smoke: bool) -> dict[str, Any]:
    """Overrides a run notebook applies: smoke sizes < the given overrides < the seed."""
    return {**(SMOKE_OVERRIDES if smoke else {}), **overrides, "seed": seed}


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; errors name the offending key or path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    study = from_dict(Study, yaml.safe_load(path.read_text()) or {}, "")
    if not study.name:
        raise ConfigError(f"study {path}: 'name' is required")
    if not study.entries:
        raise ConfigError(f"study {path}: 'entries' must list at least one recipe")
    for index, entry in enumerate(study.entries):
        if not entry.recipe:
            raise ConfigError(f"study {path}: entries[{index}].recipe is required")
        entry.name = entry.name or Path(entry.recipe).stem
    if study.workers < 1:
        raise ConfigError(f"study {path}: workers must be >= 1, got {study.workers}")
    names = [entry.name for entry in study.entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {path}: entry names must be unique, got {names}")
    return study


def study_runs_root(study: Study) -> Path:
    return resolve_path(study.runs_root or f"runs/{study.name}")


def plan(study: Study) -> list[PlannedRun]:
    """Every (entry, seed) of the study with its recipe, merged overrides and run directory."""
    root = study_runs_root(study)
    return [PlannedRun(entry.name, seed, resolve_path(entry.recipe), {**study.overrides, **entry.overrides},
                       root / f"{entry.name}-seed{seed}")
            for entry in study.entries for seed in (entry.seeds if entry.seeds is not None else study.seeds)]


def finished_and_current(run: PlannedRun, smoke: bool) -> bool:
    """True when the run is finished with the config the study asks for; raises ConfigError on a stale run.

    A finished run the study asks to extend (more loop.iterations) is not finished: its notebook resumes it."""
    if not is_finished(run.run_dir):
        return False
    from coevo_lib.runs import RunDir, compare_config

    config = load_config(run.recipe, run_overrides(run.overrides, run.seed, smoke))
    return compare_config(RunDir(run.run_dir), config) == "same"


def execution_kernel() -> str:
    """The coevo kernel when jupyter_client finds it, else the native one."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else FALLBACK_KERNEL


def execute(notebook: Path, output: Path, parameters: dict[str, Any]) -> int:
    """Run a notebook with papermill; its progress bars print text lines (nobody watches widgets live).

    A kernel that dies or hangs before it answers runs no cell, so another is started, KERNEL_START_RETRIES
    times at most; returns how many were replaced (logged too). After that, KernelStartError.
    """
    import papermill

    from coevo_lib.progress import text_progress

    output.parent.mkdir(parents=True, exist_ok=True)
    retries = 0
    while True:
        try:
            with text_progress(), kernel_config() as config:
                papermill.execute_notebook(str(notebook), str(output), parameters=parameters,
                                           kernel_name=execution_kernel(), cwd=str(project_root()),
                                           progress_bar=False, config=config)
            return retries
        except RuntimeError as error:
            if not kernel_did_not_start(error):
                raise
            if retries == KERNEL_START_RETRIES:
                raise KernelStartError(str(error)) from error
            retries += 1
            log.warning("notebook %s: its kernel did not start (%s); starting another (retry %d of %d)",
                        notebook.name, error, retries, KERNEL_START_RETRIES)


def kernels_replaced(error: Exception) -> int:
    """Kernels replaced in a notebook that failed with ``error``: all the retries when none ever answered."""
    return KERNEL_START_RETRIES if isinstance(error, KernelStartError) else 0


def kernel_did_not_start(error: Exception) -> bool:
    """jupyter_client's wait_for_ready gave up: the kernel died or stayed silent before its first reply."""
    return isinstance(error, RuntimeError) and str(error).startswith(KERNEL_START_FAILURES)


@contextmanager
def kernel_config() -> Iterator[Config]:
    """The kernel manager's settings for one notebook: encrypted sockets, on Unix domain sockets where there are.

    Over TCP, jupyter_client picks each kernel's ports by binding port 0 and closing it, then the kernel binds
    them. Two study workers starting kernels at once can be handed the same port, or see it taken by another
    kernel's client connection in between: the kernel dies with "Address already in use" and papermill waits
    60 s for it (CI failed so, 2026-12-07). Unix sockets in a directory of this kernel's own cannot collide.
    """
    if os.name == "nt":  # ZeroMQ has no ipc transport on Windows
        yield Config({"KernelManager": ENCRYPTED_KERNEL})
        return
    # A short path: a Unix socket's address is limited to ~104-108 bytes.
    with tempfile.TemporaryDirectory(prefix="coevo-kernel-") as sockets:
        yield Config({"KernelManager": {**ENCRYPTED_KERNEL, "transport": "ipc", "ip": str(Path(sockets) / "k")}})


def notebook_failure(what: str, notebook: Path, output: Path, error: Exception) -> str:
    """One line naming the run (or analysis), the notebook, the failing cell and the error."""
    if isinstance(error, PapermillExecutionError):
        detail = f"cell [{error.exec_count}] raised {error.ename}: {error.evalue}"
    else:
        detail = f"{type(error).__name__}: {error}"
    return f"{what}: notebook {notebook.name} failed, {detail} (executed copy: {output})"


def run_one(study: Study, run: PlannedRun) -> tuple[str | None, int]:
    """Execute the run notebook for one planned run: a failure message or None, and the kernels replaced."""
    notebook = resolve_path(study.run_notebook)
    output = run.run_dir / notebook.name
    try:
        if finished_and_current(run, study.smoke):
            log.info("study %s: %s is finished, skipped", study.name, run.label)
            return None, 0
    except ConfigError as error:
        return f"run {run.label}: finished with another config, not rerun (delete the directory to rerun): {error}", 0
    log.info("study %s: running %s", study.name, run.label)
    parameters = {"recipe": str(run.recipe), "seed": run.seed, "overrides": run.overrides,
                  "run_dir": str(run.run_dir), "smoke": study.smoke}
    try:
        return None, execute(notebook, output, parameters)
    except (PapermillExecutionError, DeadKernelError, KernelStartError) as error:  # this run fails, others go on
        return notebook_failure(f"run {run.label}", notebook, output, error), kernels_replaced(error)


def run_analysis(study: Study) -> tuple[list[str], int]:
    """Execute each analysis notebook into the study's runs_root: failure messages, and the kernels replaced."""
    root, failures, replaced = study_runs_root(study), [], 0
    tiny = {"tiny_runs_root": str(resolve_path(study.tiny_runs_root))} if study.tiny_runs_root else {}
    for path in study.analysis:
        notebook = resolve_path(path)
        output = root / notebook.name
        log.info("study %s: analysis %s", study.name, notebook.name)
        try:
            declared = declared_parameters(notebook)
            given = {k: v for k, v in {**study.analysis_parameters, **tiny}.items() if k in declared}
            replaced += execute(notebook, output, {**given, "runs_root": str(root)})
        except (PapermillExecutionError, DeadKernelError, KernelStartError) as error:
            failures.append(notebook_failure(f"analysis of study {study.name}", notebook, output, error))
            replaced += kernels_replaced(error)
    return failures, replaced


def declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's `parameters` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def check_inputs(study: Study, runs: list[PlannedRun]) -> None:
    """Missing files or unknown analysis parameters are input errors: refuse before running anything."""
    paths = [r.recipe for r in runs] + [resolve_path(p) for p in [study.run_notebook, *study.analysis]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"study {study.name}: files not found: {missing} "
                          f"(relative paths are relative to the project root {project_root()})")
    for run in runs:  # every run's config, environment and model, before the first run starts
        try:
            check_run_inputs(load_config(run.recipe, run_overrides(run.overrides, run.seed, study.smoke)))
        except ConfigError as error:
            raise ConfigError(f"study {study.name}, entry {run.entry} seed {run.seed}: {error}") from None
    declared = set().union(*(declared_parameters(resolve_path(p)) for p in study.analysis))
    unknown = sorted(set(study.analysis_parameters) - declared)
    if unknown:
        raise ConfigError(f"study {study.name}: analysis_parameters {unknown} are not parameters of any analysis "
                          f"notebook (declared: {sorted(declared)})")


def run_all(study: Study, runs: list[PlannedRun]) -> tuple[list[str], int]:
    """Every planned run, ``study.workers`` at a time, in plan order: failure messages in plan order, and
    how many kernels were replaced for not starting.

    A seed's first run trains the SFT model its other runs share, so those wait for it. Otherwise the
    next run started is the first one ready in plan order (entry by entry), so a study cut short has
    its first entries for every seed rather than every entry for its first seeds.
    """
    if study.workers == 1:
        outcomes = [run_one(study, run) for run in runs]
        return [message for message, _ in outcomes if message], sum(replaced for _, replaced in outcomes)
    first_of_seed = {run.seed: index for index, run in reversed(list(enumerate(runs)))}
    seeds_started: set[int] = set()  # seeds whose first run has finished (or failed)
    queue, in_flight, messages, replaced = list(enumerate(runs)), {}, {}, 0

    def startable(index: int, run: PlannedRun) -> bool:  # its seed's first run, or that one is done
        return first_of_seed[run.seed] == index or run.seed in seeds_started

    # Processes, not threads: each worker sets its kernels' thread count before starting them. The tiny
    # model's steps are too small for 2 threads to help much, so 2 one-thread runs beat one 2-thread run.
    threads = max(1, (os.cpu_count() or 1) // study.workers)
    with ProcessPoolExecutor(study.workers, initializer=limit_threads, initargs=(threads,)) as pool:
        while queue or in_flight:
            while len(in_flight) < study.workers:
                ready = next(((index, run) for index, run in queue if startable(index, run)), None)
                if ready is None:
                    break
                queue.remove(ready)
                in_flight[pool.submit(run_one, study, ready[1])] = ready
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                index, run = in_flight.pop(future)
                seeds_started.add(run.seed)
                message, kernels = future.result()
                replaced += kernels
                if message:
                    messages[index] = message
    return [messages[index] for index in sorted(messages)], replaced


def limit_threads(threads: int) -> None:
    """Worker initialiser: kernels started from this process inherit these thread limits."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    # Transparent huge pages for torch's large CPU tensors (the tiny model's logits are tens of MB per
    # step): without them two SFT runs took ~350k page faults/s each; with them ~15k, 1.14 vs 1.26-1.36 s
    # per step (one comparison, 2 runs x 1 thread, 2026-11-25).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def run_study(study_file: str | Path, only: list[str] | None = None, workers: int | None = None,
              analysis: bool = True, seeds: list[int] | None = None, runs: bool = True) -> int:
    """Run a study end to end; returns 0 when every run and notebook succeeded, 1 otherwise.

    ``analysis=False`` stops after the runs (no analysis notebooks, no figures): for a study run in parts.
    ``runs=False`` starts no run: the analyses of the runs already finished (after the parts).
    """
    study = load_study(study_file)
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        study.workers = workers
    logging.getLogger("papermill").setLevel(logging.WARNING)  # its per-notebook INFO lines drown the study's
    unknown = sorted(set(only or []) - {entry.name for entry in study.entries})
    if unknown:
        raise ConfigError(f"--only names unknown entries {unknown}; entries: {[e.name for e in study.entries]}")
    planned = plan(study)
    unplanned = sorted(set(seeds or []) - {r.seed for r in planned})
    if unplanned:
        raise ConfigError(f"--seeds names seeds the study does not plan: {unplanned}")
    selected = [r for r in planned if (not only or r.entry in only) and (not seeds or r.seed in seeds)] if runs else []
    check_inputs(study, selected)
    failures, replaced = run_all(study, selected)
    finished = any(is_finished(r.run_dir) for r in planned)
    if analysis and not finished:
        failures.append(f"study {study.name}: no finished run, analysis notebooks and figures skipped")
    elif analysis:
        analysis_failures, analysis_replaced = run_analysis(study)
        failures, replaced = failures + analysis_failures, replaced + analysis_replaced
        draw_figures(study)
    report(study, selected if runs else planned, failures, replaced)
    return 1 if failures else 0


def draw_figures(study: Study) -> None:
    if study.figures_dir is None:
        return
    from coevo_lib.figures import build_figures

    tiny = resolve_path(study.tiny_runs_root) if study.tiny_runs_root else None
    written = build_figures(study_runs_root(study), resolve_path(study.figures_dir), tiny)
    log.info("study %s: %d figure and table files under %s", study.name, len(written), study.figures_dir)


def report(study: Study, runs: list[PlannedRun], failures: list[str], replaced_kernels: int = 0) -> None:
    finished = sum(is_finished(r.run_dir) for r in runs)
    replaced = f"; {replaced_kernels} notebook kernels did not start and were replaced" if replaced_kernels else ""
    print(f"study {study.name}: {finished}/{len(runs)} runs finished under {study_runs_root(study)}{replaced}")
    for message in failures:
        print(f"FAILED {message}", file=sys.stderr)
