"""pleas.checkpoint and pleas.zoo: the committed checkpoints, and every way loading can fail."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pleas import zoo
from pleas.checkpoint import (CheckpointError, CheckpointNotFound, count_params, file_sha256,
                              load_checkpoint, read_metadata, save_checkpoint)
from pleas.data import load_task
from pleas.models import build_model

pytestmark = pytest.mark.zoo

# name -> (arch, task, label space, seed, base, accuracy floor in percent)
EXPECTED = {
    "resnet_a": ("resnet20", "fashion_mnist:0-4", "fashion_mnist:0-4", 1, None, 90.0),
    "resnet_b": ("resnet20", "fashion_mnist:5-9", "fashion_mnist:5-9", 2, None, 95.0),
    "vit_a": ("vit_tiny28", "fashion_mnist:0-4", "fashion_mnist:0-4", 1, None, 85.0),
    "vit_b": ("vit_tiny28", "fashion_mnist:5-9", "fashion_mnist:5-9", 2, None, 93.0),
    "digits_base1": ("resnet20", "fashion_mnist", "fashion_mnist", 3, None, 85.0),
    "digits_base2": ("resnet20", "fashion_mnist", "fashion_mnist", 4, None, 85.0),
    "digits_a": ("resnet20", "mnist5k", "digits", 5, "digits_base1", 95.0),
    "digits_b": ("resnet20", "sklearn_digits", "digits", 6, "digits_base2", 93.0),
    "resnext_a": ("resnext29", "fashion_mnist:0-4", "fashion_mnist:0-4", 21, None, 90.0),
    "resnext_b": ("resnext29", "fashion_mnist:5-9", "fashion_mnist:5-9", 22, None, 95.0),
}
RESNET5 = {"num_classes": 5, "width": 1, "in_chans": 1}
ZOO = zoo.names()  # every committed checkpoint, including entries added after EXPECTED


@torch.inference_mode()
def accuracy(model, ds, batch_size=200):  # small batches stay in cache: fastest on CPU
    correct = 0
    for i in range(0, len(ds), batch_size):
        out = model(ds.images[i:i + batch_size])
        correct += int((out.argmax(1) == ds.labels[i:i + batch_size]).sum())
    return 100.0 * correct / len(ds)


# ---------------------------------------------------------------------------------------------
# the committed zoo
# ---------------------------------------------------------------------------------------------

def test_manifest_lists_the_zoo():
    assert set(EXPECTED) <= set(ZOO)
    manifest = json.loads(zoo.manifest_path().read_text())
    fields = {"file", "arch", "config", "task", "label_space", "classes", "seed", "base",
              "test_accuracy", "sha256", "params"}
    for name, entry in manifest["models"].items():
        assert fields <= set(entry), name
        assert (zoo.zoo_dir() / entry["file"]).is_file()
        assert entry["base"] is None or entry["base"] in manifest["models"], name
        if name not in EXPECTED:
            continue
        arch, task, space, seed, base, floor = EXPECTED[name]
        assert (entry["arch"], entry["task"], entry["label_space"], entry["seed"],
                entry["base"]) == (arch, task, space, seed, base)
        assert entry["test_accuracy"] >= floor, name
    # each pair starts from different bases (different seeds, or different base models)
    models = manifest["models"]
    assert models["resnet_a"]["seed"] != models["resnet_b"]["seed"]
    assert models["vit_a"]["seed"] != models["vit_b"]["seed"]
    assert models["resnext_a"]["seed"] != models["resnext_b"]["seed"]
    assert models["digits_a"]["base"] != models["digits_b"]["base"]
    assert models["digits_a"]["classes"] == models["digits_b"]["classes"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_loads_and_scores_its_accuracy(name):
    model, info = zoo.load(name)
    assert not model.training
    assert info.name == name and info.path.is_file()
    assert file_sha256(info.path) == info.sha256
    assert info.params == count_params(model)
    test = load_task(info.task, "test")
    assert list(info.classes) == test.classes
    acc = accuracy(model, test)
    assert abs(acc - info.test_accuracy) <= 0.5, (name, acc, info.test_accuracy)


def test_zoo_metadata_matches_manifest():
    meta = read_metadata(zoo.info("digits_a").path)
    assert meta["arch"] == "resnet20" and meta["config"] == {"num_classes": 10, "width": 1,
                                                               "in_chans": 1}
    assert meta["base"] == "digits_base1" and meta["label_space"] == "digits"
    _, info = zoo.resolve(str(zoo.info("vit_b").path))
    assert (info.arch, info.task, info.label_space, info.base) == (
        "vit_tiny28", "fashion_mnist:5-9", "fashion_mnist:5-9", None)
    assert info.classes == zoo.info("vit_b").classes


def test_unknown_zoo_name_lists_the_builtins():
    with pytest.raises(CheckpointError, match="resnet_a.*vit_b|digits_a.*resnet_a"):
        zoo.load("resnet_c")
    with pytest.raises(CheckpointError, match="neither a built-in model"):
        zoo.resolve("resnet_c")


def test_sha256_mismatch_is_detected(tmp_path, monkeypatch):
    src = zoo.zoo_dir()
    shutil.copy(src / "manifest.json", tmp_path / "manifest.json")
    shutil.copy(src / "resnet_a.safetensors", tmp_path / "resnet_a.safetensors")
    monkeypatch.setenv("PLEAS_ZOO_DIR", str(tmp_path))
    zoo.load("resnet_a")  # an intact copy loads
    blob = bytearray((tmp_path / "resnet_a.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # flip one weight byte
    (tmp_path / "resnet_a.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load("resnet_a")
    (tmp_path / "resnet_a.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        zoo.load("resnet_a")


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------

def _trained_like(arch="resnet20", config=RESNET5, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, **config)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so buffers matter too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch,config", [("resnet20", RESNET5),
                                         ("vit_tiny28", {"num_classes": 5}),
                                         ("mlp", {"num_classes": 3, "hidden": [32]})])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, arch, config):
    model = _trained_like(arch, config)
    path = save_checkpoint(model, tmp_path / "m.safetensors", arch, config,
                           extra_metadata={"task": "mnist5k", "seed": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files left
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    meta = read_metadata(path)
    assert meta["arch"] == arch and meta["config"] == json.loads(json.dumps(config))
    assert meta["task"] == "mnist5k" and meta["seed"] == 7
    # the same weights give the same bytes: checkpoint hashes are reproducible
    again = save_checkpoint(model, tmp_path / "again.safetensors", arch, config,
                            extra_metadata={"task": "mnist5k", "seed": 7})
    assert file_sha256(again) == file_sha256(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFound, match="not found") as err:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, CheckpointError)


def test_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(garbage)
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors", "resnet20", RESNET5)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(truncated)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"nonsense")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad_pt, "resnet20", RESNET5)


def test_unknown_and_wrong_architecture(tmp_path):
    path = save_checkpoint(_trained_like(), tmp_path / "r.safetensors", "resnet20", RESNET5)
    with pytest.raises(CheckpointError, match="cannot build architecture 'resnet99'"):
        load_checkpoint(path, arch="resnet99")
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: .*bn1"):
        load_checkpoint(path, arch="vit_tiny28", config={"num_classes": 5})


def test_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    state = _trained_like().state_dict()
    meta = {"arch": "resnet20", "config": json.dumps(RESNET5)}
    less = {k: v for k, v in state.items() if k != "layer2.1.conv1.weight"}
    save_file(less, str(tmp_path / "less.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"1 missing keys: layer2\.1\.conv1\.weight"):
        load_checkpoint(tmp_path / "less.safetensors")
    more = dict(state, **{"head.extra": torch.zeros(3)})
    save_file(more, str(tmp_path / "more.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: head\.extra"):
        load_checkpoint(tmp_path / "more.safetensors")


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = save_checkpoint(_trained_like(), tmp_path / "r.safetensors", "resnet20", RESNET5)
    with pytest.raises(CheckpointError, match=r"fc\.weight \(expected \(10, 64\), got \(5, 64\)\)"):
        load_checkpoint(path, config={"num_classes": 10, "width": 1, "in_chans": 1})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tmp_path, bad):
    model = _trained_like()
    with torch.no_grad():
        model.layer3[2].conv2.weight[0, 0, 0, 0] = bad
    path = save_checkpoint(model, tmp_path / "nan.safetensors", "resnet20", RESNET5)
    with pytest.raises(CheckpointError, match=r"non-finite.*layer3\.2\.conv2\.weight"):
        load_checkpoint(path)


def test_pt_checkpoints(tmp_path):
    model = _trained_like(seed=3)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    # a bare state dict: arch and config must be given
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="pass arch="):
        load_checkpoint(tmp_path / "plain.pt")
    # a wrapping dict that names its architecture, saved from DataParallel ("module." prefix)
    wrapped = {"arch": "resnet20", "config": RESNET5,
               "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "model_key.pt")
    for loaded in (load_checkpoint(tmp_path / "plain.pt", "resnet20", RESNET5),
                   load_checkpoint(tmp_path / "wrapped.pth"),
                   load_checkpoint(tmp_path / "model_key.pt", "resnet20", RESNET5)):
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint(tmp_path / "nostate.pt", "resnet20", RESNET5)


def test_resolve_a_path_without_zoo_metadata(tmp_path):
    model = _trained_like()
    path = save_checkpoint(model, tmp_path / "mine.safetensors", "resnet20", RESNET5)
    loaded, info = zoo.resolve(path)
    assert info.name == "mine" and info.arch == "resnet20" and info.task is None
    assert info.label_space is None and info.classes is None
    assert info.params == count_params(model) and info.sha256 == file_sha256(path)
    with pytest.raises(CheckpointError, match="neither a built-in model"):
        zoo.resolve(tmp_path / "missing.safetensors")
