"""The lean statistics pass: products in the activations' dtype, sums in float64, stay within
1e-6 (relative, Frobenius) of a float64 reference, and the correlations within 1e-6."""
from __future__ import annotations

import copy

import torch

from pleas import zoo
from pleas.capture import run_pair
from pleas.data import load_task
from pleas.spec import derive_spec
from pleas.stats import CHUNK, CrossStats, MatchingStats

torch.set_num_threads(1)


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def test_float32_products_keep_float64_sums_on_synthetic_activations():
    gen = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(3 * CHUNK + 123, 64, generator=gen)) * 3 + 1  # big, offset
    b = a @ torch.randn(64, 48, generator=gen) * 0.1 + torch.randn(len(a), 48, generator=gen)
    lean, exact = CrossStats.zeros(64, 48), CrossStats.zeros(64, 48)
    for i in range(0, len(a), 5000):
        lean.update(a[i:i + 5000], b[i:i + 5000])  # float32 in, float32 products
        exact.update(a[i:i + 5000].double(), b[i:i + 5000].double())  # exact products
    assert lean.n == exact.n == len(a)
    for key in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
        assert _relative(getattr(lean, key), getattr(exact, key)) <= 1e-6, key
    assert float((lean.correlation() - exact.correlation()).abs().max()) <= 1e-6


def test_the_statistics_pass_of_a_zoo_pair_matches_float64():
    (a, _), (b, _) = zoo.load("resnet_a"), zoo.load("resnet_b")
    x = load_task("fashion_mnist", "train").subset(128, seed=0).images
    spec = derive_spec(a, (2, 1, 28, 28))
    lean = MatchingStats(spec)
    run_pair(a, b, list(x.split(64)), [lean], progress=False)
    exact = MatchingStats(spec)
    run_pair(copy.deepcopy(a).double(), copy.deepcopy(b).double(), list(x.double().split(64)),
             [exact], progress=False)
    for name, st in lean.by_group.items():
        ref = exact.by_group[name]
        # the float64 models' activations differ from the float32 ones by float32 rounding
        # (1e-7): the sums agree to that, far inside 1e-6
        assert _relative(st.cross, ref.cross) <= 1e-6, name
        assert float((st.correlation() - ref.correlation()).abs().max()) <= 1e-5, name


def test_the_closed_form_grams_match_float64():
    """The Gram pass (float32 products over chunks, float64 sums, symmetric blocks) against
    the same pass on float64 copies of the models (float64 products)."""
    from pleas.lstsq import GramStats

    (a, _), (b, _) = zoo.load("resnet_a"), zoo.load("resnet_b")
    x = load_task("fashion_mnist", "train").subset(128, seed=1).images
    spec = derive_spec(a, (2, 1, 28, 28))
    lean = GramStats(spec, a, positions=64, seed=0)
    run_pair(a, b, list(x.split(64)), [lean], progress=False)
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    exact = GramStats(spec, a64, positions=64, seed=0)
    run_pair(a64, b64, list(x.double().split(64)), [exact], progress=False)
    assert lean.gram.keys() == exact.gram.keys() and len(lean.gram) > 10
    for k, g in lean.gram.items():
        assert lean.count[k] == exact.count[k]
        assert torch.equal(g, g.T), k  # symmetric by construction
        assert _relative(g, exact.gram[k]) <= 1e-6, k


def test_sampled_rows_are_gathered_from_the_view_exactly_as_from_the_full_copy():
    """Site.extract with a row index (the sampled positions, gathered from the strided view)
    gives the same rows, in the same order, as copying every row and then indexing: a conv's
    channels, a token axis, and one head's slice of a fused axis (start, outer, inner)."""
    from pleas.spec import Site

    gen = torch.Generator().manual_seed(1)
    cases = [(Site("conv", "out", 1, 6), (3, 6, 5, 7)),
             (Site("fc", "out", -1, 8), (3, 11, 8)),
             (Site("qkv", "out", -1, 4, start=8, outer=2, inner=3), (2, 5, 40))]
    for site, shape in cases:
        t = torch.randn(*shape, generator=gen)
        full = site.extract(t)
        keep = torch.randperm(full.shape[0], generator=gen)[: full.shape[0] // 3]
        assert site.rows(t) == full.shape[0]
        assert torch.equal(site.extract(t, site.row_index(t, keep)), full[keep])


def test_rows_picked_per_image_are_the_flat_rows_they_name():
    """Site.image_rows (a two-index gather where an image's rows are one strided axis, flat
    row numbers where not) gives the rows ``picks[i] + i * rows_per_image`` of the full copy,
    in that order: a conv map, a token axis, and one head's slice of a fused axis."""
    from pleas.spec import ImageRows, Site

    gen = torch.Generator().manual_seed(2)
    cases = [(Site("conv", "out", 1, 6), (3, 6, 5, 7), True),
             (Site("fc", "out", -1, 8), (3, 11, 8), True),
             (Site("qkv", "out", -1, 4, start=8, outer=2, inner=3), (2, 5, 40), False)]
    for site, shape, two_index in cases:
        t = torch.randn(*shape, generator=gen)
        full = site.extract(t)
        images = shape[0]
        per = full.shape[0] // images
        picks = torch.stack([torch.randperm(per, generator=gen)[:4] for _ in range(images)])
        index = site.image_rows(t, picks)
        assert isinstance(index, ImageRows) == two_index
        flat = (picks + torch.arange(images)[:, None] * per).flatten()
        assert torch.equal(site.extract(t, index), full[flat])


def test_rows_taken_in_the_hooks_give_the_statistics_of_the_full_activations():
    """MatchingStats takes its sampled rows inside the forward hooks; the same statistics
    from whole activations captured by plain hooks (copied), sampled afterwards from the full
    row copy with the same draws, agree exactly."""
    (a, _), (b, _) = zoo.load("resnet_a"), zoo.load("resnet_b")
    x = load_task("fashion_mnist", "train").subset(64, seed=3).images
    spec = derive_spec(a, (2, 1, 28, 28))
    batches = list(x.split(32))
    stats = MatchingStats(spec, positions=16, seed=4)
    run_pair(a, b, batches, [stats], progress=False)

    ref = {g.name: CrossStats.zeros(g.size) for g in spec.hidden if g.sites}
    numbered = [(g, site) for g in spec.hidden for site in g.sites]
    for batch_id, xb in enumerate(batches):
        full = []
        for model in (a, b):
            store, handles = {}, []
            for _, site in numbered:
                mod = model.get_submodule(site.module)
                key = (site.module, site.io)
                if site.io == "in":
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, args, k=key: store.__setitem__(k, args[0].clone())))
                else:
                    handles.append(mod.register_forward_hook(
                        lambda m, args, out, k=key: store.__setitem__(k, out.clone())))
            with torch.no_grad():
                model(xb)
            for h in handles:
                h.remove()
            full.append(store)
        for index, (g, site) in enumerate(numbered):
            key = (site.module, site.io)
            rows = [site.extract(f[key]) for f in full]
            picks = stats._sample(rows[0].shape[0], len(xb), index, batch_id)
            if picks is not None:
                per = rows[0].shape[0] // len(xb)
                flat = (picks + torch.arange(len(xb))[:, None] * per).flatten()
                rows = [r[flat] for r in rows]
            ref[g.name].update(rows[0], rows[1])
    sampled = 0
    for name, st in stats.by_group.items():
        r = ref[name]
        assert st.n == r.n
        sampled += st.n
        for key in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
            assert torch.equal(getattr(st, key), getattr(r, key)), (name, key)
    assert sampled < sum(len(xb) * 28 * 28 for xb in batches) * len(ref)  # it did sample


def test_column_sums_stay_within_1e6_of_float64():
    from pleas.stats import column_sums

    gen = torch.Generator().manual_seed(5)
    for rows in (1, 63, 64, 4096, 4096 + 17):
        x = torch.relu(torch.randn(rows, 40, generator=gen)) * 3 + 100  # offset, positive
        ref = x.double().sum(0)
        got = column_sums(x)
        assert got.dtype == torch.float64
        assert _relative(got, ref) <= 1e-6, rows
        assert _relative(column_sums(x * x), (x.double() ** 2).sum(0)) <= 1e-6, rows
        assert torch.equal(column_sums(x.double()), ref)


def test_batchnorm_sums_in_float32_match_float64():
    """The BN statistics' sums (pleas.normalization.batchnorm_sums: float32 products of
    values centred by the batch's channel means, float64 sums) against float64 sums of the
    same float32 input, on channels whose mean is 30x their spread: sums within 1e-6, the
    variance they give within 1e-6 of the float64 one; the uncentred float32 square misses
    that (the test can tell the two apart)."""
    from pleas.normalization import add_batchnorm_sums, batchnorm_sums

    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(64, 24, 14, 14, generator=gen) * 0.1 + 3.0 for _ in range(3)]
    acc = None
    for x in batches:
        term = batchnorm_sums(x)
        acc = torch.zeros_like(term) if acc is None else acc
        add_batchnorm_sums(acc, term)
    x = torch.cat(batches).double().transpose(0, 1).flatten(1)  # (channels, samples)
    n = x.shape[1]
    assert float(acc[0]) == n
    assert _relative(acc[1:25], x.sum(1)) < 1e-6
    assert _relative(acc[25:], (x * x).sum(1)) < 1e-6
    mean = acc[1:25] / n
    var = (acc[25:] - n * mean * mean) / (n - 1)
    assert _relative(var, x.var(1)) < 1e-6
    # float32 squares summed without centring lose the variance to cancellation
    raw = torch.stack([(b * b).sum((0, 2, 3)) for b in batches]).double().sum(0)
    var_raw = (raw - n * mean * mean) / (n - 1)
    assert _relative(var_raw, x.var(1)) > 1e-6
