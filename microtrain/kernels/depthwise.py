"""Depthwise k x k convolution (k in 3, 5, 7; stride 1 or 2; padding (k-1)//2), forward and
backward. Each channel is convolved with its own kernel. Destinations must not overlap inputs.

Shapes: x (N, C, H, W), w (C, 1, k, k), b (C,), y (N, C, Ho, Wo),
Ho = (H + 2p - k) // stride + 1 with p = (k - 1) // 2.
"""
from __future__ import annotations

import numpy as np

from ._jit import (
    array, f32_1r, f32_4, f32_4r, fail, i64, i64_1r, indices, kernel, odd_square_kernel,
    out_size, shape_is, stride_ok, tap_gather, tap_scatter, u, valid_range, void,
)

__all__ = ["depthwise_forward", "depthwise_backward_input", "depthwise_backward_weight"]


# --------------------------------------------------------------------------- forward
@kernel(void(f32_4, f32_4r, f32_4r, f32_1r, i64))
def _depthwise_forward(out, x, w, b, stride):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    k = w.shape[2]
    Ho, Wo = out.shape[2], out.shape[3]
    p = (k - 1) // 2
    for n in range(N):
        for c in range(C):
            out[n, c, :, :] = b[c]
            # each tap adds one shifted, strided copy of the input plane times its weight;
            # output rows are the contiguous innermost loop (tap_gather keeps the stride a literal
            # in each branch so LLVM vectorises the unit-stride one with plain vector loads)
            for kh in range(k):
                oh0, oh1 = valid_range(kh - p, stride, H, Ho)
                for kw in range(k):
                    ow0, ow1 = valid_range(kw - p, stride, W, Wo)
                    wv = w[c, 0, kh, kw]
                    tap_gather(out, n, c, x, c, wv, oh0, oh1, ow0, ow1, kh - p, kw - p, stride)


def depthwise_forward(out, x, w, b, stride):
    """out = depthwise_conv(x, w) + b. OVERWRITES out.

    out (N, C, Ho, Wo); x (N, C, H, W); w (C, 1, k, k); b (C,); stride 1 or 2.
    """
    op = "depthwise_forward"
    array(op, "x", x, 4)
    _check_w(op, "x", x, w)
    stride_ok(op, stride)
    array(op, "b", b, 1)
    array(op, "out", out, 4, writable=True)
    N, C, H, W = x.shape
    k = w.shape[2]
    shape_is(op, "b", b, (C,), "one bias per channel")
    shape_is(op, "out", out, (N, C, out_size(H, k, stride), out_size(W, k, stride)))
    _depthwise_forward(out, x, w, b, stride)


# --------------------------------------------------------------------------- backward input
@kernel(void(f32_4, f32_4r, f32_4r, i64))
def _depthwise_backward_input(dx, dy, w, stride):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    k = w.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    p = (k - 1) // 2
    for n in range(N):
        for c in range(C):
            dx[n, c, :, :] = 0.0
            # the transpose of the forward: each output gradient row is scattered back, once
            # per tap, onto the input row it was read from
            for kh in range(k):
                oh0, oh1 = valid_range(kh - p, stride, H, Ho)
                for kw in range(k):
                    ow0, ow1 = valid_range(kw - p, stride, W, Wo)
                    wv = w[c, 0, kh, kw]
                    tap_scatter(dx, n, c, dy, c, wv, oh0, oh1, ow0, ow1, kh - p, kw - p, stride)


def depthwise_backward_input(dx, dy, w, stride):
    """dx = dL/dx of depthwise_forward given dy = dL/dout. OVERWRITES dx.

    dx (N, C, H, W); dy (N, C, Ho, Wo); w (C, 1, k, k).
    """
    op = "depthwise_backward_input"
    array(op, "dx", dx, 4, writable=True)
    _check_w(op, "dx", dx, w)
    stride_ok(op, stride)
    array(op, "dy", dy, 4)
    N, C, H, W = dx.shape
    k = w.shape[2]
    shape_is(op, "dy", dy, (N, C, out_size(H, k, stride), out_size(W, k, stride)))
    _depthwise_backward_input(dx, dy, w, stride)


# --------------------------------------------------------------------------- backward weight
@kernel(void(f32_4, f32_4r, f32_4r, i64, i64_1r), reassoc=True,
        why="each dw entry is a dot product over the plane; vector lanes need the sum reordered")
def _depthwise_backward_weight(dw, dy, x_sel, stride, channels):  # pragma: no cover - compiled
    N, J, H, W = x_sel.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    k = dw.shape[2]
    p = (k - 1) // 2
    # only the selected channels: dw[j] correlates dy[:, channels[j]] with x_sel[:, j], one
    # dot product along rows per tap
    for j in range(J):
        c = channels[j]
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
                                acc += dy[n, c, u(oh), u(ow)] * x_sel[n, j, ih, u(ow + kw - p)]
                    else:
                        for oh in range(oh0, oh1):
                            ih = u(2 * oh + kh - p)
                            for ow in range(ow0, ow1):
                                acc += dy[n, c, u(oh), u(ow)] * x_sel[n, j, ih, u(2 * ow + kw - p)]
                dw[j, 0, kh, kw] = acc


def depthwise_backward_weight(dw, dy, x_sel, stride, channels):
    """Rows of dL/dw for the channels ``channels`` only. OVERWRITES dw.

    dw (J, 1, k, k): dw[j] is the gradient of w[channels[j]]; dy (N, C, Ho, Wo) holds every
    channel; x_sel (N, J, H, W) holds ONLY the selected input channels, x_sel[:, j] being
    channel channels[j]; channels int64 (J,), distinct, any order, J may be 0.
    """
    op = "depthwise_backward_weight"
    array(op, "dw", dw, 4, writable=True)
    array(op, "dy", dy, 4)
    array(op, "x_sel", x_sel, 4)
    stride_ok(op, stride)
    N, C = dy.shape[0], dy.shape[1]
    indices(op, "channels", channels, C, "channels of dy")
    J = channels.shape[0]
    k = odd_square_kernel(op, "dw", dw)
    shape_is(op, "dw", dw, (J, 1, k, k), "len(channels), 1, k, k")
    H, W = x_sel.shape[2], x_sel.shape[3]
    shape_is(op, "x_sel", x_sel, (N, J, H, W), "N of dy, len(channels)")
    shape_is(op, "dy", dy, (N, C, out_size(H, k, stride), out_size(W, k, stride)))
    if J == 0:
        return
    _depthwise_backward_weight(dw, dy, x_sel, stride, channels)


def _check_w(op, xname, x, w):
    array(op, "w", w, 4)
    odd_square_kernel(op, "w", w)
    if w.shape[1] != 1:
        fail(op, f"w {w.shape} must be (C, 1, k, k) for a depthwise convolution")
    if w.shape[0] != x.shape[1]:
        fail(op, f"{xname} {x.shape} and w {w.shape} disagree on channels")
