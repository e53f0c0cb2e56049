"""The post-save hook keeps `git status` clean when only outputs changed, and never stages real edits."""

from __future__ import annotations

import shutil
import subprocess
import sys

import nbformat
import pytest

from coevo_lib.jupyter_hooks import refresh_git_index

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def repo(tmp_path):
    """A checkout with the nbstripout filter as `make git-filter` installs it, and one committed notebook."""
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "test@example.com")
    git(tmp_path, "config", "user.name", "test")
    git(tmp_path, "config", "filter.nbstripout.clean", f'"{sys.executable}" -m nbstripout')
    git(tmp_path, "config", "filter.nbstripout.smudge", "cat")
    git(tmp_path, "config", "filter.nbstripout.extrakeys", "metadata.language_info")
    (tmp_path / ".gitattributes").write_text("*.ipynb filter=nbstripout\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nbformat.write(notebook, tmp_path / "a.ipynb")
    git(tmp_path, "add", ".gitattributes", "a.ipynb")
    git(tmp_path, "commit", "-q", "-m", "clean notebook")
    return tmp_path


def save_with_outputs(path, source=None):
    notebook = nbformat.read(path, as_version=4)
    cell = notebook.cells[0]
    cell.outputs, cell.execution_count = [nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                                 execution_count=1)], 1
    cell.source = source or cell.source
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nbformat.write(notebook, path)


def test_outputs_only_leave_status_clean(repo):
    save_with_outputs(repo / "a.ipynb")
    assert git(repo, "status", "--porcelain") == " M a.ipynb\n"  # git's size shortcut, without the hook
    refresh_git_index({"type": "notebook"}, str(repo / "a.ipynb"))
    assert git(repo, "status", "--porcelain") == ""
    assert "outputs" in (repo / "a.ipynb").read_text() and '"2"' in (repo / "a.ipynb").read_text()


def test_a_real_edit_stays_modified_and_unstaged(repo):
    save_with_outputs(repo / "a.ipynb", source="1 + 2")
    refresh_git_index({"type": "notebook"}, str(repo / "a.ipynb"))
    assert git(repo, "status", "--porcelain") == " M a.ipynb\n"
    assert git(repo, "diff", "--cached") == ""


def test_files_outside_a_checkout_are_ignored(tmp_path):
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "b.ipynb")
    refresh_git_index({"type": "notebook"}, str(tmp_path / "b.ipynb"))  # no error, nothing to do
