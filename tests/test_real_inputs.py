"""Inputs as users have them (issue 12): phone photos, linked folders, zips from other tools,
every format Pillow reads, zip bombs, datasets larger than memory. Each test builds its input."""
from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import microtrain.data as data
from microtrain.data import DataError, load_image, open_dataset, resize
from microtrain.episodes import from_folders

Image = pytest.importorskip("PIL.Image")

R = 12
ROOT = Path(__file__).resolve().parent.parent


def upright() -> np.ndarray:
    """uint8 (16, 32, 3): four flat quadrants of distinct colours, so each of the 8 EXIF
    orientations (rotations and mirrors) gives a different arrangement; wider than tall;
    edges on JPEG's 8x8 blocks."""
    img = np.empty((16, 32, 3), np.uint8)
    img[:8, :16] = (220, 30, 30)
    img[:8, 16:] = (30, 200, 40)
    img[8:, :16] = (40, 40, 220)
    img[8:, 16:] = (240, 240, 240)
    return img


# How each orientation is stored, from the EXIF 2.3 definition of tag 274 (what row 0 / column 0
# of the stored image show), written independently of Pillow's implementation.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],                       # mirrored left-right
    3: lambda u: u[::-1, ::-1],                    # rotated 180
    4: lambda u: u[::-1, :],                       # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),             # mirrored along the main diagonal
    6: lambda u: np.rot90(u, 1),                   # viewer turns it 90 degrees clockwise
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2), # mirrored along the anti-diagonal
    8: lambda u: np.rot90(u, -1),                  # viewer turns it 90 degrees counter-clockwise
}


def encoded(arr: np.ndarray, fmt: str, orientation: int | None = None, **kw) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "JPEG":  # near-lossless on flat 8x8 blocks
        kw = {"quality": 95, "subsampling": 0, **kw}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "microtrain.data"]


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_upright(orientation):
    want = upright()
    blob = encoded(STORED[orientation](want), "PNG", orientation)
    np.testing.assert_array_equal(data.decode_image(blob, "o.png"), want)


@pytest.mark.parametrize("fmt, ext, kw", [("JPEG", ".jpg", {}), ("TIFF", ".tif", {}),
                                          ("WEBP", ".webp", {"lossless": True})])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_every_reader_applies_orientation(tmp_path, fmt, ext, kw, orientation):
    """Folders and zips (adaptation, evaluation) and single files (prediction) alike."""
    want = resize(upright().transpose(2, 0, 1), R).astype(int)
    blob = encoded(STORED[orientation](upright()), fmt, orientation, **kw)
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "b").mkdir()
    (tmp_path / "ds" / "a" / f"p{ext}").write_bytes(blob)
    (tmp_path / "ds" / "b" / f"p{ext}").write_bytes(blob)
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zf:
        zf.writestr(f"a/p{ext}", blob)
        zf.writestr(f"b/p{ext}", blob)
    tol = 6 if fmt == "JPEG" else 0
    for got in (open_dataset(tmp_path / "ds").load(f"a/p{ext}", R),
                open_dataset(tmp_path / "ds.zip").load(f"a/p{ext}", R),
                load_image(tmp_path / "ds" / "a" / f"p{ext}", R),
                from_folders(tmp_path / "ds", tmp_path / "ds.zip").load(R).query[0]):
        assert np.abs(got.astype(int) - want).max() <= tol


def test_phone_photo_red_band_stays_on_top(tmp_path):
    """The issue's example: a JPEG stored sideways with Orientation 6, red top third upright."""
    photo = np.full((60, 40, 3), 235, np.uint8)
    photo[:20] = (230, 20, 20)
    blob = encoded(np.rot90(photo, 1), "JPEG", 6)
    (tmp_path / "IMG_0001.jpg").write_bytes(blob)
    out = load_image(tmp_path / "IMG_0001.jpg", 30)  # (3, 30, 30): rows 0-9 are the top third
    assert out[0, :9].min() > 200 and out[1, :9].max() < 60
    assert out[1, 11:].min() > 200


def test_damaged_exif_keeps_the_image_as_stored():
    blob = bytearray(encoded(upright(), "JPEG", 6))
    at = blob.index(b"Exif\x00\x00") + 6
    blob[at:at + 8] = b"XXXXXXXX"  # TIFF header of the EXIF block garbled
    out = data.decode_image(bytes(blob), "garbled.jpg")
    assert out.shape == (16, 32, 3)


def test_oversized_pictures_jpeg_scaled_others_refused_without_warnings(monkeypatch):
    """Pillow warns (two lines) past MAX_IMAGE_PIXELS: 108-megapixel phone photos pass it. Here
    the limit is lowered to 10,000 pixels and the pictures are 200x100 (warnings are errors
    under this suite's pytest settings, so a warning would fail the test)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    pic = np.repeat(np.repeat(upright(), 7, axis=0)[:100], 7, axis=1)[:, :200]
    out = data.decode_image(encoded(pic, "JPEG"), "big.jpg", resolution=12)  # drafted to 25x13
    assert out.shape == (13, 25, 3)
    with pytest.raises(DataError) as err:
        data.decode_image(encoded(pic, "PNG"), "big.png", resolution=12)
    assert str(err.value) == ("big.png: 200x100 pixels, more than the 10000 Pillow decodes without a "
                              "decompression-bomb warning; not decoded")


def test_images_are_opened_only_by_decode_image():
    """One decoder for every reader: any other Image.open in the code would skip orientation."""
    hits = []
    for path in sorted([*ROOT.glob("microtrain/**/*.py"), *ROOT.glob("tools/*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"Image\.open\(|imread\(", line):
                hits.append(f"{path.relative_to(ROOT)}:{n}")
    assert len(hits) == 1 and hits[0].startswith("microtrain/data.py"), hits


# ---------------------------------------------------------------------------------------------
# Symlinked folders
# ---------------------------------------------------------------------------------------------

def image_tree(root: Path, counts: dict[str, int]) -> Path:
    for ci, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(encoded(np.full((4, 4, 3), 10 * ci + i, np.uint8), "PNG"))
    return root


def test_loop_links_are_skipped_and_said(tmp_path, caplog):
    root = image_tree(tmp_path / "ds", {"cat": 3, "dog": 2, "owl": 4})
    for c in ("cat", "dog", "owl"):
        (root / c / "all").symlink_to("..")      # the loop, in every class
    (root / "owl" / "self").symlink_to(".")
    (root / "cat" / "dogs").symlink_to("../dog")  # a second name for another class
    (root / "up").symlink_to(tmp_path)            # a folder holding the dataset
    with caplog.at_level(logging.WARNING, "microtrain.data"):
        start = time.perf_counter()
        ds = open_dataset(root)
        assert time.perf_counter() - start < 5
    assert ds.classes == ["cat", "dog", "owl"]
    assert [len(i) for i in ds.items_per_class] == [3, 2, 4]
    assert all(item.count("/") == 1 for items in ds.items_per_class for item in items)
    (line,) = notes(caplog)
    assert line == "note: " + ds.notes[0]
    assert "skipped 6 directory links to folders already listed" in line
    assert "cat/all -> .." in line and "\n" not in line


def test_links_to_new_folders_are_followed_once(tmp_path, caplog):
    pool = image_tree(tmp_path / "pool", {"extra": 2, "hawk": 3})
    root = image_tree(tmp_path / "ds", {"cat": 1, "dog": 1})
    (root / "cat" / "more").symlink_to(pool / "extra")  # more cat images kept elsewhere
    (root / "dog" / "more").symlink_to(pool / "extra")  # ... and the same folder again
    (root / "hawk").symlink_to(pool / "hawk")           # a class made of a link
    (root / "hawk2").symlink_to(root / "hawk")          # a link to that link
    (root / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING, "microtrain.data"):
        ds = open_dataset(root)
    assert ds.classes == ["cat", "dog", "hawk"]
    assert ds.items_per_class[0] == ["cat/0.png", "cat/more/0.png", "cat/more/1.png"]
    assert ds.items_per_class[1] == ["dog/0.png"]
    assert len(ds.items_per_class[2]) == 3 and ds.load("hawk/2.png", 4).shape == (3, 4, 4)
    (line,) = notes(caplog)
    assert "2 directory links" in line and "dog/more" in line and "hawk2" in line
    assert "1 broken link: dog/gone.png" in line


def test_note_is_one_line_on_stderr(tmp_path):
    root = image_tree(tmp_path / "ds", {"a": 1, "b": 1})
    (root / "a" / "all").symlink_to("..")
    (root / "b" / "notes.txt").write_text("x")
    code = f"from microtrain.data import open_dataset; print(len(open_dataset({str(root)!r})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout == "2\n"
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"note: {root}: skipped 1 ") for line in lines)


# ---------------------------------------------------------------------------------------------
# Zip member names
# ---------------------------------------------------------------------------------------------

def zip_with_raw_names(path: Path, names: dict[bytes, bytes], extra: dict[bytes, bytes] = {}) -> Path:
    """A zip whose member names are the given bytes with the UTF-8 flag clear (as many zip
    tools write them): written under ASCII stand-ins of the same length, then patched."""
    stand_in = {}
    with zipfile.ZipFile(path, "w") as zf:
        for i, (raw, blob) in enumerate(names.items()):
            fake = (chr(ord("A") + i) * len(raw)).encode()
            info = zipfile.ZipInfo(fake.decode())
            info.extra = extra.get(raw, b"")
            zf.writestr(info, blob)
            stand_in[fake] = raw
    blob = path.read_bytes()
    for fake, raw in stand_in.items():
        assert blob.count(fake) == 2  # local header and central directory
        blob = blob.replace(fake, raw)
    path.write_bytes(blob)
    return path


def test_utf8_names_without_the_flag(tmp_path):
    png = encoded(upright(), "PNG")
    path = zip_with_raw_names(tmp_path / "d.zip", {
        "café a/1.png".encode(): png, "café a/2.png".encode(): png,
        "naïve b/1.png".encode(): png, "日本 c/1.png".encode(): png,
    })
    infos = zipfile.ZipFile(path).infolist()
    assert not any(i.flag_bits & 0x800 for i in infos) and infos[0].filename == "caf├⌐ a/1.png"
    ds = open_dataset(path)
    assert ds.classes == ["café a", "naïve b", "日本 c"]
    assert ds.items_per_class[0] == ["café a/1.png", "café a/2.png"]
    assert ds.load("日本 c/1.png", R).shape == (3, R, R)
    # the same classes as folders named on disk: --support zip / --query folder agree
    image_tree(tmp_path / "q", {"café a": 1, "naïve b": 1, "日本 c": 1})
    episode = from_folders(path, tmp_path / "q")
    assert episode.classes == ["café a", "naïve b", "日本 c"]


def test_cp437_names_unicode_path_field_and_backslashes(tmp_path):
    png = encoded(upright(), "PNG")
    stored = b"caf_ x/1.png"
    field = b"\x01" + zlib.crc32(stored).to_bytes(4, "little") + "café x/1.png".encode()
    path = zip_with_raw_names(tmp_path / "d.zip", {
        b"caf\x82 a/1.png": png,            # real CP437 (not valid UTF-8): e-acute is 0x82
        stored: png,                         # Info-ZIP Unicode Path extra field
        b"old\\1.png": png,                  # backslashes, as old Windows tools wrote
    }, extra={stored: (0x7075).to_bytes(2, "little") + len(field).to_bytes(2, "little") + field})
    ds = open_dataset(path)
    assert ds.classes == ["café a", "café x", "old"]
    assert ds.items_per_class[2] == ["old/1.png"] and ds.load("old/1.png", R).shape == (3, R, R)


def test_decomposed_and_composed_names_are_one_class(tmp_path):
    """macOS writes names decomposed (NFD): 'é' as 'e' + combining accent."""
    png = encoded(upright(), "PNG")
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        zf.writestr("cafe\u0301/1.png", png)
        zf.writestr("the/1.png", png)
    image_tree(tmp_path / "q", {"caf\u00e9": 2, "the": 1})
    episode = from_folders(tmp_path / "s.zip", tmp_path / "q")
    assert episode.classes == ["caf\u00e9", "the"]
    assert episode.load(R).support.shape == (2, 3, R, R)


# ---------------------------------------------------------------------------------------------
# Every format the installed Pillow decodes; skipped files counted
# ---------------------------------------------------------------------------------------------

def test_extensions_come_from_pillow():
    Image.init()
    exts = data.image_extensions()
    assert {".jfif", ".jpe", ".jpg", ".png", ".webp", ".tif", ".mpo", ".qoi"} <= exts
    assert not {".pdf", ".palm", ".h5", ".grib", ".mpg"} & exts  # write-only, stubs, identify-only
    openable = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    assert exts <= openable | {".mpo"}


def test_every_decodable_format_is_used_and_the_rest_counted(tmp_path, caplog):
    root = tmp_path / "ds"
    pic = upright()
    files = {"a/1.jfif": encoded(pic, "JPEG"), "a/2.jpe": encoded(pic, "JPEG"),
             "a/3.qoi": encoded(pic, "QOI"), "a/4.PNG": encoded(pic, "PNG"),
             "b/1.tga": encoded(pic, "TGA"), "b/2.notes.txt": b"x", "b/3.heic": b"x",
             "b/4": b"x", "loose.jpg": encoded(pic, "JPEG")}
    if ".avif" in data.image_extensions():
        files["b/5.avif"] = encoded(pic, "AVIF", quality=90)
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    with caplog.at_level(logging.WARNING, "microtrain.data"):
        ds = open_dataset(root)
    assert ds.items_per_class[0] == ["a/1.jfif", "a/2.jpe", "a/3.qoi", "a/4.PNG"]
    assert ds.items_per_class[1][0] == "b/1.tga" and len(ds.items_per_class[1]) == len(files) - 8
    want = resize(pic.transpose(2, 0, 1), R).astype(int)
    for item in ds.items_per_class[0] + ds.items_per_class[1]:
        # AVIF is lossy; a wrong picture would be ~100 off
        assert np.abs(ds.load(item, R).astype(int) - want).mean() <= 5, item
    (line,) = notes(caplog)
    assert line == (f"note: {root}: skipped 4 files: 3 not in a format the installed Pillow decodes "
                    "(1 .txt, 1 .heic, 1 (no extension)); 1 beside the class folders")


def test_a_class_of_undecodable_files_names_the_reason(tmp_path):
    root = image_tree(tmp_path / "ds", {"a": 1})
    (root / "b").mkdir()
    (root / "b" / "1.heic").write_bytes(b"x")
    with pytest.raises(DataError, match="class folder b/ has no images \\(in a format the installed Pillow"):
        open_dataset(root)


# ---------------------------------------------------------------------------------------------
# Zip bombs and oversized files
# ---------------------------------------------------------------------------------------------

def zeros_member(zf: zipfile.ZipFile, name: str, size: int, zip64: bool = True) -> None:
    chunk = bytes(1 << 20)
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=zip64) as fh:
        for start in range(0, size, len(chunk)):
            fh.write(chunk[:min(len(chunk), size - start)])


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_zip_bomb_member_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.zip"
    png = encoded(upright(), "PNG")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/ok.png", png)
        zf.writestr("b/ok.png", png)
        zeros_member(zf, "a/huge.png", data.MAX_IMAGE_FILE_BYTES + (1 << 20))
    assert path.stat().st_size < 1 << 20
    ds = open_dataset(path)
    assert ds.items_per_class[0] == ["a/huge.png", "a/ok.png"]
    with pytest.raises(DataError) as exc:
        ds.load("a/huge.png", R)
    assert str(exc.value) == (f"{path}:a/huge.png: declares 129 MiB, more than an image file may have "
                              "(128 MiB; a zip bomb?); not read")
    assert peak_bytes(lambda: pytest.raises(DataError, ds.load, "a/huge.png", R)) < 1 << 20
    assert ds.load("b/ok.png", R).shape == (3, R, R)


def test_zip_member_whose_header_lies_inflates_no_more_than_declared(tmp_path):
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/ok.png", encoded(upright(), "PNG"))
        zeros_member(zf, "b/small.png", 64 << 20, zip64=False)
    blob = path.read_bytes()
    info = zipfile.ZipFile(path).getinfo("b/small.png")
    real = (64 << 20).to_bytes(4, "little")
    assert blob.count(real) == 2  # the uncompressed size in the local header and central directory
    path.write_bytes(blob.replace(real, (4096).to_bytes(4, "little")))
    assert zipfile.ZipFile(path).getinfo("b/small.png").file_size == 4096 != info.file_size
    ds = open_dataset(path)
    errors = []
    peak = peak_bytes(lambda: errors.append(pytest.raises(DataError, ds.load, "b/small.png", R)))
    assert peak < 1 << 20
    assert "cannot read member" in str(errors[0].value) and "CRC" in str(errors[0].value)


def test_oversized_file_in_a_folder_is_not_read(tmp_path):
    root = image_tree(tmp_path / "ds", {"a": 1, "b": 1})
    with open(root / "a" / "huge.png", "wb") as fh:  # sparse: no disk space used
        fh.truncate(data.MAX_IMAGE_FILE_BYTES + 1)
    ds = open_dataset(root)
    with pytest.raises(DataError, match=r"huge\.png: declares 128 MiB, more than an image file may have"):
        ds.load("a/huge.png", R)


# ---------------------------------------------------------------------------------------------
# .npz datasets larger than memory
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reads_only_the_rows_an_episode_uses(tmp_path, compressed):
    n, side = 3000, 64  # x is 37 MB; an episode of 40 images needs 0.5 MB of it
    rng = np.random.default_rng(1)
    x = np.zeros((n, side, side, 3), np.uint8)
    rows = np.sort(rng.choice(n, 40, replace=False))
    x[rows] = rng.integers(0, 256, (40, side, side, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x=x, y=y)
    del x
    ds = open_dataset(tmp_path / "d.npz")
    items = rng.permutation(rows).tolist()
    got = []
    peak = peak_bytes(lambda: got.append(ds.load_many(items, side)))
    assert peak < 5 << 20  # the 0.5 MB of images + 1 MiB windows (zipfile's and ours), not 37 MB
    want = np.load(tmp_path / "d.npz")["x"][items].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got[0], want)


def test_npz_whose_x_is_shorter_than_its_header(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10, 4, 4)})
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
        zf.writestr("x.npy", header.getvalue() + bytes(5 * 16))
        buf = io.BytesIO()
        np.save(buf, np.arange(10))
        zf.writestr("y.npy", buf.getvalue())
    with pytest.raises(DataError, match=r"x\.npy holds 208 bytes but its header declares"):
        open_dataset(tmp_path / "cut.npz")


def test_npz_labels_declaring_more_rows_than_x(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as zf:
        xb = io.BytesIO()
        np.save(xb, np.zeros((2, 3, 3), np.uint8))
        zf.writestr("x.npy", xb.getvalue())
        zf.writestr("y.npy", buf.getvalue())
    with pytest.raises(DataError, match="x has 2 images but y has 1000000000000 labels"):
        open_dataset(tmp_path / "y.npz")


def test_npz_dataset_pickles_and_reopens(tmp_path):
    import pickle

    x = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    ds = open_dataset(tmp_path / "d.npz")
    first = ds.load(4, 2)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy.load(4, 2), first)
    assert (first == x[4]).all()
