"""The prototype (cosine) classifier head: L2 row normalisation, class means of support
embeddings (the prototypes of a ProtoNet episode), scaled cosine logits against prototypes, and
softmax cross-entropy.

Shapes: embeddings (N, D), prototypes (K, D), logits (N, K), labels int64 (N,).
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import (
    array, f32_1, f32_1r, f32_2, f32_2r, f64, fail, i64_1r, indices, kernel, shape_is, void,
)

__all__ = [
    "l2_normalize_forward", "l2_normalize_backward", "cosine_logits_forward",
    "cosine_logits_backward", "cosine_logits_backward_protos", "class_mean_forward",
    "class_mean_backward", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
]

EPS = 1e-12  # the norm is clamped to at least this (as torch.nn.functional.normalize does)


# --------------------------------------------------------------------------- L2 normalise
@kernel(void(f32_2, f32_1, f32_2r), reassoc=True, why="a sum of squares; lanes need it reordered")
def _l2_normalize_forward(out, norms, x):  # pragma: no cover - compiled
    N, D = x.shape
    # per row: the norm (a contiguous sum of squares), then one scaled copy
    for n in range(N):
        s = 0.0
        for d in range(D):
            v = np.float64(x[n, d])
            s += v * v
        norm = math.sqrt(s)
        norms[n] = norm
        inv = np.float32(1.0 / max(norm, EPS))
        for d in range(D):
            out[n, d] = x[n, d] * inv


def l2_normalize_forward(out, norms, x):
    """out = x / max(||x||, 1e-12) row by row; norms[n] = ||x[n]|| (unclamped).
    OVERWRITES out and norms. out, x (N, D); norms (N,). out may be x."""
    op = "l2_normalize_forward"
    array(op, "x", x, 2)
    array(op, "out", out, 2, writable=True)
    array(op, "norms", norms, 1, writable=True)
    shape_is(op, "out", out, x.shape)
    shape_is(op, "norms", norms, x.shape[:1], "one norm per row of x")
    _l2_normalize_forward(out, norms, x)


@kernel(void(f32_2, f32_2r, f32_2r, f32_1r), reassoc=True,
        why="a dot product per row; lanes need it reordered")
def _l2_normalize_backward(dx, dout, out, norms):  # pragma: no cover - compiled
    N, D = out.shape
    # per row: dx = (dout - out <out, dout>) / ||x||, the Jacobian of x/||x|| applied to dout;
    # below the clamp the map is x / eps, a plain scaling
    for n in range(N):
        norm = norms[n]
        if norm > EPS:
            dot = np.float32(0.0)
            for d in range(D):
                dot += out[n, d] * dout[n, d]
            inv = np.float32(1.0 / norm)
            for d in range(D):
                dx[n, d] = (dout[n, d] - out[n, d] * dot) * inv
        else:
            inv = np.float32(1.0 / EPS)
            for d in range(D):
                dx[n, d] = dout[n, d] * inv


def l2_normalize_backward(dx, dout, out, norms):
    """dx of l2_normalize_forward, from its out and norms. OVERWRITES dx; dx may be dout.
    dx, dout, out (N, D); norms (N,)."""
    op = "l2_normalize_backward"
    array(op, "dx", dx, 2, writable=True)
    array(op, "dout", dout, 2)
    array(op, "out", out, 2)
    array(op, "norms", norms, 1)
    shape_is(op, "dout", dout, dx.shape)
    shape_is(op, "out", out, dx.shape)
    shape_is(op, "norms", norms, dx.shape[:1], "one norm per row")
    _l2_normalize_backward(dx, dout, out, norms)


# --------------------------------------------------------------------------- cosine logits
@kernel(void(f32_2, f32_2r, f32_2r, f64), reassoc=True,
        why="a dot product per logit; lanes need it reordered")
def _cosine_logits_forward(logits, z, protos, scale):  # pragma: no cover - compiled
    N, D = z.shape
    K = protos.shape[0]
    s32 = np.float32(scale)
    # one contiguous dot product per (sample, class)
    for n in range(N):
        for k in range(K):
            acc = np.float32(0.0)
            for d in range(D):
                acc += z[n, d] * protos[k, d]
            logits[n, k] = s32 * acc


def cosine_logits_forward(logits, z, protos, scale):
    """logits = scale * z @ protos.T (z and protos already L2-normalised). OVERWRITES logits.
    logits (N, K); z (N, D); protos (K, D); scale a float."""
    op = "cosine_logits_forward"
    array(op, "z", z, 2)
    array(op, "protos", protos, 2)
    array(op, "logits", logits, 2, writable=True)
    _check_scale(op, scale)
    if z.shape[1] != protos.shape[1]:
        fail(op, f"z {z.shape} and protos {protos.shape} disagree on the embedding size")
    shape_is(op, "logits", logits, (z.shape[0], protos.shape[0]), "N of z, K of protos")
    _cosine_logits_forward(logits, z, protos, float(scale))


@kernel(void(f32_2, f32_2r, f32_2r, f64))
def _cosine_logits_backward(dz, dlogits, protos, scale):  # pragma: no cover - compiled
    N, K = dlogits.shape
    D = protos.shape[1]
    s32 = np.float32(scale)
    # dz[n] = scale * sum_k dlogits[n, k] protos[k]: contiguous axpys along D
    for n in range(N):
        for d in range(D):
            dz[n, d] = 0.0
        for k in range(K):
            g = s32 * dlogits[n, k]
            for d in range(D):
                dz[n, d] += g * protos[k, d]


def cosine_logits_backward(dz, dlogits, protos, scale):
    """dz of cosine_logits_forward; prototypes are constants (no gradient). OVERWRITES dz.
    dz (N, D); dlogits (N, K); protos (K, D)."""
    op = "cosine_logits_backward"
    array(op, "dz", dz, 2, writable=True)
    array(op, "dlogits", dlogits, 2)
    array(op, "protos", protos, 2)
    _check_scale(op, scale)
    if dz.shape[1] != protos.shape[1]:
        fail(op, f"dz {dz.shape} and protos {protos.shape} disagree on the embedding size")
    shape_is(op, "dlogits", dlogits, (dz.shape[0], protos.shape[0]), "N of dz, K of protos")
    _cosine_logits_backward(dz, dlogits, protos, float(scale))


@kernel(void(f32_2, f32_2r, f32_2r, f64))
def _cosine_logits_backward_protos(dprotos, dlogits, z, scale):  # pragma: no cover - compiled
    N, K = dlogits.shape
    D = z.shape[1]
    s32 = np.float32(scale)
    # dprotos[k] = scale * sum_n dlogits[n, k] z[n]: contiguous axpys along D
    for k in range(K):
        for d in range(D):
            dprotos[k, d] = 0.0
    for n in range(N):
        for k in range(K):
            g = s32 * dlogits[n, k]
            for d in range(D):
                dprotos[k, d] += g * z[n, d]


def cosine_logits_backward_protos(dprotos, dlogits, z, scale):
    """dprotos of cosine_logits_forward, for prototypes computed inside the graph (a ProtoNet
    episode in meta-training). OVERWRITES dprotos. dprotos (K, D); dlogits (N, K); z (N, D)."""
    op = "cosine_logits_backward_protos"
    array(op, "dprotos", dprotos, 2, writable=True)
    array(op, "dlogits", dlogits, 2)
    array(op, "z", z, 2)
    _check_scale(op, scale)
    if dprotos.shape[1] != z.shape[1]:
        fail(op, f"dprotos {dprotos.shape} and z {z.shape} disagree on the embedding size")
    shape_is(op, "dlogits", dlogits, (z.shape[0], dprotos.shape[0]), "N of z, K of dprotos")
    _cosine_logits_backward_protos(dprotos, dlogits, z, float(scale))


def _check_scale(op, scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        fail(op, f"scale must be a real number, got {type(scale).__name__}")


# --------------------------------------------------------------------------- class means
@kernel(void(f32_2, f32_2r, i64_1r))
def _class_mean_forward(protos, z, labels):  # pragma: no cover - compiled
    K, D = protos.shape
    S = labels.shape[0]
    # per class: sum its support rows (contiguous adds along D), then divide by their count
    for k in range(K):
        for d in range(D):
            protos[k, d] = 0.0
        count = 0
        for n in range(S):
            if labels[n] == k:
                count += 1
                for d in range(D):
                    protos[k, d] += z[n, d]
        inv = np.float32(1.0 / count)
        for d in range(D):
            protos[k, d] *= inv


def class_mean_forward(protos, z, labels):
    """protos[k] = mean of z[n] over the support rows n < len(labels) with labels[n] == k: the
    class prototypes of a ProtoNet episode (Snell et al. 2017; TinyTrain Section 2.1). Rows of z
    from len(labels) on (the query) are not read. OVERWRITES protos.
    protos (K, D) float32; z (N, D) float32 with N >= len(labels); labels int64 (S,) in [0, K),
    every class present at least once (raises KernelInputError otherwise)."""
    op = "class_mean_forward"
    array(op, "z", z, 2)
    array(op, "protos", protos, 2, writable=True)
    _check_class_labels(op, labels, protos.shape[0], z.shape[0])
    if protos.shape[1] != z.shape[1]:
        fail(op, f"protos {protos.shape} and z {z.shape} disagree on the embedding size")
    _class_mean_forward(protos, z, labels)


@kernel(void(f32_2, f32_2r, i64_1r))
def _class_mean_backward(dz, dprotos, labels):  # pragma: no cover - compiled
    N, D = dz.shape
    K = dprotos.shape[0]
    S = labels.shape[0]
    # per class: a support row receives the class's gradient over the class size
    for k in range(K):
        count = 0
        for n in range(S):
            if labels[n] == k:
                count += 1
        inv = np.float32(1.0 / count)
        for n in range(S):
            if labels[n] == k:
                for d in range(D):
                    dz[n, d] = dprotos[k, d] * inv
    # query rows (after the support) take no gradient from the prototypes
    for n in range(S, N):
        for d in range(D):
            dz[n, d] = 0.0


def class_mean_backward(dz, dprotos, labels):
    """dz of class_mean_forward: dz[n] = dprotos[labels[n]] / |class labels[n]| for n < S, and 0
    for the rows after the support. OVERWRITES dz. dz (N, D); dprotos (K, D); labels int64 (S,)."""
    op = "class_mean_backward"
    array(op, "dz", dz, 2, writable=True)
    array(op, "dprotos", dprotos, 2)
    _check_class_labels(op, labels, dprotos.shape[0], dz.shape[0])
    if dprotos.shape[1] != dz.shape[1]:
        fail(op, f"dprotos {dprotos.shape} and dz {dz.shape} disagree on the embedding size")
    _class_mean_backward(dz, dprotos, labels)


def _check_class_labels(op, labels, K, N):
    indices(op, "labels", labels, K, "classes")
    if len(labels) > N:
        fail(op, f"{len(labels)} support labels for {N} rows")
    missing = np.setdiff1d(np.arange(K), labels)
    if len(missing):
        fail(op, f"classes {missing[:5].tolist()} have no support row: every prototype needs one")


# --------------------------------------------------------------------------- softmax cross-entropy
@kernel(f64(f32_2, f32_2r, i64_1r))
def _softmax_cross_entropy_forward(probs, logits, labels):  # pragma: no cover - compiled
    N, K = logits.shape
    total = 0.0
    # per row: subtract the max before exp (no overflow), normalise, and take
    # -log p[label] = log(sum exp(l - max)) - (l[label] - max) in float64
    for n in range(N):
        m = logits[n, 0]
        for k in range(1, K):
            m = max(m, logits[n, k])
        s = 0.0
        for k in range(K):
            e = math.exp(np.float64(logits[n, k]) - m)
            probs[n, k] = e
            s += e
        inv = 1.0 / s
        for k in range(K):
            probs[n, k] = probs[n, k] * inv
        total += math.log(s) - (np.float64(logits[n, labels[n]]) - m)
    return total / N


def softmax_cross_entropy_forward(probs, logits, labels):
    """Mean over N of -log softmax(logits)[label]; writes probs = softmax(logits).
    OVERWRITES probs; returns the loss as a Python float. probs, logits (N, K); labels int64 (N,)
    in [0, K)."""
    op = "softmax_cross_entropy_forward"
    array(op, "logits", logits, 2)
    array(op, "probs", probs, 2, writable=True)
    N, K = logits.shape
    if N == 0 or K == 0:
        fail(op, f"logits {logits.shape} must have at least one row and one class")
    shape_is(op, "probs", probs, logits.shape)
    indices(op, "labels", labels, K, "classes")
    shape_is(op, "labels", labels, (N,), "one label per row of logits")
    return _softmax_cross_entropy_forward(probs, logits, labels)


@kernel(void(f32_2, f32_2r, i64_1r))
def _softmax_cross_entropy_backward(dlogits, probs, labels):  # pragma: no cover - compiled
    N, K = probs.shape
    inv = np.float32(1.0 / N)
    # (probs - onehot) / N, row by row
    for n in range(N):
        for k in range(K):
            dlogits[n, k] = probs[n, k] * inv
        dlogits[n, labels[n]] -= inv


def softmax_cross_entropy_backward(dlogits, probs, labels):
    """dlogits = (probs - onehot(labels)) / N, the gradient of the mean loss. OVERWRITES dlogits;
    dlogits may be probs. dlogits, probs (N, K); labels int64 (N,)."""
    op = "softmax_cross_entropy_backward"
    array(op, "probs", probs, 2)
    array(op, "dlogits", dlogits, 2, writable=True)
    N, K = probs.shape
    shape_is(op, "dlogits", dlogits, probs.shape)
    indices(op, "labels", labels, K, "classes")
    shape_is(op, "labels", labels, (N,), "one label per row of probs")
    _softmax_cross_entropy_backward(dlogits, probs, labels)

