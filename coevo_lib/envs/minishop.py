"""MiniShop, the embedded default environment: ``make_env("minishop", ...)``.

MiniShop is NOT WebShop (Yao et al. 2022), whose engine and product data cannot be obtained offline.
It is a small deterministic WebShop-*style* shop that keeps WebShop's action grammar (``search[...]``,
``click[...]``), its pages (search, results, item) and the structure of its reward (type, attributes,
options, price), over a synthetic catalogue small enough for a tiny model trained from scratch:
15 product types in 5 categories, about 150 distinct words in names and options and about 210 with
the instruction templates and brands (:mod:`coevo_lib.envs.minishop_catalog`). Every action, valid or
not, counts toward ``max_steps``; reaching it without buying ends the episode with reward 0.

Reward on ``click[buy now]`` (WebShop's, without its text-similarity terms)::

    r = r_type * (|attributes matched| + |options matched| + 1[price <= bound])
        / (|goal attributes| + |goal options| + 1)

with r_type 1 for the goal's type, 0.5 for another type of its category, 0.1 otherwise; options
matched are those the agent selected on the item page. Every other step rewards 0.

Splits: a task targets a (type, attribute combination) pair. ``train`` tasks use a seeded set of
pairs; ``test_seen`` draws new options and price bounds for train pairs; ``test_unseen`` uses pairs
of 2-3 attributes that no train task uses (one task per pair up to 120 pairs, then new options and
bounds for those pairs, so a large unseen split never takes pairs from train). No product type is held
out: unseen tasks recombine attributes that (at the default sizes) each occur with that type in train,
a test of composition rather than of new words.

Items on a results page are named by product id (``item_ids``: ``letters``, WebShop-like, the
environment's default; ``digits``) or by their number on the page (``position``, the embedded study's
recipes): see ``ITEM_NAMING``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from coevo_lib.envs.base import NOOP_OBSERVATION, EnvError, StepResult, TaskSpec, TextEnv, is_noop, live_episode
from coevo_lib.envs.minishop_catalog import Goal, Product, Shop, Task, build_shop, search, tokenize

SPLITS = ("train", "test_seen", "test_unseen")
MAX_RESULTS = 50  # WebShop also shows at most 50 search results
EXPERT_MAX_ACTIONS = 5  # search, click the item, up to two options, buy
NEXT, PREV, BACK, BUY = "next >", "< prev", "back to search", "buy now"
# How an agent names an item on a results page. "letters" (B0 + 4 letters, WebShop-like ids) and
# "digits" (B0 + 4 digits) click the product id; "position" numbers the page's items [1], [2], ... and
# clicks the number. With ids a tiny model trained from scratch memorises the ids of training products
# (one BPE token each) and cannot name a product it never saw, so test_unseen measures id copying, not
# shopping (seed 0, 100 tasks: letters 0-3% unseen success, digits 3%); positions leave the decision
# (which item matches the attributes and the price bound) to the agent on both splits.
ITEM_NAMING = {"letters": "letters", "digits": "digits", "position": "letters"}  # -> catalogue id alphabet
_ACTION = re.compile(r"\s*(search|click)\s*\[(.*)\]\s*", re.IGNORECASE | re.DOTALL)

SYSTEM_PROMPT = (
    "You shop in MiniShop, a simulated web shop. Buy the item that matches the instruction: its type, "
    "attributes, options and price. Each turn, give exactly one action:\n"
    "search[<query>] on the search page;\n"
    "click[<item id>], click[next >], click[< prev] or click[back to search] on a results page;\n"
    "click[<option value>], click[buy now], click[< prev] or click[back to search] on an item page."
)

# Built once per (seed, sizes) per process: rollouts build one env object per parallel episode.
_SHOP_CACHE: dict[tuple[int, int, int, int, str], Shop] = {}


def shop_for(seed: int, n_train: int, n_test_seen: int, n_test_unseen: int, item_ids: str) -> Shop:
    key = (seed, n_train, n_test_seen, n_test_unseen, item_ids)
    if key not in _SHOP_CACHE:
        _SHOP_CACHE[key] = build_shop(*key)
    return _SHOP_CACHE[key]


def parse_action(action: str) -> tuple[str, str] | None:
    """(verb, argument) with the argument lower-cased and its whitespace collapsed, or None."""
    match = _ACTION.fullmatch(action)
    if match is None:
        return None
    return match.group(1).lower(), " ".join(match.group(2).lower().split())


def purchase_reward(goal: Goal, product: Product, selected: dict[str, str]) -> tuple[float, dict]:
    """WebShop-style reward of buying ``product`` with ``selected`` options (see module doc)."""
    if product.type_name == goal.type_name:
        r_type = 1.0
    else:
        r_type = 0.5 if product.category == goal.category else 0.1
    attributes = sum(a in product.attributes for a in goal.attributes)
    options = sum(selected.get(dim) == value for dim, value in goal.options)
    price_ok = product.price_cents <= goal.price_bound_cents
    total = len(goal.attributes) + len(goal.options) + 1
    reward = r_type * (attributes + options + int(price_ok)) / total
    parts = {"r_type": r_type, "attributes_matched": attributes, "attributes_total": len(goal.attributes),
             "options_matched": options, "options_total": len(goal.options), "price_ok": price_ok,
             "product_id": product.product_id}
    return reward, parts


def render_search(instruction: str) -> str:
    return f"Instruction: {instruction}\n[Search]"


def page_labels(products: list[Product], by_position: bool) -> list[str]:
    """What the agent clicks for each product shown on a results page: its number or its id."""
    return [str(i) for i in range(1, len(products) + 1)] if by_position else [p.product_id for p in products]


def render_product_line(product: Product, label: str | None = None) -> str:
    """``[label] name | $price``, the label defaulting to the product id; no label when it is ""."""
    label = product.product_id if label is None else label
    return f"[{label}] {product.name} | ${product.price:.2f}" if label else f"{product.name} | ${product.price:.2f}"


def render_item(product: Product, by_position: bool = False) -> str:
    # The item page shows the id only where agents click ids: with numbered pages there is no number here.
    lines = [render_product_line(product, "" if by_position else None)]
    lines += [f"{dim}: " + " ".join(f"[{v}]" for v in values) for dim, values in product.options]
    lines.append("[Buy Now] [< Prev] [Back to Search]")
    return "\n".join(lines)


@dataclass
class ShopEpisode:
    """One episode's page state machine: search page -> results pages -> item page -> buy."""

    shop: Shop
    task: Task
    max_steps: int
    results_per_page: int
    echo_page: bool = True  # re-show the item page after an option click, as WebShop does
    by_position: bool = False  # items are clicked by their number on the page, not by id
    page: str = "search"  # search | results | item
    results: list[Product] = field(default_factory=list)
    page_index: int = 0
    item: Product | None = None
    selected: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    done: bool = False

    def step(self, action: str) -> StepResult:
        self.steps += 1
        parsed = parse_action(action)
        if is_noop(action):  # Agent-R's reflection turn: nothing changes, the step still counts
            outcome = self.observe(NOOP_OBSERVATION)
        else:
            outcome = self.apply(*parsed) if parsed is not None else None
        if outcome is None:
            outcome = self.invalid()
        if not outcome[2] and self.steps >= self.max_steps:
            return self.out_of_steps(outcome[0])
        self.done = outcome[2]
        return outcome

    def apply(self, verb: str, argument: str) -> StepResult | None:
        """The result of a well-formed action, or None when the current page does not offer it."""
        if verb == "search":
            # A query without a searchable word (search[], search[???]) is malformed, not an empty search.
            return self.do_search(argument) if self.page == "search" and tokenize(argument) else None
        if self.page == "results":
            return self.click_on_results(argument)
        if self.page == "item":
            return self.click_on_item(argument)
        return None

    def do_search(self, query: str) -> StepResult:
        self.results = search(self.shop, query, MAX_RESULTS)
        return self.show_results(0)

    def click_on_results(self, target: str) -> StepResult | None:
        shown = self.page_products()
        if target == BACK:
            return self.back_to_search()
        if target == NEXT and self.has_next_page():
            return self.show_results(self.page_index + 1)
        if target == PREV and self.page_index > 0:
            return self.show_results(self.page_index - 1)
        labels = page_labels(shown, self.by_position)
        product = next((p for p, label in zip(shown, labels) if label.lower() == target), None)
        return None if product is None else self.open_item(product)

    def click_on_item(self, target: str) -> StepResult | None:
        if target == BACK:
            return self.back_to_search()
        if target == PREV:
            return self.show_results(self.page_index)
        if target == BUY:
            return self.buy()
        dimension = self.item.dimension_of(target)
        if dimension is None:
            return None
        self.selected[dimension] = target  # a later choice in the same dimension replaces the earlier
        echo = f"\n{render_item(self.item, self.by_position)}" if self.echo_page else ""
        return self.observe(f"You selected {dimension} {target}.{echo}")

    def page_products(self) -> list[Product]:
        start = self.page_index * self.results_per_page
        return self.results[start:start + self.results_per_page]

    def has_next_page(self) -> bool:
        return (self.page_index + 1) * self.results_per_page < len(self.results)

    def show_results(self, page_index: int) -> StepResult:
        self.page, self.page_index, self.item, self.selected = "results", page_index, None, {}
        n_pages = max(1, -(-len(self.results) // self.results_per_page))
        lines = [f"Results page {page_index + 1}/{n_pages}:"]
        shown = self.page_products()
        rows = [render_product_line(p, label) for p, label in zip(shown, page_labels(shown, self.by_position))]
        lines += rows or ["No products match."]
        buttons = ["[Back to Search]"] + ["[< Prev]"] * (page_index > 0) + ["[Next >]"] * self.has_next_page()
        return self.observe("\n".join(lines + [" ".join(buttons)]))

    def open_item(self, product: Product) -> StepResult:
        self.page, self.item, self.selected = "item", product, {}
        return self.observe(render_item(product, self.by_position))

    def back_to_search(self) -> StepResult:
        self.page, self.results, self.page_index, self.item, self.selected = "search", [], 0, None, {}
        return self.observe(render_search(self.task.instruction))

    def buy(self) -> StepResult:
        reward, parts = purchase_reward(self.task.goal, self.item, self.selected)
        info = {"success": reward == 1.0, "reward_parts": parts, "steps": self.steps, "truncated": False}
        return f"Thank you for shopping. Your reward is {reward:.2f}.", reward, True, info

    def observe(self, observation: str) -> StepResult:
        return observation, 0.0, False, {"success": False, "steps": self.steps, "valid": True}

    def invalid(self) -> StepResult:
        hints = {"search": "search[<query>]",
                 "results": f"click[<item {'number' if self.by_position else 'id'}>], click[next >], click[< prev], "
                            "click[back to search]",
                 "item": "click[<option value>], click[buy now], click[< prev], click[back to search]"}
        observation = f"Invalid action. Valid actions on this page: {hints[self.page]}."
        return observation, 0.0, False, {"success": False, "steps": self.steps, "valid": False}

    def out_of_steps(self, observation: str) -> StepResult:
        self.done = True
        info = {"success": False, "reward_parts": {}, "steps": self.steps, "truncated": True}
        return f"{observation}\nYou ran out of steps without buying.", 0.0, True, info


class MiniShopEnv(TextEnv):
    """The MiniShop environment (see module doc)."""

    name = "minishop"
    reward_rule = ("on buy: type match x share of attributes, options and price met (WebShop's structure); "
                   "0 when out of steps")

    def __init__(self, seed: int = 0, n_train: int = 240, n_test_seen: int = 60, n_test_unseen: int = 60,
                 max_steps: int = 12, results_per_page: int = 5, echo_page: bool = True, item_ids: str = "letters"):
        # echo_page=False answers an option click with one line instead of the whole item page:
        # the same information, fewer tokens for a small model's context.
        check_settings(seed=seed, n_train=n_train, n_test_seen=n_test_seen, n_test_unseen=n_test_unseen,
                       max_steps=max_steps, results_per_page=results_per_page)
        if item_ids not in ITEM_NAMING:
            raise EnvError(f"item_ids must be one of {', '.join(ITEM_NAMING)}, got {item_ids!r}")
        self.max_steps, self.results_per_page, self.echo_page = max_steps, results_per_page, echo_page
        self.by_position = item_ids == "position"
        self.shop = shop_for(seed, n_train, n_test_seen, n_test_unseen, ITEM_NAMING[item_ids])
        self._episode: ShopEpisode | None = None

    def splits(self) -> list[str]:
        return list(SPLITS)

    def task_ids(self, split: str) -> list[str]:
        if split not in self.shop.splits:
            raise EnvError(f"unknown split {split!r}; {self.name} has {', '.join(SPLITS)}")
        return list(self.shop.splits[split])

    def reset(self, task_id: str) -> str:
        task = self.task(task_id)
        self._episode = self.new_episode(task)
        return render_search(task.instruction)

    def new_episode(self, task: Task) -> ShopEpisode:
        return ShopEpisode(self.shop, task, self.max_steps, self.results_per_page, self.echo_page, self.by_position)

    def expert_query(self, task_id: str) -> str:
        goal = self.task(task_id).goal
        return " ".join([*goal.attributes, goal.type_name])

    def item_label(self, task_id: str, product_id: str) -> str:
        """What an agent clicks for ``product_id`` on the first results page of the expert's query."""
        if not self.by_position:
            return product_id
        first_page = search(self.shop, self.expert_query(task_id), MAX_RESULTS)[: self.results_per_page]
        return dict(zip((p.product_id for p in first_page), page_labels(first_page, True)))[product_id]

    def step(self, action: str) -> StepResult:
        return live_episode(self._episode).step(action)

    def expert_actions(self, task_id: str) -> list[str]:
        task = self.task(task_id)
        options = [f"click[{value}]" for _, value in task.goal.options]
        target = self.item_label(task_id, task.target_id)
        return [f"search[{self.expert_query(task_id)}]", f"click[{target}]", *options, f"click[{BUY}]"]

    def expert_thoughts(self, task_id: str) -> list[str]:
        goal = self.task(task_id).goal
        target = self.item_label(task_id, self.task(task_id).target_id)
        return [f"I should search for the {self.expert_query(task_id)}.",
                f"The item {target} matches and costs less than {goal.price_bound:.2f}.",
                *(f"I need {dim} {value}." for dim, value in goal.options),
                "Everything matches, buy it."]

    def task_spec(self) -> TaskSpec:
        prompt = f"{SYSTEM_PROMPT}\nYou have at most {self.max_steps} actions."
        return TaskSpec(name=self.name, system_prompt=prompt, few_shot=self.expert_example())

    def goal(self, task_id: str) -> dict:
        """The hidden goal of a task, for analysis."""
        task = self.task(task_id)
        goal = task.goal
        return {"type": goal.type_name, "category": goal.category, "attributes": list(goal.attributes),
                "options": dict(goal.options), "price_bound": goal.price_bound, "target_id": task.target_id,
                "instruction": task.instruction}

    def task(self, task_id: str) -> Task:
        if task_id not in self.shop.tasks:
            raise EnvError(f"unknown task id {task_id!r} for environment {self.name!r}")
        return self.shop.tasks[task_id]

    def vocabulary_text(self) -> list[str]:
        """Every catalogue line, as a results page shows it (ids and names of all products)."""
        return [render_product_line(p) for p in self.shop.products.values()]

    def product(self, product_id: str) -> Product:
        return self.shop.products[product_id]

    def expert_example(self) -> list[dict[str, str]]:
        """One expert trajectory as chat messages, played on its own episode (the current one is untouched)."""
        task_ids = [t for split in SPLITS for t in self.shop.splits[split]]
        if not task_ids:
            return []
        task = self.task(task_ids[0])
        episode = self.new_episode(task)
        messages = [{"role": "user", "content": render_search(task.instruction)}]
        for thought, action in zip(self.expert_thoughts(task.task_id), self.expert_actions(task.task_id)):
            messages.append({"role": "assistant", "content": f"Thought: {thought}\nAction: {action}"})
            observation, _, done, _ = episode.step(action)
            if not done:
                messages.append({"role": "user", "content": observation})
        return messages


def check_settings(**settings: int) -> None:
    """Reject values that cannot make a shop, naming the argument."""
    for name, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise EnvError(f"{name} must be an integer, got {value!r}")
    for name in ("n_train", "n_test_seen", "n_test_unseen"):
        if settings[name] < 0:
            raise EnvError(f"{name} must be >= 0, got {settings[name]}")
    if settings["n_test_seen"] > 0 and settings["n_train"] == 0:
        raise EnvError("n_test_seen > 0 needs n_train >= 1: seen tasks reuse train (type, attribute) pairs")
    if settings["max_steps"] < EXPERT_MAX_ACTIONS:
        raise EnvError(f"max_steps must be >= {EXPERT_MAX_ACTIONS} (the expert's longest trajectory)")
    # The expert's query ranks the target and its over-price twin on top, in either order.
    if settings["results_per_page"] < 2:
        raise EnvError(f"results_per_page must be >= 2, got {settings['results_per_page']}")
