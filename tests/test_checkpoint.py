"""microtrain.checkpoint: restricted reading, dequantisation, BN folding, the .npz weight file.

The float fixtures (tests/fixtures, made by tools/make_ckpt_fixtures.py) come with torch's own
eval-mode outputs, so BN folding is checked against torch even where torch is not installed;
with torch installed the outputs are also recomputed live.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtrain import torch_archive as ta
from microtrain import weight_format
from microtrain.architecture import embedding_channels, weight_shapes
from microtrain.checkpoint import (CheckpointError, ensure_converted, load_weights, read_checkpoint,
                                   save_weights)
from microtrain.paths import MissingSharedError, shared_dir

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures"
MARKER = "microtrain-pwned.marker"
FLOAT_FIXTURES = [("tiny_zoo", "tiny_zoo_sd.pt"), ("tiny_zoo", "tiny_zoo_wrapped.pt"),
                  ("tiny_tt", "tiny_tt_sd.pt"), ("tiny_tt", "tiny_tt_wrapped.pt")]
# README of ../shared/checkpoints: convs, conv weights, blocks, residual blocks, embedding
SHARED = {"mcunet-5fps": (42, 463_216, 14, 7, 160),
          "mbv2-w0.35": (51, 238_688, 17, 10, 112),
          "proxyless-w0.3": (60, 320_816, 20, 13, 96)}


# ----------------------------------------------------------------------------- helpers

def _conv(x, w, b, stride):
    """Reference conv (float64) of x (N, C, H, W) with padding (k-1)//2; depthwise when w has
    one input channel per group and C > 1."""
    k = w.shape[-1]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    h = (x.shape[2] + 2 * p - k) // stride + 1
    wd = (x.shape[3] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    depthwise = w.shape[1] == 1 and x.shape[1] == w.shape[0] and x.shape[1] > 1
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * h:stride, j:j + stride * wd:stride]
            if depthwise:
                out += w[None, :, 0, i, j, None, None] * patch
            else:
                out += np.einsum("oc,nchw->nohw", w[:, :, i, j], patch)
    return out + b[None, :, None, None]


def reference_forward(arch, arrays, x):
    """(pooled features, logits) of the network ``arch`` in float64, ReLU6 placement as in
    weights/README.md."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    relu6 = lambda t: np.clip(t, 0, 6)  # noqa: E731
    h = relu6(_conv(x, a["first_conv.weight"], a["first_conv.bias"], arch["first_conv"]["stride"]))
    for i, blk in enumerate(arch["blocks"]):
        y = h
        if blk["expand"] is not None:
            y = relu6(_conv(y, a[f"blocks.{i}.expand.weight"], a[f"blocks.{i}.expand.bias"], 1))
        y = relu6(_conv(y, a[f"blocks.{i}.depthwise.weight"], a[f"blocks.{i}.depthwise.bias"], blk["stride"]))
        y = _conv(y, a[f"blocks.{i}.project.weight"], a[f"blocks.{i}.project.bias"], 1)
        h = h + y if blk["residual"] else y
    if arch["feature_mix"] is not None:
        h = relu6(_conv(h, a["feature_mix.weight"], a["feature_mix.bias"], 1))
    features = h.mean(axis=(2, 3))
    return features, features @ a["classifier.weight"].T + a["classifier.bias"]


def torch_zip(path: Path, pickle_bytes: bytes, folder: str = "archive") -> Path:
    """A zip laid out like torch.save's around the given pickle (no tensor storage)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/data.pkl", pickle_bytes)
        zf.writestr(f"{folder}/version", "3\n")
    return path


def global_call_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol-2 pickle of ``module.name(arg)``, written by hand (nothing is imported or run)."""
    a = arg.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(a).to_bytes(4, "little") + a + b"\x85R."


def int8_dict():
    """The int8 fixture's dict, rebuilt through the restricted reader's own unpickler."""
    with zipfile.ZipFile(FIX / "tiny_int8.pt") as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return ta._materialize(ta.RestrictedUnpickler(zf.read(name)).load())


def write_int8(path: Path, d) -> Path:
    return torch_zip(path, pickle.dumps(d, protocol=2))


# ----------------------------------------------------------------------------- restricted unpickling

@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "getattr"), ("subprocess", "Popen"), ("subprocess", "check_output"),
    ("numpy", "load"), ("numpy.testing._private.utils", "runstring"), ("torch", "load"),
    ("torch._utils", "_rebuild_tensor"), ("collections", "defaultdict"), ("__main__", "anything"),
])
def test_refuses_any_other_global_before_it_runs(tmp_path, monkeypatch, module, name):
    monkeypatch.chdir(tmp_path)
    path = torch_zip(tmp_path / "evil.pt", global_call_pickle(module, name, f"touch {MARKER}"))
    with pytest.raises(CheckpointError, match=rf"global '{module}\.{name}'"):
        read_checkpoint(path)
    assert not (tmp_path / MARKER).exists()


def test_malicious_fixture_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"global 'os\.system'") as err:
        read_checkpoint(FIX / "malicious.pt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / MARKER).exists()


def test_malicious_fixture_is_live(tmp_path):
    """The refusal test means something: the stock unpickler does run the payload."""
    code = ("import pickle, zipfile; z = zipfile.ZipFile(%r); pickle.loads(z.read('archive/data.pkl'))"
            % str(FIX / "malicious.pt"))
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / MARKER).exists()


def test_build_cannot_tamper_with_allowed_globals(tmp_path):
    """BUILD on an allowlisted global reaches neither the stand-in nor the real object."""
    dict_state = b"\x80\x02cnumpy\ndtype\n}X\x04\x00\x00\x00callNsb."  # state {'call': None}
    slot_state = b"\x80\x02cnumpy\ndtype\nN}X\x04\x00\x00\x00callNs\x86b."  # state (None, {'call': None})
    with pytest.raises(CheckpointError, match="corrupt pickle"):
        read_checkpoint(torch_zip(tmp_path / "t.pt", dict_state))
    with pytest.raises(CheckpointError, match="modify numpy.dtype"):
        read_checkpoint(torch_zip(tmp_path / "t.pt", slot_state))
    assert callable(np.dtype) and np.dtype("f4").itemsize == 4


def test_shared_references_are_converted_once(tmp_path):
    """A 200-byte pickle can describe a DAG with 2^30 paths; reading it must not walk them."""
    x = []
    for _ in range(30):
        x = [x, x]
    path = torch_zip(tmp_path / "dag.pt", pickle.dumps(x, protocol=2))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="unrecognised checkpoint contents"):
        read_checkpoint(path)
    assert time.perf_counter() - start < 1.0


def test_missing_storage_record_is_named_once(tmp_path):
    with zipfile.ZipFile(FIX / "tiny_tt_sd.pt") as src, zipfile.ZipFile(tmp_path / "cut.pt", "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/3"):
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "cut.pt", config=FIX / "tiny_tt.json")
    assert str(err.value) == f"{tmp_path / 'cut.pt'}: missing archive member tiny_tt_sd/data/3"


def test_object_dtype_arrays_are_refused(tmp_path):
    obj = np.array([1, "x"], dtype=object)
    with pytest.raises(CheckpointError, match="dtype 'O8'|only plain numeric"):
        read_checkpoint(write_int8(tmp_path / "o.pt", {"first_conv": {"w": obj}}))


def test_numpy1_and_numpy2_spellings_and_any_archive_folder(tmp_path):
    d = int8_dict()
    raw = pickle.dumps(d, protocol=2)
    assert b"numpy._core.multiarray" in raw  # numpy >= 2 writes the new spelling
    old = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    a1, w1 = read_checkpoint(torch_zip(tmp_path / "new.pt", raw, folder="whatever"))
    a2, w2 = read_checkpoint(torch_zip(tmp_path / "old.pt", old))
    assert a1["blocks"] == a2["blocks"]
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])


def test_torch_storages_with_views_offsets_and_big_endian():
    # a storage shared by two tensors, one a strided view at an offset
    storage = ta._Storage(np.arange(12, dtype="<f4"), "f4")
    full = ta._rebuild_tensor_v2(storage, 0, (3, 4), (4, 1))
    view = ta._rebuild_tensor_v2(storage, 1, (2, 2), (4, 2))
    np.testing.assert_array_equal(full, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(view, [[1, 3], [5, 7]])
    with pytest.raises(CheckpointError, match="runs past its storage"):
        ta._rebuild_tensor_v2(storage, 4, (3, 4), (4, 1))
    pid = ("storage", ta._Global("torch.FloatStorage", dtype="f4"), "0", "cpu", 3)
    for order, code in (("big", ">f4"), ("little", "<f4")):
        un = ta.RestrictedUnpickler(b"", lambda key: np.array([1, 2, 3], code).tobytes(), order)
        np.testing.assert_array_equal(un.persistent_load(pid).array, [1, 2, 3])
    un = ta.RestrictedUnpickler(b"", lambda key: b"\0" * 8)
    with pytest.raises(CheckpointError, match="holds 8 bytes, expected 3 x 4"):
        un.persistent_load(pid)
    bf16 = ("storage", ta._Global("torch.BFloat16Storage", dtype="bf16"), "0", "cpu", 2)
    raw = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    np.testing.assert_array_equal(ta.RestrictedUnpickler(b"", lambda key: raw).persistent_load(bf16).array, [1.5, -2.0])


# ----------------------------------------------------------------------------- float state_dicts

@pytest.mark.parametrize("net,fname", FLOAT_FIXTURES)
def test_bn_folding_matches_torch_outputs(net, fname):
    arch, arrays = read_checkpoint(FIX / fname, config=FIX / f"{net}.json")
    x = np.load(FIX / "input.npy").astype(np.float64)
    features, logits = reference_forward(arch, arrays, x)
    np.testing.assert_allclose(features, np.load(FIX / f"{net}_features.npy"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, np.load(FIX / f"{net}_logits.npy"), rtol=1e-4, atol=1e-5)
    assert arch["source"]["kind"] == "torch-state-dict" and arch["resolution"] == 16
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in arrays.values())


def test_fixture_architectures():
    arch, arrays = read_checkpoint(FIX / "tiny_zoo_sd.pt", config=FIX / "tiny_zoo.json")
    assert arch["first_conv"] == {"out": 8, "kernel": 3, "stride": 2}
    assert arch["blocks"] == [
        {"expand": None, "kernel": 3, "stride": 1, "out": 6, "residual": False},
        {"expand": 18, "kernel": 5, "stride": 2, "out": 8, "residual": False},
        {"expand": 24, "kernel": 3, "stride": 1, "out": 8, "residual": True}]
    assert arch["feature_mix"] == {"out": 16} and arrays["classifier.weight"].shape == (5, 16)
    arch, arrays = read_checkpoint(FIX / "tiny_tt_wrapped.pt", config=FIX / "tiny_tt.json")
    assert arch["feature_mix"] is None and "feature_mix.weight" not in arrays
    assert arch["blocks"][0] == {"expand": None, "kernel": 3, "stride": 1, "out": 4, "residual": True}
    assert arch["name"] == "tiny_tt_wrapped"


def test_bn_folding_matches_torch_live():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_ckpt_fixtures as mk
    finally:
        sys.path.remove(str(REPO / "tools"))
    x = np.load(FIX / "input.npy")
    for net, word in (("tiny_zoo", "mobile_inverted_conv"), ("tiny_tt", "conv")):
        config = json.loads((FIX / f"{net}.json").read_text())
        model = mk.build(config, word)
        model.load_state_dict(torch.load(FIX / f"{net}_sd.pt", weights_only=True))
        with torch.no_grad():
            features, logits = (t.numpy() for t in model(torch.from_numpy(x)))
        np.testing.assert_allclose(features, np.load(FIX / f"{net}_features.npy"), rtol=1e-5, atol=1e-6)
        arch, arrays = read_checkpoint(FIX / f"{net}_sd.pt", config=config)
        ours = reference_forward(arch, arrays, x.astype(np.float64))
        np.testing.assert_allclose(ours[0], features, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[1], logits, rtol=1e-4, atol=1e-5)


def test_bn_eps_from_config_default_and_override():
    x = np.load(FIX / "input.npy").astype(np.float64)
    want = np.load(FIX / "tiny_tt_features.npy")
    # tiny_tt's config names eps 1e-5; the 1e-3 default or a wrong override must show
    for eps in (1e-3, 1e-2):
        arch, arrays = read_checkpoint(FIX / "tiny_tt_sd.pt", config=FIX / "tiny_tt.json", bn_eps=eps)
        assert not np.allclose(reference_forward(arch, arrays, x)[0], want, rtol=1e-3, atol=1e-4)
    config = json.loads((FIX / "tiny_tt.json").read_text())
    del config["bn"]
    arch, arrays = read_checkpoint(FIX / "tiny_tt_sd.pt", config=config, bn_eps=1e-5)
    np.testing.assert_allclose(reference_forward(arch, arrays, x)[0], want, rtol=1e-4, atol=1e-5)


def test_stride_without_config_is_an_error():
    with pytest.raises(CheckpointError, match="strides .* cannot be determined .*--config"):
        read_checkpoint(FIX / "tiny_zoo_sd.pt")


@pytest.mark.parametrize("fname,message", [
    ("unknown_key.pt", r"unknown key 'blocks\.1\.conv\.squeeze\.weight'"),
    ("missing_key.pt", r"missing key 'blocks\.1\.conv\.point_linear\.bn\.running_var'"),
    ("legacy.pt", r"legacy \(non-zip\) torch\.save format"),
    ("truncated.pt", r"truncated or corrupt zip"),
    ("input.npy", r"not a zip archive"),
    ("absent.pt", r"cannot read .*absent\.pt"),
])
def test_bad_files_name_the_problem(fname, message):
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(FIX / fname, config=FIX / "tiny_tt.json")
    assert "\n" not in str(err.value)


def _edited_zoo_config(edit):
    config = json.loads((FIX / "tiny_zoo.json").read_text())
    edit(config)
    return config


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["blocks"][1]["mobile_inverted_conv"].update(kernel_size=7),
     r"'blocks\.1\.mobile_inverted_conv\.kernel_size' = 7, but the weights give 5"),
    (lambda c: c["blocks"][2]["mobile_inverted_conv"].update(out_channels=9), r"out_channels' = 9, but the weights give 8"),
    (lambda c: c["blocks"][2]["mobile_inverted_conv"].update(mid_channels=30), r"expands to 30 channels, the weights to 24"),
    (lambda c: c["blocks"][0]["mobile_inverted_conv"].update(expand_ratio=6), r"expand_ratio' = 6, but the state_dict has no"),
    (lambda c: c["blocks"][1].update(shortcut={"name": "IdentityLayer"}), r"shortcut' on a block with stride 2"),
    (lambda c: c["blocks"][2]["mobile_inverted_conv"].update(act_func="h_swish"), r"act_func' = 'h_swish'"),
    (lambda c: c["blocks"][2]["mobile_inverted_conv"].update(use_se=True), r"use_se"),
    (lambda c: c["blocks"].pop(), r"config has 2 blocks, the state_dict 3"),
    (lambda c: c["first_conv"].pop("stride"), r"first_conv\.stride' = None"),
    (lambda c: c.update(feature_mix_layer=None), r"config has no feature_mix_layer, the state_dict has"),
    (lambda c: c["classifier"].update(out_features=7), r"'classifier\.out_features' = 7, but the weights give 5"),
    (lambda c: c.pop("blocks"), r"config: missing key 'blocks'"),
])
def test_config_must_agree_with_the_weights(edit, message):
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(FIX / "tiny_zoo_sd.pt", config=_edited_zoo_config(edit))


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(FIX / "tiny_zoo_sd.pt", config=tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="cannot read config"):
        read_checkpoint(FIX / "tiny_zoo_sd.pt", config=tmp_path / "absent.json")


# ----------------------------------------------------------------------------- int8 dicts

def test_int8_dequantisation_in_float64():
    d = int8_dict()
    arch, arrays = read_checkpoint(FIX / "tiny_int8.pt")
    assert arch["source"]["kind"] == "int8-dict" and arch["resolution"] == 16
    assert [b["residual"] for b in arch["blocks"]] == [True, False, True]
    assert [b["expand"] for b in arch["blocks"]] == [None, 24, 36]
    convs = {"first_conv": d["first_conv"], "blocks.1.expand": d["blocks"][1]["pointwise1"],
             "blocks.1.depthwise": d["blocks"][1]["depthwise"], "blocks.2.project": d["blocks"][2]["pointwise2"]}
    for name, conv in convs.items():
        p = conv["params"]
        s = p["w_scales"].astype(np.float64)
        np.testing.assert_array_equal(arrays[f"{name}.weight"], (p["weight"] * s[:, None, None, None]).astype(np.float32))
        np.testing.assert_array_equal(arrays[f"{name}.bias"], (p["bias"].astype(np.float64) * s * p["x_scale"]).astype(np.float32))
    # the saturated bias on a near-dead channel: -2^31 * 3.937008e-09 * 2/255
    want = np.float32(-(2.0**31) * np.float64(np.float32(3.937008e-09)) * (2 / 255))
    assert arrays["first_conv.bias"][3] == want
    c = d["classifier"]["params"]
    assert arrays["classifier.weight"].shape == (10, 12)
    np.testing.assert_array_equal(arrays["classifier.weight"],
                                  (c["weight"][:, :, 0, 0] * c["w_scales"].astype(np.float64)[:, None]).astype(np.float32))


def _int8_edit(edit):
    d = int8_dict()
    edit(d)
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("blocks"), r"missing key 'blocks'"),
    (lambda d: d.update(extra=1), r"unknown key 'extra'"),
    (lambda d: d["blocks"][1]["pointwise1"]["params"].pop("w_scales"), r"missing key 'blocks\.1\.pointwise1\.params\.w_scales'"),
    (lambda d: d["blocks"][1]["depthwise"].update(kernel_size=(3, 3)),
     r"shape mismatch: 'blocks\.1\.depthwise\.params\.weight' is \(24, 1, 5, 5\), expected \(24, 1, 3, 3\)"),
    (lambda d: d["blocks"][2]["pointwise1"].update(in_channel=8), r"in_channel' = 8, but the previous layer gives 12"),
    (lambda d: d["blocks"][1].update(residual={}), r"residual' on a block with stride 2"),
    (lambda d: d["blocks"][0].update(se={"x": 1}), r"squeeze-and-excitation"),
    (lambda d: d["first_conv"]["params"].update(x_scale=float("nan")), r"x_scale' = nan"),
    (lambda d: d["blocks"][0]["depthwise"].update(groups=1), r"is not depthwise"),
])
def test_int8_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(write_int8(tmp_path / "e.pt", _int8_edit(edit)))


def test_unrecognised_contents(tmp_path):
    with pytest.raises(CheckpointError, match="unrecognised checkpoint contents"):
        read_checkpoint(write_int8(tmp_path / "l.pt", [1, 2, 3]))
    with pytest.raises(CheckpointError, match="no 'blocks.N.mobile_inverted_conv"):
        read_checkpoint(write_int8(tmp_path / "s.pt", {"fc.weight": np.zeros(3, np.float32)}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_pickles_fail_only_with_checkpoint_error(tmp_path, data):
    """Whatever the bytes, the reader answers with a result or a one-line CheckpointError."""
    fname = data.draw(st.sampled_from(["tiny_int8.pt", "tiny_tt_sd.pt"]))
    with zipfile.ZipFile(FIX / fname) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    raw = bytearray(members[name])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    members[name] = bytes(raw[: data.draw(st.integers(1, len(raw)))])
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    try:
        read_checkpoint(path, config=FIX / "tiny_tt.json")
    except CheckpointError as exc:
        assert "\n" not in str(exc)


def test_reading_never_imports_torch():
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now fails
from microtrain.checkpoint import read_checkpoint
read_checkpoint({str(FIX / 'tiny_zoo_wrapped.pt')!r}, config={str(FIX / 'tiny_zoo.json')!r})
read_checkpoint({str(FIX / 'tiny_int8.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------------------- the weight file

def _tiny():
    return read_checkpoint(FIX / "tiny_zoo_sd.pt", config=FIX / "tiny_zoo.json")


def test_save_load_roundtrip(tmp_path):
    arch, arrays = _tiny()
    path = save_weights(tmp_path / "w.npz", arch, arrays)
    with np.load(path, allow_pickle=False) as npz:  # the documented contract
        assert npz["__format_version__"].ndim == 0 and int(npz["__format_version__"]) == 1
        assert json.loads(str(npz["__arch__"])) == arch
        stored = [info.compress_type for info in zipfile.ZipFile(path).infolist()]
    assert set(stored) == {zipfile.ZIP_STORED}
    arch2, arrays2 = load_weights(path)
    assert arch2 == arch and arrays2.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays2[k], arrays[k])
    assert list(weight_shapes(arch)) == [k for k in arrays if not k.startswith("classifier.")]
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_classifier_is_optional(tmp_path):
    arch, arrays = _tiny()
    del arrays["classifier.weight"], arrays["classifier.bias"]
    assert load_weights(save_weights(tmp_path / "w.npz", arch, arrays))[1].keys() == arrays.keys()


@pytest.mark.parametrize("edit,message", [
    (lambda a, w: w.pop("blocks.1.expand.bias"), r"missing key 'blocks\.1\.expand\.bias'"),
    (lambda a, w: w.update(extra=np.zeros(1, np.float32)), r"unknown key 'extra'"),
    (lambda a, w: w.update({"blocks.0.depthwise.weight": np.zeros((8, 1, 5, 5), np.float32)}),
     r"'blocks\.0\.depthwise\.weight' is \(8, 1, 5, 5\), expected \(8, 1, 3, 3\)"),
    (lambda a, w: w.update({"first_conv.bias": w["first_conv.bias"].astype(np.float64)}), r"must be a float32"),
    (lambda a, w: w["feature_mix.bias"].__setitem__(0, np.nan), r"non-finite"),
    (lambda a, w: w.pop("classifier.bias"), r"come as a pair"),
    (lambda a, w: a["blocks"][1].update(residual=True), r"residual block needs stride 1"),
    (lambda a, w: a["blocks"][1].update(kernel=4), r"odd square kernel"),
    (lambda a, w: a.update(version=2), r"unknown key 'arch\.version'"),
    (lambda a, w: a["source"].update(kind="onnx"), r"arch\.source"),
])
def test_save_validates_and_writes_nothing_on_error(tmp_path, edit, message):
    arch, arrays = _tiny()
    edit(arch, arrays)
    with pytest.raises(CheckpointError, match=message):
        save_weights(tmp_path / "w.npz", arch, arrays)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    arch, arrays = _tiny()
    path = save_weights(tmp_path / "w.npz", arch, arrays)
    before = path.read_bytes()

    def broken(f, **payload):
        f.write(b"PK partial")
        raise OSError("disk full")
    monkeypatch.setattr(weight_format.np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, arch, arrays)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with np.load(src, allow_pickle=False) as npz:
        contents = {k: npz[k] for k in npz.files}
    edit(contents)
    np.savez(dst, **contents)
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(__format_version__=np.array(2)), r"format version 2, this microtrain reads 1"),
    (lambda c: c.pop("__format_version__"), r"no __format_version__"),
    (lambda c: c.update(__arch__=np.array("{")), r"__arch__ is not valid JSON"),
    (lambda c: c.pop("__arch__"), r"no __arch__"),
    (lambda c: c.pop("first_conv.weight"), r"missing key 'first_conv\.weight'"),
    (lambda c: c.update({"blocks.2.project.weight": np.zeros((8, 24, 3, 3), np.float32)}), r"shape mismatch"),
    (lambda c: c.update(x=np.array([object()], dtype=object)), r"not a microtrain weight file"),
])
def test_load_refuses_bad_weight_files(tmp_path, edit, message):
    arch, arrays = _tiny()
    good = save_weights(tmp_path / "good.npz", arch, arrays)
    with pytest.raises(CheckpointError, match=message):
        load_weights(_rewrite(good, tmp_path / "bad.npz", edit))


def test_load_refuses_non_weight_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "t.npz").write_text("hello")
    for path, message in ((tmp_path / "a.npy", "single .npy array"), (tmp_path / "t.npz", "not a microtrain weight file"),
                          (tmp_path / "absent.npz", "cannot read"), (FIX / "tiny_int8.pt", "not a microtrain weight file")):
        with pytest.raises(CheckpointError, match=message) as caught:
            load_weights(path)
        # np.load's own message for a non-zip file advises allow_pickle, never to be said of untrusted data
        assert "pickle" not in str(caught.value)


# ----------------------------------------------------------------------------- shared backbones

needs_shared = pytest.mark.skipif(not (shared_dir() / "checkpoints").is_dir(),
                                  reason=f"shared checkpoints not found at {shared_dir() / 'checkpoints'} "
                                         "(set MICROTRAIN_SHARED)")


@needs_shared
@pytest.mark.parametrize("name", list(SHARED))
def test_shared_checkpoints_match_the_readme(name):
    convs, weights, n_blocks, n_residual, embedding = SHARED[name]
    arch, arrays = read_checkpoint(shared_dir() / "checkpoints" / f"{name}.pkl")
    conv_keys = [k for k in arrays if k.endswith(".weight") and not k.startswith("classifier.")]
    assert len(conv_keys) == convs
    assert sum(arrays[k].size for k in conv_keys) == weights
    assert len(arch["blocks"]) == n_blocks and sum(b["residual"] for b in arch["blocks"]) == n_residual
    assert embedding_channels(arch) == embedding and arrays["classifier.weight"].shape == (1000, embedding)
    assert arch["resolution"] == 128 and arch["in_channels"] == 3 and arch["feature_mix"] is None
    assert arch["source"]["kind"] == "int8-dict" and arch["name"] == name
    assert arch["blocks"][0]["expand"] is None


@needs_shared
def test_ensure_converted(tmp_path):
    path = ensure_converted("mcunet-5fps", weights_dir=tmp_path)
    assert path == tmp_path / "mcunet-5fps.npz"
    arch, _ = load_weights(path)
    assert arch["source"]["sha256"] == "4de2e06ed39041fc3609de806461a9e1d1f82f186927474bd9e9b0de756a0f00"
    stamp = path.stat().st_mtime_ns
    assert ensure_converted("mcunet-5fps.pkl", weights_dir=tmp_path) == path and path.stat().st_mtime_ns == stamp
    path.write_bytes(b"garbage")  # a damaged file is converted again
    assert load_weights(ensure_converted("mcunet-5fps", weights_dir=tmp_path))[0] == arch


@needs_shared
def test_ensure_converted_follows_the_shared_checkpoint(tmp_path, monkeypatch):
    # A converted file whose recorded source is another checkpoint is converted again; once
    # converted, it is usable without the shared folder.
    path = ensure_converted("mcunet-5fps", weights_dir=tmp_path)
    arch, arrays = load_weights(path)
    arch["source"]["sha256"] = "0" * 64
    save_weights(path, arch, arrays)
    assert load_weights(ensure_converted("mcunet-5fps", weights_dir=tmp_path))[0]["source"]["sha256"].startswith("4de2e0")
    monkeypatch.setenv("MICROTRAIN_SHARED", str(tmp_path / "no-shared"))
    assert ensure_converted("mcunet-5fps", weights_dir=tmp_path) == path


def test_ensure_converted_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="unknown backbone 'resnet50'"):
        ensure_converted("resnet50", weights_dir=tmp_path)
    monkeypatch.setenv("MICROTRAIN_SHARED", str(tmp_path / "no-shared"))
    with pytest.raises(MissingSharedError, match="set MICROTRAIN_SHARED"):
        ensure_converted("mbv2-w0.35", weights_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
