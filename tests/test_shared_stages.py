"""What the methods of one seed share: the SFT model, its evaluation and its first training rollout are
computed once and copied; eval.every_iteration=false skips the middle evaluations; a study with
workers=2 runs a seed's other entries only after the run that trains its SFT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from coevo_lib.analysis.loading import is_finished
from coevo_lib.records import read_episodes, read_jsonl
from coevo_lib.study import run_study

SMOKE = [
    "rollout.max_tasks=8", "rollout.batch_size=4", "rollout.max_new_tokens=24", "eval.max_tasks=4",
    "sft.epochs=1", "dpo.epochs=1", "loop.failure_dpo.epochs=1", "loop.iterations=2",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "model.tiny.vocab_size=512", "model.tiny.tokenizer_tasks_per_split=40",
]


def run(recipe: str, run_dir: Path, *extra: str) -> list[dict]:
    args = [sys.executable, "-m", "coevo_lib.cli", "run", f"configs/minishop/{recipe}.yaml", "--run-dir", str(run_dir)]
    for item in SMOKE + list(extra):
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_jsonl(run_dir / "metrics.jsonl")


def stage(metrics: list[dict], name: str) -> dict:
    return next(row for row in metrics if row["stage"] == name)


def episodes(run_dir: Path, name: str) -> list[tuple]:
    return [(ep.episode_id, tuple(ep.actions), ep.reward) for ep in read_episodes(run_dir / "episodes" / name)]


def test_methods_of_a_seed_share_the_sft_evaluation_and_first_rollout(tmp_path):
    eto = run("eto", tmp_path / "eto", "eval.every_iteration=false")
    coevo = run("coevo", tmp_path / "coevo", "eval.every_iteration=false")

    for name in ("it0-eval", "it1-rollout-target"):
        engines = [stage(eto, name), stage(coevo, name)]
        engines = [row.get("engine") or row["test_seen_engine"] for row in engines]
        assert "reused" not in engines[0] and "_shared/rollout-" in engines[1]["reused"], name
    for name in ("it0-eval-test_seen-target.jsonl", "it0-eval-test_unseen-target.jsonl", "it1-train-target.jsonl"):
        assert episodes(tmp_path / "eto", name) == episodes(tmp_path / "coevo", name), name
    # Only the failure agent's first rollout differs between the two: it is computed, not copied.
    assert "reused" not in stage(coevo, "it1-rollout-failure")["engine"]
    # Metrics of the shared evaluation are the same numbers in both runs.
    assert stage(eto, "it0-eval")["test_seen_reward"] == stage(coevo, "it0-eval")["test_seen_reward"]

    # every_iteration=false: the SFT model and the last iteration are evaluated, nothing in between.
    evals = [row["stage"] for row in coevo if row.get("kind") == "eval"]
    assert evals == ["it0-eval", "it2-eval"]

    # The shared SFT model is on disk once: both runs' copies are hard links to the shared one.
    weights = [root / "checkpoints" / "sft" / "model.safetensors" for root in (tmp_path / "eto", tmp_path / "coevo")]
    shared = next((tmp_path / "_shared").glob("sft-*/checkpoint/model.safetensors"))
    assert len({path.stat().st_ino for path in [*weights, shared]}) == 1 and shared.stat().st_nlink == 3


def test_linked_checkpoints_stay_independent_when_an_adapter_is_rebased(tmp_path):
    from coevo_lib.models import set_adapter_base
    from coevo_lib.runs import link_tree

    source = tmp_path / "shared"
    source.mkdir()
    (source / "adapter_config.json").write_text('{"base_model_name_or_path": "/old/base"}')
    (source / "adapter_model.safetensors").write_bytes(b"weights")
    link_tree(source, tmp_path / "run")
    assert (tmp_path / "run" / "adapter_model.safetensors").stat().st_ino == \
        (source / "adapter_model.safetensors").stat().st_ino
    set_adapter_base(tmp_path / "run", tmp_path)
    assert "/old/base" in (source / "adapter_config.json").read_text()  # the shared file is untouched
    assert str(tmp_path) in (tmp_path / "run" / "adapter_config.json").read_text()


def test_a_rollout_with_other_settings_is_not_reused(tmp_path):
    run("eto", tmp_path / "a")
    other = run("eto", tmp_path / "b", "rollout.temperature=0.9")  # same SFT, other sampling
    assert "reused" in stage(other, "it0-eval")["test_seen_engine"]  # greedy evaluation: same inputs
    assert "reused" not in stage(other, "it1-rollout-target")["engine"]
    assert [row["stage"] for row in other if row.get("kind") == "eval"] == ["it0-eval", "it1-eval", "it2-eval"]


def test_study_with_two_workers_trains_each_seeds_sft_once(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    entries = [{"name": "sft", "recipe": "configs/minishop/sft.yaml"}, {"name": "eto", "recipe": "configs/minishop/eto.yaml"},
               {"name": "eto_sft", "recipe": "configs/minishop/eto_sft.yaml"}]
    study = tmp_path / "par.yaml"
    study.write_text(yaml.safe_dump({"name": "par", "runs_root": str(runs), "smoke": True, "analysis": [],
                                     "figures_dir": None, "seeds": [0, 1], "workers": 2, "entries": entries}))

    assert run_study(study) == 0
    for seed in (0, 1):
        for entry in ("sft", "eto", "eto_sft"):
            assert is_finished(runs / f"{entry}-seed{seed}")
        sft_stages = [stage(read_jsonl(runs / f"{e}-seed{seed}" / "metrics.jsonl"), "sft") for e in ("sft", "eto", "eto_sft")]
        # The entry listed first trains the seed's SFT; the others start after it and copy it.
        assert [row["reused"] for row in sft_stages] == [False, True, True]
    assert len(list((runs / "_shared").glob("sft-*"))) == 2
