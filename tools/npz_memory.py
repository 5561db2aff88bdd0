"""Peak RSS of one episode drawn from a large ``.npz`` dataset, against loading ``x`` whole.

    python tools/npz_memory.py                     # 12,000 images at 128x128x3 (590 MB of x)
    python tools/npz_memory.py --images 2000 --side 64

Writes two datasets into a temporary folder, row block by row block (the writer never holds x):
``stored.npz`` (as ``np.savez``, random pixels, 590 MB on disk) and ``zeros.npz`` (as
``np.savez_compressed``, all zeros, 0.6 MB on disk). For each, a fresh process opens it with
``microtrain.data.open_dataset``, draws a 10-way 5-shot episode with 10 queries per class and
decodes its 150 images at the side length (``EpisodeImages``); another fresh process reads x
whole with ``np.load`` (what a reader that loads the array does). Each prints its peak RSS
(``VmHWM``, Linux) and the peak after imports, in MB. Needs free disk space for x (stored once).
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

EPISODE = """
import sys
def rss():  # VmHWM: this process image's peak (ru_maxrss would include the parent's, kept across exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
from microtrain.data import open_dataset
from microtrain.episodes import EpisodeImages, sample_episode
base = rss()
ds = open_dataset(sys.argv[1])
images = EpisodeImages(sample_episode(ds, 10, 5, 10, 0), int(sys.argv[2]))
print(f"{rss():.0f} {base:.0f} {len(images.support) + len(images.query)}")
"""

WHOLE = """
import sys
import numpy as np
def rss():  # VmHWM: this process image's peak (ru_maxrss would include the parent's, kept across exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
base = rss()
with np.load(sys.argv[1]) as npz:
    x = npz["x"]
print(f"{rss():.0f} {base:.0f} {len(x)}")
"""


def write_npz(path: Path, n: int, side: int, compressed: bool, random: bool) -> None:
    """x (n, side, side, 3) uint8 and y = arange(n) % 100, streamed into the archive."""
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", method) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "|u1", "fortran_order": False, "shape": (n, side, side, 3)})
            for start in range(0, n, 256):
                rows = min(256, n - start)
                block = (rng.integers(0, 256, (rows, side, side, 3), dtype=np.uint8) if random
                         else np.zeros((rows, side, side, 3), np.uint8))
                fh.write(block.tobytes())
        buf = io.BytesIO()
        np.save(buf, np.arange(n) % 100)
        zf.writestr("y.npy", buf.getvalue())


def measure(script: str, *args: str) -> tuple[float, float, int]:
    """Run ``script`` in a fresh Python and parse the three numbers it prints (seconds, MB, count)."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--side", type=int, default=128)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name, compressed, random in (("stored", False, True), ("zeros", True, False)):
            path = Path(tmp) / f"{name}.npz"
            write_npz(path, args.images, args.side, compressed, random)
            x_mb = args.images * args.side * args.side * 3 / 1e6
            print(f"{path.name}: {args.images} images {args.side}x{args.side}x3 (x {x_mb:.0f} MB), "
                  f"file {path.stat().st_size / 1e6:.1f} MB")
            peak, base, count = measure(EPISODE, str(path), str(args.side))
            print(f"  episode of {count} images via open_dataset: peak RSS {peak:.0f} MB "
                  f"(after imports {base:.0f} MB)")
            peak, base, _ = measure(WHOLE, str(path))
            print(f"  x loaded whole with np.load:     peak RSS {peak:.0f} MB "
                  f"(after imports {base:.0f} MB)")
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
