"""Benchmarks (measurements, not tests).

    python tools/bench.py kernels [--threads N] [--repeats R]

``kernels``: for the MCUNet-5fps (128x128) target shapes at batch 1, the time of forward,
backward-input and backward-weight (all output channels, and 25% of them) for microtrain next to
PyTorch CPU measured in the same run with the same thread count, and the ratio mt/torch. Torch
has no channel-masked weight gradient, so both weight rows compare against its full one.
Without torch it prints microtrain's figures only.

To add a subcommand (e.g. ``step`` for whole training steps): write ``cmd_step(args)``, register
it in ``build_parser`` and time with ``median_time``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


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
        fwd = lambda: K.conv2d_forward(out, x, w, b, s, 1)  # noqa: E731
        bwi = lambda: K.conv2d_backward_input(dx, dy, w, s, 1)  # noqa: E731
        def bww(ch):
            dw = np.empty((len(ch),) + w.shape[1:], np.float32)
            return lambda: K.conv2d_backward_weight(dw, dy, x, s, 1, ch)
    elif kind == "dw":
        fwd = lambda: K.depthwise_forward(out, x, w, b, s)  # noqa: E731
        bwi = lambda: K.depthwise_backward_input(dx, dy, w, s)  # noqa: E731
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
    t_fwd = t_bwi = t_bww = None
    if torch is not None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for numba, torch and OpenBLAS (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="batches per median (default 15)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kernels", help="per-kernel times next to PyTorch at the MCUNet target shapes")
    p.set_defaults(func=cmd_kernels)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # OpenBLAS (NumPy's matmul, used by the pointwise kernels) reads its thread count when
    # NumPy is first imported, so set it before any import of numpy.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
