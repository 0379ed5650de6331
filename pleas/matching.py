"""Matching units of model B to units of model A.

Both methods return, per hidden group, a :class:`GroupMatch`: the permutation that aligns B to A
(``perm[i]`` is the B unit paired with A unit ``i``) and the similarity of every matched pair,
which the partial merge uses to decide which pairs to merge.

- Activation matching: maximise the summed correlation (or inner product) of paired units with
  scipy's linear_sum_assignment on statistics accumulated over all the data.
- Weight matching (Git Re-Basin, no data): coordinate descent over groups in a seeded random
  order, each step a linear assignment of sum_axes <W_A, P W_B>; similarities are read in the
  FINAL frame, after all permutations are fixed (reading them in a stale frame scrambles which
  units get merged).

Block-structured groups (``head_dim``: attention heads, grouped-convolution channels) are matched
as whole blocks: the score of a block pair is the best within-block assignment summed over the
tied groups, then blocks are assigned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .blocks import blocked_axes, dense_state
from .permute import permute_axis, permute_dense_state
from .spec import AxisRef, Group, PermSpec
from .stats import CrossStats


@dataclass(frozen=True)
class GroupMatch:
    perm: torch.Tensor  # (d,) long: B unit matched to A unit i
    similarity: torch.Tensor  # (d,) float64: similarity of pair (i, perm[i])


Matching = dict[str, GroupMatch]


def _lsa(score: torch.Tensor) -> tuple[torch.Tensor, float]:
    s = score.detach().cpu().double().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = torch.empty(s.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm, float(s[rows, cols].sum())


def tie_sets(spec: PermSpec) -> list[list[Group]]:
    """Hidden groups that must be assigned together (tied attention heads), in spec order."""
    sets: dict[str, list[Group]] = {}
    for g in spec.hidden:
        sets.setdefault(g.tie or g.name, []).append(g)
    return list(sets.values())


def assign(scores: dict[str, torch.Tensor], groups: list[Group]) -> dict[str, torch.Tensor]:
    """Maximum-score permutations for one tie set (a plain group, or tied block groups)."""
    if len(groups) == 1 and not groups[0].head_dim:
        return {groups[0].name: _lsa(scores[groups[0].name])[0]}
    heads = groups[0].num_heads
    head_score = np.zeros((heads, heads))
    within: dict[tuple[str, int, int], np.ndarray] = {}
    for g in groups:
        if g.num_heads != heads:
            raise ValueError(f"tied groups {groups[0].name} and {g.name} differ in head count")
        hd = g.head_dim
        s = np.nan_to_num(scores[g.name].detach().cpu().double().numpy(), nan=0.0, posinf=0.0,
                          neginf=0.0)
        # one small assignment per (A block, B block) pair; square, so rows come back in order
        for i in range(heads):
            for j in range(heads):
                block = s[i * hd:(i + 1) * hd, j * hd:(j + 1) * hd]
                _, cols = linear_sum_assignment(block, maximize=True)
                within[(g.name, i, j)] = cols
                head_score[i, j] += block[np.arange(hd), cols].sum()
    head_perm, _ = _lsa(torch.from_numpy(head_score))
    out = {}
    for g in groups:
        out[g.name] = torch.cat([int(j) * g.head_dim + torch.from_numpy(within[(g.name, i, int(j))])
                                 for i, j in enumerate(head_perm)]).long()
    return out


def match_activations(stats: dict[str, CrossStats], spec: PermSpec,
                      metric: str = "correlation") -> Matching:
    """Activation matching from accumulated statistics (see :class:`pleas.stats.MatchingStats`)."""
    if metric not in ("correlation", "inner_product"):
        raise ValueError(f"unknown similarity metric {metric!r}")
    result: Matching = {}
    for groups in tie_sets(spec):
        scores = {}
        for g in groups:
            if g.name not in stats:
                raise ValueError(f"group {g.name} has no activation statistics (no site where its "
                                 "activations can be read); use weight matching")
            st = stats[g.name]
            scores[g.name] = st.correlation() if metric == "correlation" else st.inner_product()
        for name, perm in assign(scores, groups).items():
            sim = scores[name][torch.arange(perm.numel()), perm]
            result[name] = GroupMatch(perm, sim.double().cpu())
    return result


def _axis_rows(t: torch.Tensor, ax: AxisRef) -> torch.Tensor:
    """The slice of ``t`` on ``ax`` as a (units, everything else) matrix."""
    seg = t.narrow(ax.dim, ax.start, ax.length).unflatten(ax.dim, (ax.outer, ax.size, ax.inner))
    return seg.movedim(ax.dim + 1, 0).reshape(ax.size, -1).double()


def _blocked_score(ta: torch.Tensor, tb: torch.Tensor, dim: int, nb: int) -> torch.Tensor:
    """``_axis_rows(ta) @ _axis_rows(tb).T`` along ``dim`` (0: output channels, 1: input
    channels) of a grouped conv weight in dense view with ``nb`` groups.  A's unit u is non-zero
    only inside its own diagonal block, so each block needs only its own slice of B: ``nb``
    times less work than the dense product."""
    rows, cols = ta.shape[0], ta.shape[1]
    r, c, kk = rows // nb, cols // nb, ta[0, 0].numel()
    idx = torch.arange(nb, device=ta.device)
    diag = ta.reshape(nb, r, nb, c, kk)[idx, :, idx]  # (nb, r, c, kk)
    if dim == 1:
        a = diag.permute(0, 2, 1, 3).reshape(nb, c, r * kk).double()
        b = tb.reshape(nb, r, cols, kk).permute(0, 2, 1, 3).reshape(nb, cols, r * kk).double()
        return (a @ b.transpose(1, 2)).reshape(cols, cols)
    a = diag.reshape(nb, r, c * kk).double()
    b = tb.reshape(rows, nb, c * kk).transpose(0, 1).double()
    return (a @ b.transpose(1, 2)).reshape(rows, rows)


def _permute_key_except(t: torch.Tensor, key_axes: list, perms: dict, skip: AxisRef) -> torch.Tensor:
    for g, ax in key_axes:
        if ax is skip or g.name not in perms:
            continue
        t = permute_axis(t, ax, perms[g.name])
    return t


def match_weights(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                  spec: PermSpec, seed: int = 0, max_iter: int = 100) -> Matching:
    """Git Re-Basin weight matching by coordinate descent (no data needed)."""
    state_a, state_b = dense_state(state_a, spec), dense_state(state_b, spec)
    grouped = {key: ax.blocks for key, ax in blocked_axes(spec).items()}
    by_key = spec.axes_by_key()
    perms = {g.name: torch.arange(g.size) for g in spec.hidden}
    sets = tie_sets(spec)
    rng = np.random.default_rng(seed)

    def scores_for(groups: list[Group]) -> dict[str, torch.Tensor]:
        out = {}
        for g in groups:
            s = torch.zeros(g.size, g.size, dtype=torch.float64)
            for ax in g.axes:
                ta = state_a[ax.key]
                tb = _permute_key_except(state_b[ax.key], by_key[ax.key], perms, ax)
                if ax.key in grouped:
                    s += _blocked_score(ta, tb, ax.dim, grouped[ax.key])
                else:
                    s += _axis_rows(ta, ax) @ _axis_rows(tb, ax).T
            out[g.name] = s
        return out

    def total(scores: dict[str, torch.Tensor], p: dict[str, torch.Tensor]) -> float:
        return sum(float(scores[n][torch.arange(p[n].numel()), p[n]].sum()) for n in scores)

    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(sets)):
            groups = sets[i]
            scores = scores_for(groups)
            new = assign(scores, groups)
            if total(scores, new) > total(scores, perms) + 1e-9 * (1 + abs(total(scores, perms))):
                perms.update(new)
                improved = True
        if not improved:
            break
    # similarities in the final frame: cosine of each unit's weights across all its axes
    aligned_b = permute_dense_state(state_b, spec, perms)
    result: Matching = {}
    for g in spec.hidden:
        rows_a = torch.cat([_axis_rows(state_a[ax.key], ax) for ax in g.axes], 1)
        rows_b = torch.cat([_axis_rows(aligned_b[ax.key], ax) for ax in g.axes], 1)
        cos = (rows_a * rows_b).sum(1) / (rows_a.norm(dim=1) * rows_b.norm(dim=1) + 1e-12)
        result[g.name] = GroupMatch(perms[g.name], cos)
    return result


def identity_matching(spec: PermSpec) -> Matching:
    """No alignment (unit i of B paired with unit i of A); similarity 0."""
    return {g.name: GroupMatch(torch.arange(g.size), torch.zeros(g.size, dtype=torch.float64))
            for g in spec.hidden}
