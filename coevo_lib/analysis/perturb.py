"""Controlled negatives: the expert trajectory with exactly one action changed at a known step.

A perturbed expert is a negative of known closeness that no model generated, so its likelihood
carries no self-generation advantage, and it has the expert's length (same turns, one turn
reworded), so length cannot drive its margin either. The changed action is replayed through the
environment (``coevo_lib.rollout.replay_episode``), so the negative is a real trajectory: the
observations after the change are the ones the environment gives, and so is the reward.

Only environments whose task structure says what a "wrong" choice is can be perturbed; for the
others ``perturbation`` returns None. MiniShop (coevo_lib.envs.minishop):

- ``wrong_option``: at the first option click (step 2), another value of the same dimension of the
  target product; the rest of the expert's actions follow. Reward (total - 1) / total: one goal
  option missed, everything else right (a hard negative).
- ``wrong_item``: at the item click (step 1), the first other product on the expert's results page
  (usually the target's over-price twin); the expert's remaining clicks follow, whatever the
  environment makes of them on that item's page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from coevo_lib.records import Episode

PERTURBATIONS = ("wrong_option", "wrong_item")
ITEM_STEP, FIRST_OPTION_STEP = 1, 2  # MiniShop expert: search, click item, options..., buy


@dataclass
class Perturbation:
    """The expert's (thought, action) turns with the one at ``step`` replaced."""

    kind: str
    step: int
    thoughts: list[str]
    actions: list[str]


def perturbation(env, task_id: str, kind: str) -> Perturbation | None:
    """The ``kind`` perturbation of ``task_id``'s expert, or None where the env or task has none."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    if getattr(env, "name", None) != "minishop":
        return None
    return wrong_option(env, task_id) if kind == "wrong_option" else wrong_item(env, task_id)


def swap_word(text: str, old: str, new: str) -> str:
    """``old`` replaced by ``new`` where it stands as a whole word (sizes like "s" hide inside words)."""
    swapped, count = re.subn(rf"(?<![\w-]){re.escape(old)}(?![\w-])", new, text)
    if count == 0:
        raise ValueError(f"{old!r} does not occur as a word in {text!r}")
    return swapped


def replaced(env, task_id: str, kind: str, step: int, old: str, new: str) -> Perturbation:
    """The expert's turns with the value ``old`` swapped for ``new`` in the thought and action at ``step``."""
    thoughts, actions = list(env.expert_thoughts(task_id)), list(env.expert_actions(task_id))
    thoughts[step], actions[step] = swap_word(thoughts[step], old, new), swap_word(actions[step], old, new)
    return Perturbation(kind, step, thoughts, actions)


def wrong_option(env, task_id: str) -> Perturbation | None:
    task = env.task(task_id)
    if not task.goal.options:
        return None
    dimension, wanted = task.goal.options[0]
    values = dict(env.product(task.target_id).options)[dimension]
    other = next((v for v in values if v != wanted), None)
    return None if other is None else replaced(env, task_id, "wrong_option", FIRST_OPTION_STEP, wanted, other)


def wrong_item(env, task_id: str) -> Perturbation | None:
    from coevo_lib.envs.minishop_catalog import search
    from coevo_lib.envs.minishop import MAX_RESULTS, parse_action

    task = env.task(task_id)
    query = parse_action(env.expert_actions(task_id)[0])[1]
    first_page = search(env.shop, query, MAX_RESULTS)[: env.results_per_page]
    other = next((p.product_id for p in first_page if p.product_id != task.target_id), None)
    if other is None:
        return None
    # Swap what the agent clicks: the product id, or the item's number on the page (item_ids=position).
    target_label, other_label = env.item_label(task_id, task.target_id), env.item_label(task_id, other)
    return replaced(env, task_id, "wrong_item", ITEM_STEP, target_label, other_label)


def perturbed_episode(env, task_id: str, split: str, prompt, kind: str) -> Episode | None:
    """The perturbation played through ``env`` as an episode (agent ``perturbed_<kind>``), or None."""
    from coevo_lib.rollout import replay_episode

    change = perturbation(env, task_id, kind)
    if change is None:
        return None
    return replay_episode(env, task_id, split, prompt, change.thoughts, change.actions, f"perturbed_{kind}")
