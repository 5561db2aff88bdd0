"""Print memory plans of one network under several selections (a demonstration, not a test).

    python tools/plan_demo.py                 # a small random MBConv network
    python tools/plan_demo.py --model mcunet-5fps [--batch 100] [--verbose]

Shows what the planner keeps: training only the last block keeps that block's activations only,
a channel subset shrinks the gradients and kept activations in proportion, and the planned
arena against every buffer allocated on its own (no reuse).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microtrain import memory  # noqa: E402
from microtrain.autograd import Program  # noqa: E402
from microtrain.model import Network, layer_specs  # noqa: E402
from microtrain.selection import LayerUpdate, Selection  # noqa: E402

DEMO_ARCH = {"name": "demo-mbconv", "resolution": 64, "in_channels": 3,
             "first_conv": {"out": 16, "kernel": 3, "stride": 2},
             "blocks": [dict(expand=None, kernel=3, stride=1, out=16, residual=True),
                        dict(expand=48, kernel=3, stride=2, out=24, residual=False),
                        dict(expand=72, kernel=5, stride=1, out=24, residual=True),
                        dict(expand=72, kernel=7, stride=2, out=32, residual=False),
                        dict(expand=96, kernel=3, stride=1, out=32, residual=True)],
             "feature_mix": None}


def demo_network(seed: int = 0) -> Network:
    """A small random network of ``DEMO_ARCH`` (seeded weights, zero biases) for printing a plan."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layer_specs(DEMO_ARCH):
        arrays[f"{layer.name}.weight"] = (rng.standard_normal(layer.weight_shape) * 0.1).astype(np.float32)
        arrays[f"{layer.name}.bias"] = np.zeros(layer.out_channels, np.float32)
    return Network(DEMO_ARCH, arrays)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a shared backbone name or weight file instead of the demo network")
    p.add_argument("--ways", type=int, default=10)
    p.add_argument("--batch", type=int, default=1,
                   help="images per step (the paper gives FullTrain and TinyTL batch 100); only planned, never run")
    p.add_argument("--verbose", action="store_true", help="list every buffer")
    args = p.parse_args(argv)
    if args.model:
        from microtrain.adapt import resolve_model

        net = resolve_model(args.model)
    else:
        net = demo_network()
    if args.batch < 1:
        p.error("--batch must be >= 1")
    graph = net.protonet_graph(args.batch, args.ways, 10.0)
    last_block = len(net.arch["blocks"]) - 1
    last = [layer for layer in net.layers if layer.name.startswith(f"blocks.{last_block}.")]
    half = lambda layer: LayerUpdate.channels(range(0, layer.out_channels, 2))  # noqa: E731
    cases = {
        "forward only (nothing trained)": Selection(),
        f"last block (blocks.{last_block}) fully trained": Selection({l.name: LayerUpdate.full(l.out_channels) for l in last}),
        "last block, every other channel": Selection({l.name: half(l) for l in last}),
        "every layer (full training)": Selection({l.name: LayerUpdate.full(l.out_channels) for l in net.layers}),
    }
    print(f"{net.name}: {len(net.layers)} conv layers, input ({args.batch}, 3, {net.resolution}, {net.resolution}), "
          f"SGD with momentum\n")
    for title, sel in cases.items():
        plan = Program(graph, sel, momentum=True).plan
        print(f"== {title}")
        print(plan.table(verbose=args.verbose))
        kept_nodes = sorted({b.name.split(":")[1] for b in plan.buffers
                             if b.category == memory.SAVED and not b.name.startswith("input:")},
                            key=lambda n: graph.node(n).index)
        print(f"  activations kept for backward come from: {', '.join(kept_nodes) or 'nothing'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
