"""The architecture of an MBConv network (MCUNet, MobileNetV2, ProxylessNAS): layer specs, shapes, counts.

Pure arithmetic on the architecture dict, the JSON stored in a weight file (``weights/README.md``)::

    {"name", "resolution", "in_channels",
     "first_conv": {"out", "kernel", "stride"},
     "blocks": [{"expand": hidden or null, "kernel", "stride", "out", "residual"}, ...],
     "feature_mix": null or {"out"},
     "lite_residual": absent, or TinyTL's branch settings of a network that method adapted}

Layer names are stable and are what a user puts in a selection: ``first_conv``,
``blocks.{b}.expand``, ``blocks.{b}.depthwise``, ``blocks.{b}.project``, ``feature_mix``.
ReLU6 follows ``first_conv``, every ``expand``, every ``depthwise`` and ``feature_mix``; nothing
follows ``project`` or the residual add. The conv index (0 = first_conv, then in order) is the
convention of the SparseUpdate configurations.

The geometry of TinyTL's lite residual branches (Cai et al., NeurIPS 2020) lives here too: an
adapted network carries them, so its weight file's shapes depend on them. Defaults, from the
public implementation (mit-han-lab/tinyml, ``tinytl/tinytl_fgvc_train.py`` arguments
``--lite_residual_downsample 2 --lite_residual_expand 1 --lite_residual_groups 2
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
- a map the pool cannot divide: if the conv at the block's stride after pooling does not upsample
  to the output size by an integer factor, the conv runs at stride 1 on the pooled map (a stride-2
  block whose pooled input already has the output size), else without pooling (odd maps, 1x1 maps).

Imports nothing of microtrain: the weight format, the model and the methods all read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np


class ArchitectureError(ValueError):
    """An architecture for which a requested geometry does not exist (one-line message)."""


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the network, with its shapes and costs at the model resolution."""

    index: int  # conv index: 0 = first_conv, then in execution order
    name: str
    kind: str  # 'conv' (full, k x k), 'pointwise' (1x1) or 'depthwise'
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    in_size: int  # square input map side
    out_size: int
    relu6: bool  # a ReLU6 follows

    @property
    def groups(self) -> int:
        """Convolution groups: in_channels for a depthwise layer, else 1."""
        return self.in_channels if self.kind == "depthwise" else 1

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """(out_channels, in_channels/groups, kernel, kernel)."""
        return (self.out_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    @property
    def weight_count(self) -> int:
        """Number of weights (the bias not counted)."""
        return int(np.prod(self.weight_shape))

    @property
    def weights_per_channel(self) -> int:
        """Weights of one output channel (one row of the weight tensor)."""
        return self.weight_count // self.out_channels

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward pass at batch 1."""
        return self.weight_count * self.out_size * self.out_size


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Output height (= width) of a square conv with 'same' padding (kernel - 1) // 2."""
    pad = (kernel - 1) // 2
    return (size + 2 * pad - kernel) // stride + 1


def layer_specs(arch: dict) -> list[ConvLayer]:
    """Every conv layer of an architecture, in execution order."""
    layers: list[ConvLayer] = []

    def add(name, kind, cin, cout, kernel, stride, size, relu6):
        out = conv_out_size(size, kernel, stride)
        layers.append(ConvLayer(len(layers), name, kind, cin, cout, kernel, stride, size, out, relu6))
        return cout, out

    fc = arch["first_conv"]
    channels, size = add("first_conv", "conv", arch.get("in_channels", 3), fc["out"], fc["kernel"],
                         fc["stride"], arch["resolution"], True)
    for b, block in enumerate(arch["blocks"]):
        hidden = channels
        if block.get("expand"):
            hidden, size = add(f"blocks.{b}.expand", "pointwise", channels, block["expand"], 1, 1, size, True)
        hidden, size = add(f"blocks.{b}.depthwise", "depthwise", hidden, hidden, block["kernel"],
                           block["stride"], size, True)
        channels, size = add(f"blocks.{b}.project", "pointwise", hidden, block["out"], 1, 1, size, False)
    if arch.get("feature_mix"):
        add("feature_mix", "pointwise", channels, arch["feature_mix"]["out"], 1, 1, size, True)
    return layers


def weight_shapes(arch: Mapping) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array ``arch`` requires, in network order (the optional
    ``classifier.*`` pair is not listed: its class count is not part of the architecture)."""
    c = arch["in_channels"]
    fc = arch["first_conv"]
    k = fc["kernel"]
    shapes = {"first_conv.weight": (fc["out"], c, k, k), "first_conv.bias": (fc["out"],)}
    c = fc["out"]
    for i, b in enumerate(arch["blocks"]):
        hidden = c
        if b["expand"] is not None:
            hidden = b["expand"]
            shapes[f"blocks.{i}.expand.weight"] = (hidden, c, 1, 1)
            shapes[f"blocks.{i}.expand.bias"] = (hidden,)
        shapes[f"blocks.{i}.depthwise.weight"] = (hidden, 1, b["kernel"], b["kernel"])
        shapes[f"blocks.{i}.depthwise.bias"] = (hidden,)
        shapes[f"blocks.{i}.project.weight"] = (b["out"], hidden, 1, 1)
        shapes[f"blocks.{i}.project.bias"] = (b["out"],)
        c = b["out"]
    if arch["feature_mix"] is not None:
        shapes["feature_mix.weight"] = (arch["feature_mix"]["out"], c, 1, 1)
        shapes["feature_mix.bias"] = (arch["feature_mix"]["out"],)
    if arch.get("lite_residual") is not None:
        shapes.update(lite_weight_shapes(arch))
    return shapes


def embedding_channels(arch: Mapping) -> int:
    """Channels of the pooled features (the few-shot embedding)."""
    if arch["feature_mix"] is not None:
        return arch["feature_mix"]["out"]
    return arch["blocks"][-1]["out"]


# ---------------------------------------------------------------------------------------------
# TinyTL's lite residual branches
# ---------------------------------------------------------------------------------------------

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
        """Name of the branch's group conv: 'blocks.B.lite.conv'."""
        return f"blocks.{self.block}.lite.conv"

    @property
    def project_name(self) -> str:
        """Name of the branch's 1x1 projection: 'blocks.B.lite.project'."""
        return f"blocks.{self.block}.lite.project"

    @property
    def conv_weight_shape(self) -> tuple[int, int, int, int]:
        """(mid_channels, in_channels/groups, kernel, kernel)."""
        return (self.mid_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    @property
    def project_weight_shape(self) -> tuple[int, int, int, int]:
        """(out_channels, mid_channels, 1, 1)."""
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
        raise ArchitectureError(f"blocks.{block}.lite: no pool/stride/upsample reaches a {out_size}x{out_size} "
                         f"output from a {in_size}x{in_size} input at stride {stride}")
    kernel = max_kernel
    while kernel > 1 and pooled < kernel:
        kernel -= 2
    mid = make_divisible(in_channels * expand)
    g = largest_group_count(groups, in_channels, mid)
    return LiteSpec(block, in_channels, mid, out_channels, g, max(kernel, 1), pool, conv_stride,
                    out_size // conv_size, in_size, conv_size, out_size)



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



def lite_weight_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the branch arrays an architecture with ``lite_residual`` settings holds."""
    shapes = {}
    for s in arch_specs(arch, **arch["lite_residual"]):
        shapes[f"{s.conv_name}.weight"], shapes[f"{s.conv_name}.bias"] = s.conv_weight_shape, (s.mid_channels,)
        shapes[f"{s.project_name}.weight"], shapes[f"{s.project_name}.bias"] = s.project_weight_shape, (s.out_channels,)
    return shapes
