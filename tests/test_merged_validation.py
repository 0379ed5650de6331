"""load_merged checks what it loads: every tampering of a saved folder is one clear ValueError.

A small ResNet-20 (BatchNorm, convs, a linear head) with two heads is saved once; each test
edits a copy of the folder (merged.json or a tensor) and expects load_merged to raise a
:class:`pleas.merged.MergedFileError` (a ValueError) whose single line names the file and the
problem.  Untampered folders, including legitimately widened models and a real PLeaS merge
of two ViTs (merged LayerNorms add share tensors), still load and give identical outputs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pleas
from pleas.merged import FORMAT, Head, MergedFileError, MergedModel, load_merged, save_merged
from pleas.models import MLP, ResNet20, build_model

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def outputs(model: MergedModel) -> torch.Tensor:
    with torch.no_grad():
        y = model.eval()(X)
    return torch.cat(list(y.values()), -1) if isinstance(y, dict) else y


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10)
    net.eval()
    model = MergedModel(net, [Head("digits", 0, 4), Head("fashion", 4, 10)],
                        {"arch": "resnet20", "config": {"num_classes": 10}})
    return save_merged(model, tmp_path_factory.mktemp("saved") / "m")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    """A fresh copy of the saved folder to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "m"))


def edit_json(folder: Path, **changes) -> None:
    desc = json.loads((folder / "merged.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            desc.pop(key)
        else:
            desc[key] = value
    (folder / "merged.json").write_text(json.dumps(desc))


def edit_state(folder: Path, fn) -> None:
    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})


_DROP = object()


def rejected(folder: Path, match: str, file: str) -> None:
    with pytest.raises(MergedFileError, match=match) as info:
        load_merged(folder)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg and msg.startswith(str(folder / file)), msg


# ----------------------------------------------------------------------------- round trips


def test_untampered_folder_loads_with_identical_outputs(saved):
    torch.manual_seed(0)
    original = build_model("resnet20", num_classes=10).eval()
    loaded = load_merged(saved)
    assert [h.task for h in loaded.heads] == ["digits", "fashion"]
    with torch.no_grad():
        assert torch.equal(outputs(loaded), original(X))


@pytest.mark.parametrize("arch,wide,config", [
    ("mlp", lambda: MLP(hidden=(300, 160)), {}),
    ("resnet20", lambda: ResNet20(width=2), {}),
], ids=["mlp", "resnet20"])
def test_widened_models_load(tmp_path, arch, wide, config):
    """Widths differ from the architecture's legitimately: only ranks and fit are checked."""
    torch.manual_seed(1)
    net = wide().eval()
    path = save_merged(MergedModel(net, None, {"arch": arch, "config": config}), tmp_path / "m")
    loaded = load_merged(path)
    with torch.no_grad():
        assert torch.equal(outputs(loaded), net(X))


def test_a_real_vit_merge_round_trips(tmp_path):
    from pleas.pipeline import ModelSide

    def side(seed: int, name: str):
        torch.manual_seed(seed)
        cfg = {"depth": 1, "num_classes": 5}
        return ModelSide(build_model("vit_tiny28", **cfg).eval(), name, arch="vit_tiny28",
                         config=cfg)
    data = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    # the even allocation splits the residual stream: merged LayerNorms, whose shares must
    # round-trip (the uniform one keeps that stream merged at 1.5)
    merged = pleas.merge(side(0, "a"), side(1, "b"), data, width=1.5, batch_size=32,
                         heads="separate", allocation="even", progress=False).model
    assert any(k.endswith("share_a") for k in merged.net.state_dict())
    loaded = load_merged(save_merged(merged, tmp_path / "m"))
    assert torch.equal(outputs(loaded), outputs(merged))


# ----------------------------------------------------------------------------- merged.json


def test_missing_format_is_rejected(folder):
    edit_json(folder, format=_DROP)
    rejected(folder, f"no format field; expected format '{FORMAT}'", "merged.json")


def test_unknown_format_is_rejected(folder):
    edit_json(folder, format="pleas-merged-v0")
    rejected(folder, f"format 'pleas-merged-v0'; expected format '{FORMAT}'", "merged.json")


def test_not_an_object_is_rejected(folder):
    (folder / "merged.json").write_text("[1, 2]")
    rejected(folder, "expected a JSON object", "merged.json")


def test_unknown_architecture_is_rejected(folder):
    edit_json(folder, arch="resnet9000")
    rejected(folder, "cannot build architecture 'resnet9000'", "merged.json")


def heads(*spans, names=None):
    names = names or [f"t{i}" for i in range(len(spans))]
    return [{"task": n, "start": a, "stop": b, "classes": None} for n, (a, b) in zip(names, spans)]


@pytest.mark.parametrize("bad,match", [
    (heads((0, 6), (5, 10)), r"heads 't0' \[0, 6\) and 't1' \[5, 10\) overlap"),
    (heads((5, 10), (0, 6)), r"heads 't1' \[0, 6\) and 't0' \[5, 10\) overlap"),
    (heads((0, 4), (4, 11)), r"head 't1' reads outputs \[4, 11\) but the network has 10 "
                             "outputs"),
    (heads((0, 4), (4, 10), names=["same", "same"]), "two heads have the task name 'same'"),
    (heads((0, 4), (4, 4)), r"needs 0 <= start < stop, found start 4, stop 4"),
    (heads((6, 3)), r"needs 0 <= start < stop, found start 6, stop 3"),
    (heads((-1, 4)), r"needs 0 <= start < stop, found start -1"),
    ([{"task": "t", "start": "0", "stop": 4}], "start and stop must be integers"),
    ([{"task": "t", "start": False, "stop": 4}], "start and stop must be integers"),
    ([{"task": "", "start": 0, "stop": 4}], "no task name"),
    ([{"task": "t", "start": 0, "stop": 4, "extra": 1}], "must be an object with task"),
    ([{"task": "t", "start": 0, "stop": 2, "classes": ["x"]}], "1 class names for 2 outputs"),
    ([], "must be null or a non-empty list"),
    ({"task": "t"}, "must be null or a non-empty list"),
], ids=["overlap", "overlap-unsorted", "out-of-range", "duplicate", "empty-span",
        "stop-before-start", "negative", "string-int", "bool-int", "no-name", "extra-key",
        "class-count", "empty-list", "not-a-list"])
def test_bad_heads_are_rejected(folder, bad, match):
    edit_json(folder, heads=bad)
    rejected(folder, match, "merged.json")


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_tensor_is_rejected(folder, value):
    def poison(state):
        state["layer2.0.conv1.weight"][0, 0, 0, 0] = value
    edit_state(folder, poison)
    rejected(folder, r"tensor layer2.0.conv1.weight has 1 non-finite value", "model.safetensors")


def test_wrong_rank_tensor_is_rejected(folder):
    edit_state(folder, lambda s: s.update({"fc.weight": s["fc.weight"][None]}))
    rejected(folder, r"tensor fc.weight has shape \(1, 10, 64\), rank 3; the architecture's is "
                     r"\(10, 64\), rank 2", "model.safetensors")


def test_missing_tensor_is_rejected(folder):
    edit_state(folder, lambda s: s.pop("layer3.2.bn2.running_mean"))
    rejected(folder, "missing tensors the architecture needs: layer3.2.bn2.running_mean",
             "model.safetensors")


def test_extra_tensor_is_rejected(folder):
    edit_state(folder, lambda s: s.update({"fc.scale": torch.ones(10),
                                           "layer9.weight": torch.ones(3)}))
    rejected(folder, "tensors the architecture does not have: fc.scale, layer9.weight",
             "model.safetensors")


def test_a_lone_layernorm_share_is_rejected(tmp_path):
    torch.manual_seed(0)
    net = build_model("vit_tiny28", depth=1, num_classes=5)
    path = save_merged(MergedModel(net, None, {"arch": "vit_tiny28",
                                               "config": {"depth": 1, "num_classes": 5}}),
                       tmp_path / "m")
    edit_state(path, lambda s: s.update({"blocks.0.norm1.share_a": torch.ones(96)}))
    rejected(path, "blocks.0.norm1.share_a needs its pair blocks.0.norm1.share_b",
             "model.safetensors")


def test_negative_running_var_is_rejected(folder):
    def negate(state):
        state["layer1.1.bn2.running_var"][3] = -0.5
    edit_state(folder, negate)
    rejected(folder, r"layer1.1.bn2.running_var \(a BatchNorm running variance\) has a negative "
                     "value -0.5", "model.safetensors")


def test_batchnorm_vectors_of_different_lengths_are_rejected(folder):
    edit_state(folder, lambda s: s.update({"bn1.bias": torch.zeros(17)}))
    rejected(folder, r"tensor bn1.bias has shape \(17,\) but its module's other tensors have 16 "
                     "units", "model.safetensors")


def test_a_bias_longer_than_the_weight_rows_is_rejected(folder):
    edit_state(folder, lambda s: s.update({"fc.bias": torch.zeros(12)}))
    rejected(folder, r"tensor fc.bias has shape \(12,\) but its module's other tensors have 10",
             "model.safetensors")


def test_a_changed_kernel_is_rejected(folder):
    edit_state(folder, lambda s: s.update({"conv1.weight": torch.zeros(16, 1, 5, 5)}))
    rejected(folder, r"conv1.weight has shape \(16, 1, 5, 5\): its kernel differs",
             "model.safetensors")


@pytest.mark.parametrize("shared", [False, True], ids=["separate-heads", "shared-head"])
def test_layers_that_do_not_fit_each_other_are_rejected(folder, shared):
    """Each module is self-consistent, but conv1 now makes 20 channels for a 16-channel BN."""
    if shared:
        edit_json(folder, heads=None)
    edit_state(folder, lambda s: s.update({"conv1.weight": torch.zeros(20, 1, 3, 3)}))
    rejected(folder, r"the widened layers do not fit each other: a \(1, 1, 28, 28\) input fails",
             "model.safetensors")


def test_build_module_failures_become_a_merged_file_error(folder, monkeypatch):
    import pleas.widen

    def broken(template, state):
        raise RuntimeError("size mismatch for fc.weight:\n copying a param of shape (3, 3)")
    monkeypatch.setattr(pleas.widen, "build_module", broken)
    rejected(folder, r"do not fit architecture 'resnet20' \(RuntimeError: size mismatch for "
                     r"fc.weight: copying", "model.safetensors")


def test_grouped_conv_with_a_broken_group_size_is_rejected(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnext29", num_classes=4)
    path = save_merged(MergedModel(net, None, {"arch": "resnext29",
                                               "config": {"num_classes": 4}}), tmp_path / "m")
    # groups of 8 output channels reading 8 inputs: 36 rows are not whole groups
    edit_state(path, lambda s: s.update({"layer1.0.conv2.weight": torch.zeros(36, 8, 3, 3)}))
    rejected(path, r"layer1.0.conv2.weight has shape \(36, 8, 3, 3\): not groups of 8 output",
             "model.safetensors")
