"""The tape: gradients of composed graphs against finite differences, channel-masked backward,
SGD on selected rows only, and clear errors for bad graphs and inputs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain.autograd import Executor, Graph, GraphError
from microtrain.kernels import reference as ref
from microtrain.model import Network
from microtrain.optim import SGD
from microtrain.selection import LayerUpdate, Selection

from conftest import archs, random_arrays, selections, small_net

SCALE = 10.0


def _unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _block_graph(p, x_shape, ways, stride):
    """expand 1x1 -> ReLU6 -> depthwise -> ReLU6 -> project 1x1 (+ residual) -> prototype head."""
    g = Graph()
    x = g.input("x", x_shape)
    h = g.relu6(g.pointwise(x, p["e.w"], p["e.b"], name="expand"))
    h = g.relu6(g.depthwise(h, p["d.w"], p["d.b"], stride=stride, name="depthwise"))
    h = g.pointwise(h, p["p.w"], p["p.b"], name="project")
    if stride == 1:
        h = g.add(h, x, name="residual")
    z = g.l2_normalize(g.global_avg_pool(h))
    logits = g.cosine_logits(z, g.input("protos", (ways, x_shape[1])), SCALE)
    g.cross_entropy(logits, g.input("labels", (x_shape[0],), np.int64))
    return g


def _block_loss64(p, x, protos, labels, stride):
    """The same block and head in float64 with the NumPy twins."""
    h = ref.relu6_forward(ref.pointwise_forward(x, p["e.w"], p["e.b"]))
    h = ref.relu6_forward(ref.depthwise_forward(h, p["d.w"], p["d.b"], stride))
    h = ref.pointwise_forward(h, p["p.w"], p["p.b"])
    if stride == 1:
        h = h + x
    z, _ = ref.l2_normalize_forward(ref.global_avg_pool_forward(h))
    return ref.softmax_cross_entropy_forward(ref.cosine_logits_forward(z, protos, SCALE), labels)[1]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(2, 6), hidden=st.integers(1, 12), size=st.integers(1, 9),
       k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), ways=st.integers(2, 4),
       seed=st.integers(0, 2**31))
def test_inverted_residual_block_gradients_match_central_differences(n, c, hidden, size, k, stride, ways, seed):
    # (c >= 2: a 1-d embedding is constant after L2 normalisation, its gradient pure round-off.)
    # The float32 engine's gradient of every parameter and the float64 finite difference of the
    # twin's loss along one random direction v: <v, grad> vs (L(p + eps v) - L(p - eps v)) / 2 eps.
    rng = np.random.default_rng(seed)
    shapes = {"e.w": (hidden, c, 1, 1), "e.b": (hidden,), "d.w": (hidden, 1, k, k), "d.b": (hidden,),
              "p.w": (c, hidden, 1, 1), "p.b": (c,)}
    p = {name: (rng.standard_normal(s) * 0.7).astype(np.float32) for name, s in shapes.items()}
    x = (rng.standard_normal((n, c, size, size)) * 2).astype(np.float32)
    protos = _unit_rows(rng.standard_normal((ways, c))).astype(np.float32)
    labels = rng.integers(0, ways, n).astype(np.int64)

    graph = _block_graph(p, x.shape, ways, stride)
    run = Executor(graph, Selection({name: LayerUpdate.full(p[f"{name[0]}.b"].shape[0])
                                     for name in ("expand", "depthwise", "project")}))
    run.forward({"x": x, "protos": protos, "labels": labels})
    run.backward()
    grads = {}
    for layer in ("expand", "depthwise", "project"):
        grads[f"{layer[0]}.w"], grads[f"{layer[0]}.b"] = run.grad(layer)

    v = {name: rng.standard_normal(s) for name, s in shapes.items()}
    analytic = sum(float(np.sum(v[name] * grads[name])) for name in shapes)
    p64 = {name: a.astype(np.float64) for name, a in p.items()}
    eps = 1e-6
    shifted = lambda sign: _block_loss64({k_: p64[k_] + sign * eps * v[k_] for k_ in p64},  # noqa: E731
                                         x.astype(np.float64), protos.astype(np.float64), labels, stride)
    numeric = (shifted(+1) - shifted(-1)) / (2 * eps)
    # float32 forward/backward against a float64 difference: relative error ~1e-5 per op, a few
    # dozen ops deep; 1e-3 of the gradient's scale (|v| |g|) leaves room for that and nothing more.
    scale = np.sqrt(sum(np.sum(v[k_] ** 2) for k_ in v)) * np.sqrt(sum(np.sum(g_ ** 2) for g_ in grads.values()))
    assert abs(analytic - numeric) <= 1e-3 * scale + 1e-6, (analytic, numeric)


def test_value_used_twice_sums_its_gradients():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 1, 1))).astype(np.float32)
    b = np.zeros(4, np.float32)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    protos = _unit_rows(rng.standard_normal((3, 4))).astype(np.float32)
    labels = np.array([0, 2])

    def build(twice):
        g = Graph()
        h = g.pointwise(g.input("x", x.shape), w, b, name="pw")
        h = g.add(h, h) if twice else h
        z = g.l2_normalize(g.global_avg_pool(h))
        g.cross_entropy(g.cosine_logits(z, g.input("p", protos.shape), SCALE), g.input("y", (2,), np.int64))
        return g

    feeds = {"x": x, "p": protos, "y": labels}
    # h + h only scales the embedding, which the L2 normalisation removes, so the gradient of the
    # layer is the same as without the add only if both uses are summed (each use gets half).
    once = Executor(build(False), Selection({"pw": LayerUpdate.full(4)}))
    twice = Executor(build(True), Selection({"pw": LayerUpdate.full(4)}))
    for run in (once, twice):
        run.forward(feeds)
        run.backward()
    np.testing.assert_allclose(twice.grad("pw")[0], once.grad("pw")[0], rtol=1e-5, atol=1e-7)


def _feeds(net: Network, batch: int, ways: int, seed: int):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (batch, 3, net.resolution, net.resolution)).astype(np.float32),
            "prototypes": _unit_rows(rng.standard_normal((ways, net.embedding_size))).astype(np.float32),
            "labels": rng.integers(0, ways, batch).astype(np.int64)}


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_masked_gradients_are_the_selected_rows_of_the_full_gradient(data):
    arch = data.draw(archs())
    selection = data.draw(selections(arch))
    net = Network(arch, random_arrays(arch, seed=data.draw(st.integers(0, 100))))
    feeds = _feeds(net, 2, 3, seed=1)
    graph = net.protonet_graph(2, 3, SCALE)
    full = Executor(graph, Selection({layer.name: LayerUpdate.full(layer.out_channels) for layer in net.layers}))
    part = Executor(net.protonet_graph(2, 3, SCALE), selection)
    for run in (full, part):
        run.forward(feeds)
        run.backward()
    for name, upd in selection.layers.items():
        dw_full, db_full = full.grad(name)
        dw, db = part.grad(name)
        if upd.trains_weight:
            rows = upd.weight if upd.inputs is None else np.ix_(upd.weight, upd.inputs)
            np.testing.assert_array_equal(dw, dw_full[rows])
        else:
            assert dw is None
        if upd.trains_bias:
            np.testing.assert_array_equal(db, db_full[upd.bias])


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-4)])
def test_sgd_touches_only_selected_rows(momentum, weight_decay):
    net = small_net()
    before = {k: v.copy() for k, v in net.state().items()}
    chosen = {"blocks.2.depthwise": LayerUpdate.channels([1, 5, 7]),
              "blocks.2.expand": LayerUpdate(np.array([2, 4]), None, np.array([0, 6])),
              "blocks.1.project": LayerUpdate(np.array([0, 3]), None),
              "first_conv": LayerUpdate.bias_only(8)}
    run = Executor(net.protonet_graph(1, 3, SCALE), Selection(chosen), momentum=momentum > 0)
    opt = SGD(0.5, momentum, weight_decay)
    for step in range(2):
        run.forward(_feeds(net, 1, 3, seed=step))
        run.backward()
        opt.step(run)
    after = net.state()
    for name, upd in chosen.items():
        for part, rows in (("weight", upd.weight), ("bias", upd.bias)):
            key = f"{name}.{part}"
            frozen = np.ones(before[key].shape[:2] if part == "weight" else before[key].shape, bool)
            if rows is not None:
                rows = rows if part == "bias" or upd.inputs is None else np.ix_(rows, upd.inputs)
                frozen[rows] = False
                assert not np.array_equal(after[key][rows], before[key][rows]), key
            np.testing.assert_array_equal(after[key][frozen], before[key][frozen])
    for key in before:
        if key.rsplit(".", 1)[0] not in chosen:
            np.testing.assert_array_equal(after[key], before[key])


def test_frozen_layers_get_no_gradient_and_arena_is_the_plan():
    net = small_net()
    run = Executor(net.protonet_graph(1, 3, SCALE), Selection({"blocks.2.project": LayerUpdate.full(8)}))
    run.forward(_feeds(net, 1, 3, seed=0))
    run.backward()
    assert run.grad("blocks.0.depthwise") == (None, None)
    assert run.arena.nbytes == run.plan.arena_bytes


def test_bad_graphs_and_inputs_name_what_is_wrong():
    net = small_net()
    graph = net.protonet_graph(1, 3, SCALE)
    with pytest.raises(GraphError, match="no layer named 'blocks.9.expand'"):
        Executor(graph, Selection({"blocks.9.expand": LayerUpdate.full(3)}))
    with pytest.raises(GraphError, match="out of range"):
        Executor(graph, Selection({"blocks.2.project": LayerUpdate.channels([8])}))
    run = Executor(graph)
    with pytest.raises(GraphError, match="input 'image' must be float32"):
        run.forward({"image": np.zeros((1, 3, 4, 4), np.float32)})
    g = Graph()
    x = g.input("x", (1, 3, 4, 4))
    with pytest.raises(GraphError, match="float32"):
        g.pointwise(x, np.zeros((2, 3, 1, 1)), None, name="pw")
    with pytest.raises(GraphError, match="rank-2"):
        g.linear(x, np.zeros((2, 3), np.float32), None, name="fc")


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_threads_give_bit_identical_gradients_and_shards_sum_to_the_whole_batch(data):
    """A batch split into shards (batch_shards: 2-4 slices) gives the same loss, weight and bias
    gradients and SGD update with 1, 2 or 3 threads, bit for bit (each thread owns whole shards;
    the shards' sums are added in shard order), and they equal the unsplit batch's to rounding.
    Odd map and channel sizes put the per-image ReLU6 masks on byte boundaries mid-block."""
    from microtrain import autograd

    arch = data.draw(archs())
    net = Network(arch, random_arrays(arch, seed=data.draw(st.integers(0, 100))))
    batch = data.draw(st.sampled_from([2 * autograd.SHARD_IMAGES, 3 * autograd.SHARD_IMAGES + 5,
                                       4 * autograd.SHARD_IMAGES + 3]), label="batch")
    assert len(autograd.batch_shards(batch)) > 1
    feeds = _feeds(net, batch, 3, seed=data.draw(st.integers(0, 100)))
    every = Selection({layer.name: LayerUpdate.full(layer.out_channels) for layer in net.layers})
    results = []
    for threads in (1, 2, 3):
        run = Executor(net.copy().protonet_graph(batch, 3, SCALE), every, momentum=True, threads=threads)
        loss = run.forward(feeds)
        run.backward()
        grads = {layer.name: [a.copy() for a in run.grad(layer.name)] for layer in net.layers}
        SGD(1e-2, 0.9, 0.0).step(run)
        results.append((loss, grads, {layer.name: run.master(layer.name)[0].copy() for layer in net.layers}))
        run.close()
    for loss, grads, weights in results[1:]:
        assert loss == results[0][0]
        for name in grads:
            for a, b in zip(grads[name], results[0][1][name]):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(weights[name], results[0][2][name])

    one = pytest.MonkeyPatch()
    one.setattr(autograd, "MAX_SHARDS", 1)
    try:
        whole = Executor(net.copy().protonet_graph(batch, 3, SCALE), every, threads=2)
        assert whole.forward(feeds) == pytest.approx(results[0][0], rel=1e-5)
        whole.backward()
    finally:
        one.undo()
    for name, (dw, db) in results[0][1].items():
        w_whole, b_whole = whole.grad(name)
        scale = max(float(np.abs(w_whole).max()), 1e-6)
        np.testing.assert_allclose(dw, w_whole, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(db, b_whole, rtol=1e-4, atol=1e-5 * max(float(np.abs(b_whole).max()), 1e-6))


def test_threads_must_be_positive_and_the_environment_sets_the_default(monkeypatch):
    from microtrain import autograd

    net = small_net()
    with pytest.raises(GraphError, match="threads"):
        Executor(net.protonet_graph(1, 3, SCALE), threads=0)
    monkeypatch.setenv("MICROTRAIN_THREADS", "3")
    assert autograd.default_threads() == 3
    assert Executor(net.protonet_graph(1, 3, SCALE)).threads == 3
    monkeypatch.setenv("MICROTRAIN_THREADS", "two")
    with pytest.raises(GraphError, match="MICROTRAIN_THREADS"):
        autograd.default_threads()
    monkeypatch.delenv("MICROTRAIN_THREADS")
    assert 1 <= autograd.default_threads() <= autograd.MAX_SHARDS
