"""The README's Python examples run as written."""
import re
from pathlib import Path

import numpy as np
import pytest


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    """Each block runs in a folder holding what it names: the classifier adapt writes
    (runs/adapt/classifier.npz, here of a tiny network) and a photo."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    if "load_classifier" in "".join(blocks):
        Image = pytest.importorskip("PIL.Image")
        from test_classifier import classifier

        classifier().save(tmp_path / "runs" / "adapt" / "classifier.npz")
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save("photo.jpg")
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "arena:" in out  # the engine example prints its memory plan
    assert "['cat', 'café a', 'dog']" in out  # the classifier example prints the class names
    lines = out.splitlines()
    first = lines.index("['cat', 'café a', 'dog']")
    assert all(line.split()[0] in ("cat", "café", "dog") for line in lines[first + 1:first + 3])  # two images
