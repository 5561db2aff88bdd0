"""Bad input raises KernelInputError naming the op, never a Numba typing error.

Each op has a table entry: a builder of valid arguments and the positions of its array
arguments whose shape, when changed, must be rejected. Every array argument is then corrupted
in turn (float64, an extra dimension, non-contiguous, wrong shape), and channel/label index
arrays get out-of-range, negative and int32 values.
"""
from __future__ import annotations

import numpy as np
import pytest

import microtrain.kernels as K
from microtrain.kernels import KernelInputError

rng = np.random.default_rng(0)


def f(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def e(*shape):
    return np.empty(shape, np.float32)


I64 = lambda *v: np.array(v, np.int64)  # noqa: E731

# name -> (function, args builder, positions whose shape is constrained by the others; a
# (position, axes) pair when only some axes are: dy's channel axis is free when an index
# array selects from it)
OPS = {
    "conv2d_forward": (K.conv2d_forward, lambda: [e(1, 4, 4, 4), f(1, 2, 8, 8), f(4, 1, 3, 3), f(4), 2, 2], [0, 1, 2, 3]),
    "conv2d_backward_input": (K.conv2d_backward_input, lambda: [e(1, 2, 8, 8), f(1, 4, 4, 4), f(4, 1, 3, 3), 2, 2], [0, 1, 2]),
    "conv2d_backward_weight": (K.conv2d_backward_weight, lambda: [e(2, 1, 3, 3), f(1, 4, 4, 4), f(1, 2, 8, 8), 2, 2, I64(3, 0)], [0, 1, 2, 5]),
    "depthwise_forward": (K.depthwise_forward, lambda: [e(1, 3, 5, 5), f(1, 3, 5, 5), f(3, 1, 3, 3), f(3), 1], [0, 1, 2, 3]),
    "depthwise_backward_input": (K.depthwise_backward_input, lambda: [e(1, 3, 5, 5), f(1, 3, 5, 5), f(3, 1, 5, 5), 1], [0, 1, 2]),
    "depthwise_backward_weight": (K.depthwise_backward_weight, lambda: [e(2, 1, 3, 3), f(1, 3, 5, 5), f(1, 2, 5, 5), 1, I64(2, 0)], [0, (1, (0, 2, 3)), 2, 4]),
    "pointwise_forward": (K.pointwise_forward, lambda: [e(1, 4, 3, 3), f(1, 2, 3, 3), f(4, 2, 1, 1), f(4)], [0, 1, 2, 3]),
    "pointwise_backward_input": (K.pointwise_backward_input, lambda: [e(1, 2, 3, 3), f(1, 4, 3, 3), f(4, 2, 1, 1)], [0, 1, 2]),
    "pointwise_backward_weight": (K.pointwise_backward_weight, lambda: [e(2, 2, 1, 1), f(1, 4, 3, 3), f(1, 2, 3, 3), I64(1, 3)], [0, (1, (0, 2, 3)), 2, 3]),
    "linear_forward": (K.linear_forward, lambda: [e(2, 4), f(2, 3), f(4, 3), f(4)], [0, 1, 2, 3]),
    "linear_backward_input": (K.linear_backward_input, lambda: [e(2, 3), f(2, 4), f(4, 3)], [0, 1, 2]),
    "linear_backward_weight": (K.linear_backward_weight, lambda: [e(2, 3), f(2, 4), f(2, 3), I64(2, 0)], [0, (1, (0,)), 2, 3]),
    "relu6_forward": (K.relu6_forward, lambda: [e(1, 2, 3, 3), f(1, 2, 3, 3)], [0, 1]),
    "relu6_forward_save_mask": (K.relu6_forward_save_mask, lambda: [e(1, 2, 3, 3), np.empty(3, np.uint8), f(1, 2, 3, 3)], [0, 1, 2]),
    "relu6_backward": (K.relu6_backward, lambda: [e(1, 2, 3, 3), f(1, 2, 3, 3), np.zeros(3, np.uint8)], [0, 1, 2]),
    "add_forward": (K.add_forward, lambda: [e(1, 2, 3, 3), f(1, 2, 3, 3), f(1, 2, 3, 3)], [0, 1, 2]),
    "accumulate": (K.accumulate, lambda: [f(1, 2, 3, 3), f(1, 2, 3, 3)], [0, 1]),
    "bias_backward": (K.bias_backward, lambda: [e(2), f(1, 3, 2, 2), I64(2, 1)], [0, 2]),
    "global_avg_pool_forward": (K.global_avg_pool_forward, lambda: [e(1, 3), f(1, 3, 4, 4)], [0]),
    "global_avg_pool_backward": (K.global_avg_pool_backward, lambda: [e(1, 3, 4, 4), f(1, 3)], [1]),
    "avg_pool_forward": (K.avg_pool_forward, lambda: [e(1, 3, 2, 2), f(1, 3, 4, 4), 2], [0, 1]),
    "avg_pool_backward": (K.avg_pool_backward, lambda: [e(1, 3, 4, 4), f(1, 3, 2, 2), 2], [0, 1]),
    "upsample_nearest_forward": (K.upsample_nearest_forward, lambda: [e(1, 3, 4, 4), f(1, 3, 2, 2), 2], [0, 1]),
    "upsample_nearest_backward": (K.upsample_nearest_backward, lambda: [e(1, 3, 2, 2), f(1, 3, 4, 4), 2], [0, 1]),
    "l2_normalize_forward": (K.l2_normalize_forward, lambda: [e(2, 5), e(2), f(2, 5)], [0, 1, 2]),
    "l2_normalize_backward": (K.l2_normalize_backward, lambda: [e(2, 5), f(2, 5), f(2, 5), f(2)], [0, 1, 2, 3]),
    "cosine_logits_forward": (K.cosine_logits_forward, lambda: [e(2, 3), f(2, 5), f(3, 5), 10.0], [0, 1, 2]),
    "cosine_logits_backward": (K.cosine_logits_backward, lambda: [e(2, 5), f(2, 3), f(3, 5), 10.0], [0, 1, 2]),
    "softmax_cross_entropy_forward": (K.softmax_cross_entropy_forward, lambda: [e(2, 3), f(2, 3), I64(0, 2)], [0, 1, 2]),
    "softmax_cross_entropy_backward": (K.softmax_cross_entropy_backward, lambda: [e(2, 3), f(2, 3), I64(0, 2)], [0, 1, 2]),
}

INDEX_ARG = {  # ops with an index array: its position and the exclusive upper bound
    "conv2d_backward_weight": (5, 4), "depthwise_backward_weight": (4, 3),
    "pointwise_backward_weight": (3, 4), "linear_backward_weight": (3, 4), "bias_backward": (2, 3),
    "softmax_cross_entropy_forward": (2, 3), "softmax_cross_entropy_backward": (2, 3),
}


def raises_naming(name, fn, args):
    with pytest.raises(KernelInputError, match=f"^{name}: "):
        fn(*args)


@pytest.mark.parametrize("name", sorted(OPS))
def test_valid_arguments_pass(name):
    fn, build, _ = OPS[name]
    fn(*build())


def _corruptions(a):
    if a.dtype == np.float32:
        yield "float64", a.astype(np.float64)
    else:
        yield "float32", a.astype(np.float32)
    yield "extra dim", a[None]
    yield "non-contiguous", np.repeat(a, 2, axis=-1)[..., ::2]
    yield "not an array", a.tolist()


@pytest.mark.parametrize("name", sorted(OPS))
def test_corrupted_arrays_are_rejected(name):
    fn, build, _ = OPS[name]
    n_args = len(build())
    for i in range(n_args):
        if not isinstance(build()[i], np.ndarray):
            continue
        for what, bad in _corruptions(build()[i]):
            args = build()
            args[i] = bad
            raises_naming(name, fn, args)


@pytest.mark.parametrize("name", sorted(OPS))
def test_wrong_shapes_are_rejected(name):
    fn, build, constrained = OPS[name]
    for spec in constrained:
        i, axes = spec if isinstance(spec, tuple) else (spec, range(build()[spec].ndim))
        for axis in axes:
            args = build()
            shape = list(args[i].shape)
            shape[axis] += 1
            args[i] = np.zeros(shape, args[i].dtype)
            raises_naming(name, fn, args)


def test_read_only_destination_is_rejected():
    out = e(1, 2, 3, 3)
    out.flags.writeable = False
    raises_naming("relu6_forward", K.relu6_forward, [out, f(1, 2, 3, 3)])


@pytest.mark.parametrize("name", sorted(INDEX_ARG))
@pytest.mark.parametrize("bad", ["too big", "negative", "int32"])
def test_bad_indices_are_rejected(name, bad):
    fn, build, _ = OPS[name]
    pos, limit = INDEX_ARG[name]
    args = build()
    idx = args[pos].copy()
    if bad == "too big":
        idx[-1] = limit
    elif bad == "negative":
        idx[0] = -1
    else:
        idx = idx.astype(np.int32)
    args[pos] = idx
    raises_naming(name, fn, args)


@pytest.mark.parametrize("stride", [0, 3, -1, 1.0, True, "1"])
def test_bad_stride_is_rejected(stride):
    raises_naming("depthwise_forward", K.depthwise_forward, [e(1, 3, 5, 5), f(1, 3, 5, 5), f(3, 1, 3, 3), f(3), stride])


@pytest.mark.parametrize("groups", [0, 3, 1.5])
def test_bad_groups_are_rejected(groups):
    raises_naming("conv2d_forward", K.conv2d_forward, [e(1, 4, 4, 4), f(1, 2, 8, 8), f(4, 1, 3, 3), f(4), 2, groups])


def test_pool_factor_must_divide_the_map():
    raises_naming("avg_pool_forward", K.avg_pool_forward, [e(1, 3, 1, 1), f(1, 3, 5, 5), 2])


def test_message_names_op_and_shapes():
    with pytest.raises(KernelInputError) as info:
        K.depthwise_forward(e(1, 16, 8, 8), f(1, 16, 8, 8), f(8, 1, 3, 3), f(8), 1)
    assert str(info.value) == "depthwise_forward: x (1, 16, 8, 8) and w (8, 1, 3, 3) disagree on channels"


SCRATCH_OPS = {  # the convolutions that take a scratch: arguments before it, and its size
    "conv2d_forward": (K.conv2d_forward, lambda: [e(1, 4, 4, 4), f(1, 2, 8, 8), f(4, 1, 3, 3), f(4), 2, 2],
                       K.conv2d_forward_scratch_size((1, 2, 8, 8), 3, 2, 2)),
    "conv2d_backward_input": (K.conv2d_backward_input, lambda: [e(1, 2, 8, 8), f(1, 4, 4, 4), f(4, 1, 3, 3), 2, 2],
                              K.conv2d_backward_input_scratch_size((1, 2, 8, 8), 3, 2)),
    "depthwise_forward": (K.depthwise_forward, lambda: [e(1, 3, 5, 5), f(1, 3, 5, 5), f(3, 1, 3, 3), f(3), 1],
                          K.depthwise_scratch_size((1, 3, 5, 5), 3, 1)),
    "depthwise_backward_input": (K.depthwise_backward_input, lambda: [e(1, 3, 5, 5), f(1, 3, 5, 5), f(3, 1, 5, 5), 1],
                                 K.depthwise_scratch_size((1, 3, 5, 5), 5, 1)),
    "conv2d_backward_weight": (K.conv2d_backward_weight, lambda: [e(2, 1, 3, 3), f(1, 4, 4, 4), f(1, 2, 8, 8), 2, 2, I64(3, 0)],
                               K.conv2d_forward_scratch_size((1, 2, 8, 8), 3, 2, 2)),
    "depthwise_backward_weight": (K.depthwise_backward_weight, lambda: [e(2, 1, 3, 3), f(1, 3, 5, 5), f(1, 2, 5, 5), 1, I64(2, 0)],
                                  K.depthwise_scratch_size((1, 2, 5, 5), 3, 1)),
    "pointwise_backward_weight": (K.pointwise_backward_weight, lambda: [e(2, 2, 1, 1), f(3, 4, 3, 3), f(3, 2, 3, 3), I64(1, 3)],
                                  K.pointwise_backward_weight_scratch_size((3, 2, 3, 3), 2)),
}


@pytest.mark.parametrize("name", sorted(SCRATCH_OPS))
def test_bad_scratch_is_rejected(name):
    fn, build, size = SCRATCH_OPS[name]
    fn(*build(), e(size))  # exactly the size it asks for is enough
    for bad in (e(size - 1), np.empty(size, np.float64), e(size, 1), e(2 * size)[::2]):
        raises_naming(name, fn, build() + [bad])
    ro = e(size)
    ro.flags.writeable = False
    raises_naming(name, fn, build() + [ro])
