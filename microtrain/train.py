"""Sparse fine-tuning with a cosine prototype head (paper Appendix C, after Hu et al. 2022).

Each pass over the support set first recomputes the class prototypes (mean of L2-normalised
support embeddings, normalised again) without gradients, then trains on augmented support images
as pseudo-queries against them: scaled cosine logits, softmax cross-entropy, SGD on the selected
rows only. Everything a step touches lives in the executor's one planned arena.
"""
from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .autograd import Executor
from .data import augment, to_input
from .model import Network
from .optim import SGD
from .selection import Selection


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the network's weights were restored."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}: training stopped, original weights kept")
        self.step = step


@dataclass
class FinetuneConfig:
    """How a selection is fine-tuned on the support set (``finetune``); defaults as
    README "Fine-tuning defaults" describes how they were chosen on validation episodes."""

    epochs: int = 40  # passes over the support set (the paper: 40 iterations)
    lr: float | None = None  # None: the method's own default (methods.DEFAULT_LR)
    momentum: float = 0.9
    weight_decay: float = 0.0
    scale: float = 10.0  # cosine logits are multiplied by this
    batch: int = 1  # pseudo-queries per step, 1 as on the paper's devices
    seed: int = 0


@dataclass
class FinetuneResult:
    """What ``finetune`` did: optimizer steps taken, the loss of each step's pseudo-queries (nats), the
    planned arena (bytes) and its plan (memory.Plan, printable), and wall time (seconds)."""

    steps: int
    losses: list[float]
    arena_bytes: int
    plan: object
    seconds: float
    step_allocations: int = 0  # bytes NumPy allocated outside the arena in one measured step
    extra: dict = field(default_factory=dict)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, C) scaled to unit L2 norm (a zero row stays zero); dtype kept."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, ways: int) -> np.ndarray:
    """(ways, C) float32: per class, the mean of normalised embeddings, normalised."""
    z = normalize_rows(embeddings.astype(np.float64))
    protos = np.stack([z[labels == k].mean(axis=0) for k in range(ways)])
    return normalize_rows(protos).astype(np.float32)


def embed(net: Network, images: np.ndarray, batch: int = 4, block_hook=None) -> np.ndarray:
    """Embeddings (N, C) of uint8 images (N, 3, R, R), converted a batch at a time."""
    out = np.empty((len(images), net.embedding_size), np.float32)
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        out[start:start + len(chunk)] = net.features(to_input(chunk), batch_size=batch, block_hook=block_hook)
    return out


def prototype_accuracy(net: Network, support: np.ndarray, support_labels: np.ndarray,
                       query: np.ndarray, query_labels: np.ndarray, block_hook=None,
                       support_embeddings: np.ndarray | None = None) -> float:
    """Query accuracy of nearest-prototype (cosine) classification."""
    ways = int(support_labels.max()) + 1
    if support_embeddings is None:
        support_embeddings = embed(net, support, block_hook=block_hook)
    protos = class_prototypes(support_embeddings, support_labels, ways)
    z = normalize_rows(embed(net, query, block_hook=block_hook))
    return float(np.mean(np.argmax(z @ protos.T, axis=1) == query_labels))


def _traced_bytes(work) -> int:
    """Peak bytes Python and NumPy allocate while ``work`` runs (NumPy reports to tracemalloc):
    what a backward pass and optimizer step use outside the planned arena."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _embed_in_arena(run: Executor, images: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Normalised embeddings of uint8 images through the training graph's forward (no saving),
    so prototypes are computed inside the same arena, with whatever the graph adds (TinyTL)."""
    x = run.value("image")
    batch = len(x)
    no_labels = np.zeros((batch,), np.int64)
    out = np.empty((len(images), protos.shape[1]), np.float32)
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        to_input(chunk, out=x[:len(chunk)])
        run.forward({"prototypes": protos, "labels": no_labels}, train=False)
        out[start:start + len(chunk)] = run.value("normalize")[:len(chunk)]
    return out


def finetune(net: Network, selection: Selection, support: np.ndarray, labels: np.ndarray,
             cfg: FinetuneConfig, progress: Callable[[int, int, float], None] | None = None,
             block_hook=None, row_scales: dict | None = None) -> FinetuneResult:
    """Fine-tune the selected rows of ``net`` in place on a support set (uint8 (N, 3, R, R)).
    ``row_scales`` multiplies each trained channel's step (``optim.SGD``).

    Each of ``cfg.epochs`` passes takes ceil(N / B) steps of B = min(cfg.batch, N) pseudo-queries
    (a batch larger than the support set is the whole set, as a data loader would give it). Every
    image is trained on once per pass, in a shuffled order; when B does not divide N, the last
    step's batch is completed with images of the pass's earlier steps, drawn at random, so every
    step has B images (the planned arena is for B)."""
    if cfg.lr is None:
        raise ValueError("finetune needs a learning rate: resolve the method's default first (methods.DEFAULT_LR)")
    ways = int(labels.max()) + 1
    n = len(support)
    batch = min(cfg.batch, n)
    graph = net.protonet_graph(batch, ways, cfg.scale, block_hook)
    run = Executor(graph, selection, momentum=cfg.momentum > 0)
    opt = SGD(cfg.lr, cfg.momentum, cfg.weight_decay, row_scales)
    backup = [(node, node.weight.copy(), node.bias.copy()) for node, _ in run.trained()]
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = -(-n // batch)
    total = cfg.epochs * steps_per_epoch
    losses: list[float] = []
    x = run.value("image")  # images are written straight into the arena's input buffer
    protos = np.zeros((ways, net.embedding_size), np.float32)
    start = time.perf_counter()
    step, outside = 0, 0
    for _ in range(cfg.epochs):
        protos = class_prototypes(_embed_in_arena(run, support, protos), labels, ways)
        order = rng.permutation(n)
        if n % batch:
            order = np.concatenate([order, rng.choice(order[:n - n % batch], batch - n % batch, replace=False)])
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            for j, i in enumerate(idx):
                to_input(augment(support[i], rng)[None], out=x[j:j + 1])
            loss = run.forward({"prototypes": protos, "labels": labels[idx]})
            step += 1
            if not np.isfinite(loss):
                for node, w, b in backup:
                    node.weight[...] = w
                    node.bias[...] = b
                raise TrainingDiverged(step, loss)
            if step == 1:
                outside = _traced_bytes(lambda: (run.backward(), opt.step(run)))
            else:
                run.backward()
                opt.step(run)
            losses.append(loss)
            if progress is not None:
                progress(step, total, loss)
    return FinetuneResult(step, losses, run.arena.nbytes, run.plan, time.perf_counter() - start, outside)
