"""tools/convert_ckpt.py as a user meets it: a subprocess, its exit status, stderr and files."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from microtrain.checkpoint import load_weights
from microtrain.paths import shared_dir

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures"
TOOL = REPO / "tools" / "convert_ckpt.py"
needs_shared = pytest.mark.skipif(not (shared_dir() / "checkpoints").is_dir(),
                                  reason=f"shared checkpoints not found at {shared_dir() / 'checkpoints'} "
                                         "(set MICROTRAIN_SHARED)")


def run(*args, cwd=None, **env):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **env}, timeout=120)


def test_converts_to_the_default_output(tmp_path):
    result = run(FIX / "tiny_zoo_wrapped.pt", "--config", FIX / "tiny_zoo.json", MICROTRAIN_WEIGHTS=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "3 blocks, 10 convs" in result.stdout
    arch, arrays = load_weights(tmp_path / "tiny_zoo_wrapped.npz")
    assert arch["source"]["kind"] == "torch-state-dict" and arrays["feature_mix.weight"].shape == (16, 8, 1, 1)


def test_output_option_and_int8(tmp_path):
    result = run(FIX / "tiny_int8.pt", "-o", tmp_path / "sub" / "w.npz")
    assert result.returncode == 0, result.stderr
    assert load_weights(tmp_path / "sub" / "w.npz")[0]["source"]["kind"] == "int8-dict"


@pytest.mark.parametrize("args,message", [
    (["malicious.pt"], "global 'os.system'"),
    (["legacy.pt"], "legacy (non-zip) torch.save format"),
    (["truncated.pt"], "truncated or corrupt zip"),
    (["input.npy"], "not a zip archive"),
    (["absent.pt"], "No such file"),
    (["unknown_key.pt", "--config", "tiny_tt.json"], "unknown key 'blocks.1.conv.squeeze.weight'"),
    (["missing_key.pt", "--config", "tiny_tt.json"], "missing key 'blocks.1.conv.point_linear.bn.running_var'"),
    (["tiny_tt_sd.pt"], "cannot be determined"),
    (["tiny_tt_sd.pt", "--config", "tiny_zoo.json"], "'first_conv.out_channels' = 8, but the weights give 4"),
    (["tiny_tt_sd.pt", "--config", "input.npy"], "not valid JSON"),
    ([], "give either one checkpoint IN or --all"),
    (["--all", "tiny_int8.pt"], "give either one checkpoint IN or --all"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_exit_2_one_line_no_output(tmp_path, args, message):
    args = [FIX / a if a.endswith((".pt", ".json", ".npy")) else a for a in args]
    result = run(*args, "-o", tmp_path / "out.npz", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_ckpt: error:") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no temp file, and the payload never ran


def test_all_without_shared_folder(tmp_path):
    result = run("--all", "-o", tmp_path, MICROTRAIN_SHARED=tmp_path / "missing")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "MICROTRAIN_SHARED" in result.stderr and list(tmp_path.iterdir()) == []


@needs_shared
def test_all_converts_the_three_backbones_in_seconds(tmp_path):
    start = time.perf_counter()
    result = run("--all", "-o", tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbv2-w0.35.npz", "mcunet-5fps.npz", "proxyless-w0.3.npz"]
    assert "42 convs, 463,216 conv weights" in result.stdout
    assert "51 convs, 238,688 conv weights" in result.stdout
    assert "60 convs, 320,816 conv weights" in result.stdout
    assert elapsed < 10, f"--all took {elapsed:.1f} s"
    for path in tmp_path.iterdir():
        with np.load(path, allow_pickle=False) as npz:
            assert int(npz["__format_version__"]) == 1
