"""The synthetic catalogue and tasks of MiniShop (see :mod:`coevo_lib.envs.minishop`).

Everything is drawn from one ``random.Random(seed)`` in a fixed order (never Python's salted
``hash()``), so a seed gives the same products, ids and tasks in every process.

Each task targets a (product type, attribute combination) *pair*. Every pair in use gets a product
group: the target (cheap, every option value), its over-price twin, a same-type product missing one
attribute and a same-category product of another type. Distractors never take the (type, attributes)
of another pair in use, so the expert's query ranks exactly two products on top, the target and its
twin: the target is always on the first results page, beside near-misses that earn partial rewards.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
from dataclasses import dataclass, field

from coevo_lib.envs.base import EnvError

# (type, category, attribute facets "a,b|c,d", options "dim=v1,v2;dim=...", price low, high, bound step).
# A product takes at most one attribute per facet, so no combination is self-contradictory.
TYPE_TABLE = [
    ("t-shirt", "clothing", "cotton,polyester,linen|crew neck,v neck|slim fit,relaxed fit|short sleeve,long sleeve",
     "size=s,m,l,xl;color=red,blue,black,white", 8, 40, 5),
    ("hoodie", "clothing", "cotton,fleece,polyester|slim fit,relaxed fit|zip up,pullover",
     "size=s,m,l,xl;color=gray,black,navy,green", 20, 80, 10),
    ("jeans", "clothing", "slim fit,relaxed fit,straight leg|dark wash,light wash|stretch,high waist",
     "waist=28,30,32,34;color=blue,black", 25, 90, 10),
    ("sneakers", "footwear", "leather,mesh,canvas|lightweight,non slip,breathable|lace up,slip on",
     "size=7,8,9,10,11;color=white,black,gray", 30, 120, 10),
    ("boots", "footwear", "leather,suede|waterproof,non slip,insulated|ankle,knee high",
     "size=7,8,9,10,11;color=brown,black,tan", 40, 150, 10),
    ("sandals", "footwear", "leather,rubber|lightweight,waterproof,non slip|slip on,buckle",
     "size=7,8,9,10,11;color=brown,black", 15, 60, 5),
    ("mug", "kitchen", "ceramic,stainless steel,glass|insulated,dishwasher safe,microwave safe",
     "capacity=12 oz,16 oz,20 oz;color=white,black,blue", 6, 30, 5),
    ("water bottle", "kitchen", "stainless steel,plastic,glass|insulated,leak proof,bpa free|straw lid,flip lid",
     "capacity=16 oz,24 oz,32 oz;color=blue,green,black,pink", 8, 45, 5),
    ("frying pan", "kitchen", "stainless steel,cast iron,ceramic|non stick,dishwasher safe,oven safe",
     "size=8 inch,10 inch,12 inch", 15, 90, 10),
    ("headphones", "electronics", "wireless,wired|noise cancelling,foldable,waterproof|over ear,in ear",
     "color=black,white,blue", 20, 200, 10),
    ("speaker", "electronics", "bluetooth,wifi|waterproof,portable,rechargeable", "color=black,red,blue,gray",
     20, 150, 10),
    ("charger", "electronics", "usb c,wireless|fast charging,foldable,portable", "power=20w,30w,65w;color=black,white",
     10, 60, 5),
    ("shampoo", "beauty", "organic,vegan|sulfate free,paraben free|moisturizing,volumizing",
     "size=8 oz,16 oz,32 oz;scent=lavender,coconut,mint", 5, 35, 5),
    ("lipstick", "beauty", "matte,glossy|long lasting,waterproof|vegan,organic", "color=red,pink,nude,coral", 5, 40, 5),
    ("face cream", "beauty", "organic,vegan|fragrance free,paraben free|moisturizing,anti aging",
     "size=1 oz,2 oz;scent=unscented,rose", 10, 60, 5),
]
BRANDS = ("acme", "nova", "zest", "orbit", "pico", "luma", "vero", "kiko", "brio", "mavi")
MAX_ATTRIBUTES = 3
TRAIN_PAIR_FRACTION = 0.6  # distinct pairs per train task: the rest repeat a pair with other options/bound
CHEAP_SHARE, OVER_SHARE = 0.35, 0.75  # cheap prices below, over-price twins above these shares of the range
UNSEEN_RESERVE = 2  # pairs kept out of train per unseen pair (not every pair has >= 2 attributes)
# At most this many held-out pairs: more test_unseen tasks draw new goals (options, bounds) for them, as
# test_seen does for train pairs, so a large unseen split does not eat the pairs train needs.
MAX_UNSEEN_PAIRS = 120
ITEM_ID_ALPHABETS = {"letters": string.ascii_uppercase, "digits": string.digits}
GOAL_DRAW_ATTEMPTS = 200
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # keeps "t-shirt" whole; drops punctuation


@dataclass(frozen=True)
class ProductType:
    name: str
    category: str
    facets: tuple[tuple[str, ...], ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]  # (dimension, values), values unique within the type
    price_range: tuple[int, int]  # dollars
    bound_step: int  # instruction price bounds are multiples of this many dollars

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(a for facet in self.facets for a in facet)


@dataclass(frozen=True)
class Product:
    product_id: str
    type_name: str
    category: str
    brand: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]
    price_cents: int

    @property
    def name(self) -> str:
        return " ".join([self.brand, *self.attributes, self.type_name])

    @property
    def price(self) -> float:
        return self.price_cents / 100

    @property
    def words(self) -> frozenset[str]:
        return frozenset(tokenize(self.name))

    def dimension_of(self, value: str) -> str | None:
        return next((dim for dim, values in self.options if value in values), None)


@dataclass(frozen=True)
class Goal:
    type_name: str
    category: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, str], ...]  # (dimension, value)
    price_bound_cents: int

    @property
    def price_bound(self) -> float:
        return self.price_bound_cents / 100


@dataclass(frozen=True)
class Task:
    task_id: str
    goal: Goal
    instruction: str
    target_id: str


@dataclass
class Shop:
    products: dict[str, Product]
    tasks: dict[str, Task]
    splits: dict[str, list[str]]
    word_index: dict[str, list[str]] = field(default_factory=dict)  # word -> product ids, for search


def parse_type(row: tuple) -> ProductType:
    name, category, facets, options, low, high, step = row
    facet_tuples = tuple(tuple(facet.split(",")) for facet in facets.split("|"))
    option_tuples = tuple((dim, tuple(values.split(","))) for dim, values in
                          (part.split("=") for part in options.split(";")))
    return ProductType(name, category, facet_tuples, option_tuples, (low, high), step)


PRODUCT_TYPES = {row[0]: parse_type(row) for row in TYPE_TABLE}


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def combinations_of(product_type: ProductType) -> list[tuple[str, ...]]:
    """Attribute combinations of 1-3 attributes, at most one per facet, in facet order."""
    facets = product_type.facets
    combos = []
    for size in range(1, MAX_ATTRIBUTES + 1):
        for chosen in itertools.combinations(range(len(facets)), size):
            combos.extend(itertools.product(*(facets[i] for i in chosen)))
    return combos


def all_pairs() -> list[tuple[str, tuple[str, ...]]]:
    return [(name, combo) for name, ptype in PRODUCT_TYPES.items() for combo in combinations_of(ptype)]


def choose_pairs(rng: random.Random, n_train: int, n_unseen: int) -> tuple[list, list]:
    """(train pairs, held-out unseen pairs). Unseen pairs have >= 2 attributes; pairs whose
    attributes each occur with the same type in train come first, so unseen tasks recombine
    known words rather than introduce new ones."""
    n_unseen = min(n_unseen, MAX_UNSEEN_PAIRS)
    pairs = all_pairs()
    rng.shuffle(pairs)
    # Large train sets repeat pairs more often rather than eat the pairs test_unseen needs.
    n_train_pairs = min(math.ceil(TRAIN_PAIR_FRACTION * n_train), len(pairs) - UNSEEN_RESERVE * n_unseen)
    train_pairs = pairs[:n_train_pairs]
    seen_words = {(name, a) for name, combo in train_pairs for a in combo}
    rest = [p for p in pairs[n_train_pairs:] if len(p[1]) >= 2]
    rest.sort(key=lambda p: not all((p[0], a) in seen_words for a in p[1]))  # stable: keeps shuffle order
    if (n_train > 0 and n_train_pairs < 1) or n_unseen > len(rest):
        raise EnvError(f"the catalogue has {len(pairs)} (type, attributes) pairs: too few for "
                       f"n_train={n_train} and n_test_unseen={n_unseen}")
    return train_pairs, rest[:n_unseen]


class CatalogueBuilder:
    """Draws product groups for the pairs in use (see module doc)."""

    def __init__(self, rng: random.Random, pairs_in_use: set, item_ids: str = "letters"):
        self.rng, self.pairs_in_use = rng, pairs_in_use
        self.id_alphabet = ITEM_ID_ALPHABETS[item_ids]
        self.products: dict[str, Product] = {}
        self.groups: dict[tuple, tuple[Product, Product, Product | None]] = {}  # target, twin, missing-attr

    def new_id(self) -> str:
        # letters: "B0" + 4 letters is one word to a byte-level BPE, so an id is one token, whose
        # embedding only trains when that product appears in training: a tiny model then memorises
        # the ids of train products and cannot name a product it never saw (test_unseen ~0% success).
        # digits: the tokenizer splits digits, so an id is six tokens every product shares, and
        # naming an unseen product is copying digits from the results page.
        while True:
            candidate = "B0" + "".join(self.rng.choice(self.id_alphabet) for _ in range(4))
            if candidate not in self.products:
                return candidate

    def price(self, ptype: ProductType, over: bool) -> int:
        low, high = ptype.price_range
        span = high - low
        bounds = (low + OVER_SHARE * span, high) if over else (low, low + CHEAP_SHARE * span)
        return self.rng.randint(round(bounds[0] * 100), round(bounds[1] * 100))

    def add(self, type_name: str, attributes: tuple[str, ...], over: bool, all_options: bool) -> Product:
        ptype = PRODUCT_TYPES[type_name]
        options = tuple((dim, values if all_options else self.option_subset(values)) for dim, values in ptype.options)
        product = Product(self.new_id(), type_name, ptype.category, self.rng.choice(BRANDS), attributes, options,
                          self.price(ptype, over))
        self.products[product.product_id] = product
        return product

    def option_subset(self, values: tuple[str, ...]) -> tuple[str, ...]:
        # Distractors offer only some values, so a near-miss may also lack the wanted option.
        keep = set(self.rng.sample(values, min(len(values), 2 + self.rng.randrange(2))))
        return tuple(v for v in values if v in keep)

    def add_group(self, pair: tuple[str, tuple[str, ...]]) -> None:
        type_name, combo = pair
        target = self.add(type_name, combo, over=False, all_options=True)
        twin = self.add(type_name, combo, over=True, all_options=False)
        missing = self.missing_attribute_attrs(type_name, combo)
        near = None if missing is None else self.add(type_name, missing, over=False, all_options=False)
        other = self.other_type(type_name, combo)
        if other is not None:
            self.add(other[0], other[1], over=False, all_options=False)
        self.groups[pair] = (target, twin, near)

    def missing_attribute_attrs(self, type_name: str, combo: tuple[str, ...]) -> tuple[str, ...] | None:
        """The combination with one attribute swapped for a rival of its facet (or dropped)."""
        facets = PRODUCT_TYPES[type_name].facets
        dropped = self.rng.randrange(len(combo))
        facet = next(f for f in facets if combo[dropped] in f)
        rivals = [a for a in facet if a != combo[dropped]]
        candidates = [combo[:dropped] + (r,) + combo[dropped + 1:] for r in rivals]
        candidates.append(combo[:dropped] + combo[dropped + 1:])
        free = [c for c in candidates if c and (type_name, c) not in self.pairs_in_use]
        return free[0] if free else None

    def other_type(self, type_name: str, combo: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
        """A sibling type of the category carrying as many of the attributes as it has."""
        category = PRODUCT_TYPES[type_name].category
        siblings = [t for t in PRODUCT_TYPES.values() if t.category == category and t.name != type_name]
        siblings.sort(key=lambda t: -len(set(combo) & set(t.attributes)))  # stable: table order on ties
        for sibling in siblings:
            shared = tuple(a for a in sibling.attributes if a in combo)
            if shared and (sibling.name, shared) not in self.pairs_in_use:
                return sibling.name, shared
        return None


def bound_choices(target: Product, twin: Product, near: Product | None) -> list[int]:
    """Price bounds (cents, multiples of the type's step) above every cheap product, below the twin."""
    step = PRODUCT_TYPES[target.type_name].bound_step * 100
    floor = max(target.price_cents, near.price_cents if near else 0)
    choices = [b for b in range(step, twin.price_cents, step) if b > floor]
    if not choices:  # the table's ranges leave a gap of > 1 step between the two price bands
        raise RuntimeError(f"no price bound fits {target.type_name}: fix its price range in TYPE_TABLE")
    return choices


def draw_goal(rng: random.Random, pair: tuple, group: tuple) -> Goal:
    type_name, combo = pair
    ptype = PRODUCT_TYPES[type_name]
    n_dims = rng.randint(1, len(ptype.options))
    dims = sorted(rng.sample(range(len(ptype.options)), n_dims))
    options = tuple((ptype.options[i][0], rng.choice(ptype.options[i][1])) for i in dims)
    bound = rng.choice(bound_choices(*group))
    return Goal(type_name, ptype.category, combo, options, bound)


def instruction_of(rng: random.Random, goal: Goal) -> str:
    phrase = " ".join([*goal.attributes, goal.type_name])
    # Every type name ending in "s" in the table is a plural noun (jeans, boots) and takes no article.
    article = "" if goal.type_name.endswith("s") else ("an " if phrase[0] in "aeiou" else "a ")
    opener = rng.choice(("i need", "i am looking for", "find me"))
    options = " and ".join(f"{dim} {value}" for dim, value in goal.options)
    return f"{opener} {article}{phrase} in {options}, and price lower than {goal.price_bound:.2f} dollars"


def draw_tasks(rng: random.Random, prefix: str, count: int, pick_pair, groups: dict, used: set) -> list[Task]:
    """``count`` tasks with goals unseen so far; ``pick_pair(i)`` gives the pair of task i."""
    tasks = []
    for i in range(count):
        for _ in range(GOAL_DRAW_ATTEMPTS):
            pair = pick_pair(i)
            goal = draw_goal(rng, pair, groups[pair])
            if goal not in used:
                break
        else:
            raise EnvError(f"could not draw {count} distinct {prefix} goals: ask for fewer tasks")
        used.add(goal)
        tasks.append(Task(f"{prefix}-{i:04d}", goal, instruction_of(rng, goal), groups[pair][0].product_id))
    return tasks


def build_shop(seed: int, n_train: int, n_test_seen: int, n_test_unseen: int, item_ids: str = "letters") -> Shop:
    rng = random.Random(seed)
    train_pairs, unseen_pairs = choose_pairs(rng, n_train, n_test_unseen)
    builder = CatalogueBuilder(rng, set(train_pairs) | set(unseen_pairs), item_ids)
    for pair in train_pairs + unseen_pairs:
        builder.add_group(pair)
    used: set[Goal] = set()

    def train_pair(i: int) -> tuple:
        return train_pairs[i] if i < len(train_pairs) else rng.choice(train_pairs)

    def unseen_pair(i: int) -> tuple:
        return unseen_pairs[i] if i < len(unseen_pairs) else rng.choice(unseen_pairs)

    splits = {
        "train": draw_tasks(rng, "train", n_train, train_pair, builder.groups, used),
        "test_seen": draw_tasks(rng, "test_seen", n_test_seen, lambda i: rng.choice(train_pairs),
                                builder.groups, used),
        "test_unseen": draw_tasks(rng, "test_unseen", n_test_unseen, unseen_pair, builder.groups, used),
    }
    shop = Shop(builder.products, {t.task_id: t for tasks in splits.values() for t in tasks},
                {name: [t.task_id for t in tasks] for name, tasks in splits.items()})
    for product in shop.products.values():
        for word in product.words:
            shop.word_index.setdefault(word, []).append(product.product_id)
    return shop


def search(shop: Shop, query: str, limit: int) -> list[Product]:
    """Products sharing a word with ``query``: most shared words first, then fewest words the query
    lacks (a length penalty, so exact names beat longer ones), then product id."""
    query_words = set(tokenize(query))
    candidate_ids = {pid for word in query_words for pid in shop.word_index.get(word, ())}
    candidates = [shop.products[pid] for pid in candidate_ids]
    candidates.sort(key=lambda p: (-len(p.words & query_words), len(p.words - query_words), p.product_id))
    return candidates[:limit]
