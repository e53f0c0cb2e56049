"""Run directories: the contract every stage reads and writes.

Layout (written before any compute)::

    <run>/config.yaml      resolved RunConfig
    <run>/env.json         git sha, package versions, the lock's sha256, device, CPU model, torch kernel level
    <run>/protocol.json    the environment's benchmark protocol: splits, step limits, reward rule (expert stage)
    <run>/metrics.jsonl    one JSON record per finished stage (idempotent: a stage logs once)
    <run>/episodes/        rollouts and evaluation episodes (JSONL)
    <run>/pairs/           preference pairs (JSONL)
    <run>/checkpoints/     one directory per agent and iteration
    <run>/stages/          <stage>.json done-markers
    <run>/tb/              TensorBoard logs of the trainers
    <run>/launch/          launched training stages: job, examples, launch.log (train.launcher != inprocess)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from coevo_lib.config import ConfigError, RunConfig, dump_config, from_dict
from coevo_lib.lockfile import lock_record
from coevo_lib.records import append_jsonl, read_jsonl, write_json_atomic

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "coevo")


@dataclass
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def sub(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def episodes(self, name: str) -> Path:
        return self.sub("episodes", f"{name}.jsonl")

    def pairs(self, name: str) -> Path:
        return self.sub("pairs", f"{name}.jsonl")

    def checkpoint(self, name: str) -> Path:
        return self.sub("checkpoints", name)

    def marker(self, stage: str) -> Path:
        return self.sub("stages", f"{stage}.json")

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def mark_done(self, stage: str, payload: dict[str, Any] | None = None) -> None:
        write_json_atomic(self.marker(stage), {"stage": stage, "finished_at": time.time(), **(payload or {})})

    def stage_result(self, stage: str) -> dict[str, Any]:
        return json.loads(self.marker(stage).read_text())

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append a metrics record unless one for the same stage is there (a rerun after a kill)."""
        if any(row.get("stage") == record["stage"] for row in read_jsonl(self.metrics_path)):
            return
        append_jsonl(self.metrics_path, [record])

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def load_config(self) -> RunConfig:
        return from_dict(RunConfig, yaml.safe_load(self.config_path.read_text()), "")


def default_run_dir(config: RunConfig) -> Path:
    return Path(config.runs_root) / f"{config.name}-seed{config.seed}"


def init_run_dir(config: RunConfig, path: Path) -> RunDir:
    """Create (or reopen) a run directory; refuse to resume one whose config differs.

    The one difference accepted is a larger ``loop.iterations``: every stage of an iteration depends
    only on earlier ones, so the finished iterations stay valid and the run is extended in place."""
    run = RunDir(path)
    if run.config_path.exists():
        if compare_config(run, config) == "extends":
            log.info("extending %s to %d iterations", run.path, config.loop.iterations)
            atomic_write_text(run.config_path, dump_config(config))
    else:
        for sub in ("episodes", "pairs", "checkpoints", "stages", "tb"):
            run.sub(sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config_path, dump_config(config))
    if not run.sub("env.json").exists():
        write_json_atomic(run.sub("env.json"), environment_info(config))
    return run


def compare_config(run: RunDir, config: RunConfig) -> str:
    """'same', or 'extends' when only loop.iterations grew; any other difference raises ConfigError."""
    # train.* says how stages are launched, not what they compute: a run may resume on more or fewer ranks.
    saved = {**saved_with_defaults(run), "train": None}
    current = {**yaml.safe_load(dump_config(config)), "train": None}
    diffs = sorted(flatten_diff(saved, current))
    if not diffs:
        return "same"
    # Extending: the saved config with the new iteration count is the current one, and the count grew.
    saved_loop = saved.get("loop", {})
    with_new_count = {**saved, "loop": {**saved_loop, "iterations": config.loop.iterations}}
    if not flatten_diff(with_new_count, current) and config.loop.iterations > saved_loop.get("iterations", 0):
        return "extends"
    raise ConfigError(
        f"run directory {run.path} was started with a different config (first difference: {diffs[0]}); "
        "use a new --run-dir or the same recipe and overrides (only loop.iterations may grow)"
    )


def saved_with_defaults(run: RunDir) -> dict[str, Any]:
    """The run's saved config with the keys added to coevo since it was written, at their defaults.

    New keys default to the behaviour from before they existed, so a run started earlier resumes and
    compares as before; a saved config that no longer loads (a key since removed) is compared as saved."""
    try:
        return yaml.safe_load(dump_config(run.load_config()))
    except ConfigError:
        return yaml.safe_load(run.config_path.read_text())


def flatten_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return [d for k in keys for d in flatten_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)


def environment_info(config: RunConfig) -> dict[str, Any]:
    import torch

    return {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        # the lock make setup installed (sha256 of locks/<extras>.txt) and where this environment differs from it
        "lock": lock_record(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Runs repeated on another CPU differ by float rounding (other kernels): record which one ran.
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform knows, possibly "")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_sha() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    return result.stdout.strip() if result.returncode == 0 else None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def link_tree(source: Path, target: Path) -> None:
    """Copy a checkpoint directory as hard links, falling back to copies across file systems.

    A study's runs start from the same shared SFT model (517 MB for SmolLM2 in float32); linking keeps one
    copy on disk. Safe because checkpoint files are never written in place: a stage builds a new directory
    (atomic_dir) and set_adapter_base replaces the adapter config rather than rewriting it.
    """
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:  # another file system (EXDEV) or links not allowed: plain copies
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build a directory under a temp name and rename it into place, so a checkpoint is whole or absent."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    build(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
