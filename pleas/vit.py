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

``nn.MultiheadAttention`` (torchvision's ViT) keeps its fused in-projection as a bare
parameter and calls its out-projection functionally, so no hook could read q, k, v or the
out-projection's input, and its forward needs the attention width to equal the stream width
(a partial merge widens them apart).  Its ``replace`` rule swaps it, in pleas' own copy of the
model, for :class:`SelfAttention`: the same parameters and outputs, the in-projection an
``nn.Linear`` and ``out_proj`` called as a module (a spec derived from the user's model names
the user's keys, ``in_proj_weight``; one derived from pleas' copy, and the merged model, name
``in_proj.weight``).
:class:`SelfAttention` then gets the same rule as timm's ``Attention`` (heads move and merge
whole; the attention width follows the in-projection after widening).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
    qkv_b = f"{path}.qkv.bias" if mod.qkv.bias is not None else None
    return _fused_attention(b, mod, path, x, f"{path}.qkv", f"{path}.qkv.weight", qkv_b)


def _fused_attention(b: SpecBuilder, mod: nn.Module, path: str, x: TensorDims, qkv: str,
                     qkv_w: str, qkv_b: str | None, proj: str = "proj") -> TensorDims:
    """Self-attention with a fused [q | k | v] in-projection (module ``qkv``, its weight and
    bias keys) and an output projection ``path.proj`` (an nn.Linear)."""
    a_dim, hd = mod.attn_dim, mod.head_dim
    proj_mod = getattr(mod, proj)
    proj_w = f"{path}.{proj}.weight"
    proj_b = f"{path}.{proj}.bias" if proj_mod.bias is not None else None
    in_features = b.dim_size(x.dims[-1])
    b.link_param(x.dims[-1], qkv_w, 1, "in")
    qk, v = b.new_axis(a_dim), b.new_axis(a_dim)
    for start, var in ((0, qk), (a_dim, qk), (2 * a_dim, v)):
        for key in filter(None, (qkv_w, qkv_b)):
            b.tie(b.param_axis(key, 0, a_dim, "out", start=start), var)
    b.tie(b.param_axis(proj_w, 1, a_dim, "in"), v)
    out = b.channel(proj_mod.out_features)
    b.link_param(out, proj_w, 0, "out")
    if proj_b:
        b.link_param(out, proj_b, 0, "out")
    # activation sites: the stream (qkv input), q and k (qkv output slices), v (proj input)
    b.add_site(x.dims[-1], qkv, "in", -1)
    b.add_slice_site(qk, qkv, "out", -1, a_dim, 0, f"{path}:q")
    b.add_slice_site(qk, qkv, "out", -1, a_dim, a_dim, f"{path}:k")
    b.add_slice_site(v, f"{path}.{proj}", "in", -1, a_dim, 0, f"{path}:v")
    b.blocks_of(qk, hd, qk)
    b.blocks_of(v, hd, qk)
    tokens = b.dim_size(x.dims[-2]) if x.ndim == 3 else 1
    b.record_layer(qkv, "linear", qkv_w, qkv_b, x.dims[-1], ((qk,),),
                   tokens * in_features * 3 * a_dim,
                   out_parts=((qk, 0), (qk, a_dim), (v, 2 * a_dim)))
    b.record_layer(path, "attention", "", None, None, ((qk,),), 2 * tokens * tokens * a_dim,
                   depthwise=True)
    b.record_layer(f"{path}.{proj}", "linear", proj_w, proj_b, ((v,),), out,
                   tokens * a_dim * proj_mod.out_features)
    return TensorDims(list(x.dims[:-1]) + [out])


def _resize_timm_attention(mod: nn.Module) -> None:
    mod.num_heads = mod.qkv.out_features // 3 // mod.head_dim
    mod.attn_dim = mod.num_heads * mod.head_dim


if TimmAttention is not None:
    register_module(TimmAttention, spec=_timm_attention_rule,
                    post_resize=_resize_timm_attention)


# ------------------------------------------------------------------ nn.MultiheadAttention


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` for self-attention, as pleas can see into and widen it.

    The same parameters and outputs, the call signature of ``nn.MultiheadAttention``
    (``attn(x, x, x, need_weights=False)`` returns ``(out, None)``; ``attn(x)`` is the same).
    The fused in-projection is an ``nn.Linear`` (``in_proj``: hooks read its input and its
    q | k | v output, least squares fits it, the merged model runs it block by block) and
    ``out_proj`` is called as a module.  Its state-dict keys ``in_proj.weight`` /
    ``in_proj.bias`` are ``in_proj_weight`` / ``in_proj_bias`` of the module it replaces
    (``original_keys``: a spec derived from the user's model names those).  Heads are blocks
    of ``head_dim`` rows of each of the q, k and v slices; after widening the head count
    follows the in-projection (``attn_dim`` need not equal the stream width).  Only
    self-attention without masks: anything else raises ValueError.
    """

    original_keys = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.attn_dim = self.num_heads * self.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        w = mha.in_proj_weight
        self.in_proj = nn.Linear(w.shape[1], w.shape[0], mha.in_proj_bias is not None,
                                 device="meta", dtype=w.dtype)
        self.in_proj.weight = w
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key  # attn(x) alone: self-attention (pleas.sweep
        value = query if value is None else value  # runs a host module on its first input)
        if key is not query or value is not query:
            raise ValueError("pleas' SelfAttention computes self-attention only (query, key and "
                             "value the same tensor)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("pleas' SelfAttention takes no attention or padding mask")
        x = query if self.batch_first else query.transpose(0, 1)
        n, t, _ = x.shape
        qkv = self.in_proj(x)
        q, k, v = qkv.reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, -1)
            out = F.dropout(weights, p, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, t, self.attn_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _replace_mha(mod: nn.MultiheadAttention) -> nn.Module | None:
    """A :class:`SelfAttention` for a fused-projection MultiheadAttention, else None (kept:
    its spec rule then says why it cannot be merged)."""
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        return None
    return SelfAttention(mod)


def _mha_rule(b: SpecBuilder, mod: nn.MultiheadAttention, path: str) -> TensorDims:
    if not mod._qkv_same_embed_dim:
        raise b.unsupported("nn.MultiheadAttention with separate q, k and v projections "
                            "(kdim or vdim differ from embed_dim)")
    raise b.unsupported("nn.MultiheadAttention with add_bias_kv or add_zero_attn")


def _self_attention_rule(b: SpecBuilder, mod: SelfAttention, path: str) -> TensorDims:
    x = b.input()
    args = list(b.node.args[:3]) + [b.node.kwargs.get(n) for n in ("key", "value")]
    if any(a is not None and a is not args[0] for a in args):
        raise b.unsupported("attention whose query, key and value differ (cross-attention)")
    kw = dict(b.node.kwargs)
    for i, name in enumerate(("key_padding_mask", "need_weights", "attn_mask",
                              "average_attn_weights", "is_causal")):
        if len(b.node.args) > 3 + i:
            kw[name] = b.node.args[3 + i]
    if any(kw.get(n) is not None for n in ("key_padding_mask", "attn_mask")) or \
            kw.get("is_causal"):
        raise b.unsupported("attention with a mask")
    if x.ndim != 3:
        raise b.unsupported("attention over an input that is not (batch, tokens, channels)")
    if not mod.batch_first:  # (tokens, batch, channels): the token axis comes first
        x = TensorDims([x.dims[1], x.dims[0], x.dims[2]])
    bias = f"{path}.in_proj.bias" if mod.in_proj.bias is not None else None
    out = _fused_attention(b, mod, path, x, f"{path}.in_proj", f"{path}.in_proj.weight", bias,
                           proj="out_proj")
    if not mod.batch_first:
        out = TensorDims([out.dims[1], out.dims[0], out.dims[2]])
    return (out, None)


def _resize_self_attention(mod: SelfAttention) -> None:
    mod.num_heads = mod.in_proj.out_features // 3 // mod.head_dim
    mod.attn_dim = mod.num_heads * mod.head_dim


register_module(nn.MultiheadAttention, spec=_mha_rule, replace=_replace_mha)
register_module(SelfAttention, spec=_self_attention_rule, post_resize=_resize_self_attention)


def _resize_torchvision_vit(mod: nn.Module) -> None:
    """torchvision's VisionTransformer reshapes the patch embedding to ``hidden_dim`` channels:
    the stream's width, which widening changes."""
    mod.hidden_dim = mod.conv_proj.out_channels


try:
    from torchvision.models.vision_transformer import VisionTransformer as _TorchvisionViT
except Exception:  # pragma: no cover - torchvision is a dependency
    _TorchvisionViT = None
if _TorchvisionViT is not None:
    register_module(_TorchvisionViT, post_resize=_resize_torchvision_vit)
