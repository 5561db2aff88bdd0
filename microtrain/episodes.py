"""Few-shot episodes: the quick fixed way/shot sampler, the Meta-Dataset sampler, folder pairs.

An :class:`Episode` holds item references only (nothing decoded). ``episode.load(R)`` returns
an :class:`EpisodeImages` with the support and query images decoded once, cached as uint8
``(N, 3, R, R)``; convert one batch at a time with :func:`microtrain.data.to_input`.

Labels are ``0 .. way-1`` in the order of ``episode.classes`` (the dataset's sorted order).
Support and query items are grouped by class; training code shuffles with its own rng.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .data import DataError, Dataset, open_dataset, to_input

__all__ = ["Episode", "EpisodeImages", "sample_episode", "sample_metadataset_episode",
           "from_folders"]


@dataclass(eq=False)
class Episode:
    """One few-shot task: class names, support/query item references and int64 labels."""

    classes: list[str]
    support: list
    support_labels: np.ndarray
    query: list
    query_labels: np.ndarray
    seed: object = None
    support_dataset: Dataset | None = field(default=None, repr=False)
    query_dataset: Dataset | None = field(default=None, repr=False)

    @property
    def way(self) -> int:
        """Number of classes (ways) in the episode."""
        return len(self.classes)

    @property
    def shots(self) -> np.ndarray:
        """Support images per class (int64, one per class)."""
        return np.bincount(self.support_labels, minlength=self.way)

    @property
    def query_shots(self) -> np.ndarray:
        """Query images per class (int64, one per class)."""
        return np.bincount(self.query_labels, minlength=self.way)

    def __repr__(self) -> str:
        return (f"Episode(way={self.way}, support={len(self.support)}, "
                f"query={len(self.query)}, seed={self.seed!r})")

    def load(self, resolution: int) -> "EpisodeImages":
        """Decode every support and query image once at ``resolution``."""
        return EpisodeImages(self, resolution)


class EpisodeImages:
    """An episode's images decoded once and kept as uint8 ``(N, 3, R, R)``.

    A 500-image support set at 128x128 is 24.6 MB as uint8 (98 MB as float32), so images
    stay uint8 here and :meth:`batches` / :meth:`support_input` / :meth:`query_input`
    convert only what is asked for. ``load_seconds`` is the decode+resize wall time.
    """

    def __init__(self, episode: Episode, resolution: int):
        if episode.support_dataset is None or episode.query_dataset is None:
            raise DataError("episode has no dataset to load its images from")
        start = time.perf_counter()
        self.classes = list(episode.classes)
        self.seed = episode.seed
        self.resolution = int(resolution)
        self.support = episode.support_dataset.load_many(episode.support, resolution)
        self.query = episode.query_dataset.load_many(episode.query, resolution)
        self.support_labels = np.asarray(episode.support_labels, dtype=np.int64)
        self.query_labels = np.asarray(episode.query_labels, dtype=np.int64)
        self.load_seconds = time.perf_counter() - start

    @property
    def way(self) -> int:
        """Number of classes (ways)."""
        return len(self.classes)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded uint8 support and query images."""
        return self.support.nbytes + self.query.nbytes

    def support_input(self, indices=None) -> np.ndarray:
        """Support images (all, or ``indices``) as float32 in [-1, 1]."""
        return to_input(self.support if indices is None else self.support[indices])

    def query_input(self, indices=None) -> np.ndarray:
        """Query images (all, or ``indices``) as float32 (N, 3, R, R) in [-1, 1]."""
        return to_input(self.query if indices is None else self.query[indices])

    def batches(self, part: str = "query", batch_size: int = 50,
                rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(float32 (B, 3, R, R), int64 labels)`` over ``part`` ('support'/'query'),
        in order or shuffled by ``rng``; one float32 batch exists at a time."""
        if part not in ("support", "query"):
            raise DataError(f"part must be 'support' or 'query', got {part!r}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        images = self.support if part == "support" else self.query
        labels = self.support_labels if part == "support" else self.query_labels
        order = np.arange(len(images)) if rng is None else rng.permutation(len(images))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield to_input(images[idx]), labels[idx]

    def __repr__(self) -> str:
        return (f"EpisodeImages(way={self.way}, support={len(self.support)}, "
                f"query={len(self.query)}, resolution={self.resolution}, "
                f"{self.nbytes / 1e6:.1f} MB)")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _source(dataset: Dataset) -> str:
    return getattr(dataset, "source", type(dataset).__name__)


def _name_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _eligible_classes(dataset: Dataset, need: int, skip_short: bool, why: str) -> np.ndarray:
    """Indices of classes with at least ``need`` images; DataError naming short classes
    unless ``skip_short``."""
    sizes = np.array([len(items) for items in dataset.items_per_class], dtype=np.int64)
    short = np.flatnonzero(sizes < need)
    if len(short) and not skip_short:
        first = short[0]
        raise DataError(
            f"{_source(dataset)}: class {dataset.classes[first]!r} has {sizes[first]} images, "
            f"{why} needs {need}"
            + (f" ({len(short)} classes are short: "
               f"{_name_list([dataset.classes[i] for i in short])}; pass skip_short=True "
               f"to leave them out)" if len(short) > 1 else " (pass skip_short=True to leave "
                                                               "such classes out)"))
    return np.flatnonzero(sizes >= need)


def _build(dataset: Dataset, class_idx: np.ndarray, n_support: Sequence[int], n_query: int,
           rng: np.random.Generator, seed) -> Episode:
    """Draw disjoint support/query images per class (query first, then support)."""
    support, support_labels, query, query_labels = [], [], [], []
    for label, (c, k) in enumerate(zip(class_idx, n_support)):
        items = dataset.items_per_class[c]
        perm = rng.permutation(len(items))
        query.extend(items[i] for i in perm[:n_query])
        support.extend(items[i] for i in perm[n_query:n_query + k])
        query_labels.extend([label] * n_query)
        support_labels.extend([label] * int(k))
    return Episode(
        classes=[dataset.classes[c] for c in class_idx],
        support=support, support_labels=np.array(support_labels, dtype=np.int64),
        query=query, query_labels=np.array(query_labels, dtype=np.int64),
        seed=seed, support_dataset=dataset, query_dataset=dataset,
    )


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------

def sample_episode(dataset: Dataset, way: int, shot: int, query_shots: int, seed,
                   *, skip_short: bool = False) -> Episode:
    """Quick protocol: ``way`` classes, ``shot`` support and ``query_shots`` query images each.

    Classes and images come from ``numpy.random.default_rng(seed)``; support and query images
    are disjoint. An episode needs ``way >= 2`` (one class is no classification task: its
    Fisher information is zero) and ``query_shots >= 1`` (the accuracy is measured on them);
    anything less raises a DataError before anything is drawn. Every class of the dataset must hold ``shot + query_shots`` images (checked
    up front, so a run never fails on an unlucky seed) unless ``skip_short`` leaves short
    classes out of the draw.
    """
    way = _positive_int("way", way, minimum=2)
    shot = _positive_int("shot", shot)
    query_shots = _positive_int("query_shots", query_shots)
    need = shot + query_shots
    eligible = _eligible_classes(dataset, need, skip_short,
                                 f"shot+query_shots = {shot}+{query_shots}")
    if way > len(eligible):
        extra = "" if len(eligible) == len(dataset.classes) else f" with >= {need} images"
        raise DataError(f"{_source(dataset)}: way={way} but the dataset has only "
                        f"{len(eligible)} classes{extra}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=way, replace=False))
    return _build(dataset, chosen, [shot] * way, query_shots, rng, seed)


def sample_metadataset_episode(dataset: Dataset, seed, max_way: int = 50,
                               max_support: int = 500, max_support_per_class: int = 100,
                               query_per_class: int = 10, *, min_way: int = 5,
                               min_log_weight: float = math.log(0.5),
                               max_log_weight: float = math.log(2.0),
                               skip_short: bool = False) -> Episode:
    """Variable-way, variable-shot episode as in Meta-Dataset (Triantafillou et al. 2020),
    which TinyTrain's Appendix B follows (no class hierarchy).

    1. way ~ U{min_way .. min(max_way, classes, max_support)}, classes uniformly without
       replacement.
    2. query per class q = min(query_per_class, floor(smallest chosen class / 2)), balanced.
    3. support size S = min(max_support, sum_c ceil(beta * min(max_support_per_class,
       remaining_c))) with beta ~ U(0, 1] and remaining_c = size_c - q.
    4. shots_c = min(remaining_c, floor(p_c * (S - way)) + 1) with p_c proportional to
       size_c * exp(U[min_log_weight, max_log_weight]); so >= 1 per class and sum <= S.
       Unlike Meta-Dataset, shots are also capped at ``max_support_per_class`` (the paper's
       "at most 100 per class"); this only matters for classes with > 100 + q images.

    Every class needs at least 2 images (one query, one support); short classes raise a
    DataError naming them unless ``skip_short`` leaves them out. ``min_way`` is at least 2.
    """
    min_way = _positive_int("min_way", min_way, minimum=2)
    max_way = _positive_int("max_way", max_way)
    max_support = _positive_int("max_support", max_support)
    max_support_per_class = _positive_int("max_support_per_class", max_support_per_class)
    query_per_class = _positive_int("query_per_class", query_per_class)
    if min_log_weight > max_log_weight:
        raise DataError(f"min_log_weight {min_log_weight} > max_log_weight {max_log_weight}")
    eligible = _eligible_classes(dataset, 2, skip_short, "a support and a query image")
    top = min(max_way, len(eligible), max_support)
    if top < min_way:
        raise DataError(f"{_source(dataset)}: need at least min_way={min_way} classes with "
                        f">= 2 images (and max_way, max_support >= {min_way}); "
                        f"have {len(eligible)} classes, max_way={max_way}, "
                        f"max_support={max_support}")

    rng = np.random.default_rng(seed)
    way = int(rng.integers(min_way, top + 1))
    chosen = np.sort(rng.choice(eligible, size=way, replace=False))
    sizes = np.array([len(dataset.items_per_class[c]) for c in chosen], dtype=np.int64)

    n_query = int(min(query_per_class, sizes.min() // 2))
    remaining = sizes - n_query

    beta = 1.0 - rng.random()  # U(0, 1]
    contributions = np.minimum(max_support_per_class, remaining)
    support_size = int(min(max_support, np.ceil(beta * contributions).sum()))

    noise = np.exp(rng.uniform(min_log_weight, max_log_weight, size=way))
    proportions = sizes * noise
    proportions = proportions / proportions.sum()
    shots = np.floor(proportions * (support_size - way)).astype(np.int64) + 1
    shots = np.minimum(np.minimum(shots, remaining), max_support_per_class)

    return _build(dataset, chosen, shots.tolist(), n_query, rng, seed)


def from_folders(support_dir, query_dir) -> Episode:
    """An episode from two class-per-folder trees (or zips/npz): every image of each.

    The two must have the same class names, at least 2; labels follow their sorted order.
    """
    support_ds = open_dataset(support_dir)
    query_ds = open_dataset(query_dir)
    if len(support_ds.classes) < 2:
        raise DataError(f"{support_ds.source}: one class folder ({_name_list(support_ds.classes)}); a task "
                        "needs at least 2 classes")
    s, q = set(support_ds.classes), set(query_ds.classes)
    if s != q:
        parts = []
        if s - q:
            parts.append(f"only in support: {_name_list(sorted(s - q))}")
        if q - s:
            parts.append(f"only in query: {_name_list(sorted(q - s))}")
        raise DataError(f"{support_ds.source} and {query_ds.source} have different classes "
                        f"({'; '.join(parts)})")
    support, support_labels, query, query_labels = [], [], [], []
    q_index = {c: i for i, c in enumerate(query_ds.classes)}
    for label, name in enumerate(support_ds.classes):
        s_items = support_ds.items_per_class[label]
        q_items = query_ds.items_per_class[q_index[name]]
        support.extend(s_items)
        support_labels.extend([label] * len(s_items))
        query.extend(q_items)
        query_labels.extend([label] * len(q_items))
    return Episode(
        classes=list(support_ds.classes),
        support=support, support_labels=np.array(support_labels, dtype=np.int64),
        query=query, query_labels=np.array(query_labels, dtype=np.int64),
        seed=None, support_dataset=support_ds, query_dataset=query_ds,
    )
