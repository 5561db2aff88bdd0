"""How the fine-tuning defaults were chosen: learning rate x passes over the support set.

    python tools/tune_finetune.py [--method tinytrain] [--lrs 1e-3,3e-3,1e-2,3e-2] [--seeds 1000,1001,1002]

Runs validation episodes (10-way 5-shot, 10 queries per class) whose seeds (1000+) are disjoint
from the evaluation seeds (0-199), on the five target domains and Tiny-ImageNet, and reports
query accuracy after 5, 10, 20 and 40 passes for each learning rate, next to no training. The
support sets are the same images the evaluation draws from (these are small datasets), so the
figures choose a setting; they are not themselves an evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microtrain.evaluation import Terminated, run_pool  # noqa: E402
from microtrain.paths import write_atomic  # noqa: E402

DOMAINS = ("omniglot.zip", "traffic_sign.zip", "quickdraw.npz", "flowers.zip", "dtd.zip", "tinyimagenet.zip")
CHECKPOINTS = (5, 10, 20, 40)


def one(task):
    """One quick-protocol episode fine-tuned at each learning rate of ``task``: the query accuracy
    at each of ``CHECKPOINTS`` passes (NaN from a diverged step on), and no training's."""
    from microtrain import model
    from microtrain.checkpoint import ensure_converted
    from microtrain.data import open_dataset
    from microtrain.episodes import EpisodeImages, sample_episode
    from microtrain.methods import Budgets, plan_method
    from microtrain.paths import shared_file
    from microtrain.train import FinetuneConfig, finetune, prototype_accuracy

    backbone, domain, seed, method, lrs, mem_budget, mac_budget = task
    base = model.load(ensure_converted(backbone))
    ep = sample_episode(open_dataset(shared_file("data", domain)), 10, 5, 10, seed)
    im = EpisodeImages(ep, base.resolution)
    s, sl, q, ql = im.support, ep.support_labels, im.query, ep.query_labels
    out = {"domain": domain, "seed": seed, "none": prototype_accuracy(base, s, sl, q, ql), "runs": {}}
    from microtrain.adapt import parse_bytes, parse_macs

    budgets = Budgets(parse_bytes(mem_budget), parse_macs(mac_budget, base))
    for lr in lrs:
        net = base.copy()
        plan = plan_method(method, net, s, sl, budgets, 10.0, True, seed=0)
        accs, done = {}, 0
        for target in CHECKPOINTS:
            momentum = 0.9 if plan.momentum is None else plan.momentum  # SparseUpdate: plain SGD
            cfg = FinetuneConfig(epochs=target - done, lr=lr, momentum=momentum, seed=target)
            try:
                finetune(net, plan.selection, s, sl, cfg, block_hook=plan.block_hook)
                accs[target] = prototype_accuracy(net, s, sl, q, ql, plan.block_hook)
            except Exception as exc:  # a diverged run is a result here
                accs[target] = float("nan")
                print(f"{domain} seed {seed} lr {lr}: {exc}", file=sys.stderr)
                break
            done = target
        out["runs"][str(lr)] = accs
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mcunet-5fps")
    p.add_argument("--method", default="tinytrain")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--mem-budget", default="512KB", help="TinyTrain's backward memory budget")
    p.add_argument("--mac-budget", default="15%", help="TinyTrain's backward MAC budget, as adapt reads it "
                   "(15%%: of FullTrain's backward MACs; 15%%fwd: of the forward MACs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/tune.json")
    args = p.parse_args(argv)
    lrs = [float(v) for v in args.lrs.split(",")]
    tasks = [(args.backbone, d, int(s), args.method, lrs, args.mem_budget, args.mac_budget)
             for d in args.domains.split(",")
             for s in args.seeds.split(",")]
    start = time.time()
    results = []

    def finish(r):  # in this process, as each episode lands
        results.append(r)
        runs = "  ".join(f"lr {lr}: " + "/".join(f"{100 * a:.0f}" for a in accs.values())
                         for lr, accs in r["runs"].items())
        print(f"[{len(results)}/{len(tasks)} {time.time() - start:.0f}s] {r['domain']} seed {r['seed']}: "
              f"none {100 * r['none']:.0f}  {runs}", flush=True)

    try:  # one thread per worker; Ctrl-C or SIGTERM ends the workers too
        run_pool(tasks, finish, args.workers, fn=one)
    except (KeyboardInterrupt, Terminated):
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    order = {(t[1], t[2]): i for i, t in enumerate(tasks)}  # the workers finish in any order
    results.sort(key=lambda r: order[r["domain"], r["seed"]])
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    import numpy as np

    print(f"{args.method} on {args.backbone}, {len(tasks)} validation episodes, {time.time() - start:.0f} s")
    header = f"{'domain':<18} {'none':>6} " + " ".join(f"{f'lr {lr:g} @{c}':>13}" for lr in lrs for c in CHECKPOINTS)
    print(header)
    rows = {}
    for r in results:
        rows.setdefault(r["domain"], []).append(r)
    for domain, rs in list(rows.items()) + [("average", results)]:
        none = 100 * np.mean([r["none"] for r in rs])
        cells = [100 * np.mean([r["runs"][str(lr)].get(c, np.nan) for r in rs]) for lr in lrs for c in CHECKPOINTS]
        print(f"{domain:<18} {none:6.1f} " + " ".join(f"{v:13.1f}" for v in cells))


if __name__ == "__main__":
    sys.exit(main())
