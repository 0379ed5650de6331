"""Normalisation in a merged model: exact BatchNorm recalibration, and LayerNorm over a partly
merged stream.

**BatchNorm reset** (REPAIR-style).

Averaged or refitted weights change every layer's output distribution, and merged BN networks
collapse to near chance unless their statistics are recomputed.  The running statistics are set
to the exact mean and unbiased variance over ALL merge samples (float64 sums), not an
exponential moving average and not an average of per-batch variances.  Like
``torch.optim.swa_utils.update_bn``, one pass runs the BN layers on batch statistics.

**LayerNorm over a partly merged stream** (any LayerNorm, the ViT's residual stream above
all).  It cannot normalise both models' units as one vector without mixing their statistics.
:class:`MergedLayerNorm` normalises A's view (merged + A-only units) and B's view (merged +
B-only) separately and averages the two on merged units: exact at width 2 (both models side by
side) and for a model merged with a permuted copy of itself; for genuinely merged units it is
an approximation that the least-squares fit of the following Linear layers compensates.
Channel-first layer norms (timm's ``LayerNorm2d`` in ConvNeXt: statistics over the channels of
an NCHW map) are the same with ``dim=1`` (:func:`norm_dim`).
:func:`merged_layernorm_state` adds the per-unit view shares to the widened state, and
:func:`pleas.widen.build_module` swaps such LayerNorms for :class:`MergedLayerNorm`.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .capture import batch_inputs, limited
from .sums import add_term


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batchnorm_sums(x: torch.Tensor) -> torch.Tensor:
    """[count, sum x (C), sum x^2 (C)] over every dim but the channels (dim 1) of one batch of
    a BatchNorm's input, float64.

    Products in ``x``'s dtype (float32 at least) on values centred by the batch's own channel
    means m; each image's sums over its positions in that dtype (a float32 reduction, accurate
    to about 1e-7 relative), added over images in float64 (a float64 reduction of every
    element was 25x slower); the raw sums come back exactly in float64 (sum x = s + n m,
    sum x^2 = q + 2 m s + n m^2, s and q the centred sums).  Why: a float64 copy of every BN
    input cost as much as a forward pass of the merged model, and the centring keeps the
    float32 rounding relative to the variance, not to the raw second moment.  The input stays
    channels-first (a channels-last copy cost 3-5x these sums)."""
    f64 = torch.float64
    work = torch.promote_types(x.dtype, torch.float32)
    per_image = x.detach().to(work).reshape(x.shape[0], x.shape[1], -1)  # (images, C, positions)
    n = per_image.shape[0] * per_image.shape[2]
    m = per_image.mean((0, 2))
    c = per_image - m[:, None]
    s = c.sum(2).sum(0, dtype=f64)
    q = c.square_().sum(2).sum(0, dtype=f64)
    m = m.to(f64)
    return torch.cat([torch.full((1,), float(n), dtype=f64, device=x.device),
                      s + n * m, q + 2 * m * s + n * m * m])


def add_batchnorm_sums(acc: torch.Tensor, term: torch.Tensor) -> None:
    """``acc += term`` for :func:`batchnorm_sums`, each part exactly (:func:`pleas.sums.add_term`:
    the same sums in any order of batches or processes); ``term`` is consumed."""
    k = (term.numel() - 1) // 2
    acc[0] += term[0]
    add_term(acc[1:1 + k], term[1:1 + k])
    add_term(acc[1 + k:], term[1 + k:])


def set_batchnorm_statistics(bn: nn.modules.batchnorm._BatchNorm, sums: torch.Tensor) -> None:
    """Running mean and unbiased variance from :func:`batchnorm_sums` added over batches."""
    k = (sums.numel() - 1) // 2
    n, s1, s2 = float(sums[0]), sums[1:1 + k], sums[1 + k:]
    mean = s1 / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(0)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, device="cpu",
                          max_batches: int | None = None, progress: bool = True,
                          reduce=None) -> int:
    """Recompute every BatchNorm's running mean/var on ``batches``; returns samples seen.

    ``reduce`` sums a float64 tensor over processes when the batches are one shard of the
    merge data (:mod:`pleas.distributed`)."""
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(mod, args):
            term = batchnorm_sums(args[0])
            if name not in sums:
                sums[name] = torch.zeros_like(term)
            add_batchnorm_sums(sums[name], term)
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
    if reduce is not None:
        seen = int(reduce(torch.tensor(float(seen), dtype=torch.float64)))
        sums = {name: reduce(sums[name]) for name, _ in bns}
    if seen == 0:
        raise ValueError("no data to recalibrate BatchNorm statistics")
    for name, m in bns:
        set_batchnorm_statistics(m, sums[name])
    return seen


def _channel_first_types() -> tuple[type, ...]:
    """timm's layer norms over dim 1 of an NCHW map (subclasses of nn.LayerNorm that permute
    or reduce over the channels themselves)."""
    try:
        from timm.layers import norm
    except Exception:  # pragma: no cover - timm is a dependency
        return ()
    names = ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormExp2d")
    return tuple(getattr(norm, n) for n in names if hasattr(norm, n))


CHANNEL_FIRST_NORMS = _channel_first_types()


def norm_dim(mod: nn.Module) -> int:
    """The axis a LayerNorm normalises: 1 for the channel-first norms, else the last."""
    return 1 if isinstance(mod, CHANNEL_FIRST_NORMS) else -1


class LayerNormDim(nn.LayerNorm):
    """A plain LayerNorm over one axis ``dim`` (the last, or the channels of an NCHW map)."""

    def __init__(self, n: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 dim: int = -1):
        super().__init__(n, eps=eps, elementwise_affine=elementwise_affine)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.movedim(self.dim, -1))
        return y.movedim(-1, self.dim)


class MergedLayerNorm(nn.Module):
    """LayerNorm of a partly merged stream: each model's view normalised on its own.

    ``share_a``/``share_b`` hold each unit's share of A's and B's normalised value: (1/2, 1/2)
    for merged units, (1, 0) for A-only, (0, 1) for B-only.  ``dim`` is the normalised axis
    (the last; 1 for a channel-first norm over an NCHW map).
    """

    def __init__(self, share_a: torch.Tensor, share_b: torch.Tensor, eps: float = 1e-5,
                 affine: bool = True, dim: int = -1):
        super().__init__()
        n = share_a.numel()
        self.eps = eps
        self.dim = dim
        self.register_buffer("share_a", share_a.float().clone())
        self.register_buffer("share_b", share_b.float().clone())
        self.register_buffer("view_mean", self._view_mean(self.share_a, self.share_b),
                             persistent=False)
        self.split = self._prefix_suffix(self.share_a, self.share_b)
        self.weight = nn.Parameter(torch.ones(n)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n)) if affine else None

    @staticmethod
    def _prefix_suffix(share_a: torch.Tensor, share_b: torch.Tensor) -> tuple[int, int] | None:
        """``(a, a + m)`` when A's view is the first ``a + m`` units and B's view the units
        from ``a`` on (the [A-only | merged | B-only] order pleas builds) and every unit's
        shares add up to 1 (as :meth:`pleas.plan.GroupPlan.weights` makes them), else None."""
        if not bool(((share_a + share_b) == 1).all()):
            return None  # shares the blend cannot express: the matmul form
        in_a, in_b = (share_a > 0).cpu(), (share_b > 0).cpu()
        end_a, start_b = int(in_a.sum()), in_b.numel() - int(in_b.sum())
        if end_a == 0 or start_b == in_b.numel() or start_b > end_a:
            return None  # an empty view, or units in neither view: the matmul form
        if not (bool(in_a[:end_a].all()) and bool(in_b[start_b:].all())):
            return None
        return start_b, end_a

    @staticmethod
    def _view_mean(share_a: torch.Tensor, share_b: torch.Tensor) -> torch.Tensor:
        """[n, 2]: column v averages view v's units (x @ view_mean gives both views' means)."""
        views = torch.stack([share_a > 0, share_b > 0], 1).float()
        return views / views.sum(0).clamp_min(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():  # the shares may have changed: so do the views they define
            self.view_mean.copy_(self._view_mean(self.share_a, self.share_b))
        self.split = self._prefix_suffix(self.share_a, self.share_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim != -1:
            x = x.movedim(self.dim, -1)
        y = self._sliced(x) if self.split is not None else self._matmul_form(x)
        return y if self.dim == -1 else y.movedim(-1, self.dim)

    def _sliced(self, x: torch.Tensor) -> torch.Tensor:
        """The views as a prefix and a suffix: two native layer norms with the plain affine
        weights, blended on the merged units by their shares (one ``lerp``; the shares of a
        unit add up to 1 here, :meth:`_prefix_suffix`).  Why: at the zoo ViT's partly merged
        stream this takes about 0.5x the time of :meth:`_matmul_form`, whose skinny matmuls
        run at a fraction of the GEMM rate, and 0.9x the time of folding the shares into each
        view's affine weights first (four more small operations per call, at ~7 us each;
        ``experiments/layernorm_bench.py``).

        Each view is centred straight into its own contiguous tensor (one subtraction per
        view), not centred whole and then sliced: a native layer norm copies a strided slice
        to a contiguous one first, so the whole-row centring cost an extra stream-sized
        tensor and two copies.  Each centred view is dropped as soon as its norm has read it:
        one stream-sized buffer fewer alive at once, the same output to the bit.  Whether that
        saves the allocator's page faults depends on the heap's state: at a ViT-B-sized
        stream ``experiments/layernorm_bench.py`` counted 0 / 0, 10,095 / 11,788 and
        6,272 / 6,272 faults per call (dropped / kept) in three runs."""
        start_b, end_a = self.split
        n = x.shape[-1]
        # both views shifted by the whole row's mean (a layer norm ignores a shift): a native
        # float32 layer norm of a stream offset far from zero lost digits the matmul form kept
        mean = x.mean(-1, keepdim=True)

        def affine(p: torch.Tensor | None, part: slice) -> torch.Tensor | None:
            return None if p is None else p[part].to(x.dtype)

        # unit weights where the norm has none: a native layer norm without a weight runs a
        # slower kernel (126 us against 66 us for a 1,088 x 96 view on this CPU)
        weight = x.new_ones(n) if self.weight is None else self.weight
        a_part, b_part = slice(None, end_a), slice(start_b, None)
        view = x[..., a_part] - mean
        y_a = F.layer_norm(view, (end_a,), affine(weight, a_part), affine(self.bias, a_part),
                           self.eps)
        del view  # before the second view is made (the docstring: page faults)
        view = x[..., b_part] - mean
        y_b = F.layer_norm(view, (n - start_b,), affine(weight, b_part),
                           affine(self.bias, b_part), self.eps)
        del view
        merged = end_a - start_b
        # share_a * y_a + share_b * y_b on the merged units, share_b = 1 - share_a
        blend = torch.lerp(y_b[..., :merged], y_a[..., start_b:],
                           self.share_a[start_b:end_a].to(x.dtype))
        return torch.cat([y_a[..., :start_b], blend, y_b[..., merged:]], -1)

    def _matmul_form(self, x: torch.Tensor) -> torch.Tensor:
        """Views anywhere: both views' statistics from two skinny matmuls and the output from
        one fused multiply-add, instead of two masked passes over the stream.  Centring on the
        whole row's mean before squaring keeps E[x^2] - mean^2 free of cancellation when the
        stream is offset."""
        xc = x - x.mean(-1, keepdim=True)  # (the views' means from x itself would cancel)
        avg = self.view_mean.to(x.dtype)
        mean = xc @ avg                                            # [..., 2]
        inv_std = torch.rsqrt(((xc * xc) @ avg - mean * mean).clamp_min(0) + self.eps)
        mix = torch.stack([self.share_a, self.share_b]).to(x.dtype)  # [2, n]
        if self.weight is not None:
            mix = mix * self.weight
        shift, shift_mix = -(mean * inv_std), mix
        if self.bias is not None:  # the bias rides in the offset's matmul as a third row
            shift = torch.cat([shift, torch.ones_like(shift[..., :1])], -1)
            shift_mix = torch.cat([mix, self.bias[None]])
        # y = sum_v share_v * (xc - mean_v) * inv_std_v  (* weight + bias)
        return torch.addcmul(shift @ shift_mix, xc, inv_std @ mix)


def merged_layernorm_state(spec, plan, state: dict[str, torch.Tensor],
                           model: nn.Module) -> dict[str, torch.Tensor]:
    """Add the per-unit view shares of every LayerNorm over a partly merged hidden group.

    ``spec`` is the :class:`pleas.spec.PermSpec`, ``plan`` the :data:`pleas.plan.Plan`; the
    shares are saved with the model, so :func:`pleas.merged.load_merged` rebuilds the norms.
    """
    out = dict(state)
    ln_keys = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, nn.LayerNorm) and m.weight is not None}
    for g in spec.hidden:
        p = plan[g.name]
        for ax in g.axes:
            if ax.key.endswith(".weight") and ax.role == "out" and ax.key in ln_keys:
                prefix = ax.key[: -len(".weight")]
                if p.models > 2:
                    if p.n_merged == p.size:
                        continue  # every unit merged: one view, the plain LayerNorm
                    from .errors import MergeError
                    raise MergeError(f"merging {p.models} models through a LayerNorm over a "
                                     f"partly merged stream ({prefix}) is written for two "
                                     "models only; use width 1 (everything merged) or two models")
                wa, wb = p.weights()
                out[f"{prefix}.share_a"], out[f"{prefix}.share_b"] = wa.float(), wb.float()
    return out


def mixed_group_norms(spec, plan, model: nn.Module) -> list[str]:
    """The one-group GroupNorms (statistics over every channel and position) over a hidden
    group that keeps units apart (of a model that is not the networks side by side).

    Such a norm has no per-view form yet (:class:`MergedLayerNorm` normalises over the
    channels only): the widened norm takes both models' channels into one mean and variance,
    so even two identical models merged at 1.5x do not give their model back (logits off by
    0.011, at most 0.50 in size, on the two-norm CNN of ``tests/test_one_group_norm.py``).
    :func:`pleas.pipeline.build` warns about each."""
    gn_keys = {f"{n}.weight": n for n, m in model.named_modules()
               if isinstance(m, nn.GroupNorm) and m.num_groups == 1 and m.weight is not None}
    found = []
    for g in spec.hidden:
        p = plan[g.name]
        if p.n_merged == p.size:
            continue
        found += [gn_keys[ax.key] for ax in g.axes if ax.role == "out" and ax.key in gn_keys]
    return sorted(set(found))

