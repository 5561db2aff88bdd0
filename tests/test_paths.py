"""Where microtrain looks for the shared folder and keeps its own files, in a checkout and installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microtrain import paths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def clean_env(monkeypatch):
    for var in ("MICROTRAIN_HOME", "MICROTRAIN_WEIGHTS", "MICROTRAIN_SHARED", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    return monkeypatch


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {}, "/home/u/.cache/microtrain"),
    ("linux", {"XDG_CACHE_HOME": "/var/cache/u"}, "/var/cache/u/microtrain"),
    ("darwin", {}, "/home/u/Library/Caches/microtrain"),
    ("win32", {"LOCALAPPDATA": "/c/Users/u/AppData/Local"}, "/c/Users/u/AppData/Local/microtrain"),
    ("linux", {"MICROTRAIN_HOME": "/opt/mt"}, "/opt/mt"),
])
def test_user_cache_is_the_platform_cache_folder(clean_env, platform, env, expected):
    clean_env.setattr(sys, "platform", platform)
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert paths.home_dir() == Path(expected)
    assert paths.weights_dir() == Path(expected) / "weights"
    clean_env.setenv("MICROTRAIN_WEIGHTS", "/w")
    assert paths.weights_dir() == Path("/w")


def test_in_a_checkout_the_shared_folder_is_beside_it(clean_env):
    assert paths.checkout_root() == REPO
    assert paths.shared_dir() == REPO.parent / "shared"
    assert paths.numba_cache_dir() is None  # Numba's own __pycache__ beside the kernels
    clean_env.setenv("MICROTRAIN_SHARED", "/data/shared")
    assert paths.shared_dir() == Path("/data/shared")


def test_a_missing_shared_file_says_where_the_folder_was_looked_for(clean_env, tmp_path):
    """One line naming the file and whether MICROTRAIN_SHARED (and its value) or the checkout's
    ../shared chose the folder."""
    clean_env.setattr(paths, "checkout_root", lambda: tmp_path / "repo")
    with pytest.raises(paths.MissingSharedError) as beside:
        paths.shared_file("data", "x.zip")
    assert str(beside.value) == (f"{tmp_path / 'shared' / 'data' / 'x.zip'} not found (the shared folder is looked "
                                 "for beside this checkout): set MICROTRAIN_SHARED to the folder holding "
                                 "checkpoints/ and data/")
    clean_env.setenv("MICROTRAIN_SHARED", str(tmp_path / "elsewhere"))
    with pytest.raises(paths.MissingSharedError) as chosen:
        paths.shared_file("data", "x.zip")
    assert str(chosen.value) == (f"{tmp_path / 'elsewhere' / 'data' / 'x.zip'} not found (MICROTRAIN_SHARED="
                                 f"{tmp_path / 'elsewhere'}): set MICROTRAIN_SHARED to the folder holding "
                                 "checkpoints/ and data/")
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere" / "data" / "x.zip").write_bytes(b"")
    assert paths.shared_file("data", "x.zip") == tmp_path / "elsewhere" / "data" / "x.zip"


def test_an_installed_copy_needs_MICROTRAIN_SHARED_and_writes_only_to_the_user_cache(tmp_path):
    """The package copied alone (as pip installs it: no pyproject.toml beside it), imported from
    another folder: no shared folder is guessed, Numba's cache goes to the user cache."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "microtrain", site / "microtrain", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import os, microtrain\n"
            "from microtrain import paths\n"
            "print(paths.checkout_root(), os.environ.get('NUMBA_CACHE_DIR'), paths.weights_dir(), sep='|')\n"
            "try:\n    print(paths.shared_file('data', 'x.zip'))\n"
            "except paths.MissingSharedError as exc:\n    print('missing:', exc)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROTRAIN_", "NUMBA_CACHE_DIR"))}
    env.update(PYTHONPATH=str(site), MICROTRAIN_HOME=str(tmp_path / "home"))
    run = lambda extra: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,  # noqa: E731
                                       text=True, env={**env, **extra}, timeout=120)
    result = run({})
    assert result.returncode == 0, result.stderr
    root, numba_cache, weights = result.stdout.splitlines()[0].split("|")
    assert root == "None" and numba_cache == str(tmp_path / "home" / "numba")
    assert weights == str(tmp_path / "home" / "weights")
    assert result.stdout.splitlines()[1] == ("missing: data/x.zip: no shared folder known to this installed "
                                             "microtrain; set MICROTRAIN_SHARED to the folder holding "
                                             "checkpoints/ and data/")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "x.zip").write_bytes(b"")
    result = run({"MICROTRAIN_SHARED": str(tmp_path / "shared"), "NUMBA_CACHE_DIR": "/mine"})
    lines = result.stdout.splitlines()
    assert lines[0].split("|")[1] == "/mine"  # the user's choice wins
    assert lines[1] == str(tmp_path / "shared" / "data" / "x.zip")


def test_write_atomic_follows_the_umask_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "r.json"
    paths.write_atomic(target, lambda tmp: tmp.write_text("one"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "one" and (target.stat().st_mode & 0o777) == 0o666 & ~umask

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        paths.write_atomic(target, fail)
    assert target.read_text() == "one" and [p.name for p in target.parent.iterdir()] == ["r.json"]
