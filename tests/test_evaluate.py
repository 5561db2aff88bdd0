"""The evaluation grid (python -m microtrain.evaluate; tools/evaluate.py is its alias) on a tiny
random backbone and a tiny .npz dataset (no shared folder needed)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_inputs
from microtrain import evaluate, evaluation
from microtrain.adapt import _resolve_model
from microtrain.evaluation_report import _label_offsets
from microtrain.stats import t_quantile
from microtrain.train import FinetuneConfig

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "evaluate.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 16x16 random MBConv net as a weight file, and a 6-class .npz dataset of 28x28 images."""
    return grid_inputs(tmp_path_factory.mktemp("eval_inputs"))


def args(weights, data, out, *extra, methods="none,tinytrain,sparseupdate", workers="1"):
    return ["run", "--backbones", str(weights), "--domains", str(data), "--methods", methods, "--episodes", "2",
            "--way", "3", "--shot", "2", "--query-shots", "3", "--epochs", "2", "--mem-budget", "1MB",
            "--mac-budget", "100%", "--workers", workers, "--out", str(out), *extra]


def files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((out / "episodes").rglob("*.json"))}


def test_resolve_model_takes_a_weight_file(inputs):
    net = _resolve_model(str(inputs[0]))
    assert net.name == "tiny" and net.resolution == 16


def test_run_records_reports_and_resumes(inputs, tmp_path, capsys):
    weights, data = inputs
    out = tmp_path / "eval"
    assert evaluate.main(args(weights, data, out)) == 0
    printed = capsys.readouterr().out
    assert "6 to run on 1 worker process(es)" in printed and "[6/6]" in printed and "ETA" in printed

    episodes = files(out)
    assert sorted(p.relative_to(out).as_posix() for p in episodes) == sorted(
        f"episodes/tiny/toy/{m}/{s}.json" for m in ("none", "tinytrain", "sparseupdate") for s in (0, 1))
    rec = {(p.parent.name, int(p.stem)): json.loads(p.read_text()) for p in episodes}
    for seed in (0, 1):
        none, tiny, sparse = rec[("none", seed)], rec[("tinytrain", seed)], rec[("sparseupdate", seed)]
        for r in (none, tiny, sparse):
            assert (r["backbone"], r["domain"], r["seed"], r["way"], r["support_size"]) == ("tiny", "toy", seed, 3, 6)
            assert r["worker"]["pid"] != os.getpid()  # a separate process, single-threaded
            assert r["worker"]["OPENBLAS_NUM_THREADS"] == r["worker"]["NUMBA_NUM_THREADS"] == "1"
        # the same episode for every method
        assert none["episode"]["classes"] == tiny["episode"]["classes"]
        assert none["accuracy_before"] == tiny["accuracy_before"] == none["accuracy_after"]
        assert none["backward_macs"] == 0 and none["memory"] is None
        assert tiny["selection"] and 0 < tiny["memory"]["backward_planned_bytes"] <= 1024 ** 2
        assert 0 < tiny["backward_macs"] <= tiny["forward_macs"] and tiny["losses"]["steps"] == 2 * 6
        assert tiny["finetune"]["epochs"] == 2 and 0 <= tiny["accuracy_after"] <= 1
        assert "error" not in none and "error" not in tiny
        # the tiny net has no SparseUpdate configuration: a failed task, recorded, the run goes on
        assert "no SparseUpdate configuration" in sparse["error"] and "traceback" in sparse

    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 6 and results["settings"]["finetune"]["epochs"] == 2

    report = (out / "report.md").read_text()
    assert "### Table 1" in report and "### Table 2" in report and "Generated 20" in report
    toy_row = next(line for line in report.splitlines() if line.startswith("| toy |"))
    cells = [c.strip() for c in toy_row.strip("|").split("|")]
    head = next(line for line in report.splitlines() if line.startswith("| domain |"))
    assert [c.strip() for c in head.strip("|").split("|")] == ["domain", "none", "sparseupdate", "tinytrain",
                                                               "tinytrain − none"]
    for method, cell in (("none", cells[1]), ("tinytrain", cells[3])):
        acc = [rec[(method, s)]["accuracy_after"] for s in (0, 1)]
        # Student's t, 97.5% quantile at 1 degree of freedom (tables: 12.706), not the normal 1.96
        mean, half = 100 * np.mean(acc), 100 * 12.706205 * np.std(acc, ddof=1) / math.sqrt(2)
        assert cell == f"{mean:.1f} ± {half:.1f}"
    assert cells[2] == "– (2 failed)"
    gain = [rec[("tinytrain", s)]["accuracy_after"] - rec[("none", s)]["accuracy_after"] for s in (0, 1)]
    assert cells[4].startswith(f"{100 * np.mean(gain):+.1f} ± ")
    assert "n = 2 per cell, seeds 0-1" in report

    t2 = next(line for line in report.splitlines() if line.startswith("| tinytrain | 2 |"))
    mem = np.mean([rec[("tinytrain", s)]["memory"]["backward_planned_bytes"] for s in (0, 1)])
    macs = np.mean([rec[("tinytrain", s)]["backward_macs"] for s in (0, 1)])
    assert f"| {mem / 1024:.1f} KB | 1.00× | {macs / 1e3:.1f}k | 1.00× |" in t2
    assert "| none | 2 | – | – | 0 | – |" in report and "| sparseupdate | 0 |" in report
    assert "### Failed episodes" in report and "| sparseupdate | toy | 1 | ValueError: no SparseUpdate" in report
    assert f"--backbones {weights.resolve()} --methods none,sparseupdate,tinytrain" in report
    assert "--episodes 2 --sampler fixed --way 3 --shot 2 --query-shots 3 --mem-budget 1MB --mac-budget 100%" in report
    d = FinetuneConfig()
    assert (f"fine-tuning: 2 passes over the support set, batch 1, SGD lr each method’s default, "
            f"momentum {d.momentum:g}") in report
    pytest.importorskip("matplotlib")
    assert (out / "figure1_tiny.png").read_bytes()[:4] == b"\x89PNG" and "figure1_tiny.png" in report

    # a rerun computes nothing and keeps every file as it was
    assert evaluate.main(args(weights, data, out)) == 0
    assert "6 already in" in capsys.readouterr().out
    assert files(out) == episodes
    # ... unless told to retry the failures, which touches only those
    assert evaluate.main(args(weights, data, out, "--retry-errors", workers="0")) == 0
    after = files(out)
    assert [p.parent.name for p in after if after[p] != episodes[p]] == ["sparseupdate", "sparseupdate"]
    # other settings into the same folder are refused
    capsys.readouterr()
    assert evaluate.main(args(weights, data, out, "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "lr" in err
    assert not list(out.rglob("*.tmp"))


def test_report_without_matplotlib(inputs, tmp_path, monkeypatch, capsys):
    weights, data = inputs
    out = tmp_path / "eval"
    assert evaluate.main(args(weights, data, out, "--no-report", methods="none,tinytrain", workers="0")) == 0
    assert not (out / "report.md").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert evaluate.main(["report", "--out", str(out)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (out / "report.md").exists() and not list(out.glob("*.png"))
    assert "**average** (1 domain)" in (out / "report.md").read_text()


def test_interrupt_keeps_finished_tasks_only(inputs, tmp_path):
    """Ctrl-C during a pooled run: exit 130, finished episodes intact, no partial file; a rerun resumes."""
    weights, data = inputs
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "microtrain.evaluate", *args(weights, data, out, methods="none,tinytrain")]
    cmd[cmd.index("--episodes") + 1] = "30"
    cmd[cmd.index("--epochs") + 1] = "40"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        while "[ 1/60]" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    done = files(out)
    assert 1 <= len(done) < 60 and not list(out.rglob("*.tmp"))
    workers = set()
    for p in done:
        record = json.loads(p.read_text())
        assert "accuracy_after" in record
        workers.add(record["worker"]["pid"])
    for pid in workers:  # the workers ended with the run
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    cmd[cmd.index("--episodes") + 1] = "1"  # resume a part: episode 0 of each method, through the old alias
    cmd[1:3] = [str(TOOL)]
    result = subprocess.run(cmd + ["--no-report"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seed0 = {out / "episodes/tiny/toy" / m / "0.json" for m in ("none", "tinytrain")}
    assert set(files(out)) == set(done) | seed0
    assert {p: t for p, t in files(out).items() if p in done} == done


@pytest.mark.parametrize("extra,message", [
    (["--methods", "none,magic"], "unknown method 'magic'"),
    (["--domains", "/nowhere/data.zip"], "unknown domain"),
    (["--backbones", "/nowhere/w.npz"], "not found"),
    (["--backbones", "resnet50"], "unknown backbone"),
    (["--seeds", "5-2"], "cannot read '5-2' as seeds"),
    (["--mem-budget", "lots"], "cannot read 'lots' as a byte count"),
    (["--mac-budget", "x%"], "MAC budget"),
    (["--workers", "-1"], "--workers"),
    (["--way", "50"], "way=50"),
    (["--epochs", "many"], "invalid int value"),
    (["--episodes", "2", "--seeds", "0-3"], "not allowed with argument"),
])
def test_bad_options_are_one_line_and_exit_2(inputs, tmp_path, capsys, extra, message):
    weights, data = inputs
    argv = args(weights, data, tmp_path / "o", *extra)
    if "--seeds" in extra and "--episodes" not in extra:
        del argv[argv.index("--episodes"):argv.index("--episodes") + 2]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_report_needs_a_run(tmp_path, capsys):
    assert evaluate.main(["report", "--out", str(tmp_path / "none")]) == 2
    assert "no episodes/ folder" in capsys.readouterr().err


def test_backbone_names_agree_with_the_checkpoint_module():
    from microtrain.checkpoint import BACKBONES

    assert evaluation.BACKBONES == tuple(BACKBONES)


def test_seeds_round_trip():
    assert evaluation.parse_seeds("0-4,10,12-13,3") == [0, 1, 2, 3, 4, 10, 12, 13]
    assert evaluation.format_seeds([0, 1, 2, 3, 4, 10, 12, 13]) == "0-4,10,12-13"
    assert evaluation.parse_seeds("7") == [7]


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--methods", "--domains", "--backbones", "--episodes", "--seeds", "--sampler", "--mem-budget",
                   "--mac-budget", "--epochs", "--lr", "--momentum", "--workers", "--out", "--retry-errors"):
        assert option in text


def test_figure_labels_of_coinciding_methods_are_stacked():
    points = [("tinytrain", 3.37e6, 76.2), ("tinytrain-l2", 3.37e6, 76.5), ("tinytrain-fisher", 3.10e6, 76.6),
              ("tinytrain-random", 3.37e6, 76.1), ("sparseupdate", 12.3e6, 80.4), ("fulltrain", 43e6, 74.8)]
    dy = _label_offsets(points)
    assert dy["sparseupdate"] == dy["fulltrain"] == 0.0
    stacked = sorted(["tinytrain", "tinytrain-l2", "tinytrain-fisher", "tinytrain-random"], key=lambda m: -dy[m])
    assert stacked == ["tinytrain-fisher", "tinytrain-l2", "tinytrain", "tinytrain-random"]  # best on top
    assert sum(dy[m] for m in stacked) == 0.0 and min(dy[a] - dy[b] for a, b in zip(stacked, stacked[1:])) >= 22


def test_student_t_quantiles():
    # two-sided 95% and 99% points from printed tables (3 decimals), and the normal limit
    for df, t95, t99 in ((1, 12.706, 63.657), (2, 4.303, 9.925), (4, 2.776, 4.604), (9, 2.262, 3.250),
                         (24, 2.064, 2.797), (120, 1.980, 2.617)):
        assert round(t_quantile(0.95, df), 3) == t95 and round(t_quantile(0.99, df), 3) == t99
    assert 1.959 < t_quantile(0.95, 5000) < 1.961
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30, 199):
        assert t_quantile(0.95, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-12)


def test_a_worker_refuses_files_that_differ_from_the_clients(inputs, tmp_path):
    weights, data = inputs
    ns = evaluate.parse_args(args(weights, data, tmp_path / "o"))
    tasks, _ = evaluation.plan_grid(tmp_path / "o", ["none"], [str(data)], [str(weights)], [0], evaluation.settings_of(ns))
    good = evaluation.run_task(tasks[0])
    assert "error" not in good and good["data_sha256"] == evaluation.file_sha256(data)
    copy = tmp_path / "toy.npz"
    raw = data.read_bytes()
    copy.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # the task's hash, other bytes on "this worker"
    record = evaluation.run_task({**tasks[0], "data": str(copy)})
    assert record["error"].startswith("InputMismatch: data file ") and "refusing to compute on other data" in record["error"]
    assert "accuracy_after" not in record
    record = evaluation.run_task({**tasks[0], "weights": str(tmp_path / "absent.npz")})
    assert "cannot be read" in record["error"] and "same paths" in record["error"]


def test_estimate_wall_time_from_measured_task_times(tmp_path, capsys):
    from microtrain.evaluation_report import estimate_wall_time

    records = [{"backbone": "b", "method": m, "task_seconds": t} for m, t in
               (("none", 1.0), ("none", 3.0), ("tinytrain", 10.0), ("tinytrain", 30.0))]
    records.append({"backbone": "b", "method": "tinytrain", "task_seconds": 999.0, "error": "diverged"})  # not timed
    lines = estimate_wall_time(records, ["b"], ["none", "tinytrain"], 9, 200, [1, 8, 64, 10 ** 6])
    assert "| b | 2.00 (n=2) | 20.00 (n=2) | 22.0 |" in lines
    total = 22.0 * 9 * 200  # 39,600 task-seconds
    assert f"= 3,600 tasks, {total:,.0f} task-seconds (11h00m on one worker)." in "\n".join(lines)
    assert lines[-4:] == ["     1 worker(s): 11h00m", "     8 worker(s): 1h22m", "    64 worker(s): 10m19s",
                          "  1000000 worker(s): 30s"]  # never below the longest task
    with pytest.raises(evaluation.GridError, match="no successful record to time b/lastlayer"):
        estimate_wall_time(records, ["b"], ["lastlayer"], 1, 1, [1])
    assert evaluate.main(["estimate", "--out", str(tmp_path)]) == 2
    assert "no episodes/ folder" in capsys.readouterr().err
