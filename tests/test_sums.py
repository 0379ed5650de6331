"""Order-independent float64 sums (pleas.sums): the same number in any order and over any
split into shards, and as accurate as the module says (against an exact rational sum)."""
from __future__ import annotations

import random
from fractions import Fraction

import torch

from pleas.sums import HEADROOM_BITS, add_precise, add_term, on_grid, precise_zeros, total


def _terms(n: int = 64, shape=(7, 5), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # sizes spread over a factor of 8 and signs mixed: ordinary float64 sums of these depend
    # on the order (checked below)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) * (1 + i % 8) * 1e3
            for i in range(n)]


def _exact(terms: list[torch.Tensor]) -> list[Fraction]:
    flat = [t.flatten().tolist() for t in terms]
    return [sum(Fraction(row[j]) for row in flat) for j in range(len(flat[0]))]


def _plain(terms, order):
    acc = torch.zeros_like(terms[0])
    for i in order:
        acc += terms[i]
    return acc


def test_plain_float64_sums_of_these_terms_depend_on_the_order():
    terms = _terms()
    order = list(range(len(terms)))
    random.Random(1).shuffle(order)
    assert not torch.equal(_plain(terms, range(len(terms))), _plain(terms, order))


def test_sums_are_identical_in_any_order_and_over_shards():
    terms = _terms()
    results = []
    for seed in range(4):
        order = list(range(len(terms)))
        random.Random(seed).shuffle(order)
        coarse, fine = torch.zeros_like(terms[0]), precise_zeros(*terms[0].shape)
        for i in order:
            add_term(coarse, terms[i].clone())  # the sums consume their terms
            add_precise(fine, terms[i].clone())
        results.append((coarse, total(fine)))
    # three shards summed apart, then their sums added (what an all-reduce does)
    shards = [precise_zeros(*terms[0].shape) for _ in range(3)]
    for i, t in enumerate(terms):
        add_precise(shards[i % 3], t.clone())
    sharded = total(shards[2] + (shards[0] + shards[1]))
    for coarse, fine in results[1:]:
        assert torch.equal(coarse, results[0][0])
        assert torch.equal(fine, results[0][1])
    assert torch.equal(sharded, results[0][1])


def test_accuracy_of_the_grid_and_of_the_precise_sum():
    terms = _terms()
    exact = _exact(terms)
    coarse, fine = torch.zeros_like(terms[0]), precise_zeros(*terms[0].shape)
    for t in terms:
        add_term(coarse, t.clone())
        add_precise(fine, t.clone())
    scale = max(float(t.abs().max()) for t in terms)
    grid_step = 2.0 ** (-(53 - HEADROOM_BITS)) * 2 * scale  # the coarsest term's grid step
    for got, bound in ((coarse.flatten().tolist(), len(terms) * grid_step / 2),
                       (total(fine).flatten().tolist(), 1e-15 * scale)):
        worst = max(abs(Fraction(g) - e) for g, e in zip(got, exact))
        assert float(worst) <= bound
    # and the rounding of one term is within half a step of its own grid
    t = terms[5]
    step = 2.0 ** (int(torch.frexp(t.abs().max()).exponent) - (53 - HEADROOM_BITS))
    assert float((on_grid(t) - t).abs().max()) <= step / 2


def test_zeros_tiny_and_non_finite_terms():
    assert torch.equal(on_grid(torch.zeros(3)), torch.zeros(3, dtype=torch.float64))
    assert float(on_grid(torch.tensor([1e-310, 0.0])).abs().max()) == 0.0  # below 2^-900
    got = on_grid(torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(got[0])  # a NaN is not hidden by the rounding
    assert on_grid(torch.tensor([], dtype=torch.float64)).numel() == 0
    t = torch.tensor([3.0, -1.5], dtype=torch.float64)
    on_grid(t)
    assert t.tolist() == [3.0, -1.5]  # the caller's tensor is left as it was


def test_float32_terms_round_in_place_to_the_float64_paths_numbers():
    """The float32 fast path (rounded in float32, no float64 copy) adds the very numbers the
    float64 path adds, over scales from 1e-20 to 1e30; terms below 2^-85 land on the 2^-126
    grid (exact to add, in any order) and stay within half its step."""
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-20, 1e-6, 0.37, 1.0, 3e4, 1e30):
        t32 = (torch.randn(33, 17, generator=gen) * scale).float()
        t32[0, 0] = 0.0
        fast, slow = torch.zeros(33, 17, dtype=torch.float64), torch.zeros(33, 17,
                                                                          dtype=torch.float64)
        add_term(slow, t32.double())
        add_term(fast, t32.clone())
        assert torch.equal(fast, slow), scale
    tiny = torch.randn(50, generator=gen).float() * 1e-30  # max below 2^-85
    fast = torch.zeros(50, dtype=torch.float64)
    add_term(fast, tiny.clone())
    assert float((fast - tiny.double()).abs().max()) <= 2.0 ** -127
    assert torch.equal(fast * 2.0 ** 126, (fast * 2.0 ** 126).round())  # on the 2^-126 grid
    nan = torch.zeros(2, dtype=torch.float64)
    add_term(nan, torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(nan[0])
