"""Observation-masked multi-turn DPO on trl's DPOTrainer (a small subclass, not a fork).

trl 1.16 marks every token after the prompt as completion, so environment observations between
assistant turns would enter log pi(e|u). Here each pair is tokenised by coevo with an assistant
mask (``chosen_mask`` / ``rejected_mask``) and the collator uses that mask as trl's
``completion_mask``: policy and reference log-probs then sum over assistant tokens only, as in
ETO's multi-turn DPO. Everything else (loss, reference precompute, logging) is trl's.

Target loss (PAPER.md, step 5): lambda_DPO * DPO + lambda_SFT * SFT(chosen). trl's "sft" term is
a token mean; the ETO-lineage "sum" reduction (summed NLL per trajectory, batch mean) is the same
term times (chosen assistant tokens in the batch / batch size), applied per batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from coevo_lib.config import DPOStageConfig
from coevo_lib.prompting import render_ids, tokenize_conversation
from coevo_lib.records import Pair
from coevo_lib.train.common import (batch_accounting, compile_by_layer, run_quietly, score_labelled_tokens_only,
                                    step_losses, trainer_kwargs)

MASK_COLUMNS = ("chosen_mask", "rejected_mask")


def pair_features(tokenizer, prompt_messages, chosen_messages, rejected_messages) -> dict[str, list[int]]:
    """trl's preference columns plus per-token assistant masks of both completions."""
    prompt_len = len(render_ids(tokenizer, prompt_messages))
    chosen_ids, chosen_mask = tokenize_conversation(tokenizer, prompt_messages + chosen_messages)
    rejected_ids, rejected_mask = tokenize_conversation(tokenizer, prompt_messages + rejected_messages)
    if chosen_ids[:prompt_len] != rejected_ids[:prompt_len]:
        raise ValueError("chosen and rejected do not share the tokenised prompt")
    return {
        "prompt_ids": chosen_ids[:prompt_len],
        "chosen_ids": chosen_ids[prompt_len:],
        "rejected_ids": rejected_ids[prompt_len:],
        "chosen_mask": chosen_mask[prompt_len:],
        "rejected_mask": rejected_mask[prompt_len:],
    }


def pairs_dataset(tokenizer, pairs: list[Pair]) -> Dataset:
    rows = [pair_features(tokenizer, p.prompt_messages, p.chosen_messages, p.rejected_messages) for p in pairs]
    return Dataset.from_list(rows)


class AssistantMaskCollator(DataCollatorForPreference):
    """trl's preference collator with ``completion_mask`` set from the assistant masks."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        masks = [[0] * len(e["prompt_ids"]) + list(e[col]) for col in MASK_COLUMNS for e in examples]
        if self.max_length is not None:
            masks = [m[: self.max_length] for m in masks]  # keep_start, like the parent
        width = output["completion_mask"].shape[1]
        output["completion_mask"] = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
        return output


class MaskedDPOTrainer(DPOTrainer):
    """DPOTrainer whose completion log-probs cover assistant tokens only; optional summed SFT term."""

    def __init__(self, *args, sft_reduction: str = "token_mean", sft_weight: float = 0.0, **kwargs):
        self.sft_reduction, self.sft_weight = sft_reduction, sft_weight
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already tokenised by pair_features, with masks trl's tokeniser cannot produce.
        if "chosen_mask" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *MASK_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "sft" in self.loss_types and self.sft_reduction == "sum":
            chosen_mask = inputs["completion_mask"].chunk(2, dim=0)[0]
            tokens_per_sequence = chosen_mask[:, 1:].sum().item() / chosen_mask.shape[0]
            self.loss_weights[self.loss_types.index("sft")] = self.sft_weight * tokens_per_sequence
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def dpo_loss_terms(stage: DPOStageConfig) -> tuple[list[str], list[float]]:
    """trl loss types and weights for lambda_DPO * DPO + lambda_SFT * SFT (SFT omitted when 0)."""
    if stage.lambda_sft == 0:
        return ["sigmoid"], [stage.lambda_dpo]
    return ["sigmoid", "sft"], [stage.lambda_dpo, stage.lambda_sft]


def build_dpo_trainer(model, tokenizer, dataset: Dataset, stage: DPOStageConfig, output_dir: Path, seed: int,
                      ref_model=None, precompute_ref: bool = True, processes: int = 1,
                      device_type: str | None = None, gradient_checkpointing: bool = True,
                      cpu_bf16: bool = False, compile_layers: bool = False) -> MaskedDPOTrainer:
    loss_types, loss_weights = dpo_loss_terms(stage)
    kwargs = trainer_kwargs(stage, output_dir, seed, model, len(dataset), processes, device_type,
                            gradient_checkpointing, cpu_bf16, compile_layers)
    args = DPOConfig(
        **kwargs, beta=stage.beta, loss_type=loss_types, loss_weights=loss_weights,
        precompute_ref_log_probs=precompute_ref and ref_model is None,
        precompute_ref_batch_size=kwargs["per_device_train_batch_size"],
    )
    score_labelled_tokens_only()
    collator = AssistantMaskCollator(pad_token_id=tokenizer.pad_token_id, max_length=stage.max_length)
    trainer = MaskedDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collator, sft_reduction=stage.sft_reduction, sft_weight=stage.lambda_sft,
    )
    compile_by_layer(trainer)
    return trainer


def train_dpo(model, tokenizer, pairs: list[Pair], stage: DPOStageConfig, output_dir: Path, seed: int,
              gradient_checkpointing: bool = True, cpu_bf16: bool = False, compile_layers: bool = False) -> dict:
    """DPO in place on ``pairs``; the reference is ``model`` as it is now (the start of the iteration)."""
    if not pairs:
        return {"pairs": 0, "steps": 0, "tokens_trained": 0, "wall_s": 0.0, "train_loss": None}
    return fit_dpo(model, tokenizer, pairs_dataset(tokenizer, pairs), stage, output_dir, seed,
                   gradient_checkpointing=gradient_checkpointing, cpu_bf16=cpu_bf16, compile_layers=compile_layers)[1]


def fit_dpo(model, tokenizer, dataset: Dataset, stage: DPOStageConfig, output_dir: Path, seed: int,
            processes: int = 1, device_type: str | None = None,
            gradient_checkpointing: bool = True, cpu_bf16: bool = False,
            compile_layers: bool = False) -> tuple[MaskedDPOTrainer, dict]:
    """DPO on tokenised pairs (one rank of ``processes``). Under several ranks ``dataset`` must be
    file-backed (``load_from_disk``): trl caches the reference log-probs next to its files, which
    every rank then reads; an in-memory dataset's cache name is random per process."""
    start = time.time()
    trainer = build_dpo_trainer(model, tokenizer, dataset, stage, output_dir, seed, processes=processes,
                                device_type=device_type, gradient_checkpointing=gradient_checkpointing,
                                cpu_bf16=cpu_bf16, compile_layers=compile_layers)
    output = run_quietly(trainer)
    sequence_tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in dataset)
    return trainer, {
        "pairs": len(dataset),
        "steps": trainer.state.global_step,
        "tokens_trained": int(sequence_tokens * stage.epochs),
        "train_loss": output.training_loss,
        "step_losses": step_losses(trainer),
        **batch_accounting(stage, processes),
        "wall_s": time.time() - start,
    }


@torch.no_grad()
def sequence_logps(model, tokenizer, prompt_messages, completion_messages) -> float:
    """Summed log-prob of the assistant tokens of ``completion_messages`` given all that precedes them.

    Uses the same tokenisation and mask as MaskedDPOTrainer, so it equals the trainer's
    policy_chosen_logps for a pair whose chosen side is ``completion_messages``.
    """
    features = pair_features(tokenizer, prompt_messages, completion_messages, completion_messages)
    ids = torch.tensor([features["prompt_ids"] + features["chosen_ids"]], device=model.device)
    mask = torch.tensor([[0] * len(features["prompt_ids"]) + features["chosen_mask"]], device=model.device)
    logits = model(input_ids=ids).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float((token_logps * mask[:, 1:]).sum())
