"""Training methods: what each one trains, decided before fine-tuning starts.

Every method returns a ``MethodPlan`` (a Selection, plus TinyTL's extra branch) that the same
engine, planner and fine-tuning loop run, so their memory and MACs are comparable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import tinytrain
from .data import augment, to_input
from .model import Network
from .selection import LayerUpdate, Selection
from .train import class_prototypes, embed

METHODS = ("none", "tinytrain")


@dataclass
class Budgets:
    memory: int  # bytes of backward memory
    macs: int  # backward MACs


@dataclass
class MethodPlan:
    method: str
    selection: Selection
    block_hook: object = None  # graph rewrite of each block (TinyTL)
    choices: list = field(default_factory=list)  # (layer, channels kept, out channels, score)
    seconds: float = 0.0  # time spent deciding (Fisher + selection for TinyTrain)
    info: dict = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return len(self.selection) > 0


def plan_method(method: str, net: Network, support: np.ndarray, labels: np.ndarray, budgets: Budgets,
                scale: float, momentum: bool, seed: int = 0, embeddings: np.ndarray | None = None) -> MethodPlan:
    """Decide what ``method`` trains on this support set (uint8 images, int64 labels).
    ``embeddings`` are the support set's embeddings when the caller already has them."""
    start = time.perf_counter()
    if method == "none":
        plan = MethodPlan(method, Selection())
    elif method == "tinytrain":
        plan = plan_tinytrain(net, support, labels, budgets, scale, momentum, seed, embeddings=embeddings)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    plan.seconds = time.perf_counter() - start
    return plan


def plan_tinytrain(net: Network, support: np.ndarray, labels: np.ndarray, budgets: Budgets, scale: float,
                   momentum: bool, seed: int, use_costs: bool = True,
                   channel_order: dict[str, np.ndarray] | None = None,
                   embeddings: np.ndarray | None = None) -> MethodPlan:
    """Fisher potential on one pass over the support set, Eq. 3 scores, budgeted selection."""
    ways = int(labels.max()) + 1
    protos = class_prototypes(embed(net, support) if embeddings is None else embeddings, labels, ways)
    # The gradients are those of the fine-tuning loss: augmented support images as pseudo-queries.
    rng = np.random.default_rng(seed)
    pseudo_queries = lambda chunk: to_input(np.stack([augment(img, rng) for img in chunk]))  # noqa: E731
    delta = tinytrain.fisher_information(net, support, labels, protos, scale, prepare=pseudo_queries)
    potential = tinytrain.fisher_potential(delta)
    scores = tinytrain.multi_objective_scores(net.layers, potential, use_costs)
    graph = net.protonet_graph(1, ways, scale)
    result = tinytrain.select(graph, net.layers, delta, scores, budgets.memory, budgets.macs, momentum,
                              channel_order=channel_order)
    choices = [(c.name, len(c.channels), c.out_channels, c.score) for c in result.choices]
    return MethodPlan("tinytrain", result.selection, choices=choices,
                      info={"planned_backward_bytes": result.costs.memory, "backward_macs": result.costs.macs,
                            "potential": potential, "scores": scores})


def full_update(net: Network, names: list[str]) -> Selection:
    return Selection({n: LayerUpdate.full(net.layer(n).out_channels) for n in names})
