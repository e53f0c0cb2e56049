"""Training throughput of a real pretrained model on CPU per precision, in one process, against float32.

    python bench/pretrained.py [--model smollm2-135m-instruct] [--experts 32] [--pairs 16] [--threads 2]
    python bench/pretrained.py --profile bf16 --experts 16 --pairs 8   # where a variant's time goes

SFT runs coevo's fit_sft on minishop expert trajectories in configs/smollm2/base.yaml's format (system
prompt, position-numbered items), one epoch, with the recipe's batch size and gradient accumulation; DPO runs
coevo's masked DPO (lambda 0.5 + SFT 0.5, reference log-probs precomputed) on bench/dpo.py's expert >
replayed-failure pairs, batched like the recipe's dpo stage. Variants:
- fp32: float32 weights and compute (what coevo did on CPU before model.cpu_bf16): the baseline;
- bf16: bf16 autocast over float32 master weights (model.cpu_bf16 on a CPU with AMX / AVX512-BF16);
- bf16-compile: bf16 with train.compile (each decoder layer compiled by torch.compile through accelerate);
  its first step, which compiles, is left out like every variant's;
- lora-bf16: a rank-16 LoRA adapter on q/k/v/o over a frozen bf16 base, under the same autocast.
Each row: seconds per optimizer step (the first step, warm-up, left out), tokens/s, the ratio to fp32 and
the mean loss of the steps. MFU is the model FLOPs per second (6 x non-embedding parameters x tokens,
plus 6 x hidden x vocabulary per labelled token for trl's compact LM head; LoRA rows count the same
model FLOPs) over this machine's bf16 matmul peak, measured first with torch.mm (and float32's too).
Peak RSS is the process's high-water mark during the row (reset before it through /proc/self/clear_refs):
full fine-tuning keeps every layer's activations, and the micro-batch is what bounds them.
The load average is printed: other work on the machine moves these timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from coevo_lib.config import LoraConfig, PromptConfig, load_config
from coevo_lib.envs import make_env
from coevo_lib.model_store import resolve_model
from coevo_lib.models import cpu_has_native_bf16, load_model, load_tokenizer
from coevo_lib.rollout import expert_episode
from coevo_lib.seeding import quiet_libraries
from coevo_lib.train.common import step_losses
from coevo_lib.train.dpo import fit_dpo, pairs_dataset
from coevo_lib.train.sft import fit_sft, sft_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import bench_pairs  # noqa: E402  (expert > replayed-failure pairs)

VARIANTS = ("fp32", "bf16", "bf16-compile", "lora-bf16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--recipe", default="configs/smollm2/base.yaml")
    parser.add_argument("--model", default=None, help="default: the recipe's model.name_or_path")
    parser.add_argument("--experts", type=int, default=32, help="SFT examples")
    parser.add_argument("--pairs", type=int, default=16, help="DPO pairs; 0: no DPO rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="fp32 always runs: it is the baseline")
    parser.add_argument("--profile", choices=VARIANTS, default=None,
                        help="instead of the table: run this variant once per stage under torch.profiler and "
                             "print where its CPU time goes (the ops with the most self time)")
    parser.add_argument("--profile-rows", type=int, default=25)
    return parser.parse_args()


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square torch.mm in ``dtype`` (best of ``repeats``): the ceiling MFU is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_config(base, variant: str):
    if variant == "fp32":
        return replace(base, cpu_bf16=False, dtype="auto", lora=replace(base.lora, enabled=False))
    lora = LoraConfig(enabled=True, r=16, alpha=32) if variant == "lora-bf16" else replace(base.lora, enabled=False)
    return replace(base, cpu_bf16=True, lora=lora)


def stamp_steps(trainer) -> None:
    from transformers import TrainerCallback

    trainer.step_stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer.step_stamps.append(time.perf_counter())

    trainer.add_callback(Stamp())


def model_flops(model, tokens: int, labelled: int) -> float:
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    dense = sum(p.numel() for p in model.parameters()) - embedding  # tied head: counted once, as embedding
    if hasattr(model, "peft_config"):  # LoRA rows count the model's FLOPs, not the adapter's
        dense -= sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return 6.0 * dense * tokens + 6.0 * config.hidden_size * config.vocab_size * labelled


def prepare_variant(variant: str, path: str, base_config, stage):
    """The variant's model and tokenizer, and the stage as every row runs it: one epoch, no warmup."""
    config = model_config(base_config, variant)
    model, tokenizer = load_model(path, config, trainable=True), load_tokenizer(path)
    return model, tokenizer, replace(stage, epochs=1, warmup_ratio=0.0)


def run_variant(kind: str, variant: str, path: str, base_config, stage, data, tokens: int, labelled: int,
                out: Path) -> dict:
    model, tokenizer, stage = prepare_variant(variant, path, base_config, stage)
    captured = {}
    reset_peak_rss()
    trainer, stats = fit_timed(kind, model, tokenizer, data, stage, out, variant, captured)
    steps = captured["step_times"]
    per_step = statistics.mean(steps[1:]) if len(steps) > 1 else steps[0]  # the first step warms up
    n_steps = len(steps)
    return {"stage": kind, "variant": variant, "s_per_step": per_step, "steps": n_steps,
            "tokens_per_s": tokens / n_steps / per_step, "flops_per_s": model_flops(model, tokens, labelled)
            / n_steps / per_step, "loss": statistics.mean(step_losses(trainer)), "wall_s": stats["wall_s"],
            "peak_rss_gb": peak_rss_gb()}


def profile_variant(kind: str, variant: str, path: str, base_config, stage, data, out: Path, rows: int) -> None:
    """Print the ops with the most self CPU time of one fit: which work the variant's ratio is waiting on.

    Matmuls (aten::mm / addmm / bmm / linear's kernels) are what bf16 speeds up; a large share left in
    casts (aten::copy_, aten::to), elementwise ops and the optimizer (aten::_foreach_*, lerp, addcdiv) is work
    that stays float32 and bounds the speed-up (Amdahl)."""
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, stage = prepare_variant(variant, path, base_config, stage)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit_timed(kind, model, tokenizer, data, stage, out, variant, {})
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{kind} {variant}: {total / 1e6:.1f} s of self CPU time profiled; top {rows} ops")
    print(f"{'op':<44}{'self s':>9}{'share':>8}{'calls':>8}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"{e.key[:43]:<44}{e.self_cpu_time_total / 1e6:>9.2f}{e.self_cpu_time_total / total:>8.1%}"
              f"{e.count:>8}")
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "mkldnn"),
              "cast / copy": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"),
              "optimizer": ("aten::_fused_adamw", "aten::_foreach", "aten::lerp", "aten::addcdiv", "Optimizer.")}
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
              for name, prefixes in groups.items()}
    shares["everything else"] = 1 - sum(shares.values())
    print("by kind: " + ", ".join(f"{name} {share:.1%}" for name, share in shares.items()))


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS


def peak_rss_gb() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024 ** 2


def fit_timed(kind: str, model, tokenizer, data, stage, out, variant: str, captured):
    from coevo_lib.train import dpo as coevo_dpo, sft as coevo_sft
    module, fit = (coevo_sft, fit_sft) if kind == "sft" else (coevo_dpo, fit_dpo)
    return with_timed_train(module, lambda: fit(model, tokenizer, data, stage, out, 0, gradient_checkpointing=False,
                                                cpu_bf16=variant != "fp32", compile_layers=variant == "bf16-compile"),
                            captured)


def with_timed_train(module, fit, captured):
    """Run ``fit`` with the module's run_quietly replaced by one that also stamps every step."""
    original = module.run_quietly

    def run(trainer):
        stamp_steps(trainer)
        start = time.perf_counter()
        output = original(trainer)
        stamps = [start, *trainer.step_stamps]
        captured["step_times"] = [b - a for a, b in zip(stamps, stamps[1:])]
        return output

    module.run_quietly = run
    try:
        return fit()
    finally:
        module.run_quietly = original


def sft_data(config, tokenizer, n: int):
    env = make_env(config.env.name, **config.env.kwargs)
    episodes = [expert_episode(env, t, "train", config.prompt) for t in env.task_ids("train")[:n]]
    return sft_features(tokenizer, episodes, 2048)


def dpo_data(tokenizer, n: int):
    _, _, pairs = bench_pairs(n, PromptConfig(system_prompt=True))
    return pairs_dataset(tokenizer, pairs)


def sizes(kind: str, data) -> tuple[int, int]:
    if kind == "sft":
        return sum(len(ids) for ids in data["input_ids"]), sum(sum(m) for m in data["assistant_masks"])
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data)
    labelled = sum(sum(r["chosen_mask"]) + sum(r["rejected_mask"]) for r in data)
    return tokens, labelled


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.recipe)
    path = resolve_model(args.model or config.model.name_or_path)
    print(f"model {path}; torch threads {torch.get_num_threads()}; native bf16 {cpu_has_native_bf16()}; "
          f"load average {load_average()}")
    peak = {str(d).removeprefix("torch."): matmul_peak(d) for d in (torch.float32, torch.bfloat16)}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
    tokenizer = load_tokenizer(path)
    datasets = {"sft": sft_data(config, tokenizer, args.experts)}
    if args.pairs:
        datasets["dpo"] = dpo_data(tokenizer, args.pairs)
    stages = {"sft": config.sft, "dpo": config.dpo}
    print("batches (micro-batch x accumulation): " + ", ".join(
        f"{kind} {stages[kind].batch_size} x {stages[kind].grad_accum}" for kind in datasets))
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            for kind, data in datasets.items():
                profile_variant(kind, args.profile, path, config.model, stages[kind], data,
                                Path(tmp) / f"{kind}-profile", args.profile_rows)
        print(f"\nload average after {load_average()}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, data in datasets.items():
            tokens, labelled = sizes(kind, data)
            for variant in ["fp32", *(v for v in args.variants if v != "fp32")]:
                rows.append(run_variant(kind, variant, path, config.model, stages[kind], data, tokens, labelled,
                                        Path(tmp) / f"{kind}-{variant}"))
    print(f"\n{'stage':<6}{'variant':<11}{'s/step':>8}{'steps':>6}{'tok/s':>8}{'x fp32':>8}{'MFU bf16':>10}"
          f"{'loss':>9}{'peak GB':>9}")
    for r in rows:
        base = next(b for b in rows if b["stage"] == r["stage"] and b["variant"] == "fp32")
        print(f"{r['stage']:<6}{r['variant']:<11}{r['s_per_step']:>8.2f}{r['steps']:>6}{r['tokens_per_s']:>8.0f}"
              f"{base['s_per_step'] / r['s_per_step']:>8.2f}{r['flops_per_s'] / peak['bfloat16']:>10.1%}"
              f"{r['loss']:>9.4f}{r['peak_rss_gb']:>9.1f}")
    print(f"\nload average after {load_average()}")


if __name__ == "__main__":
    main()
