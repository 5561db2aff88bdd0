"""``python -m microtrain.predict CLASSIFIER IMAGES...``: recognise new images with an adapted classifier.

IMAGES are image files, folders (searched recursively; folder links followed, each real folder
once) and zips of them, listed and read as adaptation's datasets are. Each image is prepared as
in adaptation (``microtrain.data``: decoded, upright, RGB, resized), embedded by the adapted
network in batches through its planned forward-only executor (one arena, no training memory)
and given the class of the most similar prototype. One line per image:
path, predicted class, cosine score (``--top-k``: the K best classes); ``--json`` or ``--csv``
for machines.

When images sit in class folders (a folder on their path named like one of the classifier's
classes, e.g. the query folder given to ``adapt``), they are also scored: accuracy, accuracy per
class and the confusion matrix. Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .adapt import OneLineParser, exit_status
from .classifier import EMBED_BATCH, Classifier, ClassifierError, load_image
from .data import DataError, list_image_files
from .pipeline import json_ready

PROG = "python -m microtrain.predict"


class UsageError(ValueError):
    """Bad command-line input (one line)."""


@dataclass
class Item:
    """One image to classify (``data.ImageFile``: how it is shown, how its bytes are read) and
    its true label if known."""

    shown: str
    read: Callable[[], bytes]
    truth: int | None = None


def _truth(folders, index: dict[str, int]) -> int | None:
    """The label of the nearest enclosing folder named like a class (innermost first)."""
    for name in reversed(folders):
        if name in index:
            return index[name]
    return None


def collect(paths: list[str], classes: list[str]) -> tuple[list[Item], list[str]]:
    """Every image under ``paths`` in a stable order (each argument in turn, sorted within it),
    listed and read as dataset images are (``data.list_image_files``), with its class when a
    folder on its path is named like one of ``classes``, and the one-line notes on what was
    skipped. Raises ``DataError`` for a path that does not exist, an unreadable folder or zip."""
    index = {name: label for label, name in enumerate(classes)}
    items: list[Item] = []
    notes: list[str] = []
    for arg in paths:
        found, skipped = list_image_files(arg)
        items += [Item(f.shown, f.read, _truth(f.folders, index)) for f in found]
        notes += skipped
    return items, notes


def evaluate(truths: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, accuracy per class and the confusion matrix (rows: true class, columns:
    predicted) of int labels; only the images with a known class (truth >= 0) count."""
    known = truths >= 0
    t, p = truths[known], predicted[known]
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (t, p), 1)
    per_class = {}
    for k, name in enumerate(classes):
        n = int(confusion[k].sum())
        if n:
            per_class[name] = {"images": n, "correct": int(confusion[k, k]), "accuracy": confusion[k, k] / n}
    return {"images": int(known.sum()), "correct": int((t == p).sum()),
            "accuracy": float((t == p).mean()) if len(t) else None,
            "per_class": per_class, "confusion": confusion.tolist(), "unlabelled": int((~known).sum())}


def evaluation_text(ev: dict, classes: list[str]) -> list[str]:
    """Lines of text for ``evaluate_folder``'s result: accuracy, then per-class accuracy and the
    confusion matrix rows (true class by predicted class)."""
    lines = [f"accuracy: {100 * ev['accuracy']:.2f}% ({ev['correct']} of {ev['images']} images in class folders"
             + (f"; {ev['unlabelled']} others not scored)" if ev["unlabelled"] else ")")]
    width = max(len("class"), *(len(c) for c in ev["per_class"]))
    lines.append(f"per class:  {'#':>3}  {'class':<{width}}  {'images':>6}  {'accuracy':>8}")
    for k, name in enumerate(classes):
        if name in ev["per_class"]:
            c = ev["per_class"][name]
            lines.append(f"            {k:>3}  {name:<{width}}  {c['images']:>6}  {100 * c['accuracy']:7.1f}%")
    shown = [k for k, row in enumerate(ev["confusion"]) if sum(row)] or list(range(len(classes)))
    cols = [k for k in range(len(classes)) if any(ev["confusion"][r][k] for r in range(len(classes)))]
    cell = max(3, *(len(str(v)) for row in ev["confusion"] for v in row)) + 1
    lines.append("confusion matrix (rows: true class #, columns: predicted class #):")
    lines.append("     " + "".join(f"{k:>{cell}}" for k in cols))
    for r in shown:
        lines.append(f"  {r:>3}" + "".join(f"{ev['confusion'][r][k]:>{cell}}" for k in cols))
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m microtrain.predict``."""
    p = OneLineParser(prog=PROG, allow_abbrev=False,
                      description="Classify images with a classifier written by python -m microtrain.adapt.")
    p.add_argument("classifier", help="the classifier file (runs/adapt/classifier.npz by default in adapt)")
    p.add_argument("images", nargs="+", help="image files, folders and zips of them")
    p.add_argument("--top-k", type=int, default=1, help="also list the K best classes per image (default %(default)s)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout (the evaluation, if any, goes to stderr)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per forward pass (default: the batch adaptation embeds with, 4)")
    p.add_argument("--quiet", action="store_true", help="no per-image lines in text mode (only the evaluation)")
    return p


def run(args, out=None, err=None) -> dict:
    """Classify ``args.images`` with ``args.classifier``; print as asked (``out``, ``err``: default
    stdout and stderr); return the result as in ``--json``."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    batch = EMBED_BATCH if args.batch is None else args.batch
    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    clf = Classifier.load(args.classifier)
    items, notes = collect(args.images, clf.classes)
    for note in notes:
        print(f"note: {note}", file=err, flush=True)
    if not items:
        raise UsageError(f"no images found in {', '.join(args.images)}")
    k = min(args.top_k, len(clf.classes))
    writer = None
    if args.csv:
        writer = csv.writer(out)
        writer.writerow(["path", "class", "score"] + [f"{w}_{j}" for j in range(2, k + 1) for w in ("class", "score")]
                        + ["true_class"])
    start = time.perf_counter()
    records, predicted = [], np.empty(len(items), np.int64)
    chunk = max(batch, 32)
    for s in range(0, len(items), chunk):
        part = items[s:s + chunk]
        images = np.stack([load_image(item.read(), clf.resolution, item.shown) for item in part])
        for j, (item, pred) in enumerate(zip(part, clf.predict(images, top_k=k, batch=batch))):
            predicted[s + j] = pred.label
            truth = None if item.truth is None else clf.classes[item.truth]
            records.append({"path": item.shown, "class": pred.name, "score": pred.score,
                            "top": [{"class": n, "score": v} for n, v in pred.top], "true_class": truth})
            if writer is not None:
                writer.writerow([item.shown, pred.name, f"{pred.score:.6f}"]
                                + [x for n, v in pred.top[1:] for x in (n, f"{v:.6f}")] + [truth or ""])
            elif not args.json and not args.quiet:
                extra = "" if k == 1 else "  (" + ", ".join(f"{n} {v:.3f}" for n, v in pred.top[1:]) + ")"
                print(f"{item.shown}  {pred.name}  {pred.score:.3f}{extra}", file=out)
        out.flush()
    seconds = time.perf_counter() - start
    truths = np.array([-1 if item.truth is None else item.truth for item in items])
    ev = evaluate(truths, predicted, clf.classes) if (truths >= 0).any() else None
    result = {"classifier": str(args.classifier), "classes": clf.classes, "predictions": records,
              "evaluation": ev, "seconds": seconds}
    if args.json:
        print(json.dumps(json_ready(result), indent=2, allow_nan=False, ensure_ascii=False), file=out, flush=True)
    else:
        stream = err if args.csv else out
        if ev is not None:
            for line in evaluation_text(ev, clf.classes):
                print(line, file=stream)
        print(f"classified {len(items)} image(s) in {seconds:.2f} s ({1e3 * seconds / len(items):.1f} ms each: "
              f"decode, resize, forward pass)", file=err if args.csv else out, flush=True)
    return result


def main(argv=None) -> int:
    """The command line: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run(args), (UsageError, ClassifierError, DataError))


if __name__ == "__main__":
    sys.exit(main())
