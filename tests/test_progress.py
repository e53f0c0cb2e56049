"""Progress bars: widgets only in a Jupyter kernel, whole text lines elsewhere; training steps show the loss."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from coevo_lib import progress
from coevo_lib.train.progress_callback import TrainingProgress


def test_mode_is_text_outside_a_kernel_and_follows_the_variable(monkeypatch):
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    assert progress.progress_mode() == "text"  # pytest is no Jupyter kernel
    monkeypatch.setenv(progress.MODE_VARIABLE, "widgets")
    assert progress.progress_mode() == "widgets"
    monkeypatch.setenv(progress.MODE_VARIABLE, "fancy")
    with pytest.raises(ValueError, match="COEVO_PROGRESS='fancy' is not one of auto, widgets, text"):
        progress.progress_mode()


def test_text_progress_sets_and_restores_the_variable(monkeypatch):
    monkeypatch.setenv(progress.MODE_VARIABLE, "widgets")
    with progress.text_progress():
        assert progress.progress_mode() == "text"
    assert progress.progress_mode() == "widgets"


def test_text_bars_write_whole_lines(monkeypatch, capsys):
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    with progress.progress_bar(4, "rollout target it1 train", unit="episode") as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert lines[0].startswith("rollout target it1 train:   0%") and "4/4" in lines[-1]


def test_training_callback_shows_steps_and_loss(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    state = TrainerState(max_steps=3)
    callback = TrainingProgress("it1-train-target")
    callback.on_train_begin(args, state, control)
    for step, loss in enumerate([0.69, 0.41, 0.25], start=1):
        state.global_step = step
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": loss})
    callback.on_train_end(args, state, control)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("it1-train-target: 100%") and "3/3" in last and "loss=0.25" in last
