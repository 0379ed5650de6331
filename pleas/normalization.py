"""Exact BatchNorm recalibration (REPAIR-style reset) of a merged model.

Averaged or refitted weights change every layer's output distribution, and merged BN networks
collapse to near chance unless their statistics are recomputed.  The running statistics are set
to the exact mean and unbiased variance over ALL merge samples (float64 sums), not an
exponential moving average and not an average of per-batch variances.  Like
``torch.optim.swa_utils.update_bn``, one pass runs the BN layers on batch statistics.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import batch_inputs, limited


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, device="cpu",
                          max_batches: int | None = None, progress: bool = True) -> int:
    """Recompute every BatchNorm's running mean/var on ``batches``; returns samples seen."""
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    sums: dict[str, list] = {}
    handles = []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().double()
            dims = [0] + list(range(2, x.ndim))
            n = x.numel() // x.shape[1]
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += n
            s[1] = s[1] + x.sum(dims)
            s[2] = s[2] + (x * x).sum(dims)
        return fn

    for name, m in bns:
        handles.append(m.register_forward_pre_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, m in bns:
        m.train()
    seen = 0
    try:
        for batch in tqdm(limited(batches, max_batches), desc="BatchNorm reset",
                          disable=not progress, leave=False):
            x = batch_inputs(batch).to(device)
            model(x)
            seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    if seen == 0:
        raise ValueError("no data to recalibrate BatchNorm statistics")
    for name, m in bns:
        n, s1, s2 = sums[name]
        mean = s1 / n
        var = (s2 - n * mean * mean) / max(n - 1, 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp_min(0).to(m.running_var.dtype))
        m.num_batches_tracked.fill_(0) if m.num_batches_tracked is not None else None
    return seen
