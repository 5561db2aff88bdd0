"""1x1 convolution (stride 1) and linear layers, forward and backward.

Shapes: pointwise x (N, I, H, W), w (O, I, 1, 1), b (O,), y (N, O, H, W);
        linear    x (N, I),       w (O, I),       b (O,), y (N, O).

Forward and backward-input are plain matrix products, y[n] = W @ x[n] with the spatial map as
columns. They go through NumPy's matmul (its BLAS) into the destination view, with no temporary:
at these shapes (spatial maps of 4x4 to 32x32 at batch 1) hand-written Numba loops measured 2-4x
slower than BLAS, because LLVM cannot keep a register tile when the rows are 16 floats long.
The bias is then added by a small Numba kernel. The weight gradient is Numba (see the comment
above it): a matrix product over the batch's positions for the selected output channels only,
in register tiles, its rows bit-identical whatever else is selected. Destinations must not
overlap inputs (NumPy would then copy to stay correct).
OpenBLAS picks its own thread count at NumPy import (OPENBLAS_NUM_THREADS); on a busy shared box
its spinning threads can give long tail latencies, so a training process may want it at 1.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._jit import (
    array, f32_1, f32_1r, f32_2, f32_2r, f32_4, f32_4r, fail, i64_1r, indices, kernel, scratch_for,
    shape_is, u, void,
)

__all__ = [
    "pointwise_forward", "pointwise_backward_input", "pointwise_backward_weight",
    "pointwise_backward_weight_scratch_size",
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


# The weight gradient is a matrix product dw = dY X^T whose inner dimension runs over every
# (image, position) pair: dw[j, i] = sum over n, q of dy[n, c_j, q] * x[n, i, q]. It is computed
# in 4 x 4 tiles of dw, each 16 dot products sharing their loads (four dy rows times four x
# rows), which LLVM turns into 16 vector accumulators: 47 GMAC/s on one core, where one output
# channel at a time streamed the whole batch's x per channel at 4-5. How the rows are read:
# - maps of PACK_POSITIONS or more (or one image): in place, image by image;
# - smaller maps: a dot product over one image's map is too short to pay for the final
#   reduction of the vector accumulators (16 positions at 4x4), so the rows of up to
#   ceil(PACK_POSITIONS / P) images are first copied side by side into the scratch, one long row
#   per channel;
# - fewer than SHORT_DOT positions in the whole batch (one image, 4x4 to 7x7): shorter than the
#   vector loop's entry condition; x is transposed into the scratch and each dw row summed as
#   axpys along the input channels.
# The way depends on N and P only, never on the selected channels.
PACK_POSITIONS = 512
SHORT_DOT = 64


@njit(inline="always")
def _padded_row(I):  # pragma: no cover - compiled
    """I rounded up to a multiple of 64 floats (four 16-lane vectors)."""
    return (I + 63) // 64 * 64


@njit(inline="always")
def _pack_images(N, P):  # pragma: no cover - compiled
    """Images per packed block: 1 (no packing) for maps of PACK_POSITIONS or more, or one image."""
    if N == 1 or P >= PACK_POSITIONS:
        return 1
    return min(N, (PACK_POSITIONS + P - 1) // P)


@njit(inline="always")
def _dot_tile(A, a0, a1, a2, a3, B, b0, b1, b2, b3, L):  # pragma: no cover - compiled
    """The 16 dot products sum_{q<L} A[a_r + q] * B[b_c + q] of four A rows by four B rows,
    row-major (a0 b0, a0 b1, ..., a3 b3)."""
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = np.float32(0.0)
    s30 = s31 = s32 = s33 = np.float32(0.0)
    for q in range(L):
        x0, x1, x2, x3 = B[u(b0 + q)], B[u(b1 + q)], B[u(b2 + q)], B[u(b3 + q)]
        g = A[u(a0 + q)]
        s00 += g * x0
        s01 += g * x1
        s02 += g * x2
        s03 += g * x3
        g = A[u(a1 + q)]
        s10 += g * x0
        s11 += g * x1
        s12 += g * x2
        s13 += g * x3
        g = A[u(a2 + q)]
        s20 += g * x0
        s21 += g * x1
        s22 += g * x2
        s23 += g * x3
        g = A[u(a3 + q)]
        s30 += g * x0
        s31 += g * x1
        s32 += g * x2
        s33 += g * x3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(inline="always")
def _row(rows, gather, j, J):  # pragma: no cover - compiled
    """Row j of a tile (clamped to the last row J - 1): rows[j] when gathering, else j."""
    j = min(j, J - 1)
    return rows[j] if gather else j


@njit(inline="always")
def _store_row(dw, j, i0, first, s0, s1, s2, s3):  # pragma: no cover - compiled
    """dw[j, i0:i0+4] (first: =, else +=) (s0, s1, s2, s3), the columns past the end dropped."""
    I = dw.shape[1]
    for c in range(min(4, I - i0)):
        v = s0 if c == 0 else (s1 if c == 1 else (s2 if c == 2 else s3))
        if first:
            dw[j, i0 + c] = v
        else:
            dw[j, i0 + c] += v


@njit(inline="always")
def _dw_block(dw, j0, first, A, a_base, a_pitch, rows, gather, B, b_base, b_pitch,
              L):  # pragma: no cover - compiled
    """dw[j0:j0+4, :] (first: =, else +=) the dot products over L entries of A rows
    (a_base + r * a_pitch, r = rows[j] if gather else j) with every B row (b_base + i * b_pitch).
    Rows past the end repeat the last one (results dropped), so every row of dw runs the same
    code whatever its place in a tile: a masked gradient equals the full one's rows bit for bit."""
    J, I = dw.shape
    a0 = a_base + _row(rows, gather, j0, J) * a_pitch
    a1 = a_base + _row(rows, gather, j0 + 1, J) * a_pitch
    a2 = a_base + _row(rows, gather, j0 + 2, J) * a_pitch
    a3 = a_base + _row(rows, gather, j0 + 3, J) * a_pitch
    rows_here = min(4, J - j0)
    for i0 in range(0, I, 4):
        b0, b1 = b_base + min(i0, I - 1) * b_pitch, b_base + min(i0 + 1, I - 1) * b_pitch
        b2, b3 = b_base + min(i0 + 2, I - 1) * b_pitch, b_base + min(i0 + 3, I - 1) * b_pitch
        (s00, s01, s02, s03, s10, s11, s12, s13,
         s20, s21, s22, s23, s30, s31, s32, s33) = _dot_tile(A, a0, a1, a2, a3, B, b0, b1, b2, b3, L)
        _store_row(dw, j0, i0, first, s00, s01, s02, s03)
        if rows_here > 1:
            _store_row(dw, j0 + 1, i0, first, s10, s11, s12, s13)
        if rows_here > 2:
            _store_row(dw, j0 + 2, i0, first, s20, s21, s22, s23)
        if rows_here > 3:
            _store_row(dw, j0 + 3, i0, first, s30, s31, s32, s33)


@kernel(void(f32_2, f32_4r, f32_4r, i64_1r, f32_1), reassoc=True,
        why="each dw entry is a dot product over the batch's positions; lanes need the sum reordered")
def _pointwise_backward_weight(dw, dy, x, channels, scratch):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O, J, P = dy.shape[1], channels.shape[0], H * W
    d1 = dy.reshape(N * O * P)
    x1 = x.reshape(N * I * P)
    if N * P < SHORT_DOT:
        # so few positions that a dot product is shorter than a few vectors: x transposed into
        # the scratch, xt[n * P + q, i] with rows padded to Ip (a whole number of vector loop
        # iterations, zero beyond I), and each dw row summed as axpys of its rows into acc
        Ip = _padded_row(I)
        acc, xt = scratch[:Ip], scratch[Ip:Ip + N * P * Ip]
        xt[:] = 0.0
        for n in range(N):
            for i in range(I):
                for q in range(P):
                    xt[u((n * P + q) * Ip + i)] = x1[u((n * I + i) * P + q)]
        for j in range(J):
            acc[:] = 0.0
            for n in range(N):
                base = (n * O + channels[j]) * P
                for q in range(P):
                    g, row = d1[u(base + q)], (n * P + q) * Ip
                    for i in range(Ip):
                        acc[u(i)] += g * xt[u(row + i)]
            for i in range(I):
                dw[j, i] = acc[u(i)]
        return
    G = _pack_images(N, P)
    if G == 1:
        # large maps (or one image): rows read in place, one image at a time
        for n in range(N):
            for j0 in range(0, J, 4):
                _dw_block(dw, j0, n == 0, d1, n * O * P, P, channels, True, x1, n * I * P, P, P)
        return
    # small maps: G images' rows of each channel copied side by side, one long dot product each
    for n0 in range(0, N, G):
        g = min(G, N - n0)
        L = g * P
        pa, pb = scratch[:J * L], scratch[J * L:(J + I) * L]
        for j in range(J):
            for t in range(g):
                src = ((n0 + t) * O + channels[j]) * P
                for q in range(P):
                    pa[u(j * L + t * P + q)] = d1[u(src + q)]
        for i in range(I):
            for t in range(g):
                src = ((n0 + t) * I + i) * P
                for q in range(P):
                    pb[u(i * L + t * P + q)] = x1[u(src + q)]
        for j0 in range(0, J, 4):
            _dw_block(dw, j0, n0 == 0, pa, 0, L, channels, False, pb, 0, L, L)


def pointwise_backward_weight_scratch_size(x_shape, J: int) -> int:
    """float32 entries of scratch pointwise_backward_weight takes for x (N, I, H, W) and J
    selected output channels: the packed rows of a block of images (0 when nothing is packed)."""
    N, I, H, W = x_shape
    P = H * W
    if N * P < SHORT_DOT:
        return (N * P + 1) * _padded_row(I)
    if N == 1 or P >= PACK_POSITIONS:
        return 0
    return (J + I) * min(N, -(-PACK_POSITIONS // P)) * P


def pointwise_backward_weight(dw, dy, x, channels, scratch=None):
    """Rows of dL/dw for the output channels ``channels`` only. OVERWRITES dw.

    dw (J, I, 1, 1): dw[j] is the gradient of w[channels[j]]; dy (N, O, H, W); x (N, I, H, W);
    channels int64 (J,), distinct, any order, J may be 0; scratch float32 of at least
    pointwise_backward_weight_scratch_size(x.shape, J) entries (allocated when None). A row of dw
    is the same number whichever other rows are selected.
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
        need = pointwise_backward_weight_scratch_size(x.shape, J)
        scratch = _EMPTY if need == 0 and scratch is None else scratch_for(op, scratch, need)
        _pointwise_backward_weight(dw.reshape(J, I), dy, x, channels, scratch)


_EMPTY = np.empty(0, np.float32)


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
