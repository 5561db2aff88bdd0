"""Each kernel's forward and gradients (input, weight, bias) against PyTorch autograd under a
RANDOM upstream gradient (a `.sum()` would hide transposition bugs).

Tolerances: both sides compute in float32 with different summation orders, so results differ
by float32 rounding of sums of at most a few hundred products of O(1) numbers:
atol 1e-4 * (1 + max|ref|) absolute and rtol 1e-4 cover that with margin (the worst-case bound
n u sum|terms| is ~300 * 6e-8 * ~20 = 4e-4 relative to sum|terms|, but random signs keep the
real error ~100x smaller).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import microtrain.kernels as K  # noqa: E402


def same(got, ref):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(ref).max(initial=0)))


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def leaf(a):
    return torch.tensor(a, requires_grad=True)


def out_size(h, k, s):
    return (h + 2 * ((k - 1) // 2) - k) // s + 1


@pytest.mark.parametrize("N,I,O,groups,k,s,H,W", [
    (1, 3, 16, 1, 3, 2, 17, 15), (2, 4, 6, 2, 3, 1, 7, 9), (1, 6, 6, 3, 1, 2, 5, 5), (1, 2, 4, 1, 3, 2, 1, 1)])
def test_conv2d_against_torch(N, I, O, groups, k, s, H, W):
    rng = np.random.default_rng(0)
    x, w, b = rnd(rng, N, I, H, W), rnd(rng, O, I // groups, k, k), rnd(rng, O)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ty = F.conv2d(tx, tw, tb, s, (k - 1) // 2, 1, groups)
    g = rnd(rng, *ty.shape)
    ty.backward(torch.from_numpy(g))
    out = np.empty(ty.shape, np.float32)
    K.conv2d_forward(out, x, w, b, s, groups)
    same(out, ty)
    dx = np.empty_like(x)
    K.conv2d_backward_input(dx, g, w, s, groups)
    same(dx, tx.grad)
    ch = np.array([O - 1, 0, O // 2], np.int64)[: O]
    ch = np.unique(ch)[::-1].copy()
    dw = np.empty((len(ch),) + w.shape[1:], np.float32)
    K.conv2d_backward_weight(dw, g, x, s, groups, ch)
    same(dw, tw.grad[ch])
    db = np.empty(len(ch), np.float32)
    K.bias_backward(db, g, ch)
    same(db, tb.grad[ch])


@pytest.mark.parametrize("N,C,k,s,H,W", [
    (1, 48, 3, 1, 16, 16), (1, 16, 7, 2, 9, 9), (2, 8, 5, 1, 4, 4), (1, 4, 5, 2, 1, 1), (1, 5, 7, 1, 8, 3)])
def test_depthwise_against_torch(N, C, k, s, H, W):
    rng = np.random.default_rng(1)
    x, w, b = rnd(rng, N, C, H, W), rnd(rng, C, 1, k, k), rnd(rng, C)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ty = F.conv2d(tx, tw, tb, s, (k - 1) // 2, 1, C)
    g = rnd(rng, *ty.shape)
    ty.backward(torch.from_numpy(g))
    out = np.empty(ty.shape, np.float32)
    K.depthwise_forward(out, x, w, b, s)
    same(out, ty)
    dx = np.empty_like(x)
    K.depthwise_backward_input(dx, g, w, s)
    same(dx, tx.grad)
    ch = rng.permutation(C)[: max(1, C // 4)].astype(np.int64)
    dw = np.empty((len(ch), 1, k, k), np.float32)
    K.depthwise_backward_weight(dw, g, np.ascontiguousarray(x[:, ch]), s, ch)
    same(dw, tw.grad[ch])
    db = np.empty(len(ch), np.float32)
    K.bias_backward(db, g, ch)
    same(db, tb.grad[ch])


@pytest.mark.parametrize("N,I,O,H,W", [(1, 48, 240, 8, 8), (1, 96, 576, 4, 4), (2, 5, 7, 3, 1)])
def test_pointwise_against_torch(N, I, O, H, W):
    rng = np.random.default_rng(2)
    x, w, b = rnd(rng, N, I, H, W), rnd(rng, O, I, 1, 1), rnd(rng, O)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ty = F.conv2d(tx, tw, tb)
    g = rnd(rng, *ty.shape)
    ty.backward(torch.from_numpy(g))
    out = np.empty(ty.shape, np.float32)
    K.pointwise_forward(out, x, w, b)
    same(out, ty)
    dx = np.empty_like(x)
    K.pointwise_backward_input(dx, g, w)
    same(dx, tx.grad)
    ch = rng.permutation(O)[: O // 4 + 1].astype(np.int64)
    dw = np.empty((len(ch), I, 1, 1), np.float32)
    K.pointwise_backward_weight(dw, g, x, ch)
    same(dw, tw.grad[ch])
    db = np.empty(len(ch), np.float32)
    K.bias_backward(db, g, ch)
    same(db, tb.grad[ch])


def test_linear_against_torch():
    rng = np.random.default_rng(3)
    N, I, O = 3, 20, 7
    x, w, b = rnd(rng, N, I), rnd(rng, O, I), rnd(rng, O)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ty = F.linear(tx, tw, tb)
    g = rnd(rng, N, O)
    ty.backward(torch.from_numpy(g))
    out = np.empty((N, O), np.float32)
    K.linear_forward(out, x, w, b)
    same(out, ty)
    dx = np.empty_like(x)
    K.linear_backward_input(dx, g, w)
    same(dx, tx.grad)
    ch = np.array([6, 2, 3], np.int64)
    dw = np.empty((3, I), np.float32)
    K.linear_backward_weight(dw, g, x, ch)
    same(dw, tw.grad[ch])
    db = np.empty(3, np.float32)
    K.bias_backward(db, g.reshape(N, O, 1, 1), ch)
    same(db, tb.grad[ch])


def test_elementwise_against_torch():
    rng = np.random.default_rng(4)
    x = (rnd(rng, 2, 3, 8, 6) * 5 + 2).astype(np.float32)
    y = rnd(rng, 2, 3, 8, 6)
    tx, ty_ = leaf(x), leaf(y)
    # relu6 -> add -> avg pool 2 -> upsample 2 -> global pool, one graph, random upstream grad
    r = F.relu6(tx)
    s = r + ty_
    p = F.avg_pool2d(s, 2)
    up = F.interpolate(p, scale_factor=2, mode="nearest")
    gp = up.mean(dim=(2, 3))
    g = rnd(rng, 2, 3)
    gp.backward(torch.from_numpy(g))

    r_, mask = np.empty_like(x), np.empty((x.size + 7) // 8, np.uint8)
    K.relu6_forward_save_mask(r_, mask, x)
    same(r_, r)
    s_ = np.empty_like(x)
    K.add_forward(s_, r_, y)
    same(s_, s)
    p_ = np.empty((2, 3, 4, 3), np.float32)
    K.avg_pool_forward(p_, s_, 2)
    same(p_, p)
    up_ = np.empty_like(x)
    K.upsample_nearest_forward(up_, p_, 2)
    same(up_, up)
    gp_ = np.empty((2, 3), np.float32)
    K.global_avg_pool_forward(gp_, up_)
    same(gp_, gp)

    d_up = np.empty_like(x)
    K.global_avg_pool_backward(d_up, g)
    d_p = np.empty_like(p_)
    K.upsample_nearest_backward(d_p, d_up, 2)
    d_s = np.empty_like(x)
    K.avg_pool_backward(d_s, d_p, 2)
    same(d_s, ty_.grad)                       # add passes the gradient through to y
    d_x = np.empty_like(x)
    K.relu6_backward(d_x, d_s, mask)
    same(d_x, tx.grad)


def test_head_against_torch():
    rng = np.random.default_rng(5)
    N, D, Kc, scale = 6, 32, 5, 10.0
    x = rnd(rng, N, D)
    protos = F.normalize(torch.from_numpy(rnd(rng, Kc, D)), dim=1)
    labels = rng.integers(0, Kc, N).astype(np.int64)
    tx = leaf(x)
    z = F.normalize(tx, dim=1)
    logits = scale * z @ protos.T
    loss = F.cross_entropy(logits, torch.from_numpy(labels))
    # a random upstream gradient on z and logits as well as the loss, so every Jacobian is
    # exercised with non-uniform weights
    gz, gl = rnd(rng, N, D), rnd(rng, N, Kc)
    total = loss + (z * torch.from_numpy(gz)).sum() + (logits * torch.from_numpy(gl)).sum()
    total.backward()

    z_, norms = np.empty_like(x), np.empty(N, np.float32)
    K.l2_normalize_forward(z_, norms, x)
    same(z_, z)
    p = protos.numpy()
    lg = np.empty((N, Kc), np.float32)
    K.cosine_logits_forward(lg, z_, p, scale)
    same(lg, logits)
    probs = np.empty_like(lg)
    val = K.softmax_cross_entropy_forward(probs, lg, labels)
    assert abs(val - loss.item()) <= 1e-5 * (1 + abs(loss.item()))
    dl = np.empty_like(lg)
    K.softmax_cross_entropy_backward(dl, probs, labels)
    dl += gl
    dz = np.empty_like(z_)
    K.cosine_logits_backward(dz, dl, p, scale)
    dz += gz
    dx = np.empty_like(x)
    K.l2_normalize_backward(dx, dz, z_, norms)
    same(dx, tx.grad)
