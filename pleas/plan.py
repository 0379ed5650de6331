"""Planning the widths: which matched pairs to merge in every group, and what it costs.

For group g PLeaS merges k_g matched pairs and keeps the other units of A and of B apart, so the
group's merged width is 2 d_g - k_g.  The new unit order is [merged | A-only | B-only]; merged
units are the best-matched pairs (the built model reorders them [A-only | merged | B-only],
:mod:`pleas.blockwise`).  ``--width`` is a compute budget: MACs the merged model executes over
the MACs of one original model.  The merged model runs each layer block by block, so a
conv/linear layer with base MACs F whose input and output groups keep fractions r_i, r_o
unmerged costs F (1 + r_i + r_o - r_i r_o); dense (zeros multiplied) it would cost
F (1 + r_i)(1 + r_o).  The compute model below counts exactly what the built model runs.
How much each group keeps apart is the allocator's choice (:data:`ALLOCATORS`); the default
keeps one fraction apart in every group but leaves the groups under a LayerNorm merged while
the others can take the width (:func:`_norms_last_fractions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from .matching import GroupMatch, Matching, tie_sets
from .spec import Group, Layer, PermSpec


@dataclass(frozen=True, init=False)
class GroupPlan:
    """The new units of one group: which unit of each model each one stands for.

    ``index[k][j]`` is model k's unit that new unit j stands for, -1 where it has none.  Every
    model set: a merged unit (the average of the matched units); one set: a unit kept from that
    model.  ``GroupPlan(a_index, b_index)`` for two models, ``GroupPlan(i_1, ..., i_K)`` for K.
    """

    index: tuple[torch.Tensor, ...]

    def __init__(self, *index: torch.Tensor):
        if len(index) < 2:
            raise ValueError("a group plan covers at least two models")
        object.__setattr__(self, "index", tuple(index))

    @property
    def models(self) -> int:
        return len(self.index)

    @property
    def a_index(self) -> torch.Tensor:
        return self.index[0]

    @property
    def b_index(self) -> torch.Tensor:
        return self.index[1]

    @property
    def size(self) -> int:
        return int(self.index[0].numel())

    @property
    def present(self) -> torch.Tensor:
        """(models, units) bool: which models each new unit exists in."""
        return torch.stack([i >= 0 for i in self.index])

    @property
    def merged(self) -> torch.Tensor:
        return self.present.all(0)

    @property
    def n_merged(self) -> int:
        return int(self.merged.sum())

    def kinds(self) -> torch.Tensor:
        """Per new unit: 0 merged (every model), k + 1 kept from model k alone."""
        present = self.present
        own = torch.argmax(present.int(), 0) + 1
        return torch.where(present.all(0), 0, own)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """Share of each model in each new unit: 1/K for merged units, 1 for the model a
        kept unit comes from, 0 elsewhere (two models: (1/2, 1/2), (1, 0), (0, 1))."""
        present = self.present.double()
        return tuple(present / present.sum(0).clamp_min(1))

    def take(self, order: torch.Tensor) -> "GroupPlan":
        """The same units in another order."""
        return GroupPlan(*(i[order] for i in self.index))


Plan = dict[str, GroupPlan]


def shared_plan(size: int, models: int = 2) -> GroupPlan:
    """Units every model sees identically (the input, a shared head): all merged, in order."""
    idx = torch.arange(size)
    return GroupPlan(*(idx.clone() for _ in range(models)))


def separate_plan(*sizes: int) -> GroupPlan:
    """Units kept apart entirely (k = 0): model 1's units, then model 2's, ..."""
    total, starts = sum(sizes), [sum(sizes[:k]) for k in range(len(sizes))]
    out = []
    for size, start in zip(sizes, starts):
        idx = torch.full((total,), -1)
        idx[start:start + size] = torch.arange(size)
        out.append(idx)
    return GroupPlan(*out)


def head_similarity(g: Group, match: GroupMatch) -> torch.Tensor:
    """Mean similarity of each matched head pair (A head order)."""
    return match.similarity.double().view(g.num_heads, g.head_dim).mean(1)


def partial_plan(g: Group, match: GroupMatch, k: int,
                 head_scores: torch.Tensor | None = None) -> GroupPlan:
    """Merge the ``k`` best-matched units (whole heads for attention), keep the rest apart.

    ``head_scores`` ranks heads jointly for tied groups, so q/k and v merge the same heads.
    """
    d = g.size
    if not 0 <= k <= d:
        raise ValueError(f"group {g.name}: cannot merge {k} of {d} units")
    sim = match.similarity.double()
    if g.head_dim:
        if k % g.head_dim:
            raise ValueError(f"group {g.name}: merges whole heads of {g.head_dim} units")
        head_sim = head_scores if head_scores is not None else head_similarity(g, match)
        order = torch.argsort(-head_sim, stable=True)[: k // g.head_dim]
        chosen = (order[:, None] * g.head_dim + torch.arange(g.head_dim)).flatten()
    else:
        chosen = torch.argsort(-sim, stable=True)[:k]
    is_merged = torch.zeros(d, dtype=torch.bool)
    is_merged[chosen] = True
    frame_merged = torch.nonzero(is_merged).flatten()
    frame_only = torch.nonzero(~is_merged).flatten()
    perms = (torch.arange(d),) + match.perms  # frame unit -> each model's unit
    models = len(perms)
    # new units: [merged | kept from model 1 | ... | kept from model K]; kept units in each
    # model's own unit order
    index = []
    kept = torch.full((d - k,), -1)
    for m, perm in enumerate(perms):
        parts = [perm[frame_merged]]
        for j in range(models):
            parts.append(torch.sort(perm[frame_only]).values if j == m else kept)
        index.append(torch.cat(parts))
    return GroupPlan(*index)


# ----------------------------------------------------------------------------- compute model
#
# Every unit of a widened weight dim is of one kind: "both" (a merged unit, or one both models
# share: the input, a shared head's classes), A-only or B-only.  The merged model runs each
# layer block by block (pleas.blockwise): a "both" output row reads every input column, an
# A-only row the columns that exist in A, a B-only row those that exist in B.  With (M, A, B)
# the kinds of a layer's output rows and (m, a, b) those of its input columns, it executes
#     M (m + a + b) + A (m + a) + B (m + b)      row-column pairs
# against (M + A)(m + a) in one model.  A layer whose type cannot be split runs dense,
# (M + A + B)(m + a + b); a grouped, depthwise or attention "layer" runs its M + A + B output
# blocks, each on its own input block.  Symmetric groups (M, A, B) = d (1 - r, r, r) give the
# familiar F (1 + r_i + r_o - r_i r_o) block-structured and F (1 + r_i)(1 + r_o) dense.

Kinds = tuple[float, ...]  # units (or shares) of kind: merged/shared, kept from model 1, ..., K
_Term = tuple[str | None, int]      # (group, repeat): the group's units, each repeat times


def plan_kinds(p: GroupPlan) -> Kinds:
    """(merged, kept from model 1, ..., kept from model K) unit counts of one group's plan."""
    kinds = p.kinds()
    return tuple(int((kinds == k).sum()) for k in range(p.models + 1))


def shared_kinds(models: int) -> Kinds:
    """The kinds of one unit every model shares."""
    return (1,) + (0,) * models


def _dim_terms(spec: PermSpec, axes: dict, key: str, dim: int, fallback: str | None
               ) -> list[_Term]:
    """The groups that make up one weight dim (a cat or flatten makes several terms); units of
    an input group, or a dim without groups, are shared (group None)."""
    terms: list[_Term] = []
    for g, ax in axes.get(key, []):
        if ax.dim == dim:
            rep = ax.outer * ax.inner
            terms.append((None, rep * g.size) if g.kind == "input" else (g.name, rep))
    if not terms:
        known = fallback is not None and fallback in {g.name for g in spec.groups}
        terms = [(fallback, 1)] if known and spec.group(fallback).kind != "input" else [(None, 1)]
    return terms


def layer_terms(spec: PermSpec) -> list[tuple[Layer, list[_Term], list[_Term]]]:
    """Per conv/linear layer: the terms of its output rows and of its input columns."""
    axes = spec.axes_by_key()
    return [(layer, _dim_terms(spec, axes, layer.weight, 0, layer.out_group),
             _dim_terms(spec, axes, layer.weight, 1, layer.in_group)) for layer in spec.layers]


def _sum_kinds(terms: list[_Term], kinds_of, models: int) -> Kinds:
    total = [0.0] * (models + 1)
    for group, rep in terms:
        kinds = shared_kinds(models) if group is None else kinds_of(group)
        total = [t + rep * k for t, k in zip(total, kinds)]
    return tuple(total)


def layer_macs(layer: Layer, out: Kinds, inp: Kinds) -> tuple[float, float]:
    """(executed, dense) MACs of one widened layer with these row and column kinds.

    One model has the merged units and its own kept ones (M + P_1 rows); merged rows read
    every column, rows kept from model k the merged columns and model k's own."""
    mo, po = out[0], out[1:]
    mi, pi = inp[0], inp[1:]
    rows, cols = sum(out), sum(inp)
    if layer.depthwise:
        macs = layer.macs * rows / (mo + po[0])
        return macs, macs
    base = (mo + po[0]) * (mi + pi[0])
    dense = layer.macs * rows * cols / base
    if not layer.split:
        return dense, dense
    pairs = mo * cols
    for p_out, p_in in zip(po, pi):
        pairs = pairs + p_out * (mi + p_in)
    return layer.macs * pairs / base, dense


def _total(spec: PermSpec, kinds_of, models: int = 2) -> tuple[float, float]:
    executed = dense = 0.0
    for layer, out, inp in layer_terms(spec):
        e, d = layer_macs(layer, _sum_kinds(out, kinds_of, models),
                          _sum_kinds(inp, kinds_of, models))
        executed, dense = executed + e, dense + d
    return executed, dense


@dataclass(frozen=True)
class Cost:
    macs: int  # as the block-structured merged model executes them (pleas.blockwise)
    dense_macs: int  # the same model with every structural zero block multiplied
    base_macs: int  # one original model

    @property
    def width(self) -> float:
        return self.macs / self.base_macs


# How the merged model runs its partly merged layers, and so what the width pays for.
# ``dense`` (pleas' default): one plain layer that also multiplies the structural zeros, which
# the plan counts; ``blocks``: only the non-zero blocks, as up to three pieces (pleas.blockwise),
# so a plan keeps more units apart for its MACs.  Measured (README, Latency and Results): on a
# CPU the plain layers run each MAC faster (one kernel, no slicing or concatenation), and
# PLeaS' accuracy was equal within noise on the four zoo pairs.
LAYOUTS = ("dense", "blocks")


def for_layout(spec: PermSpec, layout: str) -> PermSpec:
    """``spec`` with the compute model of ``layout``: under ``dense`` no layer runs block by
    block, so every cost below (:func:`plan_cost`, the allocators, the MILP's
    :func:`pair_terms`) counts the zeros it multiplies, and the width stays what executes."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "blocks":
        return spec
    return replace(spec, layers=[replace(layer, split=False) for layer in spec.layers])


def plan_cost(spec: PermSpec, plan: Plan) -> Cost:
    """MACs of the merged model described by ``plan`` per sample (:func:`layer_macs` per layer;
    pass :func:`for_layout`'s spec for the dense layout)."""
    kinds = {name: plan_kinds(p) for name, p in plan.items()}
    models = next(iter(plan.values())).models if plan else 2
    executed, dense = _total(spec, lambda g: kinds.get(g, shared_kinds(models)), models)
    return Cost(int(round(executed)), int(round(dense)), spec.total_macs)


def macs_for_fractions(spec: PermSpec, r: dict[str, float], out_r: float,
                       models: int = 2) -> float:
    """Executed MACs when every hidden group g keeps a fraction r[g] of its units unmerged
    (in each of the ``models`` models) and the class axis a fraction ``out_r`` (1: separate
    heads)."""
    def kinds_of(name: str) -> Kinds:
        x = out_r if _is_output(spec, name) else r.get(name, 0.0)
        size = spec.group(name).size
        return (size * (1.0 - x),) + (size * x,) * models
    return _total(spec, kinds_of, models)[0]


def pair_terms(spec: PermSpec) -> list[tuple[float, str | None, str | None, str]]:
    """The compute model as a sum over (input group, output group) pairs: ``(F, in, out,
    mode)`` with F the pair's share of one model's MACs and mode ``split`` (F (1 + r_i + r_o -
    r_i r_o)), ``dense`` (F (1 + r_i)(1 + r_o)) or ``depthwise`` (F (1 + r_o)).  Bilinear in
    the fractions, so the MILP allocator can linearise it."""
    def units(term: _Term) -> int:
        group, rep = term
        return rep * (spec.group(group).size if group is not None else 1)

    pairs = []
    for layer, outs, ins in layer_terms(spec):
        mode = "depthwise" if layer.depthwise else "split" if layer.split else "dense"
        uo, ui = [units(t) for t in outs], [units(t) for t in ins]
        for (go, _), wo in zip(outs, uo):
            if mode == "depthwise":
                pairs.append((layer.macs * wo / sum(uo), None, go, mode))
                continue
            for (gi, _), wi in zip(ins, ui):
                pairs.append((layer.macs * wo * wi / (sum(uo) * sum(ui)), gi, go, mode))
    return pairs


def _is_output(spec: PermSpec, name: str | None) -> bool:
    return name is not None and spec.group(name).kind == "output"


# ----------------------------------------------------------------------------- allocators

# uniform: one fraction kept apart in every group, LayerNorm groups last; even: one fraction
# everywhere (LayerNorm groups too); zip: a stage cut; optimal: a MILP over the matching's
# similarities
ALLOCATORS = ("uniform", "even", "zip", "optimal")


def _quantum(g: Group, multiple: int = 1) -> int:
    """The step in which ``g``'s merged units are counted: its block (head) size, raised to the
    least common multiple with ``multiple`` (or, where the group's size does not allow that,
    with the largest of multiple / 2, multiple / 4, ... that it allows).

    Why ``multiple``: a block-structured layer runs one piece per unit kind, and CPU and GPU
    kernels compute output channels in whole vector or tile widths (16 float32 lanes with
    AVX-512, 8 or 16 for tensor cores).  A piece of 19 channels costs as much as one of 32
    (measured, README "Block-structured execution"), so counts in steps of 16 keep every piece
    at full kernel efficiency.  Wider steps suit wide layers at high resolution (two timm
    resnet50 at width 1.25: 1.67x one model in steps of 16, 1.39x in steps of 64; measured,
    one CPU thread), where a 64-unit group in steps of 64 merges all or nothing.
    """
    q = g.head_dim or 1
    step = multiple
    while step > 1:
        aligned = math.lcm(q, step)
        if g.size % aligned == 0:
            return aligned
        step //= 2
    return q


def _k_from_fraction(g: Group, r: float, multiple: int = 1) -> int:
    q = _quantum(g, multiple)
    units = g.size // q
    return int(round(units * (1.0 - r))) * q


def _bisect(fn, target: float, lo: float = 0.0, hi: float = 1.0, iters: int = 60) -> float:
    """Largest x in [lo, hi] with fn(x) <= target, fn increasing."""
    if fn(hi) <= target:
        return hi
    if fn(lo) > target:
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fn(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# merged / kept unit counts in multiples of this (16 float32 lanes: AVX-512, tensor-core tiles)
DEFAULT_UNIT_MULTIPLE = 16
# how far (in units of one model) a plan in whole kernel widths may miss the requested width
# before :func:`allocate_aligned` tries a finer multiple
WIDTH_TOLERANCE = 0.01


def allocate(spec: PermSpec, matching: Matching, width: float, method: str = "uniform",
             separate_heads: bool = True, models: int = 2,
             unit_multiple: int = DEFAULT_UNIT_MULTIPLE, finer: bool = True) -> dict[str, int]:
    """Number of units to merge per hidden group so the merged model of ``models`` models
    costs about ``width`` (in units of one model); :func:`allocate_aligned` without the
    multiple it used."""
    return allocate_aligned(spec, matching, width, method, separate_heads, models,
                            unit_multiple, finer)[0]


def allocate_aligned(spec: PermSpec, matching: Matching, width: float, method: str = "uniform",
                     separate_heads: bool = True, models: int = 2,
                     unit_multiple: int = DEFAULT_UNIT_MULTIPLE, finer: bool = True
                     ) -> tuple[dict[str, int], int]:
    """Units to merge per hidden group for ``width``, and the unit multiple the plan uses.

    ``unit_multiple``: every group whose size allows it merges (and so keeps apart) a multiple
    of this many units (:func:`_quantum`), so that the block-structured model's pieces are
    whole kernel widths.  Coarse steps cannot always meet the budget (a network of two
    16-unit groups has three possible plans), so where the plan misses ``width`` by more than
    :data:`WIDTH_TOLERANCE` the multiple is halved (16, 8, 4, 2, 1) until one is within it;
    if none is, the closest plan is taken (the coarser multiple on a tie).  ``finer=False``
    keeps ``unit_multiple`` whatever the miss.  Groups tied to a block group (a grouped conv's
    output channels) follow its block count and may not be multiples.

    Width K is the K models side by side (nothing merged), even where a layer type without a
    split rule makes that cost more than K times one model.
    """
    check_width(width, models)
    if width >= models:
        return {g.name: 0 for g in spec.hidden}, unit_multiple
    if not isinstance(unit_multiple, int) or unit_multiple < 1:
        raise ValueError(f"unit_multiple must be a positive integer, got {unit_multiple!r}")
    out_r = 1.0 if (separate_heads and spec.output_group is not None) else 0.0
    best: tuple[float, dict[str, int], int] | None = None
    multiple = unit_multiple
    while True:
        units = _allocate_at(spec, matching, width, method, out_r, models, multiple)
        miss = abs(_realised_macs(spec, units, out_r, models) / spec.total_macs - width)
        if best is None or miss < best[0] - 1e-9:
            best = (miss, units, multiple)
        if miss <= WIDTH_TOLERANCE or multiple == 1 or not finer:
            return best[1], best[2]
        multiple //= 2


def _allocate_at(spec: PermSpec, matching: Matching, width: float, method: str, out_r: float,
                 models: int, multiple: int) -> dict[str, int]:
    """One allocator's plan with unit counts in steps of ``multiple`` (:func:`_quantum`)."""
    hidden = spec.hidden
    budget = width * spec.total_macs
    if method in ("uniform", "even"):
        r = (_norms_last_fractions(spec, budget, out_r, models) if method == "uniform" else
             _even_fractions(spec, hidden, {}, budget, out_r, models))
        units = _dither_blocks(spec, {g.name: _k_from_fraction(g, r[g.name], multiple)
                                      for g in hidden}, r, budget, out_r, models, multiple)
        return _refill_units(spec, units, r, budget, out_r, models, multiple)
    if method == "zip":
        return _allocate_zip(spec, budget, out_r, models, multiple)
    if method == "optimal":
        if models != 2:
            raise ValueError(f"the optimal (MILP) allocation is written for two models; use "
                             f"uniform or zip for {models}")
        return _allocate_milp(spec, matching, budget, out_r, unit_multiple=multiple)
    raise ValueError(f"unknown allocation {method!r}; expected one of {', '.join(ALLOCATORS)}")


def _even_fractions(spec: PermSpec, groups: list[Group], fixed: dict[str, float],
                    budget: float, out_r: float, models: int) -> dict[str, float]:
    """One unmerged fraction shared by ``groups`` (the other groups at ``fixed``), the largest
    whose MACs stay within ``budget``."""
    def cost(x: float) -> float:
        return macs_for_fractions(spec, {**fixed, **{g.name: x for g in groups}}, out_r, models)
    r = _bisect(cost, budget)
    return {**fixed, **{g.name: r for g in groups}}


def layer_norm_fixed_width(spec: PermSpec, out_r: float, models: int = 2) -> float:
    """The widest plan (in units of one model) that keeps every :attr:`Group.layer_norm` group
    fully merged: every other group kept apart whole."""
    r = {g.name: 0.0 if g.layer_norm else 1.0 for g in spec.hidden}
    return macs_for_fractions(spec, r, out_r, models) / spec.total_macs


def _norms_last_fractions(spec: PermSpec, budget: float, out_r: float,
                          models: int) -> dict[str, float]:
    """The uniform allocation, groups under a LayerNorm (:attr:`Group.layer_norm`) last.

    While the other groups can take the budget, LayerNorm groups stay fully merged and the
    others keep one fraction apart; past that the others are kept apart whole and the
    LayerNorm groups share the rest.  Why: a LayerNorm over a partly merged stream becomes a
    :class:`pleas.normalization.MergedLayerNorm` (two views, about 3x a plain norm's time at
    the zoo ViT's size, where nine of them put the 1.25x model at 1.46x one model's latency),
    and on the ViT pair keeping the residual stream merged was also the more accurate plan for
    every least-squares method at 1.25x to 1.75x, by 0.25 to 13.6 points (permute: -3.0 to
    +4.3; ``experiments/allocation_norms.py``).  A network without such groups gets exactly
    the even fraction (:func:`_even_fractions`)."""
    hidden = spec.hidden
    normed = [g for g in hidden if g.layer_norm]
    plain = [g for g in hidden if not g.layer_norm]
    if not normed or not plain:
        return _even_fractions(spec, hidden, {}, budget, out_r, models)
    if layer_norm_fixed_width(spec, out_r, models) * spec.total_macs >= budget:
        return _even_fractions(spec, plain, {g.name: 0.0 for g in normed}, budget, out_r,
                               models)
    return _even_fractions(spec, normed, {g.name: 1.0 for g in plain}, budget, out_r, models)


def _refill_units(spec: PermSpec, merged_units: dict[str, int], r: dict[str, float],
                  budget: float, out_r: float, models: int, multiple: int) -> dict[str, int]:
    """Where the rounded plan still misses the budget by more than :data:`WIDTH_TOLERANCE`,
    solve the one fraction of the groups counted in single units again, the rounded groups
    held where :func:`_dither_blocks` put them.

    Why: :func:`_dither_blocks` rounds the groups counted in steps (heads, conv groups) and
    leaves single-unit groups at their share, so the steps' rounding error stays in the plan.
    With the LayerNorm stream held merged few groups are left to share the width: three
    two-block test ViTs at 2.5 landed at 2.54 with 32-unit heads, 2.50 with this.  Plans
    within the tolerance are returned as they are."""
    def miss(units: dict[str, int]) -> float:
        return abs(_realised_macs(spec, units, out_r, models) - budget)

    if miss(merged_units) <= WIDTH_TOLERANCE * spec.total_macs:
        return merged_units
    free = [g for g in spec.hidden if _quantum(g, multiple) == 1 and 0.0 < r[g.name] < 1.0
            and not g.tie]
    if not free:
        return merged_units
    held = {g.name: 1.0 - merged_units[g.name] / g.size for g in spec.hidden}
    x = _even_fractions(spec, free, held, budget, out_r, models)
    refilled = tie_merged_units(spec, {**merged_units, **{g.name: _k_from_fraction(g, x[g.name])
                                                          for g in free}})
    return refilled if miss(refilled) < miss(merged_units) else merged_units


def _realised_macs(spec: PermSpec, merged_units: dict[str, int], out_r: float,
                   models: int = 2) -> float:
    units = tie_merged_units(spec, merged_units)
    return macs_for_fractions(spec, {g.name: 1.0 - units[g.name] / g.size for g in spec.hidden},
                              out_r, models)


def _dither_blocks(spec: PermSpec, merged_units: dict[str, int], r: dict[str, float],
                   budget: float, out_r: float, models: int = 2,
                   multiple: int = 1) -> dict[str, int]:
    """Round the step counts of groups counted in steps (attention heads, conv groups, and
    every group under a ``multiple``: :func:`_quantum`) up or down so the realised MACs come
    closest to the budget.

    A group of 4 conv groups can only keep 0, 1/4, ... of them apart, so rounding every block
    group to the nearest step would miss the budget by a whole step (1.59 for 1.5 on
    ResNeXt-29).  Each tie set takes floor or ceil of its exact block count; sets round up
    (merge one more block) in order of their fractional part, and the number of sets that
    round up is the one whose plan costs closest to the budget.  Where that still misses the
    budget by more than :data:`WIDTH_TOLERANCE`, single sets are flipped between floor and ceil
    while that brings the cost closer; where the flips stall still off it, every floor / ceil
    choice is tried (:func:`_closest_rounding`, up to :data:`_MAX_EXACT_SETS` sets).  Unit
    groups keep their share.
    """
    step = {g.name: _quantum(g, multiple) for g in spec.hidden}
    leaders = [tied[0] for tied in tie_sets(spec) if step[tied[0].name] > 1]
    if not leaders:
        return merged_units
    steps = {g.name: g.size // step[g.name] for g in leaders}
    exact = {g.name: steps[g.name] * (1.0 - r[g.name]) for g in leaders}
    floor = {n: math.floor(e + 1e-9) for n, e in exact.items()}
    order = sorted(leaders, key=lambda g: -(exact[g.name] - floor[g.name]))  # stable: spec order

    def with_ups(ups: int) -> dict[str, int]:
        out = dict(merged_units)
        for i, g in enumerate(order):
            out[g.name] = min(floor[g.name] + int(i < ups), steps[g.name]) * step[g.name]
        return tie_merged_units(spec, out)

    def miss(units: dict[str, int]) -> float:
        return abs(_realised_macs(spec, units, out_r, models) - budget)

    best = min(range(len(order) + 1), key=lambda ups: (miss(with_ups(ups)), ups))
    plan = with_ups(best)
    if miss(plan) <= WIDTH_TOLERANCE * spec.total_macs:
        return plan
    # still off (coarse steps: the prefix of the fractional order cannot reach the budget):
    # flip single tie sets between floor and ceil while that brings the cost closer
    up = [i < best for i in range(len(order))]

    def units_of(ups) -> dict[str, int]:
        units = dict(merged_units)
        for g, u in zip(order, ups):
            units[g.name] = min(floor[g.name] + int(u), steps[g.name]) * step[g.name]
        return tie_merged_units(spec, units)

    current = miss(plan)
    while True:
        trials = [(miss(units_of(flipped)), flipped) for flipped in
                  (up[:i] + [not up[i]] + up[i + 1:] for i in range(len(order)))]
        m, flipped = min(trials, key=lambda t: t[0])
        if m >= current - 1e-9 * spec.total_macs:
            break
        current, up, plan = m, flipped, units_of(flipped)
    if current <= WIDTH_TOLERANCE * spec.total_macs:
        return plan
    # flips stall in a local minimum (ResNet-20's dense layout at 1.5 in steps of 16: 1.514):
    # every floor / ceil choice, when there are few enough tie sets to try them all
    wanted = np.array([exact[g.name] - floor[g.name] for g in order])
    ups = _closest_rounding(len(order), lambda u: _realised_macs(spec, units_of(u), out_r,
                                                                  models), budget,
                            WIDTH_TOLERANCE * spec.total_macs, wanted,
                            np.array([step[g.name] for g in order], dtype=np.float64))
    exact_plan = units_of(ups) if ups is not None else plan
    return exact_plan if miss(exact_plan) < current else plan


# tie sets up to which _dither_blocks tries every floor / ceil choice (2^n plans, costed in
# one vectorised quadratic form)
_MAX_EXACT_SETS = 20


def _closest_rounding(n: int, cost_of: Callable[[list[bool]], float], budget: float,
                      tolerance: float = 0.0, wanted: np.ndarray | None = None,
                      weight: np.ndarray | None = None) -> list[bool] | None:
    """A floor (False) / ceil (True) choice for each of ``n`` tie sets, over all 2^n choices:
    of those costing within ``tolerance`` of ``budget``, the one nearest the exact uniform
    shares (``wanted``: each set's fractional step count, ``weight``: its units per step;
    distance sum(weight |u - wanted|)); if none is within it, the one costing closest to the
    budget.  None when n is too large to try them all.

    Why this is cheap: the MACs are a quadratic form in the kept fractions
    (:func:`pair_terms`), so over binary choices they are ``c + a.u + u^T B u`` with B upper
    triangular, read off from 1 + n + n(n-1)/2 real costings; the 2^n plans are then costed
    as matrix products.  The winner is re-costed for real: a cost that is not such a form
    (so the read-off would be wrong) gives None rather than a wrong plan."""
    if n == 0 or n > _MAX_EXACT_SETS:
        return None
    wanted = np.full(n, 0.5) if wanted is None else wanted
    weight = np.ones(n) if weight is None else weight

    def one_hot(*idx: int) -> list[bool]:
        return [i in idx for i in range(n)]

    base = cost_of(one_hot())
    lin = np.array([cost_of(one_hot(i)) - base for i in range(n)])
    quad = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            quad[i, j] = cost_of(one_hot(i, j)) - base - lin[i] - lin[j]
    # the best so far as (within tolerance?, rank, code): within beats off, then the smaller
    # rank (distance to the uniform shares within, miss of the budget off), then the code
    best: tuple[bool, float, int] | None = None
    bits = np.arange(n)
    for start in range(0, 1 << n, 1 << 16):
        codes = np.arange(start, min(start + (1 << 16), 1 << n))
        u = ((codes[:, None] >> bits) & 1).astype(np.float64)
        off = np.abs(base + u @ lin + ((u @ quad) * u).sum(1) - budget)
        inside = off <= tolerance
        rank = np.where(inside, (np.abs(u - wanted) * weight).sum(1), off)
        order = np.lexsort((rank, ~inside))  # inside first, then by rank; stable: by code
        k = int(order[0])
        candidate = (not bool(inside[k]), float(rank[k]), int(codes[k]))
        if best is None or candidate < best:
            best = candidate
    code = best[2]
    ups = [bool(code >> i & 1) for i in range(n)]
    modelled = base + sum(lin[i] for i in range(n) if ups[i]) + sum(
        quad[i, j] for i in range(n) for j in range(i + 1, n) if ups[i] and ups[j])
    if not math.isclose(cost_of(ups), modelled, rel_tol=1e-9, abs_tol=1e-9 * abs(budget)):
        return None
    return ups


def check_width(width: float, models: int = 2) -> None:
    if not isinstance(width, (int, float)) or math.isnan(width) or not 1.0 <= width <= models:
        side = "both" if models == 2 else f"all {models}"
        raise ValueError(f"width must lie in [1, {models}] (1 = one model, {models} = {side} "
                         f"side by side); got {width}")


def _allocate_zip(spec: PermSpec, budget: float, out_r: float, models: int = 2,
                  multiple: int = 1) -> dict[str, int]:
    """ZipIt!-style: merge groups fully from the input on, keep the later ones separate.

    Tied block groups (a grouped conv's input and output channels) move as one step."""
    steps = tie_sets(spec)
    n = len(steps)

    def fractions(cut: int, x: float) -> dict[str, float]:
        return {g.name: (0.0 if i < cut else x if i == cut else 1.0)
                for i, tied in enumerate(steps) for g in tied}

    # the fewest fully merged leading steps that fit, with the boundary step partly merged
    for cut in range(n):
        if macs_for_fractions(spec, fractions(cut, 0.0), out_r, models) <= budget:
            x = _bisect(lambda v: macs_for_fractions(spec, fractions(cut, v), out_r, models),
                        budget)
            r = fractions(cut, x)
            return {g.name: _k_from_fraction(g, r[g.name], multiple) for g in spec.hidden}
    return {g.name: g.size for g in spec.hidden}


def _allocate_milp(spec: PermSpec, matching: Matching, budget: float, out_r: float,
                   levels: int = 8, unit_multiple: int = 1) -> dict[str, int]:
    """Minimise the summed dissimilarity of merged pairs under the MAC budget (scipy MILP).

    LayerNorm groups stay fully merged wherever the other groups can take the budget
    (:func:`_norms_last_fractions` says why).

    Each group picks one unmerged fraction from {0, 1/levels, ..., 1}; the bilinear MAC terms
    r_i r_o are linearised with one variable per pair of levels (z <= x_i, z <= x_o suffices
    because the budget pushes z up).  Solved with HiGHS through scipy.optimize.milp.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    hidden = spec.hidden
    gi = {g.name: i for i, g in enumerate(hidden)}
    rho = np.linspace(0.0, 1.0, levels + 1)
    L = len(rho)
    nx = len(hidden) * L
    # the unmerged fraction each level really gives (whole blocks, whole units), per group
    rg = np.array([[1.0 - _k_from_fraction(g, r, unit_multiple) / g.size for r in rho]
                   for g in hidden])
    cost = np.zeros(nx)  # dissimilarity of the pairs merged at each level
    for i, g in enumerate(hidden):
        sim = matching[g.name].similarity.double()
        if g.head_dim:
            sim = sim.view(g.num_heads, g.head_dim).mean(1).repeat_interleave(g.head_dim)
        dis = np.sort(1.0 - sim.numpy())  # cheapest pairs first
        for lvl, r in enumerate(rho):
            cost[i * L + lvl] = dis[:_k_from_fraction(g, r, unit_multiple)].sum()
    lin = np.zeros(nx)
    const = 0.0
    pairs: list[tuple[int, int, float]] = []  # (x index, x index, coefficient of the product)
    for F, gin, gout, mode in pair_terms(spec):
        o_out = _is_output(spec, gout)
        i_idx = gi.get(gin or "")
        o_idx = None if o_out else gi.get(gout or "")
        ro = out_r if o_out else 0.0
        sign = 1.0 if mode == "dense" else -1.0  # the product r_i r_o: + dense, - split
        if mode == "depthwise":
            const += F * (1 + ro)
            if o_idx is not None:
                lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
            continue
        if i_idx is None and o_idx is None:
            const += F * (1 + ro)
        elif o_idx is None:  # F (1 + ri + ro +- ri ro) with ro constant
            const += F * (1 + ro)
            lin[i_idx * L:(i_idx + 1) * L] += F * rg[i_idx] * (1 + sign * ro)
        elif i_idx is None:
            const += F
            lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
        elif i_idx == o_idx:
            const += F
            lin[i_idx * L:(i_idx + 1) * L] += F * (2 * rg[i_idx] + sign * rg[i_idx] ** 2)
        else:
            const += F
            lin[i_idx * L:(i_idx + 1) * L] += F * rg[i_idx]
            lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
            for a in range(1, L):
                for b in range(1, L):
                    pairs.append((i_idx * L + a, o_idx * L + b,
                                  sign * F * rg[i_idx][a] * rg[o_idx][b]))
    nz = len(pairs)
    n = nx + nz
    c = np.concatenate([cost, np.zeros(nz)])
    rows, lo, hi = [], [], []
    for i in range(len(hidden)):  # one level per group
        row = np.zeros(n)
        row[i * L:(i + 1) * L] = 1
        rows.append(row), lo.append(1), hi.append(1)
    if layer_norm_fixed_width(spec, out_r) * spec.total_macs >= budget:
        for i, g in enumerate(hidden):  # LayerNorm groups stay merged while others can take
            if g.layer_norm:            # the budget, as in the uniform allocation
                row = np.zeros(n)
                row[i * L] = 1
                rows.append(row), lo.append(1), hi.append(1)
    for i, g in enumerate(hidden):  # tied block groups merge the same share of blocks
        if g.tie and g.tie != g.name and g.tie in gi:
            for lvl in range(L):
                row = np.zeros(n)
                row[i * L + lvl], row[gi[g.tie] * L + lvl] = 1, -1
                rows.append(row), lo.append(0), hi.append(0)
    budget_row = len(rows)
    rows.append(np.concatenate([lin, np.array([p[2] for p in pairs])]))
    lo.append(-np.inf), hi.append(budget - const)
    # per layer and level: sum_b z_ab <= x_a and sum_a z_ab <= x_b (a transportation-polytope
    # linearisation: much tighter than z <= x_a, z <= x_b pair by pair, and smaller)
    by_side: dict[tuple[int, int], list[int]] = {}
    for j, (a, b, _) in enumerate(pairs):
        layer_id = j // ((L - 1) * (L - 1))
        by_side.setdefault((layer_id * 2, a), []).append(j)
        by_side.setdefault((layer_id * 2 + 1, b), []).append(j)
    for (_, src), members in by_side.items():
        row = np.zeros(n)
        row[[nx + j for j in members]] = 1
        row[src] = -1
        rows.append(row), lo.append(-np.inf), hi.append(0)
    for j, (a, b, coef) in enumerate(pairs):  # a product that costs (dense layers): z >= x_a +
        if coef > 0:                           # x_b - 1, since the budget pushes z down
            row = np.zeros(n)
            row[nx + j], row[a], row[b] = 1, -1, -1
            rows.append(row), lo.append(-1), hi.append(np.inf)
    # the cheapest plan (every group fully merged) bounds what any budget can reach
    floor = const + sum(lin[i * L] for i in range(len(hidden)))
    hi[budget_row] = max(budget, floor * (1 + 1e-9)) - const
    res = milp(c, constraints=LinearConstraint(np.vstack(rows), lo, hi),
               integrality=np.concatenate([np.ones(nx), np.zeros(nz)]), bounds=Bounds(0, 1),
               options={"time_limit": 20, "mip_rel_gap": 1e-3})
    if res.x is None:
        raise RuntimeError(f"the MILP allocation found no solution ({res.message})")
    x = res.x[:nx].reshape(len(hidden), L)
    return {g.name: _k_from_fraction(g, float(rho[int(np.argmax(x[i]))]), unit_multiple)
            for i, g in enumerate(hidden)}


def tie_merged_units(spec: PermSpec, merged_units: dict[str, int]) -> dict[str, int]:
    """Tied block groups merge the same blocks: the tie leader's block count, converted to each
    group's own block size (a grouped conv's input and output blocks may differ in size)."""
    out = dict(merged_units)
    for g in spec.hidden:
        if g.tie and g.tie != g.name and g.tie in merged_units:
            lead = spec.group(g.tie)
            out[g.name] = merged_units[g.tie] // lead.head_dim * g.head_dim
    return out


def build_plan(spec: PermSpec, matching: Matching, merged_units: dict[str, int],
               separate_heads: bool, n_classes_b: int | None = None,
               n_classes: list[int] | None = None) -> Plan:
    """Every group's plan: hidden groups from the matching, input shared, output per head mode.

    ``n_classes`` are the models' class counts (separate heads, K models); for two models
    ``n_classes_b`` alone may give B's (A's is the spec's)."""
    models = 1 + len(next(iter(matching.values())).perms) if matching else 2
    if n_classes is None:
        out = spec.output_group
        n_classes = [out.size if out else 0, n_classes_b or (out.size if out else 0)]
    plan: Plan = {}
    merged_units = tie_merged_units(spec, merged_units)
    tied: dict[str, list[Group]] = {}
    for g in spec.hidden:
        if g.tie:
            tied.setdefault(g.tie, []).append(g)
    joint = {t: torch.stack([head_similarity(g, matching[g.name]) for g in gs]).mean(0)
             for t, gs in tied.items()}
    for g in spec.groups:
        if g.kind == "input":
            plan[g.name] = shared_plan(g.size, models)
        elif g.kind == "output":
            plan[g.name] = (separate_plan(*n_classes) if separate_heads
                            else shared_plan(g.size, models))
        else:
            plan[g.name] = partial_plan(g, matching[g.name], merged_units[g.name],
                                        joint.get(g.tie))
    return plan
