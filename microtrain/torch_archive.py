"""Reading untrusted ``torch.save`` zip archives without torch: a pickle may rebuild only the
handful of globals checkpoints use.

``RestrictedUnpickler`` rebuilds those globals by functions of this module (never by importing
torch or calling NumPy's unpickling helpers) and refuses every other global before anything runs.
``unpickle_archive`` checks the zip archive (one ``<folder>/data.pkl``, member sizes, byte order)
and returns the unpickled object: dicts, lists, tuples, numbers, strings and NumPy arrays (tensor
storages become NumPy arrays). What the object means is ``layouts.py``'s concern.
"""
from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from .checks import CheckpointError, int_tuple

_MAX_MEMBER_BYTES = 1 << 30  # refuse zip members that would inflate past 1 GiB
_MAX_NESTING = 32
# torch's legacy (pre-1.6) format starts with a pickled magic number (LONG1, 10 bytes)
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


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
        shape = int_tuple(shape, "numpy array shape")
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
    size = int_tuple(size, "tensor size")
    stride = int_tuple(stride, "tensor stride")
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
        """Only the globals of ``_ALLOWED`` (tensor and NumPy array rebuilders, storage types,
        OrderedDict); any other raises ``CheckpointError``: a checkpoint is untrusted data."""
        entry = _ALLOWED.get((module, name))
        if entry is None:
            raise CheckpointError(
                f"pickle references the global '{module}.{name}', which a checkpoint never needs; "
                "refusing to load it (a pickle can run arbitrary code)")
        call, dtype = entry
        return _Global(f"{module}.{name}", call, dtype)

    def persistent_load(self, pid):
        """A storage reference ('storage', type, key, location, numel) -> that record
        (archive/data/KEY) as a flat read-only array (``_Storage``), read once; ``CheckpointError``
        on anything else."""
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


def unpickle_archive(data: bytes):
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

