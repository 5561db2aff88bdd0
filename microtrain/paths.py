"""Where microtrain finds the read-only shared material (checkpoints, data) and its own weights.

The shared folder is never part of the project: it is found through ``MICROTRAIN_SHARED``,
defaulting to ``../shared`` beside the repository.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(os.environ.get("MICROTRAIN_WEIGHTS", REPO_ROOT / "weights"))


class MissingSharedError(FileNotFoundError):
    """A file expected in the shared folder is absent."""


def shared_dir() -> Path:
    return Path(os.environ.get("MICROTRAIN_SHARED", REPO_ROOT.parent / "shared"))


def shared_file(*parts: str) -> Path:
    """Path of a file in the shared folder; raises a one-line error naming what is missing."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        raise MissingSharedError(
            f"{path} not found: set MICROTRAIN_SHARED to the folder holding checkpoints/ and data/"
        )
    return path
