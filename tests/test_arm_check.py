"""tools/arm_check.py's host side: how it compares two platforms' results and how it says that it
cannot run. (The emulated runs themselves are the check: `python tools/arm_check.py`, in .ci/run.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("arm_check", REPO / "tools" / "arm_check.py")
arm_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arm_check)


def test_json_differences_tolerate_rounding_and_skip_timings_only():
    host = {"accuracy_after": 0.72, "losses": {"first": 0.5394715070724487, "steps": 25},
            "selection": [{"layer": "blocks.13.depthwise", "channels": 570, "score": 341.1068465697528}],
            "time_seconds": {"training": 0.56}, "peak_rss_bytes": 197025792, "data": "a.zip"}
    arm = json.loads(json.dumps(host))
    arm["losses"]["first"] = 0.539471447467804          # measured: 1.1e-7 relative
    arm["selection"][0]["score"] = 341.1069802366624    # measured: 3.9e-7 relative
    arm["time_seconds"]["training"], arm["peak_rss_bytes"] = 33.95, 411062272
    assert arm_check.json_differences(host, arm) == []

    for path, value in ((("accuracy_after",), 0.68), (("losses", "steps"), 24), (("data",), "b.zip"),
                        (("selection", 0, "channels"), 569), (("losses", "first"), 0.5395)):
        changed = json.loads(json.dumps(arm))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        found = arm_check.json_differences(host, changed)
        assert len(found) == 1 and path[-1] in found[0], (path, found)
    assert arm_check.json_differences({"a": [1, 2]}, {"a": [1, 2, 3]})
    assert arm_check.json_differences({"a": 1}, {"b": 1})
    assert arm_check.json_differences({"a": True}, {"a": 1})
    assert arm_check.json_differences({"a": float("nan")}, {"a": float("nan")}) == []


def test_compare_arrays_floats_within_tolerance_and_json_metadata():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    near = w + np.float32(2.4e-7)
    diff, found = arm_check.compare_arrays("w", w, near)
    assert found == [] and 2e-7 < diff < 3e-7
    _, found = arm_check.compare_arrays("w", w, w + np.float32(1e-3))
    assert found and "w" in found[0]
    _, found = arm_check.compare_arrays("w", w, w[:4])
    assert found
    # a classifier's JSON metadata: a score printed with one digit more is the same number
    a = np.array(json.dumps({"score": 294.45006651, "created": "13:32"}))
    b = np.array(json.dumps({"score": 294.450066512, "created": "13:41"}))
    assert a.dtype != b.dtype
    assert arm_check.compare_arrays("__classifier__", a, b)[1] == []
    c = np.array(json.dumps({"score": 290.0, "created": "13:41"}))
    assert arm_check.compare_arrays("__classifier__", a, c)[1]


def test_updated_rows_are_the_changed_output_channels():
    base = {"w": np.zeros((5, 2, 3, 3), np.float32), "b": np.zeros(5, np.float32),
            "frozen": np.ones(4, np.float32)}
    adapted = {k: v.copy() for k, v in base.items()}
    adapted["w"][[4, 1], 0, 2, 2] = 1e-4
    adapted["b"][3] = -2.0
    assert arm_check.updated_rows(adapted, base) == {"w": [1, 4], "b": [3]}


def _adapt_folder(folder: Path, weights: dict, report: dict) -> Path:
    folder.mkdir()
    np.savez(folder / "adapted.npz", **weights)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_compare_adaptations_finds_each_kind_of_difference(tmp_path):
    rng = np.random.default_rng(1)
    base = {"dw.weight": rng.standard_normal((6, 1, 3, 3)).astype(np.float32),
            "dw.bias": rng.standard_normal(6).astype(np.float32), "__arch__": np.array('{"name": "t"}')}
    np.savez(tmp_path / "base.npz", **base)
    adapted = {k: v.copy() for k, v in base.items()}
    adapted["dw.weight"][[0, 4]] += 0.01
    report = {"selection": [{"layer": "dw", "channels": 2, "out_channels": 6, "score": 3.1}],
              "accuracy_before": 0.76, "accuracy_after": 0.72, "backward_macs": 100, "data": "x.zip",
              "losses": {"last": 0.9510484933853149}}
    host = _adapt_folder(tmp_path / "host", adapted, report)

    def arm_with(name, change_weights=None, change_report=None):
        w = {k: v.copy() for k, v in adapted.items()}
        r = json.loads(json.dumps(report))
        if change_weights:
            change_weights(w)
        if change_report:
            change_report(r)
        return arm_check.compare_adaptations(host, _adapt_folder(tmp_path / name, w, r), tmp_path / "base.npz")

    facts, diffs = arm_with("same", lambda w: w["dw.weight"].__setitem__((0, 0, 0, 0), w["dw.weight"][0, 0, 0, 0]
                                                                          + np.float32(2e-7)))
    assert diffs == []
    # the gap two OpenBLAS kernels on one x86-64 host leave after the default adaptation (measured
    # 4.6e-5 in the weights, 1.1e-5 relative in the last loss) is no difference between platforms
    _, diffs = arm_with("blas", lambda w: w["dw.weight"].__setitem__((4, 0, 1, 1), w["dw.weight"][4, 0, 1, 1] + 4.6e-5),
                        lambda r: r["losses"].__setitem__("last", 0.9510594010353088))
    assert diffs == []
    _, diffs = arm_with("loss", change_report=lambda r: r["losses"].__setitem__("last", 0.9520))
    assert any(d.startswith("report.json.losses.last") for d in diffs)
    assert any("dw 2/6" in f and "76% -> 72%" in f for f in facts)
    assert any("the same 2 rows updated" in f for f in facts)

    _, diffs = arm_with("acc", change_report=lambda r: r.__setitem__("accuracy_after", 0.68))
    assert any(d.startswith("accuracy_after") for d in diffs)
    _, diffs = arm_with("sel", change_report=lambda r: r["selection"][0].__setitem__("channels", 3))
    assert any(d.startswith("selection") for d in diffs)
    _, diffs = arm_with("far", lambda w: w["dw.weight"].__setitem__((4, 0, 1, 1), w["dw.weight"][4, 0, 1, 1] + 1e-3))
    assert any("dw.weight" in d and "max |host - aarch64|" in d for d in diffs)
    _, diffs = arm_with("rows", lambda w: w["dw.bias"].__setitem__(2, w["dw.bias"][2] + np.float32(1e-6)))
    assert any("different rows updated" in d for d in diffs)


def test_compare_bits_lists_rounding_and_catches_flushed_subnormals():
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    last_bit = np.nextafter(x, np.float32(2))
    subnormal = np.full(4, 1e-39, np.float32)
    same, differ, diffs = arm_check.compare_bits(
        {"fwd": x, "grad": x, "tiny": subnormal, "image": np.arange(6, dtype=np.uint8)},
        {"fwd": x.copy(), "grad": last_bit, "tiny": subnormal.copy(), "image": np.arange(6, dtype=np.uint8)})
    assert same == ["fwd", "tiny", "image"] and differ[0].startswith("grad") and diffs == []
    _, _, diffs = arm_check.compare_bits({"tiny": subnormal}, {"tiny": np.zeros(4, np.float32)})
    assert diffs and "tiny" in diffs[0]
    _, _, diffs = arm_check.compare_bits({"image": np.arange(6, dtype=np.uint8)},
                                         {"image": np.arange(1, 7, dtype=np.uint8)})
    assert diffs
    _, _, diffs = arm_check.compare_bits({"a": x}, {})
    assert diffs


@pytest.mark.parametrize("flag, status", [(["--if-available"], 0), ([], 2)])
def test_cannot_set_up_says_so_in_one_line(tmp_path, monkeypatch, capsys, flag, status):
    monkeypatch.setenv("MICROTRAIN_SHARED", str(tmp_path / "no-shared"))
    assert arm_check.main(["--sysroot", str(tmp_path / "sysroot"), *flag]) == status
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("arm_check: aarch64 check not run:")
    assert "aarch64-sysroot.sh not found" in out[0]
    assert not (tmp_path / "sysroot").exists()
