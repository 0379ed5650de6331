"""Exactness invariants of every registered alignment method on every architecture.

Properties over the registries (tests/archs.py MERGE_ARCHS x pleas.methods): a new method or
architecture is checked by adding it there.  Where the mathematics says exact, the merge is
exact (outputs to 1e-5 of their scale):

* width 2 is the ensemble: with one head per model, each head reproduces its model;
* a model merged with a randomly permuted copy of itself at width 1 is the model (methods
  that align; the others cannot undo a permutation);
* two identical models merge to that model at every width the method is defined at;
* the same inputs give bit-identical merged weights (two separate statistics passes).

BatchNorm recalibration is off where exactness is asserted: the reset would replace the
originals' (random) running statistics with those of the few merge images.
"""
from __future__ import annotations

import copy

import pytest
import torch

from pleas import methods as registry
from pleas.permute import permute_model, random_permutations
from pleas.pipeline import ModelSide, build, prepare
from pleas.spec import derive_spec

from archs import MERGE_ARCHS, SLOW_MERGE_ARCHS, random_model

torch.set_num_threads(1)

# PLeaS-free variants build exactly like their PLeaS counterparts (only the data they are given
# differs, which tests/test_cli.py covers), so they are not repeated here
ALIGNMENT = [registry.get(n) for n in registry.names("alignment")
             if not registry.get(n).proxy_data]
# RegMean's ridge shrinks toward zero (as the method is defined), so two identical models are
# reproduced only where the merge data span the layer inputs: the identical pair is prepared
# with every position (no sampling), and RegMean is held to the ridge's effect (measured at
# most 4.5e-3 of the output scale on the CNNs and ViTs, 1.1e-2 on MobileNetV3, whose conv_head
# reads one pooled vector per image: 32 samples for 144 inputs)
TOLERANCE = {"regmean": 2e-2}
ARCHS = list(MERGE_ARCHS)
KW = dict(batch_size=16, max_batches=2, positions=8, progress=False)


def _widths(method, candidates):
    return [w for w in candidates if method.fixed_width in (None, w)]


def _side(model, name):
    return ModelSide(model, name, task=f"task {name}")


def _data(arch):
    shape = MERGE_ARCHS[arch][1]
    return torch.randn(32, *shape[1:], generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def preps():
    """Per architecture (lazily): the prepared pair, permuted copy and identical copy."""
    cache = {}

    def get(arch):
        if arch not in cache:
            a, b = random_model(arch, 1), random_model(arch, 2)
            x = _data(arch)
            spec = derive_spec(a, MERGE_ARCHS[arch][1])
            permuted = permute_model(a, spec, random_permutations(spec, seed=3)).float().eval()
            cache[arch] = dict(
                a=a, b=b, x=x[:8],
                pair=prepare(_side(a, "a"), _side(b, "b"), x, **KW),
                permuted=prepare(_side(a, "a"), _side(permuted, "b"), x, **KW),
                same=prepare(_side(a, "a"), _side(copy.deepcopy(a), "b"), x,
                             **{**KW, "positions": None}))
        return cache[arch]
    return get


@torch.no_grad()
def _out(model, x):
    return model.eval()(x)


def _max_diff(y, ref):
    """The largest deviation from ``ref`` relative to its scale (float32 solves: 1e-5)."""
    outs = y.values() if isinstance(y, dict) else [y]
    scale = max(1.0, float(ref.abs().max()))
    return max(float((o - ref).abs().max()) for o in outs) / scale


CASES_W2 = [(a, m.name) for a in ARCHS for m in ALIGNMENT if _widths(m, [2.0])]
CASES_PERM = [(a, m.name) for a in ARCHS for m in ALIGNMENT if m.aligned and _widths(m, [1.0])]
CASES_SAME = [(a, m.name) for a in ARCHS for m in ALIGNMENT]


def _marked(cases):
    """Cases of the architectures whose every-method checks take > 15 s marked slow."""
    def one(case):
        values = case if isinstance(case, tuple) else (case,)
        return pytest.param(*values, marks=pytest.mark.slow) if values[0] in SLOW_MERGE_ARCHS \
            else case
    return [one(c) for c in cases]


@pytest.mark.parametrize("arch, method", CASES_W2)
def test_width_2_is_the_ensemble(preps, arch, method):
    p = preps(arch)
    merged, report = build(p["pair"], 2.0, method, heads="separate", recalibrate=False,
                           progress=False)
    assert report["width"]["achieved"] == 2.0
    assert all(g["merged"] == 0 for g in report["groups"])
    y = _out(merged, p["x"])
    assert list(y) == ["task a", "task b"]
    assert _max_diff(y["task a"], _out(p["a"], p["x"])) <= 1e-5
    assert _max_diff(y["task b"], _out(p["b"], p["x"])) <= 1e-5


@pytest.mark.parametrize("arch, method", CASES_PERM)
def test_permuted_self_merge_at_width_1_is_the_model(preps, arch, method):
    p = preps(arch)
    merged, report = build(p["permuted"], 1.0, method, heads="shared", recalibrate=False,
                           progress=False)
    assert all(g["merged"] == g["size"] for g in report["groups"])
    assert _max_diff(_out(merged, p["x"]), _out(p["a"], p["x"])) <= 1e-5


@pytest.mark.parametrize("arch, method", _marked(CASES_SAME))
def test_identical_models_merge_to_the_model(preps, arch, method):
    p = preps(arch)
    record = registry.get(method)
    ya = _out(p["a"], p["x"])
    for width in _widths(record, [1.0, 1.5, 2.0]):
        merged, _ = build(p["same"], width, method, heads="shared", recalibrate=False,
                          progress=False)
        assert _max_diff(_out(merged, p["x"]), ya) <= TOLERANCE.get(method, 1e-5), width


@pytest.mark.parametrize("arch", _marked(ARCHS))
def test_same_inputs_give_bit_identical_weights(arch):
    a, b = random_model(arch, 1), random_model(arch, 2)
    x = _data(arch)
    first = prepare(_side(a, "a"), _side(b, "b"), x, **KW)
    second = prepare(_side(copy.deepcopy(a), "a"), _side(copy.deepcopy(b), "b"), x, **KW)
    for record in ALIGNMENT:
        width = record.fixed_width or 1.5
        s1 = build(first, width, record, progress=False)[0].net.state_dict()
        s2 = build(second, width, record, progress=False)[0].net.state_dict()
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(s1[k], s2[k]), (record.name, k)
