"""Small on-disk tasks for the command-line tests: a tiny backbone weight file and class folders
of synthetic images (each class a colour with noise, so a random tiny network tells them apart)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import random_arrays, small_arch

COLOURS = {"red": (210, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 210)}


def tiny_weights(folder: Path, seed: int = 0) -> Path:
    """A microtrain weight file of the tiny test network (16 x 16 input)."""
    from microtrain.checkpoint import save_weights

    arch = {**small_arch(), "source": {"file": "test", "sha256": "0" * 64, "kind": "int8-dict"}}
    folder.mkdir(parents=True, exist_ok=True)
    return save_weights(folder / "tiny.npz", arch, random_arrays(arch, seed))


def image(colour, seed: int, size: int = 20) -> np.ndarray:
    """uint8 (size, size, 3): a colour, a bright square at a random place, and noise."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(colour, np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    y, x = rng.integers(0, size - 6, 2)
    img[y:y + 6, x:x + 6] = 255
    return img.astype(np.uint8)


def class_folders(root: Path, per_class: int, seed: int, colours=COLOURS) -> Path:
    """``root/<class>/<i>.png`` for every class, ``per_class`` images each."""
    from PIL import Image

    for c, (name, colour) in enumerate(colours.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(image(colour, seed * 1000 + c * 100 + i)).save(root / name / f"{i}.png")
    return root


def task(tmp_path: Path, shots: int = 4, queries: int = 3) -> tuple[Path, Path, Path]:
    """(weights, support folder, query folder) of a 3-way task."""
    return (tiny_weights(tmp_path / "weights"), class_folders(tmp_path / "support", shots, seed=1),
            class_folders(tmp_path / "query", queries, seed=2))
