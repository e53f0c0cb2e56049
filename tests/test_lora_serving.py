"""model.lora.enabled: checkpoints are LoRA adapters on one base, trained further and served as adapters.

On CPU: SFT saves an adapter (no full weights) naming its base by absolute path; DPO goes on from it with
the adapter as its reference; an adapter loads merged for inference and as a standalone copy; openai
endpoints get each adapter loaded (older ones unloaded) and requests name it. On a real vLLM server
(.venv-vllm, marker vllm): a short coevo run with LoRA starts the engine once on the base, never swaps
weights, loads each checkpoint's adapter (two kept: the target and the failure agent), and its greedy
evaluation replies equal the hf backend's on the same adapter checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coevo_lib.api import run
from coevo_lib.config import DPOStageConfig, LoraConfig, ModelConfig, SFTStageConfig, load_config
from coevo_lib.models import adapter_base, load_model, load_tokenizer, save_agent, save_merged
from coevo_lib.records import read_episodes
from coevo_lib.rollout import HFGenerator
from coevo_lib.rollout_service import RolloutService, adapter_name
from coevo_lib.train import sequence_logps, train_sft
from coevo_lib.train.common import changed_parameters, parameters_snapshot, run_quietly
from coevo_lib.train.dpo import build_dpo_trainer, pairs_dataset

from conftest import make_episode

RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "minishop" / "coevo.yaml")
LORA = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0)
FULL_WEIGHTS = {"model.safetensors", "pytorch_model.bin", "config.json"}


def is_adapter_only(checkpoint: Path) -> bool:
    files = {p.name for p in checkpoint.iterdir()}
    return {"adapter_config.json", "adapter_model.safetensors"} <= files and not files & FULL_WEIGHTS


def chosen_logps(model, tokenizer, pair) -> float:
    return sequence_logps(model, tokenizer, pair.prompt_messages, pair.chosen_messages)


@pytest.fixture()
def lora_sft(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """A base saved at a relative path (as a run's checkpoints are) and an SFT adapter trained on it."""
    monkeypatch.chdir(tmp_path)
    save_agent(tiny_model, tiny_tokenizer, Path("base"))
    config = ModelConfig(name_or_path="base", lora=LORA)
    model, tokenizer = load_model("base", config, trainable=True), load_tokenizer("base")
    episodes = [make_episode("e", "buy a red mug", [("search[red mug]", "ok"), ("click[buy now]", "")], 1.0)] * 4
    train_sft(model, tokenizer, episodes, SFTStageConfig(epochs=2, batch_size=2, learning_rate=1e-2,
                                                         warmup_ratio=0.0, max_length=256), Path("tb-sft"), seed=0)
    save_agent(model, tokenizer, Path("sft"))
    return config, tmp_path / "sft"


def test_lora_sft_saves_an_adapter_on_its_base(lora_sft, tmp_path):
    config, sft = lora_sft
    assert is_adapter_only(sft) and (sft / "tokenizer.json").is_file()
    assert adapter_base(sft) == str(tmp_path / "base")  # absolute: servers read it from elsewhere
    assert json.loads((sft / "adapter_config.json").read_text())["r"] == LORA.r


def test_dpo_goes_on_from_an_adapter_against_that_adapter(lora_sft, tiny_tokenizer, shop_pairs, tmp_path):
    config, sft = lora_sft
    start = load_model(sft, config, trainable=True)
    assert {n for n, p in start.named_parameters() if p.requires_grad} == {
        n for n, _ in start.named_parameters() if "lora_" in n}
    merged_sft, base = load_model(sft, config).eval(), load_model(tmp_path / "base", config).eval()
    stage = DPOStageConfig(epochs=1, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, max_length=256)
    trainer = build_dpo_trainer(start, tiny_tokenizer, pairs_dataset(tiny_tokenizer, shop_pairs), stage,
                                tmp_path / "tb-dpo", seed=0)
    # The reference is the SFT adapter (trl's frozen 'ref' copy of it), not the base with adapters off.
    reference = trainer.train_dataset["ref_chosen_logps"][0]
    assert reference == pytest.approx(chosen_logps(merged_sft, tiny_tokenizer, shop_pairs[0]), rel=1e-4)
    assert reference != pytest.approx(chosen_logps(base, tiny_tokenizer, shop_pairs[0]), rel=1e-2)
    before = parameters_snapshot(start)
    run_quietly(trainer)
    assert changed_parameters(start, before) > 0
    save_agent(start, tiny_tokenizer, tmp_path / "dpo")
    assert is_adapter_only(tmp_path / "dpo") and not (tmp_path / "dpo" / "ref").exists()
    assert adapter_base(tmp_path / "dpo") == str(tmp_path / "base")
    trained = load_model(tmp_path / "dpo", config).eval()
    assert chosen_logps(trained, tiny_tokenizer, shop_pairs[0]) > reference  # DPO + SFT raise the chosen side


def test_an_adapter_loads_merged_and_exports_a_standalone_copy(lora_sft, tmp_path):
    from peft import AutoPeftModelForCausalLM

    config, sft = lora_sft
    merged = load_model(sft, config).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    save_merged(sft, config, tmp_path / "standalone")
    standalone = load_model(tmp_path / "standalone", config).eval()
    unmerged = AutoPeftModelForCausalLM.from_pretrained(str(sft)).eval()
    ids = torch.tensor([load_tokenizer(sft).encode("Instruction: buy a red mug")])
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in (merged, standalone, unmerged)]
    assert torch.equal(logits[0], logits[1]) and torch.allclose(logits[0], logits[2], atol=1e-5)


def test_openai_endpoints_get_each_adapter_and_requests_name_it(lora_sft, tmp_path, monkeypatch):
    import coevo_lib.serving as serving

    urls = ["http://a:8000/v1", "http://b:8000/v1"]
    config = load_config(RECIPE, ["model.lora.enabled=true", "rollout.backend=openai",
                                  f"rollout.openai.urls=[{','.join(urls)}]"])
    posts = []
    monkeypatch.setattr(serving, "post", lambda url, payload, action: posts.append((url, payload)) or {})
    service = RolloutService(config, tmp_path / "serving")
    adapters = [str(lora_sft[1])]
    for name in ("target-it1", "failure-it1"):
        adapters.append(str(tmp_path / name))
        Path(adapters[-1]).mkdir()
        (Path(adapters[-1]) / "adapter_config.json").write_text((lora_sft[1] / "adapter_config.json").read_text())
    names = [adapter_name(path) for path in adapters]
    for path, name in zip(adapters, names):
        service.serve(path)
        assert service.adapter == name and service.backend_factory(load_tokenizer(lora_sft[1]))().model == name
    loads = [(url, payload) for url, payload in posts if url.endswith("/load_lora_adapter")]
    assert loads == [(f"{url.removesuffix('/v1')}/v1/load_lora_adapter",
                      {"lora_name": name, "lora_path": path, "load_inplace": True})
                     for path, name in zip(adapters, names) for url in urls]
    unloads = [payload["lora_name"] for url, payload in posts if url.endswith("/unload_lora_adapter")]
    assert unloads == [names[0], names[0]]  # the target and the failure agent's adapters stay, on both endpoints
    assert service.costs["adapter_load_s"] >= 0 and "weight_swap_s" not in service.costs


# -- on a real vLLM server ------------------------------------------------------------------------

# test_vllm_backend's fast tiny run (head_dim 32: hidden 32 / 1 head) with LoRA adapters as checkpoints, on
# every linear layer at a high learning rate so that two SFT epochs change the replies. Two iterations: the
# target and the failure agent's adapters alternate on the server (and older ones are unloaded).
SMOKE = [
    "rollout.max_tasks=6", "rollout.max_new_tokens=16", "eval.max_tasks=4", "sft.epochs=2", "dpo.epochs=1",
    "loop.failure_dpo.epochs=1", "loop.iterations=2", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
    "model.tiny.num_heads=1", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=512",
    "model.tiny.tokenizer_tasks_per_split=30", "sft.share=false", "rollout.max_concurrent=4",
    "model.lora.enabled=true", "model.lora.r=8", "sft.learning_rate=3e-2",
    "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]


@pytest.fixture(scope="module")
def lora_run(vllm_bin, tmp_path_factory):
    return run(RECIPE, SMOKE + ["rollout.backend=vllm", f"rollout.vllm.python={vllm_bin}"],
               run_dir=tmp_path_factory.mktemp("lora") / "run")


def engines(lora_run) -> dict[str, dict]:
    """Every rollout's engine statistics, by stage (and split for evaluations)."""
    found = {}
    for row in lora_run.metrics():
        for key, value in row.items():
            if key == "engine" or key.endswith("_engine"):
                found[f"{row['stage']}/{key}"] = value
    return found


@pytest.mark.vllm
def test_a_lora_run_serves_adapters_on_one_base_started_once(lora_run):
    base = lora_run.checkpoint("base").resolve()
    checkpoints = ("sft", "target-it1", "failure-it1", "target-it2")  # the last failure update is skipped
    for name in checkpoints:
        assert is_adapter_only(lora_run.checkpoint(name)) and adapter_base(lora_run.checkpoint(name)) == str(base)
    stats = engines(lora_run)
    assert all(engine["backend"] == "vllm" and engine["engine_restarts"] == 0 for engine in stats.values())
    assert [key for key, engine in stats.items() if "engine_start_s" in engine] == ["it0-eval/test_seen_engine"]
    assert not any("weight_swap_s" in engine for engine in stats.values())
    log = (lora_run.path / "serving" / "vllm.log").read_text()
    assert log.count("=== ") == 1 and f"--model {base}" in log and "--enable-lora" in log  # one start, on the base
    served = {name: adapter_name(str(lora_run.checkpoint(name).resolve())) for name in checkpoints}
    assert {key: engine["adapter"] for key, engine in stats.items()} == {
        "it0-eval/test_seen_engine": served["sft"], "it0-eval/test_unseen_engine": served["sft"],
        "it1-rollout-target/engine": served["sft"], "it1-rollout-failure/engine": served["sft"],
        "it1-eval/test_seen_engine": served["target-it1"], "it1-eval/test_unseen_engine": served["target-it1"],
        "it2-rollout-target/engine": served["target-it1"], "it2-rollout-failure/engine": served["failure-it1"],
        "it2-eval/test_seen_engine": served["target-it2"], "it2-eval/test_unseen_engine": served["target-it2"]}
    for name in ("sft", "target-it1", "failure-it1", "target-it2"):  # each served checkpoint's adapter loaded once
        assert log.count(f"Loaded new LoRA adapter: name '{served[name]}'") == 1
    # Two adapters stay loaded (the target and the failure agent): the older ones went, oldest first.
    assert log.index(f"Removed LoRA adapter: name '{served['sft']}'") < log.index(
        f"Removed LoRA adapter: name '{served['target-it1']}'")


@pytest.mark.vllm
def test_greedy_replies_of_an_adapter_on_vllm_equal_hf(lora_run):
    """Every greedy reply of the last evaluation on vllm equals hf's (base + adapter) given the same history.

    Turn by turn on vLLM's histories, not whole episodes: the barely trained tiny model emits stray UTF-8
    bytes, and where a reply cut at max_new_tokens ends inside a character vLLM's detokenizer drops it while
    transformers decodes it to U+FFFD; the next prompt then differs, so whole episodes part there.
    """
    config = load_config(RECIPE, SMOKE)
    adapter, base = (HFGenerator(load_model(path, config.model).eval(), load_tokenizer(path), config.rollout,
                                 config.prompt.max_prompt_tokens)
                     for path in (lora_run.checkpoint("target-it2"), lora_run.checkpoint("base")))
    prompts, served = [], []
    for split in ("test_seen", "test_unseen"):
        for episode in read_episodes(lora_run.episodes(f"it2-eval-{split}-target")):
            turns = [turn for turn, message in enumerate(episode.messages) if message["role"] == "assistant"]
            prompts += [adapter.prompt_ids(episode.messages[:turn]) for turn in turns]
            served += [episode.messages[turn]["content"] for turn in turns]
    ours = [text for text, _ in adapter.generate(prompts, temperature=0.0, seed=0)]
    assert [text.rstrip("\ufffd") for text in ours] == [text.rstrip("\ufffd") for text in served]
    base_replies = [text for text, _ in base.generate(prompts, temperature=0.0, seed=0)]
    assert len(served) >= 8 and sum(a != b for a, b in zip(base_replies, ours)) > len(served) // 2  # the adapter's
