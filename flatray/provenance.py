"""What made a result: flatray's version and git commit, and the versions of the libraries that shape results.

Every trial records it in its trial.json and summary.json. A re-run of a sweep keeps finished trials, but lists
those made by another version (results trained before a fix, e.g. with dropout off, have none recorded), and
`--rerun-other-versions` runs them again.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# What changes numbers: the code, the model and data libraries, the numerics. Ray, W&B and the rest do not.
LIBRARIES = ("torch", "transformers", "deepspeed", "datasets", "tokenizers", "safetensors", "numpy")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit, "+dirty" when tracked files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


@functools.cache
def provenance() -> dict:
    return {"flatray": _version("flatray"), "git": _git_commit(), "python": platform.python_version(),
            "libraries": {name: _version(name) for name in LIBRARIES}}


def differences(recorded: dict | None, current: dict) -> list[str]:
    """How a recorded provenance differs from `current` ("git 1a2b3c4 -> 5d6e7f8", "torch 2.12.0 -> 2.13.0");
    [] when it is the same version."""
    if not recorded:
        return ["no version recorded (made before flatray recorded versions)"]
    found = []
    for key in ("flatray", "git"):
        if recorded.get(key) != current.get(key):
            found.append(f"{key} {_short(recorded.get(key))} -> {_short(current.get(key))}")
    old, new = recorded.get("libraries") or {}, current.get("libraries") or {}
    found += [f"{name} {old.get(name)} -> {new.get(name)}" for name in LIBRARIES if old.get(name) != new.get(name)]
    return found


def _short(value) -> str:
    text = str(value)
    return text[:12] + ("+dirty" if text.endswith("+dirty") else "") if len(text) >= 40 else text
