"""microtrain's MBConv backbone written again in plain PyTorch: the reference the parity tests
compare against and the torch side of ``tools/bench.py``.

    import sys; sys.path.insert(0, "tools")
    from torch_mbconv import build_torch_model, prototype_loss

    model = build_torch_model(net.arch, net.state())       # float32, eval mode, no BatchNorm
    z = model.features(x)                                   # (N, C) pooled embedding
    loss = prototype_loss(z, prototypes, labels, scale=10.0)

The network is built from the architecture dict alone (``weights/README.md``), not from
``microtrain.model``, so a mistake there cannot cancel out here: ``nn.Conv2d`` with bias and
padding ``(k - 1) // 2``; ReLU6 after ``first_conv``, every ``expand``, every ``depthwise`` and
``feature_mix``; nothing after ``project`` or after the residual add; global average pool.
Parameter names are microtrain's layer names (``blocks.3.depthwise.weight``), so
``model.state_dict()`` and microtrain's arrays share keys. microtrain itself never imports this.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MBConvBlock", "TorchMBConv", "build_torch_model", "load_arrays", "export_arrays",
           "set_trainable", "prototype_logits", "prototype_loss", "episode_loss"]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=True)


class MBConvBlock(nn.Module):
    """Optional 1x1 expansion + ReLU6, depthwise kxk + ReLU6, linear 1x1 projection, optional
    identity shortcut added after the projection."""

    def __init__(self, in_channels: int, block: Mapping):
        super().__init__()
        hidden = block.get("expand") or in_channels
        kernel, stride, out = int(block["kernel"]), int(block["stride"]), int(block["out"])
        self.expand = _conv(in_channels, hidden, 1) if block.get("expand") else None
        self.depthwise = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv(hidden, out, 1)
        self.residual = bool(block.get("residual"))
        if self.residual and (stride != 1 or out != in_channels):
            raise ValueError(f"a residual block needs stride 1 and in == out channels, got stride {stride}, "
                             f"{in_channels} -> {out}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else F.relu6(self.expand(x))
        h = self.project(F.relu6(self.depthwise(h)))
        return h + x if self.residual else h


class TorchMBConv(nn.Module):
    """The backbone; ``forward`` and ``features`` both return the pooled embedding (N, C)."""

    def __init__(self, arch: Mapping):
        super().__init__()
        self.arch = dict(arch)
        fc = arch["first_conv"]
        self.first_conv = _conv(int(arch.get("in_channels", 3)), int(fc["out"]), int(fc["kernel"]),
                                int(fc["stride"]))
        channels = int(fc["out"])
        blocks = []
        for block in arch["blocks"]:
            blocks.append(MBConvBlock(channels, block))
            channels = int(block["out"])
        self.blocks = nn.ModuleList(blocks)
        mix = arch.get("feature_mix")
        self.feature_mix = _conv(channels, int(mix["out"]), 1) if mix else None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.first_conv(x))
        for block in self.blocks:
            h = block(h)
        return h if self.feature_mix is None else F.relu6(self.feature_mix(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    forward = features

    def conv_layers(self) -> "OrderedDict[str, nn.Conv2d]":
        """Every conv by microtrain layer name, in execution order."""
        return OrderedDict((name, m) for name, m in self.named_modules() if isinstance(m, nn.Conv2d))


def load_arrays(model: TorchMBConv, arrays: Mapping[str, np.ndarray]) -> TorchMBConv:
    """Copy float32 arrays named as microtrain's (``<layer>.weight`` / ``<layer>.bias``) into the
    model. Every conv parameter must be present with its exact shape; ``classifier.*`` entries
    (kept by converted checkpoints, unused by the backbone) are ignored, anything else refused."""
    params = dict(model.named_parameters())
    unknown = sorted(k for k in arrays if k not in params and not k.startswith("classifier."))
    missing = sorted(k for k in params if k not in arrays)
    if unknown or missing:
        raise KeyError(f"arrays do not fit the architecture: missing {missing[:4]}, unknown {unknown[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            a = np.asarray(arrays[name])
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"{name}: array {a.shape}, model {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
    return model


def build_torch_model(arch: Mapping, arrays: Mapping[str, np.ndarray]) -> TorchMBConv:
    """The torch twin of ``microtrain.model.Network(arch, arrays)``, in eval mode."""
    return load_arrays(TorchMBConv(arch), arrays).eval()


def export_arrays(model: TorchMBConv) -> dict[str, np.ndarray]:
    """Copies of the parameters as float32 arrays under microtrain's names."""
    return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}


def set_trainable(model: nn.Module, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """``requires_grad`` on exactly the named parameters (``blocks.3.project.bias``, ...), off on
    the rest; returns them in the order given."""
    names = list(names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"no parameters named {unknown}")
    for name, p in params.items():
        p.requires_grad_(name in names)
    return [params[n] for n in names]


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` x cosine similarity of the embeddings to the prototypes: z is L2-normalised here,
    the prototypes are taken as given (already normalised, constants), as in microtrain's head."""
    return scale * F.normalize(z, dim=1, eps=1e-12) @ prototypes.t()


def prototype_loss(z: torch.Tensor, prototypes, labels, scale: float = 10.0,
                   reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of the cosine prototype logits (microtrain's fine-tuning loss);
    ``reduction='none'`` gives each sample's own loss."""
    prototypes = torch.as_tensor(prototypes, dtype=z.dtype)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return F.cross_entropy(prototype_logits(z, prototypes, scale), labels, reduction=reduction)


def episode_loss(z: torch.Tensor, support_labels, query_labels, ways: int, scale: float = 10.0) -> torch.Tensor:
    """A ProtoNet episode's loss with the prototypes computed from the support embeddings (the
    first ``len(support_labels)`` rows of z), gradients flowing through them: prototypes are the
    normalised class means of the normalised support embeddings; the queries (the rest) are
    classified by scaled cosine logits (microtrain's meta-training loss)."""
    support_labels = torch.as_tensor(support_labels, dtype=torch.int64)
    n_support = len(support_labels)
    zn = F.normalize(z, dim=1, eps=1e-12)
    means = torch.stack([zn[:n_support][support_labels == k].mean(dim=0) for k in range(ways)])
    protos = F.normalize(means, dim=1, eps=1e-12)
    return prototype_loss(zn[n_support:], protos, query_labels, scale)
