"""What changed from the tiny model (coevo_lib.analysis.tiny_vs_pretrained) on two synthetic studies: one of tiny-model
runs (configs/minishop) and one of pretrained-model runs (configs/smollm2), hand-made records in the real layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from coevo_lib.analysis import hard_negatives as hn
from coevo_lib.analysis.tiny_vs_pretrained import compare_with_tiny, tiny_vs_pretrained, uses_tiny_model
from coevo_lib.figures import build_figures
from test_analysis import episode, rollout_frame, write_run

SFT_REWARDS = {0: [0.2, 0.5, 0.9], 1: [0.3, 0.4, 0.6]}  # per seed, on test_seen tasks t0..t2


def evals(shift: float, iteration: int, seed: int) -> list:
    return [episode(f"target/it{iteration}/eval/t{t}", f"t{t}", ["a"], r + shift, iteration=iteration,
                    split="test_seen") for t, r in enumerate(SFT_REWARDS[seed])]


def rollouts(agent: str, rewards: list[float]) -> list:
    return [episode(f"{agent}/it1/train/t{t}/s{t}", f"t{t}", ["a", "b"], r, agent) for t, r in enumerate(rewards)]


def write_study(root: Path, recipes: str, shifts: dict[str, float], train: dict[str, dict[str, list[float]]]) -> None:
    """sft plus a run per method and seed 0, 1: evaluation = the sft rewards + the method's shift, training rollouts
    as given (the same on both seeds)."""
    for seed in SFT_REWARDS:
        write_run(root, "sft", f"sft-seed{seed}", {"it0-eval-test_seen-target": evals(0.0, 0, seed)},
                  recipes=recipes, seed=seed)
        for method, shift in shifts.items():
            records = {f"it1-train-{agent}": rollouts(agent, r) for agent, r in train.get(method, {}).items()}
            write_run(root, method, f"{method}-seed{seed}", {"it1-eval-test_seen-target": evals(shift, 1, seed),
                                                             **records}, recipes=recipes, seed=seed)


@pytest.fixture()
def studies(tmp_path) -> tuple[Path, Path]:
    tiny, pretrained = tmp_path / "runs" / "results", tmp_path / "runs" / "smollm2"
    write_study(tiny, "configs/minishop", {"eto_sft": 0.05, "coevo": 0.10},
                {"coevo": {"failure": [0.0, 0.0, 0.05, 0.7]}})
    write_study(pretrained, "configs/smollm2", {"eto_sft": 0.0, "coevo": -0.05, "eto": -0.2},
                {"coevo": {"failure": [1.0, 0.65, 0.8, 0.3]}, "eto": {"target": [1.0, 0.7, 0.3, 0.05]}})
    return tiny, pretrained


def runs_of(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_trajectory_quality_and_failure_drift_shares():
    quality = hn.trajectory_quality(rollout_frame()).set_index("source")
    # target: rewards 1.0, 0.0, 0.55, 0.65, 0.75, 0.95 -> 1 success, 2 below 0.6, 3 hard negatives of 6
    assert quality.loc["coevo/target", ["rollouts", "success %", "failure < 0.6 %", "hard negative %"]].tolist() == \
        pytest.approx([6, 16.7, 33.3, 50.0])
    drift = hn.failure_drift(rollout_frame()).set_index("source")
    assert drift.loc["coevo/target", ["failures", "mean_failure_reward", "failures < 0.1 %",
                                      "failures >= 0.6 %"]].tolist() == pytest.approx([5, 0.58, 20.0, 60.0])
    assert drift.loc["coevo/failure", "failures < 0.1 %"] == 0.0  # rewards 0.7, 0.2, 0.2
    assert hn.failure_drift(rollout_frame().iloc[:0]).empty and hn.trajectory_quality(rollout_frame().iloc[:0]).empty


def test_the_two_studies_side_by_side(studies):
    tiny, pretrained = studies
    table = tiny_vs_pretrained(runs_of(tiny), runs_of(pretrained)).set_index(["quantity", "where"])
    # the SFT level is main_table.md's, from metrics.jsonl: write_run's last evaluation there scores 20 on every run
    assert table.loc[("sft reward (x100)", "test_seen")].tolist() == ["20.0 ± 0.0 (n=2)"] * 2
    coevo = table.loc[("coevo − sft reward (x100)", "test_seen")]
    assert coevo.tolist() == ["+10.0 [+10.0, +10.0], MDE 0.0 (2 seeds)", "-5.0 [-5.0, -5.0], MDE 0.0 (2 seeds)"]
    assert table.loc[("coevo − eto_sft reward (x100)", "test_seen"), "tiny"].startswith("+5.0 [")
    assert table.loc[("eto − sft reward (x100)", "test_seen")].tolist() == [
        "-", "-20.0 [-20.0, -20.0], MDE 0.0 (2 seeds)"]  # plain ETO only in the pretrained study
    # failure agent: tiny 6 of 8 failures below 0.1, 2 hard; pretrained none below 0.1, 4 of 6 hard
    assert table.loc[("coevo/failure failures < 0.1 %", "it1")].tolist() == ["75.0 (of 8)", "0.0 (of 6)"]
    assert table.loc[("coevo/failure failures >= 0.6 %", "it1")].tolist() == ["25.0 (of 8)", "66.7 (of 6)"]
    assert table.loc[("coevo/failure hard negative % of rollouts", "it1")].tolist() == ["25.0 (of 8)", "50.0 (of 8)"]
    assert table.loc[("eto/target hard negative % of rollouts", "it1")].tolist() == ["-", "25.0 (of 8)"]
    quantities = list(table.index.get_level_values("quantity"))
    assert quantities.index("eto − sft reward (x100)") < quantities.index("coevo/failure failures < 0.1 %")


def test_figures_set_the_tiny_study_beside_pretrained_groups_only(studies, tmp_path):
    tiny, pretrained = studies
    assert uses_tiny_model(runs_of(tiny)[0]) and not uses_tiny_model(runs_of(pretrained)[0])
    written = {p.relative_to(tmp_path / "figures").as_posix()
               for p in build_figures(tmp_path / "runs", tmp_path / "figures", tiny_runs_root=tiny)}
    assert "smollm2/tiny_vs_pretrained.md" in written and "results/tiny_vs_pretrained.md" not in written
    assert {"smollm2/trajectory_quality.md", "smollm2/failure_drift.md"} <= written
    text = (tmp_path / "figures" / "smollm2" / "tiny_vs_pretrained.md").read_text()
    assert "under `results` (1 iteration)" in text and "under `smollm2` (1 iteration)" in text
    assert "| coevo − sft reward (x100) |" in text
    assert "[tiny_vs_pretrained.md]" in (tmp_path / "figures" / "smollm2" / "README.md").read_text()
    without = build_figures(tmp_path / "runs", tmp_path / "other")  # no tiny study given: not drawn
    assert not any(p.name == "tiny_vs_pretrained.md" for p in without)


def test_notebook_section_says_what_is_missing(studies, tmp_path):
    tiny, pretrained = studies
    assert "set `tiny_runs_root`" in compare_with_tiny(None, runs_of(pretrained))
    assert "No finished runs under" in compare_with_tiny(tmp_path / "nothing", runs_of(pretrained))
    assert compare_with_tiny(tiny, runs_of(pretrained)).startswith("# What changed from the tiny model")
