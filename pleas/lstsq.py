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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capture import Point
from .plan import GroupPlan, Plan, shared_plan
from .spec import Layer, PermSpec

ROW_CHUNK = 1 << 15


def fittable_layers(spec: PermSpec, model: nn.Module) -> list[Layer]:
    """Layers the closed form handles: dense Conv2d (zero padding) and Linear with plain axes."""
    out = []
    for layer in spec.layers:
        mod = model.get_submodule(layer.module)
        if layer.depthwise or layer.in_group is None or layer.out_group is None:
            continue
        if isinstance(mod, nn.Conv2d) and (isinstance(mod.padding, str)
                                           or mod.padding_mode != "zeros" or mod.groups != 1):
            continue
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        out.append(layer)
    return out


def conv_patches(mod: nn.Conv2d, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """im2col rows for the output positions ``index`` (flat over N*Ho*Wo; None: all of them).

    Columns are ordered like ``weight.flatten(1)``; same values as F.unfold, which is an order
    of magnitude slower on CPU, and only the sampled patches are ever materialised.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if index is None:
        taps = [x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        return torch.stack(taps, 2).permute(0, 3, 4, 1, 2).reshape(n * ho * wo, c * kh * kw)
    img, rem = index // (ho * wo), index % (ho * wo)
    rows, cols = (rem // wo) * sh, (rem % wo) * sw
    taps = [x[img, :, rows + i * dh, cols + j * dw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 2).reshape(index.numel(), c * kh * kw)


def output_positions(mod: nn.Module, x: torch.Tensor) -> int:
    """Rows one input tensor contributes: output positions (conv) or tokens (linear)."""
    if isinstance(mod, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (mod.kernel_size, mod.stride, mod.padding,
                                                  mod.dilation)
        h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        return x.shape[0] * ((h - dh * (kh - 1) - 1) // sh + 1) * ((w - dw * (kw - 1) - 1) // sw + 1)
    return x.numel() // x.shape[-1]


def layer_rows(mod: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's input as rows of its weight's input space (im2col patches for a conv)."""
    if isinstance(mod, nn.Conv2d):
        return conv_patches(mod, x, index)
    rows = x.reshape(-1, x.shape[-1])
    return rows if index is None else rows[index]


class GramStats:
    """Consumer of :func:`pleas.capture.run_pair`: G = sum u u^T, u = [x_A; x_B; 1], per layer.

    ``positions`` samples that many output positions (or tokens) per image and layer, the same
    ones for A and B, seeded; None uses every position.  Each batch's product is float64.
    """

    def __init__(self, spec: PermSpec, model_a: nn.Module, device="cpu",
                 positions: int | None = 64, seed: int = 0):
        self.layers = fittable_layers(spec, model_a)
        self.modules = {l.module: model_a.get_submodule(l.module) for l in self.layers}
        self.points: set[Point] = {(l.module, "in") for l in self.layers}
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.device = device
        self.positions = positions
        self.gen = torch.Generator().manual_seed(seed)

    def _index(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        total = output_positions(mod, x)
        per_image = total // x.shape[0]
        if self.positions is None or per_image <= self.positions:
            return None
        pick = torch.rand(x.shape[0], per_image, generator=self.gen).argsort(1)[:, :self.positions]
        return (pick + torch.arange(x.shape[0])[:, None] * per_image).flatten().to(x.device)

    def update(self, acts_a: dict, acts_b: dict) -> None:
        for layer in self.layers:
            mod = self.modules[layer.module]
            xa, xb = acts_a[(layer.module, "in")], acts_b[(layer.module, "in")]
            index = self._index(mod, xa)
            ra, rb = layer_rows(mod, xa, index), layer_rows(mod, xb, index)
            u_dim = ra.shape[1] + rb.shape[1] + 1
            g = self.gram.get(layer.module)
            if g is None:
                g = self.gram[layer.module] = torch.zeros(u_dim, u_dim, dtype=torch.float64,
                                                          device=self.device)
                self.count[layer.module] = 0
            for s in range(0, ra.shape[0], ROW_CHUNK):
                a = ra[s:s + ROW_CHUNK].to(self.device, torch.float64)
                b = rb[s:s + ROW_CHUNK].to(self.device, torch.float64)
                u = torch.cat([a, b, torch.ones(a.shape[0], 1, dtype=torch.float64,
                                                device=self.device)], 1)
                g.addmm_(u.T, u)
            self.count[layer.module] += ra.shape[0]


@dataclass(frozen=True)
class FitResult:
    module: str
    error_before: float  # mean squared error of the plain partial merge, per output and sample
    error_after: float


def composite_plan(layer: Layer, plan: Plan) -> GroupPlan:
    """The plan of a layer's output rows; rows made of slices of several groups are chained."""
    if not layer.out_parts:
        return plan[layer.out_group]
    ia, ib = [], []
    for name, offset in layer.out_parts:
        p = plan[name]
        ia.append(torch.where(p.a_index >= 0, p.a_index + offset, -1))
        ib.append(torch.where(p.b_index >= 0, p.b_index + offset, -1))
    return GroupPlan(torch.cat(ia), torch.cat(ib))


def _columns(p: GroupPlan, kk: int, u_a: int, has_bias: bool, u_dim: int):
    """Source columns and weights of each new input column; its kind 0 merged, 1 A, 2 B, 3 bias."""
    wa, wb = p.weights()
    pos = torch.arange(kk)
    ia = (p.a_index.clamp_min(0)[:, None] * kk + pos).flatten()
    ib = (u_a + p.b_index.clamp_min(0)[:, None] * kk + pos).flatten()
    wa, wb = wa.repeat_interleave(kk), wb.repeat_interleave(kk)
    kind = torch.where(p.merged, 0, torch.where(p.a_index >= 0, 1, 2)).repeat_interleave(kk)
    if has_bias:
        ia = torch.cat([ia, torch.tensor([u_dim - 1])])
        ib = torch.cat([ib, torch.tensor([u_dim - 1])])
        wa = torch.cat([wa, torch.ones(1, dtype=torch.float64)])
        wb = torch.cat([wb, torch.zeros(1, dtype=torch.float64)])
        kind = torch.cat([kind, torch.tensor([3])])
    return ia, ib, wa, wb, kind


def _targets(p: GroupPlan, wa_mat: torch.Tensor, wb_mat: torch.Tensor, ba, bb, u_dim: int):
    """T with y~ = T u: merged rows average A's and B's outputs, kept rows copy their model's."""
    alpha_a, alpha_b = p.weights()
    u_a = wa_mat.shape[1]
    t = torch.zeros(p.size, u_dim, dtype=torch.float64)
    t[:, :u_a] = alpha_a[:, None] * wa_mat[p.a_index.clamp_min(0)]
    t[:, u_a:2 * u_a] = alpha_b[:, None] * wb_mat[p.b_index.clamp_min(0)]
    if ba is not None:
        t[:, -1] = alpha_a * ba[p.a_index.clamp_min(0)] + alpha_b * bb[p.b_index.clamp_min(0)]
    return t


def fit_layer(layer: Layer, gram: torch.Tensor, count: int, plan: Plan,
              state_a: dict, state_b: dict, widened: dict, ridge: float = 1e-4) -> FitResult:
    """Solve one layer's block-constrained ridge problem; writes the result into ``widened``."""
    g = gram.cpu()
    wa_t, wb_t = state_a[layer.weight].double().cpu(), state_b[layer.weight].double().cpu()
    kk = wa_t[0, 0].numel()
    wa_mat, wb_mat = wa_t.reshape(wa_t.shape[0], -1), wb_t.reshape(wb_t.shape[0], -1)
    has_bias = layer.bias is not None
    ba = state_a[layer.bias].double().cpu() if has_bias else None
    bb = state_b[layer.bias].double().cpu() if has_bias else None
    u_a, u_dim = wa_mat.shape[1], g.shape[0]
    p_out = composite_plan(layer, plan)
    p_in = plan.get(layer.in_group) or shared_plan(wa_t.shape[1])
    ia, ib, ca, cb, col_kind = _columns(p_in, kk, u_a, has_bias, u_dim)
    sg = ca[:, None] * g[ia] + cb[:, None] * g[ib]  # S G
    sgs = sg[:, ia] * ca + sg[:, ib] * cb  # S G S^T
    t = _targets(p_out, wa_mat, wb_mat, ba, bb, u_dim)
    tgs = t @ sg.T  # T G S^T
    w_new = widened[layer.weight]
    w0 = w_new.double().cpu().reshape(w_new.shape[0], -1)
    if has_bias:
        w0 = torch.cat([w0, widened[layer.bias].double().cpu()[:, None]], 1)
    tgt = t @ g @ t.T
    row_kind = torch.where(p_out.merged, 0, torch.where(p_out.a_index >= 0, 1, 2))
    allowed = {0: (0, 1, 2, 3), 1: (0, 1, 3), 2: (0, 2, 3)}
    w = torch.zeros_like(w0)
    for kind, cols_ok in allowed.items():
        rows = torch.nonzero(row_kind == kind).flatten()
        if rows.numel() == 0:
            continue
        cols = torch.nonzero(torch.isin(col_kind, torch.tensor(cols_ok))).flatten()
        a_mat = sgs[cols][:, cols]
        lam = ridge * float(a_mat.diagonal().mean().clamp_min(1e-12))
        a_mat = a_mat + lam * torch.eye(len(cols), dtype=torch.float64)
        rhs = tgs[rows][:, cols] + lam * w0[rows][:, cols]
        chol, info = torch.linalg.cholesky_ex(a_mat)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs.T, chol).T
        else:
            sol = torch.linalg.solve(a_mat, rhs.T).T
        w[rows[:, None], cols[None, :]] = sol

    def err(m: torch.Tensor) -> float:
        # E||m S u - T u||^2 per output and sample
        val = (m @ sgs * m).sum() - 2 * (m * tgs).sum() + tgt.diagonal().sum()
        return float(val) / (count * max(m.shape[0], 1))

    before, after = err(w0), err(w)
    wt = w[:, :-1] if has_bias else w
    widened[layer.weight] = wt.reshape(w_new.shape).to(w_new.dtype)
    if has_bias:
        widened[layer.bias] = w[:, -1].to(widened[layer.bias].dtype)
    return FitResult(layer.module, before, after)


def fit_all(grams: GramStats, plan: Plan, state_a: dict, state_b: dict, widened: dict,
            ridge: float = 1e-4, progress: bool = True) -> list[FitResult]:
    """Least-squares fit of every fittable layer (in place on ``widened``)."""
    from tqdm.auto import tqdm

    results = []
    for layer in tqdm(grams.layers, desc="least squares", disable=not progress, leave=False):
        results.append(fit_layer(layer, grams.gram[layer.module], grams.count[layer.module],
                                 plan, state_a, state_b, widened, ridge))
    return results


def fit_layer_regmean(layer: Layer, gram: torch.Tensor, state_a: dict, state_b: dict,
                      merged: dict, ridge: float = 1e-4) -> None:
    """RegMean (Jin et al. 2023) for one layer of an unaligned width-1 merge.

    Minimises ||W x_A - W_A x_A||^2 + ||W x_B - W_B x_B||^2 over the merge data: least squares
    without permutations, from the A-A and B-B blocks of the same second-moment matrix.
    """
    g = gram.cpu()
    wa_t, wb_t = state_a[layer.weight].double().cpu(), state_b[layer.weight].double().cpu()
    wa, wb = wa_t.reshape(wa_t.shape[0], -1), wb_t.reshape(wb_t.shape[0], -1)
    u_a = wa.shape[1]
    ia = torch.cat([torch.arange(u_a), torch.tensor([g.shape[0] - 1])])
    ib = torch.cat([torch.arange(u_a, 2 * u_a), torch.tensor([g.shape[0] - 1])])
    ga, gb = g[ia][:, ia], g[ib][:, ib]
    if layer.bias is not None:
        wa = torch.cat([wa, state_a[layer.bias].double().cpu()[:, None]], 1)
        wb = torch.cat([wb, state_b[layer.bias].double().cpu()[:, None]], 1)
    else:
        ga, gb = ga[:-1, :-1], gb[:-1, :-1]
    a_mat = ga + gb
    a_mat = a_mat + ridge * float(a_mat.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(a_mat),
                                                                                       dtype=torch.float64)
    w = torch.linalg.solve(a_mat, (wa @ ga + wb @ gb).T).T
    target = merged[layer.weight]
    merged[layer.weight] = (w[:, :u_a] if layer.bias is not None else w).reshape(
        target.shape).to(target.dtype)
    if layer.bias is not None:
        merged[layer.bias] = w[:, -1].to(merged[layer.bias].dtype)
