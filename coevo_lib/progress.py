"""Progress bars that suit where coevo runs: widgets in JupyterLab, text lines everywhere else.

Rollouts, training stages and evaluations report through ``progress_bar``. In a Jupyter kernel
with ipywidgets (a core dependency) that is tqdm's notebook bar; on a terminal it is tqdm's text
bar; when nobody watches live (papermill, `coevo study`, a log file) it is one plain text line
at most every ``TEXT_INTERVAL_S`` seconds plus a final one, so an executed notebook or a log keeps a
readable record instead of carriage-return noise or a widget no one can render.

``COEVO_PROGRESS`` (``auto`` | ``widgets`` | ``text``) overrides the choice; coevo's own papermill
calls (coevo_lib.study.execute) set ``text``, since a kernel cannot tell whether a browser is watching.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.std import tqdm as text_tqdm

MODE_VARIABLE = "COEVO_PROGRESS"
MODES = ("auto", "widgets", "text")
TEXT_INTERVAL_S = 30.0


def progress_mode() -> str:
    """``widgets`` or ``text``: what ``progress_bar`` draws here (see the module doc)."""
    mode = os.environ.get(MODE_VARIABLE, "auto")
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "widgets" if in_jupyter_kernel() and has_ipywidgets() else "text"


def in_jupyter_kernel() -> bool:
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def has_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class TextLines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (a repeat is dropped:
    tqdm redraws the final state on close)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "it"):
    """A tqdm bar for ``total`` units (``update``, ``set_postfix`` and ``close`` as usual); it stays when done."""
    mode = progress_mode()
    if mode == "widgets":
        from tqdm.notebook import tqdm as widget_tqdm

        return widget_tqdm(total=total, desc=desc, initial=initial, unit=unit)
    if sys.stderr.isatty():
        return text_tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True)
    return text_tqdm(total=total, desc=desc, initial=initial, unit=unit, file=TextLines(sys.stderr),
                     mininterval=TEXT_INTERVAL_S, maxinterval=2 * TEXT_INTERVAL_S, ncols=80, ascii=True)


@contextmanager
def text_progress() -> Iterator[None]:
    """Kernels started inside this block draw text lines (they inherit the environment)."""
    previous = os.environ.get(MODE_VARIABLE)
    os.environ[MODE_VARIABLE] = "text"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MODE_VARIABLE, None)
        else:
            os.environ[MODE_VARIABLE] = previous
