"""Whole networks against PyTorch: embeddings of the shared backbones, a BatchNorm zoo checkpoint
after conversion, one training step's compact gradients, the Fisher information of Eq. 2 and a
few SGD steps with momentum. The torch side is ``tools/torch_mbconv.py`` (built from the
architecture dict, not from ``microtrain.model``) plus, for the zoo checkpoint, a conv+BN model
written here from the net-config JSON.

Tolerances. microtrain computes in float32 (unit roundoff u = 6e-8) with its own summation
orders. A conv output sums up to ~600 products (576 channels into a 1x1 conv, 7x7 depthwise
taps); its rounding error is ~sqrt(n) u ~ 1e-6 relative for random-sign terms, and MBConv stacks
40-60 such layers whose errors add. Every difference is measured against a scale (the largest
magnitude of the reference), as per-element relative errors mean nothing for entries near zero;
measured values are a few 1e-6, and each tolerance, stated beside its assert, leaves >= 10x.
Forward checks compare with torch float32 (and float64 for the zoo checkpoint). Training checks
compare with torch float64 taking microtrain's ReLU6 branches, for the reason given above them.
Run with ``pytest -s`` to see every measured figure.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from conftest import need_shared, random_arrays, small_arch  # noqa: E402
from torch_mbconv import build_torch_model, prototype_loss, set_trainable  # noqa: E402

from microtrain.autograd import Executor  # noqa: E402
from microtrain.checkpoint import ensure_converted, read_checkpoint  # noqa: E402
from microtrain.data import open_dataset, to_input  # noqa: E402
from microtrain.episodes import sample_episode  # noqa: E402
from microtrain.model import Network, load  # noqa: E402
from microtrain.optim import SGD  # noqa: E402
from microtrain.paths import shared_dir  # noqa: E402
from microtrain.selection import LayerUpdate, Selection  # noqa: E402
from microtrain.tinytrain import fisher_information  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BACKBONES = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
DATASETS = ("flowers.zip", "traffic_sign.zip")  # JPEG photos and small PNG signs
SCALE = 10.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch on one thread: these are tiny batches, and on a shared 2-core box torch's OpenMP
    workers spin-wait against other processes (one MCUNet backward: 30 ms on 1 thread, 4.5 s on 2
    under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def report(check: str, **numbers) -> None:
    """The measured figures (shown with ``pytest -s``, or on a failure)."""
    print(f"[{check}] " + ", ".join(f"{k}={v:.3g}" for k, v in numbers.items()))


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| over max |ref|: the difference relative to the reference's scale."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def tensor(a) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def episode_images(resolution: int) -> np.ndarray:
    """8 real images as network input: 2 classes x (1 support + 1 query) from each dataset."""
    parts = []
    for name in DATASETS:
        with open_dataset(shared_dir() / "data" / name) as ds:
            images = sample_episode(ds, way=2, shot=1, query_shots=1, seed=7).load(resolution)
        parts += [images.support, images.query]
    return to_input(np.concatenate(parts))


def have_shared(*parts: str) -> bool:
    return shared_dir().joinpath(*parts).exists()


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    for name in DATASETS:
        need_shared("data", name)
    return episode_images(128)


def random_prototypes(ways: int, dim: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).standard_normal((ways, dim))
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


# What the training checks train: full layers, a depthwise channel subset (a stride-2 7x7 one in
# MCUNet), a bias-only layer and a pointwise layer restricted to some rows and input channels.
SELECTIONS = {
    "mcunet-5fps": lambda: Selection({
        "blocks.3.depthwise": LayerUpdate.channels([0, 7, 8, 30, 47]),
        "blocks.7.expand": LayerUpdate(np.arange(0, 160, 3), [0, 1, 159], [0, 5, 17, 39]),
        "blocks.9.project": LayerUpdate.bias_only(48),
        "blocks.12.expand": LayerUpdate.full(384),
        "blocks.13.project": LayerUpdate.full(160),
    }),
    "tiny": lambda: Selection({
        "blocks.1.expand": LayerUpdate([1, 4, 9, 20], [0, 2], [0, 3, 7]),
        "blocks.1.depthwise": LayerUpdate.channels([0, 5, 23]),
        "blocks.1.project": LayerUpdate.bias_only(8),
        "blocks.2.expand": LayerUpdate.full(24),
        "blocks.2.project": LayerUpdate.full(8),
    }),
}


def lively_small_net() -> Network:
    """A small random net with weights large enough that few channels are dead and 9-24% of the
    ReLU6 inputs of its blocks exceed 6 (the default small_net leaves most channels dead)."""
    arch = small_arch()
    return Network(arch, random_arrays(arch, seed=3, scale=1.5))


@pytest.fixture(scope="module")
def train_setup():
    """(network, 8 input images): MCUNet on real images when the shared folder is there, else
    a small random network on random images, so the training checks always run."""
    if have_shared("checkpoints", "mcunet-5fps.pkl"):
        net = load(ensure_converted("mcunet-5fps"))
    else:
        net = lively_small_net()
    if all(have_shared("data", name) for name in DATASETS):
        x = episode_images(net.resolution)
    else:
        x = np.random.default_rng(1).uniform(-1, 1, (8, 3, net.resolution, net.resolution)).astype(np.float32)
    return net, x


def trained_param_names(selection: Selection) -> list[str]:
    names = []
    for layer, upd in selection.layers.items():
        if upd.trains_weight:
            names.append(f"{layer}.weight")
        if upd.trains_bias:
            names.append(f"{layer}.bias")
    return names


def selection_masks(net: Network, selection: Selection) -> dict[str, np.ndarray]:
    """Per trained torch parameter, 1 on the entries the selection trains, 0 elsewhere."""
    masks = {}
    for layer, upd in selection.layers.items():
        w, b = net.params[layer]
        if upd.trains_weight:
            m = np.zeros(w.shape, np.float32)
            if upd.inputs is None:
                m[upd.weight] = 1
            else:
                m[np.ix_(upd.weight, upd.inputs)] = 1
            masks[f"{layer}.weight"] = m
        if upd.trains_bias:
            m = np.zeros(b.shape, np.float32)
            m[upd.bias] = 1
            masks[f"{layer}.bias"] = m
    return masks


def compact(full: np.ndarray, upd: LayerUpdate, part: str) -> np.ndarray:
    """The entries of a full weight/bias tensor that microtrain's compact gradient holds."""
    if part == "bias":
        return full[upd.bias]
    return full[upd.weight] if upd.inputs is None else full[np.ix_(upd.weight, upd.inputs)]


# ---------------------------------------------------------------------------------------------
# Inference: the shared backbones
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_embeddings_match_torch(name, real_images):
    need_shared("checkpoints", f"{name}.pkl")
    net = load(ensure_converted(name))
    x = real_images
    got = net.features(x, batch_size=5)  # 5 + a padded chunk of 3
    model = build_torch_model(net.arch, net.state())
    with torch.no_grad():
        ref = model.features(tensor(x)).numpy()
    rel = max_rel(got, ref)
    cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    report(f"embeddings {name}", max_abs=np.abs(got - ref).max(), scale=np.abs(ref).max(), rel=rel,
           one_minus_cos=1 - cos.min())
    assert got.shape == ref.shape == (len(x), net.embedding_size)
    # float32 rounding through 42-60 layers: measured rel 1.6e-6 .. 4e-6 (it depends on torch's
    # thread count), 1 - cos <= 1.2e-7.
    assert rel < 1e-4
    assert 1 - cos.min() < 1e-5
    # the embeddings carry signal (not a degenerate all-zero or constant map)
    assert np.abs(ref).max() > 0.1 and np.std(ref, axis=0).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# A float zoo checkpoint with BatchNorm, converted, against the live torch network
# ---------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU6: one layer of the zoo's networks."""

    def __init__(self, cin, cout, kernel, stride, groups, eps, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu6(y) if self.act else y


class ZooMBConv(nn.Module):
    def __init__(self, c: dict, eps: float):
        super().__init__()
        cin, cout, k = c["in_channels"], c["out_channels"], c["kernel_size"]
        hidden = cin if c["expand_ratio"] == 1 else (c["mid_channels"] or round(cin * c["expand_ratio"]))
        self.inverted_bottleneck = None if c["expand_ratio"] == 1 else ConvBN(cin, hidden, 1, 1, 1, eps, True)
        self.depth_conv = ConvBN(hidden, hidden, k, c["stride"], hidden, eps, True)
        self.point_linear = ConvBN(hidden, cout, 1, 1, 1, eps, False)

    def forward(self, x):
        h = x if self.inverted_bottleneck is None else self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(h))


class ZooBlock(nn.Module):
    def __init__(self, cfg: dict, eps: float):
        super().__init__()
        self.key = "mobile_inverted_conv" if "mobile_inverted_conv" in cfg else "conv"
        self.add_module(self.key, ZooMBConv(cfg[self.key], eps))
        self.residual = cfg.get("shortcut") is not None

    def forward(self, x):
        y = getattr(self, self.key)(x)
        return x + y if self.residual else y


class ZooNet(nn.Module):
    """A network of the MCUNet model zoo / tiny-training key layout, from its net-config JSON."""

    def __init__(self, config: dict):
        super().__init__()
        eps = config.get("bn", {}).get("eps", 1e-3)  # the zoo's default when the config names none
        fc = config["first_conv"]
        self.first_conv = ConvBN(fc["in_channels"], fc["out_channels"], fc["kernel_size"], fc["stride"], 1, eps,
                                 True)
        self.blocks = nn.ModuleList(ZooBlock(b, eps) for b in config["blocks"])
        mix = config.get("feature_mix_layer")
        self.feature_mix_layer = (None if mix is None
                                  else ConvBN(mix["in_channels"], mix["out_channels"], 1, 1, 1, eps, True))
        cls = config["classifier"]
        self.classifier = nn.Module()
        self.classifier.linear = nn.Linear(cls["in_features"], cls["out_features"])

    def features(self, x):
        h = self.first_conv(x)
        for block in self.blocks:
            h = block(h)
        if self.feature_mix_layer is not None:
            h = self.feature_mix_layer(h)
        return h.mean(dim=(2, 3))


@pytest.mark.parametrize("stem", ["tiny_zoo", "tiny_tt"])
def test_converted_batchnorm_checkpoint_matches_live_torch_model(stem):
    config = json.loads((FIXTURES / f"{stem}.json").read_text())
    live = ZooNet(config)
    live.load_state_dict(torch.load(FIXTURES / f"{stem}_sd.pt", weights_only=True), strict=True)
    live.eval()
    assert not any(m.training for m in live.modules())
    r = config["resolution"]
    x = np.concatenate([np.load(FIXTURES / "input.npy"),  # the fixture's 2 inputs + 6 more in [-1, 1]
                        np.random.default_rng(5).uniform(-1, 1, (6, 3, r, r)).astype(np.float32)])
    with torch.no_grad():
        ref = live.features(tensor(x)).numpy()
        exact = live.double().features(torch.tensor(x, dtype=torch.float64)).numpy()  # the arbiter
    # the live model is the network the fixture was generated from: same outputs as stored
    stored = np.load(FIXTURES / f"{stem}_features.npy")
    assert max_rel(ref[:2], stored) < 1e-6

    arch, arrays = read_checkpoint(FIXTURES / f"{stem}_wrapped.pt", config=FIXTURES / f"{stem}.json")
    got = Network(arch, arrays).features(x)
    with torch.no_grad():  # the folded weights in torch too: conversion and engine separately
        folded = build_torch_model(arch, arrays).features(tensor(x)).numpy()
    rel = max_rel(got, ref)
    report(f"zoo checkpoint {stem}", max_abs=np.abs(got - ref).max(), scale=np.abs(ref).max(), rel=rel,
           rel_to_float64=max_rel(got, exact), torch_bn_float32_to_float64=max_rel(ref, exact),
           torch_folded_rel=max_rel(folded, ref))
    # 6-10 small layers (sums of <= 75 terms), plus one more rounding per weight for the folding
    # (W gamma / sqrt(var + eps)); BN channel 0 has a variance comparable to eps, which scales it
    # by ~30 at every layer. Measured rel <= 2.7e-6 against torch float32 (itself 2.2e-6 from
    # float64), <= 1.1e-6 against float64, 8.7e-7 for the folded weights in torch.
    assert rel < 3e-5
    assert max_rel(got, exact) < 3e-5
    assert max_rel(folded, ref) < 3e-5
    assert np.abs(ref).max() > 0.1


# ---------------------------------------------------------------------------------------------
# Training. ReLU6's derivative jumps at 0 and 6: a pre-activation within float32 rounding of a
# bound lets the gradient through in one engine and not in the other, and everything upstream of
# that element inherits the difference. On MCUNet at 128x128 this happens about once per image
# (torch float32 vs float64), and merely running torch on 1 instead of 2 threads moved one
# gradient of the step below by 6e-4 of its scale. Two float32 engines compared directly then
# measure where that coin fell, not the engine. So the training references are torch in float64
# with every ReLU6 forced onto microtrain's branch (its own float32 pre-activations, read from an
# executor that observes the conv outputs of the same forward): what remains is rounding, and
# the tolerances can be tight and stay so on any machine. How many elements had to be forced,
# and the plain torch float32 comparison, are reported.
# ---------------------------------------------------------------------------------------------


class EngineObserver:
    """microtrain's pre-activations (conv outputs before ReLU6) of the fine-tuning graph."""

    def __init__(self, net: Network, batch: int, ways: int, scale: float):
        self.names = [layer.name for layer in net.layers if layer.relu6]
        self.run = Executor(net.protonet_graph(batch, ways, scale), observe=self.names)

    def __call__(self, x, protos, labels) -> tuple[float, dict[str, np.ndarray]]:
        loss = self.run.forward({"image": x, "prototypes": protos, "labels": labels})
        return loss, {name: self.run.value(name).copy() for name in self.names}


class _Straight(torch.autograd.Function):
    """Forward: the given value; backward: the gradient passes unchanged to ``out``."""

    @staticmethod
    def forward(ctx, out, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class EngineBranches:
    """Forward hooks making each ReLU6 of a torch model take microtrain's branch: where
    microtrain's pre-activation is inside (0, 6) torch's value is clamped strictly inside,
    elsewhere it becomes -1 or 7 (ReLU6 gives 0 or 6 and no gradient); the gradient reaches the
    conv output unchanged. Values change only where the two engines disagree, by rounding.
    ``names``: the layers followed by ReLU6 (e.g. the keys of an observer's dict); ``preacts``
    is set before each forward; ``forced`` counts the elements where torch's own decision
    differed."""

    def __init__(self, model, names):
        self.names, self.preacts, self.forced = set(names), {}, 0
        convs = model.conv_layers()
        self.handles = [convs[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name):
        def hook(module, inputs, out):
            ref = torch.from_numpy(self.preacts[name])
            assert ref.shape == out.shape, (name, ref.shape, out.shape)
            inside = (ref > 0) & (ref < 6)
            self.forced += int((inside != ((out > 0) & (out < 6))).sum())
            six = torch.tensor(6.0, dtype=out.dtype)
            kept = out.detach().clamp(torch.finfo(out.dtype).tiny, torch.nextafter(six, six - 1))
            value = torch.where(inside, kept, torch.where(ref <= 0, -1.0, 7.0).to(out.dtype))
            return _Straight.apply(out, value)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def f64(a) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(a, np.float64))


def test_training_step_gradients_match_torch(train_setup):
    net, images = train_setup
    selection = SELECTIONS[net.name]()
    x, labels = images[[0, 5]], np.array([2, 0], np.int64)  # batch 2, one image of each dataset
    protos = random_prototypes(3, net.embedding_size, seed=11)

    graph = net.protonet_graph(2, len(protos), SCALE)
    run = Executor(graph, selection)
    loss = run.forward({"image": x, "prototypes": protos, "labels": labels})
    run.backward()
    observed_loss, preacts = EngineObserver(net, 2, len(protos), SCALE)(x, protos, labels)
    assert observed_loss == loss  # the observing executor ran the same forward

    names = trained_param_names(selection)
    model = build_torch_model(net.arch, net.state()).double()
    params = dict(zip(names, set_trainable(model, names)))
    with EngineBranches(model, preacts) as branches:
        branches.preacts = preacts
        ref_loss = prototype_loss(model.features(f64(x)), f64(protos), labels, SCALE)
        ref_loss.backward()
    model32 = build_torch_model(net.arch, net.state())  # plain torch float32, for the report
    params32 = dict(zip(names, set_trainable(model32, names)))
    prototype_loss(model32.features(tensor(x)), protos, labels, SCALE).backward()

    loss_diff = abs(loss - ref_loss.item())
    worst, worst32 = 0.0, 0.0
    for layer, upd in selection.layers.items():
        dw, db = run.grad(layer)
        for part, got in (("weight", dw), ("bias", db)):
            key = f"{layer}.{part}"
            if key not in params:
                assert got is None, f"{key} is frozen but has a gradient"
                continue
            ref = compact(params[key].grad.numpy(), upd, part)
            assert got.shape == ref.shape, key
            rel, rel32 = max_rel(got, ref), max_rel(got, compact(params32[key].grad.numpy(), upd, part))
            worst, worst32 = max(worst, rel), max(worst32, rel32)
            report(f"grad {key}", rel=rel, vs_plain_torch_float32=rel32, scale=np.abs(ref).max(),
                   size=got.size)
            # float32 rounding of forward and backward sums through up to 32 layers:
            # measured rel <= 2.1e-6 (MCUNet)
            assert rel < 1e-4, f"{key}: {rel:.3g}"
            assert np.abs(ref).max() > 0, f"{key}: torch's gradient is zero, the check is empty"
    report("training step", loss=loss, loss_diff=loss_diff, worst_grad_rel=worst,
           worst_vs_plain_torch_float32=worst32, relu6_forced=branches.forced)
    # the loss is O(1), from logits that carry the embedding's rounding: measured 2.2e-6
    assert loss_diff < 3e-5 * max(1.0, abs(loss))

    # The backward pass stops at the earliest trained layer: nothing before it needs a gradient
    # (and torch, with requires_grad on the trained parameters only, gave the same numbers).
    first = min(graph.node(layer).index for layer in selection.layers)
    needs = run.program.needs_grad
    assert not needs[graph.value("image").id]
    assert not any(needs[node.output] for node in graph.nodes[:first])
    assert all(needs[node.output] for node in graph.nodes[first:])


# ---------------------------------------------------------------------------------------------
# Fisher information (Eq. 2)
# ---------------------------------------------------------------------------------------------


def torch_fisher(model, x, labels, protos, scale, before_sample=None) -> dict[str, np.ndarray]:
    """Delta_o = 1/(2N) sum_n (sum_d a_nd g_nd)^2 for every conv output a (pre-activation), with
    g the gradient of sample n's OWN loss: one forward/backward per sample, hooks on the convs
    (ahead of any other hook). ``before_sample(n)`` runs before sample n's forward."""
    convs = model.conv_layers()
    outputs = {}

    def keep(name):
        def hook(module, inputs, out):
            out.retain_grad()
            outputs[name] = out
        return hook

    handles = [conv.register_forward_hook(keep(name), prepend=True) for name, conv in convs.items()]
    sums = {name: np.zeros(conv.out_channels) for name, conv in convs.items()}
    dtype = next(model.parameters()).dtype
    try:
        for n in range(len(x)):
            if before_sample is not None:
                before_sample(n)
            outputs.clear()
            model.zero_grad(set_to_none=True)
            z = model.features(torch.from_numpy(x[n:n + 1]).to(dtype))
            prototype_loss(z, torch.from_numpy(protos).to(dtype), labels[n:n + 1], scale).backward()
            assert set(outputs) == set(convs)
            for name, a in outputs.items():
                s = (a.detach().double() * a.grad.double()).sum(dim=(2, 3))  # (1, C)
                sums[name] += (s ** 2).sum(dim=0).numpy()
    finally:
        for h in handles:
            h.remove()
    return {name: s / (2 * len(x)) for name, s in sums.items()}


def engine_preacts_by_sample(net, x, labels, protos, scale, batch) -> list[dict[str, np.ndarray]]:
    """microtrain's pre-activations of each sample, computed in the chunks (and with the padding)
    that ``fisher_information`` uses."""
    observe = EngineObserver(net, batch, len(protos), scale)
    out = []
    for start in range(0, len(x), batch):
        valid = min(batch, len(x) - start)
        chunk = np.concatenate([x[start:start + valid]] + [x[start:start + 1]] * (batch - valid))
        y = np.concatenate([labels[start:start + valid], np.full(batch - valid, labels[start])])
        y = y.astype(np.int64)
        _, pre = observe(chunk, protos, y)
        out += [{name: a[i:i + 1] for name, a in pre.items()} for i in range(valid)]
    return out


@pytest.mark.parametrize("which", ["backbone", "tiny"])
def test_fisher_information_matches_torch_per_sample_losses(which, train_setup):
    if which == "backbone":  # MCUNet on real images (or the small net without the shared folder)
        net, images = train_setup
        x = images[:5]
    else:  # where few elements make float32 branch ambiguities unlikely, and ReLU6 saturates
        net = lively_small_net()
        x = np.random.default_rng(4).uniform(-1, 1, (5, 3, net.resolution, net.resolution)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0], np.int64)  # N = 5 at batch 2: chunks 2 + 2 + 1 padded
    protos = random_prototypes(3, net.embedding_size, seed=12)
    got = fisher_information(net, x, labels, protos, SCALE, batch=2)

    preacts = engine_preacts_by_sample(net, x, labels, protos, SCALE, batch=2)
    model = build_torch_model(net.arch, net.state()).double()
    with EngineBranches(model, preacts[0]) as branches:
        ref = torch_fisher(model, x, labels, protos, SCALE,
                           before_sample=lambda n: setattr(branches, "preacts", preacts[n]))
    plain32 = torch_fisher(build_torch_model(net.arch, net.state()), x, labels, protos, SCALE)

    assert list(got) == list(ref) == [layer.name for layer in net.layers]
    rels = {name: max_rel(got[name], ref[name]) for name in ref}
    pot = {name: abs(got[name].sum() - ref[name].sum()) / ref[name].sum() for name in ref}
    worst = max(rels, key=rels.get)
    report(f"fisher {net.name}", worst_layer_rel=rels[worst], worst_potential_rel=max(pot.values()),
           relu6_forced=branches.forced,
           vs_plain_torch_float32=max(max_rel(got[n], plain32[n]) for n in ref))
    print(f"[fisher {net.name}] worst layer {worst}")
    for name in ref:
        assert np.all(ref[name] >= 0) and ref[name].sum() > 0, f"{name}: empty Fisher information"
        # Delta squares sum_d a g, a sum over the map that partly cancels (|sum a g| is 1/5 to
        # 1/20 of sum |a g| in MCUNet's early layers), so float32 rounding of a and g shows up
        # amplified; the yardstick is the layer's largest channel. Measured <= 3.2e-6 per layer
        # and 6.6e-7 for the potentials on MCUNet, 4.5e-7 on the small net.
        assert rels[name] < 1e-4, f"{name}: Delta differs by {rels[name]:.3g} of its largest channel"
        assert pot[name] < 1e-4, f"{name}: potential differs by {pot[name]:.3g}"


# ---------------------------------------------------------------------------------------------
# SGD with momentum on a selection
# ---------------------------------------------------------------------------------------------


def test_sgd_momentum_steps_match_torch_optim(train_setup):
    base, images = train_setup
    selection = SELECTIONS[base.name]()
    protos = random_prototypes(3, base.embedding_size, seed=13)
    batches = [(images[[0, 4]], np.array([0, 1])), (images[[1, 5]], np.array([2, 0])),
               (images[[2, 6]], np.array([1, 2])), (images[[3, 7]], np.array([0, 2]))]
    lr, momentum = 0.05, 0.9

    net = base.copy()
    run = Executor(net.protonet_graph(2, len(protos), SCALE), selection, momentum=True)
    observe = EngineObserver(net, 2, len(protos), SCALE)  # shares net's arrays: sees each update
    opt = SGD(lr, momentum)
    losses, preacts = [], []
    for x, y in batches:
        observed_loss, pre = observe(x, protos, y.astype(np.int64))
        losses.append(run.forward({"image": x, "prototypes": protos, "labels": y.astype(np.int64)}))
        assert observed_loss == losses[-1]
        preacts.append(pre)
        run.backward()
        opt.step(run)

    model = build_torch_model(base.arch, base.state()).double()
    names = trained_param_names(selection)
    params = set_trainable(model, names)
    masks = {name: f64(m) for name, m in selection_masks(base, selection).items()}
    topt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    ref_losses = []
    with EngineBranches(model, preacts[0]) as branches:
        for (x, y), pre in zip(batches, preacts):
            branches.preacts = pre
            topt.zero_grad()
            loss = prototype_loss(model.features(f64(x)), f64(protos), y, SCALE)
            loss.backward()
            for name, p in zip(names, params):
                p.grad.mul_(masks[name])  # torch updates whole tensors: keep the selected entries
            topt.step()
            ref_losses.append(loss.item())

    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    report("sgd losses", first=losses[0], last=losses[-1], max_diff=loss_diff, relu6_forced=branches.forced)
    assert loss_diff < 3e-5  # the losses are O(1): measured 1.1e-6

    ref_state = {name: p.detach().numpy() for name, p in model.named_parameters()}
    trained = {name: m.astype(bool) for name, m in selection_masks(base, selection).items()}
    worst, worst_raw = 0.0, 0.0
    for layer in base.params:
        for part, k in (("weight", 0), ("bias", 1)):
            key, w0, w = f"{layer}.{part}", base.params[layer][k], net.params[layer][k]
            mask = trained.get(key, np.zeros(w0.shape, bool))
            # untouched entries are bit-identical, in both engines
            assert np.array_equal(w[~mask], w0[~mask]), key
            assert np.array_equal(ref_state[key][~mask], w0[~mask].astype(np.float64)), key
            if mask.any():
                step, ref_step = (w - w0.astype(np.float64))[mask], (ref_state[key] - w0)[mask]
                scale = np.abs(ref_step).max()
                assert scale > 1e-4 * np.abs(w0).max(), f"{key}: barely moved"
                # The change over 4 steps, against its own size (not the weights', which would
                # hide it), less the float32 storage of the weights: each step rounds the updated
                # weight to its float32 spacing (ulp), <= 4 ulps in all, which the float64 torch
                # weights do not; that dominates where weights are large and updates small (the
                # last biases: |b| up to 16, updates up to 5e-3, 1 ulp = 1e-6; raw rel 2.7e-4).
                # Measured beyond those ulps: rel <= 1.9e-6.
                ulp = np.spacing(np.abs(w0[mask]) + np.abs(ref_step).astype(np.float32))
                beyond = np.maximum(np.abs(step - ref_step) - 4 * ulp, 0)
                rel = beyond.max() / scale
                worst, worst_raw = max(worst, rel), max(worst_raw, np.abs(step - ref_step).max() / scale)
                assert rel < 1e-4, f"{key}: update differs by {rel:.3g} of its largest entry (beyond 4 ulps)"
    report("sgd updates", worst_rel_beyond_4ulp=worst, worst_rel_raw=worst_raw)
