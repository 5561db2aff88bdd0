"""Where microtrain finds the read-only shared material and keeps its own files, and how it writes them.

- The **shared folder** (checkpoints/, data/) is never part of the project: ``MICROTRAIN_SHARED``,
  or, when running from a checkout, ``../shared`` beside it. An installed copy (``pip install .``)
  has no "beside": it needs ``MICROTRAIN_SHARED``.
- The **user cache** (``MICROTRAIN_HOME``) holds what microtrain makes for itself: converted
  backbone weights (``weights/``) and, for an installed copy, Numba's compiled kernels
  (``numba/``). Default: the platform's cache folder, as torch.hub does (``$XDG_CACHE_HOME`` or
  ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) plus
  ``microtrain``. Nothing is written into the package folder, so uninstalling leaves nothing.
- The project's **meta-trained backbones** are read-only release files: ``weights/`` of a
  checkout, or the installed package's ``weights/`` (``meta_weights_dir``).
"""
from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Callable

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


class MissingSharedError(FileNotFoundError):
    """A file expected in the shared folder is absent."""


def checkout_root() -> Path | None:
    """The repository root when this package runs from a checkout (``pyproject.toml`` beside the
    package folder), None for an installed copy in site-packages."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None


def shared_dir() -> Path | None:
    """``MICROTRAIN_SHARED``, else ``../shared`` beside a checkout; None when neither applies."""
    if os.environ.get("MICROTRAIN_SHARED"):
        return Path(os.environ["MICROTRAIN_SHARED"])
    root = checkout_root()
    return None if root is None else root.parent / "shared"


def shared_file(*parts: str) -> Path:
    """Path of a file in the shared folder; raises a one-line ``MissingSharedError`` naming what
    is missing, where the folder was looked for (``MICROTRAIN_SHARED`` or beside the checkout)
    and how to point microtrain at it."""
    base = shared_dir()
    if base is None:
        raise MissingSharedError(f"{'/'.join(parts)}: no shared folder known to this installed microtrain; "
                                 "set MICROTRAIN_SHARED to the folder holding checkpoints/ and data/")
    path = base.joinpath(*parts)
    if not path.exists():
        if os.environ.get("MICROTRAIN_SHARED"):
            raise MissingSharedError(f"{path} not found (MICROTRAIN_SHARED={base}): set MICROTRAIN_SHARED to "
                                     "the folder holding checkpoints/ and data/")
        raise MissingSharedError(f"{path} not found (the shared folder is looked for beside this checkout): "
                                 "set MICROTRAIN_SHARED to the folder holding checkpoints/ and data/")
    return path


def platform_cache_dir() -> Path:
    """The per-user cache folder of this platform (not created here); the temporary folder for a
    user without a home (a service account with no passwd entry)."""
    try:
        home = Path.home()
    except (RuntimeError, KeyError):
        home = Path(tempfile.gettempdir())
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    if sys.platform == "darwin":
        return home / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")


def home_dir() -> Path:
    """microtrain's user cache: ``MICROTRAIN_HOME``, default ``<platform cache>/microtrain``."""
    if os.environ.get("MICROTRAIN_HOME"):
        return Path(os.environ["MICROTRAIN_HOME"])
    return platform_cache_dir() / "microtrain"


def weights_dir() -> Path:
    """Where converted backbone weights live: ``MICROTRAIN_WEIGHTS`` if set, else
    ``<MICROTRAIN_HOME>/weights``."""
    if os.environ.get("MICROTRAIN_WEIGHTS"):
        return Path(os.environ["MICROTRAIN_WEIGHTS"])
    return home_dir() / "weights"


def meta_weights_dir() -> Path:
    """Where the project's meta-trained backbones (``mcunet-5fps-meta.npz``, ...) are: the
    repository's ``weights/`` in a checkout, the package's ``weights/`` folder in an installed
    copy (pyproject.toml installs ``weights/*-meta.npz`` there as package data). Read-only: they
    are part of the release, unlike the converted backbones of ``weights_dir``."""
    root = checkout_root()
    return PACKAGE_DIR / "weights" if root is None else root / "weights"


WEIGHTS_DIR = weights_dir()  # as resolved at import; call weights_dir() to follow later changes


def numba_cache_dir() -> Path | None:
    """Where an installed copy keeps Numba's compiled kernels (``<MICROTRAIN_HOME>/numba``); None in
    a checkout, whose kernels cache into its own ``__pycache__`` folders as Numba does by default."""
    return None if checkout_root() is not None else home_dir() / "numba"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename: the path holds either its
    previous content or the complete new file, never a partial one. The temporary file sits in
    the same folder (so the rename is atomic) and is created with an exclusive open, so the
    result gets the usual umask permissions (``tempfile.mkstemp`` would give 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb"):
            pass
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
