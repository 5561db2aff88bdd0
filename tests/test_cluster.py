"""The evaluation grid on a Dask cluster: a LocalCluster on 127.0.0.1 with 2 worker processes gives
the records the local process pool gives (apart from times and hosts). A real `dask scheduler`
with a worker killed mid-run: tests/cluster_check.py (run by .ci/run)."""
from __future__ import annotations

import ast
import gc
import json
import os
from pathlib import Path

import pytest

from conftest import grid_inputs
from microtrain import cluster, evaluate, evaluation

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parent.parent


def records(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.rglob("episodes/**/*.json"))}


def test_dask_records_equal_the_local_pools(tmp_path, capsys):
    weights, data = grid_inputs(tmp_path)
    grid = ["run", "--backbones", str(weights), "--domains", str(data), "--methods", "tinytrain,sparseupdate",
            "--episodes", "2", "--way", "3", "--shot", "2", "--query-shots", "3", "--epochs", "1",
            "--mem-budget", "1MB", "--mac-budget", "100%", "--no-report"]
    assert evaluate.main(grid + ["--workers", "1", "--out", str(tmp_path / "local")]) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as local_cluster:
        address = local_cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        capsys.readouterr()
        assert evaluate.main(grid + ["--scheduler", address, "--out", str(tmp_path / "dask")]) == 0
        printed = capsys.readouterr().out
        assert "4 to run on the Dask cluster" in printed and "2 worker(s), 2 thread(s)" in printed
        assert "[4/4] ####################" in printed and "ETA done" in printed

        # resume: a rerun submits nothing and leaves every file as it was
        stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "dask").rglob("*.json") if "episodes" in p.parts}
        assert evaluate.main(grid + ["--scheduler", address, "--out", str(tmp_path / "dask")]) == 0
        assert "4 already in" in capsys.readouterr().out
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

        # a worker whose file differs from the client's refuses before the grid starts
        tasks, _ = evaluation.plan_grid(tmp_path / "check", ["tinytrain"], [str(data)], [str(weights)], [0],
                                        evaluation.settings_of(evaluate.parse_args(grid)))
        with cluster.connect(address) as client:
            with pytest.raises(evaluation.GridError, match=r"worker tcp://127\.0\.0\.1:\d+: data file .* "
                                                           "refusing to compute on other data"):
                cluster.check_workers(client, [{**tasks[0], "data_sha256": "0" * 64}])

    local, dask = records(tmp_path / "local"), records(tmp_path / "dask")
    assert sorted(local) == sorted(dask) == sorted(f"episodes/tiny/toy/{m}/{s}.json"
                                                   for m in ("tinytrain", "sparseupdate") for s in (0, 1))
    for name, rec in dask.items():
        assert evaluation.comparable(rec) == evaluation.comparable(local[name]), name
        assert rec["worker"]["pid"] != os.getpid() and rec["worker"]["OPENBLAS_NUM_THREADS"] == "1"
        assert rec["data_sha256"] == evaluation.file_sha256(data)
    assert all("accuracy_after" in dask[f"episodes/tiny/toy/tinytrain/{s}.json"] for s in (0, 1))
    # the tiny net has no SparseUpdate configuration: a failed task, recorded, the grid went on
    assert all("no SparseUpdate configuration" in dask[f"episodes/tiny/toy/sparseupdate/{s}.json"]["error"]
               for s in (0, 1))


def test_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    weights, data = grid_inputs(tmp_path)
    argv = ["run", "--backbones", str(weights), "--domains", str(data), "--methods", "none", "--episodes", "1",
            "--way", "3", "--shot", "2", "--query-shots", "3", "--scheduler", "tcp://127.0.0.1:9", "--out",
            str(tmp_path / "o")]
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 2.0)  # nothing listens on port 9 (discard)
    assert evaluate.main(argv) == 2
    gc.collect()  # a Client that failed to connect would complain from __del__
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9") and err.count("\n") == 1


def test_only_the_cluster_module_imports_dask():
    """The device side (adapt, predict, the engine) never imports dask: only microtrain/cluster.py
    names it, and only the command line (evaluate.py) imports cluster, when --scheduler is given."""
    importers: dict[str, set] = {}
    for path in (REPO / "microtrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("dask", "distributed"):
                    importers.setdefault("dask", set()).add(path.name)
                if name in ("cluster", "microtrain.cluster") or name.startswith("cluster."):
                    importers.setdefault("cluster", set()).add(path.name)
    assert importers == {"dask": {"cluster.py"}, "cluster": {"evaluate.py"}}
