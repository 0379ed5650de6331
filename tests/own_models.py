"""Small "user" models and images, written with the libraries' own savers (not a test module).

timm models go through ``timm.models.save_for_hf`` (the Hugging Face hub layout), plain state
dicts through ``torch.save`` / ``safetensors.torch.save_file``; images are PNGs from PIL.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["cat", "dog", "fox"]
TINY = {"channels": [8, 16, 32, 64], "stem_width": 8}  # resnet10t at 1/8 width: ~80k params


def tiny_timm(seed: int, num_classes: int = 3, in_chans: int = 3):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes,
                             in_chans=in_chans, **TINY).eval()


def save_hub(model, folder: Path, size: int = 48, mean=None, std=None,
             label_names=None, safe: bool = True) -> Path:
    """``save_for_hf`` with the input size (and mean/std) the model is said to be trained at."""
    from timm.models import save_for_hf

    data = {"input_size": (_in_chans(model), size, size)}
    if mean is not None:
        data["mean"], data["std"] = tuple(mean), tuple(std)
    config = {"label_names": list(label_names)} if label_names else None
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), model_config=config, safe_serialization=safe,
                data_config=data)
    return folder


def _in_chans(model) -> int:
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.in_channels


def rgb_folder(root: Path, classes=CLASSES, per_class: int = 8, size=(48, 40), seed: int = 0,
               gray_every: int = 0) -> Path:
    """``root/<class>/<i>.png`` random RGB images of ``size`` (W, H); every ``gray_every``-th
    one is saved in mode L (folders mix them)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(a)
            if gray_every and i % gray_every == 0:
                img = img.convert("L")
            img.save(root / c / f"{i}.png")
    return root
