"""The built-in module types: for each, its spec rule and how it is resized, registered once.

A spec rule (see :class:`pleas.spec.SpecBuilder`) reads its input's axes with ``b.input()``,
links tensor axes to parameter axes, declares activation sites and layer records, and returns
its output's axes.  A resizer updates a module's size attributes after its tensors took the
widened shapes (:func:`pleas.widen.build_module`); a splitter runs a widened layer block by
block in the merged model (:mod:`pleas.blockwise`).  To support a new module type, register it
the same way with :func:`pleas.registry.register_module` (globally) or pass the rule per call
(``derive_spec(model, x, rules={MyModule: rule})``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register_module
from .spec import Dim, SpecBuilder, TensorDims, _flatten


def _passthrough_module(b: SpecBuilder, mod: nn.Module, path: str) -> TensorDims:
    return b.input()


for _t in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
           nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d,
           nn.Dropout2d, nn.Identity, nn.Softmax):
    register_module(_t, spec=_passthrough_module)


def _conv_rule(b: SpecBuilder, mod: nn.Conv2d, path: str) -> TensorDims:
    x = b.input()
    out_shape = b.shape()
    out = b.fresh(out_shape)
    out.dims[0] = x.dims[0]
    out.dims[1] = b.channel(mod.out_channels)
    c_in, c_out, groups = mod.in_channels, mod.out_channels, mod.groups
    w = f"{path}.weight"
    bias = f"{path}.bias" if mod.bias is not None else None
    kk = math.prod(mod.kernel_size)
    macs = math.prod(out_shape[1:]) * (c_in // groups) * kk
    if groups == 1:
        b.link_param(x.dims[1], w, 1, "in")
        b.link_param(out.dims[1], w, 0, "out")
        b.add_site(x.dims[1], path, "in", 1)
        in_dim, depthwise = x.dims[1], False
    elif groups == c_in == c_out:
        # depthwise: one filter per channel, so input and output channels are one axis
        b.link(x.dims[1], out.dims[1])
        b.link_param(out.dims[1], w, 0, "out")
        in_dim, depthwise = None, True
    else:
        # grouped: output block j reads input block j only.  Channels may move inside their
        # block, and blocks may move as wholes if input and output blocks move together, so
        # both channel axes become block-structured groups sharing one block order.  Cost
        # grows with the number of blocks, like a depthwise conv.
        x_var, y_var = b.plain(x.dims[1]), b.plain(out.dims[1])
        if x_var is None:
            raise b.unsupported(f"grouped convolution (groups={groups}) over a concatenated or "
                                "flattened channel axis")
        b.vars.union(b.param_axis(w, 1, c_in, "in", blocks=groups), x_var, b.where())
        b.link_param(out.dims[1], w, 0, "out")
        b.add_site(x.dims[1], path, "in", 1)
        b.blocks_of(x_var, c_in // groups, x_var)
        b.blocks_of(y_var, c_out // groups, x_var)
        in_dim, depthwise = x.dims[1], True
    if bias:
        b.link_param(out.dims[1], bias, 0, "out")
    b.record_layer(path, "conv", w, bias, in_dim, out.dims[1], macs, depthwise)
    return out


def _resize_conv(mod: nn.Module, t: dict[str, torch.Tensor]) -> None:
    w = t["weight"]
    if mod.groups > 1:  # grouped/depthwise: more groups of the same size (pleas.blocks)
        mod.groups = w.shape[0] // (mod.out_channels // mod.groups)
    mod.out_channels = w.shape[0]
    mod.in_channels = w.shape[1] * mod.groups


def _split_conv(mod: nn.Module, layout) -> nn.Module:
    from .blockwise import split_conv  # the merged model's block layers (imported late)
    return split_conv(mod, layout)


def _split_linear(mod: nn.Module, layout) -> nn.Module:
    from .blockwise import split_linear
    return split_linear(mod, layout)


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module(_t, spec=_conv_rule, resize=_resize_conv, split=_split_conv)


def _resize_linear(mod: nn.Linear, t: dict[str, torch.Tensor]) -> None:
    mod.out_features, mod.in_features = t["weight"].shape


@register_module(nn.Linear, resize=_resize_linear, split=_split_linear)
def _linear_rule(b: SpecBuilder, mod: nn.Linear, path: str) -> TensorDims:
    x = b.input()
    out = TensorDims(list(x.dims))
    out.dims[-1] = b.channel(mod.out_features)
    w = f"{path}.weight"
    bias = f"{path}.bias" if mod.bias is not None else None
    b.link_param(x.dims[-1], w, 1, "in")
    b.link_param(out.dims[-1], w, 0, "out")
    if bias:
        b.link_param(out.dims[-1], bias, 0, "out")
    b.add_site(x.dims[-1], path, "in", -1)
    macs = math.prod(b.shape()[1:]) * mod.in_features
    b.record_layer(path, "linear", w, bias, x.dims[-1], out.dims[-1], macs)
    return out


def _norm_params(b: SpecBuilder, mod: nn.Module, path: str, dim: Dim) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            b.link_param(dim, f"{path}.{name}", 0, "out")


def _resize_bn(mod: nn.Module, t: dict[str, torch.Tensor]) -> None:
    mod.num_features = next(v for k, v in t.items() if k != "num_batches_tracked").shape[0]


@register_module(nn.modules.batchnorm._BatchNorm, resize=_resize_bn)
def _batchnorm_rule(b: SpecBuilder, mod: nn.Module, path: str) -> TensorDims:
    x = b.input()
    _norm_params(b, mod, path, x.dims[1])
    return x


def _resize_ln(mod: nn.LayerNorm, t: dict[str, torch.Tensor]) -> None:
    mod.normalized_shape = (t["weight"].shape[0],) if "weight" in t else mod.normalized_shape


@register_module(nn.LayerNorm, resize=_resize_ln)
def _layernorm_rule(b: SpecBuilder, mod: nn.LayerNorm, path: str) -> TensorDims:
    x = b.input()
    if len(mod.normalized_shape) != 1:
        raise b.unsupported("LayerNorm over more than one axis")
    _norm_params(b, mod, path, x.dims[-1])
    b.layer_normalised(x.dims[-1])
    return x


def _resize_gn(mod: nn.GroupNorm, t: dict[str, torch.Tensor]) -> None:
    per_group = mod.num_channels // mod.num_groups  # blocks merge whole: same size, more of them
    mod.num_channels = t["weight"].shape[0]
    if mod.num_groups > 1:
        mod.num_groups = mod.num_channels // per_group


@register_module(nn.GroupNorm, resize=_resize_gn)
def _groupnorm_rule(b: SpecBuilder, mod: nn.GroupNorm, path: str) -> TensorDims:
    x = b.input()
    if mod.num_groups not in (1, mod.num_channels):
        # statistics per block of channels: channels move inside their block, blocks as wholes
        var = b.plain(x.dims[1])
        if var is None:
            raise b.unsupported(f"GroupNorm with {mod.num_groups} groups over a concatenated or "
                                "flattened channel axis")
        b.blocks_of(var, mod.num_channels // mod.num_groups, var)
    _norm_params(b, mod, path, x.dims[1])
    if mod.num_groups == 1:  # statistics over every channel: a LayerNorm's trouble when split
        b.layer_normalised(x.dims[1])
    return x


def _spatial_module(b: SpecBuilder, mod: nn.Module, path: str) -> TensorDims:
    x = b.input()
    out = b.fresh(b.shape())
    out.dims[0], out.dims[1] = x.dims[0], x.dims[1]
    return out


for _t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
           nn.ZeroPad2d):
    register_module(_t, spec=_spatial_module)


@register_module(nn.Flatten)
def _flatten_module(b: SpecBuilder, mod: nn.Flatten, path: str) -> TensorDims:
    return _flatten(b, b.input(), mod.start_dim, mod.end_dim)


def _timm_linear_type() -> type | None:
    """timm's ``Linear`` (its classifiers): an nn.Linear that casts its weight under
    TorchScript and otherwise computes exactly nn.Linear, so it takes nn.Linear's rule.  Left
    to the trace it would be traced through to ``F.linear`` on a parameter, which records no
    layer (no least squares, no MACs) and no activation site for the group it reads."""
    try:
        from timm.layers import Linear
    except Exception:  # pragma: no cover - timm is a dependency
        return None
    return Linear


if _timm_linear_type() is not None:
    register_module(_timm_linear_type(), spec=_linear_rule, resize=_resize_linear,
                    split=_split_linear)
