"""ScienceWorld (Wang et al. 2022) through its PyPI package 1.2.3: ``make_env("scienceworld", ...)``. Tasks and
splits: :mod:`coevo_lib.envs.scienceworld_splits` (ETO's train / seen / unseen convention).

Episode: ``reset`` loads the variation with ``simplification`` ("easy" as in ETO's ``sciworld_env.py``:
teleport, open doors and containers, self-watering pots, no electrical actions unless needed), takes
ScienceWorld's opening "look around" and returns the task description followed by its observation. The
simulator answers unknown actions itself ("No known action matches that input."). An episode ends when
the game completes, the score turns negative (ScienceWorld's failure states) or at the step limit.

The protocol follows ETO (the code base the paper extends) by default; each rule has an option:

* ``split="eto"``: ETO's own files (1,483 train / 194 seen / 211 unseen, data/eto_scienceworld/), or
  ``split="drawn"``: a seeded draw from ScienceWorld's variation sets (:mod:`scienceworld_splits`).
* ``max_steps="eto"``: ETO's limit per task (10 to 120), or an integer: one flat limit for every task.
* ``reward_rule="max"``: ETO's reward, the highest score reached during the episode / 100 (progress made before
  a failure state counts), or ``"final"``: the score when the episode ends, 0 after a failure state.
  Either way the reward is paid on the last step (0 before), ``info["score"]`` is the raw score, and success
  means the score reached 100 (ETO's own success flag only means the episode ended).

Speed: the package's ``step`` lists the 100-4,000 valid actions every step; we list them on demand only
(:meth:`ScienceWorldEnv.valid_actions`, or into ``info["valid_actions"]`` with ``valid_actions=True``).
Generating the gold path makes a load ~10x slower (0.3 s, 4 s for Mendelian genetics): ``gold_path_on_reset``.

The JVM: one per environment object, started on first use with ``-Xmx<jvm_heap> -XX:+UseSerialGC`` (through
JAVA_TOOL_OPTIONS: the package launches java without options). If it dies, the next call starts a new one,
reloads the episode's variation and replays its actions (logged, counted in ``restarts``), up to ScienceWorld's
nondeterminism: objects are listed in hash order, a few processes (bees, heat by a degree) vary run to run.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import scienceworld
    from py4j.protocol import Py4JError, Py4JJavaError
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("the scienceworld environment needs `pip install scienceworld==1.2.3` "
                      "(or `pip install -e '.[envs]'`)") from error

from coevo_lib.envs import scienceworld_splits as sws
from coevo_lib.envs.base import EnvError, StepResult, TaskSpec, TextEnv, live_episode

logger = logging.getLogger(__name__)
# py4j logs a traceback for every gateway it shuts down after the JVM has already exited (our
# close() and JVM restarts do exactly that); those are not errors, so only its critical messages pass.
logging.getLogger("py4j").setLevel(logging.CRITICAL)

MIN_JAVA = 11
JAVA_INSTALL_HINT = "apt-get install openjdk-17-jre-headless (or run `make java`)"
SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                   "noElectricalAction")
FEW_SHOT_TASKS = ("find-living-thing", "find-plant", "find-animal")
SYSTEM_PROMPT = """You are an agent doing science experiments in a simulated house with rooms such as the kitchen, \
workshop, greenhouse, bathroom, art studio, hallway and outside. Explore, find what the task needs and do it.
Actions (OBJ and LOC are names exactly as the observations write them):
look around | look at OBJ | examine OBJ | read OBJ | inventory | task (repeat the task)
go to LOC | teleport to LOC (if allowed) | open OBJ | close OBJ | pick up OBJ | put down OBJ | move OBJ to OBJ
pour OBJ into OBJ | mix OBJ | activate OBJ | deactivate OBJ | use OBJ [on OBJ] | eat OBJ
connect OBJ to OBJ | disconnect OBJ | wait (10 steps) | wait1 (1 step) | focus on OBJ
"focus on" tells the simulator which object the task is about: focusing on a wrong object fails the task.
When the simulator asks which of several objects you mean, answer with the number of your choice."""


class JavaMissingError(RuntimeError):
    """No usable Java runtime for ScienceWorld's simulator."""


def java_major_version(java: str = "java") -> int | None:
    """The major version of ``java`` on PATH (8 for "1.8.0_292", 17 for "17.0.15"), None without one."""
    if shutil.which(java) is None:
        return None
    banner = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(?:1\.)?(\d+)', banner)  # "1.8.0_292" is Java 8
    return int(match.group(1)) if match else None


def check_java(java: str = "java") -> int:
    """Java's major version; raises JavaMissingError naming what to install when it is missing or < 11."""
    version = java_major_version(java)
    if version is None or version < MIN_JAVA:
        found = f"no `{java}` on PATH" if version is None else f"found Java {version}"
        raise JavaMissingError(f"ScienceWorld needs Java >= {MIN_JAVA} ({found}); install it: {JAVA_INSTALL_HINT}")
    return version


@contextmanager
def java_tool_options(options: str):
    """JAVA_TOOL_OPTIONS extended with ``options`` while a JVM is launched (the package takes no JVM options)."""
    previous = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = f"{previous} {options}" if previous else options
    try:
        yield
    finally:
        del os.environ["JAVA_TOOL_OPTIONS"]
        os.environ.update({} if previous is None else {"JAVA_TOOL_OPTIONS": previous})


class Simulator:
    """One JVM running ScienceWorld, used through the package's py4j ``server`` handle."""

    def __init__(self, jvm_heap: str):
        check_java()
        with java_tool_options(f"-Xmx{jvm_heap} -XX:+UseSerialGC"):
            # envStepLimit is ScienceWorld's own limit, which only its step() checks; ours is max_steps.
            self.package_env = scienceworld.ScienceWorldEnv("", envStepLimit=10**9)
        self.server = self.package_env.server
        self.process = self.package_env._gateway.java_process  # a Popen of `java` itself

    def load(self, task_name: str, variation: int, simplification: str, gold_path: bool) -> None:
        self.package_env.load(task_name, variation, simplification, generateGoldPath=gold_path)

    def step(self, action: str) -> tuple[str, int, bool]:
        """(observation, score in -100..100, completed) after ``action``."""
        try:
            observation = self.server.step(action)
        except Py4JJavaError as error:  # the parser threw on this input: tell the agent, keep the episode
            logger.warning("ScienceWorld could not process the action %r: %s", action[:200], error.java_exception)
            observation = "The simulator could not process that action."
        return observation, int(round(100 * self.server.getScore())), bool(self.server.getCompleted())

    def task_description(self) -> str:
        return self.server.freeActionTaskDesc()

    def gold_actions(self) -> list[str]:
        return list(self.server.getGoldActionSequence())

    def valid_actions(self) -> list[str]:
        return sorted(self.server.getValidActionObjectCombinations())

    def variation_sets(self, task_name: str) -> dict[str, list[int]]:
        self.package_env.load(task_name, 0, "")
        env = self.package_env
        return {"train": env.get_variations_train(), "dev": env.get_variations_dev(), "test": env.get_variations_test()}

    def alive(self, grace_s: float = 0.0) -> bool:
        """Whether the JVM runs; ``grace_s`` to wait for one killed mid-call, whose socket breaks first."""
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return True
        return False

    def close(self) -> None:
        if not self.alive():
            # Else py4j reconnects, and logs an error, for each proxy it collects and for the package's
            # second close() in __del__.
            self.package_env._gateway._gateway_client.is_connected = False
        self.package_env.close()


@dataclass
class Episode:
    task_id: str
    task_name: str
    variation: int
    limit: int  # this task's step limit
    observations: list[str] = field(default_factory=list)  # opening "look around", then one per action
    actions: list[str] = field(default_factory=list)
    best_score: int = 0  # the highest score reached so far (ETO's reward)
    done: bool = False


# One "Thought" per expert action, by the action's verb (first match wins); {0}, {1} are its objects.
THOUGHT_TEMPLATES = (
    (r"look around", "I should look around to see what is here."),
    (r"(?:go|teleport) to (.+)", "I should go to the {0}."),
    (r"open door to (.+)", "The {0} is behind a door; I should open it."),
    (r"open (.+)", "I should open the {0} to get at what is inside."),
    (r"pick up (.+)", "I need the {0}, so I will pick it up."),
    (r"focus on (.+)", "The {0} is what the task is about; I should focus on it."),
    (r"move (.+?) to (.+)", "I should move the {0} to the {1}."),
    (r"pour (.+?) into (.+)", "I should pour the {0} into the {1}."),
    (r"activate (.+)", "I should turn on the {0}."),
    (r"deactivate (.+)", "I should turn off the {0}."),
    (r"connect (.+?) to (.+)", "I should connect the {0} to the {1}."),
    (r"use (.+?) on (.+)", "I should use the {0} on the {1}."),
    (r"use (.+)", "I should use the {0}."),
    (r"(?:look at|examine) (.+)", "I should examine the {0} closely."),
    (r"(close|put down|read|eat|mix|disconnect) (.+)", "I should {0} the {1}."),
    (r"wait1", "I should wait a moment for things to change."),
    (r"wait\d*", "I should wait a while for things to change."),
    (r"inventory", "I should check what I am carrying."),
    (r"(\d+)", "Several objects match that; I mean option {0}."),
)


def thought_for(action: str) -> str:
    for pattern, template in THOUGHT_TEMPLATES:
        match = re.fullmatch(pattern, action.strip())
        if match:
            return template.format(*match.groups())
    return f"I should {action.strip()}."


def same_observation(first: str, second: str) -> bool:
    """Equal up to the order of lines: ScienceWorld lists a room's objects in hash order."""
    return sorted(line.strip() for line in first.splitlines()) == sorted(line.strip() for line in second.splitlines())


SPLIT_SOURCES = ("eto", "drawn")
REWARD_RULES = ("max", "final")
OVERLAP_RULES = ("keep", "drop")
# split="drawn" with no size given draws ETO's test sizes and keeps every train variation.
DRAWN_DEFAULT_SIZES = {"train": None, "test_seen": 194, "test_unseen": 211}


def check_settings(max_steps: int | str, simplification: str, jvm_heap: str) -> None:
    if max_steps != "eto" and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
        raise EnvError(f"max_steps must be 'eto' (ETO's per-task limits) or a positive integer, got {max_steps!r}")
    unknown = [s for s in simplification.split(",") if s and s not in SIMPLIFICATIONS]
    if unknown:
        raise EnvError(f"unknown simplifications {unknown}; ScienceWorld has {', '.join(SIMPLIFICATIONS)}")
    if not re.fullmatch(r"\d+[kKmMgG]?", jvm_heap):
        raise EnvError(f"jvm_heap must look like '1g' or '512m' (java -Xmx), got {jvm_heap!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EnvError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class ScienceWorldEnv(TextEnv):
    """ScienceWorld behind the coevo protocol (module doc: ``split``, ``max_steps``, ``reward_rule``).

    Sizes ``n_train``, ``n_test_seen``, ``n_test_unseen``: None keeps the whole split (``split="eto"``: ETO's
    files; ``"drawn"``: 194 seen, 211 unseen, every train variation); a number takes a seeded sample balanced over
    the tasks not in ``exclude_tasks``. ``eto_train_overlap="drop"`` removes the 54 ETO train ids that are also
    seen-split ids. An ``index_file`` lists the splits instead of all of these. ``cache_dir`` ($COEVO_CACHE)
    keeps the per-task variation lists. ``gold_path_on_reset=False`` loads faster and leaves the gold path to
    :meth:`expert_actions`."""

    name = "scienceworld"
    # "wait" is ScienceWorld's own action (10 ticks pass), used by expert paths: it is not overridden,
    # so an Agent-R reflection turn here changes the world (docs/baselines.md).
    noop_action = None

    def __init__(
        self, seed: int = 0, split: str = "eto", n_train: int | None = None, n_test_seen: int | None = None,
        n_test_unseen: int | None = None, index_file: str | Path | None = None, max_steps: int | str = "eto",
        reward_rule: str = "max", eto_train_overlap: str = "keep", simplification: str = "easy",
        jvm_heap: str = "1g", valid_actions: bool = False, gold_path_on_reset: bool = False,
        exclude_tasks: list[str] | tuple[str, ...] = sws.ETO_EXCLUDED_TASKS, cache_dir: str | Path | None = None,
    ):
        check_settings(max_steps, simplification, jvm_heap)
        check_choice("split", split, SPLIT_SOURCES)
        check_choice("reward_rule", reward_rule, REWARD_RULES)
        check_choice("eto_train_overlap", eto_train_overlap, OVERLAP_RULES)
        self.seed, self.simplification, self.jvm_heap = seed, simplification, jvm_heap
        self.split_source = "index_file" if index_file is not None else split
        self.reward_rule, self.eto_train_overlap = reward_rule, eto_train_overlap
        self.step_limits = sws.eto_step_limits() if max_steps == "eto" else None
        self.flat_limit = max_steps if max_steps != "eto" else None
        self.include_valid_actions = valid_actions  # not self.valid_actions: that is the method
        self.gold_path_on_reset = gold_path_on_reset
        self.restarts = 0  # JVMs restarted after dying
        self.last_replay_mismatches = 0  # observations that differed in the last episode replay
        self._simulator: Simulator | None = None
        self._episode: Episode | None = None
        self._experts: dict[str, list[str]] = {}
        self._few_shot: list[dict[str, str]] | None = None
        self.variation_cache = sws.variation_cache_path(cache_dir)
        self._variations = sws.load_variations(self.variation_cache, self._fetch_variations)
        excluded = {sws.canonical_task_name(task) for task in exclude_tasks}
        self.tasks = [task for task in sws.TASK_NAMES if task not in excluded]
        sizes = {"train": n_train, "test_seen": n_test_seen, "test_unseen": n_test_unseen}
        if index_file is not None:  # the user's own index replaces the drawing (and exclude_tasks)
            self._splits = sws.read_index(index_file, self._variations)
        elif split == "drawn":
            sizes = {name: DRAWN_DEFAULT_SIZES[name] if size is None else size for name, size in sizes.items()}
            self._splits = sws.draw_splits(self._variations, self.tasks, sizes, seed)
        else:
            self._splits = self._eto_splits(sizes)
        self._check_limits_cover_tasks()

    def _check_limits_cover_tasks(self) -> None:
        if self.step_limits is None:
            return
        used = {sws.parse_task_id(task_id)[0] for ids in self._splits.values() for task_id in ids}
        missing = sorted(used - set(self.step_limits))
        if missing:
            raise EnvError(f"ETO has no step limit for tasks {missing} (ETO excluded them); "
                           "give an integer max_steps to use them")

    def _eto_splits(self, sizes: dict[str, int | None]) -> sws.Splits:
        splits = sws.eto_splits(self._variations)
        overlap = set(splits["train"]) & set(splits["test_seen"])
        logger.debug("ETO's split lists %d train ids that are also seen-split ids (eto_train_overlap=%s)",
                    len(overlap), self.eto_train_overlap)
        if self.eto_train_overlap == "drop":
            splits["train"] = [task_id for task_id in splits["train"] if task_id not in overlap]
        kept = set(self.tasks)
        splits = {name: [t for t in ids if sws.parse_task_id(t)[0] in kept] for name, ids in splits.items()}
        return {name: ids if sizes[name] is None else
                sws.subsample(ids, sizes[name], random.Random(f"scienceworld-eto/{self.seed}/{name}"))
                for name, ids in splits.items()}

    @property
    def max_steps(self) -> int:
        """The step limit of the episode in progress; between episodes, the largest any task has."""
        if self._episode is not None:
            return self._episode.limit
        return self.flat_limit if self.flat_limit is not None else max(self.step_limits.values())

    def step_limit(self, task_name: str) -> int:
        """ETO's limit for ``task_name`` (max_steps="eto"), else the flat one."""
        return self.flat_limit if self.flat_limit is not None else self.step_limits[task_name]

    # --- protocol -----------------------------------------------------------------------------------

    def splits(self) -> list[str]:
        return list(sws.SPLITS)

    def task_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise EnvError(f"unknown split {split!r}; {self.name} has {', '.join(sws.SPLITS)}")
        return list(self._splits[split])

    def reset(self, task_id: str) -> str:
        """Start ``task_id`` (any ScienceWorld variation, in a split or not): task description + "look around"."""
        task_name, variation = self._parse(task_id)
        self._episode = None  # nothing to restore should the JVM have died since the last episode
        gold_path = self.gold_path_on_reset
        description, observations, gold = self._call(lambda sim: self._play(sim, task_name, variation, [], gold_path))
        if gold is not None:
            self._experts.setdefault(task_id, gold)
        self._episode = Episode(task_id, task_name, variation, self.step_limit(task_name), observations=observations)
        return f"{description}\n\n{observations[0]}"

    def step(self, action: str) -> StepResult:
        episode = live_episode(self._episode)
        action = str(action)
        observation, score, completed = self._call(lambda sim: sim.step(action))
        episode.actions.append(action)
        episode.observations.append(observation)
        episode.best_score = max(episode.best_score, score)
        counted = episode.best_score if self.reward_rule == "max" else score
        info = {"score": score, "best_score": episode.best_score, "success": counted == 100,
                "steps": len(episode.actions), "completed": completed}
        if self.include_valid_actions:
            info["valid_actions"] = self.valid_actions()
        episode.done = completed or score < 0 or len(episode.actions) >= episode.limit
        info["truncated"] = episode.done and not completed and score >= 0
        reward = max(counted, 0) / 100 if episode.done else 0.0
        return observation, reward, episode.done, info

    def expert_actions(self, task_id: str) -> list[str]:
        """ScienceWorld's gold action sequence (cached; computing it keeps an episode in progress)."""
        if task_id not in self._experts:
            task_name, variation = self._parse(task_id)
            with self._episode_kept():
                self._experts[task_id] = self._call(lambda sim: self._play(sim, task_name, variation, [], True)[2])
        return list(self._experts[task_id])

    def expert_thoughts(self, task_id: str) -> list[str]:
        return [thought_for(action) for action in self.expert_actions(task_id)]

    def task_spec(self) -> TaskSpec:
        if self._few_shot is None:
            self._few_shot = self._expert_example()
        limit = (f"You have at most {self.flat_limit} actions." if self.flat_limit is not None
                 else "Each task allows a limited number of actions.")
        return TaskSpec(name=self.name, system_prompt=f"{SYSTEM_PROMPT}\n{limit}", few_shot=list(self._few_shot))

    def protocol(self) -> dict:
        """The benchmark protocol this environment applies (recorded in each run directory)."""
        overlaps = sws.split_overlaps(self._splits)
        limits = ({"rule": "eto", "per_task": dict(self.step_limits)} if self.flat_limit is None
                  else {"rule": "flat", "max_steps": self.flat_limit})
        return {**super().protocol(), "max_steps": self.flat_limit or "eto", "step_limit": limits,
                "split_source": self.split_source, "reward_rule": self.reward_rule,
                "eto_train_overlap": self.eto_train_overlap,
                "split_overlaps": {pair: len(ids) for pair, ids in overlaps.items()},
                "simplification": self.simplification}

    def close(self) -> None:
        if self._simulator is not None:
            self._simulator.close()
        self._simulator, self._episode = None, None

    # --- extras -------------------------------------------------------------------------------------

    def valid_actions(self) -> list[str]:
        """The actions ScienceWorld accepts in the current state (sorted); 20-300 ms, so only on demand."""
        live_episode(self._episode)  # only inside an episode: raises otherwise
        return self._call(lambda sim: sim.valid_actions())

    def write_index(self, path: str | Path) -> Path:
        """Write this environment's splits to ``path`` (JSON, or JSONL by suffix) to edit and pass as index_file."""
        return sws.write_index(self._splits, path)

    def jvm_pid(self) -> int | None:
        """Process id of the running JVM (None before first use), e.g. to test recovery by killing it."""
        return None if self._simulator is None else self._simulator.process.pid

    # --- the JVM and its recovery ---------------------------------------------------------------------

    def _call(self, operation):
        """``operation(simulator)``; if the JVM dies, once more on a fresh one with the episode replayed."""
        simulator = self._running_simulator()
        try:
            return operation(simulator)
        except Py4JError as error:
            if isinstance(error, Py4JJavaError) or simulator.alive(grace_s=2.0):
                raise  # the JVM answered or still runs: a genuine error, not ours to hide
            self._restart(f"died during a call ({type(error).__name__})")
            return operation(self._simulator)

    def _running_simulator(self) -> Simulator:
        if self._simulator is None:
            self._simulator = Simulator(self.jvm_heap)
        elif not self._simulator.alive():
            self._restart("is not running")
        return self._simulator

    def _restart(self, reason: str) -> None:
        self.restarts += 1
        episode = self._episode if self._episode is not None and not self._episode.done else None
        replay = f"; replaying {len(episode.actions)} actions of {episode.task_id}" if episode else ""
        logger.warning("ScienceWorld JVM (pid %d) %s: starting a new one (restart %d)%s",
                       self._simulator.process.pid, reason, self.restarts, replay)
        self._simulator.close()
        self._simulator = Simulator(self.jvm_heap)
        if episode is not None:
            self._replay(self._simulator, episode)

    def _replay(self, simulator: Simulator, episode: Episode) -> None:
        """Bring ``simulator`` to the state of ``episode``: reload its variation and replay its actions."""
        _, observations, _ = self._play(simulator, episode.task_name, episode.variation, episode.actions,
                                        self.gold_path_on_reset)
        pairs = zip(observations, episode.observations, strict=True)
        self.last_replay_mismatches = sum(not same_observation(new, old) for new, old in pairs)
        if self.last_replay_mismatches:
            logger.warning("replaying %s: %d of %d observations differ (ScienceWorld's nondeterminism)",
                           episode.task_id, self.last_replay_mismatches, len(observations))

    def _play(self, simulator: Simulator, task_name: str, variation: int, actions: list[str], gold_path: bool):
        """Load a variation and play ``actions``: (task description, [opening look, one per action], gold or None)."""
        simulator.load(task_name, variation, self.simplification, gold_path)
        observations = [simulator.step("look around")[0]]  # ScienceWorld's own reset() opens with it
        observations += [simulator.step(action)[0] for action in actions]
        return simulator.task_description(), observations, simulator.gold_actions() if gold_path else None

    @contextmanager
    def _episode_kept(self):
        """Use the simulator for something else, then put the episode in progress back."""
        yield
        episode = self._episode
        if episode is not None and not episode.done:
            self._call(lambda sim: self._replay(sim, episode))

    def _fetch_variations(self) -> sws.Variations:
        return {task: self._call(lambda sim, task=task: sim.variation_sets(task)) for task in sws.TASK_NAMES}

    # --- helpers ------------------------------------------------------------------------------------

    def _parse(self, task_id: str) -> tuple[str, int]:
        task_name, variation = sws.parse_task_id(task_id)
        if variation not in sws.all_variations(self._variations, task_name):
            raise EnvError(f"{task_name} has no variation {variation} (task id {task_id!r})")
        return task_name, variation

    def _expert_example(self) -> list[dict[str, str]]:
        """The expert trajectory of a short training task as chat messages (the worked example)."""
        train = self._splits["train"]
        if not train:
            return []
        task_id = next((t for name in FEW_SHOT_TASKS for t in train if t.startswith(f"{name}|")), train[0])
        task_name, variation = self._parse(task_id)
        actions, thoughts = self.expert_actions(task_id), self.expert_thoughts(task_id)
        with self._episode_kept():
            description, observations, _ = self._call(lambda sim: self._play(sim, task_name, variation, actions, False))
        messages = [{"role": "user", "content": f"{description}\n\n{observations[0]}"}]
        for thought, action, observation in zip(thoughts, actions, observations[1:], strict=True):
            messages.append({"role": "assistant", "content": f"Thought: {thought}\nAction: {action}"})
            messages.append({"role": "user", "content": observation})
        return messages[:-1]  # ends on the expert's last action, like a trajectory
