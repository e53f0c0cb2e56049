"""One rank of a launched SFT or DPO stage: ``python -m coevo_lib.train.worker <run>/launch/<name>/job.json``,
started on every rank by accelerate or torchrun (see coevo_lib.train.launch).

Every rank reads the same inputs from the run directory: the resolved config.yaml (the job names
its stage section), the start checkpoint and the examples. Rank 0 tokenises the examples once into
a file-backed dataset every rank loads; trl's DPOTrainer then caches the precomputed reference
log-probs next to it, so all ranks train against the same values. Only rank 0 writes: the
checkpoint (gathered to the ordinary Hugging Face layout under FSDP / ZeRO-3) and stats.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from datasets import Dataset, load_from_disk

from coevo_lib.models import computes_in_bf16, load_model, load_tokenizer, save_agent, training_dtype
from coevo_lib.records import read_episodes, read_pairs, write_json_atomic
from coevo_lib.runs import RunDir
from coevo_lib.seeding import quiet_libraries, seed_everything
from coevo_lib.train.dpo import fit_dpo, pairs_dataset
from coevo_lib.train.launch import section_config
from coevo_lib.train.sft import fit_sft, sft_features

WATCH_INTERVAL_S = 0.5


def exit_with_launcher() -> None:
    """SIGKILL this rank when its launcher dies: torchrun gives every rank a session of its own, so
    killing the stage's process group (or the coevo process) would otherwise leave ranks training."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(WATCH_INTERVAL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="exit-with-launcher").start()


def record_pid(job: dict[str, Any], state: PartialState) -> None:
    """<job>/ranks/<host>-<rank>.pid: the loop kills its own host's leftover ranks after a failure."""
    ranks = Path(job["dir"]) / "ranks"
    ranks.mkdir(exist_ok=True)
    (ranks / f"{socket.gethostname()}-{state.process_index}.pid").write_text(str(os.getpid()))


def is_sharded() -> bool:
    """FSDP or DeepSpeed (set by accelerate launch from the config file): parameters live in shards."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def rank_model_config(model_config, device_type: str):
    """Each rank's copy: on its own GPU for DDP; on the CPU (in the dtype it trains in on the GPU) when
    sharding will place it."""
    dtype = str(training_dtype(model_config, torch.device(device_type))).removeprefix("torch.")
    device = "cpu" if device_type == "cpu" or is_sharded() else f"cuda:{torch.cuda.current_device()}"
    return dataclasses.replace(model_config, device=device, dtype=dtype)


def shared_dataset(job: dict[str, Any], tokenizer, stage, state: PartialState) -> Dataset:
    """Tokenised by rank 0 into <job>/dataset, then read from disk by every rank."""
    path = Path(job["dir"]) / "dataset"
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            build_dataset(job, tokenizer, stage).save_to_disk(str(path))
    return load_from_disk(str(path))


def build_dataset(job: dict[str, Any], tokenizer, stage) -> Dataset:
    examples = Path(job["examples"])
    if job["kind"] == "sft":
        return sft_features(tokenizer, read_episodes(examples), stage.max_length)
    return pairs_dataset(tokenizer, read_pairs(examples))


@contextlib.contextmanager
def whole_models():
    """Load models unpartitioned inside a ZeRO-3 stage.

    While DeepSpeed's ZeRO-3 config is registered with transformers, from_pretrained partitions every
    model it builds (empty local tensors); the CPU copy that receives the gathered weights must be whole.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref  # a weak reference, or None outside DeepSpeed
    config = registered() if registered is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def save_trained(trainer, tokenizer, model_config, job: dict[str, Any]) -> None:
    """Rank 0 writes the trained model in the Hugging Face layout (with LoRA, the adapter, as save_agent does)."""
    accelerator = trainer.accelerator
    if not is_sharded():
        if accelerator.is_main_process:
            save_agent(accelerator.unwrap_model(trainer.model), tokenizer, Path(job["out"]))
        return
    # Collective: every rank sends its shards. DeepSpeed gathers through its engine (model_wrapped), not
    # the module inside it; for FSDP model_wrapped is the sharded model itself.
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        # The trained model's structure (a fresh or the start's adapter with LoRA) in the trained dtype.
        with whole_models():
            cpu_model = load_model(job["start"], dataclasses.replace(model_config, device="cpu"), trainable=True)
        # trl's DPO adds a frozen copy of a start adapter as the reference ('ref'); it is not part of the agent.
        cpu_model.load_state_dict({name: value for name, value in state_dict.items() if ".ref." not in name})
        save_agent(cpu_model, tokenizer, Path(job["out"]))


def train_job(job: dict[str, Any], state: PartialState) -> dict[str, Any]:
    config = RunDir(Path(job["run_dir"])).load_config()
    stage = section_config(config, job["stage_section"])
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    seed_everything(job["seed"])
    model_config = rank_model_config(config.model, device_type)
    model, tokenizer = load_model(job["start"], model_config, trainable=True), load_tokenizer(job["start"])
    dataset = shared_dataset(job, tokenizer, stage, state)
    fit = fit_sft if job["kind"] == "sft" else fit_dpo
    trainer, stats = fit(model, tokenizer, dataset, stage, Path(job["tb_dir"]), job["seed"],
                         processes=state.num_processes, device_type=device_type,
                         gradient_checkpointing=config.train.gradient_checkpointing,
                         cpu_bf16=computes_in_bf16(config.model, torch.device("cpu")),
                         compile_layers=config.train.compile)
    save_trained(trainer, tokenizer, model_config, job)
    return {**stats, "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1]}


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    if is_sharded() and not torch.cuda.is_available():
        # accelerate would quietly fall back to plain DDP on CPU ranks: refuse instead of mislabelling the run.
        raise SystemExit("coevo worker: FSDP / DeepSpeed accelerate configs need CUDA GPUs; on CPU use "
                         "train.accelerate_config=ddp (or none)")
    state = PartialState(cpu=not torch.cuda.is_available())
    exit_with_launcher()
    record_pid(job, state)
    quiet_libraries()
    stats = train_job(job, state)
    state.wait_for_everyone()  # the checkpoint is whole before rank 0 declares the stage finished
    if state.is_main_process:
        write_json_atomic(Path(job["dir"]) / "stats.json", stats)
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
