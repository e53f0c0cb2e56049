"""Behaviour cloning on expert trajectories with trl's SFTTrainer, loss on assistant tokens only.

The dataset is tokenised by coevo (``tokenize_conversation``) into ``input_ids`` and
``assistant_masks``; SFTTrainer turns the mask into -100 labels, so observations and prompts never
enter the loss, whatever the model's chat template looks like.
"""

from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from coevo_lib.config import SFTStageConfig
from coevo_lib.prompting import tokenize_conversation
from coevo_lib.records import Episode
from coevo_lib.train.common import (batch_accounting, compile_by_layer, run_quietly, score_labelled_tokens_only,
                                    step_losses, trainer_kwargs)


def sft_features(tokenizer, episodes: list[Episode], max_length: int) -> Dataset:
    rows = {"input_ids": [], "assistant_masks": []}
    for episode in episodes:
        ids, mask = tokenize_conversation(tokenizer, episode.messages, episode.prompt_messages)
        rows["input_ids"].append(ids[:max_length])
        rows["assistant_masks"].append(mask[:max_length])
    return Dataset.from_dict(rows)


def train_sft(model, tokenizer, episodes: list[Episode], stage: SFTStageConfig, output_dir: Path, seed: int,
              gradient_checkpointing: bool = True, cpu_bf16: bool = False, compile_layers: bool = False) -> dict:
    """Fine-tune ``model`` in place on ``episodes``; return accounting for metrics.jsonl."""
    return fit_sft(model, tokenizer, sft_features(tokenizer, episodes, stage.max_length), stage, output_dir, seed,
                   gradient_checkpointing=gradient_checkpointing, cpu_bf16=cpu_bf16, compile_layers=compile_layers)[1]


def fit_sft(model, tokenizer, dataset: Dataset, stage: SFTStageConfig, output_dir: Path, seed: int,
            processes: int = 1, device_type: str | None = None, gradient_checkpointing: bool = True,
            cpu_bf16: bool = False, compile_layers: bool = False) -> tuple[SFTTrainer, dict]:
    """SFT on tokenised ``dataset`` (one rank of ``processes``); the trainer and the stage's accounting."""
    kwargs = trainer_kwargs(stage, output_dir, seed, model, len(dataset), processes, device_type,
                            gradient_checkpointing, cpu_bf16, compile_layers)
    score_labelled_tokens_only()
    trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs, packing=False), train_dataset=dataset,
                         processing_class=tokenizer)
    compile_by_layer(trainer)
    start = time.time()
    output = run_quietly(trainer)
    return trainer, {
        "examples": len(dataset),
        "tokens_trained": int(sum(len(ids) for ids in dataset["input_ids"]) * stage.epochs),
        "assistant_tokens": int(sum(sum(m) for m in dataset["assistant_masks"])),
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "step_losses": step_losses(trainer),
        **batch_accounting(stage, processes),
        "wall_s": time.time() - start,
    }
