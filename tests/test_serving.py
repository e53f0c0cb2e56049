"""coevo_lib.serving: the vLLM server manager, against a real server (.venv-vllm, the CPU build) on a tiny model.

One server serves the whole module (start to ready ~30 s on 2 cores), plus the one restart the kill test
makes. Replies are checked token for token against transformers' greedy generation on the same weights.
Without .venv-vllm the vllm tests skip, unless COEVO_REQUIRE_VLLM is set (CI): then they fail.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from coevo_lib import serving
from coevo_lib.config import LoraConfig, TinyModelConfig
from coevo_lib.models import wrap_lora
from coevo_lib.serving import (
    VLLMServer,
    VLLMServerError,
    free_port,
    live_group_members,
    prefix_cache_counts,
    served_lora_rank,
    vllm_python,
)
from coevo_lib.tiny_model import build_tiny_model

# head_dim = 64 / 2 = 32: vLLM's CPU attention rejects the tiny model's usual head sizes (24).
SERVED_TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                              max_position_embeddings=512)
NEW_TOKENS = 12
SHORT_TASKS = ["buy a red mug", "buy a blue mug", "search[red mug]"]
# Over one KV block (128 tokens on the CPU build), so its prefix is cached and hit the second time.
LONG_TASK = "Observation: [B0AAAA] red mug | $10.00 [B0BBBB] blue mug | $12.00 " * 8


@dataclass
class Served:
    base_a: str
    base_b: str
    adapter: str
    prompts: list[list[int]]
    greedy: dict[str, list[list[int]]]  # checkpoint or adapter path -> transformers' greedy reply per prompt
    eos: int


def spread_layer_weights(model, seed: int) -> None:
    """Draw the layers' matrices wider than the 0.02 init: with it, and tied embeddings, every greedy reply
    repeats the prompt's last token whatever the seed, and a weight swap would change no reply."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.model.layers.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.1, generator=generator)


def save_tiny_checkpoint(tokenizer, seed: int, out_dir: Path) -> str:
    model = build_tiny_model(SERVED_TINY, tokenizer, seed)
    spread_layer_weights(model, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def save_random_adapter(base: str, out_dir: Path) -> str:
    """A peft adapter on q/k/v/o_proj whose B matrices are not zero (peft's init), so it changes replies."""
    from transformers import AutoModelForCausalLM

    model = wrap_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, alpha=16, dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.1, generator=generator)
    model.save_pretrained(out_dir)
    return str(out_dir)


def transformers_greedy(path: str, prompts: list[list[int]], eos: int) -> list[list[int]]:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    loader = AutoPeftModelForCausalLM if (Path(path) / "adapter_config.json").exists() else AutoModelForCausalLM
    model = loader.from_pretrained(path, dtype=torch.float32).eval()
    replies = []
    for prompt in prompts:
        output = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos)
        replies.append(through_eos(output[0, len(prompt):].tolist(), eos))
    return replies


def through_eos(token_ids: list[int], eos: int) -> list[int]:
    return token_ids[: token_ids.index(eos) + 1] if eos in token_ids else token_ids


@pytest.fixture(scope="module")
def served(vllm_bin, tiny_tokenizer, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served")
    base_a = save_tiny_checkpoint(tiny_tokenizer, 0, root / "a")
    base_b = save_tiny_checkpoint(tiny_tokenizer, 1, root / "b")
    adapter = save_random_adapter(base_a, root / "adapter")
    tasks = [*SHORT_TASKS, LONG_TASK]
    prompts = [list(tiny_tokenizer.apply_chat_template([{"role": "user", "content": task}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"])
               for task in tasks]
    eos = tiny_tokenizer.eos_token_id
    greedy = {path: transformers_greedy(path, prompts, eos) for path in (base_a, base_b, adapter)}
    return Served(base_a, base_b, adapter, prompts, greedy, eos)


@pytest.fixture(scope="module")
def server(vllm_bin, served, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    vllm = VLLMServer(served.base_a, log_path, python=vllm_bin, max_model_len=512, dtype="float32", lora_rank=8,
                      kv_cache_gib=1, start_timeout_s=600)
    vllm.start()
    yield vllm
    vllm.stop()


def greedy_replies(server: VLLMServer, model: str, prompts: list[list[int]], eos: int) -> list[list[int]]:
    replies = []
    for prompt in prompts:
        response = httpx.post(f"{server.base_url}/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "return_token_ids": True, "stop_token_ids": [eos]})
        response.raise_for_status()
        choice = response.json()["choices"][0]
        assert choice["prompt_token_ids"] == prompt
        replies.append(through_eos(choice["token_ids"], eos))
    return replies


@pytest.mark.vllm
def test_token_id_prompts_get_the_served_checkpoints_greedy_replies(server, served):
    assert server.alive()
    assert greedy_replies(server, server.served_name, served.prompts, served.eos) == served.greedy[served.base_a]


@pytest.mark.vllm
def test_lora_adapter_replies_match_peft(server, served):
    server.load_adapter("agent", served.adapter)
    assert greedy_replies(server, "agent", served.prompts, served.eos) == served.greedy[served.adapter]
    assert greedy_replies(server, server.served_name, served.prompts, served.eos) == served.greedy[served.base_a]


@pytest.mark.vllm
def test_weight_swap_serves_the_new_checkpoint_with_an_empty_prefix_cache(server, served):
    long_prompt = served.prompts[-1:]
    greedy_replies(server, server.served_name, long_prompt * 2, served.eos)
    hits_before_swap = server.prefix_cache_stats()["prefix_cache_hits"]
    assert hits_before_swap > 0
    server.swap_weights(served.base_b)
    # The long prompt's prefix was cached under checkpoint A: its reply is B's only if the cache was emptied.
    assert greedy_replies(server, server.served_name, served.prompts, served.eos) == served.greedy[served.base_b]
    assert server.prefix_cache_stats()["prefix_cache_hits"] == hits_before_swap
    server.swap_weights(served.base_a)
    assert greedy_replies(server, server.served_name, served.prompts, served.eos) == served.greedy[served.base_a]
    assert server.restarts == 0


@pytest.mark.vllm
def test_a_killed_server_is_detected_and_restarted_with_its_adapters(server, served):
    server.load_adapter("agent", served.adapter)
    restarts, killed_group = server.restarts, server.pid
    os.kill(server.pid, signal.SIGKILL)  # the API server only: its engine core and worker live on
    server.process.wait(timeout=30)
    assert not server.alive()
    server.restart()
    assert server.restarts == restarts + 1 and server.alive()
    assert live_group_members(killed_group) == []
    assert greedy_replies(server, server.served_name, served.prompts, served.eos) == served.greedy[server.model]
    assert greedy_replies(server, "agent", served.prompts, served.eos) == served.greedy[served.adapter]


@pytest.mark.vllm
def test_stop_leaves_no_process_behind(server):
    group, base_url = server.pid, server.base_url
    server.stop()
    assert live_group_members(group) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url.removesuffix('/v1')}/health", timeout=5)
    server.stop()  # stopping a stopped server does nothing


def test_prefix_cache_counts_sum_the_engines_counters():
    metrics = "\n".join([
        "# TYPE vllm:prefix_cache_queries_total counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="policy"} 300.0',
        'vllm:prefix_cache_queries_total{engine="1",model_name="policy"} 100.0',
        'vllm:prefix_cache_queries_created{engine="0",model_name="policy"} 1.79e+09',
        'vllm:prefix_cache_hits_total{engine="0",model_name="policy"} 128.0',
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="policy"} 64.0',
    ])
    assert prefix_cache_counts(metrics) == {"prefix_cache_queries": 400.0, "prefix_cache_hits": 128.0,
                                            "prefix_cache_hit_rate": 0.32}
    assert prefix_cache_counts("")["prefix_cache_hit_rate"] == 0.0


def test_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [served_lora_rank(r) for r in (1, 4, 8, 16, 20)] == [1, 8, 8, 16, 32]
    with pytest.raises(VLLMServerError, match="above"):
        served_lora_rank(1024)


def test_a_missing_vllm_venv_names_make_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("COEVO_VLLM_PYTHON", raising=False)
    with pytest.raises(VLLMServerError, match="make vllm"):
        vllm_python(tmp_path / "bin" / "python")


def test_command_enables_prefix_caching_lora_and_lets_extra_args_override(tmp_path):
    server = VLLMServer("/ckpt", tmp_path / "vllm.log", python=Path("/venv/bin/python"), max_model_len=1024,
                        lora_rank=4, kv_cache_gib=2, extra_args=["--dtype", "bfloat16"])
    server.port = 8123
    command = server.command()
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-prefix-caching" in command and command[-2:] == ["--dtype", "bfloat16"]
    assert command[command.index("--max-lora-rank") + 1] == "8"
    env = server.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


# A stand-in for vLLM's API server that binds its port as vLLM does (SO_REUSEADDR, then bind: EADDRINUSE only
# when another socket listens there) and answers /health: the port handling without a vLLM start.
STAND_IN_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.fixture()
def stand_in(monkeypatch, tmp_path):
    monkeypatch.setattr(VLLMServer, "command", lambda self: [sys.executable, "-c", STAND_IN_SERVER, str(self.port)])
    return lambda **kwargs: VLLMServer("unused", tmp_path / "server.log", python=Path(sys.executable),
                                       max_model_len=64, start_timeout_s=30, **kwargs)


def test_a_free_port_taken_before_the_server_binds_it_is_replaced_and_counted(stand_in, taken_port, monkeypatch):
    offered = iter([taken_port])
    monkeypatch.setattr(serving, "free_port", lambda: next(offered, None) or free_port())
    server = stand_in()
    with server:
        assert server.port != taken_port and server.port_retries == 1 and server.alive()
    assert "address already in use" in server.log_path.read_text().lower()


def test_a_taken_port_the_caller_asked_for_is_an_error_naming_it(stand_in, taken_port):
    server = stand_in(port=taken_port)
    with pytest.raises(VLLMServerError, match="exited with code") as failure:
        server.start()
    assert "Address already in use" in str(failure.value) and server.port_retries == 0 and server.process is None
