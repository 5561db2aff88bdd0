"""Episode samplers (quick protocol, Meta-Dataset), folder pairs, cached episode images."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain.data import ArrayDataset, DataError, open_dataset
from microtrain.episodes import (Episode, EpisodeImages, from_folders, sample_episode,
                                 sample_metadataset_episode)
from microtrain.paths import MissingSharedError, shared_file


def array_dataset(sizes, side=2) -> ArrayDataset:
    """One tiny image per item; pixel value = class index, so loads can be checked."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = np.broadcast_to((y % 256).astype(np.uint8)[:, None, None], (len(y), side, side)).copy()
    return ArrayDataset(x, y, names=[f"c{i:03d}" for i in range(len(sizes))])


def class_of(ds, episode, part):
    """Dataset class name of each item in support/query, looked up independently."""
    owner = {item: name for name, items in zip(ds.classes, ds.items_per_class) for item in items}
    return [owner[i] for i in getattr(episode, part)]


def check_episode(ds, ep: Episode):
    assert ep.support_labels.dtype == np.int64 and ep.query_labels.dtype == np.int64
    assert len(ep.support) == len(ep.support_labels) and len(ep.query) == len(ep.query_labels)
    assert len(set(ep.classes)) == ep.way
    assert set(ep.support).isdisjoint(ep.query)
    assert len(set(ep.support)) == len(ep.support) and len(set(ep.query)) == len(ep.query)
    for part in ("support", "query"):
        labels = getattr(ep, f"{part}_labels")
        assert class_of(ds, ep, part) == [ep.classes[k] for k in labels]


# ---------------------------------------------------------------------------------------------
# Quick protocol
# ---------------------------------------------------------------------------------------------

def test_sample_episode_shapes_and_disjointness():
    ds = array_dataset([20] * 12)
    ep = sample_episode(ds, way=5, shot=3, query_shots=4, seed=1)
    check_episode(ds, ep)
    assert ep.way == 5 and ep.seed == 1
    assert ep.shots.tolist() == [3] * 5 and ep.query_shots.tolist() == [4] * 5
    assert ep.classes == sorted(ep.classes)


def test_sample_episode_is_deterministic_by_seed():
    ds = array_dataset([20] * 30)
    a, b = (sample_episode(ds, 10, 5, 10, seed=7) for _ in range(2))
    c = sample_episode(ds, 10, 5, 10, seed=8)
    assert (a.classes, a.support, a.query) == (b.classes, b.support, b.query)
    np.testing.assert_array_equal(a.support_labels, b.support_labels)
    assert (a.classes, a.support, a.query) != (c.classes, c.support, c.query)


def test_sample_episode_errors():
    ds = array_dataset([20, 20, 8, 20])
    with pytest.raises(DataError, match="way=5 but the dataset has only 4 classes"):
        sample_episode(ds, way=5, shot=1, query_shots=1, seed=0)
    with pytest.raises(DataError, match=r"class 'c002' has 8 images, .* needs 15") as exc:
        sample_episode(ds, way=2, shot=5, query_shots=10, seed=0)
    assert "\n" not in str(exc.value)
    ep = sample_episode(ds, way=3, shot=5, query_shots=10, seed=0, skip_short=True)
    assert "c002" not in ep.classes
    with pytest.raises(DataError, match="only 3 classes with >= 15 images"):
        sample_episode(ds, way=4, shot=5, query_shots=10, seed=0, skip_short=True)
    with pytest.raises(DataError, match="shot must be an int >= 1"):
        sample_episode(ds, way=2, shot=0, query_shots=1, seed=0)


def test_nothing_decoded_while_sampling(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    import microtrain.data as data
    for c in "abc":
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((5, 5, 3), i * 20, np.uint8)).save(tmp_path / c / f"{i}.png")
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    ds = open_dataset(tmp_path)
    ep = sample_episode(ds, 3, 2, 2, seed=0)
    sample_metadataset_episode(ds, seed=0, min_way=2)
    assert calls == []
    ep.load(8)
    assert len(calls) == 12


# ---------------------------------------------------------------------------------------------
# Meta-Dataset sampler
# ---------------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(2, 400), min_size=5, max_size=90),
       seed=st.integers(0, 2**32 - 1))
def test_metadataset_invariants(sizes, seed):
    ds = array_dataset(sizes, side=1)
    ep = sample_metadataset_episode(ds, seed=seed)
    check_episode(ds, ep)
    assert 5 <= ep.way <= min(50, len(sizes))
    chosen = [sizes[ds.classes.index(c)] for c in ep.classes]
    q = ep.query_shots
    assert (q == q[0]).all() and q[0] == min(10, min(chosen) // 2) and q[0] >= 1
    shots = ep.shots
    assert (shots >= 1).all() and (shots <= 100).all()
    assert (shots + q <= np.array(chosen)).all()
    assert len(ep.support) <= 500


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(2, 60), min_size=5, max_size=40), seed=st.integers(0, 2**16),
       max_way=st.integers(5, 20), max_support=st.integers(5, 80),
       per_class=st.integers(1, 10), query=st.integers(1, 5))
def test_metadataset_respects_custom_limits(sizes, seed, max_way, max_support, per_class, query):
    ds = array_dataset(sizes, side=1)
    ep = sample_metadataset_episode(ds, seed, max_way=max_way, max_support=max_support,
                                    max_support_per_class=per_class, query_per_class=query)
    check_episode(ds, ep)
    assert 5 <= ep.way <= min(max_way, len(sizes), max_support)
    assert (ep.query_shots <= query).all() and len(ep.support) <= max_support
    assert (ep.shots >= 1).all() and (ep.shots <= per_class).all()


def test_metadataset_is_deterministic_and_varied():
    ds = array_dataset([30] * 40 + [200] * 5)
    a, b = sample_metadataset_episode(ds, 11), sample_metadataset_episode(ds, 11)
    assert (a.classes, a.support, a.query) == (b.classes, b.support, b.query)
    eps = [sample_metadataset_episode(ds, s) for s in range(200)]
    ways = np.array([e.way for e in eps])
    supports = np.array([len(e.support) for e in eps])
    assert ways.min() == 5 and ways.max() >= 40  # uniform over [5, 45]
    assert 20 < ways.mean() < 30
    assert supports.min() < 100 and supports.max() > 300  # beta spreads the support size
    # imbalanced support: shots follow class sizes (noisy), big classes get more
    mixed = [e for e in eps if any(c >= "c040" for c in e.classes) and e.way < 20]
    big = [s for e in mixed for c, s in zip(e.classes, e.shots) if c >= "c040"]
    small = [s for e in mixed for c, s in zip(e.classes, e.shots) if c < "c040"]
    assert np.mean(big) > 2 * np.mean(small)


def test_metadataset_support_size_formula_on_full_budget():
    """With beta -> 1 contributions are min(100, remaining); a 10-class dataset of 40 images
    gives at most 10 * 30 = 300 support images and exactly 10 queries per class."""
    ds = array_dataset([40] * 10)
    for seed in range(50):
        ep = sample_metadataset_episode(ds, seed)
        assert (ep.query_shots == 10).all() and len(ep.support) <= 30 * ep.way


def test_metadataset_errors():
    with pytest.raises(DataError, match="min_way=5"):
        sample_metadataset_episode(array_dataset([10] * 4), seed=0)
    with pytest.raises(DataError, match="class 'c003' has 1 images"):
        sample_metadataset_episode(array_dataset([10, 10, 10, 1, 10, 10]), seed=0)
    ep = sample_metadataset_episode(array_dataset([10, 10, 10, 1, 10, 10]), seed=0,
                                    skip_short=True)
    assert "c003" not in ep.classes


# ---------------------------------------------------------------------------------------------
# from_folders and EpisodeImages
# ---------------------------------------------------------------------------------------------

def _folders(tmp_path, support_classes, query_classes):
    Image = pytest.importorskip("PIL.Image")
    for part, classes in (("support", support_classes), ("query", query_classes)):
        for ci, (c, n) in enumerate(classes.items()):
            (tmp_path / part / c).mkdir(parents=True)
            for i in range(n):
                value = 40 * ci + i
                Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(
                    tmp_path / part / c / f"{i}.png")
    return tmp_path / "support", tmp_path / "query"


def test_from_folders(tmp_path):
    s, q = _folders(tmp_path, {"b": 2, "a": 3}, {"a": 1, "b": 4})
    ep = from_folders(s, q)
    assert ep.classes == ["a", "b"]
    assert ep.support_labels.tolist() == [0, 0, 0, 1, 1]
    assert ep.query_labels.tolist() == [0, 1, 1, 1, 1]
    imgs = ep.load(4)
    # pixel value = 40 * (order the class was written in that folder) + image number
    assert imgs.support[:, 0, 0, 0].tolist() == [40, 41, 42, 0, 1]
    assert imgs.query[:, 0, 0, 0].tolist() == [0, 40, 41, 42, 43]


def test_from_folders_class_mismatch_names_classes(tmp_path):
    s, q = _folders(tmp_path, {"a": 1, "b": 1, "c": 1}, {"a": 1, "d": 1})
    with pytest.raises(DataError) as exc:
        from_folders(s, q)
    msg = str(exc.value)
    assert "\n" not in msg and "only in support: 'b', 'c'" in msg and "only in query: 'd'" in msg


def test_episode_images_cached_uint8_and_batches():
    ds = array_dataset([12] * 6, side=5)
    ep = sample_episode(ds, 4, 3, 2, seed=0)
    imgs = ep.load(7)
    assert isinstance(imgs, EpisodeImages)
    assert imgs.support.dtype == np.uint8 and imgs.support.shape == (12, 3, 7, 7)
    assert imgs.query.shape == (8, 3, 7, 7) and imgs.nbytes == 20 * 3 * 49
    assert imgs.load_seconds >= 0
    # pixel value = dataset class index, so images line up with labels
    idx = [ds.classes.index(c) for c in ep.classes]
    assert (imgs.support[:, 0, 0, 0] == np.array(idx)[ep.support_labels]).all()
    seen = []
    for x, y in imgs.batches("support", batch_size=5, rng=np.random.default_rng(0)):
        assert x.dtype == np.float32 and x.shape[1:] == (3, 7, 7) and len(x) <= 5
        assert x.min() >= -1 and x.max() <= 1
        seen.extend(y.tolist())
    assert sorted(seen) == sorted(ep.support_labels.tolist())
    assert imgs.query_input([0, 1]).shape == (2, 3, 7, 7)
    with pytest.raises(DataError):
        next(imgs.batches("train"))


# ---------------------------------------------------------------------------------------------
# Shared datasets (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------

SHARED = ["omniglot.zip", "traffic_sign.zip", "quickdraw.npz", "flowers.zip", "dtd.zip"]


@pytest.mark.parametrize("name", SHARED)
def test_shared_dataset_episode(name):
    try:
        path = shared_file("data", name)
    except MissingSharedError as exc:
        pytest.skip(f"shared dataset not available: {exc}")
    if name.endswith(".zip"):
        pytest.importorskip("PIL", reason="decoding the shared PNG/JPEG data needs Pillow")
    with open_dataset(path) as ds:
        assert len(ds.classes) >= 10 and min(len(i) for i in ds.items_per_class) >= 20
        ep = sample_episode(ds, way=10, shot=5, query_shots=10, seed=0)
        check_episode(ds, ep)
        imgs = ep.load(128)
        assert imgs.support.shape == (50, 3, 128, 128) and imgs.query.shape == (100, 3, 128, 128)
        assert imgs.support.std() > 5  # real pictures, not blank
        md = sample_metadataset_episode(ds, seed=0)
        check_episode(ds, md)


def test_episode_api_lives_above_the_dataset_readers():
    # The samplers read datasets through microtrain.data; data never reaches up to them (the
    # re-export it once had hid an import cycle inside a function).
    import microtrain.data as data
    import microtrain.episodes as episodes
    assert episodes.open_dataset is data.open_dataset
    assert not hasattr(data, "sample_episode") and not hasattr(data, "EpisodeImages")
