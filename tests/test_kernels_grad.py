"""Dot-product gradient checks (HIPS/autograd style) for every op's input, weight and bias
gradients.

For a map f and random directions v (input side) and u (output side):
    <v, J^T u>  from the float32 Numba backward kernel, against
    <u, (f(x + eps v) - f(x - eps v)) / (2 eps)>  from the float64 NumPy twin's forward
(test_kernels.py ties that twin to the forward kernel). One scalar checks the whole Jacobian.

Tolerance: |lhs - rhs| <= 1e-4 * <|v|, |g|> where g is the kernel's J^T u. The kernel's g_i
carries a float32 summation error of at most n u sum|terms| (u = 6e-8, n <= ~300 products here);
with random-sign data sum|terms| is ~sqrt(n) |g_i|, so the relative error is at most a few
1e-5 in the worst case and ~1e-6 typically. The float64 central difference is exact up to
rounding (~1e-12) for the linear maps and has truncation error ~eps^2 = 1e-6 relative for the
smooth nonlinear ones (l2 normalise, softmax). A wrong gradient (transposed kernel, wrong
stride offset, missing term) gives an O(1) relative difference, far above 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import microtrain.kernels as K
from microtrain.kernels import reference as R

EPS = 1e-3
RTOL = 1e-4
SETTINGS = settings(max_examples=25, deadline=None)


def check(f, x, v, u, g, jac_scale=0.0):
    """f: float64 twin forward of one argument; x: float64 point; v: direction; u: output
    weights; g: the kernel's float32 J^T u at x. ``jac_scale`` bounds the Jacobian's entries
    for ops whose gradient can cancel to ~0 (l2 normalise of a 1-D row): then the float32
    rounding is relative to that scale, not to |g|."""
    g = np.asarray(g, np.float64)
    lhs = np.vdot(v, g)
    rhs = np.vdot(u, (f(x + EPS * v) - f(x - EPS * v)) / (2 * EPS))
    scale = (np.vdot(np.abs(v), np.abs(g)) + 1e-12
             + 0.1 * jac_scale * np.linalg.norm(v) * np.linalg.norm(u))
    assert abs(lhs - rhs) <= RTOL * scale, f"<v,J^T u>={lhs:.9g} vs FD {rhs:.9g} (scale {scale:.3g})"


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def d(a):
    return np.asarray(a, np.float64)


def out_size(h, k, s):
    return (h + 2 * ((k - 1) // 2) - k) // s + 1


def seeds():
    return st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- conv family
@SETTINGS
@given(data=st.data())
def test_conv2d_gradients(data):
    groups = data.draw(st.sampled_from([1, 2]))
    Ig, Og = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k, s = data.draw(st.sampled_from([1, 3])), data.draw(st.sampled_from([1, 2]))
    N, H, W = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(seeds()))
    I, O = Ig * groups, Og * groups
    Ho, Wo = out_size(H, k, s), out_size(W, k, s)
    x, w, b, u = rnd(rng, N, I, H, W), rnd(rng, O, Ig, k, k), rnd(rng, O), rnd(rng, N, O, Ho, Wo)
    ch = rng.permutation(O)[: data.draw(st.integers(0, O))].astype(np.int64)

    dx = np.empty_like(x)
    K.conv2d_backward_input(dx, u, w, s, groups)
    check(lambda a: R.conv2d_forward(a, d(w), d(b), s, groups), d(x), rng.standard_normal(x.shape), d(u), dx)

    dw = np.empty((len(ch), Ig, k, k), np.float32)
    K.conv2d_backward_weight(dw, u, x, s, groups, ch)
    vw = np.zeros(w.shape)
    vw[ch] = rng.standard_normal((len(ch), Ig, k, k))
    full = np.zeros(w.shape)
    full[ch] = dw
    check(lambda a: R.conv2d_forward(d(x), a, d(b), s, groups), d(w), vw, d(u), full)

    db = np.empty(len(ch), np.float32)
    K.bias_backward(db, u, ch)
    vb = np.zeros(O)
    vb[ch] = rng.standard_normal(len(ch))
    fullb = np.zeros(O)
    fullb[ch] = db
    check(lambda a: R.conv2d_forward(d(x), d(w), a, s, groups), d(b), vb, d(u), fullb)


@SETTINGS
@given(data=st.data())
def test_depthwise_gradients(data):
    # up to 5 channels, or more than one block of the channel-block layout (small maps)
    C = data.draw(st.one_of(st.integers(1, 5), st.integers(63, 70)))
    k, s = data.draw(st.sampled_from([3, 5, 7])), data.draw(st.sampled_from([1, 2]))
    N, H, W = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    rng = np.random.default_rng(data.draw(seeds()))
    Ho, Wo = out_size(H, k, s), out_size(W, k, s)
    x, w, b, u = rnd(rng, N, C, H, W), rnd(rng, C, 1, k, k), rnd(rng, C), rnd(rng, N, C, Ho, Wo)
    ch = rng.permutation(C)[: data.draw(st.integers(0, C))].astype(np.int64)

    dx = np.empty_like(x)
    K.depthwise_backward_input(dx, u, w, s)
    check(lambda a: R.depthwise_forward(a, d(w), d(b), s), d(x), rng.standard_normal(x.shape), d(u), dx)

    dw = np.empty((len(ch), 1, k, k), np.float32)
    K.depthwise_backward_weight(dw, u, np.ascontiguousarray(x[:, ch]), s, ch)
    vw = np.zeros(w.shape)
    vw[ch] = rng.standard_normal((len(ch), 1, k, k))
    full = np.zeros(w.shape)
    full[ch] = dw
    check(lambda a: R.depthwise_forward(d(x), a, d(b), s), d(w), vw, d(u), full)


@SETTINGS
@given(data=st.data())
def test_pointwise_and_linear_gradients(data):
    N, I, O = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    H, W = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(seeds()))
    x, w, b, u = rnd(rng, N, I, H, W), rnd(rng, O, I, 1, 1), rnd(rng, O), rnd(rng, N, O, H, W)
    ch = rng.permutation(O)[: data.draw(st.integers(0, O))].astype(np.int64)

    dx = np.empty_like(x)
    K.pointwise_backward_input(dx, u, w)
    check(lambda a: R.pointwise_forward(a, d(w), d(b)), d(x), rng.standard_normal(x.shape), d(u), dx)
    dw = np.empty((len(ch), I, 1, 1), np.float32)
    K.pointwise_backward_weight(dw, u, x, ch)
    vw, full = np.zeros(w.shape), np.zeros(w.shape)
    vw[ch] = rng.standard_normal((len(ch), I, 1, 1))
    full[ch] = dw
    check(lambda a: R.pointwise_forward(d(x), a, d(b)), d(w), vw, d(u), full)

    x2, w2, u2 = x[:, :, 0, 0].copy(), w[:, :, 0, 0].copy(), u[:, :, 0, 0].copy()
    dx2 = np.empty_like(x2)
    K.linear_backward_input(dx2, u2, w2)
    check(lambda a: R.linear_forward(a, d(w2), d(b)), d(x2), rng.standard_normal(x2.shape), d(u2), dx2)
    dw2 = np.empty((len(ch), I), np.float32)
    K.linear_backward_weight(dw2, u2, x2, ch)
    vw2, full2 = np.zeros(w2.shape), np.zeros(w2.shape)
    vw2[ch] = rng.standard_normal((len(ch), I))
    full2[ch] = dw2
    check(lambda a: R.linear_forward(d(x2), a, d(b)), d(w2), vw2, d(u2), full2)
    db = np.empty(len(ch), np.float32)
    K.bias_backward(db, u2.reshape(N, O, 1, 1), ch)    # linear passes an (N, O, 1, 1) view
    vb, fullb = np.zeros(O), np.zeros(O)
    vb[ch] = rng.standard_normal(len(ch))
    fullb[ch] = db
    check(lambda a: R.linear_forward(d(x2), d(w2), a), d(b), vb, d(u2), fullb)


# --------------------------------------------------------------------------- element-wise
@SETTINGS
@given(seed=seeds(), N=st.integers(1, 2), C=st.integers(1, 4), h=st.integers(1, 4),
       w=st.integers(1, 4), f=st.integers(1, 3))
def test_elementwise_gradients(seed, N, C, h, w, f):
    rng = np.random.default_rng(seed)
    H, W = h * f, w * f
    # relu6: keep every element at least 0.1 from the kinks so +-EPS never crosses one
    x = rng.uniform(-2, 8, (N, C, H, W))
    x[np.abs(x) < 0.1] += 0.2
    x[np.abs(x - 6) < 0.1] += 0.2
    x32 = x.astype(np.float32)
    u = rnd(rng, N, C, H, W)
    mask = np.empty((x.size + 7) // 8, np.uint8)
    K.relu6_forward_save_mask(np.empty_like(x32), mask, x32)
    dx = np.empty_like(u)
    K.relu6_backward(dx, u, mask)
    check(R.relu6_forward, d(x32), rng.standard_normal(x.shape), d(u), dx)

    # add: both inputs get dout (the tape calls accumulate when an input is reused)
    y = rnd(rng, N, C, H, W)
    check(lambda a: R.add_forward(a, d(y)), d(x32), rng.standard_normal(x.shape), d(u), u)
    g = np.zeros_like(u)
    K.accumulate(g, u)
    K.accumulate(g, u)
    check(lambda a: R.add_forward(a, a), d(x32), rng.standard_normal(x.shape), d(u), g)

    uo = rnd(rng, N, C)
    gx = np.empty_like(u)
    K.global_avg_pool_backward(gx, uo)
    check(R.global_avg_pool_forward, d(x32), rng.standard_normal(x.shape), d(uo), gx)

    us = rnd(rng, N, C, h, w)
    px = np.empty_like(u)
    K.avg_pool_backward(px, us, f)
    check(lambda a: R.avg_pool_forward(a, f), d(x32), rng.standard_normal(x.shape), d(us), px)

    small = rnd(rng, N, C, h, w)
    ds = np.empty_like(small)
    K.upsample_nearest_backward(ds, u, f)
    check(lambda a: R.upsample_nearest_forward(a, f), d(small), rng.standard_normal(small.shape), d(u), ds)


# --------------------------------------------------------------------------- head
@SETTINGS
@given(seed=seeds(), N=st.integers(1, 5), D=st.integers(1, 30), Kc=st.integers(1, 8),
       scale=st.sampled_from([1.0, 10.0]))
def test_head_gradients(seed, N, D, Kc, scale):
    rng = np.random.default_rng(seed)
    x = rnd(rng, N, D) + np.float32(0.5)      # norms well above the clamp
    z, norms = np.empty_like(x), np.empty(N, np.float32)
    K.l2_normalize_forward(z, norms, x)
    u = rnd(rng, N, D)
    dx = np.empty_like(x)
    K.l2_normalize_backward(dx, u, z, norms)
    check(lambda a: R.l2_normalize_forward(a)[0], d(x), rng.standard_normal(x.shape), d(u), dx,
          jac_scale=1.0 / norms.min())

    protos = rnd(rng, Kc, D)
    ul = rnd(rng, N, Kc)
    dz = np.empty_like(z)
    K.cosine_logits_backward(dz, ul, protos, scale)
    check(lambda a: R.cosine_logits_forward(a, d(protos), scale), d(z), rng.standard_normal(z.shape), d(ul), dz)

    dp = np.empty_like(protos)
    K.cosine_logits_backward_protos(dp, ul, z, scale)
    check(lambda a: R.cosine_logits_forward(d(z), a, scale), d(protos), rng.standard_normal(protos.shape), d(ul), dp)

    logits = (rnd(rng, N, Kc) * 3).astype(np.float32)
    labels = rng.integers(0, Kc, N).astype(np.int64)
    probs = np.empty_like(logits)
    K.softmax_cross_entropy_forward(probs, logits, labels)
    dl = np.empty_like(logits)
    K.softmax_cross_entropy_backward(dl, probs, labels)
    check(lambda a: np.array([R.softmax_cross_entropy_forward(a, labels)[1]]), d(logits),
          rng.standard_normal(logits.shape), np.ones(1), dl)


@SETTINGS
@given(seed=seeds(), Kc=st.integers(1, 5), extra=st.integers(0, 6), n_query=st.integers(0, 4),
       D=st.integers(1, 20))
def test_class_mean_gradient(seed, Kc, extra, n_query, D):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.concatenate([np.arange(Kc), rng.integers(0, Kc, extra)])).astype(np.int64)
    z = rnd(rng, len(labels) + n_query, D)
    u = rnd(rng, Kc, D)
    dz = np.empty_like(z)
    K.class_mean_backward(dz, u, labels)
    check(lambda a: R.class_mean_forward(a, labels, Kc), d(z), rng.standard_normal(z.shape), d(u), dz)


@pytest.mark.parametrize("s", [1, 2])
def test_gradient_check_catches_a_wrong_gradient(s):
    """The check has teeth: the depthwise input gradient computed with the kernel flipped
    (a classic transposition bug) is rejected."""
    rng = np.random.default_rng(3)
    x, w, b = rnd(rng, 1, 3, 7, 7), rnd(rng, 3, 1, 3, 3), rnd(rng, 3)
    u = rnd(rng, 1, 3, out_size(7, 3, s), out_size(7, 3, s))
    dx = np.empty_like(x)
    K.depthwise_backward_input(dx, u, np.ascontiguousarray(w[:, :, ::-1, ::-1]), s)
    with pytest.raises(AssertionError):
        check(lambda a: R.depthwise_forward(a, d(w), d(b), s), d(x), rng.standard_normal(x.shape), d(u), dx)
