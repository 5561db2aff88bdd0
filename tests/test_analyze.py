"""tools/analyze.py on a tiny random backbone and a tiny .npz dataset: records, resumption, reports."""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from microtrain import evaluate
from test_evaluate import inputs  # noqa: F401  (the tiny backbone + dataset fixture)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
analyze = importlib.import_module("analyze")
try:
    import matplotlib  # noqa: F401
    HAS_MATPLOTLIB = True
except ImportError:  # the README's test command does not install the plot extra
    HAS_MATPLOTLIB = False

EPISODES = ["--seeds", "1000-1001", "--way", "3", "--shot", "2", "--query-shots", "3", "--epochs", "1"]


def _run(capsys, *argv) -> str:
    assert analyze.main(list(argv)) == 0
    return capsys.readouterr().out


def _figure_written(out: Path, name: str) -> bool:
    """The figure exists with matplotlib installed; without it (the README's test command does not
    install the ``plot`` extra) analyze skips it with a note and writes no file."""
    png = out / f"{name}.png"
    return png.exists() and png.stat().st_size > 0 if HAS_MATPLOTLIB else not png.exists()


def _records(out: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / kind).rglob("*.json"))]


def test_spearman():
    assert analyze.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert analyze.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    expected = np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1]
    assert analyze.spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert np.isnan(analyze.spearman([1, 1, 1], [1, 2, 3]))


def test_layers_records_resume_and_report(inputs, tmp_path, capsys):  # noqa: F811
    weights, data = inputs
    out = tmp_path / "an"
    argv = ["layers", "--backbones", str(weights), "--domains", str(data), *EPISODES,
            "--layers", "blocks.1.expand,blocks.2.project", "--ratios", "1,0.5", "--out", str(out)]
    printed = _run(capsys, *argv)
    assert "10 tasks, 0 already" in printed  # 2 seeds x (1 Fisher pass + 2 layers x 2 ratios)
    layer = _records(out, "layer")
    assert len(layer) == 8 and len(_records(out, "fisher")) == 2
    for r in layer:
        assert "error" not in r and r["policy"] == "fisher"
        kept = r["selection"][0]
        assert kept["layer"] == r["layer"] and kept["channels"] == max(1, round(r["ratio"] * r["out_channels"]))
        assert r["backward_macs"] > 0 and r["memory"]["backward_planned_bytes"] > 0
    # the dynamic channels are the layer's top channels by Fisher information (Eq. 2)
    fisher = {r["seed"]: r for r in _records(out, "fisher")}
    assert set(fisher) == {1000, 1001} and len(fisher[1000]["delta"]["blocks.1.expand"]) == 24
    for half in (r for r in layer if r["layer"] == "blocks.1.expand" and r["ratio"] == 0.5):
        assert half["trained_params"] == 12 * (8 + 1)
        top = np.argsort(-np.asarray(fisher[half["seed"]]["delta"]["blocks.1.expand"]), kind="stable")[:12]
        assert sorted(half["rows"]) == sorted(top.tolist())
    table = (out / "layers.md").read_text()
    assert "| 3 | blocks.1.expand | pointwise |" in table and _figure_written(out, "layers")
    gains = [100 * (r["accuracy_after"] - r["accuracy_before"]) for r in layer
             if r["layer"] == "blocks.2.project" and r["ratio"] == 1.0]
    row = next(line for line in table.splitlines() if "| blocks.2.project |" in line)
    assert row.split(" | ")[3].startswith(f"{np.mean(gains):+.1f} ± ")

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    printed = _run(capsys, *argv)
    assert "10 tasks, 10 already" in printed
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}

    # another fine-tuning setting into the same folder is refused in one line
    assert analyze.main([*argv[:-2], "--epochs", "2", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_channels_and_rank(inputs, tmp_path, capsys):  # noqa: F811
    weights, data = inputs
    out = tmp_path / "an"
    common = ["--backbones", str(weights), "--domains", str(data), *EPISODES, "--out", str(out)]
    _run(capsys, "channels", *common, "--layers", "blocks.1.expand,blocks.2.expand", "--ratios", "0.5,0.25")
    recs = _records(out, "layer")
    assert {r["policy"] for r in recs} == {"fisher", "random", "l2"} and len(recs) == 2 * 2 * 2 * 3
    for r in recs:
        assert r["selection"][0]["channels"] == max(1, round(r["ratio"] * r["out_channels"]))
    table = (out / "channels.md").read_text()
    assert "| 50% | 4 |" in table and "| 25% | 4 |" in table and _figure_written(out, "channels")

    printed = _run(capsys, "rank", *common)
    rows = [line for line in (out / "rank.md").read_text().splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and "| 9 | 2 |" in rows[0]  # every conv of the tiny net, two episodes
    assert _figure_written(out, "rank") and "wrote" in printed

    # Make each measured gain a decreasing function of the layer's Fisher potential in that
    # episode: the rank correlation of P with the gain must come out as exactly -1.
    fisher = {r["seed"]: r for r in _records(out, "fisher") if "potential" in r}
    shift = {r["seed"]: r for r in _records(out, "fisher") if "shift" in r}
    assert set(shift) == set(fisher) and all(set(r["shift"]) == set(fisher[s]["potential"]) for s, r in shift.items())

    def gains_from(criterion):
        for path in (out / "layer").rglob("*_1-fisher/*.json"):
            r = json.loads(path.read_text())
            r["accuracy_after"] = r["accuracy_before"] - criterion[r["seed"]][r["layer"]]
            path.write_text(json.dumps(r))
        _run(capsys, "rank", *common, "--report-only")
        text = (out / "rank.md").read_text()
        assert "--report-only" not in text  # the printed command computes the records, not only the table
        row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
        return row.split(" | ")

    cols = gains_from({s: r["potential"] for s, r in fisher.items()})
    assert cols[4] == "-1.00 ± 0.00" and cols[8] == "-1.00"  # P per episode, and of the means
    reach = max(r["reach_index"] for r in shift.values())
    assert cols[10] == f"{9 - reach} (from #{reach})"
    if 9 - reach >= 3:  # within the reachable window too
        assert cols[11] == "-1.00 ± 0.00"
    cols = gains_from({s: r["shift"] for s, r in shift.items()})
    assert cols[6] == "-1.00 ± 0.00"  # TinyTrain+'s criterion


def test_meta_and_compare(inputs, tmp_path, capsys):  # noqa: F811
    weights, data = inputs
    other = tmp_path / "tiny-copy.npz"
    shutil.copy(weights, other)
    out = tmp_path / "an"
    common = ["--domains", str(data), *EPISODES, "--mem-budget", "1MB", "--mac-budget", "100%", "--out", str(out)]
    _run(capsys, "meta", "--backbones", f"{weights},{other}", "--methods", "none,tinytrain-plus", *common)
    table = (out / "meta.md").read_text()
    # the same weights under two names: the paired difference is exactly zero
    assert "| none |" in table and "| tinytrain-plus |" in table and "| +0.0 ± 0.0 |" in table
    assert _figure_written(out, "meta")
    _run(capsys, "compare", "--backbones", str(weights), "--reference", "none",
         "--methods", "none,tinytrain-plus,tinytrain-plus:weights=false", *common)
    table = (out / "compare.md").read_text()
    assert "`tinytrain-plus:weights=false`" in table
    recs = [r for r in _records(out, "method") if r["method"] == "tinytrain-plus:weights=false"]
    assert len(recs) == 2 and all(not any(s["channels"] for s in r["selection"]) for r in recs)
    assert all(r["selection_info"]["rule"] == "weights=False" for r in recs)


def test_methods_run_as_the_grid_runs_them_and_meta_reads_a_grid(inputs, tmp_path, capsys):  # noqa: F811
    """``compare``/``meta`` give each method its own fine-tuning (per-method batch and lr, as the
    evaluation grid does: under --protocol paper FullTrain runs at batch 100), so a method's record
    equals the grid's on the same episode; ``meta --grid`` reads a grid's records (Figure 6a)."""
    from test_evaluate import args as grid_args

    weights, data = inputs
    other = tmp_path / "tiny-copy.npz"
    shutil.copy(weights, other)
    grid = tmp_path / "grid"
    per_method = ["--batch", "1,fulltrain=4", "--lr", "fulltrain=0.01"]
    argv = grid_args(f"{weights},{other}", data, grid, *per_method, "--no-report", methods="none,fulltrain", workers="0")
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    settings = ["--domains", str(data), "--seeds", "0-1", "--way", "3", "--shot", "2", "--query-shots", "3",
                "--epochs", "2", "--mem-budget", "1MB", "--mac-budget", "100%", *per_method]
    out = tmp_path / "an"
    _run(capsys, "compare", "--backbones", str(weights), "--methods", "none,fulltrain", "--reference", "none",
         *settings, "--out", str(out))
    for mine in _records(out, "method"):
        theirs = json.loads((grid / "episodes" / "tiny" / "toy" / mine["method"] / f"{mine['seed']}.json").read_text())
        assert mine["finetune"] == theirs["finetune"] and mine["accuracy_after"] == theirs["accuracy_after"]
    assert {r["finetune"]["batch"] for r in _records(out, "method") if r["method"] == "fulltrain"} == {4}
    # meta from the grid: nothing runs, the grid's settings are used (the options' are not needed)
    meta = tmp_path / "fig6a"
    printed = _run(capsys, "meta", "--grid", str(grid), "--backbones", f"{weights},{other}", "--domains", str(data),
                   "--seeds", "0-1", "--methods", "none,fulltrain", "--out", str(meta))
    assert "tasks" not in printed and not (meta / "method").exists()
    table = (meta / "meta.md").read_text()
    acc = [json.loads((grid / "episodes/tiny/toy/fulltrain" / f"{s}.json").read_text())["accuracy_after"] for s in (0, 1)]
    assert f"| fulltrain | toy | 2 | {100 * np.mean(acc):.1f} ± " in table and "| +0.0 ± 0.0 |" in table
    assert "changed from the preset" in table and "fulltrain" in table.split("Seeds 0-1")[1]
    assert analyze.main(["meta", "--grid", str(tmp_path / "nowhere"), "--out", str(meta)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["compare", "--backbones", "no-such-net"], "unknown backbone"),
    (["compare", "--methods", "none,magic"], "unknown method"),
    (["compare", "--methods", "none,tinytrain-plus:speed=2"], "speed=2"),
    (["layers", "--ratios", "2"], "--ratios"),
])
def test_bad_options_one_line(argv, message, capsys):
    assert analyze.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
