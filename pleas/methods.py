"""Every merge method, registered once by name, with what it needs declared on its record.

A :class:`MergeMethod` says what a method does in terms the pipeline understands, so that
nothing outside this record branches on a method's name: whether the units are aligned first
(``aligned``), which allocation it forces (``allocation``), which least-squares fit follows
(``least_squares``: ``"sequential"``, ``"closed"``, ``"regmean"`` or none), the one width it is
defined at (``fixed_width``), and what it needs (merge data, proxy data, a common base,
labelled data).  The two families share one namespace:

* ``alignment`` (:mod:`pleas.pipeline`): PLeaS and its baselines, any two models of one
  architecture, width 1 .. 2;
* ``task_vector`` (:mod:`pleas.task_vectors`): models fine-tuned from one common base, merged
  in weight space at width 1; their records carry ``combine`` (how the trunk is merged) and
  ``params`` (hyper-parameters with defaults), and are registered in that module, next to the
  functions they call.

Variants are separate registrations: ``pleas`` (sequential least squares, the default),
``pleas_closed`` (closed form), ``pleas_free`` / ``pleas_free_closed`` (merge data = proxy
images).  Add a method by registering one record with :func:`register`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from .errors import MergeError

FAMILIES = ("alignment", "task_vector")
LEAST_SQUARES = ("sequential", "closed", "regmean")


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method: its name, default and meaning."""

    name: str
    default: Any = None
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as data: what it does and what it needs."""

    name: str
    family: str
    summary: str
    reference: str = ""
    aligned: bool = True                 # units matched (activation / weight) before merging
    allocation: str | None = None        # a fixed allocator (zip); None: the configured one
    least_squares: str | None = None     # "sequential", "closed", "regmean" or None
    fixed_width: float | None = None     # the only width it is defined at (two models)
    side_by_side: bool = False           # the models side by side: width K for K models
    proxy_data: bool = False             # merge data must be proxy images (PLeaS-free)
    needs_base: bool = False             # a common base model (task vectors)
    needs_labelled: bool = False         # labelled batches of each task
    needs_data: bool = False             # unlabeled merge images, whatever the matching
    params: tuple[Param, ...] = ()
    variant_of: str | None = None        # the method this is a variant of (pleas_closed: pleas)
    combine: Callable | None = field(default=None, compare=False)

    def width_for(self, models: int) -> float | None:
        """The only width this method is defined at for ``models`` models (None: any)."""
        return float(models) if self.side_by_side else self.fixed_width

    @property
    def root(self) -> str:
        """The name shared by a method and its variants."""
        return self.variant_of or self.name

    def needs_activations(self, matching: str) -> bool:
        return self.aligned and matching == "activation"

    @property
    def needs_grams(self) -> bool:
        """The closed-form second moments (one Gram pass) are read by the fit."""
        return self.least_squares in ("closed", "regmean")

    @property
    def needs_layers(self) -> bool:
        """Any least-squares fit needs the layer records of the statistics pass."""
        return self.least_squares is not None

    def requires_data(self, matching: str) -> bool:
        """No data at all is impossible: statistics, least squares or the method itself."""
        return self.needs_data or self.needs_layers or self.needs_activations(matching)

    def param_defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the one namespace (a name may be registered only once)."""
    if method.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {method.family!r}")
    if method.least_squares not in (None, *LEAST_SQUARES):
        raise ValueError(f"least_squares must be one of {LEAST_SQUARES} or None")
    if method.name in _REGISTRY and _REGISTRY[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (for plugins and tests that register their own)."""
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    """The task-vector family registers itself in its own module."""
    from . import task_vectors  # noqa: F401


def names(family: str | None = None) -> tuple[str, ...]:
    _load_all()
    return tuple(n for n, m in _REGISTRY.items() if family is None or m.family == family)


def get(name: str) -> MergeMethod:
    """The registered method; an unknown name lists the registered ones."""
    _load_all()
    if isinstance(name, MergeMethod):
        return name
    if name not in _REGISTRY:
        raise MergeError(f"unknown method {name!r}; registered methods: {', '.join(names())}")
    return _REGISTRY[name]


def with_least_squares(method: MergeMethod, mode: str | None) -> MergeMethod:
    """The variant of ``method`` whose fit is ``mode`` (``pleas`` + closed -> ``pleas_closed``).

    ``None`` or the method's own mode returns it unchanged; a method without such a variant
    is an error that names the ones that have it.
    """
    if mode is None or mode == method.least_squares:
        return method
    for m in (get(n) for n in names()):
        if m.root == method.root and m.proxy_data == method.proxy_data \
                and m.least_squares == mode:
            return m
    have = sorted({m.root for m in (get(n) for n in names()) if m.least_squares == mode})
    raise MergeError(f"method {method.name!r} has no {mode!r} least-squares variant "
                     f"(methods with one: {', '.join(have) or 'none'})")


def params_of(fn: Callable, own: Iterable[str]) -> tuple[Param, ...]:
    """The keyword parameters of ``fn`` (minus the ones the caller supplies) as records."""
    sig = inspect.signature(fn)
    own = set(own)
    return tuple(Param(p, sig.parameters[p].default) for p in sig.parameters if p not in own)


def variant(method: MergeMethod, **changes: Any) -> MergeMethod:
    """A variant record of ``method`` (a new name plus the fields that differ)."""
    return replace(method, variant_of=method.root, **changes)


# ------------------------------------------------------------------------ the alignment family
PLEAS = register(MergeMethod(
    "pleas", "alignment",
    "PLeaS: permutation matching, partial merge under the budget, sequential least squares",
    "Nasery et al., PLeaS: Merging Models with Permutations and Least Squares, CVPR 2025",
    least_squares="sequential"))
register(variant(PLEAS, name="pleas_closed", least_squares="closed",
                 summary="PLeaS with the closed-form least squares (one Gram pass, solves only)"))
register(variant(PLEAS, name="pleas_free", proxy_data=True,
                 summary="PLeaS-free: matching, least squares and BN reset on proxy images"))
register(variant(PLEAS, name="pleas_free_closed", proxy_data=True, least_squares="closed",
                 summary="PLeaS-free with the closed-form least squares"))
register(MergeMethod(
    "permute", "alignment",
    "permutation matching + partial merge, no least squares (width 1: Git Re-Basin)",
    "Ainsworth et al., Git Re-Basin, ICLR 2023"))
register(MergeMethod(
    "zip", "alignment", "ZipIt!-style stage cut: early groups merged fully, the rest kept apart",
    "Stoica et al., ZipIt! Merging Models from Different Tasks without Training, ICLR 2024",
    allocation="zip"))
register(MergeMethod(
    "average", "alignment",
    "no alignment: units merged in their given order under the budget (width 1: weight "
    "averaging) + BN reset", "Wortsman et al., Model soups, ICML 2022", aligned=False))
register(MergeMethod(
    "regmean", "alignment", "RegMean: per-layer least squares without permutation, width 1",
    "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    aligned=False, least_squares="regmean", fixed_width=1.0))
register(MergeMethod(
    "ensemble", "alignment", "the models side by side (the width-K reference)", "",
    aligned=False, fixed_width=2.0, side_by_side=True))
