"""A real Dask cluster on 127.0.0.1 loses a worker mid-grid, and the grid still completes.

Starts `dask scheduler` and two `dask worker` processes (one thread each), runs a small grid (tiny
random net, 3 methods x 8 episodes) with `python -m microtrain.evaluate --scheduler`, kills one
worker (its nanny and process, SIGKILL) once both have returned records, then checks that every
record is there, none failed, and each equals the local pool's record of the same task apart
from times and hosts. Stops everything it started. Run by .ci/run:

    python tests/cluster_check.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from conftest import grid_inputs  # noqa: E402
from microtrain.evaluation import comparable  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def records(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.glob("episodes/*/*/*/*.json"))}


def _diff(a, b, path=""):
    """(field, one, other) for every field two records disagree on."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [(path, a, b)]


def wait_until(condition, seconds: float, what: str):
    end = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > end:
            raise SystemExit(f"cluster check FAILED: no {what} after {seconds:.0f} s")
        time.sleep(0.1)
    return value


def main() -> int:
    started = []  # every process this script starts, each in its own process group

    def start(*cmd, log):
        started.append(subprocess.Popen([sys.executable, "-m", *map(str, cmd)], stdout=log, stderr=subprocess.STDOUT,
                                        env=ENV, cwd=REPO, start_new_session=True))
        return started[-1]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights, data = grid_inputs(tmp)
        grid = ["microtrain.evaluate", "run", "--backbones", weights, "--domains", data, "--methods",
                "none,tinytrain,lastlayer", "--episodes", "8", "--way", "3", "--shot", "2", "--query-shots", "3",
                "--epochs", "40", "--mem-budget", "1MB", "--mac-budget", "100%", "--no-report"]
        log = open(tmp / "cluster.log", "w")
        try:
            start("dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                  "--scheduler-file", tmp / "scheduler.json", log=log)
            wait_until((tmp / "scheduler.json").exists, 60, "scheduler file")
            workers = [start("dask", "worker", "--scheduler-file", tmp / "scheduler.json", "--host", "127.0.0.1",
                             "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", f"w{i}", log=log)
                       for i in range(2)]
            from distributed import Client

            with Client(scheduler_file=str(tmp / "scheduler.json"), timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
                pids = client.run(os.getpid)  # worker address -> pid of its process
                victim = {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}["w0"]
                run = start(*grid, "--scheduler", tmp / "scheduler.json", "--out", tmp / "dask", log=log)
                # kill w0 (nanny and worker) mid-run: both have returned records and w0 holds a task
                wait_until(lambda: len({r["worker"]["pid"] for r in records(tmp / "dask").values()}) == 2
                           and client.processing([victim])[victim], 120, "records from both workers while w0 holds a task")
                os.killpg(workers[0].pid, signal.SIGKILL)
                killed_after = len(records(tmp / "dask"))
            if run.wait(timeout=300) != 0:
                raise SystemExit(f"cluster check FAILED: the grid exited with {run.returncode}")
            local = subprocess.run([sys.executable, "-m", *map(str, grid), "--workers", "2", "--out", tmp / "local"],
                                   env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
            if local.returncode:
                raise SystemExit(f"cluster check FAILED: the local run: {local.stderr.strip()}")
        except BaseException:
            log.flush()
            print((tmp / "cluster.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            for proc in started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in started:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        dask, pool = records(tmp / "dask"), records(tmp / "local")
        problems = [f"{len(dask)} records from the cluster, {len(pool)} from the local pool, 24 expected"] \
            if not len(dask) == len(pool) == 24 or set(dask) != set(pool) else []
        problems += [f"{name}: {rec['error']}" for name, rec in dask.items() if "error" in rec]
        problems += [f"{name} differs from the local pool's: {_diff(comparable(rec), comparable(pool[name]))}"
                     for name, rec in dask.items() if name in pool and comparable(rec) != comparable(pool[name])]
        if killed_after >= 24:
            problems.append("the grid had finished before the kill: not mid-run")
        if not any(r["worker"]["pid"] == pids[victim] for r in dask.values()):
            problems.append("no record from the killed worker: it did not take part")
        if problems:
            print("cluster check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"cluster check passed: worker w0 killed after {killed_after} of 24 records; all 24 records "
              "present, none failed, each equal to the local pool's apart from times and hosts")
        return 0


if __name__ == "__main__":
    sys.exit(main())
