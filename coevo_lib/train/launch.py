"""SFT and DPO stages as launchable units: the loop writes a job into ``<run>/launch/<name>/`` and runs
``coevo_lib.train.worker`` on N ranks under ``accelerate launch`` or ``torchrun``, as a subprocess.

The subprocess always lives outside the coevo process (and so outside any notebook kernel): its own
session and process group, its output streamed to ``launch.log`` next to the job. Rank 0 writes the
checkpoint into the loop's temp directory and the stats into ``stats.json``; the loop renames the
checkpoint and marks the stage done only when the launcher exits 0 with stats written. A rank or
launcher that dies leaves neither, so a rerun starts the stage again.

    <run>/launch/<name>/job.json      what to train: kind, stage config section, start, examples, seed, out
    <run>/launch/<name>/examples.jsonl the episodes (SFT) or pairs (DPO) to train on
    <run>/launch/<name>/launch.log    the launcher's and every rank's output, one header per attempt
    <run>/launch/<name>/ranks/        <host>-<rank>.pid per rank (this host's are killed if the launcher fails)
    <run>/launch/<name>/stats.json    rank 0's stage accounting (written last)
    <run>/launch/<name>/running       present while the launcher runs (other nodes join it)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from coevo_lib.config import TrainLaunchConfig
from coevo_lib.records import write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
TERMINATE_GRACE_S = 10.0


class StageLaunchError(RuntimeError):
    """A launched stage ended without a checkpoint (a rank died, the launcher was killed or failed)."""


def section_config(config, section: str):
    """``"loop.failure_dpo"`` -> config.loop.failure_dpo: the job names its stage config by its key."""
    return functools.reduce(getattr, section.split("."), config)


def accelerate_config_file(name: str | None) -> Path | None:
    if name is None:
        return None
    shipped = ACCELERATE_CONFIG_DIR / f"{name}.yaml"
    return shipped if shipped.is_file() else Path(name).resolve()


def machines(config_file: Path | None) -> int:
    return int(yaml.safe_load(config_file.read_text()).get("num_machines", 1)) if config_file else 1


def launch_command(train: TrainLaunchConfig, job_file: Path, machine_rank: int = 0) -> list[str]:
    """The launcher's argv: the venv's own python runs accelerate or torchrun, which start the ranks.

    A multi-node accelerate config file (num_machines > 1, main_process_ip) is launched as this
    node's share, ``machine_rank``; the other nodes run ``coevo_lib.train.follow`` (same file, same port).

    On one node without train.main_process_port, the launcher's rendezvous store binds a free port itself
    (torchrun --standalone, accelerate's port 0). A port picked here and handed over could be taken in
    between by another study worker's stage, and the stage would die of EADDRINUSE.
    """
    worker = ["-m", "coevo_lib.train.worker", str(job_file)]
    processes = str(train.num_processes)
    if train.launcher == "torchrun":
        port = ["--master_port", str(train.main_process_port)] if train.main_process_port else ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", processes,
                *port, *worker]
    config_file = accelerate_config_file(train.accelerate_config)
    if machines(config_file) > 1:  # every node must meet on the file's (or train's) fixed port
        port = ["--main_process_port", str(train.main_process_port)] if train.main_process_port else []
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                "--num_processes", processes, "--machine_rank", str(machine_rank), *port, *worker]
    # No file: plain DDP ("--multi_gpu" also starts N gloo ranks on a CPU-only machine).
    setup = ["--config_file", str(config_file)] if config_file else [
        *(["--multi_gpu"] if train.num_processes > 1 else []), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *setup, "--num_processes", processes,
            "--num_machines", "1", "--main_process_port", str(train.main_process_port or 0), *worker]


def die_with_parent() -> None:
    """Runs in the launcher before exec: SIGKILL it when the coevo process dies (Linux), so no stage
    outlives a killed run; its ranks follow (they watch their parent, see coevo_lib.train.worker)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def write_job(job_dir: Path, job: dict[str, Any], examples: list[Any]) -> Path:
    """A fresh job directory for this attempt; the log is kept across attempts."""
    for stale in ("stats.json", "examples.jsonl"):
        (job_dir / stale).unlink(missing_ok=True)
    for pid_file in (job_dir / "ranks").glob("*.pid"):
        pid_file.unlink()
    write_jsonl_atomic(job_dir / "examples.jsonl", examples)
    job_file = job_dir / "job.json"
    write_json_atomic(job_file, {**job, "dir": str(job_dir.resolve()), "examples": str(job_dir / "examples.jsonl"),
                                 "attempt": f"{time.time():.6f}"})  # followers launch each attempt once
    return job_file


def run_stage(train: TrainLaunchConfig, job_dir: Path, job: dict[str, Any], examples: list[Any]) -> dict[str, Any]:
    """Run ``job`` on ``train.num_processes`` ranks and return rank 0's stats; StageLaunchError otherwise."""
    job_file = write_job(job_dir, job, examples)
    command = launch_command(train, job_file)
    log_path = job_dir / "launch.log"
    log.info("stage %s: %s (log: %s)", job_dir.name, " ".join(command), log_path)
    with log_path.open("a") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        (job_dir / "launcher.pid").write_text(str(process.pid))
        (job_dir / "running").touch()  # what follower nodes join
        code = None
        try:
            code = process.wait()
        finally:
            (job_dir / "running").unlink(missing_ok=True)
            if code != 0:  # failed, killed, or interrupted here (KeyboardInterrupt in a notebook)
                end_stage(process, job_dir)
    stats_path = job_dir / "stats.json"
    if code != 0 or not stats_path.exists():
        raise StageLaunchError(f"stage {job_dir.name}: {train.launcher} exited with code {code} "
                               f"({'stats written' if stats_path.exists() else 'no stats'}); see {log_path}")
    return json.loads(stats_path.read_text())


def end_stage(process: subprocess.Popen, job_dir: Path) -> None:
    """Terminate the launcher's process group (SIGTERM, then SIGKILL) and any rank still running.

    torchrun starts each rank in a session of its own, so the ranks are killed by the pids they wrote."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid_file in (job_dir / "ranks").glob(f"{socket.gethostname()}-*.pid"):  # other nodes' pids mean nothing here
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            log.warning("stage %s: killed leftover rank %s", job_dir.name, pid_file.stem)
