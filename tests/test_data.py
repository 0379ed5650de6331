"""pleas.data: the real offline tasks, the user's own images, subsets and loaders."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pleas import data
from pleas.data import ImageSet, MissingDataError, load_images, load_task, resolve_data

# task -> (train count, test count, number of classes)
COUNTS = {
    "fashion_mnist": (60000, 10000, 10),
    "fashion_mnist:0-4": (30000, 5000, 5),
    "fashion_mnist:5-9": (30000, 5000, 5),
    "animal_mnist": (8000, 2000, 10),
    "mnist5k": (4000, 1000, 10),
    "sklearn_digits": (1438, 359, 10),
}
# per-class counts of scikit-learn's load_digits (1,797 images)
DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_tasks_listed():
    assert set(data.TASKS) == set(COUNTS)


@pytest.mark.parametrize("task", sorted(COUNTS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_task_shapes_counts_and_ranges(task, split):
    ds = load_task(task, split)
    n_train, n_test, k = COUNTS[task]
    n = n_train if split == "train" else n_test
    assert len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    assert ds.labels.min() == 0 and ds.labels.max() == k - 1
    assert len(ds.classes) == k == ds.num_classes
    assert ds.name == f"{task}/{split}"
    # every class present, in the proportions of the source
    counts = torch.bincount(ds.labels, minlength=k).tolist()
    if task.startswith("fashion_mnist"):
        assert counts == [n // k] * k
    elif task in ("animal_mnist", "mnist5k"):
        assert counts == [n // k] * k
    else:  # sklearn_digits: each class split 80/20 (rounded)
        per_class_test = [round(0.2 * c) for c in DIGITS_PER_CLASS]
        expected = per_class_test if split == "test" else [
            c - t for c, t in zip(DIGITS_PER_CLASS, per_class_test)]
        assert counts == expected


def test_default_split_is_test():
    assert len(load_task("mnist5k")) == 1000


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)


def test_fashion_mnist_values_match_the_idx_files():
    raw = _read_idx(Path(data.FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    ds = load_task("fashion_mnist", "test")
    expected = (torch.from_numpy(raw[:50].astype(np.float32)) / 255 - 0.5) / 0.5
    assert torch.equal(ds.images[:50, 0], expected)
    # the first test labels of Fashion-MNIST: Ankle boot, Pullover, Trouser, Trouser, Shirt
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert ds.classes[9] == "Ankle boot"


def test_fashion_mnist_halves_are_remapped_subsets():
    full = load_task("fashion_mnist", "test")
    for task, lo in (("fashion_mnist:0-4", 0), ("fashion_mnist:5-9", 5)):
        half = load_task(task, "test")
        keep = (full.labels >= lo) & (full.labels < lo + 5)
        assert torch.equal(half.images, full.images[keep])
        assert torch.equal(half.labels, full.labels[keep] - lo)
        assert half.classes == full.classes[lo:lo + 5]


def test_fixed_splits_are_disjoint_and_cover_the_source():
    # mnist5k: the 5,000 rows of the csv, split 4k/1k with no row in both splits
    tr, te = load_task("mnist5k", "train"), load_task("mnist5k", "test")
    rows = {bytes(x.numpy().tobytes()) for x in tr.images}
    assert len(tr) + len(te) == 5000
    overlap = sum(bytes(x.numpy().tobytes()) in rows for x in te.images)
    assert overlap == 0


def test_sklearn_digits_are_the_8x8_digits_resized():
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] * 255 / 16
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    expected = (x / 255 - 0.5) / 0.5
    both = torch.cat([load_task("sklearn_digits", s).images for s in ("train", "test")])
    assert both.shape == expected.shape == (1797, 1, 28, 28)
    # the same images, in another order: compare sorted per-image sums
    key = lambda t: t.flatten(1).sum(1).sort().values  # noqa: E731
    assert torch.allclose(key(both), key(expected), atol=1e-3)


def test_class_names():
    assert load_task("animal_mnist", "test").classes[:3] == ["Bear", "Bird", "Cat"]
    assert load_task("mnist5k", "test").classes == [str(i) for i in range(10)]
    assert load_task("fashion_mnist:5-9", "test").classes == [
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_subset_is_stratified_and_deterministic():
    ds = load_task("fashion_mnist", "test")
    a, b, c = ds.subset(1000, seed=0), ds.subset(1000, seed=0), ds.subset(1000, seed=1)
    assert len(a) == 1000
    assert torch.bincount(a.labels).tolist() == [100] * 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # uneven quotas still add up exactly: 7 per class -> largest remainders
    s = ds.subset(73, seed=3)
    assert len(s) == 73 and sorted(torch.bincount(s.labels).tolist()) == [7] * 7 + [8] * 3
    assert ds.subset(len(ds) + 5) is ds
    with pytest.raises(ValueError):
        ds.subset(-1)


def test_loader_batches_and_seeded_shuffle():
    ds = load_task("mnist5k", "test")
    batches = list(ds.loader(256))
    assert [len(x) for x, _ in batches] == [256, 256, 256, 232]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels)
    first = [y for _, y in ds.loader(100, shuffle=True, seed=7)]
    again = [y for _, y in ds.loader(100, shuffle=True, seed=7)]
    other = [y for _, y in ds.loader(100, shuffle=True, seed=8)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert not torch.equal(torch.cat(first), ds.labels)


def test_unlabeled_loader_gives_minus_one():
    ds = ImageSet(torch.zeros(5, 1, 28, 28), None, [], "blank")
    (x, y), = list(ds.loader(8))
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [-1] * 5
    assert len(ds.subset(3, seed=0)) == 3


def test_adapt_size_and_channels():
    ds = load_task("mnist5k", "test").subset(10)
    big = ds.adapt(size=32, channels=3)
    assert big.images.shape == (10, 3, 32, 32)
    assert torch.equal(big.images[:, 0], big.images[:, 2])
    assert ds.adapt() is ds


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_task("cifar10")
    with pytest.raises(ValueError, match="train, test"):
        load_task("mnist5k", "validation")
    with pytest.raises(ValueError, match="class range"):
        load_task("fashion_mnist:3-12")


def test_missing_source_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PLEAS_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        load_task("fashion_mnist:0-4")


def test_cache_is_written_and_a_corrupt_cache_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path))
    first = load_task("mnist5k", "test")
    files = list(tmp_path.glob("mnist5k-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"not a zip file")
    again = load_task("mnist5k", "test")
    assert torch.equal(first.images, again.images)


# ---------------------------------------------------------------------------------------------
# the user's own images
# ---------------------------------------------------------------------------------------------

def _png(path: Path, value, size=(32, 32), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png", (255, 255, 255))
        _png(tmp_path / "dog" / "nested" / f"{i}.jpg", (0, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_images(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.float32
    assert torch.all(ds.images[:3] == 1.0) and torch.all(ds.images[3:] == -1.0)
    rgb = load_images(tmp_path, size=16, channels=3, limit=4)
    assert rgb.images.shape == (4, 3, 16, 16)
    assert rgb.labels.tolist() == [0, 0, 1, 1]  # limit is stratified


def test_flat_folder_is_unlabeled(tmp_path):
    _png(tmp_path / "a.png", 128, mode="L")
    _png(tmp_path / "b.png", (255, 0, 0))
    ds = load_images(tmp_path)
    assert ds.labels is None and ds.classes == [] and len(ds) == 2
    assert torch.allclose(ds.images[0], torch.tensor((128 / 255 - 0.5) / 0.5), atol=1e-6)
    # PIL's RGB -> L conversion: L = R * 299/1000 (+ G, B terms that are 0 here) = 76
    assert torch.allclose(ds.images[1], torch.tensor((76 / 255 - 0.5) / 0.5), atol=1e-6)


def test_saved_datasets_dataset(tmp_path):
    import datasets

    imgs = [Image.new("L", (20, 20), v) for v in (0, 255, 0, 255)]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["zero", "one"])})
    datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0, 1]}, features=feats) \
        .save_to_disk(str(tmp_path / "saved"))
    ds = load_images(tmp_path / "saved", size=28, channels=1)
    assert ds.classes == ["zero", "one"] and ds.labels.tolist() == [0, 1, 0, 1]
    assert ds.images.shape == (4, 1, 28, 28)
    assert ds.images[1].min() == 1.0 and ds.images[0].max() == -1.0
    # unlabeled: an image column only
    datasets.Dataset.from_dict({"image": imgs}, features=datasets.Features(
        {"image": datasets.Image()})).save_to_disk(str(tmp_path / "nolabel"))
    un = load_images(tmp_path / "nolabel", channels=3)
    assert un.labels is None and un.images.shape == (4, 3, 28, 28)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path)
    _png(tmp_path / "broken" / "x.png", 0)
    (tmp_path / "broken" / "y.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_images(tmp_path / "broken")


def test_resolve_data(tmp_path):
    assert resolve_data("mnist5k").name == "mnist5k/train"
    assert len(resolve_data("mnist5k", split="test", limit=50)) == 50
    assert resolve_data("mnist5k", channels=3).images.shape[1] == 3
    _png(tmp_path / "x.png", 0)
    assert len(resolve_data(str(tmp_path))) == 1
    with pytest.raises(ValueError, match="neither a task"):
        resolve_data(str(tmp_path / "missing"))
