"""Every public kernel against its slow NumPy twin (microtrain.kernels.reference).

Hypothesis draws the shape parameters (batch, channels, odd and 1x1 maps, strides, kernel sizes,
groups, unordered channel subsets including empty and full); the array contents come from a
NumPy generator seeded by a drawn integer, which keeps example generation fast.

Tolerance, from the standard bound for a float32 sum of n products: |fl(s) - s| <= n u S with
u = 2**-24 and S the same sum taken over absolute values. The twin runs in float64 on the same
float32 inputs (its own error is ~1e-16, negligible), and S is computed by running the twin on
|inputs|. We allow 2 n u S (FMA and vectorised partial sums only lower the real error).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import microtrain.kernels as K
from microtrain.kernels import reference as R

U = 2.0 ** -24
# max_examples comes from the active Hypothesis profile: its default (100) here, a handful under
# --hypothesis-profile=aarch64 (tests/conftest.py), which tools/arm_check.py uses on emulated ARM.
SETTINGS = settings(deadline=None)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, exact, abs_exact, n_terms):
    """|got - exact| <= 2 n u |.|-sum + a tiny floor, element-wise."""
    got = np.asarray(got, np.float64)
    bound = 2 * n_terms * U * np.asarray(abs_exact, np.float64) + 1e-30
    err = np.abs(got - exact)
    assert got.shape == exact.shape
    worst = np.max(err - bound) if err.size else 0
    assert worst <= 0, f"max error {err.max():.3g} exceeds bound (n_terms={n_terms})"


def d(a):
    return np.asarray(a, np.float64)


def subset(data, n):
    """An unordered subset of range(n), possibly empty or full, as int64."""
    size = data.draw(st.integers(0, n), label="subset size")
    perm = data.draw(st.permutations(range(n)), label="perm")
    return np.array(perm[:size], dtype=np.int64)


def out_size(h, k, s):
    return (h + 2 * ((k - 1) // 2) - k) // s + 1


sizes = st.integers(1, 9)


# --------------------------------------------------------------------------- conv
@SETTINGS
@given(data=st.data())
def test_conv2d_matches_twin(data):
    N = data.draw(st.integers(1, 2), label="N")
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    Ig = data.draw(st.integers(1, 3), label="Ig")
    Og = data.draw(st.integers(1, 3), label="Og")
    k = data.draw(st.sampled_from([1, 3]), label="k")
    s = data.draw(st.sampled_from([1, 2]), label="stride")
    H, W = data.draw(sizes, label="H"), data.draw(sizes, label="W")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    I, O = Ig * groups, Og * groups
    Ho, Wo = out_size(H, k, s), out_size(W, k, s)
    x, w, b = f32(rng, N, I, H, W), f32(rng, O, Ig, k, k), f32(rng, O)
    dy = f32(rng, N, O, Ho, Wo)
    ch = subset(data, O)

    out = np.full((N, O, Ho, Wo), np.nan, np.float32)
    K.conv2d_forward(out, x, w, b, s, groups)
    close(out, R.conv2d_forward(d(x), d(w), d(b), s, groups),
          R.conv2d_forward(abs(d(x)), abs(d(w)), abs(d(b)), s, groups), Ig * k * k + 1)

    dx = np.full_like(x, np.nan)
    K.conv2d_backward_input(dx, dy, w, s, groups)
    close(dx, R.conv2d_backward_input(d(dy), d(w), s, groups, (H, W)),
          R.conv2d_backward_input(abs(d(dy)), abs(d(w)), s, groups, (H, W)), Og * k * k)

    # a scratch given by the caller (as the executor does), full of junk, changes nothing
    junk = np.full(K.conv2d_forward_scratch_size(x.shape, k, s, groups) + 3, np.nan, np.float32)
    again = np.empty_like(out)
    K.conv2d_forward(again, x, w, b, s, groups, junk)
    assert np.array_equal(again, out)
    junk = np.full(K.conv2d_backward_input_scratch_size(x.shape, k, s), np.nan, np.float32)
    K.conv2d_backward_input(again := np.empty_like(dx), dy, w, s, groups, junk)
    assert np.array_equal(again, dx)

    dw = np.full((len(ch), Ig, k, k), np.nan, np.float32)
    K.conv2d_backward_weight(dw, dy, x, s, groups, ch)
    close(dw, R.conv2d_backward_weight(d(dy), d(x), s, groups, ch, k),
          R.conv2d_backward_weight(abs(d(dy)), abs(d(x)), s, groups, ch, k), N * Ho * Wo)
    junk = np.full(K.conv2d_forward_scratch_size(x.shape, k, s, groups), np.nan, np.float32)
    K.conv2d_backward_weight(again := np.empty_like(dw), dy, x, s, groups, ch, junk)
    assert np.array_equal(again, dw)


# --------------------------------------------------------------------------- depthwise
@SETTINGS
@given(data=st.data())
def test_depthwise_matches_twin(data):
    N = data.draw(st.integers(1, 2), label="N")
    C = data.draw(st.integers(1, 6), label="C")
    k = data.draw(st.sampled_from([3, 5, 7]), label="k")
    s = data.draw(st.sampled_from([1, 2]), label="stride")
    H, W = data.draw(sizes, label="H"), data.draw(sizes, label="W")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    Ho, Wo = out_size(H, k, s), out_size(W, k, s)
    x, w, b = f32(rng, N, C, H, W), f32(rng, C, 1, k, k), f32(rng, C)
    dy = f32(rng, N, C, Ho, Wo)
    ch = subset(data, C)
    x_sel = np.ascontiguousarray(x[:, ch])

    out = np.full((N, C, Ho, Wo), np.nan, np.float32)
    K.depthwise_forward(out, x, w, b, s)
    close(out, R.depthwise_forward(d(x), d(w), d(b), s),
          R.depthwise_forward(abs(d(x)), abs(d(w)), abs(d(b)), s), k * k + 1)

    dx = np.full_like(x, np.nan)
    K.depthwise_backward_input(dx, dy, w, s)
    close(dx, R.depthwise_backward_input(d(dy), d(w), s, (H, W)),
          R.depthwise_backward_input(abs(d(dy)), abs(d(w)), s, (H, W)), k * k)

    junk = np.full(K.depthwise_scratch_size(x.shape, k, s), np.nan, np.float32)
    K.depthwise_forward(again := np.empty_like(out), x, w, b, s, junk)
    assert np.array_equal(again, out)
    K.depthwise_backward_input(again := np.empty_like(dx), dy, w, s, junk)
    assert np.array_equal(again, dx)

    dw = np.full((len(ch), 1, k, k), np.nan, np.float32)
    K.depthwise_backward_weight(dw, dy, x_sel, s, ch)
    close(dw, R.depthwise_backward_weight(d(dy), d(x_sel), s, ch, k),
          R.depthwise_backward_weight(abs(d(dy)), abs(d(x_sel)), s, ch, k), N * Ho * Wo)
    junk = np.full(K.depthwise_scratch_size(x.shape, k, s), np.nan, np.float32)
    K.depthwise_backward_weight(again := np.empty_like(dw), dy, x_sel, s, ch, junk)
    assert np.array_equal(again, dw)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_depthwise_channel_blocks_match_twin_and_phase_planes(data):
    """The channel-block layout (small maps) with full and partial blocks of LANES channels: the
    forward and input gradient equal the phase-plane kernels' bit for bit and the twin to
    rounding; the weight gradient matches the twin, its masked rows equal the full rows bit for
    bit, and a scratch full of junk changes nothing."""
    from microtrain.kernels import depthwise as kdw
    from microtrain.kernels._jit import phase_scratch_size

    k = data.draw(st.sampled_from([3, 5, 7]), label="k")
    s = data.draw(st.sampled_from([1, 2]), label="stride")
    H, W = data.draw(st.integers(1, 9), label="H"), data.draw(st.integers(1, 9), label="W")
    C = data.draw(st.one_of(st.integers(1, 4), st.integers(kdw.LANES - 2, 2 * kdw.LANES + 3)), label="C")
    N = data.draw(st.integers(1, 3), label="N")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    Ho, Wo = out_size(H, k, s), out_size(W, k, s)
    x, w, b = f32(rng, N, C, H, W), f32(rng, C, 1, k, k), f32(rng, C)
    dy = f32(rng, N, C, Ho, Wo)
    blocks = np.full(kdw._block_scratch_size(H, W, k, s) + 3, np.nan, np.float32)
    planes = np.full(phase_scratch_size(H, W, k, s), np.nan, np.float32)

    out, ref = np.full((N, C, Ho, Wo), np.nan, np.float32), np.empty((N, C, Ho, Wo), np.float32)
    kdw._depthwise_forward_blocks(out, x, w, b, s, blocks)
    kdw._depthwise_forward(ref, x, w, b, s, planes)
    np.testing.assert_array_equal(out, ref)
    close(out, R.depthwise_forward(d(x), d(w), d(b), s),
          R.depthwise_forward(abs(d(x)), abs(d(w)), abs(d(b)), s), k * k + 1)

    dx, ref = np.full_like(x, np.nan), np.empty_like(x)
    kdw._depthwise_backward_input_blocks(dx, dy, w, s, blocks)
    kdw._depthwise_backward_input(ref, dy, w, s, planes)
    np.testing.assert_array_equal(dx, ref)
    close(dx, R.depthwise_backward_input(d(dy), d(w), s, (H, W)),
          R.depthwise_backward_input(abs(d(dy)), abs(d(w)), s, (H, W)), k * k)

    full = np.arange(C, dtype=np.int64)
    dw = np.full((C, 1, k, k), np.nan, np.float32)
    kdw._depthwise_backward_weight_blocks(dw, dy, x, s, full, blocks)
    close(dw, R.depthwise_backward_weight(d(dy), d(x), s, full, k),
          R.depthwise_backward_weight(abs(d(dy)), abs(d(x)), s, full, k), N * Ho * Wo)
    ch = subset(data, C)
    part = np.full((len(ch), 1, k, k), np.nan, np.float32)
    kdw._depthwise_backward_weight_blocks(part, dy, np.ascontiguousarray(x[:, ch]), s, ch,
                                          np.full_like(blocks, np.nan))
    np.testing.assert_array_equal(part, dw[ch])


# --------------------------------------------------------------------------- pointwise / linear
@SETTINGS
@given(data=st.data())
def test_pointwise_and_linear_match_twin(data):
    N = data.draw(st.integers(1, 3), label="N")
    I = data.draw(st.integers(1, 12), label="I")
    O = data.draw(st.integers(1, 12), label="O")
    H, W = data.draw(sizes, label="H"), data.draw(sizes, label="W")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x, w, b, dy = f32(rng, N, I, H, W), f32(rng, O, I, 1, 1), f32(rng, O), f32(rng, N, O, H, W)
    ch = subset(data, O)

    out = np.full((N, O, H, W), np.nan, np.float32)
    K.pointwise_forward(out, x, w, b)
    close(out, R.pointwise_forward(d(x), d(w), d(b)),
          R.pointwise_forward(abs(d(x)), abs(d(w)), abs(d(b))), I + 1)
    dx = np.full_like(x, np.nan)
    K.pointwise_backward_input(dx, dy, w)
    close(dx, R.pointwise_backward_input(d(dy), d(w)), R.pointwise_backward_input(abs(d(dy)), abs(d(w))), O)
    dw = np.full((len(ch), I, 1, 1), np.nan, np.float32)
    K.pointwise_backward_weight(dw, dy, x, ch)
    close(dw, R.pointwise_backward_weight(d(dy), d(x), ch),
          R.pointwise_backward_weight(abs(d(dy)), abs(d(x)), ch), N * H * W)

    x2, w2, dy2 = x[:, :, 0, 0].copy(), w[:, :, 0, 0].copy(), dy[:, :, 0, 0].copy()
    out2 = np.full((N, O), np.nan, np.float32)
    K.linear_forward(out2, x2, w2, b)
    close(out2, R.linear_forward(d(x2), d(w2), d(b)), R.linear_forward(abs(d(x2)), abs(d(w2)), abs(d(b))), I + 1)
    dx2 = np.full_like(x2, np.nan)
    K.linear_backward_input(dx2, dy2, w2)
    close(dx2, R.linear_backward_input(d(dy2), d(w2)), R.linear_backward_input(abs(d(dy2)), abs(d(w2))), O)
    dw2 = np.full((len(ch), I), np.nan, np.float32)
    K.linear_backward_weight(dw2, dy2, x2, ch)
    close(dw2, R.linear_backward_weight(d(dy2), d(x2), ch),
          R.linear_backward_weight(abs(d(dy2)), abs(d(x2)), ch), N)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pointwise_weight_gradient_over_a_batch_matches_twin(data):
    """The three ways the weight gradient runs agree with the twin: x transposed when the whole
    batch has fewer than SHORT_DOT positions, rows read in place image by image for maps of
    PACK_POSITIONS or more (or one image), and otherwise the rows of several images packed side
    by side (the last block shorter). A masked gradient is the full one's rows bit for bit, and
    a scratch full of junk changes nothing."""
    from microtrain.kernels import pointwise as kpw

    path = data.draw(st.sampled_from(["transposed", "in place", "packed"]), label="path")
    if path == "transposed":
        N, H, W = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    elif path == "in place":
        N = data.draw(st.integers(1, 3), label="N")
        H, W = (23, 23) if N > 1 else (data.draw(st.integers(8, 12)), data.draw(st.integers(8, 12)))
    else:
        H, W = data.draw(st.integers(1, 6), label="H"), data.draw(st.integers(2, 6), label="W")
        G = -(-kpw.PACK_POSITIONS // (H * W))
        N = data.draw(st.integers(max(2, -(-kpw.SHORT_DOT // (H * W))), 2 * G + 3), label="N")
    assert (N * H * W < kpw.SHORT_DOT) == (path == "transposed")
    assert (N == 1 or H * W >= kpw.PACK_POSITIONS) == (path == "in place") or path == "transposed"
    I, O = data.draw(st.integers(1, 9), label="I"), data.draw(st.integers(1, 9), label="O")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x, dy = f32(rng, N, I, H, W), f32(rng, N, O, H, W)
    ch = subset(data, O)
    full = np.arange(O, dtype=np.int64)

    dw = np.full((O, I, 1, 1), np.nan, np.float32)
    K.pointwise_backward_weight(dw, dy, x, full)
    close(dw, R.pointwise_backward_weight(d(dy), d(x), full),
          R.pointwise_backward_weight(abs(d(dy)), abs(d(x)), full), N * H * W)
    part = np.full((len(ch), I, 1, 1), np.nan, np.float32)
    junk = np.full(kpw.pointwise_backward_weight_scratch_size(x.shape, len(ch)) + 5, np.nan, np.float32)
    K.pointwise_backward_weight(part, dy, x, ch, junk)
    np.testing.assert_array_equal(part, dw[ch])


# --------------------------------------------------------------------------- element-wise
@SETTINGS
@given(data=st.data())
def test_elementwise_match_twin(data):
    N = data.draw(st.integers(1, 3), label="N")
    C = data.draw(st.integers(1, 5), label="C")
    H, W = data.draw(sizes, label="H"), data.draw(sizes, label="W")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = (f32(rng, N, C, H, W) * 5 + 2).astype(np.float32)
    flat = x.reshape(-1)
    kinks = np.array([0.0, 6.0, -0.0, 3.0], np.float32)[: flat.size]   # exactly on the kinks
    flat[: kinks.size] = kinks
    y = f32(rng, N, C, H, W)

    out = np.full_like(x, np.nan)
    K.relu6_forward(out, x)
    np.testing.assert_array_equal(out, R.relu6_forward(x))
    inplace = x.copy()
    K.relu6_forward(inplace, inplace)
    np.testing.assert_array_equal(inplace, out)

    mask = np.full((x.size + 7) // 8, 0xFF, np.uint8)
    out2 = np.full_like(x, np.nan)
    K.relu6_forward_save_mask(out2, mask, x)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(mask, R.relu6_mask(x))

    dx = np.full_like(y, np.nan)
    K.relu6_backward(dx, y, mask)
    np.testing.assert_array_equal(dx, R.relu6_backward(y, x))
    y_inplace = y.copy()
    K.relu6_backward(y_inplace, y_inplace, mask)
    np.testing.assert_array_equal(y_inplace, dx)

    s = np.full_like(x, np.nan)
    K.add_forward(s, x, y)
    np.testing.assert_array_equal(s, x + y)        # one float32 rounding, like NumPy
    a = x.copy()
    K.add_forward(a, a, y)
    np.testing.assert_array_equal(a, s)
    acc = y.copy()
    K.accumulate(acc, x)
    np.testing.assert_array_equal(acc, y + x)

    ch = subset(data, C)
    db = np.full(len(ch), np.nan, np.float32)
    K.bias_backward(db, y, ch)
    close(db, R.bias_backward(d(y), ch), R.bias_backward(abs(d(y)), ch), N * H * W)

    g = np.full((N, C), np.nan, np.float32)
    K.global_avg_pool_forward(g, y)
    close(g, R.global_avg_pool_forward(d(y)), R.global_avg_pool_forward(abs(d(y))), H * W + 1)
    dout = f32(rng, N, C)
    gx = np.full_like(y, np.nan)
    K.global_avg_pool_backward(gx, dout)
    close(gx, R.global_avg_pool_backward(d(dout), (H, W)), R.global_avg_pool_backward(abs(d(dout)), (H, W)), 2)


@pytest.mark.parametrize("size", [1, 7, 8, 9, 63, 511, 512, 513, 520, 1024, 1031, 5000])
def test_relu6_mask_blocks_at_every_boundary(size):
    """The mask's bit planes per block of MASK_BLOCK elements (the last block short, its unused
    bits 0) match the twin's layout, and backward reads back exactly the elements inside (0, 6)."""
    from microtrain.kernels.elementwise import MASK_BLOCK

    rng = np.random.default_rng(size)
    x = (f32(rng, size) * 5 + 2).astype(np.float32)
    mask = np.full((size + 7) // 8, 0xFF, np.uint8)
    out = np.empty_like(x)
    K.relu6_forward_save_mask(out, mask, x)
    np.testing.assert_array_equal(mask, R.relu6_mask(x, MASK_BLOCK))
    np.testing.assert_array_equal(out, R.relu6_forward(x))
    dy = f32(rng, size)
    dx = np.full_like(dy, np.nan)
    K.relu6_backward(dx, dy, mask)
    np.testing.assert_array_equal(dx, R.relu6_backward(dy, x))


@SETTINGS
@given(data=st.data())
def test_pool_and_upsample_match_twin(data):
    N = data.draw(st.integers(1, 2), label="N")
    C = data.draw(st.integers(1, 4), label="C")
    f = data.draw(st.integers(1, 4), label="factor")
    h, w = data.draw(st.integers(1, 5), label="h"), data.draw(st.integers(1, 5), label="w")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    big, small = f32(rng, N, C, h * f, w * f), f32(rng, N, C, h, w)

    p = np.full((N, C, h, w), np.nan, np.float32)
    K.avg_pool_forward(p, big, f)
    close(p, R.avg_pool_forward(d(big), f), R.avg_pool_forward(abs(d(big)), f), f * f + 1)
    dbig = np.full_like(big, np.nan)
    K.avg_pool_backward(dbig, small, f)
    close(dbig, R.avg_pool_backward(d(small), f), R.avg_pool_backward(abs(d(small)), f), 2)

    up = np.full_like(big, np.nan)
    K.upsample_nearest_forward(up, small, f)
    np.testing.assert_array_equal(up, R.upsample_nearest_forward(small, f))
    dsmall = np.full_like(small, np.nan)
    K.upsample_nearest_backward(dsmall, big, f)
    close(dsmall, R.upsample_nearest_backward(d(big), f), R.upsample_nearest_backward(abs(d(big)), f), f * f)


# --------------------------------------------------------------------------- head
@SETTINGS
@given(data=st.data())
def test_head_matches_twin(data):
    N = data.draw(st.integers(1, 6), label="N")
    D = data.draw(st.integers(1, 40), label="D")
    Kc = data.draw(st.integers(1, 10), label="classes")
    scale = data.draw(st.sampled_from([1.0, 10.0, 16.5]), label="scale")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = f32(rng, N, D)
    x[0] *= 0  # a zero row: the clamped branch

    z = np.full_like(x, np.nan)
    norms = np.full(N, np.nan, np.float32)
    K.l2_normalize_forward(z, norms, x)
    ref_z, ref_norms = R.l2_normalize_forward(d(x))
    np.testing.assert_allclose(norms, ref_norms, rtol=4 * D * U, atol=0)
    np.testing.assert_allclose(z, ref_z, rtol=0, atol=8 * D * U)   # |z| <= 1
    dout = f32(rng, N, D)
    dz = np.full_like(x, np.nan)
    K.l2_normalize_backward(dz, dout, z, norms)
    rows = ref_norms > 0
    ref_dz = R.l2_normalize_backward(d(dout)[rows], d(x)[rows])
    scale_rows = (np.abs(d(dout)[rows]).sum(1, keepdims=True) + 1) / ref_norms[rows, None]
    assert np.all(np.abs(dz[rows] - ref_dz) <= 8 * D * U * scale_rows)
    np.testing.assert_allclose(dz[~rows], d(dout)[~rows] * 1e12, rtol=1e-6)

    protos = R.l2_normalize_forward(f32(rng, Kc, D).astype(np.float64))[0].astype(np.float32)
    logits = np.full((N, Kc), np.nan, np.float32)
    K.cosine_logits_forward(logits, z, protos, scale)
    close(logits, R.cosine_logits_forward(d(z), d(protos), scale),
          R.cosine_logits_forward(abs(d(z)), abs(d(protos)), scale), D + 1)
    dl = f32(rng, N, Kc)
    dz2 = np.full_like(z, np.nan)
    K.cosine_logits_backward(dz2, dl, protos, scale)
    close(dz2, R.cosine_logits_backward(d(dl), d(protos), scale),
          R.cosine_logits_backward(abs(d(dl)), abs(d(protos)), scale), Kc + 1)

    dp = np.full_like(protos, np.nan)
    K.cosine_logits_backward_protos(dp, dl, z, scale)
    close(dp, R.cosine_logits_backward_protos(d(dl), d(z), scale),
          R.cosine_logits_backward_protos(abs(d(dl)), abs(d(z)), scale), N + 1)

    labels = rng.integers(0, Kc, N).astype(np.int64)
    big = (f32(rng, N, Kc) * 30).astype(np.float32)         # large logits: stability matters
    probs = np.full_like(big, np.nan)
    loss = K.softmax_cross_entropy_forward(probs, big, labels)
    ref_p, ref_loss = R.softmax_cross_entropy_forward(d(big), labels)
    assert isinstance(loss, float)
    assert abs(loss - ref_loss) <= 1e-6 * (1 + abs(ref_loss))   # float64 inside, float32 inputs
    np.testing.assert_allclose(probs, ref_p, rtol=0, atol=4 * Kc * U)
    dlog = np.full_like(probs, np.nan)
    K.softmax_cross_entropy_backward(dlog, probs, labels)
    np.testing.assert_allclose(dlog, R.softmax_cross_entropy_backward(d(probs), labels), rtol=0, atol=2 * U)
    K.softmax_cross_entropy_backward(probs, probs, labels)   # in place
    np.testing.assert_array_equal(probs, dlog)


# --------------------------------------------------------------------------- masked = full rows
@pytest.mark.parametrize("stride", [1, 2])
def test_masked_weight_gradients_equal_full_rows_bit_for_bit(stride):
    """Each selected row runs the same code whatever else is selected, so the compact gradient
    equals the corresponding rows of the all-channels gradient exactly (not just to rounding)."""
    rng = np.random.default_rng(7)
    N, C, H, W = 2, 12, 9, 7
    ch = np.array([5, 0, 11, 3, 7], np.int64)
    full = np.arange(C, dtype=np.int64)
    x, dy = f32(rng, N, C, H, W), None

    # full conv, groups 2, 3x3
    Ho, Wo = out_size(H, 3, stride), out_size(W, 3, stride)
    dy = f32(rng, N, 8, Ho, Wo)
    a, b = np.empty((8, 6, 3, 3), np.float32), np.empty((len(ch[ch < 8]), 6, 3, 3), np.float32)
    K.conv2d_backward_weight(a, dy, x, stride, 2, np.arange(8, dtype=np.int64))
    K.conv2d_backward_weight(b, dy, x, stride, 2, ch[ch < 8])
    np.testing.assert_array_equal(b, a[ch[ch < 8]])

    # depthwise 5x5
    Ho, Wo = out_size(H, 5, stride), out_size(W, 5, stride)
    dy = f32(rng, N, C, Ho, Wo)
    a, b = np.empty((C, 1, 5, 5), np.float32), np.empty((len(ch), 1, 5, 5), np.float32)
    K.depthwise_backward_weight(a, dy, x, stride, full)
    K.depthwise_backward_weight(b, dy, np.ascontiguousarray(x[:, ch]), stride, ch)
    np.testing.assert_array_equal(b, a[ch])

    # pointwise, linear, bias
    dy = f32(rng, N, C, H, W)
    a, b = np.empty((C, C, 1, 1), np.float32), np.empty((len(ch), C, 1, 1), np.float32)
    K.pointwise_backward_weight(a, dy, x, full)
    K.pointwise_backward_weight(b, dy, x, ch)
    np.testing.assert_array_equal(b, a[ch])
    a, b = np.empty((C, C), np.float32), np.empty((len(ch), C), np.float32)
    x2, dy2 = x[:, :, 0, 0].copy(), dy[:, :, 0, 0].copy()
    K.linear_backward_weight(a, dy2, x2, full)
    K.linear_backward_weight(b, dy2, x2, ch)
    np.testing.assert_array_equal(b, a[ch])
    a, b = np.empty(C, np.float32), np.empty(len(ch), np.float32)
    K.bias_backward(a, dy, full)
    K.bias_backward(b, dy, ch)
    np.testing.assert_array_equal(b, a[ch])


def test_read_only_inputs_are_accepted():
    """Weights memory-mapped read-only from a checkpoint must work like writable ones."""
    rng = np.random.default_rng(1)
    x, w, b = f32(rng, 1, 4, 5, 5), f32(rng, 4, 1, 3, 3), f32(rng, 4)
    for a in (x, w, b):
        a.flags.writeable = False
    out = np.empty((1, 4, 5, 5), np.float32)
    K.depthwise_forward(out, x, w, b, 1)
    close(out, R.depthwise_forward(d(x), d(w), d(b), 1), R.depthwise_forward(abs(d(x)), abs(d(w)), abs(d(b)), 1), 10)


@SETTINGS
@given(data=st.data())
def test_class_mean_matches_twin(data):
    """Prototypes of an episode: support rows first (any class order, every class present),
    query rows after them, which neither pass reads or writes to."""
    Kc = data.draw(st.integers(1, 6), label="ways")
    extra_support = data.draw(st.integers(0, 8), label="extra support rows")
    n_query = data.draw(st.integers(0, 5), label="query rows")
    D = data.draw(st.integers(1, 33), label="D")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    labels = rng.permutation(np.concatenate([np.arange(Kc), rng.integers(0, Kc, extra_support)])).astype(np.int64)
    S = len(labels)
    z = f32(rng, S + n_query, D)
    protos = np.full((Kc, D), np.nan, np.float32)
    K.class_mean_forward(protos, z, labels)
    counts = np.bincount(labels, minlength=Kc)
    close(protos, R.class_mean_forward(d(z), labels, Kc), R.class_mean_forward(abs(d(z)), labels, Kc),
          int(counts.max()) + 1)

    dp = f32(rng, Kc, D)
    dz = np.full_like(z, np.nan)
    K.class_mean_backward(dz, dp, labels)
    np.testing.assert_allclose(dz, R.class_mean_backward(d(dp), labels, len(z)), rtol=2 * U, atol=0)
    assert np.all(dz[S:] == 0)


def test_class_mean_refuses_a_class_without_support():
    z = np.ones((4, 3), np.float32)
    with pytest.raises(K.KernelInputError, match=r"classes \[1\] have no support row"):
        K.class_mean_forward(np.empty((3, 3), np.float32), z, np.array([0, 2, 0], np.int64))
    with pytest.raises(K.KernelInputError, match="5 support labels for 4 rows"):
        K.class_mean_backward(np.empty((4, 3), np.float32), np.ones((1, 3), np.float32), np.zeros(5, np.int64))
