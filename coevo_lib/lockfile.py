"""The lock an environment was installed from (locks/*.txt), and how the installed packages compare with it.

`make setup` installs a hash-checked lock with ``pip install --no-deps`` and copies it into the virtual
environment as ``coevo-lock.txt``; every run's env.json records that copy's sha256, and ``python -m
coevo_lib.lockfile check`` (run by `make setup`, and by tests/test_lockfile.py) says where the installed
packages differ from it. pyproject.toml keeps version ranges for installing coevo as a library; `make lock`
resolves them into the locks.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import Any

INSTALLED_LOCK = "coevo-lock.txt"  # the copy of the lock `make setup` installed, in the venv's prefix
PROJECT = "coevo"  # installed editable from the checkout, never from the lock
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (PyYAML, pyyaml and py_yaml are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version for each ``name==version`` line (hash and comment lines are skipped)."""
    pins = (PIN.match(line) for line in Path(path).read_text().splitlines())
    return {normalized(m.group(1)): m.group(2) for m in pins if m}


def entries(path: Path) -> dict[str, str]:
    """name -> the lock's text for it: the pin line and its continuation lines (hashes), joined by newlines."""
    found: dict[str, str] = {}
    name, continued = None, False
    for line in Path(path).read_text().splitlines():
        pin = PIN.match(line)
        if pin:
            name = normalized(pin.group(1))
            found[name] = line
        elif continued and name:
            found[name] += "\n" + line
        continued = line.rstrip().endswith("\\")
    return found


def installed_versions() -> dict[str, str]:
    """name -> version of each distribution in this interpreter's site-packages (not the checkout's egg-info)."""
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return {normalized(d.metadata["Name"]): d.version for d in metadata.distributions(path=sorted(set(site)))}


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the locked one, missing, or not in the lock."""
    lines = []
    for name in sorted((set(locked) | set(installed)) - {PROJECT}):
        want, have = locked.get(name), installed.get(name)
        if want is None:
            lines.append(f"{name}: {have} installed, not in the lock")
        elif have is None:
            lines.append(f"{name}: locked at {want}, not installed")
        elif want != have:
            lines.append(f"{name}: locked at {want}, {have} installed")
    return lines


def installed_lock() -> Path | None:
    """The lock `make setup` installed this environment from, or None (coevo installed some other way)."""
    path = Path(sys.prefix) / INSTALLED_LOCK
    return path if path.is_file() else None


def lock_record() -> dict[str, Any] | None:
    """What env.json says about the lock: its sha256 and where the environment differs from it."""
    path = installed_lock()
    if path is None:
        return None
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "differences": differences(read_lock(path), installed_versions())}


def selected_entries(lock: Path, names: set[str], keep: bool) -> str:
    """A requirements file of the lock's entries named (keep) or not named (not keep); unknown names are errors."""
    found = entries(lock)
    unknown = sorted(names - set(found))
    if unknown:
        raise SystemExit(f"{lock} pins no {unknown}")
    return "\n".join(text for name, text in found.items() if (name in names) == keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coevo_lib.lockfile", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "unlocked", "only", "without"],
                        help="check: list differences, exit 1 if any; unlocked: names installed but not locked; "
                             "only/without: the lock's entries (with hashes) for / except the names given")
    parser.add_argument("lock", nargs="?", type=Path, help=f"lock file (default: the venv's {INSTALLED_LOCK})")
    parser.add_argument("names", nargs="*", help="package names (only, without)")
    args = parser.parse_args(argv)
    lock = args.lock or installed_lock()
    if lock is None:
        parser.error(f"no lock given and {Path(sys.prefix) / INSTALLED_LOCK} does not exist (run make setup)")
    if args.command in ("only", "without"):
        print(selected_entries(lock, {normalized(n) for n in args.names}, keep=args.command == "only"))
        return 0
    locked, installed = read_lock(lock), installed_versions()
    if args.command == "unlocked":
        print("\n".join(sorted(set(installed) - set(locked) - {PROJECT})))
        return 0
    found = differences(locked, installed)
    print("\n".join(found) if found else f"installed packages equal {lock} ({len(locked)} pins)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
