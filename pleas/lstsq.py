"""Closed-form least squares for every Conv2d/Linear of the widened model (the heart of PLeaS).

Each layer of the merged model is fitted so that, on data, it maps the merged ensemble of the
ORIGINAL models' layer inputs, x~ = [avg(merged) | A-only | B-only], to the merged ensemble of
their layer outputs, y~ = [avg(merged) | A-only | B-only] (pre-BatchNorm).  Both are linear in
the stacked input u = [x_A; x_B; 1] (im2col patches for a conv), so one float64 second-moment
matrix G = sum u u^T per layer, from ONE data pass, serves every width and every choice of
merged units: a budget sweep costs only solves.

Structural zeros are kept exactly by solving each output block on its allowed input columns
(merged outputs: all; A-only outputs: merged + A-only; B-only: merged + B-only).  The ridge term
pulls towards the plain partial merge W0 rather than towards zero, lambda scaled to the trace:
where an exact fit exists (width 2, a model merged with a permuted copy of itself) it is
returned unchanged.  Solves use Cholesky (lstsq is an order of magnitude slower on CPU).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import to_dense
from .capture import Point
from .plan import GroupPlan, Plan, shared_plan
from .spec import Layer, PermSpec
from .sums import add_term

GRAM_ROWS = 4096  # samples per product in the activations' dtype (closed-form Grams)


def fittable_layers(spec: PermSpec, model: nn.Module) -> list[Layer]:
    """Layers least squares handles: Conv2d (zero padding; dense, grouped or depthwise) and
    Linear with plain axes.  Grouped and depthwise convs are solved block by block."""
    out = []
    for layer in spec.layers:
        mod = model.get_submodule(layer.module)
        if layer.out_group is None:
            continue
        if isinstance(mod, nn.Conv2d):
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                continue
            if mod.groups > 1:
                out.append(layer)
                continue
        elif not isinstance(mod, nn.Linear):
            continue
        if layer.depthwise or layer.in_group is None:
            continue
        out.append(layer)
    return out


def is_grouped(mod: nn.Module) -> bool:
    """A grouped or depthwise conv: its weight stores the diagonal blocks only."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1


def padded_channels_last(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``x`` (N, C, H, W) zero-padded by ``ph``/``pw`` on each side, as a contiguous
    (N, H + 2ph, W + 2pw, C) tensor.  Why: one copy into a zeroed buffer instead of padding
    (a copy) and then permuting (a second copy); about 2-3x faster on the demo's feature maps."""
    n, c, h, w = x.shape
    if not (ph or pw):
        return x.permute(0, 2, 3, 1).contiguous()
    out = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
    out[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    return out


def conv_patches(mod: nn.Conv2d, x: torch.Tensor, index: torch.Tensor | None = None,
                 tap_major: bool = False) -> torch.Tensor:
    """im2col rows for the output positions ``index`` (flat over N*Ho*Wo; None: all of them).

    Columns are ordered like ``weight.flatten(1)`` (channel-major: same values as F.unfold,
    which is an order of magnitude slower on CPU), or with ``tap_major`` tap by tap (all
    channels of the first kernel tap, then the next: see :func:`tap_major_order`), which is
    how the rows are gathered, so that order costs no transposing copy (the closed-form Gram
    pass takes them so and reorders its Gram once at the end).
    Sampled patches: the padded input is copied once to channels-last rows, and each tap of
    each sampled position is one contiguous row of it (one ``index_select``: 4-5x faster than
    advanced indexing into a strided unfold view, measured on the resnet20 stages).  All
    positions: the taps are strided windows of the channels-last input stacked along a new
    dim (3.5x faster than stacking channels-first windows and permuting, at the 7x7 stage with
    every position taken: ``--positions 0``, or a map with no more positions than
    :func:`layer_positions` samples).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    xcl = padded_channels_last(x, ph, pw)
    n, h, w, c = xcl.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if index is None:  # every position: each tap a strided window of the channels-last input
        taps = [xcl[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        return torch.stack(taps, -2 if tap_major else -1).reshape(n * ho * wo, c * kh * kw)
    rows = xcl.view(n * h * w, c)
    img, rem = index // (ho * wo), index % (ho * wo)
    corner = img * (h * w) + (rem // wo) * (sh * w) + (rem % wo) * sw
    taps = torch.tensor([i * dh * w + j * dw for i in range(kh) for j in range(kw)],
                        device=index.device)
    picked = rows.index_select(0, (corner[:, None] + taps[None, :]).reshape(-1))
    if tap_major:
        return picked.view(index.numel(), kh * kw * c)
    return picked.view(index.numel(), kh * kw, c).transpose(1, 2).reshape(index.numel(),
                                                                          c * kh * kw)


def tap_major_order(mod: nn.Module) -> torch.Tensor | None:
    """Where each column of ``weight.flatten(1)`` sits in a tap-major row of
    :func:`conv_patches` (``rows_tap[:, order]`` are the channel-major rows); None where the
    two orders are the same (a Linear, a 1x1 conv)."""
    if not isinstance(mod, nn.Conv2d):
        return None
    taps = mod.kernel_size[0] * mod.kernel_size[1]
    if taps == 1:
        return None
    col = torch.arange(mod.in_channels * taps)  # channel-major: channel * taps + tap
    return (col % taps) * mod.in_channels + col // taps


def output_positions(mod: nn.Module, x: torch.Tensor) -> int:
    """Rows one input tensor contributes: output positions (conv) or tokens (linear)."""
    if isinstance(mod, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (mod.kernel_size, mod.stride, mod.padding,
                                                  mod.dilation)
        h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        return x.shape[0] * ((h - dh * (kh - 1) - 1) // sh + 1) * ((w - dw * (kw - 1) - 1) // sw + 1)
    return x.numel() // x.shape[-1]


def layer_rows(mod: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None,
               tap_major: bool = False) -> torch.Tensor:
    """A layer's input as rows of its weight's input space (im2col patches for a conv; with
    ``tap_major`` in :func:`conv_patches`'s tap-major column order)."""
    if isinstance(mod, nn.Conv2d):
        return conv_patches(mod, x, index, tap_major)
    rows = x.reshape(-1, x.shape[-1])
    return rows if index is None else rows[index]


SYMMETRIC_SPLIT = 256  # Gram blocks at least this wide are split (their mirror not computed)


def add_gram(acc: torch.Tensor, x: torch.Tensor, mirror: bool = True) -> None:
    """``acc += x^T x`` for ``x`` (n, k), computing only the blocks on and above the diagonal.

    Why: these products are most of the cost of the Gram pass and of the sweep's moments, and
    x^T x is symmetric; splitting the columns in halves recursively and mirroring each
    off-diagonal block does about half the work of one full product (torch offers no symmetric
    rank-k update).  Products in ``x``'s dtype, added to ``acc`` (float64 for sums); the
    result is exactly symmetric (each small diagonal block is symmetrised, since BLAS need not
    return x^T x symmetric to the last bit).  ``mirror=False`` adds the upper triangle only
    (what lies below it is left unspecified: :func:`symmetric_from_upper` completes the sum
    once, instead of once per term).
    """
    k = x.shape[1]
    if k < SYMMETRIC_SPLIT:
        p = x.T @ x
        if mirror:
            acc += (torch.triu(p) + torch.triu(p, 1).T).to(acc.dtype)
        else:
            acc += p.to(acc.dtype)
        return
    add_gram_blocks(acc, [x[:, :k // 2], x[:, k // 2:]], mirror)


def add_gram_blocks(acc: torch.Tensor, parts: list[torch.Tensor], mirror: bool = True) -> None:
    """``acc += u^T u`` for ``u = [parts[0] | parts[1] | ...]`` (same rows), block by block:
    each part's own Gram by :func:`add_gram`, each pair's cross block once and mirrored (with
    ``mirror=False``: the upper triangle only, as in :func:`add_gram`).  Why: concatenating the
    models' im2col rows first cost a sixth of the demo's Gram pass."""
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.shape[1])
    for i, p in enumerate(parts):
        a0, a1 = starts[i], starts[i + 1]
        add_gram(acc[a0:a1, a0:a1], p, mirror)
        for j in range(i + 1, len(parts)):
            b0, b1 = starts[j], starts[j + 1]
            off = (p.T @ parts[j]).to(acc.dtype)
            acc[a0:a1, b0:b1] += off
            if mirror:
                acc[b0:b1, a0:a1] += off.T


def symmetric_from_upper(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``acc``'s."""
    return torch.triu(acc) + torch.triu(acc, 1).T


class GramStats:
    """Consumer of :func:`pleas.capture.run_models`: G = sum u u^T, u = [x_A; x_B; 1] (K
    models: [x_1; ...; x_K; 1]), per layer.

    ``positions`` samples that many output positions (or tokens) per image and layer, the same
    ones for A and B, seeded per (layer, batch); None uses every position.  Products are in
    the activations' dtype over chunks of ``GRAM_ROWS`` samples, summed in float64 (a float64
    product of every sample cost 4x more); the symmetric blocks are computed once
    (:func:`add_gram`).  The sequential fit centres each chunk first (:mod:`pleas.sweep`).
    """

    def __init__(self, spec: PermSpec, model_a: nn.Module, device="cpu",
                 positions: int | None = 64, seed: int = 0, collect: bool = True):
        self.layers = fittable_layers(spec, model_a)
        self.modules = {l.module: model_a.get_submodule(l.module) for l in self.layers}
        # collect=False: only the layer list and settings (sequential fits gather their own)
        self.points: set[Point] = {(l.module, "in") for l in self.layers} if collect else set()
        # per layer, the sums as gathered: upper triangle only, conv columns tap-major
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._gram: dict[str, torch.Tensor] | None = None
        self.device = device
        self.positions = positions
        self.seed = seed

    @property
    def gram(self) -> dict[str, torch.Tensor]:
        """G per layer: symmetric, float64, columns ordered like ``weight.flatten(1)`` (per
        model, then the constant).  Completed from :attr:`sums` once, on first reading after
        the last update: mirroring and reordering once per layer instead of transposing
        every term (measured on the demo pair: 0.98 of the Gram pass's time, pair by pair,
        a gain inside the spread of single runs)."""
        if self._gram is None:
            self._gram = {k: self._completed(k, s) for k, s in self.sums.items()}
        return self._gram

    def _completed(self, module: str, sums: torch.Tensor) -> torch.Tensor:
        g = symmetric_from_upper(sums)
        order = tap_major_order(self.modules[module])
        if order is None:
            return g
        k = order.numel()
        models = (g.shape[0] - 1) // k
        full = torch.cat([order + m * k for m in range(models)] + [torch.tensor([models * k])])
        full = full.to(g.device)
        return g.index_select(0, full).index_select(1, full)

    def reduce(self, reduce) -> None:
        """Sum the Grams over processes (pleas.distributed): exact sums, so in any order."""
        for k in self.sums:
            self.sums[k] = reduce(self.sums[k])
            self.count[k] = int(reduce(torch.tensor(float(self.count[k]), dtype=torch.float64)))
        self._gram = None

    def update(self, acts: list[dict], batch_id: int = 0) -> None:
        if not self.points:
            return
        self._gram = None
        for li, layer in enumerate(self.layers):
            mod = self.modules[layer.module]
            xs = [a[(layer.module, "in")] for a in acts]
            index = sample_index(mod, xs[0], self.positions,
                                 position_generator(self.seed, li, batch_id))
            rows = [layer_rows(mod, x, index, tap_major=True) for x in xs]
            k = rows[0].shape[1]
            u_dim = len(rows) * k + 1
            g = self.sums.get(layer.module)
            if g is None:
                g = self.sums[layer.module] = torch.zeros(u_dim, u_dim, dtype=torch.float64,
                                                          device=self.device)
                self.count[layer.module] = 0
            for s in range(0, rows[0].shape[0], GRAM_ROWS):
                parts = [r[s:s + GRAM_ROWS].to(self.device) for r in rows]
                # a float32 term holds float32 products exactly, and add_term rounds it in
                # place before its one float64 copy: the same sums as a float64 term, bit for bit
                wide = torch.float32 if parts[0].dtype == torch.float32 else torch.float64
                term = torch.zeros(g.shape, dtype=wide, device=g.device)
                # [x_1 .. x_K] [x_1 .. x_K]^T, the upper triangle (the lower: see ``gram``)
                add_gram_blocks(term[:-1, :-1], parts, mirror=False)
                term[:-1, -1] = torch.cat([p.sum(0) for p in parts])  # in x's dtype
                term[-1, -1] = parts[0].shape[0]
                add_term(g, term)  # onto a grid: added exactly, in any order (pleas.sums)
            self.count[layer.module] += rows[0].shape[0]


@dataclass(frozen=True)
class FitResult:
    module: str
    error_before: float  # mean squared error of the plain partial merge, per output and sample
    error_after: float


def composite_plan(layer: Layer, plan: Plan) -> GroupPlan:
    """The plan of a layer's output rows; rows made of slices of several groups are chained."""
    if not layer.out_parts:
        return plan[layer.out_group]
    parts = [plan[name] for name, _ in layer.out_parts]
    offsets = [offset for _, offset in layer.out_parts]
    return GroupPlan(*(torch.cat([torch.where(p.index[m] >= 0, p.index[m] + off, -1)
                                  for p, off in zip(parts, offsets)])
                       for m in range(parts[0].models)))


def model_columns(p: GroupPlan, kk: int, u_one: int, has_bias: bool, u_dim: int):
    """For every new input column, its source column in the stacked input u = [x_1; ...; x_K;
    1] and weight, per model, and its kind: 0 merged, k + 1 kept from model k, K + 1 the bias.

    Returns (indexes, weights, kinds): one index and one weight vector per model."""
    pos = torch.arange(kk)
    index = [(m * u_one + i.clamp_min(0)[:, None] * kk + pos).flatten()
             for m, i in enumerate(p.index)]
    weight = [w.repeat_interleave(kk) for w in p.weights()]
    kind = p.kinds().repeat_interleave(kk)
    if has_bias:
        index = [torch.cat([i, torch.tensor([u_dim - 1])]) for i in index]
        weight = [torch.cat([w, torch.full((1,), float(m == 0), dtype=torch.float64)])
                  for m, w in enumerate(weight)]
        kind = torch.cat([kind, torch.tensor([p.models + 1])])
    return index, weight, kind


def _targets(p: GroupPlan, w_mats: list[torch.Tensor], biases: list, u_dim: int):
    """T with y~ = T u: merged rows average the models' outputs, kept rows copy their model's."""
    alphas = p.weights()
    u_one = w_mats[0].shape[1]
    t = torch.zeros(p.size, u_dim, dtype=torch.float64)
    for m, (alpha, w, idx) in enumerate(zip(alphas, w_mats, p.index)):
        t[:, m * u_one:(m + 1) * u_one] = alpha[:, None] * w[idx.clamp_min(0)]
    if biases[0] is not None:
        bias = alphas[0] * biases[0][p.index[0].clamp_min(0)]
        for alpha, b, idx in zip(alphas[1:], biases[1:], p.index[1:]):
            bias = bias + alpha * b[idx.clamp_min(0)]
        t[:, -1] = bias
    return t


def _layer_targets(layer: Layer, plan: Plan, states: list[dict], u_dim: int):
    """(T, kk, u_one, has_bias, output plan) of one layer: y~ = T u in the stacked input u."""
    ws = [st[layer.weight].double().cpu() for st in states]
    kk = ws[0][0, 0].numel()
    mats = [w.reshape(w.shape[0], -1) for w in ws]
    has_bias = layer.bias is not None
    biases = [st[layer.bias].double().cpu() if has_bias else None for st in states]
    p_out = composite_plan(layer, plan)
    return _targets(p_out, mats, biases, u_dim), kk, mats[0].shape[1], has_bias, p_out


def _initial(layer: Layer, widened: dict) -> torch.Tensor:
    """The plain partial merge W0 as a (rows, columns [+ bias]) matrix."""
    w = widened[layer.weight].double().cpu()
    w0 = w.reshape(w.shape[0], -1)
    if layer.bias is not None:
        w0 = torch.cat([w0, widened[layer.bias].double().cpu()[:, None]], 1)
    return w0


def _store(layer: Layer, w: torch.Tensor, widened: dict) -> None:
    target = widened[layer.weight]
    wt = w[:, :-1] if layer.bias is not None else w
    widened[layer.weight] = wt.reshape(target.shape).to(target.dtype)
    if layer.bias is not None:
        widened[layer.bias] = w[:, -1].to(widened[layer.bias].dtype)


def solve_blocks(xx: torch.Tensor, yx: torch.Tensor, yy: float, w0: torch.Tensor,
                 row_kind: torch.Tensor, col_kind: torch.Tensor, ridge: float,
                 count: int, models: int = 2) -> tuple[torch.Tensor, float, float]:
    """Minimise E||W x - y||^2 + lam ||W - W0||^2 block by block with structural zeros.

    ``xx`` = sum x x^T, ``yx`` = sum y x^T, ``yy`` = sum |y|^2 over ``count`` samples.  Merged
    rows (kind 0) read every column, rows kept from model k (kind k + 1) the merged columns,
    model k's kept ones and the bias (kind K + 1); two models: A-only rows (1) merged + A-only
    + bias columns, B-only rows (2) merged + B-only + bias.  Returns W and the mean squared
    error of W0 and of W.
    """
    bias = models + 1
    allowed = {0: tuple(range(models + 2)),
               **{k: (0, k, bias) for k in range(1, models + 1)}}
    w = torch.zeros_like(w0)
    for kind, cols_ok in allowed.items():
        rows = torch.nonzero(row_kind == kind).flatten()
        if rows.numel() == 0:
            continue
        cols = torch.nonzero(torch.isin(col_kind, torch.tensor(cols_ok))).flatten()
        a_mat = xx[cols][:, cols]
        lam = ridge * float(a_mat.diagonal().mean().clamp_min(1e-12))
        a_mat = a_mat + lam * torch.eye(len(cols), dtype=torch.float64)
        rhs = yx[rows][:, cols] + lam * w0[rows][:, cols]
        chol, info = torch.linalg.cholesky_ex(a_mat)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs.T, chol).T
        else:
            sol = torch.linalg.solve(a_mat, rhs.T).T
        w[rows[:, None], cols[None, :]] = sol

    def err(m: torch.Tensor) -> float:
        val = (m @ xx * m).sum() - 2 * (m * yx).sum() + yy
        return float(val) / (max(count, 1) * max(m.shape[0], 1))

    return w, err(w0), err(w)


def _project(g: torch.Tensor, index: list[torch.Tensor], weight: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S G, S G S^T) for the selection S that maps u to the merged layer's input columns."""
    sg = weight[0][:, None] * g[index[0]]
    for i, w in zip(index[1:], weight[1:]):
        sg = sg + w[:, None] * g[i]
    sgs = sg[:, index[0]] * weight[0]
    for i, w in zip(index[1:], weight[1:]):
        sgs = sgs + sg[:, i] * w
    return sg, sgs


def fit_layer(layer: Layer, gram: torch.Tensor, count: int, plan: Plan, states: list[dict],
              widened: dict, ridge: float = 1e-4) -> FitResult:
    """Solve one layer's block-constrained ridge problem; writes the result into ``widened``.

    ``states`` are the original models' state dicts (as many as the plan's models)."""
    g = gram.cpu()
    t, kk, u_one, has_bias, p_out = _layer_targets(layer, plan, states, g.shape[0])
    p_in = plan.get(layer.in_group) or shared_plan(states[0][layer.weight].shape[1],
                                                   len(states))
    index, weight, col_kind = model_columns(p_in, kk, u_one, has_bias, g.shape[0])
    sg, sgs = _project(g, index, weight)
    yy = float(((t @ g) * t).sum())  # only the trace of T G T^T enters the error
    w, before, after = solve_blocks(sgs, t @ sg.T, yy, _initial(layer, widened), p_out.kinds(),
                                    col_kind, ridge, count, len(states))
    _store(layer, w, widened)
    return FitResult(layer.module, before, after)


def fit_layer_grouped(layer: Layer, gram: torch.Tensor, count: int, groups: int, plan: Plan,
                      states: list[dict], widened: dict, ridge: float = 1e-4) -> FitResult:
    """The closed form for a grouped (or depthwise) conv with ``groups`` groups.

    The Gram is over the dense patches, so the problem is the dense one in the block-diagonal
    view (:mod:`pleas.blocks`), solved one block of the widened conv at a time: whole blocks
    merge, so each block is merged, or kept from one model, throughout and reads its own
    input block.
    """
    g = gram.cpu()
    has_bias = layer.bias is not None
    dense = []
    for st in states:
        d = {layer.weight: to_dense(st[layer.weight].double().cpu(), groups)}
        if has_bias:
            d[layer.bias] = st[layer.bias]
        dense.append(d)
    t, kk, u_one, _, _ = _layer_targets(layer, plan, dense, g.shape[0])
    p_in = plan[layer.in_group or layer.out_group]  # a depthwise conv reads its own group
    index, weight, _ = model_columns(p_in, kk, u_one, has_bias, g.shape[0])
    w0 = _initial(layer, widened)
    rows_per = states[0][layer.weight].shape[0] // groups
    per_block = widened[layer.weight][0].numel()  # input columns of one block
    w = torch.empty_like(w0)
    before = after = 0.0
    for start in range(0, w0.shape[0], rows_per):
        rows = slice(start, start + rows_per)
        first = start // rows_per * per_block
        cols = torch.arange(first, first + per_block)
        if has_bias:
            cols = torch.cat([cols, torch.tensor([len(index[0]) - 1])])
        sg, sgs = _project(g, [i[cols] for i in index], [w[cols] for w in weight])
        t_rows = t[rows]
        one_kind = torch.zeros(rows_per, dtype=torch.long), torch.zeros(len(cols), dtype=torch.long)
        w[rows], e0, e1 = solve_blocks(sgs, t_rows @ sg.T, float(((t_rows @ g) * t_rows).sum()),
                                       w0[rows], *one_kind, ridge, count)
        before, after = before + e0 * rows_per, after + e1 * rows_per
    _store(layer, w, widened)
    return FitResult(layer.module, before / w0.shape[0], after / w0.shape[0])


def fit_all(grams: GramStats, plan: Plan, states: list[dict], widened: dict,
            ridge: float = 1e-4, progress: bool = True) -> list[FitResult]:
    """Least-squares fit of every fittable layer (in place on ``widened``), from the original
    models' ``states``."""
    from tqdm.auto import tqdm

    results = []
    for layer in tqdm(grams.layers, desc="least squares", disable=not progress, leave=False):
        mod = grams.modules[layer.module]
        args = (grams.gram[layer.module], grams.count[layer.module])
        if is_grouped(mod):
            results.append(fit_layer_grouped(layer, *args, mod.groups, plan, states, widened,
                                             ridge))
        else:
            results.append(fit_layer(layer, *args, plan, states, widened, ridge))
    return results


def fit_layer_regmean(layer: Layer, gram: torch.Tensor, state_a: dict, state_b: dict,
                      merged: dict, ridge: float = 1e-4, groups: int = 1) -> None:
    """RegMean (Jin et al. 2023) for one layer of an unaligned width-1 merge.

    Minimises ||W x_A - W_A x_A||^2 + ||W x_B - W_B x_B||^2 over the merge data: least squares
    without permutations, from the A-A and B-B blocks of the same second-moment matrix.  A
    grouped conv (``groups`` > 1) is solved group by group on its own input channels.
    """
    g = gram.cpu()
    wa_t, wb_t = state_a[layer.weight].double().cpu(), state_b[layer.weight].double().cpu()
    wa, wb = wa_t.reshape(wa_t.shape[0], -1), wb_t.reshape(wb_t.shape[0], -1)
    per_block, rows_per = wa.shape[1], wa.shape[0] // groups
    u_a = per_block * groups
    has_bias = layer.bias is not None
    if has_bias:
        wa = torch.cat([wa, state_a[layer.bias].double().cpu()[:, None]], 1)
        wb = torch.cat([wb, state_b[layer.bias].double().cpu()[:, None]], 1)
    w = torch.empty_like(wa)
    bias_col = torch.tensor([g.shape[0] - 1] if has_bias else [], dtype=torch.long)
    for j in range(groups):
        cols = torch.arange(j * per_block, (j + 1) * per_block)
        ia, ib = torch.cat([cols, bias_col]), torch.cat([u_a + cols, bias_col])
        ga, gb = g[ia][:, ia], g[ib][:, ib]
        rows = slice(j * rows_per, (j + 1) * rows_per)
        a_mat = ga + gb
        lam = ridge * float(a_mat.diagonal().mean().clamp_min(1e-12))
        a_mat = a_mat + lam * torch.eye(len(a_mat), dtype=torch.float64)
        w[rows] = torch.linalg.solve(a_mat, (wa[rows] @ ga + wb[rows] @ gb).T).T
    target = merged[layer.weight]
    merged[layer.weight] = (w[:, :per_block] if has_bias else w).reshape(
        target.shape).to(target.dtype)
    if has_bias:
        merged[layer.bias] = w[:, -1].to(merged[layer.bias].dtype)


def position_generator(seed: int, layer_index: int, batch_index: int) -> torch.Generator:
    """The generator of one (layer, batch) of a sequential fit: independent of the order and
    of the process the batch is handled in (sharded fits equal single-process ones)."""
    return torch.Generator().manual_seed(((seed * 1_000_003) + layer_index) * 1_000_033
                                         + batch_index)


GRAM_COST = 3.0  # a layer's sampled Gram products cost at most this x its own forward pass
MIN_POSITIONS = 16  # ... but never fewer positions per image than this (or all there are)


def layer_positions(mod: nn.Module, per_image: int, positions: int | None) -> int | None:
    """Positions per image the least-squares moments of ``mod`` sample: ``positions``, fewer
    where the layer's Gram would cost more than ``GRAM_COST`` times the layer's own forward
    pass over the image, never fewer than ``MIN_POSITIONS``; None (every position) when
    ``positions`` is None or the layer has no more positions than that.

    Why: a sampled row of a layer whose patches are k wide costs k^2 multiply-adds in the
    Gram against k * c_out for one output position of the forward pass (the same ratio block
    by block for a grouped conv), so with a fixed count per image the last stage of a CNN
    (3 x 3 x 64 patches at 7 x 7 in the demo ResNet-20: all 49 positions) took about 70% of
    the Gram products and dominated both the closed-form Gram pass and the sequential fit.
    Capped at 3x, that stage samples 16 of its 49 positions; on the demo pair the merged
    accuracy at widths 1-1.75 moved by at most 0.15 points (sequential PLeaS; 0.20 with the
    closed form), within the spread of two sampling seeds (``experiments/positions.py``), and
    every other stage there keeps its 64.
    """
    if positions is None:
        return None
    if isinstance(mod, nn.Conv2d):
        k, c_out = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1], mod.out_channels
    elif isinstance(mod, nn.Linear):
        k, c_out = mod.in_features, mod.out_features
    else:
        k = c_out = 1
    affordable = GRAM_COST * per_image * c_out / k
    take = int(min(positions, max(MIN_POSITIONS, affordable)))
    return None if take >= per_image else take


def sample_index(mod: nn.Module, x: torch.Tensor, positions: int | None,
                 gen: torch.Generator) -> torch.Tensor | None:
    """Random output positions per image (flat indices; how many: :func:`layer_positions`),
    None for all."""
    per_image = output_positions(mod, x) // x.shape[0]
    positions = layer_positions(mod, per_image, positions)
    if positions is None:
        return None
    # the smallest ``positions`` of uniform keys, in order: argsort(1)[:, :positions] without
    # sorting all of them (a partial selection; a sixth of the sequential fit's overhead)
    keys = torch.rand(x.shape[0], per_image, generator=gen)
    pick = keys.topk(positions, 1, largest=False, sorted=True).indices
    return (pick + torch.arange(x.shape[0])[:, None] * per_image).flatten().to(x.device)


def _layer_inputs(net: nn.Module, model_a: nn.Module, model_b: nn.Module, path: str,
                  batches: list, device):
    """Per batch, the input of layer ``path`` in A, in B and in the merged net; every forward
    pass is stopped at the layer (the rest is not needed)."""
    acts_m, acts_a = {}, {}
    same = model_b is model_a  # one model merged with itself: one set of hooks
    acts_b = acts_a if same else {}
    originals = (model_a,) if same else (model_a, model_b)
    with _inputs_then_stop(net, path, acts_m), _inputs_then_stop(model_a, path, acts_a), \
            (nullcontext() if same else _inputs_then_stop(model_b, path, acts_b)):
        for x in batches:
            x = x.to(device)
            for model in (net, *originals):
                try:
                    model(x)
                except _Stop:
                    pass
            yield acts_a[(path, "in")], acts_b[(path, "in")], acts_m[(path, "in")]


@dataclass
class _Moments:
    """Sums over the fitted samples: x x^T, y x^T, |y|^2 and x (x = merged net's input rows,
    y = targets), batched over the blocks of a grouped conv (one block for a dense layer)."""

    xx: torch.Tensor
    yx: torch.Tensor
    sum_x: torch.Tensor
    yy: float = 0.0
    count: int = 0

    def add(self, xh: torch.Tensor, y: torch.Tensor) -> None:
        """``xh`` (n, blocks, k), ``y`` (n, blocks, rows per block)."""
        self.xx += torch.einsum("nbk,nbl->bkl", xh, xh)
        self.yx += torch.einsum("nbr,nbk->brk", y, xh)
        self.sum_x += xh.sum(0)
        self.yy += float((y * y).sum())
        self.count += xh.shape[0]


def _collect_dense(layer: Layer, mod_a: nn.Module, mod_m: nn.Module, inputs, plan: Plan,
                   state_a: dict, state_b: dict, positions, gens):
    """Moments of a dense conv/linear: targets T u from the originals' stacked inputs."""
    mom = t = None
    for (xa, xb, xm), gen in zip(inputs, gens):
        index = sample_index(mod_a, xa, positions, gen)
        ra = layer_rows(mod_a, xa, index).double().cpu()
        rb = layer_rows(mod_a, xb, index).double().cpu()
        rm = layer_rows(mod_m, xm, index).double().cpu()
        ones = torch.ones(ra.shape[0], 1, dtype=torch.float64)
        u = torch.cat([ra, rb, ones], 1)
        xh = torch.cat([rm, ones], 1) if layer.bias is not None else rm
        if mom is None:
            t, kk, u_a, has_bias, p_out = _layer_targets(layer, plan, [state_a, state_b],
                                                           u.shape[1])
            k = xh.shape[1]
            mom = _Moments(torch.zeros(1, k, k, dtype=torch.float64),
                           torch.zeros(1, t.shape[0], k, dtype=torch.float64),
                           torch.zeros(1, k, dtype=torch.float64))
        mom.add(xh[:, None], (u @ t.T)[:, None])
    p_in = plan.get(layer.in_group) or shared_plan(state_a[layer.weight].shape[1])
    col_kind = model_columns(p_in, kk, u_a, layer.bias is not None, u.shape[1])[2]
    return mom, p_out.kinds(), col_kind


def _collect_grouped(layer: Layer, mod_a: nn.Conv2d, mod_m: nn.Conv2d, inputs, plan: Plan,
                     state_a: dict, state_b: dict, positions, gens) -> _Moments:
    """Moments of a grouped (or depthwise) conv, block by block.

    Whole blocks merge (the spec ties a grouped conv's input and output blocks), so every
    block of the widened conv is merged, A-only or B-only throughout and reads only its own
    input block: one small unconstrained problem per block, no structural zeros inside.
    Targets are the originals' outputs, merged as the output plan says.
    """
    p_out = plan[layer.out_group]
    alpha_a, alpha_b = p_out.weights()
    ia, ib = p_out.a_index.clamp_min(0), p_out.b_index.clamp_min(0)
    wa, wb = state_a[layer.weight].double().cpu(), state_b[layer.weight].double().cpu()
    nb_orig, nb = mod_a.groups, mod_m.groups
    r, ck = wa.shape[0] // nb_orig, wa[0].numel()
    wa_b, wb_b = wa.reshape(nb_orig, r, ck), wb.reshape(nb_orig, r, ck)
    has_bias = layer.bias is not None
    k = ck + int(has_bias)
    f64 = dict(dtype=torch.float64)
    mom = _Moments(torch.zeros(nb, k, k, **f64), torch.zeros(nb, r, k, **f64),
                   torch.zeros(nb, k, **f64))
    for (xa, xb, xm), gen in zip(inputs, gens):
        index = sample_index(mod_a, xa, positions, gen)
        ra = layer_rows(mod_a, xa, index).double().cpu().reshape(-1, nb_orig, ck)
        rb = layer_rows(mod_a, xb, index).double().cpu().reshape(-1, nb_orig, ck)
        ya = torch.einsum("nbk,brk->nbr", ra, wa_b).flatten(1)
        yb = torch.einsum("nbk,brk->nbr", rb, wb_b).flatten(1)
        if has_bias:
            ya = ya + state_a[layer.bias].double().cpu()
            yb = yb + state_b[layer.bias].double().cpu()
        y = ya[:, ia] * alpha_a + yb[:, ib] * alpha_b
        xh = layer_rows(mod_m, xm, index).double().cpu().reshape(-1, nb, ck)
        if has_bias:
            xh = torch.cat([xh, torch.ones(xh.shape[0], nb, 1, dtype=torch.float64)], 2)
        mom.add(xh, y.reshape(-1, nb, r))
    return mom


def fit_grouped_block(mom: _Moments, w0: torch.Tensor, ridge: float
                      ) -> tuple[torch.Tensor, float, float]:
    """Ridge toward W0, one block at a time (batched Cholesky): W_b = (YX_b + lam W0_b)
    (XX_b + lam I)^-1, lam scaled to each block's trace.  ``w0`` is (blocks, rows, k).
    Returns W and the mean squared error of W0 and of W."""
    eye = torch.eye(mom.xx.shape[-1], dtype=torch.float64)
    lam = ridge * mom.xx.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    a_mat = mom.xx + lam[:, None, None] * eye
    rhs = mom.yx + lam[:, None, None] * w0
    chol, info = torch.linalg.cholesky_ex(a_mat)
    if int(info.abs().sum()) == 0:
        w = torch.cholesky_solve(rhs.transpose(1, 2), chol).transpose(1, 2)
    else:
        w = torch.linalg.solve(a_mat, rhs.transpose(1, 2)).transpose(1, 2)

    def err(m: torch.Tensor) -> float:
        val = (m @ mom.xx * m).sum() - 2 * (m * mom.yx).sum() + mom.yy
        return float(val) / (max(mom.count, 1) * max(m.shape[0] * m.shape[1], 1))

    return w, err(w0), err(w)


@torch.no_grad()
def fit_sequential_per_layer(layers: list[Layer], net: nn.Module, model_a: nn.Module,
                             model_b: nn.Module, batches: list, plan: Plan, state_a: dict,
                             state_b: dict, device="cpu", ridge: float = 1e-4,
                             positions: int | None = 64, seed: int = 0, progress: bool = True,
                             update_norms: bool = True) -> list[FitResult]:
    """Sequential least squares, the slow way: the REFERENCE for :func:`pleas.sweep.
    fit_sequential` (tests compare the two), no longer used by the pipeline.

    Layers are fitted in graph order; layer l's inputs x^ come from the merged network (eval
    mode) whose earlier layers are already fitted; its targets are still the originals' outputs
    T u.  One pass over the data per layer, each stopped at the layer (the cost grows with the
    square of the depth).  Products and sums in float64.  With ``update_norms``
    the BatchNorm reading a fitted layer gets its exact statistics right away (over every
    position of all batches, :func:`_exact_batchnorm`), so later layers see the inputs the
    finished model gives them; leave it off when nothing is merged (the originals' statistics
    are exact).
    Grouped and depthwise convs are fitted block by block (:func:`fit_grouped_block`).
    """
    from tqdm.auto import tqdm

    modules = dict(net.named_modules())
    results = []
    for li, layer in enumerate(tqdm(layers, desc="least squares (per layer)",
                                    disable=not progress, leave=False)):
        gens = [position_generator(seed, li, b) for b in range(len(batches))]
        mod_a, mod = model_a.get_submodule(layer.module), modules[layer.module]
        net.eval()
        inputs = _layer_inputs(net, model_a, model_b, layer.module, batches, device)
        current = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        w_now = current[layer.weight].double()
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            mom = _collect_grouped(layer, mod_a, mod, inputs, plan, state_a, state_b,
                                   positions, gens)
            w0 = w_now.reshape(mod.groups, -1, w_now[0].numel())
            if layer.bias is not None:
                w0 = torch.cat([w0, current[layer.bias].double().reshape(mod.groups, -1, 1)], 2)
            w, before, after = fit_grouped_block(mom, w0, ridge)
            w = w.reshape(w_now.shape[0], -1)  # rows x (block columns [+ bias])
        else:
            mom, row_kind, col_kind = _collect_dense(layer, mod_a, mod, inputs, plan, state_a,
                                                     state_b, positions, gens)
            w, before, after = solve_blocks(mom.xx[0], mom.yx[0], mom.yy, _initial(layer, current),
                                            row_kind, col_kind, ridge, mom.count)
        _store(layer, w, current)
        mod.weight.copy_(current[layer.weight].to(mod.weight.device))
        if layer.bias is not None:
            mod.bias.copy_(current[layer.bias].to(mod.bias.device))
        results.append(FitResult(layer.module, before, after))
        if update_norms and layer.norm:
            _exact_batchnorm(net, layer.norm, batches, device)
    net.eval()
    return results


def _exact_batchnorm(net: nn.Module, path: str, batches: list, device) -> None:
    """BatchNorm ``path`` set to the mean and unbiased variance of its input over every
    position of all batches, computed in float64 from the inputs themselves (one forward per
    batch, stopped at the BN: the reference's way, independent of the sweep's sums; float64
    sums of x and x^2 per batch, so no copy of all inputs is held)."""
    n, s1, s2 = 0, 0.0, 0.0
    for x in batches:
        store: dict = {}
        with _inputs_then_stop(net, path, store):
            try:
                net(x.to(device))
            except _Stop:
                pass
        x = store[(path, "in")].double().transpose(0, 1).flatten(1)  # (channels, samples)
        n, s1, s2 = n + x.shape[1], s1 + x.sum(1), s2 + (x * x).sum(1)
    mean = s1 / n
    bn = net.get_submodule(path)
    bn.running_mean.copy_(mean.to(bn.running_mean))
    bn.running_var.copy_(((s2 - n * mean * mean) / max(n - 1, 1)).to(bn.running_var))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been read."""


@contextmanager
def _inputs_then_stop(model: nn.Module, path: str, store: dict):
    def hook(mod, args):
        store[(path, "in")] = args[0].detach()
        raise _Stop

    handle = model.get_submodule(path).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
