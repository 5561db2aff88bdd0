"""Numba kernels by op family, forward and backward side by side.

Every public kernel writes into destinations it is given, validates its inputs cheaply and raises
``KernelInputError`` naming the op. None allocates, except that the k x k convolutions and the
pointwise weight gradient allocate their scratch when the caller passes none (the executor passes
planned buffers; ``*_scratch_size`` gives the sizes). ``reference`` holds slow NumPy
twins used by the tests. Importing this package compiles (or loads from Numba's cache) every
kernel once.
"""
from ._jit import KernelInputError
from .conv import (
    conv2d_backward_input, conv2d_backward_input_scratch_size, conv2d_backward_weight, conv2d_forward,
    conv2d_forward_scratch_size,
)
from .depthwise import (
    depthwise_backward_input, depthwise_backward_weight, depthwise_forward, depthwise_scratch_size,
)
from .elementwise import (
    accumulate, add_forward, avg_pool_backward, avg_pool_forward, bias_backward,
    global_avg_pool_backward, global_avg_pool_forward, relu6_backward, relu6_forward,
    relu6_forward_save_mask, upsample_nearest_backward, upsample_nearest_forward,
)
from .head import (
    class_mean_backward, class_mean_forward, cosine_logits_backward, cosine_logits_backward_protos,
    cosine_logits_forward, l2_normalize_backward, l2_normalize_forward, softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)
from .pointwise import (
    linear_backward_input, linear_backward_weight, linear_forward, pointwise_backward_input,
    pointwise_backward_weight, pointwise_backward_weight_scratch_size, pointwise_forward,
)

__all__ = [
    "KernelInputError",
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
    "conv2d_forward_scratch_size", "conv2d_backward_input_scratch_size",
    "depthwise_forward", "depthwise_backward_input", "depthwise_backward_weight", "depthwise_scratch_size",
    "pointwise_forward", "pointwise_backward_input", "pointwise_backward_weight",
    "pointwise_backward_weight_scratch_size",
    "linear_forward", "linear_backward_input", "linear_backward_weight",
    "relu6_forward", "relu6_forward_save_mask", "relu6_backward", "add_forward", "accumulate",
    "bias_backward", "global_avg_pool_forward", "global_avg_pool_backward",
    "avg_pool_forward", "avg_pool_backward", "upsample_nearest_forward",
    "upsample_nearest_backward",
    "l2_normalize_forward", "l2_normalize_backward", "cosine_logits_forward",
    "cosine_logits_backward", "cosine_logits_backward_protos", "class_mean_forward",
    "class_mean_backward", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
]
