"""The one place that sets microtrain's Numba policy, plus the cheap input checks every public
kernel runs before it calls its compiled implementation.

Policy (see ``kernel`` below):
- explicit signatures, compiled when the kernel module is imported, through Numba's disk cache
  (``cache=True``, made tolerant of damage: see the end of this docstring) so a warm start
  costs milliseconds per kernel instead of hundreds;
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

A clean cache miss (the first run after an install or update) says once that the kernels are
being compiled (``COMPILING_NOTE``). The disk cache must never stop a run (see
``_TolerantCache``): an entry that cannot be read (a
``.nbi``/``.nbc`` file truncated by a power cut) is a cache miss, recompiled and rewritten, with
one ``note:`` line; a cache that cannot be written is skipped with one line; and when Numba finds
no writable place at all (``NUMBA_CACHE_DIR`` unset, a read-only install, no usable HOME) the
kernels are cached in a private folder under the system's temporary directory, or not at all,
again with one line. Notes go to the ``microtrain.kernels._jit`` logger (stderr by default).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile

import numpy as np
from numba import config as numba_config
from numba import njit, types
from numba.core.caching import FunctionCache

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

_BASE = dict(nogil=True, boundscheck=False, error_model="numpy")  # + a disk cache, see _compile

_log = logging.getLogger(__name__)


def kernel(signature, *, reassoc: bool = False, parallel: bool = False, why: str = ""):
    """Decorator: compile one kernel eagerly for exactly ``signature`` under the project policy,
    through Numba's disk cache (``_TolerantCache``).

    ``reassoc`` and ``parallel`` are opt-outs from strict evaluation order / single thread; using
    either requires ``why`` (a one-line reason, normally the measurement that justified it).
    """
    if (reassoc or parallel) and not why:
        raise ValueError("kernel(): reassoc/parallel need a one-line reason in why=")
    fastmath = {"contract", "reassoc"} if reassoc else {"contract"}
    return lambda func: _compile(func, signature, fastmath=fastmath, parallel=parallel, **_BASE)


def _compile(func, signature, **options):
    """What ``njit(signature, cache=True, **options)`` does, with ``_TolerantCache`` as the cache:
    compile (or load) the one signature, then refuse to compile others."""
    dispatcher = njit(**options)(func)  # lazy: nothing compiled yet
    cache = _cache_for(func)
    if cache is not None:
        dispatcher._cache = cache  # where njit(cache=True) puts Numba's FunctionCache
    dispatcher.compile(signature)
    dispatcher.disable_compile()
    return dispatcher


class _TolerantCache(FunctionCache):
    """Numba's per-function disk cache, except that it never stops a run.

    Loading: any failure to read an entry (EOFError or UnpicklingError from a truncated
    ``.nbi``/``.nbc``, or whatever a garbled pickle raises) makes it a cache miss; the damaged
    index is removed so that the save after compiling writes a fresh index and data file
    (Numba writes both through a temporary file and a rename, so concurrent runs see a whole
    file or none). Saving: a failure (disk full, folder gone) leaves the kernel compiled and
    uncached. One note line each."""

    def load_overload(self, sig, target_context):
        try:
            found = super().load_overload(sig, target_context)
        except Exception as exc:  # any unreadable entry is a miss: the compile below is exact
            try:
                os.unlink(self._cache_file._index_path)
            except OSError:
                pass
            _log.warning("note: Numba cache entry %s in %s was unreadable (%s); recompiling it",
                         self._impl.filename_base, self.cache_path, _reason(exc))
            return None
        if found is None:
            _announce_compiling()
        return found

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as exc:  # the kernel is compiled and runs; only the cache is missing
            _log.warning("note: could not write Numba cache entry %s in %s (%s); it is compiled "
                         "again next run", self._impl.filename_base, self.cache_path, _reason(exc))


COMPILING_NOTE = ("note: compiling microtrain's Numba kernels (once after an install or update: 10-30 s on a "
                  "PC, minutes on a small board); later runs load them from the cache")
_announced = {"compiling": False}


def _announce_compiling() -> None:
    """Say once per process that kernels are being compiled: the first run after an install
    would otherwise sit silent for the seconds (a board: minutes) it takes."""
    if not _announced["compiling"]:
        _announced["compiling"] = True
        _log.warning(COMPILING_NOTE)


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_fallback = {"tried": False}


def _cache_for(func) -> _TolerantCache | None:
    """The disk cache for ``func``, in Numba's usual places (NUMBA_CACHE_DIR, the package's
    ``__pycache__``, the user's cache folder); when none is writable, in a private temporary
    folder (chosen once per process, with one note line); None when even that fails."""
    try:
        return _TolerantCache(func)
    except RuntimeError as exc:  # Numba: "cannot cache function ...: no locator available"
        if "no locator available" not in str(exc):
            raise
    if not _fallback["tried"]:
        _fallback["tried"] = True
        folder = _private_temp_folder()
        where = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
        why = f"NUMBA_CACHE_DIR unset, {where} and the user cache folder not writable"
        if folder is None:
            _log.warning("note: no writable Numba cache location (%s, no temporary folder); "
                         "kernels are compiled on every run (set NUMBA_CACHE_DIR to keep them)", why)
        else:
            numba_config.CACHE_DIR = folder
            os.environ["NUMBA_CACHE_DIR"] = folder  # survives a reload of Numba's config; children inherit it
            _log.warning("note: no writable Numba cache location (%s); caching compiled kernels in %s "
                         "(set NUMBA_CACHE_DIR to choose the place)", why, folder)
    if not numba_config.CACHE_DIR:
        return None
    try:
        return _TolerantCache(func)
    except RuntimeError:
        return None


def _private_temp_folder() -> str | None:
    """``<tmp>/microtrain-numba-<uid>``, made (mode 0700) or reused when it is this user's own
    folder that nobody else can write (a cache holds pickles: another user's files could run
    code here); otherwise a fresh folder for this run, removed at exit; None if neither works."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    shared = os.path.join(tempfile.gettempdir(), f"microtrain-numba-{uid if uid is not None else 'user'}")
    try:
        os.mkdir(shared, 0o700)
    except FileExistsError:
        pass
    except OSError:
        shared = None
    if shared is not None:
        try:
            st = os.lstat(shared)
            own = uid is None or st.st_uid == uid
            if stat.S_ISDIR(st.st_mode) and own and not st.st_mode & 0o022 and os.access(shared, os.W_OK):
                return shared
        except OSError:
            pass
    try:
        fresh = tempfile.mkdtemp(prefix="microtrain-numba-")
    except OSError:
        return None
    atexit.register(shutil.rmtree, fresh, True)
    return fresh


# --------------------------------------------------------------------------- input checks
def fail(op: str, message: str):
    """Raise ``KernelInputError`` with the message 'OP: MESSAGE'."""
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
    """``a.shape == expected``; otherwise raise KernelInputError naming ``op``, ``name`` and ``why``."""
    if a.shape != expected:
        tail = f" ({why})" if why else ""
        fail(op, f"{name} {tuple(a.shape)} should be {tuple(expected)}{tail}")


def stride_ok(op: str, stride) -> None:
    """``stride`` is the integer 1 or 2 (the strides the conv kernels implement); else KernelInputError."""
    if type(stride) is bool or not isinstance(stride, (int, np.integer)) or stride not in (1, 2):
        fail(op, f"stride must be 1 or 2, got {stride!r}")


def odd_square_kernel(op: str, name: str, w: np.ndarray) -> int:
    """The side k of ``w``'s (.., .., k, k) kernels; KernelInputError unless square and odd."""
    k = w.shape[2]
    if w.shape[3] != k or k % 2 == 0:
        fail(op, f"{name} {tuple(w.shape)} must hold odd square k x k kernels")
    return k


def out_size(size: int, k: int, stride: int) -> int:
    """Ho = (H + 2p - k) // s + 1 with p = (k - 1) // 2."""
    return (size + 2 * ((k - 1) // 2) - k) // stride + 1


@kernel(i64(i64_1r, i64))
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
    """``value`` is an integer (not a bool) >= ``lo``; else KernelInputError."""
    if type(value) is bool or not isinstance(value, (int, np.integer)) or value < lo:
        fail(op, f"{name} must be an integer >= {lo}, got {value!r}")


def scratch_for(op: str, scratch, need: int) -> np.ndarray:
    """The scratch a phase-plane kernel works in: ``scratch`` checked (1-D float32, writable, at
    least ``need`` entries), or a fresh one when None (standalone calls; the executor passes
    buffers from its planned arena)."""
    if scratch is None:
        return np.empty(need, F32)
    array(op, "scratch", scratch, 1, writable=True)
    if scratch.shape[0] < need:
        fail(op, f"scratch has {scratch.shape[0]} entries, needs {need}")
    return scratch


# --------------------------------------------------------------------------- inlined loop helpers
# Index with u(i) wherever i is computed from an offset that may look negative to the compiler:
# Numba wraps negative signed indices around (a select per access), which stops LLVM from
# vectorising; an unsigned index has no wraparound. Callers guarantee 0 <= i < size.
u = np.uintp

# --------------------------------------------------------------------------- phase planes
# The k x k convolutions (forward, backward-input, backward-weight). Looping per tap over the
# valid output block gives loops a few elements long on the small maps of a tiny CNN (4x4 .. 16x16)
# and strided loads at stride 2, so they never reach vector width. The "phase plane" layout makes
# every tap one long contiguous loop instead (measured 1.5-5x faster on MCUNet's shapes):
# - the input plane is written, zero-padded, into stride x stride phase planes, phase (a, b)
#   holding padded positions (stride*i + a, stride*j + b) at i*Wq + j, so a stride-2 tap reads a
#   phase with unit stride;
# - outputs are computed on a "wide" grid of pitch Wq (Ho x Wq, the Wq - Wo extra columns per row
#   are junk), where tap (kh, kw) is acc[i] += w * phase[shift + i] for every i < Ho*Wq at once;
#   its transpose scatters a gradient back the same way, and a weight gradient is the dot product
#   of a gradient plane (junk columns zeroed) with each tap's shifted phase;
# - the valid Ho x Wo block is then copied out.
# The forward visits the taps in (kh, kw) order and a padding position adds w * 0, so a depthwise
# output is the same number a per-tap loop gives. The scratch comes from the caller (the arena).
@njit(inline="always")
def phase_geometry(H, W, k, stride):  # pragma: no cover - compiled
    """(Wq, L): the pitch of a phase plane and the length of one (the last wide row reads up to
    k - 1 entries past the Hq x Wq plane, so each phase carries k entries of slack)."""
    p = (k - 1) // 2
    Hq = (H + 2 * p + stride - 1) // stride
    Wq = (W + 2 * p + stride - 1) // stride
    return Wq, Hq * Wq + k


def phase_scratch_size(H: int, W: int, k: int, stride: int, planes: int = 1) -> int:
    """float32 entries of scratch for ``planes`` input planes in phase layout plus one wide
    accumulator (what the phase-plane kernels take)."""
    p = (k - 1) // 2
    Hq, Wq = -(-(H + 2 * p) // stride), -(-(W + 2 * p) // stride)
    Ho = (H + 2 * p - k) // stride + 1
    return planes * stride * stride * (Hq * Wq + k) + Ho * Wq


@njit(inline="always")
def to_phases(ph, x, n, c, p, stride, Wq, L):  # pragma: no cover - compiled
    """Write plane x[n, c] into the interior of its phase planes ph[0 : stride*stride*L] (the
    padding entries are left as they are: zero, once the caller cleared them)."""
    H, W = x.shape[2], x.shape[3]
    if stride == 1:
        for h in range(H):
            base = (h + p) * Wq + p
            for w in range(W):
                ph[u(base + w)] = x[n, c, u(h), u(w)]
    else:
        for h in range(H):
            a = (h + p) & 1
            row = a * 2 * L + ((h + p) >> 1) * Wq
            for b in range(2):  # even, then odd padded columns: one unit-stride run each
                w0 = (b - p) & 1
                base = row + b * L + ((w0 + p) >> 1)
                for t in range((W - w0 + 1) // 2):
                    ph[u(base + t)] = x[n, c, u(h), u(w0 + 2 * t)]


@njit(inline="always")
def from_phases(dx, n, c, ph, p, stride, Wq, L):  # pragma: no cover - compiled
    """dx[n, c] = the interior of the phase planes ph (the transpose of to_phases)."""
    H, W = dx.shape[2], dx.shape[3]
    if stride == 1:
        for h in range(H):
            base = (h + p) * Wq + p
            for w in range(W):
                dx[n, c, u(h), u(w)] = ph[u(base + w)]
    else:
        for h in range(H):
            a = (h + p) & 1
            row = a * 2 * L + ((h + p) >> 1) * Wq
            for b in range(2):
                w0 = (b - p) & 1
                base = row + b * L + ((w0 + p) >> 1)
                for t in range((W - w0 + 1) // 2):
                    dx[n, c, u(h), u(w0 + 2 * t)] = ph[u(base + t)]


@njit(inline="always")
def tap_shift(kh, kw, stride, Wq, L):  # pragma: no cover - compiled
    """Where tap (kh, kw) reads: the start of its phase plane (kh % stride, kw % stride) plus its
    shift (kh // stride rows, kw // stride columns) on that plane."""
    return (kh % stride) * stride * L + (kw % stride) * L + (kh // stride) * Wq + kw // stride


@njit(inline="always")
def wide_gather(acc, ph, w, o, ci, stride, Wq, L, count):  # pragma: no cover - compiled
    """acc[i] += w[o, ci, kh, kw] * (tap (kh, kw)'s phase, shifted)[i] for i < count, taps in
    (kh, kw) order: the forward of one (output, input) plane pair on the wide grid."""
    k = w.shape[2]
    for kh in range(k):
        for kw in range(k):
            base, wv = tap_shift(kh, kw, stride, Wq, L), w[o, ci, kh, kw]
            for i in range(count):
                acc[u(i)] += wv * ph[u(base + i)]


@njit(inline="always")
def wide_scatter(ph, acc, w, o, ci, stride, Wq, L, count):  # pragma: no cover - compiled
    """(tap (kh, kw)'s phase, shifted)[i] += w[o, ci, kh, kw] * acc[i]: the transpose of
    wide_gather (backward-input). acc's junk columns must be zero."""
    k = w.shape[2]
    for kh in range(k):
        for kw in range(k):
            base, wv = tap_shift(kh, kw, stride, Wq, L), w[o, ci, kh, kw]
            for i in range(count):
                ph[u(base + i)] += wv * acc[u(i)]


@njit(inline="always")
def wide_correlate(dw, j, ci, acc, ph, stride, Wq, L, count):  # pragma: no cover - compiled
    """dw[j, ci, kh, kw] += sum over i < count of acc[i] * (tap (kh, kw)'s phase, shifted)[i]: the
    weight gradient of one (output gradient, input) plane pair. acc's junk columns must be zero."""
    k = dw.shape[2]
    for kh in range(k):
        for kw in range(k):
            base, total = tap_shift(kh, kw, stride, Wq, L), np.float32(0.0)
            for i in range(count):
                total += acc[u(i)] * ph[u(base + i)]
            dw[j, ci, kh, kw] += total


@njit(inline="always")
def from_wide(out, n, o, acc, Wq):  # pragma: no cover - compiled
    """out[n, o] = the valid Ho x Wo block of the wide grid acc."""
    Ho, Wo = out.shape[2], out.shape[3]
    for oh in range(Ho):
        for ow in range(Wo):
            out[n, o, u(oh), u(ow)] = acc[u(oh * Wq + ow)]


@njit(inline="always")
def to_wide(acc, dy, n, o, Wq):  # pragma: no cover - compiled
    """acc = dy[n, o] on the wide grid, junk columns zero."""
    Ho, Wo = dy.shape[2], dy.shape[3]
    for oh in range(Ho):
        for ow in range(Wo):
            acc[u(oh * Wq + ow)] = dy[n, o, u(oh), u(ow)]
        for ow in range(Wo, Wq):
            acc[u(oh * Wq + ow)] = 0.0
