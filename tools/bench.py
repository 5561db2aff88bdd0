"""Benchmarks (measurements, not tests).

    python tools/bench.py kernels [--threads N] [--repeats R]
    python tools/bench.py step [--backbones mcunet-5fps,mbv2-w0.35,proxyless-w0.3] [--repeats R]
                               [--threads T] [--batch 1,25,100] [--methods fulltrain,...]
                               [--profile missed|all|off]
    python tools/bench.py rss [--threads T] [--runs K]

``kernels``: for the MCUNet-5fps (128x128) target shapes at batch 1, the time of forward,
backward-input and backward-weight (all output channels, and 25% of them) for microtrain next to
PyTorch CPU measured in the same run with the same thread count, and the ratio mt/torch. Torch
has no channel-masked weight gradient, so both weight rows compare against its full one.
Without torch it prints microtrain's figures only.

``step``: per backbone at its resolution and per batch size (``--batch 1,25,100``; default 1), the
time of ONE training step (forward + backward + SGD update; no data loading or augmentation) and
the time per image, of each method (``--methods``; default all at batch 1, ``fulltrain`` -- what
meta-training runs -- when a larger batch is asked, batch 1 then measured too) -- ``none`` (forward only),
``lastlayer``, ``fulltrain``, ``sparseupdate`` and one fixed TinyTrain selection (planned once on
the default task's support set under the default budgets) -- for microtrain (an ``Executor`` on
``net.protonet_graph(batch, ways, scale)``) and for PyTorch (``tools/torch_mbconv.py``, same weights,
same prototype loss, ``requires_grad`` on the trained layers' parameters only, whole layers since
torch cannot restrict channels; ``torch.optim.SGD`` with the same momentum). The two are timed
interleaved batch by batch in one process; the table gives medians, their spread, the ratio, the
process CPU time per image of each (what a step costs on a loaded machine, whatever share of the
cores it got), and the planned backward memory and backward MACs of each method; targets: batch 1 per method
(``STEP_TARGETS``), FullTrain at batch 100 at most PyTorch's time and no more time per image
than at batch 1. Without ``--threads`` each library
keeps its own default thread count (printed); with it, both are set: microtrain's executor runs
the shards of a batched op on that many threads (``MICROTRAIN_THREADS``; one BLAS thread inside
each, OpenBLAS set before NumPy is imported), torch with ``set_num_threads``. ``--profile`` splits
microtrain's step of the MCUNet methods that miss their target (or all) by op and phase into
compiled-kernel/BLAS time and Python time, next to torch's profiler's view of its own step.

``rss``: peak RSS and wall time of a whole adaptation of the default task, each in a fresh
subprocess spawned from a parent that imports neither NumPy nor torch (a child's ``ru_maxrss``
starts from its parent's RSS when it was spawned, so a heavy parent would inflate it):
``python -m microtrain.adapt --quiet`` and ``python tools/torch_adapt.py`` (the same task in
PyTorch, training the layers microtrain's TinyTrain chose, whole), then the ratio, and the RSS a
bare interpreter and each library's imports account for.

Both ``step`` and ``rss`` print the load average and how much CPU other processes took while they
ran: on a shared box the figures are only as good as the machine was quiet.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_time(fn, repeats: int = 15, min_batch_s: float = 0.002) -> float:
    """Median over ``repeats`` batches of the seconds one call of ``fn()`` takes.

    Calls ``fn`` once to warm up, then sizes each batch to last at least ``min_batch_s`` so the
    clock's resolution does not matter. The median ignores the batches another process
    pre-empted (this box is shared).
    """
    fn()
    number, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        t = time.perf_counter() - t0
        if t >= min_batch_s or number >= 1 << 16:
            break
        number *= 2
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    times.sort()
    return times[len(times) // 2]


# --------------------------------------------------------------------------- kernels
# (label, kind, in channels, out channels, kernel, stride, spatial size)
KERNEL_SHAPES = [
    ("conv3x3 3->16 s2 @128", "conv", 3, 16, 3, 2, 128),
    ("dw3x3 48 s1 @32", "dw", 48, 48, 3, 1, 32),
    ("dw7x7 160 s1 @8", "dw", 160, 160, 7, 1, 8),
    ("dw7x7 240 s2 @8", "dw", 240, 240, 7, 2, 8),
    ("dw5x5 384 s1 @4", "dw", 384, 384, 5, 1, 4),
    ("pw 48->240 @8", "pw", 48, 240, 1, 1, 8),
    ("pw 96->576 @4", "pw", 96, 576, 1, 1, 4),
    ("pw 16->48 @32", "pw", 16, 48, 1, 1, 32),
    ("pw 576->160 @4", "pw", 576, 160, 1, 1, 4),
]


def _kernel_cases(kind, I, O, k, s, S, np, K, torch):
    """[(row name, microtrain callable, torch callable or None)] for one shape."""
    rng = np.random.default_rng(0)
    Ho = (S + 2 * ((k - 1) // 2) - k) // s + 1
    x = rng.standard_normal((1, I, S, S)).astype(np.float32)
    w = rng.standard_normal((O, 1 if kind == "dw" else I, k, k)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    out = np.empty((1, O, Ho, Ho), np.float32)
    dy = rng.standard_normal(out.shape).astype(np.float32)
    dx = np.empty_like(x)
    every = np.arange(O, dtype=np.int64)
    quarter = np.sort(rng.permutation(O)[: max(1, O // 4)]).astype(np.int64)
    groups = O if kind == "dw" else 1
    if kind == "conv":
        scratch = np.empty(K.conv2d_forward_scratch_size(x.shape, k, s, 1), np.float32)  # as the arena gives
        fwd = lambda: K.conv2d_forward(out, x, w, b, s, 1, scratch)  # noqa: E731
        bwi = lambda: K.conv2d_backward_input(dx, dy, w, s, 1, scratch)  # noqa: E731
        def bww(ch):
            dw = np.empty((len(ch),) + w.shape[1:], np.float32)
            return lambda: K.conv2d_backward_weight(dw, dy, x, s, 1, ch)
    elif kind == "dw":
        scratch = np.empty(K.depthwise_scratch_size(x.shape, k, s), np.float32)
        fwd = lambda: K.depthwise_forward(out, x, w, b, s, scratch)  # noqa: E731
        bwi = lambda: K.depthwise_backward_input(dx, dy, w, s, scratch)  # noqa: E731
        def bww(ch):
            dw = np.empty((len(ch), 1, k, k), np.float32)
            x_sel = np.ascontiguousarray(x[:, ch])
            return lambda: K.depthwise_backward_weight(dw, dy, x_sel, s, ch)
    else:
        fwd = lambda: K.pointwise_forward(out, x, w, b)  # noqa: E731
        bwi = lambda: K.pointwise_backward_input(dx, dy, w)  # noqa: E731
        def bww(ch):
            dw = np.empty((len(ch), I, 1, 1), np.float32)
            return lambda: K.pointwise_backward_weight(dw, dy, x, ch)
    if torch is None:
        t_fwd = t_bwi = t_bww = None
    else:
        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        p = (k - 1) // 2
        F = torch.nn.functional
        def t_fwd():
            with torch.no_grad():
                F.conv2d(tx, tw, tb, s, p, 1, groups)
        def t_bwi():
            with torch.no_grad():
                torch.nn.grad.conv2d_input(tx.shape, tw, tdy, s, p, 1, groups)
        def t_bww():
            with torch.no_grad():
                torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, s, p, 1, groups)
    return [("forward", fwd, t_fwd), ("backward-input", bwi, t_bwi),
            ("backward-weight 100%", bww(every), t_bww), ("backward-weight 25%", bww(quarter), t_bww)]


def cmd_kernels(args) -> int:
    """``kernels``: each kernel's time at the MCUNet target shapes next to PyTorch's same op, same
    thread count."""
    import numpy as np
    import numba
    import microtrain.kernels as K
    try:
        import torch
    except ImportError:
        torch = None
    numba.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    print(f"threads={args.threads} (numba, torch, OpenBLAS)  median of {args.repeats} batches; "
          f"numpy {np.__version__}, numba {numba.__version__}, "
          + (f"torch {torch.__version__}" if torch is not None else "torch absent: microtrain only"))
    header = f"{'shape':24s} {'op':22s} {'mt us':>9s}"
    if torch is not None:
        header += f" {'torch us':>9s} {'mt/torch':>9s}"
    print(header)
    print("-" * len(header))
    for label, kind, I, O, k, s, S in KERNEL_SHAPES:
        for name, mt, tt in _kernel_cases(kind, I, O, k, s, S, np, K, torch):
            t_mt = median_time(mt, args.repeats)
            line = f"{label:24s} {name:22s} {t_mt * 1e6:9.1f}"
            if tt is not None:
                t_t = median_time(tt, args.repeats)
                line += f" {t_t * 1e6:9.1f} {t_mt / t_t:9.2f}"
            print(line, flush=True)
    return 0


# --------------------------------------------------------------------------- machine load
def _cpu_ticks() -> dict[int, int]:
    """utime + stime + cutime + cstime (clock ticks) of every process now: a process that exits
    and is reaped carries its time over to its parent's cutime/cstime."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[int(entry)] = sum(int(v) for v in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return ticks


class OtherCPU:
    """CPU taken by processes other than this one (and ``exclude``) since construction, in cores."""

    def __init__(self):
        self.t0, self.ticks = time.monotonic(), _cpu_ticks()

    def cores(self, exclude=()) -> float:
        now, dt = _cpu_ticks(), max(time.monotonic() - self.t0, 1e-9)
        skip = {os.getpid(), *exclude}
        # totals now minus totals then: a process gone since then is made up for by its parent
        used = (sum(t for pid, t in now.items() if pid not in skip)
                - sum(t for pid, t in self.ticks.items() if pid not in skip))
        return max(used, 0) / os.sysconf("SC_CLK_TCK") / dt


def load_line(label: str, other: OtherCPU | None = None, exclude=(), threads: int | None = None) -> str:
    """Load averages and, over the interval ``other`` covers, the CPU other processes took;
    a WARNING when that is more than a quarter of a core."""
    with open("/proc/loadavg") as f:
        la = f.read().split()
    cores = os.cpu_count() or 1
    line = f"[load {label}] load average {la[0]} {la[1]} {la[2]} ({la[3]} runnable/total), {cores} cores"
    if other is not None:
        busy = other.cores(exclude)
        line += f"; other processes used {busy:.2f} of {cores} cores meanwhile"
        if busy > 0.25:
            line += (f"\n  WARNING: the machine is loaded by other processes ({busy:.2f} cores busy besides "
                     f"this benchmark): times are inflated and noisy, multi-threaded ones most")
            if threads is not None and threads > 1 and threads + busy > cores:
                line += (f"\n  WARNING: {threads} threads per library + {busy:.2f} busy cores > {cores} cores: "
                         f"a multi-threaded op waits for its descheduled thread, so these times measure the "
                         f"scheduler more than the code; compare with --threads 1")
    return line


# --------------------------------------------------------------------------- threads
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MICROTRAIN_THREADS")


def _openblas_threads():
    """(threads, library file) of the OpenBLAS NumPy loaded, asked through its C API."""
    from microtrain.evaluation import openblas

    return openblas(("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                     "openblas_get_num_threads64_", "openblas_get_num_threads"))


def _compiled_kernels():
    """(every Numba kernel of microtrain.kernels, the names of those compiled parallel=True)."""
    import microtrain.kernels  # noqa: F401

    every, parallel = [], []
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("microtrain.kernels.") or mod is None:
            continue
        for name, obj in vars(mod).items():
            opts = getattr(obj, "targetoptions", None)
            if isinstance(opts, dict) and getattr(obj, "py_func", None) is not None:
                every.append(f"{modname.rsplit('.', 1)[1]}.{name}")
                if opts.get("parallel"):
                    parallel.append(every[-1])
    return every, parallel


def thread_report(threads, torch, policy=None) -> str:
    """One line on the thread counts in force (Numba, OpenBLAS, PyTorch) and who set them."""
    policy = policy or {}
    import numba

    blas, blas_lib = _openblas_threads()
    every, parallel = _compiled_kernels()
    env = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ) or "none set"
    how = (f"--threads {threads}: set for both" if threads is not None else
           "each library's own default: microtrain's import set " + (", ".join(f"{k}={v}" for k, v in policy.items())
                                                                   or "nothing") +
           (" (OMP/MKL removed again before torch was imported)" if policy else "")
           + "; torch uses every core it sees")
    from microtrain.autograd import MAX_SHARDS, SHARD_IMAGES, default_threads

    lines = [f"threads ({how}; cores: {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}; env: {env})",
             f"  microtrain: executor {default_threads()} thread(s) over the shards of a batched op "
             f"(batches of {2 * SHARD_IMAGES}+ images split into up to {MAX_SHARDS} slices, whatever the "
             f"thread count); OpenBLAS {blas} ({blas_lib}; NumPy's matmul in the pointwise forward and "
             f"backward-input), Numba {numba.get_num_threads()} -- but {len(parallel)} of {len(every)} "
             f"microtrain kernels are compiled parallel=True{(' (' + ', '.join(parallel) + ')') if parallel else ''}, "
             f"so the Numba kernels run on one thread"]
    if torch is not None:
        lines.append(f"  torch {torch.__version__}: intra-op {torch.get_num_threads()}, inter-op "
                     f"{torch.get_num_interop_threads()} ({torch.__config__.parallel_info().splitlines()[-1].strip()})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- step
STEP_METHODS = ("none", "lastlayer", "fulltrain", "sparseupdate", "tinytrain", "tinytrain-plus")
BACKBONES = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
TARGET_BACKBONE = "mcunet-5fps"
PAUSE_S = 0.3  # before each timed batch when a library runs more than one thread
STEP_TARGETS = {"none": 1.5, "fulltrain": 1.0, "tinytrain": 0.5}  # mt/torch step time, MCUNet, batch 1
BATCH_TARGETS = {"fulltrain": 1.0}  # mt/torch step time, MCUNet, batch >= BATCH_TARGET_SIZE (meta-training)
BATCH_TARGET_SIZE = 100


def _step_target(method: str, batch: int) -> float | None:
    """The mt/torch target of a method at a batch size, if it has one."""
    if batch == 1:
        return STEP_TARGETS.get(method)
    return BATCH_TARGETS.get(method) if batch >= BATCH_TARGET_SIZE else None


def _loaded(busy: float, threads: int) -> bool:
    """Whether other processes left fewer free cores than a library's threads (a quarter core of
    slack): its times then include waiting for a core."""
    return busy > (os.cpu_count() or 1) - threads + 0.25


def interleaved_times(fns, repeats: int, min_batch_s: float = 0.05, warmup: int = 3,
                      pause_s: float = 0.0, cpu: list | None = None) -> list[list[float]]:
    """Per function, ``repeats`` sorted seconds-per-call, measured in batches that alternate
    between the functions (first one first on even rounds, last one first on odd rounds). With
    ``cpu`` (a list), the process CPU seconds per call of each batch go there too, sorted, one
    list per function: on a loaded machine that is what a step costs, whatever share of the
    cores the scheduler gave it (all threads' CPU summed).

    Each function is warmed up ``warmup`` calls, then its batch is sized to last ``min_batch_s``.
    ``pause_s`` > 0 sleeps before every batch: an idle OpenBLAS worker keeps spinning on a core for
    about 0.1 s after its last call (and OpenMP workers for a while too), which slows whatever runs
    next on a 2-core box, so with multi-threaded libraries the other library's threads must first
    go to sleep. One untimed call after the pause wakes the library's own threads, as a training
    loop's previous step would have."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    numbers = []
    for fn in fns:
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if time.perf_counter() - t0 >= min_batch_s or number >= 1 << 16:
                break
            number *= 2
        numbers.append(number)
    samples: list[list[float]] = [[] for _ in fns]
    cpu_samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            fn, number = fns[i], numbers[i]
            if pause_s > 0:
                time.sleep(pause_s)
            fn()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(number):
                fn()
            samples[i].append((time.perf_counter() - t0) / number)
            cpu_samples[i].append((time.process_time() - c0) / number)
    if cpu is not None:
        cpu.extend(sorted(s) for s in cpu_samples)
    return [sorted(s) for s in samples]


def _median(sorted_times):
    return sorted_times[len(sorted_times) // 2]


def _spread(sorted_times) -> float:
    """Half the interquartile range as a share of the median."""
    n = len(sorted_times)
    return (sorted_times[(3 * n) // 4] - sorted_times[n // 4]) / 2 / _median(sorted_times)


def default_task(name: str):
    """The default task of ``python -m microtrain.adapt`` for backbone ``name``: the network, the
    episode's images, the budgets and the fine-tuning configuration (batch 1)."""
    from microtrain import model as mt_model
    from microtrain.adapt import DEFAULT_DATA, build_parser as adapt_parser, parse_bytes, parse_macs
    from microtrain.checkpoint import ensure_converted
    from microtrain.data import open_dataset
    from microtrain.episodes import EpisodeImages, sample_episode
    from microtrain.methods import Budgets
    from microtrain.paths import shared_file
    from microtrain.train import FinetuneConfig

    d = adapt_parser().parse_args([])
    net = mt_model.load(ensure_converted(name))
    episode = sample_episode(open_dataset(shared_file("data", DEFAULT_DATA)), d.way, d.shot, d.query_shots, d.seed)
    images = EpisodeImages(episode, net.resolution)
    budgets = Budgets(parse_bytes(d.mem_budget), parse_macs(d.mac_budget, net))
    cfg = FinetuneConfig(epochs=d.epochs, lr=d.lr, momentum=d.momentum, weight_decay=d.weight_decay,
                         scale=d.scale, batch=1, seed=d.train_seed)
    return net, images, budgets, cfg


class StepCase:
    """One method on one backbone at one batch size (``len(x)``): a microtrain step and a torch
    step on the same input."""

    @staticmethod
    def momentum_of(plan, cfg) -> float:
        return cfg.momentum if plan.momentum is None else plan.momentum

    @staticmethod
    def lr_of(plan, cfg) -> float:
        """The learning rate fine-tuning would use: the user's, else the method's own default."""
        return cfg.lr if cfg.lr is not None else (getattr(plan, "lr", None) or 3e-3)

    def __init__(self, method, plan, net0, cfg, x, protos, label, torch):
        from microtrain.autograd import Executor
        from microtrain.optim import SGD
        from microtrain.tinytrain import backward_macs
        from torch_mbconv import build_torch_model, prototype_loss, set_trainable

        self.method, self.plan, self.batch = method, plan, len(x)
        self.momentum = self.momentum_of(plan, cfg)
        self.lr = self.lr_of(plan, cfg)
        ways = len(protos)
        # microtrain: its own copy of the weights (SGD writes them), one planned executor.
        net = net0.copy()
        self.run = run = Executor(net.protonet_graph(self.batch, ways, cfg.scale), plan.selection,
                                  momentum=self.momentum > 0)
        self.feeds = feeds = {"image": x, "prototypes": protos, "labels": label}
        self.trains = plan.trains
        if plan.trains:
            self.opt = opt = SGD(self.lr, self.momentum, cfg.weight_decay, plan.row_scales)  # as finetune's

            def mt_step():
                run.forward(feeds)
                run.backward()
                opt.step(run)
        else:
            self.opt = None

            def mt_step():
                run.forward(feeds, train=False)
        self.mt_step = mt_step
        self.backward_bytes = run.plan.backward_bytes if plan.trains else 0
        if plan.trains:  # the signature changed once (it took the layer list); accept both
            try:
                self.backward_macs = backward_macs(run.program)
            except TypeError:
                self.backward_macs = backward_macs(run.program, net.layers)
        else:
            self.backward_macs = 0
        self.mt_params = sum(a.size for node, _ in run.trained() for a in run.master(node.name) if a is not None)
        # torch: the same weights; trained layers whole (channel subsets cannot be expressed).
        self.model = model = build_torch_model(net0.arch, net0.state())
        names = []
        for layer, upd in plan.selection.layers.items():
            if upd.trains_weight:
                names.append(f"{layer}.weight")
            if upd.trains_bias:
                names.append(f"{layer}.bias")
        params = set_trainable(model, names)
        self.torch_params = sum(p.numel() for p in params)
        tx, tp, ty = torch.from_numpy(x.copy()), torch.from_numpy(protos.copy()), torch.from_numpy(label.copy())
        if params:
            topt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=cfg.weight_decay)

            def torch_step():
                topt.zero_grad()
                loss = prototype_loss(model.features(tx), tp, ty, cfg.scale)
                loss.backward()
                topt.step()
        else:
            def torch_step():
                with torch.no_grad():
                    prototype_loss(model.features(tx), tp, ty, cfg.scale)
        self.torch_step = torch_step


def _patch_kernels(make):
    """Replace every compiled kernel of microtrain's op modules, and their NumPy matmul, by
    ``make(original)`` where the Python wrappers look them up; returns what to restore."""
    import numpy as np

    patched = []
    for modname, mod in list(sys.modules.items()):
        if (not modname.startswith("microtrain.kernels.") or mod is None
                or modname.rsplit(".", 1)[1] in ("_jit", "reference")):
            continue
        for name, obj in list(vars(mod).items()):
            if name.startswith("_") and (getattr(obj, "py_func", None) is not None or obj is np.matmul):
                patched.append((mod, name, obj))
                setattr(mod, name, make(obj))
    return patched


def _unpatch(patched) -> None:
    for mod, name, obj in patched:
        setattr(mod, name, obj)


def _profile_mt(case: StepCase, steps: int) -> None:
    """Where microtrain's step goes: each op call of the executor timed, the compiled kernels and
    BLAS calls inside it timed separately (module globals wrapped for the duration), so each
    (phase, op) splits into kernel time and Python time (op method + kernel wrapper checks)."""
    import numpy as np

    run, opt, feeds = case.run, case.opt, case.feeds
    plain = median_time(case.mt_step, repeats=15, min_batch_s=0.05)
    inner = [0.0]

    def wrap(fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inner[0] += time.perf_counter() - t0
        return timed

    patched = _patch_kernels(wrap)
    nodes, resolved = run.graph.nodes, run._resolved
    per_step: list[dict] = []
    by_node: dict[tuple[str, str], float] = {}

    def call(stats, key, node_name, fn, *a):
        c0, t0 = inner[0], time.perf_counter()
        fn(*a)
        dt, dc = time.perf_counter() - t0, inner[0] - c0
        s = stats.setdefault(key, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += dt
        s[2] += dc
        by_node[(node_name, key[0])] = by_node.get((node_name, key[0]), 0.0) + dt

    try:
        for i in range(steps + 3):
            stats: dict = {}
            for key, array in feeds.items():
                call(stats, ("feed", "copy"), key, np.copyto, run.value(key), array)
            for node, r in zip(nodes, resolved):
                call(stats, ("forward", node.op.kind), node.name, run.forward_node, node, r, case.trains)
            if case.trains:
                resolved[-1]["dy"][()] = 1.0
                for node in reversed(nodes):
                    r = resolved[node.index]
                    if not r["runs_backward"]:
                        continue
                    if node.update is not None:  # with the sum over the shards
                        call(stats, ("backward-weight", node.op.kind), node.name, run.backward_node, node, r,
                             ("weight",))
                    if any(dx is not None for dx in r["dxs"]):  # with the gradient sums of values used twice
                        call(stats, ("backward-input", node.op.kind), node.name, run.backward_node, node, r,
                             ("input",))
                call(stats, ("optimizer", "SGD.step"), "optimizer", opt.step, run)
            if i == 2:
                by_node.clear()
            if i >= 3:  # the first three are warm-up
                per_step.append(stats)
    finally:
        _unpatch(patched)
    # The same executor step with every compiled kernel and BLAS call replaced by a no-op: what
    # is left is Python (op methods, kernel wrappers' checks, executor loop, SGD's NumPy calls).
    patched = _patch_kernels(lambda fn: (lambda *a, **k: 0.0))
    try:
        python_only = median_time(case.mt_step, repeats=15, min_batch_s=0.05)
    finally:
        _unpatch(patched)

    keys = sorted({k for s in per_step for k in s},
                  key=lambda k: (["feed", "forward", "backward-weight", "backward-input", "optimizer"].index(k[0]), k[1]))

    def med(key, j):
        return sorted(s[key][j] if key in s else 0.0 for s in per_step)[len(per_step) // 2]

    rows, tot_call, tot_kernel, tot_calls = [], 0.0, 0.0, 0
    for key in keys:
        calls = per_step[0].get(key, [0])[0]
        t_call, t_kernel = med(key, 1), med(key, 2)
        rows.append((key, calls, t_call, t_kernel))
        tot_call, tot_kernel, tot_calls = tot_call + t_call, tot_kernel + t_kernel, tot_calls + calls
    print(f"  microtrain {case.method}: plain step {plain * 1e3:.2f} ms (median, measured just now); "
          f"per-op medians over {steps} profiled steps:")
    print(f"    {'phase':<16} {'op':<16} {'calls':>5} {'total us':>9} {'kernel us':>9} {'python us':>9} "
          f"{'py us/call':>10} {'share':>6}")
    for (phase, kind), calls, t_call, t_kernel in rows:
        print(f"    {phase:<16} {kind:<16} {calls:>5} {t_call * 1e6:>9.0f} {t_kernel * 1e6:>9.0f} "
              f"{(t_call - t_kernel) * 1e6:>9.0f} {(t_call - t_kernel) * 1e6 / max(calls, 1):>10.1f} "
              f"{t_call / plain:>6.0%}")
    print(f"    {'sum of op calls':<33} {tot_calls:>5} {tot_call * 1e6:>9.0f} {tot_kernel * 1e6:>9.0f} "
          f"{(tot_call - tot_kernel) * 1e6:>9.0f} {(tot_call - tot_kernel) * 1e6 / max(tot_calls, 1):>10.1f}")
    rest = plain - tot_kernel - python_only
    print(f"    => step {plain * 1e3:.2f} ms = kernels/BLAS {tot_kernel * 1e3:.2f} ms ({tot_kernel / plain:.0%}) "
          f"+ Python {python_only * 1e3:.2f} ms ({python_only / plain:.0%}; measured with every kernel and "
          f"BLAS call stubbed out: {python_only * 1e6 / max(tot_calls, 1):.1f} us per op call x {tot_calls}, "
          f"executor loop, op methods, wrapper checks and SGD included) + unaccounted {rest * 1e3:.2f} ms "
          f"({rest / plain:.0%}: noise between the separately measured parts)")
    top = sorted(by_node.items(), key=lambda kv: -kv[1])[:10]
    print("    slowest node calls (mean us per step, incl. Python): "
          + ", ".join(f"{name} {phase} {t / steps * 1e6:.0f}" for (name, phase), t in top))
    groups: dict[tuple[str, str], float] = {}
    for (phase, kind), _, t_call, _ in rows:
        if phase == "optimizer":
            key = ("optimizer", "forward")
        elif kind in ("conv", "depthwise", "pointwise", "relu6"):
            key = (kind, "forward" if phase == "forward" else "backward")
        else:
            continue
        groups[key] = groups.get(key, 0.0) + t_call * 1e6
    return plain * 1e6, groups


def _conv_kind(weight_shape) -> str | None:
    """depthwise / pointwise / conv from a conv's weight shape (O, I/groups, k, k)."""
    if len(weight_shape) != 4:
        return None
    if weight_shape[1] == 1 and weight_shape[0] > 1:
        return "depthwise"
    return "pointwise" if weight_shape[2] == 1 else "conv"


def _profile_torch(case: StepCase, steps: int):
    """torch's own step under torch.profiler: time per step by the same groups as microtrain's
    (conv/depthwise/pointwise forward and backward, ReLU6, optimizer), and its top ops."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        case.torch_step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            case.torch_step()
        wall = (time.perf_counter() - t0) / steps
    groups: dict[tuple[str, str], float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = e.input_shapes or []
        if e.key == "aten::conv2d" and len(shapes) > 1:  # inclusive: dispatch + the conv itself
            key, t = (_conv_kind(shapes[1]), "forward"), e.cpu_time_total
        elif e.key == "aten::convolution_backward" and len(shapes) > 2:  # input and weight grads together
            key, t = (_conv_kind(shapes[2]), "backward"), e.cpu_time_total
        elif e.key in ("aten::relu6", "aten::hardtanh", "aten::clamp"):
            key, t = ("relu6", "forward"), e.self_cpu_time_total
        elif e.key == "aten::hardtanh_backward":
            key, t = ("relu6", "backward"), e.self_cpu_time_total
        elif e.key.startswith("Optimizer.step") or e.key.startswith("Optimizer.zero_grad"):
            key, t = ("optimizer", "forward"), e.cpu_time_total
        else:
            continue
        groups[key] = groups.get(key, 0.0) + t / steps
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    print(f"  torch {case.method} under torch.profiler ({wall * 1e3:.2f} ms per step with its overhead); "
          f"top ops by self CPU per step: "
          + ", ".join(f"{e.key} {e.self_cpu_time_total / steps:.0f} us x{e.count // steps}" for e in events[:8]))
    return wall * 1e6, groups


def _compare(mt_step_us, mt_groups, torch_step_us, torch_groups, torch_plain_us) -> None:
    print("  side by side, us per step (mt: median op-call times incl. Python; torch: inclusive times "
          "under the profiler; torch's backward of a conv is input and weight gradient in one call):")
    print(f"    {'op':<12} {'mt fwd':>8} {'torch fwd':>9} {'mt bwd':>8} {'torch bwd':>9}")
    rest_mt, rest_t = mt_step_us, torch_step_us
    for kind in ("conv", "depthwise", "pointwise", "relu6", "optimizer"):
        vals = [mt_groups.get((kind, "forward"), 0.0), torch_groups.get((kind, "forward"), 0.0),
                mt_groups.get((kind, "backward"), 0.0), torch_groups.get((kind, "backward"), 0.0)]
        rest_mt -= vals[0] + vals[2]
        rest_t -= vals[1] + vals[3]
        label = "SGD (+zero)" if kind == "optimizer" else kind
        print(f"    {label:<12} {vals[0]:>8.0f} {vals[1]:>9.0f} {vals[2]:>8.0f} {vals[3]:>9.0f}")
    print(f"    {'the rest':<12} {rest_mt:>8.0f} {rest_t:>9.0f}   (head, adds, autograd engine / executor, Python)")
    print(f"    {'step':<12} {mt_step_us:>8.0f} {torch_step_us:>9.0f}   (torch without the profiler: "
          f"{torch_plain_us:.0f})")


def _batch_sizes(text: str) -> list[int]:
    """``--batch``: '1,25,100' -> [1, 25, 100], batch 1 added when a larger size is asked (the
    per-image target compares against it). An argparse type: a bad value is argparse's one-line
    error, exit status 2."""
    try:
        batches = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    if batches[-1] > 1 and batches[0] != 1:
        batches.insert(0, 1)
    return batches


def _method_names(text: str) -> list[str]:
    """``--methods``: comma-separated names from STEP_METHODS, in STEP_METHODS order (an argparse type)."""
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in STEP_METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or '(none)'}; choose from {', '.join(STEP_METHODS)}")
    return [m for m in STEP_METHODS if m in methods]


def _backbone_names(text: str) -> list[str]:
    """``--backbones``: comma-separated names from BACKBONES (an argparse type)."""
    names = [b for b in text.split(",") if b]
    bad = [b for b in names if b not in BACKBONES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or '(none)'}; choose from {', '.join(BACKBONES)}")
    return names


def _positive_int(text: str) -> int:
    """``--threads``, ``--repeats``, ...: an integer >= 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _step_methods(methods: list[str] | None, batches: list[int]) -> list[str]:
    """The methods asked, or by default every one at batch 1 and, when a larger batch is asked,
    fulltrain (what meta-training runs)."""
    if methods is not None:
        return methods
    return list(STEP_METHODS) if batches == [1] else ["fulltrain"]


def _batch_input(images, batch: int, to_input):
    """``batch`` support images (cycling through the support set) as float32 (B, 3, R, R) and
    their labels int64 (B,)."""
    import numpy as np

    idx = np.arange(batch) % len(images.support)
    return to_input(images.support[idx]), images.support_labels[idx].copy()


def cmd_step(args) -> int:
    """``step``: one whole training step of each method on three backbones, microtrain against PyTorch,
    and their ratio."""
    import numpy as np

    try:
        import torch
    except ImportError:
        print("step: torch is not installed; this benchmark compares against it", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from microtrain.data import to_input
    from microtrain.methods import plan_method
    from microtrain.train import class_prototypes, embed

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backbones, batches = args.backbones, args.batch
    methods = _step_methods(args.methods, batches)
    print(f"bench.py step: one training step at batch {', '.join(map(str, batches))}; methods {', '.join(methods)}; "
          f"median of {args.repeats} interleaved batches (>= 50 ms each) after warm-up; numpy {np.__version__}, "
          f"torch {torch.__version__}")
    print(thread_report(args.threads, torch, getattr(args, "policy", None)))
    from microtrain.autograd import default_threads
    threads_used = max(torch.get_num_threads(), _openblas_threads()[0] or 1, default_threads())
    multi = threads_used > 1
    pause = PAUSE_S if multi else 0.0
    print(f"interleaving: {f'a {pause:.1f} s pause before every batch (idle OpenBLAS/OpenMP workers spin ~0.1 s and would slow the other library), then' if multi else 'single-threaded libraries: no pause between batches;'} "
          f"one untimed call, then the timed batch")
    other = OtherCPU()
    time.sleep(1.0)
    print(load_line("before (1 s sample)", other))
    verdicts = []
    for name in backbones:
        other = OtherCPU()
        t0 = time.perf_counter()
        net, images, budgets, cfg = default_task(name)
        ways = int(images.support_labels.max()) + 1
        protos = class_prototypes(embed(net, images.support), images.support_labels, ways)
        plans = {}
        for method in methods:
            plans[method] = plan_method(method, net, images.support, images.support_labels, budgets, cfg.scale,
                                        cfg.momentum > 0, seed=cfg.seed)
        x, label = _batch_input(images, 1, to_input)
        probe = StepCase(methods[0], plans[methods[0]], net, cfg, x, protos, label, torch)
        # parity: the same network and loss on both sides
        mt_loss = probe.run.forward(probe.feeds, train=False)
        with torch.no_grad():
            from torch_mbconv import prototype_loss
            t_loss = float(prototype_loss(probe.model.features(torch.from_numpy(x)), torch.from_numpy(protos),
                                          torch.from_numpy(label), cfg.scale))
        print(f"\n== {name}: {net.resolution}x{net.resolution}, {len(net.layers)} convs, "
              f"{net.forward_macs / 1e6:.2f}M forward MACs; task: {ways}-way, {len(images.support)} support images "
              f"(a batch of B cycles through them); budgets {budgets.memory / 1024:.0f} KiB / "
              f"{budgets.macs / 1e6:.2f}M MACs; SGD lr/momentum "
              + ", ".join(f"{m} {StepCase.lr_of(plans[m], cfg):g}/{StepCase.momentum_of(plans[m], cfg):g}"
                          for m in methods if plans[m].trains)
              + f"; loss on one image: mt {mt_loss:.6f}, torch {t_loss:.6f}")
        del probe
        if "tinytrain" in plans:
            tt = plans["tinytrain"]
            print(f"TinyTrain selection (planned once, {tt.seconds:.2f} s, then fixed): "
                  + "; ".join(f"{n} {k}/{c} channels (score {s:.3g})" for n, k, c, s in tt.choices))
        if "tinytrain-plus" in plans:
            tt = plans["tinytrain-plus"]
            print(f"TinyTrain+ selection (planned once, {tt.seconds:.2f} s, then fixed; every layer listed trains its "
                  "biases): " + "; ".join(f"{n} {k}/{c} weight rows" if k else f"{n} biases" for n, k, c, _ in tt.choices))
        if "sparseupdate" in plans:
            su = plans["sparseupdate"].info
            print(f"SparseUpdate: biases of the last {su['bias_layers']} convs; weights of "
                  + ", ".join(f"{n} ({k} input ch)" for n, k in su["weight_layers"].items()))
        header = (f"{'method':<13} {'batch':>5} {'mt params':>9} {'torch params':>12} {'bwd mem KiB':>11} "
                  f"{'bwd MACs':>9} {'mt ms':>9} {'+-':>4} {'mt ms/img':>9} {'torch ms':>9} {'+-':>4} "
                  f"{'torch ms/img':>12} {'mt/torch':>8} {'cpu ms/img mt':>13} {'torch':>6} {'ratio':>5} {'busy':>5}")
        if name == TARGET_BACKBONE:
            header += "  target"
        print(header)
        print("-" * len(header))
        results = {}
        for batch in batches:
            x, label = _batch_input(images, batch, to_input)
            cases = [StepCase(m, plans[m], net, cfg, x, protos, label, torch) for m in methods]
            for case in cases:
                row_load = OtherCPU()
                cpu = []
                mt_t, torch_t = interleaved_times([case.mt_step, case.torch_step], args.repeats, pause_s=pause,
                                                  cpu=cpu)
                busy = row_load.cores()
                mt_s, t_s = _median(mt_t), _median(torch_t)
                mt_c, t_c = _median(cpu[0]), _median(cpu[1])
                ratio = mt_s / t_s
                results[case.method, batch] = (mt_s, ratio, t_s, busy)
                line = (f"{case.method:<13} {batch:>5} {case.mt_params:>9} {case.torch_params:>12} "
                        f"{case.backward_bytes / 1024:>11.1f} {case.backward_macs / 1e6:>8.2f}M "
                        f"{mt_s * 1e3:>9.2f} {_spread(mt_t):>4.0%} {mt_s / batch * 1e3:>9.2f} "
                        f"{t_s * 1e3:>9.2f} {_spread(torch_t):>4.0%} {t_s / batch * 1e3:>12.2f} "
                        f"{ratio:>8.2f} {mt_c / batch * 1e3:>13.2f} {t_c / batch * 1e3:>6.2f} {mt_c / t_c:>5.2f} "
                        f"{busy:>5.2f}")
                target = _step_target(case.method, batch)
                if name == TARGET_BACKBONE and target is not None:
                    met = ratio <= target
                    line += f"  <= {target:.1f}x {'met' if met else 'MISSED'}"
                    verdicts.append((f"{case.method} at batch {batch}", ratio, target, met, busy))
                print(line, flush=True)
            if args.profile != "off" and (name == TARGET_BACKBONE or args.profile == "all"):
                chosen = [c for c in cases if args.profile == "all"
                          or (name == TARGET_BACKBONE and _step_target(c.method, batch) is not None
                              and (results[c.method, batch][1] > _step_target(c.method, batch)
                                   or _loaded(results[c.method, batch][3], threads_used)))]
                steps = max(3, args.profile_steps // batch)
                for case in chosen:
                    print(f"\nprofile of {name} {case.method} at batch {batch} (target "
                          f"{_step_target(case.method, batch) or '-'}x, ratio {results[case.method, batch][1]:.2f}):")
                    mt_us, mt_groups = _profile_mt(case, steps=steps)
                    t_us, t_groups = _profile_torch(case, steps=steps)
                    _compare(mt_us, mt_groups, t_us, t_groups, results[case.method, batch][2] * 1e6)
                if chosen:
                    print()
            del cases  # a batch-100 executor's arena is hundreds of MB
        print(f"(cpu = median process CPU time per image, every thread summed: on a loaded machine, what a "
              f"step costs whatever share of the cores it got; busy = cores other processes used while that "
              f"row was measured; "
              f"+- = half the interquartile range over the batches, as a share of the median; bwd mem = the "
              f"planner's backward memory: weights being updated + gradients/momentum + activations kept; "
              f"torch trains whole layers, hence its parameter count; {time.perf_counter() - t0:.0f} s)")
        print(load_line(f"during {name}", other, threads=threads_used))
        if name == TARGET_BACKBONE and ("none", 1) in results and ("tinytrain", 1) in results:
            fwd, torch_tt = results["none", 1][0], results["tinytrain", 1][2]
            print(f"TinyTrain floor: microtrain's forward alone takes {fwd * 1e3:.2f} ms = {fwd / torch_tt:.2f}x "
                  f"torch's whole TinyTrain step ({torch_tt * 1e3:.2f} ms); the {STEP_TARGETS['tinytrain']}x target "
                  f"needs microtrain's whole step under {STEP_TARGETS['tinytrain'] * torch_tt * 1e3:.2f} ms")
        if name == TARGET_BACKBONE and batches[-1] > 1:
            for method in methods:
                one, big = results[method, 1], results[method, batches[-1]]
                per1, per_big = one[0], big[0] / batches[-1]
                line = (f"{method}: microtrain {per1 * 1e3:.2f} ms per image at batch 1, {per_big * 1e3:.2f} at batch "
                        f"{batches[-1]} ({per_big / per1:.2f}x); torch {one[2] * 1e3:.2f} and "
                        f"{big[2] / batches[-1] * 1e3:.2f}")
                if method == "fulltrain" and batches[-1] >= BATCH_TARGET_SIZE:
                    met = per_big <= per1
                    line += f"  (target: no higher at batch {batches[-1]}: {'met' if met else 'MISSED'})"
                    verdicts.append((f"fulltrain ms/image at batch {batches[-1]} vs 1", per_big / per1, 1.0, met,
                                     max(one[3], big[3])))
                print(line)
    if verdicts:
        print(f"\ntargets ({TARGET_BACKBONE}, microtrain/torch step time, or batch-N/batch-1 time per image, in this run): "
              + "; ".join(f"{m} {r:.2f}x vs <= {t:.1f}x {'met' if ok else 'MISSED'}"
                          + (f" (measured while other processes used {b:.2f} cores: not reliable)"
                             if _loaded(b, threads_used) else "")
                          for m, r, t, ok, b in verdicts))
    print(load_line("at end"))
    return 0


# --------------------------------------------------------------------------- rss
def _spawn(cmd, env, log_path):
    """Run ``cmd`` to completion; (exit status, wall seconds, peak RSS MB of that child alone,
    CPU other processes took meanwhile in cores)."""
    import subprocess

    other = OtherCPU()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024, other.cores(exclude=(proc.pid,))


_LOAD_EPISODE = ("from microtrain.data import open_dataset\nfrom microtrain.episodes import EpisodeImages, sample_episode\n"
                 "from microtrain.paths import shared_file\n"
                 "ep = sample_episode(open_dataset(shared_file('data', 'traffic_sign.zip')), 10, 5, 10, 0)\n"
                 "images = EpisodeImages(ep, 128)\n")
IMPORT_STAGES = [
    ("bare python", "pass"),
    ("import numpy", "import numpy"),
    ("import numpy, numba", "import numpy, numba"),
    ("import microtrain engine (kernels from Numba's cache)", "import microtrain.autograd, microtrain.methods"),
    ("+ load the weights, decode the episode (adapt before training)",
     "import microtrain.autograd, microtrain.methods\nfrom microtrain import model\n"
     "from microtrain.checkpoint import ensure_converted\nnet = model.load(ensure_converted('mcunet-5fps'))\n"
     + _LOAD_EPISODE),
    ("import numpy, torch", "import numpy, torch"),
    ("+ the torch model, decode the episode (torch_adapt before training)",
     "import sys, torch\nsys.path.insert(0, 'tools')\nfrom torch_mbconv import build_torch_model\n"
     "from microtrain.checkpoint import ensure_converted, load_weights\n"
     "m = build_torch_model(*load_weights(ensure_converted('mcunet-5fps')))\n" + _LOAD_EPISODE
     + "assert 'numba' not in sys.modules\n"),
]


def cmd_rss(args) -> int:
    """``rss``: peak RSS (MB) and wall time of a whole default adaptation in a fresh process, against
    PyTorch fine-tuning the same layers of the same episode."""
    import json
    import tempfile

    env = dict(os.environ)
    if args.threads is not None:
        for key in THREAD_ENV:
            env[key] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bench.py rss: peak RSS of a whole adaptation of the default task, each a fresh child "
          f"(ru_maxrss from wait4 of that child); threads: "
          f"{'each library its own default (microtrain.adapt: one BLAS thread, its import policy; torch: every core)' if args.threads is None else f'{args.threads} (OpenBLAS, Numba, OpenMP, MKL env)'}; "
          f"this parent's RSS {own:.1f} MB (imports neither NumPy nor torch: a child's peak cannot read below it)")
    other = OtherCPU()
    time.sleep(1.0)
    print(load_line("before (1 s sample)", other))
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        tmp = Path(tmp)
        runs = {"microtrain": [], "torch": []}
        for k in range(args.runs):
            mt_out = tmp / f"mt{k}"
            status, wall, rss, busy = _spawn([sys.executable, "-m", "microtrain.adapt", "--quiet", "--no-keep-best", "--out", str(mt_out)],
                                             env, tmp / f"mt{k}.log")
            log = (tmp / f"mt{k}.log").read_text()
            if status != 0:
                print(f"microtrain.adapt failed (exit {status}):\n{log}")
                return 1
            report = json.loads((mt_out / "report.json").read_text())
            runs["microtrain"].append((wall, rss, busy, report))
            layers = [c["layer"] for c in report["selection"]]
            ft = report["finetune"]  # the fine-tuning microtrain ran, passed on whole
            t_cmd = [sys.executable, str(ROOT / "tools" / "torch_adapt.py"), "--out", str(tmp / f"torch{k}"),
                     "--layers", ",".join(layers), "--seed", str(report["episode"]["seed"])]
            for key in ("epochs", "lr", "momentum", "weight_decay", "scale", "batch"):
                t_cmd += [f"--{key.replace('_', '-')}", str(ft[key])]
            t_cmd += ["--train-seed", str(ft["seed"])]
            if args.threads is not None:
                t_cmd += ["--threads", str(args.threads)]
            status, wall, rss, busy2 = _spawn(t_cmd, env, tmp / f"torch{k}.log")
            tlog = (tmp / f"torch{k}.log").read_text()
            if status != 0:
                print(f"torch_adapt.py failed (exit {status}):\n{tlog}")
                return 1
            treport = json.loads((tmp / f"torch{k}" / "report.json").read_text())
            runs["torch"].append((wall, rss, busy2, treport))
            if k == 0:
                print("\nmicrotrain: python -m microtrain.adapt --quiet --no-keep-best --out <tmp>")
                print("  " + log.strip().replace("\n", "\n  "))
                print(f"torch: python tools/torch_adapt.py {' '.join(t_cmd[2:]).replace(str(tmp / f'torch{k}'), '<tmp>')}")
                print("  " + tlog.strip().replace("\n", "\n  "))
        print()
        header = f"{'run':<12} {'peak RSS MB':>11} {'wall s':>8} {'training s':>10} {'acc before':>10} {'acc after':>9} {'other CPU':>9}"
        print(header)
        print("-" * len(header))
        for k in range(args.runs):
            wall, rss, busy, rep = runs["microtrain"][k]
            print(f"{'microtrain':<12} {rss:>11.1f} {wall:>8.2f} {rep['time_seconds']['training']:>10.2f} "
                  f"{100 * rep['accuracy_before']:>9.1f}% {100 * rep['accuracy_after']:>8.1f}% {busy:>9.2f}")
            wall, rss, busy, rep = runs["torch"][k]
            print(f"{'torch':<12} {rss:>11.1f} {wall:>8.2f} {rep['time_seconds']['training']:>10.2f} "
                  f"{100 * rep['accuracy_before']:>9.1f}% {100 * rep['accuracy_after']:>8.1f}% {busy:>9.2f}")
        mt_rss = sorted(r[1] for r in runs["microtrain"])[args.runs // 2]
        t_rss = sorted(r[1] for r in runs["torch"])[args.runs // 2]
        mt_wall = sorted(r[0] for r in runs["microtrain"])[args.runs // 2]
        t_wall = sorted(r[0] for r in runs["torch"])[args.runs // 2]
        ratio = mt_rss / t_rss
        print("(other CPU = cores other processes used while that run went; training s = the run's own fine-tuning "
              "time, augmentation included; microtrain trains TinyTrain's channels, torch those layers whole)")
        print(f"\npeak RSS: microtrain {mt_rss:.1f} MB, torch {t_rss:.1f} MB, ratio {ratio:.2f} "
              f"(target <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'}); wall: microtrain {mt_wall:.2f} s, "
              f"torch {t_wall:.2f} s, ratio {mt_wall / t_wall:.2f}")
        print("\nwhere the RSS comes from: peak RSS of a child that only does this")
        for label, code in IMPORT_STAGES:
            status, wall, rss, _ = _spawn([sys.executable, "-c", code], env, tmp / "stage.log")
            failures += status != 0
            print(f"  {label:<68} {rss:>7.1f} MB  ({wall:.2f} s){'  FAILED' if status else ''}")
    print(load_line("at end"))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads for numba, torch and OpenBLAS (kernels: default 1; step, rss: default "
                             "each library's own)")
    parser.add_argument("--repeats", type=_positive_int, default=15, help="batches per median (default 15)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kernels", help="per-kernel times next to PyTorch at the MCUNet target shapes")
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, help="threads (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=argparse.SUPPRESS, help="batches per median (default 15)")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("step", help="one whole training step per method next to PyTorch, three backbones")
    p.add_argument("--backbones", type=_backbone_names, default=",".join(BACKBONES), help="comma-separated (default %(default)s)")
    # Accepted after the subcommand too; SUPPRESS keeps a value given before it.
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                   help="set both libraries' thread counts (default: each library's own)")
    p.add_argument("--repeats", type=_positive_int, default=argparse.SUPPRESS, help="batches per median (default 15)")
    p.add_argument("--profile", choices=("missed", "all", "off"), default="missed",
                   help="profile microtrain's step of the MCUNet methods that miss their target or were "
                        "measured under load (default), of every method on every backbone, or none")
    p.add_argument("--batch", type=_batch_sizes, default="1",
                   help="comma-separated batch sizes (default 1); with a size > 1, batch 1 is measured too "
                        "(the time-per-image target compares against it)")
    p.add_argument("--methods", type=_method_names, default=None,
                   help=f"comma-separated, from {','.join(STEP_METHODS)} (default: all at batch 1 only; "
                        f"fulltrain, the method meta-training runs, when a larger batch is asked)")
    p.add_argument("--profile-steps", type=_positive_int, default=50,
                   help="images per profile: steps = max(3, this / batch) (default %(default)s)")
    p.set_defaults(func=cmd_step)
    p = sub.add_parser("rss", help="peak RSS and wall time of a whole adaptation, microtrain vs PyTorch")
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                   help="thread count for both children (default: each library's own)")
    p.add_argument("--runs", type=_positive_int, default=1, help="runs of each, alternating (default %(default)s)")
    p.set_defaults(func=cmd_rss)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "kernels":
        args.threads = 1 if args.threads is None else args.threads
        # OpenBLAS (NumPy's matmul, used by the pointwise kernels) reads its thread count when
        # NumPy is first imported, so set it before any import of numpy.
        if "numpy" not in sys.modules:
            os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    elif args.threads is None and args.command == "step":
        # Each library's own default. microtrain's import sets its BLAS policy (OpenBLAS, and with
        # it OMP/MKL, to one thread unless the user set them) before NumPy loads; the OMP/MKL
        # variables it adds would also make torch single-threaded in this shared process, so
        # they are removed again before torch (which loads NumPy) is imported.
        before = {key: os.environ.get(key) for key in THREAD_ENV}
        sys.path.insert(0, str(ROOT))
        import microtrain  # noqa: F401
        args.policy = {key: os.environ[key] for key in THREAD_ENV if before[key] is None and key in os.environ}
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if before[key] is None:
                os.environ.pop(key, None)
    elif args.threads is not None:
        wanted = {key: str(args.threads) for key in THREAD_ENV}
        if args.command == "step":  # microtrain's threads split the batch, one BLAS thread in each
            wanted.update(OPENBLAS_NUM_THREADS="1", MICROTRAIN_THREADS=str(args.threads))
        if "numpy" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
            if argv is not None:
                raise SystemExit("--threads: NumPy is already imported in this process, so OpenBLAS/Numba "
                                 "would ignore it; run bench.py as a script")
            os.environ.update(wanted)  # too late for this process: start again with it set
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
        os.environ.update(wanted)
    sys.path.insert(0, str(ROOT))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
