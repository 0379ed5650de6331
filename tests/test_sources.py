"""A user's own models and images: hub folders, hub names, plain state dicts; their
preprocessing; streamed image folders; ``--eval-data``.

The models are random-init timm / torchvision models written with the libraries' own savers
(``timm.models.save_for_hf``, ``torch.save``, ``safetensors.torch.save_file``), merged through
the command line; the preprocessing used is checked to be the model's own by recomputing an
accuracy with timm's transform pipeline, independently of pleas.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from own_models import CLASSES, TINY, rgb_folder, save_hub, tiny_timm
from pleas import zoo
from pleas.checkpoint import CheckpointError
from pleas.cli_merge import main
from pleas.merged import load_merged
from pleas.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, from_torchvision
from pleas.stream import open_images

torch.set_num_threads(1)
FAST = ["--batches", "1", "--batch-size", "24", "--positions", "8", "--quiet"]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Two tiny timm models in hub folders (ImageNet mean/std, 48 px, class names) and a
    3-class RGB folder of 40x48 images (a few saved gray)."""
    t = tmp_path_factory.mktemp("own")
    for seed, name in ((1, "a"), (2, "b")):
        save_hub(tiny_timm(seed), t / name, label_names=CLASSES)
    rgb_folder(t / "imgs", gray_every=3)
    return t


def independent_accuracy(model, folder: Path, pretrained_cfg: dict) -> float:
    """Model accuracy with timm's own eval transform of ``pretrained_cfg`` (not pleas')."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
    tf = create_transform(**cfg)
    correct = total = 0
    for label, c in enumerate(sorted(os.listdir(folder))):
        for f in sorted((folder / c).iterdir()):
            x = tf(Image.open(f).convert("RGB"))[None]
            correct += int(model(x).argmax(1).item() == label)
            total += 1
    return 100.0 * correct / total


def test_hub_folder_resolves_with_its_preprocessing(own):
    model, info = zoo.resolve(own / "a")
    assert info.arch == "timm:resnet10t"
    assert info.config["num_classes"] == 3 and info.config["channels"] == TINY["channels"]
    assert info.classes == tuple(CLASSES)
    p = info.preprocess
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD  # exactly timm's ImageNet values
    assert p.input_size == (3, 48, 48) and p.interpolation == "bicubic"
    assert p.crop_pct == 0.875 and p.crop_mode == "center"
    ref = tiny_timm(1)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_cli_merges_two_hub_folders_and_evaluates_on_a_folder(own, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main([str(own / "a"), str(own / "b"), "--data", str(own / "imgs"), "--eval-data",
               str(own / "imgs"), "--heads", "shared", "--out", str(out), "--workers", "2",
               *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    desc = json.loads((out / "merged.json").read_text())
    for prep in (report["preprocess"], desc["preprocess"]):
        assert prep["mean"] == list(IMAGENET_MEAN) and prep["std"] == list(IMAGENET_STD)
        assert prep["input_size"] == [3, 48, 48] and prep["interpolation"] == "bicubic"
    assert report["merge_data"]["images"] == 24
    row = report["accuracy"]["imgs"]
    cfg = json.loads((own / "a" / "config.json").read_text())["pretrained_cfg"]
    model_a, _ = zoo.resolve(own / "a")
    with torch.no_grad():
        assert row["model_a"] == round(independent_accuracy(model_a, own / "imgs", cfg), 2)
    merged = load_merged(out)
    assert merged.preprocess == Preprocess.from_dict(desc["preprocess"])
    assert merged.preprocess.mean == IMAGENET_MEAN
    assert "imgs" in captured.out  # the accuracy table names the folder


def fake_hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    return root


def test_hub_names_resolve_offline_from_the_cache(own, tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "timm/tiny_a", own / "a")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ref, _ = zoo.resolve(own / "a")
    for name in ("timm/tiny_a", "hf-hub:timm/tiny_a"):
        model, info = zoo.resolve(name)
        assert info.name == name and info.preprocess.mean == IMAGENET_MEAN
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*hf download "
                                              r"timm/elsewhere"):
        zoo.resolve("timm/elsewhere")


def test_plain_timm_state_dicts_infer_classes_and_channels(tmp_path):
    gray = tiny_timm(3, num_classes=7, in_chans=1)
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    from safetensors.torch import save_file
    save_file(gray.state_dict(), str(tmp_path / "gray.safetensors"))
    for file in ("gray.pth", "gray.safetensors"):
        model, info = zoo.resolve(tmp_path / file, arch="timm:resnet10t", arch_config=TINY)
        assert info.config["num_classes"] == 7 and info.config["in_chans"] == 1
        assert info.preprocess.channels == 1
        assert info.preprocess.mean == (sum(IMAGENET_MEAN) / 3,)  # timm's gray rule
        x = torch.randn(2, 1, 32, 32)
        assert torch.equal(model(x), gray(x))
    with pytest.raises(CheckpointError, match=r"does not match architecture 'timm:resnet10t'"
                                              r".*unexpected keys: layer1.0.downsample.*"
                                              r"inferred from the weights"):
        zoo.resolve(tmp_path / "gray.pth", arch="timm:resnet10t")  # widths not given


def test_a_pickle_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        zoo.resolve(tmp_path / "evil.pt", arch="timm:resnet10t")
    assert not (tmp_path / "pwned").exists()


def test_torchvision_state_dict_with_its_weights_transforms(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    model, info = zoo.resolve(tmp_path / "pytorch_model.bin", arch="torchvision:resnet18")
    assert info.config == {"num_classes": 3}
    p = info.preprocess
    assert p.input_size == (3, 224, 224) and p.mean == IMAGENET_MEAN
    assert p.std == IMAGENET_STD and p.crop_pct == 224 / 256 and p.interpolation == "bilinear"
    assert p == from_torchvision("resnet18")
    with pytest.raises(CheckpointError, match=r"fc.weight \(expected \(5, 512\), got "
                                              r"\(3, 512\)\)"):
        zoo.resolve(tmp_path / "pytorch_model.bin", arch="torchvision:resnet18",
                    arch_config={"num_classes": 5})  # given, not inferred: the file disagrees


@pytest.mark.slow
def test_cli_merges_two_torchvision_state_dicts(tmp_path, capsys):
    import torchvision
    from safetensors.torch import save_file

    for seed, name in ((1, "a.pt"), (2, "b.safetensors")):
        torch.manual_seed(seed)
        sd = torchvision.models.resnet18(num_classes=3).state_dict()
        torch.save(sd, tmp_path / name) if name.endswith(".pt") else save_file(
            sd, str(tmp_path / name))
    rgb_folder(tmp_path / "imgs", per_class=4)
    out = tmp_path / "m"
    rc = main([str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"), "--arch",
               "torchvision:resnet18", "--method", "permute", "--data", str(tmp_path / "imgs"),
               "--eval-data", str(tmp_path / "imgs"), "--out", str(out), "--workers", "0",
               "--batches", "1", "--batch-size", "12", "--positions", "4", "--quiet",
               "--width", "1"])
    assert rc == 0, capsys.readouterr().err
    desc = json.loads((out / "merged.json").read_text())
    assert desc["preprocess"]["input_size"] == [3, 224, 224]
    assert desc["preprocess"]["crop_pct"] == 224 / 256
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"imgs [a]", "imgs [b]"}  # separate heads, both fit


def test_stream_decodes_lazily_at_the_models_resolution(tmp_path, monkeypatch):
    import pleas.stream as stream_mod

    rgb_folder(tmp_path / "imgs", per_class=10, size=(64, 50), gray_every=4)
    opened = []
    real = stream_mod._open_image
    monkeypatch.setattr(stream_mod, "_open_image", lambda s, n: opened.append(n) or real(s, n))
    prep = Preprocess((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875, "center")
    s = open_images(tmp_path / "imgs", prep, workers=0)
    assert len(s) == 30 and s.classes == CLASSES and opened == []  # listing decodes nothing
    batches = iter(s.loader(4))
    x, y = next(batches)
    assert x.shape == (4, 3, 32, 32) and len(opened) == 4
    assert y.tolist() == [0, 0, 0, 0]
    sub = s.subset(9, seed=5)
    assert sorted(np.bincount(sub.labels.numpy()).tolist()) == [3, 3, 3]
    first = torch.cat([b for b, _ in sub.loader(4)])
    again = torch.cat([b for b, _ in sub.loader(4)])
    assert torch.equal(first, again)  # re-iterable and deterministic
    # the values are timm's transform of the same file, exactly
    from timm.data import create_transform
    tf = create_transform(input_size=(3, 32, 32), interpolation="bicubic", mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, crop_pct=0.875, crop_mode="center")
    f = sorted((tmp_path / "imgs" / "cat").iterdir())[1]
    assert torch.equal(x[1], tf(Image.open(f).convert("RGB")))


def test_stream_reads_parquet_saved_and_imagefolder_datasets(tmp_path):
    import datasets

    rgb_folder(tmp_path / "imgs", per_class=3)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    labels = [f.parent.name for f in files]
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": labels}
                                    ).cast_column("image", datasets.Image())
    ds = ds.map(lambda r: r)  # embed nothing: paths are fine for save_to_disk
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "split" / "train").mkdir(parents=True)
    rgb_folder(tmp_path / "split" / "train", per_class=2)
    (tmp_path / "split" / "test").mkdir()
    rgb_folder(tmp_path / "split" / "test", per_class=1, seed=3)
    meta = tmp_path / "meta"
    rgb_folder(meta, classes=["x"], per_class=4)
    (meta / "x" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "label": ["p", "q"][i % 2]}) + "\n"
        for i in range(4)))
    prep = Preprocess((3, 24, 24), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1.0, "squash")
    for path, n, classes in ((tmp_path / "d.parquet", 9, CLASSES),
                             (tmp_path / "saved", 9, CLASSES),
                             (tmp_path / "split", 3, CLASSES),  # test split asked for
                             (meta / "x", 4, ["p", "q"])):
        s = open_images(path, prep, split="test", workers=0)
        assert len(s) == n and s.classes == classes, path
        x, y = next(iter(s.loader(8)))
        assert x.shape[1:] == (3, 24, 24) and x.dtype == torch.float32
