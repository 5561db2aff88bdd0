"""``python -m microtrain.predict`` as a user meets it, after ``python -m microtrain.adapt`` on
class folders: the same accuracy as the adaptation's report, one line per image, JSON and CSV."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from task_files import task

pytest.importorskip("PIL")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A 3-way task adapted once through the command line: (report, classifier path, query folder)."""
    from microtrain.adapt import main

    tmp = tmp_path_factory.mktemp("adapted")
    weights, support, query = task(tmp)
    out = tmp / "run"
    assert main(["--model", str(weights), "--support", str(support), "--query", str(query), "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "report.json").read_text()), out / "classifier.npz", query


def predict(*argv):
    """The command's exit status (argparse's own errors exit from inside the parser)."""
    from microtrain.predict import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def test_query_folder_gives_the_reports_accuracy(adapted, capsys):
    report, clf, query = adapted
    assert predict(clf, query, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    ev = result["evaluation"]
    assert ev["images"] == report["episode"]["query"] == 9 and ev["unlabelled"] == 0
    assert ev["accuracy"] == report["accuracy_after"]
    assert result["classes"] == report["episode"]["classes"] == ["blue", "green", "red"]
    confusion = np.array(ev["confusion"])
    assert confusion.sum() == 9 and np.trace(confusion) == ev["correct"]
    for name, c in ev["per_class"].items():
        k = result["classes"].index(name)
        assert c["images"] == confusion[k].sum() == 3 and c["correct"] == confusion[k, k]
    # each image alone gets the class it got in the batch
    for record in result["predictions"][::4]:
        assert predict(clf, record["path"]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert line == f"{record['path']}  {record['class']}  {record['score']:.3f}"


def test_text_csv_top_k_and_zip(adapted, capsys, tmp_path):
    report, clf, query = adapted
    assert predict(clf, query, "--top-k", "2") == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(str(query))]
    assert len(lines) == 9 and all(line.count("(") == 1 for line in lines)  # best, then the runner-up
    assert any(line.startswith("accuracy: ") for line in out) and any("confusion matrix" in line for line in out)
    assert predict(clf, query, "--csv", "--top-k", "3") == 0
    captured = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(captured.out)))
    assert rows[0] == ["path", "class", "score", "class_2", "score_2", "class_3", "score_3", "true_class"]
    assert len(rows) == 10 and {r[-1] for r in rows[1:]} == {"blue", "green", "red"}
    assert "accuracy: " in captured.err  # the evaluation stays off the CSV
    zpath = tmp_path / "query.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(query.rglob("*.png")):
            zf.write(f, f"query/{f.relative_to(query)}")
    assert predict(clf, zpath, "--json") == 0
    from_zip = json.loads(capsys.readouterr().out)
    assert from_zip["evaluation"]["accuracy"] == report["accuracy_after"]


def test_loose_images_non_images_and_unknown_folders(adapted, capsys, tmp_path):
    _, clf, query = adapted
    shutil.copy(next(query.rglob("*.png")), tmp_path / "loose.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    assert predict(clf, tmp_path, "--json") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [p["path"] for p in result["predictions"]] == [str(tmp_path / "loose.png")]
    assert result["evaluation"] is None and result["predictions"][0]["true_class"] is None
    assert captured.err == (f"note: {tmp_path}: skipped 1 file: 1 not in a format the installed Pillow decodes "
                            "(1 .txt)\n")


@pytest.mark.parametrize("make, message", [
    (lambda tmp, clf: [clf, tmp / "nowhere"], "nowhere: no such file or directory"),
    (lambda tmp, clf: [tmp / "weights" / "tiny.npz", tmp], "backbone weight file: adapt it"),
    (lambda tmp, clf: [clf, tmp / "empty"], "no images found"),
    (lambda tmp, clf: [clf, tmp / "broken.png"], "not a decodable image"),
    (lambda tmp, clf: [clf, tmp, "--top-k", "0"], "--top-k must be >= 1"),
    (lambda tmp, clf: [clf, tmp, "--top-k", "two"], "error: argument --top-k: invalid int value: 'two' (see "
                                                    "python -m microtrain.predict --help)"),
    (lambda tmp, clf: [clf, tmp, "--json", "--csv"], "argument --csv: not allowed with argument --json"),
])
def test_bad_input_is_one_line_and_exit_2(adapted, capsys, tmp_path, make, message):
    from task_files import tiny_weights

    _, clf, _ = adapted
    tiny_weights(tmp_path / "weights")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert predict(*make(tmp_path, clf)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_runs_as_a_command(adapted, tmp_path):
    """The module runs as ``python -m microtrain.predict`` and its output can be piped."""
    _, clf, query = adapted
    result = subprocess.run([sys.executable, "-m", "microtrain.predict", str(clf), str(query)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith(str(query))]) == 9


def test_list_image_files_finds_what_predict_classifies(tmp_path):
    """data.list_image_files, the public listing predict reads through: a folder recursively
    (sorted, hidden files and loops left out, non-images counted), a file given alone whatever
    its name, one line for a path that does not exist; nothing is read until asked."""
    from microtrain.data import DataError, list_image_files

    root = tmp_path / "photos"
    for rel in ("cat/1.png", "cat/sub/2.jpg", "dog/3.png", ".hidden/4.png", "cat/notes.txt", "5.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "dog" / "all").symlink_to(root, target_is_directory=True)  # a loop: skipped, named
    found, notes = list_image_files(root)
    assert [f.shown for f in found] == [str(root / r) for r in ("5.png", "cat/1.png", "cat/sub/2.jpg", "dog/3.png")]
    assert [f.folders for f in found] == [("photos",), ("photos", "cat"), ("photos", "cat", "sub"), ("photos", "dog")]
    assert found[2].read() == b"cat/sub/2.jpg"
    assert len(notes) == 2 and "dog/all ->" in notes[0] and notes[1].endswith("(1 .txt)")
    alone, notes = list_image_files(root / "cat" / "notes.txt")
    assert [(f.shown, f.folders) for f in alone] == [(str(root / "cat" / "notes.txt"), ("cat",))] and notes == []
    with pytest.raises(DataError, match=r"nowhere: no such file or directory$"):
        list_image_files(tmp_path / "nowhere")
