"""TinyTL's lite residual branches (Cai et al., NeurIPS 2020) as part of a network's graph.

Every MBConv block b gets a small branch from its input to its output, added to the block's output
(after the backbone's own residual add, which stays)::

    block_input -> avg_pool(d) -> group conv k x k, stride s, `groups` groups -> ReLU6
                -> 1x1 projection to the block's output channels -> upsample(u) -> + block_output

Nodes: ``blocks.{b}.lite.pool`` (only when d > 1), ``blocks.{b}.lite.conv``,
``blocks.{b}.lite.relu6``, ``blocks.{b}.lite.project``, ``blocks.{b}.lite.upsample`` (only when
u > 1) and ``blocks.{b}.lite.add``. Everything runs through the ordinary graph ops, so the planner
prices the branches' memory like any other layer's. The branch geometry (pool, stride, kernel,
groups, channels) is computed in ``architecture.py``; which parameters train is TinyTL's policy,
in ``tinytl.py``. A network TinyTL adapted carries its branches (``Network.block_hook``), so they
live at the model's layer, not with the method.

Initialisation, from the public implementation (mit-han-lab/tinyml, ``tinytl/model/modules.py``):
He (fan-out, ``N(0, 2 / (k*k*out))``) for the group conv; the branch's last layer starts at zero
(the public code zeroes its final BatchNorm's scale), so the adapted network starts identical to
the pretrained one.

Where this differs from the public module, and why:

- no BatchNorm / GroupNorm in the branch (the engine has none; the backbone's BN is folded into
  its conv biases): both lite convs carry a bias instead, and the zeroed projection (weights and
  bias) plays the zeroed BN scale. The public code freezes that final BN's shift when biases are
  trained; here the projection bias is trained with its layer (it only duplicates the block's
  trained project bias, ``out_channels`` numbers per block);
- ReLU6 instead of ReLU (the engine's only activation; they differ only above 6);
- nearest-neighbour upsampling by an integer factor instead of bilinear resizing;
- a branch on every block, the first (expand-1) block included; the public insertion routine walks
  ProxylessNAS's six stride stages, which appears to leave that first block without one;
- the branch parameters start random (seeded), not from the public ImageNet-pretrained lite
  residual weights, which exist for ProxylessNAS-Mobile only.
"""
from __future__ import annotations

import math

import numpy as np

from .architecture import DOWNSAMPLE, EXPAND, GROUPS, MAX_KERNEL, LiteSpec
from .autograd import Graph, GraphError, Value


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
        """Names of the branches' layers (group convs and projections), in block order."""
        return list(self.params)

    @property
    def param_count(self) -> int:
        """Weights and biases of every branch (TinyTL's extra parameters)."""
        return sum(s.params for s in self.specs.values())

    def state(self) -> dict[str, np.ndarray]:
        """The branch parameters by name (``blocks.{b}.lite.conv.weight``, ...)."""
        out = {}
        for name, (w, b) in self.params.items():
            out[f"{name}.weight"], out[f"{name}.bias"] = w, b
        return out

    def __repr__(self) -> str:
        return f"LiteResidualHook({len(self.specs)} blocks, {self.param_count} parameters)"

