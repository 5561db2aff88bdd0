"""Planner invariants: lifetimes, first-fit placement in one arena, what a selection keeps."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain import memory
from microtrain.autograd import Executor, Program
from microtrain.selection import LayerUpdate, Selection

from conftest import archs, random_arrays, selections, small_net
from microtrain.model import Network


def _no_overlap(plan):
    plan.arena_bytes  # placement happens on first use
    buffers = plan.buffers
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if a.overlaps_in_time(b):
                assert a.offset + a.padded <= b.offset or b.offset + b.padded <= a.offset, (a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 8), st.integers(1, 5000)), min_size=1, max_size=40))
def test_first_fit_never_overlaps_live_buffers(intervals):
    buffers = [memory.Buffer(f"b{i}", memory.TRANSIENT, (n,), np.uint8, s, s + d)
               for i, (s, d, n) in enumerate(intervals)]
    plan = memory.Plan(buffers, [f"s{i}" for i in range(30)])
    _no_overlap(plan)
    assert all(b.offset % memory.ALIGN == 0 for b in buffers)
    assert plan.arena_bytes >= plan.peak_live_bytes
    assert plan.arena_bytes == max(b.offset + b.padded for b in buffers)


def _graph_and_program(arch, selection, momentum=True, batch=1, threads=1):
    net = Network(arch, random_arrays(arch))
    graph = net.protonet_graph(batch, 3, 10.0)
    return net, graph, Program(graph, selection, momentum, threads=threads)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_plan_invariants_on_random_networks(data):
    """Also at a batch split into shards (33 images: two) with each thread's own scratch."""
    arch = data.draw(archs())
    selection = data.draw(selections(arch))
    batch, threads = data.draw(st.sampled_from([1, 2, 33]), label="batch"), data.draw(st.integers(1, 3), label="threads")
    net, graph, program = _graph_and_program(arch, selection, batch=batch, threads=threads)
    plan = program.plan
    F = len(graph.nodes)
    by_name = {b.name: b for b in plan.buffers}
    _no_overlap(plan)

    # Every buffer a step reads or writes is alive at that step.
    for node, nb in zip(graph.nodes, program.nodes):
        work = [name for per_thread in nb.work for name in per_thread.values()]
        grad_work = [name for per_thread in nb.grad_work for name in per_thread.values()]
        for name in [nb.out, *nb.ins, *work, *nb.saved.values()]:
            assert by_name[name].alive_at(node.index), (node.name, name)
        # a per-image op runs in shards, each thread that runs some with its own scratch
        shards = len(nb.shards) if nb.shards else 1
        assert len(nb.work) == min(threads, shards) and len(set(work)) == len(work)
        # the convolutions work in planned scratch, in forward and wherever a gradient is made
        if node.op.kind in ("conv", "depthwise"):
            upd = program.updates.get(node.index)
            assert all("planes" in per_thread for per_thread in nb.work)
            assert ("grad-planes" in nb.grad_work[0]) == (any(dx is not None for dx in nb.dxs)
                                                         or (upd is not None and upd.trains_weight))
        if nb.dw is not None:
            assert len(nb.dw_parts) == shards - 1
        if nb.runs_backward:
            step = 2 * F - 1 - node.index
            for name in [nb.dy, *nb.saved.values(), *filter(None, nb.dxs), nb.dw, nb.db, *nb.dw_parts,
                         *nb.db_parts, *grad_work, *(a for pair in nb.accumulate for a in pair)]:
                if name is not None:
                    assert by_name[name].alive_at(step), (node.name, name, step)

    # A frozen prefix keeps nothing: no backward, no saved copies, nothing alive into backward
    # except inputs that a trained layer reads for its weight gradient.
    trained = [graph.node(n).index for n in selection.names()]
    first = min(trained) if trained else F
    kept_inputs = {program.storage_of[graph.node(n).inputs[0]] for n in selection.names()}
    for node, nb in zip(graph.nodes[:first], program.nodes[:first]):
        assert not nb.runs_backward, node.name
        assert not any(name.startswith("saved:") for name in nb.saved.values())
        out = program.storage_of[node.output]
        if out not in kept_inputs:
            assert not by_name[out].alive_at(F), node.name
    # The executor's arena is exactly the plan's size.
    run = Executor(graph, selection, momentum=True, threads=threads)
    assert run.arena.nbytes == plan.arena_bytes


def test_last_block_keeps_only_that_blocks_activations():
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    last = [layer for layer in net.layers if layer.name.startswith("blocks.2.")]
    sel = Selection({layer.name: LayerUpdate.full(layer.out_channels) for layer in last})
    program = Program(graph, sel, momentum=True)
    first = min(graph.node(layer.name).index for layer in last)
    saved = [b for b in program.plan.buffers if b.category == memory.SAVED and not b.name.startswith("input:")]
    assert saved
    producers = {v.name: v.producer for v in graph.values}
    for b in saved:
        node_name = b.name.split(":")[1]
        producer = producers.get(node_name, graph.node(node_name).index)
        # the input of the block is produced just before it (blocks.1.project) and kept by expand
        assert producer >= first - 1, b.name


def test_channel_subset_shrinks_gradients_and_saved_inputs_in_proportion():
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    dw = net.layer("blocks.2.depthwise")
    full = Program(graph, Selection({dw.name: LayerUpdate.full(dw.out_channels)}), momentum=True).plan
    half = Program(graph, Selection({dw.name: LayerUpdate.channels(range(0, dw.out_channels, 2))}),
                   momentum=True).plan
    ratio = (dw.out_channels // 2 + dw.out_channels % 2) / dw.out_channels
    assert half.category_bytes(memory.GRADIENTS) == full.category_bytes(memory.GRADIENTS) * ratio
    assert half.category_bytes(memory.WEIGHTS) == full.category_bytes(memory.WEIGHTS) * ratio
    # the depthwise input kept for its weight gradient: the whole activation, or the selected channels
    kept = lambda plan: sum(b.nbytes for b in plan.buffers  # noqa: E731
                            if b.category == memory.SAVED
                            and b.name in ("saved:blocks.2.depthwise:x_sel", "act:blocks.2.expand"))
    assert kept(half) == kept(full) * ratio


def test_bias_only_keeps_no_input():
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    pw = net.layer("blocks.2.expand")
    plan = Program(graph, Selection({pw.name: LayerUpdate.bias_only(pw.out_channels)}), momentum=False).plan
    assert not any(b.name == "act:blocks.1.project" and b.category == memory.SAVED for b in plan.buffers)
    assert plan.category_bytes(memory.GRADIENTS) == pw.out_channels * 4


def test_plan_prints_categories_and_buffers():
    net = small_net()
    graph = net.protonet_graph(1, 3, 10.0)
    plan = Program(graph, Selection({"blocks.2.project": LayerUpdate.full(8)}), momentum=True).plan
    text = plan.table(verbose=True)
    for category in memory.CATEGORIES:
        assert category in text
    assert "weightgrad:blocks.2.project" in text and "arena:" in text
