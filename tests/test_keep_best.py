"""Keep-best: the held-out split of the support set and the decision it drives (pipeline.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import small_net
from microtrain import pipeline
from microtrain.methods import Budgets
from microtrain.train import FinetuneConfig


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), seed=st.integers(0, 2 ** 32 - 1))
def test_holdout_split_holds_out_a_fifth_of_each_class_and_never_a_whole_class(sizes, seed):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    train, held = pipeline.holdout_split(labels, seed)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(len(labels)))
    for k, n in enumerate(sizes):
        n_held = int((labels[held] == k).sum())
        assert n_held == (0 if n == 1 else min(n - 1, max(1, round(0.2 * n))))
        assert (labels[train] == k).sum() == n - n_held >= 1
    again = pipeline.holdout_split(labels, seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)


def test_held_out_scores_match_a_direct_computation():
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((6, 5)), rng.standard_normal((4, 5))
    train_labels, test_labels = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 2, 2])
    acc, loss = pipeline.held_out_scores(train, train_labels, test, test_labels, 3, 10.0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    protos = unit(np.stack([unit(train)[train_labels == k].mean(0) for k in range(3)]))
    logits = 10.0 * unit(test) @ protos.T
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert acc == np.mean(logits.argmax(1) == test_labels)
    assert loss == pytest.approx(-np.log(p[np.arange(4), test_labels]).mean(), rel=1e-5)


def _episode(seed=0):
    """Five images of each of three colours, (15, 3, 16, 16) uint8: easy for the untrained net."""
    from task_files import COLOURS, image

    support = np.stack([image(colour, seed * 100 + 10 * c + i, size=16).transpose(2, 0, 1)
                        for c, colour in enumerate(COLOURS.values()) for i in range(5)])
    return support, np.repeat(np.arange(3), 5).astype(np.int64)


def _run(net, finetune, monkeypatch, keep_best=True, method="lastlayer"):
    monkeypatch.setattr(pipeline, "finetune", finetune)
    support, labels = _episode()
    lines, warnings = [], []
    record = pipeline.adapt_episode(net, support, labels, support, labels, method, Budgets(512 * 1024, 10 ** 6),
                                    FinetuneConfig(epochs=1, lr=1e-3), log=lines.append, keep_best=keep_best,
                                    warn=warnings.append)
    return record, lines, warnings


def _scramble(net, selection, *args, **kwargs):
    """A 'fine-tuning' that leaves finite but useless weights in every selected layer."""
    from microtrain.train import FinetuneResult

    for name in selection.layers:  # zero weights: every image embeds alike, as after a collapse
        w, b = net.params[name]
        w[...] = 0
        b[...] = 0
    from microtrain.memory import Plan
    return FinetuneResult(1, [1.0], 0, Plan([], ["step"]), 0.0)


def test_worse_adapted_weights_are_replaced_by_the_ones_before(monkeypatch):
    net = small_net()
    before = {k: v.copy() for k, v in net.state().items()}
    calls = []
    record, lines, warnings = _run(net, lambda *a, **k: calls.append(len(a[3])) or _scramble(*a, **k),
                                   monkeypatch, method="fulltrain")
    kb = record["keep_best"]
    assert calls == [12]  # the check only, on the 12 images not held out; no second fine-tuning
    assert kb["kept"] == "pre-adaptation" and (kb["correct_before"], kb["correct_after"]) == (3, 1)
    assert kb["held_out"] == 3 and kb["trained_on"] == 12
    assert all(np.array_equal(net.state()[k], v) for k, v in before.items())
    assert record["accuracy_after"] == record["accuracy_before"] and record["selection"] == []
    assert kb["query_accuracy_checked"] < record["accuracy_before"]
    assert len(warnings) == 1 and "keeping the pre-adaptation weights" in warnings[0]


def test_without_keep_best_the_adapted_weights_stay_whatever_they_are(monkeypatch):
    net = small_net()
    before = {k: v.copy() for k, v in net.state().items()}
    record, _, warnings = _run(net, _scramble, monkeypatch, keep_best=False, method="fulltrain")
    assert record["keep_best"] is None and warnings == []
    assert not all(np.array_equal(net.state()[k], v) for k, v in before.items())


def test_diverged_check_keeps_the_weights_before(monkeypatch):
    from microtrain.train import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged(7, float("nan"))
    net = small_net()
    before = {k: v.copy() for k, v in net.state().items()}
    record, _, warnings = _run(net, diverge, monkeypatch)
    assert record["keep_best"]["kept"] == "pre-adaptation" and record["keep_best"]["diverged_at_step"] == 7
    assert warnings == ["keep-best: training diverged at step 7: keeping the pre-adaptation weights "
                        "(--no-keep-best adapts anyway)"]
    assert all(np.array_equal(net.state()[k], v) for k, v in before.items())
    with pytest.raises(TrainingDiverged):
        _run(small_net(), diverge, monkeypatch, keep_best=False)


def test_a_passed_check_adapts_again_on_every_image_as_without_keep_best(monkeypatch):
    """The check trains on the images not held out, its weights are put back, and the final
    adaptation on every support image is the run without keep-best, number for number."""
    from microtrain.pipeline import finetune as real

    calls = []

    def counted(net, selection, support, labels, *args):
        calls.append(np.bincount(labels).tolist())
        return real(net, selection, support, labels, *args)
    with_check, lines, warnings = _run(small_net(), counted, monkeypatch)
    assert calls == [[4, 4, 4], [5, 5, 5]] and warnings == []
    assert with_check["keep_best"]["kept"] == "adapted"
    assert any(line.startswith("keep-best: 3 of 3 held-out support images right (prototypes of the other 12) "
                           "before adaptation, 3 after")
               for line in lines)
    net = small_net()
    plain, _, _ = _run(net, real, monkeypatch, keep_best=False)
    assert with_check["accuracy_after"] == plain["accuracy_after"] and with_check["selection"] == plain["selection"]
    assert with_check["losses"] == plain["losses"]


def test_one_shot_tasks_cannot_be_checked_and_say_so(monkeypatch):
    monkeypatch.setattr(pipeline, "finetune", _scramble)
    net = small_net()
    support, labels = _episode()
    warnings = []
    record = pipeline.adapt_episode(net, support[::5], labels[::5], support, labels, "lastlayer",
                                    Budgets(512 * 1024, 10 ** 6), FinetuneConfig(epochs=1, lr=1e-3),
                                    keep_best=True, warn=warnings.append)
    assert record["keep_best"] is None and len(warnings) == 1 and "single support image" in warnings[0]


def test_one_held_out_image_lost_is_within_the_noise():
    record = {"diverged_at_step": None, "correct_before": 7, "correct_after": 6}
    assert not pipeline.adaptation_is_worse(record) and pipeline.adaptation_is_worse(record, tolerance=0)
    assert pipeline.adaptation_is_worse({**record, "correct_after": 5})
    assert pipeline.adaptation_is_worse({**record, "correct_after": None, "diverged_at_step": 3})


def test_json_ready_turns_non_finite_numbers_into_null():
    import json

    out = pipeline.json_ready({"a": float("nan"), "b": [np.float32(np.inf), np.int64(3)], "c": np.arange(2)})
    assert json.dumps(out, allow_nan=False) == '{"a": null, "b": [null, 3], "c": [0, 1]}'


def test_the_measurement_tool_counts_what_each_policy_keeps(monkeypatch):
    """tools/keep_best.py's table: each rule's decision applied to the plain run (5 -> 7 held-out images
    right is kept, 6 -> 4 reverted), the check's own weights (the pre-adaptation accuracy where it
    reverted), diverged plain runs at chance."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    sys.modules.pop("keep_best", None)
    import keep_best

    def kb(acc, loss, kept, checked):
        return {"held_out": 10, "accuracy_before": acc[0], "accuracy_after": acc[1], "loss_before": loss[0],
                "loss_after": loss[1], "diverged_at_step": None, "kept": kept, "query_accuracy_checked": checked}
    records = [  # (plain, keep) runs of two episodes
        {"backbone": "b", "domain": "d.zip", "seed": 1000, "method": "m", "plain": {"after": 0.8},
         "keep": {"before": 0.6, "after": 0.8, "keep_best": kb((0.5, 0.7), (1.0, 1.2), "adapted", 0.7)}},
        {"backbone": "b", "domain": "d.zip", "seed": 1001, "method": "m", "plain": {"error": "diverged"},
         "keep": {"before": 0.5, "after": 0.5, "keep_best": kb((0.6, 0.4), (1.0, 0.9), "pre-adaptation", 0.3)}},
    ]
    row = keep_best.summarize(records).splitlines()[2].split()
    # domain, episodes, none, plain, keep-best, reverted, strict, reverted, check weights, loss rule, diverged
    assert row == ["d", "2", "55.0", "45.0", "65.0", "1/2", "65.0", "1/2", "60.0", "35.0", "1"]
