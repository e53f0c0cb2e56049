"""Agent-R's Monte Carlo tree search over one task (Yuan et al. 2025; BASELINES.md 1.2), model-free.

No random simulation: each pass descends from the root by UCT, sampling K children (one batched
generation) at every unexpanded node on the way, until it reaches a terminal node. Values come only
from terminal rewards, summed up the path (N += 1, W += r). A child is reached by resetting the
environment and replaying its action prefix; a replay that does not reproduce the recorded
observations raises ReplayMismatch (the tree would otherwise hold states no action sequence reaches).

Many trees advance together: ``next_expansion`` says which node a tree needs sampled next, the caller
batches those requests across trees, and ``expand`` applies the replies.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from coevo_lib.envs.base import TextEnv
from coevo_lib.prompting import parse_action

UCT_C = 0.25  # Agent-R's exploration constant (mcts_raw.py)


class ReplayMismatch(RuntimeError):
    """Resetting and replaying a node's actions gave other observations than the ones recorded."""


@dataclass
class Node:
    path: list[int] = field(default_factory=list)  # child indexes from the root: a stable node id
    response: str = ""  # the raw reply (thought included); "" at the root
    action: str = ""
    observation: str = ""  # at the root: the first observation
    reward: float = 0.0  # the env reward of this step, clipped at 0
    done: bool = False
    tokens: int = 0
    visits: int = 0  # N
    value: float = 0.0  # W, the sum of terminal rewards below (and at) this node
    terminal: bool = False
    children: list[Node] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.path)

    @property
    def is_leaf(self) -> bool:
        return self.terminal and not self.children


def node_from_dict(data: dict[str, Any]) -> Node:
    return Node(**{**data, "children": [node_from_dict(c) for c in data["children"]]})


@dataclass
class Counts:
    """Model calls and environment work of one search."""

    generations: int = 0
    tokens_generated: int = 0
    env_steps: int = 0
    env_resets: int = 0


class TreeSearch:
    """The search on one task: ``passes`` descents, ``children`` samples per expansion."""

    def __init__(self, env: TextEnv, task_id: str, *, children: int, passes: int, max_depth: int,
                 rng: random.Random, c: float = UCT_C):
        self.env, self.task_id, self.rng, self.c = env, task_id, rng, c
        self.children, self.passes, self.max_depth = children, passes, max_depth
        self.counts = Counts(env_resets=1)
        self.root = Node(observation=env.reset(task_id))
        self.cursor: list[Node] | None = None  # the current pass's path from the root
        self.passes_started = 0

    # -- the descent ----------------------------------------------------------------------

    def next_expansion(self) -> list[Node] | None:
        """The path to the node to sample children for next, or None when the search is over."""
        while True:
            if self.cursor is None:
                if self.passes_started == self.passes or self.root.terminal:
                    return None
                self.passes_started += 1
                self.cursor = [self.root]
            node = self.cursor[-1]
            if node.terminal:
                self.cursor = None
            elif not node.children:
                return self.cursor
            else:
                child = self.select(node)
                self.cursor = None if child is None else self.cursor + [child]

    def select(self, node: Node) -> Node | None:
        """UCT over the non-terminal children: unvisited first (random among them); None marks ``node``
        terminal (every child is)."""
        open_children = [child for child in node.children if not child.terminal]
        if not open_children:
            node.terminal = True
            return None
        unvisited = [child for child in open_children if child.visits == 0]
        if unvisited:
            return self.rng.choice(unvisited)
        return max(open_children, key=lambda child: self.uct(node, child))

    def uct(self, parent: Node, child: Node) -> float:
        return child.value / child.visits + self.c * math.sqrt(math.log(parent.visits) / child.visits)

    # -- expansion ------------------------------------------------------------------------

    def expand(self, path: list[Node], replies: list[tuple[str, int]]) -> None:
        """Children of ``path[-1]`` from sampled replies (deduplicated by text), each reached by replay."""
        self.counts.generations += len(replies)
        node = path[-1]
        for text, tokens in replies:
            self.counts.tokens_generated += tokens
            if any(child.response == text for child in node.children):
                continue
            child = self.step_child(path, text, tokens)
            node.children.append(child)
            if child.terminal:
                backpropagate(path + [child], child.reward)
        refresh_terminal(path)

    def step_child(self, path: list[Node], text: str, tokens: int) -> Node:
        self.replay(path)
        action = parse_action(text)
        observation, reward, done, _ = self.env.step(action)
        self.counts.env_steps += 1
        node = path[-1]
        child = Node(path=node.path + [len(node.children)], response=text, action=action,
                     observation=observation, reward=max(float(reward), 0.0), done=done,
                     tokens=tokens)
        # A negative reward is a failure ("disaster" in Agent-R's code): clipped to 0 and terminal.
        child.terminal = done or reward < 0 or child.depth >= self.max_depth
        return child

    def replay(self, path: list[Node]) -> None:
        """Reset and replay the actions below the root, checking every observation against the record."""
        first = self.env.reset(self.task_id)
        self.counts.env_resets += 1
        check_replay(self.task_id, 0, self.root.observation, first)
        for node in path[1:]:
            observation, _, _, _ = self.env.step(node.action)
            self.counts.env_steps += 1
            check_replay(self.task_id, node.depth, node.observation, observation)

    def close_unexpandable(self, path: list[Node]) -> None:
        """A node whose context no longer fits the model: a leaf with its own reward."""
        node = path[-1]
        node.terminal = True
        backpropagate(path, node.reward)
        refresh_terminal(path[:-1])


def check_replay(task_id: str, depth: int, recorded: str, replayed: str) -> None:
    if recorded != replayed:
        raise ReplayMismatch(f"task {task_id}: replaying the actions to depth {depth} gave observation "
                             f"{replayed[:120]!r}, the tree recorded {recorded[:120]!r}; the environment is "
                             "not deterministic under reset + replay, which Agent-R's search needs")


def backpropagate(path: list[Node], reward: float) -> None:
    for node in path:
        node.visits += 1
        node.value += reward


def refresh_terminal(path: list[Node]) -> None:
    """Bottom-up: a node whose children are all terminal is terminal."""
    for node in reversed(path):
        if node.children and all(child.terminal for child in node.children):
            node.terminal = True


Replies = list[tuple[str, int]]  # (text, tokens generated) per sampled child


def run_searches(searches: list[TreeSearch],
                 sample: Callable[[list[tuple[TreeSearch, list[Node]]]], list[Replies | None]]) -> None:
    """Advance every search to its end; each round, ``sample`` answers all trees' expansion requests at once
    (None for a request whose context no longer fits the model)."""
    while requests := [(s, path) for s in searches if (path := s.next_expansion()) is not None]:
        for (search, path), replies in zip(requests, sample(requests), strict=True):
            if replies is None:
                search.close_unexpandable(path)
            else:
                search.expand(path, replies)


# -- what a finished tree yields (BASELINES.md 1.3) -------------------------------------------


def leaf_paths(root: Node) -> list[list[Node]]:
    """Every root-to-leaf path (root excluded), depth first in child order; leaves are terminal and childless."""
    paths = []
    for child in root.children:
        if child.is_leaf:
            paths.append([child])
        paths += [[child] + rest for rest in leaf_paths(child)]
    return paths


def final_reward(path: list[Node]) -> float:
    return path[-1].reward


def good_paths(paths: list[list[Node]], alpha: float) -> list[list[Node]]:
    return [path for path in paths if final_reward(path) > alpha]


def contrast_pairs(paths: list[list[Node]], alpha: float, beta: float, cap: int,
                   rng: random.Random) -> list[tuple[list[Node], list[Node]]]:
    """(good, bad) paths with r_good > alpha and r_good - r_bad > beta, shuffled, at most ``cap``."""
    pairs = [(high, low) for high in paths for low in paths
             if final_reward(high) > alpha and final_reward(high) - final_reward(low) > beta]
    rng.shuffle(pairs)
    return pairs[:cap]
