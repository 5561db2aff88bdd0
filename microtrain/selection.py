"""What gets trained: layers x output channels, as one small typed object.

The backward pass reads it (which weight rows to compute, where input gradients may stop) and the
memory planner reads it (which activations to keep, how large the compact gradients are).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np


def _channels(idx: Iterable[int] | np.ndarray) -> np.ndarray:
    arr = np.unique(np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64))
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class LayerUpdate:
    """The output channels of one layer whose weights and whose biases are trained.

    ``weight`` / ``bias`` are sorted int64 channel indices, or None when frozen. A depthwise layer's
    output channel is also its input channel, so a channel subset there keeps only those inputs.
    ``inputs`` optionally restricts the trained weights of a pointwise or full conv to some input
    channels (SparseUpdate's scheme): only those input channels are kept for the backward pass.
    """

    weight: np.ndarray | None
    bias: np.ndarray | None
    inputs: np.ndarray | None = None

    @staticmethod
    def full(out_channels: int) -> "LayerUpdate":
        """Every weight row and bias entry of a layer with ``out_channels`` outputs."""
        everything = _channels(np.arange(out_channels))
        return LayerUpdate(everything, everything)

    @staticmethod
    def bias_only(out_channels: int) -> "LayerUpdate":
        """Every bias entry, no weight (TinyTL's and the bias-only candidates' update)."""
        return LayerUpdate(None, _channels(np.arange(out_channels)))

    @staticmethod
    def channels(idx: Iterable[int]) -> "LayerUpdate":
        """Weights and biases of the given output channels."""
        chosen = _channels(idx)
        return LayerUpdate(chosen, chosen)

    def __post_init__(self):
        for part in ("weight", "bias", "inputs"):
            value = getattr(self, part)
            if value is not None and not (isinstance(value, np.ndarray) and value.dtype == np.int64):
                object.__setattr__(self, part, _channels(value))

    @property
    def trains_weight(self) -> bool:
        """True when at least one weight row is trained."""
        return self.weight is not None and len(self.weight) > 0

    @property
    def trains_bias(self) -> bool:
        """True when at least one bias entry is trained."""
        return self.bias is not None and len(self.bias) > 0

    def covers_all(self, out_channels: int) -> bool:
        """True when every weight row of the layer is trained."""
        return self.weight is not None and len(self.weight) == out_channels


@dataclass(frozen=True)
class Selection:
    """Layer name -> LayerUpdate; layers not named are frozen."""

    layers: Mapping[str, LayerUpdate] = field(default_factory=dict)

    def __post_init__(self):
        kept = {n: u for n, u in dict(self.layers).items() if u.trains_weight or u.trains_bias}
        object.__setattr__(self, "layers", kept)

    def get(self, name: str) -> LayerUpdate | None:
        """The layer's update, or None when it is frozen."""
        return self.layers.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        """The trained layers' names, in the order they were given."""
        return list(self.layers)

    def describe(self, out_channels: Mapping[str, int] | None = None) -> str:
        """One line per trained layer: weight channels and bias channels."""
        lines = []
        for name, upd in self.layers.items():
            total = f"/{out_channels[name]}" if out_channels and name in out_channels else ""
            w = "frozen" if not upd.trains_weight else f"{len(upd.weight)}{total} ch"
            b = "frozen" if not upd.trains_bias else f"{len(upd.bias)}{total} ch"
            lines.append(f"{name:<24} weight {w:<12} bias {b}")
        return "\n".join(lines) if lines else "(nothing trained)"
