"""The evaluation grid (python -m microtrain.evaluate; tools/evaluate.py is its alias) on a tiny
random backbone and a tiny .npz dataset (no shared folder needed)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import llvmlite.binding
import numpy as np
import pytest

from conftest import grid_inputs
from microtrain import evaluate, evaluation, stats
from microtrain.adapt import resolve_model
from microtrain.evaluation_report import _label_offsets, format_ratio, write_report
from microtrain.stats import t_quantile
from microtrain.tinytrain import fulltrain_backward_macs
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


def testresolve_model_takes_a_weight_file(inputs):
    net = resolve_model(str(inputs[0]))
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
            assert r["worker"]["cpu"] == llvmlite.binding.get_host_cpu_name()  # what the kernels were built for
            assert r["worker"]["blas"] == evaluation.blas_kernels()  # the OpenBLAS kernels NumPy's matmul ran on
        # the same episode for every method
        assert none["episode"]["classes"] == tiny["episode"]["classes"]
        assert none["accuracy_before"] == tiny["accuracy_before"] == none["accuracy_after"]
        assert none["backward_macs"] == 0 and none["memory"] is None
        assert tiny["selection"] and 0 < tiny["memory"]["backward_planned_bytes"] <= 1024 ** 2
        # --mac-budget 100%: all of FullTrain's backward MACs per image
        assert 0 < tiny["backward_macs"] <= tiny["budgets"]["macs"] == fulltrain_backward_macs(resolve_model(str(weights)))
        assert tiny["losses"]["steps"] == 2 * 6
        assert tiny["finetune"]["epochs"] == 2 and 0 <= tiny["accuracy_after"] <= 1
        assert "error" not in none and "error" not in tiny
        # the tiny net has no SparseUpdate configuration: a failed task, recorded, the run goes on
        assert "no SparseUpdate configuration" in sparse["error"] and "traceback" in sparse

    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 6 and results["settings"]["finetune"]["epochs"] == 2

    report = (out / "report.md").read_text()
    assert "### Table 1" in report and "### Table 2" in report and "Generated 20" in report
    assert f", CPU {llvmlite.binding.get_host_cpu_name()} (OpenBLAS {evaluation.blas_kernels() or 'not found'})." in report
    older = shutil.copytree(out, tmp_path / "older")  # one record written before records named the CPU
    first = sorted(older.rglob("episodes/**/*.json"))[0]
    record = json.loads(first.read_text())
    del record["worker"]["cpu"]
    first.write_text(json.dumps(record))
    write_report(older)
    assert "(and 1 record(s) from before records named their CPU)." in (older / "report.md").read_text()
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
    assert f"| 1 | {mem / 1024:.1f} KB | 1.00× | {macs / 1e3:.1f}k | 1.00× |" in t2
    assert "| none | 2 | – | – | – | 0 | – |" in report and "| sparseupdate | 0 |" in report
    assert "### Failed episodes" in report and "| sparseupdate | toy | 1 | ValueError: no SparseUpdate" in report
    assert f"--backbones {weights.resolve()} --methods none,sparseupdate,tinytrain" in report
    assert ("--episodes 2 --protocol quick --sampler fixed --way 3 --shot 2 --query-shots 3 --mem-budget 1MB "
            "--mac-budget 100%bwd --epochs 2 --momentum 0.9 --weight-decay 0 --scale 10 --batch 1 --train-seed 0") in report
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
    assert "matplotlib is not installed" in capsys.readouterr().err  # a note, on stderr as adapt's
    assert (out / "report.md").exists() and not list(out.glob("*.png"))
    assert "**average** (1 domain" in (out / "report.md").read_text()


def test_interrupt_keeps_finished_tasks_only(inputs, tmp_path):
    """Ctrl-C during a pooled run: exit 130, finished episodes intact, no partial file; a rerun resumes."""
    weights, data = inputs
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "microtrain.evaluate", *args(weights, data, out, methods="none,tinytrain")]
    cmd[cmd.index("--episodes") + 1] = "30"
    cmd[cmd.index("--epochs") + 1] = "40"
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: give the run the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


def _gone_within(pid: int, seconds: float) -> bool:
    """True once process ``pid`` has ended within ``seconds`` (an ended orphan waiting for its new
    parent to reap it, a zombie, counts as ended)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def _where_and_twice(x: int) -> tuple:
    """A pool task for run_pool's test: which process ran it, with which thread limit, and 2x."""
    return os.getpid(), os.environ.get("NUMBA_NUM_THREADS"), 2 * x


@pytest.mark.parametrize("workers", [0, 2])
def test_run_pool_runs_any_module_level_function(workers):
    """tools/keep_best.py and tools/tune_finetune.py run their own task function on run_pool (one
    thread per spawned worker, as the grid's), so Ctrl-C and SIGTERM end their workers too."""
    got = []
    evaluation.run_pool(list(range(5)), got.append, workers, fn=_where_and_twice)
    assert sorted(r[2] for r in got) == [0, 2, 4, 6, 8]
    pids = {r[0] for r in got}
    if workers:
        assert os.getpid() not in pids and 1 <= len(pids) <= 2 and {r[1] for r in got} == {"1"}
    else:
        assert pids == {os.getpid()}
    evaluation.run_pool([], got.append, workers, fn=_where_and_twice)  # nothing to run: no pool, no call
    assert len(got) == 5


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)])
def test_killed_run_ends_its_workers(inputs, tmp_path, sig, status):
    """`kill` of a pooled run (SIGTERM: exit 143 with a one-line message) or SIGKILL of it: no worker
    goes on computing as an orphan, and no partial file is left. Found when a SIGTERM'd grid left
    its worker running."""
    weights, data = inputs
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "microtrain.evaluate", *args(weights, data, out, methods="none,tinytrain")]
    cmd[cmd.index("--episodes") + 1] = "30"
    cmd[cmd.index("--epochs") + 1] = "40"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        while "[ 1/60]" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        (record,) = files(out)
        worker = json.loads(record.read_text())["worker"]["pid"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status
    if sig == signal.SIGTERM:
        assert err.strip().splitlines() == ["terminated: finished episodes are kept; rerun the same command to resume"]
    assert _gone_within(worker, 10), "the pool worker outlived the run"
    assert not list(out.rglob("*.tmp"))


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


def test_the_usage_line_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {evaluate.PROG} [-h] {{run,report,estimate}} ...")
    assert "COMMAND --help (COMMAND: run, report or estimate)" in text
    for command in ("run", "report", "estimate"):
        assert f"\n    {command} " in text  # and described below it


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--methods", "--domains", "--backbones", "--episodes", "--seeds", "--sampler", "--mem-budget",
                   "--mac-budget", "--epochs", "--lr", "--momentum", "--workers", "--out", "--retry-errors",
                   "--protocol", "--batch"):
        assert option in text
    # what a MAC share is of, and both presets' values
    assert "15% (the same as 15%bwd) is 15% of FullTrain's backward MACs" in " ".join(text.split())
    assert "15%fwd is 15% of the forward MACs" in " ".join(text.split())
    assert "paper 1,fulltrain=100,tinytl=100" in " ".join(text.split())


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


def test_estimate_defaults_to_the_backbones_of_a_paper_protocol_folder(tmp_path, capsys):
    """A --protocol paper folder holds records of the meta-trained backbones only; estimate's
    default backbones were the ImageNet ones, so `estimate --out` on it (README: time a few
    paper-protocol episodes, then estimate) failed with 'no successful record to time'."""
    import json

    backbones = evaluation.PROTOCOLS["paper"]["backbones"].split(",")
    for b in backbones:
        for m in evaluation.PAPER_METHODS:
            path = tmp_path / "episodes" / b / "omniglot" / m / "0.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"backbone": b, "domain": "omniglot", "method": m, "seed": 0,
                                        "task_seconds": 2.0}))
    config = {"settings": {"protocol": "quick"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert evaluate.main(["estimate", "--out", str(tmp_path)]) == 2  # a quick folder: the ImageNet backbones
    assert "no successful record to time mcunet-5fps/none" in capsys.readouterr().err
    config["settings"]["protocol"] = "paper"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert evaluate.main(["estimate", "--out", str(tmp_path), "--domains", "1", "--episodes", "1"]) == 0
    out = capsys.readouterr().out
    for b in backbones:
        assert f"| {b} | " + " | ".join(["2.00 (n=1)"] * len(evaluation.PAPER_METHODS)) + " | 12.0 |" in out
    assert f"= {3 * len(evaluation.PAPER_METHODS)} tasks, 36 task-seconds" in out


def _settings(*argv):
    ns = evaluate.parse_args(["run", *argv])
    return ns, evaluation.settings_of(ns)


def test_protocol_presets():
    ns, s = _settings("--protocol", "paper")
    assert s["protocol"] == "paper" and s["sampler"] == "metadataset" and s["way"] is None
    assert s["mac_budget"] == "15%bwd" and s["finetune"]["batch"] == 1 and s["finetune"]["lr"] is None
    # the batch-100 methods at their own learning rates (chosen on validation episodes)
    assert s["per_method"] == {"fulltrain": {"batch": 100, "lr": 1e-3}, "tinytl": {"batch": 100, "lr": 3e-2}}
    assert {m: evaluation.method_finetune(s, m)["batch"] for m in evaluation.PAPER_METHODS} == {
        "none": 1, "lastlayer": 1, "fulltrain": 100, "sparseupdate": 1, "tinytl": 100, "tinytrain": 1}
    assert ns.methods.split(",") == list(evaluation.PAPER_METHODS)
    assert ns.backbones.split(",") == ["mcunet-5fps-meta", "mbv2-w0.35-meta", "proxyless-w0.3-meta"]
    ns, s = _settings()  # quick, the default
    assert (s["protocol"], s["sampler"], s["way"], s["shot"], s["mac_budget"]) == ("quick", "fixed", 10, 5, "15%bwd")
    assert s["per_method"] == {} and ns.backbones == "mcunet-5fps"
    from microtrain.methods import METHODS
    assert ns.methods.split(",") == list(METHODS)
    # an option given explicitly wins over the preset, and the settings say what ran
    ns, s = _settings("--protocol", "paper", "--batch", "4", "--sampler", "fixed", "--backbones", "mcunet-5fps",
                      "--mac-budget", "15%fwd", "--lr", "1e-3,fulltrain=1e-2")
    assert s["per_method"] == {"fulltrain": {"lr": 1e-2}} and s["finetune"]["batch"] == 4 and s["sampler"] == "fixed"
    assert s["finetune"]["lr"] == 1e-3 and s["mac_budget"] == "15%fwd" and ns.backbones == "mcunet-5fps"
    assert evaluation.method_finetune(s, "fulltrain") == {**s["finetune"], "lr": 1e-2}
    # the options that reproduce settings give them back
    for argv in ((), ("--protocol", "paper"), ("--batch", "2,tinytl=8", "--lr", "tinytrain=0.01", "--mac-budget", "6.5M")):
        _, s = _settings(*argv)
        assert _settings(*evaluation.settings_options(s))[1] == s


@pytest.mark.parametrize("extra,message", [
    (["--batch", "1,magic=4"], "unknown method 'magic'"),
    (["--batch", "0"], "argument --batch: '0' is not an integer > 0"),
    (["--batch", "1,fulltrain=100,fulltrain=50"], "given twice"),
    (["--lr", "fast"], "argument --lr: cannot read 'fast' as a number"),
    # refused while parsing, not when a task's loss turns NaN (or its JSON record cannot be written)
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number > 0"),
    (["--lr", "3e-3,fulltrain=inf"], "argument --lr: 3e-3,fulltrain=inf: 'inf' is not a finite number > 0"),
    (["--lr", "0"], "argument --lr: '0' is not a finite number > 0"),
    (["--momentum", "nan"], "argument --momentum: must be a finite number >= 0 and < 1, got nan"),
    (["--momentum", "1.5"], "argument --momentum: must be a finite number >= 0 and < 1, got 1.5"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got inf"),
    (["--scale", "0"], "argument --scale: must be a finite number > 0, got 0"),
    (["--mac-budget", "15%ofall"], "cannot read '15%ofall' as a MAC budget"),
    (["--protocol", "exact"], "invalid choice"),
    (["--train-seed", "-1"], "argument --train-seed: must be an integer >= 0, got -1"),
])
def test_bad_per_method_options_are_one_line(inputs, tmp_path, capsys, extra, message):
    weights, data = inputs
    assert evaluate.main(args(weights, data, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_mac_budget_share_is_of_fulltrains_backward_macs():
    """'15%' (= '15%bwd'): 15% of a FullTrain program's backward MACs per image, as the paper's
    Table 2 has it (TinyTrain 6.51M of FullTrain's 44.9M on MCUNet); '15%fwd': of the forward MACs."""
    from microtrain.adapt import UsageError, parse_macs
    from microtrain.autograd import Program
    from microtrain.methods import full_update
    from microtrain.tinytrain import backward_macs

    from conftest import small_net
    net = small_net(resolution=16)
    program = Program(net.protonet_graph(3, 5, 10.0), full_update(net, [layer.name for layer in net.layers]), True)
    fulltrain = backward_macs(program)
    # by hand: every layer's weight gradient, and the input gradient of every layer but the first
    assert fulltrain == 2 * sum(layer.macs for layer in net.layers) - net.layers[0].macs
    assert fulltrain_backward_macs(net) == fulltrain > net.forward_macs
    assert parse_macs("15%", net) == parse_macs("15%bwd", net) == int(0.15 * fulltrain)
    assert parse_macs("15%fwd", net) == int(0.15 * net.forward_macs)
    assert parse_macs("6.5M", net) == 6_500_000 and parse_macs("2500", net) == 2500
    with pytest.raises(UsageError, match="15%bwd"):
        parse_macs("x%", net)


def test_paper_protocol_grid_on_stand_in_meta_trained_backbones(inputs, tmp_path, monkeypatch, capsys):
    """The paper preset end to end, the tiny network standing in for the meta-trained backbones:
    Meta-Dataset episodes, FullTrain and TinyTL at batch 100 (here the whole support set), the
    others at batch 1, memory at the batch that ran, TinyTrain's MAC budget 15% of FullTrain's
    backward MACs; a missing meta-trained file is one line; a changed preset is refused on resume."""
    import shutil

    from microtrain import checkpoint, methods
    from microtrain.autograd import Program

    weights, data = inputs
    meta = tmp_path / "weights"
    meta.mkdir()
    monkeypatch.setattr(checkpoint, "META_DIR", meta)
    out = tmp_path / "paper"
    argv = ["run", "--protocol", "paper", "--backbones", "mcunet-5fps-meta", "--domains", str(data),
            "--episodes", "2", "--epochs", "2", "--workers", "0", "--out", str(out)]
    assert evaluate.main(argv) == 2  # the preset's backbone is not there yet
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mcunet-5fps-meta.npz not found" in err and not out.exists()

    shutil.copy(weights, meta / "mcunet-5fps-meta.npz")
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    rec = {(p.parent.name, int(p.stem)): json.loads(p.read_text())
           for p in (out / "episodes").rglob("*.json")}
    assert {m for m, _ in rec} == set(evaluation.PAPER_METHODS)
    net = resolve_model(str(weights))
    for seed in (0, 1):
        full, tinytl, tiny = rec[("fulltrain", seed)], rec[("tinytl", seed)], rec[("tinytrain", seed)]
        n, way = full["support_size"], full["way"]
        assert full["episode"]["sampler"] == "metadataset" and full["settings"]["protocol"] == "paper"
        assert 5 <= way <= 6 and n >= way and full["query_size"] == 4 * way  # Appendix B on 8 images per class
        assert full["finetune"]["batch"] == tinytl["finetune"]["batch"] == min(100, n)
        assert tiny["finetune"]["batch"] == rec[("lastlayer", seed)]["finetune"]["batch"] == 1
        assert full["losses"]["steps"] == 2 and tiny["losses"]["steps"] == 2 * n  # one step per pass at batch n
        # FullTrain's backward memory as planned at the batch it ran, computed here independently
        program = Program(net.protonet_graph(n, way, 10.0), methods.full_update(net, [l.name for l in net.layers]),
                          momentum=True)
        assert full["memory"]["backward_planned_bytes"] == program.plan.backward_bytes
        assert tiny["budgets"]["macs"] == int(0.15 * full["backward_macs"]) == int(0.15 * fulltrain_backward_macs(net))
        assert 0 < tiny["backward_macs"] <= tiny["budgets"]["macs"]
        assert full["finetune"]["lr"] == 1e-3 and tinytl["finetune"]["lr"] == 3e-2
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["per_method"] == {"fulltrain": {"batch": 100, "lr": 1e-3},
                                                "tinytl": {"batch": 100, "lr": 3e-2}}
    assert config["methods"]["fulltrain"] == {"batch": 100, "lr": 1e-3}
    assert config["methods"]["tinytrain"] == {"batch": 1, "lr": methods.DEFAULT_LR["tinytrain"]}

    report = (out / "report.md").read_text()
    head = report[report.index("## Settings"):report.index("## mcunet-5fps-meta")]
    assert "- protocol: **paper**, the paper's" in head and "changed from the preset" not in head
    assert "- episodes: Meta-Dataset sampler" in head
    macs = tiny["budgets"]["macs"]
    assert (f"backward MACs 15% of FullTrain's backward MACs per image (mcunet-5fps-meta: {macs / 1e6:.2f}M)"
            in head)
    assert "batch 1, SGD lr each method’s default" in head
    assert "per method: fulltrain: batch 100, lr 0.001; tinytl: batch 100, lr 0.03" in head
    sizes = sorted(rec[("fulltrain", s)]["support_size"] for s in (0, 1))
    span = str(sizes[0]) if sizes[0] == sizes[1] else f"{sizes[0]}–{sizes[1]}"
    assert f"| fulltrain | {span} | 0.001 | 0.9 |" in head and "| tinytrain | 1 | 0.003 | 0.9 |" in head
    assert "| sparseupdate |" not in head  # failed on the tiny net: nothing ran
    assert next(line for line in report.splitlines() if line.startswith("| fulltrain | 2 |")).startswith(
        f"| fulltrain | 2 | {span} | ")
    assert "--protocol paper --sampler metadataset --mem-budget 512KB --mac-budget 15%bwd" in report
    assert "--batch 1,fulltrain=100,tinytl=100" in report

    # resuming refuses a changed preset: another batch, or another default learning rate
    assert evaluate.main(argv + ["--batch", "1"]) == 2
    assert "other settings (per_method" in capsys.readouterr().err
    monkeypatch.setitem(methods.DEFAULT_LR, "tinytrain", 1e-2)
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "tinytrain ran with fine-tuning settings {'batch': 1, 'lr': 0.003}" in err and err.count("\n") == 1


def test_a_folder_from_before_the_presets_reads_as_what_it_ran(inputs, tmp_path, capsys):
    """Before the presets a MAC share was of the forward MACs and config.json had no protocol:
    such a folder is described as it ran, and resumes with --mac-budget 15%fwd, not with 15%."""
    weights, data = inputs
    out = tmp_path / "old"
    assert evaluate.main(args(weights, data, out, "--mac-budget", "15%fwd", methods="none", workers="0")) == 0
    config = json.loads((out / "config.json").read_text())
    old = dict(config["settings"], mac_budget="15%")
    del old["protocol"], old["per_method"]
    config["settings"] = old
    (out / "config.json").write_text(json.dumps(config))
    assert evaluate.main(["report", "--out", str(out)]) == 0
    head = (out / "report.md").read_text()
    assert "- protocol: not recorded" in head and "backward MACs 15% of the forward MACs per image" in head
    assert evaluate.main(args(weights, data, out, methods="none", workers="0")) == 2
    assert "mac_budget: '15%fwd' there, '100%bwd' now" in capsys.readouterr().err
    assert evaluate.main(args(weights, data, out, "--mac-budget", "15%fwd", methods="none", workers="0")) == 0


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys):
    from microtrain.evaluate import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--methods", "none", "--domains", "traffic_sign", "--episodes", "1",
                 "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_domain_average_is_over_seeds_when_the_seeds_are_shared():
    """One seed draws the way and shots of every domain's episode, so the average over domains
    takes its interval over the seeds (each seed's mean over the domains), not from the domains'
    intervals as if independent; a partial grid with < 2 complete seeds falls back to that."""
    from microtrain import evaluation_report as er

    by_domain = {"a": {0: 0.1, 1: 0.3, 2: 0.2}, "b": {0: 0.3, 1: 0.5}}
    mean, half, n = er.domain_average(by_domain, ["a", "b"])
    per_seed = [0.2, 0.4]  # seed 2 is missing in b
    assert n == 2 and mean == pytest.approx(0.3)
    assert half == pytest.approx(stats.t_quantile(0.95, 1) * np.std(per_seed, ddof=1) / np.sqrt(2))
    # perfectly correlated domains: the combined-intervals formula would be 1/sqrt(2) as wide
    same = {"a": {0: 0.1, 1: 0.3}, "b": {0: 0.1, 1: 0.3}}
    combined = er._combine([stats.mean_ci([0.1, 0.3])] * 2)[1]
    assert er.domain_average(same, ["a", "b"])[1] == pytest.approx(combined * np.sqrt(2))
    mean, half, n = er.domain_average({"a": {0: 0.1, 1: 0.3}, "b": {2: 0.5, 3: 0.7}}, ["a", "b"])
    assert n == 0 and mean == pytest.approx(0.4) and half == pytest.approx(combined)
    assert er.domain_average({"a": {0: 0.1}, "b": {}}, ["a", "b"]) is None


def test_paired_differences_of_the_adaptive_methods():
    """The report's paired differences: each task-adaptive method (tinytrain, tinytrain-plus
    variants) minus SparseUpdate and FullTrain on the episodes both finished, per domain and
    averaged; a seed one of them lacks is left out of that pair."""
    from microtrain import evaluation_report as er

    acc = {("tinytrain", "flowers"): [0.50, 0.60, 0.70], ("sparseupdate", "flowers"): [0.40, 0.65, 0.60],
           ("fulltrain", "flowers"): [0.30, 0.30], ("tinytrain-plus", "flowers"): [0.9, 0.9, 0.9],
           ("tinytrain", "dtd"): [0.2, 0.4], ("sparseupdate", "dtd"): [0.1, 0.1], ("fulltrain", "dtd"): [0.5, 0.5],
           ("tinytrain-plus", "dtd"): [0.2, 0.2], ("none", "dtd"): [0.0, 0.0], ("none", "flowers"): [0.0, 0.0, 0.0]}
    records = [{"backbone": "b", "method": m, "domain": d, "seed": seed, "accuracy_after": a, "accuracy_before": 0.0,
                "memory": None, "backward_macs": 0, "forward_macs": 1, "selection_share": 0.0,
                "time_seconds": {"end_to_end": 1.0, "selection": 0.0, "training": 1.0}}
               for (m, d), values in acc.items() for seed, a in enumerate(values)]
    s = er.summarize(records)["b"]
    assert set(s["pairs"]) == {(a, b) for a in ("tinytrain", "tinytrain-plus") for b in ("sparseupdate", "fulltrain")}
    mean, half, n = s["pairs"][("tinytrain", "sparseupdate")]["flowers"]
    assert n == 3 and mean == pytest.approx(np.mean([0.10, -0.05, 0.10]))
    assert half == pytest.approx(stats.t_quantile(0.95, 2) * np.std([0.10, -0.05, 0.10], ddof=1) / np.sqrt(3))
    assert s["pairs"][("tinytrain", "fulltrain")]["flowers"][2] == 2  # FullTrain lacks seed 2
    average = s["pairs"][("tinytrain-plus", "fulltrain")]["average"]
    assert average[0] == pytest.approx((0.6 + (-0.3)) / 2)
    table = "\n".join(er._paired_table(s))
    assert "| tinytrain − sparseupdate | +5.0 ± " in table and "(n=3)" in table
    assert "| tinytrain-plus − fulltrain | +60.0 ± 0.0 (n=2) | -30.0 ± 0.0 (n=2) | **+15.0 ± 0.0** |" in table
    # episodes worse than no training, counted against each record's own untrained accuracy
    records[0]["accuracy_before"] = 0.55  # tinytrain, flowers, seed 0 scored 0.50 after
    # and episodes whose training loss ended above its first value (records without losses: not counted)
    records[1]["losses"] = {"first": 1.0, "last": 1.5, "steps": 40}  # tinytrain, flowers, seed 1: diverged
    records[2]["losses"] = {"first": 1.0, "last": 0.5, "steps": 40}
    s = er.summarize(records)["b"]
    assert s["worse"]["tinytrain"] == (1, 5) and s["worse"]["fulltrain"] == (0, 4)
    assert s["rose"]["tinytrain"] == (1, 2) and s["rose"]["fulltrain"] == (0, 0)
    rows = er._table1(s)[0][-2:]
    assert rows[0] == "| episodes worse than no training | 1 of 5 | 0 of 5 | 0 of 4 | 0 of 5 | – | – |"
    assert rows[1] == "| episodes whose training loss rose | 1 of 2 | – | – | – | – | – |"


def test_commit_is_dirty_only_when_the_code_differs(tmp_path):
    """A grid writing into a tracked reports/ folder changes its own config.json: that is not a code
    change, so the records' commit must not say "+dirty" (every paper-protocol record did)."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "microtrain").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "microtrain" / "kernel.py").write_text("x = 1\n")
    (tmp_path / "reports" / "config.json").write_text("{}\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert evaluation._git_commit(tmp_path) == head
    (tmp_path / "reports" / "config.json").write_text('{"runs": []}\n')
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert evaluation._git_commit(tmp_path) == head
    (tmp_path / "microtrain" / "kernel.py").write_text("x = 2\n")
    assert evaluation._git_commit(tmp_path) == head + "+dirty"
    assert evaluation._git_commit(tmp_path / "reports" / "nowhere") is None


def test_progress_eta_weighs_each_method_by_its_own_pace(monkeypatch):
    """A grid's first tasks are often `none` (1 s); the ETA must not promise the minutes-long
    methods at that pace: each (backbone, method) is estimated by its own mean so far, a method not
    seen yet by the mean of all, and the wall time so far is scaled by work left / work done."""
    clock = [100.0]
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    tasks = [{"backbone": "b", "method": m, "domain": "d", "seed": s} for s in (0, 1) for m in ("none", "tinytl")]
    progress = evaluation.Progress(tasks)

    def rec(method, seconds, seed):
        return {"backbone": "b", "method": method, "domain": "d", "seed": seed, "accuracy_after": 0.5,
                "accuracy_before": 0.4, "task_seconds": seconds}

    clock[0] += 1.0
    line = progress.line(rec("none", 1.0, 0))
    # left: one none (1 s) + two tinytl (not seen: 1 s each) = 3 s of work for 1 s done in 1 s of wall
    assert progress.eta() == pytest.approx(3.0) and line.endswith("ETA 3s")
    clock[0] += 100.0
    progress.line(rec("tinytl", 100.0, 0))
    # left: one none (1 s) + one tinytl (100 s) = 101 s for 101 s done in 101 s of wall
    assert progress.eta() == pytest.approx(101.0)
    progress.line(rec("none", 1.0, 1))
    assert progress.line(rec("tinytl", 90.0, 1)).endswith("ETA done")


def test_blas_kernels_names_what_openblas_chose():
    """A record names the OpenBLAS kernels (they round differently); OPENBLAS_CORETYPE forces them."""
    if evaluation.blas_kernels() is None:
        pytest.skip("NumPy is not linked to OpenBLAS here")
    code = "import numpy; from microtrain.evaluation import blas_kernels; print(blas_kernels())"
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "OPENBLAS_CORETYPE": "Sandybridge"}).stdout.strip()
    assert forced == "Sandybridge"


def test_figure_labels_give_large_memory_ratios_in_full():
    """Figure 1 labelled FullTrain's 597x TinyTrain's memory at batch 100 '6e+02x'."""
    assert [format_ratio(r) for r in (0.567, 2.24, 65.5, 597.4, 1221.3)] == ["0.57×", "2.2×", "66×", "597×", "1,221×"]
