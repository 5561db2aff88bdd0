"""The evaluation grid on a Dask cluster (``dask.distributed``, the optional extra ``cluster``).

Start the cluster with Dask's own commands (or any Dask deployment: SSH, Slurm through
dask-jobqueue, Kubernetes), one single-threaded worker process per core:

    dask scheduler                                            # prints tcp://HOST:8786
    dask worker tcp://HOST:8786 --nworkers -1 --nthreads 1    # on each machine

(the nanny Dask starts each worker process under sets OPENBLAS/OMP/MKL_NUM_THREADS=1), then
``python -m microtrain.evaluate run ... --scheduler tcp://HOST:8786``. Every worker needs the same
microtrain installed and the data and weight files at the client's paths; outputs need no shared
file system: a worker returns each record to the client, which writes it.

One Dask task per (backbone, domain, method, seed), running ``evaluation.run_task``, which refuses
a file whose SHA-256 differs from the client's. A task whose worker dies is rescheduled by the
scheduler (Dask's own retry; after ``distributed.scheduler.allowed-failures`` deaths, default 3,
Dask gives up with KilledWorker) and a task that raises is recorded as failed: the grid goes on.
The device side (``adapt``, ``predict``) never imports this module.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from concurrent.futures import CancelledError
from pathlib import Path

from .evaluation import THREAD_VARS, GridError, check_identity, failed_record, run_task


def _worker_check(files: dict) -> dict:
    """Runs on each worker before the grid: files that differ from the client's, thread settings."""
    problems = []
    for path, (what, sha) in files.items():
        try:
            check_identity(what, path, sha)
        except Exception as exc:  # noqa: BLE001 - reported per worker by the client
            problems.append(str(exc))
    return {"problems": problems, "env": {v: os.environ.get(v) for v in THREAD_VARS[:3]}}


CONNECT_SECONDS = 30.0  # how long to wait for the scheduler to answer


def connect(address: str, timeout: float | None = None):
    """A ``dask.distributed.Client`` for a scheduler address (tcp://HOST:PORT) or a scheduler file
    (the JSON ``dask scheduler --scheduler-file`` writes). Raises GridError (one line) when dask is
    not installed or the scheduler does not answer within ``timeout`` seconds (CONNECT_SECONDS).
    The scheduler is probed first: a Client that failed to connect would complain at exit."""
    timeout = CONNECT_SECONDS if timeout is None else timeout
    try:
        from dask.distributed import Client
        from distributed.comm import connect as open_comm
    except ImportError:
        raise GridError("--scheduler needs dask.distributed: pip install 'microtrain[cluster]'") from None
    if address.endswith(".json"):
        try:
            address = json.loads(Path(address).read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GridError(f"cannot read the scheduler file {address} ({type(exc).__name__}: {exc})") from None

    async def probe():
        comm = await open_comm(address, timeout=timeout)
        await comm.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, ValueError) as exc:
        raise GridError(f"cannot reach the Dask scheduler at {address}: {str(exc).splitlines()[0]}") from None
    return Client(address, timeout=timeout, set_as_default=False)


def check_workers(client, tasks: list[dict]) -> None:
    """Refuse to start when a worker already connected sees other data or weight files (GridError);
    warn when a worker runs several threads or multi-threaded BLAS (tasks then share cores and
    their times are not one core's)."""
    files = {}
    for t in tasks:
        files[t["weights"]] = ("weight", t["weights_sha256"])
        files[t["data"]] = ("data", t["data_sha256"])
    try:
        answers = client.run(_worker_check, files)
    except Exception as exc:  # noqa: BLE001 - e.g. microtrain not installed on a worker
        raise GridError(f"a worker cannot run microtrain's check ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}): install microtrain on every worker") from None
    for worker, answer in answers.items():
        if answer["problems"]:
            raise GridError(f"worker {worker}: {answer['problems'][0]}")
    info = client.scheduler_info().get("workers", {})
    for worker, w in info.items():
        env = answers.get(worker, {}).get("env", {})
        if w.get("nthreads", 1) > 1 or env.get("OPENBLAS_NUM_THREADS") != "1":
            print(f"warning: worker {worker} runs {w.get('nthreads')} threads with OPENBLAS_NUM_THREADS="
                  f"{env.get('OPENBLAS_NUM_THREADS')}: start workers with `dask worker ADDRESS --nworkers -1 "
                  "--nthreads 1` (one single-threaded process per core)", file=sys.stderr, flush=True)
    cores = sum(w.get("nthreads", 1) for w in info.values())
    print(f"Dask cluster {client.scheduler.address}: {len(info)} worker(s), {cores} thread(s)"
          + ("" if info else "; tasks wait for the first worker"), flush=True)


def run_on_cluster(tasks: list[dict], finish, address: str) -> None:
    """Submit one Dask task per grid task and call ``finish(record)`` here as each completes (in
    completion order). Ctrl-C (or any error here) cancels what has not finished."""
    from dask.distributed import as_completed

    client = connect(address)
    with client:
        check_workers(client, tasks)
        token = uuid.uuid4().hex[:8]  # keys are unique per run: another client's grid is not ours
        futures = {client.submit(run_task, t, key=f"microtrain-{t['backbone']}-{t['domain']}-{t['method']}-"
                                                  f"{t['seed']}-{token}"): t for t in tasks}
        try:
            for future in as_completed(futures, loop=client.loop):
                task = futures[future]
                try:
                    record = future.result()
                except CancelledError:
                    raise GridError("the Dask scheduler cancelled the grid (lost or restarted?): finished records "
                                    "are kept; rerun the same command to resume") from None
                except Exception as exc:  # noqa: BLE001 - KilledWorker, or a task failing outside run_task
                    record = failed_record(task, exc)
                future.release()
                finish(record)
        except BaseException:
            client.cancel(list(futures))
            raise
