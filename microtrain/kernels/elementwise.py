"""Element-wise ops and pooling: relu6 (with a 1-bit mask for backward), add, gradient
accumulation, bias gradient, global average pool, non-overlapping average pool and nearest
upsampling by an integer factor (TinyTL's lite residual branch).

relu6, add and accumulate take arrays of any rank (same shape, C-contiguous float32); the
pools take NCHW activations.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._jit import (
    F32, U8, array, f32_1, f32_1r, f32_2, f32_2r, f32_4, f32_4r, fail, i64, i64_1r, indices,
    int_at_least, kernel, shape_is, u, u8_1, u8_1r, void,
)

__all__ = [
    "relu6_forward", "relu6_forward_save_mask", "relu6_backward", "add_forward", "accumulate",
    "bias_backward", "global_avg_pool_forward", "global_avg_pool_backward",
    "avg_pool_forward", "avg_pool_backward", "upsample_nearest_forward",
    "upsample_nearest_backward",
]


def _flat(op, name, a, writable=False):
    """Any-rank float32 C-contiguous array as a 1-D view (no copy)."""
    if not isinstance(a, np.ndarray):
        fail(op, f"{name} must be a numpy array, got {type(a).__name__}")
    array(op, name, a, a.ndim, F32, writable)
    return a.reshape(-1)


def _same_shape(op, na, a, nb, b):
    if a.shape != b.shape:
        fail(op, f"{na} {a.shape} and {nb} {b.shape} differ in shape")


# --------------------------------------------------------------------------- relu6
@kernel(void(f32_1, f32_1r))
def _relu6_forward(out, x):  # pragma: no cover - compiled
    # clamp to [0, 6]; contiguous, vectorises; reading before writing makes out == x safe
    for i in range(x.shape[0]):
        v = x[i]
        out[i] = min(max(v, np.float32(0.0)), np.float32(6.0))


def relu6_forward(out, x):
    """out = min(max(x, 0), 6). OVERWRITES out; out may be x (in place). Any rank."""
    op = "relu6_forward"
    xf = _flat(op, "x", x)
    of = _flat(op, "out", out, writable=True)
    _same_shape(op, "out", out, "x", x)
    _relu6_forward(of, xf)


# The mask keeps one bit per element in blocks of MASK_BLOCK elements (64 bytes): in a block of
# r elements (the last block may be shorter) and m = ceil(r / 8) bytes, bit b of byte k is
# element b * m + k. Each bit plane is then one contiguous run of elements against one contiguous
# run of bytes, so both kernels vectorise (bit b of byte 8q + b, one byte per 8 neighbours,
# needed a gather and measured 9x slower than relu6 itself).
MASK_BLOCK = 512


@njit(inline="always")
def _mask_block(n, start):  # pragma: no cover - compiled
    """(r, m): elements and mask bytes of the block starting at element ``start`` of ``n``."""
    r = min(MASK_BLOCK, n - start)
    return r, (r + 7) // 8


@kernel(void(f32_1, u8_1, f32_1r))
def _relu6_forward_save_mask(out, mask, x):  # pragma: no cover - compiled
    n = x.shape[0]
    for start in range(0, n, MASK_BLOCK):
        r, m = _mask_block(n, start)
        mb = mask[start // 8:start // 8 + m]
        mb[:] = 0  # the unused bits of a short block stay 0
        # bit plane by bit plane: elements b*m .. b*m + m - 1 of the block set bit b of bytes 0..m-1;
        # each element is read before it is written, so out may be x
        for b in range(8):
            base, bit = start + b * m, np.uint8(1 << b)
            for k in range(min(m, r - b * m)):
                v = x[u(base + k)]
                inside = (v > np.float32(0.0)) & (v < np.float32(6.0))
                mb[u(k)] |= bit if inside else np.uint8(0)
                out[u(base + k)] = min(max(v, np.float32(0.0)), np.float32(6.0))


def relu6_forward_save_mask(out, mask, x):
    """out = relu6(x), and the 1-bit mask its backward needs. OVERWRITES out and mask.

    mask uint8 ((x.size + 7) // 8,): one bit per element of the flattened x, set iff 0 < x < 6,
    in blocks of MASK_BLOCK elements: in a block of r elements and m = ceil(r / 8) bytes, bit b
    of byte k is element b * m + k (unused bits 0). out may be x. Any rank.
    """
    op = "relu6_forward_save_mask"
    xf = _flat(op, "x", x)
    of = _flat(op, "out", out, writable=True)
    _same_shape(op, "out", out, "x", x)
    array(op, "mask", mask, 1, U8, writable=True)
    shape_is(op, "mask", mask, ((x.size + 7) // 8,), "one bit per element of x")
    _relu6_forward_save_mask(of, mask, xf)


@kernel(void(f32_1, f32_1r, u8_1r))
def _relu6_backward(dx, dy, mask):  # pragma: no cover - compiled
    n = dy.shape[0]
    # pass the gradient where the forward was strictly inside (0, 6), else 0; the mask's bit
    # planes in the order the forward wrote them
    for start in range(0, n, MASK_BLOCK):
        r, m = _mask_block(n, start)
        mb = mask[start // 8:start // 8 + m]
        for b in range(8):
            base = start + b * m
            for k in range(min(m, r - b * m)):
                g = dy[u(base + k)]
                dx[u(base + k)] = g if (mb[u(k)] >> b) & 1 else np.float32(0.0)


def relu6_backward(dx, dy, mask):
    """dx = dy where the mask bit (relu6_forward_save_mask's layout) is set, else 0. OVERWRITES
    dx; dx may be dy. Any rank."""
    op = "relu6_backward"
    dyf = _flat(op, "dy", dy)
    dxf = _flat(op, "dx", dx, writable=True)
    _same_shape(op, "dx", dx, "dy", dy)
    array(op, "mask", mask, 1, U8)
    shape_is(op, "mask", mask, ((dy.size + 7) // 8,), "one bit per element of dy")
    _relu6_backward(dxf, dyf, mask)


# --------------------------------------------------------------------------- add / accumulate
@kernel(void(f32_1, f32_1r, f32_1r))
def _add(out, a, b):  # pragma: no cover - compiled
    # element by element, read before write, so out may be a or b
    for i in range(out.shape[0]):
        out[i] = a[i] + b[i]


def add_forward(out, a, b):
    """out = a + b (the residual add). OVERWRITES out; out may be a or b. Any rank.
    Its backward passes dout to both inputs unchanged."""
    op = "add_forward"
    af = _flat(op, "a", a)
    bf = _flat(op, "b", b)
    of = _flat(op, "out", out, writable=True)
    _same_shape(op, "a", a, "b", b)
    _same_shape(op, "out", out, "a", a)
    _add(of, af, bf)


@kernel(void(f32_1, f32_1r))
def _accumulate(dst, src):  # pragma: no cover - compiled
    # contiguous, vectorises
    for i in range(dst.shape[0]):
        dst[i] += src[i]


def accumulate(dst, src):
    """dst += src: sums the gradients of a tensor used twice. ACCUMULATES into dst. Any rank."""
    op = "accumulate"
    sf = _flat(op, "src", src)
    df = _flat(op, "dst", dst, writable=True)
    _same_shape(op, "dst", dst, "src", src)
    _accumulate(df, sf)


# --------------------------------------------------------------------------- bias gradient
@kernel(void(f32_1, f32_4r, i64_1r), reassoc=True,
        why="a sum over the plane; vector lanes need it reordered")
def _bias_backward(db, dy, channels):  # pragma: no cover - compiled
    N, C, H, W = dy.shape
    d3 = dy.reshape(N, C, H * W)
    # only the selected channels: sum each one's planes
    for j in range(channels.shape[0]):
        c = channels[j]
        s = np.float32(0.0)
        for n in range(N):
            for q in range(H * W):
                s += d3[n, c, q]
        db[j] = s


def bias_backward(db, dy, channels):
    """db[j] = sum over N, H, W of dy[:, channels[j]]. OVERWRITES db.

    db (J,); dy (N, C, H, W) (a linear layer passes its (N, C) gradient as an (N, C, 1, 1)
    view); channels int64 (J,), any order, J may be 0.
    """
    op = "bias_backward"
    array(op, "db", db, 1, writable=True)
    array(op, "dy", dy, 4)
    indices(op, "channels", channels, dy.shape[1], "channels of dy")
    shape_is(op, "db", db, (channels.shape[0],), "len(channels)")
    if channels.shape[0]:
        _bias_backward(db, dy, channels)


# --------------------------------------------------------------------------- global average pool
@kernel(void(f32_2, f32_4r), reassoc=True, why="a sum over the plane; lanes need it reordered")
def _global_avg_pool_forward(out, x):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    x3 = x.reshape(N, C, H * W)
    inv = np.float32(1.0) / np.float32(H * W)
    # mean of each contiguous plane
    for n in range(N):
        for c in range(C):
            s = np.float32(0.0)
            for q in range(H * W):
                s += x3[n, c, q]
            out[n, c] = s * inv


def global_avg_pool_forward(out, x):
    """out[n, c] = mean of x[n, c] over H, W. OVERWRITES out. out (N, C); x (N, C, H, W)."""
    op = "global_avg_pool_forward"
    array(op, "x", x, 4)
    array(op, "out", out, 2, writable=True)
    shape_is(op, "out", out, x.shape[:2], "N, C of x")
    _global_avg_pool_forward(out, x)


@kernel(void(f32_4, f32_2r))
def _global_avg_pool_backward(dx, dout):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    d3 = dx.reshape(N, C, H * W)
    inv = np.float32(1.0) / np.float32(H * W)
    # every position of a plane gets the same share of its mean's gradient
    for n in range(N):
        for c in range(C):
            g = dout[n, c] * inv
            for q in range(H * W):
                d3[n, c, q] = g


def global_avg_pool_backward(dx, dout):
    """dx[n, c, h, w] = dout[n, c] / (H W). OVERWRITES dx. dx (N, C, H, W); dout (N, C)."""
    op = "global_avg_pool_backward"
    array(op, "dx", dx, 4, writable=True)
    array(op, "dout", dout, 2)
    shape_is(op, "dout", dout, dx.shape[:2], "N, C of dx")
    _global_avg_pool_backward(dx, dout)


# --------------------------------------------------------------------------- average pool
@njit(inline="always")
def _block_sum_row(dst, src, n, c, oh, f):  # pragma: no cover - compiled
    """dst[n, c, oh, ow] = sum of the f x f block src[n, c, oh*f:(oh+1)*f, ow*f:(ow+1)*f] for
    every ow: the sum of avg_pool_forward and the whole of upsample_nearest_backward."""
    for ow in range(dst.shape[3]):
        dst[n, c, oh, ow] = 0.0
    for r in range(f):
        for ow in range(dst.shape[3]):
            s = np.float32(0.0)
            for t in range(f):
                s += src[n, c, oh * f + r, ow * f + t]
            dst[n, c, oh, ow] += s


@kernel(void(f32_4, f32_4r, i64))
def _avg_pool_forward(out, x, f):  # pragma: no cover - compiled
    N, C, Ho, Wo = out.shape
    inv = np.float32(1.0) / np.float32(f * f)
    # sum the f input rows of each output row first (contiguous adds), then the f columns
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                _block_sum_row(out, x, n, c, oh, f)
                for ow in range(Wo):
                    out[n, c, oh, ow] *= inv


def avg_pool_forward(out, x, factor):
    """Mean over non-overlapping factor x factor windows. OVERWRITES out.

    out (N, C, H/factor, W/factor); x (N, C, H, W), H and W divisible by factor.
    """
    op = "avg_pool_forward"
    array(op, "x", x, 4)
    array(op, "out", out, 4, writable=True)
    shape_is(op, "out", out, _pooled_shape(op, "x", x, factor))
    _avg_pool_forward(out, x, factor)


@kernel(void(f32_4, f32_4r, i64))
def _avg_pool_backward(dx, dout, f):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    inv = np.float32(1.0) / np.float32(f * f)
    # each input position gets its window's gradient share; rows of dx are written in order
    for n in range(N):
        for c in range(C):
            for h in range(H):
                oh = h // f
                for w in range(W):
                    dx[n, c, h, w] = dout[n, c, oh, w // f] * inv


def avg_pool_backward(dx, dout, factor):
    """dx of avg_pool_forward. OVERWRITES dx. dx (N, C, H, W); dout (N, C, H/f, W/f)."""
    op = "avg_pool_backward"
    array(op, "dx", dx, 4, writable=True)
    array(op, "dout", dout, 4)
    shape_is(op, "dout", dout, _pooled_shape(op, "dx", dx, factor))
    _avg_pool_backward(dx, dout, factor)


def _pooled_shape(op, name, a, factor):
    """(N, C, H/factor, W/factor) of a (N, C, H, W), checking that factor is an integer >= 1
    dividing H and W (the shared check of avg_pool's forward and backward)."""
    int_at_least(op, "factor", factor, 1)
    N, C, H, W = a.shape
    if H % factor or W % factor:
        fail(op, f"{name} {a.shape} spatial size not divisible by factor {factor}")
    return (N, C, H // factor, W // factor)


# --------------------------------------------------------------------------- nearest upsample
@kernel(void(f32_4, f32_4r, i64))
def _upsample_nearest_forward(out, x, f):  # pragma: no cover - compiled
    N, C, Ho, Wo = out.shape
    # each output row copies one input row with every element repeated f times
    for n in range(N):
        for c in range(C):
            for h in range(Ho):
                ih = h // f
                for w in range(Wo):
                    out[n, c, h, w] = x[n, c, ih, w // f]


def upsample_nearest_forward(out, x, factor):
    """Nearest-neighbour upsampling by an integer factor. OVERWRITES out.

    out (N, C, H*factor, W*factor); x (N, C, H, W).
    """
    op = "upsample_nearest_forward"
    array(op, "x", x, 4)
    array(op, "out", out, 4, writable=True)
    int_at_least(op, "factor", factor, 1)
    N, C, H, W = x.shape
    shape_is(op, "out", out, (N, C, H * factor, W * factor))
    _upsample_nearest_forward(out, x, factor)


@kernel(void(f32_4, f32_4r, i64))
def _upsample_nearest_backward(dx, dout, f):  # pragma: no cover - compiled
    N, C, H, W = dx.shape
    # each input position sums the f x f block of output gradients it was copied to
    for n in range(N):
        for c in range(C):
            for h in range(H):
                _block_sum_row(dx, dout, n, c, h, f)


def upsample_nearest_backward(dx, dout, factor):
    """dx of upsample_nearest_forward. OVERWRITES dx. dx (N, C, H, W); dout (N, C, fH, fW)."""
    op = "upsample_nearest_backward"
    array(op, "dx", dx, 4, writable=True)
    array(op, "dout", dout, 4)
    int_at_least(op, "factor", factor, 1)
    N, C, H, W = dx.shape
    shape_is(op, "dout", dout, (N, C, H * factor, W * factor))
    _upsample_nearest_backward(dx, dout, factor)
