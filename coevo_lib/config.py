"""One typed config path: dataclass defaults < YAML recipe (with ``base:`` inheritance) < overrides.

Every stage reads its own dataclass. Unknown keys, wrong types and missing files are errors that
name the offending key or path (ConfigError), raised before any compute starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coevo_lib.escaping import one_line


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid config."""


class FieldError(ConfigError):
    """A value outside its field's range. Raised by a section's __post_init__ with the field's own name;
    ``from_dict`` re-raises it under the section's dotted path, so the message names the full key."""

    def __init__(self, key: str, value: Any, requirement: str):
        self.key, self.value, self.requirement = key, value, requirement
        super().__init__(f"config key {key!r} must be {requirement}, got {value!r}")

    def under(self, section: str) -> FieldError:
        return FieldError(join_key(section, self.key), self.value, self.requirement)


def require(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise FieldError(key, value, requirement)


def require_positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, name, value, "> 0")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, key, value, f"one of {', '.join(choices)}")


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")  # transformers' SchedulerType (read here without importing transformers)
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PROMPT_STYLES = ("chat", "eto")


FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# What one iteration does; see coevo_lib.loop.ITERATIONS. The second agent's role is loop.second_agent.
METHODS = ("sft", "rft", "best_of_n", "eto", "coevo", "srlm", "agent_r")
NO_ITERATION_METHODS = ("sft", "best_of_n")


def final_iteration(method: str, iterations: int) -> int:
    """Iterations a run performs: SFT and Best-of-N only train the initial SFT model."""
    return 0 if method in NO_ITERATION_METHODS else iterations


@dataclass
class EnvConfig:
    name: str = field(default="minishop", metadata={"help": "registered environment name (coevo_lib.envs)"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "constructor arguments of the env"})


@dataclass
class TinyModelConfig:
    """The embedded model built offline: a local BPE tokenizer + a small random Llama."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    tokenizer_tasks_per_split: int = 400  # how many tasks' text the tokenizer is trained on

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                         "max_position_embeddings", "tokenizer_tasks_per_split")
        require(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
                f"a multiple of num_heads ({self.num_heads})")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        require_positive(self, "r", "alpha")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        require(bool(self.target_modules), "target_modules", self.target_modules, "a non-empty list")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="tiny",
        metadata={"help": "'tiny' (built offline), a model coevo provisions by name (`coevo model list`, e.g. "
                          "smollm2-135m-instruct), a Hugging Face model directory, or a hub id"},
    )
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU unless cpu_bf16), float32, "
                                                         "bfloat16"})
    cpu_bf16: bool = field(
        default=False,
        metadata={"help": "on a CPU with native bf16 (AMX or AVX512-BF16): generate with bf16 weights and train under "
                          "bf16 autocast over float32 master weights, as on a GPU; float32 on a CPU without it"},
    )
    hub_kernels: bool = field(
        default=False,
        metadata={"help": "let transformers replace layers with kernels from the Hugging Face Hub (use_kernels): it "
                          "downloads and runs code from the Hub when a model is loaded or switched to training, "
                          "and fails offline. Off unless asked for"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.name_or_path.strip()), "name_or_path", self.name_or_path, "'tiny', a model name or a path")
        require_choice("dtype", self.dtype, DTYPES)
        require(DEVICE_RE.fullmatch(self.device) is not None, "device", self.device, "auto, cpu, mps, cuda or cuda:N")


@dataclass
class PromptConfig:
    react: bool = field(default=True, metadata={"help": "assistant turns are 'Thought: ...\\nAction: ...'"})
    system_prompt: bool = field(
        default=True, metadata={"help": "include the env's system prompt (the tiny model learns the format from SFT)"}
    )
    few_shot: bool = field(default=False, metadata={"help": "prepend the env's worked example (real LLMs)"})
    style: str = field(
        default="chat",
        metadata={"help": "chat: system message, example turns, task; eto: ETO's shape (instruction as a user "
                          "turn answered 'OK', one-shot example turns, then the task)"},
    )
    max_prompt_tokens: int = field(default=1536, metadata={"help": "left-truncate longer contexts"})

    def __post_init__(self) -> None:
        require_choice("style", self.style, PROMPT_STYLES)
        require_positive(self, "max_prompt_tokens")


ROLLOUT_BACKENDS = ("hf", "vllm", "openai")
ROLLOUT_SCHEDULES = ("auto", "lockstep", "async")


@dataclass
class VLLMConfig:
    """The vLLM OpenAI-compatible server coevo starts (rollout.backend = vllm), once per run."""

    python: str | None = field(
        default=None,
        metadata={"help": "python of vLLM's own venv (default: $COEVO_VLLM_PYTHON, else .venv-vllm; `make vllm`)"},
    )
    tensor_parallel_size: int = 1
    data_parallel_size: int = field(default=1, metadata={"help": "engine replicas behind the one server (GPUs)"})
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = field(
        default=None, metadata={"help": "default: prompt.max_prompt_tokens (prompt plus reply always fit in it)"}
    )
    kv_cache_gib: int = field(default=2, metadata={"help": "CPU build only: KV cache size (VLLM_CPU_KVCACHE_SPACE)"})
    start_timeout_s: float = field(default=900.0, metadata={"help": "start to ready, before it counts as hung"})
    extra_args: list[str] = field(default_factory=list, metadata={"help": "passed through to vLLM's api_server"})
    env: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "server environment, e.g. {VLLM_CPU_OMP_THREADS_BIND: 0-1} (CPU: bind every core)"},
    )

    def __post_init__(self) -> None:
        require_positive(self, "tensor_parallel_size", "data_parallel_size", "kv_cache_gib", "start_timeout_s")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
                "in (0, 1]")
        require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", self.max_model_len,
                "> 0 or null")


@dataclass
class OpenAIEndpointsConfig:
    """OpenAI-compatible servers the user already runs (rollout.backend = openai)."""

    urls: list[str] = field(
        default_factory=list,
        metadata={"help": "base URLs ending in /v1; several = data parallel, each request to the least loaded"},
    )
    model: str | None = field(default=None, metadata={"help": "model name in requests (default: the served one)"})
    api_key_env: str | None = field(default=None, metadata={"help": "environment variable holding the API key"})
    retries: int = field(default=3, metadata={"help": "attempts per request on a failing endpoint before giving up"})

    def __post_init__(self) -> None:
        require(self.retries >= 1, "retries", self.retries, ">= 1")
        for url in self.urls:
            require(url.startswith(("http://", "https://")), "urls", url, "http(s) URLs such as http://host:8000/v1")


@dataclass
class RolloutConfig:
    backend: str = field(
        default="hf",
        metadata={"help": "hf (transformers in this process) | vllm (coevo serves each checkpoint with vLLM) | "
                          "openai (endpoints in rollout.openai.urls)"},
    )
    schedule: str = field(
        default="auto",
        metadata={"help": "lockstep (batches of batch_size advance turn by turn; hf only, exactly reproducible) | "
                          "async (each episode sends its next request when its own step is done) | auto: "
                          "lockstep on hf, async otherwise"},
    )
    batch_size: int = field(default=32, metadata={"help": "episodes generated in lockstep"})
    max_concurrent: int = field(default=32, metadata={"help": "async: episodes in flight at once"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "async: a request slower than this is a hang"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    samples_per_task: int = 1
    max_tasks: int | None = field(
        default=None, metadata={"help": "cap on training tasks rolled out per iteration (SFT always uses every expert)"}
    )
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    openai: OpenAIEndpointsConfig = field(default_factory=OpenAIEndpointsConfig)

    def __post_init__(self) -> None:
        require_choice("backend", self.backend, ROLLOUT_BACKENDS)
        require_choice("schedule", self.schedule, ROLLOUT_SCHEDULES)
        require(self.backend == "hf" or self.schedule != "lockstep", "schedule", self.schedule,
                f"async or auto with backend {self.backend} (lockstep batches are the in-process hf path)")
        require(self.backend != "openai" or bool(self.openai.urls), "backend", self.backend,
                "openai with at least one URL in rollout.openai.urls")
        require_positive(self, "batch_size", "max_concurrent", "request_timeout_s", "max_new_tokens",
                         "samples_per_task")
        require(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        require(self.max_tasks is None or self.max_tasks > 0, "max_tasks", self.max_tasks, "> 0 or null")

    @property
    def is_async(self) -> bool:
        return self.schedule == "async" or (self.schedule == "auto" and self.backend != "hf")


@dataclass
class TrainerStageConfig:
    """Optimisation settings every trl stage shares (SFT, DPO of either agent)."""

    epochs: float = 3.0
    learning_rate: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_length: int = 2048

    def __post_init__(self) -> None:
        self.check_epochs()
        require_positive(self, "learning_rate", "batch_size", "grad_accum", "max_length")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)

    def check_epochs(self) -> None:
        require_positive(self, "epochs")


@dataclass
class SFTStageConfig(TrainerStageConfig):
    """The SFT stage; ``epochs: 0`` evaluates the base model as it is (a pretrained model zero-shot)."""

    share: bool = field(
        default=True,
        metadata={"help": "reuse an identical SFT stage (same env, model, prompt, sft settings and seed) from "
                          "<parent of the run dir>/_shared instead of retraining it for every method"},
    )

    def check_epochs(self) -> None:
        require(self.epochs >= 0, "epochs", self.epochs, ">= 0 (0: no SFT, the base model zero-shot)")


@dataclass
class DPOStageConfig(TrainerStageConfig):
    learning_rate: float = 1e-6
    beta: float = 0.1
    lambda_dpo: float = field(default=0.5, metadata={"help": "weight of the DPO term (target agent)"})
    lambda_sft: float = field(default=0.5, metadata={"help": "weight of the SFT term on chosen (target agent)"})
    sft_reduction: str = field(
        default="sum",
        metadata={"help": "sum: per-trajectory summed NLL (ETO lineage); token_mean: trl's 'sft' term"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("sft_reduction", self.sft_reduction, ("sum", "token_mean"))
        require_positive(self, "beta")
        require(self.lambda_dpo >= 0, "lambda_dpo", self.lambda_dpo, ">= 0")
        require(self.lambda_sft >= 0, "lambda_sft", self.lambda_sft, ">= 0")
        require(self.lambda_dpo + self.lambda_sft > 0, "lambda_dpo", self.lambda_dpo,
                "> 0 when lambda_sft is 0 (a stage with no loss term)")


@dataclass
class PairConfig:
    eto_truncate: bool = field(default=True, metadata={"help": "ETO: cut failures to expert length + 5 turns"})
    eto_extra_turns: int = 5
    failure_within_agent: bool = field(default=False, metadata={"help": "also pair failures of one agent"})
    target_failure_pairs: bool = field(default=False, metadata={"help": "v1: add failure>failure pairs to target"})
    include_target_failures: bool = True
    include_failure_agent_failures: bool = True

    def __post_init__(self) -> None:
        require(self.eto_extra_turns >= 0, "eto_extra_turns", self.eto_extra_turns, ">= 0")


@dataclass
class LoopConfig:
    iterations: int = 2
    second_agent: str = field(
        default="failure",
        metadata={"help": "none | failure (coevo) | positive (ablation: trained toward success)"},
    )
    freeze_second_agent_after: int | None = field(
        default=None, metadata={"help": "stop updating the second agent after this iteration (1 = w/o co-evolution)"}
    )
    failure_dpo: DPOStageConfig = field(default_factory=lambda: DPOStageConfig(lambda_dpo=1.0, lambda_sft=0.0))
    pairs: PairConfig = field(default_factory=PairConfig)
    best_of_n: int = field(
        default=4, metadata={"help": "samples per task for best_of_n / rft / srlm (srlm and rft share the rollout)"}
    )

    def __post_init__(self) -> None:
        require_choice("second_agent", self.second_agent, ("none", "failure", "positive"))
        require(self.iterations >= 0, "iterations", self.iterations, ">= 0")
        require_positive(self, "best_of_n")
        freeze = self.freeze_second_agent_after
        require(freeze is None or freeze >= 0, "freeze_second_agent_after", freeze, ">= 0 or null")


SRLM_JUDGES = ("sample", "expected", "auto")


@dataclass
class SRLMConfig:
    """SRLM for agents (method srlm; docs/baselines.md): the agent judges its own episodes, best vs worst."""

    judge: str = field(
        default="auto",
        metadata={"help": "sample: SRLM's judge, sampled replies ending 'Score: n' (unparseable dropped) | expected: "
                          "the fallback, sum n p(n) over the model's probabilities of 'Score: 0'..'Score: 5' | auto: "
                          "sample, and the fallback for an episode none of whose samples parses"},
    )
    judge_samples: int = field(default=3, metadata={"help": "judge replies per episode, averaged (SRLM: 3)"})
    judge_temperature: float = field(default=0.7, metadata={"help": "SRLM's sampling temperature"})
    judge_max_new_tokens: int = field(default=128, metadata={"help": "justification (<= 100 words) and score"})
    judge_max_prompt_tokens: int = field(
        default=2048, metadata={"help": "a longer judge prompt leaves the episode unscored (counted)"}
    )
    observation_chars: int = field(default=300, metadata={"help": "each observation in the transcript is cut here"})

    def __post_init__(self) -> None:
        require_choice("judge", self.judge, SRLM_JUDGES)
        require_positive(self, "judge_samples", "judge_max_new_tokens", "judge_max_prompt_tokens", "observation_chars")
        require(self.judge_temperature > 0, "judge_temperature", self.judge_temperature, "> 0 (sampled judge)")


@dataclass
class AgentRConfig:
    """Agent-R (method agent_r; docs/baselines.md). The paper's search and filter values were not recovered:
    children and passes are its code's defaults (N_GEN 4, ITERA 4); the others are ours, see the help."""

    children: int = field(default=4, metadata={"help": "K: replies sampled per expansion, in one batch"})
    passes: int = field(default=4, metadata={"help": "descents from the root per task (Agent-R's ITERA)"})
    max_depth: int | None = field(
        default=None, metadata={"help": "a node this many actions deep is terminal (default: the env's max_steps)"}
    )
    exploration: float = field(default=0.25, metadata={"help": "UCT's c (Agent-R: 0.25)"})
    alpha: float = field(
        default=0.5,
        metadata={"help": "a leaf with reward > alpha is good. minishop: > 0.5 means the right product type "
                          "(another type scores <= 0.5) and more than half of its criteria met"},
    )
    beta: float = field(
        default=0.15,
        metadata={"help": "(good, bad) leaves need a reward gap > beta. minishop's rewards move in steps of "
                          "1/4-1/6 of the criteria, so 0.15 keeps any gap of one criterion or more"},
    )
    max_pairs_per_task: int = field(default=8, metadata={"help": "revision pairs per tree, drawn at random"})
    general_ratio: float = field(
        default=1.0,
        metadata={"help": "expert trajectories mixed in as Agent-R's 'general data', per search example "
                          "(revision or good), capped by the experts available"},
    )
    verifier_max_new_tokens: int = field(default=128, metadata={"help": "reasons, then 'Judgement: ...'"})
    sft: TrainerStageConfig = field(
        default_factory=lambda: TrainerStageConfig(epochs=2, learning_rate=2e-5, batch_size=8),
        metadata={"help": "the iteration's SFT, continued from the current agent"},
    )

    def __post_init__(self) -> None:
        require_positive(self, "children", "passes", "max_pairs_per_task", "verifier_max_new_tokens")
        require(self.max_depth is None or self.max_depth > 0, "max_depth", self.max_depth, "> 0 or null")
        require(self.exploration >= 0, "exploration", self.exploration, ">= 0")
        require(0 <= self.alpha < 1, "alpha", self.alpha, "in [0, 1)")
        require(self.beta >= 0, "beta", self.beta, ">= 0")
        require(self.general_ratio >= 0, "general_ratio", self.general_ratio, ">= 0")


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["test_seen", "test_unseen"])
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    max_tasks: int | None = None
    every_iteration: bool = field(
        default=True,
        metadata={"help": "evaluate after every iteration; false: only the SFT model (iteration 0) and the last "
                          "iteration, which is all a results table needs"},
    )

    def __post_init__(self) -> None:
        require(bool(self.splits) and len(set(self.splits)) == len(self.splits), "splits", self.splits,
                "a non-empty list of distinct split names")
        require(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        require(self.max_tasks is None or self.max_tasks > 0, "max_tasks", self.max_tasks, "> 0 or null")


LAUNCHERS = ("inprocess", "accelerate", "torchrun")
ACCELERATE_CONFIGS = ("ddp", "fsdp2", "zero3")  # configs/accelerate/<name>.yaml


@dataclass
class TrainLaunchConfig:
    """How SFT and DPO stages run: inside the coevo process, or as a subprocess of N ranks.

    Stage batch sizes stay global: each of ``num_processes`` ranks takes batch_size / num_processes
    examples per micro-step, so the effective batch (batch_size x grad_accum) does not depend on N.
    """

    launcher: str = field(
        default="inprocess",
        metadata={"help": "inprocess (one process, the default) | accelerate | torchrun: the stage runs as a "
                          "subprocess (its own process group, log in <run>/launch/<stage>/launch.log)"},
    )
    num_processes: int = field(default=1, metadata={"help": "ranks per stage (GPUs of the node; CPU: gloo)"})
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate launcher only: ddp | fsdp2 | zero3 (configs/accelerate/) or a config file "
                          "path; none = plain DDP"},
    )
    main_process_port: int | None = field(default=None, metadata={"help": "rendezvous port (none: the launcher binds a free one itself)"})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "recompute activations in the backward pass (trl's default): less memory, more compute; "
                          "the gradients are the same. Small models on CPU train faster without it"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer for training (accelerate's regional compilation, "
                          "through the Trainer's torch_compile): fuses the casts and elementwise work that bf16 "
                          "autocast leaves around the matmuls. Needs a C++ compiler (inductor's CPU backend) and "
                          "costs about a minute of compiling per stage; pays on models of 100M+ parameters "
                          "(bench/pretrained.py), not on the tiny one"},
    )

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"train.launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.num_processes < 1:
            raise ConfigError(f"train.num_processes must be >= 1, got {self.num_processes}")
        if self.launcher == "inprocess" and self.num_processes != 1:
            raise ConfigError("train.num_processes > 1 needs train.launcher = accelerate or torchrun "
                              "(several ranks never run inside the coevo process or a notebook kernel)")
        if self.accelerate_config is not None and self.launcher != "accelerate":
            raise ConfigError(f"train.accelerate_config needs train.launcher = accelerate, got {self.launcher!r}")
        if self.accelerate_config not in (None, *ACCELERATE_CONFIGS) and not Path(self.accelerate_config).is_file():
            raise ConfigError(f"train.accelerate_config must be one of {', '.join(ACCELERATE_CONFIGS)} or an "
                              f"existing file, got {self.accelerate_config!r}")
        if self.main_process_port is not None and not 0 < self.main_process_port < 65536:
            raise ConfigError(f"train.main_process_port must be a TCP port, got {self.main_process_port}")

    def check_global_batch(self, section: str, stage: TrainerStageConfig) -> None:
        if stage.batch_size % self.num_processes:
            raise ConfigError(f"{section}.batch_size={stage.batch_size} is the global batch and must divide by "
                              f"train.num_processes={self.num_processes}")


@dataclass
class RunConfig:
    """The whole recipe of one run (one method, one seed)."""

    name: str = "run"
    label: str | None = field(
        default=None, metadata={"help": "this recipe's name in tables and figures (default: from method and loop)"}
    )
    method: str = field(default="sft", metadata={"help": " | ".join(METHODS)})
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    srlm: SRLMConfig = field(default_factory=SRLMConfig)
    agent_r: AgentRConfig = field(default_factory=AgentRConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainLaunchConfig = field(default_factory=TrainLaunchConfig)
    runs_root: str = field(default="runs", metadata={"help": "parent of run directories"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        require(self.seed >= 0, "seed", self.seed, ">= 0")
        require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        require(bool(self.runs_root), "runs_root", self.runs_root, "a directory")
        if self.method == "coevo" and self.loop.second_agent == "none":
            raise ConfigError("method coevo needs loop.second_agent = failure or positive")
        for section, stage in (("sft", self.sft), ("dpo", self.dpo), ("loop.failure_dpo", self.loop.failure_dpo),
                               ("agent_r.sft", self.agent_r.sft)):
            self.train.check_global_batch(section, stage)


# ---------------------------------------------------------------------------------------------
# Loading: YAML with `base:` inheritance, dotted overrides, strict conversion into dataclasses.


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a recipe (following its ``base:`` chain), apply overrides, return a validated RunConfig."""
    raw = read_recipe(Path(path))
    for key, value in normalise_overrides(overrides).items():
        set_dotted(raw, key, value)
    return from_dict(RunConfig, raw, "")


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"recipe base cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_recipe((path.parent / base), seen + (path.resolve(),))
    return deep_merge(parent, data)


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "kwargs":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def normalise_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` or ``{"a.b": 1}`` -> dict; string values are parsed as YAML scalars."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({one_line(error)})") from None
    return parsed



def set_dotted(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = raw
    if not all(parents + [leaf]):
        raise ConfigError(f"override key {dotted_key!r} has an empty part")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted_key!r}: {part!r} is not a section")
    node[leaf] = value


def from_dict(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` on top of ``base`` (default: ``cls()``); keys must be fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {join_key(where, unknown[0])!r} (known in this section: {sorted(names)})")
    values = {}
    for key, value in data.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            # Nested sections start from the parent's default for that field, not the class default.
            values[key] = from_dict(type(current), value, join_key(where, key), current)
        else:
            values[key] = convert(hints[key], value, join_key(where, key))
    try:
        return dataclasses.replace(base, **values)
    except FieldError as error:  # raised by the section's __post_init__, which knows only its field names
        raise error.under(where) from None


def join_key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check/convert one value against its type hint."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else convert(args[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {where!r} must be a list, got {value!r}")
        return [convert(typing.get_args(hint)[0], v, where) for v in value]
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
        return value
    return convert_scalar(hint, value, where)


def convert_scalar(hint: type, value: Any, where: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "3e-3" (no dot) as a string
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"config key {where!r} must be {hint.__name__}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
