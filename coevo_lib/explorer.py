"""Episode explorer for JupyterLab: pick a run, agent, iteration and task; see the expert, the
target's failure and the failure agent's hard negative side by side, turn by turn.

    from coevo_lib import explorer
    explorer.explore("runs/demo")          # any folder of finished runs, or one run directory

The data comes from coevo_lib.analysis.episode_view (unit-tested without widgets); this module only
wires ipywidgets (a core dependency) to it. The agent picker chooses whose failures list the tasks,
closest to success first, so the first task shown for the failure agent is its best hard negative.
"""

from __future__ import annotations

from pathlib import Path

from coevo_lib.analysis.episode_view import RunEpisodes, task_view_html
from coevo_lib.analysis.loading import NoRunsError, find_runs, is_finished, resolve_path


def finished_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a finished run, else the finished runs under it (NoRunsError if none)."""
    root = resolve_path(path)
    runs = [root] if is_finished(root) else find_runs(root)
    if not runs:
        raise NoRunsError(f"no finished runs under {root}: run one first (e.g. the 10-run notebook or `make demo`)")
    return runs


def choose(picker, options: list) -> None:
    """New options with the first one selected (ipywidgets 8 leaves the value unset)."""
    picker.options = options
    picker.index = 0 if options else None


def task_label(task_id: str, reward: float) -> str:
    return f"{task_id} (best failure {reward:.2f})"


class Explorer:
    """The widgets and the run currently shown; ``widget`` is what the notebook displays."""

    def __init__(self, path: str | Path):
        import ipywidgets as widgets

        root = resolve_path(path)
        self.runs = {run.name if run == root else str(run.relative_to(root)): run for run in finished_runs(path)}
        self.current: RunEpisodes | None = None
        self.run = widgets.Dropdown(options=list(self.runs), description="run")
        self.agent = widgets.Dropdown(description="agent")
        self.iteration = widgets.Dropdown(description="iteration")
        self.task = widgets.Dropdown(description="task", layout=widgets.Layout(width="420px"))
        self.view = widgets.HTML()
        self._refreshing = False
        for level, picker in enumerate((self.run, self.agent, self.iteration, self.task)):
            picker.observe(lambda _, level=level: self.changed(level), names="value")
        pickers = widgets.HBox([self.run, self.agent, self.iteration, self.task], layout={"flex_flow": "row wrap"})
        self.widget = widgets.VBox([pickers, self.view])
        self.refresh(0)

    def changed(self, level: int) -> None:
        """A picker changed; setting the options of the pickers below it must not re-enter."""
        if not self._refreshing:
            self.refresh(level)

    def refresh(self, level: int) -> None:
        """Recompute the pickers below ``level`` (0 run, 1 agent, 2 iteration, 3 task), then the view."""
        self._refreshing = True
        try:
            if level <= 0:
                self.load_run()
            if level <= 1:
                choose(self.iteration, self.current.iterations(self.agent.value) if self.agent.value is not None else [])
            if level <= 2:
                picked = self.iteration.value is not None
                tasks = self.current.tasks(self.agent.value, self.iteration.value) if picked else []
                choose(self.task, [(task_label(task, reward), task) for task, reward in tasks])
            self.view.value = self.view_html()
        finally:
            self._refreshing = False

    def load_run(self) -> None:
        if self.current is not None:
            self.current.close()
        self.current = RunEpisodes(self.runs[self.run.value])
        choose(self.agent, self.current.agents())

    def view_html(self) -> str:
        if not self.agent.options:
            return (f"<i>{self.run.value} has no training rollouts (method {self.current.info['method']}): "
                    "nothing to compare</i>")
        if self.task.value is None:
            return f"<i>the {self.agent.value} agent succeeded on every task at this iteration</i>"
        return task_view_html(self.current.task_view(self.iteration.value, self.task.value))


def explore(path: str | Path = "runs/demo"):
    """The explorer widget over the finished runs under ``path`` (or the run directory ``path``)."""
    return Explorer(path).widget
