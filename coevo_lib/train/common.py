"""Settings shared by the SFT and DPO stages: trl config arguments and parameter bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import trl.trainer.utils as trl_utils

_TRL_USE_TRITON = trl_utils._use_triton  # trl's own choice of fused-head mode, kept for other devices


def _compact_on_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or _TRL_USE_TRITON(device)


def score_labelled_tokens_only() -> None:
    """Make trl's fused LM head project only the positions that carry a label on CPU too.

    trl 1.16's fused head (SFT and DPO, policy and reference) scores only labelled positions on
    Triton devices and every position elsewhere, so that XLA-like devices keep one tile shape. On
    CPU nothing is compiled, and the unlabelled positions (prompt, observations, padding: over 70%
    of a minishop pair's tokens) only cost time: the head is most of a tiny model's step, and one DPO
    stage of the results study ran 2.4x faster with this (bench/precision.py, `all-positions`
    rows). The labelled positions get the same values up to float rounding (the matmuls' row
    count differs). trl picks the mode through its module-level ``_use_triton``, which this
    replaces; tests/test_training.py fails if trl stops reading it.
    """
    trl_utils._use_triton = _compact_on_cpu


def warmup_steps(stage, n_examples: int) -> int:
    """Whole warmup steps, rounded down: transformers rounds a ratio up, so a 3% warmup of a
    10-step stage would spend its first step at learning rate 0 (and a 1-step stage all of it)."""
    steps_per_epoch = math.ceil(n_examples / (stage.batch_size * stage.grad_accum))
    return int(stage.warmup_ratio * steps_per_epoch * stage.epochs)


def per_device_batch(stage, processes: int) -> int:
    """``stage.batch_size`` is the global batch: each of ``processes`` ranks takes an equal share."""
    if stage.batch_size % processes:
        raise ValueError(f"batch_size {stage.batch_size} does not divide over {processes} processes")
    return stage.batch_size // processes


def batch_accounting(stage, processes: int) -> dict[str, int]:
    """What a stage's stats record about its batch: per device x processes x accumulation = effective."""
    per_device = per_device_batch(stage, processes)
    return {"per_device_batch": per_device, "processes": processes, "grad_accum": stage.grad_accum,
            "effective_batch": per_device * processes * stage.grad_accum}


def step_losses(trainer) -> list[float]:
    """The training loss of every optimiser step (logging_steps=1; under DDP the mean over ranks)."""
    return [round(row["loss"], 6) for row in trainer.state.log_history if "loss" in row]


def trainer_kwargs(stage, output_dir: Path, seed: int, model, n_examples: int, processes: int = 1,
                   device_type: str | None = None, gradient_checkpointing: bool = True,
                   cpu_bf16: bool = False, compile_layers: bool = False) -> dict[str, Any]:
    """Arguments common to SFTConfig and DPOConfig from a coevo stage config.

    Checkpoints are written by coevo itself (one per agent and iteration), so trl saves nothing;
    TensorBoard logs land under the run directory. ``device_type`` is where training runs when the
    model is not there yet (a sharded stage loads weights on the CPU first). ``gradient_checkpointing``
    is ``train.gradient_checkpointing``: trl turns it on by default, which only trades compute for memory.
    ``cpu_bf16`` (models.computes_in_bf16: model.cpu_bf16 on a CPU with native bf16) autocasts to bf16 on CPU.
    ``compile_layers`` is ``train.compile``: the Trainer compiles the model (see compile_by_layer).
    """
    on_gpu = (device_type or next(model.parameters()).device.type) == "cuda"
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": stage.epochs,
        "per_device_train_batch_size": per_device_batch(stage, processes),
        "gradient_accumulation_steps": stage.grad_accum,
        "learning_rate": stage.learning_rate,
        "lr_scheduler_type": stage.lr_scheduler,
        "weight_decay": stage.weight_decay,
        "warmup_steps": warmup_steps(stage, n_examples),
        "max_length": stage.max_length,
        "seed": seed,
        "data_seed": seed,
        "save_strategy": "no",
        "logging_steps": 1,  # per-step losses in the stage stats (compared across process counts)
        "report_to": ["tensorboard"],
        # On GPU compute in bf16: autocast over float32 master weights (full fine-tuning, see
        # models.training_dtype), or bf16 weights as loaded (a LoRA base, an explicit model.dtype). On a CPU
        # with AMX / AVX512-BF16 the same, when asked: SmolLM2's SFT step 2.1x faster than float32.
        "bf16": (on_gpu and torch.cuda.is_bf16_supported()) or (not on_gpu and cpu_bf16),
        "use_cpu": not on_gpu,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": gradient_checkpointing,
        "torch_compile": compile_layers,
    }


def compile_by_layer(trainer) -> None:
    """Make the Trainer's torch.compile compile each repeated block (decoder layer) instead of the whole model.

    accelerate compiles one layer and reuses it for the other 29 of SmolLM2: its first two steps took
    28 + 31 s against 95 + 148 s with the whole model compiled, the same step time afterwards (a loaded
    machine: docs/pretrained-models.md). transformers' TrainingArguments cannot ask for it, and accelerate reads the
    flag only when train() prepares the model, so it is set on the trainer's plugin before that."""
    if trainer.args.torch_compile:
        trainer.accelerator.state.dynamo_plugin.use_regional_compilation = True


def parameters_snapshot(model, device: str | None = None) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, on ``device`` (default: where they are; "cpu" spares GPU memory)."""
    return {name: p.detach().to(device or p.device, copy=True) for name, p in model.named_parameters()
            if p.requires_grad}


def changed_parameters(model, before: dict[str, torch.Tensor]) -> int:
    """How many trainable tensors differ from the snapshot (tests assert this is > 0)."""
    return sum(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters() if name in before)


def changed_share(model, before: dict[str, torch.Tensor]) -> float:
    """Share of the snapshot's elements that differ now (an update below bf16's rounding changes none)."""
    pairs = [(p.detach().to(before[name].device), before[name]) for name, p in model.named_parameters()
             if name in before]
    return sum(int((p != b).sum()) for p, b in pairs) / sum(b.numel() for _, b in pairs)


def run_quietly(trainer):
    """Train without trl/transformers printing a dict per log step (TensorBoard has them); coevo's
    progress bar (named after the stage's output folder, e.g. it1-train-target) shows steps and loss."""
    from transformers.trainer_callback import PrinterCallback

    from coevo_lib.train.progress_callback import TrainingProgress

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress(Path(trainer.args.output_dir).name))
    return trainer.train()
