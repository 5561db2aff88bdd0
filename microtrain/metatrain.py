"""Few-shot meta-training: the paper's offline stage (Section 2.1, Figure 2, Appendix A.3).

An ImageNet backbone is trained on ProtoNet episodes drawn from MiniImageNet's 64 training
classes: each episode is one batch of ``way x (shot + query)`` images; the prototypes are the
class means of the support embeddings, computed inside the graph, so gradients flow through them
(``Network.episode_graph``); the loss is the cosine-prototype cross-entropy of the queries, the
same head the device fine-tunes with. Every layer is trained (SGD with momentum) with the
learning rate warmed up from ``start_lr`` to ``peak_lr`` over the first 5% of the episodes, then
cosine-annealed back to ``start_lr``. Every ``checkpoint_every`` episodes the backbone is scored
on a fixed set of meta-validation episodes (MiniImageNet's 16 validation classes) and the run
state is written atomically; the best weights by meta-validation are the output.

Reproducible and resumable: episode ``i`` (its classes, images and augmentation) depends only
on ``(seed, i)``, and a checkpoint holds the weights, the momentum, the episode counter and the
best weights so far, so a run killed at any point and started again with the same command ends
with the same weights as an uninterrupted one.

    python -m microtrain.metatrain --model mcunet-5fps --episodes 2000 --out weights/mcunet-5fps-meta.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapt import OneLineParser, UsageError, exit_status, resolve_model, seed
from .autograd import Executor
from .checkpoint import CheckpointError, save_weights
from .data import DataError, augment, open_dataset, to_input
from .episodes import sample_episode
from .methods import full_update
from .model import Network
from .optim import SGD
from .paths import MissingSharedError, shared_file, write_atomic
from .stats import mean_ci
from .train import TrainingDiverged, prototype_accuracy

SOURCES = {"train": "miniimagenet_train.zip", "val": "miniimagenet_val.zip", "test": "miniimagenet_test.zip"}
STATE_VERSION = 1
VAL_SEED, TEST_SEED = 10_000_000, 20_000_000  # episode seeds of the fixed evaluation sets


@dataclass(frozen=True)
class MetaConfig:
    """Settings of one meta-training run (the paper's recipe as defaults, Appendix A.3; the
    number of episodes and the peak learning rate are chosen for a 2-core CPU, see README)."""

    episodes: int = 2000
    way: int = 5
    shot: int = 5
    query: int = 15  # queries per class
    peak_lr: float = 1e-4  # chosen by meta-validation (weights/README.md)
    start_lr: float = 1e-6  # warm-up start and cosine floor
    warmup: float = 0.05  # share of the episodes spent warming up
    momentum: float = 0.9
    weight_decay: float = 0.0
    scale: float = 10.0  # cosine logits scale, as in fine-tuning
    augment: bool = True  # random resized crop, flip, colour jitter of every episode image
    seed: int = 0
    checkpoint_every: int = 100
    val_episodes: int = 60  # fixed episodes (same way/shot/query) of the 16 validation classes


def learning_rate(cfg: MetaConfig, episode: int) -> float:
    """Learning rate of episode ``episode`` (0-based): linear warm-up from ``start_lr`` to
    ``peak_lr`` over the first ``warmup`` share, then cosine annealing to ``start_lr`` at the last
    episode (paper Appendix A.3)."""
    warm = max(1, round(cfg.warmup * cfg.episodes))
    if episode < warm:
        return cfg.start_lr + (cfg.peak_lr - cfg.start_lr) * episode / warm
    span = max(1, cfg.episodes - 1 - warm)
    t = min(1.0, (episode - warm) / span)
    return cfg.start_lr + 0.5 * (cfg.peak_lr - cfg.start_lr) * (1 + math.cos(math.pi * t))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of the weight files), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class EpisodeSource:
    """A dataset and its decoded images: ``episode(seed)`` gives uint8 (S + Q, 3, R, R) with the
    support first, and int64 labels. ``cache=True`` keeps every decoded image: decoding and
    resizing one 84x84 JPEG to 128x128 takes about 8 ms, as long as a training step spends on it,
    and a 2,000-episode run draws each of the 38,400 training images about 5 times (the cache
    grows to 1.9 GB at 128x128; meta-training runs on a server, not on the device)."""

    def __init__(self, path: Path, resolution: int, cache: bool = False):
        self.path, self.resolution = Path(path), resolution
        self.dataset = open_dataset(path)
        self._cache: dict | None = {} if cache else None

    def _load(self, items) -> np.ndarray:
        if self._cache is None:
            return self.dataset.load_many(items, self.resolution)
        for item in items:
            if item not in self._cache:
                self._cache[item] = self.dataset.load(item, self.resolution)
        return np.stack([self._cache[item] for item in items])

    def episode(self, seed, way: int, shot: int, query: int):
        """A way-way shot-shot episode with ``query`` queries per class drawn by ``seed``: (images
        uint8 (way*(shot+query), 3, R, R), support first; support labels (way*shot,) int64; query
        labels (way*query,) int64)."""
        ep = sample_episode(self.dataset, way, shot, query, seed)
        images = self._load(list(ep.support) + list(ep.query))
        return images, np.asarray(ep.support_labels, np.int64), np.asarray(ep.query_labels, np.int64)


def evaluate_episodes(net: Network, source: EpisodeSource, count: int, seed0: int,
                      way: int = 5, shot: int = 5, query: int = 15) -> np.ndarray:
    """Query accuracy (fraction) of nearest-prototype classification on ``count`` fixed
    episodes (seeds ``seed0 .. seed0 + count - 1``), float64 (count,)."""
    acc = np.empty(count)
    for i in range(count):
        images, ys, yq = source.episode(seed0 + i, way, shot, query)
        acc[i] = prototype_accuracy(net, images[:len(ys)], ys, images[len(ys):], yq)
    return acc


def accuracy_ci(acc: np.ndarray) -> tuple[float, float | None]:
    """Mean and 95% interval half-width (Student's t; None for one episode) of per-episode
    accuracies (fractions), in percent."""
    m, h, _ = mean_ci(acc)
    return 100 * m, None if h is None else 100 * h


class MetaTrainer:
    """The episode graph of one backbone with every layer trained, and its optimizer."""

    def __init__(self, net: Network, cfg: MetaConfig):
        self.net, self.cfg = net, cfg
        n_support, n_query = cfg.way * cfg.shot, cfg.way * cfg.query
        self.n_support = n_support
        graph = net.episode_graph(n_support, n_query, cfg.way, cfg.scale)
        self.run = Executor(graph, full_update(net, [layer.name for layer in net.layers]),
                            momentum=cfg.momentum > 0)
        self.opt = SGD(cfg.peak_lr, cfg.momentum, cfg.weight_decay)
        self.x = self.run.value("image")

    def step(self, episode: int, images: np.ndarray, ys: np.ndarray, yq: np.ndarray) -> float:
        """One SGD step on one episode (uint8 images, support first); returns its loss."""
        rng = np.random.default_rng([self.cfg.seed, episode, 1])
        for j, image in enumerate(images):
            to_input((augment(image, rng) if self.cfg.augment else image)[None], out=self.x[j:j + 1])
        loss = self.run.forward({"support_labels": ys, "query_labels": yq})
        if not np.isfinite(loss):
            raise TrainingDiverged(episode + 1, loss)
        self.run.backward()
        self.opt.lr = learning_rate(self.cfg, episode)
        self.opt.step(self.run)
        return loss

    def momentum_state(self) -> dict[str, np.ndarray]:
        """Copies of the SGD momentum buffers by name ('momentum:LAYER.weight'/'.bias'), for the run state."""
        out = {}
        for node, _ in self.run.trained():
            for part, m in zip(("weight", "bias"), self.run.momentum(node.name)):
                if m is not None:
                    out[f"momentum:{node.name}.{part}"] = m.copy()
        return out

    def load_momentum(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the momentum buffers from ``momentum_state``'s arrays (``KeyError`` if one is missing)."""
        for node, _ in self.run.trained():
            for part, m in zip(("weight", "bias"), self.run.momentum(node.name)):
                if m is not None:
                    np.copyto(m, arrays[f"momentum:{node.name}.{part}"])


# --------------------------------------------------------------------------------------------
# Run state: one .npz beside the output (no pickle), written atomically
# --------------------------------------------------------------------------------------------

def state_path(out: Path) -> Path:
    """Where a meta-training run to ``out`` (a .npz) keeps its resumable state: OUT_STEM.state.npz beside it."""
    return out.with_name(out.stem + ".state.npz")


def save_state(path: Path, state: dict, net: Network, best: dict[str, np.ndarray],
               momentum: dict[str, np.ndarray]) -> None:
    """Write the run state atomically as one .npz (no pickle): ``state`` (JSON-able counters and
    history), the current weights, the best weights so far and the momentum buffers."""
    arrays = {f"weights:{k}": v for k, v in net.state().items()}
    arrays.update({f"best:{k}": v for k, v in best.items()})
    arrays.update(momentum)
    arrays["__state__"] = np.array(json.dumps(state))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, write)


def load_state(path: Path) -> tuple[dict, dict, dict, dict]:
    """(state, weights, best weights, momentum) from a run-state file; CheckpointError if it is
    not one."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        state = json.loads(str(arrays.pop("__state__")))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported in one line
        raise CheckpointError(f"{path}: not a meta-training state file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: state version {version}, this microtrain writes {STATE_VERSION}")
    fields = {"identity": dict, "episode": int, "seconds": (int, float), "validation": list, "losses": list,
              "best": dict}
    scores = [state.get("best"), *(state.get("validation") or [None])]
    if (any(not isinstance(state.get(k), t) for k, t in fields.items()) or state["episode"] < 0
            or not all(isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float)) for v in scores)):
        raise CheckpointError(f"{path}: damaged meta-training state (its record lacks or garbles "
                              f"{', '.join(fields)}); delete it to start over")
    split = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
    return state, split("weights:"), split("best:"), {k: v for k, v in arrays.items() if k.startswith("momentum:")}


def check_state_arrays(path: Path, kind: str, arrays: dict[str, np.ndarray],
                       reference: dict[str, np.ndarray]) -> None:
    """CheckpointError unless ``arrays`` (one part of a run-state file) has exactly the names,
    shapes and dtypes of ``reference`` and only finite values: a damaged or foreign state file is
    refused before any training, not by a traceback mid-run or after it."""
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    wrong = [k for k, ref in reference.items() if k in arrays and (
        arrays[k].shape != ref.shape or arrays[k].dtype != ref.dtype or not np.isfinite(arrays[k]).all())]
    if missing or extra or wrong:
        what = ", ".join(f"{label} {names[0]}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
                         for label, names in (("missing", missing), ("unexpected", extra),
                                              ("wrong shape, dtype or non-finite", wrong)) if names)
        raise CheckpointError(f"{path}: damaged meta-training state: {kind}: {what}; delete it to start over")


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m microtrain.metatrain`` (its --help lists every setting)."""
    p = OneLineParser(
        prog="python -m microtrain.metatrain",
        description="Few-shot meta-training of a backbone on MiniImageNet ProtoNet episodes (the paper's "
                    "offline stage). Resumable: run the same command again after an interruption.")
    d = MetaConfig()
    p.add_argument("--model", required=True, help="a shared backbone name (mcunet-5fps, mbv2-w0.35, "
                   "proxyless-w0.3) or a microtrain weight file")
    p.add_argument("--episodes", type=int, default=d.episodes, help=f"training episodes (default {d.episodes})")
    p.add_argument("--out", required=True, help="the meta-trained weight file (.npz); the run state is "
                   "kept beside it as <name>.state.npz")
    p.add_argument("--seed", type=seed, default=d.seed, help="episode and augmentation seed, >= 0 "
                   f"(default {d.seed})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="episodes between meta-validation + checkpoint")
    p.add_argument("--lr", type=float, default=d.peak_lr, help=f"peak learning rate (default {d.peak_lr})")
    p.add_argument("--way", type=int, default=d.way)
    p.add_argument("--shot", type=int, default=d.shot)
    p.add_argument("--query", type=int, default=d.query, help="queries per class")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--val-episodes", type=int, default=d.val_episodes)
    p.add_argument("--no-augment", action="store_true", help="train on the images as decoded")
    p.add_argument("--data", default=None, help="folder holding the three MiniImageNet zips "
                   "(default: the shared data folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config(args) -> MetaConfig:
    cfg = MetaConfig(episodes=args.episodes, way=args.way, shot=args.shot, query=args.query, peak_lr=args.lr,
                     momentum=args.momentum, weight_decay=args.weight_decay, augment=not args.no_augment,
                     seed=args.seed, checkpoint_every=args.checkpoint_every, val_episodes=args.val_episodes)
    if min(cfg.episodes, cfg.way - 1, cfg.shot, cfg.query, cfg.checkpoint_every, cfg.val_episodes - 1) < 1:
        raise UsageError("--episodes, --shot, --query and --checkpoint-every must be >= 1, --way and "
                         "--val-episodes >= 2")
    if not cfg.peak_lr > cfg.start_lr or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise UsageError(f"--lr must exceed {cfg.start_lr}; --momentum and --weight-decay must be >= 0")
    return cfg


def _source_files(args) -> dict[str, Path]:
    if args.data is None:
        return {k: shared_file("data", name) for k, name in SOURCES.items()}
    files = {k: Path(args.data) / name for k, name in SOURCES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UsageError(f"{', '.join(missing)} not found")
    return files


def _progress_line(episode: int, total: int, loss: float, lr: float, elapsed: float, done_here: int) -> str:
    width = 24
    filled = width * episode // total
    rate = elapsed / max(1, done_here)
    eta = rate * (total - episode)
    return (f"  episode {episode}/{total} [{'#' * filled}{'.' * (width - filled)}] loss {loss:.4f} "
            f"lr {lr:.2e}  {rate:.2f} s/episode  ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _check_writable(folder: Path) -> None:
    """UsageError unless ``folder`` exists or can be made, and takes a new file (checked before
    any training, so a bad --out costs nothing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{os.getpid()}.probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out: cannot write into {folder} ({exc.strerror or exc})") from None


def metatrain(args, log=print) -> dict:
    """Run (or resume) the meta-training the arguments describe; returns the provenance record
    written into the output file."""
    cfg = _config(args)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"--out must name a .npz weight file, got {out}")
    _check_writable(out.parent)
    files = _source_files(args)
    net = resolve_model(args.model)
    base = {"name": net.name, "sha256": net.arch["source"]["sha256"], "file": net.arch["source"]["file"]}
    if "meta_training" in net.arch:
        raise UsageError(f"{args.model} is already meta-trained; start from an ImageNet backbone")
    data = {k: {"file": p.name, "sha256": sha256(p)} for k, p in files.items()}
    identity = {"config": dataclasses.asdict(cfg), "base": base, "data": data}

    spath = state_path(out)
    trainer = None
    if spath.exists():
        state, weights, best, momentum = load_state(spath)
        if state["identity"] != identity:
            raise UsageError(f"{spath} belongs to a run with other settings, model or data; use another --out "
                             "or delete it to start over")
        reference = net.state()
        check_state_arrays(spath, "weights", weights, reference)
        check_state_arrays(spath, "best weights", best, reference)
        net = Network(net.arch, weights)
        trainer = MetaTrainer(net, cfg)
        check_state_arrays(spath, "momentum", momentum, trainer.momentum_state())
        trainer.load_momentum(momentum)
        log(f"resuming {out} at episode {state['episode']}/{cfg.episodes}")
    else:
        state = {"version": STATE_VERSION, "identity": identity, "episode": 0, "seconds": 0.0,
                 "validation": [], "losses": [], "best": None, "test_before": None}
        best = None

    val = EpisodeSource(files["val"], net.resolution, cache=True)
    if state["episode"] == 0 and not state["validation"]:
        log(f"meta-validation before training ({cfg.val_episodes} episodes, {cfg.way}-way {cfg.shot}-shot "
            f"{cfg.query}-query) ...")
        acc = evaluate_episodes(net, val, cfg.val_episodes, VAL_SEED, cfg.way, cfg.shot, cfg.query)
        m, h = accuracy_ci(acc)
        state["validation"].append({"episode": 0, "accuracy": m, "ci95": h})
        state["best"] = {"episode": 0, "accuracy": m, "ci95": h}
        best = {k: v.copy() for k, v in net.state().items()}
        log(f"  episode 0: {m:.2f} ± {h:.2f}%")
    if trainer is None:
        trainer = MetaTrainer(net, cfg)

    train = EpisodeSource(files["train"], net.resolution, cache=True)
    tty = sys.stderr.isatty() and not args.quiet
    started, start_episode, losses = time.perf_counter(), state["episode"], []
    seconds_before = state["seconds"]
    while state["episode"] < cfg.episodes:
        i = state["episode"]
        images, ys, yq = train.episode((cfg.seed, i), cfg.way, cfg.shot, cfg.query)
        loss = trainer.step(i, images, ys, yq)
        losses.append(loss)
        state["episode"] = i + 1
        elapsed = time.perf_counter() - started
        if not args.quiet and (tty or (i + 1) % max(1, cfg.checkpoint_every // 4) == 0):
            line = _progress_line(i + 1, cfg.episodes, float(np.mean(losses[-50:])), trainer.opt.lr, elapsed,
                                  i + 1 - start_episode)
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.episodes:
            if tty:
                print(file=sys.stderr)
            acc = evaluate_episodes(net, val, cfg.val_episodes, VAL_SEED, cfg.way, cfg.shot, cfg.query)
            m, h = accuracy_ci(acc)
            state["validation"].append({"episode": i + 1, "accuracy": m, "ci95": h})
            state["losses"].append({"episode": i + 1, "mean_loss": float(np.mean(losses[-cfg.checkpoint_every:]))})
            improved = m > state["best"]["accuracy"]
            if improved:
                state["best"] = {"episode": i + 1, "accuracy": m, "ci95": h}
                best = {k: v.copy() for k, v in net.state().items()}
            state["seconds"] = seconds_before + time.perf_counter() - started
            save_state(spath, state, net, best, trainer.momentum_state())
            log(f"  episode {i + 1}: meta-validation {m:.2f} ± {h:.2f}%"
                f"{' (best)' if improved else ''}; loss {state['losses'][-1]['mean_loss']:.4f}; "
                f"checkpoint {spath.name}")

    test = EpisodeSource(files["test"], net.resolution, cache=True)
    log(f"in-domain check on the 20 test classes ({cfg.val_episodes} episodes) ...")
    # the base network afresh: training changed ``net`` in place
    test_acc = {name: dict(zip(("accuracy", "ci95"), accuracy_ci(evaluate_episodes(
        n, test, cfg.val_episodes, TEST_SEED, cfg.way, cfg.shot, cfg.query))))
        for name, n in (("before", resolve_model(args.model)), ("after", Network(net.arch, best)))}
    log(f"  test classes: {test_acc['before']['accuracy']:.2f}% before, {test_acc['after']['accuracy']:.2f}% after")
    provenance = {
        "base": base, "data": data, "config": dataclasses.asdict(cfg),
        "episodes": cfg.episodes, "best_episode": state["best"]["episode"],
        "meta_validation": {"before": state["validation"][0], "best": state["best"],
                            "history": state["validation"]},
        "meta_test": test_acc,
        "train_seconds": round(state["seconds"], 1), "commit": _git_commit(),
        "command": "python -m microtrain.metatrain " + " ".join(sys.argv[1:]) if args.argv is None
        else "python -m microtrain.metatrain " + " ".join(args.argv),
    }
    arch = {**net.arch, "name": f"{net.name}-meta", "meta_training": provenance}
    # the ImageNet classifier is not trained here and few-shot adaptation never reads it
    save_weights(out, arch, {k: v for k, v in best.items() if not k.startswith("classifier.")})
    log(f"wrote {out}: best meta-validation {state['best']['accuracy']:.2f}% at episode "
        f"{state['best']['episode']} (before: {state['validation'][0]['accuracy']:.2f}%)")
    return provenance


def main(argv=None) -> int:
    """The command line: 0 on success, 2 on bad input or a diverged run (one line on stderr), 130
    on Ctrl-C (the run resumes from its last checkpoint)."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    return exit_status(lambda: metatrain(args),
                       (UsageError, DataError, CheckpointError, MissingSharedError, TrainingDiverged),
                       "\ninterrupted: run the same command to resume from the last checkpoint (one is written every "
                       "--checkpoint-every episodes; before the first, it starts over)")


if __name__ == "__main__":
    sys.exit(main())
