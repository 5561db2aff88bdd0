"""TinyTL (Cai et al., NeurIPS 2020) as a training method: frozen backbone weights, trained biases
and lite residual modules.

A lite residual branch on every block (``lite_residual.py``; its geometry in ``architecture.py``),
parameters drawn from a seed. Trained: both lite layers fully, and the bias of every backbone conv;
every backbone weight is frozen. The plan is a ``MethodPlan`` like every other method's
(``methods.py``), so the same engine, planner and fine-tuning loop run it.
"""
from __future__ import annotations

from .architecture import LiteSpec, arch_specs
from .autograd import GraphError, Program
from .lite_residual import LiteResidualHook
from .method_plan import MethodPlan
from .model import Network
from .selection import LayerUpdate, Selection
from .tinytrain import backward_macs


def network_specs(net: Network, **defaults) -> list[LiteSpec]:
    """One branch geometry per block of ``net`` at its resolution."""
    return arch_specs(net.arch, **defaults)


def plan_tinytl(net: Network, seed: int = 0, **defaults) -> MethodPlan:
    """TinyTL's plan for ``net``: a lite residual branch on every block (parameters from ``seed``),
    both lite layers trained fully, every backbone conv's bias trained, backbone weights frozen.
    ``defaults`` override ``downsample``, ``expand``, ``groups`` or ``max_kernel``."""
    if net.block_hook is not None:
        raise GraphError(f"{net.name} already carries TinyTL branches (an adapted network): "
                         "adapt the original backbone instead")
    specs = network_specs(net, **defaults)
    hook = LiteResidualHook(specs, seed, settings=defaults)
    chosen = {layer.name: LayerUpdate.bias_only(layer.out_channels) for layer in net.layers}
    choices = []
    for s in specs:
        for name, out in ((s.conv_name, s.mid_channels), (s.project_name, s.out_channels)):
            chosen[name] = LayerUpdate.full(out)
            choices.append((name, out, out, float("nan")))
    selection = Selection(chosen)
    program = Program(net.features_graph(1, hook), selection)
    info = {
        "lite_params": hook.param_count,
        "bias_params": sum(layer.out_channels for layer in net.layers),
        "lite_forward_macs": sum(s.macs for s in specs),
        "backward_macs_with_lite": backward_macs(program),
        "defaults": dict(hook.settings),
        "branches": [{"block": s.block, "in": (s.in_channels, s.in_size), "mid": s.mid_channels,
                      "out": (s.out_channels, s.out_size), "groups": s.groups, "kernel": s.kernel,
                      "pool": s.pool, "stride": s.stride, "upsample": s.upsample} for s in specs],
    }
    return MethodPlan("tinytl", selection, block_hook=hook, choices=choices, info=info)
