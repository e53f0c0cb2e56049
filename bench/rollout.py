"""Rollout throughput of every backend on one checkpoint and the same tasks, in one process, against lockstep hf.

    python bench/rollout.py --checkpoint runs/nh3/minishop-sft-seed0/checkpoints/sft --tasks 96 \\
        --set 'rollout.vllm.extra_args=[--no-enable-chunked-prefill]' --variant default= \\
        --variant "bs32=--block-size 32" --variant "bind2=VLLM_CPU_OMP_THREADS_BIND=0-1" --out bench.json

Rows, all on the same training tasks at the recipe's rollout.temperature, as in a training iteration:
  lockstep hf   today's path, batches of rollout.batch_size turn by turn: the baseline of "x lockstep"
                (with --fp32-baseline a float32 lockstep row comes first and is the baseline)
  async hf cN   coevo_lib.engine with HFBatcher (dynamic batching), N = --hf-concurrency
  vllm[V] cN    RolloutService(backend=vllm): coevo starts the server of variant V (extra vLLM arguments
                and environment) once, then rolls out with N episodes in flight for each --concurrency
  openai[V] cN  RolloutService(backend=openai) pointed at that same running server (first variant only)
Each path first rolls out --warmup other tasks, untimed; each timed row on a server starts from an empty
prefix cache. Then greedy agreement on --held-out tasks per held-out split (temperature 0): the share of
tasks whose action sequence, and whose first action, equals async hf's greedy episode.
Without --checkpoint a fresh tiny model is built; --recipe defaults to the checkpoint's run config
(<run>/config.yaml). Without `make vllm` the vllm rows are left out, loudly. The load average is printed
before and after: other work on the machine moves these timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import httpx
import torch

from coevo_lib.backends import RolloutEngineError
from coevo_lib.config import RunConfig, load_config
from coevo_lib.envs import make_env
from coevo_lib.envs.base import TextEnv
from coevo_lib.loop import starting_checkpoint
from coevo_lib.models import load_model, load_tokenizer
from coevo_lib.records import Episode
from coevo_lib.rollout import HFGenerator, TaskRef, expand_tasks, rollout
from coevo_lib.rollout_service import RolloutService, prefix_cache_delta
from coevo_lib.seeding import quiet_libraries
from coevo_lib.serving import VLLMServer, VLLMServerError, post, prefix_cache_counts, root_url, vllm_python

HELD_OUT_SPLITS = ("test_seen", "test_unseen")
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")  # a --variant word that sets the server's environment


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a trained agent; default: a fresh tiny model")
    parser.add_argument("--recipe", default=None, help="default: the checkpoint's run config, else base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. --set env.kwargs.max_steps=8 (repeatable)")
    parser.add_argument("--tasks", type=int, default=96, help="training tasks of each timed row")
    parser.add_argument("--warmup", type=int, default=8, help="untimed training tasks before each path")
    parser.add_argument("--held-out", type=int, default=30, help="greedy tasks per held-out split; 0: none")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64], help="vllm/openai rows")
    parser.add_argument("--hf-concurrency", type=int, default=32, help="async hf episodes in flight")
    parser.add_argument("--variant", dest="variants", action="append", default=None, metavar="NAME=ARGS",
                        help="NAME=words appended to rollout.vllm.extra_args; VAR=value words set the server's "
                             "environment\n(repeatable; default: default=)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads of the hf rows")
    parser.add_argument("--skip-vllm", action="store_true", help="hf rows only")
    parser.add_argument("--fp32-baseline", action="store_true",
                        help="first a lockstep hf row with float32 weights, the baseline of every ratio (for a "
                             "recipe that generates in bf16: model.cpu_bf16)")
    parser.add_argument("--log-dir", default=None, help="vLLM server logs (default: a new temp dir)")
    parser.add_argument("--out", default=None, help="also write the tables as JSON here")
    return parser.parse_args()


@dataclass
class Bench:
    """What every row shares: one checkpoint, one recipe, one pool of environments, the same tasks."""

    config: RunConfig
    checkpoint: str
    envs: list[TextEnv]
    train: list[TaskRef]
    warmup: list[TaskRef]
    held_out: list[TaskRef]
    log_dir: Path


def build_bench(args: argparse.Namespace) -> Bench:
    recipe = args.recipe or default_recipe(args.checkpoint)
    config = load_config(recipe, args.overrides)
    env = make_env(config.env.name, **config.env.kwargs)
    checkpoint = args.checkpoint or starting_checkpoint(config, env, Path(tempfile.mkdtemp()) / "base")
    pool_size = max([config.rollout.batch_size, args.hf_concurrency, *args.concurrency])
    train_ids = env.task_ids("train")
    if args.tasks + args.warmup > len(train_ids):
        sys.exit(f"--tasks {args.tasks} + --warmup {args.warmup} > {len(train_ids)} training tasks")
    held_out = [ref for split in HELD_OUT_SPLITS
                for ref in expand_tasks(env.task_ids(split)[: args.held_out], split, 1)]
    print(f"recipe {recipe} {' '.join(args.overrides)}\ncheckpoint {checkpoint}")
    return Bench(config, checkpoint, [make_env(config.env.name, **config.env.kwargs) for _ in range(pool_size)],
                 expand_tasks(train_ids[: args.tasks], "train", 1),
                 expand_tasks(train_ids[-args.warmup:] if args.warmup else [], "train", 1), held_out,
                 Path(args.log_dir or tempfile.mkdtemp(prefix="bench-rollout-")))


def default_recipe(checkpoint: str | None) -> str:
    """The config.yaml of the run that wrote ``checkpoint`` (<run>/checkpoints/<name>), if there is one."""
    run_config = Path(checkpoint).resolve().parents[1] / "config.yaml" if checkpoint else None
    return str(run_config) if run_config and run_config.is_file() else "configs/minishop/base.yaml"


def with_rollout(config: RunConfig, **changes: Any) -> RunConfig:
    return replace(config, rollout=replace(config.rollout, **changes))


def row(name: str, episodes: list[Episode], wall_s: float, stats: dict[str, Any] | None = None,
        **extra: Any) -> dict[str, Any]:
    stats = stats or {}
    return {
        "name": name, "episodes": len(episodes), "wall_s": round(wall_s, 2),
        "episodes_per_s": round(len(episodes) / wall_s, 3),
        "tokens_per_s": round(sum(ep.tokens_generated for ep in episodes) / wall_s, 1),
        "mean_steps": round(statistics.mean(float(ep.steps) for ep in episodes), 2),
        "success": share(ep.success for ep in episodes),
        "prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate"),
        "token_mismatches": stats.get("token_mismatches"), "token_checks": stats.get("token_checks"),
        "engine_restarts": stats.get("engine_restarts"), "request_retries": stats.get("request_retries"), **extra,
    }


def lockstep(bench: Bench, generator: HFGenerator, refs: list[TaskRef], temperature: float,
             kind: str) -> tuple[list[Episode], float]:
    start = time.perf_counter()
    episodes = rollout(bench.envs[: bench.config.rollout.batch_size], refs, generator, agent="bench", iteration=0,
                       prompt=bench.config.prompt, seed=bench.config.seed, temperature=temperature, kind=kind)
    return episodes, time.perf_counter() - start


def run_async(bench: Bench, service: RolloutService, refs: list[TaskRef], concurrency: int, temperature: float,
              kind: str) -> tuple[list[Episode], dict[str, Any]]:
    """One rollout through ``service``; its statistics' wall_s leaves out engine start and model load."""
    task = service.task("bench", 0, kind, temperature)
    return service.rollout(bench.envs[:concurrency], refs, bench.checkpoint, task, None)


def empty_prefix_cache(base_url: str) -> None:
    """Between rows only (no request in flight): the next row must not hit the last row's prompts."""
    if not post(f"{root_url(base_url)}/reset_prefix_cache", {}, "reset prefix cache").get("success"):
        raise VLLMServerError(f"{base_url} did not empty its prefix cache")


def fp32_lockstep_row(bench: Bench) -> dict:
    """Lockstep hf with float32 weights: the baseline of a recipe that generates in bf16 (model.cpu_bf16)."""
    config, temperature = bench.config, bench.config.rollout.temperature
    model = load_model(bench.checkpoint, replace(config.model, cpu_bf16=False, dtype="float32")).eval()
    generator = HFGenerator(model, load_tokenizer(bench.checkpoint), config.rollout, config.prompt.max_prompt_tokens)
    lockstep(bench, generator, bench.warmup, temperature, "warmup")
    episodes, wall_s = lockstep(bench, generator, bench.train, temperature, "train")
    return row("lockstep hf float32", episodes, wall_s, batch=config.rollout.batch_size)


def hf_rows(bench: Bench, concurrency: int) -> tuple[list[dict], dict[str, list[Episode]]]:
    """Lockstep and async hf rows, and each path's greedy held-out episodes."""
    config, temperature = bench.config, bench.config.rollout.temperature
    model = load_model(bench.checkpoint, config.model).eval()
    generator = HFGenerator(model, load_tokenizer(bench.checkpoint), config.rollout, config.prompt.max_prompt_tokens)
    lockstep(bench, generator, bench.warmup, temperature, "warmup")
    episodes, wall_s = lockstep(bench, generator, bench.train, temperature, "train")
    dtype = str(model.dtype).removeprefix("torch.")
    rows = [row(f"lockstep hf {dtype}", episodes, wall_s, batch=config.rollout.batch_size)]
    greedy = {"lockstep hf": lockstep(bench, generator, bench.held_out, 0.0, "greedy")[0]}
    service = RolloutService(with_rollout(config, backend="hf", schedule="async", max_concurrent=concurrency),
                             bench.log_dir / "hf")
    try:
        run_async(bench, service, bench.warmup, concurrency, temperature, "warmup")
        episodes, stats = run_async(bench, service, bench.train, concurrency, temperature, "train")
        rows.append(row(f"async hf c{concurrency}", episodes, stats["wall_s"], stats,
                        generate_batches=stats.get("generate_batches")))
        greedy["async hf"] = run_async(bench, service, bench.held_out, concurrency, 0.0, "greedy")[0]
    finally:
        service.close()
    return rows, greedy


@dataclass
class Variant:
    """A vLLM server variant: its name in the tables, extra api_server arguments, extra environment."""

    name: str
    args: list[str]
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        words = shlex.split(rest)
        env = dict(w.split("=", 1) for w in words if ENV_WORD.match(w))
        return cls(name, [w for w in words if not ENV_WORD.match(w)], env)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while the block runs: VLLMServer passes its own environment to vLLM."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def vllm_config(config: RunConfig, variant: Variant, concurrency: list[int]) -> RunConfig:
    vllm = replace(config.rollout.vllm, extra_args=[*config.rollout.vllm.extra_args, *variant.args])
    return with_rollout(config, backend="vllm", schedule="auto", max_concurrent=max(concurrency), vllm=vllm)


def variant_rows(bench: Bench, variant: Variant, concurrency: list[int], with_openai: bool,
                 ) -> tuple[list[dict], list[Episode]]:
    """Start one vLLM server variant, time it at each concurrency (and openai on it), roll out greedy."""
    name, temperature = variant.name, bench.config.rollout.temperature
    service = RolloutService(vllm_config(bench.config, variant, concurrency), bench.log_dir / name)
    try:
        with environment(variant.env):  # also for a restart after a crash
            start_stats = run_async(bench, service, bench.warmup, max(concurrency), temperature, "warmup")[1]
            labels = {"engine_start_s": start_stats["engine_start_s"], "vllm_args": variant.args,
                      "vllm_env": variant.env}
            rows = [server_row(bench, service, service.server, f"vllm[{name}] c{n}", n, **labels)
                    for n in concurrency]
            if with_openai:
                rows += openai_rows(bench, service.server, name, concurrency)
            empty_prefix_cache(service.server.base_url)
            greedy = run_async(bench, service, bench.held_out, max(concurrency), 0.0, "greedy")[0]
    finally:
        service.close()  # stops the server, also on error
    return rows, greedy


def openai_rows(bench: Bench, server: VLLMServer, name: str, concurrency: list[int]) -> list[dict]:
    """``backend=openai`` against the running ``server``: the path of endpoints the user runs."""
    endpoint = replace(bench.config.rollout.openai, urls=[server.base_url], model=server.served_name)
    service = RolloutService(with_rollout(bench.config, backend="openai", schedule="auto",
                                          max_concurrent=max(concurrency), openai=endpoint), bench.log_dir / "openai")
    try:
        return [server_row(bench, service, server, f"openai[{name}] c{n}", n) for n in concurrency]
    finally:
        service.close()


def server_row(bench: Bench, service: RolloutService, server: VLLMServer, name: str, concurrency: int,
               **extra: Any) -> dict:
    """A timed row on ``server`` from an empty prefix cache; its counters are read here (openai owns none).

    ``in_engine``: requests inside the engine on average (vLLM's summed end-to-end latency / wall time);
    far below ``concurrency`` means the episodes wait elsewhere (HTTP, API server, CPU time).
    """
    empty_prefix_cache(server.base_url)
    before = engine_counters(server.base_url)
    episodes, stats = run_async(bench, service, bench.train, concurrency, bench.config.rollout.temperature, "train")
    after = engine_counters(server.base_url)
    stats.update(prefix_cache_delta(before, after))
    restarted = after["request_seconds"] < before["request_seconds"]  # counters start again from 0
    in_engine = (after["request_seconds"] - (0.0 if restarted else before["request_seconds"])) / stats["wall_s"]
    return row(name, episodes, stats["wall_s"], stats, in_engine=round(in_engine, 1),
               weight_swap_s=stats.get("weight_swap_s"), **extra)


def engine_counters(base_url: str) -> dict[str, float]:
    """Prefix-cache counters and the summed end-to-end latency of finished requests, from /metrics."""
    text = httpx.get(f"{root_url(base_url)}/metrics", timeout=10.0).raise_for_status().text
    latency = [line for line in text.splitlines() if line.startswith("vllm:e2e_request_latency_seconds_sum")]
    return {**prefix_cache_counts(text), "request_seconds": sum(float(line.rsplit(" ", 1)[1]) for line in latency)}


def all_variant_rows(bench: Bench, variants: list[Variant], concurrency: list[int], greedy: dict[str, list[Episode]],
                     failed: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each variant's rows (openai on the first one); a variant that breaks the engine is listed in ``failed``."""
    rows = []
    for index, variant in enumerate(variants):
        try:
            table, greedy[f"vllm[{variant.name}]"] = variant_rows(bench, variant, concurrency, index == 0)
        except (RolloutEngineError, VLLMServerError) as error:  # a lever that breaks the engine is a result
            cause = last_error_line(bench.log_dir / variant.name / "vllm.log")
            print(f"!! vllm[{variant.name}] FAILED, server stopped: {error}\n   its log says: {cause}")
            failed.append({"name": f"vllm[{variant.name}]", "error": str(error)[:500], "cause": cause})
            continue
        rows += table
    return rows


def last_error_line(log_path: Path) -> str:
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if "Error:" in line]
    return (lines or [f"(no error line in {log_path})"])[-1]


def vllm_available(skip: bool) -> bool:
    try:
        return not skip and vllm_python().is_file()
    except VLLMServerError as error:
        print(f"!! vllm and openai rows LEFT OUT: {error}")
        return False


def share(flags) -> float:
    flags = list(flags)
    return round(sum(map(bool, flags)) / len(flags), 3)


def agreement(reference: list[Episode], other: list[Episode]) -> dict[str, Any]:
    """Per held-out split: the share of tasks whose action sequences, and first actions, are identical."""
    result = {}
    for split in HELD_OUT_SPLITS:
        pairs = [(a, b) for a, b in zip(reference, other, strict=True) if a.split == split]
        assert all(a.task_id == b.task_id for a, b in pairs), "both rollouts list the same tasks in order"
        result[split] = {
            "episodes": len(pairs),
            "same_actions": share(a.actions == b.actions for a, b in pairs),
            "same_first_action": share(a.actions[:1] == b.actions[:1] for a, b in pairs),
            "success": share(b.success for _, b in pairs),
            "reference_success": share(a.success for a, _ in pairs),
        }
    return result


def agreement_rows(greedy: dict[str, list[Episode]]) -> list[dict[str, Any]]:
    reference = greedy["async hf"]
    return [{"name": name, "vs": "async hf", **agreement(reference, episodes)}
            for name, episodes in greedy.items() if name != "async hf"]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cell(value: Any, width: int, digits: int = 2) -> str:
    if value is None:
        return "-".rjust(width)
    return (f"{value:.{digits}f}" if isinstance(value, float) else str(value)).rjust(width)


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'rollout':<26}{'eps/s':>8}{'tok/s':>9}{'steps':>7}{'succ':>6}{'hit':>6}{'in_eng':>7}{'start_s':>9}"
          f"{'mism':>9}{'x lockstep':>11}")
    for r in rows:
        mism = None if r["token_checks"] is None else f"{r['token_mismatches']}/{r['token_checks']}"
        restarts = f"  engine restarts: {r['engine_restarts']}" if r["engine_restarts"] else ""
        print(f"{r['name']:<26}{cell(r['episodes_per_s'], 8)}{cell(r['tokens_per_s'], 9, 0)}"
              f"{cell(r['mean_steps'], 7)}{cell(r['success'], 6)}{cell(r['prefix_cache_hit_rate'], 6)}"
              f"{cell(r.get('in_engine'), 7, 1)}{cell(r.get('engine_start_s'), 9, 1)}{cell(mism, 9)}"
              f"{cell(r['vs_lockstep'], 11)}{restarts}")


def print_agreement(rows: list[dict[str, Any]]) -> None:
    print("\ngreedy agreement on held-out tasks, each against async hf's greedy episodes")
    print(f"{'rollout':<26}{'split':<13}{'n':>4}{'same actions':>14}{'same first':>12}{'success':>9}{'hf success':>12}")
    for r in rows:
        for split in HELD_OUT_SPLITS:
            s = r[split]
            print(f"{r['name']:<26}{split:<13}{s['episodes']:>4}{cell(s['same_actions'], 14)}"
                  f"{cell(s['same_first_action'], 12)}{cell(s['success'], 9)}{cell(s['reference_success'], 12)}")


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    loads = {"before": load_average()}
    bench = build_bench(args)
    print(f"load average {loads['before']}; torch threads {torch.get_num_threads()}; tasks {len(bench.train)}; "
          f"temperature {bench.config.rollout.temperature}; logs {bench.log_dir}")
    rows, greedy = hf_rows(bench, args.hf_concurrency)
    if args.fp32_baseline:
        rows.insert(0, fp32_lockstep_row(bench))
    failed: list[dict[str, str]] = []
    if vllm_available(args.skip_vllm):
        rows += all_variant_rows(bench, [Variant.parse(v) for v in args.variants or ["default="]], args.concurrency,
                                 greedy, failed)
    baseline = rows[0]["episodes_per_s"]
    for r in rows:
        r["vs_lockstep"] = round(r["episodes_per_s"] / baseline, 2)
    loads["after"] = load_average()
    print_rows(rows)
    agreed = agreement_rows(greedy) if bench.held_out else []
    if agreed:
        print_agreement(agreed)
    for failure in failed:
        print(f"{failure['name']:<26}FAILED: {failure['cause'][-160:]}")
    print(f"\nload average before {loads['before']}, after {loads['after']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": sys.argv, "checkpoint": bench.checkpoint,
                                              "load_average": loads, "rows": rows, "failed": failed,
                                              "agreement": agreed}, indent=1))


if __name__ == "__main__":
    main()
