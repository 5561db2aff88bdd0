"""TinyTL (Cai et al., NeurIPS 2020): frozen backbone weights, trained biases and lite residual modules.

Every MBConv block b gets a small branch from its input to its output, added to the block's output
(after the backbone's own residual add, which stays)::

    block_input -> avg_pool(d) -> group conv k x k, stride s, `groups` groups -> ReLU6
                -> 1x1 projection to the block's output channels -> upsample(u) -> + block_output

Nodes: ``blocks.{b}.lite.pool`` (only when d > 1), ``blocks.{b}.lite.conv``,
``blocks.{b}.lite.relu6``, ``blocks.{b}.lite.project``, ``blocks.{b}.lite.upsample`` (only when
u > 1) and ``blocks.{b}.lite.add``. Trained: both lite layers fully, and the bias of every backbone
conv; every backbone weight is frozen. Everything runs through the ordinary graph ops, so the
planner prices TinyTL's memory like any other method's.

Defaults, from the public implementation (mit-han-lab/tinyml, ``tinytl/tinytl_fgvc_train.py``
arguments ``--lite_residual_downsample 2 --lite_residual_expand 1 --lite_residual_groups 2
--lite_residual_ks 5``, used unchanged by its experiment scripts; ``tinytl/model/modules.py``,
``LiteResidualModule`` and ``insert_lite_residual``):

- downsample factor 2 (average pool), then the group conv at the block's stride, then the branch is
  upsampled back to the block's output size;
- expansion 1: the group conv has ``make_divisible(in_channels * 1, 8)`` output channels (nearest
  multiple of 8, at least 8, never below 90% of the input channels);
- 2 groups; where 2 does not divide both channel counts, the largest group count below it that
  does (the same rule as the public code's ``min_divisible_value``: step the count down until it
  divides), i.e. 1 group for an odd channel count;
- kernel 5, shrunk by 2 while it exceeds the pooled map (``while resolution < kernel: kernel -= 2``),
  so a 2x2 or 1x1 pooled map gets a 1x1 conv;
- initialisation: He (fan-out, ``N(0, 2 / (k*k*out))``) for the group conv; the branch's last
  layer starts at zero (the public code zeroes its final BatchNorm's scale), so the adapted network
  starts identical to the pretrained one.

Where this differs from the public module, and why:

- no BatchNorm / GroupNorm in the branch (the engine has none; the backbone's BN is folded into
  its conv biases): both lite convs carry a bias instead, and the zeroed projection (weights and
  bias) plays the zeroed BN scale. The public code freezes that final BN's shift when biases are
  trained; here the projection bias is trained with its layer (it only duplicates the block's
  trained project bias, ``out_channels`` numbers per block);
- ReLU6 instead of ReLU (the engine's only activation; they differ only above 6);
- nearest-neighbour upsampling by an integer factor instead of bilinear resizing;
- a map the pool cannot divide: if the conv at the block's stride after pooling does not upsample
  to the output size by an integer factor, the conv runs at stride 1 on the pooled map (a stride-2
  block whose pooled input already has the output size), else without pooling (odd maps, 1x1 maps);
- a branch on every block, the first (expand-1) block included; the public insertion routine walks
  ProxylessNAS's six stride stages, which appears to leave that first block without one;
- the branch parameters start random (seeded), not from the public ImageNet-pretrained lite
  residual weights, which exist for ProxylessNAS-Mobile only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .autograd import Graph, GraphError, Program, Value
from .methods import MethodPlan
from .model import Network, conv_out_size, layer_specs
from .selection import LayerUpdate, Selection
from .tinytrain import backward_macs

DOWNSAMPLE = 2
EXPAND = 1.0
GROUPS = 2
MAX_KERNEL = 5
CHANNEL_DIVISOR = 8


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Nearest multiple of ``divisor``, at least ``divisor``, and not more than 10% below ``value``."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def largest_group_count(limit: int, *channels: int) -> int:
    """The largest group count <= ``limit`` that divides every channel count."""
    g = max(1, limit)
    while g > 1 and any(c % g for c in channels):
        g -= 1
    return g


@dataclass(frozen=True)
class LiteSpec:
    """The geometry of one block's lite residual branch (spatial sizes are square map sides)."""

    block: int
    in_channels: int
    mid_channels: int
    out_channels: int
    groups: int
    kernel: int
    pool: int  # average-pool factor on the block input (1: none)
    stride: int  # group conv stride (the block's, or 1 when the pooled map already has the output size)
    upsample: int  # nearest upsampling factor back to the block output (1: none)
    in_size: int
    conv_size: int  # side of the group conv's output (and the projection's)
    out_size: int

    @property
    def conv_name(self) -> str:
        return f"blocks.{self.block}.lite.conv"

    @property
    def project_name(self) -> str:
        return f"blocks.{self.block}.lite.project"

    @property
    def conv_weight_shape(self) -> tuple[int, int, int, int]:
        return (self.mid_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    @property
    def project_weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.mid_channels, 1, 1)

    @property
    def params(self) -> int:
        """Weights and biases of both lite layers."""
        return (math.prod(self.conv_weight_shape) + self.mid_channels
                + math.prod(self.project_weight_shape) + self.out_channels)

    @property
    def macs(self) -> int:
        """Forward multiply-accumulates of the two lite convs at batch 1."""
        area = self.conv_size * self.conv_size
        return (math.prod(self.conv_weight_shape) + math.prod(self.project_weight_shape)) * area


def lite_spec(block: int, in_channels: int, out_channels: int, in_size: int, out_size: int, stride: int,
              downsample: int = DOWNSAMPLE, expand: float = EXPAND, groups: int = GROUPS,
              max_kernel: int = MAX_KERNEL) -> LiteSpec:
    """Geometry of a branch from a block input (in_channels, in_size^2) to its output
    (out_channels, out_size^2) for a block of ``stride``.

    Tried in order, the first that reaches ``out_size`` by an integer upsampling factor wins:
    pool by ``downsample`` + conv at the block's stride (the published module), pool + conv at
    stride 1, no pool + conv at the block's stride (odd or 1x1 maps)."""
    tries = [(downsample, stride), (downsample, 1), (1, stride)]
    for pool, conv_stride in tries:
        if pool < 1 or in_size % pool:
            continue
        pooled = in_size // pool
        conv_size = conv_out_size(pooled, 1, conv_stride)  # the same for every odd kernel
        if conv_size >= 1 and out_size % conv_size == 0:
            break
    else:
        raise GraphError(f"blocks.{block}.lite: no pool/stride/upsample reaches a {out_size}x{out_size} "
                         f"output from a {in_size}x{in_size} input at stride {stride}")
    kernel = max_kernel
    while kernel > 1 and pooled < kernel:
        kernel -= 2
    mid = make_divisible(in_channels * expand)
    g = largest_group_count(groups, in_channels, mid)
    return LiteSpec(block, in_channels, mid, out_channels, g, max(kernel, 1), pool, conv_stride,
                    out_size // conv_size, in_size, conv_size, out_size)


def network_specs(net: Network, **defaults) -> list[LiteSpec]:
    """One branch geometry per block of ``net`` at its resolution."""
    return arch_specs(net.arch, **defaults)


def arch_specs(arch: dict, **defaults) -> list[LiteSpec]:
    """One branch geometry per block of an architecture at its resolution."""
    by_name = {layer.name: layer for layer in layer_specs(arch)}
    specs = []
    for b, block in enumerate(arch["blocks"]):
        parts = [by_name[f"blocks.{b}.{p}"] for p in ("expand", "depthwise", "project") if f"blocks.{b}.{p}" in by_name]
        first, last = parts[0], parts[-1]
        specs.append(lite_spec(b, first.in_channels, last.out_channels, first.in_size, last.out_size,
                               int(block["stride"]), **defaults))
    return specs


class LiteResidualHook:
    """The ``block_hook`` of a TinyTL plan: adds each block's lite residual branch to a graph.

    One object per plan; it owns the branch parameters (float32 arrays, updated in place by the
    optimizer like any layer's), so every graph built through it (the training graph, the feature
    executors of evaluation) shares them. Hashed by identity, so executors cached per
    (batch, hook) stay valid."""

    def __init__(self, specs: list[LiteSpec], seed: int = 0, settings: dict | None = None,
                 arrays: dict[str, np.ndarray] | None = None):
        """Branch parameters drawn from ``seed``, or taken from ``arrays`` (a saved adapted
        network's, by ``state()`` names). ``settings``: the geometry overrides the specs were
        made with (stored with a saved network, so the same specs can be rebuilt)."""
        self.specs = {s.block: s for s in specs}
        self.settings = {"downsample": DOWNSAMPLE, "expand": EXPAND, "groups": GROUPS, "max_kernel": MAX_KERNEL,
                         **(settings or {})}
        rng = np.random.default_rng(seed)
        self.params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if arrays is not None:
            for s in specs:
                for name in (s.conv_name, s.project_name):
                    self.params[name] = tuple(np.array(arrays[f"{name}.{part}"], np.float32)
                                              for part in ("weight", "bias"))
            return
        for s in specs:
            # He initialisation, fan-out mode as in the public code: N(0, 2 / (k * k * out)).
            std = math.sqrt(2.0 / (s.kernel * s.kernel * s.mid_channels))
            w = (rng.standard_normal(s.conv_weight_shape) * std).astype(np.float32)
            self.params[s.conv_name] = (w, np.zeros(s.mid_channels, np.float32))
            # Zero projection: the branch adds exactly 0 until trained.
            self.params[s.project_name] = (np.zeros(s.project_weight_shape, np.float32),
                                           np.zeros(s.out_channels, np.float32))

    def __call__(self, g: Graph, b: int, block_input: Value, block_output: Value) -> Value:
        s = self.specs.get(b)
        if s is None:
            raise GraphError(f"blocks.{b}.lite: this TinyTL hook has no branch for block {b}")
        want_in = (s.in_channels, s.in_size, s.in_size)
        want_out = (s.out_channels, s.out_size, s.out_size)
        if tuple(block_input.shape[1:]) != want_in or tuple(block_output.shape[1:]) != want_out:
            raise GraphError(f"blocks.{b}.lite: planned for input {want_in} -> output {want_out}, "
                             f"got {block_input.shape} -> {block_output.shape} (another network?)")
        prefix = f"blocks.{b}.lite"
        h = block_input
        if s.pool > 1:
            h = g.avg_pool(h, s.pool, name=f"{prefix}.pool")
        w, bias = self.params[s.conv_name]
        h = g.conv2d(h, w, bias, stride=s.stride, groups=s.groups, name=s.conv_name)
        h = g.relu6(h, name=f"{prefix}.relu6")
        w, bias = self.params[s.project_name]
        h = g.pointwise(h, w, bias, name=s.project_name)
        if s.upsample > 1:
            h = g.upsample(h, s.upsample, name=f"{prefix}.upsample")
        return g.add(block_output, h, name=f"{prefix}.add")

    @property
    def layer_names(self) -> list[str]:
        return list(self.params)

    @property
    def param_count(self) -> int:
        return sum(s.params for s in self.specs.values())

    def state(self) -> dict[str, np.ndarray]:
        """The branch parameters by name (``blocks.{b}.lite.conv.weight``, ...)."""
        out = {}
        for name, (w, b) in self.params.items():
            out[f"{name}.weight"], out[f"{name}.bias"] = w, b
        return out

    def __repr__(self) -> str:
        return f"LiteResidualHook({len(self.specs)} blocks, {self.param_count} parameters)"


def lite_weight_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the branch arrays an architecture with ``lite_residual`` settings holds."""
    shapes = {}
    for s in arch_specs(arch, **arch["lite_residual"]):
        shapes[f"{s.conv_name}.weight"], shapes[f"{s.conv_name}.bias"] = s.conv_weight_shape, (s.mid_channels,)
        shapes[f"{s.project_name}.weight"], shapes[f"{s.project_name}.bias"] = s.project_weight_shape, (s.out_channels,)
    return shapes


def plan_tinytl(net: Network, seed: int = 0, **defaults) -> MethodPlan:
    """TinyTL's plan for ``net``: a lite residual branch on every block (parameters from ``seed``),
    both lite layers trained fully, every backbone conv's bias trained, backbone weights frozen.
    ``defaults`` override ``downsample``, ``expand``, ``groups`` or ``max_kernel``."""
    if net.block_hook is not None:
        raise GraphError(f"{net.name} already carries TinyTL branches (an adapted network): "
                         "adapt the original backbone instead")
    specs = network_specs(net, **defaults)
    hook = LiteResidualHook(specs, seed, settings=defaults)
    chosen = {layer.name: LayerUpdate.bias_only(layer.out_channels) for layer in net.layers}
    choices = []
    for s in specs:
        for name, out in ((s.conv_name, s.mid_channels), (s.project_name, s.out_channels)):
            chosen[name] = LayerUpdate.full(out)
            choices.append((name, out, out, float("nan")))
    selection = Selection(chosen)
    program = Program(net.features_graph(1, hook), selection)
    info = {
        "lite_params": hook.param_count,
        "bias_params": sum(layer.out_channels for layer in net.layers),
        "lite_forward_macs": sum(s.macs for s in specs),
        "backward_macs_with_lite": backward_macs(program),
        "defaults": {"downsample": DOWNSAMPLE, "expand": EXPAND, "groups": GROUPS, "max_kernel": MAX_KERNEL,
                     **defaults},
        "branches": [{"block": s.block, "in": (s.in_channels, s.in_size), "mid": s.mid_channels,
                      "out": (s.out_channels, s.out_size), "groups": s.groups, "kernel": s.kernel,
                      "pool": s.pool, "stride": s.stride, "upsample": s.upsample} for s in specs],
    }
    return MethodPlan("tinytl", selection, block_hook=hook, choices=choices, info=info)
