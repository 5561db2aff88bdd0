"""The evaluation grid as a library: settings, the task list, one adaptation per task, resuming.

A grid is every (backbone, domain, episode seed, method). One **task** is one adaptation with
``microtrain.pipeline.adapt_episode`` (the function behind ``python -m microtrain.adapt``) and
gives one **record** (a JSON-ready dict); an episode depends only on (domain, seed), so every
method sees the same episodes. The client writes each record to
``OUT/episodes/<backbone>/<domain>/<method>/<seed>.json`` (temporary file, then rename) as soon as
it arrives, so a rerun skips finished tasks, Ctrl-C keeps them, and a task that fails is a
record with an ``error`` field, not the end of the run. ``OUT/config.json`` holds the settings;
a rerun with other settings into the same folder is refused.

Tasks run in a local pool of spawned processes (``run_pool``; no dependency beyond the device's)
or on a Dask cluster (``microtrain.cluster.run_on_cluster``, optional; this module never imports
it). Both call ``run_task``, which first checks that the data and weight files it opens have the
SHA-256 the client computed, so a worker refuses to compute on other data. The command line is
``python -m microtrain.evaluate``; the tables and figures are ``microtrain.evaluation_report``.

Nothing here imports NumPy at module level: a spawned worker imports this module, and its
thread settings must be in place before NumPy (OpenBLAS) and Numba load.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from .paths import REPO_ROOT, shared_file, write_atomic

PROG = "python -m microtrain.evaluate"
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
# the shared backbones, then their meta-trained versions (checkpoint.BACKBONES, not imported here:
# it loads NumPy, see the module docstring; tests/test_evaluate.py checks that the two agree)
BACKBONES = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-meta", "mbv2-w0.35-meta",
             "proxyless-w0.3-meta")
PAPER_METHODS = ("none", "lastlayer", "fulltrain", "sparseupdate", "tinytl", "tinytrain")  # Table 1's rows
IDENTITY = ("backbone", "domain", "seed", "method")  # what names a task and its record
# Record fields that depend on where and when a task ran, not on what it computed: a record from a
# Dask worker equals the local pool's for the same task once these are left out (``comparable``).
# memory.outside_arena_step_bytes is tracemalloc's count during a step: it includes first-use
# caches of the process and, on a Dask worker, allocations of Dask's own threads.
VOLATILE = ("time_seconds", "selection_share", "task_seconds", "finished_at", "worker",
            "memory.outside_arena_step_bytes")


class GridError(ValueError):
    """Bad grid input (unknown method, missing file, settings that differ from OUT's): one line."""


class InputMismatch(RuntimeError):
    """A worker's copy of a task's data or weight file is missing or differs from the client's."""


# ----------------------------------------------------------------------------------------------
# settings: everything that makes two runs' episodes comparable, in one place (options, the
# stored dict, the options that reproduce it, its description in the report)
# ----------------------------------------------------------------------------------------------

PAPER_LR = "fulltrain=1e-3,tinytl=3e-2"

# The presets of ``run --protocol``: the defaults of the options that differ between the quick
# protocol (development) and the paper's (Section 3.1-3.2, Appendix B). An option given on the
# command line wins; the settings record the protocol and every value as resolved.
PROTOCOLS = {
    "quick": {"sampler": "fixed", "batch": "1", "mac_budget": "15%", "backbones": "mcunet-5fps", "methods": "all",
              "lr": None},
    # lr: FullTrain and TinyTL at batch 100 at the rates chosen on validation episodes (seed 1000, the
    # five domains, mcunet-5fps-meta: reports/2026-11-30-paper-protocol/README.md); the batch-1
    # defaults (methods.DEFAULT_LR: 1e-4 for both) barely move them at batch 100
    "paper": {"sampler": "metadataset", "batch": "1,fulltrain=100,tinytl=100", "mac_budget": "15%", "lr": PAPER_LR,
              "backbones": ",".join(b for b in BACKBONES if b.endswith("-meta")), "methods": ",".join(PAPER_METHODS)},
}
PROTOCOL_TEXT = {
    "quick": "development: 10-way 5-shot episodes, every method at batch 1, the ImageNet MCUNet-5fps",
    "paper": "the paper's (Section 3.1-3.2, Appendix B): Meta-Dataset episodes, the meta-trained backbones, "
             "FullTrain and TinyTL at batch 100 (\"their accuracy degrades catastrophically with smaller batch "
             f"sizes\") at learning rates chosen on validation episodes ({PAPER_LR}), the others at batch 1, "
             "TinyTrain's MACs within 15% of FullTrain's backward MACs (Table 2: "
             "6.51M of 44.9M on MCUNet)",
}


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """The protocol, episode, budget and fine-tuning options of ``run`` (read back by
    ``settings_of``). Options a preset sets default to None until ``apply_protocol``."""
    from .adapt import finite_float, seed  # lazy: loads NumPy (module docstring)
    from .train import FinetuneConfig  # lazy: as above

    d = FinetuneConfig()
    q, p = PROTOCOLS["quick"], PROTOCOLS["paper"]
    g = parser.add_argument_group("protocol")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="quick",
                   help=(f"a preset of the options below and of --methods and --backbones: quick "
                         f"({PROTOCOL_TEXT['quick']}) or paper ({PROTOCOL_TEXT['paper']}); an option given "
                         "explicitly wins. Default: quick").replace("%", "%%"))
    g = parser.add_argument_group("episodes")
    g.add_argument("--sampler", choices=("fixed", "metadataset"),
                   help="fixed way/shot, or the Meta-Dataset sampler of the paper's Appendix B (5-50 ways, 1-100 "
                        f"shots per class, <= 500 support images). Default: quick {q['sampler']}, paper {p['sampler']}")
    g.add_argument("--way", type=int, default=10, help="fixed sampler: classes per episode (default %(default)s)")
    g.add_argument("--shot", type=int, default=5, help="fixed sampler: support images per class (default %(default)s)")
    g.add_argument("--query-shots", type=int, default=10,
                   help="fixed sampler: query images per class (default %(default)s)")
    g = parser.add_argument_group("budgets (TinyTrain's selection)")
    g.add_argument("--mem-budget", default="512KB",
                   help="backward memory budget, e.g. 512KB, 0.5MB, 524288 (KB = 1024 bytes; default %(default)s)")
    g.add_argument("--mac-budget",
                   help=("backward MAC budget per image: 15% (the same as 15%bwd) is 15% of FullTrain's backward "
                         "MACs, the paper's reference (Table 2: TinyTrain's 6.51M of FullTrain's 44.9M on MCUNet); "
                         f"15%fwd is 15% of the forward MACs; 6.5M a count. Default: {q['mac_budget']} in both "
                         "protocols").replace("%", "%%"))
    g = parser.add_argument_group("fine-tuning (defaults: microtrain.train.FinetuneConfig)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the support set (default %(default)s)")
    g.add_argument("--lr", type=_per_method_option("--lr", _positive(float)),
                   help="SGD learning rate, > 0: one for every method, per method (fulltrain=1e-3), or both "
                        "(3e-3,fulltrain=1e-3). Default: quick protocol each method's own (methods.DEFAULT_LR, "
                        f"chosen at batch 1), paper protocol {PAPER_LR} for the batch-100 methods and each "
                        "other method's own")
    g.add_argument("--momentum", type=finite_float(0, strict=False, high=1), default=d.momentum,
                   help="SGD momentum, in [0, 1) (default %(default)s; SparseUpdate always uses plain SGD)")
    g.add_argument("--weight-decay", type=finite_float(0, strict=False), default=d.weight_decay,
                   help="default %(default)s")
    g.add_argument("--scale", type=finite_float(0), default=d.scale, help="cosine logit scale (default %(default)s)")
    g.add_argument("--batch", type=_per_method_option("--batch", _positive(int)),
                   help="pseudo-queries per step: one for every method, or with per-method values "
                        "(1,fulltrain=100); a batch larger than an episode's support set is the whole set. "
                        f"Default: quick {q['batch']}, paper {p['batch']}")
    g.add_argument("--train-seed", type=seed, default=d.seed,
                   help="augmentation/order seed of fine-tuning (default %(default)s)")


def apply_protocol(args) -> None:
    """Set every option ``args`` leaves None to its ``--protocol`` preset's value ('all' methods:
    every method of ``methods.METHODS``)."""
    for dest, value in PROTOCOLS[args.protocol].items():
        if getattr(args, dest, "given") is None:
            if dest == "methods" and value == "all":
                from .methods import METHODS  # lazy: loads NumPy (module docstring)

                value = ",".join(METHODS)
            setattr(args, dest, value)


def _mac_text(text: str) -> str:
    """A MAC budget in its stored form: '15%bwd', '15%fwd' or a count ('6500000')."""
    from .adapt import read_mac_budget  # lazy: loads NumPy (module docstring)

    value, share_of = read_mac_budget(text)
    return f"{value:g}%{share_of}" if share_of else str(int(value))


def _lr_text(text: str | None) -> str | None:
    """A --lr value in its stored form ('fulltrain=0.001,tinytl=0.01'), None for none."""
    return format_per_method(*parse_per_method(text, "--lr", float)) if text else None


def describe_mac_budget(text: str) -> str:
    """'15% of FullTrain's backward MACs per image' for a stored MAC budget."""
    value, _, share_of = text.partition("%")
    if not share_of:
        return f"{int(value) / 1e6:g}M per image"
    return f"{value}% of " + ("FullTrain's backward MACs" if share_of == "bwd" else "the forward MACs") + " per image"


def parse_per_method(text: str, option: str, cast) -> tuple[object, dict]:
    """'3e-3,fulltrain=1e-3' -> (3e-3, {'fulltrain': 1e-3}): a value for every method (None when
    not given) and per-method ones, each read by ``cast`` (which raises ValueError). Raises
    GridError on an unknown method or a value ``cast`` refuses."""
    from .methods import METHODS  # lazy: loads NumPy (module docstring)

    default, per = None, {}
    for item in split_list(text, option.lstrip("-")):
        name, eq, value = item.rpartition("=")
        name = name.strip()
        if eq and name.partition(":")[0] not in METHODS:
            raise GridError(f"{option} {text}: unknown method {name!r} (choose from {', '.join(METHODS)})")
        if (name in per) if eq else (default is not None):
            raise GridError(f"{option} {text}: {'the value for ' + name if eq else 'the value for every method'} "
                            "is given twice")
        try:
            parsed = cast(value.strip())
        except ValueError as exc:
            raise GridError(f"{option} {text}: {exc}") from None
        if eq:
            per[name] = parsed
        else:
            default = parsed
    return default, per


def format_per_method(default, per: dict) -> str:
    """The inverse of parse_per_method."""
    return ",".join(([] if default is None else [f"{default:g}"]) + [f"{m}={v:g}" for m, v in per.items()])


def _positive(kind):
    """A cast for ``parse_per_method``: ``kind(text)`` when it is finite and > 0, else a
    ValueError saying why."""
    what = "an integer" if kind is int else "a number"

    def cast(text):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as {what}") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{text!r} is not {'a finite number' if kind is float else what} > 0")
        return value
    return cast


def _per_method_option(option: str, cast):
    """An argparse type for a per-method option (``--lr``, ``--batch``): the text checked by
    ``parse_per_method`` while the options are parsed (``--lr nan``: one line, exit status 2),
    kept as text for ``settings_of``."""
    def check(text: str) -> str:
        try:
            parse_per_method(text, option, cast)
        except GridError as exc:
            # one value: its reason alone; a list: which list, then the reason
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option} " + ("" if "," in text else f"{text}: ")))\
                from None
        return text
    return check


def _bytes_text(n: int) -> str:
    return f"{n // 1024 ** 2}MB" if n % 1024 ** 2 == 0 and n else f"{n // 1024}KB" if n % 1024 == 0 and n else str(n)


def format_bytes(n) -> str:
    """'277.1 KB', '8.06 MB' (KB = 1024 bytes); '–' for None."""
    if n is None:
        return "–"
    return f"{n / 1024 ** 2:.2f} MB" if n >= 1024 ** 2 else f"{n / 1024:.1f} KB"


def settings_of(args) -> dict:
    """The settings dict of parsed options, the ``--protocol`` preset filling those not given
    (stored in OUT/config.json and in every task). Raises GridError on values no episode or
    fine-tuning can use."""
    from .adapt import UsageError as AdaptUsageError, parse_bytes  # lazy: loads NumPy (module docstring)
    from .train import FinetuneConfig  # lazy: as above

    apply_protocol(args)
    try:
        mem = parse_bytes(args.mem_budget)
        mac = _mac_text(args.mac_budget)
    except AdaptUsageError as exc:
        raise GridError(str(exc)) from None
    if args.sampler == "fixed" and min(args.way, args.shot, args.query_shots) < 1:
        raise GridError("--way, --shot and --query-shots must be >= 1")
    batch, batches = parse_per_method(args.batch, "--batch", _positive(int))
    lr, lrs = parse_per_method(args.lr, "--lr", _positive(float)) if args.lr is not None else (None, {})
    if args.epochs < 0:
        raise GridError(f"--epochs must be >= 0, got {args.epochs}")
    per_method = {}
    for key, values in (("batch", batches), ("lr", lrs)):
        for m, v in values.items():
            per_method.setdefault(m, {})[key] = v
    fixed = args.sampler == "fixed"
    return {"protocol": args.protocol, "sampler": args.sampler,
            "way": args.way if fixed else None, "shot": args.shot if fixed else None,
            "query_shots": args.query_shots if fixed else None,
            "mem_budget_bytes": mem, "mac_budget": mac,
            "finetune": {"epochs": args.epochs, "lr": lr, "momentum": args.momentum,
                         "weight_decay": args.weight_decay, "scale": args.scale,
                         "batch": FinetuneConfig().batch if batch is None else batch, "seed": args.train_seed},
            "per_method": {m: per_method[m] for m in sorted(per_method)}}


def stored_settings(settings: dict | None) -> dict | None:
    """Settings read from a config.json in today's form. Folders written before the presets
    (2026-12) have no protocol and no per-method settings, and their MAC share ('15%') was of the
    forward MACs: '15%fwd' now."""
    if settings is None:
        return None
    s = {"protocol": None, "per_method": {}, **settings}
    if re.fullmatch(r"[0-9]*\.?[0-9]+%", str(s.get("mac_budget"))):
        s["mac_budget"] += "fwd"
    return s


def folder_settings(out: Path) -> dict | None:
    """The settings an evaluation folder's records were made with (``OUT/config.json``, in today's
    form: ``stored_settings``); None when it has no config.json."""
    config = out / "config.json"
    return stored_settings(read_record(config).get("settings")) if config.exists() else None


def method_finetune(settings: dict, method: str) -> dict:
    """The fine-tuning settings ``method``'s tasks get (FinetuneConfig's fields): the common ones
    with the method's own (``per_method``) in their place."""
    return {**settings["finetune"], **settings["per_method"].get(method, {})}


def settings_options(s: dict) -> list[str]:
    """The command-line options that reproduce ``settings`` (every preset value spelled out)."""
    opts = (["--protocol", s["protocol"]] if s.get("protocol") else []) + ["--sampler", s["sampler"]]
    if s["sampler"] == "fixed":
        opts += ["--way", str(s["way"]), "--shot", str(s["shot"]), "--query-shots", str(s["query_shots"])]
    opts += ["--mem-budget", _bytes_text(s["mem_budget_bytes"]), "--mac-budget", s["mac_budget"]]
    f, per = s["finetune"], s.get("per_method", {})
    lrs = {m: v["lr"] for m, v in per.items() if "lr" in v}
    opts += ["--epochs", str(f["epochs"])] + (["--lr", format_per_method(f["lr"], lrs)] if f["lr"] or lrs else [])
    opts += ["--momentum", f"{f['momentum']:g}", "--weight-decay", f"{f['weight_decay']:g}",
             "--scale", f"{f['scale']:g}", "--batch", format_per_method(f["batch"], {m: v["batch"] for m, v in per.items() if "batch" in v}),
             "--train-seed", str(f["seed"])]
    return opts


def _span(values) -> str:
    values = sorted(set(values))
    return "–" if not values else f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}–{values[-1]:g}"


def describe_settings(settings: dict | None, records: list[dict], backbones: dict | None = None) -> list[str]:
    """The report's settings lines (markdown): the protocol and what differs from its preset,
    episodes, budgets (resolved per backbone from the records), fine-tuning, and a table of each
    method's fine-tuning settings as its records ran them. ``backbones``: config.json's key -> spec."""
    if settings is None:
        return ["(no config.json: settings unknown)"]
    f, per = settings["finetune"], settings["per_method"]
    lines = []
    name = settings["protocol"]
    if name is None:
        lines.append("- protocol: not recorded (a folder written before the presets); the settings below are "
                     "what it ran")
    else:
        preset = PROTOCOLS[name]
        batches = {m: v["batch"] for m, v in per.items() if "batch" in v}
        lrs = {m: v["lr"] for m, v in per.items() if "lr" in v}
        given = {"sampler": settings["sampler"], "batch": format_per_method(f["batch"], batches),
                 "mac_budget": settings["mac_budget"], "lr": format_per_method(f["lr"], lrs) or None}
        changed = [f"--{k.replace('_', '-')} {v or 'each method’s default'}" for k, v in given.items()
                   if v != (_mac_text(preset[k]) if k == "mac_budget" else _lr_text(preset[k]) if k == "lr"
                            else preset[k])]
        ran = sorted({r["backbone"] for r in records})
        others = [b for b in ran if (backbones or {}).get(b, b) not in preset["backbones"].split(",")]
        if others:
            changed.append("backbones " + ", ".join(others))
        lines.append(f"- protocol: **{name}**, {PROTOCOL_TEXT[name]}"
                     + (f"; changed from the preset: {'; '.join(changed)}" if changed else ""))
    ep = (f"{settings['way']}-way {settings['shot']}-shot, {settings['query_shots']} queries per class"
          if settings["sampler"] == "fixed" else "Meta-Dataset sampler (5-50 ways, 1-100 shots per class, "
                                                  "<= 500 support images, up to 10 queries per class)")
    lines.append(f"- episodes: {ep}; episode = f(domain, seed), the same for every method")
    budget = {}
    for r in records:
        if (r.get("budgets") or {}).get("macs") is not None:
            budget.setdefault(r["backbone"], r["budgets"]["macs"])
    lines.append(f"- budgets (TinyTrain's selection): backward memory {format_bytes(settings['mem_budget_bytes'])}, "
                 f"backward MACs {describe_mac_budget(settings['mac_budget'])}"
                 + (" (" + ", ".join(f"{b}: {m / 1e6:.2f}M" for b, m in budget.items()) + ")" if budget else ""))
    lr = "each method’s default" if f["lr"] is None else format(f["lr"], "g")
    own = "; ".join(f"{m}: " + ", ".join(f"{k} {v:g}" for k, v in vs.items()) for m, vs in per.items())
    lines.append(f"- fine-tuning: {f['epochs']} pass{'' if f['epochs'] == 1 else 'es'} over the support set, "
                 f"batch {f['batch']}, SGD lr {lr}, momentum {f['momentum']:g}, weight decay {f['weight_decay']:g}, "
                 f"cosine scale {f['scale']:g}, seed {f['seed']}" + (f"; per method: {own}" if own else ""))
    ran = {}
    for r in records:
        if r.get("finetune") and r.get("losses") and "error" not in r:  # methods that trained
            ran.setdefault(r["method"], []).append(r["finetune"])
    if ran:
        lines += ["", "Fine-tuning as each method's records ran it (batch: at most the episode's support set; "
                      "backward memory in Table 2 is at this batch):", "",
                  "| method | batch | lr | momentum |", "|---|---|---|---|"]
        for m, fts in ran.items():
            lines.append(f"| {m} | " + " | ".join(_span(ft[k] for ft in fts) for k in ("batch", "lr", "momentum"))
                         + " |")
    return lines


# ----------------------------------------------------------------------------------------------
# what to evaluate: names, files and their identities
# ----------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """'0-9' -> 0..9; '0-4,10' -> 0,1,2,3,4,10 (sorted, without repeats). Raises GridError."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise GridError(f"cannot read {text!r} as seeds (e.g. 0-9, or 0-4,10)")
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


def split_list(text: str, what: str) -> list[str]:
    """A comma list of names, refusing an empty list and repeats."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise GridError(f"--{what} is empty")
    if len(set(items)) != len(items):
        raise GridError(f"--{what} names something twice: {text}")
    return items


def _key(text: str) -> str:
    """A name safe as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def resolve_domain(spec: str) -> tuple[str, str, str]:
    """(key, path to open, how to write it in a command) of a --domains entry."""
    if spec in DOMAINS:
        return spec, str(shared_file("data", DOMAINS[spec][0])), spec
    path = Path(spec)
    if not path.exists():
        raise GridError(f"unknown domain {spec!r}: use one of {', '.join(DOMAINS)} or a path to a dataset "
                        "(folder, .zip or .npz)")
    stem = path.name[: -len(path.suffix)] if path.suffix.lower() in (".zip", ".npz") else path.name
    return _key(stem), str(path.resolve()), str(path.resolve())


def backbone_key(spec: str) -> str:
    """The name records give a --backbones entry: a backbone name as it is, a weight file by its
    stem. Raises GridError for a name that is neither."""
    path = Path(spec)
    if path.suffix == ".npz":
        return _key(path.stem)
    if spec not in BACKBONES:
        raise GridError(f"unknown backbone {spec!r}: use one of {', '.join(BACKBONES)} or a .npz weight file")
    return spec


def resolve_backbone(spec: str):
    """(key, weight file path, network) of a --backbones entry: a weight file, or a backbone name
    (checkpoint.backbone_file: a shared one is converted on first use, a meta-trained one ships
    in weights/)."""
    # lazy: loads NumPy (module docstring)
    from .adapt import UsageError as AdaptUsageError, resolve_model
    from .checkpoint import backbone_file

    key = backbone_key(spec)
    if Path(spec).suffix == ".npz":
        try:
            net = resolve_model(spec)
        except AdaptUsageError as exc:
            raise GridError(str(exc)) from None
        return key, str(Path(spec).resolve()), net
    weights = backbone_file(spec)
    return key, str(weights), resolve_model(str(weights))


_HASHES: dict = {}  # (path, size, mtime_ns) -> SHA-256, per process: each file is read once


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes; a directory (a class-per-folder dataset) hashes every file's
    relative path and bytes in sorted order. Raises OSError when it cannot be read."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = (str(path), tuple(stats))
    if key not in _HASHES:
        h = hashlib.sha256()
        for p in files:
            if path.is_dir():
                h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def check_identity(what: str, path: str, sha256: str) -> None:
    """Raise InputMismatch unless ``path`` on this machine holds the bytes the client hashed."""
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise InputMismatch(f"{what} file {path} cannot be read on {socket.gethostname()} "
                            f"({exc.strerror or exc}): every worker needs the client's files at the same paths") from None
    if actual != sha256:
        raise InputMismatch(f"{what} file {path} on {socket.gethostname()} has SHA-256 {actual[:16]}..., the "
                            f"client's has {sha256[:16]}...: refusing to compute on other data")


CODE_PATHS = ("microtrain", "weights")  # what a task runs: the commit is "+dirty" if these differ from it


def _git_commit(root: Path = REPO_ROOT) -> str | None:
    """The checkout's commit (12 hex digits), "+dirty" when a tracked file of CODE_PATHS differs
    from it; None outside a git checkout. A run's own records and config.json (tracked when its
    folder is under reports/) do not make it dirty."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def episode_path(out: Path, backbone: str, domain: str, method: str, seed: int) -> Path:
    """Where a grid folder keeps one episode's record (a JSON file, written atomically)."""
    return out / "episodes" / backbone / domain / method / f"{seed}.json"


def read_record(path: Path) -> dict:
    """An episode record, or ``{"error": "unreadable record"}`` when the file cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": "unreadable record"}


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written to a temporary file then renamed (never a partial file)."""
    text = json.dumps(obj, indent=1, allow_nan=False)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def check_config(out: Path, settings: dict, domains: dict, backbones: dict, argv: list[str],
                 methods: dict | None = None) -> None:
    """Refuse to mix settings in one folder; remember what each key means, each method's fine-tuning
    settings (``methods``: name -> {'batch', 'lr'} as its tasks will run, lr from methods.DEFAULT_LR
    when the settings leave it to the method) and each command run. The protocol's name alone
    does not count: the settings spell out every value it set."""
    path = out / "config.json"
    config = {"settings": settings, "domains": {}, "backbones": {}, "methods": {}, "runs": []}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GridError(f"{path}: unreadable ({exc}); move it away or use another --out") from None
        old = stored_settings(config.get("settings")) or {}
        diff = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in settings
                if k != "protocol" and old.get(k) != settings[k]]
        if diff:
            raise GridError(f"{out} holds episodes run with other settings ({'; '.join(diff)}): use another --out")
        config["settings"] = {**settings, "protocol": old.get("protocol") or settings["protocol"]}
    for kind, new in (("domains", domains), ("backbones", backbones), ("methods", methods or {})):
        known = config.setdefault(kind, {})
        for key, spec in new.items():
            if known.get(key, spec) != spec:
                if kind == "methods":
                    raise GridError(f"{key} ran with fine-tuning settings {known[key]} in {out}, would run with "
                                    f"{spec} now: use another --out")
                raise GridError(f"{kind[:-1]} name {key!r} means {known[key]} in {out}, not {spec}: "
                                "rename the file or use another --out")
            known[key] = spec
    config.setdefault("runs", []).append({"argv": argv, "started_at": datetime.now(timezone.utc)
                                          .isoformat(timespec="seconds")})
    write_json(path, config)


def plan_grid(out: Path, methods: list[str], domains: list[str], backbones: list[str], seeds: list[int],
              settings: dict, retry_errors: bool = False, argv: list[str] = ()) -> tuple[list[dict], int]:
    """The tasks of a grid not finished in ``out`` yet, and how many are (skipped).

    Resolves the names (GridError for unknown ones), draws one episode per domain to fail now
    rather than in every task, checks ``out``'s settings (``check_config``) and hashes every
    data and weight file once. Tasks are episode-major: an interrupted run leaves whole episodes.
    """
    # lazy: loads NumPy (module docstring)
    from .adapt import UsageError as AdaptUsageError, parse_macs
    from .data import open_dataset
    from .methods import METHODS, default_lr

    for m in methods:
        if m not in METHODS:
            raise GridError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    finetune = {m: method_finetune(settings, m) for m in methods}
    dom = {}  # key -> (path, spec)
    for spec in domains:
        key, path, shown = resolve_domain(spec)
        if key in dom:
            raise GridError(f"two domains are named {key!r}: {dom[key][1]} and {shown}")
        dom[key] = (path, shown)
    nets = {}  # key -> (weights, spec, MAC budget)
    for spec in backbones:
        key, weights, net = resolve_backbone(spec)
        if key in nets:
            raise GridError(f"two backbones are named {key!r}")
        try:
            nets[key] = (weights, spec if spec in BACKBONES else weights, parse_macs(settings["mac_budget"], net))
        except AdaptUsageError as exc:
            raise GridError(str(exc)) from None
    for path, _ in dom.values():
        draw_episode(open_dataset(path), settings, seeds[0])
    check_config(out, settings, {k: v[1] for k, v in dom.items()}, {k: v[1] for k, v in nets.items()},
                 list(argv), {m: {"batch": f["batch"], "lr": default_lr(m) if f["lr"] is None else f["lr"]}
                              for m, f in finetune.items()})
    sha = {p: file_sha256(p) for p in [v[0] for v in dom.values()] + [v[0] for v in nets.values()]}
    commit = _git_commit()
    tasks, skipped = [], 0
    for seed in seeds:
        for bkey, (weights, _, macs) in nets.items():
            budgets = {"memory": settings["mem_budget_bytes"], "macs": macs}
            for dkey, (path, _) in dom.items():
                for method in methods:
                    file = episode_path(out, bkey, dkey, method, seed)
                    if file.exists() and not (retry_errors and "error" in read_record(file)):
                        skipped += 1
                        continue
                    tasks.append({"backbone": bkey, "domain": dkey, "seed": seed, "method": method,
                                  "weights": weights, "weights_sha256": sha[weights],
                                  "data": path, "data_sha256": sha[path],
                                  "settings": settings, "finetune": finetune[method], "budgets": budgets,
                                  "commit": commit})
    return tasks, skipped


# ----------------------------------------------------------------------------------------------
# one task (runs on a worker: a pool process or a Dask worker)
# ----------------------------------------------------------------------------------------------

_NETS: dict = {}      # weights SHA-256 -> Network, per worker process
_DATASETS: dict = {}  # data SHA-256 -> Dataset


class Terminated(Exception):
    """The run received SIGTERM (``kill``, a scheduler's time limit): raised in the main thread so
    the pool's workers are ended before the process exits, as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """End this worker once its parent is gone (killed with SIGKILL, which no handler sees): an
    orphaned worker would otherwise go on computing a task nobody will record."""
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)


def init_worker() -> None:
    """Runs first in each spawned pool process, before anything imports NumPy or Numba."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _plain(obj):
    """JSON-ready: NumPy scalars and arrays to Python, NaN and infinities to None."""
    from .pipeline import json_ready  # lazy: loads NumPy (module docstring)

    return json_ready(obj)


def draw_episode(dataset, settings: dict, seed: int):
    """The episode of ``seed`` under ``settings``' sampler (a function of (dataset, seed) only)."""
    from .episodes import sample_episode, sample_metadataset_episode  # lazy: loads NumPy (module docstring)

    if settings["sampler"] == "metadataset":
        return sample_metadataset_episode(dataset, seed)
    return sample_episode(dataset, settings["way"], settings["shot"], settings["query_shots"], seed)


def openblas(symbols: tuple[str, ...], restype=None):
    """(what the first of ``symbols`` exported by the OpenBLAS that NumPy loaded returns, that
    library's file name), or (None, None) when none is found (another BLAS, or not Linux: the
    library is found through /proc/self/maps). ``restype``: a ctypes type (default int)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None, None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        for sym in symbols:
            fn = getattr(lib, sym, None)
            if fn is not None:
                if restype is not None:
                    fn.restype = restype
                return fn(), os.path.basename(path)
    return None, None


def blas_kernels() -> str | None:
    """The kernels OpenBLAS chose for this CPU (e.g. 'Haswell', 'SkylakeX', 'Zen'; OPENBLAS_CORETYPE
    overrides), or None with another BLAS. NumPy's matmul (the pointwise kernels) runs on them, and
    they round differently: the default run's query accuracy is 78% with 'SkylakeX', 77% with
    'Haswell' on one machine."""
    core, _ = openblas(("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                        "openblas_get_corename"), ctypes.c_char_p)
    return core.decode() if core else None


def _worker_info() -> dict:
    """Where a task ran: host, process, thread settings, the CPU (LLVM's name, e.g. 'znver5') and
    ``blas_kernels()``: records from other CPUs can differ by rounding."""
    from llvmlite.binding import get_host_cpu_name  # a dependency of Numba, loaded with the kernels

    return {"host": socket.gethostname(), "pid": os.getpid(), "cpu": get_host_cpu_name(), "blas": blas_kernels(),
            **{v: os.environ.get(v) for v in THREAD_VARS[:3]}}


def finish_record(record: dict, task: dict, start: float | None) -> dict:
    """Add what every record carries (inputs, settings, time, worker) and make it JSON-ready.
    ``start``: ``time.perf_counter()`` when this process began the task; None when the task did
    not run here (the client recording a task its worker never returned): no time, no worker."""
    record.update({k: task[k] for k in IDENTITY})
    record.update({"data": task["data"], "data_sha256": task["data_sha256"], "weights_sha256": task["weights_sha256"],
                   "settings": task["settings"], "task_seconds": None if start is None else time.perf_counter() - start,
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "worker": None if start is None else _worker_info(), "commit": task.get("commit")})
    record = _plain(record)
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:  # keep the run going; say what could not be stored
        record = {k: record[k] for k in (*IDENTITY, "finished_at", "task_seconds")}
        record["error"] = f"record not JSON-ready: {exc}"
    return record


def failed_record(task: dict, error: BaseException, start: float | None = None, record: dict | None = None) -> dict:
    """The record of a task that raised: on its worker (``start`` given; ``record``: what it had
    found before, e.g. the episode's size), or seen by the client only (``start`` None: e.g. Dask's
    KilledWorker after the task's workers died repeatedly)."""
    record = dict(record or {})
    record["error"] = f"{type(error).__name__}: {error}"
    record["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-4))
    return finish_record(record, task, start)


def run_task(task: dict) -> dict:
    """Adapt one (backbone, domain, seed, method) and return its record. Never raises an Exception:
    a failure (a file that differs from the client's, training that diverged, a budget no layer
    fits, ...) becomes a record with ``error`` and ``traceback``."""
    start = time.perf_counter()
    record = {}
    try:
        # lazy: loads NumPy and Numba, after init_worker in a pool process (module docstring)
        from . import model
        from .data import open_dataset
        from .episodes import EpisodeImages
        from .methods import Budgets
        from .pipeline import adapt_episode
        from .train import FinetuneConfig

        check_identity("weight", task["weights"], task["weights_sha256"])
        check_identity("data", task["data"], task["data_sha256"])
        if task["weights_sha256"] not in _NETS:
            _NETS[task["weights_sha256"]] = model.load(task["weights"])
        net = _NETS[task["weights_sha256"]].copy()
        t0 = time.perf_counter()
        if task["data_sha256"] not in _DATASETS:
            _DATASETS[task["data_sha256"]] = open_dataset(task["data"])
        s = task["settings"]
        episode = draw_episode(_DATASETS[task["data_sha256"]], s, task["seed"])
        record.update(way=episode.way, support_size=len(episode.support), query_size=len(episode.query))
        images = EpisodeImages(episode, net.resolution)
        load_seconds = time.perf_counter() - t0
        result = adapt_episode(net, images.support, episode.support_labels, images.query, episode.query_labels,
                               task["method"], Budgets(task["budgets"]["memory"], task["budgets"]["macs"]),
                               FinetuneConfig(**task["finetune"]), load_seconds=load_seconds)
        result.pop("plan_table", None)  # the whole buffer table: large, and in adapt's report already
        record.update(result)
        record["model"] = net.name
        record["episode"] = {"classes": list(episode.classes), "shots": episode.shots.tolist(),
                             "sampler": s["sampler"]}
    except Exception as exc:  # one task's failure is a result, not the end of the run
        return failed_record(task, exc, start, record)
    return finish_record(record, task, start)


def comparable(record: dict, volatile=VOLATILE) -> dict:
    """A record without the fields that depend on where and when it ran (``VOLATILE``; a dotted
    name is a field of a nested dict)."""
    top = {v for v in volatile if "." not in v}
    out = {k: v for k, v in record.items() if k not in top}
    nested = [v.split(".", 1) for v in volatile if "." in v]
    for key in {k for k, _ in nested}:
        if isinstance(out.get(key), dict):
            out[key] = comparable(out[key], [rest for k, rest in nested if k == key])
    return out


# ----------------------------------------------------------------------------------------------
# running a task list: progress, the local pool
# ----------------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """A duration in seconds as '42s', '3m05s' or '2h07m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One line per finished task: count, a bar, the task and its result, failures so far, ETA.

    The ETA scales the wall time so far by the work left over the work done, a task's work being
    the mean seconds its (backbone, method) took so far (the mean of all finished tasks for one not
    seen yet): methods differ by 100x (``none`` ~1 s, TinyTL minutes), so a plain mean per task
    would promise a grid that starts with ``none`` tasks to end in seconds."""

    def __init__(self, tasks: list[dict], width: int = 20):
        self.total, self.width = len(tasks), width
        self.show_backbone = len({t["backbone"] for t in tasks}) > 1
        self.left = Counter((t["backbone"], t["method"]) for t in tasks)
        self.work: dict[tuple, tuple[float, int]] = {}  # (backbone, method) -> (seconds, tasks) finished
        self.done = self.failed = 0
        self.start = time.perf_counter()

    def eta(self) -> float:
        """Seconds the tasks left should take at this run's pace so far."""
        elapsed = time.perf_counter() - self.start
        seconds, count = map(sum, zip(*self.work.values())) if self.work else (0.0, 0)
        if seconds <= 0:
            return elapsed / max(self.done, 1) * (self.total - self.done)
        left = sum(n * (self.work[k][0] / self.work[k][1] if k in self.work else seconds / count)
                   for k, n in self.left.items())
        return elapsed * left / seconds

    def line(self, rec: dict) -> str:
        """Count a finished record and return its progress line: the bar, the task, its accuracy or
        error, and the time left (estimated per backbone and method from the tasks done)."""
        self.done += 1
        self.failed += "error" in rec
        key = (rec["backbone"], rec["method"])
        self.left[key] -= 1
        if rec.get("task_seconds") is not None:
            seconds, count = self.work.get(key, (0.0, 0))
            self.work[key] = (seconds + rec["task_seconds"], count + 1)
        n, total = self.done, self.total
        fill = self.width * n // total
        head = (f"[{n:>{len(str(total))}}/{total}] {'#' * fill}{'.' * (self.width - fill)} "
                + (f"{rec['backbone']:<15} " if self.show_backbone else "")
                + f"{rec['method']:<16} {rec['domain']:<14} seed {rec['seed']:<4}")
        if "error" in rec:
            took = "–" if rec.get("task_seconds") is None else f"{rec['task_seconds']:.1f}"
            body = f"FAILED ({took} s): {rec['error'].splitlines()[0][:120]}"
        else:
            body = (f"acc {100 * rec['accuracy_after']:5.1f}% (before {100 * rec['accuracy_before']:5.1f}%)  "
                    f"{rec['task_seconds']:6.1f} s")
        eta = self.eta()
        fails = f"  {self.failed} failed" if self.failed else ""
        return f"{head} {body}{fails}  ETA {duration(eta) if n < total else 'done'}"


def _stop_pool(pool) -> None:
    """End the worker processes this run started (their current tasks are lost, nothing is written)."""
    stop = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if stop is not None:
        stop()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def run_pool(tasks: list, finish, workers: int = 2, fn=None) -> None:
    """Run ``fn(task)`` (default ``run_task``; a module-level function, so a spawned process can
    import it) for each of ``tasks`` on ``workers`` spawned processes (0: in this process), one
    thread each, calling ``finish(result)`` in this process as each completes. Ctrl-C
    (KeyboardInterrupt) or SIGTERM (``Terminated``, when called from the main thread) ends the
    workers, their current tasks lost, and is re-raised; a worker whose parent was killed outright
    ends itself within a second (``_exit_with_parent``)."""
    fn = run_task if fn is None else fn
    if workers == 0 or not tasks:
        for task in tasks:
            finish(fn(task))
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker)
    try:
        futures = [pool.submit(fn, task) for task in tasks]
        for future in as_completed(futures):
            finish(future.result())
    except BaseException:
        _stop_pool(pool)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)


def execute(tasks: list[dict], out: Path, run=run_pool) -> tuple[int, int]:
    """Run the tasks with ``run(tasks, finish)`` (``run_pool``, or ``cluster.run_on_cluster`` with
    its address bound), writing each record as it arrives (atomically, in this process) and
    printing a progress line; returns (finished, failed)."""
    progress = Progress(tasks)

    def finish(rec):
        write_json(episode_path(out, rec["backbone"], rec["domain"], rec["method"], rec["seed"]), rec)
        print(progress.line(rec), flush=True)

    run(tasks, finish)
    return progress.done, progress.failed
