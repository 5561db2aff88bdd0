"""One adaptation, end to end: accuracy before, method plan, fine-tuning, accuracy after, costs.

Shared by ``python -m microtrain.adapt`` (one task, printed) and ``tools/evaluate.py`` (many
episodes, recorded), so both measure the same thing.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from .autograd import Program
from .lite_residual import LiteResidualHook
from .methods import Budgets, plan_method
from .model import Network
from .tinytrain import backward_macs
from .train import FinetuneConfig, embed, finetune, prototype_accuracy


def adapt_episode(net: Network, support: np.ndarray, support_labels: np.ndarray, query: np.ndarray,
                  query_labels: np.ndarray, method: str, budgets: Budgets, cfg: FinetuneConfig,
                  log: Callable[[str], None] = lambda line: None, progress=None,
                  load_seconds: float = 0.0) -> dict:
    """Adapt ``net`` in place to a support set (uint8 (N, 3, R, R)) and score it on the query set.

    Returns a JSON-ready record: accuracies, the selection, planned and allocated memory, backward
    MACs, and the time split (load, selection, training) with the selection's share of it.
    """
    support_embeddings = embed(net, support)
    acc_before = prototype_accuracy(net, support, support_labels, query, query_labels,
                                    support_embeddings=support_embeddings)
    log(f"query accuracy before: {100 * acc_before:.2f}%")
    plan = plan_method(method, net, support, support_labels, budgets, cfg.scale, cfg.momentum > 0,
                       seed=cfg.seed, embeddings=support_embeddings)
    record = {"method": method, "budgets": {"memory_bytes": budgets.memory, "macs": budgets.macs},
              "forward_macs": net.forward_macs, "accuracy_before": acc_before, "finetune": vars(cfg).copy(),
              "selection": [{"layer": n, "channels": k, "out_channels": c, "score": s}
                            for n, k, c, s in plan.choices],
              "memory": None, "backward_macs": 0, "losses": None}
    if plan.choices:
        log(f"selection ({method}, {plan.seconds:.2f} s):")
        log(f"  {'layer':<24} {'channels':>11} {'score':>12}")
        for name, kept, total, score in plan.choices:
            log(f"  {name:<24} {kept:>4} / {total:<4} {score:>12.4g}")
    train_seconds = 0.0
    # the batch the fine-tuning runs (finetune: at most the support set), so that the record's
    # memory and settings are those of the run
    cfg = dataclasses.replace(cfg, lr=plan.lr if cfg.lr is None else cfg.lr,
                              momentum=cfg.momentum if plan.momentum is None else plan.momentum,
                              batch=min(cfg.batch, len(support)))
    record["finetune"] = vars(cfg).copy()
    if plan.trains:
        result = finetune(net, plan.selection, support, support_labels, cfg, progress, plan.block_hook)
        if isinstance(plan.block_hook, LiteResidualHook):
            net.attach_lite_residual(plan.block_hook)  # the adapted network: backbone + trained branches
        train_seconds = result.seconds
        mem = result.plan
        graph = net.protonet_graph(cfg.batch, int(support_labels.max()) + 1, cfg.scale, plan.block_hook)
        record["backward_macs"] = backward_macs(Program(graph, plan.selection, cfg.momentum > 0))
        record["memory"] = {"backward_planned_bytes": mem.backward_bytes,
                            "arena_planned_bytes": mem.arena_bytes,
                            "arena_allocated_bytes": result.arena_bytes,
                            "outside_arena_step_bytes": result.step_allocations,
                            "categories": {c: mem.category_bytes(c) for c in mem.by_category(0)},
                            "no_reuse_bytes": mem.naive_bytes}
        record["losses"] = {"first": result.losses[0], "last": result.losses[-1], "steps": result.steps}
        record["plan_table"] = mem.table()
    acc_after = (prototype_accuracy(net, support, support_labels, query, query_labels, plan.block_hook)
                 if plan.trains else acc_before)
    end_to_end = load_seconds + plan.seconds + train_seconds
    record.update({"accuracy_after": acc_after,
                   "time_seconds": {"load": load_seconds, "selection": plan.seconds, "training": train_seconds,
                                    "end_to_end": end_to_end},
                   "selection_share": plan.seconds / end_to_end if end_to_end else 0.0})
    return record
