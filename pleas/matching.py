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
    """Which units of the models are matched, in the unit order of the first model (the
    frame): ``perm[i]`` is B's unit matched to A's unit i, ``others[k - 2][i]`` model k's
    (K > 2 models); ``similarity[i]`` how alike the matched units are (for K models the mean
    over pairs)."""

    perm: torch.Tensor  # (d,) long: B unit matched to A unit i
    similarity: torch.Tensor  # (d,) float64: similarity of pair (i, perm[i])
    others: tuple[torch.Tensor, ...] = ()

    @property
    def perms(self) -> tuple[torch.Tensor, ...]:
        """Frame unit -> unit of each model after the first."""
        return (self.perm,) + self.others


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


def identity_matching(spec: PermSpec, models: int = 2) -> Matching:
    """No alignment (unit i of every model matched to unit i of A); similarity 0."""
    return {g.name: GroupMatch(torch.arange(g.size), torch.zeros(g.size, dtype=torch.float64),
                               tuple(torch.arange(g.size) for _ in range(models - 2)))
            for g in spec.hidden}


# ----------------------------------------------------------------------------- K models


def canonical_order(models: list) -> list[int]:
    """The models sorted by a fingerprint of their weights (sha256 of every floating tensor's
    bytes, by key): :func:`match_many` visits them in this order, so that the merge does not
    depend on the order they were listed in.  Identical models keep their listed order."""
    import hashlib

    def fingerprint(model) -> str:
        h = hashlib.sha256()
        for key, t in sorted(model.state_dict().items()):
            if t.is_floating_point():
                h.update(key.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    prints = [fingerprint(m) for m in models]
    return sorted(range(len(models)), key=lambda k: (prints[k], k))


def _pair_scores(pairs: dict, score: str, i: int, j: int) -> torch.Tensor:
    """Similarity of model i's units (rows) with model j's (columns)."""
    def of(st: CrossStats) -> torch.Tensor:
        return st.correlation() if score == "correlation" else st.inner_product()
    return of(pairs[(i, j)]) if i < j else of(pairs[(j, i)]).T


def match_many(stats: dict[str, dict[tuple[int, int], CrossStats]], spec: PermSpec,
               models: int, order: list[int] | None = None, metric: str = "correlation",
               max_rounds: int = 50) -> Matching:
    """Match K models into one common unit order, no model privileged (MergeMany-style).

    Every group (tie set) starts from each model matched to the first model of ``order``
    (:func:`canonical_order`), then, model after model in that order, re-matches one model to
    all the others: the score of pairing its unit v with cluster u is the sum over the other
    models j of the similarity of v with j's unit in u.  Each step can only raise the summed
    pairwise similarity of the clusters, so the rounds stop when no permutation changes (or
    after ``max_rounds``).  The clusters are then written in model 1's unit order (the frame);
    a cluster's similarity is the mean over its pairs of models.  ``stats[group][(i, j)]``:
    the statistics of models i < j (:class:`pleas.stats.MatchingStats` with ``models=K``).
    """
    if metric not in ("correlation", "inner_product"):
        raise ValueError(f"unknown similarity metric {metric!r}")
    order = list(range(models)) if order is None else list(order)
    result: Matching = {}
    for groups in tie_sets(spec):
        for g in groups:
            if g.name not in stats:
                raise ValueError(f"group {g.name} has no activation statistics (no site where its "
                                 "activations can be read)")
        sim = {g.name: {(i, j): _pair_scores(stats[g.name], metric, i, j)
                        for i in range(models) for j in range(models) if i != j}
               for g in groups}
        first = order[0]
        perms = {k: {g.name: torch.arange(g.size) for g in groups} for k in range(models)}
        for k in order[1:]:  # start: every model matched to the first one
            perms[k] = assign({g.name: sim[g.name][(first, k)] for g in groups}, groups)
        for _ in range(max_rounds):
            changed = False
            for k in order:
                scores = {g.name: sum(sim[g.name][(j, k)][perms[j][g.name]]
                                      for j in range(models) if j != k) for g in groups}
                new = assign(scores, groups)
                if any(not torch.equal(new[n], perms[k][n]) for n in new):
                    if _total(sim, perms, groups, models, k, new) > \
                            _total(sim, perms, groups, models, k, perms[k]) + 1e-12:
                        perms[k] = new
                        changed = True
            if not changed:
                break
        for g in groups:
            frame = torch.argsort(perms[0][g.name])  # cluster order: model 1's units
            p = [perms[k][g.name][frame] for k in range(models)]
            pair_sims = [sim[g.name][(i, j)][p[i], p[j]] for i in range(models)
                         for j in range(i + 1, models)]
            result[g.name] = GroupMatch(p[1], torch.stack(pair_sims).mean(0).double().cpu(),
                                        tuple(p[2:]))
    return result


def _total(sim: dict, perms: dict, groups: list[Group], models: int, k: int,
           perm_k: dict[str, torch.Tensor]) -> float:
    """The summed similarity of model k with the others when k takes ``perm_k``."""
    total = 0.0
    for g in groups:
        for j in range(models):
            if j != k:
                total += float(sim[g.name][(j, k)][perms[j][g.name], perm_k[g.name]].sum())
    return total
