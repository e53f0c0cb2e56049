"""SFT and DPO tokens/s and model FLOPs utilisation of launched stages, 1 vs N ranks, against the
matmul peak measured on this machine in the same process (fp32 and bf16 torch.matmul).

    python bench/train.py [--processes 2] [--experts 96] [--pairs 48] [--hidden 256] [--layers 4] [--dtype float32]

Both process counts run through the same path (coevo_lib.train.launch: accelerate launch, gloo on
CPU) with the same global batch; the time is rank 0's trainer time (DPO: including the reference
precompute), not the launcher's start-up, which is printed apart. On CPU one rank uses every core
and N ranks get OMP_NUM_THREADS=1 each from torchrun, so both use the same cores.

Model FLOPs: 6 x parameters per trained token (forward + backward; tied embeddings counted once, as
the output projection is the matmul that uses them), plus 2 x parameters per token of the DPO
reference pass; attention's sequence-length term is left out (< 5% at these lengths and widths).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from coevo_lib.config import DPOStageConfig, ModelConfig, RunConfig, SFTStageConfig, TinyModelConfig, TrainLaunchConfig
from coevo_lib.models import save_agent
from coevo_lib.rollout import expert_corpus
from coevo_lib.runs import init_run_dir
from coevo_lib.seeding import quiet_libraries
from coevo_lib.tiny_model import build_tiny_model, train_tiny_tokenizer
from coevo_lib.train.launch import run_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import bench_pairs  # noqa: E402  (the DPO benchmark's expert > replayed-failure pairs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--experts", type=int, default=96, help="SFT examples (minishop expert trajectories)")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="global batch of both stages")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training weights")
    return parser.parse_args()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n torch.matmul over ``repeats`` (all of this process's threads)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_run(args, tmp: Path):
    """A run directory holding the stage settings, a saved tiny start checkpoint and the examples."""
    env, prompt, pairs = bench_pairs(max(args.pairs, args.experts))
    tokenizer = train_tiny_tokenizer(expert_corpus(env, prompt, 200), 2048)
    model = build_tiny_model(TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                             intermediate_size=args.hidden * 3), tokenizer, seed=0)
    stage = {"epochs": 1.0, "batch_size": args.batch, "warmup_ratio": 0.0, "max_length": 2048}
    config = RunConfig(model=ModelConfig(dtype=args.dtype), sft=SFTStageConfig(**stage),
                       dpo=DPOStageConfig(**stage))
    run = init_run_dir(config, tmp / "run")
    save_agent(model.to(getattr(torch, args.dtype)), tokenizer, run.checkpoint("start"))
    n_params = sum(p.numel() for p in model.parameters())
    return run, n_params, expert_episodes(env, prompt, pairs, args.experts), pairs[: args.pairs]


def expert_episodes(env, prompt, pairs, n: int):
    from coevo_lib.rollout import expert_episode

    return [expert_episode(env, pair.task_id, "train", prompt) for pair in pairs[:n]]


def timed_stage(run, kind: str, examples, processes: int) -> tuple[dict, float]:
    name = f"{kind}-{processes}"
    job = {"kind": kind, "run_dir": str(run.path), "stage_section": kind, "start": str(run.checkpoint("start")),
           "seed": 0, "out": str(run.checkpoint(name)), "tb_dir": str(run.sub("tb", name))}
    start = time.perf_counter()
    stats = run_stage(TrainLaunchConfig(launcher="accelerate", num_processes=processes), run.sub("launch", name),
                      job, examples)
    return stats, time.perf_counter() - start


def model_flops(kind: str, stats: dict, n_params: int, epochs: float = 1.0) -> float:
    if kind == "sft":
        return 6 * n_params * stats["tokens_trained"]
    return n_params * stats["tokens_trained"] * (6 + 2 / epochs)  # + one reference forward per pair


def main() -> None:
    args = parse_args()
    quiet_libraries()
    peaks = {name: matmul_peak(getattr(torch, name)) for name in ("float32", "bfloat16")}
    print(f"matmul peak ({torch.get_num_threads()} threads): fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        run, n_params, experts, pairs = bench_run(args, Path(tmp))
        print(f"model: hidden {args.hidden} x {args.layers} layers, {n_params / 1e6:.2f}M parameters, "
              f"{args.dtype}; global batch {args.batch}; SFT {len(experts)} experts, DPO {len(pairs)} pairs")
        print(f"{'stage':5} {'ranks':>5} {'steps':>5} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>7} "
              f"{'vs 1 rank':>9} {'launch s':>8}")
        for kind, examples in (("sft", experts), ("dpo", pairs)):
            base = None
            for processes in (1, args.processes):
                stats, outside = timed_stage(run, kind, examples, processes)
                rate = stats["tokens_trained"] / stats["wall_s"]
                flops = model_flops(kind, stats, n_params) / stats["wall_s"]
                base = base or rate
                print(f"{kind:5} {processes:>5} {stats['steps']:>5} {rate:>9.0f} {flops / 1e9:>8.2f} "
                      f"{flops / peaks[args.dtype]:>7.1%} {rate / base:>8.2f}x {outside - stats['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
