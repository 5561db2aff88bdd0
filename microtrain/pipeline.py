"""One adaptation, end to end: accuracy before, method plan, fine-tuning, accuracy after, costs.

Shared by ``python -m microtrain.adapt`` (one task, printed) and ``tools/evaluate.py`` (many
episodes, recorded), so both measure the same thing.

**Keep-best** (``keep_best=True``, what ``adapt`` does unless ``--no-keep-best``): a check that
the adaptation did not make the network worse, using the support set only. Part of each class's
support images (``holdout_split``: a fifth, at least one, from classes with two or more) is held
out; the method plans and fine-tunes on the rest; the held-out images are then classified
against prototypes of the rest, with the pre-adaptation and with the adapted weights. When the
adapted weights are worse there (or training diverged), the pre-adaptation weights are kept and
a line says so. The final prototypes use every support image. This is the validation of Hu et
al. 2022 (P>M>F, the fine-tuning procedure the paper adopts, Appendix C), which holds out
support images to decide whether fine-tuning helps a task (their learning rate 0 = no
fine-tuning), reduced to one decision: keep the adapted weights, or the ones before.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from .autograd import Program
from .lite_residual import LiteResidualHook
from .methods import Budgets, plan_method
from .model import Network
from .tinytrain import backward_macs
from .train import FinetuneConfig, TrainingDiverged, class_prototypes, embed, finetune, prototype_accuracy

HOLDOUT_FRACTION = 0.2


def holdout_split(labels: np.ndarray, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out), both sorted int64, of a support set with int64 labels (N,).

    From every class with at least 2 images, ``max(1, round(fraction * n))`` images (never all)
    are held out, chosen by ``numpy.random.default_rng(seed)``; a class with one image keeps it
    for training. ``held_out`` is empty when no class has two images."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        if len(members) >= 2:
            count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
            held.extend(rng.choice(members, size=count, replace=False).tolist())
    held_out = np.sort(np.array(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out)
    return train, held_out


def held_out_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                    ways: int, scale: float) -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of embeddings ``test`` (M, C) against the cosine
    prototypes of embeddings ``train`` (N, C): the fine-tuning loss and its accuracy, on images
    not trained on."""
    protos = class_prototypes(train, train_labels, ways)
    z = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    logits = scale * (z @ protos.T).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_p[np.arange(len(test_labels)), test_labels].mean())
    return float(np.mean(np.argmax(logits, axis=1) == test_labels)), loss


def adapt_episode(net: Network, support: np.ndarray, support_labels: np.ndarray, query: np.ndarray,
                  query_labels: np.ndarray, method: str, budgets: Budgets, cfg: FinetuneConfig,
                  log: Callable[[str], None] = lambda line: None, progress=None,
                  load_seconds: float = 0.0, keep_best: bool = False, plan_buffers: bool = False,
                  warn: Callable[[str], None] | None = None) -> dict:
    """Adapt ``net`` in place to a support set (uint8 (N, 3, R, R), int64 labels) and score it on
    the query set (the same layout).

    ``keep_best``: validate on held-out support images and keep the pre-adaptation weights when
    the adapted ones are worse (module docstring); ``warn(line)`` hears that decision (default:
    ``log``). ``plan_buffers``: put every buffer in ``plan_table``. Returns a JSON-ready record
    (non-finite numbers as None): accuracies, the selection, planned and allocated memory,
    backward MACs, the time split (load, selection, training, seconds) and the keep-best decision.
    Raises ``train.TrainingDiverged`` when the loss turns non-finite without ``keep_best``."""
    warn = warn or log
    ways = int(support_labels.max()) + 1
    support_embeddings = embed(net, support)
    acc_before = prototype_accuracy(net, support, support_labels, query, query_labels,
                                    support_embeddings=support_embeddings)
    log(f"query accuracy before: {100 * acc_before:.2f}%")
    train_idx, held_idx = np.arange(len(support)), np.zeros(0, np.int64)
    if keep_best:
        train_idx, held_idx = holdout_split(support_labels, cfg.seed)
        if not len(held_idx):
            warn("keep-best: every class has a single support image, none can be held out: the adapted "
                 "weights are kept unchecked")
            keep_best = False
    train_images, train_labels = support[train_idx], support_labels[train_idx]
    plan = plan_method(method, net, train_images, train_labels, budgets, cfg.scale, cfg.momentum > 0,
                       seed=cfg.seed, embeddings=support_embeddings[train_idx])
    record = {"method": method, "budgets": {"memory_bytes": budgets.memory, "macs": budgets.macs},
              "forward_macs": net.forward_macs, "accuracy_before": acc_before, "finetune": vars(cfg).copy(),
              "selection": [{"layer": n, "channels": k, "out_channels": c, "score": s}
                            for n, k, c, s in plan.choices],
              "memory": None, "backward_macs": 0, "losses": None, "keep_best": None}
    if plan.choices:
        log(f"selection ({method}, {plan.seconds:.2f} s):")
        log(f"  {'layer':<24} {'channels':>11} {'score':>12}")
        for name, kept, total, score in plan.choices:
            log(f"  {name:<24} {kept:>4} / {total:<4} {score:>12.4g}")
    train_seconds = 0.0
    cfg = dataclasses.replace(cfg, lr=plan.lr if cfg.lr is None else cfg.lr,
                              momentum=cfg.momentum if plan.momentum is None else plan.momentum)
    record["finetune"] = vars(cfg).copy()
    if plan.trains:
        before = {name: (w.copy(), b.copy()) for name, (w, b) in net.params.items() if name in plan.selection.layers}
        diverged = None
        try:
            result = finetune(net, plan.selection, train_images, train_labels, cfg, progress, plan.block_hook)
        except TrainingDiverged as exc:
            if not keep_best:
                raise
            diverged, result = exc, None  # finetune restored the original weights
        if result is not None:
            train_seconds = result.seconds
            mem = result.plan
            graph = net.protonet_graph(cfg.batch, ways, cfg.scale, plan.block_hook)
            record["backward_macs"] = backward_macs(Program(graph, plan.selection, cfg.momentum > 0))
            record["memory"] = {"backward_planned_bytes": mem.backward_bytes,
                                "arena_planned_bytes": mem.arena_bytes,
                                "arena_allocated_bytes": result.arena_bytes,
                                "outside_arena_step_bytes": result.step_allocations,
                                "categories": {c: mem.category_bytes(c) for c in mem.by_category(0)},
                                "no_reuse_bytes": mem.naive_bytes}
            record["losses"] = {"first": result.losses[0], "last": result.losses[-1], "steps": result.steps}
            record["plan_table"] = mem.table(verbose=plan_buffers)
        kept = True
        if keep_best:
            record["keep_best"] = _keep_best(net, plan.block_hook, support, support_labels, train_idx, held_idx,
                                             support_embeddings, ways, cfg.scale, before, diverged, query,
                                             query_labels, log, warn)
            kept = record["keep_best"]["kept"] == "adapted"
        if kept and isinstance(plan.block_hook, LiteResidualHook):
            net.attach_lite_residual(plan.block_hook)  # the adapted network: backbone + trained branches
    acc_after = (prototype_accuracy(net, support, support_labels, query, query_labels)
                 if plan.trains else acc_before)
    end_to_end = load_seconds + plan.seconds + train_seconds
    record.update({"accuracy_after": acc_after,
                   "time_seconds": {"load": load_seconds, "selection": plan.seconds, "training": train_seconds,
                                    "end_to_end": end_to_end},
                   "selection_share": plan.seconds / end_to_end if end_to_end else 0.0})
    return json_ready(record)


def _keep_best(net: Network, hook, support, support_labels, train_idx, held_idx, support_embeddings, ways, scale,
               before, diverged, query, query_labels, log, warn) -> dict:
    """Compare held-out support accuracy before and after adaptation (``hook``: TinyTL's branches,
    or None); restore ``before`` (layer name -> (weight, bias) copies) when the adapted network is
    worse. Returns the decision for the report."""
    held_labels = support_labels[held_idx]
    acc_before, loss_before = held_out_scores(support_embeddings[train_idx], support_labels[train_idx],
                                              support_embeddings[held_idx], held_labels, ways, scale)
    acc_after = loss_after = None
    if diverged is None:
        adapted = embed(net, support, block_hook=hook)
        acc_after, loss_after = held_out_scores(adapted[train_idx], support_labels[train_idx], adapted[held_idx],
                                                held_labels, ways, scale)
    decision = {"held_out": int(len(held_idx)), "trained_on": int(len(train_idx)),
                "accuracy_before": acc_before, "accuracy_after": acc_after,
                "loss_before": loss_before, "loss_after": loss_after,
                "diverged_at_step": None if diverged is None else diverged.step,
                "kept": "adapted", "query_accuracy_adapted": None}
    what = f"held-out support accuracy {100 * acc_before:.1f}% before adaptation"
    if diverged is None and acc_after >= acc_before:
        log(f"keep-best: {what}, {100 * acc_after:.1f}% after ({len(held_idx)} of {len(support_labels)} support "
            "images held out from training): keeping the adapted weights")
        return decision
    if diverged is None:  # what the query set would have said, for the report
        decision["query_accuracy_adapted"] = prototype_accuracy(net, support, support_labels, query, query_labels,
                                                                hook)
    for name, (w, b) in before.items():
        net.params[name][0][...] = w
        net.params[name][1][...] = b
    decision["kept"] = "pre-adaptation"
    why = (f"training diverged at step {diverged.step}" if diverged is not None
           else f"{what}, {100 * acc_after:.1f}% after")
    warn(f"keep-best: {why}: keeping the pre-adaptation weights (--no-keep-best keeps the adapted ones)")
    return decision


def json_ready(obj):
    """``obj`` with NumPy scalars/arrays as plain Python and non-finite floats as None, so that
    ``json.dumps(..., allow_nan=False)`` writes valid JSON (bare NaN is not JSON)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
