"""Vision Transformers: attention-aware spec, exact matching, exact merge anchors."""
import pytest
import torch

import pleas
from pleas.capture import run_pair
from pleas.matching import match_activations, match_weights
from pleas.models import build_model
from pleas.permute import permute_model, random_permutations, self_test
from pleas.pipeline import ModelSide, build, prepare
from pleas.spec import derive_spec

torch.set_num_threads(1)

CONFIGS = [dict(depth=1), dict(depth=2), dict(depth=4, class_token=False),
           dict(depth=3, embed_dim=64, num_heads=4)]


def vit(seed: int, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("vit_tiny28", num_classes=5, **cfg).eval()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_spec_self_test_and_head_groups(cfg):
    model = vit(0, **cfg)
    spec = derive_spec(model, (2, 1, 28, 28))
    assert self_test(model, spec).passed
    heads = [g for g in spec.hidden if g.head_dim]
    depth = cfg["depth"]
    n_heads = cfg.get("num_heads", 3)
    assert len(heads) == 2 * depth  # q/k and v/proj per block
    assert all(g.num_heads == n_heads and g.tie for g in heads)
    mlp = [g for g in spec.hidden if g.name.endswith("mlp.fc1")]
    assert len(mlp) == depth
    # one residual-stream group holding the patch embedding, the norms and the head input
    stream = [g for g in spec.hidden if any(a.key == "patch_embed.proj.weight" for a in g.axes)]
    assert len(stream) == 1
    keys = {a.key for a in stream[0].axes}
    assert {"head.weight", "pos_embed"} <= keys
    assert "norm.weight" in keys or "fc_norm.weight" in keys  # avg pooling uses fc_norm
    assert ("cls_token" in keys) == cfg.get("class_token", True)


def test_wrong_spec_fails_self_test():
    import dataclasses
    model = vit(0, depth=2)
    spec = derive_spec(model, (2, 1, 28, 28))
    broken = [dataclasses.replace(g, axes=g.axes[:-1]) if g.head_dim and g.tie != g.name else g
              for g in spec.groups]
    assert not self_test(model, pleas.PermSpec(broken, spec.layers, [], spec.input_shape)).passed


@pytest.mark.parametrize("cfg", CONFIGS[1:3])
def test_permuted_vit_matched_back_exactly(cfg):
    a = vit(0, **cfg)
    spec = derive_spec(a, (2, 1, 28, 28))
    perms = random_permutations(spec, seed=5)  # residual stream, MLP units, whole heads + within
    b = permute_model(a, spec, perms)
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    stats = pleas.stats.MatchingStats(spec)
    run_pair(a, b, [x[:64], x[64:]], [stats], progress=False)
    for matching in (match_activations(stats.by_group, spec),
                     match_weights(a.state_dict(), b.state_dict(), spec)):
        for g in spec.hidden:
            # B unit matched to A unit i is the unit A's i was moved to
            assert torch.equal(matching[g.name].perm, torch.argsort(perms[g.name])), g.name
        back = permute_model(b, spec, {n: m.perm for n, m in matching.items()})
        with torch.no_grad():
            assert torch.allclose(back(x), a(x), atol=1e-5)


def test_partial_vit_merge_keeps_whole_heads_and_round_trips(tmp_path):
    a, b = vit(0, depth=2), vit(1, depth=2)
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    prep = prepare(ModelSide(a, "a", arch="vit_tiny28", config={"num_classes": 5, "depth": 2}),
                   ModelSide(b, "b"), x, batch_size=48, progress=False)
    merged, report = build(prep, 1.5, "pleas", progress=False)
    assert abs(report["width"]["achieved"] - 1.5) <= 0.015  # whole heads: measured 1.5128
    by_name = {g["name"]: g for g in report["groups"]}
    for g in prep.spec.hidden:
        if g.head_dim:
            assert by_name[g.name]["merged"] % g.head_dim == 0
            if g.tie != g.name:
                assert by_name[g.name]["merged"] == by_name[g.tie]["merged"]
    attn = merged.net.blocks[0].attn
    assert attn.num_heads * attn.head_dim * 3 == attn.qkv.out_features
    pleas.save_merged(merged, tmp_path / "m")
    loaded = pleas.load_merged(tmp_path / "m")
    with torch.no_grad():
        for task, logits in merged(x[:8]).items():
            assert torch.equal(loaded(x[:8])[task], logits)
