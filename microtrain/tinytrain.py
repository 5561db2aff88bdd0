"""TinyTrain's task-adaptive sparse update (Kwon et al., ICML 2024, Section 2.2, Algorithm 1).

1. One forward/backward over the user's samples gives, for every conv layer's output activation
   ``a`` and its gradient ``g``, the per-channel Fisher information (Eq. 2)
   ``Delta_o = 1/(2N) sum_n (sum_d a_nd g_nd)^2`` and the layer's Fisher potential ``P = sum_o Delta_o``.
2. The multi-objective score (Eq. 3) divides P by the layer's normalised parameter count and
   normalised MACs: ``s_i = P_i / ((|W_i| / max_l |W_l|) * (M_i / max_l M_l))``.
3. Layers are taken in score order while the backward memory (the engine's planner: weights being
   updated, their gradients and optimizer state, activations kept for backward) and the backward
   MACs stay within budget; inside each layer, the channels with the largest ``Delta_o``.

Channel share of a layer: as many of its top channels as both remaining budgets admit, capped at
the channels whose Fisher information is non-zero; a layer that cannot take at least
``min_share`` of its channels (default 1/8) is skipped, so the budget is not spent on slivers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .architecture import ConvLayer
from .autograd import Executor, Graph, Program
from .model import Network
from .selection import LayerUpdate, Selection


class BudgetError(ValueError):
    """No layer fits the budgets; the message names the smallest budget that would admit one."""


# ------------------------------------------------------------------------------------------------
# Fisher potential (Eq. 2)
# ------------------------------------------------------------------------------------------------


def fisher_information(net: Network, images: np.ndarray, labels: np.ndarray, prototypes: np.ndarray,
                       scale: float, batch: int = 1, prepare=None) -> dict[str, np.ndarray]:
    """Per-channel Fisher information Delta_o (float64) of every conv layer's output.

    ``images`` (N, ...) are turned into network inputs a chunk at a time by ``prepare`` (default:
    they already are float32 (N, 3, R, R)); ``labels`` (N,) int64; ``prototypes`` (K, C)
    normalised. The loss is the fine-tuning loss: scaled cosine logits, cross-entropy. One
    executor of ``batch`` samples keeps every conv output for its backward (about 3.2 MB per
    sample for MCUNet at 128x128); a short last chunk is padded and the padding ignored.
    """
    names = [layer.name for layer in net.layers]
    sums = {layer.name: np.zeros(layer.out_channels) for layer in net.layers}
    n = len(images)
    batch = max(1, min(batch, n))
    valid = batch

    def accumulate(node, activation, gradient):
        # (sum_d a_nd g_nd) per sample and channel. The loss is a batch mean, so each sample's
        # gradient arrives scaled by 1/B: multiply it back to the gradient of its own loss.
        per_sample = np.einsum("nchw,nchw->nc", activation[:valid], gradient[:valid], dtype=np.float64)
        per_sample *= batch
        sums[node.name] += np.square(per_sample).sum(axis=0)

    run = Executor(net.protonet_graph(batch, len(prototypes), scale), observe=names)
    x, y = run.value("image"), np.zeros(batch, np.int64)
    for start in range(0, n, batch):
        valid = min(batch, n - start)
        chunk = images[start:start + valid]
        x[:valid] = chunk if prepare is None else prepare(chunk)
        x[valid:] = x[:1]  # padding: its gradients do not reach the other samples' terms
        y[:valid], y[valid:] = labels[start:start + valid], labels[start]
        run.forward({"labels": y, "prototypes": prototypes})
        run.backward(on_output_grad=accumulate)
    return {name: s / (2 * n) for name, s in sums.items()}


def fisher_potential(delta: dict[str, np.ndarray]) -> dict[str, float]:
    """P = sum_o Delta_o per layer."""
    return {name: float(d.sum()) for name, d in delta.items()}


# ------------------------------------------------------------------------------------------------
# Multi-objective criterion (Eq. 3)
# ------------------------------------------------------------------------------------------------


def multi_objective_scores(layers: list[ConvLayer], potential: dict[str, float],
                           use_costs: bool = True) -> dict[str, float]:
    """s_i = P_i / ((|W_i| / max |W|) * (M_i / max M)); with ``use_costs=False``, s_i = P_i
    (the Fisher-only ablation)."""
    if not use_costs:
        return {layer.name: potential[layer.name] for layer in layers}
    max_w = max(layer.weight_count for layer in layers)
    max_m = max(layer.macs for layer in layers)
    return {layer.name: potential[layer.name] / ((layer.weight_count / max_w) * (layer.macs / max_m))
            for layer in layers}


# ------------------------------------------------------------------------------------------------
# Costs of a selection, from the engine's planner
# ------------------------------------------------------------------------------------------------


def backward_macs(program: Program) -> int:
    """Backward MACs per sample of a compiled training graph, every weighted node included (TinyTL's
    branches too): the input gradient of each node whose input needs one, plus the weight
    gradients of its trained rows (and input columns)."""
    g = program.graph
    total = 0
    for node in g.nodes:
        if not node.op.has_params:
            continue
        macs = math.prod(node.weight.shape) * math.prod(g.values[node.output].shape[2:])
        if any(program.needs_grad[v] for v in node.inputs):
            total += macs
        upd = program.updates.get(node.index)
        if upd is not None and upd.trains_weight:
            share = len(upd.weight) / node.weight.shape[0]
            if upd.inputs is not None:
                share *= len(upd.inputs) / node.weight.shape[1]
            total += int(macs * share)
    return total


def fulltrain_backward_macs(net: Network) -> int:
    """Backward MACs per image of training every conv layer in full (FullTrain): the reference of a
    MAC budget given as a share. The paper's Algorithm 1 gives TinyTrain "15% of total MACs", and its
    Table 2 gives TinyTrain 6.51M backward MACs on MCUNet against FullTrain's 44.9M (14.5%): the share
    is of FullTrain's backward MACs, not of the forward MACs (22.5M). Here 43.1M on MCUNet-5fps."""
    everything = Selection({layer.name: LayerUpdate.full(layer.out_channels) for layer in net.layers})
    return backward_macs(Program(net.protonet_graph(1, 2, 1.0), everything, momentum=False))


@dataclass
class Costs:
    """What a selection costs per training step: planned backward memory (bytes: the arena's
    training-only share, memory.Plan.backward_bytes) and backward MACs (the input- and weight-gradient
    multiply-accumulates the selection's masked backward performs)."""

    memory: int  # planned backward memory, bytes
    macs: int  # backward MACs

    def within(self, mem_budget: int, mac_budget: int) -> bool:
        """True when memory <= mem_budget (bytes) and macs <= mac_budget (MACs)."""
        return self.memory <= mem_budget and self.macs <= mac_budget


def selection_costs(graph: Graph, selection: Selection, momentum: bool) -> Costs:
    """The costs of training ``selection`` on ``graph`` (with SGD momentum buffers when
    ``momentum``), from the same plan the executor runs: the memory is planned, not estimated."""
    program = Program(graph, selection, momentum)
    return Costs(program.plan.backward_bytes, backward_macs(program))


# ------------------------------------------------------------------------------------------------
# Dynamic layer/channel selection (Algorithm 1)
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """One layer Algorithm 1 chose: its Eq. 3 score and the output channels it trains, the top-k
    by Fisher potential Delta_o (Eq. 2) that fit the budgets (int64 indices)."""

    name: str
    score: float
    channels: np.ndarray  # chosen output channels, by decreasing Delta_o
    out_channels: int


@dataclass
class TinyTrainSelection:
    """The outcome of Algorithm 1: the ``Selection`` the backward pass and the memory planner read,
    the chosen layers in the order they were taken, their total costs, and every layer's Eq. 3 score
    (name -> score, for the report)."""

    selection: Selection
    choices: list[LayerChoice]
    costs: Costs
    scores: dict[str, float] = field(default_factory=dict)


def select(graph: Graph, layers: list[ConvLayer], delta: dict[str, np.ndarray], scores: dict[str, float],
           mem_budget: int, mac_budget: int, momentum: bool, min_share: float = 1 / 8,
           channel_order: dict[str, np.ndarray] | None = None) -> TinyTrainSelection:
    """Greedy selection in score order under both budgets.

    ``channel_order`` overrides the per-layer channel ranking (the static-channel ablations);
    by default channels are ranked by their Fisher information ``delta``.
    """
    ranked = sorted(layers, key=lambda layer: (-scores[layer.name], layer.index))
    chosen: dict[str, LayerUpdate] = {}
    choices: list[LayerChoice] = []
    current = Costs(0, 0)
    closest: tuple[float, str, Costs] | None = None  # the layer nearest to fitting, for the error
    for layer in ranked:
        order = (channel_order or {}).get(layer.name)
        if order is None:
            order = np.argsort(-delta[layer.name], kind="stable")
            order = order[delta[layer.name][order] > 0]
        floor = max(1, math.ceil(min_share * layer.out_channels))
        if len(order) < floor:
            continue

        def cost(k: int) -> Costs:
            trial = dict(chosen)
            trial[layer.name] = LayerUpdate.channels(order[:k])
            return selection_costs(graph, Selection(trial), momentum)

        low = cost(floor)
        if not chosen:
            excess = max(low.memory / max(mem_budget, 1), low.macs / max(mac_budget, 1))
            if closest is None or excess < closest[0]:
                closest = (excess, f"{layer.name} ({floor} of {layer.out_channels} channels)", low)
        if not low.within(mem_budget, mac_budget):
            continue
        k = _largest_fitting(cost, floor, len(order), low, mem_budget, mac_budget)
        chosen[layer.name] = LayerUpdate.channels(order[:k])
        choices.append(LayerChoice(layer.name, scores[layer.name], np.asarray(order[:k]), layer.out_channels))
        current = cost(k)
    if not chosen:
        if closest is None:
            raise BudgetError("no layer has channels with non-zero Fisher information to train")
        _, what, need = closest
        raise BudgetError(f"no layer fits a backward budget of {mem_budget} bytes and {mac_budget} MACs; "
                          f"the nearest, {what}, needs {need.memory} bytes and {need.macs} MACs: "
                          f"--mem-budget {max(mem_budget, need.memory)} --mac-budget {max(mac_budget, need.macs)} "
                          f"would admit it")
    return TinyTrainSelection(Selection(chosen), choices, current, scores)


def _largest_fitting(cost, low_k: int, high_k: int, low: Costs, mem_budget: int, mac_budget: int) -> int:
    """Largest k in [low_k, high_k] whose costs fit. Costs grow linearly in k (compact gradients,
    kept channels), so two plans give the line; one more confirms, stepping down if the planner's
    peak says otherwise."""
    if low_k == high_k:
        return low_k
    high = cost(high_k)
    if high.within(mem_budget, mac_budget):
        return high_k
    per_k_mem = (high.memory - low.memory) / (high_k - low_k)
    per_k_mac = (high.macs - low.macs) / (high_k - low_k)
    k = high_k
    if per_k_mem > 0:
        k = min(k, low_k + int((mem_budget - low.memory) // per_k_mem))
    if per_k_mac > 0:
        k = min(k, low_k + int((mac_budget - low.macs) // per_k_mac))
    k = max(low_k, k)
    while k > low_k and not cost(k).within(mem_budget, mac_budget):
        k -= 1
    return k
