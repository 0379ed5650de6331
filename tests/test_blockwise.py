"""Block-structured execution (pleas.blockwise): the merged model costs its width.

* the same function: the block-structured model's outputs equal the dense widened model's at
  every width, on plain, grouped, depthwise and attention networks;
* cost measured, not modelled: the MACs counted on the built model's forward pass
  (FlopCounterMode) equal the plan's at widths 1 to 2 (resnet20, resnext29, vit_tiny28); width 2
  is exactly both models side by side, width 1 one plain model;
* the structure survives torch.fx, save/load (format v2; a dense v1 folder still loads) and a
  tampered layout is a clear error; CUDA when there is one.
"""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
import torch.fx
from torch import nn

import pleas
from pleas.blockwise import (A_ONLY, B_ONLY, BOTH, BlockLayer, Layout,
                             layout_of, layouts_of, runs)
from pleas.measure import executed_macs, stored_params
from pleas.merged import DENSE_FORMAT, MergedFileError, load_merged, save_merged
from pleas.normalization import MergedLayerNorm
from pleas.pipeline import ModelSide, prepare
from pleas.pipeline import build as _build
from pleas.side_by_side import SideBySide

from archs import MERGE_ARCHS, random_model

torch.set_num_threads(1)


def build(*args, **kw):
    """:func:`pleas.pipeline.build` in the block-structured layout, the one this file tests
    (the default layout is dense: tests/test_layout.py)."""
    kw.setdefault("layout", "blocks")
    return _build(*args, **kw)


WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
CONFIGS = {"resnet20": {"num_classes": 5},
           "resnext29": {"num_classes": 5, "width": 1, "cardinality": 4},
           "vit_tiny28": {"num_classes": 5, "depth": 2}}


def _prep(arch: str, heads_differ: bool = True):
    a, b = random_model(arch, 1), random_model(arch, 2)
    shape = MERGE_ARCHS[arch][1]
    x = torch.randn(48, *shape[1:], generator=torch.Generator().manual_seed(0))
    side = dict(arch=arch, config=CONFIGS[arch]) if arch in CONFIGS else {}
    space = dict(task="ta", label_space="a") if heads_differ else dict(task="t", label_space="s")
    space_b = dict(task="tb", label_space="b") if heads_differ else space
    prep = prepare(ModelSide(a, "a", **space, **side), ModelSide(b, "b", **space_b), x,
                   batch_size=24, positions=8, methods=["permute"], progress=False)
    return prep, x[:6]


@pytest.fixture(scope="module", params=["resnet20", "resnext29", "vit_tiny28"])
def prepared(request):
    return request.param, *_prep(request.param)


def _flat(y) -> torch.Tensor:
    return torch.cat(list(y.values()), -1) if isinstance(y, dict) else y


def _out(model, x):
    with torch.no_grad():
        return _flat(model.eval()(x))


# ----------------------------------------------------------------------------- layouts


def test_runs_and_layouts():
    assert runs(torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)) == ((0, 2), (3, 4),
                                                                          (6, 7))
    # [A-only | merged | B-only] on both axes: three pieces, prefix / all / suffix
    k = torch.tensor([A_ONLY] * 2 + [BOTH] * 3 + [B_ONLY] * 2)
    lay = layout_of(k, k)
    assert [(p.rows, p.cols) for p in lay.pieces] == [
        (((0, 2),), ((0, 5),)), (((2, 5),), ((0, 7),)), (((5, 7),), ((2, 7),))]
    assert lay.pairs == 2 * 5 + 3 * 7 + 2 * 5 and lay.assembly() is None
    assert Layout.from_json(json.loads(json.dumps(lay.to_json()))) == lay
    # an input both models share: every row reads every column, nothing to split
    assert layout_of(k, torch.full((4,), BOTH)) is None
    # rows of one class in several runs (a fused qkv): the output is re-assembled in order
    rows = torch.tensor([A_ONLY, B_ONLY, A_ONLY, B_ONLY])
    lay = layout_of(rows, torch.tensor([A_ONLY, B_ONLY]))
    assert lay.assembly() == [(0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    w = torch.randn(4, 2)
    w[rows == A_ONLY, 1] = 0
    w[rows == B_ONLY, 0] = 0
    dense = nn.Linear(2, 4)
    dense.weight.data.copy_(w)
    block = pleas.blockwise.split_linear(dense, lay)
    x = torch.randn(3, 2)
    torch.testing.assert_close(block(x), dense(x))
    torch.testing.assert_close(block.dense()[0], w)


@pytest.mark.parametrize("bad,match", [
    ({"rows": 4, "cols": 2, "pieces": [{"rows": [[0, 3]], "cols": [[0, 2]]}]}, "end at 3"),
    ({"rows": 4, "cols": 2, "pieces": [{"rows": [[0, 3]], "cols": [[0, 2]]},
                                       {"rows": [[2, 4]], "cols": [[0, 1]]}]}, "repeated"),
    ({"rows": 4, "cols": 2, "pieces": [{"rows": [[0, 4]], "cols": [[1, 3]]}]}, "within"),
    ({"rows": 4, "cols": 2, "pieces": []}, "non-empty"),
    ({"rows": True, "cols": 2, "pieces": []}, "positive integers"),
    ([1, 2], "an object"),
], ids=["short", "overlap", "out-of-range", "no-pieces", "bool", "list"])
def test_bad_layouts_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Layout.from_json(bad)


# ----------------------------------------------------------------------------- same function


@pytest.mark.parametrize("arch", ["resnet20", "resnext29", "vit_tiny28", "grouped",
                                  "depthwise", "groupnorm", "vgg_small", "mlp"])
def test_blocks_compute_what_the_dense_model_computes(arch):
    """At every width, on the merged model as built (BatchNorm reset included): outputs of the
    block-structured model equal the dense widened model's to 1e-5 of their scale."""
    prep, x = _prep(arch)
    # the ViT also with the even allocation: it splits the residual stream (merged LayerNorms
    # between split layers), which the uniform one keeps merged below 1.97x (this test ViT)
    allocations = ("uniform", "even") if arch == "vit_tiny28" else ("uniform",)
    for allocation, width in itertools.product(allocations, WIDTHS):
        dense, _ = build(prep, width, "permute", progress=False, blocks=False,
                         allocation=allocation)
        block, report = build(prep, width, "permute", progress=False, allocation=allocation)
        y0, y1 = _out(dense, x), _out(block, x)
        assert (y0 - y1).abs().max() <= 1e-5 * max(1.0, float(y0.abs().max())), (arch, width)
        assert report["structure"] == ("side_by_side" if width == 2.0 else "blocks")


@pytest.mark.parametrize("arch", ["resnet20", "vit_tiny28"])
def test_a_shared_head_side_by_side_computes_the_dense_shared_head(arch):
    """One label space at width 2: the side-by-side model averages the two models' logits,
    which is what the dense widened model's shared head computes."""
    prep, x = _prep(arch, heads_differ=False)
    dense, _ = build(prep, 2.0, "permute", progress=False, blocks=False)
    side, report = build(prep, 2.0, "permute", progress=False)
    assert report["structure"] == "side_by_side" and not side.multi_head
    assert side.net.combine == "mean"
    torch.testing.assert_close(_out(side, x), _out(dense, x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_out(side, x), (prep.a.model(x) + prep.b.model(x)) / 2,
                                   atol=1e-6, rtol=1e-6)


def test_least_squares_merges_convert_too():
    prep, x = _prep("vit_tiny28")
    a, b = prep.a.model, prep.b.model
    data = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    prep = prepare(ModelSide(a, "a", task="ta"), ModelSide(b, "b", task="tb"), data,
                   batch_size=24, positions=8, progress=False)
    for method in ("pleas", "pleas_closed"):
        dense, _ = build(prep, 1.5, method, progress=False, blocks=False)
        block, _ = build(prep, 1.5, method, progress=False)
        torch.testing.assert_close(_out(block, x), _out(dense, x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- cost


def test_executed_macs_are_the_planned_macs(prepared):
    """The MACs the built model executes (counted on its forward pass) are the plan's, within
    1% (measured: equal), at widths 1 to 2; the dense model would cost more wherever a layer
    reads a partly merged input."""
    arch, prep, _ = prepared
    one = executed_macs(prep.a.model, prep.spec.input_shape)
    assert one == prep.spec.total_macs  # the counter counts what the spec counts
    last, saved = 0, []
    for width in WIDTHS:
        model, report = build(prep, width, "permute", progress=False)
        macs = report["macs"]
        assert macs["executed"] == executed_macs(model, prep.spec.input_shape)
        assert abs(macs["executed"] - macs["merged"]) <= 0.01 * macs["merged"], (arch, width)
        assert macs["executed"] > last
        last = macs["executed"]
        # equal where no layer reads a partly merged input (vit_tiny28 at 1.25: the stream
        # wholly merged, units kept apart only inside the blocks)
        assert macs["merged_dense"] >= macs["executed"], (arch, width)
        saved.append(macs["merged_dense"] > macs["executed"])
        assert abs(report["width"]["executed"] - width) <= 0.03, (arch, report["width"])
    assert any(saved), arch


def test_width_2_is_both_models_side_by_side(prepared):
    """Width 2 is the two original networks, each run whole (no fused grouped layers: those
    cost 2.6x one model on a CPU): bit-identical outputs, exactly twice the MACs and params."""
    arch, prep, x = prepared
    model, report = build(prep, 2.0, "permute", progress=False)
    assert isinstance(model.net, SideBySide) and len(model.net.members) == 2
    assert BlockLayer not in {type(m) for m in model.net.modules()}
    assert report["width"]["executed"] == 2.0
    assert report["macs"]["executed"] == 2 * report["macs"]["one_model"]
    assert stored_params(model) == 2 * stored_params(prep.a.model)
    y = model(x)
    with torch.no_grad():
        assert torch.equal(y["ta"], prep.a.model(x)) and torch.equal(y["tb"], prep.b.model(x))


def test_width_1_is_one_plain_model(prepared):
    """Everything merged: no layer is split and no LayerNorm is a merged one; the only cost
    over one model is the second head."""
    arch, prep, x = prepared
    model, report = build(prep, 1.0, "permute", progress=False)
    kinds = {type(m) for m in model.net.modules()}
    assert BlockLayer not in kinds and MergedLayerNorm not in kinds
    head = prep.spec.layers[-1]
    assert report["macs"]["executed"] == report["macs"]["one_model"] + head.macs


def test_params_count_what_is_stored():
    prep, _ = _prep("resnet20")
    model, report = build(prep, 1.5, "permute", progress=False)
    dense, _ = build(prep, 1.5, "permute", progress=False, blocks=False)
    stored = sum(int(t.numel()) for k, t in model.net.state_dict().items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert report["params"]["merged"] == stored == stored_params(model)
    assert stored < 0.95 * stored_params(dense)


def test_a_layer_without_a_split_rule_is_counted_dense():
    """A user module type with a spec rule but no split rule runs dense; the plan says so."""
    from test_registry import RULES, X, Net

    prep = pleas.prepare(Net(0).eval(), Net(1).eval(), X, batch_size=32, rules=RULES,
                         progress=False)
    assert [layer.split for layer in prep.spec.layers] == [False, False, True]
    for width in (1.25, 1.5, 1.75):
        model, report = pleas.build(prep, width, "permute", heads="separate", progress=False)
        assert report["macs"]["executed"] == report["macs"]["merged"]
        assert abs(report["width"]["achieved"] - width) <= 0.05


# ----------------------------------------------------------------------------- structure


def test_the_block_structured_model_traces_with_fx():
    prep, x = _prep("resnet20")
    model, _ = build(prep, 1.5, "permute", progress=False)
    gm = torch.fx.symbolic_trace(model.net)
    assert any(n.target is torch.cat for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.net(x))


def test_a_block_structured_model_has_no_permutation_spec():
    prep, _ = _prep("resnet20")
    model, _ = build(prep, 1.5, "permute", progress=False)
    with pytest.raises(pleas.UnsupportedOpError, match="block-structured layer"):
        pleas.derive_spec(model.net, prep.spec.input_shape)


def test_partly_merged_layernorms_keep_their_two_views():
    """Under the even allocation (the uniform one keeps the residual stream merged)."""
    prep, x = _prep("vit_tiny28")
    model, _ = build(prep, 1.5, "permute", progress=False, layout="blocks", allocation="even")
    norms = [m for m in model.net.modules() if isinstance(m, MergedLayerNorm)]
    assert norms and all(bool((m.share_a != m.share_b).any()) for m in norms)
    attn = model.net.blocks[0].attn
    assert isinstance(attn.qkv, BlockLayer) and attn.qkv.layout.assembly() is not None
    assert attn.num_heads * attn.head_dim * 3 == attn.qkv.out_features


@pytest.mark.parametrize("arch,width", [("vit_tiny28", 1.5), ("resnext29", 1.5),
                                        ("resnet20", 1.25)])
def test_save_load_keeps_the_structure(arch, width, tmp_path):
    """(The ViT under the even allocation: split layers around merged LayerNorms.)"""
    prep, x = _prep(arch)
    allocation = "even" if arch == "vit_tiny28" else "uniform"
    model, _ = build(prep, width, "permute", progress=False, allocation=allocation)
    if arch == "vit_tiny28":
        assert any(isinstance(m, MergedLayerNorm) for m in model.net.modules())
    path = save_merged(model, tmp_path / "m")
    desc = json.loads((path / "merged.json").read_text())
    assert desc["format"] == "pleas-merged-v2" and desc["blocks"]
    loaded = load_merged(path)
    assert layouts_of(loaded.net) == layouts_of(model.net)
    assert {type(m) for m in loaded.net.modules()} == {type(m) for m in model.net.modules()}
    assert torch.equal(_out(loaded, x), _out(model, x))
    assert stored_params(loaded) == stored_params(model)
    from safetensors.torch import load_file

    keys = set(load_file(str(path / "model.safetensors")))
    split = next(iter(desc["blocks"]))
    assert f"{split}.weight" not in keys and f"{split}.pieces.0.weight" in keys


@pytest.mark.parametrize("arch,heads_differ", [("resnet20", True), ("vit_tiny28", False)])
def test_save_load_keeps_side_by_side(arch, heads_differ, tmp_path):
    prep, x = _prep(arch, heads_differ)
    model, _ = build(prep, 2.0, "permute", progress=False)
    path = save_merged(model, tmp_path / "m")
    desc = json.loads((path / "merged.json").read_text())
    assert desc["side_by_side"] == {"members": 2,
                                    "combine": "concat" if heads_differ else "mean"}
    loaded = load_merged(path)
    assert isinstance(loaded.net, SideBySide) and loaded.net.combine == model.net.combine
    assert torch.equal(_out(loaded, x), _out(model, x))
    assert stored_params(loaded) == stored_params(model)


@pytest.mark.parametrize("edit,match", [
    (lambda d, s: d["side_by_side"].update(members=3), r"network 2 \(members.2.\*\): missing"),
    (lambda d, s: d["side_by_side"].update(combine="max"), "combine must be one of"),
    (lambda d, s: d["side_by_side"].update(members=1), "members must be an integer >= 2"),
    (lambda d, s: s.pop("members.1.fc.bias"), r"network 1 \(members.1.\*\): missing"),
    (lambda d, s: s.update({"extra.weight": torch.zeros(2)}), "belong to none of the 2"),
])
def test_a_tampered_side_by_side_folder_is_a_clear_error(edit, match, tmp_path):
    from safetensors.torch import load_file, save_file

    prep, _ = _prep("resnet20")
    model, _ = build(prep, 2.0, "permute", progress=False)
    path = save_merged(model, tmp_path / "m")
    desc = json.loads((path / "merged.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    edit(desc, state)
    (path / "merged.json").write_text(json.dumps(desc))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pleas-merged-v2"})
    with pytest.raises(MergedFileError, match=match):
        load_merged(path)


def test_a_dense_v1_folder_loads_as_the_dense_model(tmp_path):
    prep, x = _prep("resnet20")
    dense, _ = build(prep, 1.5, "permute", progress=False, blocks=False)
    path = save_merged(dense, tmp_path / "m")
    desc = json.loads((path / "merged.json").read_text())
    desc["format"] = DENSE_FORMAT
    del desc["blocks"]
    (path / "merged.json").write_text(json.dumps(desc))
    loaded = load_merged(path)
    assert not layouts_of(loaded.net)
    assert torch.equal(_out(loaded, x), _out(dense, x))
    # a pleas output of either format may be replaced (with overwrite)
    model, _ = build(prep, 1.5, "permute", progress=False)
    save_merged(model, path, overwrite=True)
    assert layouts_of(load_merged(path).net)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    prep, x = _prep("resnet20")
    model, _ = build(prep, 1.5, "permute", progress=False)
    return save_merged(model, tmp_path_factory.mktemp("blocks") / "m")


def _edit(saved, tmp_path, fn):
    folder = shutil.copytree(saved, tmp_path / "m")
    desc = json.loads((folder / "merged.json").read_text())
    fn(desc)
    (folder / "merged.json").write_text(json.dumps(desc))
    return folder


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["blocks"].update({"layer9.conv": d["blocks"]["fc"]}), "'layer9.conv' is not a"),
    (lambda d: d["blocks"].update({"layer1.0.bn1": d["blocks"]["fc"]}), "'layer1.0.bn1' is not"),
    (lambda d: d["blocks"]["fc"]["pieces"].pop(), "rows must cover"),
    (lambda d: d.update(blocks=[1]), "'blocks' must be an object"),
    (lambda d: d["blocks"]["fc"]["pieces"][0]["cols"].__setitem__(0, [0, 3]),
     "its layout asks for"),
], ids=["unknown-module", "not-a-layer", "missing-rows", "not-an-object", "piece-shape"])
def test_a_tampered_layout_is_a_clear_error(saved, tmp_path, edit, match):
    folder = _edit(saved, tmp_path, edit)
    with pytest.raises(MergedFileError, match=match) as info:
        load_merged(folder)
    assert "\n" not in str(info.value)


def test_missing_piece_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(saved, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("fc.pieces.1.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(MergedFileError, match="needs: fc.pieces.1.weight"):
        load_merged(folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("arch", ["resnet20", "vit_tiny28"])
def test_blocks_on_cuda(arch):
    prep, x = _prep(arch)
    dense, _ = build(prep, 1.5, "permute", progress=False, blocks=False)
    block, report = build(prep, 1.5, "permute", progress=False)
    want = _out(dense, x)
    got = _out(block.to("cuda"), x.to("cuda")).cpu()
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert executed_macs(block, prep.spec.input_shape) == report["macs"]["executed"]
