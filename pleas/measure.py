"""What a model really costs: MACs counted on its forward pass, parameters as stored.

Why: a compute model can be wrong about the model it describes (the dense widened model once
multiplied its structural zeros while the plan counted them free).  The report therefore
states the MACs of the built model's own forward pass, counted by
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2: convolutions, matrix
products, attention), next to the plan's number; the tests hold the two equal.

Normalisation arithmetic is not a layer's MACs: a plain LayerNorm's runs in one kernel the
counter does not count, so a :class:`pleas.normalization.MergedLayerNorm`'s, which takes its
two views' statistics with small matrix products, is left out too (both models are counted
alike).

PyTorch has no FLOP formula for the CPU kernel of ``scaled_dot_product_attention``; it is
counted here like the GPU kernels (two batched products: q k^T and the weighted sum of v).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .normalization import MergedLayerNorm


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = \
        _cpu_attention_flops


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros((1, *tuple(input_shape)[1:]), device=device, dtype=dtype)


@torch.no_grad()
def executed_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on ONE sample of ``input_shape`` (N, C, H, W:
    N is ignored), as the model's kernels execute them."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(_example(model, input_shape))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    by_module = counter.get_flop_counts()  # keys: root class name + "." + module path
    root = type(model).__name__
    for name, mod in model.named_modules():
        if isinstance(mod, MergedLayerNorm):
            flops -= sum(int(v) for v in by_module.get(f"{root}.{name}", {}).values())
    return flops // 2


def stored_params(model: nn.Module) -> int:
    """Parameters the model stores (a block-structured layer stores no structural zeros)."""
    return sum(int(p.numel()) for p in model.parameters())
