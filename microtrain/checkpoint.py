"""Backbone checkpoints read without torch and converted to microtrain's own weight file.

The public entry points of checkpoint conversion (``tools/convert_ckpt.py``, ``ensure_converted``
on first use of a shared backbone). Each concern has its module:

- ``torch_archive.py``: reading an untrusted ``torch.save`` zip archive safely (a restricted
  unpickler that rebuilds only the globals checkpoints use);
- ``layouts.py``: the tiny-training int8 dicts and the model zoo / tiny-training float state_dicts
  mapped to our layer names, BatchNorm folded;
- ``weight_format.py``: our ``.npz`` weight file (``save_weights`` / ``load_weights``, re-exported
  here for the converter's callers).

The state_dict may come as users save it: bare, or inside a container dict (``{'state_dict': sd}``,
``{'model': sd, 'epoch': 5}``, ``{'net': sd, 'acc': ...}``, nested ``{'model': {'state_dict':
sd}}``; see ``find_state_dict``), with every key under one extra prefix (``module.`` from
DataParallel, ``model.`` from training frameworks, or both; see ``strip_key_prefix``). Where that
is ambiguous the error names what was found and the ``tools/convert_ckpt.py`` flag that picks one.

Every failure on bad input is a ``CheckpointError`` with a one-line message.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from .checks import CheckpointError
from .layouts import assemble, from_int8_dict, from_state_dict
from .paths import MissingSharedError, meta_weights_dir, shared_file
from .paths import weights_dir as _weights_dir
from .torch_archive import unpickle_archive
from .weight_format import FORMAT_VERSION, load_weights, save_weights, stored_stamp

__all__ = ["SHARED_CHECKPOINTS", "META_TRAINED", "CheckpointError", "backbone_file", "ensure_converted",
           "find_state_dict", "load_weights", "read_checkpoint", "read_net_config", "save_weights",
           "strip_key_prefix"]

SHARED_CHECKPOINTS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
# The project's own meta-trained versions (``python -m microtrain.metatrain``), committed in the
# repository's weights/ folder with their provenance (weights/README.md) and installed with the
# package (paths.meta_weights_dir).
META_TRAINED = tuple(f"{name}-meta" for name in SHARED_CHECKPOINTS)
META_DIR = meta_weights_dir()
BACKBONES = SHARED_CHECKPOINTS + META_TRAINED

# The top-level modules of the MCUNet / once-for-all family: where a state_dict key's own name
# starts, whatever prefix a training framework put in front of it.
_NETWORK_ROOTS = ("first_conv", "blocks", "feature_mix_layer", "classifier")
_SEARCH_DEPTH = 3  # container dicts searched for a state_dict: {'model': {'state_dict': sd}} is 2


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


def _is_state_dict(obj) -> bool:
    """A non-empty dict of arrays under string keys (what a rebuilt state_dict is)."""
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, np.ndarray) for v in obj.values()))


def _split_key(key: str) -> tuple[str | None, str]:
    """(prefix, name): the name starts at the first of the network's top-level modules
    (``first_conv``, ``blocks.<i>``, ``feature_mix_layer``, ``classifier``); prefix None when the
    key names none of them."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _NETWORK_ROOTS and (part != "blocks" or (i + 1 < len(parts) and parts[i + 1].isdigit())):
            return "".join(p + "." for p in parts[:i]), ".".join(parts[i:])
    return None, key


def _looks_like_network(sd: dict) -> bool:
    return any(_split_key(k)[0] is not None for k in sd)


def find_state_dict(obj, key: str | None = None) -> tuple[dict, str] | None:
    """The state_dict in what ``torch.save`` stored: ``(state_dict, where)``.

    ``obj`` itself when it is one (``where`` = ""); otherwise the dicts of arrays found under
    string keys of ``obj``, up to 3 levels deep (``where`` = their key path, e.g. ``model`` or
    ``model/state_dict``): the one found, or the one that names the network's modules when
    others do not (an optimizer's or EMA helper's buffers). ``key`` (a key path) picks one
    explicitly. None when there is none (the caller names the contents). Raises
    ``CheckpointError`` when ``key`` leads nowhere, or when several state_dicts qualify (e.g.
    ``state_dict`` and ``state_dict_ema``): the message lists them and the flag that picks one.
    """
    if key is not None:
        node, path = obj, []
        for part in key.split("/"):
            if not isinstance(node, dict) or part not in node:
                there = f"keys {sorted(map(str, node))[:8]}" if isinstance(node, dict) else type(node).__name__
                raise CheckpointError(f"--state-dict-key {key!r}: no {part!r} under "
                                      f"{'/'.join(path) or 'the top level'} ({there})")
            node = node[part]
            path.append(part)
        if not _is_state_dict(node):
            raise CheckpointError(f"--state-dict-key {key!r} leads to a {type(node).__name__}, "
                                  "not a dict of tensors")
        return node, key
    if _is_state_dict(obj):
        return obj, ""
    found: list[tuple[str, dict]] = []
    level = [("", obj)]
    for _ in range(_SEARCH_DEPTH):
        deeper = []
        for path, node in level:
            if not isinstance(node, dict):
                continue
            for k, v in node.items():
                if not isinstance(k, str):
                    continue  # an optimizer's per-parameter state is keyed by int
                where = f"{path}/{k}" if path else k
                if _is_state_dict(v):
                    found.append((where, v))
                else:
                    deeper.append((where, v))
        level = deeper
    if len(found) > 1:
        networks = [(w, sd) for w, sd in found if _looks_like_network(sd)]
        found = networks if networks else found
    if not found:
        return None
    if len(found) > 1:
        listed = ", ".join(f"{w!r} ({len(sd)} tensors)" for w, sd in found[:6])
        raise CheckpointError(f"the checkpoint holds {len(found)} state_dicts: {listed}; choose one with "
                              f"tools/convert_ckpt.py --state-dict-key {found[0][0]}")
    return found[0][1], found[0][0]


def strip_key_prefix(sd: dict, prefix: str | None = None) -> tuple[dict, str]:
    """``sd`` with the prefix every key carries before the network's own names removed:
    ``(state_dict, prefix removed)``.

    The prefix of a key is what comes before its first top-level module name (``first_conv``,
    ``blocks.<i>``, ``feature_mix_layer``, ``classifier``): ``module.`` (DataParallel),
    ``model.`` (Lightning and other trainers), ``module.model.``, ... Keys naming no such module
    count as having no prefix. When all keys share one prefix it is removed; keys with no
    network name at all are left for the layout check to name. ``prefix`` (e.g. ``'student.'``,
    ``''`` for keys without one) keeps only the keys with exactly that prefix. Raises
    ``CheckpointError`` when the keys carry several prefixes (two networks in one state_dict),
    or a prefix some keys lack, naming the prefixes with their key counts and the flag.
    """
    split = {k: _split_key(k) for k in sd}
    if prefix is not None:
        kept = {name: sd[k] for k, (p, name) in split.items()
                if p == prefix or (p is None and prefix and k.startswith(prefix))}
        if not kept:
            raise CheckpointError(f"--prefix {prefix!r}: no state_dict key has it "
                                  f"({_prefix_counts(split)})")
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in kept.items()}, prefix
    counts = Counter(p for p, _ in split.values() if p is not None)
    if len(counts) > 1:
        raise CheckpointError(f"the state_dict holds keys under {len(counts)} prefixes "
                              f"({_prefix_counts(split)}): more than one network; choose one with "
                              f"tools/convert_ckpt.py --prefix {counts.most_common(1)[0][0]!r}")
    if not counts or "" in counts:
        return sd, ""
    (common,) = counts
    outside = [k for k in sd if not k.startswith(common)]
    if outside:
        raise CheckpointError(f"{counts[common]} state_dict keys carry the prefix {common!r} but "
                              f"{len(outside)} do not ({', '.join(map(repr, outside[:3]))}); keep the "
                              f"network's keys with tools/convert_ckpt.py --prefix {common!r}")
    return {k[len(common):]: v for k, v in sd.items()}, common


def _prefix_counts(split: dict) -> str:
    counts = Counter("(none)" if p is None else repr(p) if p else "'' (no prefix)" for p, _ in split.values())
    return ", ".join(f"{p} {n} keys" for p, n in counts.most_common(6))


def read_checkpoint(path, config=None, bn_eps: float | None = None, state_dict_key: str | None = None,
                    prefix: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read an int8-dict or float state_dict checkpoint without torch.

    ``config``: the net-config JSON (a path or an already parsed dict); required for float
    state_dicts, whose strides it gives. ``bn_eps``: BatchNorm eps for folding; None means the
    config's ``bn.eps`` if it has one, else 1e-3. ``state_dict_key`` / ``prefix``: which
    state_dict of a container, and which key prefix, when the file holds several
    (``find_state_dict``, ``strip_key_prefix``; found on their own otherwise). Returns
    ``(arch, arrays)`` as in weights/README.md; raises ``CheckpointError`` (one line) on
    anything wrong.
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
        source = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
        if state_dict_key is None and prefix is None and isinstance(obj, dict) \
                and isinstance(obj.get("first_conv"), dict):
            source["kind"] = "int8-dict"
            parsed = from_int8_dict(obj)
        else:
            found = find_state_dict(obj, state_dict_key)
            if found is None:
                what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointError(f"unrecognised checkpoint contents ({what:.120}): expected an int8 dict "
                                      "or a state_dict of an MCUNet / once-for-all network")
            sd, _ = strip_key_prefix(found[0], prefix)
            source["kind"] = "torch-state-dict"
            parsed = from_state_dict(sd, config, bn_eps)
        return assemble(path.stem, *parsed, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        # a structure the explicit checks did not foresee (the pickle is attacker-shaped data)
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {exc})") from None



def ensure_converted(name: str, weights_dir=None, log=None) -> Path:
    """Path of the converted weight file of a shared backbone (``mcunet-5fps``, ``mbv2-w0.35``,
    ``proxyless-w0.3``) in the user cache (``paths.weights_dir()``), converting
    ``../shared/checkpoints/<name>.pkl`` on first use; ``log(line)`` hears when that happens.
    Raises ``paths.MissingSharedError`` when the shared checkpoint is not there."""
    stem = name[: -len(".pkl")] if name.endswith(".pkl") else name
    if stem not in SHARED_CHECKPOINTS:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(SHARED_CHECKPOINTS)}")
    out = Path(weights_dir if weights_dir is not None else _weights_dir()) / f"{stem}.npz"
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
    if log is not None:
        log(f"converting {source} into {out} (first use; a few seconds)")
    arch, arrays = read_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(out, arch, arrays)


def backbone_file(name: str, log=None) -> Path:
    """Path of a named backbone's weight file: a shared ImageNet backbone (``mcunet-5fps``, ...,
    converted on first use by ``ensure_converted``, which ``log(line)`` hears) or its meta-trained
    version (``mcunet-5fps-meta``, ..., in ``paths.meta_weights_dir()``: the repository's weights/
    folder, or the installed package's). Raises ``CheckpointError`` for an unknown name or a
    meta-trained file that is not there, and ``paths.MissingSharedError`` when a shared
    checkpoint is needed and absent."""
    if name in META_TRAINED:
        path = META_DIR / f"{name}.npz"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the meta-trained backbones ship with the source checkout "
                                  "(weights/) and in the installed package (pip install .); pass a weight "
                                  "file's path, or regenerate it (weights/README.md)")
        return path
    if name not in SHARED_CHECKPOINTS:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return ensure_converted(name, log=log)
