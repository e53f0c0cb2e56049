"""Steps and loss of a training stage on coevo's progress bars (coevo_lib.progress).

The Trainer's own tqdm is off (``disable_tqdm``: it would draw a second, differently styled bar) and
its PrinterCallback is removed (a dict per log step); this callback shows the optimizer step and the
latest logged loss as training goes, in JupyterLab and in text logs alike.
"""

from __future__ import annotations

from transformers import TrainerCallback

from coevo_lib.progress import progress_bar


class TrainingProgress(TrainerCallback):
    """One bar per ``trainer.train()``: optimizer steps done of ``max_steps``, the last logged loss as postfix."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # one bar per run, not one per rank
            self.bar = progress_bar(state.max_steps, self.desc, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # "loss" every logging_steps; "train_loss" once at the end (the mean, the only one in 1-step stages).
        loss = (logs or {}).get("loss", (logs or {}).get("train_loss"))
        if self.bar is not None and loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
