"""Planning the widths: which matched pairs to merge in every group, and what it costs.

For group g PLeaS merges k_g matched pairs and keeps the other units of A and of B apart, so the
group's merged width is 2 d_g - k_g.  The new unit order is [merged | A-only | B-only]; merged
units are the best-matched pairs.  ``--width`` is a compute budget: MACs of the merged model
(structural zero blocks not counted) over the MACs of one original model.  A conv/linear layer
with base MACs F whose input and output groups keep fractions r_i, r_o unmerged costs
F (1 + r_i + r_o - r_i r_o); dense (zeros counted) it costs F (1 + r_i)(1 + r_o).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .matching import GroupMatch, Matching, tie_sets
from .spec import Group, PermSpec


@dataclass(frozen=True)
class GroupPlan:
    """The new units of one group: which A unit and which B unit each one stands for.

    ``a_index[j]`` / ``b_index[j]`` are -1 where the new unit has no counterpart in that model.
    Both set: a merged unit (the average of the pair); one set: a unit kept from one model.
    """

    a_index: torch.Tensor
    b_index: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.a_index.numel())

    @property
    def merged(self) -> torch.Tensor:
        return (self.a_index >= 0) & (self.b_index >= 0)

    @property
    def n_merged(self) -> int:
        return int(self.merged.sum())

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Share of A and of B in each new unit: (1/2, 1/2) merged, (1, 0) A-only, (0, 1) B-only."""
        m = self.merged
        wa = torch.where(m, 0.5, (self.a_index >= 0).double()).double()
        wb = torch.where(m, 0.5, (self.b_index >= 0).double()).double()
        return wa, wb


Plan = dict[str, GroupPlan]


def shared_plan(size: int) -> GroupPlan:
    """Units both models see identically (the input, a shared head): all merged, in order."""
    idx = torch.arange(size)
    return GroupPlan(idx, idx.clone())


def separate_plan(size_a: int, size_b: int) -> GroupPlan:
    """Units kept apart entirely (k = 0): A's units, then B's."""
    none_a, none_b = torch.full((size_b,), -1), torch.full((size_a,), -1)
    return GroupPlan(torch.cat([torch.arange(size_a), none_a]),
                     torch.cat([none_b, torch.arange(size_b)]))


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
    a_merged = torch.nonzero(is_merged).flatten()
    a_only = torch.nonzero(~is_merged).flatten()
    b_of_a = match.perm
    b_only = torch.sort(b_of_a[a_only]).values
    none = torch.full((d - k,), -1)
    a_index = torch.cat([a_merged, a_only, none])
    b_index = torch.cat([b_of_a[a_merged], none, b_only])
    return GroupPlan(a_index, b_index)


# ----------------------------------------------------------------------------- compute model


def _unmerged_fraction(spec: PermSpec, plan: Plan, name: str | None) -> float:
    if name is None or name not in plan:
        return 0.0
    p = plan[name]
    g = spec.group(name)
    if g.kind == "input":
        return 0.0
    base = max(int((p.a_index >= 0).sum()), 1)
    return (p.size - base) / base


@dataclass(frozen=True)
class Cost:
    macs: int  # block-sparse: structural zero blocks are free
    dense_macs: int
    base_macs: int  # one original model

    @property
    def width(self) -> float:
        return self.macs / self.base_macs


def plan_cost(spec: PermSpec, plan: Plan) -> Cost:
    """MACs of the merged model described by ``plan`` (see the module docstring)."""
    sparse = dense = 0.0
    for layer in spec.layers:
        ro = _unmerged_fraction(spec, plan, layer.out_group)
        if layer.depthwise:
            sparse += layer.macs * (1 + ro)
            dense += layer.macs * (1 + ro)
            continue
        ri = _unmerged_fraction(spec, plan, layer.in_group)
        sparse += layer.macs * (1 + ri + ro - ri * ro)
        dense += layer.macs * (1 + ri) * (1 + ro)
    return Cost(int(round(sparse)), int(round(dense)), spec.total_macs)


def macs_for_fractions(spec: PermSpec, r: dict[str, float], out_r: float) -> float:
    """MACs (block-sparse) when every hidden group g keeps a fraction r[g] unmerged."""
    total = 0.0
    for layer in spec.layers:
        ro = out_r if _is_output(spec, layer.out_group) else r.get(layer.out_group or "", 0.0)
        if layer.depthwise:
            total += layer.macs * (1 + ro)
            continue
        ri = r.get(layer.in_group or "", 0.0)
        total += layer.macs * (1 + ri + ro - ri * ro)
    return total


def _is_output(spec: PermSpec, name: str | None) -> bool:
    return name is not None and spec.group(name).kind == "output"


# ----------------------------------------------------------------------------- allocators

ALLOCATORS = ("uniform", "zip", "optimal")


def _quantum(g: Group) -> int:
    return g.head_dim or 1


def _k_from_fraction(g: Group, r: float) -> int:
    q = _quantum(g)
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


def allocate(spec: PermSpec, matching: Matching, width: float, method: str = "uniform",
             separate_heads: bool = True) -> dict[str, int]:
    """Number of units to merge per hidden group so the merged model costs about ``width``."""
    check_width(width)
    hidden = spec.hidden
    out_r = 1.0 if (separate_heads and spec.output_group is not None) else 0.0
    budget = width * spec.total_macs
    if method == "uniform":
        r = _bisect(lambda x: macs_for_fractions(spec, {g.name: x for g in hidden}, out_r), budget)
        return _dither_blocks(spec, {g.name: _k_from_fraction(g, r) for g in hidden}, r, budget,
                              out_r)
    if method == "zip":
        return _allocate_zip(spec, budget, out_r)
    if method == "optimal":
        return _allocate_milp(spec, matching, budget, out_r)
    raise ValueError(f"unknown allocation {method!r}; expected one of {', '.join(ALLOCATORS)}")


def _realised_macs(spec: PermSpec, merged_units: dict[str, int], out_r: float) -> float:
    units = tie_merged_units(spec, merged_units)
    return macs_for_fractions(spec, {g.name: 1.0 - units[g.name] / g.size for g in spec.hidden},
                              out_r)


def _dither_blocks(spec: PermSpec, merged_units: dict[str, int], r: float, budget: float,
                   out_r: float) -> dict[str, int]:
    """Round the block counts of block groups (attention heads, conv groups) up or down so the
    realised MACs come closest to the budget.

    A group of 4 conv groups can only keep 0, 1/4, ... of them apart, so rounding every block
    group to the nearest step would miss the budget by a whole step (1.59 for 1.5 on
    ResNeXt-29).  Each tie set takes floor or ceil of its exact block count; sets round up
    (merge one more block) in order of their fractional part, and the number of sets that
    round up is the one whose plan costs closest to the budget.  Unit groups keep their share.
    """
    leaders = [tied[0] for tied in tie_sets(spec) if tied[0].head_dim]
    if not leaders:
        return merged_units
    exact = {g.name: g.num_heads * (1.0 - r) for g in leaders}
    floor = {n: math.floor(e + 1e-9) for n, e in exact.items()}
    order = sorted(leaders, key=lambda g: -(exact[g.name] - floor[g.name]))  # stable: spec order

    def with_ups(ups: int) -> dict[str, int]:
        out = dict(merged_units)
        for i, g in enumerate(order):
            out[g.name] = min(floor[g.name] + int(i < ups), g.num_heads) * g.head_dim
        return tie_merged_units(spec, out)

    best = min(range(len(order) + 1),
               key=lambda ups: (abs(_realised_macs(spec, with_ups(ups), out_r) - budget), ups))
    return with_ups(best)


def check_width(width: float) -> None:
    if not isinstance(width, (int, float)) or math.isnan(width) or not 1.0 <= width <= 2.0:
        raise ValueError(f"width must lie in [1, 2] (1 = one model, 2 = both side by side); "
                         f"got {width}")


def _allocate_zip(spec: PermSpec, budget: float, out_r: float) -> dict[str, int]:
    """ZipIt!-style: merge groups fully from the input on, keep the later ones separate.

    Tied block groups (a grouped conv's input and output channels) move as one step."""
    steps = tie_sets(spec)
    n = len(steps)

    def fractions(cut: int, x: float) -> dict[str, float]:
        return {g.name: (0.0 if i < cut else x if i == cut else 1.0)
                for i, tied in enumerate(steps) for g in tied}

    # the fewest fully merged leading steps that fit, with the boundary step partly merged
    for cut in range(n):
        if macs_for_fractions(spec, fractions(cut, 0.0), out_r) <= budget:
            x = _bisect(lambda v: macs_for_fractions(spec, fractions(cut, v), out_r), budget)
            r = fractions(cut, x)
            return {g.name: _k_from_fraction(g, r[g.name]) for g in spec.hidden}
    return {g.name: g.size for g in spec.hidden}


def _allocate_milp(spec: PermSpec, matching: Matching, budget: float, out_r: float,
                   levels: int = 8) -> dict[str, int]:
    """Minimise the summed dissimilarity of merged pairs under the MAC budget (scipy MILP).

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
    rg = np.array([[1.0 - _k_from_fraction(g, r) / g.size for r in rho] for g in hidden])
    cost = np.zeros(nx)  # dissimilarity of the pairs merged at each level
    for i, g in enumerate(hidden):
        sim = matching[g.name].similarity.double()
        if g.head_dim:
            sim = sim.view(g.num_heads, g.head_dim).mean(1).repeat_interleave(g.head_dim)
        dis = np.sort(1.0 - sim.numpy())  # cheapest pairs first
        for lvl, r in enumerate(rho):
            cost[i * L + lvl] = dis[:_k_from_fraction(g, r)].sum()
    lin = np.zeros(nx)
    const = 0.0
    pairs: list[tuple[int, int, float]] = []  # (x index, x index, coefficient of the product)
    for layer in spec.layers:
        F = float(layer.macs)
        o_out = _is_output(spec, layer.out_group)
        i_idx = gi.get(layer.in_group or "")
        o_idx = None if o_out else gi.get(layer.out_group or "")
        ro = out_r if o_out else 0.0
        if layer.depthwise:
            const += F
            if o_idx is not None:
                lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
            continue
        if i_idx is None and o_idx is None:
            const += F * (1 + ro)
        elif o_idx is None:  # F (1 + ri + ro - ri ro) with ro constant
            const += F * (1 + ro)
            lin[i_idx * L:(i_idx + 1) * L] += F * rg[i_idx] * (1 - ro)
        elif i_idx is None:
            const += F
            lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
        elif i_idx == o_idx:
            const += F
            lin[i_idx * L:(i_idx + 1) * L] += F * (2 * rg[i_idx] - rg[i_idx] ** 2)
        else:
            const += F
            lin[i_idx * L:(i_idx + 1) * L] += F * rg[i_idx]
            lin[o_idx * L:(o_idx + 1) * L] += F * rg[o_idx]
            for a in range(1, L):
                for b in range(1, L):
                    pairs.append((i_idx * L + a, o_idx * L + b, -F * rg[i_idx][a] * rg[o_idx][b]))
    nz = len(pairs)
    n = nx + nz
    c = np.concatenate([cost, np.zeros(nz)])
    rows, lo, hi = [], [], []
    for i in range(len(hidden)):  # one level per group
        row = np.zeros(n)
        row[i * L:(i + 1) * L] = 1
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
    # the cheapest plan (every group fully merged) bounds what any budget can reach
    floor = const + sum(lin[i * L] for i in range(len(hidden)))
    hi[budget_row] = max(budget, floor * (1 + 1e-9)) - const
    res = milp(c, constraints=LinearConstraint(np.vstack(rows), lo, hi),
               integrality=np.concatenate([np.ones(nx), np.zeros(nz)]), bounds=Bounds(0, 1),
               options={"time_limit": 20, "mip_rel_gap": 1e-3})
    if res.x is None:
        raise RuntimeError(f"the MILP allocation found no solution ({res.message})")
    x = res.x[:nx].reshape(len(hidden), L)
    return {g.name: _k_from_fraction(g, float(rho[int(np.argmax(x[i]))]))
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
               separate_heads: bool, n_classes_b: int | None = None) -> Plan:
    """Every group's plan: hidden groups from the matching, input shared, output per head mode."""
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
            plan[g.name] = shared_plan(g.size)
        elif g.kind == "output":
            plan[g.name] = (separate_plan(g.size, n_classes_b or g.size) if separate_heads
                            else shared_plan(g.size))
        else:
            plan[g.name] = partial_plan(g, matching[g.name], merged_units[g.name],
                                        joint.get(g.tie))
    return plan
