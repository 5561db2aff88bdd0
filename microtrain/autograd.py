"""The tape: ops with forward and backward side by side, a graph of them, and its executor.

Build a graph from ops on NumPy parameters, say what is trained with a ``Selection``, and run::

    g = Graph()
    x = g.input("x", (1, 8, 16, 16))
    h = g.relu6(g.pointwise(x, w1, b1, name="pw1"))       # w1 (16, 8, 1, 1) float32
    h = g.depthwise(h, w2, b2, stride=1, name="dw")         # w2 (16, 1, 3, 3)
    z = g.l2_normalize(g.global_avg_pool(h))
    loss = g.cross_entropy(g.cosine_logits(z, g.input("prototypes", (5, 16)), scale=10.0),
                           g.input("labels", (1,), np.int64))
    run = Executor(g, Selection({"dw": LayerUpdate.channels([0, 3])}))
    run.forward({"x": x_array, "prototypes": protos, "labels": labels})
    run.backward()
    dw, db = run.grad("dw")     # compact: (2, 1, 3, 3) and (2,), rows of channels 0 and 3

The graph's node order is its tape (a valid topological order). Backward walks it in reverse:
a value used twice (the residual add) sums its gradients; input gradients are computed only for
values that something trainable (or observed) lies behind, so the backward pass stops at the
earliest trained layer and nothing before it is kept. Every buffer the executor touches is a view
into one planned arena (``microtrain.memory``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from . import memory
from .kernels import conv as kconv
from .kernels import depthwise as kdw
from .kernels import elementwise as kew
from .kernels import head as khead
from .kernels import pointwise as kpw
from .selection import LayerUpdate, Selection

F32 = np.dtype(np.float32)


class GraphError(ValueError):
    """A graph or selection that cannot be built or run; the message names the node and shapes."""


@dataclass(frozen=True)
class Keep:
    """A saved-for-backward entry that is an existing value kept alive (no copy)."""

    input: int | None = None  # keep this input of the node; None means keep the node's output


KEEP_OUTPUT = Keep(None)


# ---------------------------------------------------------------------------------------------
# Ops. Each declares its output shape, what its backward needs kept (``saved``), scratch needed
# during forward (``workspace``), and the three passes. Buffers are given; ops never allocate.
# ---------------------------------------------------------------------------------------------


class Op:
    """What an op declares to the planner (output shape, saved buffers, scratch) and its passes:
    forward, backward_input and, for ops with parameters, backward_weight (see the note above)."""

    kind = "op"
    has_params = False
    inplace = False  # output may overwrite input 0, and input 0's gradient the output's gradient
    # Each image's output (and input gradient) depends on that image's input only, and every
    # input and the output have the batch as their first axis: the executor may run the op on
    # slices of the batch (shards), the weight and bias gradients then summed over the shards.
    per_image = False

    def out_shape(self, node, shapes):
        """The output's shape from the inputs' ``shapes`` (default: input 0's); raise ValueError or
        IndexError when they do not fit (the graph turns that into a GraphError)."""
        return shapes[0]

    def out_dtype(self, node):
        """The output's dtype (default float32)."""
        return F32

    def saved(self, node, shapes, upd: LayerUpdate | None) -> dict:
        """What backward reads: name -> Keep(...) or (shape, dtype) for a copy made in forward."""
        return {}

    def workspace(self, node, shapes) -> dict:
        """Scratch the forward needs: name -> (shape, dtype). A saved entry of the same name wins."""
        return {}

    def backward_workspace(self, node, shapes, upd: LayerUpdate | None) -> dict:
        """Scratch the backward (input and weight gradients under ``upd``) needs, passed to both
        among ``saved``: name -> (shape, dtype)."""
        return {}

    def forward(self, node, out, ins, scratch, save: bool):
        """Write ``out``. ``scratch`` holds the workspace and saved buffers by name; the saved
        copies are filled only when ``save`` (a training forward)."""
        raise NotImplementedError

    def backward_input(self, node, dxs, dy, saved):
        """Write the gradient of every input whose ``dxs[k]`` is not None (overwrite)."""
        raise NotImplementedError

    def backward_weight(self, node, dw, db, dy, saved, upd: LayerUpdate):
        """Write the gradients of the trained weight rows ``dw`` (rows of ``upd.weight``) and bias
        entries ``db`` (of ``upd.bias``), either None when not trained (overwrite)."""
        raise NotImplementedError

    def shard_saved(self, node, key, array, n0, n1, shape):
        """The part of saved entry ``key`` (planned for the whole batch; ``shape`` is input 0's)
        that images n0..n1-1 use."""
        return array[n0:n1]


class _WeightedOp(Op):
    """Conv-like ops: weight rows per output channel, a bias, input kept only to train weights."""

    has_params = True
    per_image = True

    def saved(self, node, shapes, upd):
        if upd is None or not upd.trains_weight:
            return {}
        if upd.inputs is None:
            return {"x": Keep(0)}
        # Weights of some input channels only: keep just those channels of the input.
        return {"x": (shapes[0][:1] + (len(upd.inputs),) + shapes[0][2:], F32)}

    def save_inputs(self, node, x, scratch, save):
        """In a training forward, copy the input channels whose weights are trained (if a subset)."""
        if save and node.update is not None and node.update.inputs is not None and "x" in scratch:
            np.take(x, node.update.inputs, axis=1, out=scratch["x"])

    def backward_weight(self, node, dw, db, dy, saved, upd):
        if dw is not None:
            self.weight_grad(node, dw, dy, saved, upd.weight)
        if db is not None:
            kew.bias_backward(db, dy if dy.ndim == 4 else dy.reshape(dy.shape + (1, 1)), upd.bias)


class Conv2d(_WeightedOp):
    """Dense or grouped KxK convolution, zero padding (K-1)/2: x (N, Cin, H, W) float32, weight
    (Cout, Cin/groups, K, K), bias (Cout,) -> (N, Cout, Ho, Wo), Ho = (H + 2*((K-1)//2) - K)//stride + 1."""
    kind = "conv"

    def __init__(self, stride: int, groups: int = 1):
        self.stride, self.groups = stride, groups

    def out_shape(self, node, shapes):
        n, _, h, w = shapes[0]
        k = node.weight.shape[-1]
        return (n, node.weight.shape[0], _out_size(h, k, self.stride), _out_size(w, k, self.stride))

    def workspace(self, node, shapes):
        size = kconv.conv2d_forward_scratch_size(shapes[0], node.weight.shape[-1], self.stride, self.groups)
        return {"planes": ((size,), F32)}

    def backward_workspace(self, node, shapes, upd):
        k = node.weight.shape[-1]
        if upd is not None and upd.trains_weight:  # the weight gradient reads a group's input planes
            size = kconv.conv2d_forward_scratch_size(shapes[0], k, self.stride, self.groups)
        else:
            size = kconv.conv2d_backward_input_scratch_size(shapes[0], k, self.stride)
        return {"grad-planes": ((size,), F32)}

    def forward(self, node, out, ins, scratch, save):
        kconv.conv2d_forward(out, ins[0], node.weight, node.bias, self.stride, self.groups, scratch["planes"])
        self.save_inputs(node, ins[0], scratch, save)

    def backward_input(self, node, dxs, dy, saved):
        kconv.conv2d_backward_input(dxs[0], dy, node.weight, self.stride, self.groups, saved["grad-planes"])

    def weight_grad(self, node, dw, dy, saved, channels):
        kconv.conv2d_backward_weight(dw, dy, saved["x"], self.stride, self.groups, channels, saved["grad-planes"])


class Depthwise(_WeightedOp):
    """Depthwise KxK convolution (one filter per channel, zero padding (K-1)/2): x (N, C, H, W)
    float32, weight (C, 1, K, K), bias (C,) -> (N, C, Ho, Wo)."""
    kind = "depthwise"

    def __init__(self, stride: int):
        self.stride = stride

    def out_shape(self, node, shapes):
        n, c, h, w = shapes[0]
        k = node.weight.shape[-1]
        return (n, c, _out_size(h, k, self.stride), _out_size(w, k, self.stride))

    def saved(self, node, shapes, upd):
        # The weight gradient of channel c reads input channel c only: keep just the selected ones.
        if upd is None or not upd.trains_weight:
            return {}
        if upd.covers_all(node.weight.shape[0]):
            return {"x": Keep(0)}
        n, _, h, w = shapes[0]
        return {"x_sel": ((n, len(upd.weight), h, w), F32)}

    def workspace(self, node, shapes):
        return {"planes": ((kdw.depthwise_scratch_size(shapes[0], node.weight.shape[-1], self.stride),), F32)}

    def backward_workspace(self, node, shapes, upd):
        return {"grad-planes": self.workspace(node, shapes)["planes"]}

    def forward(self, node, out, ins, scratch, save):
        kdw.depthwise_forward(out, ins[0], node.weight, node.bias, self.stride, scratch["planes"])
        if save and "x_sel" in scratch:
            np.take(ins[0], node.update.weight, axis=1, out=scratch["x_sel"])

    def backward_input(self, node, dxs, dy, saved):
        kdw.depthwise_backward_input(dxs[0], dy, node.weight, self.stride, saved["grad-planes"])

    def weight_grad(self, node, dw, dy, saved, channels):
        x_sel = saved["x_sel"] if "x_sel" in saved else saved["x"]
        kdw.depthwise_backward_weight(dw, dy, x_sel, self.stride, channels, saved["grad-planes"])


class _Dense(_WeightedOp):
    """A matrix product over channels (1x1 conv, linear): only the kernel triple differs."""

    kernels: tuple  # (forward, backward_input, backward_weight)

    def forward(self, node, out, ins, scratch, save):
        self.kernels[0](out, ins[0], node.weight, node.bias)
        self.save_inputs(node, ins[0], scratch, save)

    def backward_input(self, node, dxs, dy, saved):
        self.kernels[1](dxs[0], dy, node.weight)

    def weight_grad(self, node, dw, dy, saved, channels):
        self.kernels[2](dw, dy, saved["x"], channels)


class Pointwise(_Dense):
    """1x1 convolution: x (N, Cin, H, W) float32, weight (Cout, Cin, 1, 1), bias (Cout,) -> (N, Cout, H, W)."""
    kind = "pointwise"
    kernels = (kpw.pointwise_forward, kpw.pointwise_backward_input, kpw.pointwise_backward_weight)

    def out_shape(self, node, shapes):
        n, _, h, w = shapes[0]
        return (n, node.weight.shape[0], h, w)

    def backward_workspace(self, node, shapes, upd):
        # the weight gradient packs the rows of a few images side by side on small maps
        if upd is None or not upd.trains_weight:
            return {}
        x_shape = shapes[0][:1] + (shapes[0][1] if upd.inputs is None else len(upd.inputs),) + shapes[0][2:]
        size = kpw.pointwise_backward_weight_scratch_size(x_shape, len(upd.weight))
        return {"grad-pack": ((size,), F32)} if size else {}

    def weight_grad(self, node, dw, dy, saved, channels):
        kpw.pointwise_backward_weight(dw, dy, saved["x"], channels, saved.get("grad-pack"))


class Linear(_Dense):
    """Fully connected layer: x (N, Cin) float32, weight (Cout, Cin), bias (Cout,) -> (N, Cout)."""
    kind = "linear"
    per_image = False  # a classifier head: too small to split
    kernels = (kpw.linear_forward, kpw.linear_backward_input, kpw.linear_backward_weight)

    def out_shape(self, node, shapes):
        return (shapes[0][0], node.weight.shape[0])


class ReLU6(Op):
    """min(max(x, 0), 6), elementwise and in place; backward keeps one bit per element (0 < x < 6)."""
    kind = "relu6"
    inplace = True
    per_image = True

    def saved(self, node, shapes, upd):
        # One bit per element says whether the gradient passes (0 < x < 6); each image's bits
        # start on a byte of their own, so a slice of the batch has its own part of the mask.
        per_image = (int(np.prod(shapes[0][1:])) + 7) // 8
        return {"mask": ((shapes[0][0] * per_image,), np.dtype(np.uint8))}

    def shard_saved(self, node, key, array, n0, n1, shape):
        elements = int(np.prod(shape[1:]))
        start = n0 * ((elements + 7) // 8)
        return array[start:start + ((n1 - n0) * elements + 7) // 8]

    def forward(self, node, out, ins, scratch, save):
        if save and "mask" in scratch:
            kew.relu6_forward_save_mask(out, scratch["mask"], ins[0])
        else:
            kew.relu6_forward(out, ins[0])

    def backward_input(self, node, dxs, dy, saved):
        kew.relu6_backward(dxs[0], dy, saved["mask"])


class Add(Op):
    """a + b of one shape (a residual connection), in place over a."""
    kind = "add"
    inplace = True
    per_image = True

    def forward(self, node, out, ins, scratch, save):
        kew.add_forward(out, ins[0], ins[1])

    def backward_input(self, node, dxs, dy, saved):
        for dx in dxs:
            if dx is not None and dx is not dy:
                np.copyto(dx, dy)


class GlobalAvgPool(Op):
    """Mean over the map: (N, C, H, W) -> (N, C)."""
    kind = "global_avg_pool"
    per_image = True

    def out_shape(self, node, shapes):
        return shapes[0][:2]

    def forward(self, node, out, ins, scratch, save):
        kew.global_avg_pool_forward(out, ins[0])

    def backward_input(self, node, dxs, dy, saved):
        kew.global_avg_pool_backward(dxs[0], dy)


class AvgPool(Op):
    """Mean over non-overlapping factor x factor windows: (N, C, H, W) -> (N, C, H/factor, W/factor);
    H and W must be multiples of ``factor`` (``GraphError`` otherwise)."""
    kind = "avg_pool"
    per_image = True

    def __init__(self, factor: int):
        self.factor = factor

    def out_shape(self, node, shapes):
        n, c, h, w = shapes[0]
        if h % self.factor or w % self.factor:
            raise GraphError(f"{node.name}: avg_pool by {self.factor} needs a divisible map, got {shapes[0]}")
        return (n, c, h // self.factor, w // self.factor)

    def forward(self, node, out, ins, scratch, save):
        kew.avg_pool_forward(out, ins[0], self.factor)

    def backward_input(self, node, dxs, dy, saved):
        kew.avg_pool_backward(dxs[0], dy, self.factor)


class Upsample(Op):
    """Nearest-neighbour upsampling: (N, C, H, W) -> (N, C, H*factor, W*factor)."""
    kind = "upsample"
    per_image = True

    def __init__(self, factor: int):
        self.factor = factor

    def out_shape(self, node, shapes):
        n, c, h, w = shapes[0]
        return (n, c, h * self.factor, w * self.factor)

    def forward(self, node, out, ins, scratch, save):
        kew.upsample_nearest_forward(out, ins[0], self.factor)

    def backward_input(self, node, dxs, dy, saved):
        kew.upsample_nearest_backward(dxs[0], dy, self.factor)


class L2Normalize(Op):
    """Rows divided by max(L2 norm, 1e-12): (N, C) -> (N, C); keeps the output and the (N,) norms for backward."""
    kind = "l2_normalize"

    def workspace(self, node, shapes):
        return {"norms": ((shapes[0][0],), F32)}

    def saved(self, node, shapes, upd):
        return {"out": KEEP_OUTPUT, "norms": ((shapes[0][0],), F32)}

    def forward(self, node, out, ins, scratch, save):
        khead.l2_normalize_forward(out, scratch["norms"], ins[0])

    def backward_input(self, node, dxs, dy, saved):
        khead.l2_normalize_backward(dxs[0], dy, saved["out"], saved["norms"])


class CosineLogits(Op):
    """Scaled cosine similarity of normalised embeddings to normalised prototypes: constants
    (fine-tuning) or computed in the graph by ``class_mean`` (a meta-training episode)."""

    kind = "cosine_logits"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def out_shape(self, node, shapes):
        return (shapes[0][0], shapes[1][0])

    def forward(self, node, out, ins, scratch, save):
        khead.cosine_logits_forward(out, ins[0], ins[1], self.scale)

    def saved(self, node, shapes, upd):
        # The embeddings are kept too when the prototypes take a gradient (computed in the graph).
        return {"protos": Keep(1), "z": Keep(0)}

    def backward_input(self, node, dxs, dy, saved):
        if dxs[0] is not None:
            khead.cosine_logits_backward(dxs[0], dy, saved["protos"], self.scale)
        if dxs[1] is not None:
            khead.cosine_logits_backward_protos(dxs[1], dy, saved["z"], self.scale)


class ClassMean(Op):
    """Prototypes of a ProtoNet episode: the mean embedding of each class's support rows (the
    first ``len(labels)`` rows of the input; the query rows after them are not read)."""

    kind = "class_mean"

    def __init__(self, ways: int):
        self.ways = int(ways)

    def out_shape(self, node, shapes):
        return (self.ways, shapes[0][1])

    def saved(self, node, shapes, upd):
        return {"labels": Keep(1)}

    def forward(self, node, out, ins, scratch, save):
        khead.class_mean_forward(out, ins[0], ins[1])

    def backward_input(self, node, dxs, dy, saved):
        khead.class_mean_backward(dxs[0], dy, saved["labels"])


class Rows(Op):
    """Rows ``start:stop`` of a matrix (the query rows of an episode batch)."""

    kind = "rows"

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def out_shape(self, node, shapes):
        if not 0 <= self.start < self.stop <= shapes[0][0]:
            raise ValueError(f"rows {self.start}:{self.stop} of {shapes[0][0]}")
        return (self.stop - self.start,) + tuple(shapes[0][1:])

    def forward(self, node, out, ins, scratch, save):
        np.copyto(out, ins[0][self.start:self.stop])

    def backward_input(self, node, dxs, dy, saved):
        dx = dxs[0]
        dx[:self.start] = 0
        np.copyto(dx[self.start:self.stop], dy)
        dx[self.stop:] = 0


class CrossEntropy(Op):
    """Mean softmax cross-entropy over the batch; the output is a scalar."""

    kind = "cross_entropy"

    def out_shape(self, node, shapes):
        return ()

    def workspace(self, node, shapes):
        return {"probs": (shapes[0], F32)}

    def saved(self, node, shapes, upd):
        return {"probs": (shapes[0], F32), "labels": Keep(1)}

    def forward(self, node, out, ins, scratch, save):
        out[()] = khead.softmax_cross_entropy_forward(scratch["probs"], ins[0], ins[1])

    def backward_input(self, node, dxs, dy, saved):
        # The loss is the last node and its upstream gradient is the seed 1.0.
        khead.softmax_cross_entropy_backward(dxs[0], saved["probs"], saved["labels"])
        if float(dy) != 1.0:
            dxs[0] *= dy


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# The graph (the tape)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A tensor of the graph: its shape and dtype are known when the graph is built, so the planner
    can place it in the arena before anything runs."""

    id: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    producer: int | None  # node index; None for a graph input


@dataclass
class Node:
    """One op applied to input values, producing one output value; conv-like nodes hold their
    weight and bias arrays and, once an executor is built, the ``LayerUpdate`` they train."""

    index: int
    name: str
    op: Op
    inputs: list[int]
    output: int
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    update: LayerUpdate | None = field(default=None, repr=False)  # set by the executor


class Graph:
    """Values of known shape and the nodes that produce them, in execution order."""

    def __init__(self):
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        self._names: dict[str, int] = {}

    # -- construction ---------------------------------------------------------------------------
    def input(self, name: str, shape: Iterable[int], dtype=np.float32) -> Value:
        """A graph input (images, labels, constant prototypes) of this shape and dtype, filled at run time."""
        return self._value(name, tuple(int(s) for s in shape), np.dtype(dtype), None)

    def _value(self, name, shape, dtype, producer) -> Value:
        v = Value(len(self.values), name, shape, dtype, producer)
        self.values.append(v)
        return v

    def _add(self, op: Op, inputs: list[Value], name: str | None, weight=None, bias=None) -> Value:
        name = name or f"{op.kind}.{len(self.nodes)}"
        if name in self._names:
            raise GraphError(f"two nodes named {name!r}")
        if weight is not None:
            weight = _param(name, "weight", weight)
            bias = _param(name, "bias", bias if bias is not None else np.zeros(weight.shape[0], F32))
            if bias.shape != (weight.shape[0],):
                raise GraphError(f"{name}: bias {bias.shape} does not match weight {weight.shape}")
        node = Node(len(self.nodes), name, op, [v.id for v in inputs], -1, weight, bias)
        try:
            shape = tuple(op.out_shape(node, [v.shape for v in inputs]))
        except (IndexError, ValueError) as exc:
            raise GraphError(f"{name}: cannot apply {op.kind} to {[v.shape for v in inputs]}: {exc}") from None
        out = self._value(name, shape, op.out_dtype(node), node.index)
        node.output = out.id
        self.nodes.append(node)
        self._names[name] = node.index
        return out

    def conv2d(self, x, weight, bias=None, stride=1, groups=1, name=None):
        """``Conv2d``: x (N, Cin, H, W); weight (Cout, Cin/groups, K, K) float32, C-contiguous; bias (Cout,)
        or None (zeros). Raises ``GraphError`` on a wrong rank, dtype or shape, or a repeated name."""
        _expect(name, x, 4, "conv2d")
        return self._add(Conv2d(stride, groups), [x], name, weight, bias)

    def depthwise(self, x, weight, bias=None, stride=1, name=None):
        """``Depthwise``: x (N, C, H, W); weight (C, 1, K, K) float32; bias (C,) or None. ``GraphError`` as conv2d."""
        _expect(name, x, 4, "depthwise")
        return self._add(Depthwise(stride), [x], name, weight, bias)

    def pointwise(self, x, weight, bias=None, name=None):
        """``Pointwise`` (1x1 conv): x (N, Cin, H, W); weight (Cout, Cin, 1, 1) float32; bias (Cout,) or None."""
        _expect(name, x, 4, "pointwise")
        return self._add(Pointwise(), [x], name, weight, bias)

    def linear(self, x, weight, bias=None, name=None):
        """``Linear``: x (N, Cin); weight (Cout, Cin) float32; bias (Cout,) or None."""
        _expect(name, x, 2, "linear")
        return self._add(Linear(), [x], name, weight, bias)

    def relu6(self, x, name=None):
        """``ReLU6`` of x (any shape)."""
        return self._add(ReLU6(), [x], name)

    def add(self, a, b, name=None):
        """a + b; ``GraphError`` when their shapes differ."""
        if a.shape != b.shape:
            raise GraphError(f"{name or 'add'}: shapes {a.shape} and {b.shape} differ")
        return self._add(Add(), [a, b], name)

    def global_avg_pool(self, x, name=None):
        """(N, C, H, W) -> (N, C) means."""
        _expect(name, x, 4, "global_avg_pool")
        return self._add(GlobalAvgPool(), [x], name)

    def avg_pool(self, x, factor, name=None):
        """(N, C, H, W) -> (N, C, H/factor, W/factor) window means (``AvgPool``)."""
        return self._add(AvgPool(factor), [x], name)

    def upsample(self, x, factor, name=None):
        """(N, C, H, W) -> (N, C, H*factor, W*factor), nearest neighbour."""
        return self._add(Upsample(factor), [x], name)

    def l2_normalize(self, x, name=None):
        """(N, C) rows scaled to unit L2 norm."""
        _expect(name, x, 2, "l2_normalize")
        return self._add(L2Normalize(), [x], name)

    def cosine_logits(self, z, prototypes, scale, name=None):
        """(N, ways) = scale x cosine of z (N, C) rows to prototypes (ways, C) rows (both normalised
        by the caller); ``GraphError`` when C differs."""
        if z.shape[1] != prototypes.shape[1]:
            raise GraphError(f"{name or 'cosine_logits'}: embeddings {z.shape} vs prototypes {prototypes.shape}")
        return self._add(CosineLogits(scale), [z, prototypes], name)

    def class_mean(self, z, labels, ways, name=None):
        """(ways, C) means of the support rows of z (N, C): row n < len(labels) is of class
        labels[n] (int64); the rows after them are the query and are not read."""
        _expect(name, z, 2, "class_mean")
        if len(labels.shape) != 1 or labels.dtype != np.int64 or labels.shape[0] > z.shape[0]:
            raise GraphError(f"{name or 'class_mean'}: labels must be int64 (S,) with S <= {z.shape[0]}, "
                             f"got {labels.dtype} {labels.shape}")
        return self._add(ClassMean(ways), [z, labels], name)

    def rows(self, x, start, stop, name=None):
        """Rows start:stop of x (N, ...)."""
        return self._add(Rows(start, stop), [x], name)

    def cross_entropy(self, logits, labels, name=None):
        """Mean softmax cross-entropy (a scalar) of logits (N, ways) against labels (N,) int64."""
        if labels.shape != (logits.shape[0],) or labels.dtype != np.int64:
            raise GraphError(f"{name or 'cross_entropy'}: labels must be int64 {(logits.shape[0],)}, "
                             f"got {labels.dtype} {labels.shape}")
        return self._add(CrossEntropy(), [logits, labels], name)

    # -- lookup -----------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        """The node named ``name``; ``GraphError`` if there is none."""
        if name not in self._names:
            raise GraphError(f"no layer named {name!r}")
        return self.nodes[self._names[name]]

    def value(self, name_or_value) -> Value:
        """A Value, or the graph input or node output of that name."""
        if isinstance(name_or_value, Value):
            return name_or_value
        for v in self.values:
            if v.name == name_or_value and v.producer is None:
                return v
        return self.values[self.node(name_or_value).output]

    @property
    def inputs(self) -> list[Value]:
        """The graph inputs, in the order they were declared."""
        return [v for v in self.values if v.producer is None]

    def trainable_nodes(self) -> list[Node]:
        """Nodes with a weight and bias (conv, depthwise, pointwise, linear), in execution order."""
        return [n for n in self.nodes if n.op.has_params]


def _param(node_name, part, array) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != F32 or not array.flags.c_contiguous:
        raise GraphError(f"{node_name}.{part} must be a C-contiguous float32 array, got "
                         f"{getattr(array, 'dtype', type(array).__name__)}")
    return array


def _expect(name, x: Value, rank: int, op: str):
    if len(x.shape) != rank:
        raise GraphError(f"{name or op}: {op} takes a rank-{rank} input, got {x.shape}")


# ---------------------------------------------------------------------------------------------
# Lifetime analysis: which buffers a (graph, selection) needs and from which step to which step.
# Steps: forward of node i is step i; its backward is step 2F-1-i; the optimizer is step 2F.
# ---------------------------------------------------------------------------------------------


@dataclass
class _NodeBuffers:
    """Buffer names one node reads and writes, resolved to arrays by the executor."""

    out: str
    ins: list[str]
    saved: dict[str, str] = field(default_factory=dict)  # what backward reads
    # forward scratch (overlaid by saved) and backward scratch (input and weight gradients), one
    # set per thread that runs shards of the node
    work: list[dict[str, str]] = field(default_factory=lambda: [{}])
    grad_work: list[dict[str, str]] = field(default_factory=lambda: [{}])
    dy: str | None = None
    dxs: list[str | None] = field(default_factory=list)
    accumulate: list[tuple[str, str]] = field(default_factory=list)  # (gradient, scratch) pairs
    dw: str | None = None
    db: str | None = None
    runs_backward: bool = False
    shards: list[tuple[int, int]] | None = None  # batch slices [n0, n1) of a per-image op
    input_shape: tuple[int, ...] = ()  # input 0's (whole batch)
    dw_parts: list[str] = field(default_factory=list)  # the weight gradients of shards 1, 2, ...
    db_parts: list[str] = field(default_factory=list)


# Batched steps split every per-image op into shards of the batch (slices of SHARD_IMAGES images
# or more, at most MAX_SHARDS), which threads may run at the same time. The split depends on the
# batch size only, never on the thread count, and the weight and bias gradients are the shards'
# sums added in shard order: one thread and several give the same numbers bit for bit.
SHARD_IMAGES = 16
MAX_SHARDS = 4


def batch_shards(batch: int) -> list[tuple[int, int]]:
    """The slices [n0, n1) a per-image op on ``batch`` images runs as (one below 2 * SHARD_IMAGES)."""
    count = min(MAX_SHARDS, max(1, batch // SHARD_IMAGES))
    return [(batch * s // count, batch * (s + 1) // count) for s in range(count)]


def default_threads() -> int:
    """Threads an executor uses when not told: ``MICROTRAIN_THREADS`` if set, else 1 on a
    machine whose other processes already keep its cores busy (1-minute load average above
    cores - 1), else up to MAX_SHARDS, one per core."""
    value = os.environ.get("MICROTRAIN_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise GraphError(f"MICROTRAIN_THREADS must be a positive integer, got {value!r}") from None
        if threads < 1:
            raise GraphError(f"MICROTRAIN_THREADS must be a positive integer, got {value!r}")
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0] > cores - 1
    except OSError:  # no load average on this system
        busy = False
    return 1 if busy else max(1, min(cores, MAX_SHARDS))


class Program:
    """The graph compiled for one selection: per-node buffer names and the memory plan."""

    def __init__(self, graph: Graph, selection: Selection, momentum: bool = False,
                 observe: Iterable[str] = (), threads: int = 1):
        self.graph, self.selection, self.momentum = graph, selection, momentum
        self.threads = max(1, int(threads))  # how many sets of scratch a sharded op gets
        self.observe = set(observe)
        self.updates: dict[int, LayerUpdate] = {}
        for name, upd in selection.layers.items():
            node = graph.node(name)
            if not node.op.has_params:
                raise GraphError(f"{name} has no parameters to train")
            _check_channels(node, upd)
            self.updates[node.index] = upd
        for name in self.observe:
            graph.node(name)
        self._analyse()

    # Which values need a gradient: those with a trained or observed node at or behind them.
    def _needs_grad(self) -> list[bool]:
        need = [False] * len(self.graph.values)
        for node in self.graph.nodes:
            need[node.output] = (node.index in self.updates or node.name in self.observe
                                 or any(need[v] for v in node.inputs))
        return need

    def _analyse(self):
        g = self.graph
        F = len(g.nodes)
        fwd = lambda i: i  # noqa: E731
        bwd = lambda i: 2 * F - 1 - i  # noqa: E731
        opt = 2 * F
        need = self.needs_grad = self._needs_grad()
        buffers: list[memory.Buffer] = []
        by_name: dict[str, memory.Buffer] = {}
        self.steps = [n.name for n in g.nodes] + [f"backward {n.name}" for n in reversed(g.nodes)] + ["optimizer"]

        def new(name, category, shape, dtype, start, end):
            by_name[name] = memory.Buffer(name, category, tuple(shape), np.dtype(dtype), start, end)
            buffers.append(by_name[name])
            return name

        # Uses of each value: its forward consumers, and backward steps that keep it.
        last_use = [0 if v.producer is None else fwd(v.producer) for v in g.values]
        consumers: list[list[tuple[int, int]]] = [[] for _ in g.values]
        for node in g.nodes:
            for k, v in enumerate(node.inputs):
                last_use[v] = max(last_use[v], fwd(node.index))
                consumers[v].append((node.index, k))
        saved_specs = {}
        for node in g.nodes:
            shapes = [g.values[v].shape for v in node.inputs]
            if not need[node.output]:
                continue
            spec = node.op.saved(node, shapes, self.updates.get(node.index))
            saved_specs[node.index] = spec
            for item in spec.values():
                if isinstance(item, Keep):
                    v = node.output if item.input is None else node.inputs[item.input]
                    last_use[v] = max(last_use[v], bwd(node.index))
            if node.name in self.observe:
                last_use[node.output] = max(last_use[node.output], bwd(node.index))
        for v in g.values:  # graph outputs are read when the forward ends
            if not consumers[v.id] and v.producer is not None:
                last_use[v.id] = max(last_use[v.id], F - 1)

        # Activation storage; an in-place op takes over an input that nothing needs afterwards.
        storage: dict[int, str] = {}
        for v in g.inputs:
            storage[v.id] = new(f"input:{v.name}", memory.TRANSIENT, v.shape, v.dtype, 0, last_use[v.id])
        for node in g.nodes:
            out = g.values[node.output]
            target = None
            if node.op.inplace:
                for v in node.inputs:
                    src = g.values[v]
                    if (last_use[v] == fwd(node.index) and src.producer is not None
                            and src.shape == out.shape and src.dtype == out.dtype
                            and node.inputs.count(v) == 1):
                        target = storage[v]
                        break
            if target is None:
                storage[out.id] = new(f"act:{out.name}", memory.TRANSIENT, out.shape, out.dtype,
                                      fwd(node.index), last_use[out.id])
            else:
                storage[out.id] = target
        for v in g.values:
            buf = by_name[storage[v.id]]
            buf.end = max(buf.end, last_use[v.id])
        for buf in buffers:
            if buf.end >= F:  # kept across the forward/backward boundary
                buf.category = memory.SAVED

        # Per node: forward buffers, saved copies, gradients.
        shapes_of = lambda node: [g.values[v].shape for v in node.inputs]  # noqa: E731
        plan_nodes: list[_NodeBuffers] = []
        for node in g.nodes:
            nb = _NodeBuffers(out=storage[node.output], ins=[storage[v] for v in node.inputs])
            shapes = shapes_of(node)
            nb.input_shape = shapes[0] if shapes else ()
            if node.op.per_image:
                nb.shards = batch_shards(g.values[node.output].shape[0])
            spec = saved_specs.get(node.index, {})
            for key, item in spec.items():
                if isinstance(item, Keep):
                    nb.saved[key] = storage[node.output] if item.input is None else storage[node.inputs[item.input]]
                else:
                    shape, dtype = item
                    nb.saved[key] = new(f"saved:{node.name}:{key}", memory.SAVED, shape, dtype,
                                        fwd(node.index), bwd(node.index))
            nb.work = [{} for _ in range(self._thread_sets(nb))]
            for key, (shape, dtype) in node.op.workspace(node, self._shard_shapes(nb, shapes)).items():
                if key not in nb.saved:
                    for t, work in enumerate(nb.work):
                        work[key] = new(f"work:{node.name}:{key}" + (f"#{t}" if t else ""), memory.TRANSIENT,
                                        shape, dtype, fwd(node.index), fwd(node.index))
            nb.runs_backward = need[node.output]
            plan_nodes.append(nb)

        # Gradients of values: the first contributor in backward order writes, later ones add.
        grad: dict[int, str] = {}
        for node in reversed(g.nodes):
            nb = plan_nodes[node.index]
            if not nb.runs_backward:
                continue
            out = g.values[node.output]
            if node.output not in grad:  # the loss: seeded with 1.0 at the start of backward
                grad[node.output] = new(f"grad:{out.name}", memory.TRANSIENT, out.shape, out.dtype,
                                        bwd(node.index), bwd(node.index))
            nb.dy = grad[node.output]
            nb.dxs = [None] * len(node.inputs)
            for k, v in enumerate(node.inputs):
                if not need[v]:
                    continue
                val = g.values[v]
                if v in grad:
                    scratch = new(f"grad-part:{node.name}:{k}", memory.TRANSIENT, val.shape, val.dtype,
                                  bwd(node.index), bwd(node.index))
                    nb.dxs[k] = scratch
                    nb.accumulate.append((grad[v], scratch))
                    continue
                sole = len(consumers[v]) == 1
                if node.op.inplace and k == 0 and sole and val.shape == out.shape:
                    grad[v] = nb.dy  # write the input gradient over the output gradient
                    by_name[nb.dy].end = bwd(val.producer)
                else:
                    grad[v] = new(f"grad:{val.name}", memory.TRANSIENT, val.shape, val.dtype,
                                  bwd(node.index), bwd(val.producer))
                nb.dxs[k] = grad[v]
            upd = self.updates.get(node.index)
            if any(dx is not None for dx in nb.dxs) or (upd is not None and upd.trains_weight):
                nb.grad_work = [{} for _ in range(self._thread_sets(nb))]
                shapes = self._shard_shapes(nb, shapes_of(node))
                for key, (shape, dtype) in node.op.backward_workspace(node, shapes, upd).items():
                    for t, work in enumerate(nb.grad_work):
                        work[key] = new(f"work:{node.name}:{key}" + (f"#{t}" if t else ""), memory.TRANSIENT,
                                        shape, dtype, bwd(node.index), bwd(node.index))
            if upd is not None:
                # Compact gradient, the arena's copy of the trained rows, and their momentum.
                for part, shape in _trained_shapes(node, upd).items():
                    grad_name = new(f"{part}grad:{node.name}", memory.GRADIENTS, shape, F32, bwd(node.index), opt)
                    setattr(nb, f"d{part[0]}", grad_name)
                    for s in range(1, len(nb.shards or ())):  # the other shards' sums, added in order
                        getattr(nb, f"d{part[0]}_parts").append(
                            new(f"{part}grad:{node.name}#{s}", memory.TRANSIENT, shape, F32,
                                bwd(node.index), bwd(node.index)))
                    new(f"master:{node.name}:{part}", memory.WEIGHTS, shape, F32, 0, opt)
                    if self.momentum:
                        new(f"momentum:{node.name}:{part}", memory.GRADIENTS, shape, F32, 0, opt)
        self.grad_of = grad
        self.storage_of = storage
        self.nodes = plan_nodes
        self.plan = memory.Plan(buffers, self.steps)

    def _thread_sets(self, nb: _NodeBuffers) -> int:
        """Scratch sets a node needs: one per thread that runs some of its shards."""
        return min(self.threads, len(nb.shards)) if nb.shards else 1

    @staticmethod
    def _shard_shapes(nb: _NodeBuffers, shapes):
        """Input shapes as one shard (the largest) sees them."""
        if not nb.shards:
            return shapes
        n = max(n1 - n0 for n0, n1 in nb.shards)
        return [(n,) + tuple(s[1:]) for s in shapes]


def _trained_shapes(node: Node, upd: LayerUpdate) -> dict[str, tuple[int, ...]]:
    """Shapes of the trained part of a layer: weight rows (x input columns) and bias entries."""
    shapes = {}
    if upd.trains_weight:
        cols = node.weight.shape[1] if upd.inputs is None else len(upd.inputs)
        shapes["weight"] = (len(upd.weight), cols) + node.weight.shape[2:]
    if upd.trains_bias:
        shapes["bias"] = (len(upd.bias),)
    return shapes


def _rows(upd: LayerUpdate):
    """Index of the trained part of a weight tensor: rows, or rows x input columns."""
    return upd.weight if upd.inputs is None else np.ix_(upd.weight, upd.inputs)


def _check_channels(node: Node, upd: LayerUpdate):
    out_channels, in_channels = node.weight.shape[0], node.weight.shape[1]
    for part, limit in (("weight", out_channels), ("bias", out_channels), ("inputs", in_channels)):
        idx = getattr(upd, part)
        if idx is not None and len(idx) and (idx[0] < 0 or idx[-1] >= limit):
            raise GraphError(f"{node.name}: {part} channels {idx.tolist()} out of range for {limit}")
    if upd.inputs is not None and not (isinstance(node.op, (Pointwise, Linear))
                                       or (isinstance(node.op, Conv2d) and node.op.groups == 1)):
        raise GraphError(f"{node.name}: an input-channel subset applies to pointwise and full convs only")


# ---------------------------------------------------------------------------------------------
# The executor: runs the program with every buffer a view into one arena
# ---------------------------------------------------------------------------------------------


class Executor:
    """Forward, backward and the trainable state of one graph under one selection.

    ``threads`` (default ``default_threads()``): how many threads run the shards of a batched
    per-image op (``batch_shards``; one shard below 2 * SHARD_IMAGES images) at the same time,
    each with its own scratch in the arena. The kernels release the GIL; the pool's threads sleep
    between ops. Results do not depend on it: the shards are the same for any thread count."""

    def __init__(self, graph: Graph, selection: Selection | None = None, *, momentum: bool = False,
                 observe: Iterable[str] = (), use_arena: bool = True, threads: int | None = None):
        self.graph = graph
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise GraphError(f"threads must be >= 1, got {threads}")
        self.program = Program(graph, selection or Selection(), momentum, observe, threads=self.threads)
        self.plan = self.program.plan
        self.arena = np.zeros(self.plan.arena_bytes, np.uint8) if use_arena else None
        self.buffers = self.plan.views(self.arena)
        for node in graph.nodes:
            node.update = self.program.updates.get(node.index)
        self._resolved = [self._resolve(node, nb) for node, nb in zip(graph.nodes, self.program.nodes)]
        self._pool: ThreadPoolExecutor | None = None
        self.load_trainable()

    def _resolve(self, node: Node, nb: _NodeBuffers):
        """The node's buffers as arrays; for a sharded op also one dict per shard, its slices of
        the batch, the scratch of the thread that runs it and its own weight-gradient sums."""
        get = lambda name: None if name is None else self.buffers[name]  # noqa: E731
        saved = {k: get(v) for k, v in nb.saved.items()}
        r = dict(out=get(nb.out), ins=[get(n) for n in nb.ins], saved=saved,
                 dy=get(nb.dy), dxs=[get(n) for n in nb.dxs],
                 accumulate=[(get(a), get(b)) for a, b in nb.accumulate],
                 dw=get(nb.dw), db=get(nb.db), runs_backward=nb.runs_backward, shards=None)
        if nb.shards is None:
            r["scratch"] = {**{k: get(v) for k, v in nb.work[0].items()}, **saved}
            r["saved"] = {**saved, **{k: get(v) for k, v in nb.grad_work[0].items()}}
            return r
        shards = []
        for s, (n0, n1) in enumerate(nb.shards):
            cut = lambda a: None if a is None else a[n0:n1]  # noqa: E731
            t = s % len(nb.work)
            mine = {k: node.op.shard_saved(node, k, a, n0, n1, nb.input_shape) for k, a in saved.items()}
            grad_work = nb.grad_work[s % len(nb.grad_work)]
            shards.append(dict(
                out=cut(r["out"]), ins=[cut(a) for a in r["ins"]], dy=cut(r["dy"]), dxs=[cut(a) for a in r["dxs"]],
                accumulate=[(cut(a), cut(b)) for a, b in r["accumulate"]],
                scratch={**{k: get(v) for k, v in nb.work[t].items()}, **mine},
                saved={**mine, **{k: get(v) for k, v in grad_work.items()}},
                dw=r["dw"] if s == 0 else get(nb.dw_parts[s - 1]) if nb.dw_parts else None,
                db=r["db"] if s == 0 else get(nb.db_parts[s - 1]) if nb.db_parts else None))
        r["shards"] = shards
        return r

    def _each_shard(self, shards: list[dict], fn: Callable[[dict], None]):
        """fn(shard) for every shard: thread t takes shards t, t + T, ... (the scratch the plan
        gave thread t), the calling thread being thread 0."""
        threads = min(self.threads, len(shards))
        if threads == 1:
            for shard in shards:
                fn(shard)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="microtrain")
        run = lambda mine: [fn(shard) for shard in mine]  # noqa: E731
        futures = [self._pool.submit(run, shards[t::threads]) for t in range(1, threads)]
        try:
            run(shards[0::threads])
        finally:
            for future in futures:
                future.result()  # waits; re-raises a worker's exception

    def close(self):
        """Stop the worker threads (they also stop when the executor is collected)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # -- trainable state --------------------------------------------------------------------------
    def trained(self) -> list[tuple[Node, LayerUpdate]]:
        """(node, its LayerUpdate) for every layer the selection trains."""
        return [(self.graph.nodes[i], u) for i, u in self.program.updates.items()]

    def master(self, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The arena's copies of the trained weight rows and bias entries of a layer."""
        return self.buffers.get(f"master:{name}:weight"), self.buffers.get(f"master:{name}:bias")

    def momentum(self, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The arena's SGD momentum buffers of a layer's trained weight rows and bias entries."""
        return self.buffers.get(f"momentum:{name}:weight"), self.buffers.get(f"momentum:{name}:bias")

    def load_trainable(self):
        """Copy the trained rows of every selected layer into the arena and zero the momentum."""
        for node, upd in self.trained():
            w, b = self.master(node.name)
            if w is not None:
                np.copyto(w, node.weight[_rows(upd)])
            if b is not None:
                np.take(node.bias, upd.bias, axis=0, out=b)
            for m in self.momentum(node.name):
                if m is not None:
                    m.fill(0)

    def grad(self, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Compact gradients of a trained layer: (len(weight channels), ...) and (len(bias channels),)."""
        r = self._resolved[self.graph.node(name).index]
        return r["dw"], r["db"]

    # -- passes -----------------------------------------------------------------------------------
    def value(self, v) -> np.ndarray:
        """The buffer holding a value (valid until something else is planned over it)."""
        return self.buffers[self.program.storage_of[self.graph.value(v).id]]

    def forward(self, feeds: dict, train: bool = True):
        """Run every node. ``train=False`` skips what only backward needs. Returns the loss (a float)
        when the graph ends in one, else the last node's output buffer."""
        for key, array in feeds.items():
            v = self.graph.value(key)
            array = np.asarray(array)
            if array.shape != v.shape or array.dtype != v.dtype:
                raise GraphError(f"input {v.name!r} must be {v.dtype} {v.shape}, got {array.dtype} {array.shape}")
            np.copyto(self.value(v), array)
        for node, r in zip(self.graph.nodes, self._resolved):
            self.forward_node(node, r, train)
        last = self.graph.nodes[-1]
        out = self._resolved[-1]["out"]
        return float(out) if isinstance(last.op, CrossEntropy) else out

    def backward(self, on_output_grad: Callable | None = None):
        """Walk the tape in reverse from the loss. ``on_output_grad(node, activation, gradient)`` is
        called for every observed node before its own backward (the Fisher potential uses it)."""
        nodes, resolved = self.graph.nodes, self._resolved
        if not resolved[-1]["runs_backward"]:
            return  # nothing is trained or observed
        resolved[-1]["dy"][()] = 1.0
        for node in reversed(nodes):
            r = resolved[node.index]
            if not r["runs_backward"]:
                continue
            if on_output_grad is not None and node.name in self.program.observe:
                on_output_grad(node, r["out"], r["dy"])
            self.backward_node(node, r)

    def forward_node(self, node: Node, r: dict, train: bool):
        """One node's forward (``r`` its resolved buffers), shard by shard if it is sharded."""
        if r["shards"] is None:
            node.op.forward(node, r["out"], r["ins"], r["scratch"], train)
        else:
            self._each_shard(r["shards"], lambda s: node.op.forward(node, s["out"], s["ins"], s["scratch"], train))

    def backward_node(self, node: Node, r: dict, phases=("weight", "input")):
        """One node's weight gradient (into the shards' sums, then added in shard order) and
        input gradient; ``phases`` runs one of them only (profiling)."""
        upd = node.update

        def step(s):
            if upd is not None and "weight" in phases:
                node.op.backward_weight(node, s["dw"], s["db"], s["dy"], s["saved"], upd)
            if "input" in phases and any(dx is not None for dx in s["dxs"]):
                node.op.backward_input(node, s["dxs"], s["dy"], s["saved"])
                for total, part in s["accumulate"]:
                    kew.accumulate(total, part)

        if r["shards"] is None:
            step(r)
            return
        self._each_shard(r["shards"], step)
        if upd is not None and "weight" in phases:
            for s in r["shards"][1:]:
                for key in ("dw", "db"):
                    if s[key] is not None:
                        kew.accumulate(r[key], s[key])

