"""MBConv networks (MCUNet, MobileNetV2, ProxylessNAS): parameters, graph builders, inference.

A ``Network`` is an architecture dict (``architecture.py``: layer specs, names, shapes, counts)
plus float32 arrays by layer name, as stored in a weight file (``weight_format.py``,
``weights/README.md``); TinyTL's lite residual branches (``lite_residual.py``) are part of a
network that method adapted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .architecture import ConvLayer, arch_specs, layer_specs
from .autograd import Executor, Graph, Value
from .lite_residual import LiteResidualHook
from .weight_format import load_weights, save_weights


class Network:
    """An MBConv backbone: architecture, float32 parameters by layer name, and graph builders."""

    def __init__(self, arch: dict, arrays: dict[str, np.ndarray]):
        self.arch = arch
        self.layers = layer_specs(arch)
        self.params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for layer in self.layers:
            w = np.ascontiguousarray(arrays[f"{layer.name}.weight"], dtype=np.float32)
            b = np.ascontiguousarray(arrays[f"{layer.name}.bias"], dtype=np.float32)
            if w.shape != layer.weight_shape or b.shape != (layer.out_channels,):
                raise ValueError(f"{layer.name}: weight {w.shape} / bias {b.shape}, "
                                 f"architecture says {layer.weight_shape}")
            self.params[layer.name] = (w, b)
        self.extra = {k: v for k, v in arrays.items() if k.split(".")[0] == "classifier"}
        self._feature_runs: dict[tuple, object] = {}
        # TinyTL's lite residual branches, part of a network that method adapted (None otherwise)
        self.block_hook = None
        if arch.get("lite_residual") is not None:
            settings = arch["lite_residual"]
            self.block_hook = LiteResidualHook(arch_specs(arch, **settings), settings=settings, arrays=arrays)

    def attach_lite_residual(self, hook) -> None:
        """Make TinyTL's trained branches part of this network: its graphs, ``state()`` and
        ``arch`` (so a saved file holds them and ``load`` rebuilds them)."""
        self.block_hook = hook
        self.arch = {**self.arch, "lite_residual": hook.settings}
        self._feature_runs.clear()

    @property
    def name(self) -> str:
        """The backbone's name from its weight file (e.g. 'mcunet-5fps-meta')."""
        return self.arch.get("name", "network")

    @property
    def base_name(self) -> str:
        """The backbone these weights were trained from: the ImageNet backbone's name for a
        meta-trained file ('mcunet-5fps' for 'mcunet-5fps-meta', from its provenance), else
        ``name``. Per-architecture settings (SparseUpdate's policy) are keyed by it."""
        return self.arch.get("meta_training", {}).get("base", {}).get("name", self.name)

    @property
    def resolution(self) -> int:
        """Input image side in pixels (the network reads float32 (N, 3, R, R))."""
        return int(self.arch["resolution"])

    @property
    def embedding_size(self) -> int:
        """Length of the pooled feature vector (the last layer's output channels)."""
        return self.layers[-1].out_channels

    def layer(self, name: str) -> ConvLayer:
        """The conv layer of that name; ``KeyError`` if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are {self.layers[0].name} ... {self.layers[-1].name}")

    # -- graphs ------------------------------------------------------------------------------------
    def build_features(self, g: Graph, x: Value, block_hook=None) -> Value:
        """Add the backbone to ``g`` from image ``x`` to the pooled embedding (N, C).

        ``block_hook(g, b, block_input, block_output) -> Value`` may rewrite each block's output
        (TinyTL adds its lite residual branch there); None means the network's own (see
        ``attach_lite_residual``)."""
        if block_hook is None:
            block_hook = self.block_hook
        def conv(layer: ConvLayer, h: Value) -> Value:
            w, b = self.params[layer.name]
            if layer.kind == "conv":
                h = g.conv2d(h, w, b, stride=layer.stride, name=layer.name)
            elif layer.kind == "depthwise":
                h = g.depthwise(h, w, b, stride=layer.stride, name=layer.name)
            else:
                h = g.pointwise(h, w, b, name=layer.name)
            return g.relu6(h, name=f"{layer.name}.relu6") if layer.relu6 else h

        by_name = {layer.name: layer for layer in self.layers}
        h = conv(by_name["first_conv"], x)
        for b, block in enumerate(self.arch["blocks"]):
            block_input = h
            for part in ("expand", "depthwise", "project"):
                if f"blocks.{b}.{part}" in by_name:
                    h = conv(by_name[f"blocks.{b}.{part}"], h)
            if block.get("residual"):
                h = g.add(h, block_input, name=f"blocks.{b}.add")
            if block_hook is not None:
                h = block_hook(g, b, block_input, h)
        if "feature_mix" in by_name:
            h = conv(by_name["feature_mix"], h)
        return g.global_avg_pool(h, name="pool")

    def features_graph(self, batch: int, block_hook=None) -> Graph:
        """A graph from images (batch, 3, R, R) float32 to pooled features (batch, embedding_size)."""
        g = Graph()
        self.build_features(g, g.input("image", (batch, 3, self.resolution, self.resolution)), block_hook)
        return g

    def protonet_graph(self, batch: int, ways: int, scale: float, block_hook=None) -> Graph:
        """Backbone + cosine prototype head + cross-entropy: the fine-tuning graph."""
        g = Graph()
        z = self.build_features(g, g.input("image", (batch, 3, self.resolution, self.resolution)), block_hook)
        z = g.l2_normalize(z, name="normalize")
        logits = g.cosine_logits(z, g.input("prototypes", (ways, self.embedding_size)), scale, name="logits")
        g.cross_entropy(logits, g.input("labels", (batch,), np.int64), name="loss")
        return g

    def episode_graph(self, n_support: int, n_query: int, ways: int, scale: float) -> Graph:
        """Backbone + a ProtoNet episode loss with the prototypes inside the graph: the
        meta-training graph (paper Section 2.1, Appendix A.3; Snell et al. 2017).

        Inputs: ``image`` (S + Q, 3, R, R) float32, the S support images first, then the Q
        queries; ``support_labels`` int64 (S,) and ``query_labels`` int64 (Q,) in [0, ways), every
        class among the support. Prototypes are the normalised class means of the normalised
        support embeddings (as ``train.class_prototypes``), and the loss is the mean softmax
        cross-entropy of the queries' scaled cosine logits; gradients flow through the
        prototypes into the support images' embeddings too."""
        g = Graph()
        z = self.build_features(g, g.input("image", (n_support + n_query, 3, self.resolution, self.resolution)))
        z = g.l2_normalize(z, name="normalize")
        means = g.class_mean(z, g.input("support_labels", (n_support,), np.int64), ways, name="class_mean")
        protos = g.l2_normalize(means, name="prototypes")
        query = g.rows(z, n_support, n_support + n_query, name="query")
        logits = g.cosine_logits(query, protos, scale, name="logits")
        g.cross_entropy(logits, g.input("query_labels", (n_query,), np.int64), name="loss")
        return g

    # -- inference -----------------------------------------------------------------------------------
    def features(self, x: np.ndarray, batch_size: int = 8, block_hook=None) -> np.ndarray:
        """Pooled embeddings (N, C) of images (N, 3, R, R) float32 in [-1, 1]. One forward-only
        executor per batch size (and block hook) is planned once and reused; a short last
        chunk is padded."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (3, self.resolution, self.resolution) or x.dtype != np.float32:
            raise ValueError(f"{self.name}.features takes float32 (N, 3, {self.resolution}, "
                             f"{self.resolution}), got {x.dtype} {x.shape}")
        batch = max(1, min(batch_size, len(x)))
        run = self._feature_runs.get((batch, block_hook))
        if run is None:
            run = self._feature_runs[(batch, block_hook)] = Executor(self.features_graph(batch, block_hook))
        image = run.value("image")
        out = np.empty((len(x), self.embedding_size), np.float32)
        for start in range(0, len(x), batch):
            valid = min(batch, len(x) - start)
            image[:valid] = x[start:start + valid]
            out[start:start + valid] = run.forward({}, train=False)[:valid]
        return out

    # -- counts --------------------------------------------------------------------------------------
    @property
    def forward_macs(self) -> int:
        """Multiply-accumulates of one image's forward pass through the conv layers."""
        return sum(layer.macs for layer in self.layers)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays by name, in the weight-file naming."""
        out = {}
        for name, (w, b) in self.params.items():
            out[f"{name}.weight"], out[f"{name}.bias"] = w, b
        lite = self.block_hook.state() if self.block_hook is not None else {}
        return {**out, **lite, **self.extra}

    def copy(self) -> "Network":
        """An independent network with copies of every array (fine-tuning changes weights in place)."""
        return Network(self.arch, {k: v.copy() for k, v in self.state().items()})


def load(path: str | Path) -> Network:
    """A network from a microtrain weight file (see ``weights/README.md``)."""
    arch, arrays = load_weights(path)
    return Network(arch, arrays)


def save(net: Network, path: str | Path) -> None:
    """Write ``net`` as a microtrain weight file (``weights/README.md``), atomically."""
    save_weights(path, net.arch, net.state())
