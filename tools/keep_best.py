"""What keep-best does to accuracy: every validation episode adapted with and without it.

    python tools/keep_best.py [--methods tinytrain,fulltrain] [--seeds 1000-1009] [--workers 2]

For each (method, domain, seed) the same 10-way 5-shot episode (10 queries per class) is adapted
twice from the same backbone, with ``keep_best=False`` and ``keep_best=True``
(``microtrain.pipeline``: hold out a fifth of each class's support images, adapt on the rest,
keep the pre-adaptation weights when the held-out images are classified worse, else adapt again
on every image). Seeds are validation seeds (1000+), disjoint from the evaluation's 0-199. The
table gives query accuracy (%) without training ("none"), without keep-best ("plain"), with it
("keep-best"), how often it kept the pre-adaptation weights, and two alternatives computed from
the same runs: keeping the check's own weights (trained on four fifths of the support set, no
second fine-tuning) and deciding by the held-out loss instead of the accuracy. Results are
appended to ``--out`` (JSON lines) and reused when rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microtrain.evaluation import Terminated, run_pool  # noqa: E402

DOMAINS = ("traffic_sign.zip", "omniglot.zip", "flowers.zip", "dtd.zip", "quickdraw.npz")


def one(task):
    """One (backbone, domain, seed, method, MAC budget) episode adapted twice, without and with
    keep-best: {"plain"/"keep": accuracy before/after, seconds, or the error}."""
    from microtrain.adapt import parse_macs, resolve_model
    from microtrain.data import open_dataset
    from microtrain.episodes import EpisodeImages, sample_episode
    from microtrain.method_plan import Budgets
    from microtrain.paths import shared_file
    from microtrain.pipeline import adapt_episode
    from microtrain.train import FinetuneConfig

    backbone, domain, seed, method, mac_budget = task
    base = resolve_model(backbone)
    ep = sample_episode(open_dataset(shared_file("data", domain)), 10, 5, 10, seed)
    im = EpisodeImages(ep, base.resolution)
    budgets = Budgets(512 * 1024, parse_macs(mac_budget, base))
    out = {"backbone": backbone, "domain": domain, "seed": seed, "method": method}
    for keep in (False, True):
        net = base.copy()
        start = time.perf_counter()
        try:
            r = adapt_episode(net, im.support, ep.support_labels, im.query, ep.query_labels, method, budgets,
                              FinetuneConfig(), keep_best=keep)
            out["keep" if keep else "plain"] = {"before": r["accuracy_before"], "after": r["accuracy_after"],
                                                 "keep_best": r["keep_best"],
                                                 "seconds": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001 - a diverged plain run is a result here
            out["keep" if keep else "plain"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def _counts(kb: dict) -> dict:
    """The record with held-out correct counts (records written before they were stored: from
    the accuracies)."""
    n = kb["held_out"]
    count = lambda acc: None if acc is None else int(round(acc * n))  # noqa: E731
    return {"correct_before": count(kb["accuracy_before"]), "correct_after": count(kb["accuracy_after"]), **kb}


def _worse(kb: dict, **tolerance) -> bool:
    """microtrain's own keep-best rule (imported here: a spawned worker imports this module before
    its initializer limits NumPy to one thread)."""
    from microtrain.pipeline import adaptation_is_worse

    return adaptation_is_worse(_counts(kb), **tolerance)


RULES = {  # when the pre-adaptation weights are kept, from a check's record
    "keep-best": _worse,  # what microtrain does
    "strict": lambda kb: _worse(kb, tolerance=0),  # any held-out image lost
    "loss": lambda kb: kb["diverged_at_step"] is not None or kb["loss_after"] > kb["loss_before"],
}


def summarize(results: list[dict]) -> str:
    """The table: per method and domain, mean query accuracy (%) of no training, plain adaptation,
    keep-best, and the alternatives (a strict rule reverting on any held-out image lost, the
    check's own weights, a rule on the held-out loss), each rule's decision applied to the plain
    run (what adapting again on every image gives); how often keep-best and the strict rule
    reverted; plain runs that diverged (counted at chance, 10%: nothing usable is left)."""
    import numpy as np

    lines = []
    for method in sorted({r["method"] for r in results}):
        rs = [r for r in results if r["method"] == method and "after" in r.get("keep", {})]
        lines.append(f"{method} on {rs[0]['backbone'] if rs else '?'}: query accuracy (%), mean over episodes")
        lines.append(f"  {'domain':<16} {'episodes':>8} {'none':>6} {'plain':>6} {'keep-best':>9} {'reverted':>8} "
                     f"{'strict':>6} {'reverted':>8} {'check weights':>13} {'loss rule':>9} {'plain diverged':>14}")
        by_domain: dict[str, list] = {}
        for r in rs:
            by_domain.setdefault(r["domain"], []).append(r)
        for domain, group in sorted(by_domain.items()) + [("average", rs)]:
            cols = {k: [] for k in ("none", "plain", "keep-best", "strict", "checked", "loss")}
            reverted = {"keep-best": 0, "strict": 0}
            diverged = 0
            for r in group:
                k, p, kb = r["keep"], r.get("plain", {}), r["keep"]["keep_best"]
                plain = p.get("after", 0.1)
                diverged += "after" not in p
                cols["none"].append(k["before"])
                cols["plain"].append(plain)
                for rule in ("keep-best", "strict", "loss"):  # the rule's decision on the plain run
                    back = kb is not None and RULES[rule](kb)
                    reverted[rule] = reverted.get(rule, 0) + back
                    cols[rule].append(k["before"] if back else plain)
                if kb is not None and "tolerance" in kb:  # decided by microtrain itself: its own result
                    cols["keep-best"][-1] = k["after"]
                back = kb is not None and RULES["keep-best"](kb)
                cols["checked"].append(k["before"] if back or kb is None else kb["query_accuracy_checked"])
            m = {key: 100 * np.mean(v) for key, v in cols.items()}
            lines.append(f"  {domain.split('.')[0]:<16} {len(group):>8} {m['none']:6.1f} {m['plain']:6.1f} "
                         f"{m['keep-best']:9.1f} {reverted['keep-best']:>4}/{len(group):<3} {m['strict']:6.1f} "
                         f"{reverted['strict']:>4}/{len(group):<3} {m['checked']:13.1f} {m['loss']:9.1f} "
                         f"{diverged:>14}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mcunet-5fps")
    p.add_argument("--methods", default="tinytrain,fulltrain")
    p.add_argument("--seeds", default="1000-1007", help="validation seeds: a range lo-hi or a comma list")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--mac-budget", default="15%fwd",
                   help="TinyTrain's MAC budget (default %(default)s, adapt's default when the README's figures "
                        "were measured; adapt's is now 15%% of FullTrain's backward MACs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/keep_best.jsonl")
    p.add_argument("--report-only", action="store_true", help="print the table of what --out holds")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.report_only:
        seeds = _seeds(args.seeds)
        if any(0 <= s < 200 for s in seeds):
            p.error("seeds 0-199 are the evaluation's: use validation seeds (1000+)")
        have = {(r["backbone"], r["domain"], r["seed"], r["method"]) for r in done}
        tasks = [(args.backbone, d, s, m, args.mac_budget) for m in args.methods.split(",")
                 for d in args.domains.split(",") for s in seeds if (args.backbone, d, s, m) not in have]
        out.parent.mkdir(parents=True, exist_ok=True)
        start, already = time.time(), len(done)
        with open(out, "a") as f:
            def finish(r):  # in this process, as each episode lands: one whole line each
                f.write(json.dumps(r) + "\n")
                f.flush()
                done.append(r)
                k, pl = r["keep"], r.get("plain", {})
                print(f"[{len(done) - already}/{len(tasks)} {time.time() - start:.0f}s] {r['method']} {r['domain']} "
                      f"{r['seed']}: none {100 * k.get('before', float('nan')):.0f} plain "
                      f"{100 * pl['after'] if 'after' in pl else float('nan'):.0f} keep {100 * k.get('after', float('nan')):.0f} "
                      f"({(k.get('keep_best') or {}).get('kept', k.get('error', '-'))})", flush=True)

            try:  # one thread per worker; Ctrl-C or SIGTERM ends the workers too
                run_pool(tasks, finish, args.workers, fn=one)
            except (KeyboardInterrupt, Terminated):
                print(f"interrupted: {len(done) - already} finished episodes kept in {out}; rerun to resume",
                      file=sys.stderr)
                return 130
    print(summarize(done))


if __name__ == "__main__":
    sys.exit(main())
