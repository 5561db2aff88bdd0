"""What `pip install .` installs: the wheel pyproject.toml builds, and an installed copy using it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
META = sorted(p.name for p in (REPO / "weights").glob("*-meta.npz"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of what pyproject.toml packages (not in the checkout: a build
    leaves build/ and *.egg-info behind), by setuptools as pip's build step calls it."""
    pytest.importorskip("setuptools", minversion="70.1")  # the test extra has it; older ones need `wheel`
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(REPO / "microtrain", src / "microtrain", ignore=junk)
    shutil.copytree(REPO / "weights", src / "weights", ignore=junk)
    # a converted backbone and a meta-training state left in a developer's weights/ are not released
    (src / "weights" / "mcunet-5fps.npz").write_bytes(b"converted")
    (src / "weights" / "mcunet-5fps-meta.npz.state.npz").write_bytes(b"state")
    out = src / "dist"
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_wheel(sys.argv[1]))", str(out)],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    return out / build.stdout.strip().splitlines()[-1]


def test_the_wheel_holds_every_module_and_the_meta_trained_backbones_and_nothing_else(wheel):
    assert len(META) == 3, "weights/*-meta.npz: the committed meta-trained backbones"
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "microtrain").rglob("*.py"))
    packaged = sorted(n for n in names if n.endswith(".py"))
    assert packaged == modules  # a new subpackage missing from pyproject's packages list fails here
    assert sorted(n for n in names if not n.endswith(".py") and not n.startswith("microtrain-")) == \
        [f"microtrain/weights/{m}" for m in META]
    assert wheel.stat().st_size < 6 * 2 ** 20  # the meta-trained files are ~4 MB together


def test_an_installed_copy_finds_its_meta_trained_backbones(wheel, tmp_path):
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from microtrain import checkpoint, paths\n"
            "path = checkpoint.backbone_file('mcunet-5fps-meta')\n"
            "arch, arrays = checkpoint.load_weights(path)\n"
            "print(paths.checkout_root(), path, arch['name'], len(arrays), sep='|')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROTRAIN_", "PYTHONPATH"))}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(site), "MICROTRAIN_HOME": str(tmp_path / "home")})
    assert run.returncode == 0, run.stderr
    root, path, name, count = run.stdout.strip().split("|")
    assert root == "None" and Path(path) == site / "microtrain" / "weights" / "mcunet-5fps-meta.npz"
    assert name == "mcunet-5fps-meta" and int(count) > 40
    assert not (tmp_path / "home" / "weights").exists()  # a release file: nothing converted, nothing copied
