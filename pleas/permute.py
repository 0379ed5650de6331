"""Applying permutations to weights, random permutations, and the spec self-test.

A permutation of group g is a LongTensor ``p`` of its size: new unit ``i`` is old unit ``p[i]``.
Permuting every member axis of every group with its permutation leaves the network's function
unchanged; the self-test checks exactly that on a randomised float64 copy of the model, since a
freshly built model (zero-initialised head, unit BN statistics) can hide a wrong spec.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import compact_state, dense_state
from .spec import AxisRef, PermSpec

Perms = dict[str, torch.Tensor]


def permute_axis(t: torch.Tensor, ax: AxisRef, perm: torch.Tensor) -> torch.Tensor:
    """Return ``t`` with the (sliced, factored) axis ``ax`` permuted by ``perm``."""
    seg = t.narrow(ax.dim, ax.start, ax.length)
    seg = seg.unflatten(ax.dim, (ax.outer, ax.size, ax.inner))
    seg = seg.index_select(ax.dim + 1, perm.to(t.device)).flatten(ax.dim, ax.dim + 2)
    if ax.start == 0 and ax.length == t.shape[ax.dim]:
        return seg.contiguous()
    out = t.clone()
    out.narrow(ax.dim, ax.start, ax.length).copy_(seg)
    return out


def permute_dense_state(state: dict[str, torch.Tensor], spec: PermSpec,
                        perms: Perms) -> dict[str, torch.Tensor]:
    """:func:`permute_state_dict` on a state whose grouped conv weights are already dense."""
    out = dict(state)
    for g in spec.groups:
        p = perms.get(g.name)
        if p is None:
            continue
        if p.numel() != g.size:
            raise ValueError(f"permutation of group {g.name} has {p.numel()} entries, not {g.size}")
        for ax in g.axes:
            out[ax.key] = permute_axis(out[ax.key], ax, p)
    return out


def permute_state_dict(state: dict[str, torch.Tensor], spec: PermSpec,
                       perms: Perms) -> dict[str, torch.Tensor]:
    """A new state dict with every group in ``perms`` applied to all its member axes.

    Grouped convolution weights are permuted in their dense block-diagonal form; a permutation
    that splits a convolution group is refused (see :mod:`pleas.blocks`).
    """
    return compact_state(permute_dense_state(dense_state(state, spec), spec, perms), spec)


def permute_model(model: nn.Module, spec: PermSpec, perms: Perms) -> nn.Module:
    """A functionally identical copy of ``model`` with its units permuted."""
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
    return new


def _expand_heads(head_perm: torch.Tensor, within: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    return torch.cat([int(h) * head_dim + within[i] for i, h in enumerate(head_perm)])


def random_permutations(spec: PermSpec, seed: int = 0) -> Perms:
    """Random permutations of every hidden group; tied block groups share the block order."""
    gen = torch.Generator().manual_seed(seed)
    perms: Perms = {}
    head_orders: dict[str, torch.Tensor] = {}
    for g in spec.hidden:
        if g.head_dim:
            tie = g.tie or g.name
            if tie not in head_orders:
                head_orders[tie] = torch.randperm(g.num_heads, generator=gen)
            within = [torch.randperm(g.head_dim, generator=gen) for _ in range(g.num_heads)]
            perms[g.name] = _expand_heads(head_orders[tie], within, g.head_dim)
        else:
            perms[g.name] = torch.randperm(g.size, generator=gen)
    return perms


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy with every parameter and buffer perturbed to random non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, t in list(new.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            scale = max(float(t.detach().float().std()) if t.numel() > 1 else 0.0, 0.05)
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale
            if name.endswith("running_var"):
                t.copy_(t.abs() + noise.abs() + 0.1)
            else:
                t.add_(noise)
    return new


@dataclass(frozen=True)
class SelfTestResult:
    max_abs_diff: float
    max_abs_output: float
    passed: bool

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"spec self-test {verdict}: max |output change| {self.max_abs_diff:.3e} "
                f"(outputs up to {self.max_abs_output:.3e})")


def self_test(model: nn.Module, spec: PermSpec, seed: int = 0, rtol: float = 1e-9) -> SelfTestResult:
    """Permute every hidden group at random and check that outputs do not change (float64)."""
    base = randomise(model, seed)
    perms = random_permutations(spec, seed + 1)
    permuted = permute_model(base, spec, perms)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(spec.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y0, y1 = base(x), permuted(x)
    diff = float((y0 - y1).abs().max())
    scale = float(y0.abs().max())
    return SelfTestResult(diff, scale, diff <= rtol * max(scale, 1.0))
