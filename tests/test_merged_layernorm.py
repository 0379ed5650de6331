"""MergedLayerNorm (matmul form) against an independent per-view reference.

The reference gathers each view's units, runs ``F.layer_norm`` on them in float64 and adds the
views with their shares: no masks, no matmuls, nothing shared with the code under test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pleas.blockwise import plain_layernorm
from pleas.normalization import MergedLayerNorm


def _reference(x, share_a, share_b, eps, weight, bias, dim):
    x = x.movedim(dim, -1).double()
    y = torch.zeros_like(x)
    for share in (share_a, share_b):
        idx = (share > 0).nonzero().flatten()
        y[..., idx] += share[idx].double() * F.layer_norm(x[..., idx], (len(idx),), eps=eps)
    if weight is not None:
        y = y * weight.double() + bias.double()
    return y.movedim(-1, dim)


def _shares(n, n_merged, seed, ordered=False):
    """Shares of A-only (1, 0), merged (1/2, 1/2) and B-only (0, 1) units: scattered, or
    ``ordered`` [A-only | merged | B-only] as pleas builds them (the sliced form)."""
    g = torch.Generator().manual_seed(seed)
    n_a = (n - n_merged) // 2
    kind = torch.cat([torch.zeros(n_a), torch.ones(n_merged), torch.full((n - n_a - n_merged,), 2.)])
    if not ordered:
        kind = kind[torch.randperm(n, generator=g)]  # views anywhere, not a prefix and a suffix
    share_a = torch.where(kind == 0, 1., torch.where(kind == 1, .5, 0.))
    share_b = torch.where(kind == 2, 1., torch.where(kind == 1, .5, 0.))
    return share_a, share_b


@pytest.mark.parametrize("dim,shape", [(-1, (8, 17, 40)), (1, (4, 40, 5, 5))])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("n_merged", [0, 24, 40])
@pytest.mark.parametrize("ordered", [False, True])
def test_matches_a_per_view_layer_norm(dim, shape, affine, offset, n_merged, ordered):
    share_a, share_b = _shares(40, n_merged, seed=n_merged, ordered=ordered)
    norm = MergedLayerNorm(share_a, share_b, eps=1e-6, affine=affine, dim=dim)
    # ordered views take the sliced form (two native layer norms); scattered, the matmul form
    assert (norm.split is not None) == (ordered or n_merged == 40)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=torch.Generator().manual_seed(1))
            norm.bias.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3 + offset
    with torch.no_grad():
        y = norm(x)
    ref = _reference(x, share_a, share_b, 1e-6, norm.weight, norm.bias, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("old_ordered,new_ordered", [(False, False), (False, True),
                                                     (True, False)])
def test_loading_new_shares_moves_the_views(old_ordered, new_ordered):
    old_a, old_b = _shares(40, 24, seed=0, ordered=old_ordered)
    new_a, new_b = _shares(40, 8, seed=5, ordered=new_ordered)
    norm = MergedLayerNorm(old_a, old_b, eps=1e-5)
    norm.load_state_dict({"share_a": new_a, "share_b": new_b, "weight": torch.ones(40),
                          "bias": torch.zeros(40)})
    assert (norm.split is not None) == new_ordered
    x = torch.randn(6, 40)
    with torch.no_grad():
        torch.testing.assert_close(norm(x).double(),
                                   _reference(x, new_a, new_b, 1e-5, None, None, -1),
                                   atol=1e-5, rtol=1e-5)


def test_one_view_becomes_a_plain_layer_norm_and_two_views_stay():
    merged = MergedLayerNorm(torch.full((40,), .5), torch.full((40,), .5), eps=1e-6)
    with torch.no_grad():
        merged.weight.uniform_(0.5, 2.0)
    plain = plain_layernorm(merged)
    assert type(plain) is nn.LayerNorm
    x = torch.randn(5, 40) + 7
    with torch.no_grad():
        torch.testing.assert_close(plain(x), merged(x), atol=1e-5, rtol=1e-5)
    two_views = MergedLayerNorm(*_shares(40, 24, seed=0))
    assert plain_layernorm(two_views) is two_views


def test_its_statistics_are_not_counted_as_layer_macs():
    """Executed MACs count layers (a plain LayerNorm's arithmetic is not counted either)."""
    from pleas.measure import executed_macs

    net = nn.Sequential(nn.Linear(40, 40, bias=False), MergedLayerNorm(*_shares(40, 24, 0)),
                        nn.Sequential(nn.Linear(40, 10, bias=False)))
    assert executed_macs(net, (1, 40)) == 40 * 40 + 40 * 10


def test_sliced_form_only_for_two_non_empty_overlapping_or_adjacent_views():
    """The sliced form needs A's view a non-empty prefix and B's a non-empty suffix that
    leave no unit out; anything else takes the matmul form."""
    t = torch.tensor
    assert MergedLayerNorm(t([1., .5, .5, 0.]), t([0., .5, .5, 1.])).split == (1, 3)
    assert MergedLayerNorm(t([1., 1., 0., 0.]), t([0., 0., 1., 1.])).split == (2, 2)
    assert MergedLayerNorm(torch.full((4,), .5), torch.full((4,), .5)).split == (0, 4)
    assert MergedLayerNorm(torch.ones(4), torch.zeros(4)).split is None  # B's view empty
    assert MergedLayerNorm(t([1., 0., 0., 0.]), t([0., 0., 0., 1.])).split is None  # a gap
    assert MergedLayerNorm(t([0., .5, 1., 0.]), t([1., .5, 0., 1.])).split is None  # scattered
    # ordered, but shares the sliced form's blend cannot express (not adding up to 1)
    assert MergedLayerNorm(t([1., .7, .5, 0.]), t([0., .5, .5, 1.])).split is None
    assert MergedLayerNorm(t([.8, .5, .5, 0.]), t([0., .5, .5, 1.])).split is None


def test_shares_not_adding_up_to_one_still_match_the_reference():
    """A user's own shares (e.g. weighting one model's view more) take the matmul form and
    still give each view's share of its layer norm."""
    t = torch.tensor
    share_a, share_b = t([1., .7, .3, .6, 0., 0.]), t([0., .4, .7, .6, 1., 1.])
    norm = MergedLayerNorm(share_a, share_b, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        norm.bias.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(3)) * 3 + 50
        y = norm(x)
    assert norm.split is None
    ref = _reference(x, share_a, share_b, 1e-6, norm.weight, norm.bias, -1)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
