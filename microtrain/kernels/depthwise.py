"""Depthwise k x k convolution (k in 3, 5, 7; stride 1 or 2; padding (k-1)//2), forward and
backward. Each channel is convolved with its own kernel. Destinations must not overlap inputs.
All three kernels work in a float32 scratch of ``depthwise_scratch_size`` entries that the caller
may give, in one of two layouts chosen from the map and kernel shape (``uses_channel_blocks``;
never from the batch size or the selected channels):
- plane by plane in phase-plane layout (see ``_jit.py``): maps of 8x8 and more;
- channel blocks (see below): LANES channels of one image side by side, channel index fastest,
  where the phase plane's loops would be short or mostly padding (4x4 maps, 7x7 kernels on 8x8).
Both sum each output and input-gradient element's terms in the same order, so they agree bit for
bit on those; the weight gradients differ by rounding (they sum over the batch in another order).

Shapes: x (N, C, H, W), w (C, 1, k, k), b (C,), y (N, C, Ho, Wo),
Ho = (H + 2p - k) // stride + 1 with p = (k - 1) // 2.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._jit import (
    array, f32_1, f32_1r, f32_4, f32_4r, fail, from_phases, from_wide, i64, i64_1r, indices, kernel,
    odd_square_kernel, out_size, phase_geometry, phase_scratch_size, scratch_for, shape_is, stride_ok,
    to_phases, to_wide, u, void, wide_correlate, wide_gather, wide_scatter,
)

__all__ = ["depthwise_forward", "depthwise_backward_input", "depthwise_backward_weight", "depthwise_scratch_size"]


# --------------------------------------------------------------------------- channel blocks
# On small maps a plane's rows can be too short for vector loops (a 4x4 map's row is 4 floats; the
# phase plane's wide rows add k - 1 junk columns to each), so the kernels take the channels
# LANES at a time (a block) and copy each image's planes of the block into the scratch with the
# channel index fastest, xt[pos * LANES + cc] = x[n, c0 + cc, pos] (zero lanes past the last
# channel): reading them is one contiguous stretch of x. Input positions are split into
# stride x stride phases like the phase planes, phase (a, b) holding (s*i + a, s*j + b) at
# ((a*s + b)*Hs + i)*Ws + j, so consecutive output columns read consecutive positions at stride
# 2 too, and a tap on one output row is one contiguous loop over (columns, channels). Each
# channel has its own weight, so a block's weights are laid out along such a row once per block
# (wr[tap][col * LANES + cc] = w[c0 + cc, tap], the same for every column). There is no padding:
# a tap runs only over the columns whose input lies inside the map (on 4x4 maps with 5x5
# kernels half the taps of a padded plane fall outside). Each output (and input-gradient)
# element sums its taps in (kh, kw) order from the bias (zero), as the phase-plane path does,
# so both give the same forward and input gradient; the weight gradient sums each channel's
# products per (tap, output column) over images and rows, then over the columns.
LANES = 64  # channels per block: four 16-float vectors (a multiple of the vector loop's step)
_NO_CHANNELS = np.empty(0, np.int64)


def uses_channel_blocks(H: int, W: int, k: int, stride: int) -> bool:
    """Whether the depthwise kernels work in channel blocks (else phase planes) on H x W maps:
    when the phase plane's tap loop is short (Ho * Wq <= 32 floats, two vectors) or mostly junk
    (Wq > 5/3 Wo: the k - 1 padding columns of a narrow map). The choice depends on the shapes
    only, never on the batch or the selected channels. Measured on MCUNet's shapes (AVX-512,
    batch 100, blocks/planes CPU time for forward, input and weight gradient): 4x4 k3 0.3-0.8,
    4x4 k5 0.3-0.5, 8x8 k7 0.5-0.7, 8x8 k7 stride 2 0.2-0.4, 8x8 k5 stride 2 0.5-0.6; but
    8x8 k3 1.2-1.7, 8x8 k5 0.9-1.2 (1.3-1.5 at batch 1), 16x16 k3 2.5-3 (the copies into and
    out of a block cost more than the phase plane's few junk columns)."""
    Ho, Wo = out_size(H, k, stride), out_size(W, k, stride)
    p = (k - 1) // 2
    Wq = -(-(W + 2 * p) // stride)
    return Ho * Wq <= 32 or 3 * Wq > 5 * Wo


def _block_scratch_size(H: int, W: int, k: int, stride: int) -> int:
    """float32 entries the channel-block kernels take: a block's input in phases, its output
    plane, and its weights (and biases) along a row, or the weight gradient's row sums."""
    Hs, Ws = -(-H // stride), -(-W // stride)
    Ho, Wo = out_size(H, k, stride), out_size(W, k, stride)
    return LANES * (stride * stride * Hs * Ws + Ho * Wo + (k * k + 1) * max(Wo, Ws))


# With s in (1, 2), m = s - 1 is both the shift that divides by s and the mask that takes the
# remainder (floor division and a non-negative remainder for negative numbers too): the index
# arithmetic around every loop has no integer division.
@njit(inline="always")
def _valid_columns(kw, p, m, W, Wo):  # pragma: no cover - compiled
    """[lo, hi): the output columns ow whose input column s*ow + kw - p lies in [0, W)."""
    lo = max(0, (p - kw + m) >> m)
    hi = min(Wo, ((W - 1 + p - kw) >> m) + 1)
    return lo, hi


@njit(inline="always")
def _phase_index(ih, iw, m, Hs, Ws):  # pragma: no cover - compiled
    """Position of input (ih, iw) in the phase layout of a block (times LANES)."""
    return ((((ih & m) << m) + (iw & m)) * Hs + (ih >> m)) * Ws + (iw >> m)


# The copies run channel-fastest on the block's side with a constant LANES when the block is
# full: the compiler then emits plain loads and stores (a loop of run-time length across the
# planes became vector gathers and scatters, 3x slower).
@njit(inline="always")
def _to_block(xt, x, n, c0, g, m, Hs, Ws):  # pragma: no cover - compiled
    """xt[_phase_index(h, w) * LANES + cc] = x[n, c0 + cc, h, w] for cc < g, zero for g <= cc."""
    H, W = x.shape[2], x.shape[3]
    if g < LANES:
        xt[:] = 0.0
    for h in range(H):
        for b in range(min(m + 1, W)):  # the columns of one phase are consecutive positions
            base = _phase_index(h, b, m, Hs, Ws) * LANES
            for j in range((W - b + m) >> m):
                w = (j << m) + b
                if g == LANES:
                    for cc in range(LANES):
                        xt[u(base + j * LANES + cc)] = x[n, c0 + cc, u(h), u(w)]
                else:
                    for cc in range(g):
                        xt[u(base + j * LANES + cc)] = x[n, c0 + cc, u(h), u(w)]


@njit(inline="always")
def _from_block(dx, n, c0, g, xt, m, Hs, Ws):  # pragma: no cover - compiled
    """dx[n, c0 + cc] = the block xt for cc < g (the transpose of _to_block)."""
    H, W = dx.shape[2], dx.shape[3]
    for h in range(H):
        for b in range(min(m + 1, W)):
            base = _phase_index(h, b, m, Hs, Ws) * LANES
            for j in range((W - b + m) >> m):
                w = (j << m) + b
                if g == LANES:
                    for cc in range(LANES):
                        dx[n, c0 + cc, u(h), u(w)] = xt[u(base + j * LANES + cc)]
                else:
                    for cc in range(g):
                        dx[n, c0 + cc, u(h), u(w)] = xt[u(base + j * LANES + cc)]


@njit(inline="always")
def _rows_to_block(yt, y, n, c0, g, channels, gather):  # pragma: no cover - compiled
    """yt[q * LANES + cc] = y[n, c, q] (q = oh * Wo + ow) for cc < g, with c = channels[c0 + cc]
    when gathering, else c0 + cc; zero for g <= cc."""
    Ho, Wo = y.shape[2], y.shape[3]
    if g < LANES:
        yt[:] = 0.0
    if gather:
        for cc in range(g):
            c = channels[c0 + cc]
            for oh in range(Ho):
                for ow in range(Wo):
                    yt[u((oh * Wo + ow) * LANES + cc)] = y[n, c, u(oh), u(ow)]
        return
    for oh in range(Ho):
        for ow in range(Wo):
            q = (oh * Wo + ow) * LANES
            if g == LANES:
                for cc in range(LANES):
                    yt[u(q + cc)] = y[n, c0 + cc, u(oh), u(ow)]
            else:
                for cc in range(g):
                    yt[u(q + cc)] = y[n, c0 + cc, u(oh), u(ow)]


@njit(inline="always")
def _rows_from_block(y, n, c0, g, yt):  # pragma: no cover - compiled
    """y[n, c0 + cc] = the output-side block yt for cc < g (the transpose of _rows_to_block)."""
    Ho, Wo = y.shape[2], y.shape[3]
    for oh in range(Ho):
        for ow in range(Wo):
            q = (oh * Wo + ow) * LANES
            if g == LANES:
                for cc in range(LANES):
                    y[n, c0 + cc, u(oh), u(ow)] = yt[u(q + cc)]
            else:
                for cc in range(g):
                    y[n, c0 + cc, u(oh), u(ow)] = yt[u(q + cc)]


@njit(inline="always")
def _weights_along_rows(wr, br, w, b, c0, g, R):  # pragma: no cover - compiled
    """wr[(tap * R + col) * LANES + cc] = w[c0 + cc, tap] and br[col * LANES + cc] = b[c0 + cc]
    for every column col < R (zero lanes past g); no biases when b is empty."""
    k = w.shape[2]
    wr[:] = 0.0
    br[:] = 0.0
    for cc in range(g):
        for kh in range(k):
            for kw in range(k):
                for col in range(R):
                    wr[u(((kh * k + kw) * R + col) * LANES + cc)] = w[c0 + cc, 0, kh, kw]
        if b.shape[0]:
            for col in range(R):
                br[u(col * LANES + cc)] = b[c0 + cc]


@kernel(void(f32_4, f32_4r, f32_4r, f32_1r, i64, f32_1))
def _depthwise_forward_blocks(out, x, w, b, stride, scratch):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    k, m = w.shape[2], stride - 1
    p = (k - 1) // 2
    Hs, Ws = (H + m) >> m, (W + m) >> m
    R = max(Wo, Ws)
    X, Y, Z = (m + 1) * (m + 1) * Hs * Ws * LANES, Ho * Wo * LANES, k * k * R * LANES
    xt, acc = scratch[:X], scratch[X:X + Y]
    wr, br = scratch[X + Y:X + Y + Z], scratch[X + Y + Z:X + Y + Z + R * LANES]
    for c0 in range(0, C, LANES):
        g = min(LANES, C - c0)
        _weights_along_rows(wr, br, w, b, c0, g, R)
        for n in range(N):
            _to_block(xt, x, n, c0, g, m, Hs, Ws)
            # output row by output row: the biases, then each tap inside the map in (kh, kw)
            # order, one loop over the row's valid columns and the block's channels
            for oh in range(Ho):
                row = oh * Wo * LANES
                for q in range(Wo * LANES):
                    acc[u(row + q)] = br[u(q)]
                for kh in range(k):
                    ih = (oh << m) + kh - p
                    if ih < 0 or ih >= H:
                        continue
                    for kw in range(k):
                        lo, hi = _valid_columns(kw, p, m, W, Wo)
                        if lo >= hi:
                            continue
                        src = _phase_index(ih, (lo << m) + kw - p, m, Hs, Ws) * LANES
                        dst, tap = row + lo * LANES, (kh * k + kw) * R * LANES
                        for q in range((hi - lo) * LANES):
                            acc[u(dst + q)] += wr[u(tap + q)] * xt[u(src + q)]
            _rows_from_block(out, n, c0, g, acc)


@kernel(void(f32_4, f32_4r, f32_4r, i64, f32_1))
def _depthwise_backward_input_blocks(dx, dy, w, stride, scratch):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    k, m = w.shape[2], stride - 1
    p = (k - 1) // 2
    Hs, Ws = (H + m) >> m, (W + m) >> m
    R = max(Wo, Ws)
    X, Y, Z = (m + 1) * (m + 1) * Hs * Ws * LANES, Ho * Wo * LANES, k * k * R * LANES
    dxt, dyt = scratch[:X], scratch[X:X + Y]
    wr, br = scratch[X + Y:X + Y + Z], scratch[X + Y + Z:X + Y + Z + R * LANES]
    no_bias, no_channels = scratch[:0], _NO_CHANNELS
    for c0 in range(0, C, LANES):
        g = min(LANES, C - c0)
        _weights_along_rows(wr, br, w, no_bias, c0, g, R)
        for n in range(N):
            _rows_to_block(dyt, dy, n, c0, g, no_channels, False)
            # input row by input row, gathering (the transpose of the forward): column j of
            # phase b takes from tap (kh, kw) the output gradient at oh = (ih + p - kh) / s,
            # ow = j + (b + p - kw) / s, whenever those divide; taps in (kh, kw) order from zero
            for ih in range(H):
                for b in range(min(m + 1, W)):
                    dst = _phase_index(ih, b, m, Hs, Ws) * LANES
                    Wb = (W - b + m) >> m
                    for q in range(Wb * LANES):
                        dxt[u(dst + q)] = 0.0
                    for kh in range(k):
                        if (ih + p - kh) & m:
                            continue
                        oh = (ih + p - kh) >> m
                        if oh < 0 or oh >= Ho:
                            continue
                        for kw in range(k):
                            if (b + p - kw) & m:
                                continue
                            shift = (b + p - kw) >> m  # ow = j + shift
                            lo, hi = max(0, -shift), min(Wb, Wo - shift)
                            if lo >= hi:
                                continue
                            src, to = (oh * Wo + lo + shift) * LANES, dst + lo * LANES
                            tap = (kh * k + kw) * R * LANES
                            for q in range((hi - lo) * LANES):
                                dxt[u(to + q)] += wr[u(tap + q)] * dyt[u(src + q)]
            _from_block(dx, n, c0, g, dxt, m, Hs, Ws)


@kernel(void(f32_4, f32_4r, f32_4r, i64, i64_1r, f32_1))
def _depthwise_backward_weight_blocks(dw, dy, x_sel, stride, channels, scratch):  # pragma: no cover - compiled
    N, J, H, W = x_sel.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    k, m = dw.shape[2], stride - 1
    p = (k - 1) // 2
    Hs, Ws = (H + m) >> m, (W + m) >> m
    X, Y, Z = (m + 1) * (m + 1) * Hs * Ws * LANES, Ho * Wo * LANES, k * k * Wo * LANES
    xt, dyt, sums = scratch[:X], scratch[X:X + Y], scratch[X + Y:X + Y + Z]
    for j0 in range(0, J, LANES):
        g = min(LANES, J - j0)
        sums[:] = 0.0
        for n in range(N):
            _to_block(xt, x_sel, n, j0, g, m, Hs, Ws)
            _rows_to_block(dyt, dy, n, j0, g, channels, True)
            # each (tap, output column, channel) sums its products over images and rows
            for oh in range(Ho):
                for kh in range(k):
                    ih = (oh << m) + kh - p
                    if ih < 0 or ih >= H:
                        continue
                    for kw in range(k):
                        lo, hi = _valid_columns(kw, p, m, W, Wo)
                        if lo >= hi:
                            continue
                        src = _phase_index(ih, (lo << m) + kw - p, m, Hs, Ws) * LANES
                        at, tap = (oh * Wo + lo) * LANES, ((kh * k + kw) * Wo + lo) * LANES
                        for q in range((hi - lo) * LANES):
                            sums[u(tap + q)] += dyt[u(at + q)] * xt[u(src + q)]
        # then over the output columns
        for jj in range(g):
            for t in range(k * k):
                total = np.float32(0.0)
                for ow in range(Wo):
                    total += sums[u((t * Wo + ow) * LANES + jj)]
                dw[j0 + jj, 0, u(t // k), u(t % k)] = total


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
    work = scratch_for(op, scratch, depthwise_scratch_size(x.shape, k, stride))
    if uses_channel_blocks(H, W, k, stride):
        _depthwise_forward_blocks(out, x, w, b, stride, work)
    else:
        _depthwise_forward(out, x, w, b, stride, work)


def depthwise_scratch_size(x_shape, k: int, stride: int) -> int:
    """float32 entries of scratch each of the three kernels takes for an input (N, C, H, W):
    one plane in phase layout, or one channel block (``uses_channel_blocks``)."""
    H, W = x_shape[2], x_shape[3]
    if uses_channel_blocks(H, W, k, stride):
        return _block_scratch_size(H, W, k, stride)
    return phase_scratch_size(H, W, k, stride)


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
    work = scratch_for(op, scratch, depthwise_scratch_size(dx.shape, k, stride))
    if uses_channel_blocks(H, W, k, stride):
        _depthwise_backward_input_blocks(dx, dy, w, stride, work)
    else:
        _depthwise_backward_input(dx, dy, w, stride, work)


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
    work = scratch_for(op, scratch, depthwise_scratch_size(x_sel.shape, k, stride))
    if uses_channel_blocks(H, W, k, stride):
        _depthwise_backward_weight_blocks(dw, dy, x_sel, stride, channels, work)
    else:
        _depthwise_backward_weight(dw, dy, x_sel, stride, channels, work)


def _check_w(op, xname, x, w):
    array(op, "w", w, 4)
    odd_square_kernel(op, "w", w)
    if w.shape[1] != 1:
        fail(op, f"w {w.shape} must be (C, 1, k, k) for a depthwise convolution")
    if w.shape[0] != x.shape[1]:
        fail(op, f"{xname} {x.shape} and w {w.shape} disagree on channels")
