"""coevo's GPU paths on a random-weight model with a real model's architecture (bench/arch/*.json),
through coevo's own code: placement, generation, in-process SFT / DPO (full and LoRA), launched FSDP2 and
DeepSpeed ZeRO-3 stages, against the bf16 matmul peak measured on the same GPU in the same process.

    python bench/gpu.py --arch bench/arch/qwen3-4b.json [--parts load generate train launch] [--out gpu.json]

- load: the saved checkpoint through coevo_lib.models.load_model with dtype auto (must land in bf16 on cuda).
- generate: HF generate (sampling, temperature 0.7) of --new-tokens tokens after --prompt-tokens random
  prompt tokens, per batch size; tokens/s counts generated tokens only. The weights are random, so the
  text means nothing: this times the model, not coevo's rollout loop (tests/test_gpu.py covers that).
- train: train_sft on minishop expert trajectories and train_dpo on expert > replayed-failure pairs
  (bench/dpo.py), full fine-tuning and LoRA, gradient checkpointing on (the Qwen3-4B recipes' setting);
  tokens/s, model FLOPs utilisation (6 x parameters per trained token, + 2 x per token for DPO's
  reference pass; LoRA counted the same: the backward still runs through every layer) and peak memory.
  Each row also says which share of the trained weights' elements training changed: pure bf16 weights
  ("full bf16") round most small updates away, which is why full fine-tuning keeps float32 master weights.
- launch: the same SFT and DPO as launched stages (coevo_lib.train.launch, one rank) with
  train.accelerate_config fsdp2 and zero3; checks that the gathered checkpoint has every weight of the
  start and which share of its elements training changed.

The tokenizer is coevo's tiny minishop tokenizer (4,096 ids, all inside the model's vocabulary): real
tokenisation of real trajectories, at the real model's width, depth and LM-head size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from coevo_lib.config import (DPOStageConfig, LoraConfig, ModelConfig, RunConfig, SFTStageConfig,
                              TrainLaunchConfig)
from coevo_lib.models import load_model, load_tokenizer, save_agent
from coevo_lib.rollout import expert_corpus
from coevo_lib.runs import init_run_dir
from coevo_lib.seeding import quiet_libraries
from coevo_lib.tiny_model import train_tiny_tokenizer
from coevo_lib.train import train_dpo, train_sft
from coevo_lib.train.common import changed_share, parameters_snapshot
from coevo_lib.train.launch import run_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import bench_pairs  # noqa: E402  (expert > replayed-failure pairs)
from train import expert_episodes, model_flops  # noqa: E402

PARTS = ("load", "generate", "train", "launch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="bench/arch/qwen3-4b.json")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="generation batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--experts", type=int, default=64, help="SFT examples")
    parser.add_argument("--pairs", type=int, default=32, help="DPO pairs")
    parser.add_argument("--batch", type=int, default=8, help="training batch (one micro-batch per step)")
    parser.add_argument("--launch-configs", nargs="+", default=["fsdp2", "zero3"])
    parser.add_argument("--launch-kinds", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser.parse_args()


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """Mean bf16 FLOP/s of n x n x n products on the GPU, after warm-up."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_checkpoint(arch: Path, tokenizer, out: Path) -> int:
    """A checkpoint of ``arch`` with random (seeded) weights in bf16, saved as coevo saves agents."""
    fields = {k: v for k, v in json.loads(arch.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_agent(model, tokenizer, out)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n_params


def check_load(checkpoint: Path) -> dict[str, Any]:
    start = time.perf_counter()
    model = load_model(checkpoint, ModelConfig(name_or_path=str(checkpoint)))
    row = {"load_s": time.perf_counter() - start, "device": str(model.device), "dtype": str(model.dtype)}
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16, row
    return row


def generation_rates(checkpoint: Path, tokenizer, args) -> list[dict[str, Any]]:
    model = load_model(checkpoint, ModelConfig(name_or_path=str(checkpoint))).eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, len(tokenizer), (batch, args.prompt_tokens), device="cuda", generator=generator)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7,
                      pad_token_id=tokenizer.pad_token_id)
        model.generate(**kwargs, max_new_tokens=8, min_new_tokens=8)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**kwargs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        generated = (out.shape[1] - args.prompt_tokens) * batch
        rows.append({"batch": batch, "tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds})
    del model
    torch.cuda.empty_cache()
    return rows


def stage_configs(args) -> tuple[SFTStageConfig, DPOStageConfig]:
    common = {"epochs": 1.0, "batch_size": args.batch, "warmup_ratio": 0.0, "max_length": 2048}
    return SFTStageConfig(learning_rate=1e-5, **common), DPOStageConfig(learning_rate=1e-6, **common)


# (label, model.dtype, LoRA): the default full fine-tuning (float32 master weights, bf16 autocast), pure
# bf16 weights (model.dtype=bfloat16, half the memory) and LoRA on a frozen bf16 base.
TRAINING_VARIANTS = (("full", "auto", False), ("full bf16", "bfloat16", False), ("lora r16", "auto", True))


def training_rows(checkpoint: Path, n_params: int, peak: float, experts, pairs, args, tmp: Path) -> list[dict]:
    sft_stage, dpo_stage = stage_configs(args)
    # Untimed warm-up (CUDA context, cuBLAS handles, autocast kernels), so that the first row is not charged.
    model = load_model(checkpoint, ModelConfig(name_or_path=str(checkpoint)), trainable=True)
    train_sft(model, load_tokenizer(checkpoint), experts[: args.batch], sft_stage, tmp / "warmup", seed=0)
    del model
    torch.cuda.empty_cache()
    rows = []
    for label, dtype, lora in TRAINING_VARIANTS:
        config = ModelConfig(name_or_path=str(checkpoint), dtype=dtype, lora=LoraConfig(enabled=lora, r=16, alpha=32))
        for kind in ("sft", "dpo"):
            model, tokenizer = load_model(checkpoint, config, trainable=True), load_tokenizer(checkpoint)
            before = parameters_snapshot(model, "cpu")
            torch.cuda.reset_peak_memory_stats()
            if kind == "sft":
                stats = train_sft(model, tokenizer, experts, sft_stage, tmp / f"{label}-{kind}", seed=0)
            else:
                stats = train_dpo(model, tokenizer, pairs, dpo_stage, tmp / f"{label}-{kind}", seed=0)
            row = training_row(f"{kind} {label}", kind, stats, n_params, peak)
            row.update(weights_dtype=str(next(p for p in model.parameters() if p.requires_grad).dtype),
                       changed_elements=changed_share(model, before))
            rows.append(row)
            print(json.dumps(row), flush=True)  # rows as they come: a run cut short still reports them
            del model, before
            torch.cuda.empty_cache()
    return rows


def training_row(name: str, kind: str, stats: dict, n_params: int, peak: float) -> dict[str, Any]:
    flops = model_flops(kind, stats, n_params) / stats["wall_s"]
    return {"stage": name, "steps": stats["steps"], "tokens": stats["tokens_trained"], "seconds": stats["wall_s"],
            "tokens_per_s": stats["tokens_trained"] / stats["wall_s"], "mfu": flops / peak,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": stats["train_loss"]}


def launched_rows(checkpoint: Path, n_params: int, peak: float, experts, pairs, args, tmp: Path) -> list[dict]:
    sft_stage, dpo_stage = stage_configs(args)
    start_weights = read_weights(checkpoint)
    rows = []
    for name in args.launch_configs:
        train = TrainLaunchConfig(launcher="accelerate", accelerate_config=name, num_processes=1)
        run = init_run_dir(RunConfig(model=ModelConfig(name_or_path=str(checkpoint)), sft=sft_stage,
                                     dpo=dpo_stage, train=train), tmp / f"run-{name}")
        for kind, examples in (("sft", experts), ("dpo", pairs)):
            if kind not in args.launch_kinds:
                continue
            out = run.checkpoint(f"{kind}-{name}")
            job = {"kind": kind, "run_dir": str(run.path), "stage_section": kind, "start": str(checkpoint),
                   "seed": 0, "out": str(out), "tb_dir": str(run.sub("tb", f"{kind}-{name}"))}
            started = time.perf_counter()
            try:
                stats = run_stage(train, run.sub("launch", f"{kind}-{name}"), job, examples)
            except Exception as error:  # noqa: BLE001  (a failed path is a row of the report, not the end of it)
                log = run.sub("launch", f"{kind}-{name}") / "launch.log"
                tail = log.read_text()[-3000:] if log.exists() else ""
                rows.append({"stage": f"{kind} {name}", "error": f"{error}", "log_tail": tail})
                print(f"{kind} {name}: FAILED {error}\n{tail}", flush=True)
                continue
            row = training_row(f"{kind} {name}", kind, stats, n_params, peak)
            row.update(launch_s=time.perf_counter() - started, distributed_type=stats.get("distributed_type"),
                       **saved_checkpoint_check(out, start_weights))
            row.pop("peak_gib")  # the rank's memory is in another process
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    return rows


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whether saved in one safetensors file or in shards."""
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def saved_checkpoint_check(out: Path, start_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The gathered checkpoint holds every weight of the start, in bf16, and training moved some."""
    saved = read_weights(out)
    missing = sorted(set(start_weights) - set(saved))
    dtypes = sorted({str(t.dtype) for t in saved.values()})
    common = [k for k in start_weights if k in saved]
    changed = sum(int((saved[k].float() != start_weights[k].float()).sum()) for k in common)
    return {"saved_missing": len(missing), "saved_dtypes": dtypes, "saved_tensors": len(saved),
            "changed_elements": changed / sum(start_weights[k].numel() for k in common)}


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    quiet_libraries()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "arch": args.arch, "torch": torch.__version__}
    report["bf16_matmul_tflops"] = matmul_peak() / 1e12
    print(json.dumps(report), flush=True)
    env, prompt, pairs = bench_pairs(max(args.pairs, args.experts))
    tokenizer = train_tiny_tokenizer(expert_corpus(env, prompt, 200), 4096)
    experts, pairs = expert_episodes(env, prompt, pairs, args.experts), pairs[: args.pairs]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = tmp / "start"
        started = time.perf_counter()
        report["params"] = random_checkpoint(Path(args.arch), tokenizer, checkpoint)
        report["build_and_save_s"] = time.perf_counter() - started
        peak = report["bf16_matmul_tflops"] * 1e12
        steps = {"load": lambda: check_load(checkpoint),
                 "generate": lambda: generation_rates(checkpoint, tokenizer, args),
                 "train": lambda: training_rows(checkpoint, report["params"], peak, experts, pairs, args, tmp),
                 "launch": lambda: launched_rows(checkpoint, report["params"], peak, experts, pairs, args, tmp)}
        for part in args.parts:
            report[part] = steps[part]()
            print(json.dumps({part: report[part]}, default=str), flush=True)
    print_tables(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


def print_tables(report: dict[str, Any]) -> None:
    print(f"\n{report['gpu']}, {report['arch']}: {report['params'] / 1e9:.2f}B parameters, "
          f"bf16 matmul {report['bf16_matmul_tflops']:.0f} TFLOP/s")
    for row in report.get("generate", []):
        print(f"generate batch {row['batch']:>3}: {row['tokens_per_s']:>8.0f} tokens/s ({row['seconds']:.1f} s)")
    for row in report.get("train", []) + report.get("launch", []):
        if "error" in row:
            print(f"{row['stage']:<14} FAILED: {row['error']}")
            continue
        memory = f"{row['peak_gib']:.1f} GiB" if "peak_gib" in row else "(in the rank)"
        print(f"{row['stage']:<14} {row['steps']:>3} steps {row['tokens_per_s']:>8.0f} tokens/s  MFU "
              f"{row['mfu']:>5.1%}  peak {memory:>10}  weights changed {row['changed_elements']:.1%}")


if __name__ == "__main__":
    main()
