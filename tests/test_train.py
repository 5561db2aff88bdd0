"""Fine-tuning loop: prototypes, divergence handling, determinism, allocations outside the arena."""
from __future__ import annotations

import numpy as np
import pytest

from microtrain.selection import LayerUpdate, Selection
from microtrain.train import (FinetuneConfig, TrainingDiverged, class_prototypes, finetune,
                              prototype_accuracy)

from conftest import small_net


def _support(net, n=6, ways=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 3, net.resolution, net.resolution), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % ways)


def test_prototypes_are_normalised_class_means_of_normalised_embeddings():
    z = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], np.float32)
    protos = class_prototypes(z, np.array([0, 0, 1]), 2)
    expected0 = np.array([0.6, 0.8]) + np.array([0.0, 1.0])
    np.testing.assert_allclose(protos[0], expected0 / np.linalg.norm(expected0), rtol=1e-6)
    np.testing.assert_allclose(protos[1], [1.0, 0.0])


def test_nan_loss_stops_and_restores_the_original_weights():
    net = small_net()
    images, labels = _support(net)
    before = {k: v.copy() for k, v in net.state().items()}
    selection = Selection({"blocks.2.project": LayerUpdate.full(8), "blocks.2.depthwise": LayerUpdate.channels([0, 1])})

    def poison(step, total, loss):  # a weight the forward reads turns NaN after step 3
        if step == 3:
            net.params["blocks.2.project"][0][0, 0, 0, 0] = np.nan

    with pytest.raises(TrainingDiverged, match="at step 4"):
        finetune(net, selection, images, labels, FinetuneConfig(epochs=2, lr=0.1), progress=poison)
    for key, value in net.state().items():
        np.testing.assert_array_equal(value, before[key])


def test_same_seed_same_training():
    images, labels = _support(small_net())
    results = []
    for _ in range(2):
        net = small_net()
        finetune(net, Selection({"blocks.2.expand": LayerUpdate.full(24)}), images, labels,
                 FinetuneConfig(epochs=2, lr=0.05, seed=7))
        results.append(net.params["blocks.2.expand"][0].copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_a_training_step_allocates_almost_nothing_outside_the_arena():
    net = small_net()
    images, labels = _support(net)
    result = finetune(net, Selection({"blocks.2.depthwise": LayerUpdate.full(24)}), images, labels,
                      FinetuneConfig(epochs=1, lr=0.05, momentum=0.9))
    assert result.arena_bytes == result.plan.arena_bytes
    # Python bookkeeping only (views, small tuples): no activation- or gradient-sized array.
    assert result.step_allocations < 16 * 1024
    assert len(result.losses) == len(images)


@pytest.mark.parametrize("batch,steps", [(1, 7), (3, 3), (7, 1), (100, 1)])
def test_every_image_once_per_pass_in_full_batches(monkeypatch, batch, steps):
    """A pass is ceil(N / B) steps of B = min(batch, N) images: each support image once, the last
    batch completed with other images of the pass; a batch above the support size is the support set
    (the paper's FullTrain and TinyTL run at batch 100 on supports of 5 images and up)."""
    import microtrain.train as train

    net = small_net()
    images, labels = _support(net, n=7)
    seen = []  # per step, the support indices of its pseudo-queries
    steps_seen = []
    real_augment = train.augment

    def spy(img, rng):
        seen.append(next(i for i in range(len(images)) if np.shares_memory(img, images[i])))
        return real_augment(img, rng)

    def step(k, total, loss):
        steps_seen.append(len(seen))

    monkeypatch.setattr(train, "augment", spy)
    result = finetune(net, Selection({"blocks.2.project": LayerUpdate.full(8)}), images, labels,
                      FinetuneConfig(epochs=2, lr=0.01, batch=batch), progress=step)
    b = min(batch, len(images))
    assert result.steps == 2 * steps and len(seen) == 2 * steps * b and result.plan is not None
    assert np.diff([0] + steps_seen).tolist() == [b] * (2 * steps)  # every step a full batch
    for epoch in range(2):
        used = seen[epoch * steps * b:(epoch + 1) * steps * b]
        assert sorted(set(used)) == list(range(7))  # every image in every pass
        assert all(len(set(used[k:k + b])) == b for k in range(0, len(used), b))  # no image twice in a step
    # the arena is planned for the batch that ran
    assert result.plan.arena_bytes == train.Executor(net.protonet_graph(b, 3, 10.0), Selection(
        {"blocks.2.project": LayerUpdate.full(8)}), momentum=True).plan.arena_bytes


def test_one_shot_support_classifies_itself():
    # With one image per class each prototype is that image's own normalised embedding.
    net = small_net()
    images, labels = _support(net, n=3, ways=3)
    assert prototype_accuracy(net, images, labels, images, labels) == 1.0


def test_package_level_load_gives_a_network(tmp_path):
    import microtrain
    from microtrain.checkpoint import save_weights

    net = small_net()
    path = tmp_path / "tiny.npz"
    arch = dict(net.arch, source={"file": "random", "sha256": "0" * 64, "kind": "int8-dict"})
    save_weights(path, arch, net.state())
    loaded = microtrain.load(path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, net.resolution, net.resolution)).astype(np.float32)
    np.testing.assert_array_equal(loaded.features(x), net.features(x))
    assert loaded.features(x).shape == (2, net.embedding_size)
