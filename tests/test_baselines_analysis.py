"""The baselines' tables on hand-made metrics and episodes, with exact expected values."""

from __future__ import annotations

import pandas as pd

from coevo_lib.analysis.baselines import interaction_table, judge_table, reflection_summary


def test_interaction_table_sums_stages_per_run_then_averages_seeds():
    metrics = pd.DataFrame([
        {"stage": "it1-rollout-target", "method": "eto", "seed": 0, "iteration": 1, "generations": 10,
         "env_steps": 10, "env_resets": 2, "tokens_generated": 100, "stage_wall_s": 1.0},
        {"stage": "it1-rollout-target", "method": "eto", "seed": 1, "iteration": 1, "generations": 20,
         "env_steps": 20, "env_resets": 2, "tokens_generated": 300, "stage_wall_s": 3.0},
        {"stage": "it1-search-target", "method": "agent_r", "seed": 0, "iteration": 1, "generations": 400,
         "env_steps": 900, "env_resets": 401, "tokens_generated": 4000, "stage_wall_s": 50.0},
        {"stage": "it1-revise-target", "method": "agent_r", "seed": 0, "iteration": 1, "generations": 12,
         "tokens_generated": 120, "stage_wall_s": 2.0},
        {"stage": "it1-train-target", "method": "agent_r", "seed": 0, "iteration": 1, "stage_wall_s": 9.0},
        {"stage": "it1-eval", "method": "eto", "seed": 0, "iteration": 1, "stage_wall_s": 9.0},
    ])
    table = interaction_table(metrics)
    rows = {(r.method, r.stage): (r.generations, r.env_steps, r.env_resets, r.stage_wall_s)
            for r in table.itertuples()}
    assert list(table["method"]) == ["agent_r", "agent_r", "eto"]  # the paper's order, then by stage
    assert rows[("eto", "rollout")] == (15, 15, 2, 2.0)
    assert rows[("agent_r", "search")] == (400, 900, 401, 50.0)
    assert rows[("agent_r", "revise")][:1] == (12,) and pd.isna(rows[("agent_r", "revise")][1])


def test_judge_table_keeps_judge_stages_only():
    metrics = pd.DataFrame([
        {"run": "r", "stage": "it1-judge-target", "method": "srlm", "seed": 0, "iteration": 1, "episodes": 8,
         "judge_parse_rate": 0.5},
        {"run": "r", "stage": "it1-rollout-target", "method": "srlm", "seed": 0, "iteration": 1, "episodes": 8},
    ])
    assert judge_table(metrics).to_dict("records") == [
        {"run": "r", "method": "srlm", "seed": 0, "iteration": 1, "episodes": 8, "judge_parse_rate": 0.5}]


def test_reflection_summary_counts_wait_turns_and_their_successes():
    episodes = [{"actions": ["search[x]", "wait", "click[buy now]"], "success": True},
                {"actions": ["Wait"], "success": False},
                {"actions": ["search[x]"], "success": True},
                {"actions": ["search[wait]"], "success": False}]
    assert reflection_summary(episodes, 2, "test_seen") == {
        "iteration": 2, "split": "test_seen", "episodes": 4, "reflected": 2, "reflected_share": 0.5,
        "reflected_success": 0.5, "success": 0.5}
