"""The other nodes of a multi-node run: ``python -m coevo_lib.train.follow <run dir> --machine-rank R``.

The coevo loop runs on node 0 and launches node 0's ranks of every training stage; on each other
node this process watches the run directory (a shared filesystem) and launches that node's ranks
of each stage attempt while node 0's launcher runs (``<run>/launch/<stage>/running``). All nodes read
the same accelerate config file (num_machines, main_process_ip, main_process_port) from
``train.accelerate_config`` in the run's config.yaml. It exits once the run's last stage is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

from coevo_lib.config import final_iteration
from coevo_lib.runs import RunDir
from coevo_lib.train.launch import launch_command

log = logging.getLogger(__name__)
POLL_S = 1.0


def pending_jobs(run: RunDir, launched: set[str]) -> list[Path]:
    """Job files whose attempt node 0 is running now and this node has not joined yet."""
    jobs = []
    for job_file in sorted(run.sub("launch").glob("*/job.json")):
        attempt = json.loads(job_file.read_text())["attempt"]
        if (job_file.parent / "running").exists() and attempt not in launched:
            jobs.append(job_file)
            launched.add(attempt)
    return jobs


def follow(run_dir: Path, machine_rank: int) -> None:
    run = RunDir(run_dir)
    while not run.config_path.exists():  # node 0 writes the run directory before any compute
        time.sleep(POLL_S)
    config = run.load_config()
    last_stage = f"it{final_iteration(config.method, config.loop.iterations)}-eval"
    launched: set[str] = set()
    while not run.is_done(last_stage):
        for job_file in pending_jobs(run, launched):
            log.info("joining %s as machine %d", job_file.parent.name, machine_rank)
            with (job_file.parent / f"launch-machine{machine_rank}.log").open("a") as log_file:
                code = subprocess.call(launch_command(config.train, job_file, machine_rank), stdout=log_file,
                                       stderr=subprocess.STDOUT)
            log.info("%s ended with code %d on machine %d", job_file.parent.name, code, machine_rank)
        time.sleep(POLL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--machine-rank", type=int, required=True, help="this node's rank (1 .. num_machines-1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    follow(args.run_dir, args.machine_rank)


if __name__ == "__main__":
    main()
