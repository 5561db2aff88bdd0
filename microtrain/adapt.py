"""``python -m microtrain.adapt``: adapt a pretrained backbone to a few labelled images, on the device.

With no arguments it runs the built-in default task: MCUNet-5fps (converted from the shared
checkpoint on first use), one 10-way 5-shot episode with 10 queries per class from the shared
Traffic Sign data, TinyTrain+ (``tinytrain_plus``: the task-adaptive selection that was most accurate
within both budgets on validation episodes) under a 512 KB backward-memory budget and 15% of
FullTrain's backward MACs (the paper's budgets).

It prints the selection, a progress bar, query accuracy before and after, the backward memory
(planned, and what the arena holds) and MACs, the time split and the peak RSS, and writes the
adapted classifier (``classifier.npz``, for ``python -m microtrain.predict``) and a JSON report
to ``--out``. Arguments are checked before any work; bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, model
from .autograd import GraphError
from .checkpoint import BACKBONES, CheckpointError, backbone_file
from .classifier import Classifier, ClassifierError
from .classifier_format import is_classifier_file
from .data import PILLOW_HINT, DataError, open_dataset
from .episodes import EpisodeImages, from_folders, sample_episode, sample_metadataset_episode
from .method_plan import Budgets
from .methods import METHODS
from .paths import MissingSharedError, shared_file, write_atomic
from .pipeline import adapt_episode, json_ready
from .tinytrain import BudgetError, fulltrain_backward_macs
from .train import FinetuneConfig, TrainingDiverged


DEFAULT_MODEL = "mcunet-5fps"
DEFAULT_DATA = "traffic_sign.zip"
BUDGETED = "tinytrain"  # methods whose selection reads the budgets: tinytrain, its ablations, tinytrain-plus
# chosen on validation episodes (reports/2026-11-30-selection-design/): of the methods that fit both
# default budgets, TinyTrain+ was the most accurate (1.6-1.8 points above TinyTrain)
DEFAULT_METHOD = "tinytrain-plus"
CLASSIFIER_FILE = "classifier.npz"
REPORT_FILE = "report.json"


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


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one ``error:`` line (exit status 2), as every other
    bad input of the commands is, instead of its usage block."""

    def error(self, message):
        """Print one line (not argparse's usage block) and exit with status 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def finite_float(low: float, *, strict: bool = True, high: float | None = None):
    """An argparse type: a finite number > ``low`` (>= with ``strict=False``) and, given ``high``,
    < ``high``. So ``--lr nan``, ``inf`` or ``0`` is refused while the options are parsed (one line,
    exit status 2), not when the loss turns NaN."""
    bound = (f"> {low:g}" if strict else f">= {low:g}") + (f" and < {high:g}" if high is not None else "")

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value < high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    number.__name__ = f"number {bound}"
    return number


def seed(text: str) -> int:
    """An argparse type: a seed, an integer >= 0 (NumPy's ``default_rng`` takes no negative one), so
    ``--seed -1`` is refused while the options are parsed (one line, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


class _Explicit(argparse.Action):
    """Store the value and remember that the user gave the option (``args.explicit``), so that
    options that do not apply can be refused or flagged while defaults stay plain values."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.explicit = frozenset(getattr(namespace, "explicit", ())) | {self.dest}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m microtrain.adapt``; every default is ``FinetuneConfig``'s."""
    d = FinetuneConfig()
    p = OneLineParser(
        prog="python -m microtrain.adapt", allow_abbrev=False,
        description="Adapt a pretrained tiny CNN to a few labelled images (TinyTrain: Fisher-potential "
                    "layer/channel selection under memory and compute budgets, sparse fine-tuning, "
                    "cosine prototype head) and save the classifier for python -m microtrain.predict.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a backbone name ({', '.join(BACKBONES)}; the shared ones are converted on first use, "
                        "into the user cache), a microtrain weight file (.npz) or a classifier file to adapt "
                        "further. Default: %(default)s")
    g = p.add_argument_group("data: either --support/--query folders, or --data with an episode drawn from it")
    g.add_argument("--support", help="class-per-folder directory (or zip) of labelled support images")
    g.add_argument("--query", help="class-per-folder directory (or zip) of query images, same classes")
    g.add_argument("--data", help=f"a dataset (folder, zip or .npz) to draw an episode from. Default: the "
                                  f"shared {DEFAULT_DATA}")
    g.add_argument("--way", type=int, default=10, action=_Explicit, help="classes per episode, >= 2 (default %(default)s)")
    g.add_argument("--shot", type=int, default=5, action=_Explicit, help="support images per class (default %(default)s)")
    g.add_argument("--query-shots", type=int, default=10, action=_Explicit,
                   help="query images per class (default %(default)s)")
    g.add_argument("--sampler", choices=("fixed", "metadataset"), default="fixed", action=_Explicit,
                   help="fixed way/shot, or the Meta-Dataset sampler of the paper's Appendix B (default %(default)s)")
    g.add_argument("--seed", type=seed, default=0, action=_Explicit, help="episode seed (default %(default)s)")
    g = p.add_argument_group("method and budgets")
    g.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="default %(default)s: the most accurate method within both budgets on validation and "
                        "evaluation episodes (without a MAC budget, sparseupdate was more accurate: README)")
    g.add_argument("--mem-budget", default="512KB", action=_Explicit,
                   help="backward memory budget: weights updated + gradients + optimizer state + "
                        "activations kept for backward (default %(default)s; TinyTrain methods only)")
    g.add_argument("--mac-budget", default="15%", action=_Explicit,
                   help="backward MAC budget per image: 15%% (or 15%%bwd) is 15%% of FullTrain's backward MACs, "
                        "the paper's reference (Table 2); 15%%fwd is 15%% of the forward MACs; 6.5M a count "
                        "(default %(default)s; TinyTrain methods only)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the support set, >= 1 (default %(default)s)")
    g.add_argument("--lr", type=finite_float(0), default=d.lr,
                   help="SGD learning rate, > 0 (default: the method's, from the validation sweeps: "
                        "fulltrain and tinytl 1e-4, the others 3e-3)")
    g.add_argument("--momentum", type=finite_float(0, strict=False, high=1), default=d.momentum,
                   help="SGD momentum, in [0, 1) (default %(default)s; SparseUpdate and TinyTrain+ always use plain "
                        "SGD, the setting they were chosen with)")
    g.add_argument("--weight-decay", type=finite_float(0, strict=False), default=d.weight_decay,
                   help="default %(default)s")
    g.add_argument("--scale", type=finite_float(0), default=d.scale, help="cosine logit scale (default %(default)s)")
    g.add_argument("--batch", type=int, default=d.batch, help="pseudo-queries per step (default %(default)s)")
    g.add_argument("--train-seed", type=seed, default=d.seed,
                   help="augmentation, order and held-out split seed (default %(default)s)")
    g.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="hold out a fifth of each class's support images, train on the rest, and keep the "
                        "pre-adaptation weights when the held-out images are classified worse after "
                        "adaptation (default: on; --no-keep-best trains on every support image and keeps "
                        "the result whatever it is)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/adapt",
                   help=f"folder for {CLASSIFIER_FILE} and {REPORT_FILE} (default %(default)s)")
    g.add_argument("--plan", action="store_true", help="also print every buffer of the memory plan")
    g.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (the progress lines go to stderr)")
    g.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    return p


def validate(args) -> list[str]:
    """Check every argument before any work (no model, data or training yet), beyond what the
    parser checks (``finite_float``: the fine-tuning numbers): values in range, options that do
    not go together, paths that exist, an output folder that can be written.
    Returns the warnings to print (options that do not apply); raises ``UsageError``."""
    given = getattr(args, "explicit", frozenset())
    episode_opts = [o for o in ("way", "shot", "query_shots", "sampler", "seed") if o in given]
    flag = lambda o: "--" + o.replace("_", "-")  # noqa: E731
    if args.support or args.query:
        if not (args.support and args.query):
            raise UsageError("--support and --query go together")
        if args.data:
            raise UsageError("--data draws an episode; --support/--query give one: use one or the other")
        if episode_opts:
            raise UsageError(f"{', '.join(map(flag, episode_opts))}: for an episode drawn from --data; with "
                             "--support/--query every image of the two folders is used")
    elif args.sampler == "metadataset":
        fixed = [o for o in ("way", "shot", "query_shots") if o in given]
        if fixed:
            raise UsageError(f"{', '.join(map(flag, fixed))} apply to the fixed sampler; the metadataset sampler "
                             "draws its own way and shots")
    if args.way < 2:
        raise UsageError(f"--way must be >= 2 (a classifier tells classes apart), got {args.way}")
    if args.shot < 1 or args.query_shots < 1:
        raise UsageError(f"--shot and --query-shots must be >= 1 (query images measure the accuracy), got "
                         f"{args.shot} and {args.query_shots}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs} (--method none adapts nothing: only the "
                         "prototypes)")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    notes = []
    budgets = [o for o in ("mem_budget", "mac_budget") if o in given]
    if budgets and not args.method.startswith(BUDGETED):
        notes.append(f"{' and '.join(map(flag, budgets))} {'do' if len(budgets) > 1 else 'does'} not apply to "
                        f"--method {args.method}, whose policy is fixed; only the tinytrain methods select "
                        "under budgets")
    if parse_bytes(args.mem_budget) <= 0:
        raise UsageError(f"--mem-budget must be positive, got {args.mem_budget!r}")
    read_mac_budget(args.mac_budget)  # the syntax; the share is taken of the model's MACs later
    if Path(args.model).suffix == ".npz":
        if not Path(args.model).is_file():
            raise UsageError(f"--model {args.model}: no such file")
    elif args.model not in BACKBONES:
        raise UsageError(f"--model {args.model!r}: not a known backbone ({', '.join(BACKBONES)}) "
                         "nor a .npz weight or classifier file")
    for opt in ("support", "query", "data"):
        value = getattr(args, opt)
        if value and not Path(value).exists():
            raise UsageError(f"--{opt} {value}: no such file or directory")
    _check_out(Path(args.out))
    return notes


def _check_out(out: Path) -> None:
    """The output folder can be made and written, and its files are not folders."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder (it receives {CLASSIFIER_FILE} and {REPORT_FILE})")
    for name in (CLASSIFIER_FILE, REPORT_FILE):
        if (out / name).is_dir():
            raise UsageError(f"--out {out}: {out / name} is a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {probe}")


def resolve_model(spec: str, log=None):
    """A ``model.Network`` from ``spec``: a backbone name (``checkpoint.backbone_file``: the shared
    ImageNet backbones and their meta-trained versions), a weight file (.npz), or a classifier
    file (its adapted network, to adapt further). ``log(line)`` hears a first-use conversion."""
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"weight file {spec} not found")
        return Classifier.load(path).net if is_classifier_file(path) else model.load(path)
    return model.load(backbone_file(spec, log=log))


def _load_episode(args, resolution: int):
    if args.support:
        episode, source = from_folders(args.support, args.query), f"{args.support} | {args.query}"
    else:
        source = args.data or str(shared_file("data", DEFAULT_DATA))
        dataset = open_dataset(source)
        if args.sampler == "metadataset":
            episode = sample_metadataset_episode(dataset, args.seed)
        else:
            episode = sample_episode(dataset, args.way, args.shot, args.query_shots, args.seed)
    return episode, EpisodeImages(episode, resolution), source


class Progress:
    """Training progress: the mean loss over the last pass, elapsed time and ETA.

    On a terminal (``tty``) one line redrawn in place on stderr; otherwise a plain line every
    10% through ``say``, which writes (and flushes) in order with every other line of the run."""

    width = 30

    def __init__(self, epochs: int, say, tty: bool):
        self.epochs, self.say, self.tty = max(1, epochs), say, tty
        self.start = None
        self.window: list[float] = []
        self.last_tick = -1

    def __call__(self, step: int, total: int, loss: float, phase: str = "training") -> None:
        if step == 1 or self.start is None:  # a new fine-tuning (keep-best's check, then the training)
            self.start, self.window, self.last_tick = time.perf_counter(), [], -1
        per_pass = max(1, total // self.epochs)
        self.window.append(float(loss))
        del self.window[:-per_pass]
        tick = (100 * step) // total if self.tty else (10 * step) // total
        if tick == self.last_tick and step != total:
            return
        self.last_tick = tick
        elapsed = time.perf_counter() - self.start
        # the clock starts at the first step's end, so the rate is known from the second on
        eta = f"{elapsed / (step - 1) * (total - step):.1f} s" if step > 1 else "?"
        done = self.width * step // total
        line = (f"  {phase} [{'#' * done}{'.' * (self.width - done)}] {step}/{total}  "
                f"loss {np.mean(self.window):.4f} (mean, last {len(self.window)} steps)  "
                f"{elapsed:.1f} s, ETA {eta}")
        if self.tty:
            print("\r" + line, end="\n" if step == total else "", file=sys.stderr, flush=True)
        else:
            self.say(line)


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes, or None where it cannot be read.
    ``ru_maxrss`` is KiB on Linux and bytes on macOS; Windows has no ``resource`` module and
    reports the peak working set through the Win32 API."""
    try:
        import resource  # here, not above: the module exists on Unix only (none on Windows)
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    if sys.platform == "win32":
        # here, not above: the Win32 API is reached only on Windows
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (n, ctypes.c_size_t) for n in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                                               "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                                               "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]
        counters = Counters()
        counters.cb = ctypes.sizeof(Counters)
        process = ctypes.windll.kernel32.GetCurrentProcess()
        if ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
            return int(counters.PeakWorkingSetSize)
    return None


def exit_status(work, errors: tuple, interrupted: str = "interrupted") -> int:
    """Run ``work()`` for a command line: 0 when it returns; 2 with one line on stderr for one of
    the ``errors`` (bad input) or a missing optional dependency (Pillow for PNG/JPEG, unlike a
    broken install, which keeps its traceback); 130 on Ctrl-C; 0 when the reader of a pipe
    (e.g. ``head``) went away."""
    try:
        work()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if PILLOW_HINT not in str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
    return 0


def one_line_warnings(caught) -> list[str]:
    """Python warnings recorded during a run, each once, as one line (category and message)."""
    lines = []
    for w in caught:
        line = f"{w.category.__name__}: {' '.join(str(w.message).split())}"
        if line not in lines:
            lines.append(line)
    return lines


def run(args, say=print, warn=None) -> dict:
    """One adaptation as the command line asked (arguments already ``validate``d)."""
    warn = warn or say
    t0 = time.perf_counter()
    net = resolve_model(args.model, log=say)
    episode, images, source = _load_episode(args, net.resolution)
    t_load = time.perf_counter() - t0
    budgets = Budgets(parse_bytes(args.mem_budget), parse_macs(args.mac_budget, net))
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         scale=args.scale, batch=args.batch, seed=args.train_seed)

    say(f"model {net.name}: {len(net.layers)} conv layers, {net.forward_macs / 1e6:.2f}M forward MACs")
    say(f"episode: {len(episode.classes)}-way, {len(images.support)} support / {len(images.query)} query "
        f"images from {source}")
    progress = None if args.quiet else Progress(cfg.epochs, say, tty=sys.stderr.isatty())
    report = adapt_episode(net, images.support, episode.support_labels, images.query, episode.query_labels,
                           args.method, budgets, cfg, log=say, warn=warn, progress=progress, load_seconds=t_load,
                           keep_best=args.keep_best, plan_buffers=args.plan)
    report.update({"model": net.name, "data": source,
                   "episode": {"classes": list(episode.classes), "support": len(images.support),
                               "query": len(images.query), "seed": None if args.support else args.seed,
                               "sampler": "folders" if args.support else args.sampler}})
    mem = report["memory"]
    plan_table = report.pop("plan_table", None)
    if mem is not None:
        say(f"memory plan (batch {cfg.batch}):")
        say("  " + plan_table.replace("\n", "\n  "))
        say(f"backward memory: planned {mem['backward_planned_bytes'] / 1024:.1f} KiB "
            + (f"(budget {budgets.memory / 1024:.0f} KiB)" if args.method.startswith(BUDGETED) else "(fixed policy)")
            + f"; arena planned {mem['arena_planned_bytes'] / 1024:.1f} KiB, allocated "
            f"{mem['arena_allocated_bytes'] / 1024:.1f} KiB; outside the arena during a step: "
            f"{mem['outside_arena_step_bytes']} bytes")
        say(f"backward MACs: {report['backward_macs'] / 1e6:.2f}M "
            + (f"(budget {budgets.macs / 1e6:.2f}M, " if args.method.startswith(BUDGETED) else "(")
            + f"forward {net.forward_macs / 1e6:.2f}M)")
    acc_before, acc_after = report["accuracy_before"], report["accuracy_after"]
    say(f"query accuracy after:  {100 * acc_after:.2f}%  ({100 * (acc_after - acc_before):+.2f})")
    t = report["time_seconds"]
    check = f", keep-best check {t['keep_best_check']:.2f} s" if t["keep_best_check"] else ""
    say(f"time: load {t['load']:.2f} s, Fisher + selection {t['selection']:.2f} s "
        f"({100 * report['selection_share']:.1f}% of load + selection + training{' + check' if check else ''}), "
        f"training {t['training']:.2f} s{check}; whole run {time.perf_counter() - t0:.2f} s")
    report["peak_rss_bytes"] = peak_rss_bytes()
    say("peak RSS: " + ("not measurable on this platform" if report["peak_rss_bytes"] is None
                        else f"{report['peak_rss_bytes'] / 2 ** 20:.1f} MB"))

    out = Path(args.out)
    provenance = {"base_model": args.model, "network": net.name, "base_source": net.arch.get("source"),
                  "method": args.method, "selection": report["selection"], "budgets": report["budgets"],
                  "finetune": report["finetune"], "keep_best": report["keep_best"], "data": source,
                  "episode": report["episode"], "accuracy_before": acc_before, "accuracy_after": acc_after,
                  "microtrain": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    classifier = Classifier.from_support(net, images.support, episode.support_labels, episode.classes, cfg.scale,
                                         json_ready(provenance))
    classifier.save(out / CLASSIFIER_FILE)
    report["classifier"] = str(out / CLASSIFIER_FILE)
    report = json_ready(report)
    text = json.dumps(report, indent=2, allow_nan=False)
    write_atomic(out / REPORT_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    say(f"wrote {out / CLASSIFIER_FILE} (classify new images: python -m microtrain.predict "
        f"{out / CLASSIFIER_FILE} IMAGES...) and {out / REPORT_FILE}")
    return report


def main(argv=None) -> int:
    """The command line: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the report alone

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=stream, flush=True)

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr, flush=True)

    done = {}

    def work():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for line in validate(args):
                warn(line)
            done["report"] = run(args, say, warn)
        done["warnings"] = caught  # shown only when the run succeeds: an error stays one line
    status = exit_status(work, (UsageError, DataError, CheckpointError, ClassifierError, MissingSharedError,
                                BudgetError, TrainingDiverged, GraphError), "interrupted: no output written")
    if status or "report" not in done:  # an error, or the pipe's reader went away
        return status
    for line in one_line_warnings(done["warnings"]):
        warn(line)
    if args.json:  # a reader that went away (| head) is not an error, here as during the run
        return exit_status(lambda: print(json.dumps(done["report"], indent=2, allow_nan=False), flush=True), ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
