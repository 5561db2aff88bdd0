"""The adapted classifier: what ``python -m microtrain.adapt`` leaves behind, and what then
recognises new images on the device (``python -m microtrain.predict``, or this module's API).

A classifier is the adapted backbone, one prototype per class computed with the adapted weights,
the class names and the cosine scale. An image is embedded (forward only, in one planned arena),
L2-normalised, and given the class of the most similar prototype; its score is that cosine
similarity, in [-1, 1] (ProtoNet's cosine head, paper Appendix C after Hu et al. 2022).

File format (``classifier.npz``, version ``FORMAT_VERSION``): an uncompressed ``.npz`` read with
``allow_pickle=False``, written to a temporary file and renamed:

- the backbone's float32 arrays, named as in a weight file (``weights/README.md``), TinyTL's lite
  residual branches included when that method adapted it (the ImageNet classifier is dropped);
- ``__arch__``: the architecture JSON, as in a weight file;
- ``prototypes``: float32 ``(classes, C)``, unit rows, in label order;
- ``__classifier__``: JSON with ``format`` ("microtrain-classifier"), ``version``, ``classes``
  (names in label order), ``scale``, ``preprocessing`` and ``provenance`` (base model, method,
  selection, budgets, fine-tuning settings, seeds, accuracy before/after, keep-best decision).

Everything is validated on load; a bad file raises ``ClassifierError`` with a one-line message.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .paths import write_atomic

FORMAT = "microtrain-classifier"
FORMAT_VERSION = 1
EMBED_BATCH = 4  # images per forward pass: the batch the adaptation embeds with (train.embed)

# How an image becomes the network's input. Adaptation, evaluation and prediction all go through
# microtrain.data (decode_image, resize, to_input); a classifier records which pipeline it was
# adapted with, and one made with another is refused rather than fed differently prepared images.
PREPROCESSING_NAME = "microtrain-rgb-resize-1"
PREPROCESSING_STEPS = ("decode (EXIF orientation applied where the reader supports it); RGB, grayscale "
                       "repeated, transparency composited over white",
                       "whole image resized to resolution x resolution, antialiased bilinear (aspect not kept)",
                       "uint8 -> float32 pixel / 127.5 - 1")


class ClassifierError(ValueError):
    """A classifier file or input that cannot be used. The message is always one line."""

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


@dataclass
class Prediction:
    """One image's result: the predicted class (``label`` in label order, ``name``) and its cosine
    ``score``; ``top`` holds the ``top_k`` best (name, score) pairs, best first."""

    label: int
    name: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)


def preprocessing(resolution: int) -> dict:
    return {"name": PREPROCESSING_NAME, "resolution": int(resolution), "steps": list(PREPROCESSING_STEPS)}


class Classifier:
    """An adapted network with its class prototypes.

    ``net``: the adapted ``model.Network`` (its TinyTL branches attached, if any); ``classes``:
    names in label order; ``prototypes``: float32 (classes, C) unit rows; ``scale``: the cosine
    logit scale the prototypes were trained with (softmax probabilities are
    ``softmax(scale * scores)``); ``provenance``: a JSON-ready dict.
    """

    def __init__(self, net, classes: Sequence[str], prototypes: np.ndarray, scale: float,
                 provenance: dict | None = None):
        self.net = net
        self.classes = [str(c) for c in classes]
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.scale = float(scale)
        self.provenance = dict(provenance or {})
        _check_head(self.classes, self.prototypes, self.scale, net.embedding_size)

    @classmethod
    def from_support(cls, net, support: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                     scale: float, provenance: dict | None = None) -> "Classifier":
        """Prototypes of ``net`` (as adapted) from uint8 support images (N, 3, R, R) with int64
        labels 0..len(classes)-1: per class the mean of normalised embeddings, normalised."""
        from .train import class_prototypes, embed

        labels = np.asarray(labels, dtype=np.int64)
        if len(classes) < 2 or labels.min(initial=0) < 0 or labels.max(initial=-1) >= len(classes) \
                or len(np.unique(labels)) != len(classes):
            raise ClassifierError(f"a classifier needs support images of every one of its {len(classes)} "
                                  "classes (at least 2)")
        protos = class_prototypes(embed(net, support, batch=EMBED_BATCH), labels, len(classes))
        return cls(net, classes, protos, scale, provenance)

    @property
    def resolution(self) -> int:
        return self.net.resolution

    # -- file ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier file atomically (see the module docstring for its contents)."""
        from .checkpoint import check_arrays

        arrays = {k: v for k, v in self.net.state().items() if not k.startswith("classifier.")}
        check_arrays(self.net.arch, arrays)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "classes": self.classes, "scale": self.scale,
                  "preprocessing": preprocessing(self.resolution), "provenance": self.provenance}
        payload = {**arrays, "prototypes": self.prototypes,
                   "__arch__": np.array(json.dumps(dict(self.net.arch))),
                   "__classifier__": np.array(json.dumps(header, allow_nan=False))}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **payload)
                f.flush()
                os.fsync(f.fileno())
        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Classifier":
        """Read and validate a classifier file; ``ClassifierError`` (one line) if it is not one."""
        from .checkpoint import CheckpointError, check_arrays
        from .model import Network

        path = Path(path)
        contents = _read_npz(path)
        try:
            header = _json_member(contents, "__classifier__")
            if header is None:
                hint = (" (it is a backbone weight file: adapt it with python -m microtrain.adapt --model "
                        f"{path} to make a classifier)" if "__arch__" in contents else "")
                raise ClassifierError(f"not a microtrain classifier{hint}")
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ClassifierError(f"__classifier__ does not name the format {FORMAT!r}")
            version = header.get("version")
            if version != FORMAT_VERSION:
                raise ClassifierError(f"classifier format version {version!r}; this microtrain reads "
                                      f"version {FORMAT_VERSION}: adapt again to make one")
            for key in ("classes", "scale", "preprocessing", "provenance"):
                if key not in header:
                    raise ClassifierError(f"__classifier__ has no {key!r}")
            arch = _json_member(contents, "__arch__")
            if not isinstance(arch, dict):
                raise ClassifierError("no __arch__ object")
            prototypes = contents.pop("prototypes", None)
            arrays = {k: v for k, v in contents.items() if not k.startswith("__")}
            check_arrays(arch, arrays)
            pre = header["preprocessing"]
            if not isinstance(pre, dict) or pre.get("name") != PREPROCESSING_NAME:
                name = pre.get("name") if isinstance(pre, dict) else pre
                raise ClassifierError(f"made with preprocessing {name!r:.60}; this microtrain prepares images "
                                      f"as {PREPROCESSING_NAME!r}")
            if pre.get("resolution") != arch["resolution"]:
                raise ClassifierError(f"preprocessing resolution {pre.get('resolution')!r:.20} differs from "
                                      f"the network's {arch['resolution']}")
            if not isinstance(header["provenance"], dict):
                raise ClassifierError("provenance is not an object")
            classes, scale = header["classes"], header["scale"]
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ClassifierError("classes must be a list of names")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ClassifierError(f"scale {scale!r:.20} is not a number")
            if not isinstance(prototypes, np.ndarray) or prototypes.dtype != np.float32:
                raise ClassifierError("no float32 'prototypes' array")
            net = Network(arch, arrays)
            return cls(net, classes, prototypes, float(scale), header["provenance"])
        except CheckpointError as exc:
            raise ClassifierError(f"{path}: {exc}") from None
        except ClassifierError as exc:
            raise ClassifierError(f"{path}: {exc}") from None
        except (TypeError, ValueError, KeyError) as exc:  # a shape the checks above did not foresee
            raise ClassifierError(f"{path}: malformed classifier ({type(exc).__name__}: {exc})") from None

    # -- inference -------------------------------------------------------------------------------
    def prepare(self, images) -> np.ndarray:
        """uint8 (N, 3, R, R) network input images from ``images``: one image or a list of them,
        each a file path or a uint8 array (H, W, 3) RGB or (H, W) grayscale, as image libraries
        give them; a uint8 (N, H, W, 3) array is a batch. The same preprocessing as adaptation:
        decoded by ``data.decode_image``, resized by ``data.resize``."""
        items = _as_list(images)
        out = np.empty((len(items), 3, self.resolution, self.resolution), np.uint8)
        for i, item in enumerate(items):
            out[i] = load_image(item, self.resolution)
        return out

    def scores(self, images, batch: int = EMBED_BATCH) -> np.ndarray:
        """Cosine similarities (N, classes) float32 of ``images`` (see ``prepare``; uint8
        (N, 3, R, R) already prepared is taken as is) to every prototype."""
        from .train import embed, normalize_rows

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
    """One image as the network sees it, uint8 (3, R, R): ``item`` a file path, the bytes of an
    encoded image (``name`` shows where they came from in errors), or a uint8 (H, W, 3) / (H, W) /
    (H, W, 1) array. Raises ``data.DataError`` for an unreadable or undecodable file."""
    from .data import decode_image, resize

    if isinstance(item, (bytes, bytearray)):
        rgb = decode_image(bytes(item), name or "<image bytes>", resolution)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as exc:
            from .data import DataError

            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        rgb = decode_image(data, str(path), resolution)
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
        if images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise ClassifierError(f"images must be paths or uint8 arrays, got {type(images).__name__}")


def _check_head(classes: list[str], prototypes: np.ndarray, scale: float, embedding: int) -> None:
    if len(classes) < 2:
        raise ClassifierError(f"a classifier needs at least 2 classes, has {len(classes)}")
    if len(set(classes)) != len(classes) or not all(classes):
        raise ClassifierError("class names must be unique and non-empty")
    if prototypes.shape != (len(classes), embedding):
        raise ClassifierError(f"prototypes {prototypes.shape} should be ({len(classes)}, {embedding}): one "
                              "embedding-sized row per class")
    if not np.isfinite(prototypes).all() or not np.allclose(np.linalg.norm(prototypes, axis=1), 1, atol=1e-3):
        raise ClassifierError("prototypes must be finite unit vectors")
    if not (np.isfinite(scale) and scale > 0):
        raise ClassifierError(f"scale must be a positive number, got {scale}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ClassifierError(f"{path}: a single .npy array, not a classifier (.npz)")
        with npz:
            return {name: npz[name] for name in npz.files}
    except ClassifierError:
        raise
    except OSError as exc:
        raise ClassifierError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, io.UnsupportedOperation) as exc:
        raise ClassifierError(f"{path}: not a classifier file ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    except Exception as exc:  # noqa: BLE001 - zipfile.BadZipFile and friends: the file is not an npz
        raise ClassifierError(f"{path}: not a classifier file ({type(exc).__name__})") from None


def _json_member(contents: dict, key: str):
    text = contents.pop(key, None)
    if text is None:
        return None
    if not isinstance(text, np.ndarray) or text.ndim != 0 or text.dtype.kind != "U":
        raise ClassifierError(f"{key} is not a JSON string")
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise ClassifierError(f"{key} is not valid JSON ({exc})") from None
