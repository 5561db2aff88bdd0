"""TinyTrain+: a task-adaptive sparse update that spends both budgets on measured Fisher information.

TinyTrain (``microtrain.tinytrain``, the paper's Eq. 2-3 and Algorithm 1) ranks whole layers by
Fisher potential per normalised parameter count x MACs, which favours the small depthwise layers
of the last blocks. This rule is decided on the device from one forward/backward pass per support
sample, under the same two budgets, but chooses among finer units whose costs it takes from the
engine's planner:

1. **Reach.** A bias or weight of layer ``l`` can only learn if the backward pass reaches it, and
   that costs the input gradients of every layer after ``l`` (MACs) and the activations those
   layers keep (memory), whatever is trained. The planner gives, for each depth ``d``, the costs
   of training the biases of every layer from ``d`` to the end; the depths whose costs fit the
   budgets (the MAC share ``reach``) are the candidates, and the layers before the earliest are
   never looked at again.
2. **Measured Fisher information.** One backward pass per support sample (augmented, as the
   pseudo-queries of fine-tuning), down to the earliest candidate depth only, gives every
   reachable layer's per-sample weight and bias gradients. Per output channel: the empirical
   Fisher information of its weight row (mean over samples of the squared gradient norm), its
   RMS per weight, and the squared norm of the mean gradient ("signal").
3. **Value of a channel** (``value``): by default ``'shift'``, the empirical Fisher information of
   the channel's bias, mean over samples of (sum over positions of the output gradient)^2: how
   much the task's loss wants that channel's output shifted. A weight row is worth its output
   channel's shift Fisher. Of the quantities measured, this one ranked layers by their measured
   single-layer gain best (one Traffic Sign episode on the ImageNet MCUNet: Spearman +0.68
   against +0.08 to +0.15 for the rows' trace, signal and gain, and -0.62 for Eq. 3; three on the
   meta-trained one: +0.70 +- 0.15 among the reachable layers, Eq. 3 -0.55 +- 0.11 over all
   layers, ``reports/2026-11-30-paper-analyses``), and it was the best of the variants on 25
   validation episodes of each protocol, at the lowest memory. ``'gain'`` (the rows' signal
   divided by their RMS per-sample gradient), ``'trace'`` (mean squared per-sample gradient; made
   plain SGD diverge) and ``'signal'`` are the variants it was compared with.
4. **Units and their costs.** The biases of every layer behind the depth are trained (a few
   bytes each, and the reach is paid for anyway). The weights of each reachable layer are offered
   in ``groups`` groups of output channels in decreasing value; a group's cost is the planner's
   extra backward memory and backward MACs (a layer's first group also pays for the activation
   its weight gradient keeps), normalised by the budgets.
5. **Greedy knapsack per depth, best depth.** For each candidate depth, groups are added in
   decreasing value per normalised cost while both remaining budgets admit them; the depth whose
   selection holds the most value (biases + weight groups) wins (``depth='best'``), or the
   earliest reachable one (``depth='deepest'``). The planner confirms the final selection; if its
   peak disagrees with the linear estimate, the last groups are dropped until it fits.

Fine-tuning is plain SGD at lr 3e-3 (``lr``, ``momentum``); ``precondition`` and ``bias_step``
scale each channel's step (``optim.SGD``'s row multipliers). Every choice and default here was made
on validation episodes (seeds 1000+): ``reports/2026-11-30-selection-design/README.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .autograd import Executor, Graph
from .data import augment, to_input
from .model import ConvLayer, Network
from .selection import LayerUpdate, Selection
from .tinytrain import BudgetError, Costs, selection_costs


@dataclass(frozen=True)
class PlusRule:
    """The knobs of the rule (defaults: the validated choice)."""

    reach: float = 1.0  # share of the MAC budget the depth (input gradients + kept biases) may use
    groups: int = 8  # a layer's weights are offered in this many output-channel groups
    cost: str = "sum"  # normalised cost of a group: 'sum' (mem/B_mem + MACs/B_mac) or 'max'
    value: str = "shift"  # 'shift' (the output channel's bias Fisher), 'gain' (signal / RMS per-sample
    # gradient), 'trace' (mean squared per-sample gradient) or 'signal' (squared norm of the mean gradient)
    precondition: float = 0.0  # step multiplier of a channel: (RMS gradient of the selection / its own)^this
    bias_step: float = 1.0  # biases' steps are multiplied by this (weights' by 1)
    depth: str = "best"  # 'best' (most Fisher information) or 'deepest' (earliest reachable layer)
    weights: bool = True  # False: biases only
    lr: float = 3e-3
    momentum: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "PlusRule":
        """'reach=0.7/groups=4' -> PlusRule with those fields changed; '' -> the defaults.
        Raises ValueError naming an unknown field or a bad value."""
        rule = cls()
        if not text:
            return rule
        kinds = {f.name: type(getattr(rule, f.name)) for f in fields(cls)}
        changes = {}
        for part in text.split("/"):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"cannot read {part!r}: use key=value with keys {', '.join(kinds)}")
            kind = kinds[key]
            try:
                changes[key] = (raw.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(raw.strip())
            except ValueError:
                raise ValueError(f"{key}={raw!r}: not a {kind.__name__}") from None
        rule = replace(rule, **changes)
        rule.check()
        return rule

    def check(self) -> None:
        """Raise ``ValueError`` (one line) on a field out of its range or an unknown option."""
        if not 0 < self.reach <= 1 or self.groups < 1 or self.lr <= 0 or self.momentum < 0:
            raise ValueError("reach must be in (0, 1], groups >= 1, lr > 0, momentum >= 0")
        if not 0 <= self.precondition <= 1 or self.bias_step <= 0:
            raise ValueError("precondition must be in [0, 1], bias_step > 0")
        for key, allowed in (("cost", ("sum", "max")), ("value", ("shift", "trace", "signal", "gain")),
                             ("depth", ("best", "deepest"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}")

    def text(self) -> str:
        """The fields that differ from the defaults, as parse() reads them."""
        base = PlusRule()
        return "/".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != getattr(base, f.name))


# ------------------------------------------------------------------------------------------------
# 1. Reach: the costs of backpropagating to each depth
# ------------------------------------------------------------------------------------------------


def biases_from(layers: list[ConvLayer], depth: int) -> dict[str, LayerUpdate]:
    """Bias-only updates of ``layers[depth:]``."""
    return {layer.name: LayerUpdate.bias_only(layer.out_channels) for layer in layers[depth:]}


def reachable_depths(graph: Graph, layers: list[ConvLayer], mem_budget: int, mac_budget: int,
                     momentum: bool) -> dict[int, Costs]:
    """Depth (index into ``layers``) -> planned costs of training every bias from there to the end,
    for every depth whose costs fit both budgets. Costs grow as the depth moves towards the input,
    so the walk stops at the first that does not fit."""
    out: dict[int, Costs] = {}
    for depth in range(len(layers) - 1, -1, -1):
        costs = selection_costs(graph, Selection(biases_from(layers, depth)), momentum)
        if not costs.within(mem_budget, mac_budget):
            break
        out[depth] = costs
    return out


# ------------------------------------------------------------------------------------------------
# 2. Measured Fisher information of weight rows and biases
# ------------------------------------------------------------------------------------------------


@dataclass
class GroupFisher:
    """Per output channel of one layer: the empirical Fisher information (mean over samples of the
    squared gradient norm) of its weight row and of its bias, the squared norm of the mean
    gradient ('signal'), and the row's parameter count."""

    rows: np.ndarray  # (C,) float64, mean_n ||g_n(row)||^2
    bias: np.ndarray  # (C,) float64, mean_n g_n(bias)^2
    rows_signal: np.ndarray  # (C,) float64, ||mean_n g_n(row)||^2
    bias_signal: np.ndarray  # (C,) float64
    row_size: int  # weights per row
    cols: np.ndarray | None = None  # (C_in,) float64, mean_n of the squared gradient of each input
    # channel's weights (a depthwise layer's input channel is its output channel: equal to rows)

    def row_rms(self) -> np.ndarray:
        """RMS per-sample gradient of one weight of each row (C,)."""
        return np.sqrt(self.rows / self.row_size)

    def values(self, kind: str, weights: bool = True) -> np.ndarray:
        """A unit value per channel (C,): 'shift' (the bias's Fisher information, for weights and
        biases alike), 'trace', 'signal', or 'gain' (signal / RMS per-sample gradient of one
        weight: the first-order loss decrease of a step, discounted by the gradient's noise and
        size)."""
        if kind == "shift":  # a row is worth its output channel's shift Fisher, as is the bias
            return self.bias
        if kind == "trace":
            return self.rows if weights else self.bias
        if kind == "signal":
            return self.rows_signal if weights else self.bias_signal
        rms = self.row_rms() if weights else np.sqrt(self.bias)
        signal = self.rows_signal if weights else self.bias_signal
        return np.divide(signal, rms, out=np.zeros_like(signal), where=rms > 0)


def measured_fisher(net: Network, names: list[str], inputs, labels: np.ndarray, prototypes: np.ndarray,
                    scale: float) -> dict[str, GroupFisher]:
    """Empirical Fisher information of each output channel's weight row and bias, for the layers
    ``names``, from one forward/backward per sample at batch 1.

    ``inputs(i)`` returns sample ``i`` as float32 (1, 3, R, R); ``labels`` (N,) int64;
    ``prototypes`` (K, C) normalised. The loss is the fine-tuning loss (scaled cosine logits,
    cross-entropy). Per input channel (``cols``): mean_n of its weights' squared gradient norm.
    Per row: mean_n ||g_n||^2 (the diagonal of the empirical Fisher summed over
    the row; Sung et al. 2021, "FISH mask") and ||mean_n g_n||^2. The backward stops at the
    earliest named layer; its memory is that of training every named layer in full (compact
    gradients and their running sum, no optimizer state).
    """
    graph = net.protonet_graph(1, len(prototypes), scale)
    run = Executor(graph, Selection({n: LayerUpdate.full(net.layer(n).out_channels) for n in names}))
    n = len(labels)
    square = {name: [np.zeros(net.layer(name).out_channels) for _ in range(2)] for name in names}
    cols = {name: np.zeros(net.params[name][0].shape[1]) for name in names}
    total = {name: [np.zeros(net.params[name][0].shape), np.zeros(net.layer(name).out_channels)] for name in names}
    x, y = run.value("image"), np.zeros(1, np.int64)
    for i in range(n):
        x[...] = inputs(i)
        y[0] = labels[i]
        run.forward({"labels": y, "prototypes": prototypes})
        run.backward()
        for name in names:
            dw, db = run.grad(name)
            square[name][0] += np.square(dw.reshape(len(dw), -1), dtype=np.float64).sum(axis=1)
            square[name][1] += np.square(db, dtype=np.float64)
            cols[name] += np.square(dw, dtype=np.float64).sum(axis=(0, 2, 3))
            total[name][0] += dw
            total[name][1] += db
    out = {}
    for name in names:
        mw, mb = total[name][0] / n, total[name][1] / n
        out[name] = GroupFisher(square[name][0] / n, square[name][1] / n,
                                np.square(mw).reshape(len(mw), -1).sum(axis=1), np.square(mb),
                                net.layer(name).weights_per_channel,
                                square[name][0] / n if net.layer(name).kind == "depthwise" else cols[name] / n)
    return out


def support_fisher(net: Network, names: list[str], support: np.ndarray, labels: np.ndarray,
                   prototypes: np.ndarray, scale: float, seed: int) -> dict[str, GroupFisher]:
    """``measured_fisher`` on a support set (uint8 (N, 3, R, R), int64 labels (N,)), each image
    augmented as fine-tuning's pseudo-queries are, with ``numpy.random.default_rng(seed)`` (the
    stream TinyTrain's Fisher pass draws)."""
    rng = np.random.default_rng(seed)
    return measured_fisher(net, names, lambda i: to_input(augment(support[i], rng)[None]), labels, prototypes, scale)


def row_scales(selection: Selection, fisher: dict[str, GroupFisher], power: float,
               bias_step: float = 1.0) -> dict | None:
    """Per trained channel, the step multiplier (RMS gradient of the selection / the channel's)^power
    for weights and biases (``optim.SGD``'s ``row_scales``), biases' times ``bias_step``; None
    when power is 0 and bias_step 1 (plain SGD). Removes the arbitrary per-channel scale BN
    folding leaves in the weights; clipped to [1/100, 100], and 1 for a channel with no gradient."""
    if power == 0 and bias_step == 1:
        return None
    parts = []
    for name, upd in selection.layers.items():
        f = fisher[name]
        if upd.trains_weight:
            parts.append((f.rows[upd.weight].sum(), len(upd.weight) * f.row_size))
        if upd.trains_bias:
            parts.append((f.bias[upd.bias].sum(), len(upd.bias)))
    ref = math.sqrt(sum(t for t, _ in parts) / max(1, sum(c for _, c in parts)))

    def scale(rms):
        out = np.ones(len(rms), np.float32)
        live = rms > 0
        out[live] = np.clip((ref / rms[live]) ** power, 0.01, 100.0)
        return out

    return {name: (scale(fisher[name].row_rms()[upd.weight]) if upd.trains_weight else None,
                   scale(np.sqrt(fisher[name].bias[upd.bias])) * np.float32(bias_step) if upd.trains_bias else None)
            for name, upd in selection.layers.items()}


# ------------------------------------------------------------------------------------------------
# 3-4. Units, their costs, and the greedy knapsack per depth
# ------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """A knapsack unit of TinyTrain+: a share of one layer's weight rows (output channels), worth
    their Fisher information, costing the extra backward memory (bytes) and MACs it adds."""

    layer: str
    index: int  # 0 = the layer's first (most informative) group
    rows: np.ndarray  # output channels of this group
    value: float
    memory: float  # estimated extra backward memory, bytes
    macs: float  # extra backward MACs


@dataclass
class PlusSelection:
    """The outcome of TinyTrain+'s rule: the ``Selection`` (biases from ``depth`` on, plus the chosen
    weight groups) that the backward pass and the memory planner read, its costs and value, and the
    best value found at each depth tried (for the report)."""

    selection: Selection
    depth: int  # index of the earliest trained layer
    groups: list[Group]
    costs: Costs
    value: float  # Fisher information held by the selection
    by_depth: dict = field(default_factory=dict)  # depth -> value of its best selection
    row_scales: dict | None = None  # per-channel step multipliers (optim.SGD), None for plain SGD


def _layer_groups(graph: Graph, layers: list[ConvLayer], index: int, fisher: GroupFisher, n_groups: int,
                  base: Costs, momentum: bool, value: str) -> list[Group]:
    """A layer's weight groups with costs from two plans (a first group, the whole layer): a fixed
    part (the activation its weight gradient keeps) paid by the first group, then linear in rows."""
    layer = layers[index]
    worth = fisher.values(value)
    order = np.argsort(-worth, kind="stable")
    size = max(1, math.ceil(layer.out_channels / n_groups))
    chunks = [order[i:i + size] for i in range(0, layer.out_channels, size)]
    biases = biases_from(layers, index)

    def plan(rows):
        upd = dict(biases)
        upd[layer.name] = LayerUpdate(rows, np.arange(layer.out_channels))
        return selection_costs(graph, Selection(upd), momentum)

    first, whole = plan(chunks[0]), plan(order)
    rest = layer.out_channels - len(chunks[0])
    per_mem = (whole.memory - first.memory) / rest if rest else 0.0
    per_mac = (whole.macs - first.macs) / rest if rest else 0.0
    groups = []
    for k, rows in enumerate(chunks):
        if k == 0:
            mem, mac = first.memory - base.memory, first.macs - base.macs
        else:
            mem, mac = per_mem * len(rows), per_mac * len(rows)
        groups.append(Group(layer.name, k, np.sort(rows), float(worth[rows].sum()), max(mem, 0.0), max(mac, 0.0)))
    return groups


def _knapsack(groups: dict[str, list[Group]], mem_left: float, mac_left: float, mem_budget: int, mac_budget: int,
              cost: str) -> list[Group]:
    """Greedy: the next group of some layer with the most value per normalised cost, while it fits."""
    nxt = {name: 0 for name in groups}
    chosen: list[Group] = []

    def ratio(g: Group) -> float:
        parts = (g.memory / mem_budget, g.macs / mac_budget)
        c = sum(parts) if cost == "sum" else max(parts)
        return g.value / max(c, 1e-12)

    while True:
        options = [groups[name][k] for name, k in nxt.items() if k < len(groups[name])]
        if not options:
            return chosen
        best = max(options, key=ratio)
        if best.memory <= mem_left and best.macs <= mac_left and best.value > 0:
            chosen.append(best)
            mem_left -= best.memory
            mac_left -= best.macs
            nxt[best.layer] += 1
        else:
            del nxt[best.layer]  # later groups of this layer are worth less per cost


def _selection(layers: list[ConvLayer], depth: int, chosen: list[Group]) -> Selection:
    rows: dict[str, list[np.ndarray]] = {}
    for g in chosen:
        rows.setdefault(g.layer, []).append(g.rows)
    upd = {}
    for layer in layers[depth:]:
        bias = np.arange(layer.out_channels)
        upd[layer.name] = LayerUpdate(np.concatenate(rows[layer.name]) if layer.name in rows else None, bias)
    return Selection(upd)


def select(graph: Graph, layers: list[ConvLayer], reach: dict[int, Costs], fisher: dict[str, GroupFisher],
           mem_budget: int, mac_budget: int, momentum: bool, rule: PlusRule) -> PlusSelection:
    """Steps 3-4 of the rule for the candidate depths ``reach`` (from ``reachable_depths``)."""
    if not reach:
        raise BudgetError("the budgets do not admit even the last layer's biases")
    earliest = min(reach)
    all_groups = {}
    if rule.weights:
        for index in range(earliest, len(layers)):
            name = layers[index].name
            all_groups[name] = _layer_groups(graph, layers, index, fisher[name], rule.groups, reach[index], momentum,
                                             rule.value)
    results = {}
    depths = sorted(reach) if rule.depth == "best" else [earliest]
    for depth in depths:
        base = reach[depth]
        names = [layer.name for layer in layers[depth:]]
        groups = {n: all_groups[n] for n in names if n in all_groups}
        chosen = _knapsack(groups, mem_budget - base.memory, mac_budget - base.macs, mem_budget, mac_budget, rule.cost)
        bias_value = float(sum(fisher[n].values(rule.value, weights=False).sum() for n in names))
        results[depth] = (bias_value + sum(g.value for g in chosen), chosen)
    depth = max(results, key=lambda d: (results[d][0], -d))
    value, chosen = results[depth]
    # The planner's word is final: drop the least valuable groups while its peak says otherwise.
    chosen = list(chosen)
    while True:
        selection = _selection(layers, depth, chosen)
        costs = selection_costs(graph, selection, momentum)
        if costs.within(mem_budget, mac_budget) or not chosen:
            break
        chosen.pop()
    value = float(sum(fisher[layer.name].values(rule.value, weights=False).sum() for layer in layers[depth:]))
    value += sum(g.value for g in chosen)
    return PlusSelection(selection, depth, chosen, costs, value, {d: v for d, (v, _) in results.items()})


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


def plan(net: Network, support: np.ndarray, labels: np.ndarray, mem_budget: int, mac_budget: int, scale: float,
         momentum: bool, seed: int, prototypes: np.ndarray, rule: PlusRule = PlusRule()) -> PlusSelection:
    """The whole rule on one support set (uint8 (N, 3, R, R), int64 labels (N,)); ``prototypes``
    (K, C) from the support embeddings. ``momentum`` says whether fine-tuning keeps SGD momentum
    (it is planned into the backward memory). Raises BudgetError when not even the last layer's
    biases fit."""
    graph = net.protonet_graph(1, len(prototypes), scale)
    reach = reachable_depths(graph, net.layers, mem_budget, int(rule.reach * mac_budget), momentum)
    if not reach:
        last = selection_costs(graph, Selection(biases_from(net.layers, len(net.layers) - 1)), momentum)
        raise BudgetError(f"no layer fits a backward budget of {mem_budget} bytes and {mac_budget} MACs: the last "
                          f"layer's biases need {last.memory} bytes and {last.macs} MACs")
    names = [layer.name for layer in net.layers[min(reach):]]
    fisher = support_fisher(net, names, support, labels, prototypes, scale, seed)
    result = select(graph, net.layers, reach, fisher, mem_budget, mac_budget, momentum, rule)
    result.row_scales = row_scales(result.selection, fisher, rule.precondition, rule.bias_step)
    return result
