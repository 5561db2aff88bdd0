"""The one error and the small checks shared by every reader of an untrusted checkpoint or weight file.

Imports nothing of microtrain. Each check raises ``CheckpointError`` with a one-line message that
names the offending key.
"""
from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be used. The message is always one line."""

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def int_tuple(value, what: str) -> tuple[int, ...]:
    """A tuple or list of non-negative ints (a shape or strides) as a tuple of Python ints."""
    if not isinstance(value, (tuple, list)) or not all(is_int(v) and v >= 0 for v in value):
        raise CheckpointError(f"{what} {value!r:.60} is not a tuple of non-negative ints")
    return tuple(int(v) for v in value)


def pos_int(value, key: str) -> int:
    """``value`` as a Python int if it is an integer >= 1."""
    if not is_int(value) or value < 1:
        raise CheckpointError(f"'{key}' = {value!r:.40} is not a positive integer")
    return int(value)


def odd_kernel(value, key: str) -> int:
    """A kernel size: a positive odd int (padding (k - 1) // 2 keeps the map size)."""
    if not is_int(value) or value < 1 or value % 2 == 0:
        raise CheckpointError(f"'{key}' = {value!r:.40} is not an odd square kernel size")
    return int(value)


def square_kernel(value, key: str) -> int:
    """A square odd kernel size given as k or (k, k), as checkpoints and configs write it."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and is_int(value[0]) and value[0] == value[1]:
        value = value[0]
    return odd_kernel(value, key)


def numeric_array(value, key: str) -> np.ndarray:
    """``value`` if it is a NumPy array of bools, ints or floats."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise CheckpointError(f"'{key}' is {type(value).__name__}, not a numeric array")
    return value


def expect_shape(arr: np.ndarray, shape: tuple, key: str) -> None:
    """``arr`` has ``shape``, which may hold None for 'any size'."""
    ok = arr.ndim == len(shape) and all(e is None or e == n for n, e in zip(arr.shape, shape))
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in shape) + ")"
        raise CheckpointError(f"shape mismatch: '{key}' is {tuple(arr.shape)}, expected {want}")


def check_keys(d, required, optional, where: str) -> None:
    """``d`` is a dict holding every ``required`` key and otherwise only ``optional`` ones."""
    if not isinstance(d, dict):
        raise CheckpointError(f"'{where}' is {type(d).__name__}, expected a dict")
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in required and k not in optional]
    raise_keys(missing, unknown, prefix=f"{where}." if where else "")


def raise_keys(missing, unknown, prefix: str = "") -> None:
    """One error naming the first unknown and missing keys, if there are any."""
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

