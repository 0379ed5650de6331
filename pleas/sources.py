"""A user's own models: Hugging Face hub folders, hub names, and plain state-dict files.

:func:`pleas.zoo.resolve` hands these sources here; each returns ``(model, ModelInfo)`` with the
model's preprocessing (:mod:`pleas.preprocess`) in ``ModelInfo.preprocess``:

* **a hub folder** in the layout timm writes (``timm.models.save_for_hf``): ``config.json``
  (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``, ``label_names``) and
  ``model.safetensors`` or ``pytorch_model.bin``; built as ``timm:<architecture>``;
* **``hf-hub:org/name`` or ``timm/<name>``**: that repository's snapshot in the
  huggingface_hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``), found without any network
  access; one not cached is an error that says how to download it;
* **a plain state dict** (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, without pleas metadata)
  with ``arch="timm:NAME"`` or ``"torchvision:NAME"``: the architecture's arguments are those
  given (``--arch-config``), and ``num_classes`` (from the classifier's shape) and ``in_chans``
  (from the first convolution's) are inferred from the weights where not given.

Pickles are only read with ``torch.load(weights_only=True)`` (:mod:`pleas.checkpoint`).
Anything unusable raises :class:`pleas.checkpoint.CheckpointError` with one precise message.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import (CheckpointError, count_params, file_sha256, load_checkpoint,
                         read_shapes)
from .models import build_model
from .preprocess import from_timm, from_torchvision, zoo_default

__all__ = ["is_hub_name", "hub_snapshot", "load_hub_folder", "load_state_dict_file",
           "infer_config", "WEIGHT_FILES"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PREFIX = "hf-hub:"


def is_hub_name(text: str) -> bool:
    """``hf-hub:org/name`` or ``timm/<name>``."""
    return text.startswith(HUB_PREFIX) or (text.startswith("timm/") and text.count("/") == 1
                                           and len(text) > len("timm/"))


def hub_snapshot(text: str) -> Path:
    """The cached snapshot folder of a hub name, found offline (no request is ever made)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{text!r}: a hub model is named hf-hub:ORG/NAME or timm/NAME")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE))
    except Exception as err:  # LocalEntryNotFoundError, a broken cache, ...
        raise CheckpointError(
            f"hub model {repo!r} is not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or HF_HUB_CACHE}); download it once on a "
            f"machine with internet: `hf download {repo}` (or `huggingface-cli download "
            f"{repo}`), then copy the cache or pass the downloaded folder") from err


def _read_hub_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} is a folder without config.json: expected a Hugging "
                              "Face hub folder (config.json + model.safetensors or "
                              "pytorch_model.bin, as timm's save_for_hf writes) or a checkpoint "
                              "file")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} must hold a JSON object, found {type(cfg).__name__}")
    if "pretrained_cfg" not in cfg and "architecture" in cfg:  # timm's legacy single dict
        cfg = {"architecture": cfg["architecture"], "num_classes": cfg.get("num_classes"),
               "label_names": cfg.get("label_names") or cfg.get("labels"), "pretrained_cfg": cfg}
    if not isinstance(cfg.get("architecture"), str):
        kind = (f" (a transformers {cfg['architectures']} model?)"
                if "architectures" in cfg else "")
        raise CheckpointError(f"{file} names no timm 'architecture'{kind}; only timm's hub "
                              "layout is read (config.json with architecture, num_classes, "
                              "pretrained_cfg)")
    return cfg


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has config.json but no weights: expected "
                          f"{' or '.join(WEIGHT_FILES)}")


def _head_and_stem(model: nn.Module) -> tuple[str | None, str | None]:
    """The classifier's and the first convolution's weight names (timm: its pretrained_cfg;
    otherwise the last Linear and the first Conv2d in module order)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head, stem = cfg.get("classifier"), cfg.get("first_conv")
    head = head[0] if isinstance(head, (list, tuple)) else head
    stem = stem[0] if isinstance(stem, (list, tuple)) else stem
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if stem is None:
        stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return (None if head is None else f"{head}.weight"), (None if stem is None
                                                          else f"{stem}.weight")


def _meta_model(path: Path, arch: str, config: Mapping[str, Any]) -> nn.Module:
    try:
        with torch.device("meta"):
            return build_model(arch, **config)
    except NotImplementedError:  # a builder that reads tensor values: build it for real
        return build_model(arch, **config)
    except (ValueError, TypeError, AssertionError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot build architecture {arch!r} with config "
                              f"{dict(config)}: {' '.join(str(err).split())}") from err


def infer_config(path: Path, arch: str, found: Mapping[str, tuple[int, ...]],
                 given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The builder arguments for ``found``'s shapes: ``given``, plus ``num_classes`` from the
    classifier (0 for a timm model saved without one) and ``in_chans`` from the first conv
    (timm) where the defaults do not fit and the argument was not given."""
    config = dict(given or {})
    model = _meta_model(path, arch, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head, stem = _head_and_stem(model)
    timm_model = arch.startswith("timm:")
    if "num_classes" not in config and head in expected:
        if head in found and found[head] != expected[head]:
            config["num_classes"] = int(found[head][0])
        elif head not in found and timm_model:
            config["num_classes"] = 0
    if ("in_chans" not in config and timm_model and stem in expected and stem in found
            and len(found[stem]) > 1 and found[stem][1] != expected[stem][1]):
        config["in_chans"] = int(found[stem][1])
    return config


def _load(path: Path, arch: str, config: dict[str, Any], given: Mapping[str, Any] | None,
          device) -> nn.Module:
    """load_checkpoint with the inferred config; a mismatch says what was inferred."""
    try:
        return load_checkpoint(path, arch=arch, config=config, device=device)
    except CheckpointError as err:
        inferred = {k: v for k, v in config.items() if k not in (given or {})}
        raise CheckpointError(f"{err} (arguments inferred from the weights: {inferred or 'none'};"
                              " give the architecture's arguments with --arch-config "
                              "'{\"KEY\": VALUE}')") from err


def _preprocess(model: nn.Module, arch: str, config: Mapping[str, Any],
                pretrained_cfg: Mapping[str, Any] | None = None):
    if arch.startswith("timm:"):
        return from_timm(model, pretrained_cfg,
                         "config.json pretrained_cfg" if pretrained_cfg else
                         f"timm {arch[5:]} pretrained_cfg")
    if arch.startswith("torchvision:"):
        return from_torchvision(arch.split(":", 1)[1], int(config.get("in_chans", 3)))
    return zoo_default(int(config.get("img_size", 28)), int(config.get("in_chans", 1)))


def _info(name: str, path: Path, weights: Path, arch: str, config: dict, model: nn.Module,
          preprocess, classes: tuple[str, ...] | None = None):
    from .zoo import ModelInfo

    return ModelInfo(name=name, path=path, arch=arch, config=config, file=weights.name,
                     classes=classes, label_space=None, sha256=file_sha256(weights),
                     params=count_params(model), preprocess=preprocess)


def _labels(cfg: Mapping[str, Any], num_classes: int | None) -> tuple[str, ...] | None:
    names = cfg.get("label_names")
    if isinstance(names, dict):  # {index: name}
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (ValueError, TypeError):
            return None
    if isinstance(names, list) and len(names) == num_classes and all(
            isinstance(n, str) for n in names):
        return tuple(names)
    return None


def load_hub_folder(folder: str | os.PathLike, arch_config: Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu", name: str | None = None):
    """A timm hub-layout folder -> ``(model, ModelInfo)`` (see the module docstring)."""
    folder = Path(folder)
    cfg = _read_hub_config(folder)
    weights = _weights_file(folder)
    arch = "timm:" + cfg["architecture"]
    given = dict(cfg.get("model_args") or {})
    if isinstance(cfg.get("num_classes"), int):
        given.setdefault("num_classes", cfg["num_classes"])
    given.update(arch_config or {})
    config = infer_config(weights, arch, read_shapes(weights), given)
    model = _load(weights, arch, config, given, device)
    prep = _preprocess(model, arch, config, cfg.get("pretrained_cfg"))
    classes = _labels(cfg, getattr(model, "num_classes", config.get("num_classes")))
    return model, _info(name or folder.name, folder, weights, arch, config, model, prep, classes)


def load_hub_name(text: str, arch_config: Mapping[str, Any] | None = None,
                  device: str | torch.device = "cpu"):
    """``hf-hub:org/name`` / ``timm/name`` from the local huggingface_hub cache."""
    return load_hub_folder(hub_snapshot(text), arch_config, device, name=text)


def load_state_dict_file(path: str | os.PathLike, arch: str,
                         arch_config: Mapping[str, Any] | None = None,
                         device: str | torch.device = "cpu"):
    """A plain state dict of ``timm:NAME`` / ``torchvision:NAME`` -> ``(model, ModelInfo)``."""
    path = Path(path)
    found = read_shapes(path)  # safetensors: the header only; pickles: weights_only=True
    config = infer_config(path, arch, found, arch_config)
    model = _load(path, arch, config, arch_config, device)
    return model, _info(path.stem, path, path, arch, config, model,
                        _preprocess(model, arch, config))
