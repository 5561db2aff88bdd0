"""The adapted classifier file: what ``python -m microtrain.adapt`` leaves behind.

``classifier.npz``, version ``FORMAT_VERSION``: an uncompressed ``.npz`` read with
``allow_pickle=False`` and written atomically (``weight_format.write_npz``), holding

- the adapted backbone's float32 arrays, named as in a weight file (``weights/README.md``), TinyTL's
  lite residual branches included when that method adapted it (the ImageNet classifier is dropped);
- ``__arch__``: the architecture JSON, as in a weight file;
- ``prototypes``: float32 ``(classes, C)``, one unit row per class, in label order;
- ``__classifier__``: JSON with ``format`` ("microtrain-classifier"), ``version``, ``classes``
  (names in label order), ``scale`` (the cosine logit scale), ``preprocessing`` (how an image
  becomes the network's input, and at which resolution) and ``provenance`` (base model, method,
  selection, budgets, fine-tuning settings, seeds, accuracy before/after, keep-best decision).

Everything is validated on load and before a save; a bad file raises ``ClassifierError`` with a
one-line message. ``microtrain.classifier.Classifier`` is the object built from it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from .architecture import embedding_channels
from .checks import CheckpointError
from .weight_format import check_arrays, read_npz, write_npz

FORMAT = "microtrain-classifier"
FORMAT_VERSION = 1

# How an image becomes the network's input. Adaptation, evaluation and prediction all go through
# microtrain.data (decode_image, resize, to_input); a classifier records which pipeline it was
# adapted with, and one made with another is refused rather than fed differently prepared images.
PREPROCESSING_NAME = "microtrain-rgb-resize-1"
PREPROCESSING_STEPS = ("decode, turned upright by its EXIF orientation; RGB, grayscale repeated, transparency "
                       "composited over white",
                       "whole image resized to resolution x resolution, antialiased bilinear (aspect not kept)",
                       "uint8 -> float32 pixel / 127.5 - 1")


class ClassifierError(ValueError):
    """A classifier file or input that cannot be used. The message is always one line."""

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


def preprocessing(resolution: int) -> dict:
    """The ``preprocessing`` entry of a classifier made at ``resolution``."""
    return {"name": PREPROCESSING_NAME, "resolution": int(resolution), "steps": list(PREPROCESSING_STEPS)}


def check_head(classes: list, prototypes: np.ndarray, scale, embedding: int) -> None:
    """``ClassifierError`` unless there are >= 2 unique non-empty class names, one finite unit
    float32 prototype row of ``embedding`` values per class, and a finite positive scale."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ClassifierError("classes must be a list of names")
    if len(classes) < 2:
        raise ClassifierError(f"a classifier needs at least 2 classes, has {len(classes)}")
    if len(set(classes)) != len(classes) or not all(classes):
        raise ClassifierError("class names must be unique and non-empty")
    if not isinstance(prototypes, np.ndarray) or prototypes.dtype != np.float32:
        raise ClassifierError("no float32 'prototypes' array")
    if prototypes.shape != (len(classes), embedding):
        raise ClassifierError(f"prototypes {prototypes.shape} should be ({len(classes)}, {embedding}): one "
                              "embedding-sized row per class")
    if not np.isfinite(prototypes).all() or not np.allclose(np.linalg.norm(prototypes, axis=1), 1, atol=1e-3):
        raise ClassifierError("prototypes must be finite unit vectors")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (np.isfinite(scale) and scale > 0):
        raise ClassifierError(f"scale must be a positive number, got {scale!r:.20}")


def save_classifier(path, arch: Mapping, arrays: Mapping[str, np.ndarray], prototypes: np.ndarray,
                    classes: list[str], scale: float, provenance: dict) -> Path:
    """Validate and write a classifier file atomically. ``arrays``: the adapted network's
    (``Network.state()``; an ImageNet ``classifier.*`` pair is left out)."""
    arrays = {k: v for k, v in arrays.items() if not k.startswith("classifier.")}
    try:
        check_arrays(arch, arrays)
    except CheckpointError as exc:
        raise ClassifierError(str(exc)) from None
    check_head(classes, prototypes, scale, prototypes.shape[1] if prototypes.ndim == 2 else -1)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "classes": classes, "scale": float(scale),
              "preprocessing": preprocessing(arch["resolution"]), "provenance": provenance}
    payload = {**arrays, "prototypes": prototypes, "__arch__": np.array(json.dumps(dict(arch))),
               "__classifier__": np.array(json.dumps(header, allow_nan=False))}
    return write_npz(path, payload)


def load_classifier(path) -> tuple[dict, dict[str, np.ndarray], np.ndarray, dict]:
    """``(arch, arrays, prototypes, header)`` of a classifier file, every part validated;
    ``ClassifierError`` (one line, naming the file) if it is not one."""
    path = Path(path)
    contents = read_npz(path, ClassifierError, "classifier file")
    try:
        header = _json_member(contents, "__classifier__")
        if header is None:
            hint = (" (it is a backbone weight file: adapt it with python -m microtrain.adapt --model "
                    f"{path} to make a classifier)" if "__arch__" in contents else "")
            raise ClassifierError(f"not a microtrain classifier{hint}")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ClassifierError(f"__classifier__ does not name the format {FORMAT!r}")
        if header.get("version") != FORMAT_VERSION:
            raise ClassifierError(f"classifier format version {header.get('version')!r}; this microtrain reads "
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
            raise ClassifierError(f"made with preprocessing {name!r:.60}; this microtrain prepares images as "
                                  f"{PREPROCESSING_NAME!r}")
        if pre.get("resolution") != arch["resolution"]:
            raise ClassifierError(f"preprocessing resolution {pre.get('resolution')!r:.20} differs from the "
                                  f"network's {arch['resolution']}")
        if not isinstance(header["provenance"], dict):
            raise ClassifierError("provenance is not an object")
        check_head(header["classes"], prototypes, header["scale"], embedding_channels(arch))
        return arch, arrays, prototypes, header
    except (CheckpointError, ClassifierError) as exc:
        raise ClassifierError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:  # a shape the checks above did not foresee
        raise ClassifierError(f"{path}: malformed classifier ({type(exc).__name__}: {exc})") from None


def is_classifier_file(path) -> bool:
    """Whether ``path`` is an ``.npz`` with a ``__classifier__`` member (not yet validated)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "__classifier__" in npz.files
    except Exception:  # noqa: BLE001 - unreadable: not a classifier; the weight reader says why
        return False


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
