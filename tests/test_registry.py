"""The extension points, used only through the public interface: a user-defined module type
(spec rule + resizer, per call and globally) and a user-defined merge method."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pleas
from pleas.permute import permute_model, random_permutations

torch.set_num_threads(1)


class EinsumLinear(nn.Module):
    """A linear layer written with einsum, an op pleas has no rule for."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.n_in, self.n_out = n_in, n_out

    def forward(self, x):
        return torch.einsum("oi,bi->bo", self.weight, x) + self.bias


class Net(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.flat = nn.Flatten()
        self.fc1 = EinsumLinear(36, 24)
        self.fc2 = EinsumLinear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.flat(x))))))


def einsum_linear_rule(b, mod: EinsumLinear, path: str):
    """Like nn.Linear's rule: input units <-> weight axis 1, output units <-> axis 0 and bias."""
    x = b.input()
    out = pleas.spec.TensorDims(list(x.dims))
    out.dims[-1] = b.channel(mod.n_out)
    b.link_param(x.dims[-1], f"{path}.weight", 1, "in")
    b.link_param(out.dims[-1], f"{path}.weight", 0, "out")
    b.link_param(out.dims[-1], f"{path}.bias", 0, "out")
    b.add_site(x.dims[-1], path, "in", -1)
    b.record_layer(path, "linear", f"{path}.weight", f"{path}.bias", x.dims[-1], out.dims[-1],
                   mod.n_in * mod.n_out)
    return out


def resize_einsum_linear(mod: EinsumLinear, tensors: dict) -> None:
    mod.n_out, mod.n_in = tensors["weight"].shape


RULES = {EinsumLinear: pleas.ModuleRule(EinsumLinear, spec=einsum_linear_rule,
                                        resize=resize_einsum_linear)}
X = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(0))


def test_without_a_rule_the_op_is_named():
    with pytest.raises(pleas.UnsupportedOpError, match="einsum"):
        pleas.derive_spec(Net(0), (2, 1, 6, 6))


def test_a_per_call_rule_gives_a_spec_that_passes_its_self_test():
    model = Net(0).eval()
    spec = pleas.derive_spec(model, (2, 1, 6, 6), rules=RULES)
    assert sorted(g.size for g in spec.hidden) == [16, 24]
    assert pleas.self_test(model, spec).passed
    with pytest.raises(pleas.UnsupportedOpError):  # per call only: the global rules lack it
        pleas.derive_spec(model, (2, 1, 6, 6))


def test_a_per_call_rule_merges_and_resizes():
    a, b = Net(0).eval(), Net(1).eval()
    result = pleas.merge(a, b, X, width=1.5, method="pleas_closed", heads="separate",
                         batch_size=32, rules=RULES, progress=False)
    fc1 = result.model.net.fc1
    assert (fc1.n_out, fc1.n_in) == tuple(fc1.weight.shape) and fc1.n_out > 24
    y = result.model(X[:4])
    assert all(torch.isfinite(v).all() for v in y.values())
    # width 2 is both models, exactly
    prep = pleas.prepare(a, b, X, batch_size=32, rules=RULES, progress=False)
    merged, _ = pleas.build(prep, 2.0, "permute", heads="separate", progress=False)
    with torch.no_grad():
        out = merged(X[:8])
        assert torch.allclose(out["model_a"], a(X[:8]), atol=1e-5)
        assert torch.allclose(out["model_b"], b(X[:8]), atol=1e-5)


def test_a_global_registration_and_a_permuted_self_merge():
    pleas.register_module(EinsumLinear, spec=einsum_linear_rule, resize=resize_einsum_linear)
    try:
        a = Net(0).eval()
        spec = pleas.derive_spec(a, (2, 1, 6, 6))
        permuted = permute_model(a, spec, random_permutations(spec, seed=2))
        merged = pleas.merge(a, permuted, X, width=1.0, method="permute", heads="shared",
                             batch_size=32, progress=False).model
        with torch.no_grad():
            assert torch.allclose(merged(X[:8]), a(X[:8]), atol=1e-5)
    finally:
        pleas.registry.GLOBAL_RULES.remove(EinsumLinear)
    with pytest.raises(pleas.UnsupportedOpError):
        pleas.derive_spec(Net(0), (2, 1, 6, 6))


def test_the_most_specific_registered_class_wins():
    rules = pleas.ModuleRules()
    rules.register(nn.Module, spec=lambda *a: "base")
    rules.register(nn.Linear, spec=lambda *a: "linear")
    assert rules.lookup(nn.Linear(2, 2), "spec")() == "linear"
    assert rules.lookup(nn.ReLU(), "spec")() == "base"
    assert rules.lookup(nn.ReLU(), "resize") is None


def test_a_user_method_is_one_registration():
    custom = pleas.MergeMethod("permute_zip_closed", "alignment", "zip cut + closed-form fit",
                               allocation="zip", least_squares="closed")
    pleas.register_method(custom)
    try:
        a, b = Net(0).eval(), Net(1).eval()
        prep = pleas.prepare(a, b, X, batch_size=32, rules=RULES, progress=False)
        merged, report = pleas.build(prep, 1.5, "permute_zip_closed", progress=False)
        assert report["method"] == "permute_zip_closed" and report["allocation"] == "zip"
        assert report["least_squares_mode"] == "closed form" and report["least_squares"]
        assert "permute_zip_closed" in pleas.method_names()
    finally:
        pleas.methods.unregister("permute_zip_closed")
    with pytest.raises(pleas.MergeError, match="registered methods: pleas, pleas_closed"):
        pleas.get_method("permute_zip_closed")
