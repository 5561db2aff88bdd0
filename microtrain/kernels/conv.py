"""Full and grouped k x k convolution (stride 1 or 2, padding (k-1)//2), forward and backward.

groups=1 is the first layer of MCUNet / MobileNetV2 / ProxylessNAS (3 -> 16, 3x3, stride 2);
small groups serve TinyTL's lite residual branch. Depthwise (groups = channels) has its own,
faster file. Destinations must not overlap inputs.

Shapes: x (N, I, H, W), w (O, I/groups, k, k), b (O,), y (N, O, Ho, Wo),
Ho = (H + 2p - k) // stride + 1 with p = (k - 1) // 2.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._jit import (
    array, f32_1r, f32_4, f32_4r, fail, i64, i64_1r, indices, int_at_least, kernel,
    odd_square_kernel, out_size, shape_is, stride_ok, tap_gather, tap_scatter, u,
    valid_range, void,
)

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight"]


# --------------------------------------------------------------------------- forward
@njit(inline="always")
def _row3(out, x, w, n, o, c, ci, kh, oh0, oh1, stride, W, Wo):  # pragma: no cover - compiled
    """Add kernel row kh of a 3x3 kernel (padding 1) to output rows [oh0, oh1) of out[n, o]."""
    w0, w1, w2 = w[o, ci, kh, 0], w[o, ci, kh, 1], w[o, ci, kh, 2]
    lo = valid_range(-1, stride, W, Wo)[0]        # first column whose left tap is inside
    hi = valid_range(1, stride, W, Wo)[1]         # past the last column whose right tap is
    if hi < lo:
        hi = lo
    for oh in range(oh0, oh1):
        ih = u(stride * oh + kh - 1)
        # interior columns: all three taps inside the row; stride literal per branch
        if stride == 1:
            for ow in range(lo, hi):
                out[n, o, u(oh), u(ow)] += (w0 * x[n, c, ih, u(ow - 1)] + w1 * x[n, c, ih, u(ow)]
                                            + w2 * x[n, c, ih, u(ow + 1)])
        else:
            for ow in range(lo, hi):
                out[n, o, u(oh), u(ow)] += (w0 * x[n, c, ih, u(2 * ow - 1)] + w1 * x[n, c, ih, u(2 * ow)]
                                            + w2 * x[n, c, ih, u(2 * ow + 1)])
        # edge columns (at most one per side), tap by tap with the padding skipped
        for e in range(lo + Wo - hi):
            ow = e if e < lo else hi + e - lo
            for kw in range(3):
                iw = stride * ow + kw - 1
                if iw >= 0 and iw < W:
                    out[n, o, u(oh), u(ow)] += w[o, ci, kh, kw] * x[n, c, ih, u(iw)]


@kernel(void(f32_4, f32_4r, f32_4r, f32_1r, i64, i64))
def _conv2d_forward(out, x, w, b, stride, groups):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O, Ig, k, _ = w.shape
    Ho, Wo = out.shape[2], out.shape[3]
    Og = O // groups
    p = (k - 1) // 2
    for n in range(N):
        for o in range(O):
            out[n, o, :, :] = b[o]
            c0 = (o // Og) * Ig
            # each tap (ci, kh, kw) adds a shifted, strided input plane times one weight; output
            # rows are the contiguous innermost loop and the plane stays in L1 across taps
            # (tap_gather keeps the stride a literal per branch so LLVM vectorises unit stride)
            for ci in range(Ig):
                c = c0 + ci
                for kh in range(k):
                    oh0, oh1 = valid_range(kh - p, stride, H, Ho)
                    if k == 3:
                        # the three taps of a kernel row in one body: at stride 2 they read
                        # both even and odd inputs, which LLVM loads as whole vectors and
                        # de-interleaves (measured ~3x faster than one tap per pass)
                        _row3(out, x, w, n, o, c, ci, kh, oh0, oh1, stride, W, Wo)
                        continue
                    for kw in range(k):
                        ow0, ow1 = valid_range(kw - p, stride, W, Wo)
                        wv = w[o, ci, kh, kw]
                        tap_gather(out, n, o, x, c, wv, oh0, oh1, ow0, ow1, kh - p, kw - p, stride)


def conv2d_forward(out, x, w, b, stride, groups):
    """out = conv(x, w) + b. OVERWRITES out.

    out (N, O, Ho, Wo); x (N, I, H, W); w (O, I/groups, k, k); b (O,); stride 1 or 2;
    groups divides I and O.
    """
    op = "conv2d_forward"
    _check_conv(op, x, w, stride, groups)
    array(op, "b", b, 1)
    array(op, "out", out, 4, writable=True)
    N, I, H, W = x.shape
    O, k = w.shape[0], w.shape[2]
    shape_is(op, "b", b, (O,), "one bias per output channel")
    shape_is(op, "out", out, (N, O, out_size(H, k, stride), out_size(W, k, stride)))
    _conv2d_forward(out, x, w, b, stride, groups)


# --------------------------------------------------------------------------- backward input
@kernel(void(f32_4, f32_4r, f32_4r, i64, i64))
def _conv2d_backward_input(dx, dy, w, stride, groups):  # pragma: no cover - compiled
    N, I, H, W = dx.shape
    O, Ig, k, _ = w.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    Og = O // groups
    p = (k - 1) // 2
    for n in range(N):
        for c in range(I):
            dx[n, c, :, :] = 0.0
            g = c // Ig
            ci = c - g * Ig
            # the transpose of the forward: each output gradient row is scattered back, once per
            # tap, onto the input row it was read from; one input plane is finished at a time
            for o in range(g * Og, (g + 1) * Og):
                for kh in range(k):
                    oh0, oh1 = valid_range(kh - p, stride, H, Ho)
                    for kw in range(k):
                        ow0, ow1 = valid_range(kw - p, stride, W, Wo)
                        wv = w[o, ci, kh, kw]
                        tap_scatter(dx, n, c, dy, o, wv, oh0, oh1, ow0, ow1, kh - p, kw - p, stride)


def conv2d_backward_input(dx, dy, w, stride, groups):
    """dx = dL/dx of conv2d_forward given dy = dL/dout. OVERWRITES dx.

    dx (N, I, H, W); dy (N, O, Ho, Wo); w (O, I/groups, k, k).
    """
    op = "conv2d_backward_input"
    array(op, "dx", dx, 4, writable=True)
    _check_conv(op, dx, w, stride, groups, xname="dx")
    array(op, "dy", dy, 4)
    N, I, H, W = dx.shape
    O, k = w.shape[0], w.shape[2]
    shape_is(op, "dy", dy, (N, O, out_size(H, k, stride), out_size(W, k, stride)))
    _conv2d_backward_input(dx, dy, w, stride, groups)


# --------------------------------------------------------------------------- backward weight
@kernel(void(f32_4, f32_4r, f32_4r, i64, i64, i64_1r), reassoc=True,
        why="each dw entry is a long dot product; vector lanes need the sum reordered")
def _conv2d_backward_weight(dw, dy, x, stride, groups, channels):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    Ig, k = dw.shape[1], dw.shape[2]
    Og = O // groups
    p = (k - 1) // 2
    # only the selected output channels: each dw entry is the correlation of one output
    # gradient plane with one shifted input plane, a dot product along rows
    for j in range(channels.shape[0]):
        o = channels[j]
        c0 = (o // Og) * Ig
        for ci in range(Ig):
            c = c0 + ci
            for kh in range(k):
                oh0, oh1 = valid_range(kh - p, stride, H, Ho)
                for kw in range(k):
                    ow0, ow1 = valid_range(kw - p, stride, W, Wo)
                    acc = np.float32(0.0)
                    for n in range(N):
                        if stride == 1:
                            for oh in range(oh0, oh1):
                                ih = u(oh + kh - p)
                                for ow in range(ow0, ow1):
                                    acc += dy[n, o, u(oh), u(ow)] * x[n, c, ih, u(ow + kw - p)]
                        else:
                            for oh in range(oh0, oh1):
                                ih = u(2 * oh + kh - p)
                                for ow in range(ow0, ow1):
                                    acc += dy[n, o, u(oh), u(ow)] * x[n, c, ih, u(2 * ow + kw - p)]
                    dw[j, ci, kh, kw] = acc


def conv2d_backward_weight(dw, dy, x, stride, groups, channels):
    """Rows of dL/dw for the output channels ``channels`` only (no work for the others).
    OVERWRITES dw.

    dw (len(channels), I/groups, k, k): dw[j] is the gradient of w[channels[j]];
    dy (N, O, Ho, Wo); x (N, I, H, W); channels int64 (J,), distinct, any order, J may be 0.
    """
    op = "conv2d_backward_weight"
    array(op, "dw", dw, 4, writable=True)
    _check_conv(op, x, None, stride, groups)
    array(op, "dy", dy, 4)
    N, I, H, W = x.shape
    O = dy.shape[1]
    if O % groups:
        fail(op, f"dy {dy.shape} has {O} channels, not divisible by groups={groups}")
    indices(op, "channels", channels, O, "output channels")
    J = channels.shape[0]
    k = dw.shape[2]
    if dw.shape[3] != k or k % 2 == 0:
        fail(op, f"dw {dw.shape} must hold odd square k x k kernels")
    shape_is(op, "dw", dw, (J, I // groups, k, k), "len(channels), I/groups, k, k")
    shape_is(op, "dy", dy, (N, O, out_size(H, k, stride), out_size(W, k, stride)))
    if J == 0:
        return
    _conv2d_backward_weight(dw, dy, x, stride, groups, channels)


# --------------------------------------------------------------------------- checks
def _check_conv(op, x, w, stride, groups, xname="x"):
    """Shared checks: x (and w unless None) arrays, stride, groups dividing the channels."""
    array(op, xname, x, 4)
    stride_ok(op, stride)
    int_at_least(op, "groups", groups, 1)
    I = x.shape[1]
    if I % groups:
        fail(op, f"{xname} {x.shape} has {I} channels, not divisible by groups={groups}")
    if w is None:
        return
    array(op, "w", w, 4)
    odd_square_kernel(op, "w", w)
    O = w.shape[0]
    if O % groups:
        fail(op, f"w {w.shape} has {O} output channels, not divisible by groups={groups}")
    if w.shape[1] * groups != I:
        fail(op, f"{xname} {x.shape} and w {w.shape} disagree on channels "
                 f"(groups={groups} needs w.shape[1] = {I // groups})")
