"""Images streamed from disk at a model's resolution: only the batches in flight are in memory.

:func:`open_images` lists a source without decoding any image -- an image folder (one
subfolder per class, or flat; RGB or gray, any size), a folder in the layout
``datasets.load_dataset("imagefolder", data_dir=...)`` reads (``metadata.jsonl``/``.csv``, or
``train``/``test`` split folders), a dataset saved with ``save_to_disk``, or a ``.parquet`` /
``.arrow`` file with an ``Image`` column -- and returns an :class:`ImageStream`: a torch
``Dataset`` that decodes one image per item (the pixel limit checked from its header first, as
:mod:`pleas.data` does), converts it to the model's mode (``L`` or ``RGB``, transparency
composited onto black) and applies the model's :class:`pleas.preprocess.Preprocess` (timm's eval
transform: resize, centre crop, normalise).  :meth:`ImageStream.loader` reads it through a
``DataLoader`` with ``workers`` processes; :meth:`ImageStream.subset` is stratified and
deterministic given a seed, and every pass over a stream yields the same batches, so the
statistics pass may iterate it more than once.  ``len``, ``labels`` and ``classes`` are known
from the listing alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data import (DataError, _dataset_labels, _flatten_alpha, _image_column, _is_saved_dataset,
                   _open_image, list_image_folder, _open_saved_dataset, _pixel_scale,
                   _stratified_indices, _WIDE_MODES)
from .preprocess import Preprocess

__all__ = ["ImageStream", "open_images", "SPLIT_DIRS"]

SPLIT_DIRS = ("train", "validation", "val", "test")
_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class _Files:
    """Item i is the image file ``paths[i]``."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [str(p) for p in paths]

    def open(self, i: int):
        return _open_image(self.paths[i], self.paths[i])


class _Rows:
    """Item i is row i of a ``datasets`` table's ``Image`` column (read undecoded: bytes or a
    path, so the pixel limit is checked before decoding)."""

    def __init__(self, ds, col: str, where: Path):
        import datasets

        self.ds, self.col, self.where = ds.cast_column(col, datasets.Image(decode=False)), col, \
            where

    def open(self, i: int):
        item = self.ds[int(i)][self.col] or {}
        name = f"{self.where} row {i}" + (f" ({item['path']})" if item.get("path") else "")
        if item.get("bytes") is not None:
            import io

            return _open_image(io.BytesIO(item["bytes"]), name)
        if item.get("path"):
            return _open_image(item["path"], name)
        raise DataError(f"{self.where}: column {self.col!r} row {i} holds no image")


def _to_mode(img, channels: int, name: str):
    """A decoded PIL image -> 8-bit ``L`` (1 channel) or ``RGB`` (3): 16-bit and float images
    scaled to 0..255 first, palette/transparent ones composited onto black."""
    from PIL import Image

    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            if not np.isfinite(a).all():
                raise DataError(f"image {name} holds NaN or inf pixel values")
            a = a * _pixel_scale(float(a.min()), float(a.max()), True, f"image {name}")
        else:
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    try:
        return _flatten_alpha(img).convert("L" if channels == 1 else "RGB")
    except (ValueError, OSError) as err:
        raise DataError(f"cannot convert image {name} (mode {img.mode}): {err}") from err


class ImageStream(torch.utils.data.Dataset):
    """``(image, label)`` items decoded lazily; label -1 when unlabeled (see module doc)."""

    def __init__(self, reader: Any, labels: np.ndarray | None, classes: list[str], name: str,
                 prep: Preprocess, workers: int = 0, indices: np.ndarray | None = None):
        self.reader, self.prep, self.workers, self.name = reader, prep, int(workers), name
        self._labels, self.classes = labels, list(classes)
        count = len(labels) if labels is not None else len(reader_len(reader))
        self.indices = np.arange(count) if indices is None else np.asarray(indices)
        self._transform = None

    # -- what is known without decoding --------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        lab = "unlabeled" if self._labels is None else f"{len(self.classes)} classes"
        return (f"ImageStream({self.name!r}, n={len(self)}, {self.prep.describe()}, {lab}, "
                f"workers={self.workers})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> torch.Tensor | None:
        if self._labels is None:
            return None
        return torch.from_numpy(self._labels[self.indices].astype(np.int64))

    def subset(self, n: int, seed: int = 0) -> "ImageStream":
        """``n`` items, stratified by class when labelled, chosen by ``seed`` (in file order)."""
        if n >= len(self):
            return self
        labels = None if self._labels is None else self._labels[self.indices]
        keep = self.indices[_stratified_indices(labels, n, seed, len(self))]
        return ImageStream(self.reader, self._labels, self.classes, f"{self.name}[{n}@{seed}]",
                           self.prep, self.workers, keep)

    # -- decoding ----------------------------------------------------------------------------
    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[j])
        if self._transform is None:
            self._transform = self.prep.transform()
        with self.reader.open(i) as img:
            x = self._transform(_to_mode(img, self.prep.channels, f"item {i}"))
        label = -1 if self._labels is None else int(self._labels[i])
        return x, label

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> "_Batches":
        """Batches ``(images, labels)`` through a DataLoader with ``workers`` processes; the
        same batches on every pass (``shuffle`` with a seeded generator)."""
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        dl = torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle,
                                         generator=gen, num_workers=self.workers)
        return _Batches(dl)


def reader_len(reader: Any) -> Sequence:
    return reader.paths if isinstance(reader, _Files) else range(len(reader.ds))


_WRAPPED = re.compile(r"^(?:[\w.]+\.)?(\w*Error): (.*)$")


class _Batches:
    """A DataLoader whose worker errors come back as the one-line error they were (torch wraps
    them in a message holding the worker's traceback)."""

    def __init__(self, dl: torch.utils.data.DataLoader):
        self.dl = dl

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self) -> Iterator:
        try:
            yield from self.dl
        except DataError as err:
            if "Traceback" not in str(err):
                raise
            last = [line for line in str(err).splitlines() if line.strip()][-1]
            found = _WRAPPED.match(last.strip())
            raise DataError(found.group(2) if found else last.strip()) from None


# ------------------------------------------------------------------------------ sources
def _split_folder(path: Path, split: str) -> Path | None:
    """``path/<split>`` (or ``train``, or the first split folder) when the folder is split."""
    dirs = {p.name: p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not dirs or not set(dirs) <= set(SPLIT_DIRS):
        return None
    for name in (split, "validation" if split == "test" else split, "train", *SPLIT_DIRS):
        if name in dirs:
            return dirs[name]
    return None


def _folder(path: Path, prep: Preprocess, workers: int) -> ImageStream:
    files, labels, classes = list_image_folder(path)
    return ImageStream(_Files(files), labels, classes, path.name, prep, workers)


def _table(ds, path: Path, prep: Preprocess, workers: int) -> ImageStream:
    if len(ds) == 0:
        raise DataError(f"the dataset at {path} holds no images (0 rows)")
    col, kind = _image_column(ds, path)
    if kind != "file":
        raise DataError(f"the dataset at {path}: column {col!r} holds arrays of numbers; a "
                        "streamed source needs an Image feature (encoded images or paths)")
    labels, classes = _dataset_labels(ds, path)
    if labels is None:
        return ImageStream(_Rows(ds, col, path), None, [], path.name, prep, workers,
                           np.arange(len(ds)))
    return ImageStream(_Rows(ds, col, path), labels, classes, path.name, prep, workers)


def _load_dataset(kind: str, path: Path, want: str, **kwargs):
    import datasets

    try:
        loaded = datasets.load_dataset(kind, **kwargs)
    except Exception as err:
        raise DataError(f"cannot read {path} as a {kind} dataset: {type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise DataError(f"the dataset at {path} has no splits")
        name = want if want in loaded else ("train" if "train" in loaded else next(iter(loaded)))
        loaded = loaded[name]
    return loaded


def open_images(path: str | os.PathLike, prep: Preprocess, split: str = "train",
                workers: int = 0) -> ImageStream:
    """A streamed image source at ``prep``'s resolution (see the module docstring).

    ``split`` picks the split of a split source (``train``/``test``/``validation`` folders, a
    ``DatasetDict``), falling back to ``train``.  Nothing is decoded here.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such image folder or dataset: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            ds = _load_dataset("parquet", path, split, data_files=str(path), split="train")
        elif suffix == ".arrow":
            import datasets

            try:
                ds = datasets.Dataset.from_file(str(path))
            except Exception as err:
                raise DataError(f"cannot read {path} as an arrow dataset: {err}") from err
        else:
            raise DataError(f"{path} is a file; expected an image folder, a saved dataset "
                            "folder, or a .parquet / .arrow file")
        return _table(ds, path, prep, workers)
    if _is_saved_dataset(path):
        return _table(_open_saved_dataset(path), path, prep, workers)
    if any((path / m).exists() for m in _METADATA):
        ds = _load_dataset("imagefolder", path, split, data_dir=str(path))
        return _table(ds, path, prep, workers)
    inner = _split_folder(path, split)
    return _folder(inner if inner is not None else path, prep, workers)
