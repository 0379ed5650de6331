"""Building the widened (partially merged) model as a real nn.Module.

Every tensor is rebuilt from the models with one rule.  Along each grouped axis the new
unit j reads model m's unit ``index[m][j]`` (two models: A's ``a_index[j]``, B's ``b_index[j]``):

    W~ = sum over models m of  alpha_m(out units) * W_m[out_m, in_m] * valid_m(in units)

where alpha is 1/K for a merged output unit (two models: (1/2, 1/2)), 1 for the model a kept
unit comes from and 0 for the others, and an input column counts only for the models it exists
in.  This single rule
gives every block of algorithm.md section 4: merged<-merged = (W_A + W_B)/2, A-only<-merged =
W_A, merged<-A-only = W_A/2, the structural zeros A-only<-B-only = B-only<-A-only = 0, and
vectors concat(avg(merged), A-only, B-only).  Tensors no group touches are averaged.

The module is A's own module tree with resized layers (same types, new channel counts), so the
merged model runs the original forward code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import compact_state, dense_state
from .normalization import MergedLayerNorm, norm_dim
from .plan import GroupPlan, Plan
from .registry import rules_for_call
from .spec import AxisRef, PermSpec


@dataclass(frozen=True)
class AxisMap:
    """How one dimension of one tensor is rebuilt: per new position, a source index per model."""

    index: tuple[torch.Tensor, ...]  # per model: long, -1 where the model has no source
    weight: tuple[torch.Tensor, ...]  # per model, float64: alpha (out role) or validity (in)
    role: str

    @property
    def index_a(self) -> torch.Tensor:
        return self.index[0]

    @property
    def index_b(self) -> torch.Tensor:
        return self.index[1]

    def kinds(self) -> torch.Tensor:
        """Per new position: 0 present in every model, k + 1 in model k alone."""
        present = torch.stack([i >= 0 for i in self.index])
        return torch.where(present.all(0), 0, torch.argmax(present.int(), 0) + 1)


def axis_map(old_len: int, refs: list[AxisRef], plan: Plan, groups_of: dict[AxisRef, str]) -> AxisMap:
    """Index/weight vectors for one dim, given all the (sliced) axis refs that cover it."""
    refs = sorted(refs, key=lambda r: r.start)
    models = plan[groups_of[refs[0]]].models
    idx: list[list[torch.Tensor]] = [[] for _ in range(models)]
    wts: list[list[torch.Tensor]] = [[] for _ in range(models)]
    role = refs[0].role
    pos = 0

    def untouched(stop: int) -> None:
        share = torch.full((stop - pos,), 1.0 / models if role == "out" else 1.0,
                           dtype=torch.float64)
        for m in range(models):
            idx[m].append(torch.arange(pos, stop))
            wts[m].append(share.clone())

    for r in refs:
        if r.role != role:
            raise ValueError(f"{r.key} dim {r.dim} is both read and produced by groups")
        if r.start > pos:
            untouched(r.start)
        p: GroupPlan = plan[groups_of[r]]
        alphas = p.weights() if role == "out" else tuple((i >= 0).double() for i in p.index)
        for o in range(r.outer):
            base = r.start + o * r.size * r.inner
            for m, (pi, alpha) in enumerate(zip(p.index, alphas)):
                sub = (base + pi.clamp_min(0)[:, None] * r.inner + torch.arange(r.inner)).flatten()
                idx[m].append(torch.where(pi.repeat_interleave(r.inner) >= 0, sub, -1))
                wts[m].append(alpha.repeat_interleave(r.inner))
        pos = r.start + r.length
    if pos < old_len:
        untouched(old_len)
    return AxisMap(tuple(torch.cat(i) for i in idx), tuple(torch.cat(w) for w in wts), role)


def tensor_maps(spec: PermSpec, plan: Plan, shapes: dict[str, torch.Size]) -> dict[str, dict[int, AxisMap]]:
    """For every grouped tensor, the AxisMap of each of its grouped dims."""
    refs: dict[tuple[str, int], list[AxisRef]] = {}
    groups_of: dict[AxisRef, str] = {}
    for g in spec.groups:
        if g.kind == "input":
            continue  # fixed axes (input channels, token positions) are taken as they are
        for ax in g.axes:
            refs.setdefault((ax.key, ax.dim), []).append(ax)
            groups_of[ax] = g.name
    maps: dict[str, dict[int, AxisMap]] = {}
    for (key, dim), rs in refs.items():
        maps.setdefault(key, {})[dim] = axis_map(shapes[key][dim], rs, plan, groups_of)
    return maps


def _gather(t: torch.Tensor, maps: dict[int, AxisMap], model: int) -> torch.Tensor:
    out = t.double()
    for dim, m in maps.items():
        out = out.index_select(dim, m.index[model].clamp_min(0).to(t.device))
        shape = [1] * out.ndim
        shape[dim] = -1
        out = out * m.weight[model].to(out.device).view(shape)
    return out


def widen_state_dict(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                     spec: PermSpec, plan: Plan) -> dict[str, torch.Tensor]:
    """The partially merged weights of two models (plain partial merge, before least squares)."""
    return widen_states([state_a, state_b], spec, plan)


def widen_states(states: list[dict[str, torch.Tensor]], spec: PermSpec, plan: Plan
                 ) -> dict[str, torch.Tensor]:
    """The partially merged weights of K models (plain partial merge, before least squares).

    Grouped convolution weights are widened in their dense block-diagonal form and stored
    compactly again: the widened conv has more groups of the same size (:mod:`pleas.blocks`).
    """
    first = states[0]
    for k, other in enumerate(states[1:], 2):
        if first.keys() != other.keys():
            missing = sorted(set(first) ^ set(other))[:5]
            raise ValueError(f"model 1 and model {k} have different parameters (e.g. {missing})")
    states = [dense_state(st, spec) for st in states]
    maps = tensor_maps(spec, plan, {k: v.shape for k, v in states[0].items()})
    out: dict[str, torch.Tensor] = {}
    for key, ta in states[0].items():
        if not ta.is_floating_point():
            out[key] = ta.clone()
            continue
        m = maps.get(key)
        if not m:
            shapes = {tuple(st[key].shape) for st in states}
            if len(shapes) > 1:
                raise ValueError(f"{key}: shapes {sorted(shapes)} differ and no permutation "
                                 "group covers it")
            total = ta.double()
            for st in states[1:]:
                total = total + st[key].double()
            out[key] = (total / len(states)).to(ta.dtype)
            continue
        n_out = sum(1 for am in m.values() if am.role == "out")
        if n_out > 1:
            raise ValueError(f"{key} has {n_out} output axes; at most one is supported")
        merged = _gather(ta, m, 0)
        for k, st in enumerate(states[1:], 1):
            merged = merged + _gather(st[key], m, k)
        if n_out == 0:
            merged = merged / len(states)
        out[key] = merged.to(ta.dtype)
    return compact_state(out, spec)


# ----------------------------------------------------------------------------- the module


def _swap_layernorms(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """LayerNorms whose state carries view shares become :class:`MergedLayerNorm`."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.LayerNorm) and f"{name}.share_a" in state:
            new = MergedLayerNorm(state[f"{name}.share_a"], state[f"{name}.share_b"], mod.eps,
                                  mod.weight is not None, norm_dim(mod))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)


def build_module(template: nn.Module, state: dict[str, torch.Tensor],
                 rules: Any = None) -> nn.Module:
    """A copy of ``template`` whose tensors take the (possibly new) shapes of ``state``.

    Each module whose tensors changed shape is resized by its registered ``resize`` rule, then
    containers by their ``post_resize`` rule (:mod:`pleas.registry`; ``rules`` per call).
    """
    rules = rules_for_call(rules)
    model = copy.deepcopy(template)
    _swap_layernorms(model, state)
    own = {}
    for name, mod in model.named_modules():
        for tname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{name}.{tname}" if name else tname
            if key in state:
                own.setdefault(name, {})[tname] = (t, state[key])
    for name, tensors in own.items():
        mod = model.get_submodule(name) if name else model
        changed = {tn: new for tn, (old, new) in tensors.items() if old.shape != new.shape}
        if not changed:
            continue
        for tn, (old, new) in tensors.items():
            if isinstance(old, nn.Parameter):
                setattr(mod, tn, nn.Parameter(new.detach().clone(), requires_grad=old.requires_grad))
            else:
                mod.register_buffer(tn, new.detach().clone())
        resize = rules.lookup(mod, "resize")
        if resize is not None:
            resize(mod, {tn: new for tn, (old, new) in tensors.items()})
    for mod in model.modules():
        post_resize = rules.lookup(mod, "post_resize")
        if post_resize is not None:
            post_resize(mod)
    model.load_state_dict(state)
    return model
