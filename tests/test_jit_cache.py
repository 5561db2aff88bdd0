"""Numba's disk cache on a device (issue 12): damaged entries are cache misses, and a machine
with no writable cache location still runs, each with one note line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


from microtrain.kernels import _jit

ROOT = Path(__file__).resolve().parent.parent

MODULE = '''
import numpy as np
from microtrain.kernels._jit import f32_1, f32_1r, kernel, void


@kernel(void(f32_1, f32_1r))
def scale(dst, src):
    for i in range(src.shape[0]):
        dst[i] = np.float32(2.5) * src[i] + np.float32(1.0)
'''

RUN = '''
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import tiny_kernels
x = np.linspace(-1, 1, 7, dtype=np.float32)
out = np.empty_like(x)
tiny_kernels.scale(out, x)
stats = tiny_kernels.scale.stats
print(out.tobytes().hex(), sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
'''


def run_tiny(folder: Path) -> tuple[str, int, int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # the in-tree cache
    proc = subprocess.run([sys.executable, "-c", RUN, str(folder)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out, hits, misses = proc.stdout.split()
    return out, int(hits), int(misses), proc.stderr.splitlines()


def test_damaged_cache_entry_is_a_miss_recompiled_once(tmp_path):
    (tmp_path / "tiny_kernels.py").write_text(MODULE)
    clean, hits, misses, err = run_tiny(tmp_path)
    assert (hits, misses, err) == (0, 1, [_jit.COMPILING_NOTE])  # a first compile says so, once
    assert run_tiny(tmp_path) == (clean, 1, 0, [])  # warm

    for damage in ("empty index", "empty data", "garbled index"):
        (index,) = (tmp_path / "__pycache__").glob("tiny_kernels.scale-*.nbi")
        (data,) = (tmp_path / "__pycache__").glob("tiny_kernels.scale-*.nbc")
        if damage == "empty index":  # what a power cut during a write leaves
            index.write_bytes(b"")
        elif damage == "empty data":
            data.write_bytes(b"")
        else:
            index.write_bytes(index.read_bytes()[:40] + b"\x00garbage")
        out, hits, misses, err = run_tiny(tmp_path)
        assert (out, hits, misses) == (clean, 0, 1), damage  # recompiled: the clean run's numbers
        assert len(err) == 1 and err[0].startswith("note: Numba cache entry tiny_kernels.scale-"), err
        assert "was unreadable (" in err[0] and err[0].endswith("); recompiling it")
        assert run_tiny(tmp_path) == (clean, 1, 0, []), damage  # and the entry was rewritten


def test_no_writable_cache_location_falls_back_to_a_private_temp_folder(tmp_path):
    """A read-only install, a HOME that cannot hold ~/.cache, no NUMBA_CACHE_DIR: even --help ran
    into Numba's 33-line 'no locator available' traceback. The install here is a copy of the
    package where every __pycache__ is a file (so not writable even by root) and HOME a file."""
    install = tmp_path / "install"
    shutil.copytree(ROOT / "microtrain", install / "microtrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [install / "microtrain", *(install / "microtrain").rglob("*")]:
        if folder.is_dir():
            (folder / "__pycache__").write_text("not a folder")
    (tmp_path / "home").write_text("not a folder")
    temp = tmp_path / "tmp"
    temp.mkdir()
    # the user's MICROTRAIN_HOME or XDG_CACHE_HOME would name a writable user cache folder
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH", "XDG_CACHE_HOME") and not k.startswith("MICROTRAIN_")}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(temp), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "microtrain.adapt", "--help"]

    first = subprocess.run(cmd, capture_output=True, text=True, cwd=install, env=env, timeout=900)
    assert first.returncode == 0 and first.stdout.startswith("usage: python -m microtrain.adapt")
    folder = temp / f"microtrain-numba-{os.getuid()}"
    no_location = ("note: no writable Numba cache location (NUMBA_CACHE_DIR unset, "
                   f"{install / 'microtrain' / 'kernels' / '__pycache__'} and the user cache folder not writable); "
                   f"caching compiled kernels in {folder} (set NUMBA_CACHE_DIR to choose the place)")
    assert first.stderr.splitlines() == [no_location, _jit.COMPILING_NOTE]
    entries = {p: p.stat().st_mtime_ns for p in folder.rglob("*.nb[ic]")}
    assert len(entries) >= 20 and (folder.stat().st_mode & 0o777) == 0o700

    second = subprocess.run(cmd, capture_output=True, text=True, cwd=install, env=env, timeout=900)
    assert second.returncode == 0 and second.stderr.splitlines() == [no_location]  # loaded: nothing compiled
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.nb[ic]")} == entries  # loaded, not rewritten


def test_a_temp_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    """A cache holds pickles: a shared folder another user could write would run their code."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tmp_path / f"microtrain-numba-{os.getuid()}"
    assert _jit._private_temp_folder() == str(mine) and (mine.stat().st_mode & 0o777) == 0o700
    mine.chmod(0o777)
    fresh = _jit._private_temp_folder()
    assert fresh != str(mine) and Path(fresh).parent == tmp_path
    assert (Path(fresh).stat().st_mode & 0o777) == 0o700
