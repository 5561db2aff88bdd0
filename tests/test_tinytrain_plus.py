"""TinyTrain+: measured Fisher information of weight rows and biases, the reach of the backward,
the budgeted knapsack over channel groups, and the per-channel step multipliers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain import tinytrain_plus as tp
from microtrain.autograd import Executor, Program
from microtrain.data import to_input
from microtrain.methods import Budgets, plan_method
from microtrain.optim import SGD
from microtrain.selection import LayerUpdate, Selection
from microtrain.tinytrain import BudgetError, backward_macs
from microtrain.train import class_prototypes, embed

from conftest import small_net


def _task(net, n=6, ways=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, net.resolution, net.resolution), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % ways
    return images, labels, class_prototypes(embed(net, images), labels, ways)


def test_rule_parses_and_prints_its_changes():
    rule = tp.PlusRule.parse("reach=0.5/groups=4/weights=false/value=gain/precondition=0.5")
    assert (rule.reach, rule.groups, rule.weights, rule.value, rule.precondition) == (0.5, 4, False, "gain", 0.5)
    assert tp.PlusRule.parse(rule.text()) == rule
    assert tp.PlusRule.parse("") == tp.PlusRule() and tp.PlusRule().text() == ""
    for bad in ("speed=3", "reach", "groups=x", "reach=2", "value=loud", "precondition=3"):
        with pytest.raises(ValueError):
            tp.PlusRule.parse(bad)


def test_measured_fisher_against_a_batch_gradient_and_finite_differences():
    net = small_net()
    images, labels, protos = _task(net, n=4)
    x = to_input(images)
    names = ["blocks.1.project", "blocks.2.expand", "blocks.2.project"]
    fisher = tp.measured_fisher(net, names, lambda i: x[i:i + 1], labels, protos, 10.0)

    # 'signal' is the squared norm of the mean gradient: one batch-4 backward gives that mean.
    run = Executor(net.protonet_graph(4, 3, 10.0), Selection({n: LayerUpdate.full(net.layer(n).out_channels)
                                                              for n in names}))
    run.value("image")[...] = x
    run.forward({"labels": labels, "prototypes": protos})
    run.backward()
    for name in names:
        dw, db = run.grad(name)
        f = fisher[name]
        np.testing.assert_allclose(f.rows_signal, np.square(dw.reshape(len(dw), -1)).sum(1), rtol=1e-3, atol=1e-10)
        np.testing.assert_allclose(f.bias_signal, np.square(db), rtol=1e-3, atol=1e-10)
        assert (f.rows >= f.rows_signal * (1 - 1e-4)).all() and (f.bias >= f.bias_signal * (1 - 1e-4)).all()
        assert f.row_size == net.layer(name).weights_per_channel

    # 'cols': per input channel, the mean over samples of its weights' squared gradient, from
    # batch-1 backwards summed here by hand (a depthwise input channel is its output channel)
    names = names + [next(layer.name for layer in net.layers if layer.kind == "depthwise")]
    fisher = tp.measured_fisher(net, names, lambda i: x[i:i + 1], labels, protos, 10.0)
    one_grad = Executor(net.protonet_graph(1, 3, 10.0), Selection({n: LayerUpdate.full(net.layer(n).out_channels)
                                                                   for n in names}))
    cols = {n: 0.0 for n in names}
    for i in range(4):
        one_grad.value("image")[...] = x[i:i + 1]
        one_grad.forward({"labels": labels[i:i + 1], "prototypes": protos})
        one_grad.backward()
        for n in names:
            cols[n] = cols[n] + np.square(one_grad.grad(n)[0].astype(np.float64)).sum(axis=(0, 2, 3)) / 4
    for n in names:
        if net.layer(n).kind == "depthwise":  # (C, 1, k, k): each channel is its own input
            assert fisher[n].cols.shape == (net.layer(n).out_channels,)
            np.testing.assert_allclose(fisher[n].cols, fisher[n].rows, rtol=1e-6)
            continue
        assert fisher[n].cols.shape == (net.params[n][0].shape[1],)
        np.testing.assert_allclose(fisher[n].cols, cols[n], rtol=1e-6)

    # 'trace' of one bias: the mean over samples of its squared per-sample derivative, by central
    # differences of each sample's loss.
    one = Executor(net.protonet_graph(1, 3, 10.0))
    name, channel, eps = "blocks.2.expand", 5, 1e-2
    bias = net.params[name][1]

    def loss(i):
        one.value("image")[...] = x[i:i + 1]
        return one.forward({"labels": labels[i:i + 1], "prototypes": protos}, train=False)

    squares = []
    for i in range(4):
        keep = bias[channel]
        bias[channel] = keep + eps
        up = loss(i)
        bias[channel] = keep - eps
        down = loss(i)
        bias[channel] = keep
        squares.append(((up - down) / (2 * eps)) ** 2)
    assert fisher[name].bias[channel] == pytest.approx(np.mean(squares), rel=3e-2, abs=1e-7)


def test_reach_grows_costs_towards_the_input_and_stops_at_the_budget():
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    everything = tp.reachable_depths(graph, net.layers, 10 ** 9, 10 ** 12, False)
    assert sorted(everything) == list(range(len(net.layers)))
    macs = [everything[d].macs for d in sorted(everything, reverse=True)]
    assert macs == sorted(macs)
    budget = everything[len(net.layers) - 3].macs
    reach = tp.reachable_depths(graph, net.layers, 10 ** 9, budget, False)
    assert min(reach) == len(net.layers) - 3


def _random_fisher(net, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for layer in net.layers:
        rows = rng.random(layer.out_channels) * (rng.random() + 0.01)
        bias = rng.random(layer.out_channels) * 0.1
        out[layer.name] = tp.GroupFisher(rows, bias, rows * rng.random(layer.out_channels), bias * 0.5,
                                         layer.weights_per_channel)
    return out


@settings(max_examples=25, deadline=None)
@given(mem=st.integers(1_000, 120_000), share=st.floats(0.05, 1.5), seed=st.integers(0, 1000),
       depth=st.sampled_from(["best", "deepest"]), value=st.sampled_from(["shift", "trace", "signal", "gain"]),
       cost=st.sampled_from(["sum", "max"]))
def test_selection_stays_within_both_budgets(mem, share, seed, depth, value, cost):
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    macs = int(share * net.forward_macs)
    rule = tp.PlusRule(depth=depth, value=value, cost=cost)
    reach = tp.reachable_depths(graph, net.layers, mem, macs, False)
    if not reach:
        with pytest.raises(BudgetError):
            tp.select(graph, net.layers, reach, {}, mem, macs, False, rule)
        return
    fisher = _random_fisher(net, seed)
    result = tp.select(graph, net.layers, reach, fisher, mem, macs, False, rule)
    program = Program(graph, result.selection)
    assert program.plan.backward_bytes <= mem and backward_macs(program) <= macs
    assert result.costs.memory == program.plan.backward_bytes
    trained = set(result.selection.names())
    # every bias from the depth on, nothing before it
    assert trained == {layer.name for layer in net.layers[result.depth:]}
    for layer in net.layers[result.depth:]:
        upd = result.selection.get(layer.name)
        assert len(upd.bias) == layer.out_channels
        groups = [g for g in result.groups if g.layer == layer.name]
        if upd.trains_weight:
            # the trained rows are the layer's first groups, most valuable first
            assert sorted(g.index for g in groups) == list(range(len(groups)))
            worth = fisher[layer.name].values(value)
            assert worth[upd.weight].min() >= np.sort(worth)[::-1][len(upd.weight) - 1] - 1e-12
        else:
            assert not groups
    if depth == "deepest":
        assert result.depth == min(reach)


def test_plan_method_runs_the_rule_and_its_variants():
    net = small_net()
    images, labels, _ = _task(net)
    budgets = Budgets(64 * 1024, net.forward_macs // 2)
    plan = plan_method("tinytrain-plus", net, images, labels, budgets, 10.0, False, seed=0)
    rule = tp.PlusRule()
    assert plan.lr == rule.lr and plan.momentum == rule.momentum and len(plan.selection) > 0
    assert plan.info["planned_backward_bytes"] <= budgets.memory and plan.info["backward_macs"] <= budgets.macs
    again = plan_method("tinytrain-plus", net, images, labels, budgets, 10.0, False, seed=0)
    assert plan.choices == again.choices
    biases = plan_method("tinytrain-plus:weights=false/depth=deepest", net, images, labels, budgets, 10.0, False)
    assert biases.selection.names() and not any(u.trains_weight for u in biases.selection.layers.values())
    with pytest.raises(BudgetError):
        plan_method("tinytrain-plus", net, images, labels, Budgets(10, 10), 10.0, False)
    with pytest.raises(ValueError):
        plan_method("tinytrain-plus:groups=0", net, images, labels, budgets, 10.0, False)


def test_row_scales_normalise_each_channels_rms_gradient():
    net = small_net()
    layer = net.layer("blocks.2.expand")
    rows = np.array([4.0, 1.0, 0.0] + [1.0] * (layer.out_channels - 3)) * layer.weights_per_channel
    fisher = {layer.name: tp.GroupFisher(rows, np.full(layer.out_channels, 1.0), rows, rows, layer.weights_per_channel)}
    selection = Selection({layer.name: LayerUpdate.channels([0, 1, 2])})
    assert tp.row_scales(selection, fisher, 0.0) is None
    w, b = tp.row_scales(selection, fisher, 1.0)[layer.name]
    # RMS per weight: 2, 1, 0 (no gradient: step unchanged); biases RMS 1; the reference is the
    # RMS over every trained parameter
    k = layer.weights_per_channel
    ref = np.sqrt(((4 + 1 + 0) * k + 3) / (3 * k + 3))
    np.testing.assert_allclose(w, [ref / 2, ref / 1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(b, [ref] * 3, rtol=1e-6)


def test_sgd_multiplies_each_channels_step():
    net = small_net()
    images, labels, protos = _task(net, n=3)
    images, labels = images[:1], labels[:1]
    name = "blocks.2.expand"
    selection = Selection({name: LayerUpdate.channels([1, 4])})
    run = Executor(net.protonet_graph(1, 3, 10.0), selection)
    run.value("image")[...] = to_input(images)
    before_w, before_b = net.params[name][0].copy(), net.params[name][1].copy()
    run.forward({"labels": labels, "prototypes": protos})
    run.backward()
    dw, db = (g.copy() for g in run.grad(name))
    SGD(0.1, row_scales={name: (np.array([2.0, 0.5]), np.array([3.0, 1.0]))}).step(run)
    w, b = net.params[name]
    np.testing.assert_allclose(w[[1, 4]], before_w[[1, 4]] - 0.1 * np.array([2.0, 0.5])[:, None, None, None] * dw,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b[[1, 4]], before_b[[1, 4]] - 0.1 * np.array([3.0, 1.0]) * db, rtol=1e-6, atol=1e-7)
    untouched = [c for c in range(len(w)) if c not in (1, 4)]
    np.testing.assert_array_equal(w[untouched], before_w[untouched])
