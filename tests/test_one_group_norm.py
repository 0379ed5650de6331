"""A one-group GroupNorm over a partly merged stream has no per-view form: it normalises both
models' channels together, so the merge is approximate even for identical models.  ``build``
says so (a MergeWarning naming the norms, also in the report) instead of handing back a
silently different model; at widths 1 and 2 it is exact and nothing is said."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from pleas.errors import MergeWarning
from pleas.pipeline import ModelSide, build, prepare

torch.set_num_threads(1)


class OneGroupNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.gn0 = nn.GroupNorm(1, 32)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.gn0(self.stem(x)))
        x = x + torch.relu(self.gn1(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _identical_pair(net: type[nn.Module]):
    """A seeded model, its preparation merged with an exact copy of itself, and 8 images."""
    torch.manual_seed(0)
    a = net().eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    space = dict(task="t", label_space="s")
    prep = prepare(ModelSide(a, "a", **space), ModelSide(copy.deepcopy(a), "b", **space), x,
                   batch_size=32, methods=["permute"], progress=False)
    return a, prep, x[:8]


@pytest.fixture(scope="module")
def identical():
    return _identical_pair(OneGroupNet)


def _logits(model, x):
    with torch.no_grad():
        y = model(x)
    return y if torch.is_tensor(y) else next(iter(y.values()))


def test_a_partly_merged_one_group_norm_is_named_in_a_warning(identical):
    a, prep, x = identical
    with pytest.warns(MergeWarning, match=r"one-group GroupNorm .*\(gn0, gn1\)"):
        model, report = build(prep, 1.5, "permute", progress=False, recalibrate=False)
    assert any("gn0, gn1" in w for w in report["warnings"])
    # what the warning is about: identical models, yet not the model
    assert float((_logits(model, x) - a(x)).abs().max()) > 1e-4


@pytest.mark.parametrize("width", [1.0, 2.0])
def test_widths_1_and_2_are_exact_and_say_nothing(identical, width):
    a, prep, x = identical
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        model, report = build(prep, width, "permute", progress=False, recalibrate=False)
    assert not any("GroupNorm" in w for w in report["warnings"])
    torch.testing.assert_close(_logits(model, x), a(x), atol=1e-5, rtol=1e-5)


class OneGroupBlockNet(nn.Module):
    """A one-group GroupNorm on the residual stream and an inverted bottleneck beside it
    (PoolFormer's shape): the bottleneck's hidden units can take the width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.GroupNorm(1, 32)
        self.up = nn.Conv2d(32, 128, 1)
        self.down = nn.Conv2d(128, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.fc(x.mean((2, 3)))


def test_the_default_allocation_keeps_a_one_group_norm_stream_merged():
    """The stream is marked like a LayerNorm's, so the default plan leaves it merged (exact for
    identical models, no warning) where the even one splits it (the warning)."""
    a, prep, x = _identical_pair(OneGroupBlockNet)
    assert [g.name for g in prep.spec.hidden if g.layer_norm] == ["stem"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        model, report = build(prep, 1.5, "permute", progress=False, recalibrate=False)
    assert abs(report["width"]["executed"] - 1.5) <= 0.03
    torch.testing.assert_close(_logits(model, x), a(x), atol=1e-5, rtol=1e-5)
    with pytest.warns(MergeWarning, match=r"one-group GroupNorm .*\(norm\)"):
        build(prep, 1.5, "permute", allocation="even", progress=False, recalibrate=False)
