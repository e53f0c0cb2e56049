"""Agent-R's tree search, path filter, verifier and splice on a scripted generator and a scripted
environment, with exact expected trees and trajectories (no model)."""

from __future__ import annotations

import random

import pytest

from coevo_lib.envs.base import TaskSpec, TextEnv
from coevo_lib.methods.agent_r_revision import (find_first_errors, parse_verdict, path_messages,
                                                revision_messages, shared_prefix, verifier_messages)
from coevo_lib.methods.agent_r_tree import (Node, ReplayMismatch, TreeSearch, contrast_pairs, good_paths,
                                            leaf_paths, run_searches)
from coevo_lib.prompting import tokenize_conversation

FINAL = {"win": 1.0, "half": 0.5, "lose": 0.0}


class ScriptEnv(TextEnv):
    """Actions win/half/lose end the episode with their reward; anything else is answered with the trace."""

    name, max_steps = "script", 3

    def __init__(self, drift: str | None = None):
        self.drift, self.resets, self.trace = drift, 0, []

    def splits(self):
        return ["train"]

    def task_ids(self, split):
        return ["t"]

    def reset(self, task_id):
        self.resets, self.trace = self.resets + 1, []
        return f"start {self.resets}" if self.drift == "reset" else "start"

    def step(self, action):
        self.trace.append(action)
        if action in FINAL:
            return "end", FINAL[action], True, {"success": action == "win"}
        suffix = f" #{self.resets}" if self.drift == "step" else ""
        return "after " + "/".join(self.trace) + suffix, 0.0, len(self.trace) >= self.max_steps, {}

    def expert_actions(self, task_id):
        return ["win"]

    def task_spec(self):
        return TaskSpec("script", "")


def scripted(script: dict[tuple[str, ...], list[str]]):
    """Replies by the actions on the path (the prompt a model would see), tokens = words."""
    def sample(requests):
        return [[(f"Action: {a}", 1) for a in script[tuple(n.action for n in path[1:])]] for _, path in requests]
    return sample


def search(env=None, children=2, passes=2, max_depth=3, seed=0):
    return TreeSearch(env or ScriptEnv(), "t", children=children, passes=passes, max_depth=max_depth,
                      rng=random.Random(seed))


def shape(node: Node) -> dict:
    """(action, N, W, terminal) of every node, by path."""
    out = {tuple(node.path): (node.action, node.visits, node.value, node.terminal)}
    for child in node.children:
        out.update(shape(child))
    return out


def test_search_expands_k_children_backpropagates_sums_and_propagates_terminal():
    tree = search()
    run_searches([tree], scripted({(): ["go", "lose"], ("go",): ["win", "half"]}))
    assert shape(tree.root) == {
        (): ("", 3, 1.5, True),
        (0,): ("go", 2, 1.5, True),  # both children terminal -> terminal
        (0, 0): ("win", 1, 1.0, True), (0, 1): ("half", 1, 0.5, True),
        (1,): ("lose", 1, 0.0, True),
    }
    # The first pass ends on terminal leaves only; the root is then terminal, so pass 2 never starts.
    assert tree.passes_started == 1
    # Root reset; 2 children (reset + step each); 2 grandchildren (reset + replay 1 + step each).
    assert (tree.counts.generations, tree.counts.env_resets, tree.counts.env_steps) == (4, 5, 6)


def test_duplicate_replies_make_one_child_and_depth_cap_is_terminal():
    tree = search(max_depth=2, passes=3)
    run_searches([tree], scripted({(): ["go", "go"], ("go",): ["look", "look"]}))
    assert shape(tree.root) == {(): ("", 1, 0.0, True), (0,): ("go", 1, 0.0, True),
                                (0, 0): ("look", 1, 0.0, True)}  # depth 2 = max_depth: terminal, reward 0
    assert tree.counts.generations == 4


def test_uct_prefers_unvisited_then_best_score_and_skips_terminal_children():
    parent = Node(visits=10, children=[Node(path=[0], value=3, visits=5), Node(path=[1], value=1, visits=1),
                                       Node(path=[2], value=4, visits=4), Node(path=[3], value=9, visits=1,
                                                                              terminal=True)])
    tree = search()
    # W/N + 0.25 sqrt(ln 10 / N): 0.770, 1.379, 1.190; the terminal child (9.38) is never chosen.
    assert tree.select(parent) is parent.children[1]
    parent.children.append(Node(path=[4]))
    assert tree.select(parent) is parent.children[4]
    closed = Node(visits=1, children=[Node(path=[0], terminal=True, visits=1)])
    assert tree.select(closed) is None and closed.terminal


def test_later_passes_descend_by_uct_and_expand_below():
    tree = search(passes=2)
    script = {(): ["go", "stay"], ("go",): ["lose", "look"], ("stay",): ["win", "half"],
              ("go", "look"): ["half", "lose"]}
    run_searches([tree], scripted(script))
    rewards = {tuple(n.action for n in p): p[-1].reward for p in leaf_paths(tree.root)}
    # Pass 1: the root's children are unvisited: the seeded random choice picks one; the pass descends it
    # to a terminal. Pass 2 goes to the other child (unvisited) and descends there.
    assert rewards == {("go", "lose"): 0.0, ("go", "look", "half"): 0.5, ("go", "look", "lose"): 0.0,
                       ("stay", "win"): 1.0, ("stay", "half"): 0.5}
    assert (tree.root.visits, tree.root.value) == (5, 2.0) and tree.root.terminal


def test_replay_that_does_not_reproduce_observations_is_an_error():
    with pytest.raises(ReplayMismatch, match="depth 0"):
        run_searches([search(ScriptEnv(drift="reset"))], scripted({(): ["go", "lose"]}))
    with pytest.raises(ReplayMismatch, match="depth 1"):
        run_searches([search(ScriptEnv(drift="step"))], scripted({(): ["go", "lose"], ("go",): ["win", "half"]}))


def leaf(actions: list[str], reward: float) -> list[Node]:
    return [Node(path=[0] * (i + 1), response=f"Action: {a}", action=a, observation=f"o-{a}",
                 reward=reward if i == len(actions) - 1 else 0.0) for i, a in enumerate(actions)]


def test_good_paths_and_pairs_by_alpha_beta_with_cap():
    paths = [leaf(["a"], 1.0), leaf(["b"], 0.75), leaf(["c"], 0.6), leaf(["d"], 0.5), leaf(["e"], 0.0)]
    assert [p[0].action for p in good_paths(paths, alpha=0.5)] == ["a", "b", "c"]
    pairs = contrast_pairs(paths, alpha=0.5, beta=0.2, cap=100, rng=random.Random(0))
    assert sorted((g[0].action, b[0].action) for g, b in pairs) == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("a", "e"), ("b", "d"), ("b", "e"), ("c", "e")]  # b-c: 0.15 <= beta
    capped = contrast_pairs(paths, alpha=0.5, beta=0.2, cap=2, rng=random.Random(0))
    assert len(capped) == 2 and set(map(id, capped[0])) <= {id(p) for pair in pairs for p in pair}


@pytest.mark.parametrize(("reply", "label", "parsed"), [
    ("It finds the item.\nJudgement: Good", "good", True),
    ("Judgment: Uncertain", "uncertain", True),
    ("Judgement: **Bad**", "bad", True),
    ("judgement: bad. Judgment: good", "good", True),  # the last marker decides
    ("It looks good to me", "good", False),  # no marker: the whole reply is read, as in Agent-R's code
    ("search[mug]", "bad", False),  # unparseable counts as bad
])
def test_verdict_parsing(reply, label, parsed):
    verdict = parse_verdict(reply)
    assert (verdict.label, verdict.parsed) == (label, parsed)


def test_first_error_walk_batches_steps_and_stops_at_the_first_bad():
    paths = [leaf(["a", "b", "c"], 0.0), leaf(["x", "y"], 0.0), leaf(["p"], 0.0)]
    verdicts = {"a": "Good", "b": "Bad", "x": "Uncertain", "y": "Good", "p": "nonsense"}
    calls = []

    def judge(prompts):
        calls.append(len(prompts))
        return [f"Judgement: {verdicts[p[0]['content'].split('Current step:')[1].split()[1]]}" for p in prompts]

    walks = find_first_errors([("task", path) for path in paths], judge)
    assert [w.error_step for w in walks] == [2, None, 1]
    assert calls == [3, 2]  # step 1: all three; step 2: the two still walking; c is never judged
    assert "Steps so far:\nAction: a\nObservation: o-a\n" in verifier_messages("task", paths[0], 2)[0]["content"]


PROMPT = [{"role": "user", "content": "Instruction: buy"}]
BAD = leaf(["go", "look", "x", "lose"], 0.0)
GOOD = leaf(["go", "look", "win"], 1.0)


@pytest.mark.parametrize(("error_step", "masked", "trained"), [
    (1, ["go"], ["look", "win"]),  # before the fork: resume on the good path right after the blamed step
    (2, ["go", "look"], ["win"]),  # at the fork (the last shared step)
    (3, ["go", "look", "x"], ["win"]),  # after the fork: the good branch's child of the shared parent
    (None, ["go", "look", "x", "lose"], ["win"]),  # no step blamed: the whole bad path, then the good branch
])
def test_revision_splice(error_step, masked, trained):
    assert shared_prefix(BAD, GOOD) == 2
    messages = revision_messages(PROMPT, BAD, GOOD, error_step, "I made an error.")
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert [m["content"] for m in assistant if m.get("loss") is False] == [f"Action: {a}" for a in masked]
    assert [m["content"] for m in assistant if m.get("loss", True)] == (
        ["Thought: I made an error.\nAction: wait"] + [f"Action: {a}" for a in trained])
    wait_at = messages.index({"role": "assistant", "content": "Thought: I made an error.\nAction: wait"})
    assert messages[wait_at + 1] == {"role": "user", "content": "ok."}
    assert messages[-1]["role"] == "assistant"


def test_loss_mask_skips_the_bad_prefix(tiny_tokenizer):
    messages = revision_messages(PROMPT, BAD, GOOD, 3, "I made an error.")
    ids, mask = tokenize_conversation(tiny_tokenizer, messages)
    trained = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Thought: I made an error.\nAction: wait<|im_end|>Action: win<|im_end|>"
    good_ids, good_mask = tokenize_conversation(tiny_tokenizer, path_messages(PROMPT, GOOD))
    assert tiny_tokenizer.decode([i for i, m in zip(good_ids, good_mask) if m]) == (
        "Action: go<|im_end|>Action: look<|im_end|>Action: win<|im_end|>")


def test_wait_is_a_noop_step_recorded_in_the_protocol():
    from coevo_lib.envs import make_env

    shop = make_env("minishop", n_train=4, n_test_seen=2, n_test_unseen=2, max_steps=6)
    task = shop.task_ids("train")[0]
    first = shop.reset(task)
    assert shop.step("wait") == ("ok.", 0.0, False, {"success": False, "steps": 1, "valid": True})
    actions = shop.expert_actions(task)
    for action in actions[:-1]:
        shop.step(action)
    observation, reward, done, info = shop.step(actions[-1])  # the wait cost a step, not the page state
    assert done and reward == 1.0 and info["steps"] == len(actions) + 1
    shop.reset(task)
    for _ in range(5):
        shop.step("wait")
    assert shop.step("wait")[1:3] == (0.0, True)  # waits count toward max_steps
    assert shop.protocol()["noop_action"] == "wait" and shop.protocol()["noop_observation"] == "ok."
    assert first.startswith("Instruction:")


def test_wait_in_intercode_sql_keeps_the_last_result():
    from coevo_lib.envs import EnvError, make_env

    try:
        sql = make_env("intercode_sql")
    except EnvError as missing:  # the offline SQL data is built by `make data`
        pytest.skip(str(missing))
    task = sql.task_ids("train")[0]
    sql.reset(task)
    gold = sql.expert_actions(task)[1]
    sql.step(gold)
    assert sql.step("wait")[:3] == ("ok.", 0.0, False)
    observation, reward, done, info = sql.step("submit")
    assert (reward, done, info["steps"]) == (1.0, True, 3)
    sql.close()
