"""Vision Transformers: attention heads in the spec.

timm's ``Attention`` is a leaf of the trace with its own rule: the fused qkv projection's rows
are three slices, q and k of each head share one permutation (q.k^T contracts them), v and the
output projection's input share another, and heads move as whole units in both at once (one
tied head permutation).  The rule declares two head-structured groups (``head_dim`` set, same
block order), the sites where their activations are read (the qkv output slices, the
projection input), and the layers for least squares and MACs (the attention products count as
compute that scales with the head count).  After widening, the head count follows the qkv
projection (the ``post_resize`` rule).  LayerNorm over a partly merged stream is
:class:`pleas.normalization.MergedLayerNorm`.
"""
from __future__ import annotations

from torch import nn

from .registry import register_module
from .spec import SpecBuilder, TensorDims

try:
    from timm.layers.attention import Attention as TimmAttention
except Exception:  # pragma: no cover - timm is a dependency
    TimmAttention = None


def _timm_attention_rule(b: SpecBuilder, mod: nn.Module, path: str) -> TensorDims:
    x = b.input()
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
    qk, v = b.new_axis(a_dim), b.new_axis(a_dim)
    for start, var in ((0, qk), (a_dim, qk), (2 * a_dim, v)):
        for key in filter(None, (qkv_w, qkv_b)):
            b.tie(b.param_axis(key, 0, a_dim, "out", start=start), var)
    b.tie(b.param_axis(proj_w, 1, a_dim, "in"), v)
    out = b.channel(mod.proj.out_features)
    b.link_param(out, proj_w, 0, "out")
    if proj_b:
        b.link_param(out, proj_b, 0, "out")
    # activation sites: the stream (qkv input), q and k (qkv output slices), v (proj input)
    b.add_site(x.dims[-1], f"{path}.qkv", "in", -1)
    b.add_slice_site(qk, f"{path}.qkv", "out", -1, a_dim, 0, f"{path}:q")
    b.add_slice_site(qk, f"{path}.qkv", "out", -1, a_dim, a_dim, f"{path}:k")
    b.add_slice_site(v, f"{path}.proj", "in", -1, a_dim, 0, f"{path}:v")
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
    register_module(TimmAttention, spec=_timm_attention_rule,
                    post_resize=_resize_timm_attention)
