"""The adapted classifier file and its Python API: round trips, validation, preprocessing."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from conftest import random_arrays, small_arch
from microtrain.classifier import Classifier, ClassifierError, load_image
from microtrain.classifier_format import FORMAT_VERSION
from microtrain.model import Network
from microtrain.train import class_prototypes, embed, normalize_rows

CLASSES = ["cat", "café a", "dog"]


def network(seed=0):
    arch = {**small_arch(), "source": {"file": "test", "sha256": "0" * 64, "kind": "int8-dict"}}
    return Network(arch, random_arrays(arch, seed))


def support_set(seed=1, per_class=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3 * per_class, 3, 16, 16), dtype=np.uint8)
    return images, np.repeat(np.arange(3), per_class).astype(np.int64)


def classifier(seed=0):
    images, labels = support_set()
    return Classifier.from_support(network(seed), images, labels, CLASSES, 10.0, {"method": "test", "seed": 3})


def test_prototypes_are_the_adapted_networks_class_means(tmp_path):
    net = network()
    images, labels = support_set()
    clf = Classifier.from_support(net, images, labels, CLASSES, 10.0, {})
    expected = class_prototypes(embed(net, images), labels, 3)
    np.testing.assert_array_equal(clf.prototypes, expected)
    # a query is classified by the most similar prototype, scored by cosine similarity
    z = normalize_rows(embed(net, images))
    np.testing.assert_allclose(clf.scores(images), z @ expected.T, rtol=1e-6)
    assert [p.label for p in clf.predict(images)] == np.argmax(z @ expected.T, axis=1).tolist()


def test_round_trip_keeps_everything_and_follows_the_umask(tmp_path):
    clf = classifier()
    path = clf.save(tmp_path / "out" / "classifier.npz")
    back = Classifier.load(path)
    assert back.classes == CLASSES and back.scale == 10.0 and back.provenance == {"method": "test", "seed": 3}
    np.testing.assert_array_equal(back.prototypes, clf.prototypes)
    images, _ = support_set(seed=5)
    np.testing.assert_array_equal(back.scores(images), clf.scores(images))
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["classifier.npz"]  # no temporary left
    with np.load(path, allow_pickle=False) as npz:  # plain arrays only, the ImageNet head dropped
        assert "prototypes" in npz.files and not any(k.startswith("classifier.") for k in npz.files)
        header = json.loads(str(npz["__classifier__"]))
    assert header["format"] == "microtrain-classifier" and header["version"] == FORMAT_VERSION
    assert header["preprocessing"]["resolution"] == 16


def test_tinytl_branches_travel_with_the_classifier(tmp_path):
    from microtrain.methods import Budgets
    from microtrain.pipeline import adapt_episode
    from microtrain.train import FinetuneConfig

    net = network()
    images, labels = support_set()
    adapt_episode(net, images, labels, images, labels, "tinytl", Budgets(512 * 1024, 10 ** 6),
                  FinetuneConfig(epochs=2, lr=1e-2))
    assert net.block_hook is not None
    clf = Classifier.from_support(net, images, labels, CLASSES, 10.0, {})
    back = Classifier.load(clf.save(tmp_path / "c.npz"))
    assert back.net.block_hook is not None
    np.testing.assert_array_equal(back.scores(images), clf.scores(images))


def test_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    clf = classifier()
    path = clf.save(tmp_path / "c.npz")
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        classifier(seed=1).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def _rewrite(path, out, change):
    with np.load(path, allow_pickle=False) as npz:
        contents = {k: npz[k] for k in npz.files}
    change(contents)
    np.savez(out, **contents)
    return out


def _header(change):
    def apply(contents):
        header = json.loads(str(contents["__classifier__"]))
        change(header)
        contents["__classifier__"] = np.array(json.dumps(header))
    return apply


@pytest.mark.parametrize("change, message", [
    (_header(lambda h: h.update(version=2)), "classifier format version 2; this microtrain reads version 1"),
    (_header(lambda h: h.update(format="other")), "does not name the format"),
    (_header(lambda h: h.pop("classes")), "has no 'classes'"),
    (_header(lambda h: h.update(classes=["a", "a", "b"])), "unique"),
    (_header(lambda h: h.update(classes=["a", "b"])), r"prototypes \(3, 8\) should be \(2, 8\)"),
    (_header(lambda h: h.update(scale=-1)), "scale must be a positive number"),
    (_header(lambda h: h["preprocessing"].update(name="imagenet-mean-std")), "made with preprocessing"),
    (_header(lambda h: h["preprocessing"].update(resolution=32)), "preprocessing resolution 32"),
    (lambda c: c.update(prototypes=c["prototypes"] * 2), "finite unit vectors"),
    (lambda c: c.update(prototypes=c["prototypes"].astype(np.float64)), "float32 'prototypes'"),
    (lambda c: c.pop("blocks.1.depthwise.weight"), "missing key 'blocks.1.depthwise.weight'"),
    (lambda c: c.update({"__classifier__": np.array("{not json")}), "__classifier__ is not valid JSON"),
])
def test_load_refuses_a_bad_file_in_one_line(tmp_path, change, message):
    path = _rewrite(classifier().save(tmp_path / "c.npz"), tmp_path / "bad.npz", change)
    with pytest.raises(ClassifierError, match=message) as exc:
        Classifier.load(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_load_refuses_what_is_not_a_classifier(tmp_path):
    from microtrain.checkpoint import save_weights

    net = network()
    weights = save_weights(tmp_path / "w.npz", net.arch, net.state())
    with pytest.raises(ClassifierError, match="backbone weight file: adapt it"):
        Classifier.load(weights)
    good = classifier().save(tmp_path / "c.npz")
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "objects.npz", __classifier__=np.array([{"a": 1}], dtype=object))
    for name, message in [("cut.npz", "not a classifier file"), ("text.npz", "not a classifier file"),
                          ("one.npy", "a single .npy array"), ("objects.npz", "not a classifier file"),
                          ("missing.npz", "cannot read")]:
        with pytest.raises(ClassifierError, match=message) as exc:
            Classifier.load(tmp_path / name)
        assert "\n" not in str(exc.value)


def test_predict_takes_paths_and_arrays_with_the_adaptation_preprocessing(tmp_path):
    """A file, the same picture as a uint8 (H, W, 3) array, and the episode pipeline's uint8
    (3, R, R) give the same scores; grayscale arrays and files become 3 equal channels."""
    Image = pytest.importorskip("PIL.Image")
    from microtrain.data import open_dataset

    clf = classifier()
    rng = np.random.default_rng(7)
    pictures = [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(3)]
    for i, pic in enumerate(pictures):
        (tmp_path / "ds" / f"c{i}").mkdir(parents=True)
        Image.fromarray(pic).save(tmp_path / "ds" / f"c{i}" / "x.png")
    ds = open_dataset(tmp_path / "ds")
    episode_images = np.stack([ds.load(items[0], 16) for items in ds.items_per_class])
    paths = [tmp_path / "ds" / f"c{i}" / "x.png" for i in range(3)]
    by_path = clf.scores(paths)
    np.testing.assert_array_equal(by_path, clf.scores(pictures))
    np.testing.assert_array_equal(by_path, clf.scores(np.stack(pictures)))
    np.testing.assert_array_equal(by_path, clf.scores(episode_images))
    one = clf.predict(str(paths[1]), top_k=2)
    assert len(one) == 1 and one[0].name == CLASSES[int(np.argmax(by_path[1]))] and len(one[0].top) == 2
    assert one[0].top[0] == (one[0].name, one[0].score) and one[0].top[1][1] <= one[0].score
    gray = pictures[0][:, :, 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(clf.scores([gray]), clf.scores([np.repeat(gray[:, :, None], 3, axis=2)]))
    np.testing.assert_array_equal(clf.scores([tmp_path / "gray.png"]), clf.scores([gray]))
    np.testing.assert_array_equal(load_image((tmp_path / "gray.png").read_bytes(), 16), load_image(gray, 16))
    for bad, message in [(pictures[0].astype(np.float32), "must be uint8"),
                         (np.zeros((8, 8, 4), np.uint8), r"\(H, W, 3\) RGB or \(H, W\) grayscale"),
                         (np.zeros((0, 8, 3), np.uint8), "grayscale")]:
        with pytest.raises(ClassifierError, match=message):
            clf.predict([bad])
    with pytest.raises(ClassifierError, match="top_k must be >= 1"):
        clf.predict([gray], top_k=0)


def test_from_support_needs_every_class(tmp_path):
    images, labels = support_set()
    with pytest.raises(ClassifierError, match="every one of its 4 classes"):
        Classifier.from_support(network(), images, labels, CLASSES + ["extra"], 10.0, {})
    with pytest.raises(ClassifierError, match="at least 2"):
        Classifier.from_support(network(), images[:3], labels[:3], CLASSES[:1], 10.0, {})


def test_zip_member_names_without_the_utf8_flag_read_as_written(tmp_path):
    """Zip tools often store UTF-8 names without the UTF-8 flag; predict shows them as written."""
    from microtrain.predict import collect

    zpath = tmp_path / "q.zip"
    with zipfile.ZipFile(zpath, "w") as zf:  # an ASCII stand-in of the same byte length, patched below
        for name in ("cafXX a/1.png", "dog/2.png", "dog/notes.txt"):
            zf.writestr(name, b"data")
    raw = zpath.read_bytes()
    assert raw.count(b"cafXX a") == 2  # local header and central directory; the flag stays unset
    zpath.write_bytes(raw.replace(b"cafXX a", "café a".encode("utf-8")))
    with zipfile.ZipFile(zpath) as zf:
        assert zf.namelist()[0] == "caf├⌐ a/1.png"  # what zipfile alone makes of it
    items, notes = collect([str(zpath)], CLASSES)
    assert [i.shown for i in items] == [f"{zpath}:café a/1.png", f"{zpath}:dog/2.png"]
    assert notes == [f"{zpath}: skipped 1 file: 1 not in a format the installed Pillow decodes (1 .txt)"]
    assert [i.truth for i in items] == [1, 2] and items[0].read() == b"data"
