"""TinyTL: the lite residual branch on every block, zero-initialised, trained with the biases only."""
from __future__ import annotations

import numpy as np
import pytest

from microtrain import memory
from microtrain.autograd import Executor, GraphError, Program
from microtrain.methods import Budgets, full_update, plan_method
from microtrain.model import Network
from microtrain.optim import SGD
from microtrain.selection import Selection
from microtrain.tinytrain import backward_macs
from microtrain.architecture import largest_group_count, lite_spec, make_divisible
from microtrain.lite_residual import LiteResidualHook
from microtrain.tinytl import plan_tinytl

from conftest import need_shared, random_arrays, small_arch, small_net

SCALE = 10.0


def _odd_net(seed=0) -> Network:
    """Maps 6 -> 3 (stride 2, pooled map already 3x3) -> 3 (odd: no pool) -> 2 (odd, stride 2: no
    pool) -> 1 (pool 2x2 to 1x1) -> 1 (1x1 map); odd and even channel counts."""
    blocks = [dict(expand=12, kernel=3, stride=2, out=6, residual=False),
              dict(expand=12, kernel=3, stride=1, out=5, residual=False),
              dict(expand=10, kernel=3, stride=2, out=5, residual=False),
              dict(expand=None, kernel=3, stride=2, out=6, residual=False),
              dict(expand=12, kernel=3, stride=1, out=6, residual=True)]
    arch = small_arch(resolution=12, blocks=blocks)
    return Network(arch, random_arrays(arch, seed))


def _images(n, resolution, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, resolution, resolution)).astype(np.float32)


def _feeds(net, batch, ways, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((ways, net.embedding_size)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    return {"image": _images(batch, net.resolution, seed), "prototypes": protos,
            "labels": rng.integers(0, ways, batch).astype(np.int64)}


# -- geometry ---------------------------------------------------------------------------------------


def test_channel_rounding_and_group_count():
    assert [make_divisible(c) for c in (3, 5, 8, 12, 16, 20, 40, 44, 100)] == [8, 8, 8, 16, 16, 24, 40, 48, 104]
    assert largest_group_count(2, 16, 16) == 2
    assert largest_group_count(2, 5, 8) == 1  # an odd input channel count: one group
    assert largest_group_count(3, 6, 8) == 2  # 3 does not divide 8: the next count down that divides both
    assert largest_group_count(4, 12, 16) == 4


@pytest.mark.parametrize("in_size,stride,want", [
    # (pool, conv stride, upsample, conv output side, kernel)
    (64, 1, (2, 1, 2, 32, 5)),   # the published module: pool 2, conv, upsample 2
    (64, 2, (2, 2, 2, 16, 5)),   # stride-2 block: pool 2, conv at stride 2, upsample 2 (published)
    (6, 2, (2, 1, 1, 3, 3)),     # pooled 3x3 is already the output: conv at stride 1, no upsample
    (8, 1, (2, 1, 2, 4, 3)),     # kernel shrinks to the 4x4 pooled map
    (4, 1, (2, 1, 2, 2, 1)),     # 2x2 pooled map: 1x1 kernel (published rule)
    (3, 1, (1, 1, 1, 3, 3)),     # odd map: no pool
    (3, 2, (1, 2, 1, 2, 3)),     # odd map, stride 2: no pool, conv at stride 2
    (1, 1, (1, 1, 1, 1, 1)),     # 1x1 map
])
def test_branch_geometry(in_size, stride, want):
    out_size = (in_size - 1) // stride + 1
    s = lite_spec(0, 16, 24, in_size, out_size, stride)
    assert (s.pool, s.stride, s.upsample, s.conv_size, s.kernel) == want
    assert s.conv_size * s.upsample == out_size
    assert (s.mid_channels, s.groups) == (16, 2)


# -- the hooked graph -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [small_net, _odd_net])
def test_graph_has_a_branch_per_block_with_the_right_shapes(make):
    net = make()
    plan = plan_tinytl(net, seed=0)
    hook = plan.block_hook
    g = net.protonet_graph(2, 3, SCALE, hook)
    names = {n.name for n in g.nodes}
    for b, block in enumerate(net.arch["blocks"]):
        s = hook.specs[b]
        conv, project = g.node(f"blocks.{b}.lite.conv"), g.node(f"blocks.{b}.lite.project")
        assert conv.weight.shape == (s.mid_channels, s.in_channels // s.groups, s.kernel, s.kernel)
        assert conv.op.groups == s.groups and conv.op.stride == s.stride
        assert g.values[conv.output].shape == (2, s.mid_channels, s.conv_size, s.conv_size)
        assert g.values[project.output].shape == (2, s.out_channels, s.conv_size, s.conv_size)
        assert (f"blocks.{b}.lite.pool" in names) == (s.pool > 1)
        assert (f"blocks.{b}.lite.upsample" in names) == (s.upsample > 1)
        assert f"blocks.{b}.lite.relu6" in names
        # The branch starts at the block input and ends in a new add with the block output.
        first = g.node(f"blocks.{b}.lite.pool") if s.pool > 1 else conv
        src = g.values[first.inputs[0]]
        assert src.shape == (2, s.in_channels, s.in_size, s.in_size)
        add = g.node(f"blocks.{b}.lite.add")
        main = g.values[add.inputs[0]]
        assert g.values[add.output].shape == main.shape == (2, s.out_channels, s.out_size, s.out_size)
        expected_main = f"blocks.{b}.add" if block.get("residual") else f"blocks.{b}.project"
        assert main.name == expected_main  # the backbone's own residual add stays
    # the first branch of small_net: stride 1 on 8x8; the second: stride 2, 8 -> 4
    if make is small_net:
        assert [(s.pool, s.stride, s.upsample) for s in hook.specs.values()] == [(2, 1, 2), (2, 2, 2), (2, 1, 2)]
    else:
        assert [(s.pool, s.stride, s.upsample, s.in_size, s.out_size, s.groups) for s in hook.specs.values()] == [
            (2, 1, 1, 6, 3, 2), (1, 1, 1, 3, 3, 2), (1, 2, 1, 3, 2, 1), (2, 2, 1, 2, 1, 1), (1, 1, 1, 1, 1, 2)]


def test_hook_refuses_another_network():
    hook = plan_tinytl(small_net(), seed=0).block_hook
    other = small_net(resolution=32)
    with pytest.raises(GraphError, match="blocks.0.lite"):
        other.features_graph(1, hook)


@pytest.mark.parametrize("make", [small_net, _odd_net])
def test_zero_projection_leaves_the_network_unchanged(make):
    net = make()
    plan = plan_tinytl(net, seed=3)
    x = _images(5, net.resolution)
    plain = net.features(x, batch_size=4)
    hooked = net.features(x, batch_size=4, block_hook=plan.block_hook)
    np.testing.assert_array_equal(hooked, plain)  # bit for bit: the branch adds exact zeros
    # ... and the branch is really there: a non-zero projection changes the features.
    w, _ = plan.block_hook.params["blocks.1.lite.project"]
    w[...] = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    assert not np.allclose(net.features(x, batch_size=4, block_hook=plan.block_hook), plain)


def test_parameters_are_reproducible_from_the_seed():
    net = small_net()
    a, b, c = (plan_tinytl(net, seed=s).block_hook for s in (1, 1, 2))
    for name in a.params:
        for x, y, z in zip(a.params[name], b.params[name], c.params[name]):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == np.float32 and x.flags.c_contiguous
        if name.endswith("project"):
            assert not a.params[name][0].any() and not a.params[name][1].any()
        else:
            assert not np.array_equal(a.params[name][0], c.params[name][0])


# -- training -------------------------------------------------------------------------------------


def test_training_changes_only_lite_parameters_and_biases():
    net = small_net()
    plan = plan_tinytl(net, seed=0)
    hook = plan.block_hook
    x = _images(3, net.resolution, seed=5)
    before_features = net.features(x, batch_size=2, block_hook=hook)  # caches a feature executor
    weights = {n: w.copy() for n, (w, _) in net.params.items()}
    biases = {n: b.copy() for n, (_, b) in net.params.items()}
    lite = {n: (w.copy(), b.copy()) for n, (w, b) in hook.params.items()}
    run = Executor(net.protonet_graph(2, 3, SCALE, hook), plan.selection, momentum=True)
    opt = SGD(0.05, 0.9)
    for step in range(3):
        run.forward(_feeds(net, 2, 3, seed=step))
        run.backward()
        opt.step(run)
        if step == 0:  # the projection starts at zero, so the group convs get no gradient yet
            for s in hook.specs.values():
                np.testing.assert_array_equal(hook.params[s.conv_name][0], lite[s.conv_name][0])
    for name in net.params:
        np.testing.assert_array_equal(net.params[name][0], weights[name])  # backbone weights frozen
    changed_bias = [n for n in net.params if not np.array_equal(net.params[n][1], biases[n])]
    assert len(changed_bias) == len(net.params)
    for name, (w, b) in hook.params.items():
        assert not np.array_equal(w, lite[name][0]), name
        assert not np.array_equal(b, lite[name][1]), name
    # The cached feature executor reads the same (updated) arrays as a freshly built graph.
    after_cached = net.features(x, batch_size=2, block_hook=hook)
    assert len([k for k in net._feature_runs if k[1] is hook]) == 1
    fresh = Executor(net.features_graph(3, hook))
    np.testing.assert_array_equal(after_cached, fresh.forward({"image": x}, train=False))
    assert not np.allclose(after_cached, before_features)


def test_lite_gradients_match_finite_differences():
    """<grad, v> from backward vs (L(p + eps v) - L(p - eps v)) / (2 eps) on the float32 engine,
    for a random unit direction v over each trained tensor (both lite layers of every block, two
    backbone biases behind them). eps = 1e-3: float32 rounding of a loss near 3 (about 1e-6 after
    a forward) costs up to ~5e-4 in the quotient; a larger eps lets some ReLU6 inputs cross their
    kinks (at 1e-2 a bias check is off by 4%). Tolerance 5e-4 + 1% of the derivative."""
    net = small_net(seed=1)
    plan = plan_tinytl(net, seed=1)
    hook = plan.block_hook
    rng = np.random.default_rng(7)
    for name, (w, b) in hook.params.items():  # make every lite layer active, so gradients flow
        if name.endswith("project"):
            w[...] = (rng.standard_normal(w.shape) * 0.3).astype(np.float32)
            b[...] = (rng.standard_normal(b.shape) * 0.1).astype(np.float32)
    feeds = _feeds(net, 2, 3, seed=11)
    run = Executor(net.protonet_graph(2, 3, SCALE, hook), plan.selection)
    run.forward(feeds)
    run.backward()
    tensors = [(n, "weight") for n in hook.layer_names] + [(n, "bias") for n in hook.layer_names]
    tensors += [("blocks.0.depthwise", "bias"), ("first_conv", "bias")]
    # Copied now: the next forward may plan over the gradient buffers (they live until the optimizer).
    grads = {(n, p): run.grad(n)[0 if p == "weight" else 1].astype(np.float64) for n, p in tensors}
    checked = 0
    for name, part in tensors:
        node = run.graph.node(name)
        param = node.weight if part == "weight" else node.bias
        grad = grads[name, part].reshape(param.shape)
        v = rng.standard_normal(param.shape)
        v /= np.linalg.norm(v)
        eps = 1e-3
        base = param.copy()
        losses = []
        for sign in (+1, -1):
            param[...] = (base + sign * eps * v).astype(np.float32)
            losses.append(run.forward(feeds, train=False))
        param[...] = base
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(np.sum(grad * v))
        assert abs(analytic - numeric) <= 5e-4 + 1e-2 * abs(numeric), (name, part, analytic, numeric)
        checked += abs(numeric) > 1e-3
    assert checked >= len(tensors) - 2  # the directions were not all trivially flat


def test_backward_macs_count_the_lite_layers_too():
    net = small_net()
    plan = plan_tinytl(net)
    biases = Selection({n: u for n, u in plan.selection.layers.items() if ".lite." not in n})
    plain = Program(net.protonet_graph(1, 3, SCALE), biases)
    with_lite = Program(net.protonet_graph(1, 3, SCALE, plan.block_hook), plan.selection)
    lite_macs = sum(s.macs for s in plan.block_hook.specs.values())
    # every lite layer: weight gradient, plus input gradient (the block inputs need one: biases before)
    assert backward_macs(with_lite) == backward_macs(plain) + 2 * lite_macs
    assert plan.info["backward_macs_with_lite"] == backward_macs(with_lite)


# -- the method ------------------------------------------------------------------------------------


def test_plan_method_tinytl():
    net = small_net()
    rng = np.random.default_rng(0)
    support = rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int64)
    plan = plan_method("tinytl", net, support, labels, Budgets(512 * 1024, 10 ** 6), SCALE, True, seed=0)
    assert plan.method == "tinytl" and plan.trains and isinstance(plan.block_hook, LiteResidualHook)
    assert hash(plan.block_hook) == hash(plan.block_hook)
    sel = plan.selection
    for layer in net.layers:
        upd = sel.get(layer.name)
        assert not upd.trains_weight and list(upd.bias) == list(range(layer.out_channels))
    hook = plan.block_hook
    assert [c[0] for c in plan.choices] == hook.layer_names
    for name, kept, total, score in plan.choices:
        assert sel.get(name).covers_all(total) and kept == total and np.isnan(score)
    assert len(plan.choices) == 2 * len(net.arch["blocks"])
    assert plan.info["bias_params"] == sum(layer.out_channels for layer in net.layers)
    assert plan.info["lite_params"] == sum(w.size + b.size for w, b in hook.params.values())
    # The fine-tuning loop runs it end to end.
    from microtrain.train import FinetuneConfig, finetune
    result = finetune(net, sel, support, labels, FinetuneConfig(epochs=1, batch=2, lr=1e-2), block_hook=hook)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert any(w.any() for name, (w, _) in hook.params.items() if name.endswith("project"))


def test_mcunet_backward_memory():
    need_shared("checkpoints", "mcunet-5fps.pkl")
    import microtrain.model
    from microtrain.checkpoint import ensure_converted

    net = microtrain.model.load(ensure_converted("mcunet-5fps"))
    plan = plan_tinytl(net, seed=0)
    rows = {}
    for batch in (1, 100):
        program = Program(net.protonet_graph(batch, 10, SCALE, plan.block_hook), plan.selection, momentum=True)
        rows[batch] = program.plan
        print(f"\nTinyTL on MCUNet-5fps, batch {batch}:\n{program.plan.table()}")
    full = Program(net.protonet_graph(100, 10, SCALE), full_update(net, [l.name for l in net.layers]), True).plan
    print(f"FullTrain at batch 100: backward memory {full.backward_bytes / 2 ** 20:.1f} MiB")
    print(f"lite parameters {plan.info['lite_params']}, trained biases {plan.info['bias_params']}, "
          f"backward MACs {plan.info['backward_macs_with_lite'] / 1e6:.2f}M (forward {net.forward_macs / 1e6:.2f}M)")
    assert len(plan.block_hook.specs) == len(net.arch["blocks"]) == 14
    # Far beyond TinyTrain's 512 KB at batch 1 already; the saved activations grow with the batch.
    assert rows[1].backward_bytes > 3 * 512 * 1024
    assert rows[100].category_bytes(memory.SAVED) > 90 * rows[1].category_bytes(memory.SAVED)
    assert rows[100].backward_bytes < full.backward_bytes


def test_adapted_network_saves_and_reloads_its_branches(tmp_path):
    """A TinyTL-adapted network is backbone + trained branches: adapt_episode attaches them, the
    weight file holds them (arch ``lite_residual`` + ``blocks.{b}.lite.*`` arrays), and ``load``
    rebuilds the same embeddings; a file missing a branch array is refused."""
    from microtrain.checkpoint import CheckpointError, load_weights, save_weights
    from microtrain.model import load
    from microtrain.pipeline import adapt_episode
    from microtrain.train import FinetuneConfig

    arch = {**small_arch(), "source": {"file": "test", "sha256": "0" * 64, "kind": "int8-dict"}}
    net = Network(arch, random_arrays(arch, 0))
    rng = np.random.default_rng(1)
    support = rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int64)
    adapt_episode(net, support, labels, support, labels, "tinytl", Budgets(512 * 1024, 10 ** 6),
                  FinetuneConfig(epochs=2, batch=2, lr=1e-2))
    assert isinstance(net.block_hook, LiteResidualHook) and "lite_residual" in net.arch
    assert any(w.any() for name, (w, _) in net.block_hook.params.items() if name.endswith("project"))
    x = _images(3, net.resolution, seed=2)
    path = save_weights(tmp_path / "adapted.npz", net.arch, net.state())
    back = load(path)
    assert back.block_hook is not None and back.block_hook.layer_names == net.block_hook.layer_names
    assert np.array_equal(back.features(x), net.features(x))
    plain = Network(arch, {k: v for k, v in net.state().items() if ".lite." not in k})
    assert not np.allclose(plain.features(x), net.features(x))  # the branches do matter
    with pytest.raises(GraphError, match="already carries TinyTL branches"):
        plan_tinytl(back)
    from microtrain.summary import summarize
    lite = summarize(*load_weights(path))["lite_residual"]
    assert lite["branches"] == len(arch["blocks"]) and lite["params"] == net.block_hook.param_count
    _, arrays = load_weights(path)
    arrays.pop("blocks.1.lite.conv.bias")
    with pytest.raises(CheckpointError, match="missing key 'blocks.1.lite.conv.bias'"):
        save_weights(tmp_path / "broken.npz", net.arch, arrays)
