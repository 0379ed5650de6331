"""The merge pipeline: prepare once (spec + one statistics pass), then build any width/method.

    prep = prepare(model_a, model_b, data)          # trace, one pass over the data
    for w in (1.0, 1.25, 1.5, 1.75, 2.0):
        merged, report = build(prep, width=w)       # matching is cached, LS is only solves

:func:`merge` does both in one call.  Methods (all followed by BatchNorm recalibration):

| method   | matching            | which units merge        | least squares |
|----------|---------------------|--------------------------|---------------|
| pleas    | activation / weight | allocation under budget  | yes (closed form) |
| permute  | activation / weight | allocation under budget  | no  (w=1: Git Re-Basin) |
| zip      | activation / weight | ZipIt!-style stage cut   | no  |
| average  | none (identity)     | allocation under budget  | no  (w=1: weight averaging) |
| regmean  | none (identity)     | all (width 1 only)       | RegMean |
| ensemble | none                | nothing (width 2 only)   | no  |
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import plan as planning
from .capture import as_batches, batch_inputs, run_pair
from .lstsq import GramStats, composite_plan, fit_all, fit_layer_regmean, fit_sequential
from .matching import Matching, identity_matching, match_activations, match_weights
from .merged import Head, MergedModel
from .normalization import recalibrate_batchnorm
from .spec import PermSpec, derive_spec
from .stats import MatchingStats
from .widen import build_module, merged_layernorm_state, widen_state_dict

METHODS = ("pleas", "permute", "zip", "average", "regmean", "ensemble")
MATCHINGS = ("activation", "weight")


class MergeError(ValueError):
    """The two models (or the request) cannot be merged; the message says why."""


@dataclass(frozen=True)
class ModelSide:
    """One input model and what is known of it (from the zoo manifest or checkpoint metadata)."""

    model: nn.Module
    name: str = "model"
    task: str | None = None
    label_space: str | None = None
    classes: tuple[str, ...] | None = None
    arch: str | None = None
    config: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, info: Any = None, name: str = "model") -> "ModelSide":
        if info is None:
            return cls(model, name)
        return cls(model, getattr(info, "name", name), getattr(info, "task", None),
                   getattr(info, "label_space", None), getattr(info, "classes", None),
                   getattr(info, "arch", None), dict(getattr(info, "config", None) or {}))


@dataclass
class Prepared:
    """Everything a merge needs that does not depend on width or method."""

    a: ModelSide
    b: ModelSide
    spec: PermSpec
    batches: list
    device: str
    match_stats: MatchingStats | None
    grams: GramStats | None
    seconds: dict[str, float]
    data_name: str = "data"
    _matchings: dict[tuple, Matching] = field(default_factory=dict)

    def matching(self, kind: str = "activation", seed: int = 0) -> Matching:
        """Cached matching of B to A (``activation`` from statistics, ``weight`` data-free)."""
        key = (kind, seed)
        if key not in self._matchings:
            t0 = time.perf_counter()
            if kind == "activation":
                if self.match_stats is None:
                    raise MergeError("activation matching needs merge data; use weight matching")
                m = match_activations(self.match_stats.by_group, self.spec)
            elif kind == "weight":
                m = match_weights(self.a.model.state_dict(), self.b.model.state_dict(), self.spec,
                                  seed=seed)
            elif kind == "identity":
                m = identity_matching(self.spec)
            else:
                raise MergeError(f"unknown matching {kind!r}; expected one of {', '.join(MATCHINGS)}")
            self._matchings[key] = m
            self.seconds[f"matching_{kind}"] = time.perf_counter() - t0
        return self._matchings[key]


def check_same_architecture(state_a: dict, state_b: dict, class_axes: set[tuple[str, int]],
                            error: type[Exception] = MergeError) -> None:
    """Same tensors and shapes, except along the class axes (heads of different label spaces)."""
    if state_a.keys() != state_b.keys():
        only_a = sorted(set(state_a) - set(state_b))
        only_b = sorted(set(state_b) - set(state_a))
        raise error("mismatched architectures: parameters only in A: "
                    f"{only_a[:4]}, only in B: {only_b[:4]}")
    for k, ta in state_a.items():
        tb = state_b[k]
        if ta.shape == tb.shape:
            continue
        diff = [d for d in range(ta.ndim) if ta.shape[d] != tb.shape[d]]
        if ta.ndim != tb.ndim or any((k, d) not in class_axes for d in diff):
            raise error(f"mismatched architectures: {k} has shape {tuple(ta.shape)} in A "
                        f"and {tuple(tb.shape)} in B")


def _check_pair(a: nn.Module, b: nn.Module, spec: PermSpec) -> None:
    if type(a) is not type(b):
        raise MergeError(f"mismatched architectures: model A is {type(a).__name__}, model B is "
                         f"{type(b).__name__}")
    out = spec.output_group
    class_axes = {(ax.key, ax.dim) for ax in out.axes} if out else set()
    check_same_architecture(a.state_dict(), b.state_dict(), class_axes)


def _materialise(data: Any, batch_size: int, max_batches: int | None) -> list:
    batches = [batch_inputs(b) for b in as_batches(data, batch_size, max_batches)]
    if not batches or sum(len(b) for b in batches) == 0:
        raise MergeError("the merge data is empty: no images to compute statistics from")
    return batches


def prepare(model_a: nn.Module | ModelSide, model_b: nn.Module | ModelSide, data: Any, *,
            device: str = "cpu", batch_size: int = 64, max_batches: int | None = 16,
            activations: bool = True, least_squares: bool = True, progress: bool = True,
            data_name: str = "data", positions: int | None = 64, seed: int = 0,
            closed_form: bool = True) -> Prepared:
    """Trace the architecture, check the pair, and run ONE pass collecting every statistic.

    ``data`` is an :class:`pleas.data.ImageSet`, a tensor of images, or an iterable of batches;
    ``None`` means data-free (weight matching only, no least squares, no BN reset).
    """
    a = model_a if isinstance(model_a, ModelSide) else ModelSide(model_a, "model_a")
    b = model_b if isinstance(model_b, ModelSide) else ModelSide(model_b, "model_b")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    a.model.to(device).eval()
    b.model.to(device).eval()
    batches = _materialise(data, batch_size, max_batches) if data is not None else []
    example = batches[0][:2] if batches else None
    if example is None:
        raise MergeError("data-free merging still needs the input shape: pass a few proxy images")
    spec = derive_spec(a.model, example.to(device))
    _check_pair(a.model, b.model, spec)
    seconds["spec"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = MatchingStats(spec, device) if activations else None
    grams = (GramStats(spec, a.model, device, positions, seed, collect=closed_form)
             if least_squares else None)
    consumers = [c for c in (stats, grams) if c is not None]
    if consumers:
        run_pair(a.model, b.model, batches, consumers, device=device, progress=progress,
                 desc="statistics (one pass)")
    seconds["statistics"] = time.perf_counter() - t0
    return Prepared(a, b, spec, batches, device, stats, grams, seconds, data_name)


def _head_mode(prep: Prepared, heads: str) -> bool:
    """True for separate heads (multi-head model)."""
    out = prep.spec.output_group
    if out is None:
        return False
    na, nb = _num_classes(prep.a.model, prep.spec), _num_classes(prep.b.model, prep.spec)
    if heads == "separate":
        return True
    same_space = (prep.a.label_space is not None and prep.a.label_space == prep.b.label_space)
    if heads == "shared":
        if na != nb:
            raise MergeError(f"shared head requested but model A has {na} classes and model B {nb}")
        if prep.a.label_space and prep.b.label_space and not same_space:
            raise MergeError(f"shared head requested but the label spaces differ: "
                             f"{prep.a.label_space!r} vs {prep.b.label_space!r}")
        return False
    if heads != "auto":
        raise MergeError(f"unknown head mode {heads!r}; expected auto, shared or separate")
    return not (same_space and na == nb)


def _num_classes(model: nn.Module, spec: PermSpec) -> int:
    out = spec.output_group
    ax = next(a for a in out.axes if a.role == "out")
    return model.state_dict()[ax.key].shape[ax.dim]


def task_names(prep: Prepared) -> tuple[str, str]:
    ta, tb = prep.a.task or prep.a.name, prep.b.task or prep.b.name
    if ta == tb:
        ta, tb = f"{ta} (A)", f"{tb} (B)"
    return ta, tb


def build(prep: Prepared, width: float = 1.5, method: str = "pleas",
          matching: str = "activation", allocation: str = "uniform", heads: str = "auto",
          ridge: float = 1e-4, seed: int = 0, recalibrate: bool = True,
          progress: bool = True, sequential: bool = True) -> tuple[MergedModel, dict]:
    """Build one merged model from prepared statistics; returns it and its report.

    ``sequential`` (default) fits each layer on the inputs the merged model's own fitted
    earlier layers produce (one data pass per layer; clearly more accurate, see README);
    ``False`` uses the closed form on the originals' inputs: solves only, no data pass.
    """
    planning.check_width(width)
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    spec = prep.spec
    seconds: dict[str, float] = {}
    separate = _head_mode(prep, heads)
    if method in ("average", "regmean", "ensemble"):
        match = prep.matching("identity")
    else:
        match = prep.matching(matching, seed)
    seconds["matching"] = prep.seconds.get(f"matching_{matching}", 0.0)
    t0 = time.perf_counter()
    if method == "ensemble":
        if width != 2.0:
            raise MergeError("the ensemble is the width-2 model; use --width 2")
        merged_units = {g.name: 0 for g in spec.hidden}
    elif method == "regmean":
        if width != 1.0:
            raise MergeError("RegMean merges at width 1 only; use --width 1")
        merged_units = {g.name: g.size for g in spec.hidden}
    else:
        alloc = "zip" if method == "zip" else allocation
        merged_units = planning.allocate(spec, match, width, alloc, separate_heads=separate)
    nb = _num_classes(prep.b.model, spec) if spec.output_group else None
    the_plan = planning.build_plan(spec, match, merged_units, separate, nb)
    cost = planning.plan_cost(spec, the_plan)
    seconds["planning"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sa = {k: v.detach().cpu() for k, v in prep.a.model.state_dict().items()}
    sb = {k: v.detach().cpu() for k, v in prep.b.model.state_dict().items()}
    state = widen_state_dict(sa, sb, spec, the_plan)
    seconds["widen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fits = []
    if method == "pleas" and prep.grams is None:
        raise MergeError("PLeaS least squares needs merge data (or proxy data)")
    closed = method == "regmean" or (method == "pleas" and not sequential)
    if closed and prep.grams is not None and not prep.grams.points:
        raise MergeError("the closed-form fit needs the second moments: prepare(..., "
                         "closed_form=True)")
    if method == "pleas" and not sequential:
        fits = fit_all(prep.grams, the_plan, sa, sb, state, ridge, progress)
    elif method == "regmean":
        if prep.grams is None:
            raise MergeError("RegMean needs merge data")
        for layer in prep.grams.layers:
            out_plan = composite_plan(layer, the_plan)
            if out_plan.n_merged != out_plan.size:
                continue  # separate heads stay as they are
            fit_layer_regmean(layer, prep.grams.gram[layer.module], sa, sb, state, ridge,
                              groups=getattr(prep.grams.modules[layer.module], "groups", 1))
    seconds["least_squares"] = time.perf_counter() - t0
    state = merged_layernorm_state(spec, the_plan, state, prep.a.model)
    net = build_module(prep.a.model, state).to(prep.device).eval()
    any_merged = any(the_plan[g.name].n_merged for g in spec.hidden)
    if method == "pleas" and sequential:
        t0 = time.perf_counter()
        fits = fit_sequential(prep.grams.layers, net, prep.a.model, prep.b.model,
                              prep.batches, the_plan, sa, sb, prep.device, ridge,
                              prep.grams.positions, seed, progress,
                              update_norms=any_merged and recalibrate)
        seconds["least_squares"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if recalibrate and any_merged and prep.batches:  # nothing merged: the originals, untouched
        recalibrate_batchnorm(net, prep.batches, prep.device, progress=progress)
    seconds["batchnorm"] = time.perf_counter() - t0
    ta, tb = task_names(prep)
    head_list = None
    if separate and spec.output_group is not None:
        na = _num_classes(prep.a.model, spec)
        head_list = [Head(ta, 0, na, list(prep.a.classes) if prep.a.classes else None),
                     Head(tb, na, na + nb, list(prep.b.classes) if prep.b.classes else None)]
    report = {
        "method": method,
        "matching": None if method in ("average", "regmean", "ensemble") else matching,
        "allocation": "zip" if method == "zip" else allocation,
        "heads": "separate" if separate else "shared",
        "width": {"requested": width, "achieved": round(cost.width, 4)},
        "macs": {"merged": cost.macs, "merged_dense": cost.dense_macs, "one_model": cost.base_macs},
        "params": {"merged": sum(int(v.numel()) for k, v in state.items() if v.is_floating_point()
                                 and not k.endswith(("running_mean", "running_var"))),
                   "one_model": sum(int(p.numel()) for p in prep.a.model.parameters())},
        "groups": [{"name": g.name, "size": g.size, "merged": the_plan[g.name].n_merged,
                    "new_size": the_plan[g.name].size} for g in spec.hidden],
        "least_squares_mode": ("sequential" if sequential else "closed form")
        if method == "pleas" else None,
        "least_squares": [{"layer": f.module, "error_plain": f.error_before,
                           "error_fitted": f.error_after} for f in fits],
        "merge_data": {"name": prep.data_name, "images": sum(len(b) for b in prep.batches)},
        "seconds": {**{k: round(v, 4) for k, v in prep.seconds.items()
                       if not k.startswith("matching_")},
                    **{k: round(v, 4) for k, v in seconds.items()}},
    }
    report["seconds"]["total"] = round(sum(v for k, v in report["seconds"].items()), 4)
    desc = {"arch": prep.a.arch, "config": prep.a.config, "method": method,
            "width": report["width"], "groups": report["groups"],
            "models": [prep.a.name, prep.b.name]}
    return MergedModel(net, head_list, desc).eval(), report


@dataclass
class MergeResult:
    model: MergedModel
    report: dict
    prepared: Prepared


def merge(model_a: nn.Module | ModelSide, model_b: nn.Module | ModelSide, data: Any,
          width: float = 1.5, method: str = "pleas", matching: str = "activation",
          allocation: str = "uniform", heads: str = "auto", device: str = "cpu",
          batch_size: int = 64, max_batches: int | None = 16, ridge: float = 1e-4,
          seed: int = 0, positions: int | None = 64, progress: bool = True,
          sequential: bool = True) -> MergeResult:
    """Merge two models of the same architecture into one of ``width`` x one model's compute.

    Returns the :class:`MergedModel` and a report dict (widths, MACs, groups, timings).
    """
    planning.check_width(width)
    torch.manual_seed(seed)
    need_ls = method in ("pleas", "regmean")
    prep = prepare(model_a, model_b, data, device=device, batch_size=batch_size,
                   max_batches=max_batches, activations=(matching == "activation"),
                   least_squares=need_ls, progress=progress, positions=positions, seed=seed,
                   closed_form=method == "regmean" or not sequential)
    model, report = build(prep, width, method, matching, allocation, heads, ridge, seed,
                          progress=progress, sequential=sequential)
    return MergeResult(model, report, prep)
