"""The project's model zoo: built-in checkpoints listed in ``data/models/manifest.json``.

``zoo.load("resnet_a")`` returns the model and a :class:`ModelInfo` (architecture, task, label
space, classes, seed, base model, measured test accuracy, sha256, parameter count), after
checking the file's sha256.  ``zoo.resolve(spec)`` takes a built-in name or a checkpoint path.
The zoo folder is ``<repo>/data/models`` or ``$PLEAS_ZOO_DIR``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import CheckpointError, file_sha256, load_checkpoint, read_metadata

__all__ = ["ModelInfo", "zoo_dir", "manifest_path", "read_manifest", "names", "info", "load",
           "resolve", "update_manifest"]


def zoo_dir() -> Path:
    """``$PLEAS_ZOO_DIR`` or the repository's ``data/models`` folder."""
    env = os.environ.get("PLEAS_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "models"


def manifest_path() -> Path:
    return zoo_dir() / "manifest.json"


@dataclass(frozen=True)
class ModelInfo:
    """One zoo entry (or what a checkpoint's metadata says about itself)."""

    name: str
    path: Path
    arch: str | None
    config: Mapping[str, Any] = field(default_factory=dict)
    file: str | None = None
    task: str | None = None
    label_space: str | None = None
    classes: tuple[str, ...] | None = None
    seed: int | None = None
    base: str | None = None
    test_accuracy: float | None = None
    sha256: str | None = None
    params: int | None = None
    training: Mapping[str, Any] | None = None
    preprocess: Any = None  # a pleas.preprocess.Preprocess; None: the zoo's for its config

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any], folder: Path) -> "ModelInfo":
        classes = entry.get("classes")
        return cls(name=name, path=folder / entry["file"], arch=entry["arch"],
                   config=dict(entry.get("config") or {}), file=entry["file"],
                   task=entry.get("task"), label_space=entry.get("label_space"),
                   classes=None if classes is None else tuple(classes), seed=entry.get("seed"),
                   base=entry.get("base"), test_accuracy=entry.get("test_accuracy"),
                   sha256=entry.get("sha256"), params=entry.get("params"),
                   training=entry.get("training"))


def read_manifest(path: Path | None = None) -> dict[str, Any]:
    """The manifest as a dict ``{"models": {...}}`` (empty when the file does not exist)."""
    path = path or manifest_path()
    if not path.exists():
        return {"models": {}}
    with open(path) as f:
        data = json.load(f)
    data.setdefault("models", {})
    return data


def names() -> list[str]:
    """Names of the built-in models."""
    return sorted(read_manifest()["models"])


def info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a built-in model, without loading it."""
    models = read_manifest()["models"]
    if name not in models:
        known = ", ".join(sorted(models)) or "(none: the manifest is empty or missing)"
        raise CheckpointError(f"unknown zoo model {name!r}; built-in models: {known}")
    return ModelInfo.from_entry(name, models[name], zoo_dir())


def load(name: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a built-in model (eval mode) after checking its sha256 against the manifest."""
    meta = info(name)
    if not meta.path.exists():
        raise CheckpointError(f"zoo model {name!r}: checkpoint file {meta.path} is missing "
                              "(retrain it with `python experiments/train.py --name "
                              f"{name}`)")
    if meta.sha256:
        digest = file_sha256(meta.path)
        if digest != meta.sha256:
            raise CheckpointError(f"zoo model {name!r}: sha256 of {meta.path} is {digest}, the "
                                  f"manifest says {meta.sha256} (file changed or corrupt)")
    model = load_checkpoint(meta.path, meta.arch, meta.config, device=device)
    return model, meta


def resolve(spec: str | os.PathLike, arch: str | None = None,
            device: str | torch.device = "cpu", arch_config: Mapping[str, Any] | None = None
            ) -> tuple[nn.Module, ModelInfo]:
    """A model source -> ``(model, ModelInfo)``.

    ``spec`` is a built-in name, a pleas checkpoint (its metadata names the architecture, and
    gives ``task``, ``label_space``, ``classes``, ... when present), a Hugging Face hub folder
    or an ``hf-hub:org/name`` / ``timm/name`` from the local hub cache, or a plain state dict
    with ``arch`` ``timm:NAME`` / ``torchvision:NAME`` (:mod:`pleas.sources`).  ``arch``
    overrides the metadata's architecture, ``arch_config`` its arguments.
    """
    from . import sources
    from .preprocess import Preprocess

    text = os.fspath(spec)
    if not Path(text).exists() and text in read_manifest()["models"]:
        return load(text, device=device)
    if not Path(text).exists() and sources.is_hub_name(text):
        return sources.load_hub_name(text, arch_config, device=device)
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(names()) or "(none)"
        raise CheckpointError(f"{text!r} is neither a built-in model ({known}), an "
                              "hf-hub:ORG/NAME or timm/NAME, nor an existing checkpoint file "
                              "or hub folder")
    if path.is_dir():
        return sources.load_hub_folder(path, arch_config, device=device)
    meta = read_metadata(path)
    if not meta.get("arch") and arch and arch.startswith(("timm:", "torchvision:")):
        return sources.load_state_dict_file(path, arch, arch_config, device=device)
    model = load_checkpoint(path, arch=arch, config=arch_config, device=device)
    classes = meta.get("classes")
    try:
        prep = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None
    except ValueError as err:
        raise CheckpointError(f"{path}: metadata 'preprocess': {err}") from err
    params = sum(p.numel() for p in model.parameters())
    return model, ModelInfo(
        name=path.stem, path=path, arch=arch or meta.get("arch"),
        config=dict(meta.get("config") or {}), file=path.name,
        task=meta.get("task"), label_space=meta.get("label_space") or meta.get("task"),
        classes=tuple(classes) if isinstance(classes, list) else None,
        seed=meta.get("seed"), base=meta.get("base"), test_accuracy=meta.get("test_accuracy"),
        sha256=file_sha256(path), params=params, preprocess=prep)


def update_manifest(name: str, entry: Mapping[str, Any], path: Path | None = None) -> None:
    """Add or replace one entry of the manifest (written atomically, names sorted)."""
    path = path or manifest_path()
    data = read_manifest(path)
    data["models"][name] = dict(entry)
    data["models"] = dict(sorted(data["models"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
