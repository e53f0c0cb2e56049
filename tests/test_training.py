"""Tiny-model training steps, assistant-only masks, and sequence_logps against an independent computation."""

import copy
import math

import torch
from transformers import LlamaForCausalLM

from coevo_lib.config import DPOStageConfig, LoraConfig, ModelConfig, SFTStageConfig
from coevo_lib import models
from coevo_lib.models import computes_in_bf16, resolve_dtype, training_dtype
from coevo_lib.prompting import tokenize_conversation
from coevo_lib.train import sequence_logps, train_dpo, train_sft
from coevo_lib.train.common import changed_parameters, changed_share, parameters_snapshot, trainer_kwargs
from coevo_lib.train.dpo import AssistantMaskCollator, build_dpo_trainer, pair_features, pairs_dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference

from conftest import conversation, make_episode


def test_assistant_mask_covers_exactly_assistant_text(tiny_tokenizer):
    messages = conversation("buy a red mug", [("search[red mug]", "OBSERVATION-ONE"), ("click[buy now]", "")])
    ids, mask = tokenize_conversation(tiny_tokenizer, messages)
    assistant_text = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert assistant_text == expected
    assert "OBSERVATION" not in assistant_text and "Instruction" not in assistant_text


def test_sft_step_changes_parameters(tiny_model, tiny_tokenizer, tmp_path):
    before = parameters_snapshot(tiny_model)
    stage = SFTStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, max_length=256)
    stats = train_sft(tiny_model, tiny_tokenizer, sft_episodes(), stage, tmp_path, seed=0)
    assert stats["steps"] == 2 and math.isfinite(stats["train_loss"])
    assert changed_parameters(tiny_model, before) > 0


def test_dpo_step_changes_parameters_with_finite_loss(tiny_model, tiny_tokenizer, shop_pairs, tmp_path):
    before = parameters_snapshot(tiny_model)
    stage = DPOStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, max_length=256, warmup_ratio=0.0)
    stats = train_dpo(tiny_model, tiny_tokenizer, shop_pairs, stage, tmp_path, seed=0)
    assert stats["steps"] == 1 and math.isfinite(stats["train_loss"])
    assert changed_parameters(tiny_model, before) > 0


def independent_logps(model, tokenizer, prompt, completion) -> float:
    """Tokenise ChatML segment by segment (special tokens split BPE), sum assistant-token log-probs."""
    ids, scored = [], []
    for message in prompt + completion:
        head = tokenizer.encode(f"<|im_start|>{message['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(f"{message['content']}<|im_end|>", add_special_tokens=False)
        tail = tokenizer.encode("\n", add_special_tokens=False)
        is_assistant = message["role"] == "assistant"
        ids += head + body + tail
        scored += [False] * len(head) + [is_assistant] * len(body) + [False] * len(tail)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)) if scored[i])


def test_sequence_logps_matches_independent_computation(tiny_model, tiny_tokenizer, shop_pairs):
    pair = shop_pairs[0]
    ours = sequence_logps(tiny_model, tiny_tokenizer, pair.prompt_messages, pair.chosen_messages)
    theirs = independent_logps(tiny_model, tiny_tokenizer, pair.prompt_messages, pair.chosen_messages)
    assert abs(ours - theirs) < 1e-3 * max(1.0, abs(theirs))


def test_trainer_masks_observations_and_matches_sequence_logps(tiny_model, tiny_tokenizer, shop_pairs, tmp_path):
    """The trainer's completion mask is assistant-only and its log-probs equal sequence_logps."""
    features = pair_features(tiny_tokenizer, shop_pairs[0].prompt_messages, shop_pairs[0].chosen_messages,
                             shop_pairs[0].rejected_messages)
    collator = AssistantMaskCollator(pad_token_id=tiny_tokenizer.pad_token_id)
    batch = collator([features])
    stock = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)([features])
    ids, mask = batch["input_ids"][0], batch["completion_mask"][0]
    masked_text = tiny_tokenizer.decode(ids[mask.bool()])
    assert "blue mug" not in masked_text and "[B0AAAA] red mug" not in masked_text  # observations never scored
    assert stock["completion_mask"].sum() > batch["completion_mask"].sum()  # stock trl would score them

    trainer = build_dpo_trainer(tiny_model, tiny_tokenizer, pairs_dataset(tiny_tokenizer, shop_pairs[:1]),
                                DPOStageConfig(batch_size=1), tmp_path, seed=0, precompute_ref=False,
                                ref_model=copy.deepcopy(tiny_model))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    pair = shop_pairs[0]
    expected_chosen = sequence_logps(tiny_model, tiny_tokenizer, pair.prompt_messages, pair.chosen_messages)
    expected_rejected = sequence_logps(tiny_model, tiny_tokenizer, pair.prompt_messages, pair.rejected_messages)
    assert abs(chosen.item() - expected_chosen) < 1e-3 * abs(expected_chosen)
    assert abs(rejected.item() - expected_rejected) < 1e-3 * abs(expected_rejected)


def test_sum_reduction_scales_sft_term_by_tokens_per_sequence(tiny_model, tiny_tokenizer, shop_pairs, tmp_path):
    stage = DPOStageConfig(batch_size=2, lambda_dpo=0.5, lambda_sft=0.5, sft_reduction="sum")
    trainer = build_dpo_trainer(tiny_model, tiny_tokenizer, pairs_dataset(tiny_tokenizer, shop_pairs), stage,
                                tmp_path, seed=0, precompute_ref=False, ref_model=copy.deepcopy(tiny_model))
    batch = trainer.data_collator([pair_features(tiny_tokenizer, p.prompt_messages, p.chosen_messages,
                                                 p.rejected_messages) for p in shop_pairs])
    trainer.compute_loss(tiny_model, batch)
    chosen_tokens = batch["completion_mask"].chunk(2)[0][:, 1:].sum().item() / 2
    assert trainer.loss_weights == [0.5, 0.5 * chosen_tokens]
    assert isinstance(tiny_model, LlamaForCausalLM)


def test_gradient_checkpointing_is_passed_to_trl_and_leaves_the_weights_unchanged(tiny_model, tiny_tokenizer,
                                                                                   shop_pairs, tmp_path):
    """train.gradient_checkpointing only trades compute for memory: trained weights are the same bit for bit."""
    stage = DPOStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, max_length=256, warmup_ratio=0.0)
    sft_stage = SFTStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, max_length=256)
    for flag in (True, False):
        trainer = build_dpo_trainer(copy.deepcopy(tiny_model), tiny_tokenizer,
                                    pairs_dataset(tiny_tokenizer, shop_pairs), stage, tmp_path / str(flag), seed=0,
                                    gradient_checkpointing=flag)
        assert trainer.args.gradient_checkpointing is flag
    trained = {}
    for flag in (True, False):
        model = copy.deepcopy(tiny_model)
        train_dpo(model, tiny_tokenizer, shop_pairs, stage, tmp_path / f"dpo-{flag}", seed=0,
                  gradient_checkpointing=flag)
        train_sft(model, tiny_tokenizer, sft_episodes(), sft_stage, tmp_path / f"sft-{flag}", seed=0,
                  gradient_checkpointing=flag)
        trained[flag] = parameters_snapshot(model)
    assert changed_parameters(tiny_model, trained[False]) > 0
    assert all(torch.equal(trained[True][name], trained[False][name]) for name in trained[True])


def test_compile_compiles_each_decoder_layer_and_trains_the_same_weights(tiny_model, tiny_tokenizer, shop_pairs,
                                                                          tmp_path):
    """train.compile: the Trainer compiles layer by layer (accelerate's regional compilation) and the trained
    weights match eager training up to float rounding (inductor fuses, so the sums run in another order)."""
    stage = DPOStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, max_length=256, warmup_ratio=0.0)
    trained = {}
    for flag in (False, True):
        model = copy.deepcopy(tiny_model)
        trainer = build_dpo_trainer(model, tiny_tokenizer, pairs_dataset(tiny_tokenizer, shop_pairs), stage,
                                    tmp_path / f"dpo-{flag}", seed=0, compile_layers=flag)
        assert trainer.args.torch_compile is flag
        trainer.train()
        compiled = [type(layer).__name__ == "OptimizedModule"
                    for layer in trainer.model_wrapped.model.layers]
        assert compiled == [flag] * len(tiny_model.model.layers)
        assert not any(name.startswith("_orig_mod") or "._orig_mod." in name
                       for name in model.state_dict())  # what coevo saves keeps its plain names
        trained[flag] = parameters_snapshot(model)
    start = parameters_snapshot(tiny_model)
    assert changed_parameters(tiny_model, trained[True]) > 0
    # Adam normalises each update, so a gradient near 0 may round to the other sign: compare the whole update.
    update = torch.cat([(trained[False][n] - start[n]).flatten() for n in start]).norm()
    gap = torch.cat([(trained[True][n] - trained[False][n]).flatten() for n in start]).norm()
    assert gap < 0.01 * update


def sft_episodes():
    return [make_episode("e", "buy a red mug", [("search[red mug]", "ok"), ("click[buy now]", "")], 1.0)] * 4


def test_full_fine_tuning_trains_float32_master_weights_and_lora_keeps_the_base_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert training_dtype(ModelConfig(), cuda) == torch.float32  # bf16 compute comes from autocast
    assert training_dtype(ModelConfig(), cpu) == torch.float32
    assert training_dtype(ModelConfig(lora=LoraConfig(enabled=True)), cuda) == torch.bfloat16  # frozen base
    assert training_dtype(ModelConfig(lora=LoraConfig(enabled=True)), cpu) == torch.float32
    assert training_dtype(ModelConfig(dtype="bfloat16"), cuda) == torch.bfloat16  # explicit: pure bf16


def test_cpu_bf16_computes_in_bf16_only_where_the_cpu_has_it_natively(monkeypatch, tiny_model, tmp_path):
    cpu, asked = torch.device("cpu"), ModelConfig(cpu_bf16=True)
    for native in (True, False):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda native=native: native)
        assert computes_in_bf16(asked, cpu) is native
        assert resolve_dtype(asked, cpu) == (torch.bfloat16 if native else torch.float32)  # generation weights
        assert training_dtype(asked, cpu) == torch.float32  # master weights; autocast computes in bf16
        assert computes_in_bf16(ModelConfig(), cpu) is False  # the default stays float32 (the tiny model's studies)
    stage = SFTStageConfig()
    assert trainer_kwargs(stage, tmp_path, 0, tiny_model, 8, cpu_bf16=True)["bf16"] is True
    assert trainer_kwargs(stage, tmp_path, 0, tiny_model, 8)["bf16"] is False


def test_changed_share_counts_elements_against_a_snapshot_kept_on_another_device(tiny_model):
    before = parameters_snapshot(tiny_model, "cpu")
    with torch.no_grad():
        next(tiny_model.parameters()).view(-1)[:3] += 1.0
    total = sum(b.numel() for b in before.values())
    assert changed_share(tiny_model, before) == 3 / total and changed_parameters(tiny_model, before) == 1


def test_fused_head_scores_only_labelled_positions_on_cpu(tiny_model, tiny_tokenizer, shop_pairs, tmp_path,
                                                         monkeypatch):
    """coevo's trainers make trl's fused LM head project only labelled (assistant) positions on CPU, and
    the log-probs stay those of the full projection. Fails if trl stops choosing the mode by _use_triton."""
    import trl.trainer.utils as trl_utils

    rows = []
    chunked = trl_utils._ChunkedLogProbFunction

    class Spy(chunked):
        @staticmethod
        def forward(ctx, hidden, *args):
            rows.append(hidden.shape[0])
            return chunked.forward(ctx, hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    trainer = build_dpo_trainer(tiny_model, tiny_tokenizer, pairs_dataset(tiny_tokenizer, shop_pairs[:1]),
                                DPOStageConfig(batch_size=1), tmp_path, seed=0, precompute_ref=False,
                                ref_model=copy.deepcopy(tiny_model))
    batch = trainer.data_collator([pair_features(tiny_tokenizer, shop_pairs[0].prompt_messages,
                                                 shop_pairs[0].chosen_messages, shop_pairs[0].rejected_messages)])
    compact = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    labelled = int(batch["completion_mask"][:, 1:].sum())
    assert rows == [labelled] and labelled < batch["input_ids"][:, 1:].numel() / 2

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # trl's choice on CPU
    every = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert rows[-1] == batch["input_ids"][:, 1:].numel()
    for ours, full in zip(compact, every):
        assert torch.allclose(ours, full, rtol=1e-5, atol=1e-4)
