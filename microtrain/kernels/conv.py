"""Full and grouped k x k convolution (stride 1 or 2, padding (k-1)//2), forward and backward.

groups=1 is the first layer of MCUNet / MobileNetV2 / ProxylessNAS (3 -> 16, 3x3, stride 2);
small groups serve TinyTL's lite residual branch. Depthwise (groups = channels) has its own,
faster file. Destinations must not overlap inputs. All three kernels work in phase-plane layout
(see ``_jit.py``) inside a float32 scratch the caller may give (``*_scratch_size``).

Shapes: x (N, I, H, W), w (O, I/groups, k, k), b (O,), y (N, O, Ho, Wo),
Ho = (H + 2p - k) // stride + 1 with p = (k - 1) // 2.
"""
from __future__ import annotations

from numba import njit

from ._jit import (
    array, f32_1, f32_1r, f32_4, f32_4r, fail, from_phases, from_wide, i64, i64_1r, indices,
    int_at_least, kernel, odd_square_kernel, out_size, phase_geometry, phase_scratch_size,
    scratch_for, shape_is, stride_ok, to_phases, to_wide, void, wide_correlate, wide_gather,
    wide_scatter,
)

__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
           "conv2d_forward_scratch_size", "conv2d_backward_input_scratch_size"]


# --------------------------------------------------------------------------- forward
@kernel(void(f32_4, f32_4r, f32_4r, f32_1r, i64, i64, f32_1))
def _conv2d_forward(out, x, w, b, stride, groups, scratch):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O, Ig, k, _ = w.shape
    Og = O // groups
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = out.shape[2] * Wq
    acc = scratch[Ig * S:Ig * S + count]
    scratch[:Ig * S] = 0.0  # the padding; to_phases rewrites only the interior
    for n in range(N):
        for g in range(groups):
            # the group's input planes in phase layout once, then every output plane of the
            # group as a sum over (input, tap) on the wide grid
            for ci in range(Ig):
                to_phases(scratch[ci * S:(ci + 1) * S], x, n, g * Ig + ci, p, stride, Wq, L)
            for o in range(g * Og, (g + 1) * Og):
                acc[:] = b[o]
                for ci in range(Ig):
                    wide_gather(acc, scratch[ci * S:(ci + 1) * S], w, o, ci, stride, Wq, L, count)
                from_wide(out, n, o, acc, Wq)


def conv2d_forward(out, x, w, b, stride, groups, scratch=None):
    """out = conv(x, w) + b. OVERWRITES out.

    out (N, O, Ho, Wo); x (N, I, H, W); w (O, I/groups, k, k); b (O,); stride 1 or 2;
    groups divides I and O; scratch float32 of at least conv2d_forward_scratch_size(x.shape, k,
    stride, groups) entries (allocated when None).
    """
    op = "conv2d_forward"
    _check_conv(op, x, w, stride, groups)
    array(op, "b", b, 1)
    array(op, "out", out, 4, writable=True)
    N, I, H, W = x.shape
    O, k = w.shape[0], w.shape[2]
    shape_is(op, "b", b, (O,), "one bias per output channel")
    shape_is(op, "out", out, (N, O, out_size(H, k, stride), out_size(W, k, stride)))
    need = phase_scratch_size(H, W, k, stride, planes=I // groups)
    _conv2d_forward(out, x, w, b, stride, groups, scratch_for(op, scratch, need))


def conv2d_forward_scratch_size(x_shape, k: int, stride: int, groups: int) -> int:
    """float32 entries of scratch the forward and the weight gradient take: one group's input
    planes."""
    return phase_scratch_size(x_shape[2], x_shape[3], k, stride, planes=x_shape[1] // groups)


# --------------------------------------------------------------------------- backward input
@kernel(void(f32_4, f32_4r, f32_4r, i64, i64, f32_1))
def _conv2d_backward_input(dx, dy, w, stride, groups, scratch):  # pragma: no cover - compiled
    N, I, H, W = dx.shape
    O, Ig, k, _ = w.shape
    Og = O // groups
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = dy.shape[2] * Wq
    ph, acc = scratch[:S], scratch[S:S + count]
    for n in range(N):
        for c in range(I):
            g = c // Ig
            ci = c - g * Ig
            # the transpose of the forward: every output gradient plane of the group, on the
            # wide grid, scattered back once per tap into the zeroed phase planes of dx[n, c]
            ph[:] = 0.0
            for o in range(g * Og, (g + 1) * Og):
                to_wide(acc, dy, n, o, Wq)
                wide_scatter(ph, acc, w, o, ci, stride, Wq, L, count)
            from_phases(dx, n, c, ph, p, stride, Wq, L)


def conv2d_backward_input(dx, dy, w, stride, groups, scratch=None):
    """dx = dL/dx of conv2d_forward given dy = dL/dout. OVERWRITES dx.

    dx (N, I, H, W); dy (N, O, Ho, Wo); w (O, I/groups, k, k); scratch float32 of at least
    conv2d_backward_input_scratch_size(dx.shape, k, stride) entries (allocated when None).
    """
    op = "conv2d_backward_input"
    array(op, "dx", dx, 4, writable=True)
    _check_conv(op, dx, w, stride, groups, xname="dx")
    array(op, "dy", dy, 4)
    N, I, H, W = dx.shape
    O, k = w.shape[0], w.shape[2]
    shape_is(op, "dy", dy, (N, O, out_size(H, k, stride), out_size(W, k, stride)))
    _conv2d_backward_input(dx, dy, w, stride, groups, scratch_for(op, scratch, phase_scratch_size(H, W, k, stride)))


def conv2d_backward_input_scratch_size(x_shape, k: int, stride: int) -> int:
    """float32 entries of scratch the backward-input takes: one plane."""
    return phase_scratch_size(x_shape[2], x_shape[3], k, stride)


# --------------------------------------------------------------------------- backward weight
@njit(inline="always")
def _selects_group(channels, g, Og):  # pragma: no cover - compiled
    """Whether any of ``channels`` lies in group ``g`` (of ``Og`` output channels)."""
    for j in range(channels.shape[0]):
        if channels[j] // Og == g:
            return True
    return False


@kernel(void(f32_4, f32_4r, f32_4r, i64, i64, i64_1r, f32_1), reassoc=True,
        why="each dw entry is a long dot product; vector lanes need the sum reordered")
def _conv2d_backward_weight(dw, dy, x, stride, groups, channels, scratch):  # pragma: no cover - compiled
    N, I, H, W = x.shape
    O, Ig, k = dy.shape[1], dw.shape[1], dw.shape[2]
    Og = O // groups
    p = (k - 1) // 2
    Wq, L = phase_geometry(H, W, k, stride)
    S = stride * stride * L
    count = dy.shape[2] * Wq
    acc = scratch[Ig * S:Ig * S + count]
    scratch[:Ig * S] = 0.0
    dw[:] = 0.0
    # only the selected output channels: each dw entry is the correlation of one output gradient
    # plane with one input plane, a dot product over the wide grid per tap
    for n in range(N):
        for g in range(groups):
            if not _selects_group(channels, g, Og):
                continue
            for ci in range(Ig):
                to_phases(scratch[ci * S:(ci + 1) * S], x, n, g * Ig + ci, p, stride, Wq, L)
            for j in range(channels.shape[0]):
                o = channels[j]
                if o // Og != g:
                    continue
                to_wide(acc, dy, n, o, Wq)
                for ci in range(Ig):
                    wide_correlate(dw, j, ci, acc, scratch[ci * S:(ci + 1) * S], stride, Wq, L, count)


def conv2d_backward_weight(dw, dy, x, stride, groups, channels, scratch=None):
    """Rows of dL/dw for the output channels ``channels`` only (no work for the others).
    OVERWRITES dw.

    dw (len(channels), I/groups, k, k): dw[j] is the gradient of w[channels[j]];
    dy (N, O, Ho, Wo); x (N, I, H, W); channels int64 (J,), distinct, any order, J may be 0;
    scratch as for conv2d_forward.
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
    need = phase_scratch_size(H, W, k, stride, planes=I // groups)
    _conv2d_backward_weight(dw, dy, x, stride, groups, channels, scratch_for(op, scratch, need))


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
