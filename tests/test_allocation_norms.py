"""Streams under a LayerNorm are allocated last (``allocation="uniform"``, the default).

* the spec marks exactly the groups a LayerNorm normalises over (the ViT's residual stream,
  ConvNeXt's stage streams; none in a ResNet);
* below the width the other groups can take alone, the uniform plan keeps those groups fully
  merged (no MergedLayerNorm is built) and still meets the width, in both layouts, and so does
  the MILP; past it they are the only groups partly merged;
* a network without such groups gets exactly the even allocation;
* the even allocation splits the residual stream (the plan before), so merged LayerNorms are
  still built and tested where a user asks for them.
"""
from __future__ import annotations

import pytest
import torch

from pleas.normalization import MergedLayerNorm
from pleas.plan import allocate, for_layout, layer_norm_fixed_width
from pleas.pipeline import build
from pleas.spec import derive_spec

from archs import random_model
from test_blockwise import _prep

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    return _prep("vit_tiny28")[0]


def _residual(spec):
    return [g for g in spec.hidden if g.layer_norm]


def test_the_spec_marks_the_groups_under_a_layernorm(vit):
    assert [g.name for g in _residual(vit.spec)] == ["cls_token"]
    convnext = random_model("timm:convnext_atto", 1)
    spec = derive_spec(convnext, (2, 3, 32, 32))
    marked = {g.name for g in spec.hidden if g.layer_norm}
    assert len(marked) == 4  # one stream per stage
    assert all(not g.layer_norm for g in derive_spec(random_model("resnet20", 1),
                                                     (2, 1, 28, 28)).hidden)


@pytest.mark.parametrize("layout", ["dense", "blocks"])
def test_uniform_keeps_the_layernorm_stream_merged_and_meets_the_width(vit, layout):
    (residual,) = _residual(vit.spec)
    fixed = layer_norm_fixed_width(for_layout(vit.spec, layout), 1.0)
    assert 1.9 < fixed < 2.0
    even_split = []
    for width in (1.25, 1.5, 1.75):
        model, report = build(vit, width, "permute", layout=layout, progress=False)
        groups = {g["name"]: g for g in report["groups"]}
        assert groups[residual.name]["merged"] == residual.size, (layout, width)
        assert [n for n, g in groups.items() if g["layer_norm"]] == [residual.name]
        assert abs(report["width"]["executed"] - width) <= 0.03, (layout, width)
        assert not any(isinstance(m, MergedLayerNorm) for m in model.modules())
        # the even plan of the same width splits the stream (where its 16-unit steps allow)
        even = build(vit, width, "permute", layout=layout, allocation="even",
                     progress=False)[1]
        even_split.append({g["name"]: g for g in even["groups"]}[residual.name]["merged"]
                          < residual.size)
    assert any(even_split), layout
    model, report = build(vit, 1.995, "permute", layout=layout, progress=False)
    groups = {g["name"]: g for g in report["groups"]}
    assert groups[residual.name]["merged"] < residual.size  # past the fixed width: split
    assert all(g["merged"] == 0 for n, g in groups.items() if n != residual.name
               and n in {h.name for h in vit.spec.hidden})
    assert any(isinstance(m, MergedLayerNorm) for m in model.modules())


def test_the_milp_keeps_the_layernorm_stream_merged_too(vit):
    (residual,) = _residual(vit.spec)
    match = vit.matching("activation", 0)
    for width in (1.25, 1.75):
        units = allocate(vit.spec, match, width, "optimal", separate_heads=True)
        assert units[residual.name] == residual.size, width


def test_without_layernorm_streams_uniform_is_the_even_allocation():
    prep = _prep("resnet20")[0]
    match = prep.matching("activation", 0)
    for width in (1.25, 1.5, 1.75):
        assert (allocate(prep.spec, match, width, "uniform", separate_heads=True)
                == allocate(prep.spec, match, width, "even", separate_heads=True)), width
