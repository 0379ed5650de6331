"""Matching (pleas.stats, pleas.capture, pleas.matching): exact recovery of hidden permutations.

For every architecture a model is copied with random permutations of all its hidden groups.
Activation matching (streaming statistics over several batches) and weight matching (Git
Re-Basin coordinate descent) must both recover every group's permutation EXACTLY, and permuting
the copy back must give the original's outputs.

Dead ReLU units (zero variance on the data) have an all-zero correlation row, which makes
activation matching ambiguous for them; the inputs/models below are chosen so that every unit is
alive (BN statistics recomputed on the data, biases of BN-free layers centred on it) and the test
ASSERTS that no unit is dead, so an exact-recovery pass is never a lucky one.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pleas.capture import run_pair
from pleas.matching import match_activations, match_weights
from pleas.normalization import batchnorm_modules, recalibrate_batchnorm
from pleas.permute import permute_model, permute_state_dict, random_permutations, randomise
from pleas.registry import original_key_map, replaced
from pleas.spec import derive_spec
from pleas.stats import CrossStats, MatchingStats

from archs import ARCHS

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def alive_copy(model: nn.Module, batches: list[torch.Tensor], randomise_seed: int | None = 0):
    """An eval copy of ``model`` (perturbed when a seed is given) with no dead unit on ``batches``.

    BatchNorm statistics are recomputed on the data, then every biased conv/linear (in module
    order = forward order for these nets) is shifted so its pre-activations have zero mean on
    the data, recomputing BN statistics after each shift: every ReLU unit is then positive on
    about half the samples.  Float32 throughout (a float64 forward of the big nets is several
    times slower on CPU; float32 is exact enough to tell copies apart).
    """
    a = randomise(model, randomise_seed) if randomise_seed is not None else copy.deepcopy(model)
    a = a.float().eval()
    # the biases are shifted in pleas' view of the model (nn.MultiheadAttention replaced, so
    # that its out-projection runs as a module and its hook fires), then copied back to ``a``
    view = replaced(a)
    x = torch.cat(batches)
    has_bn = bool(batchnorm_modules(view))
    if has_bn:
        recalibrate_batchnorm(view, batches, progress=False)
    for mod in view.modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod.bias is None:
            continue
        seen = {}
        # a copy: an in-place activation after the layer would rewrite its output
        h = mod.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out.clone()))
        view(x)
        h.remove()
        y = seen["y"]
        dims = [0] + list(range(2, y.ndim)) if isinstance(mod, nn.Conv2d) else list(range(y.ndim - 1))
        mod.bias -= y.mean(dims)
        if has_bn:
            recalibrate_batchnorm(view, batches, progress=False)
    if view is not a:
        names = original_key_map(view)
        a.load_state_dict({names.get(k, k): v for k, v in view.state_dict().items()})
    return a.eval()


def dead_units(stats: MatchingStats) -> dict[str, int]:
    """Units with zero variance at their activation sites, per group, in either model."""
    out = {}
    for name, s in stats.by_group.items():
        n = 0
        for sq, sm in ((s.sq_a, s.sum_a), (s.sq_b, s.sum_b)):
            var = sq / s.n - (sm / s.n) ** 2
            n += int((var <= 1e-12 * (sq / s.n).clamp_min(1e-30)).sum())
        out[name] = n
    return out


def inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


# images per architecture (big nets at 32x32, fewer images: their last stage is 1x1 spatially)
N_IMAGES = {"torchvision:resnet50": 32, "timm:resnet50": 32, "torchvision:resnext50_32x4d": 32}


@pytest.fixture(scope="module")
def pairs():
    """name -> (spec, A, permuted copy B, the permutations used, batches); built once."""
    cache = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        factory, shape, *_ = ARCHS[name]
        torch.manual_seed(0)
        model = factory().eval()
        spec = derive_spec(model, shape)
        n = N_IMAGES.get(name, 64)
        if name == "digit_recognizer.CNN":
            # the shipped, trained MNIST model on real MNIST digits (no random perturbation)
            from pleas.data import load_task
            x = load_task("mnist5k", "test").subset(n, seed=1).images
            a = alive_copy(model, list(x.split(16)), randomise_seed=None)
        else:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn((n,) + tuple(shape[1:]), generator=gen)
            a = alive_copy(model, list(x.split(16)))
        batches = list(x.split(16))
        perms = random_permutations(spec, seed=7)
        b = permute_model(a, spec, perms)
        cache[name] = (spec, a, b, perms, batches)
        return cache[name]

    return get


def check_recovery(spec, a, b, perms, matching, x):
    for g in spec.hidden:
        # perm[i] is the B unit paired with A unit i; B's unit j is A's unit perms[j]
        assert torch.equal(matching[g.name].perm, inverse(perms[g.name])), g.name
    back = permute_model(b, spec, {n: m.perm for n, m in matching.items()})
    sa, sback = a.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sback[k]) for k in sa)
    with torch.no_grad():
        ya, yb, yback = a(x), b(x), back(x)
    assert (ya - yback).abs().max() <= 1e-5
    # b is a true copy, up to float32 summation order (measured: 1.2e-4 of the output scale for
    # resnet50, where 50 layers sum the permuted channels in another order)
    assert (ya - yb).abs().max() <= 1e-3 * max(1.0, float(ya.abs().max()))


# ----------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("name", list(ARCHS))
def test_activation_matching_recovers_permutations(name, pairs):
    spec, a, b, perms, batches = pairs(name)
    stats = MatchingStats(spec)
    assert run_pair(a, b, batches, [stats], progress=False) == len(batches) > 1
    assert set(stats.by_group) == {g.name for g in spec.hidden}
    dead = dead_units(stats)
    assert sum(dead.values()) == 0, f"dead units make the test ambiguous: {dead}"
    matching = match_activations(stats.by_group, spec)
    check_recovery(spec, a, b, perms, matching, batches[0])
    for g in spec.hidden:
        # matched units are copies: correlation 1 (up to float32 rounding of the forward and
        # the float32 products of the statistics, 1e-6: tests/test_stats_precision.py)
        sim = matching[g.name].similarity
        assert sim.dtype == torch.float64 and sim.shape == (g.size,)
        assert torch.allclose(sim, torch.ones_like(sim), atol=1e-6), g.name


# timm:resnet50 is left out of weight matching only: its groups and weight shapes are those of
# torchvision:resnet50 (checked in test_spec), weight matching sees nothing but the state dict and
# the spec, and its ~15 s of 2048x2048 assignment scores would add nothing new.  ResNeXt-50
# (~40 s) likewise: grouped convs are weight-matched on the small grouped net and timm's
# RegNetX-200MF, the dense layers on resnet50.
SLOW_WEIGHT_MATCHING = ("timm:resnet50", "torchvision:resnext50_32x4d")
@pytest.mark.parametrize("name", [n for n in ARCHS if n not in SLOW_WEIGHT_MATCHING])
def test_weight_matching_recovers_permutations(name, pairs):
    spec, a, b, perms, batches = pairs(name)
    matching = match_weights(a.state_dict(), b.state_dict(), spec, seed=0)
    check_recovery(spec, a, b, perms, matching, batches[0])
    for g in spec.hidden:
        sim = matching[g.name].similarity
        assert torch.allclose(sim, torch.ones_like(sim), atol=1e-8), g.name


def test_activation_matching_survives_small_noise(pairs):
    """A noisy permuted copy (weights + 2% noise) is still matched exactly (resnet20)."""
    spec, a, _, perms, batches = pairs("resnet20")
    noisy = randomise(a, seed=3).float()  # randomise adds noise of the tensors' own scale ...
    with torch.no_grad():  # ... so blend: 98% the model, 2% the perturbed copy
        for (k, t), tn in zip(a.state_dict().items(), noisy.state_dict().values()):
            if t.is_floating_point():
                tn.copy_(0.98 * t + 0.02 * tn)
    b = permute_model(noisy, spec, perms)
    stats = MatchingStats(spec)
    run_pair(a, b, batches, [stats], progress=False)
    assert sum(dead_units(stats).values()) == 0
    matching = match_activations(stats.by_group, spec)
    for g in spec.hidden:
        assert torch.equal(matching[g.name].perm, inverse(perms[g.name])), g.name
        sim = matching[g.name].similarity
        assert float(sim.min()) < 1 - 1e-6  # really perturbed ...
        assert float(sim.min()) > 0.5  # ... but still clearly the same units


# ----------------------------------------------------------------------------- streaming


def test_cross_stats_streaming_is_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 7, generator=gen, dtype=torch.float64) * 3 + 1
    b = a[:, [3, 1, 0, 6, 5, 2, 4]] * 0.5 + torch.randn(1000, 7, generator=gen,
                                                        dtype=torch.float64) * 0.3
    one = CrossStats.zeros(7)
    one.update(a, b)
    many = CrossStats.zeros(7)
    for ca, cb in zip(a.split(137), b.split(137)):  # 8 uneven batches
        many.update(ca, cb)
    assert one.n == many.n == 1000
    for f in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
        x, y = getattr(one, f), getattr(many, f)
        assert x.dtype == torch.float64
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-10), f
    # adding two partial statistics is the same as streaming both
    half1, half2 = CrossStats.zeros(7), CrossStats.zeros(7)
    half1.update(a[:400], b[:400])
    half2.update(a[400:], b[400:])
    both = half1 + half2
    assert both.n == 1000 and torch.allclose(both.cross, one.cross, rtol=1e-10, atol=1e-10)
    # the correlation is Pearson's, against numpy on the concatenated data
    ref = np.corrcoef(a.numpy().T, b.numpy().T)[:7, 7:]
    assert np.allclose(many.correlation().numpy(), ref, atol=1e-10)
    assert torch.allclose(many.inner_product(), a.T @ b / 1000, atol=1e-10)
    # float32 input is accumulated in float64
    f32 = CrossStats.zeros(7)
    f32.update(a.float(), b.float())
    assert f32.cross.dtype == torch.float64
    with pytest.raises(ValueError):
        CrossStats.zeros(3).update(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        CrossStats.zeros(3).correlation()


def test_matching_stats_four_batches_equal_one(pairs):
    spec, a, b, _, batches = pairs("resnet20")
    x = torch.cat(batches)
    assert len(batches) == 4
    four, one = MatchingStats(spec), MatchingStats(spec)
    run_pair(a, b, batches, [four], progress=False)
    run_pair(a, b, [x], [one], progress=False)
    for name in one.by_group:
        s4, s1 = four.by_group[name], one.by_group[name]
        assert s4.n == s1.n > 0
        for f in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
            # products in float32 over chunks that start at other samples: equal to the
            # precision of the lean pass (1e-6, tests/test_stats_precision.py)
            assert torch.allclose(getattr(s4, f), getattr(s1, f), rtol=1e-6, atol=1e-6), (name, f)
    # the stats are over batch x positions at every site: conv1's group has 4 sites (stem
    # stream read by 3 blocks of stage 1 and the first block of stage 2)
    g = spec.group("conv1")
    assert len(g.sites) == 4
    assert one.by_group["conv1"].n == 4 * len(x) * 28 * 28
    # run_pair refuses empty data
    with pytest.raises(ValueError, match="empty"):
        run_pair(a, b, [], [MatchingStats(spec)], progress=False)


# ----------------------------------------------------------------------------- similarities


@pytest.fixture(scope="module")
def noisy_pair(pairs):
    """resnet20 A and B = permuted (A + 30% noise): matching is non-trivial, similarities vary."""
    spec, a, _, perms, batches = pairs("resnet20")
    other = randomise(a, seed=11).float()
    with torch.no_grad():
        for t, tn in zip(a.state_dict().values(), other.state_dict().values()):
            if t.is_floating_point():
                tn.copy_(0.7 * t + 0.3 * tn)
    b = permute_model(other, spec, perms)
    return spec, a, b, batches


def test_activation_similarity_is_the_correlation_entry(noisy_pair):
    spec, a, b, batches = noisy_pair
    stats = MatchingStats(spec)
    run_pair(a, b, batches, [stats], progress=False)
    matching = match_activations(stats.by_group, spec)
    spread = []
    for g in spec.hidden:
        corr = stats.by_group[g.name].correlation()
        m = matching[g.name]
        assert sorted(m.perm.tolist()) == list(range(g.size))
        assert torch.allclose(m.similarity, corr[torch.arange(g.size), m.perm], rtol=0, atol=1e-12)
        spread.append(float(m.similarity.max() - m.similarity.min()))
        # the assignment is optimal: no single swap of two pairs improves the total
        total = float(corr[torch.arange(g.size), m.perm].sum())
        for i, j in [(0, 1), (2, g.size - 1), (g.size // 2, 3)]:
            p = m.perm.clone()
            p[i], p[j] = m.perm[j], m.perm[i]
            assert float(corr[torch.arange(g.size), p].sum()) <= total + 1e-12
    assert max(spread) > 0.05  # the similarities really differ between units
    # inner-product similarity is the cross-moment entry
    ip = match_activations(stats.by_group, spec, metric="inner_product")
    for g in spec.hidden:
        e = stats.by_group[g.name].inner_product()
        assert torch.allclose(ip[g.name].similarity, e[torch.arange(g.size), ip[g.name].perm])
    with pytest.raises(ValueError):
        match_activations(stats.by_group, spec, metric="cosine")


def _unit_rows(state: dict, key: str, dim: int, size: int) -> torch.Tensor:
    """Hand-written: unit i's entries of a plain (unsliced) axis, as row i."""
    t = state[key].double()
    assert t.shape[dim] == size
    return t.movedim(dim, 0).reshape(size, -1)


def test_weight_similarity_is_read_in_the_final_frame(noisy_pair):
    spec, a, b, _ = noisy_pair
    sa, sb = a.state_dict(), b.state_dict()
    matching = match_weights(sa, sb, spec, seed=0)
    aligned = permute_state_dict(sb, spec, {n: m.perm for n, m in matching.items()})
    for name, members in {
        # a block group: conv1 rows, bn1 vectors, conv2 columns
        "layer2.1.conv1": [("layer2.1.conv1.weight", 0), ("layer2.1.bn1.weight", 0),
                           ("layer2.1.bn1.bias", 0), ("layer2.1.bn1.running_mean", 0),
                           ("layer2.1.bn1.running_var", 0), ("layer2.1.conv2.weight", 1)],
        "layer3.2.conv1": [("layer3.2.conv1.weight", 0), ("layer3.2.bn1.weight", 0),
                           ("layer3.2.bn1.bias", 0), ("layer3.2.bn1.running_mean", 0),
                           ("layer3.2.bn1.running_var", 0), ("layer3.2.conv2.weight", 1)],
    }.items():
        g = spec.group(name)
        assert {(ax.key, ax.dim) for ax in g.axes} == set(members)
        ra = torch.cat([_unit_rows(sa, k, d, g.size) for k, d in members], 1)
        rb = torch.cat([_unit_rows(aligned, k, d, g.size) for k, d in members], 1)
        cos = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
        assert torch.allclose(matching[name].similarity, cos, atol=1e-9), name
        # a stale frame (B permuted in this group only, neighbours unaligned) would differ
        stale = permute_state_dict(sb, spec, {name: matching[name].perm})
        rs = torch.cat([_unit_rows(stale, k, d, g.size) for k, d in members], 1)
        cos_stale = (ra * rs).sum(1) / (ra.norm(dim=1) * rs.norm(dim=1))
        assert not torch.allclose(cos_stale, cos, atol=1e-3)
    # the permutations still match the hidden ones: 30% noise keeps weights recognisable
    for g in spec.hidden:
        assert float(matching[g.name].similarity.mean()) > 0.5


@pytest.mark.parametrize("dim", [0, 1])
def test_blocked_weight_score_equals_the_dense_product(dim):
    """Weight matching scores a grouped conv block by block; it must equal the dense product
    of the block-diagonal A with any (permuted, no longer block-diagonal) B."""
    from pleas.blocks import to_dense
    from pleas.matching import _axis_rows, _blocked_score
    from pleas.spec import AxisRef

    gen = torch.Generator().manual_seed(0)
    ta = to_dense(torch.randn(12, 2, 3, 3, generator=gen, dtype=torch.float64), 3)  # 12 x 6
    tb = torch.randn(12, 6, 3, 3, generator=gen, dtype=torch.float64)
    size = ta.shape[dim]
    ax = AxisRef("w", dim, "in" if dim else "out", size)
    dense = _axis_rows(ta, ax) @ _axis_rows(tb, ax).T
    assert torch.allclose(_blocked_score(ta, tb, dim, 3), dense, atol=1e-12)
