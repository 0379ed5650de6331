"""How a model wants its images: input size, mean/std, interpolation and crop, in one record.

A :class:`Preprocess` travels with each model (``ModelInfo.preprocess``), is used for its merge
and evaluation data, and is saved in the merged model's ``merged.json`` (``"preprocess"``), so
that :func:`of_description` restores it.  Where it comes from:

* timm models (a Hugging Face hub folder, ``hf-hub:``/``timm/`` names, ``--arch timm:NAME``):
  timm's own resolution, ``timm.data.resolve_input_data_config`` on the model and its
  ``pretrained_cfg`` (the one in ``config.json`` for a hub folder);
* torchvision models: the default weights' ``transforms()`` metadata (resize, crop, mean, std,
  interpolation; building it downloads nothing), else ImageNet's defaults, said in ``source``;
* the zoo (and pleas checkpoints that record none): ``size`` x ``size``, bilinear, no crop
  (``crop_mode="squash"``), mean 0.5 and std 0.5 -- the zoo's ``(x / 255 - 0.5) / 0.5``.

Images are turned into tensors by :meth:`Preprocess.transform` (timm's ``create_transform`` in
eval mode: resize the shorter side to ``size / crop_pct``, centre crop, ``(x/255 - mean) / std``;
``squash`` resizes to the size exactly).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = ["Preprocess", "PreprocessError", "zoo_default", "from_timm", "from_torchvision",
           "of_description", "renormalise"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


class PreprocessError(ValueError):
    """A preprocessing description that cannot be used (the message names the value)."""


def _channels(values: Any, channels: int, what: str) -> tuple[float, ...]:
    """``values`` as ``channels`` floats: one value repeated, or colour averaged for gray."""
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise PreprocessError(f"{what} has {len(values)} values for a {channels}-channel model")


@dataclass(frozen=True)
class Preprocess:
    """``input_size`` (C, H, W), per-channel ``mean``/``std`` (of pixels in 0..1), resize
    ``interpolation``, ``crop_pct`` and ``crop_mode``; ``source`` says where it came from (not
    compared: two models want the same images exactly when the other fields agree)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or min(size) <= 0 or size[0] not in (1, 3):
            raise PreprocessError(f"input_size must be (C, H, W) with C 1 or 3, got "
                                  f"{self.input_size!r}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", _channels(self.mean, size[0], "mean"))
        object.__setattr__(self, "std", _channels(self.std, size[0], "std"))
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise PreprocessError(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"unknown interpolation {self.interpolation!r}; expected one "
                                  f"of {', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise PreprocessError(f"unknown crop_mode {self.crop_mode!r}; expected one of "
                                  f"{', '.join(CROP_MODES)}")
        if not 0 < float(self.crop_pct) <= 1:
            raise PreprocessError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    @property
    def is_zoo_normalisation(self) -> bool:
        """Mean and std 0.5: the zoo's ``(x / 255 - 0.5) / 0.5``."""
        return all(m == 0.5 for m in self.mean) and all(s == 0.5 for s in self.std)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["mean"], d["std"] = list(self.input_size), list(self.mean), \
            list(self.std)
        return d

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Preprocess":
        if not isinstance(raw, Mapping):
            raise PreprocessError(f"a preprocessing description must be an object, got "
                                  f"{type(raw).__name__}")
        known = {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "source"}
        unknown = sorted(set(raw) - known)
        if unknown or not {"input_size", "mean", "std"} <= set(raw):
            raise PreprocessError(f"a preprocessing description needs input_size, mean, std "
                                  f"(and may give {', '.join(sorted(known - {'input_size'}))}); "
                                  f"got keys {sorted(raw)}")
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
        except (TypeError, ValueError) as err:
            raise PreprocessError(f"bad preprocessing description {dict(raw)}: {err}") from err

    def describe(self) -> str:
        """One line: what differs between two models shows in it."""
        c, h, w = self.input_size
        mean = ", ".join(f"{m:g}" for m in self.mean)
        std = ", ".join(f"{s:g}" for s in self.std)
        return (f"{c}x{h}x{w}, mean ({mean}), std ({std}), {self.interpolation}, crop_pct "
                f"{self.crop_pct:g} ({self.crop_mode})")

    def transform(self):
        """PIL image (already in the model's mode, ``L`` or ``RGB``) -> normalised tensor."""
        from timm.data import create_transform

        return create_transform(input_size=self.input_size, is_training=False,
                                interpolation=self.interpolation, mean=self.mean, std=self.std,
                                crop_pct=self.crop_pct, crop_mode=self.crop_mode)


def zoo_default(size: int = 28, channels: int = 1) -> Preprocess:
    """The zoo's preprocessing: square ``size``, bilinear, no crop, ``(x / 255 - 0.5) / 0.5``."""
    return Preprocess((channels, size, size), (0.5,), (0.5,), "bilinear", 1.0, "squash", "zoo")


@contextlib.contextmanager
def _quiet_timm():
    """timm logs a warning when it averages a colour mean for a gray model: said in ``source``
    instead (the command line's stderr is one line on error)."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def from_timm(model, pretrained_cfg: Mapping[str, Any] | None = None,
              source: str = "timm pretrained_cfg") -> Preprocess:
    """timm's resolution of the model's (or the given) ``pretrained_cfg``."""
    from timm.data.model_config import resolve_input_data_config

    with _quiet_timm():
        cfg = resolve_input_data_config(
            model, pretrained_cfg=None if pretrained_cfg is None else dict(pretrained_cfg))
    return Preprocess(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                      str(cfg.get("interpolation") or "bilinear"),
                      float(cfg.get("crop_pct") or 1.0), str(cfg.get("crop_mode") or "center"),
                      source)


def from_torchvision(name: str, in_chans: int = 3) -> Preprocess:
    """The default weights' eval transforms of ``torchvision:name`` (metadata only, nothing is
    downloaded), else ImageNet's defaults (224 px, resize 256, bilinear), said in ``source``."""
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return Preprocess((in_chans, crop, crop), tuple(t.mean), tuple(t.std),
                          t.interpolation.value, crop / resize, "center",
                          f"torchvision {name} weights transforms")
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):
        return Preprocess((in_chans, 224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear",
                          224 / 256, "center",
                          f"ImageNet defaults (torchvision {name} has no weights metadata)")


def of_description(desc: Mapping[str, Any]) -> Preprocess:
    """The preprocessing a merged model's description records (``merged.json``), else the
    zoo's default for its config (files written before preprocessing was recorded)."""
    if desc.get("preprocess"):
        return Preprocess.from_dict(desc["preprocess"])
    cfg = dict(desc.get("config") or {})
    return zoo_default(int(cfg.get("img_size", 28)), int(cfg.get("in_chans", 1)))


def renormalise(images, prep: Preprocess):
    """Images in the zoo's normalisation ([-1, 1]) -> the same pixels in ``prep``'s."""
    import torch

    if prep.is_zoo_normalisation:
        return images
    mean = torch.tensor(prep.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=images.dtype).view(1, -1, 1, 1)
    return ((images * 0.5 + 0.5) - mean) / std
