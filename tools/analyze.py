"""The analyses behind TinyTrain's Eq. 3, and method comparisons on validation episodes.

    python tools/analyze.py layers   [--backbones mcunet-5fps] [--domains traffic_sign] [--ratios 1,0.5,0.25,0.125]
    python tools/analyze.py rank     [--backbones mcunet-5fps,mbv2-w0.35,proxyless-w0.3] [--ratio 1]
    python tools/analyze.py channels [--backbones mcunet-5fps] [--layers blocks.13.expand,...]
    python tools/analyze.py meta     --backbones mcunet-5fps,mcunet-5fps-meta [--methods ...] [--grid DIR]
    python tools/analyze.py compare  --methods none,sparseupdate,tinytrain,tinytrain-plus [--reference sparseupdate]

- ``layers`` (the paper's Figure 3): the query-accuracy gain over no training of updating one
  layer at a time, on its top channels by Fisher information (Eq. 2) at four channel ratios;
  the figure and table give the gain, the gain per trained parameter and per backward MAC.
- ``rank``: how well the Fisher potential (Eq. 2) and the Eq. 3 score rank the layers by that
  measured gain: Spearman correlation per backbone (per episode, then averaged; and of the means).
  Runs the ``layers`` tasks it needs at ``--ratio``.
- ``channels`` (Figures 4 and 6b): the same single-layer updates at 50 / 25 / 12.5% of a layer's
  channels, chosen by Fisher information (dynamic), at random, or by weight L2 norm (static).
- ``meta`` (Figure 6a): every method on two backbones (e.g. without and with meta-training) on
  the same episodes, and the paired difference, averaged and per domain. ``meta`` and ``compare``
  run each method with its own fine-tuning, as the evaluation grid does; with ``--grid DIR`` they
  run nothing and read the records (and settings) of an evaluation folder instead.
- ``compare``: methods (``tinytrain-plus:key=value/key=value`` runs a variant of TinyTrain+'s rule) on
  the same episodes: accuracy per domain, backward memory and MACs, paired difference to
  ``--reference``. The design log of TinyTrain+ was made with it.

Every adaptation is ``microtrain.pipeline.adapt_episode`` (the function behind
``python -m microtrain.adapt``); the single-layer analyses hand it their own selection. Each task
is one JSON record, written at once (temporary file, then rename) to
``OUT/<layer|method|fisher>/<backbone>/<domain>/<key>/<seed>.json``: a rerun skips finished tasks,
so a long analysis resumes where it stopped; ``OUT/config.json`` keeps the episode and fine-tuning
settings and refuses a rerun with other ones. Tasks run one after another in this process. Each
command then writes ``OUT/<command>.md`` (its table, and the command that regenerates it) and
``OUT/<command>.png`` (needs matplotlib). ``--report-only`` rewrites them from the records.

The default seeds, 1000-1002, are validation seeds (the evaluation's are 0-199). Bad options: one
line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROG = "python tools/analyze.py"
RATIOS = (1.0, 0.5, 0.25, 0.125)
POLICIES = ("fisher", "random", "l2")


def _ev():
    """The evaluation grid's library (settings, episodes, records, atomic writes)."""
    from microtrain import evaluation

    return evaluation


def _rep():
    """The evaluation report's helpers (intervals, number formats, domain labels)."""
    from microtrain import evaluation_report

    return evaluation_report


class UsageError(ValueError):
    """Bad command-line input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, backbones: str, domains: str, seeds: str = "1000-1002") -> None:
    p.add_argument("--backbones", default=backbones,
                   help="comma list: backbone names (mcunet-5fps, mbv2-w0.35, proxyless-w0.3, their -meta "
                        "versions) or .npz weight files (default %(default)s)")
    p.add_argument("--domains", default=domains, help="comma list of shared domains or dataset paths "
                                                      "(default %(default)s)")
    p.add_argument("--seeds", default=seeds, help="episode seeds, e.g. 1000-1004 or 1000,1003 (default %(default)s: "
                                                  "validation seeds; the evaluation uses 0-199)")
    _ev().add_settings_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/analyze", help="records and reports folder (default %(default)s)")
    g.add_argument("--report-only", action="store_true", help="run nothing; rewrite the table and figure")
    g.add_argument("--retry-errors", action="store_true", help="also rerun tasks recorded with an error")


def build_parser() -> argparse.ArgumentParser:
    """The parser of tools/analyze.py and its layers/rank/channels/compare/meta commands."""
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    lay = sub.add_parser("layers", help="Figure 3: gain of updating one layer at a time at four channel ratios")
    _common(lay, "mcunet-5fps", "traffic_sign")
    lay.add_argument("--ratios", default="1,0.5,0.25,0.125", help="shares of a layer's channels (default %(default)s)")
    lay.add_argument("--layers", default="all", help="comma list of layer names, or all (default)")
    rank = sub.add_parser("rank", help="Spearman correlation of Fisher potential / Eq. 3 with measured layer gain")
    _common(rank, "mcunet-5fps,mbv2-w0.35,proxyless-w0.3", "traffic_sign")
    rank.add_argument("--ratio", type=float, default=1.0, help="channel share of the measured updates (default 1)")
    rank.add_argument("--layers", default="all", help="comma list of layer names, or all (default)")
    ch = sub.add_parser("channels", help="Figures 4 and 6b: dynamic vs random vs L2-norm channels")
    _common(ch, "mcunet-5fps", "traffic_sign")
    ch.add_argument("--ratios", default="0.5,0.25,0.125", help="default %(default)s")
    ch.add_argument("--layers", default="all", help="comma list of layer names, or all (default)")
    meta = sub.add_parser("meta", help="Figure 6a: each method on two backbones (without / with meta-training)")
    _common(meta, "mcunet-5fps,mcunet-5fps-meta", ",".join(_ev().DEFAULT_DOMAINS))
    meta.add_argument("--methods", default="none,lastlayer,fulltrain,sparseupdate,tinytl,tinytrain,tinytrain-plus")
    _grid_option(meta)
    cmp_ = sub.add_parser("compare", help="methods and TinyTrain+ variants on the same episodes")
    _common(cmp_, "mcunet-5fps", ",".join(_ev().DEFAULT_DOMAINS))
    cmp_.add_argument("--methods", default="none,sparseupdate,tinytrain,tinytrain-plus",
                      help="comma list of methods; tinytrain-plus:key=value/key=value is a variant of its rule "
                           "(keys: microtrain.tinytrain_plus.PlusRule)")
    cmp_.add_argument("--reference", default="sparseupdate", help="paired differences against it (default %(default)s)")
    _grid_option(cmp_)
    return p


def _grid_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", type=Path, metavar="DIR",
                   help="run nothing: take the methods' records from this evaluation folder "
                        "(python -m microtrain.evaluate run --out DIR) and its settings (the settings options "
                        "are then ignored); the report goes to --out")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--{what}: cannot read {text!r} as numbers") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UsageError(f"--{what} takes shares in (0, 1], e.g. 1,0.5")
    return values


def _methods(text: str) -> list[str]:
    from microtrain.methods import METHODS
    from microtrain.tinytrain_plus import PlusRule

    methods = _ev().split_list(text, "methods")
    for m in methods:
        name, _, rule = m.partition(":")
        if name not in METHODS or (rule and name != "tinytrain-plus"):
            raise UsageError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
        try:
            PlusRule.parse(rule)
        except ValueError as exc:
            raise UsageError(f"{m}: {exc}") from None
    return methods


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------

def _key(text: str) -> str:
    return _ev()._key(text)


def record_path(out: Path, kind: str, backbone: str, domain: str, key: str, seed: int) -> Path:
    """Where one analysis task's record lives: OUT/KIND/BACKBONE/DOMAIN/KEY/SEED.json."""
    return out / kind / backbone / domain / _key(key) / f"{seed}.json"


def read_records(out: Path, kind: str) -> list[dict]:
    """Every readable record of one analysis kind ('layer', 'fisher', 'method') under ``out``."""
    ev = _ev()
    return [r for p in sorted((out / kind).glob("*/*/*/*.json")) if "unreadable" not in (r := ev.read_record(p)).get("error", "")]


def resolve_backbone(spec: str):
    """(key, network) of a --backbones entry: a backbone name or a weight file."""
    key, _, net = _ev().resolve_backbone(spec)
    return key, net


def _grid_settings(grid: Path) -> dict:
    """The settings an evaluation folder's records were made with (its config.json)."""
    settings = _ev().folder_settings(grid) if (grid / "episodes").is_dir() else None
    if settings is None:
        raise UsageError(f"--grid {grid}: not an evaluation folder (no episodes/ and config.json with settings)")
    return settings


class Context:
    """Options, resolved backbones and domains, and caches of datasets and decoded episodes."""

    def __init__(self, args, argv):
        ev = _ev()
        self.args, self.out = args, Path(args.out)
        self.seeds = ev.parse_seeds(args.seeds)
        self.grid = getattr(args, "grid", None)
        self.settings = ev.settings_of(args) if self.grid is None else _grid_settings(self.grid)
        specs = ev.split_list(args.backbones, "backbones")
        # with --grid nothing runs: the records name the backbones, no network is loaded
        self.backbones = ({ev.backbone_key(s): None for s in specs} if self.grid is not None
                          else dict(resolve_backbone(s) for s in specs))
        self.domains = {}
        for spec in _ev().split_list(args.domains, "domains"):
            key, path, _ = ev.resolve_domain(spec)
            self.domains[key] = path
        self.argv = argv
        self._datasets, self._episode = {}, (None, None)
        self.commit = ev._git_commit()

    def check_config(self) -> None:
        """Refuse to mix episode/fine-tuning settings in one folder."""
        ev = _ev()
        path = self.out / "config.json"
        if path.exists():
            old = ev.read_record(path).get("settings")
            if old != self.settings:
                raise UsageError(f"{self.out} holds records made with other settings ({old}): use another --out")
            return
        ev.write_json(path, {"settings": self.settings})

    def budgets(self, net):
        from microtrain.adapt import parse_macs
        from microtrain.method_plan import Budgets

        return Budgets(self.settings["mem_budget_bytes"], parse_macs(self.settings["mac_budget"], net))

    def episode(self, domain: str, seed: int, resolution: int):
        """(episode, decoded images); the last one is kept, as consecutive tasks share it."""
        from microtrain.data import open_dataset
        from microtrain.episodes import EpisodeImages

        key = (domain, seed, resolution)
        if self._episode[0] != key:
            if domain not in self._datasets:
                self._datasets[domain] = open_dataset(self.domains[domain])
            ep = _ev().draw_episode(self._datasets[domain], self.settings, seed)
            self._episode = (key, (ep, EpisodeImages(ep, resolution)))
        return self._episode[1]

    def finetune_config(self, method: str | None = None):
        """The fine-tuning configuration of the single-layer runs (TinyTrain's, batch 1), or with
        ``method`` that method's as the evaluation grid runs it (its ``per_method`` batch and lr:
        FullTrain and TinyTL at batch 100 under ``--protocol paper``)."""
        from microtrain.train import FinetuneConfig

        if method is None:
            return FinetuneConfig(**self.settings["finetune"])
        return FinetuneConfig(**_ev().method_finetune(self.settings, method.partition(":")[0]))


def run_tasks(ctx: Context, tasks: list[tuple[Path, object]]) -> None:
    """Run (record path, thunk) pairs whose record does not exist yet, writing each at once."""
    ev = _ev()
    retry = getattr(ctx.args, "retry_errors", False)
    todo = [(p, f) for p, f in tasks if not p.exists() or (retry and "error" in ev.read_record(p))]
    print(f"{len(tasks)} tasks, {len(tasks) - len(todo)} already in {ctx.out}, {len(todo)} to run", flush=True)
    start = time.perf_counter()
    for done, (path, thunk) in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            record = thunk()
        except Exception as exc:  # one task's failure is a result (e.g. a diverged loss)
            record = {"error": f"{type(exc).__name__}: {exc}"}
        record.update(seconds=time.perf_counter() - t0, commit=ctx.commit,
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        ev.write_json(path, ev._plain(record))
        eta = (time.perf_counter() - start) / done * (len(todo) - done)
        what = "/".join(path.relative_to(ctx.out).parts)
        acc = (f"gain {100 * (record['accuracy_after'] - record['accuracy_before']):+5.1f}"
               if "accuracy_after" in record else record.get("error", "")[:100])
        print(f"[{done}/{len(todo)}] {what}: {acc} ({record['seconds']:.0f} s, ETA {ev.duration(eta)})", flush=True)


# ----------------------------------------------------------------------------------------------
# single-layer updates (layers, rank, channels)
# ----------------------------------------------------------------------------------------------

def fisher_task(ctx: Context, backbone: str, domain: str, seed: int):
    """TinyTrain's Fisher information of every layer on one episode, and Eq. 3's score."""
    def run():
        import numpy as np

        from microtrain import tinytrain
        from microtrain.methods import support_fisher

        net = ctx.backbones[backbone]
        ep, im = ctx.episode(domain, seed, net.resolution)
        cfg = ctx.finetune_config()
        delta = support_fisher(net, im.support, ep.support_labels, cfg.scale, np.random.default_rng(cfg.seed))
        potential = tinytrain.fisher_potential(delta)
        return {"backbone": backbone, "domain": domain, "seed": seed, "delta": delta, "potential": potential,
                "score": tinytrain.multi_objective_scores(net.layers, potential)}
    return record_path(ctx.out, "fisher", backbone, domain, "fisher", seed), run


def _record(ctx: Context, task) -> dict:
    """The record of a (path, thunk) task, run first if it is not there yet."""
    path, run = task
    if not path.exists():
        run_tasks(ctx, [(path, run)])
    return _ev().read_record(path)


def _fisher(ctx, backbone, domain, seed) -> dict:
    return _record(ctx, fisher_task(ctx, backbone, domain, seed))


def shift_task(ctx: Context, backbone: str, domain: str, seed: int):
    """TinyTrain+'s criterion on one episode: each layer's shift Fisher information (its biases'
    empirical Fisher, ``tinytrain_plus.measured_fisher``, summed over the channels), and the
    earliest layer TinyTrain's budgets let the backward reach (``tinytrain_plus.reachable_depths``)."""
    def run():
        from microtrain import tinytrain_plus
        from microtrain.train import class_prototypes, embed

        net = ctx.backbones[backbone]
        ep, im = ctx.episode(domain, seed, net.resolution)
        cfg, labels = ctx.finetune_config(), ep.support_labels
        protos = class_prototypes(embed(net, im.support), labels, int(labels.max()) + 1)
        names = [layer.name for layer in net.layers]
        fisher = tinytrain_plus.support_fisher(net, names, im.support, labels, protos, cfg.scale, cfg.seed)
        budgets = ctx.budgets(net)
        reach = tinytrain_plus.reachable_depths(net.protonet_graph(1, len(protos), cfg.scale), net.layers,
                                                budgets.memory, budgets.macs, momentum=True)
        return {"backbone": backbone, "domain": domain, "seed": seed,
                "shift": {n: float(fisher[n].bias.sum()) for n in names},
                "reach_index": min(reach) if reach else len(names)}
    return record_path(ctx.out, "fisher", backbone, domain, "shift", seed), run


def layer_task(ctx: Context, backbone: str, domain: str, seed: int, layer: str, ratio: float, policy: str):
    """Fine-tune only ``ratio`` of ``layer``'s output channels (weights and biases), chosen by
    ``policy``: Fisher information (dynamic), at random, or by weight L2 norm."""
    key = f"{layer}@{ratio:g}-{policy}"

    def run():
        import numpy as np

        from microtrain.methods import MethodPlan, _static_channels, default_lr
        from microtrain.pipeline import adapt_episode
        from microtrain.selection import LayerUpdate, Selection

        base = ctx.backbones[backbone]
        spec = base.layer(layer)
        k = max(1, round(ratio * spec.out_channels))
        delta = np.asarray(_fisher(ctx, backbone, domain, seed)["delta"][layer])
        selection = Selection({layer: LayerUpdate.channels(np.argsort(-delta, kind="stable")[:k])})
        if policy != "fisher":
            rng = np.random.default_rng([seed, spec.index, k])
            selection = _static_channels(base, selection, policy, rng)
        rows = selection.get(layer).weight
        plan = MethodPlan(f"layer:{key}", selection, lr=default_lr("tinytrain"),
                          choices=[(layer, k, spec.out_channels, float(delta[rows].sum()))])
        ep, im = ctx.episode(domain, seed, base.resolution)
        record = adapt_episode(base.copy(), im.support, ep.support_labels, im.query, ep.query_labels, plan.method,
                               ctx.budgets(base), ctx.finetune_config(), plan=plan)
        record.pop("plan_table", None)
        record.update(backbone=backbone, domain=domain, seed=seed, layer=layer, ratio=ratio, policy=policy,
                      kind=spec.kind, index=spec.index, channels=k, rows=rows, out_channels=spec.out_channels,
                      trained_params=k * (spec.weights_per_channel + 1), layer_weights=spec.weight_count,
                      layer_macs=spec.macs)
        return record
    return record_path(ctx.out, "layer", backbone, domain, key, seed), run


def _layer_names(net, text: str) -> list[str]:
    if text == "all":
        return [layer.name for layer in net.layers]
    names = _ev().split_list(text, "layers")
    for n in names:
        try:
            net.layer(n)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    return names


def _layer_tasks(ctx: Context, ratios, policies, layers_text: str) -> list:
    tasks = []
    for seed in ctx.seeds:  # seed-major: an interrupted run leaves whole episodes
        for backbone, net in ctx.backbones.items():
            for domain in ctx.domains:
                tasks.append(fisher_task(ctx, backbone, domain, seed))
                for layer in _layer_names(net, layers_text):
                    for ratio in ratios:
                        for policy in policies:
                            tasks.append(layer_task(ctx, backbone, domain, seed, layer, ratio, policy))
    return tasks


def _layer_results(ctx: Context, backbone: str, domain: str) -> dict:
    """(layer, ratio, policy) -> {seed: record} for the context's seeds."""
    out = {}
    for r in read_records(ctx.out, "layer"):
        if r.get("backbone") == backbone and r.get("domain") == domain and r.get("seed") in ctx.seeds and "error" not in r:
            out.setdefault((r["layer"], r["ratio"], r["policy"]), {})[r["seed"]] = r
    return out


def _gain(r: dict) -> float:
    return r["accuracy_after"] - r["accuracy_before"]


def report_layers(ctx: Context, ratios) -> None:
    """Figure 3 (layers.md, layers.png): each layer's gain when trained alone at each channel ratio,
    raw, per parameter and per backward MAC, mean and 95% interval over the episodes."""
    rep = _rep()
    import numpy as np

    lines, panels = _header(ctx, "Figure 3: accuracy gain of updating one layer at a time"), []
    lines += ["Gain = query accuracy after fine-tuning only that layer's top channels (by Fisher "
              "information, Eq. 2) minus before, in points; mean ± 95% interval over the episodes. Per "
              "parameter: per 1,000 trained weights and biases; per MAC: per million backward MACs of the "
              "update (input gradients behind the layer + its weight gradients).", ""]
    for backbone, net in ctx.backbones.items():
        for domain in ctx.domains:
            res = _layer_results(ctx, backbone, domain)
            layers = [l for l in net.layers if any((l.name, q, "fisher") in res for q in ratios)]
            if not layers:
                continue
            head = ["#", "layer", "kind"] + [f"gain @{q:g}" for q in ratios] + \
                   [f"per 1k params @{q:g}" for q in ratios] + [f"per M MACs @{q:g}" for q in ratios]
            lines += [f"## {backbone}, {rep._label(domain)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            series = {q: [] for q in ratios}
            for layer in layers:
                row = [str(layer.index), layer.name, layer.kind]
                per = {"gain": [], "param": [], "mac": []}
                for q in ratios:
                    rs = list(res.get((layer.name, q, "fisher"), {}).values())
                    g = rep.mean_ci([_gain(r) for r in rs])
                    p = rep.mean_ci([_gain(r) / r["trained_params"] * 1e3 for r in rs])
                    m = rep.mean_ci([_gain(r) / max(r["backward_macs"], 1) * 1e6 for r in rs])
                    per["gain"].append(rep._pm(g[0], g[1], signed=True) if rs else "–")
                    per["param"].append(f"{100 * p[0]:+.2f}" if rs else "–")
                    per["mac"].append(f"{100 * m[0]:+.2f}" if rs else "–")
                    series[q].append((layer.index, g[0], p[0], m[0]) if rs else (layer.index, np.nan, np.nan, np.nan))
                lines.append("| " + " | ".join(row + per["gain"] + per["param"] + per["mac"]) + " |")
            lines.append("")
            panels.append((f"{backbone}, {rep._label(domain)}", series))
    _write_report(ctx, "layers", lines)
    _figure(ctx, "layers", lambda plt: _plot_layers(plt, panels, ratios))


def _plot_layers(plt, panels, ratios):
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 3.6 * len(panels)), squeeze=False)
    titles = ("accuracy gain (points)", "gain per 1k trained parameters", "gain per M backward MACs")
    for row, (name, series) in enumerate(panels):
        for col in range(3):
            ax = axes[row][col]
            for k, q in enumerate(ratios):
                pts = series[q]
                xs = [p[0] + (k - 1.5) * 0.18 for p in pts]
                ax.bar(xs, [100 * p[col + 1] for p in pts], width=0.18, label=f"{100 * q:g}% channels")
            ax.axhline(0, color="gray", lw=0.6)
            if col == 1:  # per parameter spans orders of magnitude (small early layers)
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title(f"{name}: {titles[col]}" + (" (symlog)" if col == 1 else ""), fontsize=9)
            ax.set_xlabel("layer (conv index)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their average rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def report_rank(ctx: Context, ratio: float) -> None:
    """rank.md, rank.png: Spearman correlation between each criterion (Fisher potential, Eq. 3,
    shift Fisher information) and the measured single-layer gain, over all layers and over the
    layers the MAC budget lets the backward pass reach; per episode, then mean and interval."""
    rep = _rep()
    import numpy as np

    lines = _header(ctx, "How well Fisher potential (Eq. 2) and the Eq. 3 score rank layers by measured gain")
    lines += [f"Spearman correlation across layers between a criterion and the measured gain of updating "
              f"{100 * ratio:g}% of that layer's channels (its top channels by Fisher information). Criteria: P, "
              "TinyTrain's Fisher potential (Eq. 2); s, its Eq. 3 score; shift, TinyTrain+'s shift Fisher "
              "information (the layer's biases' empirical Fisher). Per episode (the criterion and the gains of that "
              "episode), mean ± 95% interval over episodes; 'of means': the criterion's and the gain's means over the "
              "episodes. Gain per cost: the gain divided by the layer's normalised parameter count × normalised "
              "MACs, the quantity Eq. 3 divides by. 'Reachable': only the layers from the earliest one the backward "
              "pass can reach within TinyTrain's budgets (the latest such layer over the episodes), the window "
              "both selections choose in.", "",
              "| backbone | domain | layers | episodes | ρ(P, gain) | ρ(s, gain) | ρ(shift, gain) | ρ(s, gain per cost) | "
              "ρ(P, gain) of means | ρ(s, gain) of means | reachable layers | ρ(P, gain) reachable | "
              "ρ(s, gain) reachable | ρ(shift, gain) reachable | best layer by gain | by P | by s | by shift |",
              "|" + "---|" * 18]
    points = []
    for backbone, net in ctx.backbones.items():
        max_w = max(l.weight_count for l in net.layers)
        max_m = max(l.macs for l in net.layers)
        for domain in ctx.domains:
            res = _layer_results(ctx, backbone, domain)
            layers = [l for l in net.layers if (l.name, ratio, "fisher") in res]
            seeds = [s for s in ctx.seeds if all(s in res[(l.name, ratio, "fisher")] for l in layers)]
            if len(layers) < 3 or not seeds:
                continue
            fisher = {s: _fisher(ctx, backbone, domain, s) for s in seeds}
            shift = {s: _record(ctx, shift_task(ctx, backbone, domain, s)) for s in seeds}
            gains = np.array([[_gain(res[(l.name, ratio, "fisher")][s]) for l in layers] for s in seeds])
            crit = {"P": np.array([[fisher[s]["potential"][l.name] for l in layers] for s in seeds]),
                    "s": np.array([[fisher[s]["score"][l.name] for l in layers] for s in seeds]),
                    "shift": np.array([[shift[s]["shift"][l.name] for l in layers] for s in seeds])}
            cost = np.array([(l.weight_count / max_w) * (l.macs / max_m) for l in layers])
            reach = max(shift[s]["reach_index"] for s in seeds)
            near = np.array([l.index >= reach for l in layers])

            def rho(name, mask=None, per_cost=False):
                out = []
                for i in range(len(seeds)):
                    g = gains[i] / cost if per_cost else gains[i]
                    c = crit[name][i]
                    out.append(spearman(c[mask], g[mask]) if mask is not None else spearman(c, g))
                return rep.mean_ci([v for v in out if math.isfinite(v)])

            cells = [rho("P"), rho("s"), rho("shift"), rho("s", per_cost=True)]
            window = [rho(k, near) for k in ("P", "s", "shift")] if near.sum() >= 3 else [(float("nan"), None)] * 3
            mean_g = gains.mean(0)
            best = lambda v: layers[int(np.argmax(v))].name  # noqa: E731
            lines.append("| " + " | ".join([
                backbone, rep._label(domain), str(len(layers)), str(len(seeds)),
                *[_rho(*c[:2]) for c in cells], _rho(spearman(crit["P"].mean(0), mean_g)),
                _rho(spearman(crit["s"].mean(0), mean_g)), f"{int(near.sum())} (from #{reach})",
                *[_rho(*c[:2]) for c in window],
                best(mean_g), best(crit["P"].mean(0)), best(crit["s"].mean(0)), best(crit["shift"].mean(0))]) + " |")
            points.append((f"{backbone}, {rep._label(domain)}", crit["P"].mean(0), crit["s"].mean(0), mean_g))
    lines.append("")
    _write_report(ctx, "rank", lines)
    _figure(ctx, "rank", lambda plt: _plot_rank(plt, points))


def _rho(value: float, half: float | None = None) -> str:
    if not math.isfinite(value):
        return "–"  # no episode where both sides vary
    return f"{value:+.2f}" + (f" ± {half:.2f}" if half is not None else "")


def _plot_rank(plt, points):
    import numpy as np

    fig, axes = plt.subplots(2, max(1, len(points)), figsize=(4.2 * max(1, len(points)), 7.5), squeeze=False)
    for col, (name, p, s, g) in enumerate(points):
        for row, (crit, label) in enumerate(((p, "Fisher potential P (Eq. 2)"), (s, "Eq. 3 score s"))):
            ax = axes[row][col]
            ax.scatter(np.log10(np.maximum(crit, 1e-30)), 100 * g, s=14)
            ax.set_xlabel(f"log10 {label}", fontsize=8)
            ax.set_ylabel("measured gain (points)", fontsize=8)
            ax.set_title(f"{name}\nSpearman {spearman(crit, g):+.2f}", fontsize=9)
    fig.tight_layout()
    return fig


def report_channels(ctx: Context, ratios) -> None:
    """Figures 4/6b (channels.md, channels.png): gain of dynamic (Fisher) vs random vs L2-norm
    channel choice per ratio, mean over layers and episodes, with paired differences."""
    rep = _rep()
    import numpy as np

    lines = _header(ctx, "Figures 4 and 6b: dynamic (Fisher) vs static (random, L2-norm) channel choice")
    lines += ["Gain of updating one layer's channels over no training (points), channels chosen by Fisher "
              "information on the episode (dynamic), at random, or by weight L2 norm; mean over the layers and "
              "episodes, and the paired difference (same layer and episode) with its 95% interval.", "",
              "| backbone | ratio | pairs | dynamic | random | L2 norm | dynamic − random | dynamic − L2 |",
              "|---|---|---|---|---|---|---|---|"]
    panels = []
    for backbone, net in ctx.backbones.items():
        for domain in ctx.domains:
            res = _layer_results(ctx, backbone, domain)
            for q in ratios:
                pairs = [(l.index, s, {p: _gain(res[(l.name, q, p)][s]) for p in POLICIES}) for l in net.layers
                         for s in ctx.seeds if all(s in res.get((l.name, q, p), {}) for p in POLICIES)]
                if not pairs:
                    continue
                cell = {p: rep.mean_ci([g[p] for _, _, g in pairs]) for p in POLICIES}
                d_r = rep.mean_ci([g["fisher"] - g["random"] for _, _, g in pairs])
                d_l = rep.mean_ci([g["fisher"] - g["l2"] for _, _, g in pairs])
                lines.append("| " + " | ".join([f"{backbone}, {rep._label(domain)}", f"{100 * q:g}%", str(len(pairs)),
                                                *[rep._pm(*cell[p][:2], signed=True) for p in POLICIES],
                                                rep._pm(*d_r[:2], signed=True), rep._pm(*d_l[:2], signed=True)]) + " |")
                by_layer = {}
                for index, _, g in pairs:
                    by_layer.setdefault(index, []).append(g)
                panels.append((f"{backbone}, {rep._label(domain)}, {100 * q:g}% channels",
                               {i: {p: float(np.mean([g[p] for g in gs])) for p in POLICIES} for i, gs in by_layer.items()},
                               cell))
    lines.append("")
    _write_report(ctx, "channels", lines)
    _figure(ctx, "channels", lambda plt: _plot_channels(plt, panels))


def _plot_channels(plt, panels):
    fig, axes = plt.subplots(max(1, len(panels)), 2, figsize=(14, 3.4 * max(1, len(panels))), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    labels = {"fisher": "dynamic (Fisher)", "random": "random", "l2": "L2 norm"}
    for row, (name, by_layer, cell) in enumerate(panels):
        ax = axes[row][0]
        idx = sorted(by_layer)
        for k, p in enumerate(POLICIES):
            ax.bar([i + (k - 1) * 0.27 for i in idx], [100 * by_layer[i][p] for i in idx], width=0.27, label=labels[p])
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_title(f"{name}: gain per layer (Figure 4)", fontsize=9)
        ax.set_xlabel("layer (conv index)")
        ax.set_ylabel("gain (points)")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        ax.bar(range(3), [100 * cell[p][0] for p in POLICIES],
               yerr=[100 * (cell[p][1] or 0) for p in POLICIES], capsize=3, color=["tab:blue", "tab:orange", "tab:green"])
        ax.set_xticks(range(3), [labels[p] for p in POLICIES], fontsize=7, rotation=20)
        ax.set_title("mean over layers (Figure 6b)", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# whole methods (meta, compare)
# ----------------------------------------------------------------------------------------------

def method_task(ctx: Context, backbone: str, domain: str, seed: int, method: str):
    """(record path, a function that adapts one episode with ``method`` and returns its record)."""
    def run():
        from microtrain.pipeline import adapt_episode

        base = ctx.backbones[backbone]
        ep, im = ctx.episode(domain, seed, base.resolution)
        net = base.copy()
        record = adapt_episode(net, im.support, ep.support_labels, im.query, ep.query_labels, method,
                               ctx.budgets(base), ctx.finetune_config(method))
        record.pop("plan_table", None)
        record.update(backbone=backbone, domain=domain, seed=seed, method=method, way=ep.way,
                      support_size=len(ep.support))
        return record
    return record_path(ctx.out, "method", backbone, domain, method, seed), run


def _method_tasks(ctx: Context, methods) -> list:
    return [method_task(ctx, b, d, s, m) for s in ctx.seeds for b in ctx.backbones for d in ctx.domains
            for m in methods]


def _method_results(ctx: Context, methods) -> dict:
    """(backbone, method, domain) -> {seed: record}, from this analysis's records or ``--grid``'s."""
    out = {}
    records = _rep().load_records(ctx.grid) if ctx.grid is not None else read_records(ctx.out, "method")
    for r in records:
        if r.get("seed") in ctx.seeds and r.get("method") in methods and r.get("backbone") in ctx.backbones \
                and r.get("domain") in ctx.domains and "error" not in r:
            out.setdefault((r["backbone"], r["method"], r["domain"]), {})[r["seed"]] = r
    return out


def _average(rep, res, backbone, method, domains):
    """(mean, half-width) of a method's accuracy averaged over the domains (``domain_average``)."""
    mean = rep.domain_average({d: {s: r["accuracy_after"] for s, r in res.get((backbone, method, d), {}).items()}
                               for d in domains}, list(domains))
    return mean[:2] if mean else (float("nan"), None)


def _paired(rep, a: dict, b: dict, domains) -> tuple[float, float | None]:
    """(mean, half-width) over the domains of the paired per-episode differences a - b
    (``domain_average``)."""
    diffs = {d: {s: a[d][s]["accuracy_after"] - b[d][s]["accuracy_after"]
                 for s in sorted(set(a.get(d, {})) & set(b.get(d, {})))} for d in domains}
    mean = rep.domain_average(diffs, list(domains))
    return mean[:2] if mean else (float("nan"), None)


def report_compare(ctx: Context, methods, reference: str, backbone: str | None = None) -> None:
    """compare.md: each method's accuracy per domain and averaged, its paired difference to
    ``reference``, backward memory (bytes), backward MACs and selection seconds."""
    ev, rep = _ev(), _rep()
    import numpy as np

    res = _method_results(ctx, methods)
    domains = list(ctx.domains)
    lines = _header(ctx, "Methods on the same episodes")
    for b in ctx.backbones if backbone is None else [backbone]:
        head = ["method", *[rep._label(d) for d in domains], "average", f"− {reference} (paired)",
                "backward memory", "backward MACs", "selection s"]
        lines += [f"## {b}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by = lambda m: {d: res.get((b, m, d), {}) for d in domains}  # noqa: E731
        for m in methods:
            rs = [r for d in domains for r in res.get((b, m, d), {}).values()]
            if not rs:
                continue
            cells = [rep._pm(*rep.mean_ci([r["accuracy_after"] for r in res[(b, m, d)].values()])[:2])
                     if (b, m, d) in res else "–" for d in domains]
            avg = _average(rep, res, b, m, domains)
            diff = _paired(rep, by(m), by(reference), domains) if m != reference else (float("nan"), None)
            mem = [r["memory"]["backward_planned_bytes"] for r in rs if r.get("memory")]
            lines.append("| " + " | ".join([
                f"`{m}`", *cells, f"**{rep._pm(*avg)}**", rep._pm(*diff, signed=True),
                ev.format_bytes(float(np.mean(mem))) if mem else "–", rep._macs(float(np.mean([r["backward_macs"] for r in rs]))),
                f"{np.mean([r['time_seconds']['selection'] for r in rs]):.2f}"]) + " |")
        n = {len(v) for v in res.values()}
        lines += ["", f"Episodes per cell: {', '.join(map(str, sorted(n)))}.", ""]
    _write_report(ctx, "compare", lines)


def report_meta(ctx: Context, methods) -> None:
    """Figure 6a (meta.md, meta.png): each method's average accuracy on the two --backbones (without,
    with meta-training), the paired difference overall and per domain; ``UsageError`` unless
    exactly two backbones are given."""
    rep = _rep()
    res = _method_results(ctx, methods)
    domains = list(ctx.domains)
    names = list(ctx.backbones)
    if len(names) != 2:
        raise UsageError("meta compares exactly two backbones: --backbones WITHOUT,WITH")
    a, b = names
    lines = _header(ctx, f"Figure 6a: each method on {a} and on {b}")
    lines += [f"Average query accuracy over {len(domains)} domain(s) (%), mean ± 95% interval; the difference is "
              "paired on the same episodes.", "",
              f"| method | {a} | {b} | {b} − {a} |", "|---|---|---|---|"]
    bars, rows = [], []
    for m in methods:
        on_a, on_b = ({d: res.get((k, m, d), {}) for d in domains} for k in (a, b))
        pa, pb = _average(rep, res, a, m, domains), _average(rep, res, b, m, domains)
        lines.append(f"| {m} | {rep._pm(*pa)} | {rep._pm(*pb)} | {rep._pm(*_paired(rep, on_b, on_a, domains), signed=True)} |")
        bars.append((m, pa, pb))
        for d in domains:
            seeds = sorted(set(on_a[d]) & set(on_b[d]))
            if seeds:
                x, y = ([o[d][s]["accuracy_after"] for s in seeds] for o in (on_a, on_b))
                diff = rep.mean_ci([v - u for u, v in zip(x, y)])
                rows.append(f"| {m} | {rep._label(d)} | {len(seeds)} | {rep._pm(*rep.mean_ci(x)[:2])} | "
                            f"{rep._pm(*rep.mean_ci(y)[:2])} | {rep._pm(*diff[:2], signed=True)} |")
    lines += ["", "Per domain, over the episodes both backbones finished (n):", "",
              f"| method | domain | n | {a} | {b} | {b} − {a} (paired) |", "|---|---|---|---|---|---|", *rows, ""]
    _write_report(ctx, "meta", lines)
    _figure(ctx, "meta", lambda plt: _plot_meta(plt, bars, a, b))


def _plot_meta(plt, bars, a, b):
    fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 4))
    xs = range(len(bars))
    for k, (label, pick) in enumerate(((a, 1), (b, 2))):
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], [100 * bar[pick][0] for bar in bars], width=0.38, label=label,
               yerr=[100 * (bar[pick][1] or 0) for bar in bars], capsize=3)
    ax.set_xticks(list(xs), [bar[0] for bar in bars], rotation=20, fontsize=8)
    ax.set_ylabel("average query accuracy (%)")
    ax.set_title("Figure 6a: without and with meta-training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------

def _header(ctx: Context, title: str) -> list[str]:
    ev = _ev()
    s = ctx.settings
    argv = [*PROG.split(), *(a for a in ctx.argv if a != "--report-only")]  # the command that computes it
    return [f"# {title}", "", "Regenerate (finished records are kept):", "", "```",
            " ".join(shlex.quote(a) for a in argv), "```", "",
            f"Seeds {ev.format_seeds(ctx.seeds)}; " + "; ".join(ev.describe_settings(s, [])).replace("- ", ""), ""]


def _write_report(ctx: Context, name: str, lines: list[str]) -> None:
    from microtrain.paths import write_atomic

    text = "\n".join(lines) + "\n"
    write_atomic(ctx.out / f"{name}.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {ctx.out / f'{name}.md'}", flush=True)


def _figure(ctx: Context, name: str, draw) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: {name}.png skipped (pip install matplotlib)", file=sys.stderr)
        return
    from microtrain.paths import write_atomic

    fig = draw(plt)
    try:
        write_atomic(ctx.out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    print(f"wrote {ctx.out / f'{name}.png'}", flush=True)


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        from microtrain.checkpoint import CheckpointError
        from microtrain.data import DataError
        from microtrain.evaluation import GridError
        from microtrain.paths import MissingSharedError

        try:
            ctx = Context(args, argv)
            cmd = args.command
            if cmd in ("layers", "channels"):
                ratios = _floats(args.ratios, "ratios")
                policies = ("fisher",) if cmd == "layers" else POLICIES
                tasks = _layer_tasks(ctx, ratios, policies, args.layers)
            elif cmd == "rank":
                ratios = [args.ratio]
                tasks = _layer_tasks(ctx, ratios, ("fisher",), args.layers)
            else:
                methods = _methods(args.methods)
                if cmd == "compare" and args.reference not in methods:
                    raise UsageError(f"--reference {args.reference} is not among --methods")
                tasks = _method_tasks(ctx, methods)
            if not args.report_only and ctx.grid is None:
                ctx.check_config()
                run_tasks(ctx, tasks)
            if cmd == "layers":
                report_layers(ctx, ratios)
            elif cmd == "rank":
                report_rank(ctx, args.ratio)
            elif cmd == "channels":
                report_channels(ctx, ratios)
            elif cmd == "meta":
                report_meta(ctx, methods)
            else:
                report_compare(ctx, methods, args.reference)
            return 0
        except (DataError, CheckpointError, MissingSharedError, GridError) as exc:
            raise UsageError(str(exc)) from None
    except UsageError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished records are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
