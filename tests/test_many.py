"""Merging K > 2 models: the exact anchors, order independence, K = 2 as before, bad input.

* width K is the K models side by side (each head reproduces its model);
* K copies of one model, each randomly permuted, merge at width 1 to that model (the K-model
  matching recovers every permutation);
* listing the same models in another order gives the same merged function, head by head;
* the K-model matching of two models is the two-model matching (same permutation);
* K = 1, a width outside [1, K], models of different architectures: one clear error.

BatchNorm recalibration is off where exactness is asserted (as in tests/test_invariants.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pleas.errors import MergeError
from pleas.matching import canonical_order, match_activations, match_many
from pleas.permute import permute_model, random_permutations
from pleas.pipeline import ModelSide, build, merge_models, prepare_models
from pleas.spec import derive_spec

from archs import MERGE_ARCHS, random_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
KW = dict(batch_size=16, max_batches=2, positions=8, progress=False)
ARCHS = ["resnet20", "grouped", "mlp"]  # residual CNN with BN, grouped convs, plain MLP
METHODS = ["pleas", "pleas_closed", "permute"]


def _data(arch: str) -> torch.Tensor:
    shape = MERGE_ARCHS[arch][1]
    return torch.randn(32, *shape[1:], generator=torch.Generator().manual_seed(7))


def _sides(models, tasks=None):
    tasks = tasks or [f"task {k}" for k in range(len(models))]
    return [ModelSide(m, f"m{k}", task=t, label_space=t)
            for k, (m, t) in enumerate(zip(models, tasks))]


def _max_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.fixture(scope="module")
def cases():
    """Per (arch, K), lazily: K different random models, their preparation, and K permuted
    copies of the first one with theirs."""
    cache = {}

    def get(arch, k):
        if (arch, k) not in cache:
            models = [random_model(arch, seed) for seed in range(1, k + 1)]
            spec = derive_spec(models[0], MERGE_ARCHS[arch][1])
            copies = [models[0]] + [
                permute_model(models[0], spec, random_permutations(spec, seed=10 + s)).eval()
                for s in range(k - 1)]
            x = _data(arch)
            cache[(arch, k)] = dict(
                models=models, x=x[:8],
                prep=prepare_models(_sides(models), x, **KW),
                copies=prepare_models(_sides(copies, ["same"] * k), x, **KW))
        return cache[(arch, k)]
    return get


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_width_k_is_the_models_side_by_side(cases, arch, k):
    c = cases(arch, k)
    for method in METHODS:
        merged, report = build(c["prep"], float(k), method, recalibrate=False, progress=False)
        assert report["width"]["executed"] == pytest.approx(k, abs=1e-9)
        assert all(g["merged"] == 0 for g in report["groups"])
        with torch.no_grad():
            y = merged(c["x"])
            assert list(y) == [f"task {i}" for i in range(k)]
            for i, model in enumerate(c["models"]):
                assert _max_diff(y[f"task {i}"], model(c["x"])) <= 1e-5, (method, i)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_permuted_copies_merge_at_width_1_to_the_model(cases, arch, k):
    c = cases(arch, k)
    for method in METHODS:
        merged, report = build(c["copies"], 1.0, method, recalibrate=False, progress=False)
        assert report["heads"] == "shared"
        assert all(g["merged"] == g["size"] for g in report["groups"])
        assert report["width"]["executed"] == pytest.approx(1.0, abs=1e-9)
        with torch.no_grad():
            assert _max_diff(merged(c["x"]), c["models"][0](c["x"])) <= 1e-5, method


@pytest.fixture(scope="module")
def both_orders(cases):
    """Three models prepared as listed and in another order, on enough data (512 images) for
    well-posed fits: on 32 images the sequential fit's ridge problems are so rank-deficient
    that float rounding of the sums (run in another order) moved outputs by 4e-3."""
    models = cases("resnet20", 3)["models"]
    x = torch.randn(512, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    kw = dict(batch_size=64, max_batches=None, positions=16, progress=False)
    order = [2, 0, 1]
    return (models, x[:8], prepare_models(_sides(models), x, **kw),
            prepare_models([_sides(models)[i] for i in order], x, **kw))


@pytest.mark.parametrize("method", ["pleas", "pleas_closed"])
def test_the_order_the_models_are_listed_in_does_not_matter(both_orders, method):
    """Same clusters, same plan, same fit: each task's head computes the same function
    (to float32 rounding: the sums run in another order; measured 3e-6) at a partial width,
    BatchNorm update included."""
    models, x, prep, other = both_orders
    first, r1 = build(prep, 1.75, method, progress=False)
    second, r2 = build(other, 1.75, method, progress=False)
    assert r1["width"] == r2["width"]
    assert sorted(g["merged"] for g in r1["groups"]) == sorted(g["merged"] for g in r2["groups"])
    assert 0 < sum(g["merged"] for g in r1["groups"]) < sum(g["size"] for g in r1["groups"])
    with torch.no_grad():
        y1, y2 = first(x), second(x)
        for task in y1:
            assert _max_diff(y2[task], y1[task]) <= 1e-4, task


def test_k_model_matching_of_two_models_is_the_two_model_matching(cases):
    a, b = random_model("resnet20", 1), random_model("resnet20", 2)
    prep = prepare_models(_sides([a, b]), _data("resnet20"), **KW)
    pair = match_activations(prep.match_stats.by_group, prep.spec)
    many = match_many(prep.match_stats.pairs, prep.spec, 2, canonical_order([a, b]))
    assert pair.keys() == many.keys()
    for name in pair:
        assert torch.equal(pair[name].perm, many[name].perm), name
        torch.testing.assert_close(pair[name].similarity, many[name].similarity, rtol=0,
                                   atol=1e-12)


def test_bad_input_is_one_clear_error(cases):
    c = cases("resnet20", 3)
    x = _data("resnet20")
    with pytest.raises(MergeError, match="at least two models"):
        merge_models([c["models"][0]], x, 1.0)
    with pytest.raises(MergeError, match=r"width must lie in \[1, 3\]"):
        build(c["prep"], 3.5, "pleas", progress=False)
    with pytest.raises(MergeError, match=r"width must lie in \[1, 3\]"):
        merge_models(c["models"], x, 0.5, progress=False)
    with pytest.raises(MergeError, match="weight matching .* two models"):
        build(c["prep"], 1.0, "pleas", matching="weight", progress=False)
    with pytest.raises(MergeError, match="regmean is written for two models"):
        build(c["prep"], 1.0, "regmean", progress=False)
    other = random_model("mlp", 3)
    with pytest.raises(MergeError, match="mismatched architectures"):
        prepare_models(_sides(c["models"][:2] + [other]), x, **KW)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pleas.merge", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


FAST = ["--batches", "2", "--batch-size", "24", "--positions", "8", "--quiet"]


def test_cli_merges_three_zoo_experts_and_reports_each(tmp_path):
    out = tmp_path / "three"
    run = _cli("resnet_a", "resnet_b", "expert_mnist", "--width", "2", *FAST,
               "--eval-limit", "100", "--out", out)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [m["source"] for m in report["models"]] == ["resnet_a", "resnet_b", "expert_mnist"]
    assert [m["task"] for m in report["models"]] == ["fashion_mnist:0-4", "fashion_mnist:5-9",
                                                     "mnist5k"]
    assert [m["head"] for m in report["models"]] == ["fashion_mnist:0-4", "fashion_mnist:5-9",
                                                     "mnist5k"]
    assert report["width"]["executed"] == pytest.approx(2.0, abs=0.03)
    for g in report["groups"]:
        assert len(g["kept"]) == 3 and g["merged"] + sum(g["kept"]) == g["new_size"]
        for m, kept in zip(report["models"], g["kept"]):
            assert m["units"][g["name"]] == g["merged"] + kept
    assert set(report["accuracy"]) == {"fashion_mnist:0-4", "fashion_mnist:5-9", "mnist5k"}
    for row in report["accuracy"].values():
        assert {"model_a", "model_b", "model_c", "ensemble", "merged"} <= set(row)
    assert "expert_mnist" in run.stdout and "model_c" in run.stdout


@pytest.mark.parametrize("args, says", [
    (["resnet_a"], "give at least two models"),
    (["resnet_a", "resnet_b", "expert_mnist", "--width", "3.5"], r"width must lie in [1, 3]"),
    (["resnet_a", "resnet_b", "expert_mnist", "--method", "ensemble", "--width", "2"],
     "is the width-3 model"),
    (["resnet_a", "resnet_b", "expert_mnist", "--method", "ties", "--base", "sb_base"],
     "merges two models with their common base"),
    (["resnet_a", "resnet_b", "vit_a", "--width", "2"], "mismatched architectures"),
])
def test_cli_refuses_bad_k_model_requests_in_one_line(tmp_path, args, says):
    run = _cli(*args, *FAST, "--no-eval", "--out", tmp_path / "o")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()


def test_three_vits_merge_past_width_1_with_their_residual_stream_merged():
    """The uniform allocation keeps the LayerNorm stream merged while the other groups can
    take the width, so K = 3 ViTs merge at 1.5x (no merged LayerNorm: none is written for
    three views) and the executed width is the plan's; the even allocation splits that stream
    and gets the clear error."""
    models = [random_model("vit_tiny28", seed) for seed in (1, 2, 3)]
    prep = prepare_models(_sides(models), _data("vit_tiny28"), **KW)
    residual = [g for g in prep.spec.hidden if g.layer_norm]
    assert len(residual) == 1
    model, report = build(prep, 1.5, "pleas_closed", progress=False)
    groups = {g["name"]: g for g in report["groups"]}
    assert groups[residual[0].name]["merged"] == residual[0].size
    assert abs(report["width"]["executed"] - 1.5) <= 0.01
    assert not any(type(m).__name__ == "MergedLayerNorm" for m in model.modules())
    with torch.no_grad():
        y = model(_data("vit_tiny28"))
    assert len(y) == 3 and all(bool(torch.isfinite(v).all()) for v in y.values())
    for width in (2.0, 2.5):  # 2.5: the heads' rounding refilled by the MLP units (2.54 before)
        report = build(prep, width, "pleas_closed", progress=False)[1]
        assert abs(report["width"]["executed"] - width) <= 0.01, width
    with pytest.raises(MergeError, match="LayerNorm over a partly merged stream"):
        build(prep, 2.5, "pleas_closed", allocation="even", progress=False)
