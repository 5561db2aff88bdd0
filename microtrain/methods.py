"""Training methods: what each one trains, decided before fine-tuning starts.

Every method returns a ``MethodPlan`` (``method_plan.py``: a Selection, plus TinyTL's extra branch)
that the same engine, planner and fine-tuning loop run, so their memory and MACs are comparable.
This module lists them all; TinyTL's policy is in ``tinytl.py``, TinyTrain's algorithm in
``tinytrain.py``.
"""
from __future__ import annotations

import time

import numpy as np

from . import tinytrain, tinytrain_plus
from .data import augment, to_input
from .method_plan import Budgets, MethodPlan
from .model import Network
from .selection import LayerUpdate, Selection
from .tinytl import plan_tinytl
from .train import class_prototypes, embed

METHODS = ("none", "lastlayer", "fulltrain", "sparseupdate", "tinytl", "tinytrain",
           "tinytrain-fisher", "tinytrain-random", "tinytrain-l2", "tinytrain-plus", "sparseupdate-fisher")

# Learning rate of each method when the user gives none, from the validation sweeps of
# tools/tune_finetune.py (README, "Fine-tuning defaults"). Full updates of these BN-folded
# networks at batch 1 collapse at rates that suit a sparse update.
DEFAULT_LR = {"tinytrain": 3e-3, "fulltrain": 1e-4, "lastlayer": 3e-3, "sparseupdate": 3e-3, "tinytl": 1e-4,
              "none": 0.0}


def default_lr(method: str) -> float:
    """The method's fine-tuning learning rate at batch 1 (``DEFAULT_LR``; TinyTrain+'s from its rule);
    a variant such as 'tinytrain-random' takes its family's. Raises KeyError for an unknown method."""
    if method == "tinytrain-plus":
        return tinytrain_plus.PlusRule().lr
    return DEFAULT_LR[method.partition("-")[0]]


# MCUNetV3's SparseUpdate, ~100 KB scheme (configurations in the checkpoints README): biases of the
# last N convs, and weights of the listed convs (by conv index) on `kept` input channels.
SPARSE_UPDATE = {
    "mcunet-5fps": (22, {21: 40, 24: 48, 27: 48, 30: 48, 36: 12, 39: 24}),
    "mbv2-w0.35": (25, {27: 24, 30: 24, 33: 32, 36: 32, 39: 32, 42: 7, 45: 28, 48: 56}),
    "proxyless-w0.3": (25, {36: 32, 39: 16, 42: 32, 45: 32, 48: 16, 51: 32, 54: 64, 57: 64}),
}


def plan_method(method: str, net: Network, support: np.ndarray, labels: np.ndarray, budgets: Budgets,
                scale: float, momentum: bool, seed: int = 0, embeddings: np.ndarray | None = None) -> MethodPlan:
    """Decide what ``method`` trains on this support set (uint8 images, int64 labels).
    ``embeddings`` are the support set's embeddings when the caller already has them."""
    start = time.perf_counter()
    if method == "none":
        plan = MethodPlan(method, Selection())
    elif method == "lastlayer":
        last = net.layers[-1]
        plan = MethodPlan(method, full_update(net, [last.name]))
    elif method == "fulltrain":
        plan = MethodPlan(method, full_update(net, [layer.name for layer in net.layers]))
    elif method == "sparseupdate":
        plan = plan_sparse_update(net)
    elif method == "sparseupdate-fisher":
        plan = plan_sparse_update_fisher(net, support, labels, scale, seed, embeddings=embeddings)
    elif method == "tinytl":
        plan = plan_tinytl(net, seed)
    elif method.partition(":")[0] == "tinytrain-plus":
        # "tinytrain-plus:reach=0.7/groups=4" runs a variant of the rule (the design log's syntax)
        plan = plan_tinytrain_plus(net, support, labels, budgets, scale, seed, embeddings=embeddings,
                                   rule=tinytrain_plus.PlusRule.parse(method.partition(":")[2]))
        plan.method = method
    elif method.startswith("tinytrain"):
        variant = method.partition("-")[2]
        plan = plan_tinytrain(net, support, labels, budgets, scale, momentum, seed, embeddings=embeddings,
                              use_costs=variant != "fisher",
                              static_channels=variant if variant in ("random", "l2") else None)
        plan.method = method
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    plan.seconds = time.perf_counter() - start
    plan.lr = plan.lr or default_lr(method)
    return plan


def plan_sparse_update(net: Network, channel_scores: dict[str, np.ndarray] | None = None) -> MethodPlan:
    """MCUNetV3's static policy: biases of the last N convs; listed convs' weights on the input
    channels with the largest weight L2 norm, chosen once; plain SGD. ``channel_scores`` (layer ->
    (C_in,) float) ranks each listed conv's input channels instead of the L2 norm (the same layers
    and channel counts, so the same backward memory and MACs)."""
    if net.base_name not in SPARSE_UPDATE:
        raise ValueError(f"no SparseUpdate configuration for {net.name!r} (have {', '.join(SPARSE_UPDATE)})")
    n_bias, weights = SPARSE_UPDATE[net.base_name]
    chosen = {layer.name: LayerUpdate.bias_only(layer.out_channels) for layer in net.layers[-n_bias:]}
    choices = []
    for index, kept in weights.items():
        layer = net.layers[index]
        w = net.params[layer.name][0]
        if layer.kind == "depthwise":  # a depthwise input channel is its output channel
            norms = np.linalg.norm(w.reshape(len(w), -1), axis=1)
        else:
            norms = np.linalg.norm(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), axis=1)
        if channel_scores is not None:
            norms = channel_scores[layer.name]
        top = np.sort(np.argsort(-norms, kind="stable")[:kept])
        if layer.kind == "depthwise":
            chosen[layer.name] = LayerUpdate.channels(top)
        else:
            everything = LayerUpdate.full(layer.out_channels)
            chosen[layer.name] = LayerUpdate(everything.weight, everything.bias, None if kept == layer.in_channels else top)
        choices.append((layer.name, kept, layer.in_channels, float("nan")))
    return MethodPlan("sparseupdate", Selection(chosen), choices=choices, momentum=0.0,
                      info={"bias_layers": n_bias, "weight_layers": {net.layers[i].name: k for i, k in weights.items()}})


def plan_sparse_update_fisher(net: Network, support: np.ndarray, labels: np.ndarray, scale: float, seed: int,
                              embeddings: np.ndarray | None = None) -> MethodPlan:
    """SparseUpdate's layers and channel counts with each listed conv's input channels chosen on
    the device for this task: by their measured Fisher information (``tinytrain_plus.measured_fisher``,
    one backward per augmented support image) instead of the weights' L2 norm. The paper's claim
    that dynamic channels beat static ones (Figures 4, 6b), at SparseUpdate's own cost."""
    _, weights = SPARSE_UPDATE.get(net.base_name, (0, {}))
    names = [net.layers[i].name for i in sorted(weights)]
    ways = int(labels.max()) + 1
    protos = class_prototypes(embed(net, support) if embeddings is None else embeddings, labels, ways)
    fisher = tinytrain_plus.support_fisher(net, names, support, labels, protos, scale, seed) if names else {}
    plan = plan_sparse_update(net, {name: f.cols for name, f in fisher.items()} if names else None)
    plan.method = "sparseupdate-fisher"
    return plan


def support_fisher(net: Network, support: np.ndarray, labels: np.ndarray, scale: float, rng: np.random.Generator,
                   embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """TinyTrain's Fisher information Delta_o (Eq. 2) of every conv layer on a support set (uint8
    (N, 3, R, R), int64 labels): the gradients are those of the fine-tuning loss, augmented support
    images (drawn from ``rng``) as pseudo-queries against the support prototypes."""
    protos = class_prototypes(embed(net, support) if embeddings is None else embeddings, labels,
                              int(labels.max()) + 1)
    pseudo_queries = lambda chunk: to_input(np.stack([augment(img, rng) for img in chunk]))  # noqa: E731
    return tinytrain.fisher_information(net, support, labels, protos, scale, prepare=pseudo_queries)


def plan_tinytrain(net: Network, support: np.ndarray, labels: np.ndarray, budgets: Budgets, scale: float,
                   momentum: bool, seed: int, use_costs: bool = True, static_channels: str | None = None,
                   embeddings: np.ndarray | None = None) -> MethodPlan:
    """Fisher potential on one pass over the support set, Eq. 3 scores, budgeted selection.

    Ablations: ``use_costs=False`` ranks layers by Fisher potential alone; ``static_channels``
    ('random' or 'l2') keeps TinyTrain's layers and channel counts but picks the channels at random
    or by the L2 norm of their weights instead of by Fisher information."""
    ways = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    delta = support_fisher(net, support, labels, scale, rng, embeddings)
    potential = tinytrain.fisher_potential(delta)
    scores = tinytrain.multi_objective_scores(net.layers, potential, use_costs)
    graph = net.protonet_graph(1, ways, scale)
    result = tinytrain.select(graph, net.layers, delta, scores, budgets.memory, budgets.macs, momentum)
    if static_channels is not None:
        result.selection = _static_channels(net, result.selection, static_channels, rng)
    choices = [(c.name, len(c.channels), c.out_channels, c.score) for c in result.choices]
    return MethodPlan("tinytrain", result.selection, choices=choices,
                      info={"planned_backward_bytes": result.costs.memory, "backward_macs": result.costs.macs,
                            "potential": potential, "scores": scores})


def plan_tinytrain_plus(net: Network, support: np.ndarray, labels: np.ndarray, budgets: Budgets, scale: float,
                        seed: int, embeddings: np.ndarray | None = None, rule=None) -> MethodPlan:
    """TinyTrain+ (``microtrain.tinytrain_plus``): biases of every layer the backward reaches plus
    the weight channel groups with the most measured Fisher information per unit of both budgets.
    ``rule`` (a ``PlusRule``) overrides the validated defaults, including the learning rate and
    momentum fine-tuning uses."""
    rule = tinytrain_plus.PlusRule() if rule is None else rule
    ways = int(labels.max()) + 1
    protos = class_prototypes(embed(net, support) if embeddings is None else embeddings, labels, ways)
    result = tinytrain_plus.plan(net, support, labels, budgets.memory, budgets.macs, scale, rule.momentum > 0, seed, protos, rule)
    # (layer, weight rows trained, out channels, their Fisher value): every layer from the depth on
    # trains its biases, some also weight rows
    worth = {}
    for g in result.groups:
        worth[g.layer] = worth.get(g.layer, 0.0) + g.value
    choices = [(name, 0 if upd.weight is None else len(upd.weight), net.layer(name).out_channels,
                worth.get(name, 0.0)) for name, upd in result.selection.layers.items()]
    return MethodPlan("tinytrain-plus", result.selection, choices=choices, momentum=rule.momentum, lr=rule.lr,
                      row_scales=result.row_scales,
                      info={"planned_backward_bytes": result.costs.memory, "backward_macs": result.costs.macs,
                            "depth": net.layers[result.depth].name, "fisher_value": result.value,
                            "rule": rule.text(),
                            "value_by_depth": {net.layers[d].name: v for d, v in result.by_depth.items()}})


def _static_channels(net: Network, selection: Selection, how: str, rng: np.random.Generator) -> Selection:
    """The same layers and channel counts, channels chosen without the task: at random, or by the
    largest L2 norm of each output channel's weights."""
    chosen = {}
    for name, upd in selection.layers.items():
        w = net.params[name][0]
        k = len(upd.weight)
        if how == "random":
            rows = rng.choice(len(w), size=k, replace=False)
        elif how == "l2":
            rows = np.argsort(-np.linalg.norm(w.reshape(len(w), -1), axis=1), kind="stable")[:k]
        else:
            raise ValueError(f"unknown static channel choice {how!r}")
        chosen[name] = LayerUpdate.channels(rows)
    return Selection(chosen)


def full_update(net: Network, names: list[str]) -> Selection:
    """Every weight and bias of the named conv layers (FullTrain's, LastLayer's selections)."""
    return Selection({n: LayerUpdate.full(net.layer(n).out_channels) for n in names})
