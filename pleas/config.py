"""One merge configuration: every option, its type, its default and its meaning, written once.

:class:`MergeConfig` is the single source of defaults.  The command line's flags are generated
from its fields (:func:`pleas.cli_merge.parser`), a YAML/JSON config file is validated against
the same fields (unknown keys are refused with the list of known ones, values of the wrong type
are refused with the key and what was given), and the Python API (:func:`pleas.run`,
:func:`pleas.build`, :func:`pleas.prepare`) reads its defaults from here.

A config file may be flat (``model_a``, ``model_b``, ``width``, ``method`` ...) or mergekit
style::

    models:
      - model: resnet_a
      - model: resnet_b
    merge_method: pleas
    parameters: {width: 1.25, allocation: optimal}
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from . import methods as registry
from .errors import MergeError
from .heads import HEAD_MODES
from .plan import ALLOCATORS, DEFAULT_UNIT_MULTIPLE, LAYOUTS

MATCHINGS = ("activation", "weight")
ALLOCATIONS = ALLOCATORS
LEAST_SQUARES_MODES = ("sequential", "closed")
DEFAULT_WIDTH = 1.5


def _opt(default: Any, help: str, kind: str, choices: tuple | None = None, **cli: Any) -> Any:
    """A field with its CLI help, value kind (for validation) and optional choices."""
    meta = {"help": help, "kind": kind, "choices": choices, **cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MergeConfig:
    """Everything one merge run needs; frozen, validated on construction."""

    models: tuple = _opt((), "the models to merge: built-in names or checkpoint files",
                         "models")
    width: float | None = _opt(None, f"compute budget in [1, K] for K models: merged MACs / "
                                     f"one model's MACs (default {DEFAULT_WIDTH}, or the "
                                     "method's fixed width)",
                               "float?")
    method: str = _opt("pleas", "merge method (see `pleas methods`)", "method")
    matching: str = _opt("activation", "how units are paired: activation correlations on merge "
                                       "data, or weight matching (no data)", "str", MATCHINGS)
    allocation: str = _opt("uniform", "how the budget is spread over groups: uniform (one "
                           "fraction kept apart everywhere, streams under a LayerNorm merged "
                           "while the others can take the width), even (one fraction "
                           "everywhere), zip (a stage cut), optimal (a MILP over the matches)",
                           "str", ALLOCATIONS)
    unit_multiple: int = _opt(
        DEFAULT_UNIT_MULTIPLE, "merge and keep apart units in multiples of this many per group "
        "(where the group's size allows, halved where the width cannot be met), so every piece "
        "of the block-structured model is a whole kernel width; 1 = any count", "int+")
    layout: str = _opt("dense", "how partly merged layers run, both counted in the width: "
                                "dense (one plain layer each, its structural zeros multiplied: "
                                "fewer units kept apart, each MAC fast on a CPU) or blocks "
                                "(only the non-zero blocks, as up to three pieces: the most "
                                "units kept apart, slower per MAC on a CPU; with three or "
                                "more models it kept up to 3 points more accuracy from 2x on "
                                "in the README's K-model runs)",
                       "str", LAYOUTS)
    heads: str = _opt("auto", "one head for a shared label space, or one head per model",
                      "str", HEAD_MODES)
    least_squares: str | None = _opt(None, "sequential (each layer on the merged model's own "
                                           "inputs) or closed (one pass, solves only); default: "
                                           "the method's own", "str?", LEAST_SQUARES_MODES)
    data: str | None = _opt(None, "merge data: a task name or an image folder / saved dataset "
                                  "(default: both models' training tasks)", "str?")
    proxy_data: str | None = _opt(None, "data-free PLeaS: proxy images unrelated to the tasks",
                                  "str?")
    no_data: bool = _opt(False, "merge without any data (weight matching, no least squares, no "
                                "BN reset)", "bool")
    arch: str | None = _opt(None, "architecture of checkpoint files without metadata: "
                                  "timm:NAME, torchvision:NAME or a pleas architecture", "str?")
    arch_config: dict | None = _opt(None, "the architecture's arguments as a JSON object, e.g. "
                                          "'{\"num_classes\": 100}' (default: inferred from the "
                                          "weights where they determine them)", "object?")
    base: str | None = _opt(None, "common base checkpoint of the models (task-vector methods)",
                            "str?")
    params: dict = _opt({}, "hyper-parameters of a task-vector method (KEY=VALUE)", "params")
    batches: int = _opt(16, "number of merge batches", "int+")
    batch_size: int = _opt(64, "merge batch size", "int+")
    positions: int = _opt(64, "positions (or tokens) sampled per image and layer for the "
                              "statistics: matching and least squares (0 = all)", "int0")
    ridge: float = _opt(1e-4, "least-squares ridge, relative to the Gram's trace", "float0")
    max_cache_gb: float = _opt(4.0, "memory for the activations the one-sweep sequential fit "
                                    "keeps between layers (GB); beyond it they are spilled "
                                    "(to host memory on a GPU, to disk on the CPU)", "float0")
    float64_products: bool = _opt(False, "the least-squares moments' products in float64 "
                                         "(a slower fit; by default they are in the "
                                         "activations' dtype, summed in float64)", "bool")
    seed: int = _opt(0, "seed of every random choice", "int")
    device: str = _opt("cpu", "cpu, cuda, cuda:1, ...", "device")
    out: str | None = _opt(None, "output folder (default runs/<a>+<b>-<method>-w<width>)", "str?")
    overwrite: bool = _opt(False, "replace an earlier pleas output at --out (never anything "
                                  "else)", "bool")
    report: str | None = _opt(None, "also write the JSON report to this file", "str?")
    eval: bool = _opt(True, "evaluate on the models' test sets", "bool")
    eval_limit: int | None = _opt(None, "test images per task (default: the whole test split)",
                                  "int+?")
    eval_data: str | None = _opt(None, "also evaluate on this labelled image folder / dataset "
                                       "(class names checked against the heads)", "str?")
    workers: int = _opt(2, "DataLoader worker processes that decode streamed images", "int0")
    quiet: bool = _opt(False, "no progress bars", "bool")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        method = registry.get(self.method)
        registry.with_least_squares(method, self.least_squares)  # the variant must exist
        if self.width is not None:
            _check_width_for(method, self.width, given=True)

    # -- derived values -------------------------------------------------------------------
    @property
    def merge_method(self) -> registry.MergeMethod:
        """The method record, with ``least_squares`` applied (pleas + closed = pleas_closed)."""
        return registry.with_least_squares(registry.get(self.method), self.least_squares)

    @property
    def effective_width(self) -> float:
        """The width of a two-model merge (:meth:`width_for` K models)."""
        return self.width_for(2)

    def width_for(self, models: int) -> float:
        """The width asked for, else the method's own for ``models`` models, else the default."""
        if self.width is not None:
            return self.width
        fixed = self.merge_method.width_for(models)
        return DEFAULT_WIDTH if fixed is None else fixed

    @property
    def sample_positions(self) -> int | None:
        """Positions per image for the least-squares moments; None = all."""
        return self.positions or None

    def replace(self, **changes: Any) -> "MergeConfig":
        return dataclasses.replace(self, **changes)

    def with_options(self, **options: Any) -> "MergeConfig":
        """This config with the given options changed; ``None`` values are ignored."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(field_names()))
        if unknown:
            raise MergeError(f"unknown option(s) {unknown}; known: {', '.join(field_names())}")
        return self.replace(**given)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "config") -> "MergeConfig":
        return cls(**normalise_mapping(raw, where))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(MergeConfig))


def defaults() -> dict[str, Any]:
    """Every option's default (what the CLI help shows)."""
    return MergeConfig().as_dict()


# ------------------------------------------------------------------------ validation
def _check_width_for(method: registry.MergeMethod, width: float, given: bool,
                     models: int | None = None) -> None:
    """``width`` is allowed for ``method`` merging ``models`` models (None: not known yet, any
    count: only what no count allows is refused)."""
    if models is None:
        check_width(width, float("inf"))
        if method.side_by_side:
            return
    fixed = method.width_for(models or 2)
    if fixed is not None and width != fixed:
        what = ("merges into one model of the same size" if fixed == 1.0
                else f"is the width-{fixed:g} model (all {models or 2} side by side)")
        raise MergeError(f"{method.name} {what}: use width {fixed:g} (got {width:g})")
    if models is not None:
        check_width(width, models)


def check_width(width: float, models: float = 2) -> None:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or math.isnan(width) \
            or not 1.0 <= width <= models:
        if models == float("inf"):
            raise MergeError(f"width must be at least 1 (1 = one model); got {width}")
        raise MergeError(f"width must lie in [1, {models:g}] (1 = one model, {models:g} = all "
                         f"side by side); got {width}")


def _type_error(f: dataclasses.Field, value: Any, expected: str) -> MergeError:
    return MergeError(f"option {f.name!r} must be {expected}, got {type(value).__name__} "
                      f"{value!r}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check one field's value against its declared kind; return it in its canonical type."""
    kind, choices = f.metadata["kind"], f.metadata["choices"]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "models":
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
                isinstance(m, (str, Path)) for m in value):
            raise _type_error(f, value, "a list of model names or checkpoint paths")
        return tuple(str(m) for m in value)
    if kind in ("float", "float0"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(f, value, "a number")
        if kind == "float0" and not value >= 0:
            raise MergeError(f"option {f.name!r} must be >= 0, got {value}")
        return float(value)
    if kind in ("int", "int+", "int0"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(f, value, "an integer")
        low = {"int+": 1, "int0": 0}.get(kind)
        if low is not None and value < low:
            raise MergeError(f"option {f.name!r} must be >= {low}, got {value}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(f, value, "true or false")
        return value
    if kind == "object":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise MergeError(f"option {f.name!r} is not valid JSON ({err}): "
                                 f"{value!r}") from err
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(f, value, "a JSON object (a mapping of argument names to values)")
        return dict(value)
    if kind == "params":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(f, value, "a mapping of parameter names to values")
        return dict(value)
    if not isinstance(value, str):
        raise _type_error(f, value, "a string")
    if kind == "method":
        registry.get(value)
    if kind == "device":
        _check_device_syntax(value)
    if choices and value not in choices:
        raise MergeError(f"option {f.name!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def _check_device_syntax(device: str) -> None:
    if not _DEVICE.match(device):
        raise MergeError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps")


def normalise_mapping(raw: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Flat or mergekit-style keys -> MergeConfig field names; unknown keys refused."""
    if not isinstance(raw, Mapping):
        raise MergeError(f"{where} must hold a mapping of options, got {type(raw).__name__}")
    cfg = dict(raw)
    if "models" in cfg:
        cfg["models"] = _model_names(cfg["models"], where)
    names = [cfg.pop(k) for k in ("model_a", "model_b") if k in cfg]
    if names:
        if "models" in cfg:
            raise MergeError(f"{where}: give either 'models' or 'model_a'/'model_b', not both")
        cfg["models"] = names
    if "merge_method" in cfg:
        cfg["method"] = cfg.pop("merge_method")
    parameters = cfg.pop("parameters", None) or {}
    if not isinstance(parameters, Mapping):
        raise MergeError(f"{where}: 'parameters' must be a mapping, got "
                         f"{type(parameters).__name__}")
    cfg.update(parameters)
    unknown = sorted(set(cfg) - set(field_names()))
    if unknown:
        raise MergeError(f"{where}: unknown keys {unknown}; known keys: "
                         f"{', '.join(field_names())}")
    return cfg


def _model_names(models: Any, where: str) -> list:
    if not isinstance(models, list):
        raise MergeError(f"{where}: 'models' must be a list, got {type(models).__name__}")
    out = []
    for m in models:
        if isinstance(m, Mapping):
            if "model" not in m:
                raise MergeError(f"{where}: each entry of 'models' needs a 'model' key, got "
                                 f"keys {sorted(m)}")
            m = m["model"]
        if not isinstance(m, str):
            raise MergeError(f"{where}: a model must be a name or a path, got "
                             f"{type(m).__name__} {m!r}")
        out.append(m)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON config file as MergeConfig keys (validated names, not yet values)."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise MergeError(f"config file {path} does not exist")
    if not file.is_file():
        raise MergeError(f"config file {path} is not a file")
    try:
        raw = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"config file {path} is not valid YAML/JSON: {first}") from err
    return normalise_mapping(raw if raw is not None else {}, f"config file {path}")
