"""Print what a weight file holds: per-layer shapes and costs, per-kind and total counts.

    python -m microtrain.summary WEIGHTS|BACKBONE [--json]

Counts come from ``architecture.layer_specs`` (the layers the engine builds) at the file's resolution:
conv weights exclude biases and the ImageNet classifier, MACs are the forward pass at batch 1,
as in ../shared/checkpoints/README.md. A bad file: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .architecture import embedding_channels, layer_specs
from .checkpoint import BACKBONES, backbone_file
from .checks import CheckpointError
from .paths import MissingSharedError
from .weight_format import load_weights

KINDS = ("conv", "pointwise", "depthwise")
PROG = "python -m microtrain.summary"


def summarize(arch: dict, arrays: dict) -> dict:
    """The summary as plain data (what ``--json`` prints)."""
    layers = layer_specs(arch)
    rows = [{"index": l.index, "name": l.name, "kind": l.kind, "in_channels": l.in_channels,
             "out_channels": l.out_channels, "kernel": l.kernel, "stride": l.stride, "in_size": l.in_size,
             "out_size": l.out_size, "weight_shape": list(l.weight_shape), "weights": l.weight_count,
             "biases": l.out_channels, "macs": l.macs} for l in layers]
    by_kind = {kind: {"count": sum(r["kind"] == kind for r in rows),
                      "weights": sum(r["weights"] for r in rows if r["kind"] == kind),
                      "macs": sum(r["macs"] for r in rows if r["kind"] == kind)} for kind in KINDS}
    classifier = arrays.get("classifier.weight")
    lite = {k: v for k, v in arrays.items() if ".lite." in k}  # TinyTL's branches, if adapted with it
    return {
        "name": arch["name"], "resolution": arch["resolution"], "source": arch["source"],
        "blocks": len(arch["blocks"]), "residual_blocks": sum(b["residual"] for b in arch["blocks"]),
        "embedding": embedding_channels(arch),
        "classifier": None if classifier is None else {"classes": int(classifier.shape[0]),
                                                       "params": int(classifier.size + arrays["classifier.bias"].size)},
        "lite_residual": None if not lite else {"settings": arch["lite_residual"], "branches": len(lite) // 4,
                                                "params": int(sum(v.size for v in lite.values()))},
        "meta_training": arch.get("meta_training"),
        "layers": rows,
        "by_kind": by_kind,
        "totals": {"convs": len(rows), "weights": sum(r["weights"] for r in rows),
                   "biases": sum(r["biases"] for r in rows), "macs": sum(r["macs"] for r in rows)},
    }


def format_text(s: dict) -> str:
    """``summarize``'s result as a table: one row per conv layer (kind, channels, kernel/stride, map,
    weight shape, weights, MACs), then weights and MACs by kind and in total, and where the
    network came from (meta-training, TinyTL branches)."""
    src = s["source"]
    lines = [f"{s['name']}: {s['resolution']}x{s['resolution']} input, {s['blocks']} blocks "
             f"({s['residual_blocks']} residual), embedding {s['embedding']}  [{src['kind']} {src['file']}]", ""]
    head = f"{'#':>3}  {'layer':<20} {'kind':<9} {'in->out ch':>11} {'k/s':>5} {'map':>9} {'weight shape':>17} {'weights':>9} {'MACs':>11}"
    lines += [head, "-" * len(head)]
    for r in s["layers"]:
        lines.append(f"{r['index']:>3}  {r['name']:<20} {r['kind']:<9} {r['in_channels']:>5}->{r['out_channels']:<5}"
                     f" {r['kernel']:>2}/{r['stride']:<2} {r['in_size']:>4}->{r['out_size']:<4}"
                     f" {'x'.join(map(str, r['weight_shape'])):>17} {r['weights']:>9,} {r['macs']:>11,}")
    lines += ["", f"{'kind':<10} {'count':>5} {'weights':>9} {'MACs':>11}"]
    for kind, k in s["by_kind"].items():
        lines.append(f"{kind:<10} {k['count']:>5} {k['weights']:>9,} {k['macs']:>11,}")
    t = s["totals"]
    lines.append(f"{'total':<10} {t['convs']:>5} {t['weights']:>9,} {t['macs']:>11,}")
    lines.append(f"(plus {t['biases']:,} conv biases"
                 + (f"; classifier {s['classifier']['classes']} classes, {s['classifier']['params']:,} params, not counted)"
                    if s["classifier"] else ")"))
    meta = s["meta_training"]
    if meta:
        val = meta["meta_validation"]
        lines.append(f"(meta-trained from {meta['base']['name']}: {meta['episodes']:,} MiniImageNet episodes, "
                     f"best at {meta['best_episode']:,}; meta-validation {val['before']['accuracy']:.2f}% -> "
                     f"{val['best']['accuracy']:.2f}%)")
    if s["lite_residual"]:
        lite = s["lite_residual"]
        lines.append(f"(adapted with TinyTL: {lite['branches']} lite residual branches, {lite['params']:,} params, "
                     f"not counted above)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line: print a weight file's layer table (or JSON); 0, or 2 on a bad file."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("weights", help=f"a weight file (.npz) or a backbone name ({', '.join(BACKBONES)})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        if args.weights not in BACKBONES and not Path(args.weights).exists():
            raise CheckpointError(f"{args.weights}: no such weight file, nor a backbone name ({', '.join(BACKBONES)})")
        path = backbone_file(args.weights) if args.weights in BACKBONES else args.weights
        arch, arrays = load_weights(path)
    except (CheckpointError, MissingSharedError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, as every microtrain command
        return 2
    s = summarize(arch, arrays)
    try:
        print(json.dumps(s, indent=1) if args.json else format_text(s), flush=True)
    except BrokenPipeError:  # the reader (| head) went away: not an error, and no traceback
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
