"""Accuracy of plain and merged models on labelled image sets."""
from __future__ import annotations

import torch
from torch import nn

from .data import ImageSet


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, device="cpu", batch_size: int = 512,
                   task: str | None = None) -> torch.Tensor:
    model.eval()
    outs = []
    for x, _ in data.loader(batch_size):
        y = model(x.to(device))
        if isinstance(y, dict):
            y = y[task]
        outs.append(y.float().cpu())
    return torch.cat(outs)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels is None or len(labels) == 0:
        raise ValueError("accuracy needs labelled data")
    return float((logits.argmax(1) == labels).double().mean() * 100)


def accuracy(model: nn.Module, data: ImageSet, device="cpu", batch_size: int = 512,
             task: str | None = None) -> float:
    """Top-1 accuracy in percent (``task`` picks the head of a multi-head merged model)."""
    return accuracy_from_logits(predict_logits(model, data, device, batch_size, task), data.labels)
