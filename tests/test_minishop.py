"""MiniShop: expert replays, determinism, splits, grammar, invalid actions, step limit and rewards."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from coevo_lib.envs import EnvError, make_env
from coevo_lib.envs import minishop, minishop_catalog
from coevo_lib.envs.minishop import purchase_reward
from coevo_lib.envs.minishop_catalog import PRODUCT_TYPES, Goal, Product


@pytest.fixture(scope="module")
def env():
    return make_env("minishop")


def all_task_ids(env):
    return [t for split in env.splits() for t in env.task_ids(split)]


def play(env, task_id, actions):
    env.reset(task_id)
    result = None
    for action in actions:
        result = env.step(action)
        if result[2]:
            break
    return result


def goal_of(env, task_id) -> Goal:
    return env.shop.tasks[task_id].goal


def twin_of(env, task_id) -> Product:
    """The other product on top of the expert's results: same type and attributes, over the bound."""
    env.reset(task_id)
    observation = env.step(env.expert_actions(task_id)[0])[0]
    ids = re.findall(r"^\[(B0\w{4})\]", observation, re.MULTILINE)
    target = env.goal(task_id)["target_id"]
    return env.product(next(i for i in ids[:2] if i != target))


SHOP_DIGEST = """
import hashlib
from coevo_lib.envs.minishop_catalog import build_shop
shop = build_shop(3, 240, 60, 60)
text = repr(sorted(shop.products.items())) + repr(sorted(shop.tasks.items()))
print(hashlib.sha256(text.encode()).hexdigest())
"""


# --- expert and catalogue -------------------------------------------------------------------------

def test_expert_scores_one_on_every_task_of_every_split(env):
    assert [len(env.task_ids(s)) for s in ("train", "test_seen", "test_unseen")] == [240, 60, 60]
    for task_id in all_task_ids(env):
        actions = env.expert_actions(task_id)
        assert len(env.expert_thoughts(task_id)) == len(actions)
        observation, reward, done, info = play(env, task_id, actions)
        assert (reward, done, info["success"]) == (1.0, True, True), (task_id, observation)


def test_expert_thoughts_are_short(env):
    longest = max(len(t.split()) for task_id in all_task_ids(env) for t in env.expert_thoughts(task_id))
    assert longest <= 13


@pytest.mark.parametrize("results_per_page", [2, 5])
def test_target_is_on_the_first_page_beside_its_over_price_twin(results_per_page):
    env = make_env("minishop", results_per_page=results_per_page)
    for task_id in all_task_ids(env):
        env.reset(task_id)
        observation = env.step(env.expert_actions(task_id)[0])[0]
        top_two = re.findall(r"^\[(B0\w{4})\]", observation, re.MULTILINE)[:2]
        assert env.goal(task_id)["target_id"] in top_two
        twin = twin_of(env, task_id)
        assert twin.price_cents > goal_of(env, task_id).price_bound_cents


def test_every_goal_is_satisfied_by_its_target(env):
    for task_id in all_task_ids(env):
        goal = goal_of(env, task_id)
        target = env.product(env.goal(task_id)["target_id"])
        reward, _ = purchase_reward(goal, target, dict(goal.options))
        assert reward == 1.0


def test_product_ids_are_unique_and_well_formed(env):
    ids = list(env.shop.products)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"B0[A-Z0-9]{4}", i) for i in ids)


def test_option_values_are_unique_within_a_type_and_never_buttons():
    for ptype in PRODUCT_TYPES.values():
        values = [v for _, vs in ptype.options for v in vs]
        assert len(values) == len(set(values)), ptype.name
        assert not set(values) & {minishop.NEXT, minishop.PREV, minishop.BACK, minishop.BUY}


def test_vocabulary_is_modest_and_pages_are_short(env):
    words = set()
    for product in env.shop.products.values():
        words |= product.words
    for task_id in all_task_ids(env):
        words |= set(env.goal(task_id)["instruction"].split())
        env.reset(task_id)
        assert len(env.step(env.expert_actions(task_id)[0])[0].split()) < 120
    assert len(words) < 400


# --- determinism and splits -----------------------------------------------------------------------

def test_same_seed_same_shop_and_other_seed_differs(env):
    minishop._SHOP_CACHE.clear()
    again = make_env("minishop")
    assert again.shop is not env.shop
    assert again.shop.products == env.shop.products and again.shop.tasks == env.shop.tasks
    assert make_env("minishop", seed=1).shop.products != env.shop.products


def test_shop_is_identical_across_processes():
    # String hashes are salted per process; the shop must not depend on them.
    digests = {subprocess.run([sys.executable, "-c", SHOP_DIGEST], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_task_ids_and_unknown_split_or_task(env):
    assert env.task_ids("train")[7] == "train-0007"
    assert env.split_of("test_unseen-0003") == "test_unseen"
    with pytest.raises(EnvError):
        env.task_ids("dev")
    with pytest.raises(EnvError):
        env.reset("train-9999")


def test_splits_are_disjoint_and_unseen_pairs_never_in_train(env):
    ids = {split: set(env.task_ids(split)) for split in env.splits()}
    assert not ids["train"] & ids["test_seen"] and not ids["train"] & ids["test_unseen"]
    pairs = {split: {(g.type_name, g.attributes) for g in (goal_of(env, t) for t in ids[split])} for split in ids}
    assert pairs["test_seen"] <= pairs["train"]
    assert not pairs["test_unseen"] & pairs["train"]
    train_goals = {goal_of(env, t) for t in ids["train"]}
    assert not train_goals & {goal_of(env, t) for t in ids["test_seen"]}
    # Unseen tasks recombine attributes that each occur with the same type in train.
    seen_words = {(type_name, a) for type_name, combo in pairs["train"] for a in combo}
    assert all((type_name, a) in seen_words for type_name, combo in pairs["test_unseen"] for a in combo)


# --- grammar --------------------------------------------------------------------------------------

def test_case_and_whitespace_are_tolerated(env):
    task_id = env.task_ids("train")[0]
    goal, target = goal_of(env, task_id), env.goal(task_id)["target_id"]
    query = " ".join([*goal.attributes, goal.type_name]).upper()
    options = [f"  Click [ {value.upper()} ] " for _, value in goal.options]
    actions = [f"  SEARCH [  {query} ]\n", f"click[ {target.lower()} ]", *options, "CLICK[ Buy   Now ]"]
    assert play(env, task_id, actions)[1] == 1.0


def test_pagination_back_and_prev(env):
    task_id = env.task_ids("train")[0]
    env.reset(task_id)
    first = env.step(env.expert_actions(task_id)[0])[0]
    assert first.startswith("Results page 1/") and "[Next >]" in first and "[< Prev]" not in first
    assert env.step("click[< prev]")[0].startswith("Invalid action")
    second = env.step("click[next >]")[0]
    assert second.startswith("Results page 2/") and "[< Prev]" in second
    first_id_on_second = re.search(r"\[(B0\w{4})\]", second).group(1)
    assert env.step(f"click[{env.goal(task_id)['target_id']}]")[0].startswith("Invalid action")  # on page 1
    assert env.step(f"click[{first_id_on_second}]")[0].startswith(f"[{first_id_on_second}]")
    assert env.step("click[< prev]")[0] == second  # back to the page the item was opened from
    assert env.step("click[< prev]")[0] == first
    assert env.step("click[back to search]")[0] == env.reset(task_id)


def test_last_page_has_no_next(env):
    env.reset(env.task_ids("train")[0])
    observation = env.step("search[t-shirt]")[0]
    while "[Next >]" in observation:
        observation = env.step("click[next >]")[0]
    assert env.step("click[next >]")[0].startswith("Invalid action")


def test_option_clicks_echo_and_latest_choice_counts(env):
    task_id = next(t for t in env.task_ids("train") if len(goal_of(env, t).options) == 1)
    goal = goal_of(env, task_id)
    (dim, value), target = goal.options[0], env.product(env.goal(task_id)["target_id"])
    other = next(v for v in dict(target.options)[dim] if v != value)
    env.reset(task_id)
    env.step(env.expert_actions(task_id)[0])
    env.step(f"click[{target.product_id}]")
    assert env.step(f"click[{value}]")[0].startswith(f"You selected {dim} {value}.")
    env.step(f"click[{other}]")
    assert env.step("click[buy now]")[3]["reward_parts"]["options_matched"] == 0


def test_options_reset_when_another_item_is_opened(env):
    task_id = env.task_ids("train")[0]
    actions = env.expert_actions(task_id)
    play(env, task_id, actions[:-1])
    env.step("click[< prev]")
    env.step(actions[1])
    reward_parts = env.step("click[buy now]")[3]["reward_parts"]
    assert reward_parts["options_matched"] == 0


# --- invalid actions and the step limit -----------------------------------------------------------

INVALID = ["", "garbage", "click[B0ZZZZ]", "search[]", "search[???]", "x" * 10_000, "搜索[鞋子] 🛒",
           "search[" + "]" * 5_000, "click[[buy now]]", "\x00\n\t"]


@pytest.mark.parametrize("action", INVALID, ids=range(len(INVALID)))
@pytest.mark.parametrize("page", ["search", "results", "item"])
def test_invalid_actions_answer_and_never_raise(env, action, page):
    task_id = env.task_ids("train")[0]
    play(env, task_id, env.expert_actions(task_id)[: {"search": 0, "results": 1, "item": 2}[page]])
    observation, reward, done, info = env.step(action)
    assert observation.startswith("Invalid action") and (reward, done, info["success"]) == (0.0, False, False)


@pytest.mark.parametrize("n_actions, action", [
    (1, "search[mug]"), (2, "search[mug]"), (0, "click[buy now]"), (1, "click[buy now]"), (0, "click[next >]"),
    (2, "click[next >]"), (0, "click[back to search]"), (1, "click[m]"),
])
def test_actions_of_other_pages_are_invalid(env, n_actions, action):
    task_id = env.task_ids("train")[0]
    play(env, task_id, env.expert_actions(task_id)[:n_actions])
    assert env.step(action)[0].startswith("Invalid action")


def test_step_limit_ends_the_episode_with_zero():
    env = make_env("minishop", max_steps=5)
    task_id = env.task_ids("train")[0]
    env.reset(task_id)
    results = [env.step("nonsense") for _ in range(5)]
    assert [done for _, _, done, _ in results] == [False] * 4 + [True]
    assert results[-1][1] == 0.0 and results[-1][3]["success"] is False and results[-1][3]["truncated"]
    with pytest.raises(EnvError):
        env.step("search[mug]")
    # A purchase on the last allowed step still counts.
    five_step_task = next(t for t in env.task_ids("train") if len(env.expert_actions(t)) == 5)
    assert play(env, five_step_task, env.expert_actions(five_step_task))[1] == 1.0


def test_step_before_reset_is_caller_misuse():
    with pytest.raises(EnvError):
        make_env("minishop").step("search[mug]")


@pytest.mark.parametrize("kwargs, argument", [
    ({"n_train": -1}, "n_train"), ({"n_test_unseen": -5}, "n_test_unseen"), ({"max_steps": 3}, "max_steps"),
    ({"results_per_page": 1}, "results_per_page"), ({"seed": "zero"}, "seed"), ({"n_train": 0}, "n_test_seen"),
    ({"n_train": 1, "n_test_seen": 3000}, "3000 distinct test_seen goals"),
])
def test_bad_settings_name_the_argument(kwargs, argument):
    with pytest.raises(EnvError, match=argument):
        make_env("minishop", **kwargs)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="n_tasks"):
        make_env("minishop", n_tasks=3)


# --- rewards --------------------------------------------------------------------------------------

def make_product(type_name="t-shirt", attributes=("cotton", "crew neck"), price_cents=2000):
    ptype = PRODUCT_TYPES[type_name]
    return Product("B0TEST", type_name, ptype.category, "acme", attributes, ptype.options, price_cents)


GOAL = Goal("t-shirt", "clothing", ("cotton", "crew neck"), (("size", "m"), ("color", "red")), 3000)


@pytest.mark.parametrize("product, selected, expected", [
    (make_product(), {"size": "m", "color": "red"}, Fraction(1)),
    (make_product(), {"size": "m", "color": "blue"}, Fraction(4, 5)),  # one wrong option
    (make_product(), {}, Fraction(3, 5)),  # no option chosen
    (make_product(attributes=("cotton", "v neck")), {"size": "m", "color": "red"}, Fraction(4, 5)),
    (make_product(price_cents=3001), {"size": "m", "color": "red"}, Fraction(4, 5)),  # over the bound
    (make_product(price_cents=3000), {"size": "m", "color": "red"}, Fraction(1)),  # at the bound
    (make_product("hoodie", ("cotton",)), {"size": "m"}, Fraction(1, 2) * Fraction(3, 5)),  # same category
    (make_product("mug", ()), {}, Fraction(1, 10) * Fraction(1, 5)),  # other category
])
def test_purchase_reward_is_exact(product, selected, expected):
    reward, parts = purchase_reward(GOAL, product, selected)
    assert reward == pytest.approx(float(expected), abs=1e-12)
    assert parts["attributes_total"] == 2 and parts["options_total"] == 2


def test_buying_the_over_price_twin_loses_exactly_the_price_term(env):
    for task_id in env.task_ids("test_seen")[:20]:
        goal, actions = goal_of(env, task_id), env.expert_actions(task_id)
        twin = twin_of(env, task_id)
        total = len(goal.attributes) + len(goal.options) + 1
        options_offered = sum(value in dict(twin.options)[dim] for dim, value in goal.options)
        swapped = [actions[0], f"click[{twin.product_id}]", *actions[2:]]
        observation, reward, done, info = play(env, task_id, swapped)
        assert done and reward == pytest.approx((len(goal.attributes) + options_offered) / total)
        assert info["reward_parts"]["price_ok"] is False and info["success"] is False


def random_first_page_policy(env, task_id, rng):
    """Search like the expert, then buy a random first-page product with random option clicks."""
    env.reset(task_id)
    observation = env.step(env.expert_actions(task_id)[0])[0]
    product = env.product(rng.choice(re.findall(r"^\[(B0\w{4})\]", observation, re.MULTILINE)))
    env.step(f"click[{product.product_id}]")
    for _, values in product.options:
        if rng.random() < 0.7:
            env.step(f"click[{rng.choice(values)}]")
    return env.step("click[buy now]")[1]


def test_a_random_policy_gets_a_spread_of_partial_rewards(env):
    rng = random.Random(0)
    rewards = Counter(round(random_first_page_policy(env, t, rng), 4) for t in env.task_ids("train"))
    partial = [r for r in rewards if 0 < r < 1]
    assert len(partial) >= 8
    assert sum(n for r, n in rewards.items() if 0.6 <= r < 1) >= 20  # hard negatives exist
    assert 0 < rewards[1.0] < 240


# --- prompt and analysis helpers ------------------------------------------------------------------

def test_task_spec_and_goal(env):
    spec = env.task_spec()
    assert "search[<query>]" in spec.system_prompt and "click[buy now]" in spec.system_prompt
    roles = [m["role"] for m in spec.few_shot]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in zip(roles, roles[1:]))
    assert spec.few_shot[-1]["content"].endswith("Action: click[buy now]")
    goal = env.goal("train-0000")
    assert set(goal) >= {"type", "category", "attributes", "options", "price_bound", "target_id"}
    assert env.reset("train-0000") == f"Instruction: {goal['instruction']}\n[Search]"


@pytest.mark.parametrize("item_ids", ["letters", "digits", "position"])
def test_every_item_naming_has_experts_that_succeed(item_ids):
    env = make_env("minishop", item_ids=item_ids, results_per_page=3, max_steps=8)
    for task_id in all_task_ids(env):
        assert play(env, task_id, env.expert_actions(task_id))[1] == 1.0, (item_ids, task_id)


def test_digit_ids_are_b0_and_four_digits():
    env = make_env("minishop", item_ids="digits")
    assert all(re.fullmatch(r"B0\d{4}", product_id) for product_id in env.shop.products)


def test_position_naming_numbers_the_page_and_clicks_by_number():
    env = make_env("minishop", item_ids="position", results_per_page=3)
    task_id = env.task_ids("test_unseen")[0]
    env.reset(task_id)
    page = env.step(env.expert_actions(task_id)[0])[0]
    assert re.findall(r"^\[(\w+)\]", page, re.MULTILINE) == ["1", "2", "3"]
    target = env.goal(task_id)["target_id"]
    assert target not in page  # ids are not shown: the agent names the item by its number
    label = env.item_label(task_id, target)
    assert env.expert_actions(task_id)[1] == f"click[{label}]" and f"item {label} " in env.expert_thoughts(task_id)[1]
    other = "2" if label == "1" else "1"
    item_page = env.step(f"click[{other}]")[0]
    assert env.product(target).name not in item_page.splitlines()[0] or "$" in item_page  # the other item opened
    assert env.step("click[< prev]")[0] == page
    assert "click[<item number>]" in env.step("click[B0AAAA]")[0]  # ids are not clickable
    assert env.step(f"click[{label}]")[0].splitlines()[0] == f"{env.product(target).name} | ${env.product(target).price:.2f}"


def test_wrong_item_perturbation_swaps_the_number_under_position_naming():
    from coevo_lib.analysis.perturb import wrong_item

    env = make_env("minishop", item_ids="position", results_per_page=3, max_steps=8)
    task_id = env.task_ids("test_seen")[0]
    change = wrong_item(env, task_id)
    expert_click = env.expert_actions(task_id)[1]
    assert change.actions[1] != expert_click and re.fullmatch(r"click\[[123]\]", change.actions[1])
    env.reset(task_id)
    env.step(change.actions[0])
    assert "Invalid" not in env.step(change.actions[1])[0]


def test_unknown_item_naming_is_refused():
    with pytest.raises(EnvError, match="item_ids must be one of letters, digits, position, got 'asin'"):
        make_env("minishop", item_ids="asin")


def test_large_unseen_split_reuses_held_out_pairs_and_never_train_pairs():
    env = make_env("minishop", n_test_seen=400, n_test_unseen=400)
    assert len(env.task_ids("test_unseen")) == 400 and len(env.task_ids("test_seen")) == 400
    pair = lambda t: (env.shop.tasks[t].goal.type_name, env.shop.tasks[t].goal.attributes)  # noqa: E731
    train_pairs = {pair(t) for t in env.task_ids("train")}
    unseen_pairs = {pair(t) for t in env.task_ids("test_unseen")}
    assert not unseen_pairs & train_pairs
    assert len(unseen_pairs) == minishop_catalog.MAX_UNSEEN_PAIRS  # 400 tasks over the capped pairs
    goals = [env.shop.tasks[t].goal for t in all_task_ids(env)]
    assert len(set(goals)) == len(goals)  # no task repeats another's goal
