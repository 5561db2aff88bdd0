"""Few-shot image datasets: lazy class-per-folder/zip/npz readers, NumPy resizing, augmentation.

Everything here is NumPy only. Pillow is an optional extra, imported the first time a PNG/JPEG
(or other encoded image) has to be decoded; ``.npz`` arrays never need it.

A dataset lists its classes and *items* (cheap references: a relative path, a zip member name or
an npz row index) without decoding anything; ``Dataset.load(item, R)`` decodes one image and
returns it as ``uint8 (3, R, R)``. Keep images uint8 and convert a batch at a time with
:func:`to_input` (float32 in [-1, 1], the backbones' input convention).

Episode sampling lives one layer up, in :mod:`microtrain.episodes`, which reads datasets through
this module (never the other way round).
"""
from __future__ import annotations

import io
import math
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "FolderDataset",
    "ZipDataset",
    "ArrayDataset",
    "NpzDataset",
    "IMAGE_EXTENSIONS",
    "open_dataset",
    "decode_image",
    "resize",
    "to_input",
    "augment",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)

PILLOW_HINT = "pip install microtrain[images]"


class DataError(ValueError):
    """Bad input data: the message is one line and names the path, file or class at fault."""


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class Dataset:
    """Base class: ``classes`` (sorted names), ``items_per_class`` (cheap item references).

    Subclasses implement ``_decode(item, resolution) -> uint8 (H, W, 3)`` (the resolution is
    only a decoding hint) and ``describe(item) -> str``.
    """

    source: str
    classes: list[str]
    items_per_class: list[list]

    def __len__(self) -> int:
        return sum(len(items) for items in self.items_per_class)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self.classes)} classes, "
                f"{len(self)} images)")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release open file handles (a closed dataset reopens them on the next ``load``)."""

    def describe(self, item) -> str:
        return f"{self.source}: {item}"

    def _decode(self, item, resolution: int | None) -> np.ndarray:
        raise NotImplementedError

    def load(self, item, resolution: int) -> np.ndarray:
        """Decode one item, convert it to RGB and resize it to ``uint8 (3, R, R)``."""
        resolution = _check_resolution(resolution)
        rgb = self._decode(item, resolution)
        return resize(rgb.transpose(2, 0, 1), resolution)

    def load_many(self, items: Sequence, resolution: int, out: np.ndarray | None = None) -> np.ndarray:
        """Load several items into one preallocated ``uint8 (N, 3, R, R)`` array."""
        resolution = _check_resolution(resolution)
        shape = (len(items), 3, resolution, resolution)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise DataError(f"load_many: out must be uint8 {shape}, got {out.dtype} {out.shape}")
        for i, item in enumerate(items):
            out[i] = self.load(item, resolution)
        return out


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    return int(resolution)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _group_by_class(files: Iterable[tuple[str, ...]], dirs: Iterable[tuple[str, ...]],
                    where: str) -> tuple[list[str], list[list[str]]]:
    """Group image paths (tuples of path parts) into classes = first-level folders.

    Single wrapper folders (one folder holding the class folders and no image of its own)
    are stripped, so ``data.zip: omniglot/<class>/<img>`` works as well as ``<class>/<img>``.
    Images deeper inside a class folder belong to that class; loose images beside the class
    folders are ignored.
    """
    files = [f for f in files if not any(_hidden(p) for p in f)]
    all_dirs = {d for d in dirs if d and not any(_hidden(p) for p in d)}
    for f in files:  # parents implied by any file (zips need not list folders)
        for k in range(1, len(f)):
            all_dirs.add(f[:k])
    files = [f for f in files if _is_image_name(f[-1])]

    prefix: tuple[str, ...] = ()
    while True:
        n = len(prefix)
        children = {d for d in all_dirs if len(d) == n + 1 and d[:n] == prefix}
        if len(children) != 1:
            break
        (only,) = children
        has_subdirs = any(len(d) == n + 2 and d[:n + 1] == only for d in all_dirs)
        has_own_images = any(len(f) == n + 2 and f[:n + 1] == only for f in files)
        if not has_subdirs or has_own_images:
            break
        prefix = only

    n = len(prefix)
    class_names = sorted(d[n] for d in all_dirs if len(d) == n + 1 and d[:n] == prefix)
    inside = "/".join(prefix)
    if not class_names:
        raise DataError(f"{where}: no class folders found"
                        + (f" under {inside}/" if inside else "")
                        + " (expected <class>/<image> layout)")
    index = {c: i for i, c in enumerate(class_names)}
    items: list[list[str]] = [[] for _ in class_names]
    for f in files:
        if len(f) >= n + 2 and f[:n] == prefix:
            items[index[f[n]]].append("/".join(f))
    for c, lst in zip(class_names, items):
        if not lst:
            folder = "/".join(prefix + (c,))
            raise DataError(f"{where}: class folder {folder}/ has no images")
        lst.sort()
    return class_names, items


class FolderDataset(Dataset):
    """A directory holding one sub-folder of images per class. Items are relative paths."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.source = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        files, dirs = [], []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            rel = Path(dirpath).relative_to(self.root).parts
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            dirs.extend(rel + (d,) for d in dirnames)
            files.extend(rel + (f,) for f in filenames if not _hidden(f))
        if not files and not dirs:
            raise DataError(f"{self.root}: folder is empty")
        self.classes, self.items_per_class = _group_by_class(files, dirs, self.source)

    def describe(self, item) -> str:
        return str(self.root / item)

    def _decode(self, item, resolution):
        path = self.root / item
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return decode_image(data, str(path), resolution)


class ZipDataset(Dataset):
    """A zip of a class-per-folder tree. Items are member names; the archive stays open
    (and is reopened after :meth:`close`), members are read one at a time on ``load``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self._zip: zipfile.ZipFile | None = None
        try:
            zf = self._handle()
            infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable zip ({exc})") from None
        files, dirs = [], []
        for info in infos:
            parts = tuple(p for p in info.filename.split("/") if p)
            if not parts:
                continue
            (dirs if info.is_dir() else files).append(parts)
        if not files:
            self.close()
            raise DataError(f"{self.path}: zip holds no files")
        try:
            self.classes, self.items_per_class = _group_by_class(files, dirs, self.source)
        except DataError:
            self.close()
            raise

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):  # picklable (e.g. for worker processes): reopen lazily
        state = self.__dict__.copy()
        state["_zip"] = None
        return state

    def describe(self, item) -> str:
        return f"{self.path}:{item}"

    def _decode(self, item, resolution):
        try:
            data = self._handle().read(item)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}:{item}: cannot read member ({exc})") from None
        return decode_image(data, f"{self.path}:{item}", resolution)


class ArrayDataset(Dataset):
    """Images held as arrays: ``x`` (N, H, W) / (N, H, W, 1) / (N, H, W, 3) uint8, ``y`` (N,)
    int labels, optional ``names`` (one per label value). Items are row indices.

    Class names are ``names[label]`` or, without names, the label zero-padded so that string
    order is numeric order; labels that never occur are not listed.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, names: Sequence[str] | None = None,
                 source: str = "<arrays>"):
        self.source = source
        self._x = x
        self._init_index(_check_x_shape(getattr(x, "shape", None), getattr(x, "dtype", None), source),
                         y, names)

    def _init_index(self, x_shape, y, names) -> None:
        where = self.source
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != x_shape[0]:
            raise DataError(f"{where}: x has {x_shape[0]} images but y has {len(y)} labels")
        if len(y) == 0:
            raise DataError(f"{where}: no images (x is empty)")
        if y.min() < 0:
            raise DataError(f"{where}: negative label {int(y.min())} in y")
        labels = np.unique(y)
        if names is not None:
            names = [str(n) for n in np.asarray(names).reshape(-1)]
            if labels[-1] >= len(names):
                raise DataError(f"{where}: label {int(labels[-1])} has no entry in names "
                                f"({len(names)} names)")
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})[0]
                raise DataError(f"{where}: class name {dup!r} appears twice in names")
            label_names = {int(lab): names[lab] for lab in labels}
        else:
            width = len(str(int(labels[-1])))
            label_names = {int(lab): f"{int(lab):0{width}d}" for lab in labels}
        order = sorted(label_names, key=label_names.__getitem__)
        self.classes = [label_names[lab] for lab in order]
        self.labels = np.array(order, dtype=np.int64)  # dataset label of each class
        by_label = np.argsort(y, kind="stable")
        starts = np.searchsorted(y[by_label], self.labels)
        ends = np.searchsorted(y[by_label], self.labels, side="right")
        self.items_per_class = [by_label[s:e].tolist() for s, e in zip(starts, ends)]

    def _array(self) -> np.ndarray:
        return self._x

    def describe(self, item) -> str:
        return f"{self.source}[{item}]"

    def _decode(self, item, resolution):
        x = self._array()
        try:
            img = np.asarray(x[int(item)])
        except (IndexError, TypeError, ValueError):
            raise DataError(f"{self.source}: no image at index {item!r}") from None
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == 1:
            img = np.broadcast_to(img, img.shape[:2] + (3,))
        return img


def _check_x_shape(shape, dtype, where) -> tuple[int, ...]:
    if shape is None or dtype is None:
        raise DataError(f"{where}: x must be an array")
    if np.dtype(dtype) != np.uint8:
        raise DataError(f"{where}: x must be uint8, got {np.dtype(dtype)}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise DataError(f"{where}: x must be (N, H, W) or (N, H, W, 3), got shape {tuple(shape)}")
    if any(s == 0 for s in shape[1:]):
        raise DataError(f"{where}: x has empty images, shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


class NpzDataset(ArrayDataset):
    """An ``.npz`` with ``x``, ``y`` and optional ``names``.

    Opening reads only ``y``, ``names`` and the header of ``x``; ``x`` itself is read on the
    first ``load`` (memory-mapped straight from the file when the member is stored
    uncompressed, so large uncompressed archives never sit in RAM).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self._x = None
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = set(zf.namelist())
                missing = [k for k in ("x", "y") if f"{k}.npy" not in members]
                if missing:
                    raise DataError(f"{self.path}: npz has no array {missing[0]!r} "
                                    f"(needs x and y, has {sorted(m[:-4] for m in members)})")
                with zf.open("x.npy") as fh:
                    shape, dtype = _npy_header(fh, self.path)
                y = _read_npy(zf, "y.npy", self.path)
                names = _read_npy(zf, "names.npy", self.path) if "names.npy" in members else None
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable npz ({exc})") from None
        self._init_index(_check_x_shape(shape, dtype, self.source), y, names)
        self._shape = shape

    def _array(self) -> np.ndarray:
        if self._x is None:
            self._x = self._map_or_read()
        return self._x

    def _map_or_read(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo("x.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                with zf.open(info) as fh:
                    _npy_header(fh, self.path)
                    header_len = fh.tell()
                with open(self.path, "rb") as raw:  # data starts after the local file header
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    name_len = int.from_bytes(local[26:28], "little")
                    extra_len = int.from_bytes(local[28:30], "little")
                offset = info.header_offset + 30 + name_len + extra_len + header_len
                return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset,
                                 shape=self._shape)
            return _read_npy(zf, "x.npy", self.path)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_x"] = None
        return state


def _npy_header(fh, where):
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise DataError(f"{where}: x.npy is not a valid .npy array ({exc})") from None
    if fortran:
        raise DataError(f"{where}: x must be C-ordered, got a Fortran-ordered array")
    return shape, dtype


def _read_npy(zf: zipfile.ZipFile, member: str, where) -> np.ndarray:
    try:
        with zf.open(member) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{where}: cannot read {member} ({exc})") from None


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a class-per-folder directory, a zip of one, or an ``.npz`` (x, y[, names])."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        return FolderDataset(p)
    if p.suffix.lower() == ".npz":
        return NpzDataset(p)
    if zipfile.is_zipfile(p):
        return ZipDataset(p)
    raise DataError(f"{p}: not a folder, .zip or .npz dataset")


# --------------------------------------------------------------------------------------------
# Decoding (Pillow, optional)
# --------------------------------------------------------------------------------------------

def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def decode_image(data: bytes, name: str, resolution: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to ``uint8 (H, W, 3)`` RGB.

    Grayscale, 1-bit, palette and 16-bit images become 3 equal channels; transparency is
    composited over white. For JPEGs, ``resolution`` lets the decoder skip detail (DCT
    scaling) while keeping both sides >= resolution, which saves time and RAM on big photos.
    """
    Image = _pillow()
    if Image is None:
        raise ImportError(f"decoding {name} needs Pillow: {PILLOW_HINT}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if resolution and img.format == "JPEG":
                img.draft(img.mode, (resolution, resolution))
            img.load()
            return _to_rgb(img)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cannot identify image file" in reason:  # Pillow names our in-memory buffer, not the file
            reason = "not a format Pillow recognises"
        raise DataError(f"{name}: not a decodable image ({reason})") from None


def _to_rgb(img) -> np.ndarray:
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:] * np.float32(1 / 255)
        rgb = rgba[:, :, :3] * alpha + np.float32(255) * (1 - alpha)
        return np.rint(rgb).astype(np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Resizing (NumPy): separable bilinear/triangle filter, antialiased when shrinking
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=512)
def _weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 resampling matrix; rows sum to 1.

    Pixel centres at half-integers (align_corners=False). The triangle filter is widened by
    the shrink factor when downscaling, which is the antialiased bilinear filter Pillow uses.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    taps = np.arange(n_in, dtype=np.float64) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=64)
def _band(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero taps of ``_weights(n_in, n_out)``: indices and weights, (n_out, taps)."""
    w = _weights(n_in, n_out)
    nonzero = w > 0
    first = nonzero.argmax(axis=1)
    taps = int(nonzero.sum(axis=1).max())
    idx = np.minimum(first[:, None] + np.arange(taps), n_in - 1)
    band = np.take_along_axis(w, idx, axis=1)
    band = np.where(first[:, None] + np.arange(taps) < n_in, band, 0).astype(np.float32)
    return idx, band


def _resample_axis(img: np.ndarray, axis: int, n_out: int, flip: bool = False) -> np.ndarray:
    """Resample along one axis tap by tap (float32 result; ``flip`` mirrors the output).

    Work and memory grow with the input size only (a dense matrix costs n_out * n_in per
    line), and no BLAS call is made, so it cannot stall on BLAS threads competing with
    other work on a small board."""
    idx, band = _band(img.shape[axis], n_out)
    if flip:
        idx, band = idx[::-1], band[::-1]
    shape = [1] * img.ndim
    shape[axis] = n_out
    acc = None
    for k in range(idx.shape[1]):
        term = np.take(img, idx[:, k], axis=axis) * band[:, k].reshape(shape)
        acc = term if acc is None else np.add(acc, term, out=acc)
    return acc


def _resample(img: np.ndarray, wh: np.ndarray | None, ww: np.ndarray | None) -> np.ndarray:
    """(C, H, W) -> (C, h, w) float32 with wh (h, H) and ww (w, W) (None: keep that axis);
    the cheaper order first."""
    if wh is None or ww is None:
        if wh is not None:
            return np.matmul(wh, img)
        return img if ww is None else np.matmul(img, ww.T)
    c, h_in, w_in = img.shape
    h_out, w_out = wh.shape[0], ww.shape[0]
    if h_out * w_in * (h_in + w_out) <= w_out * h_in * (w_in + h_out):
        return np.matmul(np.matmul(wh, img), ww.T)
    return np.matmul(wh, np.matmul(img, ww.T))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize ``uint8 (C, H, W)`` to ``uint8 (C, h, w)`` (``size`` = R or (h, w)).

    Bilinear when enlarging; antialiased when reducing (the triangle filter widened by the
    shrink factor, as Pillow's BILINEAR). A constant image stays constant.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise DataError(f"resize expects (C, H, W), got shape {image.shape}")
    h_out, w_out = (size, size) if np.isscalar(size) else size
    h_out, w_out = _check_resolution(h_out), _check_resolution(w_out)
    c, h_in, w_in = image.shape
    if h_in == 0 or w_in == 0:
        raise DataError(f"resize: empty image of shape {image.shape}")
    if (h_in, w_in) == (h_out, w_out):
        return np.ascontiguousarray(image, dtype=np.uint8)
    # Strong shrinks go tap by tap (never a float copy of a big input), in the memory order
    # of the input: decoded images arrive as (H, W, C) arrays viewed as (C, H, W).
    channels_last = not image.flags.c_contiguous and image.transpose(1, 2, 0).flags.c_contiguous
    x = image.transpose(1, 2, 0) if channels_last else image
    h_axis, w_axis = (0, 1) if channels_last else (1, 2)
    wh = ww = None
    if h_in >= 4 * h_out:
        x = _resample_axis(x, h_axis, h_out)
    elif h_in != h_out:
        wh = _weights(h_in, h_out)
    if w_in >= 4 * w_out:
        x = _resample_axis(x, w_axis, w_out)
    elif w_in != w_out:
        ww = _weights(w_in, w_out)
    if channels_last:
        x = x.transpose(2, 0, 1)
    out = _resample(np.asarray(x, dtype=np.float32), wh, ww)
    return _to_uint8(out)


def to_input(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``uint8 (N, 3, R, R)`` (or one ``(3, R, R)``) -> float32 ``(N, 3, R, R)`` = 2 p / 255 - 1.

    Exact at the ends (0 -> -1, 255 -> 1). ``out`` may be a preallocated float32 buffer.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"to_input expects uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"to_input expects (N, 3, R, R) images, got shape {images.shape}")
    if out is None:
        out = np.empty(images.shape, dtype=np.float32)
    elif out.shape != images.shape or out.dtype != np.float32:
        raise DataError(f"to_input: out must be float32 {images.shape}, got {out.dtype} {out.shape}")
    np.divide(images, np.float32(127.5), out=out, dtype=np.float32)
    out -= np.float32(1.0)
    return out


# --------------------------------------------------------------------------------------------
# Augmentation (pseudo-queries during fine-tuning)
# --------------------------------------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def augment(image: np.ndarray, rng: np.random.Generator, *, scale=(0.5, 1.0),
            ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=0.2) -> np.ndarray:
    """Random resized crop + horizontal flip + brightness/contrast/saturation jitter.

    ``image`` is ``uint8 (3, R, R)`` (or any (3, H, W)); the result has the same shape and
    dtype. Draws exactly 8 uniforms from ``rng`` per call, so it is deterministic given rng.
    The crop covers ``scale`` of the area with aspect ratio (w/h) log-uniform in ``ratio``;
    a side longer than the image is clipped to the image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise DataError(f"augment expects uint8 (3, H, W), got {image.dtype} {image.shape}")
    _, h, w = image.shape
    u = rng.random(8)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw = min(w, max(1, int(round(math.sqrt(area * aspect)))))
    ch = min(h, max(1, int(round(math.sqrt(area / aspect)))))
    y0 = min(h - ch, int(u[2] * (h - ch + 1)))
    x0 = min(w - cw, int(u[3] * (w - cw + 1)))
    # The crop is never larger than the output, so each output pixel mixes at most 2 input
    # pixels per axis: tap-by-tap is ~0.1 ms at 128x128 and makes no BLAS call.
    x = _resample_axis(image[:, y0:y0 + ch, x0:x0 + cw], 1, h)
    x = _resample_axis(x, 2, w, flip=bool(u[4] < flip_p))

    brightness = 1 + jitter * (2 * u[5] - 1)
    contrast = 1 + jitter * (2 * u[6] - 1)
    saturation = 1 + jitter * (2 * u[7] - 1)
    x *= np.float32(brightness)
    np.clip(x, 0, 255, out=x)
    mean = float(np.tensordot(_LUMA, x, axes=1).mean())
    x -= np.float32(mean)
    x *= np.float32(contrast)
    x += np.float32(mean)
    np.clip(x, 0, 255, out=x)
    gray = np.tensordot(_LUMA, x, axes=1)[None]
    x -= gray
    x *= np.float32(saturation)
    x += gray
    return _to_uint8(x)
