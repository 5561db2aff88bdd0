"""``python -m microtrain.adapt``'s rough edges, each as a user met it (issue 11), on a tiny task."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from task_files import task

REPO = Path(__file__).resolve().parent.parent


def adapt(*argv):
    """The command's exit status (argparse's own errors exit from inside the parser)."""
    from microtrain.adapt import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


@pytest.fixture()
def no_shared(tmp_path, monkeypatch):
    """No shared folder and an empty user cache: any work beyond checking arguments would fail
    with a different message (the default model cannot be found)."""
    monkeypatch.setenv("MICROTRAIN_SHARED", str(tmp_path / "no-shared"))
    monkeypatch.setenv("MICROTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MICROTRAIN_WEIGHTS", raising=False)
    (tmp_path / "a-file").write_text("x")
    for name in ("s", "q"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--out", "{tmp}/a-file"], "exists and is not a folder"),
    (["--query-shots", "0"], "--shot and --query-shots must be >= 1"),
    (["--way", "1"], "--way must be >= 2"),
    (["--support", "{tmp}/s", "--query", "{tmp}/q", "--way", "3", "--shot", "2"],
     "--way, --shot: for an episode drawn from --data"),
    (["--support", "{tmp}/s", "--query", "{tmp}/q", "--data", "{tmp}/s"], "use one or the other"),
    (["--support", "{tmp}/s"], "--support and --query go together"),
    (["--sampler", "metadataset", "--shot", "3"], "--shot apply to the fixed sampler"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0 (see python -m microtrain.adapt --help)"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "-0.001"], "argument --lr: must be a finite number > 0, got -0.001"),
    (["--momentum", "1"], "argument --momentum: must be a finite number >= 0 and < 1, got 1"),
    (["--momentum", "nan"], "argument --momentum: must be a finite number >= 0 and < 1, got nan"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got inf"),
    (["--scale", "0"], "argument --scale: must be a finite number > 0, got 0"),
    (["--way", "two"], "argument --way: invalid int value: 'two'"),
    (["--batch", "0"], "--batch must be >= 1"),
    # NumPy's default_rng takes no negative seed: this was a 30-line traceback, exit 1
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--train-seed", "-1"], "argument --train-seed: must be an integer >= 0, got -1"),
    (["--model", "resnet50"], "not a known backbone"),
    (["--model", "{tmp}/missing.npz"], "no such file"),
    (["--mem-budget", "lots"], "cannot read 'lots' as a byte count"),
    (["--mac-budget", "x%"], "cannot read 'x%' as a MAC budget"),
    (["--data", "{tmp}/nowhere"], "nowhere: no such file or directory"),
])
def test_arguments_are_checked_before_any_work(no_shared, capsys, argv, message):
    assert adapt(*[a.format(tmp=no_shared) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert captured.out == ""
    assert not (no_shared / "home").exists()  # nothing converted, nothing written


@pytest.mark.parametrize("argv", [["--query-shots", "0"], ["--way", "1"]])
def test_degenerate_episodes_end_in_one_line_as_commands(no_shared, argv):
    """Exit 2 and exactly one line on stderr: no NumPy warnings, no traceback, no NaN report."""
    result = subprocess.run([sys.executable, "-m", "microtrain.adapt", *argv, "--out", str(no_shared / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not (no_shared / "out").exists()


def test_samplers_refuse_degenerate_episodes_for_every_caller():
    from microtrain.data import ArrayDataset, DataError
    from microtrain.episodes import sample_episode, sample_metadataset_episode

    ds = ArrayDataset(np.zeros((40, 2, 2), np.uint8), np.repeat(np.arange(4), 10))
    with pytest.raises(DataError, match="way must be an int >= 2"):
        sample_episode(ds, 1, 2, 2, seed=0)
    with pytest.raises(DataError, match="query_shots must be an int >= 1"):
        sample_episode(ds, 3, 2, 0, seed=0)
    with pytest.raises(DataError, match="min_way must be an int >= 2"):
        sample_metadataset_episode(ds, 0, min_way=1)


def test_one_class_folder_task_is_refused(tmp_path):
    pytest.importorskip("PIL")
    from task_files import class_folders

    from microtrain.data import DataError
    from microtrain.episodes import from_folders

    colours = {"red": (200, 0, 0)}
    with pytest.raises(DataError, match="one class folder .* needs at least 2 classes"):
        from_folders(class_folders(tmp_path / "s", 2, 0, colours), class_folders(tmp_path / "q", 2, 1, colours))


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    pytest.importorskip("PIL")
    tmp = tmp_path_factory.mktemp("task")
    weights, support, query = task(tmp)
    return ["--model", weights, "--support", support, "--query", query, "--epochs", "2"]


def test_report_is_strict_json_with_null_and_files_follow_the_umask(tiny_task, tmp_path, capsys):
    """TinyTL's selection scores are NaN inside; the report says null, and --json prints the same."""
    out = tmp_path / "out"
    assert adapt(*tiny_task, "--method", "tinytl", "--out", out, "--json") == 0
    captured = capsys.readouterr()

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the report")
    report = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    assert json.loads(captured.out, parse_constant=refuse) == report
    assert report["selection"] and all(c["score"] is None for c in report["selection"])
    assert "training [" in captured.err  # with --json the human lines go to stderr
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.json", "classifier.npz"):
        assert ((out / name).stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in out.iterdir()) == ["classifier.npz", "report.json"]


def test_json_to_a_reader_that_went_away_is_not_an_error(tiny_task, tmp_path):
    """``adapt --json | head``: the report cannot all be printed, which is no failure of the run
    (exit status 0, no traceback); the files are written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the report is printed
    try:
        result = subprocess.run([sys.executable, "-m", "microtrain.adapt", *map(str, tiny_task), "--json", "--out",
                                 str(tmp_path / "o")], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["classifier.npz", "report.json"]


def test_quiet_prints_nothing_and_plan_prints_every_buffer(tiny_task, tmp_path, capsys):
    assert adapt(*tiny_task, "--out", tmp_path / "a", "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert adapt(*tiny_task, "--out", tmp_path / "b") == 0
    plain = capsys.readouterr().out
    assert adapt(*tiny_task, "--out", tmp_path / "c", "--plan") == 0
    planned = capsys.readouterr().out
    assert "offset" not in plain and "buffer" in planned and "offset" in planned
    assert len(planned.splitlines()) > len(plain.splitlines()) + 10


def test_budgets_that_do_not_apply_are_named(tiny_task, tmp_path, capsys):
    assert adapt(*tiny_task, "--method", "lastlayer", "--mem-budget", "100KB", "--out", tmp_path / "a") == 0
    captured = capsys.readouterr()
    assert captured.err == ("warning: --mem-budget does not apply to --method lastlayer, whose policy is fixed; "
                            "only the tinytrain methods select under budgets\n")
    assert "(fixed policy)" in captured.out and "budget 100 KiB" not in captured.out
    assert adapt(*tiny_task, "--mem-budget", "100KB", "--out", tmp_path / "b") == 0
    assert capsys.readouterr().err == ""


def _weights_of(classifier_path):
    from microtrain.classifier import Classifier

    return Classifier.load(classifier_path).net.state()


def test_a_worse_adaptation_keeps_the_pre_adaptation_weights(tiny_task, tmp_path, capsys):
    """--method fulltrain --lr 1e4: the run ends with the original weights and one line saying so;
    --no-keep-best stops instead (the loss turns non-finite) or keeps what it trained."""
    from microtrain.checkpoint import load_weights

    out = tmp_path / "out"
    assert adapt(*tiny_task, "--method", "fulltrain", "--lr", "1e4", "--out", out) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: keep-best")]
    assert len(warnings) == 1 and "keeping the pre-adaptation weights" in warnings[0]
    report = json.loads((out / "report.json").read_text())
    assert report["keep_best"]["kept"] == "pre-adaptation"
    assert report["accuracy_after"] == report["accuracy_before"]
    _, original = load_weights(tiny_task[1])
    kept = _weights_of(out / "classifier.npz")
    assert all(np.array_equal(kept[k], original[k]) for k in kept)
    status = adapt(*tiny_task, "--method", "fulltrain", "--lr", "1e4", "--no-keep-best", "--out", tmp_path / "b")
    err = capsys.readouterr().err
    assert (status == 2 and "loss became" in err) or (status == 0 and "keep-best" not in err)


def test_a_classifier_adapts_further_and_keeps_its_classes(tiny_task, tmp_path, capsys):
    from microtrain.classifier import Classifier

    assert adapt(*tiny_task, "--out", tmp_path / "a", "--quiet") == 0
    first = Classifier.load(tmp_path / "a" / "classifier.npz")
    argv = list(tiny_task)
    argv[1] = tmp_path / "a" / "classifier.npz"  # --model: the classifier instead of the backbone
    assert adapt(*argv, "--method", "lastlayer", "--out", tmp_path / "b", "--quiet") == 0
    second = Classifier.load(tmp_path / "b" / "classifier.npz")
    assert second.classes == first.classes == ["blue", "green", "red"]
    assert second.provenance["base_model"] == str(tmp_path / "a" / "classifier.npz")
    assert second.provenance["method"] == "lastlayer" and first.provenance["method"] == "tinytrain-plus"
    assert capsys.readouterr().err == ""


def test_progress_shows_mean_loss_elapsed_and_eta():
    from microtrain.adapt import Progress

    lines = []
    progress = Progress(epochs=4, say=lines.append, tty=False)
    losses = np.linspace(2.0, 1.0, 40)
    for step, loss in enumerate(losses, 1):
        progress(step, 40, loss)
    assert len(lines) == 11  # the first step, then one line per 10% when not on a terminal
    assert lines[0].startswith("  training [..............................] 1/40  loss 2.0000") \
        and lines[0].endswith("ETA ?")
    assert lines[-1].startswith("  training [##############################] 40/40")
    assert f"loss {losses[-10:].mean():.4f} (mean, last 10 steps)" in lines[-1]  # the last pass of 10 steps
    assert lines[-1].endswith("s, ETA 0.0 s") and "ETA ?" not in lines[1]


def test_progress_lines_stay_in_order_when_piped(tiny_task, tmp_path):
    result = subprocess.run([sys.executable, "-m", "microtrain.adapt", *map(str, tiny_task), "--out",
                             str(tmp_path / "out")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    first = lambda prefix: next(i for i, line in enumerate(lines) if line.strip().startswith(prefix))  # noqa: E731
    training = [i for i, line in enumerate(lines) if line.startswith("  training [")]
    assert len(training) == 11
    assert first("selection (") < training[0] and training == list(range(training[0], training[0] + 11))
    assert training[-1] < first("memory plan") < first("query accuracy after")
    # the default method's selection: every layer it trains, with its weight rows and its biases
    # (TinyTrain+ trains every bias behind its depth, weight rows only in some layers)
    header = lines[first("selection (tinytrain-plus") + 1].split()
    assert header == ["layer", "weight", "rows", "biases", "score"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = lines[first("selection (") + 2:training[0]]
    assert [r.split()[0] for r in rows] == [c["layer"] for c in report["selection"]]
    assert all(int(r.split()[4]) > 0 for r in rows)


def test_peak_memory_is_measured_portably(monkeypatch):
    from microtrain import adapt as cli

    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=1000))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.peak_rss_bytes() == 1000 * 1024  # Linux reports KiB
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cli.peak_rss_bytes() == 1000  # macOS reports bytes
    monkeypatch.setitem(sys.modules, "resource", None)  # no such module (Windows)
    monkeypatch.setattr(sys, "platform", "sunos5")
    assert cli.peak_rss_bytes() is None
    # importing the command line needs no resource module
    code = "import sys; sys.modules['resource'] = None; import microtrain.adapt as a; print(a.peak_rss_bytes())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr


def test_missing_pillow_is_one_line_with_an_installable_hint(tiny_task, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert adapt(*tiny_task, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Pillow: pip install Pillow" in err
    assert not (tmp_path / "out").exists()


def test_first_use_conversion_is_announced(tmp_path):
    from conftest import need_shared

    from microtrain.checkpoint import ensure_converted

    need_shared("checkpoints", "mcunet-5fps.pkl")
    lines = []
    path = ensure_converted("mcunet-5fps", weights_dir=tmp_path, log=lines.append)
    assert path == tmp_path / "mcunet-5fps.npz" and len(lines) == 1 and lines[0].startswith("converting ")
    ensure_converted("mcunet-5fps", weights_dir=tmp_path, log=lines.append)
    assert len(lines) == 1  # converted once
