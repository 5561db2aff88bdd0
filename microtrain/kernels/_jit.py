"""The one place that sets microtrain's Numba policy, plus the cheap input checks every public
kernel runs before it calls its compiled implementation.

Policy (see ``kernel`` below):
- explicit signatures, compiled when the kernel module is imported, ``cache=True`` so a warm
  start costs milliseconds per kernel instead of hundreds;
- ``nogil=True`` so a caller may run kernels from threads;
- ``boundscheck=False`` and ``error_model="numpy"``: the Python wrappers check shapes before the
  call, so the compiled loops carry no per-element checks (a division by zero gives inf/nan like
  NumPy instead of raising, which also keeps loops vectorisable);
- ``fastmath={"contract"}`` everywhere: lets LLVM fuse ``a*b + c`` into one FMA (one rounding
  instead of two); no other IEEE relaxation, so NaN and inf still propagate;
- opt-ins, each with a one-line reason at the kernel that uses it:
  ``reassoc=True`` lets LLVM reorder a float32 sum so it can split it over vector lanes (results
  change only by rounding); ``parallel=True`` only where a measurement on 2 cores showed it pays.

Input arrays are typed read-only in the signatures: Numba converts a writable array to a
read-only one at the call, so both kinds (e.g. weights memory-mapped from a checkpoint) reach the
same compiled code. Destinations are typed writable.

Numba's cache is keyed per source file: the helpers at the bottom are inlined into kernels of
other files, so after editing them clear the cache (``__pycache__/*.nbi``, ``*.nbc``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types

__all__ = ["KernelInputError", "kernel", "F32", "I64", "U8"]

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
U8 = np.dtype(np.uint8)


class KernelInputError(ValueError):
    """A public kernel was called with arrays it cannot work on; the message names the op."""


# --------------------------------------------------------------------------- signature types
# writable (destinations) and read-only (inputs) C-contiguous arrays
f32_1 = types.Array(types.float32, 1, "C")
f32_2 = types.Array(types.float32, 2, "C")
f32_4 = types.Array(types.float32, 4, "C")
f32_1r = types.Array(types.float32, 1, "C", readonly=True)
f32_2r = types.Array(types.float32, 2, "C", readonly=True)
f32_4r = types.Array(types.float32, 4, "C", readonly=True)
i64_1r = types.Array(types.int64, 1, "C", readonly=True)
u8_1 = types.Array(types.uint8, 1, "C")
u8_1r = types.Array(types.uint8, 1, "C", readonly=True)
i64 = types.int64
f64 = types.float64
void = types.void

_BASE = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")


def kernel(signature, *, reassoc: bool = False, parallel: bool = False, why: str = ""):
    """Decorator: compile one kernel eagerly for exactly ``signature`` under the project policy.

    ``reassoc`` and ``parallel`` are opt-outs from strict evaluation order / single thread; using
    either requires ``why`` (a one-line reason, normally the measurement that justified it).
    """
    if (reassoc or parallel) and not why:
        raise ValueError("kernel(): reassoc/parallel need a one-line reason in why=")
    fastmath = {"contract", "reassoc"} if reassoc else {"contract"}
    return njit(signature, fastmath=fastmath, parallel=parallel, **_BASE)


# --------------------------------------------------------------------------- input checks
def fail(op: str, message: str):
    raise KernelInputError(f"{op}: {message}")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} {tuple(a.shape)}"
    return type(a).__name__


def array(op: str, name: str, a, ndim: int, dtype=F32, writable: bool = False) -> None:
    """``a`` is an aligned C-contiguous ndarray of ``ndim`` dims and ``dtype`` (writable if a
    destination); otherwise raise KernelInputError naming ``op`` and ``name``."""
    if type(a) is not np.ndarray:
        if not isinstance(a, np.ndarray):
            fail(op, f"{name} must be a numpy array, got {_describe(a)}")
    if a.ndim != ndim:
        fail(op, f"{name} must have {ndim} dims, got {a.ndim} {tuple(a.shape)}")
    if a.dtype != dtype:
        fail(op, f"{name} must be {dtype}, got {a.dtype} {tuple(a.shape)}")
    flags = a.flags
    if not (flags.c_contiguous and flags.aligned):
        fail(op, f"{name} {tuple(a.shape)} must be C-contiguous and aligned")
    if writable and not flags.writeable:
        fail(op, f"{name} {tuple(a.shape)} is read-only but is written")


def shape_is(op: str, name: str, a: np.ndarray, expected: tuple, why: str = "") -> None:
    if a.shape != expected:
        tail = f" ({why})" if why else ""
        fail(op, f"{name} {tuple(a.shape)} should be {tuple(expected)}{tail}")


def stride_ok(op: str, stride) -> None:
    if type(stride) is bool or not isinstance(stride, (int, np.integer)) or stride not in (1, 2):
        fail(op, f"stride must be 1 or 2, got {stride!r}")


def odd_square_kernel(op: str, name: str, w: np.ndarray) -> int:
    k = w.shape[2]
    if w.shape[3] != k or k % 2 == 0:
        fail(op, f"{name} {tuple(w.shape)} must hold odd square k x k kernels")
    return k


def out_size(size: int, k: int, stride: int) -> int:
    """Ho = (H + 2p - k) // s + 1 with p = (k - 1) // 2."""
    return (size + 2 * ((k - 1) // 2) - k) // stride + 1


@njit(i64(i64_1r, i64), **_BASE)
def _first_out_of_range(idx, limit):  # pragma: no cover - compiled
    # one pass over the indices; -1 means all lie in [0, limit)
    for j in range(idx.shape[0]):
        if idx[j] < 0 or idx[j] >= limit:
            return j
    return -1


def indices(op: str, name: str, idx, limit: int, what: str) -> None:
    """``idx`` is a C-contiguous 1-D int64 array with every value in [0, limit)."""
    array(op, name, idx, 1, I64)
    if idx.shape[0]:
        j = _first_out_of_range(idx, limit)
        if j >= 0:
            fail(op, f"{name}[{j}] = {idx[j]} is out of range for {limit} {what}")


def int_at_least(op: str, name: str, value, lo: int) -> None:
    if type(value) is bool or not isinstance(value, (int, np.integer)) or value < lo:
        fail(op, f"{name} must be an integer >= {lo}, got {value!r}")


# --------------------------------------------------------------------------- inlined loop helpers
# Index with u(i) wherever i is computed from a tap offset that may look negative to the compiler:
# Numba wraps negative signed indices around (a select per access), which stops LLVM from
# vectorising; an unsigned index has no wraparound. Callers guarantee 0 <= i < size.
u = np.uintp

@njit(inline="always")
def valid_range(offset, stride, size_in, size_out):  # pragma: no cover - compiled
    """Output positions o in [lo, hi) whose input position o*stride + offset lies in [0, size_in).

    Used by every padded convolution: loops over o in this range read no padding, so they need no
    branch inside and LLVM can vectorise them.
    """
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = (size_in - 1 - offset) // stride + 1 if size_in - 1 - offset >= 0 else 0
    if hi > size_out:
        hi = size_out
    if hi < lo:
        hi = lo
    return lo, hi


# The per-tap loop nests of a padded k x k convolution, shared by the full/grouped and the
# depthwise kernels. Each handles one tap (offsets dh = kh - p, dw = kw - p) over the valid output
# block [oh0, oh1) x [ow0, ow1) from valid_range, so no index touches padding. The stride is a
# literal in each branch (the caller's runtime stride only picks the branch): LLVM vectorises the
# unit-stride loop with plain vector loads. Inlined, they take the caller's fastmath flags.
@njit(inline="always")
def tap_gather(out, n, o, x, c, wv, oh0, oh1, ow0, ow1, dh, dw, stride):  # pragma: no cover
    """out[n, o, oh, ow] += wv * x[n, c, stride*oh + dh, stride*ow + dw] (the forward)."""
    if stride == 1:
        for oh in range(oh0, oh1):
            ih = u(oh + dh)
            for ow in range(ow0, ow1):
                out[n, o, u(oh), u(ow)] += wv * x[n, c, ih, u(ow + dw)]
    else:
        for oh in range(oh0, oh1):
            ih = u(2 * oh + dh)
            for ow in range(ow0, ow1):
                out[n, o, u(oh), u(ow)] += wv * x[n, c, ih, u(2 * ow + dw)]


@njit(inline="always")
def tap_scatter(dx, n, c, dy, o, wv, oh0, oh1, ow0, ow1, dh, dw, stride):  # pragma: no cover
    """dx[n, c, stride*oh + dh, stride*ow + dw] += wv * dy[n, o, oh, ow] (the transpose of
    tap_gather: the backward-input)."""
    if stride == 1:
        for oh in range(oh0, oh1):
            ih = u(oh + dh)
            for ow in range(ow0, ow1):
                dx[n, c, ih, u(ow + dw)] += wv * dy[n, o, u(oh), u(ow)]
    else:
        for oh in range(oh0, oh1):
            ih = u(2 * oh + dh)
            for ow in range(ow0, ow1):
                dx[n, c, ih, u(2 * ow + dw)] += wv * dy[n, o, u(oh), u(ow)]

