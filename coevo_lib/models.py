"""Agents from any causal LM: a Hugging Face path, or the embedded tiny model built offline.

The tiny model is a byte-level BPE tokenizer trained locally (``tokenizers``) on the training
split's text, a chat template with {% generation %} markers, and a small randomly initialised
Llama. Real models load with ``AutoModelForCausalLM``; LoRA wraps either through peft.

With ``model.lora.enabled`` a checkpoint is the agent's LoRA adapter alone (peft's layout plus the
tokenizer), on a base that stays where it is: ``adapter_config.json`` names it by absolute path (or
hub name). One base then serves every agent and iteration (coevo_lib.rollout_service), and training
goes on from an adapter by training that same adapter further.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from coevo_lib.config import LoraConfig, ModelConfig, PromptConfig, TinyModelConfig
from coevo_lib.envs.base import TextEnv

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Qwen-style ChatML; the generation markers let trl's own assistant masks work on it too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU and float32 on CPU unless the config names a dtype."""
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def env_corpus(env: TextEnv, prompt: PromptConfig, max_tasks: int) -> list[str]:
    """Text the tiny tokenizer learns from: expert trajectories of training tasks, formatted as prompts."""
    from coevo_lib.rollout import expert_episode  # local import: rollout imports models

    texts = []
    for task_id in env.task_ids("train")[:max_tasks]:
        episode = expert_episode(env, task_id, "train", prompt)
        texts.extend(message["content"] for message in episode.messages)
    texts.extend(env.vocabulary_text())
    texts.append("user assistant system Invalid action. Thought: Action: Observation:")
    return texts


def train_tiny_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: lossless on any string, so invalid model outputs decode exactly.

    Digits are single tokens, so prices (37.03) are spelled digit by digit whatever values the
    training text held; words, including item ids from the environment's vocabulary text, become
    whole tokens, so copying an id from an observation into an action is a one-token copy.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.padding_side = "left"
    return wrapped


def build_tiny_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def create_base_agent(config: ModelConfig, env: TextEnv, prompt: PromptConfig, out_dir: Path, seed: int) -> str:
    """Write the starting checkpoint of a run into ``out_dir`` and return it.

    For 'tiny' the tokenizer and random model are built here; for a hub path only the tokenizer
    gets a pad token and left padding, and the path itself is returned (weights are not copied).
    """
    if config.name_or_path != "tiny":
        return config.name_or_path
    corpus = env_corpus(env, prompt, config.tiny.tokenizer_tasks_per_split)
    tokenizer = train_tiny_tokenizer(corpus, config.tiny.vocab_size)
    model = build_tiny_model(config.tiny, tokenizer, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


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
    kwargs = {"dtype": training_dtype(config, device) if trainable else resolve_dtype(config, device)}
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
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


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
