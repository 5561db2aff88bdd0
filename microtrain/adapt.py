"""``python -m microtrain.adapt``: adapt a pretrained backbone to a few labelled images, on the device.

With no arguments it runs the built-in default task: MCUNet-5fps (converted from the shared
checkpoint on first use), one 10-way 5-shot episode with 10 queries per class from the shared
Traffic Sign data, TinyTrain under a 512 KB backward-memory budget and 15% of FullTrain's backward
MACs (the paper's budgets).

It prints the selection, a progress bar, query accuracy before and after, the backward memory
(planned, and what the arena holds) and MACs, the time split and the peak RSS, and writes the
adapted weights and a JSON report to ``--out``. Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import model
from .checkpoint import CheckpointError, backbone_file
from .data import DataError, open_dataset
from .episodes import EpisodeImages, from_folders, sample_episode, sample_metadataset_episode
from .methods import METHODS, Budgets
from .paths import MissingSharedError, shared_file
from .pipeline import adapt_episode
from .tinytrain import BudgetError, fulltrain_backward_macs
from .train import FinetuneConfig, TrainingDiverged
from .weight_format import save_weights

DEFAULT_MODEL = "mcunet-5fps"
DEFAULT_DATA = "traffic_sign.zip"


class UsageError(ValueError):
    """Bad command-line input."""


def parse_bytes(text: str) -> int:
    """'512KB', '0.5MB', '524288' -> bytes (KB = 1024 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise UsageError(f"cannot read {text!r} as a byte count (e.g. 524288, 512KB, 0.5MB)")
    scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


MAC_SHARES = {"": "bwd", "bwd": "bwd", "fwd": "fwd"}  # a bare '15%' is a share of FullTrain's backward MACs


def read_mac_budget(text: str) -> tuple[float, str | None]:
    """The syntax of a MAC budget: (percent, 'bwd' | 'fwd') for a share, (count, None) for an
    absolute count. '15%' and '15%bwd': 15% of FullTrain's backward MACs per image (the paper's
    reference, Table 2: TinyTrain's 6.51M of FullTrain's 44.9M on MCUNet); '15%fwd': 15% of the
    forward MACs; '6.5M', '6500000': MACs. Raises UsageError."""
    text = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%\s*([a-z]*)", text.lower())
    if m and m.group(2) in MAC_SHARES:
        return float(m.group(1)), MAC_SHARES[m.group(2)]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]?)", text.lower())
    if not m:
        raise UsageError(f"cannot read {text!r} as a MAC budget (e.g. 15% or 15%bwd of FullTrain's backward "
                         "MACs, 15%fwd of the forward MACs, 6.5M)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)], None


def parse_macs(text: str, net) -> int:
    """A MAC budget (``read_mac_budget``) in MACs for ``net`` (a ``model.Network``): a share of
    FullTrain's backward MACs per image (``tinytrain.fulltrain_backward_macs``) or of the forward
    MACs, or the count itself. Raises UsageError."""
    value, share_of = read_mac_budget(text)
    if share_of is None:
        return int(value)
    return int(value / 100 * (fulltrain_backward_macs(net) if share_of == "bwd" else net.forward_macs))


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(
        prog="python -m microtrain.adapt",
        description="Adapt a pretrained tiny CNN to a few labelled images (TinyTrain: Fisher-potential "
                    "layer/channel selection under memory and compute budgets, sparse fine-tuning, "
                    "cosine prototype head).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="a shared backbone name (mcunet-5fps, mbv2-w0.35, proxyless-w0.3; converted on "
                        "first use) or a microtrain weight file (.npz). Default: %(default)s")
    g = p.add_argument_group("data: either --support/--query folders, or --data with an episode drawn from it")
    g.add_argument("--support", help="class-per-folder directory (or zip) of labelled support images")
    g.add_argument("--query", help="class-per-folder directory (or zip) of query images, same classes")
    g.add_argument("--data", help=f"a dataset (folder, zip or .npz) to draw an episode from. Default: the "
                                  f"shared {DEFAULT_DATA}")
    g.add_argument("--way", type=int, default=10, help="classes per episode (default %(default)s)")
    g.add_argument("--shot", type=int, default=5, help="support images per class (default %(default)s)")
    g.add_argument("--query-shots", type=int, default=10, help="query images per class (default %(default)s)")
    g.add_argument("--sampler", choices=("fixed", "metadataset"), default="fixed",
                   help="fixed way/shot, or the Meta-Dataset sampler of the paper's Appendix B")
    g.add_argument("--seed", type=int, default=0, help="episode seed (default %(default)s)")
    g = p.add_argument_group("method and budgets")
    g.add_argument("--method", choices=METHODS, default="tinytrain", help="default %(default)s")
    g.add_argument("--mem-budget", default="512KB",
                   help="backward memory budget: weights updated + gradients + optimizer state + "
                        "activations kept for backward (default %(default)s)")
    g.add_argument("--mac-budget", default="15%",
                   help="backward MAC budget per image: 15%% (or 15%%bwd) is 15%% of FullTrain's backward MACs, "
                        "the paper's reference (Table 2); 15%%fwd is 15%% of the forward MACs; 6.5M a count "
                        "(default %(default)s)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the support set (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="SGD learning rate (default: the method's, from the validation sweeps: "
                        "fulltrain and tinytl 1e-4, the others 3e-3)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    g.add_argument("--scale", type=float, default=d.scale, help="cosine logit scale (default %(default)s)")
    g.add_argument("--batch", type=int, default=d.batch, help="pseudo-queries per step (default %(default)s)")
    g.add_argument("--train-seed", type=int, default=d.seed, help="augmentation/order seed (default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/adapt", help="folder for adapted.npz and report.json (default %(default)s)")
    g.add_argument("--plan", action="store_true", help="print every buffer of the memory plan")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve_model(spec: str):
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"weight file {spec} not found")
        return model.load(path)
    return model.load(backbone_file(spec))


def _load_episode(args, resolution: int):
    if args.support or args.query:
        if not (args.support and args.query):
            raise UsageError("--support and --query go together")
        episode, source = from_folders(args.support, args.query), f"{args.support} | {args.query}"
    else:
        source = args.data or str(shared_file("data", DEFAULT_DATA))
        dataset = open_dataset(source)
        if args.sampler == "metadataset":
            episode = sample_metadataset_episode(dataset, args.seed)
        else:
            episode = sample_episode(dataset, args.way, args.shot, args.query_shots, args.seed)
    return episode, EpisodeImages(episode, resolution), source


def _progress(quiet: bool):
    """A progress bar on a terminal; on a pipe, one line per 10% so logs stay readable."""
    if quiet:
        return None
    width, tty = 30, sys.stderr.isatty()
    shown = {"last": -1}

    def show(step, total, loss):
        tick = (100 * step) // total if tty else (10 * step) // total
        if tick == shown["last"] and step != total:
            return
        shown["last"] = tick
        done = width * step // total
        line = f"  training [{'#' * done}{'.' * (width - done)}] {step}/{total}  loss {loss:.4f}"
        print(("\r" + line) if tty else line, end="\n" if (step == total or not tty) else "",
              file=sys.stderr, flush=True)
    return show


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(args) -> dict:
    t0 = time.perf_counter()
    net = _resolve_model(args.model)
    episode, images, source = _load_episode(args, net.resolution)
    t_load = time.perf_counter() - t0
    budgets = Budgets(parse_bytes(args.mem_budget), parse_macs(args.mac_budget, net))
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         scale=args.scale, batch=args.batch, seed=args.train_seed)
    if cfg.batch < 1 or cfg.epochs < 0 or (cfg.lr is not None and cfg.lr <= 0):
        raise UsageError("--batch must be >= 1, --epochs >= 0 and --lr > 0")

    print(f"model {net.name}: {len(net.layers)} conv layers, {net.forward_macs / 1e6:.2f}M forward MACs")
    print(f"episode: {len(episode.classes)}-way, {len(images.support)} support / {len(images.query)} query "
          f"images from {source}")
    report = adapt_episode(net, images.support, episode.support_labels, images.query, episode.query_labels,
                           args.method, budgets, cfg, log=print, progress=_progress(args.quiet),
                           load_seconds=t_load)
    report.update({"model": net.name, "data": source,
                   "episode": {"classes": list(episode.classes), "support": len(images.support),
                               "query": len(images.query), "seed": args.seed,
                               "sampler": "folders" if args.support else args.sampler}})
    mem = report["memory"]
    if mem is not None:
        print(f"memory plan (batch {cfg.batch}):")
        print("  " + report.pop("plan_table").replace("\n", "\n  "))
        print(f"backward memory: planned {mem['backward_planned_bytes'] / 1024:.1f} KiB "
              f"(budget {budgets.memory / 1024:.0f} KiB); arena planned {mem['arena_planned_bytes'] / 1024:.1f} KiB, "
              f"allocated {mem['arena_allocated_bytes'] / 1024:.1f} KiB; outside the arena during a step: "
              f"{mem['outside_arena_step_bytes']} bytes")
        print(f"backward MACs: {report['backward_macs'] / 1e6:.2f}M (budget {budgets.macs / 1e6:.2f}M, "
              f"forward {net.forward_macs / 1e6:.2f}M)")
    acc_before, acc_after = report["accuracy_before"], report["accuracy_after"]
    print(f"query accuracy after:  {100 * acc_after:.2f}%  ({100 * (acc_after - acc_before):+.2f})")
    t = report["time_seconds"]
    print(f"time: load {t['load']:.2f} s, Fisher + selection {t['selection']:.2f} s "
          f"({100 * report['selection_share']:.1f}% of load + selection + training), training {t['training']:.2f} s; "
          f"whole run {time.perf_counter() - t0:.2f} s")
    report["peak_rss_mb"] = peak_rss_mb()
    print(f"peak RSS: {report['peak_rss_mb']:.1f} MB")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "adapted.npz", net.arch, net.state())  # itself written to a temporary, then renamed
    _write_atomic(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=_json)))
    print(f"wrote {out / 'adapted.npz'} and {out / 'report.json'}")
    return report


def _json(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, DataError, CheckpointError, MissingSharedError, BudgetError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
