"""Task-vector merging: models fine-tuned from ONE common base, merged in weight space.

PLeaS aligns two models before merging them; the methods here do not align anything.  They
assume that model A and model B were both fine-tuned from the same pretrained ``base`` (same
architecture, same width), so that their weights already live in the base's basin and the
*task vectors* (Ilharco et al., 2023)

    tau_m = theta_m - theta_base            (one per model m, over the shared trunk)

can be combined entry by entry.  Every method returns ``theta = theta_base + merged(tau_1..M)``:

============== ==================================================================================
method          merged task vector (per entry, or per layer l)
============== ==================================================================================
weight average  (model soup, Wortsman et al. 2022)  theta = sum_m w_m theta_m, w_m = 1/M;
                no base needed (equals task arithmetic with lambda = 1/M).
task arithmetic lambda * sum_m tau_m  (Ilharco et al. 2023; lambda picked on validation data,
                0.3 .. 0.5 typical when adding several tasks, 1/M = weight averaging).
TIES-Merging    (Yadav et al. 2023) trim every tau_m to its top-k% magnitudes (k = density,
                default 20%, over the whole task vector); elect the sign
                gamma = sign(sum_m trimmed_m) (total mass); disjoint mean over the models whose
                trimmed entry is non-zero with sign gamma; scaled by lambda (default 1).
DARE            (Yu et al. 2024) drop every entry of tau_m with probability p, rescale the
                survivors by 1 / (1 - p) (so E[dropped tau] = tau); then combine by task
                arithmetic (``combine="sum"``) or by TIES sign election + disjoint mean
                (``combine="ties"``, DARE-TIES).  Seeded.
Sens-Merging    (Liu et al. 2025) per-layer coefficients sigma_{m,l} from the sensitivity of
                model m's loss to its own task vector (first-order Taylor term
                s_{m,l} = sum_{i in l} |g_i tau_i|, g = dL_m/dtheta at theta_m on a few labelled
                batches of task m), normalised over layers (alpha_{m,l} = s_{m,l} / mean_l s),
                times a cross-task factor beta_m (logit alignment, shared label space only),
                fused by sigma_{., l} = M softmax_m(alpha_{m,l} beta_m / T); then
                lambda * sum_m sigma_{m,l} tau_{m,l} (or TIES on the scaled task vectors).
DAM             (Gauthier-Caron et al. 2024) learn coefficients c_{m,l} (per layer, or per
                output channel) of theta = theta_base + sum_m c_{m,l} tau_{m,l} by minimising
                sum_m KL(p_m || p_merged,m) on unlabeled data with Adam, where p_merged,m is the
                merged trunk read through model m's own head; starts at c = 1/M (averaging).
============== ==================================================================================

Heads: the task vectors cover the shared trunk.  Each task keeps its own classifier (the Linear
whose out axis is the class axis, found with :func:`pleas.spec.derive_spec`), so the merged
model is multi-headed, like PLeaS with separate heads: one net whose classifier stacks both
heads' rows, returned as a :class:`pleas.merged.MergedModel` with one :class:`Head` per task.
When both models share the label space and class count, ``heads="shared"`` merges the head
like the trunk (its base head must have the same shape) and the model returns one tensor.

Buffers: integer buffers (``num_batches_tracked``) are copied from model A.  BatchNorm running
statistics (keys ending in ``running_mean`` / ``running_var``) are merged by the LINEAR part of
each method (task arithmetic with the method's coefficients: no trimming, dropping or sign
election, which make no sense for statistics), variances clamped at 0; then, by default when
data are given, :func:`pleas.normalization.recalibrate_batchnorm` recomputes them exactly.

The functions on state dicts (:func:`task_arithmetic`, :func:`ties_merging`, :func:`dare`,
:func:`weight_average`) are pure: they never modify their inputs and are deterministic (DARE
through its ``seed``).  :func:`sens_merging` and :func:`dam` need the models themselves (for
gradients and outputs) and return ``(state, details)``.  :func:`merge_with_base` is the one
entry point that checks the pair, handles heads and buffers and builds the merged model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .capture import as_batches, batch_inputs
from .merged import Head, MergedModel
from .errors import MergeError
from .heads import ModelSide, as_side, check_same_architecture, separate_heads
from .heads import task_names as _task_names

__all__ = ["METHODS", "TaskVectorError", "task_vectors", "weight_average", "task_arithmetic",
           "ties_merging", "dare", "sens_coefficients", "sens_merging", "dam", "base_relation",
           "head_keys", "merge_with_base"]

State = dict[str, torch.Tensor]
STAT_SUFFIXES = ("running_mean", "running_var")
ALIASES = {"ta": "task_arithmetic", "task-arithmetic": "task_arithmetic",
           "ties_merging": "ties", "ties-merging": "ties", "sens_merging": "sens",
           "sens-merging": "sens", "soup": "weight_average",
           "model_soup": "weight_average", "weight-average": "weight_average"}


class TaskVectorError(MergeError):
    """A task-vector merge cannot be done as asked; the message says why."""


# ------------------------------------------------------------------------------ state helpers
def _is_stat(key: str) -> bool:
    return key.endswith(STAT_SUFFIXES)


def _state(x: nn.Module | Mapping[str, torch.Tensor]) -> State:
    """A detached state dict of a module or a mapping (tensors are not copied)."""
    sd = x.state_dict() if isinstance(x, nn.Module) else x
    return {k: v.detach() for k, v in sd.items()}


def _check_finite(state: Mapping[str, torch.Tensor], who: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TaskVectorError(f"{who} has NaN or infinite values in {k!r}; cannot merge it")


def _check_same(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Same keys and shapes (the pure functions' precondition)."""
    ref, ref_name = states[0], names[0]
    for s, n in zip(states[1:], names[1:]):
        if s.keys() != ref.keys():
            only_r, only_s = sorted(set(ref) - set(s)), sorted(set(s) - set(ref))
            raise TaskVectorError(f"mismatched architectures: tensors only in {ref_name}: "
                                  f"{only_r[:4]}, only in {n}: {only_s[:4]}")
        for k in ref:
            if s[k].shape != ref[k].shape:
                raise TaskVectorError(f"mismatched architectures: {k} has shape "
                                      f"{tuple(ref[k].shape)} in {ref_name} and "
                                      f"{tuple(s[k].shape)} in {n}")


def _prepare(base: Any, states: Sequence[Any], need_base: bool = True) -> tuple[State | None,
                                                                                 list[State]]:
    if not states:
        raise TaskVectorError("nothing to merge: give at least one model state")
    sts = [_state(s) for s in states]
    names = [f"model {i}" for i in range(len(sts))]
    b = None
    if base is not None:
        b = _state(base)
        _check_same([b, *sts], ["base", *names])
        _check_finite(b, "the base")
    elif need_base:
        raise TaskVectorError("task-vector methods need the common base of the models "
                              "(base=...); weight averaging is the method without a base")
    else:
        _check_same(sts, names)
    for s, n in zip(sts, names):
        _check_finite(s, n)
    return b, sts


def task_vectors(base: Any, states: Sequence[Any]) -> list[State]:
    """``tau_m = theta_m - theta_base`` for every floating-point tensor (float64 is kept)."""
    b, sts = _prepare(base, states)
    return [{k: s[k] - b[k] for k in b if b[k].is_floating_point()} for s in sts]


def _finish(base: State, states: list[State], merged: Mapping[str, torch.Tensor]) -> State:
    """Assemble ``base + merged`` for float tensors, integer tensors copied from model 0."""
    out: State = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = states[0][k].clone()
            continue
        t = v + merged[k].to(v.dtype)
        if k.endswith("running_var"):
            t = t.clamp_min(0)
        out[k] = t
    return out


def _linear(states_tv: list[State], coef: Callable[[str, int], Any], keys: Iterable[str]) -> State:
    """``sum_m coef(key, m) * tau_m[key]`` for each key."""
    return {k: sum(coef(k, m) * tv[k] for m, tv in enumerate(states_tv)) for k in keys}


def _check_lam(lam: float) -> float:
    if not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise TaskVectorError(f"lambda must be a finite number, got {lam!r}")
    return float(lam)


def _check_density(density: float) -> float:
    if not isinstance(density, (int, float)) or not (0.0 < density <= 1.0):
        raise TaskVectorError(f"TIES density must be in (0, 1] (the kept fraction of each task "
                              f"vector), got {density!r}")
    return float(density)


def _check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise TaskVectorError(f"DARE drop probability p must be in [0, 1), got {p!r}")
    return float(p)


# ------------------------------------------------------------------------------ simple methods
def weight_average(states: Sequence[Any], weights: Sequence[float] | None = None,
                   base: Any = None) -> State:
    """Model soup: ``theta = sum_m w_m theta_m`` (uniform ``w_m = 1/M`` by default).

    Wortsman et al. 2022 ("Model soups"): averaging the weights of models fine-tuned from one
    pretrained model.  No base is needed; with a base it equals task arithmetic with
    ``lambda = 1/M``.  Integer tensors are copied from the first model.
    """
    _, sts = _prepare(base, states, need_base=False)
    m = len(sts)
    w = [1.0 / m] * m if weights is None else [float(x) for x in weights]
    if len(w) != m or not all(math.isfinite(x) for x in w):
        raise TaskVectorError(f"weight_average needs {m} finite weights, got {weights!r}")
    out: State = {}
    for k, v in sts[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
        else:
            out[k] = sum(wi * s[k] for wi, s in zip(w, sts)).to(v.dtype)
    return out


def task_arithmetic(base: Any, states: Sequence[Any], lam: float = 0.3) -> State:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

    ``theta = theta_base + lambda * sum_m tau_m`` with ``tau_m = theta_m - theta_base``.
    ``lambda`` is chosen on held-out validation data in the paper (0.3 .. 0.5 typical when
    adding several tasks; ``lambda = 1/M`` is weight averaging; ``lambda = 0`` is the base).
    Every floating tensor, running statistics included, follows the same formula.
    """
    lam = _check_lam(lam)
    b, sts = _prepare(base, states)
    tvs = [{k: s[k] - b[k] for k in b if b[k].is_floating_point()} for s in sts]
    return _finish(b, sts, _linear(tvs, lambda k, m: lam, tvs[0]))


def _ties_flat(vectors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES on flat task vectors: trim to top-``density`` magnitudes each, elect, disjoint mean."""
    trimmed = []
    for v in vectors:
        n = v.numel()
        k = min(n, max(1, math.ceil(density * n - 1e-9)))
        if k >= n:
            trimmed.append(v)
            continue
        keep = torch.zeros(n, dtype=torch.bool, device=v.device)
        keep[torch.topk(v.abs(), k, sorted=False).indices] = True
        trimmed.append(torch.where(keep, v, torch.zeros_like(v)))
    stack = torch.stack(trimmed)  # (M, n)
    elected = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == elected) & (stack != 0)
    count = agree.sum(0)
    total = torch.where(agree, stack, torch.zeros_like(stack)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _param_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not _is_stat(k)]


def _ties_state(tvs: list[State], keys: list[str], density: float) -> State:
    if not keys:
        return {}
    flat = [torch.cat([tv[k].reshape(-1).double() for k in keys]) for tv in tvs]
    merged = _ties_flat(flat, density)
    out, pos = {}, 0
    for k in keys:
        n = tvs[0][k].numel()
        out[k] = merged[pos:pos + n].view_as(tvs[0][k])
        pos += n
    return out


def ties_merging(base: Any, states: Sequence[Any], density: float = 0.2,
                 lam: float = 1.0) -> State:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models").

    1. Trim: keep the top-``density`` fraction (k = 20% in the paper) of each task vector's
       entries by magnitude, over the whole task vector (all parameters together; the count is
       ``ceil(density * n)``), and reset the rest to 0.
    2. Elect: ``gamma = sign(sum_m trimmed_m)`` per entry (the sign with the larger total mass).
    3. Disjoint merge: the mean of ``trimmed_m`` over the models whose entry is non-zero and
       has sign ``gamma`` (0 where none).
    ``theta = theta_base + lambda * merged`` (lambda = 1 in the paper).  Running statistics
    take ``theta_base + lambda * mean_m tau_m`` (no trimming).
    """
    density, lam = _check_density(density), _check_lam(lam)
    b, sts = _prepare(base, states)
    tvs = [{k: s[k] - b[k] for k in b if b[k].is_floating_point()} for s in sts]
    merged = {k: lam * v for k, v in _ties_state(tvs, _param_keys(b), density).items()}
    stats = [k for k in tvs[0] if _is_stat(k)]
    merged.update(_linear(tvs, lambda k, m: lam / len(tvs), stats))
    return _finish(b, sts, merged)


def _dare_drop(tvs: list[State], keys: list[str], p: float, seed: int) -> list[State]:
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for tv in tvs:
        d = {}
        for k in keys:  # fixed key order: the masks depend on the seed only
            keep = torch.rand(tv[k].shape, generator=gen) >= p
            d[k] = torch.where(keep.to(tv[k].device), tv[k] / (1.0 - p), torch.zeros_like(tv[k]))
        out.append(d)
    return out


def dare(base: Any, states: Sequence[Any], p: float = 0.5, seed: int = 0,
         combine: str = "sum", lam: float | None = None, density: float = 1.0) -> State:
    """DARE, Drop And REscale (Yu et al. 2024, "Language models are Super Mario").

    Each entry of each task vector is dropped with probability ``p`` (independent Bernoulli
    masks from a generator seeded with ``seed``) and the survivors are rescaled by
    ``1 / (1 - p)``, so ``E[tau~_m] = tau_m``.  Then:
    - ``combine="sum"``: ``theta = theta_base + lambda * sum_m tau~_m`` (default lambda 0.3, as
      task arithmetic);
    - ``combine="ties"``: DARE-TIES, TIES's sign election and disjoint mean on ``tau~_m`` (and
      TIES magnitude trimming when ``density < 1``), ``theta = theta_base + lambda * merged``
      (default lambda 1).
    Running statistics are not dropped (the linear part only).
    """
    p = _check_p(p)
    if combine not in ("sum", "ties"):
        raise TaskVectorError(f"DARE combine must be 'sum' or 'ties', got {combine!r}")
    lam = _check_lam((0.3 if combine == "sum" else 1.0) if lam is None else lam)
    density = _check_density(density)
    b, sts = _prepare(base, states)
    tvs = [{k: s[k] - b[k] for k in b if b[k].is_floating_point()} for s in sts]
    pkeys = _param_keys(b)
    dropped = _dare_drop(tvs, pkeys, p, seed)
    if combine == "sum":
        merged = _linear(dropped, lambda k, m: lam, pkeys)
        stat_coef = lam
    else:
        merged = {k: lam * v for k, v in _ties_state(dropped, pkeys, density).items()}
        stat_coef = lam / len(tvs)
    merged.update(_linear(tvs, lambda k, m: stat_coef, [k for k in tvs[0] if _is_stat(k)]))
    return _finish(b, sts, merged)


# ------------------------------------------------------------------------------ data helpers
def _is_source(x: Any) -> bool:
    """An image source (not a single batch): ImageSet, DataLoader, or a list of batches."""
    if hasattr(x, "loader") or isinstance(x, torch.utils.data.DataLoader):
        return True
    return isinstance(x, list) and (not x or isinstance(x[0], (torch.Tensor, tuple, list, dict)))


def _batches(source: Any, batch_size: int = 64, max_batches: int | None = None,
             labelled: bool = False) -> list:
    """A list of image tensors (or ``(images, labels)`` pairs when ``labelled``)."""
    if source is None:
        return []
    if labelled and hasattr(source, "loader") and getattr(source, "labels", None) is None:
        raise TaskVectorError(f"{source!r} has no labels; Sens-Merging needs labelled data")
    out = []
    for b in as_batches(source, batch_size, max_batches):
        if labelled:
            if isinstance(b, dict):
                x, y = b.get("images", b.get("pixel_values")), b.get("labels")
            elif isinstance(b, (tuple, list)) and len(b) >= 2:
                x, y = b[0], b[1]
            else:
                raise TaskVectorError("labelled batches must be (images, labels) pairs")
            if y is None or (torch.as_tensor(y) < 0).any():
                raise TaskVectorError("Sens-Merging needs labelled batches (labels missing)")
            out.append((x, torch.as_tensor(y)))
        else:
            out.append(batch_inputs(b))
    return out


def _per_model(sources: Any, m: int, what: str, **kw) -> list[list]:
    """One batch list per model: a sequence of ``m`` sources, or one source shared by all."""
    if isinstance(sources, Mapping):
        raise TaskVectorError(f"{what}: pass a list with one source per model, not a mapping")
    if isinstance(sources, (list, tuple)) and len(sources) == m and all(_is_source(s)
                                                                        for s in sources):
        return [_batches(s, **kw) for s in sources]
    shared = _batches(sources, **kw)
    return [shared] * m


def _restricted(base: Any, states: list[State], keys: Iterable[str] | None
                ) -> tuple[State, list[State]]:
    """``_prepare`` on the ``keys`` of the base and of every model (all keys when None)."""
    if base is None:
        raise TaskVectorError("task-vector methods need the common base of the models (base=...)")
    if keys is None:
        return _prepare(base, states)
    keys = list(keys)
    sb = _state(base)
    for name, s in [("the base", sb)] + [(f"model {i}", x) for i, x in enumerate(states)]:
        missing = [k for k in keys if k not in s]
        if missing:
            raise TaskVectorError(f"{name} has no tensor {missing[0]!r}")
    return _prepare({k: sb[k] for k in keys}, [{k: s[k] for k in keys} for s in states])


def _layer(key: str) -> str:
    """The module a tensor belongs to (its key without the last name)."""
    return key.rsplit(".", 1)[0] if "." in key else key


def _layers(keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(_layer(k), []).append(k)
    return out


# ------------------------------------------------------------------------------ Sens-Merging
def sens_coefficients(sensitivity: Mapping[str, Sequence[float]],
                      beta: Sequence[float] | None = None,
                      temperature: float = 1.0) -> dict[str, list[float]]:
    """Per-layer merging coefficients from per-layer sensitivities (Sens-Merging's fusion).

    ``sensitivity[l][m] = s_{m,l} >= 0``.  Task-specific scaling normalises each model over its
    layers, ``alpha_{m,l} = s_{m,l} / mean_l s_{m,l}`` (a model with all-zero sensitivity gets
    alpha = 1); the cross-task factor ``beta_m`` (default 1) multiplies it; the fusion is
    ``sigma_{m,l} = M * softmax_m(alpha_{m,l} * beta_m / T)`` so the coefficients of one layer
    average to 1 (equal sensitivities give sigma = 1: plain task arithmetic).
    """
    if not temperature > 0:
        raise TaskVectorError(f"Sens-Merging temperature must be > 0, got {temperature!r}")
    layers = list(sensitivity)
    if not layers:
        return {}
    m = len(sensitivity[layers[0]])
    s = torch.tensor([[float(sensitivity[l][i]) for l in layers] for i in range(m)],
                     dtype=torch.float64)  # (M, L)
    mean = s.mean(1, keepdim=True)
    alpha = torch.where(mean > 0, s / mean.clamp_min(1e-300), torch.ones_like(s))
    b = torch.ones(m, 1, dtype=torch.float64) if beta is None else torch.tensor(
        [float(x) for x in beta], dtype=torch.float64)[:, None]
    sigma = m * torch.softmax(alpha * b / temperature, dim=0)
    return {l: sigma[:, j].tolist() for j, l in enumerate(layers)}


def _models(models: Sequence[nn.Module], device: str) -> list[nn.Module]:
    out = []
    for mod in models:
        if not isinstance(mod, nn.Module):
            raise TaskVectorError("sens_merging and dam need the models themselves (nn.Module)")
        out.append(mod.to(device).eval())
    return out


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        raise TaskVectorError("the models must return one logits tensor")
    return out


def sens_merging(base: Any, models: Sequence[nn.Module], batches_per_model: Sequence[Any],
                 lam: float | None = None, temperature: float = 1.0,
                 sensitivity: str = "elementwise", cross_task: bool | None = None,
                 combine: str = "sum", density: float = 1.0, keys: Iterable[str] | None = None,
                 labelled_batches: int | None = 4, batch_size: int = 64, device: str = "cpu",
                 progress: bool = False) -> tuple[State, dict]:
    """Sens-Merging (Liu et al. 2025): sensitivity-guided per-layer task-arithmetic coefficients.

    For every model m and layer l (the tensors of one module):
    - task-specific sensitivity ``s_{m,l} = sum_{i in l} |g_i * tau_i|`` (``"elementwise"``, the
      first-order estimate of the loss change when the layer's task vector is removed, entry by
      entry) or ``|<g, tau>_l|`` (``"dot"``), with ``g`` the gradient of model m's cross-entropy
      on ``labelled_batches`` labelled batches of its own task (``batches_per_model[m]``), taken at
      theta_m; normalised over layers into ``alpha_{m,l}`` (:func:`sens_coefficients`);
    - cross-task factor ``beta_m = (1 + a_m) / 2`` with ``a_m`` the mean cosine similarity of
      model m's logits with model k's logits on task k's inputs (k != m): models whose outputs
      transfer get more weight.  Only meaningful in a shared label space: by default it is used
      when every model has the same output size (``cross_task=None``), never otherwise;
    - ``sigma_{., l} = M softmax_m(alpha_{m,l} beta_m / T)`` (temperature T, default 1);
    - ``combine="sum"``: ``theta = theta_base + lambda * sum_m sigma_{m,l} tau_{m,l}`` (default
      lambda 0.3, as task arithmetic); ``combine="ties"``: TIES (``density``) on the scaled task
      vectors, default lambda 1.

    Only ``keys`` (default: every tensor of the base) are merged; the models' other tensors
    (e.g. their own heads) are used as they are to compute each model's loss.  Returns
    ``(state over keys, details)`` with the sensitivities s, beta and sigma per layer.
    """
    if sensitivity not in ("elementwise", "dot"):
        raise TaskVectorError(f"sensitivity must be 'elementwise' or 'dot', got {sensitivity!r}")
    if combine not in ("sum", "ties"):
        raise TaskVectorError(f"Sens-Merging combine must be 'sum' or 'ties', got {combine!r}")
    lam = _check_lam((0.3 if combine == "sum" else 1.0) if lam is None else lam)
    density = _check_density(density)
    mods = _models(models, device)
    m = len(mods)
    if len(batches_per_model) != m:
        raise TaskVectorError(f"Sens-Merging needs one labelled data source per model ({m}), "
                              f"got {len(batches_per_model)}")
    b, sts = _restricted(base, [_state(x) for x in mods], keys)
    b = {k: v.to(device) for k, v in b.items()}
    sts = [{k: v.to(device) for k, v in s.items()} for s in sts]
    keys = list(b)
    tvs = [{k: s[k] - b[k] for k in keys if b[k].is_floating_point()} for s in sts]
    data = [_batches(src, batch_size, labelled_batches, labelled=True)
            for src in batches_per_model]
    for i, d in enumerate(data):
        if not d:
            raise TaskVectorError(f"Sens-Merging: no labelled batches for model {i}")
    pkeys = [k for k in _param_keys(b)]
    groups = _layers(pkeys)
    sens: dict[str, list[float]] = {l: [0.0] * m for l in groups}
    for i, mod in enumerate(tqdm(mods, desc="Sens-Merging gradients", disable=not progress,
                                 leave=False)):
        named = dict(mod.named_parameters())
        missing = [k for k in pkeys if k not in named]
        if missing:
            raise TaskVectorError(f"Sens-Merging: {missing[:3]} are not parameters of model {i}")
        params = [named[k] for k in pkeys]
        total = [torch.zeros_like(p) for p in params]
        count = 0
        for x, y in data[i]:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(_logits(mod(x)), y, reduction="sum")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g)
            count += len(y)
        grads = {k: t / max(count, 1) for k, t in zip(pkeys, total)}
        for l, ks in groups.items():
            if sensitivity == "elementwise":
                s = sum(float((grads[k] * tvs[i][k]).abs().sum()) for k in ks)
            else:
                s = abs(sum(float((grads[k] * tvs[i][k]).sum()) for k in ks))
            sens[l][i] = s
    out_sizes = set()
    with torch.no_grad():
        for mod, d in zip(mods, data):
            out_sizes.add(_logits(mod(d[0][0][:1].to(device))).shape[-1])
    use_cross = (len(out_sizes) == 1) if cross_task is None else bool(cross_task)
    if use_cross and len(out_sizes) != 1:
        raise TaskVectorError("Sens-Merging cross-task scaling compares logits: the models need "
                              "the same number of classes")
    beta = [1.0] * m
    align = None
    if use_cross and m > 1:
        align = []
        with torch.no_grad():
            for i, mod in enumerate(mods):
                cos = []
                for k, other in enumerate(mods):
                    if k == i:
                        continue
                    for x, _ in data[k]:
                        x = x.to(device)
                        cos.append(F.cosine_similarity(_logits(mod(x)), _logits(other(x)),
                                                       dim=-1).mean().item())
                align.append(sum(cos) / len(cos))
        beta = [(1.0 + a) / 2.0 for a in align]
    sigma = sens_coefficients(sens, beta, temperature)
    coef = {k: sigma[_layer(k)] for k in pkeys}
    if combine == "sum":
        merged = _linear(tvs, lambda k, i: lam * coef[k][i], pkeys)
        stat_scale = 1.0
    else:
        scaled = [{k: coef[k][i] * tv[k] for k in pkeys} for i, tv in enumerate(tvs)]
        merged = {k: lam * v for k, v in _ties_state(scaled, pkeys, density).items()}
        stat_scale = 1.0 / m
    # statistics follow their module's coefficients (1 where the module has no parameters)
    stats = [k for k in tvs[0] if _is_stat(k)]
    merged.update(_linear(tvs, lambda k, i: lam * stat_scale * sigma.get(_layer(k), [1.0] * m)[i],
                          stats))
    state = _finish(b, sts, merged)
    details = {"sensitivity": sens, "temperature": temperature, "beta": beta,
               "alignment": align, "cross_task": use_cross, "sigma": sigma, "lam": lam,
               "combine": combine, "labelled_images": [sum(len(y) for _, y in d) for d in data]}
    return {k: v.cpu() for k, v in state.items()}, details


# ------------------------------------------------------------------------------ DAM
def dam(base: Any, models: Sequence[nn.Module], unlabeled_batches: Any, steps: int = 200,
        lr: float = 0.01, seed: int = 0, per: str = "layer", init: float | None = None,
        kl: str = "forward", temperature: float = 1.0, l2: float = 0.0, tol: float = 1e-9,
        bn: str = "running", keys: Iterable[str] | None = None, max_batches: int | None = 16,
        batch_size: int = 64, device: str = "cpu", progress: bool = True) -> tuple[State, dict]:
    """DAM, Differentiable Adaptive Merging (Gauthier-Caron et al. 2024), on task vectors.

    Learns coefficients ``c`` of ``theta(c) = theta_base + sum_m c_{m,l} tau_{m,l}``, one per
    model and layer (``per="layer"``: all tensors of one module) or per model, tensor and
    output channel (``per="channel"``: one per row of a weight / entry of a vector, the paper's
    fine-grained scaling), by minimising on unlabeled data

        sum_m KL(p_m || p_{theta(c), m}) / T^2-free, with p = softmax(logits / T)

    where ``p_m`` is model m's own prediction and ``p_{theta(c), m}`` the merged tensors read
    through model m's own remaining tensors (its head when the heads are kept apart).
    ``kl="reverse"`` uses ``KL(p_merged || p_m)``.  Adam (``lr``), ``steps`` steps, one batch of
    every model per step in a seeded order, optional ``l2 * ||c - c_init||^2``; the paper's
    cosine-diversity and L1 terms are left out.  Starts at ``c = init`` (default ``1/M``: the
    weight average).  A step whose objective is below ``tol`` changes nothing (the merged model
    already reproduces every model).

    ``bn="running"``: BatchNorm uses the merged running statistics (linear in their module's
    coefficients, which learn through the BN weight and bias only: batch norm has no gradient
    with respect to its running statistics);
    ``bn="batch"``: batch statistics (use it when the statistics are recalibrated afterwards).
    ``unlabeled_batches``: one source per model (a list of ImageSets / batch lists, len M) or
    one source shared by all.  Returns ``(state over keys, details)`` with the objective before
    and after, the loss curve and the learned coefficients.
    """
    if per not in ("layer", "channel"):
        raise TaskVectorError(f"DAM per must be 'layer' or 'channel', got {per!r}")
    if kl not in ("forward", "reverse"):
        raise TaskVectorError(f"DAM kl must be 'forward' or 'reverse', got {kl!r}")
    if bn not in ("running", "batch"):
        raise TaskVectorError(f"DAM bn must be 'running' or 'batch', got {bn!r}")
    if not isinstance(steps, int) or steps < 0:
        raise TaskVectorError(f"DAM steps must be a non-negative integer, got {steps!r}")
    if not (lr > 0 and temperature > 0 and l2 >= 0):
        raise TaskVectorError("DAM needs lr > 0, temperature > 0 and l2 >= 0")
    mods = _models(models, device)
    m = len(mods)
    msd = [_state(x) for x in mods]
    b, sts = _restricted(base, msd, keys)
    b = {k: v.to(device) for k, v in b.items()}
    sts = [{k: v.to(device) for k, v in s.items()} for s in sts]
    keys = list(b)
    fkeys = [k for k in keys if b[k].is_floating_point()]
    tvs = [{k: s[k] - b[k] for k in fkeys} for s in sts]
    data = _per_model(unlabeled_batches, m, "DAM data", batch_size=batch_size,
                      max_batches=max_batches)
    for i, d in enumerate(data):
        if not d:
            raise TaskVectorError(f"DAM: no unlabeled batches for model {i}")
    c0 = 1.0 / m if init is None else float(init)
    torch.manual_seed(seed)
    if per == "layer":
        groups = _layers(fkeys)
        coefs = {l: torch.full((m,), c0, dtype=torch.float32, device=device, requires_grad=True)
                 for l in groups}
        index = {k: _layer(k) for k in fkeys}
    else:
        index = {}
        for k in fkeys:  # statistics follow their BatchNorm's weight (they get no gradient)
            w = f"{_layer(k)}.weight"
            tied = (_is_stat(k) and w in b and b[w].ndim == 1 and b[w].shape == b[k].shape)
            index[k] = w if tied else k
        coefs = {k: torch.full((m, b[k].shape[0] if b[k].ndim else 1), c0, dtype=torch.float32,
                               device=device, requires_grad=True) for k in set(index.values())}

    def merged_tensors() -> dict[str, torch.Tensor]:
        out = {}
        for k in fkeys:  # running statistics: no gradient through BatchNorm's buffers
            c = coefs[index[k]]
            t = b[k]
            for i in range(m):
                ci = c[i]
                if per == "channel":
                    ci = ci.view(-1, *([1] * (b[k].ndim - 1))) if b[k].ndim else ci[0]
                t = t + ci.to(b[k].dtype) * tvs[i][k]
            if k.endswith("running_var"):
                t = t.clamp_min(0)
            out[k] = t.detach() if _is_stat(k) else t
        return out

    bn_mods = [[mod_ for mod_ in mod.modules() if isinstance(mod_, nn.modules.batchnorm._BatchNorm)]
               for mod in mods]

    def student(i: int, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        mod = mods[i]
        call = {k: v for k, v in tensors.items() if not (bn == "batch" and _is_stat(k))}
        if bn == "batch":  # BN on batch statistics; its buffers are updated on copies only
            for name, buf in mod.named_buffers():
                if name not in call or _is_stat(name):
                    call[name] = buf.detach().clone()
            for mm in bn_mods[i]:
                mm.train()
        try:
            return _logits(torch.func.functional_call(mod, call, (x,)))
        finally:
            for mm in bn_mods[i]:
                mm.eval()

    teachers: dict[tuple[int, int], torch.Tensor] = {}
    with torch.no_grad():
        for i, mod in enumerate(mods):
            for j, x in enumerate(data[i]):
                teachers[(i, j)] = _logits(mod(x.to(device))).double()

    def divergence(i: int, j: int, tensors) -> torch.Tensor:
        x = data[i][j].to(device)
        # float64: rounding noise must not look like a divergence (see ``tol``)
        logq = F.log_softmax(student(i, x, tensors).double() / temperature, dim=-1)
        logp = F.log_softmax(teachers[(i, j)] / temperature, dim=-1)
        if kl == "forward":  # KL(p_m || q)
            return (logp.exp() * (logp - logq)).sum(-1).mean()
        return (logq.exp() * (logq - logp)).sum(-1).mean()

    def objective() -> float:
        with torch.no_grad():
            t = merged_tensors()
            per_model = [sum(float(divergence(i, j, t)) for j in range(len(data[i]))) / len(data[i])
                         for i in range(m)]
        return sum(per_model)

    initial = objective()
    opt = torch.optim.Adam(list(coefs.values()), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    orders = [torch.randperm(len(d), generator=gen).tolist() for d in data]
    pos = [0] * m
    curve, skipped = [], 0
    bar = tqdm(range(steps), desc="DAM", disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        tensors = merged_tensors()
        loss = torch.zeros((), device=device)
        for i in range(m):
            if pos[i] >= len(orders[i]):
                orders[i] = torch.randperm(len(data[i]), generator=gen).tolist()
                pos[i] = 0
            j = orders[i][pos[i]]
            pos[i] += 1
            loss = loss + divergence(i, j, tensors)
        if l2:
            loss = loss + l2 * sum(((c - c0) ** 2).sum() for c in coefs.values())
        value = float(loss.detach())
        curve.append(value)
        if value < tol:
            skipped += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(objective=f"{value:.4f}")
    bar.close()
    final = objective()
    with torch.no_grad():
        merged = {k: v.detach() - b[k] for k, v in merged_tensors().items()}
    state = _finish(b, sts, merged)
    summary = {l: (c.detach().mean(1) if c.ndim > 1 else c.detach()).tolist()
               for l, c in coefs.items()}
    details = {"objective": {"initial": initial, "final": final}, "curve": curve,
               "steps": steps, "skipped_steps": skipped, "coefficients": summary, "per": per,
               "init": c0, "lr": lr, "kl": kl, "bn": bn,
               "images": [sum(len(x) for x in d) for d in data]}
    return {k: v.cpu() for k, v in state.items()}, details


# ------------------------------------------------------------------------------ heads, base check
def head_keys(model: nn.Module, example: torch.Tensor | Sequence[int] | None = None
              ) -> dict[str, int]:
    """The classifier's tensors and their class axis ``{key: dim}``.

    From :func:`pleas.spec.derive_spec`'s output group (its ``"out"`` axes) when an example
    input (or its shape) is given; otherwise the weight/bias of the last ``nn.Linear``.
    """
    if example is not None:
        from .spec import derive_spec

        spec = derive_spec(model, example)
        out = spec.output_group
        if out is None:
            raise TaskVectorError("the model has no class axis (no output group in its spec)")
        return {ax.key: ax.dim for ax in out.axes if ax.role == "out"}
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise TaskVectorError("cannot find the classifier: pass an example input shape")
    sd = model.state_dict()
    return {k: 0 for k in (f"{last}.weight", f"{last}.bias") if k in sd}


def base_relation(base: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor],
                  b: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None,
                  threshold: float = 0.5) -> dict:
    """Do A and B plausibly share ``base``?  Distances over the trunk's parameters.

    Reports ``||theta_a - theta_base|| / ||theta_base||`` (and for B, and A - B) and, per
    weight matrix / kernel (ndim >= 2), the cosine between the model's and the base's tensor;
    its median is ~1 for a fine-tune of the base and ~0 for an independently trained model
    (random initialisations are nearly orthogonal).  ``shared`` is True when both medians are
    at least ``threshold``.
    """
    keys = [k for k in (keys if keys is not None else base) if base[k].is_floating_point()
            and not _is_stat(k)]

    def dist(x, y):
        return math.sqrt(sum(float(((x[k].double() - y[k].double()) ** 2).sum()) for k in keys))

    norm = math.sqrt(sum(float((base[k].double() ** 2).sum()) for k in keys)) or 1.0

    def cos(x):
        vals = []
        for k in keys:
            if base[k].ndim >= 2:
                vals.append(float(F.cosine_similarity(x[k].double().flatten(),
                                                      base[k].double().flatten(), dim=0)))
        return float(torch.tensor(vals).median()) if vals else float("nan")

    ca, cb = cos(a), cos(b)
    rel = {"a_to_base": dist(a, base) / norm, "b_to_base": dist(b, base) / norm,
           "a_to_b": dist(a, b) / norm}
    shared = bool(ca >= threshold and cb >= threshold)
    return {"shared": shared, "relative_distance": {k: round(v, 4) for k, v in rel.items()},
            "median_cosine_to_base": {"a": round(ca, 4), "b": round(cb, 4)},
            "threshold": threshold}


# ------------------------------------------------------------------------------ entry point
_OWN = {"base", "states", "models", "batches_per_model", "unlabeled_batches", "keys", "device",
        "progress", "bn", "batch_size", "max_batches"}


@dataclass
class _Inputs:
    """What a method's combine step reads: the restricted states, models, data and options."""

    base: State | None
    states: list[State]
    models: list[nn.Module]
    keys: list[str]
    unlabeled: list | None
    labelled: list | None
    shared: bool
    recalibrate: bool
    device: str
    batch_size: int
    progress: bool
    params: dict


def _combine_average(x: _Inputs) -> tuple[State, dict]:
    return weight_average(x.states, x.params["weights"]), {}


def _combine_linear(fn: Callable) -> Callable[[_Inputs], tuple[State, dict]]:
    """Methods that are pure functions of (base, states, **params)."""
    return lambda x: (fn(x.base, x.states, **x.params), {})


def _combine_sens(x: _Inputs) -> tuple[State, dict]:
    p = dict(x.params)
    if p.get("cross_task") is None:
        p["cross_task"] = x.shared
    return sens_merging(x.base, x.models, x.labelled, keys=x.keys, device=x.device,
                        batch_size=x.batch_size, progress=x.progress, **p)


def _combine_dam(x: _Inputs) -> tuple[State, dict]:
    return dam(x.base, x.models, x.unlabeled, keys=x.keys, device=x.device,
               progress=x.progress, bn="batch" if x.recalibrate else "running",
               batch_size=x.batch_size, max_batches=None, **x.params)


def _register_family() -> None:
    from .methods import MergeMethod, params_of, register

    def tv(name, fn, combine, summary, reference, **needs):
        register(MergeMethod(name, "task_vector", summary, reference, aligned=False,
                             fixed_width=1.0, params=params_of(fn, _OWN), combine=combine,
                             **needs))

    tv("task_arithmetic", task_arithmetic, _combine_linear(task_arithmetic),
       "theta_base + lambda * sum of task vectors", "Ilharco et al., ICLR 2023",
       needs_base=True)
    tv("ties", ties_merging, _combine_linear(ties_merging),
       "TIES: trim, elect sign, disjoint mean of task vectors", "Yadav et al., NeurIPS 2023",
       needs_base=True)
    tv("dare", dare, _combine_linear(dare),
       "DARE: drop and rescale task vectors, then sum or TIES", "Yu et al., ICML 2024",
       needs_base=True)
    tv("sens", sens_merging, _combine_sens,
       "Sens-Merging: per-layer coefficients from sensitivities on labelled data",
       "Liu et al., 2025", needs_base=True, needs_labelled=True, needs_data=True)
    tv("dam", dam, _combine_dam,
       "DAM: per-layer coefficients learned on unlabeled data (KL to each model)",
       "Gauthier-Caron et al., 2024", needs_base=True, needs_data=True)
    tv("weight_average", weight_average, _combine_average,
       "model soup: the average of models fine-tuned from one base (no base needed)",
       "Wortsman et al., ICML 2022")


_register_family()
METHODS = ("task_arithmetic", "ties", "dare", "sens", "dam", "weight_average")


def _record(method: str):
    from . import methods as registry

    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise TaskVectorError(f"unknown task-vector method {method!r}; expected one of "
                              f"{', '.join(METHODS)}")
    return registry.get(name)


def _defaults(record, params: dict) -> dict:
    """The method's parameters with defaults filled in; unknown names are an error."""
    allowed = [p.name for p in record.params]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TaskVectorError(f"unknown parameter(s) {unknown} for method {record.name!r}; it "
                              f"takes {', '.join(allowed)}")
    out = {**record.param_defaults(), **params}
    if "lam" in out and out["lam"] is None and record.name in ("dare", "sens"):
        out["lam"] = 0.3 if out.get("combine", "sum") == "sum" else 1.0
    if out.get("lam") is not None:
        _check_lam(out["lam"])
    if "density" in out:
        _check_density(out["density"])
    if "p" in out:
        _check_p(out["p"])
    return out


def _sources(x: Any, names: Sequence[str]) -> list | None:
    """``None``, one source for both, a mapping {task name or index: source} or a pair."""
    if x is None:
        return None
    if isinstance(x, Mapping):
        out = []
        for i, n in enumerate(names):
            if n in x:
                out.append(x[n])
            elif i in x:
                out.append(x[i])
            else:
                raise TaskVectorError(f"no data for task {n!r}; the mapping has {list(x)}")
        return out
    if isinstance(x, (list, tuple)) and len(x) == len(names) and all(_is_source(s) for s in x):
        return list(x)
    return [x] * len(names)


def _example(example_shape, unl_batches, lab, batch_size) -> torch.Tensor | None:
    """An input to find the classifier with: the given shape, else the first batch's images."""
    if example_shape is not None:
        return torch.zeros(tuple(example_shape))
    if unl_batches and unl_batches[0]:
        return unl_batches[0][0][:2]
    if lab:
        return _batches(lab[0], batch_size, 1, labelled=True)[0][0][:2]
    return None


def _check_base(sbase: State | None, sa: State, trunk: list[str]) -> None:
    """The base has the models' trunk: same keys and shapes."""
    if sbase is None:
        return
    missing = [k for k in trunk if k not in sbase]
    if missing:
        raise TaskVectorError(f"the base is not the models' architecture: it lacks {missing[:4]}")
    for k in trunk:
        if sbase[k].shape != sa[k].shape:
            raise TaskVectorError(f"the base is not the models' architecture: {k} has shape "
                                  f"{tuple(sbase[k].shape)} in the base and "
                                  f"{tuple(sa[k].shape)} in the models")


def _check_shared_head(record, sbase: State | None, sa: State, hk: dict[str, int]) -> None:
    if sbase is not None and record.needs_base and any(
            k not in sbase or sbase[k].shape != sa[k].shape for k in hk):
        raise TaskVectorError("a shared head is merged by task vectors, but the base's head "
                              "has a different shape (new heads were trained): use "
                              "heads='separate'")


def _base_check(sbase: State | None, sa: State, sb: State, trunk: list[str]
                ) -> tuple[dict | None, list[str]]:
    """Do A and B plausibly share the base?  The evidence, and a warning when they do not."""
    if sbase is None:
        return None, []
    relation = base_relation(sbase, sa, sb, trunk)
    if relation["shared"]:
        return relation, []
    cos = relation["median_cosine_to_base"]
    return relation, [
        f"A and B do not appear to share this base (median cosine to the base: A {cos['a']}, "
        f"B {cos['b']}): task vectors of models trained from different initialisations do not "
        "add up meaningfully; expect a poor merge (PLeaS aligns the models first and does not "
        "need a common base)"]


def _assemble(merged: State, sa: State, sb: State, hk: dict[str, int]) -> State:
    """The merged trunk, and separate heads as A's rows then B's rows along the class axis."""
    return {k: merged[k].to(sa[k].dtype) if k in merged else torch.cat([sa[k], sb[k]], dim=hk[k])
            for k in sa}


def _pooled(unl: list, unl_batches: list[list]) -> list:
    """One source for both models as it is; else both tasks' batches, interleaved."""
    if unl[0] is unl[1]:
        return unl_batches[0]
    longest = max(len(x) for x in unl_batches)
    return [x[i] for i in range(longest) for x in unl_batches if i < len(x)]


def merge_with_base(method: str, model_a: nn.Module | ModelSide, model_b: nn.Module | ModelSide,
                    base: nn.Module | Mapping[str, torch.Tensor] | None, data: Any = None,
                    labelled: Any = None, heads: str = "separate",
                    task_names: Sequence[str] | None = None, recalibrate: bool | None = None,
                    example_shape: Sequence[int] | None = None, batch_size: int = 64,
                    max_batches: int | None = 16, device: str = "cpu", progress: bool = True,
                    **params: Any) -> tuple[MergedModel, dict]:
    """Merge A and B, both fine-tuned from ``base``, with a task-vector method.

    ``method``: task_arithmetic | ties | dare | sens | dam | weight_average (aliases: ta,
    ties_merging, sens_merging, soup); ``params`` are the method's hyper-parameters
    (see its function; unknown names are an error).  ``data``: unlabeled images (an ImageSet,
    a tensor, batches; or ``{task name: source}`` / a pair, one per model) for DAM and the
    BatchNorm recalibration; ``labelled``: labelled data of each task (same forms) for Sens-
    Merging.  ``heads``: ``"separate"`` (each task keeps its own head: multi-head model),
    ``"shared"`` (same label space and class count: the head is merged like the trunk; its
    base head must have the same shape) or ``"auto"`` (shared when both models name the same
    label space and class count; :mod:`pleas.heads`).  ``task_names``: the heads' names
    (default: the ModelSides' tasks, else ``("a", "b")``).  ``recalibrate``: BN reset on
    ``data`` (default: when data are given).  ``example_shape``: input shape to find the
    classifier when no data are given.

    Returns the :class:`MergedModel` and a report: method, params, heads, ``shared_base`` (do A
    and B plausibly share the base? see :func:`base_relation`) with its evidence and a warning
    when they do not, method details (Sens-Merging coefficients, DAM objective) and timings.
    """
    t_start = time.perf_counter()
    record = _record(method)
    params = _defaults(record, dict(params))
    a, b = as_side(model_a, "model_a", TaskVectorError), as_side(model_b, "model_b",
                                                                 TaskVectorError)
    ma, mb = a.model.to(device).eval(), b.model.to(device).eval()
    if type(ma) is not type(mb):
        raise TaskVectorError(f"mismatched architectures: model A is {type(ma).__name__}, "
                              f"model B is {type(mb).__name__}")
    if task_names is None:
        task_names = (a.task or "a", b.task or "b")
    names = _task_names(a, b, tuple(task_names))
    if base is None and record.needs_base:
        raise TaskVectorError(f"{record.name} needs the common base of the two models (--base / "
                              "base=...): task vectors are differences to it")
    if isinstance(base, ModelSide):
        base = base.model
    sa, sb = _state(ma), _state(mb)
    sbase = _state(base) if base is not None else None
    for st, who in ((sa, "model A"), (sb, "model B"), (sbase, "the base")):
        if st is not None:
            _check_finite(st, who)

    unl, lab = _sources(data, names), _sources(labelled, names)
    unl_batches = [_batches(s, batch_size, max_batches) for s in unl] if unl else None
    example = _example(example_shape, unl_batches, lab, batch_size)
    hk = head_keys(ma, example.to(device) if example is not None else None)
    check_same_architecture(sa, sb, set(hk.items()), TaskVectorError)
    trunk = [k for k in sa if k not in hk]
    _check_base(sbase, sa, trunk)
    na = sa[next(iter(hk))].shape[next(iter(hk.values()))]
    nb = sb[next(iter(hk))].shape[next(iter(hk.values()))]
    shared = not separate_heads(heads, a, b, na, nb, TaskVectorError)
    if shared:
        _check_shared_head(record, sbase, sa, hk)
    keys = list(sa) if shared else trunk
    relation, warnings = _base_check(sbase, sa, sb, trunk)

    has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in ma.modules())
    if recalibrate is None:
        recalibrate = bool(unl_batches) and has_bn
    if recalibrate and not unl_batches:
        raise TaskVectorError("BatchNorm recalibration needs data (data=...)")
    if record.needs_labelled and not lab:
        raise TaskVectorError(f"{record.name} needs a few labelled batches of each task "
                              "(labelled=...)")
    if record.needs_data and not unl and not record.needs_labelled:
        raise TaskVectorError(f"{record.name} needs unlabeled data of the tasks (data=...)")
    inputs = _Inputs({k: sbase[k] for k in keys} if sbase is not None else None,
                     [{k: sa[k] for k in keys}, {k: sb[k] for k in keys}], [ma, mb], keys,
                     unl_batches, lab, shared, recalibrate, device, batch_size, progress, params)
    t0 = time.perf_counter()
    merged, details = record.combine(inputs)
    seconds = {"merge": time.perf_counter() - t0}

    state = _assemble(merged, sa, sb, hk)
    from .widen import build_module

    net = build_module(ma, {k: v.to(device) for k, v in state.items()}).to(device).eval()
    t0 = time.perf_counter()
    if recalibrate and has_bn:
        from .normalization import recalibrate_batchnorm

        recalibrate_batchnorm(net, _pooled(unl, unl_batches), device, progress=progress)
    seconds["batchnorm"] = time.perf_counter() - t0
    ta, tb = names
    head_list = None if shared else [
        Head(ta, 0, na, list(a.classes) if a.classes else None),
        Head(tb, na, na + nb, list(b.classes) if b.classes else None)]
    report = {
        "method": record.name, "params": dict(params), "heads": "shared" if shared else "separate",
        "tasks": list(names), "shared_base": bool(relation and relation["shared"]),
        "base_check": relation, "warnings": warnings,
        "merged_tensors": len(keys), "head_tensors": sorted(hk),
        "recalibrated": bool(recalibrate and has_bn),
        "details": details,
        "seconds": {**{k: round(v, 4) for k, v in seconds.items()},
                    "total": round(time.perf_counter() - t_start, 4)},
    }
    desc = {"arch": a.arch, "config": a.config, "method": record.name, "models": [a.name, b.name],
            "params": dict(params), "heads_mode": report["heads"]}
    return MergedModel(net, head_list, desc).eval(), report
