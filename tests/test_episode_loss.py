"""The meta-training loss: a ProtoNet episode with the prototypes inside the graph
(``Network.episode_graph``; ops ``class_mean`` and ``rows``, the prototype gradient of
``cosine_logits``). Kernel-level twins and float64 finite differences are in test_kernels.py and
test_kernels_grad.py; here the whole graph: its forward equals the fine-tuning head's prototypes,
and every parameter's gradient equals PyTorch autograd's (where torch is installed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_arrays, small_arch
from microtrain.autograd import Executor, GraphError
from microtrain.methods import full_update
from microtrain.model import Network
from microtrain.train import class_prototypes, normalize_rows

TOOLS = Path(__file__).resolve().parent.parent / "tools"

WAYS, SHOT, QUERY, SCALE = 3, 2, 2, 10.0


def episode(net: Network, seed: int = 0):
    """Support images class by class in a shuffled order, then the queries."""
    rng = np.random.default_rng(seed)
    n = WAYS * (SHOT + QUERY)
    x = rng.uniform(-1, 1, (n, 3, net.resolution, net.resolution)).astype(np.float32)
    support_labels = rng.permutation(np.repeat(np.arange(WAYS), SHOT)).astype(np.int64)
    query_labels = rng.permutation(np.repeat(np.arange(WAYS), QUERY)).astype(np.int64)
    return x, support_labels, query_labels


def lively_net() -> Network:
    arch = small_arch()
    return Network(arch, random_arrays(arch, seed=3, scale=1.5))


def test_episode_forward_is_the_fine_tuning_head_with_prototypes_of_the_support():
    net = lively_net()
    x, ys, yq = episode(net)
    S = len(ys)
    run = Executor(net.episode_graph(S, len(yq), WAYS, SCALE))
    loss = run.forward({"image": x, "support_labels": ys, "query_labels": yq})

    z = net.features(x)
    protos = class_prototypes(z[:S], ys, WAYS).astype(np.float64)
    logits = SCALE * normalize_rows(z[S:].astype(np.float64)) @ protos.T
    logits -= logits.max(axis=1, keepdims=True)
    ref = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(yq)), yq])
    assert abs(loss - ref) < 1e-5 * max(1.0, abs(ref))
    np.testing.assert_allclose(run.value("prototypes"), protos, atol=1e-6)


def test_episode_gradients_match_torch_autograd():
    torch = pytest.importorskip("torch")
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    from torch_mbconv import build_torch_model, episode_loss, set_trainable

    net = lively_net()
    x, ys, yq = episode(net, seed=1)
    names = [layer.name for layer in net.layers]
    run = Executor(net.episode_graph(len(ys), len(yq), WAYS, SCALE), full_update(net, names))
    loss = run.forward({"image": x, "support_labels": ys, "query_labels": yq})
    run.backward()

    model = build_torch_model(net.arch, net.state()).double()
    keys = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    params = dict(zip(keys, set_trainable(model, keys)))
    ref_loss = episode_loss(model.features(torch.from_numpy(x.astype(np.float64))), ys, yq, WAYS, SCALE)
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < 1e-5
    for name in names:
        for part, got in zip(("weight", "bias"), run.grad(name)):
            ref = params[f"{name}.{part}"].grad.numpy()
            scale = np.abs(ref).max()
            assert scale > 0, f"{name}.{part}: torch's gradient is zero, the check is empty"
            # float32 sums through a small net against float64: measured below 1e-5
            assert np.abs(got - ref).max() <= 1e-4 * scale, f"{name}.{part}"


def test_prototypes_take_a_gradient_only_inside_an_episode():
    """In the fine-tuning graph prototypes are inputs (constants): the backward never computes
    their gradient; in the episode graph they are computed, and the support rows get gradient
    through them, so training on an episode changes more than the query path."""
    net = lively_net()
    x, ys, yq = episode(net, seed=2)
    g = net.episode_graph(len(ys), len(yq), WAYS, SCALE)
    run = Executor(g, full_update(net, ["feature_mix"] if "feature_mix" in net.params else [net.layers[-1].name]))
    run.forward({"image": x, "support_labels": ys, "query_labels": yq})
    run.backward()
    assert run.program.needs_grad[g.value("prototypes").id]
    grad_z = run.buffers[run.program.grad_of[g.value("normalize").id]]
    assert np.abs(grad_z[: len(ys)]).max() > 0  # support rows: through the prototypes
    assert np.abs(grad_z[len(ys):]).max() > 0   # query rows: through the logits

    fine = net.protonet_graph(2, WAYS, SCALE)
    assert not Executor(fine, full_update(net, [net.layers[-1].name])).program.needs_grad[fine.value("prototypes").id]


def test_episode_graph_refuses_bad_shapes():
    net = lively_net()
    with pytest.raises(GraphError, match="rows 4:4 of 4"):
        net.episode_graph(4, 0, WAYS, SCALE)  # an episode needs queries
    g = net.episode_graph(3, 3, WAYS, SCALE)
    with pytest.raises(Exception, match="have no support row"):
        Executor(g).forward({"image": np.zeros((6, 3, net.resolution, net.resolution), np.float32),
                             "support_labels": np.array([0, 0, 1]), "query_labels": np.array([0, 1, 2])})
