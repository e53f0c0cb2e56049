"""GPU paths: bf16 placement, LoRA training into adapter checkpoints (merged on demand), batched generation on CUDA.

Skipped on CPU machines (CI); run on a GPU box with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from coevo_lib.config import DPOStageConfig, LoraConfig, ModelConfig, RolloutConfig, SFTStageConfig, TinyModelConfig
from coevo_lib.models import is_peft_checkpoint, load_model, load_tokenizer, save_agent, save_merged
from coevo_lib.rollout import HFGenerator
from coevo_lib.tiny_model import build_tiny_model
from coevo_lib.train import train_dpo, train_sft
from coevo_lib.train.common import changed_parameters, changed_share, parameters_snapshot

from conftest import make_episode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def saved_model(tiny_tokenizer, tmp_path):
    """A small Llama saved in Hugging Face format: stands in for a hub model path."""
    config = TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768)
    model = build_tiny_model(config, tiny_tokenizer, seed=0)
    save_agent(model, tiny_tokenizer, tmp_path / "hf-model")
    return tmp_path / "hf-model"


def test_auto_dtype_is_bf16_on_gpu(saved_model):
    model = load_model(saved_model, ModelConfig(name_or_path=str(saved_model)))
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16


def test_lora_sft_and_dpo_train_only_adapters_saved_as_adapters_and_merged(saved_model, shop_pairs, tmp_path):
    config = ModelConfig(name_or_path=str(saved_model), lora=LoraConfig(enabled=True, r=8, alpha=16))
    model, tokenizer = load_model(saved_model, config, trainable=True), load_tokenizer(saved_model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = parameters_snapshot(model)
    episodes = [make_episode("e", "buy a red mug", [("search[red mug]", "ok"), ("click[buy now]", "")], 1.0)] * 4
    sft = train_sft(model, tokenizer, episodes, SFTStageConfig(epochs=1, batch_size=2, learning_rate=1e-3,
                                                               warmup_ratio=0.0), tmp_path / "sft", seed=0)
    dpo = train_dpo(model, tokenizer, shop_pairs, DPOStageConfig(epochs=1, batch_size=2, learning_rate=1e-3,
                                                                 warmup_ratio=0.0), tmp_path / "dpo", seed=0)
    assert math.isfinite(sft["train_loss"]) and math.isfinite(dpo["train_loss"])
    assert changed_parameters(model, before) > 0
    save_agent(model, tokenizer, tmp_path / "adapter")
    assert is_peft_checkpoint(tmp_path / "adapter") and not (tmp_path / "adapter" / "model.safetensors").exists()
    resumed = load_model(tmp_path / "adapter", config, trainable=True)  # base + the adapter, trained further
    assert resumed.device.type == "cuda" and any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)
    save_merged(tmp_path / "adapter", config, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged", ModelConfig(name_or_path=str(tmp_path / "merged")))
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())


def test_batched_generation_on_gpu(saved_model, tiny_tokenizer):
    model = load_model(saved_model, ModelConfig(name_or_path=str(saved_model))).eval()
    generator = HFGenerator(model, load_tokenizer(saved_model), RolloutConfig(max_new_tokens=16), 512)
    prompts = [generator.prompt_ids([{"role": "user", "content": f"Instruction: buy mug {i}"}]) for i in range(8)]
    replies = generator.generate(prompts, temperature=1.0, seed=0)
    assert len(replies) == 8 and all(0 < n <= 16 for _, n in replies)


def test_full_fine_tuning_keeps_float32_master_weights_so_small_updates_land(saved_model, shop_pairs, tmp_path):
    # A DPO learning rate (5e-6) moves weights far less than bf16's rounding step (~1/256 of a weight):
    # trained in pure bf16 almost every update is lost; coevo's default keeps float32 master weights.
    stage = DPOStageConfig(epochs=1, batch_size=2, learning_rate=5e-6, warmup_ratio=0.0)
    shares = {}
    for dtype in ("auto", "bfloat16"):
        model = load_model(saved_model, ModelConfig(name_or_path=str(saved_model), dtype=dtype), trainable=True)
        assert model.device.type == "cuda"
        assert model.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)
        before = parameters_snapshot(model)
        train_dpo(model, load_tokenizer(saved_model), shop_pairs, stage, tmp_path / dtype, seed=0)
        shares[dtype] = changed_share(model, before)
    assert shares["auto"] > 0.9 and shares["bfloat16"] < 0.5 * shares["auto"], shares
