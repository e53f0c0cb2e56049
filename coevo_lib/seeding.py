"""Seeds live in the config; this applies one to every generator a run touches."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Bitwise-equal CPU runs are what makes "resume after kill == unbroken run" testable.
    torch.use_deterministic_algorithms(True, warn_only=True)


def quiet_libraries() -> None:
    """Silence per-file progress bars of transformers/datasets; coevo's own tqdm bars stay."""
    import warnings

    import datasets
    import transformers

    # transformers 5 renamed gradient checkpointing; trl 1.16 still uses the old names on every step.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    # httpx logs every request at INFO: one line per turn of every episode on the vllm/openai backends.
    logging.getLogger("httpx").setLevel(logging.WARNING)
