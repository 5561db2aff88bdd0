"""PyTorch checkpoints as training code saves them (issue 12): the state_dict inside a container
dict, its keys under a prefix; the converted arrays equal the plain state_dict's. The inputs are
the tiny fixture networks re-saved by the test (torch-free pickles of their arrays, and with
torch installed also real torch.save files)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from microtrain import torch_archive
from microtrain.checkpoint import CheckpointError, load_weights, read_checkpoint

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures"
CONFIG = FIX / "tiny_tt.json"


def fixture_state_dict(name: str = "tiny_tt_sd.pt") -> dict[str, np.ndarray]:
    return torch_archive.unpickle_archive((FIX / name).read_bytes())


def save(path: Path, obj) -> Path:
    """``obj`` (dicts, numbers, NumPy arrays) in a torch.save-shaped zip, without torch."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ckpt/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("ckpt/version", "3\n")
    return path


def prefixed(sd: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def scaled(sd: dict, factor: float) -> OrderedDict:
    """A second set of weights for the same network (an EMA copy, a teacher)."""
    return OrderedDict((k, v * np.float32(factor) if v.dtype.kind == "f" else v) for k, v in sd.items())


def assert_same_network(got, want) -> None:
    (arch, arrays), (want_arch, want_arrays) = got, want
    assert {k: v for k, v in arch.items() if k not in ("name", "source")} == \
        {k: v for k, v in want_arch.items() if k not in ("name", "source")}
    assert arch["source"]["kind"] == "torch-state-dict"
    assert arrays.keys() == want_arrays.keys()
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], want_arrays[key], err_msg=key)


SD = fixture_state_dict()
OPTIMIZER = {"state": {0: {"momentum_buffer": np.ones(3, np.float32)}},
             "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}

CONTAINERS = {
    "model + epoch": {"model": SD, "epoch": 5},
    "net + acc + optimizer": {"net": SD, "acc": 0.93, "optimizer": OPTIMIZER},
    "state_dict + trainer state": {"state_dict": SD, "epoch": 3, "global_step": 120,
                                   "optimizer_states": [OPTIMIZER], "pytorch-lightning_version": "2.4.0"},
    "nested": {"model": {"state_dict": SD, "arch": "mcunet"}, "epoch": 1},
    "network beside other tensor dicts": {"model": SD, "ema_helper": {"decay": np.array(0.999, np.float32)}},
    "module. prefix": prefixed(SD, "module."),
    "model. prefix in a container": {"state_dict": prefixed(SD, "model."), "epoch": 9},
    "two prefixes": {"model": prefixed(SD, "module.model.")},
}


@pytest.mark.parametrize("name", CONTAINERS)
def test_wrapped_and_prefixed_state_dicts_convert_like_the_plain_one(tmp_path, name):
    got = read_checkpoint(save(tmp_path / "c.pt", CONTAINERS[name]), config=CONFIG)
    assert_same_network(got, read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))


def test_several_state_dicts_are_named_and_one_is_picked(tmp_path):
    path = save(tmp_path / "ema.pt", {"state_dict": SD, "state_dict_ema": scaled(SD, 0.5), "epoch": 5})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, config=CONFIG)
    assert str(err.value) == (f"{path}: the checkpoint holds 2 state_dicts: 'state_dict' ({len(SD)} tensors), "
                              f"'state_dict_ema' ({len(SD)} tensors); choose one with "
                              "tools/convert_ckpt.py --state-dict-key state_dict")
    assert_same_network(read_checkpoint(path, config=CONFIG, state_dict_key="state_dict"),
                        read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))
    ema = read_checkpoint(path, config=CONFIG, state_dict_key="state_dict_ema")
    assert_same_network(ema, read_checkpoint(save(tmp_path / "half.pt", scaled(SD, 0.5)), config=CONFIG))
    with pytest.raises(CheckpointError, match=r"--state-dict-key 'model/x': no 'model' under the top level "
                                              r"\(keys \['epoch', 'state_dict', 'state_dict_ema'\]\)"):
        read_checkpoint(path, config=CONFIG, state_dict_key="model/x")
    with pytest.raises(CheckpointError, match="--state-dict-key 'epoch' leads to a int, not a dict of tensors"):
        read_checkpoint(path, config=CONFIG, state_dict_key="epoch")


def test_several_key_prefixes_are_named_and_one_is_picked(tmp_path):
    """A distillation checkpoint: two networks in one state_dict."""
    path = save(tmp_path / "kd.pt", {**prefixed(SD, "student."), **prefixed(scaled(SD, 2.0), "teacher.")})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, config=CONFIG)
    n = len(SD)
    assert str(err.value) == (f"{path}: the state_dict holds keys under 2 prefixes ('student.' {n} keys, "
                              f"'teacher.' {n} keys): more than one network; choose one with "
                              "tools/convert_ckpt.py --prefix 'student.'")
    assert_same_network(read_checkpoint(path, config=CONFIG, prefix="student."),
                        read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))
    with pytest.raises(CheckpointError, match=r"--prefix 'teacher': no state_dict key has it"):
        read_checkpoint(path, config=CONFIG, prefix="teacher")


def test_a_prefix_some_keys_lack(tmp_path):
    """torch.optim.swa_utils.AveragedModel: 'module.*' plus its own 'n_averaged'."""
    path = save(tmp_path / "swa.pt", {**prefixed(SD, "module."), "n_averaged": np.array(7)})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, config=CONFIG)
    assert str(err.value) == (f"{path}: {len(SD)} state_dict keys carry the prefix 'module.' but 1 do not "
                              "('n_averaged'); keep the network's keys with tools/convert_ckpt.py --prefix 'module.'")
    assert_same_network(read_checkpoint(path, config=CONFIG, prefix="module."),
                        read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))
    mixed = save(tmp_path / "mixed.pt", {**SD, **prefixed(scaled(SD, 3.0), "ema.")})
    assert_same_network(read_checkpoint(mixed, config=CONFIG, prefix=""),  # '' keeps the keys without one
                        read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))


def test_convert_tool_names_the_flag_and_the_flag_works(tmp_path):
    path = save(tmp_path / "ema.pt", {"model": SD, "model_ema": scaled(SD, 0.5)})
    tool = [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), str(path), "--config", str(CONFIG),
            "-o", str(tmp_path / "w.npz")]
    env = {**os.environ, "MICROTRAIN_WEIGHTS": str(tmp_path)}
    refused = subprocess.run(tool, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--state-dict-key model" in refused.stderr
    assert list(tmp_path.iterdir()) == [path]
    done = subprocess.run(tool + ["--state-dict-key", "model"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same_network(load_weights(tmp_path / "w.npz"), read_checkpoint(FIX / "tiny_tt_sd.pt", config=CONFIG))


def test_real_torch_save_files(tmp_path):
    """The issue's examples, written by torch.save itself."""
    torch = pytest.importorskip("torch")
    want = read_checkpoint(FIX / "tiny_zoo_sd.pt", config=FIX / "tiny_zoo.json")
    sd = torch.load(FIX / "tiny_zoo_sd.pt", weights_only=True)
    files = {"model.pt": {"model": sd, "epoch": 5},
             "net.pt": {"net": sd, "acc": 0.87, "optimizer": torch.optim.SGD(
                 [torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9).state_dict()},
             "prefixed.pt": OrderedDict(("model." + k, v) for k, v in sd.items()),
             "lightning.pt": {"state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
                              "epoch": 2, "global_step": 10}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        assert_same_network(read_checkpoint(tmp_path / name, config=FIX / "tiny_zoo.json"), want)
