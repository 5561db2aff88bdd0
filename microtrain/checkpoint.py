"""Backbone checkpoints read without torch, and microtrain's own weight file.

Two input formats, both ``torch.save`` zip archives, are read by ``RestrictedUnpickler``, which
rebuilds only the handful of globals they use (by functions of this module, never by importing
torch or calling NumPy's unpickling helpers) and refuses every other global before anything runs:

- ``int8-dict``: tiny-training's MCU models (../shared/checkpoints/README.md): dicts and NumPy
  arrays, no tensor storage. Dequantised in float64, then cast to float32:
  ``W = W_q * w_scale``, ``b = b_q * w_scale * x_scale``.
- ``torch-state-dict``: float checkpoints of the MCUNet / once-for-all family, a state_dict or
  ``{'state_dict': ...}``, conv (bias=False) + BatchNorm per layer, keys
  ``blocks.{i}.mobile_inverted_conv.*`` (model zoo) or ``blocks.{i}.conv.*`` (tiny-training).
  BatchNorm is folded into the conv. Strides and shortcuts are not in a state_dict: they come
  from the network's net-config JSON (``config``); see weights/README.md for what is read.

Both become ``(arch, arrays)``: the architecture dict and float32 arrays named as in
weights/README.md, saved by ``save_weights`` as an uncompressed ``.npz`` that loads with
``allow_pickle=False``. Every failure on bad input is a ``CheckpointError`` with a one-line message.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import secrets
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from microtrain.paths import WEIGHTS_DIR, MissingSharedError, shared_file

FORMAT_VERSION = 1
DEFAULT_BN_EPS = 1e-3  # the MCUNet / once-for-all zoo's BatchNorm eps when the config names none
DEFAULT_RESOLUTION = 128  # the project's input size, used when a checkpoint does not say
SHARED_CHECKPOINTS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
ACTIVATION = "relu6"  # the model's fixed activation; a config asking for another is refused

_MAX_MEMBER_BYTES = 1 << 30  # refuse zip members that would inflate past 1 GiB
_MAX_NESTING = 32
# torch's legacy (pre-1.6) format starts with a pickled magic number (LONG1, 10 bytes)
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be used. The message is always one line."""

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------

class _Global:
    """What an allowlisted global becomes inside a pickle: a fresh stand-in that is not the real
    object (so BUILD opcodes cannot tamper with module state) and cannot be modified itself."""

    __slots__ = ("name", "call", "dtype")

    def __init__(self, name: str, call=None, dtype: str | None = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "call", call)
        object.__setattr__(self, "dtype", dtype)  # storage element type, for torch.*Storage

    def __setattr__(self, key, value):
        raise CheckpointError(f"pickle tries to modify {self.name}")

    def __call__(self, *args):
        if self.call is None:
            raise CheckpointError(f"pickle calls {self.name}, which is not callable here")
        return self.call(*args)

    def __repr__(self):
        return f"<{self.name}>"


_PLAIN_DTYPES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8".split())


class _DtypeSpec:
    """``numpy.dtype`` as a pickle rebuilds it, limited to plain numeric types (no objects,
    no fields, no sub-arrays)."""

    def __init__(self, code, align=False, copy=True):
        if code not in _PLAIN_DTYPES:
            raise CheckpointError(f"pickle asks for numpy dtype {code!r}; only plain numeric dtypes are accepted")
        self.code = code
        self.order = "="

    def __setstate__(self, state):
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise CheckpointError(f"unsupported numpy dtype state {state!r:.80}")
        self.order = state[1] if state[1] in ("<", ">") else "="

    def dtype(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order)


class _ArraySpec:
    """``numpy.ndarray`` as a pickle rebuilds it: ``_reconstruct`` makes it empty, BUILD gives
    shape, dtype and raw bytes. ``_materialize`` swaps it for the real array afterwards."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise CheckpointError(f"unsupported numpy array state {state!r:.80}")
        shape, spec, fortran, raw = state[-4:]
        if not isinstance(spec, _DtypeSpec) or not isinstance(raw, (bytes, bytearray)):
            raise CheckpointError("numpy array in the pickle without a plain dtype and raw bytes")
        shape = _int_tuple(shape, "numpy array shape")
        dtype = spec.dtype()
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"numpy array of shape {shape} {dtype} has {len(raw)} bytes of data")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(subtype, shape, code):
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by BUILD
    if not (isinstance(subtype, _Global) and subtype.name == "numpy.ndarray"
            and shape == (0,) and code == b"b"):
        raise CheckpointError("numpy _reconstruct called with unexpected arguments")
    return _ArraySpec()


def _latin1(text, encoding="latin1"):
    # protocol-2 pickles carry bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("_codecs.encode called with unexpected arguments")
    return text.encode("latin1")


class _Storage:
    """One torch storage record (``archive/data/<key>``) as a flat read-only NumPy array."""

    __slots__ = ("array", "kind")

    def __init__(self, array: np.ndarray, kind: str):
        self.array = array
        self.kind = kind


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor rebuilt from something that is not a storage record")
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
        raise CheckpointError(f"tensor with size {size}, stride {stride}, offset {offset!r}")
    if hooks:
        raise CheckpointError("tensor with backward hooks")
    flat = storage.array
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointError(f"tensor of size {size} at offset {offset} runs past its storage of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False)
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not isinstance(data, np.ndarray) or hooks:
        raise CheckpointError("parameter rebuilt from something that is not a tensor")
    return data


# element type of each torch storage class ('bf16' is widened to float32 on reading)
_TORCH_STORAGES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}

# (module, name) -> what the pickle gets. Nothing else is ever rebuilt.
_ALLOWED: dict[tuple[str, str], tuple[Any, str | None]] = {
    ("numpy.core.multiarray", "_reconstruct"): (_reconstruct, None),
    ("numpy._core.multiarray", "_reconstruct"): (_reconstruct, None),  # numpy >= 2 spelling
    ("numpy", "ndarray"): (None, None),
    ("numpy", "dtype"): (_DtypeSpec, None),
    ("_codecs", "encode"): (_latin1, None),
    ("collections", "OrderedDict"): (OrderedDict, None),
    ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor_v2, None),
    ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, None),
    **{("torch", name): (None, kind) for name, kind in _TORCH_STORAGES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the two checkpoint formats and nothing else.

    ``find_class`` answers only the globals in ``_ALLOWED`` (each with a fresh stand-in, see
    ``_Global``) and raises ``CheckpointError`` naming any other global before it can run.
    ``read_record(key)`` returns the bytes of ``<archive>/data/<key>`` for torch tensor storages;
    without it, a pickle that refers to storage is refused.
    """

    def __init__(self, data: bytes, read_record=None, byteorder: str = "little"):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._order = "<" if byteorder == "little" else ">"
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        entry = _ALLOWED.get((module, name))
        if entry is None:
            raise CheckpointError(
                f"pickle references the global '{module}.{name}', which a checkpoint never needs; "
                "refusing to load it (a pickle can run arbitrary code)")
        call, dtype = entry
        return _Global(f"{module}.{name}", call, dtype)

    def persistent_load(self, pid):
        # torch's zip format: ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not (isinstance(stype, _Global) and stype.dtype is not None):
            raise CheckpointError(f"storage of unsupported type {stype!r:.60}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"malformed storage reference {pid!r:.80}")
        if self._read_record is None:
            raise CheckpointError("pickle refers to tensor storage but there is none")
        cached = self._storages.get(key)
        if cached is not None:
            if cached.kind != stype.dtype:
                raise CheckpointError(f"storage data/{key} used with two element types")
            return cached
        raw = self._read_record(key)
        kind = stype.dtype
        dtype = np.dtype("u2" if kind == "bf16" else kind).newbyteorder(self._order)
        if len(raw) != numel * dtype.itemsize:
            raise CheckpointError(
                f"storage data/{key} holds {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
        flat = np.frombuffer(raw, dtype)
        if kind == "bf16":  # bfloat16 is the upper half of a float32
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        self._storages[key] = _Storage(flat, kind)
        return self._storages[key]


def _materialize(obj, depth: int = 0, done: dict | None = None):
    """Swap every ``_ArraySpec`` in nested dicts/lists/tuples for its array. Each shared
    container is converted once (``done``, by id): a pickle of 100 bytes can describe a DAG
    with 2^30 paths."""
    if depth > _MAX_NESTING:
        raise CheckpointError(f"pickle nests containers deeper than {_MAX_NESTING} levels")
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise CheckpointError("numpy array in the pickle without data")
        return obj.array
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    done = {} if done is None else done
    if id(obj) not in done:
        if isinstance(obj, dict):
            out = {k: _materialize(v, depth + 1, done) for k, v in obj.items()}
        else:
            out = type(obj)(_materialize(v, depth + 1, done) for v in obj)
        done[id(obj)] = (obj, out)  # keeps obj alive so its id stays unique
    return done[id(obj)][1]


def _unpickle_archive(data: bytes):
    """The object in a ``torch.save`` zip archive, unpickled by ``RestrictedUnpickler``."""
    if not data.startswith(b"PK"):
        if data[:1] == b"\x80" and data[2:14] == _LEGACY_TORCH_MAGIC:
            raise CheckpointError(
                "legacy (non-zip) torch.save format, which is not supported; re-save it with "
                "torch >= 1.6 defaults (torch.save(obj, path), no _use_new_zipfile_serialization=False)")
        raise CheckpointError("not a zip archive (expected a torch.save checkpoint)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = {info.filename: info for info in zf.infolist()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"truncated or corrupt zip archive ({exc})") from None
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError("zip archive without exactly one <folder>/data.pkl; not a torch.save checkpoint")
    prefix = pickles[0][: -len("data.pkl")]

    def member(name: str) -> bytes:
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"missing archive member {name}")
        if info.file_size > _MAX_MEMBER_BYTES:
            raise CheckpointError(f"archive member {name} is {info.file_size} bytes")
        try:
            return zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise CheckpointError(f"corrupt zip member {name} ({exc})") from None

    byteorder = "little"
    if prefix + "byteorder" in infos:
        byteorder = member(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"unknown byteorder {byteorder!r}")
    unpickler = RestrictedUnpickler(member(pickles[0]), lambda key: member(prefix + "data/" + key), byteorder)
    try:
        return _materialize(unpickler.load())
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - only our allowlisted code ran: any failure is bad input
        raise CheckpointError(f"corrupt pickle ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# Small checks shared by the readers
# ---------------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
        raise CheckpointError(f"{what} {value!r:.60} is not a tuple of non-negative ints")
    return tuple(int(v) for v in value)


def _pos_int(value, key: str) -> int:
    if not _is_int(value) or value < 1:
        raise CheckpointError(f"'{key}' = {value!r:.40} is not a positive integer")
    return int(value)


def _odd(value, key: str) -> int:
    """A kernel size: a positive odd int (padding (k - 1) // 2 keeps the map size)."""
    if not _is_int(value) or value < 1 or value % 2 == 0:
        raise CheckpointError(f"'{key}' = {value!r:.40} is not an odd square kernel size")
    return int(value)


def _kernel(value, key: str) -> int:
    """A square odd kernel size given as k or (k, k), as checkpoints and configs write it."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and _is_int(value[0]) and value[0] == value[1]:
        value = value[0]
    return _odd(value, key)


def _array(value, key: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise CheckpointError(f"'{key}' is {type(value).__name__}, not a numeric array")
    return value


def _expect_shape(arr: np.ndarray, shape: tuple, key: str) -> None:
    """``shape`` may hold None for 'any size'."""
    ok = arr.ndim == len(shape) and all(e is None or e == n for n, e in zip(arr.shape, shape))
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in shape) + ")"
        raise CheckpointError(f"shape mismatch: '{key}' is {tuple(arr.shape)}, expected {want}")


def _check_keys(d, required, optional, where: str) -> None:
    if not isinstance(d, dict):
        raise CheckpointError(f"'{where}' is {type(d).__name__}, expected a dict")
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in required and k not in optional]
    _raise_keys(missing, unknown, prefix=f"{where}." if where else "")


def _raise_keys(missing, unknown, prefix: str = "") -> None:
    def names(keys):
        shown = ", ".join(f"'{prefix}{k}'" for k in list(keys)[:6])
        return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    parts = []
    if unknown:
        parts.append(f"unknown key{'s' if len(unknown) > 1 else ''} {names(unknown)}")
    if missing:
        parts.append(f"missing key{'s' if len(missing) > 1 else ''} {names(missing)}")
    if parts:
        raise CheckpointError("; ".join(parts))


# ---------------------------------------------------------------------------------------------
# Architecture description and the arrays it implies
# ---------------------------------------------------------------------------------------------

_ARCH_KEYS = ("name", "resolution", "in_channels", "first_conv", "blocks", "feature_mix", "source")
_BLOCK_KEYS = ("expand", "kernel", "stride", "out", "residual")
_SOURCE_KINDS = ("int8-dict", "torch-state-dict")


def validate_arch(arch) -> None:
    """Raise ``CheckpointError`` unless ``arch`` is a well-formed architecture dict."""
    _check_keys(arch, _ARCH_KEYS, ("lite_residual",), "arch")
    if not isinstance(arch["name"], str) or not arch["name"]:
        raise CheckpointError("'arch.name' must be a non-empty string")
    _pos_int(arch["resolution"], "arch.resolution")
    _pos_int(arch["in_channels"], "arch.in_channels")
    fc = arch["first_conv"]
    _check_keys(fc, ("out", "kernel", "stride"), (), "arch.first_conv")
    c = _pos_int(fc["out"], "arch.first_conv.out")
    _odd(fc["kernel"], "arch.first_conv.kernel")
    _pos_int(fc["stride"], "arch.first_conv.stride")
    if not isinstance(arch["blocks"], list) or not arch["blocks"]:
        raise CheckpointError("'arch.blocks' must be a non-empty list")
    for i, b in enumerate(arch["blocks"]):
        where = f"arch.blocks.{i}"
        _check_keys(b, _BLOCK_KEYS, (), where)
        if b["expand"] is not None:
            _pos_int(b["expand"], f"{where}.expand")
        _odd(b["kernel"], f"{where}.kernel")
        stride = _pos_int(b["stride"], f"{where}.stride")
        out = _pos_int(b["out"], f"{where}.out")
        if not isinstance(b["residual"], bool):
            raise CheckpointError(f"'{where}.residual' must be true or false")
        if b["residual"] and (stride != 1 or out != c):
            raise CheckpointError(f"{where}: a residual block needs stride 1 and in == out channels "
                                  f"(stride {stride}, {c} -> {out})")
        c = out
    if arch["feature_mix"] is not None:
        _check_keys(arch["feature_mix"], ("out",), (), "arch.feature_mix")
        _pos_int(arch["feature_mix"]["out"], "arch.feature_mix.out")
    src = arch["source"]
    _check_keys(src, ("file", "sha256", "kind"), (), "arch.source")
    if not isinstance(src["file"], str) or not isinstance(src["sha256"], str) or src["kind"] not in _SOURCE_KINDS:
        raise CheckpointError(f"'arch.source' must name a file, its sha256 and a kind in {_SOURCE_KINDS}")
    lite = arch.get("lite_residual")
    if lite is not None:  # TinyTL's branches, saved with a network adapted by that method
        _check_keys(lite, ("downsample", "expand", "groups", "max_kernel"), (), "arch.lite_residual")
        for key in ("downsample", "groups"):
            _pos_int(lite[key], f"arch.lite_residual.{key}")
        _odd(lite["max_kernel"], "arch.lite_residual.max_kernel")
        if type(lite["expand"]) not in (int, float) or not 0 < lite["expand"] <= 16:
            raise CheckpointError("'arch.lite_residual.expand' must be a number in (0, 16]")


def weight_shapes(arch: Mapping) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array ``arch`` requires, in network order (the optional
    ``classifier.*`` pair is not listed: its class count is not part of the architecture)."""
    c = arch["in_channels"]
    fc = arch["first_conv"]
    k = fc["kernel"]
    shapes = {"first_conv.weight": (fc["out"], c, k, k), "first_conv.bias": (fc["out"],)}
    c = fc["out"]
    for i, b in enumerate(arch["blocks"]):
        hidden = c
        if b["expand"] is not None:
            hidden = b["expand"]
            shapes[f"blocks.{i}.expand.weight"] = (hidden, c, 1, 1)
            shapes[f"blocks.{i}.expand.bias"] = (hidden,)
        shapes[f"blocks.{i}.depthwise.weight"] = (hidden, 1, b["kernel"], b["kernel"])
        shapes[f"blocks.{i}.depthwise.bias"] = (hidden,)
        shapes[f"blocks.{i}.project.weight"] = (b["out"], hidden, 1, 1)
        shapes[f"blocks.{i}.project.bias"] = (b["out"],)
        c = b["out"]
    if arch["feature_mix"] is not None:
        shapes["feature_mix.weight"] = (arch["feature_mix"]["out"], c, 1, 1)
        shapes["feature_mix.bias"] = (arch["feature_mix"]["out"],)
    if arch.get("lite_residual") is not None:
        from .tinytl import lite_weight_shapes  # the engine, needed only for such files

        shapes.update(lite_weight_shapes(arch))
    return shapes


def embedding_channels(arch: Mapping) -> int:
    """Channels of the pooled features (the few-shot embedding)."""
    if arch["feature_mix"] is not None:
        return arch["feature_mix"]["out"]
    return arch["blocks"][-1]["out"]


def check_arrays(arch: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ``CheckpointError`` unless ``arrays`` holds exactly the finite float32 arrays
    ``arch`` implies (plus, optionally, ``classifier.weight (classes, C)`` and ``.bias``)."""
    validate_arch(arch)
    shapes = weight_shapes(arch)
    optional = ("classifier.weight", "classifier.bias")
    _raise_keys([k for k in shapes if k not in arrays],
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
        _expect_shape(arr, shape, name)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"'{name}' holds non-finite values")


def _assemble(name, resolution, in_channels, first, blocks, feature_mix, classifier, source):
    """Arch dict + arrays from parsed layers: ``first = (w, b, stride)``; each block a dict with
    ``expand`` ((w, b) or None), ``depthwise``, ``project`` ((w, b)), ``stride``, ``residual``."""
    arrays: dict[str, np.ndarray] = {}

    def put(key, wb):
        arrays[f"{key}.weight"] = np.ascontiguousarray(wb[0], dtype=np.float32)
        arrays[f"{key}.bias"] = np.ascontiguousarray(wb[1], dtype=np.float32)

    put("first_conv", first[:2])
    arch_blocks = []
    for i, b in enumerate(blocks):
        if b["expand"] is not None:
            put(f"blocks.{i}.expand", b["expand"])
        put(f"blocks.{i}.depthwise", b["depthwise"])
        put(f"blocks.{i}.project", b["project"])
        arch_blocks.append({
            "expand": None if b["expand"] is None else int(b["expand"][0].shape[0]),
            "kernel": int(b["depthwise"][0].shape[-1]),
            "stride": int(b["stride"]),
            "out": int(b["project"][0].shape[0]),
            "residual": bool(b["residual"]),
        })
    if feature_mix is not None:
        put("feature_mix", feature_mix)
    if classifier is not None:
        put("classifier", classifier)
    arch = {
        "name": name,
        "resolution": int(resolution),
        "in_channels": int(in_channels),
        "first_conv": {"out": int(first[0].shape[0]), "kernel": int(first[0].shape[-1]), "stride": int(first[2])},
        "blocks": arch_blocks,
        "feature_mix": None if feature_mix is None else {"out": int(feature_mix[0].shape[0])},
        "source": source,
    }
    check_arrays(arch, arrays)
    return arch, arrays


# ---------------------------------------------------------------------------------------------
# int8-dict checkpoints (tiny-training's MCU models)
# ---------------------------------------------------------------------------------------------

_INT8_CONV = ("in_channel", "out_channel", "kernel_size", "stride", "groups", "params")
_INT8_CONV_OPTIONAL = ("in_shape", "out_shape", "depthwise", "act")
_INT8_PARAMS = ("weight", "bias", "w_scales", "x_scale", "x_zero", "y_scale", "y_zero")


def _int8_conv(conv, where: str, in_channels: int, kind: str):
    """Dequantised (w, b, stride) of one conv dict; ``kind`` is 'conv', 'pointwise' or 'depthwise'."""
    _check_keys(conv, _INT8_CONV, _INT8_CONV_OPTIONAL, where)
    if conv.get("act") is not None:
        raise CheckpointError(f"'{where}.act' = {conv['act']!r:.40}: unsupported (activations are fixed ReLU6)")
    params = conv["params"]
    _check_keys(params, _INT8_PARAMS, (), f"{where}.params")
    wq = _array(params["weight"], f"{where}.params.weight")
    out = _pos_int(conv["out_channel"], f"{where}.out_channel")
    if _pos_int(conv["in_channel"], f"{where}.in_channel") != in_channels:
        raise CheckpointError(f"'{where}.in_channel' = {conv['in_channel']}, but the previous layer gives {in_channels} channels")
    k = _kernel(conv["kernel_size"], f"{where}.kernel_size")
    groups = _pos_int(conv["groups"], f"{where}.groups")
    if kind == "depthwise":
        if groups != in_channels or out != in_channels:
            raise CheckpointError(f"'{where}' is not depthwise: groups {groups}, {in_channels} -> {out} channels")
        _expect_shape(wq, (out, 1, k, k), f"{where}.params.weight")
    else:
        if groups != 1:
            raise CheckpointError(f"'{where}.groups' = {groups}: grouped convs are not supported")
        if kind == "pointwise" and k != 1:
            raise CheckpointError(f"'{where}.kernel_size' = {conv['kernel_size']}: expected a 1x1 conv")
        _expect_shape(wq, (out, in_channels, k, k), f"{where}.params.weight")
    if wq.dtype.kind not in "iu":
        raise CheckpointError(f"'{where}.params.weight' is {wq.dtype}, expected int8")
    bq = _array(params["bias"], f"{where}.params.bias")
    scales = _array(params["w_scales"], f"{where}.params.w_scales")
    _expect_shape(bq, (out,), f"{where}.params.bias")
    _expect_shape(scales, (out,), f"{where}.params.w_scales")
    x_scale = params["x_scale"]
    if not isinstance(x_scale, (int, float, np.floating)) or not math.isfinite(x_scale) or x_scale <= 0:
        raise CheckpointError(f"'{where}.params.x_scale' = {x_scale!r:.40} is not a positive number")
    if not np.isfinite(scales).all():
        raise CheckpointError(f"'{where}.params.w_scales' holds non-finite values")
    # float64 first: biases saturated at +-2^31 meet w_scales ~ 4e-9 (README pitfall)
    s = scales.astype(np.float64)
    w = (wq.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    b = (bq.astype(np.float64) * s * float(x_scale)).astype(np.float32)
    stride = _pos_int(conv["stride"], f"{where}.stride")
    if kind == "pointwise" and stride != 1:
        raise CheckpointError(f"'{where}.stride' = {stride}: a 1x1 conv must have stride 1")
    return w, b, stride


def _from_int8_dict(ck: dict):
    _check_keys(ck, ("first_conv", "blocks"), ("feature_mix", "classifier"), "")
    fc = ck["first_conv"]
    if not isinstance(fc, dict):
        raise CheckpointError("'first_conv' is not a conv dict")
    in_channels = _pos_int(fc.get("in_channel"), "first_conv.in_channel")
    resolution = _pos_int(fc.get("in_shape", DEFAULT_RESOLUTION), "first_conv.in_shape")
    first = _int8_conv(fc, "first_conv", in_channels, "conv")
    c = first[0].shape[0]
    if not isinstance(ck["blocks"], list) or not ck["blocks"]:
        raise CheckpointError("'blocks' is not a non-empty list")
    blocks = []
    for i, blk in enumerate(ck["blocks"]):
        where = f"blocks.{i}"
        _check_keys(blk, ("depthwise", "pointwise2"), ("pointwise1", "residual", "se"), where)
        if blk.get("se") is not None:
            raise CheckpointError(f"'{where}.se': squeeze-and-excitation is not supported")
        expand = None
        hidden = c
        if blk.get("pointwise1") is not None:
            expand = _int8_conv(blk["pointwise1"], f"{where}.pointwise1", c, "pointwise")[:2]
            hidden = expand[0].shape[0]
        dw = _int8_conv(blk["depthwise"], f"{where}.depthwise", hidden, "depthwise")
        project = _int8_conv(blk["pointwise2"], f"{where}.pointwise2", hidden, "pointwise")[:2]
        residual = blk.get("residual") is not None
        out = project[0].shape[0]
        if residual and (dw[2] != 1 or out != c):
            raise CheckpointError(f"'{where}.residual' on a block with stride {dw[2]} and {c} -> {out} channels")
        blocks.append({"expand": expand, "depthwise": dw[:2], "project": project, "stride": dw[2], "residual": residual})
        c = out
    feature_mix = None
    if ck.get("feature_mix") is not None:
        feature_mix = _int8_conv(ck["feature_mix"], "feature_mix", c, "pointwise")[:2]
        c = feature_mix[0].shape[0]
    classifier = None
    if ck.get("classifier") is not None:
        w, b, _ = _int8_conv(ck["classifier"], "classifier", c, "pointwise")
        classifier = (w.reshape(w.shape[0], c), b)
    return resolution, in_channels, first, blocks, feature_mix, classifier


# ---------------------------------------------------------------------------------------------
# Float state_dicts of the MCUNet / once-for-all family
# ---------------------------------------------------------------------------------------------

_BN = ("weight", "bias", "running_mean", "running_var")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.([A-Za-z_]+)\.")
_BLOCK_WORDS = ("mobile_inverted_conv", "conv")  # model zoo, tiny-training


def _fold(sd, prefix: str, eps: float, shape: tuple):
    """(w, b) of the conv at ``prefix`` with its BatchNorm folded in (float64, then float32)."""
    w = _array(sd[f"{prefix}.conv.weight"], f"{prefix}.conv.weight")
    _expect_shape(w, shape, f"{prefix}.conv.weight")
    out = w.shape[0]
    bn = {}
    for part in _BN:
        key = f"{prefix}.bn.{part}"
        bn[part] = _array(sd[key], key).astype(np.float64)
        _expect_shape(bn[part], (out,), key)
    conv_bias = np.zeros(out)
    if f"{prefix}.conv.bias" in sd:
        conv_bias = _array(sd[f"{prefix}.conv.bias"], f"{prefix}.conv.bias").astype(np.float64)
        _expect_shape(conv_bias, (out,), f"{prefix}.conv.bias")
    if (bn["running_var"] < 0).any():
        raise CheckpointError(f"'{prefix}.bn.running_var' holds negative values")
    scale = bn["weight"] / np.sqrt(bn["running_var"] + eps)
    wf = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    bf = ((conv_bias - bn["running_mean"]) * scale + bn["bias"]).astype(np.float32)
    return wf, bf


def _state_dict_layers(sd: dict):
    """Key layout of a state_dict: (the state_dict without a DataParallel 'module.' prefix,
    block word, number of blocks, which blocks expand, whether there is a feature-mix layer,
    whether there is a classifier). Unknown or missing keys raise, naming them."""
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"state_dict key {bad[0]!r:.40} is not a string")
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    found = {(int(m.group(1)), m.group(2)) for m in map(_BLOCK_KEY.match, sd) if m}
    words = {w for _, w in found if w in _BLOCK_WORDS}
    if len(words) > 1:
        raise CheckpointError("state_dict mixes the 'blocks.N.mobile_inverted_conv.' and 'blocks.N.conv.' key layouts")
    if not words:
        raise CheckpointError("state_dict has no 'blocks.N.mobile_inverted_conv.*' or 'blocks.N.conv.*' keys: "
                              "not an MCUNet / once-for-all network")
    word = words.pop()
    n_blocks = 1 + max(i for i, w in found if w == word)
    expands = [any(k.startswith(f"blocks.{i}.{word}.inverted_bottleneck.") for k in sd) for i in range(n_blocks)]
    has_mix = any(k.startswith("feature_mix_layer.") for k in sd)
    has_classifier = any(k.startswith("classifier.") for k in sd)

    prefixes = ["first_conv"]
    for i in range(n_blocks):
        if expands[i]:
            prefixes.append(f"blocks.{i}.{word}.inverted_bottleneck")
        prefixes += [f"blocks.{i}.{word}.depth_conv", f"blocks.{i}.{word}.point_linear"]
    if has_mix:
        prefixes.append("feature_mix_layer")
    required = [f"{p}.conv.weight" for p in prefixes] + [f"{p}.bn.{part}" for p in prefixes for part in _BN]
    optional = {f"{p}.bn.num_batches_tracked" for p in prefixes} | {f"{p}.conv.bias" for p in prefixes}
    if has_classifier:
        required += ["classifier.linear.weight", "classifier.linear.bias"]
    required_set = set(required)
    _raise_keys([k for k in required if k not in sd],
                [k for k in sd if k not in required_set and k not in optional])
    return sd, word, n_blocks, expands, has_mix, has_classifier


def _config_block(cfg_blocks, i: int):
    blk = cfg_blocks[i]
    if not isinstance(blk, dict):
        raise CheckpointError(f"config: 'blocks.{i}' is not an object")
    conv = blk.get("mobile_inverted_conv", blk.get("conv"))
    if not isinstance(conv, dict):
        raise CheckpointError(f"config: 'blocks.{i}' has no 'mobile_inverted_conv' (or 'conv') object")
    if conv.get("name", "MBInvertedConvLayer") != "MBInvertedConvLayer":
        raise CheckpointError(f"config: 'blocks.{i}' is a {conv.get('name')!r:.40}, only MBInvertedConvLayer is supported")
    if conv.get("use_se") or conv.get("no_dw"):
        raise CheckpointError(f"config: 'blocks.{i}': use_se / no_dw are not supported")
    shortcut = blk.get("shortcut")
    if shortcut is not None and (not isinstance(shortcut, dict) or shortcut.get("name") != "IdentityLayer"):
        raise CheckpointError(f"config: 'blocks.{i}.shortcut' must be null or an IdentityLayer")
    return conv, shortcut is not None


def _check_act(layer: dict, key: str) -> None:
    act = layer.get("act_func", ACTIVATION)
    if act != ACTIVATION:
        raise CheckpointError(f"config: '{key}.act_func' = {act!r:.40}; microtrain's networks use {ACTIVATION}")


def _check_config_value(layer: dict, field: str, actual, key: str) -> None:
    """A config field that the weights also determine must agree with them."""
    if field in layer and layer[field] is not None:
        given = layer[field]
        if field == "kernel_size":
            given = _kernel(given, f"config {key}.kernel_size")
        if given != actual:
            raise CheckpointError(f"config: '{key}.{field}' = {layer[field]!r:.40}, but the weights give {actual}")


def _from_state_dict(sd: dict, config, bn_eps):
    sd, word, n_blocks, expands, has_mix, has_classifier = _state_dict_layers(sd)
    if config is not None and not isinstance(config, dict):
        raise CheckpointError("config: the net-config JSON must be an object")
    if bn_eps is None:
        bn_eps = DEFAULT_BN_EPS
        if config is not None and isinstance(config.get("bn"), dict) and config["bn"].get("eps") is not None:
            bn_eps = config["bn"]["eps"]
    if not isinstance(bn_eps, (int, float)) or not bn_eps >= 0:
        raise CheckpointError(f"BatchNorm eps {bn_eps!r:.40} is not a non-negative number")

    # weights first: their shapes give channels and kernel sizes, and name keys in errors
    first_w = _array(sd["first_conv.conv.weight"], "first_conv.conv.weight")
    _expect_shape(first_w, (None, None, None, None), "first_conv.conv.weight")
    k = _kernel(first_w.shape[2:], "first_conv.conv.weight kernel")
    in_channels = first_w.shape[1]
    first = _fold(sd, "first_conv", bn_eps, (None, in_channels, k, k))
    c = first[0].shape[0]
    parsed = []
    for i in range(n_blocks):
        pre = f"blocks.{i}.{word}"
        expand = None
        hidden = c
        if expands[i]:
            expand = _fold(sd, f"{pre}.inverted_bottleneck", bn_eps, (None, c, 1, 1))
            hidden = expand[0].shape[0]
        dw_w = _array(sd[f"{pre}.depth_conv.conv.weight"], f"{pre}.depth_conv.conv.weight")
        _expect_shape(dw_w, (hidden, 1, None, None), f"{pre}.depth_conv.conv.weight")
        kdw = _kernel(dw_w.shape[2:], f"{pre}.depth_conv.conv.weight kernel")
        dw = _fold(sd, f"{pre}.depth_conv", bn_eps, (hidden, 1, kdw, kdw))
        project = _fold(sd, f"{pre}.point_linear", bn_eps, (None, hidden, 1, 1))
        parsed.append((c, expand, dw, project))
        c = project[0].shape[0]
    feature_mix = _fold(sd, "feature_mix_layer", bn_eps, (None, c, 1, 1)) if has_mix else None
    if feature_mix is not None:
        c = feature_mix[0].shape[0]
    classifier = None
    if has_classifier:
        w = _array(sd["classifier.linear.weight"], "classifier.linear.weight")
        _expect_shape(w, (None, c), "classifier.linear.weight")
        b = _array(sd["classifier.linear.bias"], "classifier.linear.bias")
        _expect_shape(b, (w.shape[0],), "classifier.linear.bias")
        classifier = (w.astype(np.float32), b.astype(np.float32))

    if config is None:
        raise CheckpointError("the strides of first_conv and of each block cannot be determined from a state_dict; "
                              "pass the network's net-config JSON (--config)")
    # the config gives strides and shortcuts, and must agree with the weights on the rest
    for key in ("first_conv", "blocks"):
        if key not in config:
            raise CheckpointError(f"config: missing key '{key}'")
    fc = config["first_conv"]
    if not isinstance(fc, dict):
        raise CheckpointError("config: 'first_conv' is not an object")
    _check_act(fc, "first_conv")
    _check_config_value(fc, "kernel_size", k, "first_conv")
    _check_config_value(fc, "in_channels", in_channels, "first_conv")
    _check_config_value(fc, "out_channels", first[0].shape[0], "first_conv")
    first = (*first, _pos_int(fc.get("stride"), "config first_conv.stride"))
    cfg_blocks = config["blocks"]
    if not isinstance(cfg_blocks, list) or len(cfg_blocks) != n_blocks:
        n = len(cfg_blocks) if isinstance(cfg_blocks, list) else "no"
        raise CheckpointError(f"config has {n} blocks, the state_dict {n_blocks}")
    blocks = []
    for i, (cin, expand, dw, project) in enumerate(parsed):
        conv, residual = _config_block(cfg_blocks, i)
        key = f"blocks.{i}.mobile_inverted_conv"
        _check_act(conv, key)
        hidden = dw[0].shape[0]
        out = project[0].shape[0]
        _check_config_value(conv, "in_channels", cin, key)
        _check_config_value(conv, "out_channels", out, key)
        _check_config_value(conv, "kernel_size", dw[0].shape[-1], key)
        ratio = conv.get("expand_ratio")
        if ratio is not None and (ratio == 1) != (expand is None):
            raise CheckpointError(f"config: '{key}.expand_ratio' = {ratio}, but the state_dict "
                                  f"{'has no' if expand is None else 'has an'} inverted_bottleneck in block {i}")
        mid = conv.get("mid_channels")
        if mid is None and ratio not in (None, 1):
            mid = round(cin * ratio)
        if expand is not None and mid is not None and mid != hidden:
            raise CheckpointError(f"config: '{key}' expands to {mid} channels, the weights to {hidden}")
        stride = _pos_int(conv.get("stride"), f"config {key}.stride")
        if residual and (stride != 1 or cin != out):
            raise CheckpointError(f"config: 'blocks.{i}.shortcut' on a block with stride {stride} and {cin} -> {out} channels")
        blocks.append({"expand": expand, "depthwise": dw, "project": project, "stride": stride, "residual": residual})
    if "feature_mix_layer" in config:
        mix = config["feature_mix_layer"]
        if (mix is not None) != has_mix:
            raise CheckpointError(f"config {'has a' if mix is not None else 'has no'} feature_mix_layer, the state_dict "
                                  f"{'has' if has_mix else 'has none'}")
        if mix is not None:
            if not isinstance(mix, dict):
                raise CheckpointError("config: 'feature_mix_layer' is not an object")
            _check_act(mix, "feature_mix_layer")
            _check_config_value(mix, "kernel_size", 1, "feature_mix_layer")
            _check_config_value(mix, "out_channels", feature_mix[0].shape[0], "feature_mix_layer")
    if classifier is not None and isinstance(config.get("classifier"), dict):
        _check_config_value(config["classifier"], "in_features", classifier[0].shape[1], "classifier")
        _check_config_value(config["classifier"], "out_features", classifier[0].shape[0], "classifier")
    resolution = _pos_int(config.get("resolution", DEFAULT_RESOLUTION), "config resolution")
    return resolution, in_channels, first, blocks, feature_mix, classifier


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

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
        obj = _unpickle_archive(data)
        if isinstance(obj, dict) and "state_dict" in obj:
            kind, sd = "torch-state-dict", obj["state_dict"]
            if not isinstance(sd, dict):
                raise CheckpointError(f"'state_dict' is {type(sd).__name__}, not a dict")
            parsed = _from_state_dict(sd, config, bn_eps)
        elif isinstance(obj, dict) and isinstance(obj.get("first_conv"), dict):
            kind = "int8-dict"
            parsed = _from_int8_dict(obj)
        elif isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            kind = "torch-state-dict"
            parsed = _from_state_dict(obj, config, bn_eps)
        else:
            what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"unrecognised checkpoint contents ({what:.120}): expected an int8 dict "
                                  "or a state_dict of an MCUNet / once-for-all network")
        source = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "kind": kind}
        return _assemble(path.stem, *parsed, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        # a structure the explicit checks did not foresee (the pickle is attacker-shaped data)
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {exc})") from None


def save_weights(path, arch: Mapping, arrays: Mapping[str, np.ndarray]) -> Path:
    """Validate and write the weight file atomically (temp file in the same folder, then
    ``os.replace``): the path holds either its previous content or the complete new file."""
    arch = dict(arch)
    check_arrays(arch, arrays)
    path = Path(path)
    payload = {name: arrays[name] for name in arrays}
    payload["__arch__"] = np.array(json.dumps(arch))
    payload["__format_version__"] = np.array(FORMAT_VERSION)
    # an exclusive open (not mkstemp) so the file gets the usual umask permissions, not 0600
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_weights(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(arch, arrays)`` from a weight file written by ``save_weights``, fully validated."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not a microtrain weight file (.npz)")
        with npz:
            contents = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a microtrain weight file ({exc})") from None
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


def _stored_stamp(path: Path):
    """(format version, source sha256) of a converted file, or None when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return int(npz["__format_version__"]), json.loads(str(npz["__arch__"]))["source"]["sha256"]
    except Exception:  # noqa: BLE001 - any unreadable file just means "convert again"
        return None


def ensure_converted(name: str, weights_dir=None) -> Path:
    """Path of the converted weight file of a shared backbone (``mcunet-5fps``, ``mbv2-w0.35``,
    ``proxyless-w0.3``), converting ``../shared/checkpoints/<name>.pkl`` on first use.
    Raises ``paths.MissingSharedError`` when the shared checkpoint is not there."""
    stem = name[: -len(".pkl")] if name.endswith(".pkl") else name
    if stem not in SHARED_CHECKPOINTS:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(SHARED_CHECKPOINTS)}")
    out = Path(weights_dir if weights_dir is not None else WEIGHTS_DIR) / f"{stem}.npz"
    stamp = _stored_stamp(out) if out.exists() else None
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
