"""Evaluate on-device training methods over many few-shot episodes: the paper's Table 1, Table 2
and Figure 1 on the shared data.

    python tools/evaluate.py run [--methods none,tinytrain] [--domains traffic_sign,omniglot]
                                 [--backbones mcunet-5fps] [--episodes 10 | --seeds 0-9] [--out runs/eval]
    python tools/evaluate.py report [--out runs/eval]

``run`` adapts every (backbone, domain, episode seed, method) with
``microtrain.pipeline.adapt_episode``, the function behind ``python -m microtrain.adapt``; an
episode depends only on (domain, seed), so every method sees the same episodes. Each finished
task is written at once to ``OUT/episodes/<backbone>/<domain>/<method>/<seed>.json`` (temporary
file, then rename): a rerun skips finished tasks, Ctrl-C keeps them and leaves no partial file,
and a task that fails (training diverged, a budget that cannot be met, ...) is recorded with an
``error`` field instead of stopping the run. ``OUT/config.json`` holds the episode and
fine-tuning settings; a rerun with other settings into the same folder is refused.

``report`` (also run at the end of ``run``) reads every episode file and writes
``OUT/results.json`` (all records), ``OUT/report.md`` (Table 1: query accuracy, mean and 95%
interval, per domain and averaged; Table 2: backward memory and MACs, their ratios to
TinyTrain's, end-to-end time and the selection's share) and ``OUT/figure1_<backbone>.png``
(accuracy against backward MACs, marker size by backward memory; needs matplotlib, otherwise
skipped with a note).

Workers are separate processes started fresh (spawn) with OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and NUMBA_NUM_THREADS set to 1, so N workers use N cores. Bad options: one line
on stderr, exit status 2. Ctrl-C: exit status 130.
"""
from __future__ import annotations

# Nothing here imports NumPy at module level: a spawned worker imports this module, and its
# thread settings must be in place before NumPy (OpenBLAS) and Numba load.
import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROG = "python tools/evaluate.py"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")
# name -> (shared data file, label in the tables, in-domain control?), in the paper's column order
DOMAINS = {
    "traffic_sign": ("traffic_sign.zip", "Traffic Sign", False),
    "omniglot": ("omniglot.zip", "Omniglot", False),
    "flowers": ("flowers.zip", "Flowers", False),
    "dtd": ("dtd.zip", "DTD", False),
    "quickdraw": ("quickdraw.npz", "Quick Draw", False),
    "tinyimagenet": ("tinyimagenet.zip", "Tiny-ImageNet (in-domain)", True),
}
DEFAULT_DOMAINS = ("traffic_sign", "omniglot", "flowers", "dtd", "quickdraw")
# the shared backbones and their meta-trained versions (microtrain.checkpoint.BACKBONES, not imported
# here: see above)
BACKBONES = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-meta", "mbv2-w0.35-meta",
             "proxyless-w0.3-meta")
REFERENCE = "tinytrain"  # Table 2's ratios and the improvement column are relative to it
BASELINE = "none"


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UsageError(f"{self.prog}: {message} (see --help)")


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from microtrain.methods import METHODS
    from microtrain.train import FinetuneConfig

    d = FinetuneConfig()
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"Options of each command: {PROG} run --help, {PROG} report --help.\n"
                       "A run exits with status 0 also when some tasks failed: they are recorded, listed in\n"
                       "the report, and rerun by --retry-errors.")
    sub = p.add_subparsers(dest="command", metavar="{run,report}", parser_class=_Parser)
    r = sub.add_parser("run", help="adapt every (backbone, domain, episode, method), then write the report "
                                   "(the default command)",
                       description="Adapt every (backbone, domain, episode seed, method) not done yet in --out, "
                                   "one JSON per task, then write the report.")
    g = r.add_argument_group("what to evaluate")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list from {', '.join(METHODS)} (default: all)")
    g.add_argument("--domains", default=",".join(DEFAULT_DOMAINS),
                   help="comma list of shared domains (" + ", ".join(DOMAINS) + ") or paths to a dataset "
                        "(class-per-folder directory, .zip of one, or .npz with x, y[, names]); a path is "
                        "named by its file stem. Default: the five target domains " + ",".join(DEFAULT_DOMAINS)
                        + " (tinyimagenet is an in-domain control, kept out of the averages)")
    g.add_argument("--backbones", default="mcunet-5fps",
                   help=f"comma list of shared backbones ({', '.join(BACKBONES)}; converted on first use) or "
                        "microtrain weight files (.npz, named by their stem). Default: %(default)s")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--episodes", type=int, help="episodes per domain, seeds 0..N-1 (default 10)")
    seeds.add_argument("--seeds", help="episode seeds instead: 'a-b' (inclusive), or a comma list of seeds "
                                       "and ranges, e.g. 0-4,10")
    g = r.add_argument_group("episodes")
    g.add_argument("--sampler", choices=("fixed", "metadataset"), default="fixed",
                   help="fixed way/shot (the quick protocol), or the Meta-Dataset sampler of the paper's "
                        "Appendix B (5-50 ways, 1-100 shots per class, <= 500 support images). Default: %(default)s")
    g.add_argument("--way", type=int, default=10, help="fixed sampler: classes per episode (default %(default)s)")
    g.add_argument("--shot", type=int, default=5, help="fixed sampler: support images per class (default %(default)s)")
    g.add_argument("--query-shots", type=int, default=10,
                   help="fixed sampler: query images per class (default %(default)s)")
    g = r.add_argument_group("budgets (TinyTrain's selection)")
    g.add_argument("--mem-budget", default="512KB",
                   help="backward memory budget, e.g. 512KB, 0.5MB, 524288 (KB = 1024 bytes; default %(default)s)")
    g.add_argument("--mac-budget", default="15%",
                   help="backward MAC budget: a share of the backbone's forward MACs or a count, e.g. 3.4M "
                        "(default %(default)s)")
    g = r.add_argument_group("fine-tuning (defaults: microtrain.train.FinetuneConfig)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the support set (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="SGD learning rate for every method (default: each method's own, methods.DEFAULT_LR)")
    g.add_argument("--momentum", type=float, default=d.momentum,
                   help="SGD momentum (default %(default)s; SparseUpdate always uses plain SGD)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    g.add_argument("--scale", type=float, default=d.scale, help="cosine logit scale (default %(default)s)")
    g.add_argument("--batch", type=int, default=d.batch, help="pseudo-queries per step (default %(default)s)")
    g.add_argument("--train-seed", type=int, default=d.seed,
                   help="augmentation/order seed of fine-tuning (default %(default)s)")
    g = r.add_argument_group("execution and output")
    g.add_argument("--workers", type=int, default=2,
                   help="worker processes, one core each (default %(default)s); 0 runs the tasks in this "
                        "process (debugging)")
    g.add_argument("--retry-errors", action="store_true",
                   help="also rerun tasks recorded with an error (by default every task with a file is done)")
    g.add_argument("--out", default="runs/eval", help="output folder (default %(default)s)")
    g.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    rep = sub.add_parser("report", help="(re)write results.json, report.md and the figures from the episode files",
                         description="Read OUT/episodes/**.json and write OUT/results.json, OUT/report.md and "
                                     "OUT/figure1_<backbone>.png.")
    rep.add_argument("--out", default="runs/eval", help="the folder a run wrote (default %(default)s)")
    return p


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "report", "-h", "--help"):
        argv = ["run", *argv]  # run is the default command
    return build_parser().parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> 0..9; '0-4,10' -> 0,1,2,3,4,10 (sorted, without repeats)."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UsageError(f"cannot read {text!r} as seeds (e.g. 0-9, or 0-4,10)")
        seeds.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(seeds)


def format_seeds(seeds) -> str:
    """The inverse of parse_seeds: compact ranges."""
    seeds = sorted(set(seeds))
    parts, start = [], None
    for i, s in enumerate(seeds):
        if start is None:
            start = s
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            parts.append(str(s) if s == start else f"{start}-{s}")
            start = None
    return ",".join(parts)


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    if len(set(items)) != len(items):
        raise UsageError(f"--{what} names something twice: {text}")
    return items


def _key(text: str) -> str:
    """A name safe as one path component."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return key


def resolve_domain(spec: str) -> tuple[str, str, str]:
    """(key, path to open, how to write it in a command) of a --domains entry."""
    from microtrain.paths import shared_file

    if spec in DOMAINS:
        return spec, str(shared_file("data", DOMAINS[spec][0])), spec
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"unknown domain {spec!r}: use one of {', '.join(DOMAINS)} or a path to a dataset "
                         "(folder, .zip or .npz)")
    stem = path.name[: -len(path.suffix)] if path.suffix.lower() in (".zip", ".npz") else path.name
    return _key(stem), str(path.resolve()), str(path.resolve())


def resolve_backbone(spec: str):
    """(key, weight file path, network) of a --backbones entry; converts a shared one on first use."""
    from microtrain.adapt import UsageError as AdaptUsageError, _resolve_model
    from microtrain.checkpoint import backbone_file

    path = Path(spec)
    if path.suffix == ".npz":
        try:
            net = _resolve_model(spec)
        except AdaptUsageError as exc:
            raise UsageError(str(exc)) from None
        return _key(path.stem), str(path.resolve()), net
    if spec not in BACKBONES:
        raise UsageError(f"unknown backbone {spec!r}: use one of {', '.join(BACKBONES)} or a .npz weight file")
    weights = backbone_file(spec)
    return spec, str(weights), _resolve_model(str(weights))


def _mac_text(text: str) -> str:
    from microtrain.adapt import parse_macs

    text = str(text).strip()
    if text.endswith("%"):
        share = float(text[:-1]) if re.fullmatch(r"[0-9]*\.?[0-9]+%", text) else -1.0
        if share < 0:
            raise UsageError(f"cannot read {text!r} as a MAC budget (e.g. 15%, 3.4M)")
        return f"{share:g}%"
    return str(parse_macs(text, 1))


def _bytes_text(n: int) -> str:
    return f"{n // 1024 ** 2}MB" if n % 1024 ** 2 == 0 and n else f"{n // 1024}KB" if n % 1024 == 0 and n else str(n)


def settings_of(args) -> dict:
    """Everything that makes two runs' episodes comparable; stored in OUT/config.json."""
    from microtrain.adapt import UsageError as AdaptUsageError, parse_bytes

    try:
        mem = parse_bytes(args.mem_budget)
        mac = _mac_text(args.mac_budget)
    except AdaptUsageError as exc:
        raise UsageError(str(exc)) from None
    if args.sampler == "fixed" and min(args.way, args.shot, args.query_shots) < 1:
        raise UsageError("--way, --shot and --query-shots must be >= 1")
    if args.epochs < 0 or (args.lr is not None and args.lr <= 0) or args.batch < 1 or args.momentum < 0 or args.weight_decay < 0:
        raise UsageError("--epochs must be >= 0, --lr > 0, --batch >= 1, --momentum and --weight-decay >= 0")
    fixed = args.sampler == "fixed"
    return {"sampler": args.sampler,
            "way": args.way if fixed else None, "shot": args.shot if fixed else None,
            "query_shots": args.query_shots if fixed else None,
            "mem_budget_bytes": mem, "mac_budget": mac,
            "finetune": {"epochs": args.epochs, "lr": args.lr, "momentum": args.momentum,
                         "weight_decay": args.weight_decay, "scale": args.scale, "batch": args.batch,
                         "seed": args.train_seed}}


def settings_options(s: dict) -> list[str]:
    """The command-line options that reproduce ``settings``."""
    opts = ["--sampler", s["sampler"]]
    if s["sampler"] == "fixed":
        opts += ["--way", str(s["way"]), "--shot", str(s["shot"]), "--query-shots", str(s["query_shots"])]
    opts += ["--mem-budget", _bytes_text(s["mem_budget_bytes"]), "--mac-budget", s["mac_budget"]]
    f = s["finetune"]
    opts += ["--epochs", str(f["epochs"])] + (["--lr", f"{f['lr']:g}"] if f["lr"] is not None else [])
    opts += ["--momentum", f"{f['momentum']:g}",
             "--weight-decay", f"{f['weight_decay']:g}", "--scale", f"{f['scale']:g}", "--batch", str(f["batch"]),
             "--train-seed", str(f["seed"])]
    return opts


# ----------------------------------------------------------------------------------------------
# the worker side
# ----------------------------------------------------------------------------------------------

_NETS: dict = {}
_DATASETS: dict = {}


def _init_worker() -> None:
    """Runs first in each spawned worker, before anything imports NumPy or Numba."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _plain(obj):
    """JSON-ready: NumPy scalars and arrays to Python, NaN and infinities to None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def draw_episode(dataset, task: dict):
    from microtrain.episodes import sample_episode, sample_metadataset_episode

    s = task["settings"]
    if s["sampler"] == "metadataset":
        return sample_metadataset_episode(dataset, task["seed"])
    return sample_episode(dataset, s["way"], s["shot"], s["query_shots"], task["seed"])


def run_task(task: dict) -> dict:
    """Adapt one (backbone, domain, seed, method) and return its record (never raises an Exception:
    a failure becomes a record with an ``error``)."""
    start = time.perf_counter()
    record = {k: task[k] for k in ("backbone", "domain", "seed", "method")}
    try:
        from microtrain import model
        from microtrain.data import open_dataset
        from microtrain.episodes import EpisodeImages
        from microtrain.methods import Budgets
        from microtrain.pipeline import adapt_episode
        from microtrain.train import FinetuneConfig

        if task["weights"] not in _NETS:
            _NETS[task["weights"]] = model.load(task["weights"])
        net = _NETS[task["weights"]].copy()
        t0 = time.perf_counter()
        if task["source"] not in _DATASETS:
            _DATASETS[task["source"]] = open_dataset(task["source"])
        episode = draw_episode(_DATASETS[task["source"]], task)
        record.update(way=episode.way, support_size=len(episode.support), query_size=len(episode.query))
        images = EpisodeImages(episode, net.resolution)
        load_seconds = time.perf_counter() - t0
        s = task["settings"]
        result = adapt_episode(net, images.support, episode.support_labels, images.query, episode.query_labels,
                               task["method"], Budgets(task["budgets"]["memory"], task["budgets"]["macs"]),
                               FinetuneConfig(**s["finetune"]), load_seconds=load_seconds)
        result.pop("plan_table", None)  # the whole buffer table: large, and in adapt's report already
        record.update(result)
        record.update({k: task[k] for k in ("backbone", "domain", "seed", "method")})
        record["model"] = net.name
        record["episode"] = {"classes": list(episode.classes), "shots": episode.shots.tolist(),
                             "sampler": s["sampler"]}
    except Exception as exc:  # one task's failure is a result, not the end of the run
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-4)
    record["data"] = task["source"]
    record["settings"] = task["settings"]
    record["task_seconds"] = time.perf_counter() - start
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["worker"] = {"pid": os.getpid(), **{v: os.environ.get(v) for v in THREAD_VARS[:3]}}
    record["commit"] = task.get("commit")
    record = _plain(record)
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:  # keep the run going; say what could not be stored
        record = {k: record[k] for k in ("backbone", "domain", "seed", "method", "finished_at", "task_seconds")}
        record["error"] = f"record not JSON-ready: {exc}"
    return record


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

def episode_path(out: Path, backbone: str, domain: str, method: str, seed: int) -> Path:
    return out / "episodes" / backbone / domain / method / f"{seed}.json"


def _write_json(path: Path, obj) -> None:
    from microtrain.adapt import _write_atomic

    text = json.dumps(obj, indent=1, allow_nan=False)
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _check_config(out: Path, settings: dict, domains: dict, backbones: dict, argv: list[str]) -> None:
    """Refuse to mix settings in one folder; remember what each key means and each command run."""
    path = out / "config.json"
    config = {"settings": settings, "domains": {}, "backbones": {}, "runs": []}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable ({exc}); move it away or use another --out") from None
        old = config.get("settings") or {}
        if old != settings:
            diff = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in settings if old.get(k) != settings[k]]
            raise UsageError(f"{out} holds episodes run with other settings ({'; '.join(diff)}): use another --out")
    for kind, new in (("domains", domains), ("backbones", backbones)):
        known = config.setdefault(kind, {})
        for key, spec in new.items():
            if known.get(key, spec) != spec:
                raise UsageError(f"{kind[:-1]} name {key!r} means {known[key]} in {out}, not {spec}: "
                                 "rename the file or use another --out")
            known[key] = spec
    config.setdefault("runs", []).append({"argv": argv, "started_at": datetime.now(timezone.utc)
                                          .isoformat(timespec="seconds")})
    _write_json(path, config)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _task_line(done: int, total: int, rec: dict, elapsed: float, backbone: bool = False) -> str:
    width = len(str(total))
    head = (f"[{done:>{width}}/{total}] " + (f"{rec['backbone']:<15} " if backbone else "")
            + f"{rec['method']:<16} {rec['domain']:<14} seed {rec['seed']:<4}")
    if "error" in rec:
        body = f"FAILED ({rec['task_seconds']:.1f} s): {rec['error'].splitlines()[0][:120]}"
    else:
        body = (f"acc {100 * rec['accuracy_after']:5.1f}% (before {100 * rec['accuracy_before']:5.1f}%)  "
                f"{rec['task_seconds']:6.1f} s")
    eta = elapsed / done * (total - done)
    return f"{head} {body}  ETA {_duration(eta) if done < total else 'done'}"


def _stop_pool(pool) -> None:
    """End the worker processes this run started (their current tasks are lost, nothing is written)."""
    stop = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if stop is not None:
        stop()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def execute(tasks: list[dict], out: Path, workers: int) -> tuple[int, int]:
    """Run the tasks, writing each record as it finishes; returns (finished, failed)."""
    total, done, failed = len(tasks), 0, 0
    several = len({t["backbone"] for t in tasks}) > 1
    start = time.perf_counter()

    def finish(rec):
        nonlocal done, failed
        _write_json(episode_path(out, rec["backbone"], rec["domain"], rec["method"], rec["seed"]), rec)
        done += 1
        failed += "error" in rec
        print(_task_line(done, total, rec, time.perf_counter() - start, several), flush=True)

    if workers == 0:
        for task in tasks:
            finish(run_task(task))
        return done, failed
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(min(workers, total), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        futures = [pool.submit(run_task, task) for task in tasks]
        for future in as_completed(futures):
            finish(future.result())
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return done, failed


def cmd_run(args, argv: list[str]) -> int:
    from microtrain.adapt import parse_macs
    from microtrain.methods import METHODS

    methods = _split(args.methods, "methods")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    else:
        n = 10 if args.episodes is None else args.episodes
        if n < 1:
            raise UsageError("--episodes must be >= 1")
        seeds = list(range(n))
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    settings = settings_of(args)
    out = Path(args.out)

    domains = {}  # key -> (path, spec)
    for spec in _split(args.domains, "domains"):
        key, path, shown = resolve_domain(spec)
        if key in domains:
            raise UsageError(f"two domains are named {key!r}: {domains[key][1]} and {shown}")
        domains[key] = (path, shown)
    backbones = {}  # key -> (weights, spec, forward MACs)
    for spec in _split(args.backbones, "backbones"):
        key, weights, net = resolve_backbone(spec)
        if key in backbones:
            raise UsageError(f"two backbones are named {key!r}")
        backbones[key] = (weights, spec if spec in BACKBONES else weights, net.forward_macs)
    # every domain must give an episode with these settings: fail now, not in every task
    from microtrain.data import open_dataset

    for key, (path, _) in domains.items():
        draw_episode(open_dataset(path), {"settings": settings, "seed": seeds[0]})

    _check_config(out, settings, {k: v[1] for k, v in domains.items()}, {k: v[1] for k, v in backbones.items()},
                  [PROG, *argv])
    commit = _git_commit()
    tasks, skipped = [], 0
    budgets = {bkey: {"memory": settings["mem_budget_bytes"], "macs": parse_macs(settings["mac_budget"], fwd)}
               for bkey, (_, _, fwd) in backbones.items()}
    for seed in seeds:  # episode-major: an interrupted run leaves whole episodes for every cell
        for bkey, (weights, _, _) in backbones.items():
            for dkey, (path, _) in domains.items():
                for method in methods:
                    file = episode_path(out, bkey, dkey, method, seed)
                    if file.exists() and not (args.retry_errors and "error" in _read_record(file)):
                        skipped += 1
                        continue
                    tasks.append({"backbone": bkey, "domain": dkey, "seed": seed, "method": method,
                                  "weights": weights, "source": path, "settings": settings, "budgets": budgets[bkey],
                                  "commit": commit})
    print(f"{len(tasks) + skipped} tasks ({len(backbones)} backbone(s) x {len(domains)} domain(s) x "
          f"{len(seeds)} episode(s) x {len(methods)} method(s)): {skipped} already in {out}, {len(tasks)} to run"
          + (f" on {args.workers} worker process(es)" if args.workers else " in this process"), flush=True)
    failed = 0
    if tasks:
        start = time.perf_counter()
        finished, failed = execute(tasks, out, args.workers)
        print(f"finished {finished} task(s) in {_duration(time.perf_counter() - start)}"
              + (f"; {failed} failed (recorded with an error; --retry-errors reruns them)" if failed else ""),
              flush=True)
    if not args.no_report:
        write_report(out)
    return 0


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": "unreadable record"}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def load_records(out: Path) -> list[dict]:
    """Every episode record under OUT/episodes, in a stable order."""
    from microtrain.methods import METHODS

    records = []
    for path in sorted((out / "episodes").glob("*/*/*/*.json")):
        rec = _read_record(path)
        if rec.get("error") == "unreadable record":
            print(f"note: {path} is unreadable, left out", file=sys.stderr)
            continue
        records.append(rec)
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["backbone"], _domain_order(r["domain"]), order.get(r["method"], len(order)),
                                r["method"], r["seed"]))
    return records


def _domain_order(key: str):
    names = list(DOMAINS)
    return (names.index(key), "") if key in DOMAINS else (len(names), key)


def _label(domain: str) -> str:
    return DOMAINS[domain][1] if domain in DOMAINS else domain


def _in_average(domain: str) -> bool:
    return not (domain in DOMAINS and DOMAINS[domain][2])


def mean_ci(values) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% interval = 1.96 * sample std / sqrt(n), n); no interval for n < 2."""
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64)
    if len(v) == 0:
        return float("nan"), None, 0
    if len(v) < 2:
        return float(v.mean()), None, 1
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v))), len(v)


def _combine(cells) -> tuple[float, float | None]:
    """Mean of per-domain means; its interval from the domains' standard errors (independent)."""
    means = [c[0] for c in cells]
    if any(c[1] is None for c in cells):
        return sum(means) / len(means), None
    return sum(means) / len(means), math.sqrt(sum(c[1] ** 2 for c in cells)) / len(cells)


def _pm(mean: float, half: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{scale * mean:+.1f}" if signed else f"{scale * mean:.1f}"
    return text + (f" ± {scale * half:.1f}" if half is not None else " ± –")


def _mem(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1024 ** 2:.2f} MB" if n >= 1024 ** 2 else f"{n / 1024:.1f} KB"


def _macs(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _ratio(x, ref) -> str:
    return "–" if x is None or not ref else f"{x / ref:.2f}×"


def summarize(records: list[dict]) -> dict:
    """Per backbone: the numbers of Table 1, Table 2 and Figure 1."""
    import numpy as np

    out = {}
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        recs = [r for r in records if r["backbone"] == backbone]
        ok = [r for r in recs if "error" not in r]
        methods = list(dict.fromkeys(r["method"] for r in recs))
        domains = list(dict.fromkeys(r["domain"] for r in recs))
        acc = {}  # (method, domain) -> {seed: accuracy}
        for r in ok:
            acc.setdefault((r["method"], r["domain"]), {})[r["seed"]] = r["accuracy_after"]
        fails = {}
        for r in recs:
            if "error" in r:
                fails.setdefault((r["method"], r["domain"]), []).append(r)
        cells = {k: mean_ci(v.values()) for k, v in acc.items()}
        averaged = [d for d in domains if _in_average(d)]
        average = {}
        for m in methods:
            if averaged and all((m, d) in cells for d in averaged):
                average[m] = _combine([cells[(m, d)] for d in averaged])
        gain = {}
        if REFERENCE in methods and BASELINE in methods:
            for d in domains:
                a, b = acc.get((REFERENCE, d), {}), acc.get((BASELINE, d), {})
                paired = [a[s] - b[s] for s in sorted(set(a) & set(b))]
                if paired:
                    gain[d] = mean_ci(paired)
            if averaged and all(d in gain for d in averaged):
                gain["average"] = _combine([gain[d] for d in averaged])
        costs = {}
        for m in methods:
            rs = [r for r in ok if r["method"] == m]
            if not rs:
                continue
            mem = [r["memory"]["backward_planned_bytes"] for r in rs if r.get("memory")]
            arena = [r["memory"]["arena_planned_bytes"] for r in rs if r.get("memory")]
            costs[m] = {"episodes": len(rs),
                        "backward_bytes": float(np.mean(mem)) if mem else None,
                        "arena_bytes": float(np.mean(arena)) if arena else None,
                        "backward_macs": float(np.mean([r["backward_macs"] for r in rs])),
                        "forward_macs": rs[0]["forward_macs"],
                        "end_to_end": float(np.mean([r["time_seconds"]["end_to_end"] for r in rs])),
                        "selection": float(np.mean([r["time_seconds"]["selection"] for r in rs])),
                        "training": float(np.mean([r["time_seconds"]["training"] for r in rs])),
                        "selection_share": float(np.mean([r["selection_share"] for r in rs]))}
        # the same episode must score the same before training whatever the method
        before = {}
        for r in ok:
            before.setdefault((r["domain"], r["seed"]), set()).add(round(r["accuracy_before"], 9))
        mismatched = sorted(k for k, v in before.items() if len(v) > 1)
        out[backbone] = {"records": recs, "methods": methods, "domains": domains, "averaged": averaged,
                         "acc": acc, "cells": cells, "average": average, "gain": gain, "fails": fails,
                         "costs": costs, "before_mismatch": mismatched}
    return out


def _table1(s: dict) -> tuple[list[str], int | None]:
    methods, domains = s["methods"], s["domains"]
    ns = {c[2] for c in s["cells"].values()}
    uniform = len(ns) == 1
    has_gain = bool(s["gain"])
    head = ["domain", *methods] + ([f"{REFERENCE} − {BASELINE}"] if has_gain else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(m, d):
        c = s["cells"].get((m, d))
        text = _pm(*c[:2]) if c else "–"
        if c and not uniform:
            text += f" (n={c[2]})"
        failed = len(s["fails"].get((m, d), []))
        return text + (f" ({failed} failed)" if failed else "")

    for d in domains:
        row = [_label(d)] + [cell(m, d) for m in methods]
        if has_gain:
            g = s["gain"].get(d)
            row.append(_pm(*g[:2], signed=True) if g else "–")
        lines.append("| " + " | ".join(row) + " |")
    if s["averaged"]:
        row = [f"**average** ({len(s['averaged'])} domain{'s' if len(s['averaged']) > 1 else ''})"]
        row += [f"**{_pm(*s['average'][m])}**" if m in s["average"] else "–" for m in methods]
        if has_gain:
            g = s["gain"].get("average")
            row.append(f"**{_pm(*g, signed=True)}**" if g else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines, (ns.pop() if uniform else None)


def _table2(s: dict) -> list[str]:
    costs = s["costs"]
    ref = costs.get(REFERENCE, {})
    head = ["method", "episodes", "backward memory (planned)", f"÷ {REFERENCE}", "backward MACs", f"÷ {REFERENCE}",
            "arena (planned)", "end-to-end s", "selection s", "training s", "selection share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in s["methods"]:
        c = costs.get(m)
        if c is None:
            lines.append(f"| {m} | 0 | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        lines.append("| " + " | ".join([
            m, str(c["episodes"]), _mem(c["backward_bytes"]), _ratio(c["backward_bytes"], ref.get("backward_bytes")),
            _macs(c["backward_macs"]) if c["backward_macs"] else "0",
            _ratio(c["backward_macs"], ref.get("backward_macs")) if c["backward_macs"] else "–",
            _mem(c["arena_bytes"]), f"{c['end_to_end']:.2f}", f"{c['selection']:.2f}", f"{c['training']:.2f}",
            f"{100 * c['selection_share']:.1f}%"]) + " |")
    return lines


def _command(out: Path, s: dict, config: dict, settings: dict | None) -> str:
    seeds = sorted({r["seed"] for r in s["records"]})
    seed_opt = (["--episodes", str(len(seeds))] if seeds == list(range(len(seeds)))
                else ["--seeds", format_seeds(seeds)])
    backbone = s["records"][0]["backbone"]
    domain_specs = config.get("domains", {})
    argv = [*PROG.split(), "run", "--backbones", config.get("backbones", {}).get(backbone, backbone),
            "--methods", ",".join(s["methods"]),
            "--domains", ",".join(domain_specs.get(d, d) for d in s["domains"]), *seed_opt]
    if settings is not None:
        argv += settings_options(settings)
    argv += ["--out", str(out)]
    return " ".join(shlex.quote(a) for a in argv)


def _settings_lines(settings: dict | None, records: list[dict]) -> list[str]:
    if settings is None:
        return ["(no config.json: settings unknown)"]
    f = settings["finetune"]
    ep = (f"{settings['way']}-way {settings['shot']}-shot, {settings['query_shots']} queries per class"
          if settings["sampler"] == "fixed" else "Meta-Dataset sampler (5-50 ways, 1-100 shots per class, "
                                                  "<= 500 support images, up to 10 queries per class)")
    lines = [f"- episodes: {ep}; episode = f(domain, seed), the same for every method",
             f"- budgets (TinyTrain's selection): backward memory {_mem(settings['mem_budget_bytes'])}, "
             f"backward MACs {settings['mac_budget']}",
             f"- fine-tuning: {f['epochs']} pass{'' if f['epochs'] == 1 else 'es'} over the support set, "
             f"batch {f['batch']}, SGD lr {'each method’s default' if f['lr'] is None else format(f['lr'], 'g')}, momentum {f['momentum']:g}, weight decay {f['weight_decay']:g}, cosine scale {f['scale']:g}, "
             f"seed {f['seed']}"]
    overrides = {}
    for r in records:
        for k, v in (r.get("finetune") or {}).items():
            if k in f and v != f[k] and r["method"] != "none":
                overrides.setdefault(r["method"], set()).add(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}")
    for m, o in overrides.items():
        lines.append(f"- {m} sets {', '.join(sorted(o))} itself")
    return lines


def _label_offsets(points, close_macs: float = 0.2, close_acc: float = 1.5, step: float = 22.0) -> dict:
    """Vertical label offsets (points) for Figure 1: methods at nearly the same backward MACs
    (log ratio < ``close_macs``) and accuracy (< ``close_acc`` points apart) get their labels
    stacked ``step`` apart, best accuracy on top, instead of printed over each other."""
    offsets, cluster = {}, []
    for m, macs, acc in sorted(points, key=lambda p: (p[1], -p[2])) + [(None, None, None)]:
        if cluster and m is not None and abs(math.log(macs / cluster[0][1])) < close_macs \
                and abs(acc - cluster[-1][2]) < close_acc:
            cluster.append((m, macs, acc))
            continue
        ranked = sorted(cluster, key=lambda p: -p[2])
        for rank, (name, _, _) in enumerate(ranked):
            offsets[name] = ((len(ranked) - 1) / 2 - rank) * step if len(ranked) > 1 else 0.0
        cluster = [(m, macs, acc)]
    return offsets


def write_figure(out: Path, backbone: str, s: dict) -> str | None:
    """Figure 1: average accuracy against backward MACs; returns the file name, or None (with a note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: Figure 1 skipped (pip install matplotlib)")
        return None
    from microtrain.adapt import _write_atomic

    points = [(m, s["costs"][m], s["average"][m][0]) for m in s["methods"]
              if m in s["average"] and m in s["costs"] and s["costs"][m]["backward_macs"] > 0]
    if not points:
        print(f"note: {backbone}: no method has an average accuracy over all domains and backward MACs: "
              "Figure 1 skipped")
        return None
    mems = [c["backward_bytes"] or 1.0 for _, c, _ in points]
    lo, hi = math.log(min(mems)), math.log(max(mems))
    ref = s["costs"].get(REFERENCE, {}).get("backward_bytes")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 5))
    label_dy = _label_offsets([(m, c["backward_macs"], 100 * a) for m, c, a in points])
    ys = []
    for (m, c, a), mem in zip(points, mems):
        size = 80 + 900 * ((math.log(mem) - lo) / (hi - lo) if hi > lo else 0.5)
        color = "tab:red" if m == REFERENCE else "tab:blue"
        half = s["average"][m][1]
        if half is not None:
            ax.errorbar(c["backward_macs"], 100 * a, yerr=100 * half, color=color, alpha=0.4, capsize=3, zorder=2)
            ys += [100 * (a - half), 100 * (a + half)]
        ax.scatter(c["backward_macs"], 100 * a, s=size, alpha=0.5, color=color, edgecolors="black",
                   linewidths=0.6, zorder=3)
        ys.append(100 * a)
        label = f"{m}\n{_mem(c['backward_bytes'])}"
        if ref and m != REFERENCE:
            label += f" ({c['backward_bytes'] / ref:.2g}× mem)"
        dy = label_dy.get(m, 0.0)
        ax.annotate(label, (c["backward_macs"], 100 * a), textcoords="offset points",
                    xytext=(math.sqrt(size) / 2 + 4, dy), fontsize=8, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"} if dy else None)
    if BASELINE in s["average"]:
        y = 100 * s["average"][BASELINE][0]
        ys.append(y)
        ax.axhline(y, linestyle=":", color="gray", zorder=1)
        ax.annotate(f"{BASELINE} (no training) {y:.1f}%", (0.01, y), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    pad = max(1.0, 0.12 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xscale("log")
    xs = [c["backward_macs"] for _, c, _ in points]
    ax.set_xlim(min(xs) / 2.5, max(xs) * 5)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("backward MACs per training step (log scale)")
    ax.set_ylabel(f"average query accuracy (%) over {len(s['averaged'])} domain(s)")
    ax.set_title(f"{backbone}: accuracy vs backward compute\n(marker area grows with log backward memory; "
                 "bars: 95% interval)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    name = f"figure1_{backbone}.png"
    try:
        _write_atomic(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return name


def write_report(out: Path) -> dict:
    """results.json, report.md and the figures from OUT/episodes; returns the summary."""
    if not (out / "episodes").is_dir():
        raise UsageError(f"{out}: no episodes/ folder (run `{PROG} run --out {out}` first)")
    records = load_records(out)
    config = {}
    if (out / "config.json").exists():
        config = _read_record(out / "config.json")
    settings = config.get("settings")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    _write_json(out / "results.json", {"generated_at": now, "settings": settings, "records": records})
    summary = summarize(records)

    import numba
    import numpy as np

    lines = ["# microtrain evaluation: TinyTrain's Table 1, Table 2 and Figure 1", "",
             f"Generated {now} from {len(records)} episode records in `{out}` "
             f"({sum('error' in r for r in records)} failed).", "",
             f"Rebuild this report from the episode files: `{PROG} report --out {shlex.quote(str(out))}`", ""]
    finished = sorted(r["finished_at"] for r in records if r.get("finished_at"))
    commits = sorted({r.get("commit") or "unknown" for r in records})
    if finished:
        lines.append(f"Episodes run {finished[0]} – {finished[-1]}, microtrain commit {', '.join(commits)}; "
                     f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, NumPy {np.__version__}, "
                     f"Numba {numba.__version__}.")
        lines.append("")
    lines += ["## Settings", "", *_settings_lines(settings, records), ""]
    if not records:
        lines += ["No episodes yet.", ""]
    for backbone, s in summary.items():
        table1, n = _table1(s)
        seeds = sorted({r["seed"] for r in s["records"]})
        lines += [f"## {backbone}", "", "Regenerate (finished episodes are kept; a fresh `--out` recomputes all):", "",
                  "```", _command(out, s, config, settings), "```", "",
                  "### Table 1: query accuracy (%)", "",
                  "Mean ± 95% interval (1.96 × sample std / √n) over the episodes "
                  + (f"(n = {n} per cell, seeds {format_seeds(seeds)})" if n else "(n per cell as shown)")
                  + ". The average is the mean of the domain means"
                  + (", excluding the in-domain control" if len(s["averaged"]) < len(s["domains"]) else "")
                  + f"; its interval combines the domains' intervals. `{REFERENCE} − {BASELINE}`: paired difference "
                    "on the same episodes, in points.", "", *table1, ""]
        if s["before_mismatch"]:
            lines += [f"Warning: accuracy before training differs between methods on {len(s['before_mismatch'])} "
                      f"episode(s), e.g. {s['before_mismatch'][0]}: the episodes are not the same.", ""]
        lines += ["### Table 2: backward pass costs", "",
                  "Means over every successful episode of all domains. Backward memory is the planner's "
                  "figure: weights being updated + their gradients and optimizer state + activations kept "
                  "for backward (batch as set; KB = 1024 bytes); the arena adds the transient buffers. "
                  "Backward MACs are per training step; forward: "
                  f"{_macs(next(iter(s['costs'].values()))['forward_macs']) if s['costs'] else '–'}. "
                  "End-to-end = load + selection + training; selection share = selection / end-to-end.", "",
                  *_table2(s), ""]
        figure = write_figure(out, backbone, s)
        if figure:
            lines += ["### Figure 1", "", f"![accuracy vs backward MACs]({figure})", ""]
        if s["fails"]:
            lines += ["### Failed episodes", "", "| method | domain | seed | error |", "|---|---|---|---|"]
            for (m, d), rs in s["fails"].items():
                for r in rs:
                    err = r["error"].splitlines()[0].replace("|", "\\|")[:200]
                    lines.append(f"| {m} | {_label(d)} | {r['seed']} | {err} |")
            lines.append("")
    from microtrain.adapt import _write_atomic

    text = "\n".join(lines)
    _write_atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({len(records)} episode records)", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        from microtrain.checkpoint import CheckpointError
        from microtrain.data import DataError
        from microtrain.paths import MissingSharedError

        try:
            if args.command == "report":
                write_report(Path(args.out))
                return 0
            return cmd_run(args, argv)
        except (DataError, CheckpointError, MissingSharedError) as exc:
            raise UsageError(str(exc)) from None
    except UsageError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished episodes are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
