"""The rollout backend of one run, chosen by ``rollout.backend`` and kept for the run's whole life.

A run rolls out several checkpoints (the shared SFT model, then each agent after each iteration).
With ``vllm`` the server starts once, at the first rollout, and later checkpoints are loaded into the
running engine (coevo_lib.serving); with ``openai`` the user's endpoints get the same weight loads;
with ``hf`` the model of the current checkpoint is loaded in this process. Start, swap and restart
costs are counted and returned with each rollout's statistics.

A LoRA adapter checkpoint (``model.lora.enabled``) is served on its base: the vllm server starts on the
base with LoRA on, each adapter is loaded beside it under a name of its own (requests name it as their
model) and the base weights are never swapped; ``openai`` endpoints get the same adapter loads (they
must serve that base with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); ``hf`` loads the
base with the adapter merged in.
"""

from __future__ import annotations

import hashlib
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from coevo_lib.backends import HFBatcher, HTTPBackend, RolloutEngineError, api_key
from coevo_lib.config import RunConfig
from coevo_lib.engine import RolloutTask, rollout_async
from coevo_lib.envs.base import TextEnv
from coevo_lib.models import (adapter_base, is_peft_checkpoint, load_model, load_tokenizer, resolve_device,
                              resolve_dtype, stop_token_ids)
from coevo_lib.records import Episode
from coevo_lib.rollout import HFGenerator, TaskRef

log = logging.getLogger(__name__)

ADAPTERS_KEPT = 2  # the target and the failure agent alternate; older adapters are unloaded


class RolloutService:
    def __init__(self, config: RunConfig, log_dir: Path):
        self.config, self.log_dir = config, log_dir
        self.checkpoint: str | None = None
        self.hf: HFGenerator | None = None
        self.server = None  # coevo_lib.serving.VLLMServer, started at the first vllm rollout
        self.adapter: str | None = None  # the name requests give as their model when serving a LoRA adapter
        self.adapters_loaded: list[str] = []  # on the server or the endpoints, oldest first
        self.costs: dict[str, float] = {}

    # -- one rollout ----------------------------------------------------------------------------

    def rollout(self, envs: list[TextEnv], refs: list[TaskRef], checkpoint: str, task: RolloutTask,
                out_path: Path | None) -> tuple[list[Episode], dict[str, Any]]:
        self.costs = {}
        self.serve(checkpoint)
        tokenizer = self.hf.tokenizer if self.config.rollout.backend == "hf" else load_tokenizer(checkpoint)
        before = self.server.prefix_cache_stats() if self.server else None
        episodes, stats = rollout_async(envs, refs, self.backend_factory(tokenizer), tokenizer, task, out_path)
        if self.server is not None:
            stats.update(prefix_cache_delta(before, self.server.prefix_cache_stats()))
            stats["engine_restarts"] = self.server.restarts
            stats["engine_port_retries"] = self.server.port_retries
        served = {"adapter": self.adapter} if self.adapter else {}
        return episodes, {"backend": self.config.rollout.backend, **served, **stats, **self.costs}

    def task(self, agent: str, iteration: int, kind: str, temperature: float) -> RolloutTask:
        return RolloutTask(agent=agent, iteration=iteration, kind=kind, prompt=self.config.prompt,
                           seed=self.config.seed, temperature=temperature,
                           max_new_tokens=self.config.rollout.max_new_tokens,
                           max_prompt_tokens=self.config.prompt.max_prompt_tokens)

    def backend_factory(self, tokenizer) -> Callable[[], Any]:
        rollout = self.config.rollout
        if rollout.backend == "hf":
            return lambda: HFBatcher(self.hf, max_batch=rollout.max_concurrent)
        stop_ids = stop_token_ids(tokenizer)
        # Text decoded by coevo's tokenizer from the engine's ids, exactly as the hf backend decodes it.
        decode = partial(tokenizer.decode, skip_special_tokens=True)
        if rollout.backend == "vllm":
            return lambda: HTTPBackend([self.server.base_url], self.adapter or self.server.served_name, rollout,
                                       stop_ids, retries=3, recover=self.recover_server, decode=decode)
        key = api_key(rollout.openai.api_key_env)
        return lambda: HTTPBackend(rollout.openai.urls, self.adapter or self.openai_model(), rollout, stop_ids,
                                   retries=rollout.openai.retries, api_key=key, recover=self.wait_for_endpoint,
                                   decode=decode)

    # -- weights ----------------------------------------------------------------------------------

    def serve(self, checkpoint: str) -> None:
        """Make ``checkpoint`` the weights every request of the next rollout is answered by."""
        if checkpoint == self.checkpoint and (self.server is None or self.server.alive()):
            return
        served = str(Path(checkpoint).resolve())  # servers run in their own working directory
        if self.config.rollout.backend != "hf" and is_peft_checkpoint(served):
            self.serve_adapter(served)
        else:
            self.adapter = None
            self.serve_weights(checkpoint, served)
        self.checkpoint = checkpoint

    def serve_weights(self, checkpoint: str, served: str) -> None:
        start = time.perf_counter()
        backend = self.config.rollout.backend
        if backend == "hf":
            self.hf = HFGenerator(load_model(checkpoint, self.config.model).eval(), load_tokenizer(checkpoint),
                                  self.config.rollout, self.config.prompt.max_prompt_tokens)
            self.costs["model_load_s"] = round(time.perf_counter() - start, 3)
        elif backend == "vllm" and self.server is None:
            self.server = self.start_server(served)
            self.costs["engine_start_s"] = round(time.perf_counter() - start, 3)
        elif backend == "vllm":
            self.costs["weight_swap_s"] = round(self.server.swap_weights(served), 3)
        else:
            from coevo_lib.serving import swap_weights_at

            for url in self.config.rollout.openai.urls:
                swap_weights_at(url, served)
            self.costs["weight_swap_s"] = round(time.perf_counter() - start, 3)

    def serve_adapter(self, adapter: str) -> None:
        """The base stays loaded (vllm: the server starts on it once) and the adapter is loaded beside it."""
        if self.config.rollout.backend == "vllm":
            self.serve_base(adapter_base(adapter))
        start = time.perf_counter()
        self.adapter = adapter_name(adapter)
        self.load_adapter(self.adapter, adapter)
        self.costs["adapter_load_s"] = round(time.perf_counter() - start, 3)

    def serve_base(self, base: str) -> None:
        start = time.perf_counter()
        if self.server is None:
            self.server = self.start_server(base, lora_rank=self.config.model.lora.r)
            self.costs["engine_start_s"] = round(time.perf_counter() - start, 3)
        elif self.server.model != base:  # adapters of another base: never within one run
            self.costs["weight_swap_s"] = round(self.server.swap_weights(base), 3)
        elif not self.server.alive():
            self.costs["engine_restart_s"] = round(self.server.restart(), 3)

    def load_adapter(self, name: str, path: str) -> None:
        """Load (or reload) adapter ``name`` and unload the ones loaded before the last ``ADAPTERS_KEPT``."""
        vllm = self.config.rollout.backend == "vllm"
        urls = self.config.rollout.openai.urls
        load = self.server.load_adapter if vllm else lambda *args: [load_adapter_at(url, *args) for url in urls]
        unload = self.server.unload_adapter if vllm else lambda *args: [unload_adapter_at(url, *args) for url in urls]
        load(name, path)
        self.adapters_loaded = [loaded for loaded in self.adapters_loaded if loaded != name] + [name]
        for stale in self.adapters_loaded[:-ADAPTERS_KEPT]:
            unload(stale)
        self.adapters_loaded = self.adapters_loaded[-ADAPTERS_KEPT:]

    def start_server(self, checkpoint: str, lora_rank: int | None = None):
        from coevo_lib.serving import VLLMServer, vllm_python

        vllm = self.config.rollout.vllm
        server = VLLMServer(
            checkpoint, self.log_dir / "vllm.log", python=vllm_python(vllm.python), seed=self.config.seed,
            # The hf path's dtype (fp32 on CPU): vLLM's "auto" runs an fp32 model in bf16 on CPU, and the two
            # backends should answer alike; --dtype in extra_args overrides it (they come last).
            dtype=str(resolve_dtype(self.config.model, resolve_device(self.config.model))).removeprefix("torch."),
            max_model_len=vllm.max_model_len or self.config.prompt.max_prompt_tokens,
            tensor_parallel_size=vllm.tensor_parallel_size, data_parallel_size=vllm.data_parallel_size,
            gpu_memory_utilization=vllm.gpu_memory_utilization, kv_cache_gib=vllm.kv_cache_gib,
            start_timeout_s=vllm.start_timeout_s, extra_args=cpu_build_args() + vllm.extra_args,
            # No thread binding of coevo's own on CPU: binding both of 2 vCPUs was 9% faster alone but 38%
            # slower beside another process, and made the vLLM tests 1.6x slower (docs/pretrained-models.md).
            env={k: str(v) for k, v in vllm.env.items()},
            lora_rank=lora_rank, max_loras=ADAPTERS_KEPT,
        )
        log.info("vLLM server started in %.1f s (%s)", server.start(), server.base_url)
        return server

    def recover_server(self, url: str) -> list[str]:
        """A request to coevo's server failed: restart it if it died or hangs, with the current weights."""
        if not self.server.alive():
            log.warning("vLLM server at %s is down: restarting it (log: %s)", url, self.server.log_path)
            self.server.restart()
        return [self.server.base_url]

    def wait_for_endpoint(self, url: str) -> list[str]:
        # Not coevo's process: nothing to restart; give it a moment before the retry.
        time.sleep(2.0)
        return self.config.rollout.openai.urls

    def openai_model(self) -> str:
        if self.config.rollout.openai.model:
            return self.config.rollout.openai.model
        from coevo_lib.serving import served_model

        try:
            return served_model(self.config.rollout.openai.urls[0])
        except Exception as error:  # noqa: BLE001 - any failure to ask is the same failure for the user
            raise RolloutEngineError(f"cannot ask {self.config.rollout.openai.urls[0]} for its model: {error}; "
                                     "set rollout.openai.model") from error

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.hf, self.adapter, self.adapters_loaded = None, None, []


def prefix_cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This rollout's share of the server's cumulative prefix-cache counters (tokens)."""
    if after["prefix_cache_queries"] < before["prefix_cache_queries"]:  # the server restarted: counters reset
        before = {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries > 0 else None}


def adapter_name(path: str) -> str:
    """A served name unique per written adapter: its folder name and a digest of its absolute path and write time.

    vLLM keeps prefix-cache blocks of an adapter reloaded under its old name, so a checkpoint written again
    at the same path (a run directory reused) must not reuse the name.
    """
    written = (Path(path) / "adapter_config.json").stat().st_mtime_ns
    return f"{Path(path).name}-{hashlib.sha1(f'{path}@{written}'.encode()).hexdigest()[:8]}"


def load_adapter_at(base_url: str, name: str, path: str) -> None:
    """Load the LoRA adapter at ``path`` into a running vLLM server as model ``name`` (replacing one of that name).

    The same call as VLLMServer.load_adapter; the server needs --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and ``path`` must be readable where it runs.
    """
    from coevo_lib.serving import post, root_url

    post(f"{root_url(base_url)}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": True},
         f"load LoRA adapter {name} from {path} (a server started with --enable-lora and "
         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)")


def unload_adapter_at(base_url: str, name: str) -> None:
    from coevo_lib.serving import VLLMServerError, post, root_url

    try:
        post(f"{root_url(base_url)}/v1/unload_lora_adapter", {"lora_name": name}, f"unload LoRA adapter {name}")
    except VLLMServerError as error:
        if "HTTP 404" not in str(error):
            raise
        # An endpoint restarted since it was loaded has nothing to unload; the adapter in use is loaded anew.
        log.warning("%s no longer holds adapter %s (restarted?)", base_url, name)


def cpu_build_args() -> list[str]:
    """vLLM 0.32's CPU build dies ("CPU Generator does not use offset") when a seeded request's prompt is
    split across engine steps by chunked prefill, so coevo turns chunked prefill off there (measured by
    bench/rollout.py; rollout.vllm.extra_args come after and can turn it back on)."""
    import torch

    return [] if torch.cuda.is_available() else ["--no-enable-chunked-prefill"]
