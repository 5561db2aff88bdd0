"""Backbone checkpoints read without torch and converted to microtrain's own weight file.

The public entry points of checkpoint conversion (``tools/convert_ckpt.py``, ``ensure_converted``
on first use of a shared backbone). Each concern has its module:

- ``torch_archive.py``: reading an untrusted ``torch.save`` zip archive safely (a restricted
  unpickler that rebuilds only the globals checkpoints use);
- ``layouts.py``: the tiny-training int8 dicts and the model zoo / tiny-training float state_dicts
  mapped to our layer names, BatchNorm folded;
- ``weight_format.py``: our ``.npz`` weight file (``save_weights`` / ``load_weights``, re-exported
  here for the converter's callers).

Every failure on bad input is a ``CheckpointError`` with a one-line message.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .checks import CheckpointError
from .layouts import assemble, from_int8_dict, from_state_dict
from .paths import WEIGHTS_DIR, MissingSharedError, shared_file
from .torch_archive import unpickle_archive
from .weight_format import FORMAT_VERSION, load_weights, save_weights, stored_stamp

__all__ = ["SHARED_CHECKPOINTS", "CheckpointError", "ensure_converted", "load_weights", "read_checkpoint",
           "read_net_config", "save_weights"]

SHARED_CHECKPOINTS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")


def read_net_config(path) -> dict:
    """A net-config JSON file as a dict (``CheckpointError`` if unreadable or not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config {path}: the net-config JSON must be an object")
    return config


def read_checkpoint(path, config=None, bn_eps: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read an int8-dict or float state_dict checkpoint without torch.

    ``config``: the net-config JSON (a path or an already parsed dict); required for float
    state_dicts, whose strides it gives. ``bn_eps``: BatchNorm eps for folding; None means the
    config's ``bn.eps`` if it has one, else 1e-3. Returns ``(arch, arrays)`` as in
    weights/README.md; raises ``CheckpointError`` (one line) on anything wrong.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if config is not None and not isinstance(config, dict):
        config = read_net_config(config)
    try:
        obj = unpickle_archive(data)
        if isinstance(obj, dict) and "state_dict" in obj:
            kind, sd = "torch-state-dict", obj["state_dict"]
            if not isinstance(sd, dict):
                raise CheckpointError(f"'state_dict' is {type(sd).__name__}, not a dict")
            parsed = from_state_dict(sd, config, bn_eps)
        elif isinstance(obj, dict) and isinstance(obj.get("first_conv"), dict):
            kind = "int8-dict"
            parsed = from_int8_dict(obj)
        elif isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            kind = "torch-state-dict"
            parsed = from_state_dict(obj, config, bn_eps)
        else:
            what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"unrecognised checkpoint contents ({what:.120}): expected an int8 dict "
                                  "or a state_dict of an MCUNet / once-for-all network")
        source = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "kind": kind}
        return assemble(path.stem, *parsed, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        # a structure the explicit checks did not foresee (the pickle is attacker-shaped data)
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {exc})") from None



def ensure_converted(name: str, weights_dir=None) -> Path:
    """Path of the converted weight file of a shared backbone (``mcunet-5fps``, ``mbv2-w0.35``,
    ``proxyless-w0.3``), converting ``../shared/checkpoints/<name>.pkl`` on first use.
    Raises ``paths.MissingSharedError`` when the shared checkpoint is not there."""
    stem = name[: -len(".pkl")] if name.endswith(".pkl") else name
    if stem not in SHARED_CHECKPOINTS:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(SHARED_CHECKPOINTS)}")
    out = Path(weights_dir if weights_dir is not None else WEIGHTS_DIR) / f"{stem}.npz"
    stamp = stored_stamp(out) if out.exists() else None
    try:
        source = shared_file("checkpoints", f"{stem}.pkl")
    except MissingSharedError:
        if stamp is not None and stamp[0] == FORMAT_VERSION:
            return out  # converted earlier; the shared folder is not needed any more
        raise
    # Reconvert when the format changed or the shared checkpoint is not the one converted.
    if stamp == (FORMAT_VERSION, hashlib.sha256(source.read_bytes()).hexdigest()):
        return out
    arch, arrays = read_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(out, arch, arrays)
