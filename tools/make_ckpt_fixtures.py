#!/usr/bin/env python
"""Regenerate tests/fixtures/ (needs torch; the tests that read the fixtures do not).

Writes, all tiny and seeded:
- ``tiny_zoo.json`` + ``tiny_zoo_sd.pt`` (plain state_dict) + ``tiny_zoo_wrapped.pt``
  (``{'state_dict': ...}``): a 3-block network in the MCUNet model-zoo key layout
  (``blocks.{i}.mobile_inverted_conv.*``) with a feature-mix layer, BN eps 1e-3 (zoo default,
  the config names none);
- ``tiny_tt.json`` + ``tiny_tt_sd.pt`` + ``tiny_tt_wrapped.pt``: a 2-block network in
  tiny-training's layout (``blocks.{i}.conv.*``), no feature mix, BN eps 1e-5 given by the
  config's ``bn`` entry;
- ``input.npy`` (2, 3, 16, 16) and, per network, torch's eval-mode outputs for it:
  ``tiny_*_features.npy`` (pooled embedding) and ``tiny_*_logits.npy``;
- ``tiny_int8.pt``: a 3-block int8-dict checkpoint as tiny-training stores them, with a
  saturated int32 bias on a near-dead channel;
- bad inputs: ``malicious.pt`` (a torch-style zip whose pickle calls os.system to create
  ``microtrain-pwned.marker`` in the working directory), ``legacy.pt`` (non-zip torch format),
  ``truncated.pt``, ``unknown_key.pt``, ``missing_key.pt``.

    python tools/make_ckpt_fixtures.py [--out tests/fixtures]
"""
from __future__ import annotations

import argparse
import json
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESOLUTION = 16
MARKER = "microtrain-pwned.marker"


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int, eps: float, act: bool) -> nn.Sequential:
    layers = OrderedDict(
        conv=nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(cout, eps=eps),
    )
    if act:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Inverted bottleneck: optional 1x1 expansion, depthwise kxk, linear 1x1 projection."""

    def __init__(self, cfg: dict, eps: float):
        super().__init__()
        cin, cout, k, stride = cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], cfg["stride"]
        hidden = cfg["mid_channels"] or round(cin * cfg["expand_ratio"])
        if cfg["expand_ratio"] == 1:
            hidden = cin
            self.inverted_bottleneck = None
        else:
            self.inverted_bottleneck = _conv_bn(cin, hidden, 1, 1, 1, eps, act=True)
        self.depth_conv = _conv_bn(hidden, hidden, k, stride, hidden, eps, act=True)
        self.point_linear = _conv_bn(hidden, cout, 1, 1, 1, eps, act=False)

    def forward(self, x):
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class Block(nn.Module):
    def __init__(self, cfg: dict, eps: float, word: str):
        super().__init__()
        self.word = word  # 'mobile_inverted_conv' (model zoo) or 'conv' (tiny-training)
        setattr(self, word, MBConv(cfg.get("mobile_inverted_conv") or cfg["conv"], eps))
        self.residual = cfg["shortcut"] is not None

    def forward(self, x):
        y = getattr(self, self.word)(x)
        return x + y if self.residual else y


class Classifier(nn.Module):
    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        return self.linear(x)


class TinyNet(nn.Module):
    """A network built from a net-config JSON, with the model zoo's module names."""

    def __init__(self, config: dict, word: str):
        super().__init__()
        eps = config.get("bn", {}).get("eps", 1e-3)
        fc = config["first_conv"]
        self.first_conv = _conv_bn(fc["in_channels"], fc["out_channels"], fc["kernel_size"], fc["stride"], 1, eps, act=True)
        self.blocks = nn.ModuleList(Block(b, eps, word) for b in config["blocks"])
        mix = config["feature_mix_layer"]
        self.feature_mix_layer = None
        if mix is not None:
            self.feature_mix_layer = _conv_bn(mix["in_channels"], mix["out_channels"], 1, 1, 1, eps, act=True)
        cls = config["classifier"]
        self.classifier = Classifier(cls["in_features"], cls["out_features"])

    def forward(self, x):
        """(pooled features, logits)."""
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        if self.feature_mix_layer is not None:
            x = self.feature_mix_layer(x)
        features = x.mean(dim=(2, 3))
        return features, self.classifier(features)


def _block_cfg(word: str, cin, cout, k, stride, ratio, mid, residual) -> dict:
    conv = {"name": "MBInvertedConvLayer", "in_channels": cin, "out_channels": cout, "kernel_size": k,
            "stride": stride, "expand_ratio": ratio, "mid_channels": mid, "act_func": "relu6", "use_se": False}
    shortcut = {"name": "IdentityLayer", "in_channels": [cin], "out_channels": [cout], "use_bn": False,
                "act_func": None, "dropout_rate": 0, "ops_order": "weight_bn_act"} if residual else None
    if word == "conv":  # tiny-training's ResidualBlock
        return {"name": "ResidualBlock", "conv": conv, "shortcut": shortcut}
    return {"name": "MobileInvertedResidualBlock", "mobile_inverted_conv": conv, "shortcut": shortcut}


def _first_conv(cout: int, stride: int) -> dict:
    return {"name": "ConvLayer", "kernel_size": 3, "stride": stride, "dilation": 1, "groups": 1, "bias": False,
            "in_channels": 3, "out_channels": cout, "use_bn": True, "act_func": "relu6", "dropout_rate": 0,
            "ops_order": "weight_bn_act"}


def zoo_config() -> dict:
    """Model-zoo style: feature mix, no 'bn' entry (eps 1e-3)."""
    w = "mobile_inverted_conv"
    return {
        "name": "ProxylessNASNets", "resolution": RESOLUTION,
        "first_conv": _first_conv(8, 2),
        "blocks": [
            _block_cfg(w, 8, 6, 3, 1, 1, None, False),
            _block_cfg(w, 6, 8, 5, 2, 3, 18, False),
            _block_cfg(w, 8, 8, 3, 1, 3, 24, True),
        ],
        "feature_mix_layer": {"name": "ConvLayer", "kernel_size": 1, "stride": 1, "in_channels": 8, "out_channels": 16,
                              "use_bn": True, "act_func": "relu6", "bias": False, "ops_order": "weight_bn_act"},
        "classifier": {"name": "LinearLayer", "in_features": 16, "out_features": 5, "bias": True,
                       "use_bn": False, "act_func": None, "dropout_rate": 0, "ops_order": "weight_bn_act"},
    }


def tt_config() -> dict:
    """tiny-training style: no feature mix, a residual block without expansion, 'bn' eps 1e-5."""
    w = "conv"
    return {
        "name": "ProxylessNASNets", "resolution": RESOLUTION, "bn": {"momentum": 0.1, "eps": 1e-5},
        "first_conv": _first_conv(4, 1),
        "blocks": [
            _block_cfg(w, 4, 4, 3, 1, 1, None, True),
            _block_cfg(w, 4, 8, 7, 2, 3, 12, False),
        ],
        "feature_mix_layer": None,
        "classifier": {"name": "LinearLayer", "in_features": 8, "out_features": 3, "bias": True,
                       "use_bn": False, "act_func": None, "dropout_rate": 0, "ops_order": "weight_bn_act"},
    }


def build(config: dict, word: str, seed: int | None = None) -> TinyNet:
    """The torch network of ``config`` in eval mode; with a seed, weights and BN statistics are
    randomised (non-trivial running mean/var, one near-zero variance so eps matters)."""
    net = TinyNet(config, word)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                elif isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                    module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                    module.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                    module.running_var.copy_(0.2 + 1.5 * torch.rand(n, generator=gen))
                    module.running_var[0] = 2e-4  # comparable to eps: a wrong eps shows
                    module.num_batches_tracked.fill_(1000)
                elif isinstance(module, nn.Linear):
                    module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return net.eval()


def _save(obj, path: Path, **kwargs) -> None:
    torch.save(obj, path, **kwargs)


def _torch_style_zip(path: Path, pickle_bytes: bytes) -> None:
    """A zip laid out like torch.save's, around arbitrary pickle bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")


def malicious_pickle(command: str) -> bytes:
    """Protocol-2 pickle of ``{'state_dict': os.system(command)}``, written opcode by opcode
    (dumping a real call would need the function object; this never runs anything)."""
    cmd = command.encode()
    return (b"\x80\x02}X" + len(b"state_dict").to_bytes(4, "little") + b"state_dict"
            + b"cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85Rs.")


def int8_checkpoint(seed: int = 0) -> dict:
    """A tiny int8-dict checkpoint with the structure of tiny-training's mcu_models."""
    rng = np.random.default_rng(seed)

    def conv(cin, cout, k, stride, shape_in, depthwise=False, x_scale=0.05):
        groups = cout if depthwise else 1
        w = rng.integers(-127, 128, size=(cout, cin // groups, k, k), dtype=np.int8)
        return {"in_channel": cin, "in_shape": shape_in, "out_channel": cout,
                "out_shape": -(-shape_in // stride), "kernel_size": (k, k), "stride": stride, "groups": groups,
                "depthwise": depthwise, "act": None,
                "params": {"weight": w, "bias": rng.integers(-5000, 5000, size=cout).astype(np.int32),
                           "x_scale": x_scale, "x_zero": 0, "y_scale": 0.02, "y_zero": -128,
                           "w_scales": (rng.random(cout) * 0.01 + 1e-4).astype(np.float32)}}

    first = conv(3, 8, 3, 2, RESOLUTION, x_scale=2 / 255)
    # a near-dead channel with a saturated bias, as in the real files
    first["params"]["w_scales"][3] = np.float32(3.937008e-09)
    first["params"]["bias"][3] = np.int32(-2**31)
    blocks = [
        {"pointwise1": None, "depthwise": conv(8, 8, 3, 1, 8, depthwise=True), "pointwise2": conv(8, 8, 1, 1, 8),
         "residual": {"in_channel": 8, "in_shape": 8, "params": {"x_scale": 0.05, "x_zero": 0, "y_scale": 0.1, "y_zero": 1}},
         "se": None},
        {"pointwise1": conv(8, 24, 1, 1, 8), "depthwise": conv(24, 24, 5, 2, 8, depthwise=True),
         "pointwise2": conv(24, 12, 1, 1, 4), "residual": None, "se": None},
        {"pointwise1": conv(12, 36, 1, 1, 4), "depthwise": conv(36, 36, 3, 1, 4, depthwise=True),
         "pointwise2": conv(36, 12, 1, 1, 4), "residual": {"in_channel": 12, "in_shape": 4,
                                                           "params": {"x_scale": 0.05, "x_zero": 0, "y_scale": 0.1, "y_zero": 0}},
         "se": None},
    ]
    classifier = conv(12, 10, 1, 1, 1)
    for key in ("in_shape", "out_shape", "depthwise", "act"):
        del classifier[key]
    return {"first_conv": first, "blocks": blocks, "feature_mix": None, "classifier": classifier}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, RESOLUTION, RESOLUTION)).astype(np.float32))
    np.save(out / "input.npy", x.numpy())
    for name, config, word, seed in (("tiny_zoo", zoo_config(), "mobile_inverted_conv", 1),
                                     ("tiny_tt", tt_config(), "conv", 2)):
        net = build(config, word, seed)
        (out / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
        sd = net.state_dict()
        _save(sd, out / f"{name}_sd.pt")
        _save({"state_dict": sd}, out / f"{name}_wrapped.pt")
        with torch.no_grad():
            features, logits = net(x)
        np.save(out / f"{name}_features.npy", features.numpy())
        np.save(out / f"{name}_logits.npy", logits.numpy())
        if name == "tiny_tt":  # the bad inputs derive from the smaller network
            _save({"first_conv.conv.weight": sd["first_conv.conv.weight"]}, out / "legacy.pt",
                  _use_new_zipfile_serialization=False)
            extra = OrderedDict(sd)
            extra["blocks.1.conv.squeeze.weight"] = torch.zeros(2)
            _save(extra, out / "unknown_key.pt")
            less = OrderedDict(sd)
            del less["blocks.1.conv.point_linear.bn.running_var"]
            _save(less, out / "missing_key.pt")
            whole = (out / f"{name}_sd.pt").read_bytes()
            (out / "truncated.pt").write_bytes(whole[: len(whole) // 2])

    _save(int8_checkpoint(), out / "tiny_int8.pt")
    _torch_style_zip(out / "malicious.pt", malicious_pickle(f"touch {MARKER}"))
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {sum(1 for _ in out.iterdir())} files to {out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
