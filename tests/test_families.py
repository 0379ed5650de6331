"""The architecture families people bring (tests/archs.py FAMILY_ARCHS): DeiT with class and
distillation tokens, ConvNeXt (LayerNorm2d and channels-last LayerNorm, layer scale),
EfficientNet and MobileNetV3 (depthwise separable blocks, squeeze-excitation), RegNetY (SE on
grouped convs), and torchvision's ViT (nn.MultiheadAttention, replaced by pleas.vit's
SelfAttention in pleas' copy of the model).

Per architecture, in a small random-init configuration at 32 px:

* the spec is derived from the trace and its self-test passes (float64, random non-zero
  weights: outputs unchanged to 1e-9 under a random permutation of every group);
* a copy with every group randomly permuted is matched back exactly, by activation matching
  and by weight matching (the same permutations, and the permuted-back copy has A's weights);
* a partial merge at width 1.5 builds, saves, reloads and gives the same outputs.

Width 2 = both models and the permuted self-merge at width 1 = the model are checked for every
method in tests/test_invariants.py, where these architectures join MERGE_ARCHS.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pleas
from pleas.capture import run_pair
from pleas.matching import match_activations, match_weights
from pleas.permute import permute_model, random_permutations, self_test
from pleas.pipeline import ModelSide, build, prepare
from pleas.spec import UnsupportedOpError, derive_spec
from pleas.stats import MatchingStats

from archs import FAMILY_ARCHS, random_model
from test_matching import alive_copy, check_recovery, dead_units

torch.set_num_threads(1)
NAMES = list(FAMILY_ARCHS)


def _images(name: str, n: int, seed: int) -> torch.Tensor:
    shape = FAMILY_ARCHS[name][1]
    return torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_derived_and_passes_its_self_test(name):
    factory, shape, _ = FAMILY_ARCHS[name]
    torch.manual_seed(0)
    model = factory().eval()
    spec = derive_spec(model, shape)
    result = self_test(model, spec)
    assert result.passed, str(result)
    assert spec.hidden and spec.output_group is not None and spec.output_group.size == 5
    # every conv/linear weight's output axis is covered exactly once (a fused qkv: by three
    # slices, one group each)
    by_key = spec.axes_by_key()
    for k, v in model.state_dict().items():
        if k.endswith("weight") and v.ndim in (2, 4):
            rows = sorted((ax.start, ax.length) for _, ax in by_key.get(k, []) if ax.dim == 0)
            assert [s for s, _ in rows] == [sum(n for _, n in rows[:i]) for i in range(len(rows))]
            assert sum(n for _, n in rows) == v.shape[0], k
    for g in spec.hidden:
        assert g.sites, f"hidden group {g.name} has no activation site"


@pytest.mark.parametrize("name", NAMES)
def test_permuted_copy_is_matched_back_exactly(name):
    factory, shape, _ = FAMILY_ARCHS[name]
    batches = list(_images(name, 64, 1).split(16))
    torch.manual_seed(0)
    # random weights, biases centred on the data: no unit of the SE's ReLU is dead
    a = alive_copy(factory(), batches)
    spec = derive_spec(a, shape)
    perms = random_permutations(spec, seed=7)
    b = permute_model(a, spec, perms)
    stats = MatchingStats(spec)
    run_pair(a, b, batches, [stats], progress=False)
    assert sum(dead_units(stats).values()) == 0, "dead units make the test ambiguous"
    check_recovery(spec, a, b, perms, match_activations(stats.by_group, spec), batches[0])
    check_recovery(spec, a, b, perms, match_weights(a.state_dict(), b.state_dict(), spec,
                                                    seed=0), batches[0])


@pytest.mark.parametrize("name", NAMES)
def test_partial_merge_saves_reloads_and_runs(name, tmp_path):
    arch, config = FAMILY_ARCHS[name][2]
    a, b = random_model(name, 1), random_model(name, 2)
    x = _images(name, 32, 5)
    prep = prepare(ModelSide(a, "a", arch=arch, config=config), ModelSide(b, "b"), x,
                   batch_size=16, positions=8, methods=["pleas"], progress=False)
    merged, report = build(prep, 1.5, "pleas", progress=False)
    assert 1.0 < report["width"]["achieved"] <= 2.0
    assert any(0 < g["merged"] < g["size"] for g in report["groups"])  # really partial
    pleas.save_merged(merged, tmp_path / "m")
    loaded = pleas.load_merged(tmp_path / "m")
    with torch.no_grad():
        before, after = merged(x[:8]), loaded(x[:8])
    for task, logits in before.items():
        assert torch.isfinite(logits).all()
        assert torch.equal(after[task], logits), task


class _CrossAttentionNet(nn.Module):
    """Attention whose keys and values come from a second projection of the input (separate
    k/v widths: nn.MultiheadAttention keeps q, k and v projections apart): not supported."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.memory = nn.Linear(12, 8)
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        m = self.memory(x)
        y, _ = self.attn(self.embed(x), m, m, need_weights=False)
        return self.fc(y.mean(1))


def test_unsupported_attention_stops_with_an_error_naming_node_op_and_module():
    """nn.MultiheadAttention with separate q/k/v projections cannot be merged: a clear error
    at spec time (node, op and module named), not a failure deep in the merge."""
    with pytest.raises(UnsupportedOpError) as err:
        derive_spec(_CrossAttentionNet(), (2, 4, 12))
    assert "MultiheadAttention" in err.value.op
    assert err.value.module == "attn"
    assert err.value.node in str(err.value)
    assert "separate q, k and v projections" in str(err.value)


def test_torchvision_vit_model_is_left_untouched_and_its_attention_replaced_exactly():
    """pleas swaps nn.MultiheadAttention for its SelfAttention in its own copy of the model
    (the same tensors, renamed keys mapped back, the same outputs); the user's model keeps its
    modules, and a spec derived from it names its own keys."""
    from pleas.registry import original_key_map, replaced
    from pleas.vit import SelfAttention

    torch.manual_seed(0)
    model = FAMILY_ARCHS["torchvision:VisionTransformer"][0]().eval()
    copy = replaced(model)
    assert copy is not model
    assert all(not isinstance(m, SelfAttention) for m in model.modules())
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 2
    assert sum(isinstance(m, SelfAttention) for m in copy.modules()) == 2
    names = original_key_map(copy)
    assert [names.get(k, k) for k in copy.state_dict()] == list(model.state_dict())
    for k, v in copy.state_dict().items():
        assert torch.equal(v, model.state_dict()[names.get(k, k)]), k
    spec_keys = {ax.key for g in derive_spec(model, (2, 3, 32, 32)).groups for ax in g.axes}
    assert spec_keys <= set(model.state_dict())
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in spec_keys
    x = _images("torchvision:VisionTransformer", 4, 3)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=0, atol=1e-6)
        # need_weights=True: the head-averaged attention weights, as nn.MultiheadAttention's
        tokens = torch.randn(2, 17, 32)
        mha = model.encoder.layers[0].self_attention
        out, w = mha(tokens, tokens, tokens)
        out2, w2 = copy.encoder.layers[0].self_attention(tokens, tokens, tokens)
        torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
        torch.testing.assert_close(w2, w, rtol=0, atol=1e-6)
