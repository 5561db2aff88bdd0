"""The adapted classifier as an object: load the file ``python -m microtrain.adapt`` wrote
(``classifier_format.py``) and recognise new images with it, on the device.

A classifier is the adapted backbone, one prototype per class computed with the adapted weights,
the class names and the cosine scale. An image is prepared exactly as in adaptation
(``microtrain.data``), embedded by the network's planned forward-only executor (one arena, no
training memory), L2-normalised, and given the class of the most similar prototype; its score
is that cosine similarity, in [-1, 1] (ProtoNet's cosine head, paper Appendix C after Hu et al.
2022). ``python -m microtrain.predict`` is the command line over this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .classifier_format import ClassifierError, check_head, load_classifier, save_classifier
from .data import decode_image, resize
from .data import load_image as load_image_file
from .model import Network
from .train import class_prototypes, embed, normalize_rows

__all__ = ["Classifier", "ClassifierError", "Prediction", "load_image", "EMBED_BATCH"]

EMBED_BATCH = 4  # images per forward pass: the batch adaptation embeds with (train.embed's default)


@dataclass
class Prediction:
    """One image's result: the predicted class (``label`` in label order, ``name``) and its cosine
    ``score``; ``top`` holds the ``top_k`` best (name, score) pairs, best first."""

    label: int
    name: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)


class Classifier:
    """An adapted network with its class prototypes.

    ``net``: the adapted ``model.Network`` (its TinyTL branches attached, if any); ``classes``:
    names in label order; ``prototypes``: float32 (classes, C) unit rows; ``scale``: the cosine
    logit scale the prototypes were trained with (softmax probabilities are
    ``softmax(scale * scores)``); ``provenance``: a JSON-ready dict.
    """

    def __init__(self, net: Network, classes: Sequence[str], prototypes: np.ndarray, scale: float,
                 provenance: dict | None = None):
        self.net = net
        self.classes = [str(c) for c in classes]
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.scale = float(scale)
        self.provenance = dict(provenance or {})
        check_head(self.classes, self.prototypes, self.scale, net.embedding_size)

    @classmethod
    def from_support(cls, net: Network, support: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                     scale: float, provenance: dict | None = None) -> "Classifier":
        """Prototypes of ``net`` (as adapted) from uint8 support images (N, 3, R, R) with int64
        labels 0..len(classes)-1: per class the mean of normalised embeddings, normalised."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(classes) < 2 or labels.min(initial=0) < 0 or labels.max(initial=-1) >= len(classes) \
                or len(np.unique(labels)) != len(classes):
            raise ClassifierError(f"a classifier needs support images of every one of its {len(classes)} "
                                  "classes (at least 2)")
        protos = class_prototypes(embed(net, support, batch=EMBED_BATCH), labels, len(classes))
        return cls(net, classes, protos, scale, provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Classifier":
        """Read and validate a classifier file; ``ClassifierError`` (one line) if it is not one."""
        arch, arrays, prototypes, header = load_classifier(path)
        return cls(Network(arch, arrays), header["classes"], prototypes, header["scale"], header["provenance"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier file atomically (``classifier_format.py``)."""
        return save_classifier(path, self.net.arch, self.net.state(), self.prototypes, self.classes, self.scale,
                               self.provenance)

    @property
    def resolution(self) -> int:
        """Input image side in pixels (the backbone's)."""
        return self.net.resolution

    # -- inference -------------------------------------------------------------------------------
    def prepare(self, images) -> np.ndarray:
        """uint8 (N, 3, R, R) network input images from ``images``: one image or a list of them,
        each a file path or a uint8 array (H, W, 3) RGB or (H, W) grayscale, as image libraries
        give them; a uint8 (N, H, W, 3) array is a batch. The same preprocessing as adaptation."""
        items = _as_list(images)
        out = np.empty((len(items), 3, self.resolution, self.resolution), np.uint8)
        for i, item in enumerate(items):
            out[i] = load_image(item, self.resolution)
        return out

    def scores(self, images, batch: int = EMBED_BATCH) -> np.ndarray:
        """Cosine similarities (N, classes) float32 of ``images`` (see ``prepare``; uint8
        (N, 3, R, R) already prepared is taken as is) to every prototype."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (3, self.resolution,
                                                                                      self.resolution):
            prepared = images
        else:
            prepared = self.prepare(images)
        if prepared.dtype != np.uint8:
            raise ClassifierError(f"images must be uint8, got {prepared.dtype}")
        if not len(prepared):
            return np.zeros((0, len(self.classes)), np.float32)
        z = normalize_rows(embed(self.net, prepared, batch=max(1, int(batch))))
        return z @ self.prototypes.T

    def predict(self, images, top_k: int = 1, batch: int = EMBED_BATCH) -> list[Prediction]:
        """One ``Prediction`` per image (see ``prepare`` for what ``images`` may be)."""
        return self.decide(self.scores(images, batch), top_k)

    def decide(self, scores: np.ndarray, top_k: int = 1) -> list[Prediction]:
        """Predictions from a (N, classes) score matrix: the best class, and the ``top_k`` best."""
        if top_k < 1:
            raise ClassifierError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.classes))
        out = []
        for row in np.asarray(scores):
            order = np.argsort(-row, kind="stable")[:k]
            best = int(np.argmax(row))  # the rule adaptation scores accuracy with (first best on a tie)
            out.append(Prediction(best, self.classes[best], float(row[best]),
                                  [(self.classes[j], float(row[j])) for j in order]))
        return out

    def __repr__(self) -> str:
        return (f"Classifier({self.net.name}, {len(self.classes)} classes, resolution {self.resolution}, "
                f"method {self.provenance.get('method', '?')})")


def load_image(item, resolution: int, name: str | None = None) -> np.ndarray:
    """One image as the network sees it, uint8 (3, R, R): ``item`` a file path (read as dataset
    images are: ``data.load_image``), the bytes of an encoded image (``name`` says where they
    came from in errors), or a uint8 (H, W, 3) / (H, W) / (H, W, 1) array. Raises
    ``data.DataError`` for an unreadable or undecodable file, ``ClassifierError`` for an array
    that is not an image."""
    if isinstance(item, (str, os.PathLike)):
        return load_image_file(item, resolution)
    if isinstance(item, (bytes, bytearray)):
        rgb = decode_image(bytes(item), name or "<image bytes>", resolution)
    else:
        rgb = np.asarray(item)
        if rgb.dtype != np.uint8:
            raise ClassifierError(f"an image array must be uint8, got {rgb.dtype}")
        if rgb.ndim == 3 and rgb.shape[2] == 1:
            rgb = rgb[:, :, 0]
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ClassifierError(f"an image array must be (H, W, 3) RGB or (H, W) grayscale, got {rgb.shape}")
    return resize(rgb.transpose(2, 0, 1), resolution)


def _as_list(images) -> list:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Iterable):
        return list(images)
    raise ClassifierError(f"images must be paths or uint8 arrays, got {type(images).__name__}")
