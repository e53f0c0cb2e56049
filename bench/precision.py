"""Training-speed levers on CPU for the embedded default (issue 11): bf16 autocast, length-grouped
batches and no gradient checkpointing, against trl's defaults (fp32, random batches, gradient
checkpointing on), in one process on the same data and model.

    python bench/precision.py [--experts 96] [--pairs 64] [--threads 1 2] [--epochs 2]

The model is configs/minishop/base.yaml's tiny model (96 wide, 2 layers; the study's model). SFT runs
coevo's fit_sft on expert trajectories of that recipe's environment (position-numbered items); DPO runs
coevo's masked DPO trainer on bench/dpo.py's expert > replayed-failure pairs, which come from minishop's
default settings (product ids, longer pages), so DPO rows are longer than the study's. Variants change
only the trainer arguments:
- bf16: TrainingArguments(bf16=True) on CPU, which trains under torch.autocast(cpu, bfloat16) with fp32
  master weights (this CPU has AVX-512 BF16);
- grouped: train_sampling_strategy=group_by_length (batches of similar lengths: less padding, same
  examples per epoch); SFT only (transformers groups by input_ids, which preference rows do not have);
- no-gc: gradient_checkpointing=False (train.gradient_checkpointing; activations kept instead of
  recomputed in the backward pass: the same arithmetic, so the same losses);
- all-positions: trl's own choice on CPU for its fused LM head, projecting every position, where coevo
  projects only the labelled ones (train.common.score_labelled_tokens_only; every other row has it). Its
  ratio below 1 is the time coevo saves; losses agree to float rounding.
Each row prints seconds, the ratio to fp32 at the same thread count (> 1 is faster) and the mean loss of
the last epoch's steps (a precision that hurts training shows there). --threads 1 is how a study with
workers: 2 trains (one torch thread per run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trl.trainer.utils as trl_utils

from coevo_lib.config import DPOStageConfig, SFTStageConfig, load_config
from coevo_lib.envs import make_env
from coevo_lib.rollout import expert_corpus, expert_episode
from coevo_lib.seeding import quiet_libraries
from coevo_lib.tiny_model import build_tiny_model, train_tiny_tokenizer
from coevo_lib.train import common, dpo as coevo_dpo, sft as coevo_sft
from coevo_lib.train.dpo import build_dpo_trainer, pairs_dataset
from coevo_lib.train.sft import fit_sft, sft_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import bench_pairs  # noqa: E402  (expert > replayed-failure pairs)

GROUPED = {"train_sampling_strategy": "group_by_length"}
VARIANTS = {"fp32": {}, "bf16": {"bf16": True}, "grouped": GROUPED, "bf16+grouped": {"bf16": True, **GROUPED},
            "no-gc": {"gradient_checkpointing": False}, "all-positions": {}}
# transformers groups by input_ids, which preference rows do not have: DPO gets the ungrouped variants.
STAGE_VARIANTS = {"sft": list(VARIANTS), "dpo": ["fp32", "bf16", "no-gc", "all-positions"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--recipe", default="configs/minishop/base.yaml")
    parser.add_argument("--experts", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    return parser.parse_args()


def use_variant(name: str) -> None:
    """coevo's trainer arguments with the variant's on top, and coevo's LM-head mode unless the variant is
    all-positions (the bench's only changes to its trainers)."""
    def patched(*args, **kwargs):
        return {**common.trainer_kwargs(*args, **kwargs), **VARIANTS[name]}
    coevo_sft.trainer_kwargs = coevo_dpo.trainer_kwargs = patched
    head_mode = common.score_labelled_tokens_only
    if name == "all-positions":  # trl's own choice, which coevo's trainer builders must not switch back
        trl_utils._use_triton = common._TRL_USE_TRITON
        head_mode = lambda: None  # noqa: E731
    coevo_sft.score_labelled_tokens_only = coevo_dpo.score_labelled_tokens_only = head_mode


def last_epoch_loss(trainer, epochs: float) -> float:
    losses = common.step_losses(trainer)
    per_epoch = max(1, int(len(losses) / epochs))
    return statistics.mean(losses[-per_epoch:])


def main() -> None:
    args = parse_args()
    quiet_libraries()
    config = load_config(args.recipe)
    env = make_env(config.env.name, **config.env.kwargs)
    tokenizer = train_tiny_tokenizer(expert_corpus(env, config.prompt, 200), config.model.tiny.vocab_size)
    experts = [expert_episode(env, task_id, "train", config.prompt) for task_id in env.task_ids("train")[: args.experts]]
    sft_data = sft_features(tokenizer, experts, 2048)
    _, _, pairs = bench_pairs(args.pairs)
    dpo_data = pairs_dataset(tokenizer, pairs)
    lengths = [len(ids) for ids in sft_data["input_ids"]]
    print(f"torch {torch.__version__}; SFT {len(experts)} experts ({min(lengths)}-{max(lengths)} tokens, "
          f"batch {config.sft.batch_size}), DPO {len(pairs)} pairs (batch {config.dpo.batch_size}), "
          f"{args.epochs:g} epochs each")
    print(f"{'stage':5} {'threads':>7} {'variant':>13} {'seconds':>8} {'x fp32':>7} {'last-epoch loss':>16}")
    sft_stage = SFTStageConfig(**{**vars(config.sft), "epochs": args.epochs})
    dpo_stage = DPOStageConfig(**{**vars(config.dpo), "epochs": args.epochs})
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for kind in ("sft", "dpo"):
                base = None
                for name in STAGE_VARIANTS[kind]:
                    use_variant(name)
                    model = build_tiny_model(config.model.tiny, tokenizer, seed=0)
                    out = Path(tmp) / f"{kind}-{threads}-{name}"
                    start = time.perf_counter()
                    if kind == "sft":
                        trainer, _ = fit_sft(model, tokenizer, sft_data, sft_stage, out, seed=0)
                    else:
                        trainer = build_dpo_trainer(model, tokenizer, dpo_data, dpo_stage, out, seed=0)
                        common.run_quietly(trainer)
                    seconds = time.perf_counter() - start
                    base = base or seconds
                    print(f"{kind:5} {threads:>7} {name:>13} {seconds:>8.1f} {base / seconds:>7.2f} "
                          f"{last_epoch_loss(trainer, args.epochs):>16.4f}", flush=True)


if __name__ == "__main__":
    main()
