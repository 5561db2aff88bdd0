"""1x1 convolution (stride 1) and linear layers, forward and backward.

Shapes: pointwise x (N, I, H, W), w (O, I, 1, 1), b (O,), y (N, O, H, W);
        linear    x (N, I),       w (O, I),       b (O,), y (N, O).

Forward and backward-input are plain matrix products, y[n] = W @ x[n] with the spatial map as
columns. They go through NumPy's matmul (its BLAS) into the destination view, with no temporary:
at these shapes (spatial maps of 4x4 to 32x32 at batch 1) hand-written Numba loops measured 2-4x
slower than BLAS, because LLVM cannot keep a register tile when the rows are 16 floats long.
The bias is then added by a small Numba kernel. The weight gradient is Numba: it works on the
selected output channels only, gathering their rows of dy in place, which no BLAS call can do
without a copy. Destinations must not overlap inputs (NumPy would then copy to stay correct).
OpenBLAS picks its own thread count at NumPy import (OPENBLAS_NUM_THREADS); on a busy shared box
its spinning threads can give long tail latencies, so a training process may want it at 1.
"""
from __future__ import annotations

import numpy as np

from ._jit import (
    array, f32_1r, f32_2, f32_2r, f32_4, f32_4r, fail, i64_1r, indices, kernel, shape_is, void,
)

__all__ = [
    "pointwise_forward", "pointwise_backward_input", "pointwise_backward_weight",
    "linear_forward", "linear_backward_input", "linear_backward_weight",
]

_matmul = np.matmul


# --------------------------------------------------------------------------- bias
@kernel(void(f32_4, f32_1r))
def _add_bias_planes(out, b):  # pragma: no cover - compiled
    N, O, H, W = out.shape
    o3 = out.reshape(N, O, H * W)
    # one constant per plane, added along the contiguous plane
    for n in range(N):
        for o in range(O):
            bo = b[o]
            for q in range(H * W):
                o3[n, o, q] += bo


@kernel(void(f32_2, f32_1r))
def _add_bias_rows(out, b):  # pragma: no cover - compiled
    N, O = out.shape
    # the bias vector added to each contiguous row
    for n in range(N):
        for o in range(O):
            out[n, o] += b[o]


# --------------------------------------------------------------------------- pointwise
def pointwise_forward(out, x, w, b):
    """out = W @ x + b per image (1x1 convolution, stride 1). OVERWRITES out.

    out (N, O, H, W); x (N, I, H, W); w (O, I, 1, 1); b (O,).
    """
    op = "pointwise_forward"
    array(op, "x", x, 4)
    _check_w(op, "x", x, w)
    array(op, "b", b, 1)
    array(op, "out", out, 4, writable=True)
    N, I, H, W = x.shape
    O = w.shape[0]
    shape_is(op, "b", b, (O,), "one bias per output channel")
    shape_is(op, "out", out, (N, O, H, W))
    P = H * W
    _matmul(w.reshape(O, I), x.reshape(N, I, P), out=out.reshape(N, O, P))
    _add_bias_planes(out, b)


def pointwise_backward_input(dx, dy, w):
    """dx = W^T @ dy per image. OVERWRITES dx.

    dx (N, I, H, W); dy (N, O, H, W); w (O, I, 1, 1).
    """
    op = "pointwise_backward_input"
    array(op, "dx", dx, 4, writable=True)
    _check_w(op, "dx", dx, w)
    array(op, "dy", dy, 4)
    N, I, H, W = dx.shape
    O = w.shape[0]
    shape_is(op, "dy", dy, (N, O, H, W))
    P = H * W
    _matmul(w.reshape(O, I).T, dy.reshape(N, O, P), out=dx.reshape(N, I, P))


@kernel(void(f32_2, f32_4r, f32_4r, i64_1r), reassoc=True,
        why="each dw entry is a dot product over the spatial map; lanes need the sum reordered")
def _pointwise_backward_weight(dw, dy, x, channels):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O = dy.shape[1]
    P = H * W
    x3 = x.reshape(N, I, P)
    d3 = dy.reshape(N, O, P)
    # dw[j, i] = <dy[:, c_j], x[:, i]> over (n, p); four input rows share each load of the dy
    # row. Every selected row runs the same code whatever the other rows are, so a masked
    # gradient equals the same rows of the full one bit for bit.
    for j in range(channels.shape[0]):
        c = channels[j]
        i = 0
        while i + 4 <= I:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for n in range(N):
                for q in range(P):
                    g = d3[n, c, q]
                    s0 += g * x3[n, i, q]
                    s1 += g * x3[n, i + 1, q]
                    s2 += g * x3[n, i + 2, q]
                    s3 += g * x3[n, i + 3, q]
            dw[j, i] = s0
            dw[j, i + 1] = s1
            dw[j, i + 2] = s2
            dw[j, i + 3] = s3
            i += 4
        while i < I:
            s = np.float32(0.0)
            for n in range(N):
                for q in range(P):
                    s += d3[n, c, q] * x3[n, i, q]
            dw[j, i] = s
            i += 1


def pointwise_backward_weight(dw, dy, x, channels):
    """Rows of dL/dw for the output channels ``channels`` only. OVERWRITES dw.

    dw (J, I, 1, 1): dw[j] is the gradient of w[channels[j]]; dy (N, O, H, W); x (N, I, H, W);
    channels int64 (J,), distinct, any order, J may be 0.
    """
    op = "pointwise_backward_weight"
    array(op, "dw", dw, 4, writable=True)
    array(op, "dy", dy, 4)
    array(op, "x", x, 4)
    N, I, H, W = x.shape
    O = dy.shape[1]
    indices(op, "channels", channels, O, "output channels")
    J = channels.shape[0]
    shape_is(op, "dw", dw, (J, I, 1, 1), "len(channels), I, 1, 1")
    shape_is(op, "dy", dy, (N, O, H, W), "N, O, H, W of x")
    if J:
        _pointwise_backward_weight(dw.reshape(J, I), dy, x, channels)


# --------------------------------------------------------------------------- linear
def linear_forward(out, x, w, b):
    """out = x @ W^T + b. OVERWRITES out.

    out (N, O); x (N, I); w (O, I); b (O,).
    """
    op = "linear_forward"
    array(op, "x", x, 2)
    array(op, "w", w, 2)
    array(op, "b", b, 1)
    array(op, "out", out, 2, writable=True)
    N, I = x.shape
    O = w.shape[0]
    if w.shape[1] != I:
        fail(op, f"x {x.shape} and w {w.shape} disagree on input features")
    shape_is(op, "b", b, (O,), "one bias per output")
    shape_is(op, "out", out, (N, O))
    _matmul(x, w.T, out=out)
    _add_bias_rows(out, b)


def linear_backward_input(dx, dy, w):
    """dx = dy @ W. OVERWRITES dx.

    dx (N, I); dy (N, O); w (O, I).
    """
    op = "linear_backward_input"
    array(op, "dx", dx, 2, writable=True)
    array(op, "dy", dy, 2)
    array(op, "w", w, 2)
    N, I = dx.shape
    O = w.shape[0]
    if w.shape[1] != I:
        fail(op, f"dx {dx.shape} and w {w.shape} disagree on input features")
    shape_is(op, "dy", dy, (N, O))
    _matmul(dy, w, out=dx)


@kernel(void(f32_2, f32_2r, f32_2r, i64_1r))
def _linear_backward_weight(dw, dy, x, channels):  # pragma: no cover - compiled
    N, I = x.shape
    # dw[j, :] = sum_n dy[n, c_j] * x[n, :]: one contiguous axpy along the input features per
    # (row, sample); the same code for every row, so masked rows equal full rows bit for bit
    for j in range(channels.shape[0]):
        c = channels[j]
        for i in range(I):
            dw[j, i] = 0.0
        for n in range(N):
            g = dy[n, c]
            for i in range(I):
                dw[j, i] += g * x[n, i]


def linear_backward_weight(dw, dy, x, channels):
    """Rows of dL/dw for the outputs ``channels`` only. OVERWRITES dw.

    dw (J, I): dw[j] is the gradient of w[channels[j]]; dy (N, O); x (N, I);
    channels int64 (J,), distinct, any order, J may be 0.
    """
    op = "linear_backward_weight"
    array(op, "dw", dw, 2, writable=True)
    array(op, "dy", dy, 2)
    array(op, "x", x, 2)
    N, I = x.shape
    O = dy.shape[1]
    indices(op, "channels", channels, O, "outputs")
    J = channels.shape[0]
    shape_is(op, "dw", dw, (J, I), "len(channels), I")
    shape_is(op, "dy", dy, (N, O), "N of x, O")
    if J:
        _linear_backward_weight(dw, dy, x, channels)


def _check_w(op, xname, x, w):
    array(op, "w", w, 4)
    if w.shape[2:] != (1, 1):
        fail(op, f"w {w.shape} must be (O, I, 1, 1) for a 1x1 convolution")
    if w.shape[1] != x.shape[1]:
        fail(op, f"{xname} {x.shape} and w {w.shape} disagree on channels")
