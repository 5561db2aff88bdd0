"""microtrain's own weight format: an uncompressed ``.npz`` of float32 arrays named by layer, the
architecture as JSON and a format version (``weights/README.md``).

It loads with ``allow_pickle=False``; every array and the architecture are validated on load and
before a save (``CheckpointError``, one line); a save is atomic (temp file, then rename).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .architecture import embedding_channels, weight_shapes
from .checks import CheckpointError, check_keys, expect_shape, odd_kernel, pos_int, raise_keys
from .paths import write_atomic

FORMAT_VERSION = 1

_ARCH_KEYS = ("name", "resolution", "in_channels", "first_conv", "blocks", "feature_mix", "source")
_BLOCK_KEYS = ("expand", "kernel", "stride", "out", "residual")
_SOURCE_KINDS = ("int8-dict", "torch-state-dict")


def validate_arch(arch) -> None:
    """Raise ``CheckpointError`` unless ``arch`` is a well-formed architecture dict."""
    check_keys(arch, _ARCH_KEYS, ("lite_residual", "meta_training"), "arch")
    if not isinstance(arch["name"], str) or not arch["name"]:
        raise CheckpointError("'arch.name' must be a non-empty string")
    pos_int(arch["resolution"], "arch.resolution")
    pos_int(arch["in_channels"], "arch.in_channels")
    fc = arch["first_conv"]
    check_keys(fc, ("out", "kernel", "stride"), (), "arch.first_conv")
    c = pos_int(fc["out"], "arch.first_conv.out")
    odd_kernel(fc["kernel"], "arch.first_conv.kernel")
    pos_int(fc["stride"], "arch.first_conv.stride")
    if not isinstance(arch["blocks"], list) or not arch["blocks"]:
        raise CheckpointError("'arch.blocks' must be a non-empty list")
    for i, b in enumerate(arch["blocks"]):
        where = f"arch.blocks.{i}"
        check_keys(b, _BLOCK_KEYS, (), where)
        if b["expand"] is not None:
            pos_int(b["expand"], f"{where}.expand")
        odd_kernel(b["kernel"], f"{where}.kernel")
        stride = pos_int(b["stride"], f"{where}.stride")
        out = pos_int(b["out"], f"{where}.out")
        if not isinstance(b["residual"], bool):
            raise CheckpointError(f"'{where}.residual' must be true or false")
        if b["residual"] and (stride != 1 or out != c):
            raise CheckpointError(f"{where}: a residual block needs stride 1 and in == out channels "
                                  f"(stride {stride}, {c} -> {out})")
        c = out
    if arch["feature_mix"] is not None:
        check_keys(arch["feature_mix"], ("out",), (), "arch.feature_mix")
        pos_int(arch["feature_mix"]["out"], "arch.feature_mix.out")
    src = arch["source"]
    check_keys(src, ("file", "sha256", "kind"), (), "arch.source")
    if not isinstance(src["file"], str) or not isinstance(src["sha256"], str) or src["kind"] not in _SOURCE_KINDS:
        raise CheckpointError(f"'arch.source' must name a file, its sha256 and a kind in {_SOURCE_KINDS}")
    if not isinstance(arch.get("meta_training", {}), dict):  # provenance of a meta-trained backbone
        raise CheckpointError("'arch.meta_training' must be an object")
    lite = arch.get("lite_residual")
    if lite is not None:  # TinyTL's branches, saved with a network adapted by that method
        check_keys(lite, ("downsample", "expand", "groups", "max_kernel"), (), "arch.lite_residual")
        for key in ("downsample", "groups"):
            pos_int(lite[key], f"arch.lite_residual.{key}")
        odd_kernel(lite["max_kernel"], "arch.lite_residual.max_kernel")
        if type(lite["expand"]) not in (int, float) or not 0 < lite["expand"] <= 16:
            raise CheckpointError("'arch.lite_residual.expand' must be a number in (0, 16]")



def check_arrays(arch: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ``CheckpointError`` unless ``arrays`` holds exactly the finite float32 arrays
    ``arch`` implies (plus, optionally, ``classifier.weight (classes, C)`` and ``.bias``)."""
    validate_arch(arch)
    shapes = weight_shapes(arch)
    optional = ("classifier.weight", "classifier.bias")
    raise_keys([k for k in shapes if k not in arrays],
                [k for k in arrays if k not in shapes and k not in optional])
    if ("classifier.weight" in arrays) != ("classifier.bias" in arrays):
        raise CheckpointError("'classifier.weight' and 'classifier.bias' come as a pair")
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise CheckpointError(f"'{name}' must be a float32 array, got {getattr(arr, 'dtype', type(arr).__name__)}")
    if "classifier.weight" in arrays:
        classes = arrays["classifier.weight"].shape[0] if arrays["classifier.weight"].ndim else 0
        shapes = {**shapes, "classifier.weight": (classes, embedding_channels(arch)),
                  "classifier.bias": (classes,)}
    for name, shape in shapes.items():
        arr = arrays[name]
        expect_shape(arr, shape, name)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"'{name}' holds non-finite values")



def write_npz(path, payload: Mapping[str, np.ndarray]) -> Path:
    """Write an uncompressed ``.npz`` of plain arrays atomically (``paths.write_atomic``: a
    temporary file in the same folder, synced, then renamed, with umask permissions): the path
    holds either its previous content or the complete new file. Shared by the weight and
    classifier files."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
    return write_atomic(path, write)


def read_npz(path, error=CheckpointError, kind: str = "microtrain weight file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` read with ``allow_pickle=False`` (an object array is refused);
    ``error`` (a one-line exception type) when the file cannot be read or is not an npz."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        # np.load takes anything else for a pickle and advises allow_pickle: never for untrusted files
        if not magic.startswith(b"PK") and not magic.startswith(b"\x93NUMPY"):
            raise error(f"{path}: not a {kind} (not an .npz archive)")
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise error(f"{path}: a single .npy array, not a {kind} (.npz)")
        with npz:
            return {name: npz[name] for name in npz.files}
    except error:
        raise
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise error(f"{path}: not a {kind} ({exc})") from None


def save_weights(path, arch: Mapping, arrays: Mapping[str, np.ndarray]) -> Path:
    """Validate and write the weight file atomically (``write_npz``)."""
    arch = dict(arch)
    check_arrays(arch, arrays)
    payload = {name: arrays[name] for name in arrays}
    payload["__arch__"] = np.array(json.dumps(arch))
    payload["__format_version__"] = np.array(FORMAT_VERSION)
    return write_npz(path, payload)


def load_weights(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(arch, arrays)`` from a weight file written by ``save_weights``, fully validated."""
    path = Path(path)
    contents = read_npz(path)
    try:
        version = contents.pop("__format_version__", None)
        if version is None or version.ndim != 0 or version.dtype.kind not in "iu":
            raise CheckpointError("no __format_version__: not a microtrain weight file")
        if int(version) != FORMAT_VERSION:
            raise CheckpointError(f"weight format version {int(version)}, this microtrain reads {FORMAT_VERSION}; "
                                  "re-convert with tools/convert_ckpt.py")
        text = contents.pop("__arch__", None)
        if text is None or text.ndim != 0 or text.dtype.kind != "U":
            raise CheckpointError("no __arch__ string")
        try:
            arch = json.loads(str(text))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"__arch__ is not valid JSON ({exc})") from None
        check_arrays(arch, contents)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return arch, contents


def stored_stamp(path: Path):
    """(format version, source sha256) of a converted file, or None when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return int(npz["__format_version__"]), json.loads(str(npz["__arch__"]))["source"]["sha256"]
    except Exception:  # noqa: BLE001 - any unreadable file just means "convert again"
        return None

