"""Depthwise k x k convolution (k in 3, 5, 7; stride 1 or 2; padding (k-1)//2), forward and
backward. Each channel is convolved with its own kernel. Destinations must not overlap inputs.
All three kernels work plane by plane in phase-plane layout (see ``_jit.py``) inside a float32
scratch of ``depthwise_scratch_size`` entries that the caller may give.

Shapes: x (N, C, H, W), w (C, 1, k, k), b (C,), y (N, C, Ho, Wo),
Ho = (H + 2p - k) // stride + 1 with p = (k - 1) // 2.
"""
from __future__ import annotations

from ._jit import (
    array, f32_1, f32_1r, f32_4, f32_4r, fail, from_phases, from_wide, i64, i64_1r, indices, kernel,
    odd_square_kernel, out_size, phase_geometry, phase_scratch_size, scratch_for, shape_is, stride_ok,
    to_phases, to_wide, void, wide_correlate, wide_gather, wide_scatter,
)

__all__ = ["depthwise_forward", "depthwise_backward_input", "depthwise_backward_weight", "depthwise_scratch_size"]


# --------------------------------------------------------------------------- forward
@kernel(void(f32_4, f32_4r, f32_4r, f32_1r, i64, f32_1))
def _depthwise_forward(out, x, w, b, stride, scratch):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    k = w.shape[2]
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = out.shape[2] * Wq
    ph, acc = scratch[:S], scratch[S:S + count]
    ph[:] = 0.0  # the padding; to_phases rewrites only the interior
    for n in range(N):
        for c in range(C):
            to_phases(ph, x, n, c, p, stride, Wq, L)
            acc[:] = b[c]
            wide_gather(acc, ph, w, c, 0, stride, Wq, L, count)
            from_wide(out, n, c, acc, Wq)


def depthwise_forward(out, x, w, b, stride, scratch=None):
    """out = depthwise_conv(x, w) + b. OVERWRITES out.

    out (N, C, Ho, Wo); x (N, C, H, W); w (C, 1, k, k); b (C,); stride 1 or 2; scratch float32
    of at least depthwise_scratch_size(x.shape, k, stride) entries (allocated when None).
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
    _depthwise_forward(out, x, w, b, stride, scratch_for(op, scratch, phase_scratch_size(H, W, k, stride)))


def depthwise_scratch_size(x_shape, k: int, stride: int) -> int:
    """float32 entries of scratch each of the three kernels takes (one plane)."""
    return phase_scratch_size(x_shape[2], x_shape[3], k, stride)


# --------------------------------------------------------------------------- backward input
@kernel(void(f32_4, f32_4r, f32_4r, i64, f32_1))
def _depthwise_backward_input(dx, dy, w, stride, scratch):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    k = w.shape[2]
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = dy.shape[2] * Wq
    ph, acc = scratch[:S], scratch[S:S + count]
    for n in range(N):
        for c in range(C):
            # the transpose of the forward: the output gradient plane, on the wide grid, is
            # scattered back once per tap into the zeroed phase planes of dx[n, c]
            ph[:] = 0.0
            to_wide(acc, dy, n, c, Wq)
            wide_scatter(ph, acc, w, c, 0, stride, Wq, L, count)
            from_phases(dx, n, c, ph, p, stride, Wq, L)


def depthwise_backward_input(dx, dy, w, stride, scratch=None):
    """dx = dL/dx of depthwise_forward given dy = dL/dout. OVERWRITES dx.

    dx (N, C, H, W); dy (N, C, Ho, Wo); w (C, 1, k, k); scratch as for depthwise_forward.
    """
    op = "depthwise_backward_input"
    array(op, "dx", dx, 4, writable=True)
    _check_w(op, "dx", dx, w)
    stride_ok(op, stride)
    array(op, "dy", dy, 4)
    N, C, H, W = dx.shape
    k = w.shape[2]
    shape_is(op, "dy", dy, (N, C, out_size(H, k, stride), out_size(W, k, stride)))
    _depthwise_backward_input(dx, dy, w, stride, scratch_for(op, scratch, phase_scratch_size(H, W, k, stride)))


# --------------------------------------------------------------------------- backward weight
@kernel(void(f32_4, f32_4r, f32_4r, i64, i64_1r, f32_1), reassoc=True,
        why="each dw entry is a dot product over the plane; vector lanes need the sum reordered")
def _depthwise_backward_weight(dw, dy, x_sel, stride, channels, scratch):  # pragma: no cover - compiled
    N, J, H, W = x_sel.shape
    k = dw.shape[2]
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = dy.shape[2] * Wq
    ph, acc = scratch[:S], scratch[S:S + count]
    ph[:] = 0.0
    dw[:] = 0.0
    # only the selected channels: dw[j] correlates dy[:, channels[j]] with x_sel[:, j], one dot
    # product over the wide grid per tap
    for j in range(J):
        for n in range(N):
            to_phases(ph, x_sel, n, j, p, stride, Wq, L)
            to_wide(acc, dy, n, channels[j], Wq)
            wide_correlate(dw, j, 0, acc, ph, stride, Wq, L, count)


def depthwise_backward_weight(dw, dy, x_sel, stride, channels, scratch=None):
    """Rows of dL/dw for the channels ``channels`` only. OVERWRITES dw.

    dw (J, 1, k, k): dw[j] is the gradient of w[channels[j]]; dy (N, C, Ho, Wo) holds every
    channel; x_sel (N, J, H, W) holds ONLY the selected input channels, x_sel[:, j] being
    channel channels[j]; channels int64 (J,), distinct, any order, J may be 0; scratch as for
    depthwise_forward.
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
    need = phase_scratch_size(H, W, k, stride)
    _depthwise_backward_weight(dw, dy, x_sel, stride, channels, scratch_for(op, scratch, need))


def _check_w(op, xname, x, w):
    array(op, "w", w, 4)
    odd_square_kernel(op, "w", w)
    if w.shape[1] != 1:
        fail(op, f"w {w.shape} must be (C, 1, k, k) for a depthwise convolution")
    if w.shape[0] != x.shape[1]:
        fail(op, f"{xname} {x.shape} and w {w.shape} disagree on channels")
