"""What both method families share about their inputs: the models, their heads, their tasks.

One policy, used by PLeaS and its baselines (:mod:`pleas.pipeline`) and by the task-vector
methods (:mod:`pleas.task_vectors`):

* **Head mode.**  ``shared``: one classifier for both models (same label space and class
  count, else an error); ``separate``: one head per model, the merged network stacks their
  classes; ``auto``: shared exactly when both models name the same label space and have the
  same number of classes.
* **Task names.**  A head is named after its model's task (or the model's name); two models of
  the same task get ``"<task> (A)"`` and ``"<task> (B)"`` so that the names stay unique.
* **Architecture check.**  The same tensors with the same shapes, except along the class axis
  (two heads of different label spaces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from .errors import MergeError

HEAD_MODES = ("auto", "shared", "separate")


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
    preprocess: Any = None  # pleas.preprocess.Preprocess, None: the zoo's for its config

    @classmethod
    def of(cls, model: nn.Module, info: Any = None, name: str = "model") -> "ModelSide":
        if info is None:
            return cls(model, name)
        return cls(model, getattr(info, "name", name), getattr(info, "task", None),
                   getattr(info, "label_space", None), getattr(info, "classes", None),
                   getattr(info, "arch", None), dict(getattr(info, "config", None) or {}),
                   getattr(info, "preprocess", None))


def as_side(x: Any, name: str, error: type[Exception] = MergeError) -> ModelSide:
    """A ModelSide as it is, or a bare module wrapped in one."""
    if isinstance(x, ModelSide):
        return x
    if isinstance(x, nn.Module):
        return ModelSide(x, name)
    raise error(f"{name} must be an nn.Module or a ModelSide, got {type(x).__name__}")


def model_label(k: int) -> str:
    """The letter of the k-th model (0: A, 1: B, 2: C, ...) in messages and head names."""
    return chr(ord("A") + k) if k < 26 else str(k + 1)


def task_names(a: ModelSide, b: ModelSide, names: tuple[str, str] | None = None
               ) -> tuple[str, str]:
    """The two heads' names: the given ones, else the tasks (or model names); kept unique."""
    ta, tb = names if names is not None else (a.task or a.name, b.task or b.name)
    if ta == tb:
        ta, tb = f"{ta} (A)", f"{tb} (B)"
    return ta, tb


def all_task_names(sides: list[ModelSide]) -> list[str]:
    """One head name per model: its task (or name); a name several models share gets each
    model's letter, ``"<task> (A)"``, ``"<task> (C)"``, so that the names stay unique."""
    if len(sides) == 2:
        return list(task_names(*sides))
    names = [s.task or s.name for s in sides]
    return [f"{n} ({model_label(k)})" if names.count(n) > 1 else n for k, n in enumerate(names)]


def separate_heads(mode: str, a: ModelSide, b: ModelSide, na: int, nb: int,
                   error: type[Exception] = MergeError) -> bool:
    """True for one head per model, False for one shared head (see the module docstring)."""
    return separate_heads_of(mode, [a, b], [na, nb], error)


def separate_heads_of(mode: str, sides: list[ModelSide], counts: list[int],
                      error: type[Exception] = MergeError) -> bool:
    """:func:`separate_heads` for any number of models: shared needs one label space (or
    none named) and one class count for all of them."""
    if mode not in HEAD_MODES:
        raise error(f"unknown head mode {mode!r}; expected one of {', '.join(HEAD_MODES)}")
    spaces = [s.label_space for s in sides]
    same_space = spaces[0] is not None and all(x == spaces[0] for x in spaces)
    if mode == "separate":
        return True
    if mode == "shared":
        for k, n in enumerate(counts[1:], 1):
            if n != counts[0]:
                raise error(f"shared head requested but model A has {counts[0]} classes and "
                            f"model {model_label(k)} {n}")
        named = [x for x in spaces if x]
        if len(set(named)) > 1:
            raise error("shared head requested but the label spaces differ: "
                        + " vs ".join(repr(x) for x in named))
        return False
    return not (same_space and len(set(counts)) == 1)


def check_same_architecture(state_a: Mapping, state_b: Mapping,
                            class_axes: set[tuple[str, int]],
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


def check_pair(a: nn.Module, b: nn.Module, class_axes: set[tuple[str, int]],
               error: type[Exception] = MergeError) -> None:
    """The same module class and :func:`check_same_architecture` on their state dicts."""
    if type(a) is not type(b):
        raise error(f"mismatched architectures: model A is {type(a).__name__}, model B is "
                    f"{type(b).__name__}")
    check_same_architecture(a.state_dict(), b.state_dict(), class_axes, error)
