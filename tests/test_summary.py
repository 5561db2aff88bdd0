"""microtrain.summary on the three converted backbones: the counts of ../shared/checkpoints/README.md."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from microtrain.checkpoint import SHARED_CHECKPOINTS, ensure_converted, load_weights
from microtrain.paths import shared_dir
from microtrain.summary import summarize

# README: convs (full / pointwise / depthwise), blocks, residual blocks, conv weights, conv MACs, embedding
README = {
    "mcunet-5fps": ((1, 27, 14), 14, 7, 463_216, 22_453_504, 160),
    "mbv2-w0.35": ((1, 33, 17), 17, 10, 238_688, 16_646_912, 112),
    "proxyless-w0.3": ((1, 39, 20), 20, 13, 320_816, 18_619_904, 96),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not (shared_dir() / "checkpoints").is_dir():
        pytest.skip(f"shared checkpoints not found at {shared_dir() / 'checkpoints'} (set MICROTRAIN_SHARED)")
    folder = tmp_path_factory.mktemp("weights")
    return {name: ensure_converted(name, weights_dir=folder) for name in SHARED_CHECKPOINTS}


@pytest.mark.parametrize("name", list(README))
def test_counts_match_the_readme(converted, name):
    kinds, blocks, residual, weights, macs, embedding = README[name]
    s = summarize(*load_weights(converted[name]))
    assert tuple(s["by_kind"][k]["count"] for k in ("conv", "pointwise", "depthwise")) == kinds
    assert s["totals"]["convs"] == sum(kinds)
    assert (s["blocks"], s["residual_blocks"], s["embedding"]) == (blocks, residual, embedding)
    assert s["totals"]["weights"] == weights and s["totals"]["macs"] == macs
    assert sum(k["weights"] for k in s["by_kind"].values()) == weights
    assert sum(k["macs"] for k in s["by_kind"].values()) == macs
    # the per-layer table agrees with the arrays in the file
    _, arrays = load_weights(converted[name])
    for row in s["layers"]:
        assert list(arrays[f"{row['name']}.weight"].shape) == row["weight_shape"]
        assert row["weights"] == int(np.prod(row["weight_shape"]))
    assert s["classifier"] == {"classes": 1000, "params": 1000 * embedding + 1000}


def test_cli_text_and_json(converted):
    path = converted["mcunet-5fps"]
    text = subprocess.run([sys.executable, "-m", "microtrain.summary", str(path)],
                          capture_output=True, text=True, check=True).stdout
    assert "14 blocks (7 residual)" in text
    assert "total         42   463,216  22,453,504" in text
    assert "blocks.13.project" in text and "160x576x1x1" in text
    out = subprocess.run([sys.executable, "-m", "microtrain.summary", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["totals"]["macs"] == 22_453_504 and len(data["layers"]) == 42
    assert data["layers"][0] == {"index": 0, "name": "first_conv", "kind": "conv", "in_channels": 3,
                                 "out_channels": 16, "kernel": 3, "stride": 2, "in_size": 128, "out_size": 64,
                                 "weight_shape": [16, 3, 3, 3], "weights": 432, "biases": 16, "macs": 1_769_472}


@pytest.mark.parametrize("content", [b"", b"not a weight file", None])
def test_cli_bad_file_one_line_exit_2(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "microtrain.summary", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error:")
    if content is None:  # a typo'd name: say what is accepted
        assert "no such weight file, nor a backbone name (mcunet-5fps," in result.stderr


def test_cli_to_a_reader_that_went_away_is_not_an_error(tmp_path):
    """``python -m microtrain.summary mcunet-5fps | head -3``: exit status 0, no traceback."""
    import os

    from task_files import tiny_weights

    path = tiny_weights(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "microtrain.summary", str(path)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""
