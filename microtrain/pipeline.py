"""One adaptation, end to end: accuracy before, method plan, fine-tuning, accuracy after, costs.

Shared by ``python -m microtrain.adapt`` (one task, printed) and ``tools/evaluate.py`` (many
episodes, recorded), so both measure the same thing.

**Keep-best** (``keep_best=True``, what ``adapt`` does unless ``--no-keep-best``) checks, on the
support set only, that the adaptation does not make the network worse, as Hu et al. 2022 (P>M>F,
the fine-tuning procedure the paper adopts, Appendix C) check theirs: part of each class's
support images is held out (``holdout_split``: a fifth, at least one, from classes with two or
more), the method plans and fine-tunes on the rest, and the held-out images are classified
against the prototypes of the rest with the weights before and after. Worse after, by more than
``KEEP_BEST_TOLERANCE`` images (or a loss that turned non-finite): the pre-adaptation weights are
kept and a line says so. Otherwise the
check's weights are discarded and the method adapts again on every support image (Hu et al.
likewise choose on a held-out split, then fine-tune on the whole support set), which is exactly
the run without keep-best. The check costs one more fine-tuning on four fifths of the images;
``tools/keep_best.py`` measured that keeping the check's own weights instead (trained on four
fifths) loses accuracy (README, "Keep-best").
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from .autograd import Program
from .lite_residual import LiteResidualHook
from .method_plan import Budgets, MethodPlan
from .methods import plan_method
from .model import Network
from .selection import Selection
from .tinytrain import backward_macs
from .train import FinetuneConfig, TrainingDiverged, class_prototypes, embed, finetune, prototype_accuracy

HOLDOUT_FRACTION = 0.2
# Held-out images the adapted weights may lose before keep-best calls them worse: one image flips
# within the noise of a ~10-image held-out set. On validation episodes (README, "Keep-best")
# reverting on any drop cost TinyTrain 0.4 points and gained FullTrain 1.6; with this tolerance,
# 0.0 and 2.2 (it still catches FullTrain's DTD collapses and every diverged run).
KEEP_BEST_TOLERANCE = 1


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
                  warn: Callable[[str], None] | None = None, plan: MethodPlan | None = None) -> dict:
    """Adapt ``net`` in place to a support set (uint8 (N, 3, R, R), int64 labels) and score it on
    the query set (the same layout).

    ``keep_best``: check the adaptation on held-out support images first and keep the
    pre-adaptation weights when it makes them worse (module docstring); ``warn(line)`` hears
    that decision (default: ``log``). ``progress(step, total, loss, phase)`` follows each
    fine-tuning ("keep-best check", then "training"). ``plan_buffers``: put every buffer in
    ``plan_table``. ``plan``: a selection the caller decided (an analysis that trains one layer
    at a time) instead of ``plan_method(method)``. Returns a JSON-ready record (non-finite numbers as None): accuracies, the
    selection, planned and allocated memory, backward MACs, the time split (load, selection,
    training, keep-best check; seconds) and the keep-best decision. Raises
    ``train.TrainingDiverged`` when the loss turns non-finite without ``keep_best``."""
    warn = warn or log
    support_embeddings = embed(net, support)
    acc_before = prototype_accuracy(net, support, support_labels, query, query_labels,
                                    support_embeddings=support_embeddings)
    log(f"query accuracy before: {100 * acc_before:.2f}%")
    record = {"method": method, "budgets": {"memory_bytes": budgets.memory, "macs": budgets.macs},
              "forward_macs": net.forward_macs, "accuracy_before": acc_before, "finetune": vars(cfg).copy(),
              "selection": [], "memory": None, "backward_macs": 0, "losses": None, "keep_best": None}
    check_seconds = 0.0
    if keep_best:
        start = time.perf_counter()
        record["keep_best"] = _check(net, support, support_labels, query, query_labels, support_embeddings, method,
                                     budgets, cfg, progress, log, warn)
        check_seconds = time.perf_counter() - start
    if record["keep_best"] is not None and record["keep_best"]["kept"] == "pre-adaptation":
        plan = MethodPlan(method, Selection())  # nothing is trained: the network stays as it was
    else:
        if plan is None:
            plan = plan_method(method, net, support, support_labels, budgets, cfg.scale, cfg.momentum > 0,
                               seed=cfg.seed, embeddings=support_embeddings)
        record["selection_info"] = plan.info
        record["selection"] = [{"layer": n, "channels": k, "out_channels": c, "score": sc}
                               for n, k, c, sc in plan.choices]
        _log_selection(plan, log)
    cfg = _method_config(plan, cfg) if plan.trains else cfg
    # the batch the fine-tuning runs (finetune: at most the support set), so that the record's
    # memory and settings are those of the run
    cfg = dataclasses.replace(cfg, batch=min(cfg.batch, len(support)))
    record["finetune"] = vars(cfg).copy()
    train_seconds = 0.0
    if plan.trains:
        phase = None if progress is None else (lambda *a: progress(*a, phase="training"))
        try:
            result = finetune(net, plan.selection, support, support_labels, cfg, phase, plan.block_hook,
                              plan.row_scales)
        except TrainingDiverged as exc:  # finetune restored the original weights
            if record["keep_best"] is None:
                raise
            record["keep_best"].update(kept="pre-adaptation", diverged_at_step=exc.step)
            warn(f"keep-best: training on every support image diverged at step {exc.step} although the check "
                 "did not: keeping the pre-adaptation weights")
            result = None
        if result is not None:
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
            record["plan_table"] = mem.table(verbose=plan_buffers)
    acc_after = (prototype_accuracy(net, support, support_labels, query, query_labels)
                 if record["losses"] is not None else acc_before)
    end_to_end = load_seconds + plan.seconds + train_seconds + check_seconds
    record.update({"accuracy_after": acc_after,
                   "time_seconds": {"load": load_seconds, "selection": plan.seconds, "training": train_seconds,
                                    "keep_best_check": check_seconds, "end_to_end": end_to_end},
                   "selection_share": plan.seconds / end_to_end if end_to_end else 0.0})
    return json_ready(record)


def adaptation_is_worse(decision: dict, tolerance: int = KEEP_BEST_TOLERANCE) -> bool:
    """Keep-best's rule on a check's record: the loss turned non-finite, or the adapted weights
    classify more than ``tolerance`` fewer held-out images correctly than the weights before."""
    if decision["diverged_at_step"] is not None:
        return True
    return decision["correct_after"] < decision["correct_before"] - tolerance


def _method_config(plan: MethodPlan, cfg: FinetuneConfig) -> FinetuneConfig:
    """The fine-tuning settings with the method's own learning rate (when the user gave none)
    and momentum (SparseUpdate: plain SGD)."""
    return dataclasses.replace(cfg, lr=plan.lr if cfg.lr is None else cfg.lr,
                               momentum=cfg.momentum if plan.momentum is None else plan.momentum)


def _log_selection(plan: MethodPlan, log) -> None:
    if plan.choices:
        log(f"selection ({plan.method}, {plan.seconds:.2f} s):")
        log(f"  {'layer':<24} {'weight rows':>11} {'biases':>7} {'score':>12}")
        for name, kept, total, score in plan.choices:
            upd = plan.selection.get(name)
            biases = len(upd.bias) if upd is not None and upd.trains_bias else 0
            log(f"  {name:<24} {kept:>4} / {total:<4} {biases:>7} {score:>12.4g}")


def _check(net: Network, support, support_labels, query, query_labels, support_embeddings, method, budgets,
           cfg, progress, log, warn) -> dict | None:
    """Keep-best's check: plan and fine-tune on all but the held-out support images, compare the
    held-out accuracy before and after, then put the network back as it was. Returns the
    decision for the report (None when nothing can be held out)."""
    train_idx, held_idx = holdout_split(support_labels, cfg.seed)
    if not len(held_idx):
        warn("keep-best: every class has a single support image, none can be held out: the adaptation "
             "is kept unchecked")
        return None
    ways = int(support_labels.max()) + 1
    train, train_labels = support[train_idx], support_labels[train_idx]
    held_labels = support_labels[held_idx]
    plan = plan_method(method, net, train, train_labels, budgets, cfg.scale, cfg.momentum > 0, seed=cfg.seed,
                       embeddings=support_embeddings[train_idx])
    decision = {"held_out": int(len(held_idx)), "trained_on": int(len(train_idx)),
                "correct_before": None, "correct_after": None, "tolerance": KEEP_BEST_TOLERANCE,
                "accuracy_before": None, "accuracy_after": None, "loss_before": None, "loss_after": None,
                "diverged_at_step": None, "kept": "adapted",
                # the query accuracy of the check's weights (trained on the non-held-out images), with
                # prototypes of every support image: what keeping them instead of adapting again gives
                "query_accuracy_checked": None}
    if not plan.trains:
        return decision
    log(f"keep-best check: {method} on {len(train_idx)} of {len(support_labels)} support images, "
        f"{len(held_idx)} held out")
    acc, loss = held_out_scores(support_embeddings[train_idx], train_labels, support_embeddings[held_idx],
                                held_labels, ways, cfg.scale)
    decision.update(accuracy_before=acc, loss_before=loss, correct_before=int(round(acc * len(held_idx))))
    before = {name: (w.copy(), b.copy()) for name, (w, b) in net.params.items() if name in plan.selection.layers}
    phase = None if progress is None else (lambda *a: progress(*a, phase="keep-best check"))
    try:
        finetune(net, plan.selection, train, train_labels, _method_config(plan, cfg), phase, plan.block_hook,
                 plan.row_scales)
        adapted = embed(net, support, block_hook=plan.block_hook)
        acc, loss = held_out_scores(adapted[train_idx], train_labels, adapted[held_idx], held_labels, ways, cfg.scale)
        decision.update(accuracy_after=acc, loss_after=loss, correct_after=int(round(acc * len(held_idx))),
                        query_accuracy_checked=prototype_accuracy(net, support, support_labels, query, query_labels,
                                                                  plan.block_hook))
    except TrainingDiverged as exc:  # finetune restored the original weights
        decision["diverged_at_step"] = exc.step
    for name, (w, b) in before.items():  # the check's weights are never kept
        net.params[name][0][...] = w
        net.params[name][1][...] = b
    n = len(held_idx)
    what = (f"{decision['correct_before']} of {n} held-out support images right (prototypes of the other "
            f"{len(support) - n}) before adaptation")
    if not adaptation_is_worse(decision):
        log(f"keep-best: {what}, {decision['correct_after']} after: adapting on every support image")
        return decision
    decision["kept"] = "pre-adaptation"
    why = (f"training diverged at step {decision['diverged_at_step']}" if decision["diverged_at_step"] is not None
           else f"{what}, {decision['correct_after']} after")
    warn(f"keep-best: {why}: keeping the pre-adaptation weights (--no-keep-best adapts anyway)")
    return decision


def json_ready(obj):
    """``obj`` with NumPy scalars/arrays as plain Python and non-finite floats as None, so that
    ``json.dumps(..., allow_nan=False)`` writes valid JSON (bare NaN is not JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
