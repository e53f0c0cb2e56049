"""Checks of a run's inputs that need more than the config's own types, done before a run directory exists.

``load_config`` already rejects unknown keys, wrong types and out-of-range values. What it cannot see: whether
the environment takes the keyword arguments given (and accepts their values), and whether the model path names
something that can be loaded here. Both are checked now, so a bad input is a one-line ConfigError and never a
traceback after the run directory was written (or, for an existing run, after anything in it was touched).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import socket
from pathlib import Path

from coevo_lib.config import ConfigError, EnvConfig, RunConfig
from coevo_lib.escaping import one_line
from coevo_lib.envs import EnvError, available_envs, make_env
from coevo_lib.envs import _REGISTRY as ENV_REGISTRY
from coevo_lib.model_store import REGISTRY as MODEL_REGISTRY, ModelNotFetched, resolve_model

HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
HUB_HOST = ("huggingface.co", 443)


def check_run_inputs(config: RunConfig) -> None:
    """Raise ConfigError naming the key and value when the environment or the model cannot be used."""
    check_env(config.env)
    check_model_path(config.model.name_or_path)
    if config.rollout.backend == "vllm":
        check_vllm(config)
    if config.train.compile:
        check_compiler()


def check_compiler() -> None:
    """train.compile runs inductor, whose CPU backend builds C++: a missing compiler would fail mid-stage."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        raise ConfigError(f"config key 'train.compile': true needs a C++ compiler for torch.compile's CPU backend "
                          f"and none was found ({compiler!r} or 'c++' on PATH; Debian: apt-get install g++)")


# vLLM 0.32's CPU attention (CPUAttentionBackend.get_supported_head_sizes); GPU backends take these too.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_vllm(config: RunConfig) -> None:
    """vLLM's venv exists, and the tiny model's head size is one vLLM's CPU attention serves."""
    from coevo_lib.serving import VLLMServerError, vllm_python

    try:
        vllm_python(config.rollout.vllm.python)
    except VLLMServerError as error:
        raise ConfigError(f"config key 'rollout.backend': vllm needs vLLM's venv: {one_line(error)}") from None
    tiny = config.model.tiny
    head_dim = tiny.hidden_size // tiny.num_heads
    if config.model.name_or_path == "tiny" and head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(f"config key 'model.tiny.num_heads': head size {tiny.hidden_size} / {tiny.num_heads} = "
                          f"{head_dim} is not one vLLM serves ({', '.join(map(str, VLLM_CPU_HEAD_SIZES))})")


def check_env(env: EnvConfig) -> None:
    if env.name not in ENV_REGISTRY:
        raise ConfigError(f"config key 'env.name': unknown environment {env.name!r}; available: "
                          f"{', '.join(available_envs())}")
    check_env_keywords(env.name, env_class(env.name), env.kwargs)
    try:
        make_env(env.name, **env.kwargs).close()
    except (EnvError, TypeError, ValueError, FileNotFoundError, RuntimeError) as error:
        # The environment's own checks (ranges, files it needs, Java); it names the argument.
        raise ConfigError(f"config key 'env.kwargs' of {env.name}: {one_line(error)}") from None


def env_class(name: str) -> type:
    module_name, class_name = ENV_REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # an optional extra that is not installed: its message says how
        raise ConfigError(f"config key 'env.name': environment {name!r} cannot be loaded: {one_line(error)}") from None
    return getattr(module, class_name)


def check_env_keywords(name: str, cls: type, kwargs: dict) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"config key 'env.kwargs.{unknown[0]}': environment {name} has no argument "
                          f"{unknown[0]!r}; it takes {', '.join(accepted)}")


def check_model_path(name_or_path: str) -> None:
    """'tiny', a model coevo provisions by name and has fetched, a local Hugging Face checkpoint directory, or a
    hub id that is cached or downloadable."""
    if name_or_path == "tiny":
        return
    if name_or_path in MODEL_REGISTRY:
        try:
            resolve_model(name_or_path)
        except ModelNotFetched as error:
            raise ConfigError(f"config key 'model.name_or_path': {error}") from None
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.name_or_path': {name_or_path} has no config.json "
                              "(not a Hugging Face model directory)")
        return
    if looks_local(name_or_path) or not HUB_ID_RE.fullmatch(name_or_path):
        raise ConfigError(f"config key 'model.name_or_path': no such model directory: {name_or_path}")
    if hub_cached(name_or_path):
        return
    if offline():
        raise ConfigError(f"config key 'model.name_or_path': {name_or_path!r} is neither a local directory nor "
                          "in the Hugging Face cache, and the hub is unreachable from here (offline): download "
                          "it where the hub is reachable and pass its directory")


def looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError:
        return True
    return False

