"""Few-shot image datasets: lazy class-per-folder/zip/npz readers, NumPy resizing, augmentation.

Everything here is NumPy only. Pillow is an optional extra, imported the first time a PNG/JPEG
(or other encoded image) has to be decoded; ``.npz`` arrays never need it.

A dataset lists its classes and *items* (cheap references: a relative path, a zip member name or
an npz row index) without decoding anything; ``Dataset.load(item, R)`` decodes one image and
returns it as ``uint8 (3, R, R)``. Keep images uint8 and convert a batch at a time with
:func:`to_input` (float32 in [-1, 1], the backbones' input convention).

Inputs are read as users have them: every format the installed Pillow decodes, EXIF orientation
applied, symlinked folders followed once (loops skipped), zip names in UTF-8 with or without the
zip's UTF-8 flag, no file or zip member read past ``MAX_IMAGE_FILE_BYTES``, and ``.npz`` rows
read one at a time from the archive. What a reader skips is said in one ``note:`` line on
stderr (through the ``microtrain.data`` logger) and kept in ``dataset.notes``.

Episode sampling lives one layer up, in :mod:`microtrain.episodes`, which reads datasets through
this module (never the other way round).
"""
from __future__ import annotations

import io
import logging
import math
import os
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "FolderDataset",
    "ZipDataset",
    "ArrayDataset",
    "NpzDataset",
    "MAX_IMAGE_FILE_BYTES",
    "image_extensions",
    "open_dataset",
    "ImageFile",
    "list_image_files",
    "load_image",
    "decode_image",
    "resize",
    "to_input",
    "augment",
]

# Used to list images only when Pillow is not installed (loading then says how to install it);
# with Pillow, image_extensions() asks Pillow which formats it decodes.
_EXTENSIONS_WITHOUT_PILLOW = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".avif"}
)

# One encoded image file (or zip member) is never read past this many bytes: several times the
# largest phone/DSLR JPEG, about a 40-megapixel uncompressed 8-bit RGB TIFF. Anything declaring
# more is refused before a byte is read or inflated (a zip bomb's member declares gigabytes).
MAX_IMAGE_FILE_BYTES = 128 << 20

_STREAM_WINDOW = 1 << 20  # bytes read (inflated) at a time from a zip member

PILLOW_HINT = "pip install Pillow (or, in a microtrain checkout, pip install -e '.[images]')"

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message is one line and names the path, file or class at fault."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class Dataset:
    """Base class: ``classes`` (sorted names), ``items_per_class`` (cheap item references),
    ``notes`` (one-line remarks on what the reader skipped; already logged).

    Subclasses implement ``_decode(item, resolution) -> uint8 (H, W, 3)`` (the resolution is
    only a decoding hint) and ``describe(item) -> str``.
    """

    source: str
    classes: list[str]
    items_per_class: list[list]
    notes: list[str] = []

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
        """Where ``item`` comes from, for messages (a path, ``ZIP:member`` or ``SOURCE[index]``)."""
        return f"{self.source}: {item}"

    def _note(self, message: str) -> None:
        self.notes = [*self.notes, message]
        _log.warning("note: %s", message)

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
        for i in self._load_order(items):
            out[i] = self.load(items[i], resolution)
        return out

    def _load_order(self, items: Sequence) -> Iterable[int]:
        """The order ``load_many`` visits ``items`` in (positions into ``items``)."""
        return range(len(items))


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    return int(resolution)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of every format the installed Pillow decodes.

    Pillow's registered extensions (``Image.registered_extensions()``) whose format has an
    opener (so not the write-only PDF and Palm), minus the stub formats that need an external
    handler nobody registered (BUFR, GRIB, HDF5, WMF off Windows), EPS/PS without Ghostscript
    and MPEG (identified, not decoded). HEIC/HEIF count when the ``pillow-heif`` plugin is
    installed (it is registered here). Without Pillow, a fixed list of common formats, so that a
    dataset is still listed and loading says how to install Pillow.
    """
    Image = _pillow()
    if Image is None:
        return _EXTENSIONS_WITHOUT_PILLOW
    try:
        # an optional Pillow plugin, not a dependency: the format iPhones save photos in
        from pillow_heif import register_heif_opener
        register_heif_opener()
    except Exception:  # absent, or a broken install: HEIC files are then skipped and counted
        pass
    from PIL import ImageFile

    registered = Image.registered_extensions()  # imports every plugin, filling Image.OPEN
    decodable = set()
    for fmt, (factory, _accept) in Image.OPEN.items():
        if fmt == "MPEG":
            continue
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            module = __import__(factory.__module__, fromlist=["_handler"])
            if getattr(module, "_handler", None) is None:
                continue
        if fmt == "EPS":
            from PIL import EpsImagePlugin
            if not EpsImagePlugin.has_ghostscript():
                continue
        decodable.add(fmt)
    if "JPEG" in decodable:
        decodable.add("MPO")  # phones' multi-picture JPEGs: opened by the JPEG opener
    return frozenset(ext.lower() for ext, fmt in registered.items() if fmt in decodable)


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _is_image_name(name: str) -> bool:
    """Whether a file name has the extension of a format the installed Pillow decodes."""
    return _extension(name) in image_extensions()


def _skipped_note(where: str, not_images: list[str], loose: int) -> str | None:
    """One line counting the files a listing did not use, by extension."""
    if not not_images and not loose:
        return None
    parts = []
    if not_images:
        counts = Counter(_extension(n) or "(no extension)" for n in not_images).most_common()
        shown = ", ".join(f"{c} {ext}" for ext, c in counts[:4]) + (", ..." if len(counts) > 4 else "")
        parts.append(f"{len(not_images)} not in a format the installed Pillow decodes ({shown})")
    if loose:
        parts.append(f"{loose} beside the class folders")
    total = len(not_images) + loose
    return f"{where}: skipped {total} file{'s' if total != 1 else ''}: " + "; ".join(parts)


def _group_by_class(files: Iterable[tuple[str, ...]], dirs: Iterable[tuple[str, ...]],
                    where: str) -> tuple[list[str], list[list[str]], str | None]:
    """Group image paths (tuples of path parts) into classes = first-level folders.

    Single wrapper folders (one folder holding the class folders and no image of its own)
    are stripped, so ``data.zip: omniglot/<class>/<img>`` works as well as ``<class>/<img>``.
    Images deeper inside a class folder belong to that class; loose images beside the class
    folders are not used. A file is an image when its extension is one of
    :func:`image_extensions`. Class names are Unicode NFC, so a folder named on macOS (NFD)
    and one named elsewhere are the same class. Returns the classes, their items and a
    one-line note counting the files not used (None when all were used).
    """
    files = [f for f in files if not any(_hidden(p) for p in f)]
    all_dirs = {d for d in dirs if d and not any(_hidden(p) for p in d)}
    for f in files:  # parents implied by any file (zips need not list folders)
        for k in range(1, len(f)):
            all_dirs.add(f[:k])
    not_images = [f[-1] for f in files if not _is_image_name(f[-1])]
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
    folder_of = {}  # class name (NFC) -> the first folder of that name, for messages
    for d in sorted(d for d in all_dirs if len(d) == n + 1 and d[:n] == prefix):
        folder_of.setdefault(unicodedata.normalize("NFC", d[n]), "/".join(d))
    class_names = sorted(folder_of)
    inside = "/".join(prefix)
    if not class_names:
        raise DataError(f"{where}: no class folders found"
                        + (f" under {inside}/" if inside else "")
                        + " (expected <class>/<image> layout)")
    index = {c: i for i, c in enumerate(class_names)}
    items: list[list[str]] = [[] for _ in class_names]
    loose = 0
    for f in files:
        if len(f) >= n + 2 and f[:n] == prefix:
            items[index[unicodedata.normalize("NFC", f[n])]].append("/".join(f))
        else:
            loose += 1
    for c, lst in zip(class_names, items):
        if not lst:
            raise DataError(f"{where}: class folder {folder_of[c]}/ has no images "
                            f"(in a format the installed Pillow decodes)")
        lst.sort()
    return class_names, items, _skipped_note(where, not_images, loose)


def _list_tree(root: Path) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], str | None]:
    """Every file and folder under ``root`` as path-part tuples, following directory links
    without visiting any real folder twice.

    Real folders are listed first; then each directory link (shallowest first) is followed
    unless it leads to a folder already listed or to a folder holding ``root`` (a loop such as
    ``cat/all -> ..``, or a second name for another class's folder, whose images would be
    listed twice under two labels). Broken links are left out. Returns files, folders and a
    one-line note naming the links skipped (None when none were). Raises DataError when a
    folder cannot be listed.
    """
    root_real = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    files: list[tuple[str, ...]] = []
    dirs: list[tuple[str, ...]] = []
    links: list[tuple[tuple[str, ...], str]] = []  # directory links, followed after real folders
    skipped: list[str] = []
    broken: list[str] = []

    def visit(top: str, rel: tuple[str, ...]) -> None:
        stack = [(top, rel)]
        while stack:
            path, parts = stack.pop()
            st = os.stat(path)
            seen.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                raise DataError(f"{path}: cannot list folder ({exc.strerror or exc})") from None
            for e in entries:
                if _hidden(e.name):
                    continue
                sub = parts + (e.name,)
                if e.is_dir(follow_symlinks=False):
                    dirs.append(sub)
                    stack.append((e.path, sub))
                elif e.is_symlink() and e.is_dir():
                    links.append((sub, e.path))
                elif e.is_symlink() and not os.path.exists(e.path):
                    broken.append("/".join(sub))
                else:
                    files.append(sub)

    visit(str(root), ())
    done = 0
    while done < len(links):
        links[done:] = sorted(links[done:], key=lambda link: (len(link[0]), link[0]))
        parts, path = links[done]
        done += 1
        st = os.stat(path)
        target = os.path.realpath(path)
        inside_root = root_real == target or root_real.startswith(target.rstrip(os.sep) + os.sep)
        if (st.st_dev, st.st_ino) in seen or inside_root:
            skipped.append(f"{'/'.join(parts)} -> {os.readlink(path)}")
            continue
        dirs.append(parts)
        visit(path, parts)
    parts = []
    if skipped:
        parts.append(f"{_count(skipped, 'directory link')} to folders already listed "
                     f"(loops or second names): {_some(skipped)}")
    if broken:
        parts.append(f"{_count(broken, 'broken link')}: {_some(broken)}")
    return files, dirs, (f"{root}: skipped " + "; ".join(parts)) if parts else None


def _count(things: Sequence, noun: str) -> str:
    return f"{len(things)} {noun}{'s' if len(things) != 1 else ''}"


def _some(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_capped(fh, name: str, declared: int | None) -> bytes:
    """Read one encoded image from ``fh``, never more than MAX_IMAGE_FILE_BYTES.

    ``declared`` (a file's size, a zip member's uncompressed size) is checked before reading.
    Reading goes 1 MiB at a time (zipfile inflates as much as one ``read`` asks for, whatever
    the member declares) and stops one byte past the declared size or the limit, so a header
    that lies costs at most 1 MiB; zipfile then reports the member's CRC mismatch."""
    if declared is not None and declared > MAX_IMAGE_FILE_BYTES:
        raise DataError(f"{name}: declares {_mib(declared)}, more than an image file may have "
                        f"({_mib(MAX_IMAGE_FILE_BYTES)}; a zip bomb?); not read")
    want = (MAX_IMAGE_FILE_BYTES if declared is None else declared) + 1
    chunks, got = [], 0
    while got < want:
        chunk = fh.read(min(_STREAM_WINDOW, want - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise DataError(f"{name}: holds more than an image file may have "
                        f"({_mib(MAX_IMAGE_FILE_BYTES)}); read stopped there")
    return data


def _read_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return _read_capped(fh, str(path), os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


class FolderDataset(Dataset):
    """A directory holding one sub-folder of images per class. Items are relative paths.

    Directory links are followed, each real folder once (see ``_list_tree``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.source = str(self.root)
        self.notes = []
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        files, dirs, link_note = _list_tree(self.root)
        if not files and not dirs:
            raise DataError(f"{self.root}: folder is empty")
        self.classes, self.items_per_class, skip_note = _group_by_class(files, dirs, self.source)
        for note in (link_note, skip_note):
            if note:
                self._note(note)

    def describe(self, item) -> str:
        return str(self.root / item)

    def _decode(self, item, resolution):
        path = self.root / item
        return decode_image(_read_file(path), str(path), resolution)


_UNICODE_PATH_EXTRA = 0x7075  # Info-ZIP Unicode Path extra field


def _member_name(info: zipfile.ZipInfo) -> str:
    """A zip member's name as its author wrote it.

    zipfile decodes names as CP437 unless the member's UTF-8 flag (bit 11) is set, but many
    tools write UTF-8 without the flag ("café" would read "caf├⌐"). As ``unzip`` does: the
    Info-ZIP Unicode Path extra field when present and current (its CRC matches the stored
    name), else the stored bytes as UTF-8 when they are valid UTF-8, else CP437. Names written
    with backslashes only (old Windows tools) get forward slashes.
    """
    name = info.filename
    if not info.flag_bits & 0x800:
        raw = info.orig_filename.encode("cp437")
        name = _unicode_path_field(info.extra, raw)
        if name is None:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                name = info.filename
    if "\\" in name and "/" not in name:
        name = name.replace("\\", "/")
    return name


def _unicode_path_field(extra: bytes, raw_name: bytes) -> str | None:
    i = 0
    while i + 4 <= len(extra):
        tag, size = int.from_bytes(extra[i:i + 2], "little"), int.from_bytes(extra[i + 2:i + 4], "little")
        body = extra[i + 4:i + 4 + size]
        if tag == _UNICODE_PATH_EXTRA and len(body) >= 5 and body[0] == 1:
            if int.from_bytes(body[1:5], "little") == zlib.crc32(raw_name):
                try:
                    return body[5:].decode("utf-8")
                except UnicodeDecodeError:
                    return None
        i += 4 + size
    return None


# What zipfile raises for a member it cannot deliver: damaged, truncated, encrypted (RuntimeError),
# an unsupported compression method (NotImplementedError), inflated data past its CRC.
_ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError)


class ZipDataset(Dataset):
    """A zip of a class-per-folder tree. Items are member names (as written, see
    ``_member_name``); the archive stays open (and is reopened after :meth:`close`), members
    are read one at a time on ``load``, never past ``MAX_IMAGE_FILE_BYTES``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self.notes = []
        self._zip: zipfile.ZipFile | None = None
        try:
            zf = self._handle()
            infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable zip ({exc})") from None
        files, dirs = [], []
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = _member_name(info)
            parts = tuple(p for p in name.split("/") if p)
            if not parts:
                continue
            is_dir = info.is_dir() or name.endswith("/")
            (dirs if is_dir else files).append(parts)
            if not is_dir:
                self._members["/".join(parts)] = info
        if not files:
            self.close()
            raise DataError(f"{self.path}: zip holds no files")
        try:
            self.classes, self.items_per_class, skip_note = _group_by_class(files, dirs, self.source)
        except DataError:
            self.close()
            raise
        if skip_note:
            self._note(skip_note)

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def close(self) -> None:
        """Close the zip file (reopened on the next ``load``)."""
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
        name = f"{self.path}:{item}"
        info = self._members.get(item)
        if info is None:
            raise DataError(f"{name}: no such member")
        try:
            with self._handle().open(info) as fh:
                data = _read_capped(fh, name, info.file_size)
        except _ZIP_READ_ERRORS as exc:
            raise DataError(f"{name}: cannot read member ({exc})") from None
        return decode_image(data, name, resolution)


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
        self._rows = len(y)
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

    def describe(self, item) -> str:
        return f"{self.source}[{item}]"

    def _row(self, index: int) -> np.ndarray:
        """Image ``index`` as stored: uint8 (H, W) or (H, W, C)."""
        return np.asarray(self._x[index])

    def _decode(self, item, resolution):
        try:
            index = int(item)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < self._rows:
            raise DataError(f"{self.source}: no image at index {item!r}")
        img = self._row(index)
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
    """An ``.npz`` with ``x``, ``y`` and optional ``names``, read one image row at a time.

    Opening reads ``y``, ``names`` and the header of ``x``; ``load`` then reads only the rows
    asked for. A stored (``np.savez``) ``x.npy`` is read with a seek per row; a compressed one
    (``np.savez_compressed``) is inflated as a stream, 1 MiB at a time, rows kept only when
    asked for: ``load_many`` visits its rows in file order so one pass serves a whole
    support or query set. Peak memory is the images asked for plus that window, whatever the
    size of the dataset. A member whose size disagrees with its header is refused.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self._file = None       # raw file handle (stored x.npy)
        self._stream = None     # (zipfile, member stream, next row) for a compressed x.npy
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = {i.filename: i for i in zf.infolist()}
                missing = [k for k in ("x", "y") if f"{k}.npy" not in members]
                if missing:
                    raise DataError(f"{self.path}: npz has no array {missing[0]!r} "
                                    f"(needs x and y, has {sorted(m[:-4] for m in members)})")
                info = members["x.npy"]
                with zf.open(info) as fh:
                    shape, dtype = _npy_header(fh, self.path, "x.npy")
                    header_len = fh.tell()
                shape = _check_x_shape(shape, dtype, self.source)
                y = _read_npy(zf, members["y.npy"], self.path, rows=shape[0])
                names = (_read_npy(zf, members["names.npy"], self.path)
                         if "names.npy" in members else None)
        except _ZIP_READ_ERRORS as exc:
            raise DataError(f"{self.path}: not a readable npz ({exc})") from None
        self._row_shape = shape[1:]
        self._row_bytes = math.prod(shape[1:])
        expected = header_len + shape[0] * self._row_bytes
        if info.file_size != expected:
            raise DataError(f"{self.path}: x.npy holds {info.file_size} bytes but its header "
                            f"declares {shape} uint8 ({expected} bytes with the header); truncated?")
        self._info, self._header_len = info, header_len
        self._stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
        self._init_index(shape, y, names)

    def close(self) -> None:
        """Close the .npz file (reopened on the next ``load``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._stream is not None:
            self._stream[1].close()
            self._stream[0].close()
            self._stream = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_stream"] = None
        return state

    def _data_offset(self) -> int:
        """Where x.npy's first row starts in the file: after the member's local header (whose
        name and extra field lengths may differ from the central directory's) and .npy header."""
        self._file.seek(self._info.header_offset)
        local = self._file.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{self.path}: x.npy's local header is damaged")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        return self._info.header_offset + 30 + name_len + extra_len + self._header_len

    def _row(self, index: int) -> np.ndarray:
        buf = bytearray(self._row_bytes)
        try:
            if self._stored:
                self._read_stored(index, buf)
            else:
                self._read_streamed(index, buf)
        except _ZIP_READ_ERRORS as exc:
            self.close()
            raise DataError(f"{self.path}: cannot read image {index} of x.npy ({exc})") from None
        return np.frombuffer(buf, dtype=np.uint8).reshape(self._row_shape)

    def _read_stored(self, index: int, buf: bytearray) -> None:
        if self._file is None:
            self._file = open(self.path, "rb")
            self._offset = self._data_offset()
        self._file.seek(self._offset + index * self._row_bytes)
        if self._file.readinto(buf) != len(buf):
            raise EOFError("file ends inside x.npy")

    def _read_streamed(self, index: int, buf: bytearray) -> None:
        if self._stream is None or self._stream[2] > index:  # (re)start at the first row
            self.close()
            zf = zipfile.ZipFile(self.path)
            fh = zf.open(self._info)
            fh.read(self._header_len)
            self._stream = [zf, fh, 0]
        zf, fh, at = self._stream
        skip = (index - at) * self._row_bytes
        while skip:
            got = len(fh.read(min(skip, _STREAM_WINDOW)))
            if not got:
                raise EOFError("x.npy ends early")
            skip -= got
        view = memoryview(buf)
        while view:
            chunk = fh.read(len(view))
            if not chunk:
                raise EOFError("x.npy ends early")
            view[:len(chunk)] = chunk
            view = view[len(chunk):]
        self._stream[2] = index + 1

    def _load_order(self, items: Sequence) -> Iterable[int]:
        try:
            rows = np.array([int(i) for i in items], dtype=np.int64)
        except (TypeError, ValueError):
            return range(len(items))
        return np.argsort(rows, kind="stable").tolist()


def _npy_header(fh, where, member: str):
    """(shape, dtype) of the .npy array whose header starts at ``fh``'s position; refuses a
    Fortran-ordered array and any header that is not a .npy header (never unpickles)."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise DataError(f"{where}: {member} is not a valid .npy array ({exc})") from None
    if fortran:
        raise DataError(f"{where}: {member[:-4]} must be C-ordered, got a Fortran-ordered array")
    return shape, dtype


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where, rows: int | None = None) -> np.ndarray:
    """A small array member (labels, names), its header checked before its data is read: at
    most ``rows`` entries when given, never more than MAX_IMAGE_FILE_BYTES."""
    member = info.filename
    with zf.open(info) as fh:
        shape, dtype = _npy_header(fh, where, member)
        size = math.prod(shape) * dtype.itemsize
        if rows is not None and len(shape) == 1 and shape[0] != rows:  # other shapes: _init_index
            raise DataError(f"{where}: x has {rows} images but {member[:-4]} has {shape[0]} labels")
        if dtype.hasobject:
            raise DataError(f"{where}: {member} holds Python objects, which are not read")
        if size > MAX_IMAGE_FILE_BYTES or info.file_size > fh.tell() + size:
            raise DataError(f"{where}: {member} declares {_mib(max(size, info.file_size))}, "
                            f"more than it can hold; not read")
        data = fh.read(size)
    if len(data) != size:
        raise DataError(f"{where}: {member} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a class-per-folder directory, a zip of one, or an ``.npz`` (x, y[, names]).

    Raises DataError (one line) for anything that is not such a dataset; remarks on files
    that were skipped are logged as one ``note:`` line each and kept in ``dataset.notes``."""
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


@dataclass(frozen=True)
class ImageFile:
    """One encoded image found by :func:`list_image_files`, not read yet.

    ``shown``: how messages name it (``dir/cat/1.jpg``, ``archive.zip:cat/1.jpg``); ``folders``:
    the folder names on its path, outermost first, to look a class up in (for a folder argument
    they start with that folder's own name, for a zip they are the member's folders, for a file
    given alone its parent folder's name); ``read()``: its bytes (never more than
    ``MAX_IMAGE_FILE_BYTES``; ``DataError`` for a file or member that cannot be read or is too
    large)."""

    shown: str
    folders: tuple[str, ...]
    read: Callable[[], bytes]


def list_image_files(path: str | os.PathLike) -> tuple[list[ImageFile], list[str]]:
    """The images under ``path``, listed as a dataset's are but without the class-per-folder
    layout (what ``python -m microtrain.predict`` classifies): a folder searched recursively
    (links followed, each real folder once; hidden files and ``__MACOSX`` left out) and a zip's
    members (names as written), each sorted by path and kept when its extension is one the
    installed Pillow decodes; a single file is taken whatever its name (decoding says whether it
    is an image). Nothing is read yet. Returns the images and the one-line notes on what was
    skipped (links, non-image files). Raises ``DataError`` (one line) for a path that does not
    exist, a folder that cannot be listed or a zip that cannot be opened."""
    path = Path(path)
    if path.is_dir():
        files, _, link_note = _list_tree(path)
        not_images = [f[-1] for f in files if not _is_image_name(f[-1])]
        found = [ImageFile(str(path.joinpath(*parts)), (path.name,) + parts[:-1],
                           lambda file=path.joinpath(*parts): _read_file(file))
                 for parts in sorted(f for f in files if _is_image_name(f[-1]))]
        notes = [link_note, _skipped_note(str(path), not_images, 0)]
    elif path.is_file() and zipfile.is_zipfile(path) and not _is_image_name(path.name):
        found, skipped = _list_zip_images(path)
        notes = [skipped]
    elif path.is_file():
        found, notes = [ImageFile(str(path), path.parent.parts[-1:], lambda: _read_file(path))], []
    else:
        raise DataError(f"{path}: no such file or directory")
    return found, [n for n in notes if n]


def _list_zip_images(path: Path) -> tuple[list[ImageFile], str | None]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip ({exc})") from None
    found, not_images = [], []
    for name, info in sorted((_member_name(i), i) for i in infos if not _member_name(i).endswith("/")):
        parts = [p for p in name.split("/") if p]
        if not parts or any(_hidden(p) for p in parts):
            continue
        if not _is_image_name(parts[-1]):
            not_images.append(parts[-1])
            continue

        def read(info=info, shown=f"{path}:{name}") -> bytes:
            try:
                with zipfile.ZipFile(path) as zf, zf.open(info) as fh:
                    return _read_capped(fh, shown, info.file_size)
            except _ZIP_READ_ERRORS as exc:
                raise DataError(f"{shown}: cannot read member ({exc})") from None
        found.append(ImageFile(f"{path}:{name}", tuple(parts[:-1]), read))
    return found, _skipped_note(str(path), not_images, 0)


# --------------------------------------------------------------------------------------------
# Decoding (Pillow, optional)
# --------------------------------------------------------------------------------------------

def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """One image file -> ``uint8 (3, R, R)``, read and decoded exactly as dataset images are
    (size limit, EXIF orientation, RGB, resize): what prediction on single files uses."""
    resolution = _check_resolution(resolution)
    rgb = decode_image(_read_file(Path(path)), str(path), resolution)
    return resize(rgb.transpose(2, 0, 1), resolution)


def decode_image(data: bytes, name: str, resolution: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to ``uint8 (H, W, 3)`` RGB, upright.

    The EXIF orientation (tag 274, as phones and cameras write it; also read from PNG, WebP,
    TIFF and XMP by Pillow) is applied, so the pixels are the image as every viewer shows it.
    Grayscale, 1-bit, palette and 16-bit images become 3 equal channels; transparency is
    composited over white. For JPEGs, ``resolution`` lets the decoder skip detail (DCT
    scaling) while keeping both sides >= resolution, which saves time and RAM on big photos
    (a 108-megapixel phone photo decodes at 1/8 scale). An image that would still decode to
    more than Pillow's ``MAX_IMAGE_PIXELS`` is refused (DataError) instead of warned about.
    Every reader of this package (folders, zips, single files) decodes through here.
    """
    Image = _pillow()
    if Image is None:
        raise ImportError(f"decoding {name} needs Pillow: {PILLOW_HINT}")
    image_extensions()  # registers the optional plugins
    try:
        with warnings.catch_warnings():
            # Pillow warns (two lines on stderr) when a header declares more than MAX_IMAGE_PIXELS;
            # a JPEG is decoded scaled down (draft), so the size checked below is the one decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as img:
            if resolution and img.format == "JPEG":
                img.draft(img.mode, (resolution, resolution))
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise DataError(f"{name}: {img.width}x{img.height} pixels, more than the {limit} Pillow "
                                f"decodes without a decompression-bomb warning; not decoded")
            img.load()
            _upright(img)
            return _to_rgb(img)
    except (DataError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cannot identify image file" in reason:  # Pillow names our in-memory buffer, not the file
            reason = "not a format Pillow recognises"
        raise DataError(f"{name}: not a decodable image ({reason})") from None


def _upright(img) -> None:
    """Apply the image's EXIF orientation in place. An EXIF block Pillow cannot parse means
    no viewer can orient the image either: it is kept as stored."""
    from PIL import ImageOps

    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # damaged EXIF (Pillow raises several types): keep as stored
        pass


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
