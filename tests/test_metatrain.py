"""Meta-training (``python -m microtrain.metatrain``) on a tiny source: three class-folder zips
of synthetic images and a small random network, so these run in seconds. What is checked: the
learning-rate schedule, that episodes lower the loss, that a run interrupted (Ctrl-C, or kill -9
of a real process) and resumed ends with exactly the weights of an uninterrupted run, the
provenance recorded in the output, and one-line errors for bad arguments."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import random_arrays, small_arch
from microtrain import metatrain as mt
from microtrain.checkpoint import load_weights, save_weights

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parent.parent


def write_split(path: Path, classes: int, per_class: int, seed: int) -> None:
    """A class-folder zip of PNGs: each class a colour and a stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(classes):
            base = rng.integers(0, 256, 3)
            for i in range(per_class):
                img = np.clip(base + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                img[c % 5::5 if c % 2 else 1, :: 1 if c % 2 else 5] = 255 - base
                buf = io.BytesIO()
                PIL.fromarray(img).save(buf, format="PNG")
                zf.writestr(f"class{c:02d}/{i:03d}.png", buf.getvalue())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder with the three MiniImageNet-named zips, a tiny weight file)."""
    root = tmp_path_factory.mktemp("mini")
    write_split(root / "miniimagenet_train.zip", 6, 10, 0)
    write_split(root / "miniimagenet_val.zip", 3, 8, 1)
    write_split(root / "miniimagenet_test.zip", 3, 8, 2)
    arch = {**small_arch(), "source": {"file": "tiny.pth", "sha256": "0" * 64, "kind": "torch-state-dict"}}
    weights = save_weights(root / "tiny.npz", arch, random_arrays(arch, seed=3, scale=1.5))
    return root, weights


def argv(source, out: Path, *extra: str) -> list[str]:
    data, weights = source
    return ["--model", str(weights), "--data", str(data), "--out", str(out), "--episodes", "8",
            "--checkpoint-every", "2", "--way", "2", "--shot", "2", "--query", "2", "--val-episodes", "3",
            "--lr", "0.05", "--quiet", *extra]


def test_schedule_warms_up_then_anneals_to_the_floor():
    cfg = mt.MetaConfig(episodes=1000, peak_lr=1e-3, start_lr=1e-6, warmup=0.05)
    lrs = [mt.learning_rate(cfg, i) for i in range(1000)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[50] == pytest.approx(1e-3)                       # peak after 5% of the episodes
    assert all(b > a for a, b in zip(lrs[:50], lrs[1:51]))       # warm-up rises
    assert all(b <= a for a, b in zip(lrs[50:], lrs[51:]))       # then only falls
    assert lrs[-1] == pytest.approx(1e-6)
    assert lrs[525] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 475 / 949)))


def test_training_lowers_the_episode_loss(source):
    data, weights = source
    from microtrain.adapt import resolve_model

    net = resolve_model(str(weights))
    cfg = mt.MetaConfig(episodes=40, way=2, shot=2, query=2, peak_lr=0.05, augment=False)
    trainer = mt.MetaTrainer(net, cfg)
    train = mt.EpisodeSource(data / "miniimagenet_train.zip", net.resolution, cache=True)
    fixed = [train.episode((9, i), 2, 2, 2) for i in range(4)]
    losses = [trainer.step(i, *fixed[i % 4]) for i in range(40)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(source, tmp_path, monkeypatch):
    whole = tmp_path / "whole.npz"
    assert mt.main(argv(source, whole)) == 0
    provenance = load_weights(whole)[0]["meta_training"]

    cut = tmp_path / "cut.npz"
    real_step = mt.MetaTrainer.step

    def step_then_interrupt(self, episode, *a):
        if episode == 5:
            raise KeyboardInterrupt
        return real_step(self, episode, *a)

    monkeypatch.setattr(mt.MetaTrainer, "step", step_then_interrupt)
    assert mt.main(argv(source, cut)) == 130
    assert not cut.exists() and mt.state_path(cut).exists()     # only the run state, no output yet
    assert mt.load_state(mt.state_path(cut))[0]["episode"] == 4  # the last checkpoint
    monkeypatch.setattr(mt.MetaTrainer, "step", real_step)
    assert mt.main(argv(source, cut)) == 0

    a, b = load_weights(whole)[1], load_weights(cut)[1]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert load_weights(cut)[0]["meta_training"]["meta_validation"] == provenance["meta_validation"]


def test_killed_process_resumes_to_the_same_weights(source, tmp_path):
    """kill -9 of a real process after its first checkpoint: the same command resumes."""
    whole, killed = tmp_path / "whole.npz", tmp_path / "killed.npz"
    assert mt.main(argv(source, whole, "--episodes", "12")) == 0
    cmd = [sys.executable, "-m", "microtrain.metatrain", *argv(source, killed, "--episodes", "12")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = mt.state_path(killed)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not killed.exists()
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    a, b = load_weights(whole)[1], load_weights(killed)[1]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_output_records_its_provenance(source, tmp_path):
    out = tmp_path / "meta.npz"
    assert mt.main(argv(source, out)) == 0
    arch, arrays = load_weights(out)
    p = arch["meta_training"]
    data, weights = source
    assert arch["name"] == "tiny-meta"
    assert p["base"]["sha256"] == "0" * 64
    assert p["data"]["train"] == {"file": "miniimagenet_train.zip",
                                  "sha256": mt.sha256(data / "miniimagenet_train.zip")}
    assert p["episodes"] == 8 and p["config"]["peak_lr"] == 0.05 and p["config"]["seed"] == 0
    assert [h["episode"] for h in p["meta_validation"]["history"]] == [0, 2, 4, 6, 8]
    best = max(p["meta_validation"]["history"], key=lambda h: h["accuracy"])
    assert p["meta_validation"]["best"]["accuracy"] == best["accuracy"]
    # the in-domain check scores the base network and the best weights, each on the same episodes
    from microtrain.adapt import resolve_model

    test = mt.EpisodeSource(data / "miniimagenet_test.zip", 16)
    for key, net in (("before", resolve_model(str(weights))), ("after", mt.Network(arch, arrays))):
        acc = mt.evaluate_episodes(net, test, 3, mt.TEST_SEED, 2, 2, 2)
        assert p["meta_test"][key]["accuracy"] == pytest.approx(100 * acc.mean())
    assert "--episodes 8" in p["command"]
    # the output holds the best checkpoint's weights, which the state file kept (no classifier)
    best_weights = mt.load_state(mt.state_path(out))[2]
    assert not any(k.startswith("classifier.") for k in arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(best_weights[k], v)


@pytest.mark.parametrize("extra, message", [
    (["--episodes", "0"], "--episodes"),
    (["--way", "1"], "--way and --val-episodes >= 2"),
    (["--val-episodes", "1"], "--way and --val-episodes >= 2"),
    (["--lr", "-1"], "--lr must exceed"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),  # was a usage block + error
    (["--episodes", "many"], "argument --episodes: invalid int value"),
])
def test_bad_arguments_are_one_line_errors(source, tmp_path, capsys, extra, message):
    out = tmp_path / "x.npz"
    try:
        status = mt.main(argv(source, out, *extra))
    except SystemExit as exc:  # argparse's own errors exit from inside the parser
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists() and not mt.state_path(out).exists()


def test_a_state_file_of_other_settings_is_refused(source, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert mt.main(argv(source, out)) == 0
    assert mt.main(argv(source, out, "--lr", "0.01")) == 2
    assert "other settings" in capsys.readouterr().err


def test_meta_trained_backbones_are_named_in_every_front_door(tmp_path, monkeypatch, capsys):
    """``mcunet-5fps-meta`` (etc.) resolve to the committed files in weights/; a missing one is a
    one-line error that says where they come from."""
    from microtrain import checkpoint, summary
    from microtrain.adapt import resolve_model

    arch = {**small_arch(), "source": {"file": "tiny.pth", "sha256": "0" * 64, "kind": "torch-state-dict"},
            "meta_training": {"base": {"name": "tiny"}, "episodes": 8, "best_episode": 4,
                              "meta_validation": {"before": {"accuracy": 50.0}, "best": {"accuracy": 61.5}}}}
    monkeypatch.setattr(checkpoint, "META_DIR", tmp_path)
    save_weights(tmp_path / "mcunet-5fps-meta.npz", arch, random_arrays(arch))
    assert checkpoint.backbone_file("mcunet-5fps-meta") == tmp_path / "mcunet-5fps-meta.npz"
    assert resolve_model("mcunet-5fps-meta").arch["meta_training"]["episodes"] == 8
    assert summary.main(["mcunet-5fps-meta"]) == 0
    assert "50.00% -> 61.50%" in capsys.readouterr().out
    assert summary.main(["mbv2-w0.35-meta"]) == 2
    err = capsys.readouterr().err
    assert "ship with the source checkout" in err and err.count("\n") == 1


def test_an_unwritable_out_is_refused_before_any_work(source, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert mt.main(argv(source, blocker / "sub" / "m.npz")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out: cannot write into") and "\n" not in err


def _drop_first(prefix):
    def damage(arrays):
        del arrays[next(k for k in arrays if k.startswith(prefix))]
    return damage


def _shrink_first_weight(arrays):
    k = next(k for k in arrays if k.startswith("weights:"))
    arrays[k] = arrays[k][:1]


def _nan_best(arrays):
    k = next(k for k in arrays if k.startswith("best:"))
    arrays[k] = np.full_like(arrays[k], np.nan)


def _edit_record(edit):
    def damage(arrays):
        state = json.loads(str(arrays["__state__"]))
        edit(state)
        arrays["__state__"] = np.array(json.dumps(state))
    return damage


@pytest.mark.parametrize("damage", [
    _drop_first("momentum:"), _drop_first("best:"), _shrink_first_weight, _nan_best,
    _edit_record(lambda s: s.pop("validation")), _edit_record(lambda s: s.update(best=None)),
    _edit_record(lambda s: s.update(episode="4")),
], ids=["no-momentum", "no-best", "weight-shape", "nan-best", "no-validation", "best-null", "episode-str"])
def test_a_damaged_state_file_is_a_one_line_error(source, tmp_path, capsys, damage):
    """A state file that is a readable .npz of this run's settings but lacks or garbles a part
    (an edit, a writer of another version) is refused before any work: it used to end in a
    KeyError or ValueError traceback, at the start or only after the whole training."""
    out = tmp_path / "x.npz"
    assert mt.main(argv(source, out, "--episodes", "2")) == 0
    out.unlink()
    spath = mt.state_path(out)
    with np.load(spath) as npz:
        arrays = {k: npz[k] for k in npz.files}
    damage(arrays)
    np.savez(spath, **arrays)
    capsys.readouterr()
    assert mt.main(argv(source, out, "--episodes", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {spath}: damaged meta-training state") and "\n" not in err
    assert not out.exists()
