"""TinyTrain's selection: Fisher potential (Eq. 2), the multi-objective score (Eq. 3), and the
budgeted greedy layer/channel choice (Algorithm 1)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain import tinytrain
from microtrain.autograd import Program
from microtrain.data import augment, to_input
from microtrain.methods import Budgets, plan_method
from microtrain.selection import LayerUpdate, Selection

from conftest import small_net


def _episode(net, n=6, ways=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, net.resolution, net.resolution), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % ways
    return images, labels


def _protos(net, ways, seed=0):
    p = np.random.default_rng(seed).standard_normal((ways, net.embedding_size))
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def test_scores_follow_equation_3():
    net = small_net()
    potential = {layer.name: float(i + 1) for i, layer in enumerate(net.layers)}
    scores = tinytrain.multi_objective_scores(net.layers, potential)
    max_w = max(layer.weight_count for layer in net.layers)
    max_m = max(layer.macs for layer in net.layers)
    for layer in net.layers:
        expected = potential[layer.name] / ((layer.weight_count / max_w) * (layer.macs / max_m))
        assert scores[layer.name] == pytest.approx(expected)
    assert tinytrain.multi_objective_scores(net.layers, potential, use_costs=False) == potential


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_fisher_information_does_not_depend_on_batching(batch):
    # Each sample's term uses the gradient of its own loss, so chunking (and padding the last
    # chunk) must not change Delta_o; batch 1 is the plain definition.
    net = small_net()
    images, labels = _episode(net, n=5)
    protos = _protos(net, 3)
    one = tinytrain.fisher_information(net, images, labels, protos, 10.0, batch=1, prepare=to_input)
    other = tinytrain.fisher_information(net, images, labels, protos, 10.0, batch=batch, prepare=to_input)
    for name in one:
        np.testing.assert_allclose(other[name], one[name], rtol=2e-4, atol=1e-12)
    assert all(d.shape == (net.layer(n).out_channels,) and (d >= 0).all() for n, d in one.items())
    potential = tinytrain.fisher_potential(one)
    assert potential[net.layers[0].name] == pytest.approx(one[net.layers[0].name].sum())


def _select(net, mem, macs, momentum=True, seed=0):
    rng = np.random.default_rng(seed)
    delta = {layer.name: rng.random(layer.out_channels) * (rng.random() + 0.01) for layer in net.layers}
    scores = tinytrain.multi_objective_scores(net.layers, tinytrain.fisher_potential(delta))
    graph = net.protonet_graph(1, 3, 10.0)
    return tinytrain.select(graph, net.layers, delta, scores, mem, macs, momentum), delta, graph


@settings(max_examples=30, deadline=None)
@given(mem=st.integers(2_000, 200_000), share=st.floats(0.05, 1.5), seed=st.integers(0, 1000))
def test_selection_stays_within_both_budgets(mem, share, seed):
    net = small_net()
    macs = int(share * net.forward_macs)
    try:
        result, delta, graph = _select(net, mem, macs, seed=seed)
    except tinytrain.BudgetError:
        return
    program = Program(graph, result.selection, momentum=True)
    assert program.plan.backward_bytes <= mem
    assert tinytrain.backward_macs(program) <= macs
    assert result.costs.memory == program.plan.backward_bytes
    for choice in result.choices:
        # the kept channels are the layer's top channels by Fisher information
        ranked = np.argsort(-delta[choice.name], kind="stable")[:len(choice.channels)]
        assert set(ranked) == set(choice.channels)
        assert len(choice.channels) >= int(np.ceil(choice.out_channels / 8))
    names = [c.name for c in result.choices]
    assert [result.scores[n] for n in names] == sorted((result.scores[n] for n in names), reverse=True)


def test_backward_macs_by_hand():
    # Training blocks.2.expand on 3 of 24 channels: input gradients of every conv after it, the
    # weight gradient of 3/24 of its MACs, nothing before it.
    net = small_net()
    program = Program(net.protonet_graph(1, 3, 10.0), Selection({"blocks.2.expand": LayerUpdate.channels([0, 3, 5])}))
    later = [layer for layer in net.layers if layer.index > net.layer("blocks.2.expand").index]
    expected = sum(layer.macs for layer in later) + net.layer("blocks.2.expand").macs * 3 // 24
    assert tinytrain.backward_macs(program) == expected


def test_budget_too_small_names_a_budget_that_admits_a_layer():
    net = small_net()
    with pytest.raises(tinytrain.BudgetError) as err:
        _select(net, 100, 100)
    message = str(err.value)
    assert "\n" not in message
    mem, macs = map(int, re.search(r"--mem-budget (\d+) --mac-budget (\d+)", message).groups())
    result, _, _ = _select(net, mem, macs)
    assert result.choices


def test_same_seed_same_selection():
    net = small_net()
    images, labels = _episode(net, n=6)
    budgets = Budgets(64 * 1024, net.forward_macs)
    first = plan_method("tinytrain", net, images, labels, budgets, 10.0, True, seed=3)
    second = plan_method("tinytrain", net, images, labels, budgets, 10.0, True, seed=3)
    assert first.choices == second.choices
    for name, upd in first.selection.layers.items():
        np.testing.assert_array_equal(upd.weight, second.selection.layers[name].weight)


@pytest.mark.parametrize("method", ["tinytrain-fisher", "tinytrain-random", "tinytrain-l2"])
def test_ablations_keep_counts_within_budget(method):
    net = small_net()
    images, labels = _episode(net, n=6)
    budgets = Budgets(64 * 1024, net.forward_macs)
    plan = plan_method(method, net, images, labels, budgets, 10.0, True, seed=0)
    program = Program(net.protonet_graph(1, 3, 10.0), plan.selection, True)
    assert program.plan.backward_bytes <= budgets.memory
    assert isinstance(plan.selection, Selection) and len(plan.selection) > 0


@pytest.mark.parametrize("name", ["mcunet-5fps-meta", "mbv2-w0.35-meta", "proxyless-w0.3-meta"])
def test_sparse_update_runs_on_the_meta_trained_backbones(name):
    """SparseUpdate's policy is per architecture: a meta-trained file (renamed '<base>-meta', the
    base in its provenance) gets its base backbone's policy (it used to be refused by name)."""
    from microtrain.adapt import resolve_model
    from microtrain.methods import SPARSE_UPDATE, plan_sparse_update

    net = resolve_model(name)  # committed in weights/, no shared folder needed
    assert net.name == name and net.base_name == name.removesuffix("-meta")
    n_bias, weights = SPARSE_UPDATE[net.base_name]
    plan = plan_sparse_update(net)
    layers = plan.selection.layers
    assert [layer.name for layer in net.layers if layer.name in layers] == [
        layer.name for i, layer in enumerate(net.layers) if i >= len(net.layers) - n_bias or i in weights]
    for index in weights:
        assert layers[net.layers[index].name].trains_weight


def test_sparse_update_fisher_keeps_the_policy_and_ranks_channels_by_the_task():
    """sparseupdate-fisher: SparseUpdate's layers, channel counts, backward memory and MACs, with
    each listed conv's input channels the ones of most measured Fisher information on this task."""
    from microtrain import tinytrain_plus
    from microtrain.adapt import resolve_model
    from microtrain.methods import SPARSE_UPDATE, plan_sparse_update
    from microtrain.train import class_prototypes, embed

    net = resolve_model("mcunet-5fps-meta")
    rng = np.random.default_rng(0)
    support = rng.integers(0, 256, (4, 3, net.resolution, net.resolution), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1], np.int64)
    static = plan_sparse_update(net)
    plan = plan_method("sparseupdate-fisher", net, support, labels, Budgets(1, 1), 10.0, False, seed=0)
    assert plan.method == "sparseupdate-fisher" and plan.momentum == 0.0
    def shape(selection):
        return {n: [None if c is None else len(c) for c in (u.weight, u.bias, u.inputs)]
                for n, u in selection.layers.items()}

    assert shape(plan.selection) == shape(static.selection)
    graph = net.protonet_graph(1, 2, 10.0)
    assert (tinytrain.backward_macs(Program(graph, plan.selection))
            == tinytrain.backward_macs(Program(graph, static.selection)))
    # the channels are the top ones of the Fisher measurement, which differs from the L2 choice
    index, kept = next((i, k) for i, k in SPARSE_UPDATE[net.base_name][1].items()
                       if net.layers[i].kind != "depthwise" and k < net.layers[i].in_channels)
    name = net.layers[index].name
    rng = np.random.default_rng(0)
    protos = class_prototypes(embed(net, support), labels, 2)
    fisher = tinytrain_plus.measured_fisher(net, [name], lambda i: to_input(augment(support[i], rng)[None]), labels,
                                            protos, 10.0)
    top = np.sort(np.argsort(-fisher[name].cols, kind="stable")[:kept])
    np.testing.assert_array_equal(plan.selection.layers[name].inputs, top)
    assert not np.array_equal(top, static.selection.layers[name].inputs)
