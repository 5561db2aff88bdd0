"""Paired differences between two backbones on the same evaluation episodes (e.g. without and
with meta-training): per domain and method, the mean accuracy on each and the mean of the
per-episode differences with its 95% interval (Student's t), over the seeds both have finished.

    python tools/paired_backbones.py reports/2026-11-30-meta-training mcunet-5fps mcunet-5fps-meta
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from microtrain.evaluation_report import load_records  # noqa: E402
from microtrain.stats import mean_ci  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="an evaluation folder (with episodes/)")
    p.add_argument("a", help="the first backbone (e.g. the ImageNet one)")
    p.add_argument("b", help="the second backbone (e.g. its meta-trained version)")
    args = p.parse_args(argv)
    acc = {(r["backbone"], r["domain"], r["method"], r["seed"]): r["accuracy_after"]
           for r in load_records(args.out) if r.get("accuracy_after") is not None}
    methods = sorted({k[2] for k in acc})
    domains = list(dict.fromkeys(k[1] for k in sorted(acc, key=lambda k: k[1])))
    print(f"| method | domain | n | {args.a} | {args.b} | {args.b} - {args.a} (paired) |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        per_domain = []
        for d in domains:
            seeds = sorted(s for (b, dd, mm, s) in acc if (b, dd, mm) == (args.a, d, m) and (args.b, d, m, s) in acc)
            if not seeds:
                continue
            x = np.array([acc[(args.a, d, m, s)] for s in seeds])
            y = np.array([acc[(args.b, d, m, s)] for s in seeds])
            diff, half, n = mean_ci(y - x)
            per_domain.append(y - x)
            print(f"| {m} | {d} | {n} | {100 * x.mean():.1f} | {100 * y.mean():.1f} | {_pm(diff, half)} |")
        if per_domain:
            n = min(len(v) for v in per_domain)
            diff, half, _ = mean_ci(np.mean([v[:n] for v in per_domain], axis=0))
            print(f"| {m} | average of {len(per_domain)} domains (first {n} seeds of each) | {n} | | | {_pm(diff, half)} |")
    return 0


def _pm(mean: float, half) -> str:
    return f"{100 * mean:+.1f}" + ("" if half is None else f" ± {100 * half:.1f}")


if __name__ == "__main__":
    sys.exit(main())
