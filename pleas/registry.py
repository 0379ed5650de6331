"""One registration per module type: how its axes enter the spec, and how it is resized.

A :class:`ModuleRule` holds everything pleas needs to know about one ``nn.Module`` type:

* ``spec``: the rule that links its tensor axes while the spec is derived (see
  :class:`pleas.spec.SpecBuilder`); registering one makes the type a leaf of the fx trace;
* ``resize``: how the module updates its size attributes when its tensors take the widened
  shapes (``(module, {tensor name: new tensor})``); conv channels and groups, Linear features...
* ``post_resize``: for containers whose attributes follow their children once those are
  resized (an attention block's head count follows its qkv projection);
* ``split``: how a widened layer of this type runs only its non-zero blocks
  (``(module, layout) -> module``, see :mod:`pleas.blockwise`).  A layer type without one
  stays dense in the merged model, and the compute model counts it dense;
* ``replace``: for a module whose own forward hides what pleas reads (``nn.MultiheadAttention``
  keeps its in-projection as a bare parameter and never calls its out-projection as a
  module): ``module -> module`` returns an equivalent module with the same state-dict keys
  that the spec, the hooks and widening can see into (or None to keep the module).  pleas
  swaps these in a copy of the model wherever it traces, reads activations or widens
  (:func:`replaced`); the user's model is never changed.  A replacement whose state-dict keys
  differ from the module's lists them in ``original_keys`` ({its key: the original's});
  :func:`original_key_map` collects them (a spec of the user's model names the user's keys).

Lookup is the same for every aspect: the module's own class, then its base classes in method
resolution order; the first class that defines the aspect wins, so a rule for a subclass
overrides its base's.  Rules apply globally (:func:`register_module`, usable as a decorator)
or per call (``derive_spec(model, x, rules=...)``, ``prepare(..., rules=...)``,
``load_merged(path, rules=...)``), where they take precedence over the global ones.  Per-call
rules are a :class:`ModuleRules`, or a mapping ``{module type: ModuleRule | spec function}``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace as _with
from typing import Any, Callable, Mapping

from torch import nn

SpecRule = Callable[..., Any]          # (builder, module, path) -> TensorDims
Resizer = Callable[[nn.Module, dict], None]
PostResizer = Callable[[nn.Module], None]
Splitter = Callable[[nn.Module, Any], nn.Module]  # (dense module, blockwise.Layout) -> module
Replacer = Callable[[nn.Module], "nn.Module | None"]  # equivalent module, or None: kept
ASPECTS = ("spec", "resize", "post_resize", "split", "replace")


@dataclass(frozen=True)
class ModuleRule:
    """What pleas knows about one module type (any aspect may be missing)."""

    module_type: type
    spec: SpecRule | None = None
    resize: Resizer | None = None
    post_resize: PostResizer | None = None
    split: Splitter | None = None
    replace: Replacer | None = None


class ModuleRules:
    """A set of module rules with one lookup rule (the most specific class wins)."""

    def __init__(self, rules: Mapping[type, ModuleRule] | None = None,
                 parent: "ModuleRules | None" = None):
        self._rules: dict[type, ModuleRule] = dict(rules or {})
        self.parent = parent

    def register(self, module_type: type, spec: SpecRule | None = None,
                 resize: Resizer | None = None, post_resize: PostResizer | None = None,
                 split: Splitter | None = None, replace: Replacer | None = None) -> ModuleRule:
        """Add (or extend) the rule of ``module_type``; given aspects replace earlier ones."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"rules are registered for nn.Module subclasses, got {module_type!r}")
        old = self._rules.get(module_type, ModuleRule(module_type))
        given = {k: v for k, v in (("spec", spec), ("resize", resize),
                                   ("post_resize", post_resize), ("split", split),
                                   ("replace", replace))
                 if v is not None}
        rule = _with(old, **given)
        self._rules[module_type] = rule
        return rule

    def remove(self, module_type: type) -> None:
        """Forget this set's own rule of ``module_type`` (a parent's rule stays)."""
        self._rules.pop(module_type, None)

    def lookup(self, module: nn.Module | type, aspect: str) -> Any:
        """The ``aspect`` of the most specific rule for ``module``'s class (None if none)."""
        found = self.lookup_class(module, aspect)
        return None if found is None else getattr(self._rule_for(found), aspect)

    def lookup_class(self, module: nn.Module | type, aspect: str) -> type | None:
        """The class whose rule provides ``aspect`` for ``module`` (None if none does)."""
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        cls = module if isinstance(module, type) else type(module)
        for klass in cls.__mro__:
            rule = self._rule_for(klass)
            if rule is not None and getattr(rule, aspect) is not None:
                return klass
        return None

    def _rule_for(self, klass: type) -> ModuleRule | None:
        """This set's rule for exactly ``klass``, merged over the parent's (per aspect)."""
        own = self._rules.get(klass)
        inherited = self.parent._rule_for(klass) if self.parent is not None else None
        if own is None or inherited is None:
            return own or inherited
        return _with(inherited, **{a: getattr(own, a) for a in ASPECTS
                                     if getattr(own, a) is not None})

    def with_rules(self, extra: "ModuleRules | Mapping[type, Any] | None") -> "ModuleRules":
        """These rules overridden by ``extra`` (per-call rules); ``None`` returns self."""
        if extra is None:
            return self
        if isinstance(extra, ModuleRules):
            return ModuleRules(extra._rules, parent=self.with_rules(extra.parent))
        rules = ModuleRules(parent=self)
        for module_type, rule in extra.items():
            if isinstance(rule, ModuleRule):
                rules.register(module_type, rule.spec, rule.resize, rule.post_resize, rule.split,
                               rule.replace)
            elif callable(rule):
                rules.register(module_type, spec=rule)
            else:
                raise TypeError(f"rule for {module_type.__name__} must be a ModuleRule or a "
                                f"spec function, got {type(rule).__name__}")
        return rules


GLOBAL_RULES = ModuleRules()


def register_module(module_type: type, spec: SpecRule | None = None,
                    resize: Resizer | None = None, post_resize: PostResizer | None = None,
                    split: Splitter | None = None, replace: Replacer | None = None):
    """Register ``module_type`` globally.  ``register_module(T, spec=..., resize=...)``, or as a
    decorator of its spec rule: ``@register_module(T)`` / ``@register_module(T, resize=...)``."""
    if spec is not None or (resize, post_resize, split, replace) != (None,) * 4:
        GLOBAL_RULES.register(module_type, spec, resize, post_resize, split, replace)
        if spec is not None:
            return spec

    def deco(fn: SpecRule) -> SpecRule:
        GLOBAL_RULES.register(module_type, fn, resize, post_resize, split, replace)
        return fn
    return deco


def rules_for_call(extra: Any = None) -> ModuleRules:
    """The global rules, overridden by per-call ``extra`` rules."""
    return GLOBAL_RULES.with_rules(extra)


def replaced(model: nn.Module, rules: Any = None) -> nn.Module:
    """``model`` itself when no module of it has a ``replace`` rule, else a deep copy in which
    each such module is swapped for its replacement (same parameters and outputs).

    ``rules``: a :class:`ModuleRules` or per-call rules (see :func:`rules_for_call`).
    """
    rules = rules if isinstance(rules, ModuleRules) else rules_for_call(rules)
    names = [name for name, mod in model.named_modules()
             if rules.lookup(mod, "replace") is not None]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        mod = model.get_submodule(name)
        new = rules.lookup(mod, "replace")(mod)
        if new is None or new is mod:
            continue
        new.train(mod.training)
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def original_key_map(model: nn.Module) -> dict[str, str]:
    """For a model from :func:`replaced`: each state-dict key a replacement renamed -> the key
    of the module it replaced (``original_keys`` of the replacement modules)."""
    out = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        for new, old in getattr(mod, "original_keys", {}).items():
            out[prefix + new] = prefix + old
    return out
