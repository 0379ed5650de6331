"""Permutation spec, derived automatically from a torch.fx trace.

Why: merging by alignment is only as good as its permutation spec, and a silently wrong spec is
the most common bug in this field.  So the spec is never written by hand: the model is traced,
every node of the graph says which tensor axes are "the same axis", a union-find turns those
links into groups, and any op without a rule stops the derivation with an error that names it.

Representation.  Every axis of every tensor in the graph is described by a :data:`Dim`: a
concatenation of segments (``torch.cat`` makes several), each a product of factors (``flatten``
of C x H x W makes three), each factor a union-find variable.  A plain channel axis is one
segment with one factor.  Parameters join the picture through :class:`AxisRef`: "axis ``dim``
of ``key``, the slice ``[start, start + outer*size*inner)`` seen as ``(outer, size, inner)``,
and the middle factor is permuted".  A group is the set of parameter axes whose variables ended
up in the same union-find class.

Kinds of group:
- ``hidden``: units that may be permuted and partially merged;
- ``input``: axes tied to the model's input (image channels, tokens): never permuted, and the two
  models read the same values there;
- ``output``: the class axis of the head: never permuted; shared or separate heads.

Module types get their rules from :mod:`pleas.registry` (one registration per type: spec rule
and resizer; the built-in ones are in :mod:`pleas.module_rules`, attention in :mod:`pleas.vit`);
a module with a rule is a leaf of the trace.  Functions and tensor methods get theirs with
:func:`register_function_rule` / :func:`register_method_rule`.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .registry import (ModuleRules, original_key_map, register_module, replaced,
                       rules_for_call)

# ----------------------------------------------------------------------------- public types

SHARED = "<shared>"  # Layer.in_group of a layer reading a single shared channel (e.g. gray input)


class SpecError(ValueError):
    """The permutation spec cannot be derived (or is inconsistent)."""


class UnsupportedOpError(SpecError):
    """An op in the traced graph has no permutation rule."""

    def __init__(self, node: str, op: str, module: str | None, detail: str = ""):
        self.node, self.op, self.module = node, op, module
        where = f" in module '{module}'" if module else ""
        msg = f"no permutation rule for op {op} at node '{node}'{where}"
        if detail:
            msg += f": {detail}"
        msg += (". Give the module a rule with pleas.register_module (or rules=... per call), "
                "or report the op.")
        super().__init__(msg)


@dataclass(frozen=True)
class AxisRef:
    """One permuted axis (or slice of an axis) of a parameter or buffer.

    ``role`` says how the partial merge treats it: ``"out"`` tensors produce or act
    elementwise on the units (weight rows, biases, norm parameters, embeddings), so merged units
    are averaged; ``"in"`` tensors read the units (weight columns), so they are gathered only.

    ``blocks > 1`` marks the input axis (dim 1) of a grouped convolution's weight, which stores
    only the diagonal blocks of a block-diagonal matrix: row block j (dim 0) reads units
    ``[j*size/blocks, (j+1)*size/blocks)``.  Code that permutes or widens it works on the dense
    view (:mod:`pleas.blocks`); the axis then has ``size`` entries like any other.
    """

    key: str
    dim: int
    role: str
    size: int
    start: int = 0
    outer: int = 1
    inner: int = 1
    blocks: int = 1

    @property
    def length(self) -> int:
        return self.outer * self.size * self.inner


@dataclass(frozen=True)
class Site:
    """Where the activations of a group can be read: a module's input or output, one axis of it."""

    module: str
    io: str  # "in" | "out"
    dim: int
    size: int
    start: int = 0
    outer: int = 1
    inner: int = 1

    def _units_last(self, t: torch.Tensor) -> torch.Tensor:
        """A view with the group's units on the last axis (samples on all the others)."""
        d = self.dim % t.ndim
        t = t.narrow(d, self.start, self.outer * self.size * self.inner)
        return t.unflatten(d, (self.outer, self.size, self.inner)).movedim(d + 1, -1)

    def rows(self, t: torch.Tensor) -> int:
        """How many rows :meth:`extract` gives for ``t`` (without copying anything)."""
        return self._units_last(t).numel() // self.size

    def row_index(self, t: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat row numbers as indices into :meth:`extract`'s view of ``t`` (one per axis);
        computed once, they serve every model's tensor of the same shape."""
        return torch.unravel_index(rows, self._units_last(t).shape[:-1])

    def image_rows(self, t: torch.Tensor, picks: torch.Tensor
                   ) -> "ImageRows | tuple[torch.Tensor, ...]":
        """An index for :meth:`extract`: rows ``picks[i]`` (row numbers within image i, [images,
        k]) of every image, image-major.  Where the view's rows of one image form one strided
        axis (a conv map, a token sequence) that is a two-index gather, about twice as fast on
        small maps as unravelling flat row numbers; else flat rows (:meth:`row_index`)."""
        view = self._units_last(t)
        n = view.shape[0]
        try:
            view.view(n, -1, self.size)
        except RuntimeError:  # rows not one strided axis (a head slice of a fused projection)
            per = view.numel() // (n * self.size)
            flat = picks + torch.arange(n, device=picks.device)[:, None] * per
            return self.row_index(t, flat.flatten())
        return ImageRows(torch.arange(n, device=picks.device)[:, None], picks)

    def extract(self, t: torch.Tensor,
                index: "ImageRows | tuple[torch.Tensor, ...] | None" = None) -> torch.Tensor:
        """Rows = samples (batch x positions x outer x inner), columns = the group's units.

        ``index`` (from :meth:`image_rows` or :meth:`row_index`) picks rows straight from the
        strided view, so that sampling a few positions per image never copies the whole
        activation first."""
        view = self._units_last(t)
        if index is None:
            return view.reshape(-1, self.size)
        if isinstance(index, ImageRows):
            return view.view(view.shape[0], -1, self.size)[index.image, index.row].reshape(
                -1, self.size)
        return view[index]


@dataclass(frozen=True)
class ImageRows:
    """Rows ``row[i]`` of image ``image[i]`` (broadcast: [images, 1] and [images, k])."""

    image: torch.Tensor
    row: torch.Tensor


@dataclass(frozen=True)
class Group:
    """A set of units permuted together: every member axis gets the same permutation.

    ``head_dim > 0`` marks units that come in blocks of ``head_dim`` which move and merge as
    whole blocks ("heads"), each with its own permutation inside.  Attention heads are such
    blocks (q/k and v/proj of one attention block share the head order), and so are the
    channel groups of a grouped convolution (its input and output channels share the block
    order).  Groups with the same ``tie`` share the block permutation and merge the same blocks.

    ``layer_norm``: a LayerNorm (or a one-group GroupNorm) normalises over these units (the
    residual stream of a transformer or a ConvNeXt).  Keeping some of them apart turns that
    norm into a :class:`pleas.normalization.MergedLayerNorm` of two views, which costs several
    plain norms' time (a one-group GroupNorm has no such form and mixes the models'
    statistics: :func:`pleas.normalization.mixed_group_norms`), so the allocators keep such
    groups merged while other groups can take the width (:func:`pleas.plan.allocate`).
    """

    name: str
    size: int
    kind: str  # "hidden" | "input" | "output"
    axes: tuple[AxisRef, ...]
    sites: tuple[Site, ...] = ()
    head_dim: int = 0
    tie: str | None = None
    layer_norm: bool = False

    @property
    def num_heads(self) -> int:
        return self.size // self.head_dim if self.head_dim else 0


@dataclass(frozen=True)
class Layer:
    """A Conv/Linear layer, for least squares and for the compute model (MACs)."""

    module: str
    kind: str  # "conv" | "linear"
    weight: str
    bias: str | None
    in_group: str | None  # name of the group of its input channels (None: not a single group)
    out_group: str | None
    macs: int  # multiply-accumulates per sample of one model
    depthwise: bool = False  # cost scales with the output group only (depthwise/grouped, attention)
    out_parts: tuple[tuple[str, int], ...] = ()  # (group, row offset) when rows mix groups (qkv)
    norm: str | None = None  # the BatchNorm module that reads this layer's output directly
    split: bool = False  # the merged model runs it block by block (its type has a split rule)


@dataclass
class PermSpec:
    """The permutation structure of one architecture."""

    groups: list[Group]
    layers: list[Layer]
    unaligned: list[str] = field(default_factory=list)  # state-dict keys no group touches
    input_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}

    def group(self, name: str) -> Group:
        return self._by_name[name]

    @property
    def hidden(self) -> list[Group]:
        return [g for g in self.groups if g.kind == "hidden"]

    @property
    def output_group(self) -> Group | None:
        out = [g for g in self.groups if g.kind == "output"]
        return out[0] if out else None

    def axes_by_key(self) -> dict[str, list[tuple[Group, AxisRef]]]:
        found: dict[str, list[tuple[Group, AxisRef]]] = {}
        for g in self.groups:
            for ax in g.axes:
                found.setdefault(ax.key, []).append((g, ax))
        return found

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def describe(self) -> str:
        """A human-readable dump: groups, sizes, kinds, member parameters and sites."""
        lines = [f"PermSpec: {len(self.groups)} groups ({len(self.hidden)} hidden), "
                 f"{len(self.layers)} conv/linear layers, {self.total_macs:,} MACs per sample"]
        for g in self.groups:
            extra = f", blocks {g.num_heads}x{g.head_dim} (moved whole)" if g.head_dim else ""
            tie = f", tied to {g.tie}" if g.tie else ""
            norm = ", LayerNorm over it" if g.layer_norm else ""
            lines.append(f"- {g.name} [{g.kind}] size {g.size}{extra}{tie}{norm}")
            for ax in g.axes:
                sl = ""
                if ax.start or ax.outer > 1 or ax.inner > 1:
                    sl = f" slice@{ax.start} as ({ax.outer},{ax.size},{ax.inner})"
                if ax.blocks > 1:
                    sl += f" block-diagonal in {ax.blocks} conv groups"
                lines.append(f"    {ax.role:>3} {ax.key}[dim {ax.dim}]{sl}")
            for s in g.sites:
                lines.append(f"    site {s.module}:{s.io} dim {s.dim}")
        if self.unaligned:
            lines.append("unaligned (averaged as they are): " + ", ".join(self.unaligned))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- union-find


class _Vars:
    """Union-find over axis variables, with sizes and flags (input/output/frozen reasons)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.flags: list[set[str]] = []
        self.reasons: list[list[str]] = []

    def new(self, size: int, flag: str | None = None) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.size.append(int(size))
        self.flags.append({flag} if flag else set())
        self.reasons.append([])
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise SpecError(f"axis sizes {self.size[ra]} and {self.size[rb]} are linked at {where}")
        self.parent[rb] = ra
        self.flags[ra] |= self.flags[rb]
        self.reasons[ra] += self.reasons[rb]

    def flag(self, v: int, flag: str, reason: str | None = None) -> None:
        r = self.find(v)
        self.flags[r].add(flag)
        if reason:
            self.reasons[r].append(reason)


Segment = tuple[int, ...]  # factor variables, major first
Dim = tuple[Segment, ...]  # concatenated segments


@dataclass
class TensorDims:
    dims: list[Dim]

    @property
    def ndim(self) -> int:
        return len(self.dims)


# ----------------------------------------------------------------------------- the interpreter


class SpecBuilder:
    """Walks a traced graph once, applying one rule per node.  Rules live in the tables below."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, rules: ModuleRules | None = None):
        self.model = model
        self.gm = gm
        self.rules = rules if rules is not None else rules_for_call()
        self.vars = _Vars()
        self.param_vars: dict[tuple, int] = {}
        self.axes: list[tuple[int, AxisRef]] = []
        self.sites: list[tuple[int, Site, str]] = []  # (var, site, node that carries it)
        self.layers: list[dict] = []
        self.env: dict[str, Any] = {}
        self.node: fx.Node | None = None
        self.head_info: list[tuple[int, int, int, str]] = []  # (var, head_dim, tie var, where)

    # -- helpers used by rules ------------------------------------------------------------
    def input(self, i: int = 0) -> TensorDims:
        """The axes of the current node's ``i``-th argument, which must be a tensor."""
        v = self.value(self.node.args[i]) if len(self.node.args) > i else None
        if not isinstance(v, TensorDims):
            raise self.unsupported("expected a tensor input")
        return v

    def new_axis(self, size: int) -> int:
        """A fresh (permutable) axis variable of ``size`` units, e.g. a module's hidden units."""
        return self.vars.new(size)

    def tie(self, a: int, b: int) -> None:
        """Declare two axis variables the same axis (same permutation)."""
        self.vars.union(a, b, self.where())

    def add_slice_site(self, var: int, module: str, io: str, dim: int, size: int,
                       start: int = 0, name: str | None = None) -> None:
        """An activation site of ``var``: units ``[start, start + size)`` of axis ``dim`` of
        ``module``'s input (``io="in"``) or output (``"out"``); ``name`` tells sites apart."""
        self.sites.append((var, Site(module, io, dim, size, start), name or f"{module}:{start}"))

    def where(self) -> str:
        n = self.node
        return f"node '{n.name}' ({n.op} {_target_name(n.target)})" if n is not None else "?"

    def shape(self, node: fx.Node | None = None, index: int | None = None) -> tuple[int, ...]:
        node = node or self.node
        meta = node.meta.get("tensor_meta")
        if index is not None:
            meta = meta[index]
        if meta is None or not hasattr(meta, "shape"):
            raise SpecError(f"no shape recorded for {node.name}")
        return tuple(meta.shape)

    def fresh(self, shape: Sequence[int], flag: str = "structural") -> TensorDims:
        """New structural axes (spatial positions, tokens, broadcast axes): never permuted.

        A parameter axis tied to one (a position embedding's token axis) is kept as it is.
        """
        return TensorDims([((self.vars.new(s, flag),),) for s in shape])

    def structural(self, size: int) -> Dim:
        return self.fresh([size]).dims[0]

    def channel(self, size: int) -> Dim:
        """A new channel axis (a layer's output units): permutable once tied to parameters."""
        return ((self.vars.new(size),),)

    def dim_size(self, dim: Dim) -> int:
        return sum(math.prod(self.vars.size[self.vars.find(v)] for v in seg) for seg in dim)

    def plain(self, dim: Dim) -> int | None:
        """The variable of a plain (one segment, one non-trivial factor) dimension."""
        if len(dim) != 1:
            return None
        factors = [v for v in dim[0] if self.vars.size[self.vars.find(v)] != 1]
        if len(factors) == 1:
            return factors[0]
        return None

    def link(self, a: Dim, b: Dim) -> None:
        """Declare two tensor dims the same axis."""
        fa, fb = self._factor_list(a), self._factor_list(b)
        if [s for s, _ in fa] == [s for s, _ in fb]:
            for (_, va), (_, vb) in zip(fa, fb):
                self.vars.union(va, vb, self.where())
            return
        flags = set().union(*(self.vars.flags[self.vars.find(v)] for d in (a, b)
                              for seg in d for v in seg))
        if flags & {"input", "structural"}:
            # e.g. a position embedding added to [cls | patch tokens]: positions, kept as they are
            for d in (a, b):
                for seg in d:
                    for v in seg:
                        self.vars.flag(v, "structural")
            return
        self.freeze_dim(a, f"axes of different structure linked at {self.where()}")
        self.freeze_dim(b, f"axes of different structure linked at {self.where()}")

    def _factor_list(self, dim: Dim) -> list[tuple[tuple[int, int], int]]:
        out = []
        for si, seg in enumerate(dim):
            for v in seg:
                size = self.vars.size[self.vars.find(v)]
                if size != 1:
                    out.append(((si, size), v))
        return out

    def freeze_dim(self, dim: Dim, reason: str) -> None:
        for seg in dim:
            for v in seg:
                self.vars.flag(v, "frozen", reason)

    def param_axis(self, key: str, dim: int, size: int, role: str, start: int = 0,
                   outer: int = 1, inner: int = 1, blocks: int = 1) -> int:
        """The variable of one (sliced) axis of a parameter; creates it on first use."""
        ident = (key, dim, start, outer, inner, blocks)
        if ident not in self.param_vars:
            v = self.vars.new(size)
            self.param_vars[ident] = v
            self.axes.append((v, AxisRef(key, dim, role, size, start, outer, inner, blocks)))
        return self.param_vars[ident]

    def layer_normalised(self, dim: Dim) -> None:
        """A LayerNorm (or a one-group GroupNorm) normalises over ``dim``'s units
        (:attr:`Group.layer_norm`)."""
        var = self.plain(dim)
        if var is not None:
            self.vars.flag(var, "layer_norm")

    def blocks_of(self, var: int, head_dim: int, tie: int) -> None:
        """Units of ``var`` come in blocks of ``head_dim`` that move as wholes, in the same
        block order as the units of ``tie`` (attention heads, grouped-convolution channels)."""
        self.head_info.append((var, int(head_dim), tie, self.where()))

    def link_param(self, tdim: Dim, key: str, pdim: int, role: str) -> None:
        """Tie a tensor dim to a parameter axis, segment by segment and factor by factor."""
        start = 0
        for seg in tdim:
            sizes = [self.vars.size[self.vars.find(v)] for v in seg]
            for i, v in enumerate(seg):
                if sizes[i] == 1 or self.vars.flags[self.vars.find(v)] & {"frozen", "structural"}:
                    continue  # spatial positions flattened into features are not units
                outer, inner = math.prod(sizes[:i]), math.prod(sizes[i + 1:])
                pv = self.param_axis(key, pdim, sizes[i], role, start, outer, inner)
                self.vars.union(pv, v, self.where())
            start += math.prod(sizes)

    def add_site(self, tdim: Dim, module: str, io: str, dim: int) -> None:
        start = 0
        for seg in tdim:
            sizes = [self.vars.size[self.vars.find(v)] for v in seg]
            for i, v in enumerate(seg):
                if sizes[i] > 1:
                    site = Site(module, io, dim, sizes[i], start, math.prod(sizes[:i]),
                                math.prod(sizes[i + 1:]))
                    self.sites.append((v, site, self.node.args[0].name
                                       if self.node.args and isinstance(self.node.args[0], fx.Node)
                                       else self.node.name))
            start += math.prod(sizes)

    def module_path(self) -> str | None:
        n = self.node
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            return list(stack.keys())[-1] if isinstance(stack, dict) else None
        return None

    def unsupported(self, detail: str = "") -> UnsupportedOpError:
        n = self.node
        op = _target_name(n.target)
        if n.op == "call_module":
            op = f"{type(self.gm.get_submodule(n.target)).__name__} (module)"
        return UnsupportedOpError(n.name, f"{n.op} {op}", self.module_path(), detail)

    def value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg.name]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            self.env[node.name] = self._visit(node)

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                return None
            return self.fresh(meta.shape, flag="input")
        if node.op == "get_attr":
            return self._get_attr(node)
        if node.op == "output":
            for td in _flatten_values(self.value(node.args[0])):
                for d in td.dims:
                    for seg in d:
                        for v in seg:
                            self.vars.flag(v, "output")
            return None
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            rule = self.rules.lookup(mod, "spec")
            if rule is None:
                raise self.unsupported()
            return rule(self, mod, str(node.target))
        if node.op == "call_function":
            rule = _FUNCTION_RULES.get(node.target)
            if rule is None:
                raise self.unsupported()
            return rule(self)
        if node.op == "call_method":
            rule = _METHOD_RULES.get(node.target)
            if rule is None:
                raise self.unsupported()
            return rule(self)
        raise self.unsupported()

    def _get_attr(self, node: fx.Node) -> Any:
        obj = _fetch_attr(self.gm, str(node.target))
        if not isinstance(obj, torch.Tensor):
            return None
        key = str(node.target)
        dims = []
        for d, s in enumerate(obj.shape):
            v = self.vars.new(1) if s == 1 else self.param_axis(key, d, s, "out")
            dims.append(((v,),))
        return TensorDims(dims)

    # -- layer records ---------------------------------------------------------------------
    def record_layer(self, module: str, kind: str, weight: str, bias: str | None,
                     in_dim: Dim | None, out_dim: Dim, macs: int, depthwise: bool = False,
                     out_parts: tuple = ()) -> None:
        norm = None
        users = list(self.node.users) if self.node is not None else []
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                self.gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm):
            norm = str(users[0].target)
        in_var = self.plain(in_dim) if in_dim is not None else None
        if in_dim is not None and in_var is None and self.dim_size(in_dim) == 1:
            in_var = SHARED  # a single input channel: nothing to permute, both models read it
        self.layers.append(dict(module=module, kind=kind, weight=weight, bias=bias,
                                in_var=in_var,
                                out_var=self.plain(out_dim), macs=int(macs), depthwise=depthwise,
                                out_parts=out_parts, norm=norm))


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or repr(target)
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod and mod not in ("builtins", "_operator") else name


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten_values(v: Any) -> Iterable[TensorDims]:
    if isinstance(v, TensorDims):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _flatten_values(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _flatten_values(x)


# ----------------------------------------------------------------------------- function rules

def _flatten(b: SpecBuilder, x: TensorDims, start: int, end: int) -> TensorDims:
    start, end = start % x.ndim, end % x.ndim
    merged: list[int] = []
    for d in x.dims[start:end + 1]:
        if len(d) != 1:
            if b.dim_size(d) == 1:
                continue
            b.freeze_dim(d, f"flatten of a concatenated axis at {b.where()}")
            merged.append(b.structural(b.dim_size(d))[0][0])
            continue
        merged.extend(d[0])
    return TensorDims(list(x.dims[:start]) + [(tuple(merged),)] + list(x.dims[end + 1:]))


def _reshape_to(b: SpecBuilder, x: TensorDims, out_shape: Sequence[int]) -> TensorDims:
    """General reshape: match groups of input and output dims with equal products."""
    in_sizes = [b.dim_size(d) for d in x.dims]
    out_dims: list[Dim] = []
    i = j = 0
    out_shape = list(out_shape)
    while i < len(in_sizes) or j < len(out_shape):
        if i < len(in_sizes) and in_sizes[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_sizes) or in_sizes[i] != 1):
            out_dims.append(((b.vars.new(1),),))
            j += 1
            continue
        i0, j0 = i, j
        pi, pj = in_sizes[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= in_sizes[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        src = x.dims[i0:i]
        dst_sizes = out_shape[j0:j]
        if len(src) == 1 and len(dst_sizes) == 1:
            out_dims.append(src[0])
        elif len(dst_sizes) == 1:  # merge dims
            out_dims.append(_flatten(b, TensorDims(list(src)), 0, -1).dims[0])
        else:  # split one or more dims: only where the factors line up exactly
            factors: list[int] = []
            ok = True
            for d in src:
                if len(d) != 1:
                    ok = False
                    break
                factors.extend(v for v in d[0] if b.vars.size[b.vars.find(v)] != 1)
            pieces: list[Dim] = []
            k = 0
            for s in dst_sizes:
                seg: list[int] = []
                p = 1
                while ok and p < s and k < len(factors):
                    p *= b.vars.size[b.vars.find(factors[k])]
                    seg.append(factors[k])
                    k += 1
                if p != s:
                    ok = False
                pieces.append((tuple(seg) if seg else (b.vars.new(1),),))
            if not ok or k != len(factors):
                for d in src:
                    b.freeze_dim(d, f"reshape splits an axis at {b.where()}")
                pieces = [b.structural(s) for s in dst_sizes]
            out_dims.extend(pieces)
    return TensorDims(out_dims)


def _elementwise(b: SpecBuilder) -> TensorDims:
    tensors = [v for v in (b.value(a) for a in b.node.args) if isinstance(v, TensorDims)]
    tensors += [v for v in (b.value(a) for a in b.node.kwargs.values()) if isinstance(v, TensorDims)]
    if not tensors:
        return None
    out_shape = b.shape()
    out = b.fresh(out_shape)
    for k in range(1, len(out_shape) + 1):
        cands = [t.dims[-k] for t in tensors
                 if t.ndim >= k and b.dim_size(t.dims[-k]) == out_shape[-k]]
        if not cands:
            continue
        out.dims[-k] = cands[0]
        for c in cands[1:]:
            b.link(cands[0], c)
    return out


def _unary(b: SpecBuilder) -> TensorDims:
    x = b.value(b.node.args[0])
    if not isinstance(x, TensorDims):
        raise b.unsupported("expected a tensor input")
    return x


def _none(b: SpecBuilder) -> None:
    return None


def _arg(b: SpecBuilder, i: int, name: str, default: Any = None) -> Any:
    if len(b.node.args) > i:
        return b.value(b.node.args[i])
    return b.value(b.node.kwargs.get(name, default))


def _flatten_fn(b: SpecBuilder) -> TensorDims:
    return _flatten(b, _input(b), _arg(b, 1, "start_dim", 0), _arg(b, 2, "end_dim", -1))


def _reshape_fn(b: SpecBuilder) -> TensorDims:
    return _reshape_to(b, _input(b), b.shape())


def _reduce_fn(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    dim = _arg(b, 1, "dim", None)
    keepdim = bool(_arg(b, 2, "keepdim", False))
    if dim is None:
        return TensorDims([])
    dims = {d % x.ndim for d in ([dim] if isinstance(dim, int) else dim)}
    if keepdim:
        return TensorDims([((b.vars.new(1),),) if i in dims else d for i, d in enumerate(x.dims)])
    return TensorDims([d for i, d in enumerate(x.dims) if i not in dims])


def _pool_fn(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    out = b.fresh(b.shape())
    out.dims[0], out.dims[1] = x.dims[0], x.dims[1]
    return out


def _cat_fn(b: SpecBuilder) -> TensorDims:
    xs = [v for v in _arg(b, 0, "tensors")]
    dim = _arg(b, 1, "dim", 0)
    dim = dim % xs[0].ndim
    out = TensorDims(list(xs[0].dims))
    for i in range(xs[0].ndim):
        if i != dim:
            for x in xs[1:]:
                b.link(xs[0].dims[i], x.dims[i])
    out.dims[dim] = tuple(seg for x in xs for seg in x.dims[dim])
    return out


def _permute_fn(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    order = [b.value(a) for a in b.node.args[1:]]
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = list(order[0])
    if not order:
        order = list(b.value(b.node.kwargs.get("dims")))
    return TensorDims([x.dims[o % x.ndim] for o in order])


def _transpose_fn(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    d0, d1 = _arg(b, 1, "dim0") % x.ndim, _arg(b, 2, "dim1") % x.ndim
    dims = list(x.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TensorDims(dims)


def _expand_fn(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    out_shape = b.shape()
    lead = len(out_shape) - x.ndim
    dims: list[Dim] = [b.structural(s) for s in out_shape[:lead]]
    for i, d in enumerate(x.dims):
        s = out_shape[lead + i]
        dims.append(d if b.dim_size(d) == s else b.structural(s))
    return TensorDims(dims)


def _getitem_fn(b: SpecBuilder) -> Any:
    x = b.value(b.node.args[0])
    idx = b.node.args[1]
    if not isinstance(x, TensorDims):
        if isinstance(x, (list, tuple)) and isinstance(idx, int):
            return x[idx]
        return None  # shapes and other python values
    if not isinstance(idx, tuple):
        idx = (idx,)
    out: list[Dim] = []
    d = 0
    for item in idx:
        if item is Ellipsis:
            rest = len([i for i in idx if i is not None and i is not Ellipsis])
            skip = x.ndim - rest
            out.extend(x.dims[d:d + skip])
            d += skip
        elif item is None:
            out.append(((b.vars.new(1),),))
        elif isinstance(item, int):
            b.freeze_dim(x.dims[d], f"indexing picks one unit at {b.where()}")
            d += 1
        elif isinstance(item, slice):
            if item == slice(None):
                out.append(x.dims[d])
            else:
                b.freeze_dim(x.dims[d], f"slicing picks some units at {b.where()}")
                out.append(b.structural(b.shape()[len(out)]))
            d += 1
        else:
            raise b.unsupported(f"indexing with {type(item).__name__}")
    out.extend(x.dims[d:])
    return TensorDims(out)


def _getattr_fn(b: SpecBuilder) -> Any:
    x = b.value(b.node.args[0])
    attr = b.node.args[1]
    if isinstance(x, TensorDims) and attr in ("shape", "dtype", "device", "ndim", "is_cuda"):
        return None
    if isinstance(x, TensorDims) and attr == "T":
        return TensorDims(list(reversed(x.dims)))
    if x is None:
        return None
    raise b.unsupported(f"attribute {attr!r}")


def _matmul_fn(b: SpecBuilder) -> TensorDims:
    x, y = _input(b, 0), _input(b, 1)
    if x.ndim < 2 or y.ndim < 2:
        raise b.unsupported("matmul of vectors")
    b.link(x.dims[-1], y.dims[-2])
    out_shape = b.shape()
    out = b.fresh(out_shape)
    batch_x, batch_y = x.dims[:-2], y.dims[:-2]
    for k in range(1, len(out_shape) - 1):
        cands = [t[-k] for t in (batch_x, batch_y) if len(t) >= k
                 and b.dim_size(t[-k]) == out_shape[-2 - k]]
        if cands:
            out.dims[-2 - k] = cands[0]
            for c in cands[1:]:
                b.link(cands[0], c)
    out.dims[-2], out.dims[-1] = x.dims[-2], y.dims[-1]
    return out


def _sdpa_fn(b: SpecBuilder) -> TensorDims:
    q, k, v = _input(b, 0), _input(b, 1), _input(b, 2)
    b.link(q.dims[-1], k.dims[-1])  # q.k^T contracts the head dim
    b.link(k.dims[-2], v.dims[-2])  # keys and values share the token axis
    for i in range(q.ndim - 2):
        b.link(q.dims[i], k.dims[i])
        b.link(q.dims[i], v.dims[i])
    return TensorDims(list(q.dims[:-1]) + [v.dims[-1]])


def _functional_linear(b: SpecBuilder) -> TensorDims:
    x = _input(b)
    w, bias = _arg(b, 1, "weight"), _arg(b, 2, "bias")
    out = TensorDims(list(x.dims))
    if not isinstance(w, TensorDims):
        raise b.unsupported("F.linear with a computed weight")
    b.link(x.dims[-1], w.dims[1])
    out.dims[-1] = w.dims[0]
    if isinstance(bias, TensorDims):
        b.link(w.dims[0], bias.dims[0])
    return out


def _functional_norm(b: SpecBuilder, channel_dim: int) -> TensorDims:
    x = _input(b)
    for key, val in b.node.kwargs.items():
        t = b.value(val)
        if isinstance(t, TensorDims) and t.ndim == 1:
            b.link(x.dims[channel_dim], t.dims[0])
    for a in b.node.args[1:]:
        t = b.value(a)
        if isinstance(t, TensorDims) and t.ndim == 1:
            b.link(x.dims[channel_dim], t.dims[0])
    return x


def _layer_norm_fn(b: SpecBuilder) -> TensorDims:
    shape = _arg(b, 1, "normalized_shape")
    if shape is not None and len(shape) != 1:
        raise b.unsupported("layer_norm over more than one axis")
    x = _functional_norm(b, -1)
    b.layer_normalised(x.dims[-1])
    return x


def _split_fn(b: SpecBuilder) -> tuple:
    x = _input(b)
    dim = _arg(b, 2, "dim", 0) % x.ndim
    metas = b.node.meta.get("tensor_meta")
    outs = []
    b.freeze_dim(x.dims[dim], f"split of an axis at {b.where()}")
    for m in metas:
        dims = list(x.dims)
        dims[dim] = b.structural(m.shape[dim])
        outs.append(TensorDims(dims))
    return tuple(outs)


def _unbind_fn(b: SpecBuilder) -> tuple:
    x = _input(b)
    dim = _arg(b, 1, "dim", 0) % x.ndim
    b.freeze_dim(x.dims[dim], f"unbind of an axis at {b.where()}")
    n = b.dim_size(x.dims[dim])
    return tuple(TensorDims([d for i, d in enumerate(x.dims) if i != dim]) for _ in range(n))


def _squeeze_fn(b: SpecBuilder) -> TensorDims:
    return _reshape_to(b, _input(b), b.shape())


def _size_fn(b: SpecBuilder) -> None:
    return None


FunctionRule = Callable[[SpecBuilder], Any]
_FUNCTION_RULES: dict[Any, FunctionRule] = {}
_METHOD_RULES: dict[str, FunctionRule] = {}


def register_function_rule(fn: Any, rule: FunctionRule) -> None:
    """The rule of a traced function call (``torch.cat``, ``operator.add``, ``F.relu`` ...)."""
    _FUNCTION_RULES[fn] = rule


def register_method_rule(name: str, rule: FunctionRule) -> None:
    """The rule of a traced tensor method call (``x.view``, ``x.mean`` ...)."""
    _METHOD_RULES[name] = rule


def register_module_rule(module_type: type, rule: Callable | None = None):
    """The spec rule of a module type (same as ``pleas.register_module(T, spec=rule)``)."""
    return register_module(module_type, spec=rule) if rule is not None \
        else register_module(module_type)


def _input(b: SpecBuilder, i: int = 0) -> TensorDims:
    return b.input(i)

for _f in (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
           operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div,
           torch.maximum, torch.minimum, torch.where):
    _FUNCTION_RULES[_f] = _elementwise
for _f in (torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, F.tanh,
           torch.tanh, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish, F.softplus,
           F.dropout, F.dropout1d, F.dropout2d, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
           operator.neg, torch.neg, torch.clamp, torch.erf, F.hardtanh, torch.square,
           torch.nn.functional.relu_, torch.softmax, F.softmax):
    _FUNCTION_RULES[_f] = _unary
_FUNCTION_RULES.update({
    torch.flatten: _flatten_fn,
    torch.reshape: _reshape_fn,
    torch.cat: _cat_fn,
    torch.concat: _cat_fn,
    torch.mean: _reduce_fn,
    torch.sum: _reduce_fn,
    torch.amax: _reduce_fn,
    torch.permute: _permute_fn,
    torch.transpose: _transpose_fn,
    torch.matmul: _matmul_fn,
    operator.matmul: _matmul_fn,
    torch.bmm: _matmul_fn,
    F.scaled_dot_product_attention: _sdpa_fn,
    F.adaptive_avg_pool2d: _pool_fn,
    F.adaptive_max_pool2d: _pool_fn,
    F.avg_pool2d: _pool_fn,
    F.max_pool2d: _pool_fn,
    F.interpolate: _pool_fn,
    F.linear: _functional_linear,
    F.layer_norm: _layer_norm_fn,
    F.batch_norm: lambda b: _functional_norm(b, 1),
    operator.getitem: _getitem_fn,
    getattr: _getattr_fn,
    torch.split: _split_fn,
    torch.chunk: _split_fn,
    torch.unbind: _unbind_fn,
    torch.squeeze: _squeeze_fn,
    torch.unsqueeze: _squeeze_fn,
    torch._assert: _none,
    fx._symbolic_trace._assert_is_none: _none,
    operator.eq: _none,
    operator.floordiv: _none,
})
try:  # timm wraps its asserts and a few helpers so that they survive tracing
    import timm.layers as _tl  # noqa: F401
    from torch.fx import wrap  # noqa: F401
    import timm.models.vision_transformer as _tvit
    for _name in ("_assert",):
        if hasattr(_tvit, _name):
            _FUNCTION_RULES[getattr(_tvit, _name)] = _none
except Exception:  # pragma: no cover - timm is a hard dependency, but keep spec usable without
    pass

for _m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float",
           "double", "half", "to", "type_as", "detach", "exp", "sqrt", "rsqrt", "abs", "neg",
           "clamp", "clamp_", "softmax", "pow", "square"):
    _METHOD_RULES[_m] = _unary
for _m in ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "__add__", "__mul__"):
    _METHOD_RULES[_m] = _elementwise
_METHOD_RULES.update({
    "flatten": _flatten_fn,
    "view": _reshape_fn,
    "reshape": _reshape_fn,
    "mean": _reduce_fn,
    "sum": _reduce_fn,
    "amax": _reduce_fn,
    "permute": _permute_fn,
    "transpose": _transpose_fn,
    "expand": _expand_fn,
    "size": _size_fn,
    "dim": _size_fn,
    "split": _split_fn,
    "chunk": _split_fn,
    "unbind": _unbind_fn,
    "squeeze": _squeeze_fn,
    "unsqueeze": _squeeze_fn,
    "matmul": _matmul_fn,
})


# ----------------------------------------------------------------------------- tracing


class _LeafTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules plus every module type with a rule.

    A subclass defined outside torch.nn of a type with a rule (timm's LayerNorm2d subclasses
    nn.LayerNorm but permutes its input) is traced through, unless it has a rule of its own.
    """

    def __init__(self, rules: ModuleRules):
        super().__init__()
        self.rules = rules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        owner = self.rules.lookup_class(m, "spec")
        if owner is type(m) or (owner is not None and type(m).__module__.startswith("torch.nn")):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, rules: ModuleRules | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``; optional forward arguments are fixed to their defaults."""
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    tracer = _LeafTracer(rules if rules is not None else rules_for_call())
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:  # fx raises many kinds; give one clear message
        raise SpecError(f"torch.fx could not trace {type(model).__name__}: {err}") from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def derive_spec(model: nn.Module, example_input: torch.Tensor | Sequence[int],
                rules: Any = None) -> PermSpec:
    """Derive the permutation spec of ``model`` from a trace and one example input shape.

    ``rules``: per-call module rules (:mod:`pleas.registry`) that override the global ones.
    """
    rules = rules_for_call(rules)
    given, model = model, replaced(model, rules)  # a copy where a module needs its replace rule
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.zeros(tuple(example_input))
    was_training = model.training
    model.eval()
    gm = trace(model, rules)
    param = next(iter(model.parameters()), None)
    x = example_input.to(param.device if param is not None else "cpu",
                         param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        try:  # a wrong input shape, mostly: one clear line instead of a trace of the fx graph
            model(x)
        except Exception as err:
            model.train(was_training)
            raise SpecError(f"{type(model).__name__} does not run on an input of shape "
                            f"{tuple(x.shape)}: {err}") from err
        ShapeProp(gm).propagate(*_shape_args(gm, x, model))
    model.train(was_training)
    b = SpecBuilder(model, gm, rules)
    b.run()
    spec = _finalise(b, model, tuple(example_input.shape))
    return spec if model is given else _renamed(spec, original_key_map(model))


def _renamed(spec: PermSpec, names: dict[str, str]) -> PermSpec:
    """``spec`` with state-dict keys renamed (those of replaced modules, back to the keys of
    the model the spec was asked for); module paths (sites, layers) stay pleas' own."""
    if not names:
        return spec
    key = lambda k: names.get(k, k)  # noqa: E731
    groups = [replace(g, axes=tuple(replace(a, key=key(a.key)) for a in g.axes))
              for g in spec.groups]
    layers = [replace(l, weight=key(l.weight), bias=None if l.bias is None else key(l.bias))
              for l in spec.layers]
    return PermSpec(groups, layers, [key(k) for k in spec.unaligned], spec.input_shape)


def _shape_args(gm: fx.GraphModule, x: torch.Tensor, model: nn.Module) -> list:
    """The example input, then the fixed defaults of the forward's optional arguments."""
    holders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return [x] + [node.args[0] if node.args else None for node in holders[1:]]


def _finalise(b: SpecBuilder, model: nn.Module, input_shape: tuple[int, ...]) -> PermSpec:
    V = b.vars
    by_root: dict[int, list[AxisRef]] = {}
    for v, ax in b.axes:
        by_root.setdefault(V.find(v), []).append(ax)
    state_keys = list(model.state_dict().keys())
    order = {k: i for i, k in enumerate(state_keys)}
    roots = sorted(by_root, key=lambda r: min((order.get(a.key, 1 << 30), a.dim)
                                              for a in by_root[r]))
    head_dim, tie_root, block_where = _block_structure(b, roots, by_root)
    groups: list[Group] = []
    root_name: dict[int, str] = {}
    used_names: set[str] = set()
    for r in roots:
        axes = tuple(sorted(by_root[r], key=lambda a: (order.get(a.key, 1 << 30), a.dim, a.start)))
        flags = V.flags[r]
        if flags & {"input", "structural"}:
            kind = "input"  # fixed: both models see / keep these axes as they are
        elif "output" in flags:
            kind = "output"
        else:
            kind = "hidden"
        if kind == "hidden" and "frozen" in flags:
            reasons = "; ".join(dict.fromkeys(V.reasons[r]))
            keys = ", ".join(sorted({a.key for a in axes})[:4])
            raise SpecError(f"units of parameters {keys} cannot be permuted: {reasons}. "
                            "Register a rule for the module that does this.")
        name = _group_name(axes, kind, used_names)
        used_names.add(name)
        root_name[r] = name
        sites = []
        seen_nodes = set()
        for v, site, node_name in b.sites:
            if V.find(v) == r and node_name not in seen_nodes:
                seen_nodes.add(node_name)
                sites.append(site)
        groups.append(Group(name, V.size[r], kind, axes, tuple(sites), head_dim.get(r, 0),
                            tie_root.get(r), "layer_norm" in flags))
        if r in head_dim and kind != "hidden":
            raise SpecError(f"the {kind} axis (group {name}) would have to move in blocks of "
                            f"{head_dim[r]} ({block_where[r]}); blocks of the model's input or "
                            "output units are not supported")
    layers = []
    for rec in b.layers:
        in_group = (SHARED if rec["in_var"] == SHARED else root_name.get(V.find(rec["in_var"]))
                    if rec["in_var"] is not None else None)
        out_group = root_name.get(V.find(rec["out_var"])) if rec["out_var"] is not None else None
        parts = tuple((root_name[V.find(v)], off) for v, off in rec["out_parts"])
        layers.append(Layer(rec["module"], rec["kind"], rec["weight"], rec["bias"], in_group,
                            out_group, rec["macs"], rec["depthwise"], parts, rec["norm"],
                            _splits(b, rec)))
    groups = [g if g.tie is None else replace(g, tie=root_name[g.tie]) for g in groups]
    _check_ties(groups)
    touched = {a.key for g in groups for a in g.axes}
    unaligned = [k for k in state_keys if k not in touched
                 and not k.endswith("num_batches_tracked")]
    return PermSpec(groups, layers, unaligned, input_shape)


def _splits(b: SpecBuilder, rec: dict) -> bool:
    """Whether the merged model runs this layer block by block: a dense (not grouped) layer
    whose module type has a ``split`` rule (:mod:`pleas.blockwise`)."""
    if rec["depthwise"]:
        return False
    try:
        mod = b.model.get_submodule(rec["module"])
    except AttributeError:  # a functional layer: no module to split
        return False
    owner = b.rules.lookup_class(mod, "split")  # like the tracer: a subclass from outside
    return owner is type(mod) or (owner is not None  # torch.nn may compute differently
                                  and type(mod).__module__.startswith("torch.nn"))


def _block_structure(b: SpecBuilder, roots: list[int],
                     by_root: dict[int, list[AxisRef]]
                     ) -> tuple[dict[int, int], dict[int, int], dict[int, str]]:
    """Block size of every block-structured group root, the root leading its tie class, and
    where the structure was declared (for errors).

    Ties chain (a grouped conv's output read by another grouped conv), so tie classes are a
    small union-find of their own; the leader is the class member that comes first in the
    spec.  Two rules asking for different block sizes of one group is an error.
    """
    V = b.vars
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        parent.setdefault(r, r)
        while parent[r] != r:
            r = parent[r]
        return r

    head_dim: dict[int, int] = {}
    where: dict[int, str] = {}
    for var, hd, tie, at in b.head_info:
        r = V.find(var)
        if head_dim.get(r, hd) != hd:
            keys = ", ".join(sorted({a.key for a in by_root.get(r, [])})[:3])
            raise SpecError(f"units of {keys or 'a hidden axis'} would move in blocks of "
                            f"{head_dim[r]} ({where[r]}) and of {hd} ({at}); an axis that "
                            "grouped convolutions, GroupNorm or attention split into blocks of "
                            "different sizes is not supported")
        if V.size[r] % hd:
            raise SpecError(f"{V.size[r]} units cannot form blocks of {hd} ({at})")
        head_dim[r], where[r] = hd, at
        ra, rb = find(r), find(V.find(tie))
        if ra != rb:
            parent[rb] = ra
    leader: dict[int, int] = {}
    for r in roots:  # spec order
        if r in head_dim:
            leader.setdefault(find(r), r)
    return head_dim, {r: leader[find(r)] for r in head_dim if find(r) in leader}, where


def _check_ties(groups: list[Group]) -> None:
    """Tied groups share a block order, so they must have the same number of blocks."""
    count: dict[str, tuple[str, int]] = {}
    for g in groups:
        if g.tie:
            name, n = count.setdefault(g.tie, (g.name, g.num_heads))
            if n != g.num_heads:
                raise SpecError(f"groups {name} and {g.name} share a block order but have {n} "
                                f"and {g.num_heads} blocks")


def _group_name(axes: Sequence[AxisRef], kind: str, used: set[str]) -> str:
    if kind == "input":
        base = "input"
    elif kind == "output":
        base = "classes"
    else:
        outs = [a for a in axes if a.role == "out"] or list(axes)
        key = outs[0].key
        base = key.rsplit(".", 1)[0] if "." in key else key
    name, i = base, 2
    while name in used:
        name = f"{base}#{i}"
        i += 1
    return name


from . import module_rules as _builtin_module_rules  # noqa: E402,F401  (registers them)
