"""The default adaptation task done the way a PyTorch user would do it: the comparison run of
``tools/bench.py rss`` (peak RSS and wall time of a whole adaptation, next to microtrain's).

    python tools/torch_adapt.py [--layers blocks.13.depthwise,blocks.12.depthwise,blocks.13.expand]
                                [--epochs 40] [--threads T] [--out runs/torch_adapt]

Same task as ``python -m microtrain.adapt`` with no arguments: MCUNet-5fps from its converted
weight file (``microtrain.checkpoint`` reads it with NumPy only), the 10-way 5-shot Traffic Sign
episode of seed 0, cosine prototype head at scale 10, batch 1, SGD lr 3e-3 momentum 0.9 for 40
passes (microtrain's FinetuneConfig defaults when this was written; ``bench.py rss`` passes on the
configuration microtrain's run reports, so the two always match there),
prototypes recomputed without gradients at the start of every pass, the pseudo-queries made by
``microtrain.data.augment`` + ``to_input`` drawn from the same seeded generator in the same order
as ``microtrain.train.finetune``, so both runs see the same pixels.

What is trained: the layers TinyTrain selected (``--layers``; ``bench.py rss`` passes the ones
microtrain's run of the same task chose). PyTorch cannot update a subset of a layer's channels,
so each selected layer is trained whole, weights and biases.

Nothing of microtrain's engine is imported here (no Numba): only its data and checkpoint readers,
which are NumPy. The script checks that at the end and says so.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What microtrain's TinyTrain chose for the default task when this file was written; bench.py
# rss overrides it with the choice of the run it compares against.
DEFAULT_LAYERS = ("blocks.13.depthwise", "blocks.12.depthwise", "blocks.13.expand")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torch_adapt.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mcunet-5fps", help="shared backbone name (default %(default)s)")
    p.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                   help="comma-separated layers to fine-tune whole (default: %(default)s)")
    p.add_argument("--way", type=int, default=10)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query-shots", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="episode seed")
    p.add_argument("--epochs", type=int, default=40, help="passes over the support set")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train-seed", type=int, default=0, help="augmentation/order seed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", default="runs/torch_adapt", help="folder for adapted.pt and report.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    import numpy as np
    import torch
    import torch.nn.functional as F

    from microtrain.checkpoint import ensure_converted, load_weights
    from microtrain.data import augment, open_dataset, to_input
    from microtrain.episodes import EpisodeImages, sample_episode
    from microtrain.paths import shared_file
    from torch_mbconv import build_torch_model, prototype_loss, set_trainable

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t_start

    # -- load: weights into the torch model, the episode's images ---------------------------------
    t0 = time.perf_counter()
    arch, arrays = load_weights(ensure_converted(args.model))
    model = build_torch_model(arch, arrays)
    del arrays
    resolution = int(arch["resolution"])
    dataset = open_dataset(shared_file("data", "traffic_sign.zip"))
    episode = sample_episode(dataset, args.way, args.shot, args.query_shots, args.seed)
    images = EpisodeImages(episode, resolution)
    support, labels = images.support, images.support_labels
    query, query_labels = images.query, images.query_labels
    ways = int(labels.max()) + 1
    t_load = time.perf_counter() - t0

    def embed(batch_images: np.ndarray, batch: int = 8) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(batch_images), batch):
                x = torch.from_numpy(to_input(batch_images[start:start + batch]))
                out.append(model.features(x))
        return torch.cat(out)

    def prototypes(z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z.double(), dim=1)
        protos = torch.stack([z[torch.from_numpy(labels == k)].mean(dim=0) for k in range(ways)])
        return F.normalize(protos, dim=1).float()

    def accuracy(protos: torch.Tensor) -> float:
        z = F.normalize(embed(query), dim=1)
        return float((torch.argmax(z @ protos.t(), dim=1).numpy() == query_labels).mean())

    # -- before: nearest-prototype accuracy ------------------------------------------------------
    t0 = time.perf_counter()
    acc_before = accuracy(prototypes(embed(support)))
    t_before = time.perf_counter() - t0

    # -- fine-tuning: the selected layers whole ---------------------------------------------------
    layers = [name for name in args.layers.split(",") if name]
    names = [f"{layer}.{part}" for layer in layers for part in ("weight", "bias")]
    params = set_trainable(model, names)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.train_seed)
    n = len(support)
    steps_per_epoch = max(1, n // args.batch)
    x = torch.empty((args.batch, 3, resolution, resolution))
    x_np = x.numpy()
    all_labels = torch.from_numpy(labels)
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        protos = prototypes(embed(support))
        order = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            for j, i in enumerate(idx):
                to_input(augment(support[i], rng)[None], out=x_np[j:j + 1])
            opt.zero_grad()
            loss = prototype_loss(model.features(x[:len(idx)]), protos, all_labels[idx], args.scale)
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
            if not np.isfinite(losses[-1]):
                print(f"error: loss became {losses[-1]} at step {len(losses)}", file=sys.stderr)
                return 2
    t_train = time.perf_counter() - t0

    # -- after, and save ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    for p in params:
        p.requires_grad_(False)
    acc_after = accuracy(prototypes(embed(support)))
    t_after = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.save(model.state_dict(), out / "adapted.pt")
    t_save = time.perf_counter() - t0

    trained = sum(p.numel() for p in params)
    engine_loaded = "numba" in sys.modules
    report = {
        "model": args.model, "layers": layers, "trained_parameters": trained, "steps": len(losses),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "accuracy_before": acc_before, "accuracy_after": acc_after,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "time_seconds": {"imports": t_import, "load": t_load, "accuracy_before": t_before, "training": t_train,
                         "accuracy_after": t_after, "save": t_save,
                         "whole_run": time.perf_counter() - t_start},
        "peak_rss_mb": peak_rss_mb(), "numba_loaded": engine_loaded,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    t = report["time_seconds"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}, "
          f"{len(support)} support / {len(query)} query images")
    print(f"trained (whole layers): {', '.join(layers)} = {trained} parameters, {len(losses)} steps, "
          f"loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}")
    print(f"query accuracy: before {100 * acc_before:.2f}%, after {100 * acc_after:.2f}%")
    print(f"time: imports {t['imports']:.2f} s, load {t['load']:.2f} s, accuracy before {t['accuracy_before']:.2f} s, "
          f"training {t['training']:.2f} s ({1e3 * t['training'] / max(1, len(losses)):.1f} ms/step incl. "
          f"augmentation), accuracy after {t['accuracy_after']:.2f} s, save {t['save']:.2f} s; "
          f"whole run {t['whole_run']:.2f} s")
    print(f"peak RSS: {report['peak_rss_mb']:.1f} MB (Numba {'LOADED' if engine_loaded else 'not loaded'})")
    print(f"wrote {out / 'adapted.pt'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
