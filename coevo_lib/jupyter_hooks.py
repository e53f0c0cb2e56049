"""A Jupyter server hook `make setup` installs for .venv's JupyterLab
(.venv/etc/jupyter/jupyter_server_config.json).

Saving a notebook in JupyterLab writes outputs to the working copy; the nbstripout git filter
(`make git-filter`) turns that file into exactly the committed blob, so nothing would be committed.
`git status` still lists it as modified: git takes a changed file size as changed content without
running the filter, and even `git update-index --refresh` keeps that verdict. Re-staging the file
when its filtered content equals the staged blob records the new size and changes nothing else;
a notebook whose cells really changed is left alone (modified, unstaged).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

HOOK = "coevo_lib.jupyter_hooks.refresh_git_index"


def git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=False)


def refresh_git_index(model: dict[str, Any], os_path: str, contents_manager: Any = None, **_: Any) -> None:
    """After a save: re-stage the notebook if, through the git filter, it equals what is staged."""
    if model.get("type") != "notebook" or shutil.which("git") is None:
        return
    top = git(Path(os_path).parent, "rev-parse", "--show-toplevel")
    if top.returncode != 0:  # not in a git checkout
        return
    root = Path(top.stdout.strip())
    path = str(Path(os_path).resolve().relative_to(root.resolve()))
    staged = git(root, "rev-parse", "--verify", "-q", f":{path}")
    saved = git(root, "hash-object", f"--path={path}", path)  # the blob `git add` would store
    if staged.returncode == 0 and saved.returncode == 0 and staged.stdout.strip() == saved.stdout.strip():
        git(root, "update-index", "--", path)
