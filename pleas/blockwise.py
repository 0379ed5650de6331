"""Block-structured execution: the merged model multiplies only its non-zero weight blocks.

Why: the widened model of :mod:`pleas.widen` is a plain dense network.  Its A-only units never
read B-only units and vice versa, so a dense layer multiplies structural zero blocks: at a
nominal width of 1.5 a ResNet-20 merge would cost 1.68x one model, at width 2 almost 4x.  This
module turns the finished dense model (after least squares and the BatchNorm reset, which work
on the dense form) into one that runs exactly the blocks the compute model of
:mod:`pleas.plan` counts, so that ``--width`` is what the saved model executes.

How.  Every hidden group's units are reordered [A-only | merged | B-only] (a permutation of
the widened units, so the function is unchanged: :func:`reorder`).  A layer's output rows then
fall into at most three classes by the input columns they may read: merged rows read all
columns, A-only rows the contiguous prefix [A-only | merged], B-only rows the suffix
[merged | B-only] (columns of units both models share count as merged).  :class:`Layout`
records that; :class:`BlockLayer` runs one standard ``nn.Conv*`` / ``nn.Linear`` piece per
class on its slice of the input and concatenates the pieces' rows in order.  Only slicing,
standard layers and ``torch.cat``: it traces with torch.fx, runs on CPU and CUDA and exports.
Layers whose rows all read every column (one model's width, an input shared by both models)
stay as they are, so width 1 is one plain model and width 2 two models side by side.

Grouped and depthwise convolutions, attention heads and GroupNorm groups already run per block
(their blocks move whole, so the reordering keeps them intact).  A :class:`MergedLayerNorm`
keeps its two views (A's a prefix, B's a suffix of the reordered stream); with nothing kept
apart it is a plain LayerNorm.
A module type is split by its registered ``split`` rule (:mod:`pleas.registry`); types without
one stay dense and :func:`pleas.plan.plan_cost` counts them dense.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .normalization import LayerNormDim, MergedLayerNorm
from .permute import permute_state_dict
from .plan import GroupPlan, Plan
from .registry import register_module, rules_for_call
from .spec import PermSpec

BOTH, A_ONLY, B_ONLY = 0, 1, 2  # unit kinds; K models: k + 1 = kept from model k alone
Run = tuple[int, int]  # [start, stop)


# ----------------------------------------------------------------------------- unit order


def unit_kinds(p: GroupPlan) -> torch.Tensor:
    """Per new unit: BOTH (merged or shared), A_ONLY or B_ONLY (K models: k + 1 for a unit
    kept from model k)."""
    return p.kinds()


def kind_order(models: int) -> tuple[int, ...]:
    """[A-only | merged | B-only]: A's rows read a prefix, B's a suffix (K > 2 models: then
    the units kept from models 3..K, whose rows read the merged run and their own)."""
    return (A_ONLY, BOTH) + tuple(range(B_ONLY, models + 1))


def block_order(p: GroupPlan) -> torch.Tensor:
    """The permutation to the :func:`kind_order`; stable, so whole blocks stay whole."""
    k = unit_kinds(p)
    return torch.cat([torch.nonzero(k == kind).flatten() for kind in kind_order(p.models)])


def widened_spec(spec: PermSpec, plan: Plan, extra_keys: dict[str, list[str]] | None = None
                 ) -> PermSpec:
    """``spec`` with every axis at its widened size and offset, for permuting widened tensors.

    ``extra_keys`` maps a key to more keys laid out like it along dim 0 (a merged LayerNorm's
    view shares follow its weight).
    """
    items: dict[tuple[str, int], list] = {}
    for g in spec.groups:
        for ax in g.axes:
            items.setdefault((ax.key, ax.dim), []).append((g, ax))
    new_axes: dict[str, list] = {g.name: [] for g in spec.groups}
    for refs in items.values():
        shift = 0
        for g, ax in sorted(refs, key=lambda t: t[1].start):
            size = plan[g.name].size if g.name in plan else g.size
            blocks = ax.blocks if ax.blocks == 1 else size // (ax.size // ax.blocks)
            new = replace(ax, size=size, start=ax.start + shift, blocks=blocks)
            new_axes[g.name].append(new)
            for key in (extra_keys or {}).get(ax.key, []) if ax.dim == 0 else []:
                new_axes[g.name].append(replace(new, key=key))
            shift += ax.outer * (size - ax.size) * ax.inner
    groups = [replace(g, size=plan[g.name].size if g.name in plan else g.size,
                      axes=tuple(new_axes[g.name]), sites=()) for g in spec.groups]
    return PermSpec(groups, list(spec.layers), list(spec.unaligned), spec.input_shape)


def reorder(state: dict[str, torch.Tensor], spec: PermSpec, plan: Plan
            ) -> tuple[dict[str, torch.Tensor], Plan]:
    """The widened state with every hidden group in [A-only | merged | B-only] order, and the
    plan in that order (the same function: a permutation of each group's units)."""
    shares = {k[: -len("share_a")] + "weight": [k, k[:-1] + "b"] for k in state
              if k.endswith(".share_a")}
    perms = {g.name: block_order(plan[g.name]) for g in spec.hidden}
    perms = {n: p for n, p in perms.items() if not torch.equal(p, torch.arange(p.numel()))}
    new_plan = dict(plan)
    for name, p in perms.items():
        new_plan[name] = plan[name].take(p)
    if not perms:
        return dict(state), new_plan
    return permute_state_dict(state, widened_spec(spec, plan, shares), perms), new_plan


# ----------------------------------------------------------------------------- layouts


def runs(mask: torch.Tensor) -> tuple[Run, ...]:
    """The maximal runs of True in a bool vector, as [start, stop) pairs."""
    idx = torch.nonzero(mask).flatten().tolist()
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def _length(rs: tuple[Run, ...]) -> int:
    return sum(b - a for a, b in rs)


def _index(rs: tuple[Run, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in rs])


@dataclass(frozen=True)
class Piece:
    """Output rows ``rows`` computed from input columns ``cols`` (both as sorted runs)."""

    rows: tuple[Run, ...]
    cols: tuple[Run, ...]


@dataclass(frozen=True)
class Layout:
    """How one widened layer of ``rows`` x ``cols`` runs: one piece per class of rows."""

    rows: int
    cols: int
    pieces: tuple[Piece, ...]

    def assembly(self) -> list[tuple[int, int, int]] | None:
        """Row runs in output order as (piece, offset in its output, length); None when the
        pieces' outputs simply follow each other."""
        found = []
        for i, p in enumerate(self.pieces):
            offset = 0
            for a, b in p.rows:
                found.append((a, i, offset, b - a))
                offset += b - a
        found.sort()
        if [i for _, i, _, _ in found] == list(range(len(self.pieces))):
            return None
        return [(i, off, n) for _, i, off, n in found]

    @property
    def diagonal_groups(self) -> int:
        """g when the pieces are g equal diagonal blocks in order (piece i: rows and columns
        i of g; both models side by side): one grouped convolution runs them.  Else 0."""
        g = len(self.pieces)
        if g < 2 or self.rows % g or self.cols % g:
            return 0
        n, m = self.rows // g, self.cols // g
        ok = all(p.rows == ((i * n, (i + 1) * n),) and p.cols == ((i * m, (i + 1) * m),)
                 for i, p in enumerate(self.pieces))
        return g if ok else 0

    @property
    def pairs(self) -> int:
        """Row-column pairs it multiplies (MACs per output position and kernel tap)."""
        return sum(_length(p.rows) * _length(p.cols) for p in self.pieces)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols,
                "pieces": [{"rows": [list(r) for r in p.rows], "cols": [list(c) for c in p.cols]}
                           for p in self.pieces]}

    @classmethod
    def from_json(cls, obj: Any) -> "Layout":
        """A layout read from a file; raises ValueError saying what is wrong."""
        if not isinstance(obj, dict) or set(obj) != {"rows", "cols", "pieces"}:
            raise ValueError("a layout is an object with rows, cols and pieces")
        n_rows, n_cols, pieces = obj["rows"], obj["cols"], obj["pieces"]
        if not all(_is_int(v) and v > 0 for v in (n_rows, n_cols)):
            raise ValueError(f"rows and cols must be positive integers, found {n_rows!r}, "
                             f"{n_cols!r}")
        if not isinstance(pieces, list) or not pieces:
            raise ValueError("pieces must be a non-empty list")
        parsed = tuple(_parse_piece(p, n_rows, n_cols, i) for i, p in enumerate(pieces))
        covered = sorted(r for p in parsed for r in p.rows)
        pos = 0
        for a, b in covered:
            if a != pos:
                raise ValueError(f"the pieces' rows must cover [0, {n_rows}) once each; "
                                 f"row {min(a, pos)} is {'missing' if a > pos else 'repeated'}")
            pos = b
        if pos != n_rows:
            raise ValueError(f"the pieces' rows must cover [0, {n_rows}) once each; they end "
                             f"at {pos}")
        return cls(n_rows, n_cols, parsed)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_runs(raw: Any, n: int, what: str) -> tuple[Run, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{what} must be a non-empty list of [start, stop] pairs")
    out: list[Run] = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r)):
            raise ValueError(f"{what}: {r!r} is not a [start, stop] pair of integers")
        a, b = r
        if not 0 <= a < b <= n or (out and a < out[-1][1]):
            raise ValueError(f"{what}: [{a}, {b}) is not an increasing run within [0, {n})")
        out.append((a, b))
    return tuple(out)


def _parse_piece(raw: Any, n_rows: int, n_cols: int, i: int) -> Piece:
    if not isinstance(raw, dict) or set(raw) != {"rows", "cols"}:
        raise ValueError(f"piece {i} must be an object with rows and cols")
    return Piece(_parse_runs(raw["rows"], n_rows, f"piece {i} rows"),
                 _parse_runs(raw["cols"], n_cols, f"piece {i} cols"))


def layout_of(row_kinds: torch.Tensor, col_kinds: torch.Tensor, models: int = 2
              ) -> Layout | None:
    """The layout of a layer whose rows and columns have these kinds; None when every row
    reads every column (nothing to skip)."""
    reads = {BOTH: torch.ones_like(col_kinds, dtype=torch.bool),
             **{k: (col_kinds == BOTH) | (col_kinds == k) for k in range(1, models + 1)}}
    classes: dict[tuple[Run, ...], torch.Tensor] = {}
    for kind in range(models + 1):
        rows = row_kinds == kind
        if bool(rows.any()):
            cols = runs(reads[kind])
            classes[cols] = classes[cols] | rows if cols in classes else rows
    if len(classes) <= 1:
        return None
    pieces = sorted((Piece(runs(rows), cols) for cols, rows in classes.items()),
                    key=lambda p: p.rows[0])
    return Layout(len(row_kinds), len(col_kinds), tuple(pieces))


def _dim_kinds(refs: list, length: int, plan: Plan, groups_of: dict) -> torch.Tensor:
    """Kinds of the widened units along one weight dim (uncovered units are shared)."""
    from .widen import axis_map

    if not refs:
        return torch.full((length,), BOTH)
    return axis_map(length, refs, plan, groups_of).kinds()


def layer_layouts(spec: PermSpec, plan: Plan, shapes: dict[str, torch.Size]
                  ) -> dict[str, Layout]:
    """The layout of every splittable layer that has blocks to skip, from ``plan`` (in the
    order the state is in) and the original models' tensor shapes."""
    refs: dict[tuple[str, int], list] = {}
    groups_of = {}
    for g in spec.groups:
        if g.kind == "input":
            continue  # both models read these units: shared
        for ax in g.axes:
            refs.setdefault((ax.key, ax.dim), []).append(ax)
            groups_of[ax] = g.name
    models = next(iter(plan.values())).models if plan else 2
    out = {}
    for layer in spec.layers:
        if not layer.split:
            continue
        shape = shapes[layer.weight]
        rows = _dim_kinds(refs.get((layer.weight, 0), []), shape[0], plan, groups_of)
        cols = _dim_kinds(refs.get((layer.weight, 1), []), shape[1], plan, groups_of)
        layout = layout_of(rows, cols, models)
        if layout is not None:
            out[layer.module] = layout
    return out


# ----------------------------------------------------------------------------- the module


def _take(x: torch.Tensor, dim: int, cols: tuple[Run, ...]) -> torch.Tensor:
    if len(cols) == 1:
        return x.narrow(dim, cols[0][0], cols[0][1] - cols[0][0])
    return torch.cat([x.narrow(dim, a, b - a) for a, b in cols], dim)


class BlockLayer(nn.Module):
    """A widened conv/linear layer run as pieces: piece i computes its rows from its columns.

    ``dim`` is the channel dim of input and output (1 for convolutions, -1 for Linear).  The
    state holds only the pieces' weights (``pieces.{i}.weight`` / ``.bias``): no structural
    zeros are stored or multiplied.  :meth:`dense` gives the equivalent dense weight and bias.
    """

    def __init__(self, pieces: list[nn.Module], layout: Layout, dim: int):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.layout = layout
        self.dim = dim
        # one grouped convolution for diagonal blocks (no slices, no concatenation)
        self.grouped = len(pieces) == 1 < len(layout.pieces)
        self._reads = [None if p.cols == ((0, layout.cols),) else p.cols for p in layout.pieces]
        self._assembly = layout.assembly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return self.pieces[0](x)
        outs = [piece(x if cols is None else _take(x, self.dim, cols))
                for piece, cols in zip(self.pieces, self._reads)]
        if self._assembly is None:
            return torch.cat(outs, self.dim)
        return torch.cat([outs[i].narrow(self.dim, s, n) for i, s, n in self._assembly],
                         self.dim)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (rows, cols, ...) weight with zeros where no piece reads, and the bias."""
        return dense_tensors(self.layout, *piece_tensors(self.layout,
                                                         [p.weight for p in self.pieces],
                                                         [p.bias for p in self.pieces]))

    def extra_repr(self) -> str:
        return (f"{self.layout.rows} x {self.layout.cols} in {len(self.pieces)} pieces, "
                f"{self.layout.pairs / (self.layout.rows * self.layout.cols):.0%} of dense")


def piece_tensors(layout: Layout, weights: list[torch.Tensor], biases: list
                  ) -> tuple[list[torch.Tensor], list]:
    """Per layout piece (weight, bias), also when one grouped convolution stores them all."""
    g = len(layout.pieces)
    if len(weights) == 1 < g:
        bias = biases[0]
        return list(weights[0].chunk(g)), list(bias.chunk(g)) if bias is not None else [None] * g
    return list(weights), list(biases)


def dense_tensors(layout: Layout, weights: list[torch.Tensor],
                  biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scatter the pieces' weights (and biases) into the dense layer's tensors."""
    w0 = weights[0]
    weight = w0.new_zeros((layout.rows, layout.cols) + tuple(w0.shape[2:]))
    has_bias = biases[0] is not None
    bias = w0.new_zeros(layout.rows) if has_bias else None
    with torch.no_grad():
        for p, w, b in zip(layout.pieces, weights, biases):
            r, c = _index(p.rows).to(w.device), _index(p.cols).to(w.device)
            weight[r[:, None], c[None, :]] = w.detach()
            if has_bias:
                bias[r] = b.detach()
    return weight, bias


def _piece_tensors(mod: nn.Module, piece: Piece) -> tuple[torch.Tensor, torch.Tensor | None]:
    r = _index(piece.rows).to(mod.weight.device)
    c = _index(piece.cols).to(mod.weight.device)
    w = mod.weight.detach().index_select(0, r).index_select(1, c).clone()
    b = mod.bias.detach().index_select(0, r).clone() if mod.bias is not None else None
    return w, b


def _with_tensors(piece: nn.Module, w: torch.Tensor, b: torch.Tensor | None,
                  requires_grad: bool) -> nn.Module:
    piece.weight = nn.Parameter(w, requires_grad=requires_grad)
    if b is not None:
        piece.bias = nn.Parameter(b, requires_grad=requires_grad)
    return piece


def split_conv(mod: nn.modules.conv._ConvNd, layout: Layout) -> BlockLayer:
    """A dense convolution as one plain convolution per piece (same kernel, stride, padding)."""
    if mod.groups != 1:
        raise ValueError("grouped convolutions already run per block; they are not split")
    tensors = [_piece_tensors(mod, piece) for piece in layout.pieces]
    groups = layout.diagonal_groups
    if groups:  # both models side by side: one grouped conv, as fast as the two (measured)
        ws, bs = zip(*tensors)
        tensors = [(torch.cat(ws), torch.cat(bs) if bs[0] is not None else None)]
    pieces = []
    for w, b in tensors:
        g = groups or 1
        new = type(mod)(w.shape[1] * g, w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                        mod.dilation, g, b is not None, mod.padding_mode,
                        device="meta", dtype=w.dtype)
        pieces.append(_with_tensors(new, w, b, mod.weight.requires_grad))
    return BlockLayer(pieces, layout, 1)


def split_linear(mod: nn.Linear, layout: Layout) -> BlockLayer:
    """A dense Linear as one plain Linear per piece, reading the last dim."""
    pieces = []
    for piece in layout.pieces:
        w, b = _piece_tensors(mod, piece)
        new = nn.Linear(w.shape[1], w.shape[0], b is not None, device="meta", dtype=w.dtype)
        pieces.append(_with_tensors(new, w, b, mod.weight.requires_grad))
    block = BlockLayer(pieces, layout, -1)
    block.in_features, block.out_features = layout.cols, layout.rows
    return block


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def split_layers(net: nn.Module, layouts: dict[str, Layout], rules: Any = None) -> nn.Module:
    """``net`` (in place) with each module named in ``layouts`` replaced by its split form and
    every merged LayerNorm with one view by a plain one (:func:`plain_layernorm`)."""
    rules = rules_for_call(rules)
    for path, layout in layouts.items():
        mod = net.get_submodule(path)
        split = rules.lookup(mod, "split")
        if split is None:
            raise ValueError(f"{path} ({type(mod).__name__}) has no split rule; register one "
                             "with pleas.register_module(..., split=...)")
        block = split(mod, layout)
        if isinstance(mod, nn.modules.conv._ConvNd):
            block.in_channels, block.out_channels = layout.cols, layout.rows
        block.train(mod.training)
        _set_child(net, path, block)
    for name, mod in list(net.named_modules()):
        if type(mod) is MergedLayerNorm:
            _set_child(net, name, plain_layernorm(mod))
    return net


def block_structured(net: nn.Module, spec: PermSpec, plan: Plan, shapes: dict[str, torch.Size],
                     rules: Any = None) -> nn.Module:
    """The dense widened ``net`` (built from ``plan``) as a block-structured model with the
    same function: units reordered (:func:`reorder`), layers split (:func:`split_layers`).

    ``shapes`` are the original models' tensor shapes.  ``net`` itself is left unchanged.
    """
    state, new_plan = reorder(net.state_dict(), spec, plan)
    out = copy.deepcopy(net)
    out.load_state_dict(state)
    return split_layers(out, layer_layouts(spec, new_plan, shapes), rules)


def layouts_of(net: nn.Module) -> dict[str, Layout]:
    """The layout of every split layer of a block-structured network, by module path."""
    return {name: m.layout for name, m in net.named_modules() if isinstance(m, BlockLayer)}


def _no_spec(b, mod: nn.Module, path: str):
    raise b.unsupported("a block-structured layer of a merged model (its units are no longer "
                        "freely permutable); derive specs from the original models")


register_module(BlockLayer, spec=_no_spec)


# ----------------------------------------------------------------------------- layer norm


def plain_layernorm(mod: MergedLayerNorm) -> nn.Module:
    """A plain ``nn.LayerNorm`` for a merged one whose two views are both every unit (nothing
    kept apart: one view); else ``mod`` unchanged (views ordered as a prefix and a suffix run
    as two native layer norms inside :class:`MergedLayerNorm`)."""
    sa, sb = mod.share_a.detach().cpu(), mod.share_b.detach().cpu()
    n = sa.numel()
    if not (bool((sa > 0).all()) and bool((sb > 0).all()) and bool((sa + sb == 1).all())):
        return mod
    affine = mod.weight is not None
    new: nn.Module = (nn.LayerNorm(n, eps=mod.eps, elementwise_affine=affine) if mod.dim == -1
                      else LayerNormDim(n, mod.eps, affine, mod.dim))
    like = mod.weight if affine else mod.share_a
    new = new.to(device=like.device, dtype=like.dtype)
    new.load_state_dict({k: v for k, v in mod.state_dict().items() if k in new.state_dict()})
    return new.train(mod.training)
