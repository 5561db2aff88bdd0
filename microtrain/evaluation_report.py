"""The evaluation grid's report: TinyTrain's Table 1, Table 2 and Figure 1 from the episode records.

``write_report(out)`` reads every ``OUT/episodes/**.json`` (written by ``microtrain.evaluation``)
and writes ``OUT/results.json`` (all records), ``OUT/report.md`` (Table 1: query accuracy, mean
and 95% interval by Student's t, per domain and averaged, and the episodes each method left
below no training; Table 2: backward memory and MACs, their ratios to TinyTrain's, end-to-end
time and the selection's share) and
``OUT/figure1_<backbone>.png`` (accuracy against backward MACs, marker size by backward memory;
needs matplotlib, otherwise skipped with a note).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np

from .evaluation import (DOMAINS, PROG, GridError, describe_settings, duration, format_bytes, format_seeds, read_record,
                         settings_options, stored_settings, write_json)
from .methods import METHODS
from .paths import write_atomic
from .stats import mean_ci, t_quantile  # noqa: F401 - t_quantile is part of this module's interface

REFERENCE = "tinytrain"  # Table 2's ratios and the improvement column are relative to it
BASELINE = "none"
# the paired-differences table: each task-adaptive method against the static and the full update
ADAPTIVE = ("tinytrain", "sparseupdate-fisher")  # and every tinytrain-plus variant
PAIRED_AGAINST = ("sparseupdate", "fulltrain")


def load_records(out: Path) -> list[dict]:
    """Every episode record under OUT/episodes, in a stable order."""
    records = []
    for path in sorted((out / "episodes").glob("*/*/*/*.json")):
        rec = read_record(path)
        if rec.get("error") == "unreadable record":
            print(f"note: {path} is unreadable, left out", file=sys.stderr)
            continue
        records.append(rec)
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["backbone"], _domain_order(r["domain"]), order.get(r["method"], len(order)),
                                r["method"], r["seed"]))
    return records


def _domain_order(key: str):
    names = list(DOMAINS)
    return (names.index(key), "") if key in DOMAINS else (len(names), key)


def _label(domain: str) -> str:
    return DOMAINS[domain][1] if domain in DOMAINS else domain


def _in_average(domain: str) -> bool:
    return not (domain in DOMAINS and DOMAINS[domain][2])


def _combine(cells) -> tuple[float, float | None]:
    """Mean of per-domain means; its interval from the domains' standard errors (independent)."""
    means = [c[0] for c in cells]
    if any(c[1] is None for c in cells):
        return sum(means) / len(means), None
    return sum(means) / len(means), math.sqrt(sum(c[1] ** 2 for c in cells)) / len(cells)


def domain_average(by_domain: dict, domains: list[str]) -> tuple[float, float | None, int] | None:
    """The average over ``domains`` of per-episode values ``by_domain[domain][seed]`` (fractions):
    (mean, 95% half-width, n seeds), or None if a domain has no values.

    An episode's seed draws its way and shots the same way in every domain (``episodes``), so the
    domains' results at one seed are not independent and their intervals cannot simply be
    combined. Where at least two seeds are finished in every domain, each such seed's values are
    averaged over the domains and the interval is Student's t over those seeds; otherwise (a
    partial grid) the mean of the domain means with the domains' intervals combined as if
    independent (``n`` is then 0)."""
    if not domains or any(not by_domain.get(d) for d in domains):
        return None
    seeds = sorted(set.intersection(*(set(by_domain[d]) for d in domains)))
    if len(seeds) >= 2:
        return mean_ci([sum(by_domain[d][seed] for d in domains) / len(domains) for seed in seeds])
    return (*_combine([mean_ci(list(by_domain[d].values())) for d in domains]), 0)


def _pm(mean: float, half: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{scale * mean:+.1f}" if signed else f"{scale * mean:.1f}"
    return text + (f" ± {scale * half:.1f}" if half is not None else " ± –")


def _macs(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _ratio(x, ref) -> str:
    return "–" if x is None or not ref else f"{x / ref:.2f}×"


def _paired(acc: dict, a: str, b: str, domains: list[str], averaged: list[str]) -> dict:
    """Domain -> (mean, half-width, n) of method ``a``'s accuracy minus ``b``'s on the same
    episodes (fractions; the seeds both have), and 'average' over ``averaged`` when every one of
    them has pairs (``domain_average``, as Table 1's average)."""
    out, diffs = {}, {}
    for d in domains:
        x, y = acc.get((a, d), {}), acc.get((b, d), {})
        diffs[d] = {seed: x[seed] - y[seed] for seed in sorted(set(x) & set(y))}
        if diffs[d]:
            out[d] = mean_ci(list(diffs[d].values()))
    average = domain_average(diffs, averaged)
    if average:
        out["average"] = average
    return out


def _paired_table(s: dict) -> list[str]:
    """Markdown rows of the paired differences ``a − b`` per domain and averaged, in points."""
    head = ["difference", *(_label(d) for d in s["domains"])] + (["**average**"] if s["averaged"] else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (a, b), diff in s["pairs"].items():
        row = [f"{a} − {b}"]
        for d in s["domains"]:
            g = diff.get(d)
            row.append(f"{_pm(*g[:2], signed=True)} (n={g[2]})" if g else "–")
        if s["averaged"]:
            g = diff.get("average")
            row.append(f"**{_pm(*g[:2], signed=True)}**" if g else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summarize(records: list[dict]) -> dict:
    """Per backbone: the numbers of Table 1, Table 2 and Figure 1."""
    out = {}
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        recs = [r for r in records if r["backbone"] == backbone]
        ok = [r for r in recs if "error" not in r]
        methods = list(dict.fromkeys(r["method"] for r in recs))
        domains = list(dict.fromkeys(r["domain"] for r in recs))
        acc = {}  # (method, domain) -> {seed: accuracy}
        for r in ok:
            acc.setdefault((r["method"], r["domain"]), {})[r["seed"]] = r["accuracy_after"]
        fails = {}
        for r in recs:
            if "error" in r:
                fails.setdefault((r["method"], r["domain"]), []).append(r)
        cells = {k: mean_ci(v.values()) for k, v in acc.items()}
        averaged = [d for d in domains if _in_average(d)]
        average = {}
        for m in methods:
            mean = domain_average({d: acc.get((m, d), {}) for d in averaged}, averaged)
            if mean:
                average[m] = mean
        gain = _paired(acc, REFERENCE, BASELINE, domains, averaged) if {REFERENCE, BASELINE} <= set(methods) else {}
        pairs = {(a, b): _paired(acc, a, b, domains, averaged) for a in methods if a in ADAPTIVE or
                 a.startswith("tinytrain-plus") for b in PAIRED_AGAINST if b in methods}
        costs, worse, rose = {}, {}, {}
        for m in methods:
            rs = [r for r in ok if r["method"] == m]
            # how often fine-tuning left an episode worse than its untrained prototypes (a collapse
            # shows here even when the mean hides it), and how often the training loss itself ended
            # above where it started (the optimisation diverged rather than overfitted)
            worse[m] = (sum(r["accuracy_after"] < r["accuracy_before"] for r in rs), len(rs))
            trained = [r["losses"] for r in rs if r.get("losses")]
            rose[m] = (sum(loss["last"] > loss["first"] for loss in trained), len(trained))
            if not rs:
                continue
            mem = [r["memory"]["backward_planned_bytes"] for r in rs if r.get("memory")]
            arena = [r["memory"]["arena_planned_bytes"] for r in rs if r.get("memory")]
            batches = [r["finetune"]["batch"] for r in rs if r.get("memory") and r.get("finetune")]
            costs[m] = {"episodes": len(rs), "batch": (min(batches), max(batches)) if batches else None,
                        "backward_bytes": float(np.mean(mem)) if mem else None,
                        "arena_bytes": float(np.mean(arena)) if arena else None,
                        "backward_macs": float(np.mean([r["backward_macs"] for r in rs])),
                        "forward_macs": rs[0]["forward_macs"],
                        "end_to_end": float(np.mean([r["time_seconds"]["end_to_end"] for r in rs])),
                        "selection": float(np.mean([r["time_seconds"]["selection"] for r in rs])),
                        "training": float(np.mean([r["time_seconds"]["training"] for r in rs])),
                        "selection_share": float(np.mean([r["selection_share"] for r in rs]))}
        # the same episode must score the same before training whatever the method
        before = {}
        for r in ok:
            before.setdefault((r["domain"], r["seed"]), set()).add(round(r["accuracy_before"], 9))
        mismatched = sorted(k for k, v in before.items() if len(v) > 1)
        out[backbone] = {"records": recs, "methods": methods, "domains": domains, "averaged": averaged,
                         "acc": acc, "cells": cells, "average": average, "gain": gain, "pairs": pairs, "fails": fails,
                         "worse": worse, "rose": rose,
                         "costs": costs, "before_mismatch": mismatched}
    return out


def _table1(s: dict) -> tuple[list[str], int | None]:
    methods, domains = s["methods"], s["domains"]
    ns = {c[2] for c in s["cells"].values()}
    uniform = len(ns) == 1
    has_gain = bool(s["gain"])
    head = ["domain", *methods] + ([f"{REFERENCE} − {BASELINE}"] if has_gain else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(m, d):
        c = s["cells"].get((m, d))
        text = _pm(*c[:2]) if c else "–"
        if c and not uniform:
            text += f" (n={c[2]})"
        failed = len(s["fails"].get((m, d), []))
        return text + (f" ({failed} failed)" if failed else "")

    for d in domains:
        row = [_label(d)] + [cell(m, d) for m in methods]
        if has_gain:
            g = s["gain"].get(d)
            row.append(_pm(*g[:2], signed=True) if g else "–")
        lines.append("| " + " | ".join(row) + " |")
    if s["averaged"]:
        counts = sorted({s["average"][m][2] for m in methods if m in s["average"]} - {0})  # seeds per method
        span = ("" if not counts else f", n={counts[0]} seeds" if len(counts) == 1
                else f", n={counts[0]}–{counts[-1]} seeds")
        row = [f"**average** ({len(s['averaged'])} domain{'s' if len(s['averaged']) > 1 else ''}{span})"]
        row += [f"**{_pm(*s['average'][m][:2])}**" if m in s["average"] else "–" for m in methods]
        if has_gain:
            g = s["gain"].get("average")
            row.append(f"**{_pm(*g[:2], signed=True)}**" if g else "–")
        lines.append("| " + " | ".join(row) + " |")
    for label, key in (("episodes worse than no training", "worse"), ("episodes whose training loss rose", "rose")):
        row = [label] + ["–" if m == BASELINE or not s[key][m][1] else f"{s[key][m][0]} of {s[key][m][1]}"
                         for m in methods]
        lines.append("| " + " | ".join(row + (["–"] if has_gain else [])) + " |")
    return lines, (ns.pop() if uniform else None)


def _batches(span) -> str:
    return "–" if span is None else str(span[0]) if span[0] == span[1] else f"{span[0]}–{span[1]}"


def _table2(s: dict) -> list[str]:
    costs = s["costs"]
    ref = costs.get(REFERENCE, {})
    head = ["method", "episodes", "batch", "backward memory (planned)", f"÷ {REFERENCE}", "backward MACs",
            f"÷ {REFERENCE}", "arena (planned)", "end-to-end s", "selection s", "training s", "selection share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in s["methods"]:
        c = costs.get(m)
        if c is None:
            lines.append(f"| {m} | 0 | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        lines.append("| " + " | ".join([
            m, str(c["episodes"]), _batches(c["batch"]),
            format_bytes(c["backward_bytes"]), _ratio(c["backward_bytes"], ref.get("backward_bytes")),
            _macs(c["backward_macs"]) if c["backward_macs"] else "0",
            _ratio(c["backward_macs"], ref.get("backward_macs")) if c["backward_macs"] else "–",
            format_bytes(c["arena_bytes"]), f"{c['end_to_end']:.2f}", f"{c['selection']:.2f}", f"{c['training']:.2f}",
            f"{100 * c['selection_share']:.1f}%"]) + " |")
    return lines


def _command(out: Path, s: dict, config: dict, settings: dict | None) -> str:
    seeds = sorted({r["seed"] for r in s["records"]})
    seed_opt = (["--episodes", str(len(seeds))] if seeds == list(range(len(seeds)))
                else ["--seeds", format_seeds(seeds)])
    backbone = s["records"][0]["backbone"]
    domain_specs = config.get("domains", {})
    argv = [*PROG.split(), "run", "--backbones", config.get("backbones", {}).get(backbone, backbone),
            "--methods", ",".join(s["methods"]),
            "--domains", ",".join(domain_specs.get(d, d) for d in s["domains"]), *seed_opt]
    if settings is not None:
        argv += settings_options(settings)
    argv += ["--out", str(out)]
    return " ".join(shlex.quote(a) for a in argv)



def _label_offsets(points, close_macs: float = 0.2, close_acc: float = 1.5, step: float = 22.0) -> dict:
    """Vertical label offsets (points) for Figure 1: methods at nearly the same backward MACs
    (log ratio < ``close_macs``) and accuracy (< ``close_acc`` points apart) get their labels
    stacked ``step`` apart, best accuracy on top, instead of printed over each other."""
    offsets, cluster = {}, []
    for m, macs, acc in sorted(points, key=lambda p: (p[1], -p[2])) + [(None, None, None)]:
        if cluster and m is not None and abs(math.log(macs / cluster[0][1])) < close_macs \
                and abs(acc - cluster[-1][2]) < close_acc:
            cluster.append((m, macs, acc))
            continue
        ranked = sorted(cluster, key=lambda p: -p[2])
        for rank, (name, _, _) in enumerate(ranked):
            offsets[name] = ((len(ranked) - 1) / 2 - rank) * step if len(ranked) > 1 else 0.0
        cluster = [(m, macs, acc)]
    return offsets


def format_ratio(ratio: float) -> str:
    """A ratio for a figure label, two significant digits: '0.57×', '66×', '597×' (not '6e+02×')."""
    return f"{ratio:.2g}×" if ratio < 100 else f"{ratio:,.0f}×"


def write_figure(out: Path, backbone: str, s: dict) -> str | None:
    """Figure 1: average accuracy against backward MACs; returns the file name, or None (with a note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: {backbone}'s Figure 1 skipped (pip install matplotlib)",
              file=sys.stderr)
        return None
    points = [(m, s["costs"][m], s["average"][m][0]) for m in s["methods"]
              if m in s["average"] and m in s["costs"] and s["costs"][m]["backward_macs"] > 0]
    if not points:
        print(f"note: {backbone}: no method has an average accuracy over all domains and backward MACs: "
              "Figure 1 skipped")
        return None
    mems = [c["backward_bytes"] or 1.0 for _, c, _ in points]
    lo, hi = math.log(min(mems)), math.log(max(mems))
    ref = s["costs"].get(REFERENCE, {}).get("backward_bytes")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 5))
    label_dy = _label_offsets([(m, c["backward_macs"], 100 * a) for m, c, a in points])
    ys = []
    for (m, c, a), mem in zip(points, mems):
        size = 80 + 900 * ((math.log(mem) - lo) / (hi - lo) if hi > lo else 0.5)
        color = "tab:red" if m == REFERENCE else "tab:blue"
        half = s["average"][m][1]
        if half is not None:
            ax.errorbar(c["backward_macs"], 100 * a, yerr=100 * half, color=color, alpha=0.4, capsize=3, zorder=2)
            ys += [100 * (a - half), 100 * (a + half)]
        ax.scatter(c["backward_macs"], 100 * a, s=size, alpha=0.5, color=color, edgecolors="black",
                   linewidths=0.6, zorder=3)
        ys.append(100 * a)
        label = f"{m}\n{format_bytes(c['backward_bytes'])}"
        if ref and m != REFERENCE:
            label += f" ({format_ratio(c['backward_bytes'] / ref)} mem)"
        dy = label_dy.get(m, 0.0)
        ax.annotate(label, (c["backward_macs"], 100 * a), textcoords="offset points",
                    xytext=(math.sqrt(size) / 2 + 4, dy), fontsize=8, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"} if dy else None)
    if BASELINE in s["average"]:
        y = 100 * s["average"][BASELINE][0]
        ys.append(y)
        ax.axhline(y, linestyle=":", color="gray", zorder=1)
        ax.annotate(f"{BASELINE} (no training) {y:.1f}%", (0.01, y), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    pad = max(1.0, 0.12 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xscale("log")
    xs = [c["backward_macs"] for _, c, _ in points]
    ax.set_xlim(min(xs) / 2.5, max(xs) * 5)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("backward MACs per training step (log scale)")
    ax.set_ylabel(f"average query accuracy (%) over {len(s['averaged'])} domain(s)")
    ax.set_title(f"{backbone}: accuracy vs backward compute\n(marker area grows with log backward memory; "
                 "bars: 95% interval)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    name = f"figure1_{backbone}.png"
    try:
        write_atomic(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return name


def write_report(out: Path) -> dict:
    """results.json, report.md and the figures from OUT/episodes; returns the summary."""
    if not (out / "episodes").is_dir():
        raise GridError(f"{out}: no episodes/ folder (run `{PROG} run --out {out}` first)")
    records = load_records(out)
    config = {}
    if (out / "config.json").exists():
        config = read_record(out / "config.json")
    settings = stored_settings(config.get("settings"))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json(out / "results.json", {"generated_at": now, "settings": settings, "records": records})
    summary = summarize(records)

    lines = ["# microtrain evaluation: TinyTrain's Table 1, Table 2 and Figure 1", "",
             f"Generated {now} from {len(records)} episode records in `{out}` "
             f"({sum('error' in r for r in records)} failed).", "",
             f"Rebuild this report from the episode files: `{PROG} report --out {shlex.quote(str(out))}`", ""]
    finished = sorted(r["finished_at"] for r in records if r.get("finished_at"))
    commits = sorted({r.get("commit") or "unknown" for r in records})
    hosts = sorted({r["worker"]["host"] for r in records if (r.get("worker") or {}).get("host")})
    cpus = sorted({f"{r['worker']['cpu']} (OpenBLAS {r['worker'].get('blas') or 'not found'})"
                   for r in records if (r.get("worker") or {}).get("cpu")})
    unnamed = sum(1 for r in records if r.get("worker") and not r["worker"].get("cpu"))
    if finished:
        lines.append(f"Episodes run {finished[0]} – {finished[-1]}, microtrain commit {', '.join(commits)}; "
                     f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, NumPy {np.__version__}, "
                     f"Numba {numba.__version__}"
                     + (f"; episodes computed on {', '.join(hosts)}" if hosts else "")
                     + (f", CPU {', '.join(cpus)}" if cpus else "")
                     + (f" (and {unnamed} record(s) from before records named their CPU)" if cpus and unnamed else "") + ".")
        lines.append("")
    lines += ["## Settings", "", *describe_settings(settings, records, config.get("backbones")), ""]
    if not records:
        lines += ["No episodes yet.", ""]
    for backbone, s in summary.items():
        table1, n = _table1(s)
        seeds = sorted({r["seed"] for r in s["records"]})
        lines += [f"## {backbone}", "", "Regenerate (finished episodes are kept; a fresh `--out` recomputes all):", "",
                  "```", _command(out, s, config, settings), "```", "",
                  "### Table 1: query accuracy (%)", "",
                  "Mean ± 95% interval (t × sample std / √n, t the 97.5% quantile of Student's t with n − 1 "
                  "degrees of freedom" + (f": {t_quantile(0.95, n - 1):.3f}" if n and n > 1 else "") + ") over the episodes "
                  + (f"(n = {n} per cell, seeds {format_seeds(seeds)})" if n else "(n per cell as shown)")
                  + ". The average is over the domains"
                  + (", excluding the in-domain control" if len(s["averaged"]) < len(s["domains"]) else "")
                  + ", over the seeds finished in every domain: each seed's mean over the domains, its interval "
                  "Student's t over the seeds (one seed draws the way and shots of every domain's episode, so "
                  "the domains are not independent)."
                  + (f" `{REFERENCE} − {BASELINE}`: paired difference on the same episodes, in points."
                     if s["gain"] else "")
                  + " Last row: the episodes (all domains) whose query accuracy fell below the untrained"
                    " prototypes' on the same episode.", "", *table1, ""]
        if s["before_mismatch"]:
            lines += [f"Warning: accuracy before training differs between methods on {len(s['before_mismatch'])} "
                      f"episode(s), e.g. {s['before_mismatch'][0]}: the episodes are not the same.", ""]
        if any(s["pairs"].values()):
            lines += ["### Paired differences", "",
                      "Accuracy of each task-adaptive method minus the static (SparseUpdate) and the full "
                      "(FullTrain) update on the same episodes, in points: mean ± 95% interval (Student's t) "
                      "over the episodes both finished (n); the average is over the seeds finished in every domain, as "
                      "in Table 1.", "",
                      *_paired_table(s), ""]
        lines += ["### Table 2: backward pass costs", "",
                  "Means over every successful episode of all domains. Backward memory is the planner's "
                  "figure: weights being updated + their gradients and optimizer state + activations kept "
                  "for backward, at the batch each method ran (column batch, the range over the episodes: a "
                  "batch is at most the support set; KB = 1024 bytes); the arena adds the transient buffers. "
                  "Backward MACs are per training step; forward: "
                  f"{_macs(next(iter(s['costs'].values()))['forward_macs']) if s['costs'] else '–'}. "
                  "End-to-end = load + selection + training; selection share = selection / end-to-end.", "",
                  *_table2(s), ""]
        figure = write_figure(out, backbone, s)
        if figure:
            lines += ["### Figure 1", "", f"![accuracy vs backward MACs]({figure})", ""]
        if s["fails"]:
            lines += ["### Failed episodes", "", "| method | domain | seed | error |", "|---|---|---|---|"]
            for (m, d), rs in s["fails"].items():
                for r in rs:
                    err = r["error"].splitlines()[0].replace("|", "\\|")[:200]
                    lines.append(f"| {m} | {_label(d)} | {r['seed']} | {err} |")
            lines.append("")
    text = "\n".join(lines)
    write_atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({len(records)} episode records)", flush=True)
    return summary




def estimate_wall_time(records: list[dict], backbones: list[str], methods: list[str], domains: int, episodes: int,
                       workers: list[int]) -> list[str]:
    """Lines estimating a grid's wall time from measured records: per (backbone, method), the mean
    ``task_seconds`` of its successful records (seconds on one worker, a single-threaded process
    on one core); the grid's task-seconds are those means times ``domains`` x ``episodes``, and N
    workers need at least task-seconds / N (perfect packing) and at least the longest task.
    Raises GridError when a (backbone, method) has no measured record."""
    times: dict = {}
    for r in records:
        if "error" not in r and r.get("task_seconds") is not None:
            times.setdefault((r["backbone"], r["method"]), []).append(r["task_seconds"])
    missing = [f"{b}/{m}" for b in backbones for m in methods if (b, m) not in times]
    if missing:
        raise GridError(f"no successful record to time {', '.join(missing)}")
    lines = ["Mean seconds per task (successful records; n per cell):", "",
             "| backbone | " + " | ".join(methods) + " | per (domain, episode) |", "|---" * (len(methods) + 2) + "|"]
    total = 0.0
    for b in backbones:
        cells = [(float(np.mean(times[(b, m)])), len(times[(b, m)])) for m in methods]
        total += sum(c[0] for c in cells) * domains * episodes
        lines.append(f"| {b} | " + " | ".join(f"{t:.2f} (n={n})" for t, n in cells)
                     + f" | {sum(c[0] for c in cells):.1f} |")
    longest = max(max(times[(b, m)]) for b in backbones for m in methods)
    n_tasks = len(backbones) * len(methods) * domains * episodes
    lines += ["", f"Grid: {len(backbones)} backbone(s) x {len(methods)} method(s) x {domains} domain(s) x {episodes} "
                  f"episode(s) = {n_tasks:,} tasks, {total:,.0f} task-seconds ({duration(total)} on one worker).",
              f"Estimated wall time (task-seconds / workers; never below the longest task, {longest:.0f} s):"]
    lines += [f"  {w:>4} worker(s): {duration(max(total / w, longest))}" for w in workers]
    return lines
