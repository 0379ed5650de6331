"""The merge pipeline: prepare once (spec + one statistics pass), then build any width/method.

    prep = prepare(model_a, model_b, data)          # trace, one pass over the data
    for w in (1.0, 1.25, 1.5, 1.75, 2.0):
        merged, report = build(prep, width=w)       # matching is cached, LS is only solves

:func:`merge` does both in one call.  What a method does is read from its record in
:mod:`pleas.methods` (alignment or not, a fixed allocation, its least-squares fit, a fixed
width); this module never branches on a method's name.  Defaults come from
:class:`pleas.config.MergeConfig`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from . import methods as registry
from . import plan as planning
from .blockwise import block_structured
from .side_by_side import SideBySide
from .capture import as_batches, batch_inputs, run_models
from .distributed import ALONE, Shard
from .config import DEFAULT_WIDTH, MATCHINGS, MergeConfig, _check_width_for
from .errors import MergeError, MergeWarning
from .heads import ModelSide, all_task_names, as_side, check_pair, model_label, separate_heads_of
from .heads import task_names as _task_names
from .lstsq import GramStats, composite_plan, fit_all, fit_layer_regmean
from .matching import (Matching, canonical_order, identity_matching, match_activations,
                       match_many, match_weights)
from .measure import executed_macs, stored_params
from .merged import Head, MergedModel
from .registry import replaced
from .normalization import (batchnorm_modules, merged_layernorm_state, mixed_group_norms,
                            recalibrate_batchnorm)
from .spec import PermSpec, derive_spec
from .stats import MatchingStats
from .sweep import fit_sequential
from .widen import build_module, widen_states

__all__ = ["MergeError", "ModelSide", "Prepared", "MergeResult", "prepare", "prepare_models",
           "build", "merge", "merge_models", "task_names", "METHODS", "MATCHINGS"]

METHODS = registry.names("alignment")
_D = MergeConfig()  # the defaults, written once in pleas.config


@dataclass
class Prepared:
    """Everything a merge needs that does not depend on width or method.

    ``sides`` are the K >= 2 models (``a`` and ``b`` the first two)."""

    sides: list[ModelSide]
    spec: PermSpec
    batches: list
    device: str
    match_stats: MatchingStats | None
    grams: GramStats | None
    seconds: dict[str, float]
    data_name: str = "data"
    rules: Any = None
    warnings: list[str] = field(default_factory=list)
    shard: Shard = ALONE  # this process's share of the merge data (pleas.distributed)
    batch_ids: list[int] | None = None  # indices of ``batches`` in the whole merge set
    _matchings: dict[tuple, Matching] = field(default_factory=dict)

    @property
    def a(self) -> ModelSide:
        return self.sides[0]

    @property
    def b(self) -> ModelSide:
        return self.sides[1]

    @property
    def models(self) -> int:
        return len(self.sides)

    def matching(self, kind: str = "activation", seed: int = 0) -> Matching:
        """Cached matching of the models' units (``activation`` from statistics, ``weight``
        data-free, ``identity`` for methods that do not align): two models, B to A; K models,
        all into one order without a privileged model (:func:`pleas.matching.match_many`)."""
        key = (kind, seed)
        if key not in self._matchings:
            t0 = time.perf_counter()
            if kind == "activation":
                if self.match_stats is None:
                    raise MergeError("activation matching needs merge data; use weight matching")
                if self.models == 2:
                    m = match_activations(self.match_stats.by_group, self.spec)
                else:
                    m = match_many(self.match_stats.pairs, self.spec, self.models,
                                   canonical_order([s.model for s in self.sides]))
            elif kind == "weight":
                if self.models != 2:
                    raise MergeError(f"weight matching (data-free) is written for two models; "
                                     f"merge {self.models} with activation matching on merge "
                                     "or proxy data")
                m = match_weights(self.a.model.state_dict(), self.b.model.state_dict(), self.spec,
                                  seed=seed)
            elif kind == "identity":
                m = identity_matching(self.spec, self.models)
            else:
                raise MergeError(f"unknown matching {kind!r}; expected one of {', '.join(MATCHINGS)}")
            self._matchings[key] = m
            self.seconds[f"matching_{kind}"] = time.perf_counter() - t0
        return self._matchings[key]

    @property
    def images(self) -> int:
        """Merge images over all processes."""
        local = torch.tensor(float(sum(len(b) for b in self.batches)), dtype=torch.float64)
        return int(self.shard.reduce(local))


def _class_axes(spec: PermSpec) -> set[tuple[str, int]]:
    out = spec.output_group
    return {(ax.key, ax.dim) for ax in out.axes} if out else set()


def _materialise(data: Any, batch_size: int, max_batches: int | None) -> list:
    from .data import check_finite_images

    batches = [batch_inputs(b) for b in as_batches(data, batch_size, max_batches)]
    if not batches or sum(len(b) for b in batches) == 0:
        raise MergeError("the merge data is empty: no images to compute statistics from")
    for i, b in enumerate(batches):
        check_finite_images(b, f"merge data (batch {i})")
    return batches


def check_weights(side: ModelSide, who: str) -> None:
    """Finite weights and non-negative BatchNorm variances: anything else gives a NaN merge."""
    for key, t in side.model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"{who} ({side.name}) has NaN or infinite values in {key!r}; "
                             "cannot merge it")
        if key.endswith("running_var") and bool((t < 0).any()):
            raise MergeError(f"{who} ({side.name}) has a negative BatchNorm variance in {key!r} "
                             "(a corrupt model); cannot merge it")


def data_warnings(spec: PermSpec, images: int, collects: bool) -> list[str]:
    """A merge set too small for the statistics it feeds: said, not silently used.

    Correlations and least-squares moments of a group of d units from fewer than d images are
    rank-deficient (positions of one image are strongly correlated), so matching and fits
    lean on the ridge rather than on data.
    """
    if not collects or not spec.hidden:
        return []
    widest = max(spec.hidden, key=lambda g: g.size)
    if images >= widest.size:
        return []
    return [f"only {images} merge images for groups of up to {widest.size} units "
            f"({widest.name}): the statistics are rank-deficient; use at least {widest.size} "
            "images (--batches x --batch-size) for a reliable merge"]


@dataclass(frozen=True)
class Needs:
    """Which statistics the statistics pass collects."""

    activations: bool
    layers: bool
    grams: bool

    @classmethod
    def of(cls, methods: Iterable[Any] | None, matching: str) -> "Needs":
        """What the given methods read; ``None``: everything (any method may be built later)."""
        if methods is None:
            return cls(True, True, True)
        records = [registry.get(m) for m in methods]
        return cls(any(m.needs_activations(matching) for m in records),
                   any(m.needs_layers for m in records), any(m.needs_grams for m in records))


def prepare(model_a: nn.Module | ModelSide, model_b: nn.Module | ModelSide, data: Any,
            **options: Any) -> Prepared:
    """:func:`prepare_models` for two models (the options are the same)."""
    return prepare_models([model_a, model_b], data, **options)


def prepare_models(models: list, data: Any, *,
                   device: str = _D.device, batch_size: int = _D.batch_size,
                   max_batches: int | None = _D.batches, positions: int | None = _D.positions,
                   seed: int = _D.seed, methods: Iterable[Any] | None = None,
                   matching: str = _D.matching, activations: bool | None = None,
                   least_squares: bool | None = None, closed_form: bool | None = None,
                   progress: bool = True, data_name: str = "data",
                   input_shape: tuple[int, ...] | None = None, rules: Any = None,
                   shard: Shard = ALONE) -> Prepared:
    """Trace the architecture, check the models, and run ONE pass collecting every statistic.

    ``models``: K >= 2 modules (or :class:`ModelSide`) of one architecture.  ``data`` is an
    :class:`pleas.data.ImageSet`, a tensor of images, or an iterable of batches.
    ``data=None`` is a data-free merge: give ``input_shape`` (C, H, W) for the trace; only
    methods that need no statistics can then be built (weight matching, no least squares, no
    BatchNorm reset).  ``methods`` (names or records) limits the pass to what they read (by
    default everything is collected); ``activations`` / ``least_squares`` / ``closed_form``
    override that choice.  ``rules`` adds per-call module rules (:mod:`pleas.registry`).
    ``shard``: this process's share of the data when merging over several processes
    (:mod:`pleas.distributed`): its batches are streamed here, the sums all-reduced.
    """
    if isinstance(models, (nn.Module, ModelSide)) or len(models) < 2:
        raise MergeError("merging needs at least two models")
    names = ["model_a", "model_b"] if len(models) == 2 else \
        [f"model_{model_label(k).lower()}" for k in range(len(models))]
    sides = [as_side(m, n) for m, n in zip(models, names)]
    # modules with a replace rule (nn.MultiheadAttention) are swapped in copies of the models
    sides = [dataclasses.replace(side, model=replaced(side.model, rules)) for side in sides]
    needs = Needs.of(methods, matching)
    activations = needs.activations if activations is None else activations
    least_squares = needs.layers if least_squares is None else least_squares
    closed_form = needs.grams if closed_form is None else closed_form
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for side in sides:
        side.model.to(device).eval()
    if data is None:
        if input_shape is None:
            raise MergeError("data-free merging still needs the input shape: pass "
                             "input_shape=(C, H, W) (or a few proxy images as data)")
        batches, example = [], torch.zeros(2, *input_shape)
    else:
        batches = _materialise(data, batch_size, max_batches)
        example = batches[0][:2]
    total_images = sum(len(x) for x in batches)
    batches, batch_ids = shard.split(batches)
    if data is not None and not batches:
        raise MergeError(f"rank {shard.rank} of {shard.world} got no merge batch: use at least "
                         f"{shard.world} batches (--batches) or fewer processes")
    for k, side in enumerate(sides):
        check_weights(side, f"model {model_label(k)}")
    spec = derive_spec(sides[0].model, example.to(device), rules=rules)
    for side in sides[1:]:
        check_pair(sides[0].model, side.model, _class_axes(spec))
    notes = data_warnings(spec, total_images, bool(batches) and (activations or least_squares))
    for note in notes:
        warnings.warn(note, MergeWarning, stacklevel=2)
    seconds["spec"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = (MatchingStats(spec, device, positions or None, seed, models=len(sides))
             if activations and batches else None)
    grams = (GramStats(spec, sides[0].model, device, positions or None, seed,
                       collect=closed_form) if least_squares and batches else None)
    consumers = [c for c in (stats, grams) if c is not None and c.points]
    if consumers:
        run_models([side.model for side in sides], batches, consumers, device=device,
                   progress=progress, desc="statistics (one pass)", batch_ids=batch_ids)
        if not shard.alone:
            for c in consumers:
                c.reduce(shard.reduce)
    seconds["statistics"] = time.perf_counter() - t0
    return Prepared(sides, spec, batches, device, stats, grams, seconds, data_name, rules,
                    notes, shard, batch_ids)


def num_classes(model: nn.Module, spec: PermSpec) -> int:
    out = spec.output_group
    ax = next(a for a in out.axes if a.role == "out")
    return model.state_dict()[ax.key].shape[ax.dim]


def uses_separate_heads(prep: Prepared, heads: str) -> bool:
    """True for separate heads (multi-head model); a model without a class axis has none."""
    if prep.spec.output_group is None:
        return False
    return separate_heads_of(heads, prep.sides,
                             [num_classes(s.model, prep.spec) for s in prep.sides])


def task_names(prep: Any) -> tuple[str, ...]:
    """The head names of prepared models (anything with ``.sides``, or ``.a`` and ``.b``)."""
    sides = getattr(prep, "sides", None)
    return tuple(all_task_names(sides)) if sides else _task_names(prep.a, prep.b)


def resolve_method(method: Any, sequential: bool | None = None,
                   least_squares: str | None = None) -> registry.MergeMethod:
    """The record for ``method``; ``sequential`` / ``least_squares`` pick its fit variant."""
    if sequential is not None:
        least_squares = "sequential" if sequential else "closed"
    record = registry.with_least_squares(registry.get(method), least_squares)
    if record.family != "alignment":
        raise MergeError(f"{record.name} is a task-vector method (it needs the models' common "
                         "base): use pleas.run or pleas.task_vectors.merge_with_base")
    return record


def _check_inputs(prep: Prepared, record: registry.MergeMethod) -> None:
    if record.needs_layers and prep.grams is None:
        raise MergeError(f"{record.name} fits least squares and needs merge data (or proxy "
                         "data); prepare() got none, or was told not to collect it")
    if record.needs_grams and not prep.grams.points:
        raise MergeError(f"{record.name} needs the closed-form second moments: prepare(..., "
                         f"methods=[{record.name!r}]) or prepare(..., closed_form=True)")


def _fit_regmean(prep, the_plan, states, state, ridge, progress) -> list:
    if len(states) != 2:
        raise MergeError(f"regmean is written for two models, not {len(states)}")
    sa, sb = states
    for layer in prep.grams.layers:
        out_plan = composite_plan(layer, the_plan)
        if out_plan.n_merged != out_plan.size:
            continue  # separate heads stay as they are
        fit_layer_regmean(layer, prep.grams.gram[layer.module], sa, sb, state, ridge,
                          groups=getattr(prep.grams.modules[layer.module], "groups", 1))
    return []


def _fit_closed(prep, the_plan, states, state, ridge, progress) -> list:
    return fit_all(prep.grams, the_plan, states, state, ridge, progress)


# fits that change the widened state before the module is built (sequential runs after)
_STATE_FITS = {"closed": _fit_closed, "regmean": _fit_regmean}
_LS_MODE_NAMES = {"sequential": "sequential", "closed": "closed form"}


def build(prep: Prepared, width: float | None = None, method: Any = _D.method,
          matching: str = _D.matching, allocation: str = _D.allocation, heads: str = _D.heads,
          ridge: float = _D.ridge, seed: int = _D.seed, recalibrate: bool = True,
          progress: bool = True, sequential: bool | None = None,
          least_squares: str | None = None, max_cache_gb: float = _D.max_cache_gb,
          blocks: bool = True, unit_multiple: int = _D.unit_multiple,
          layout: str = _D.layout, float64_products: bool = _D.float64_products
          ) -> tuple[MergedModel, dict]:
    """Build one merged model from prepared statistics; returns it and its report.

    ``method`` is a registered name or record (:mod:`pleas.methods`); ``width`` defaults to
    the method's fixed width, else 1.5.  ``least_squares`` (or the older ``sequential`` flag)
    picks the method's fit variant: ``"sequential"`` fits each layer on the inputs the merged
    model's own fitted earlier layers produce (one data pass per layer; clearly more accurate,
    see README); ``"closed"`` uses the closed form on the originals' inputs (solves only).
    The sequential fit runs in one sweep over the data (:mod:`pleas.sweep`), its cached
    activations bounded by ``max_cache_gb``, its moments' products in the activations' dtype
    (``float64_products``: in float64).  Nothing merged (width K): no fit, no BN reset,
    the originals side by side exactly, run whole one after the other
    (:class:`pleas.side_by_side.SideBySide`: faster than one fused network).

    ``layout`` decides what the width pays for (:func:`pleas.plan.for_layout`): ``"dense"``
    (default) plans against the plain layers' MACs, zeros included, and returns plain layers;
    ``"blocks"`` plans against the non-zero blocks only and returns the block-structured model
    that executes just those (:mod:`pleas.blockwise`).  Either way fitting and the BatchNorm
    reset work on the dense widened model, whose units are then reordered [A-only | merged |
    B-only] (same function; a LayerNorm with nothing kept apart becomes a plain one).  ``blocks=False``
    skips that last step and returns the widened model in the plan's unit order [merged |
    A-only | B-only (| kept from C | ...)], for inspection.  ``unit_multiple``: merged and kept
    unit counts per group in multiples of this (:func:`pleas.plan.allocate`), so that every
    layer (or piece) is a whole kernel width.
    """
    record = resolve_method(method, sequential, least_squares)
    models = prep.models
    if width is None:
        width = record.width_for(models) or DEFAULT_WIDTH
    _check_width_for(record, width, given=True, models=models)
    _check_inputs(prep, record)
    spec = prep.spec
    try:
        cost_spec = planning.for_layout(spec, layout)
    except ValueError as e:
        raise MergeError(str(e)) from None
    seconds: dict[str, float] = {}
    separate = uses_separate_heads(prep, heads)
    match_kind = matching if record.aligned else "identity"
    match = prep.matching(match_kind, seed)
    seconds["matching"] = prep.seconds.get(f"matching_{match_kind}", 0.0)
    t0 = time.perf_counter()
    try:
        merged_units, multiple_used = planning.allocate_aligned(
            cost_spec, match, width, record.allocation or allocation, separate_heads=separate,
            models=models, unit_multiple=unit_multiple)
    except ValueError as e:
        raise MergeError(str(e)) from None
    counts = ([num_classes(s.model, spec) for s in prep.sides] if spec.output_group
              else None)
    the_plan = planning.build_plan(spec, match, merged_units, separate, n_classes=counts)
    cost = planning.plan_cost(cost_spec, the_plan)
    seconds["planning"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    states = [{k: v.detach().cpu() for k, v in s.model.state_dict().items()}
              for s in prep.sides]
    state = widen_states(states, spec, the_plan)
    seconds["widen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    any_merged = any(the_plan[g.name].n_merged for g in spec.hidden)
    state_fit = _STATE_FITS.get(record.least_squares) if any_merged else None
    fits = state_fit(prep, the_plan, states, state, ridge, progress) if state_fit else []
    seconds["least_squares"] = time.perf_counter() - t0
    state = merged_layernorm_state(spec, the_plan, state, prep.a.model)
    # nothing merged anywhere: the networks run whole, side by side (exact)
    mixed = (mixed_group_norms(spec, the_plan, prep.a.model)
             if any(the_plan[g.name].n_merged for g in spec.hidden) else [])
    build_warnings = [f"one-group GroupNorm over a partly merged stream ({', '.join(mixed)}): "
                      "it normalises both models' channels together, an approximation even "
                      "for identical models; width 1 or 2 (or a stream left merged) is exact"
                      ] if mixed else []
    for note in build_warnings:
        warnings.warn(note, MergeWarning, stacklevel=2)
    net = build_module(prep.a.model, state, rules=prep.rules).to(prep.device).eval()
    del state  # the net holds its own copies; this one would live through the fit
    norms_set: set[str] = set()  # BatchNorms the sweep gave their exact statistics
    if record.least_squares == "sequential" and any_merged:
        t0 = time.perf_counter()
        fits = fit_sequential(prep.grams.layers, net, prep.a.model, prep.b.model,
                              prep.batches, the_plan, prep.device, ridge,
                              prep.grams.positions, seed, progress, update_norms=recalibrate,
                              rules=prep.rules, max_cache_gb=max_cache_gb,
                              reduce=prep.shard.reduce, batch_ids=prep.batch_ids,
                              more_models=[s.model for s in prep.sides[2:]],
                              float64_products=float64_products, norms_set=norms_set)
        seconds["least_squares"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # nothing merged: the originals, untouched; every BN set by the sweep: nothing left to do
    if recalibrate and any_merged and prep.batches and any(
            name not in norms_set for name, _ in batchnorm_modules(net)):
        recalibrate_batchnorm(net, prep.batches, prep.device, progress=progress,
                              reduce=None if prep.shard.alone else prep.shard.reduce)
    seconds["batchnorm"] = time.perf_counter() - t0
    structure = "dense"
    if blocks and not any_merged:  # width K: the K networks run whole (pleas.side_by_side)
        t0 = time.perf_counter()
        members = [build_module(prep.a.model, st, rules=prep.rules).to(prep.device).eval()
                   for st in states]
        net = SideBySide(members, "concat" if separate else "mean").eval()
        structure = "side_by_side"
        cost = dataclasses.replace(cost, macs=models * cost.base_macs)  # K whole networks
        seconds["blocks"] = time.perf_counter() - t0
    elif blocks:  # under the dense layout no layer splits: units reordered only
        t0 = time.perf_counter()
        net = block_structured(net, cost_spec, the_plan,
                               {k: v.shape for k, v in states[0].items()}, prep.rules)
        structure = layout
        seconds["blocks"] = time.perf_counter() - t0
    head_list = _heads(prep, separate, counts)
    report = _report(prep, record, match_kind, allocation, separate, width, cost, net,
                     the_plan, fits, seconds)
    report["warnings"] = report["warnings"] + build_warnings
    report["unit_multiple"] = {"requested": unit_multiple, "used": multiple_used}
    report["structure"] = structure
    report["layout"] = layout
    desc = {"arch": prep.a.arch, "config": prep.a.config, "method": record.name,
            "width": report["width"], "groups": report["groups"],
            "models": [s.name for s in prep.sides], "input_shape": list(spec.input_shape[1:])}
    return MergedModel(net, head_list, desc).eval(), report


def _heads(prep: Prepared, separate: bool, counts: list[int] | None) -> list[Head] | None:
    """One head per model, in the models' order, over consecutive slices of the outputs."""
    if not separate or prep.spec.output_group is None:
        return None
    heads, start = [], 0
    for side, task, n in zip(prep.sides, task_names(prep), counts):
        heads.append(Head(task, start, start + n, list(side.classes) if side.classes else None))
        start += n
    return heads


def _report(prep, record, match_kind, allocation, separate, width, cost, net, the_plan,
            fits, seconds) -> dict:
    spec = prep.spec
    executed = executed_macs(net, spec.input_shape)
    report = {
        "method": record.name,
        "matching": match_kind if record.aligned else None,
        "allocation": record.allocation or allocation,
        "heads": "separate" if separate else "shared",
        "width": {"requested": width, "achieved": round(cost.width, 4),
                  "executed": round(executed / cost.base_macs, 4)},
        "macs": {"merged": cost.macs, "executed": executed, "merged_dense": cost.dense_macs,
                 "one_model": cost.base_macs},
        "params": {"merged": stored_params(net), "one_model": stored_params(prep.a.model)},
        "groups": [{"name": g.name, "size": g.size, "merged": the_plan[g.name].n_merged,
                    "new_size": the_plan[g.name].size,
                    "kept": list(planning.plan_kinds(the_plan[g.name])[1:]),
                    "layer_norm": g.layer_norm}
                   for g in spec.hidden],
        "least_squares_mode": _LS_MODE_NAMES.get(record.least_squares),
        "least_squares": [{"layer": f.module, "error_plain": f.error_before,
                           "error_fitted": f.error_after} for f in fits],
        "merge_data": {"name": prep.data_name, "images": prep.images},
        "warnings": list(prep.warnings),
        "seconds": {**{k: round(v, 4) for k, v in prep.seconds.items()
                       if not k.startswith("matching_")},
                    **{k: round(v, 4) for k, v in seconds.items()}},
    }
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 4)
    return report


@dataclass
class MergeResult:
    model: MergedModel
    report: dict
    prepared: Prepared


def merge(model_a: nn.Module | ModelSide, model_b: nn.Module | ModelSide, data: Any,
          width: float | None = None, **options: Any) -> MergeResult:
    """Merge two models of the same architecture into one of ``width`` x one model's compute
    (:func:`merge_models` for two models; the options are the same)."""
    return merge_models([model_a, model_b], data, width, **options)


def merge_models(models: list, data: Any, width: float | None = None, method: Any = _D.method,
                 matching: str = _D.matching, allocation: str = _D.allocation,
                 heads: str = _D.heads, device: str = _D.device,
                 batch_size: int = _D.batch_size, max_batches: int | None = _D.batches,
                 ridge: float = _D.ridge, seed: int = _D.seed,
                 positions: int | None = _D.positions, progress: bool = True,
                 sequential: bool | None = None, least_squares: str | None = None,
                 input_shape: tuple[int, ...] | None = None, rules: Any = None,
                 blocks: bool = True, unit_multiple: int = _D.unit_multiple,
                 layout: str = _D.layout) -> MergeResult:
    """Merge K >= 2 models of the same architecture into one of ``width`` x one model's
    compute (``width`` in [1, K]).

    One statistics pass collecting only what the method reads, then :func:`build`.  Returns
    the :class:`MergedModel`, a report dict (widths, MACs, groups, timings) and the prepared
    statistics (reusable for other widths).
    """
    record = resolve_method(method, sequential, least_squares)
    if isinstance(models, (nn.Module, ModelSide)) or len(models) < 2:
        raise MergeError("merging needs at least two models")
    if width is not None:
        _check_width_for(record, width, given=True, models=len(models))
    torch.manual_seed(seed)
    prep = prepare_models(models, data, device=device, batch_size=batch_size,
                          max_batches=max_batches, positions=positions, seed=seed,
                          methods=[record], matching=matching, progress=progress,
                          input_shape=input_shape, rules=rules)
    model, report = build(prep, width, record, matching, allocation, heads, ridge, seed,
                          progress=progress, blocks=blocks, unit_multiple=unit_multiple,
                          layout=layout)
    return MergeResult(model, report, prep)
