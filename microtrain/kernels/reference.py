"""Slow, obvious NumPy twins of every kernel, for tests only.

Functional style: each returns a new array and works in the dtype it is given (float64 for the
finite-difference checks). Written as plainly as possible: convolutions loop over the kernel taps
of a zero-padded input and contract channels with einsum, so each line reads like the formula.
Backward-input twins need the input's spatial size (stride 2 loses it), passed as ``hw``.
"""
from __future__ import annotations

import numpy as np


def _pad(k: int) -> int:
    return (k - 1) // 2


def _out(size: int, k: int, s: int) -> int:
    return (size + 2 * _pad(k) - k) // s + 1


def _taps(groups: int, Og: int, Ig: int, k: int, stride: int, Ho: int, Wo: int):
    """For each group and kernel tap: (output channels og, input channels ig, kh, kw, rows, cols),
    rows and cols being the strided window of the zero-padded input that the tap reads for the
    Ho x Wo outputs."""
    for g in range(groups):
        og, ig = slice(g * Og, (g + 1) * Og), slice(g * Ig, (g + 1) * Ig)
        for kh in range(k):
            for kw in range(k):
                yield (og, ig, kh, kw, slice(kh, kh + stride * (Ho - 1) + 1, stride),
                       slice(kw, kw + stride * (Wo - 1) + 1, stride))


# --------------------------------------------------------------------------- full / grouped conv
def conv2d_forward(x, w, b, stride, groups):
    N, I, H, W = x.shape
    O, Ig, k, _ = w.shape
    p = _pad(k)
    Ho, Wo = _out(H, k, stride), _out(W, k, stride)
    Og = O // groups
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((N, O, Ho, Wo), dtype=np.result_type(x, w))
    for og, ig, kh, kw, rows, cols in _taps(groups, Og, Ig, k, stride, Ho, Wo):
        patch = xp[:, ig, rows, cols]                                   # (N, Ig, Ho, Wo)
        out[:, og] += np.einsum("oi,nihw->nohw", w[og, :, kh, kw], patch)
    return out + b[None, :, None, None]


def conv2d_backward_input(dy, w, stride, groups, hw):
    N, O, Ho, Wo = dy.shape
    _, Ig, k, _ = w.shape
    H, W = hw
    p = _pad(k)
    Og = O // groups
    dxp = np.zeros((N, Ig * groups, H + 2 * p, W + 2 * p), dtype=np.result_type(dy, w))
    for og, ig, kh, kw, rows, cols in _taps(groups, Og, Ig, k, stride, Ho, Wo):
        dxp[:, ig, rows, cols] += np.einsum("oi,nohw->nihw", w[og, :, kh, kw], dy[:, og])
    return dxp[:, :, p:p + H, p:p + W]


def conv2d_backward_weight(dy, x, stride, groups, channels, k):
    """Full weight gradient, then the rows ``channels``."""
    N, I, H, W = x.shape
    O, Ho, Wo = dy.shape[1:]
    p = _pad(k)
    Ig, Og = I // groups, O // groups
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dw = np.zeros((O, Ig, k, k), dtype=np.result_type(dy, x))
    for og, ig, kh, kw, rows, cols in _taps(groups, Og, Ig, k, stride, Ho, Wo):
        dw[og, :, kh, kw] = np.einsum("nohw,nihw->oi", dy[:, og], xp[:, ig, rows, cols])
    return dw[np.asarray(channels, dtype=np.int64)]


# --------------------------------------------------------------------------- depthwise
def depthwise_forward(x, w, b, stride):
    return conv2d_forward(x, w, b, stride, groups=x.shape[1])


def depthwise_backward_input(dy, w, stride, hw):
    return conv2d_backward_input(dy, w, stride, groups=w.shape[0], hw=hw)


def depthwise_backward_weight(dy, x_sel, stride, channels, k):
    """dw[j] from dy[:, channels[j]] and x_sel[:, j] (x_sel holds only the selected channels)."""
    channels = np.asarray(channels, dtype=np.int64)
    dy_sel = dy[:, channels]                                            # (N, J, Ho, Wo)
    J = len(channels)
    return conv2d_backward_weight(dy_sel, x_sel, stride, J, np.arange(J), k) if J else \
        np.zeros((0, 1, k, k), dtype=np.result_type(dy, x_sel))


# --------------------------------------------------------------------------- pointwise / linear
def pointwise_forward(x, w, b):
    return np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x) + b[None, :, None, None]


def pointwise_backward_input(dy, w):
    return np.einsum("oi,nohw->nihw", w[:, :, 0, 0], dy)


def pointwise_backward_weight(dy, x, channels):
    dw = np.einsum("nohw,nihw->oi", dy, x)[:, :, None, None]
    return dw[np.asarray(channels, dtype=np.int64)]


def linear_forward(x, w, b):
    return x @ w.T + b


def linear_backward_input(dy, w):
    return dy @ w


def linear_backward_weight(dy, x, channels):
    return (dy.T @ x)[np.asarray(channels, dtype=np.int64)]


# --------------------------------------------------------------------------- element-wise
def relu6_forward(x):
    return np.clip(x, 0, 6)


def relu6_mask(x, block=512):
    """The packed 1-bit mask of 0 < x < 6 over the flattened x, in blocks of ``block`` elements:
    in a block of r elements and m = ceil(r / 8) bytes, bit b of byte k is element b * m + k."""
    inside = (x.reshape(-1) > 0) & (x.reshape(-1) < 6)
    parts = [np.zeros(0, np.uint8)]
    for start in range(0, inside.size, block):
        r = min(block, inside.size - start)
        m = -(-r // 8)
        planes = np.zeros(8 * m, np.uint8)
        planes[:r] = inside[start:start + r]
        parts.append((planes.reshape(8, m) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=0).astype(np.uint8))
    return np.concatenate(parts)


def relu6_backward(dy, x):
    return np.where((x > 0) & (x < 6), dy, 0).astype(dy.dtype)


def add_forward(a, b):
    return a + b


def bias_backward(dy, channels):
    return dy.sum(axis=(0, 2, 3))[np.asarray(channels, dtype=np.int64)]


def global_avg_pool_forward(x):
    return x.mean(axis=(2, 3))


def global_avg_pool_backward(dout, hw):
    H, W = hw
    return np.broadcast_to(dout[:, :, None, None] / (H * W), dout.shape + (H, W)).copy()


def avg_pool_forward(x, f):
    N, C, H, W = x.shape
    return x.reshape(N, C, H // f, f, W // f, f).mean(axis=(3, 5))


def avg_pool_backward(dout, f):
    return np.repeat(np.repeat(dout, f, axis=2), f, axis=3) / (f * f)


def upsample_nearest_forward(x, f):
    return np.repeat(np.repeat(x, f, axis=2), f, axis=3)


def upsample_nearest_backward(dout, f):
    N, C, H, W = dout.shape
    return dout.reshape(N, C, H // f, f, W // f, f).sum(axis=(3, 5))


# --------------------------------------------------------------------------- head
def l2_normalize_forward(x):
    norms = np.sqrt((x * x).sum(axis=1))
    return x / np.maximum(norms, 1e-12)[:, None], norms


def l2_normalize_backward(dout, x):
    norms = np.sqrt((x * x).sum(axis=1))[:, None]
    out = x / norms
    return (dout - out * (out * dout).sum(axis=1, keepdims=True)) / norms


def cosine_logits_forward(z, protos, scale):
    return scale * z @ protos.T


def cosine_logits_backward(dlogits, protos, scale):
    return scale * dlogits @ protos


def cosine_logits_backward_protos(dlogits, z, scale):
    return scale * dlogits.T @ z


def class_mean_forward(z, labels, ways):
    return np.stack([z[: len(labels)][labels == k].mean(axis=0) for k in range(ways)])


def class_mean_backward(dprotos, labels, n_rows):
    counts = np.bincount(labels, minlength=len(dprotos))
    dz = np.zeros((n_rows, dprotos.shape[1]))
    dz[: len(labels)] = dprotos[labels] / counts[labels][:, None]
    return dz


def softmax_cross_entropy_forward(logits, labels):
    """(probs, mean loss)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    probs = e / e.sum(axis=1, keepdims=True)
    n = np.arange(len(labels))
    loss = np.mean(np.log(e.sum(axis=1)) - shifted[n, labels])
    return probs, float(loss)


def softmax_cross_entropy_backward(probs, labels):
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1
    return (probs - onehot) / len(labels)
