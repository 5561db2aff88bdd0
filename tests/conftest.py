"""Shared test helpers: small random MBConv architectures and networks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings, strategies as st

from microtrain.architecture import layer_specs
from microtrain.model import Network
from microtrain.paths import shared_dir

# A handful of reproducible examples per property, for runs where every example is expensive: the
# kernel tests under qemu on emulated aarch64 (tools/arm_check.py passes --hypothesis-profile=aarch64).
settings.register_profile("aarch64", max_examples=8, derandomize=True, database=None, deadline=None)


def random_arrays(arch: dict, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    """He-style random weights for every conv layer of ``arch`` (float32)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layer_specs(arch):
        fan_in = layer.weight_count // layer.out_channels
        arrays[f"{layer.name}.weight"] = (rng.standard_normal(layer.weight_shape) * scale
                                          * np.sqrt(2.0 / fan_in)).astype(np.float32)
        arrays[f"{layer.name}.bias"] = (rng.standard_normal(layer.out_channels) * 0.1).astype(np.float32)
    return arrays


def small_arch(resolution: int = 16, blocks=None) -> dict:
    """A tiny MBConv net: first conv, then blocks of (expand?, kernel, stride, out, residual)."""
    blocks = blocks or [dict(expand=None, kernel=3, stride=1, out=8, residual=False),
                        dict(expand=24, kernel=5, stride=2, out=8, residual=False),
                        dict(expand=24, kernel=3, stride=1, out=8, residual=True)]
    return {"name": "tiny", "resolution": resolution, "in_channels": 3,
            "first_conv": {"out": 8, "kernel": 3, "stride": 2}, "blocks": blocks, "feature_mix": None}


def small_net(seed: int = 0, **kw) -> Network:
    arch = small_arch(**kw)
    return Network(arch, random_arrays(arch, seed))


def grid_inputs(root: Path) -> tuple[Path, Path]:
    """The evaluation grid's tiny inputs in ``root``: a 16x16 random MBConv net as a weight file
    (tiny.npz) and a 6-class .npz dataset of 28x28 grey uint8 images, 8 per class (toy.npz)."""
    from microtrain.checkpoint import save_weights

    arch = small_arch(resolution=16)
    arch["source"] = {"file": "random", "sha256": "0" * 64, "kind": "torch-state-dict"}
    weights = save_weights(Path(root) / "tiny.npz", arch, random_arrays(arch, seed=3))
    rng = np.random.default_rng(0)
    x, y = [], []
    for c in range(6):
        base = rng.integers(0, 256, (28, 28))
        for _ in range(8):
            x.append(np.clip(base + rng.normal(0, 60, (28, 28)), 0, 255).astype(np.uint8))
            y.append(c)
    data = Path(root) / "toy.npz"
    np.savez(data, x=np.stack(x), y=np.array(y, dtype=np.int64))
    return weights, data


@st.composite
def archs(draw):
    """Random small MBConv architectures (odd sizes, strides, kernels, residuals)."""
    resolution = draw(st.sampled_from([5, 8, 9, 12]))
    channels = draw(st.integers(2, 6))
    blocks = []
    c = channels
    for _ in range(draw(st.integers(1, 3))):
        stride = draw(st.sampled_from([1, 2]))
        out = draw(st.sampled_from([c, c + 2]))
        blocks.append(dict(expand=draw(st.sampled_from([None, 2 * c, 3 * c])),
                           kernel=draw(st.sampled_from([3, 5, 7])), stride=stride, out=out,
                           residual=bool(stride == 1 and out == c and draw(st.booleans()))))
        c = out
    return {"name": "drawn", "resolution": resolution, "in_channels": 3,
            "first_conv": {"out": channels, "kernel": 3, "stride": draw(st.sampled_from([1, 2]))},
            "blocks": blocks, "feature_mix": draw(st.sampled_from([None, {"out": 2 * c}]))}


@st.composite
def selections(draw, arch: dict):
    """A random Selection over ``arch``: each layer frozen, bias-only, full, or a channel subset."""
    from microtrain.selection import LayerUpdate, Selection

    chosen = {}
    for layer in layer_specs(arch):
        kinds = ["frozen", "frozen", "bias", "full", "subset"] + (["inputs"] if layer.kind != "depthwise" else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "bias":
            chosen[layer.name] = LayerUpdate.bias_only(layer.out_channels)
        elif kind == "full":
            chosen[layer.name] = LayerUpdate.full(layer.out_channels)
        elif kind == "subset":
            idx = draw(st.lists(st.integers(0, layer.out_channels - 1), min_size=1, unique=True))
            chosen[layer.name] = LayerUpdate.channels(idx)
        elif kind == "inputs":  # SparseUpdate's scheme: all rows, some input channels
            idx = draw(st.lists(st.integers(0, layer.in_channels - 1), min_size=1, unique=True))
            chosen[layer.name] = LayerUpdate.full(layer.out_channels)
            chosen[layer.name] = LayerUpdate(chosen[layer.name].weight, chosen[layer.name].bias, np.array(idx))
    return Selection(chosen)


def need_shared(*parts: str):
    """Skip a test cleanly when a file of the shared folder is absent."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (set MICROTRAIN_SHARED)")
    return path
