"""Vision Transformers: attention heads in the spec, and LayerNorm over a partly merged stream.

timm's ``Attention`` is a leaf of the trace with its own rule: the fused qkv projection's rows
are three slices, q and k of each head share one permutation (q.k^T contracts them), v and the
output projection's input share another, and heads move as whole units in both at once (one
tied head permutation).  The rule declares two head-structured groups (``head_dim`` set, same
``tie``), the sites where their activations are read (the qkv output slices, the projection
input), and the layers for least squares and MACs (the attention products count as compute
that scales with the head count).

LayerNorm over a widened stream cannot normalise both models' units as one vector without
mixing their statistics.  :class:`MergedLayerNorm` normalises A's view (merged + A-only units)
and B's view (merged + B-only) separately and averages the two on merged units: exact at
width 2 (both models side by side) and for a model merged with a permuted copy of itself; for
genuinely merged units it is an approximation that the least-squares fit of the following
Linear layers compensates.
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import SpecBuilder, TensorDims, _input, register_module_rule

try:
    from timm.layers.attention import Attention as TimmAttention
except Exception:  # pragma: no cover - timm is a dependency
    TimmAttention = None


def _timm_attention_rule(b: SpecBuilder, mod: nn.Module, path: str) -> TensorDims:
    x = _input(b)
    if getattr(mod, "gate", None) is not None:
        raise b.unsupported("gated attention")
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(mod, name, nn.Identity()), nn.Identity):
            raise b.unsupported(f"attention with {name} (normalisation inside heads)")
    a_dim, hd = mod.attn_dim, mod.head_dim
    qkv_w, proj_w = f"{path}.qkv.weight", f"{path}.proj.weight"
    qkv_b = f"{path}.qkv.bias" if mod.qkv.bias is not None else None
    proj_b = f"{path}.proj.bias" if mod.proj.bias is not None else None
    b.link_param(x.dims[-1], qkv_w, 1, "in")
    qk, v = b.vars.new(a_dim), b.vars.new(a_dim)
    for start, var in ((0, qk), (a_dim, qk), (2 * a_dim, v)):
        for key in filter(None, (qkv_w, qkv_b)):
            b.vars.union(b.param_axis(key, 0, a_dim, "out", start=start), var, b.where())
    b.vars.union(b.param_axis(proj_w, 1, a_dim, "in"), v, b.where())
    out = b.channel(mod.proj.out_features)
    b.link_param(out, proj_w, 0, "out")
    if proj_b:
        b.link_param(out, proj_b, 0, "out")
    # activation sites: the stream (qkv input), q and k (qkv output slices), v (proj input)
    from .spec import Site
    b.add_site(x.dims[-1], f"{path}.qkv", "in", -1)
    b.sites.append((qk, Site(f"{path}.qkv", "out", -1, a_dim, 0), f"{path}:q"))
    b.sites.append((qk, Site(f"{path}.qkv", "out", -1, a_dim, a_dim), f"{path}:k"))
    b.sites.append((v, Site(f"{path}.proj", "in", -1, a_dim), f"{path}:v"))
    b.blocks_of(qk, hd, qk)
    b.blocks_of(v, hd, qk)
    tokens = b.dim_size(x.dims[1]) if x.ndim == 3 else 1
    b.record_layer(f"{path}.qkv", "linear", qkv_w, qkv_b, x.dims[-1], ((qk,),),
                   tokens * mod.qkv.in_features * 3 * a_dim,
                   out_parts=((qk, 0), (qk, a_dim), (v, 2 * a_dim)))
    b.record_layer(path, "attention", "", None, None, ((qk,),), 2 * tokens * tokens * a_dim,
                   depthwise=True)
    b.record_layer(f"{path}.proj", "linear", proj_w, proj_b, ((v,),), out,
                   tokens * a_dim * mod.proj.out_features)
    return TensorDims(list(x.dims[:-1]) + [out])


def _resize_timm_attention(mod: nn.Module) -> None:
    mod.num_heads = mod.qkv.out_features // 3 // mod.head_dim
    mod.attn_dim = mod.num_heads * mod.head_dim


if TimmAttention is not None:
    from .widen import register_post_resizer

    register_module_rule(TimmAttention, _timm_attention_rule)
    register_post_resizer(TimmAttention, _resize_timm_attention)


class MergedLayerNorm(nn.Module):
    """LayerNorm of a partly merged stream: each model's view normalised on its own.

    ``share_a``/``share_b`` hold each unit's share of A's and B's normalised value: (1/2, 1/2)
    for merged units, (1, 0) for A-only, (0, 1) for B-only.
    """

    def __init__(self, share_a: torch.Tensor, share_b: torch.Tensor, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__()
        n = share_a.numel()
        self.eps = eps
        self.register_buffer("share_a", share_a.float().clone())
        self.register_buffer("share_b", share_b.float().clone())
        self.weight = nn.Parameter(torch.ones(n)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n)) if affine else None

    @staticmethod
    def _view_norm(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
        m = mask.to(x.dtype)
        count = m.sum().clamp_min(1)
        mu = (x * m).sum(-1, keepdim=True) / count
        var = (((x - mu) ** 2) * m).sum(-1, keepdim=True) / count
        return (x - mu) * torch.rsqrt(var + eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sa, sb = self.share_a.to(x.dtype), self.share_b.to(x.dtype)
        y = sa * self._view_norm(x, sa > 0, self.eps) + sb * self._view_norm(x, sb > 0, self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y
