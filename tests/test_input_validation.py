"""Every user mistake in data or checkpoints is ONE clear error naming the problem.

Each test builds the bad input for real (a PNG written by PIL, a dataset saved with
``datasets``, a safetensors file) and asserts the exception type and a distinctive part of the
message; the expected pixel values are computed by hand from ``(v / 255 - 0.5) / 0.5``.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pleas import data
from pleas.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pleas.data import (DataError, ImageSet, ImageTooLargeError, check_finite_images,
                        load_images)
from pleas.models import build_model


def _norm(v: float) -> float:
    """A pixel value in 0..255 as the library normalises it."""
    return (v / 255 - 0.5) / 0.5


def _forged_png(path: Path, width: int, height: int) -> Path:
    """A tiny real PNG whose IHDR header is rewritten to declare ``width`` x ``height``: a
    decompression bomb in miniature (the few data bytes could never fill that size, so decoding
    it would fail differently -- only a header check gives the pixel-limit error)."""
    Image.new("L", (1, 1), 0).save(path)
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------------------------------------
# images: decompression bombs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [12, 20])  # 144 px: above the limit; 400 px: above PIL's 2x
def test_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch, side):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.delenv("PLEAS_MAX_IMAGE_PIXELS", raising=False)
    Image.new("L", (side, side), 7).save(tmp_path / "big.png")
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError,
                       match=rf"big\.png is too large: {side * side} pixels.*limit of 100.*"
                             "PLEAS_MAX_IMAGE_PIXELS"):
        load_images(tmp_path)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's global is restored


def test_pixel_limit_can_be_raised_with_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (20, 20), 255).save(tmp_path / "big.png")
    monkeypatch.setenv("PLEAS_MAX_IMAGE_PIXELS", "400")
    assert load_images(tmp_path).images.shape == (1, 1, 28, 28)
    monkeypatch.setenv("PLEAS_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match=r"PLEAS_MAX_IMAGE_PIXELS must be a positive integer"):
        load_images(tmp_path)


@pytest.mark.parametrize("width,height", [(10_000, 9_000), (30_000, 30_000)])
def test_forged_header_is_refused_before_decoding(tmp_path, monkeypatch, width, height):
    # the real default limit: 9e7 pixels is just over it (PIL would only warn), 9e8 far over
    monkeypatch.delenv("PLEAS_MAX_IMAGE_PIXELS", raising=False)
    assert data.MAX_IMAGE_PIXELS == 89_478_485
    _forged_png(tmp_path / "bomb.png", width, height)
    assert (tmp_path / "bomb.png").stat().st_size < 100
    with pytest.raises(ImageTooLargeError, match=rf"bomb\.png is too large: {width * height} "
                                                 r"pixels, more than the limit of 89478485"):
        load_images(tmp_path)


def test_bomb_inside_a_saved_dataset_is_refused(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4)), Image.new("L", (30, 30))]},
                               features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ImageTooLargeError, match=r"ds row 1.* 900 pixels"):
        load_images(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------
# images: bit depth, alpha, palette, corrupt files
# ---------------------------------------------------------------------------------------------

def test_16bit_png_is_scaled_by_257_not_clipped(tmp_path):
    values = np.array([[0, 257], [32896, 65535]], dtype=np.uint16)  # /257: 0, 1, 128, 255
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")  # a real 16-bit PNG
    want = torch.tensor([[-1.0, 2 / 255 - 1], [256 / 255 - 1, 1.0]])
    gray = load_images(tmp_path, size=2, channels=1)
    assert torch.allclose(gray.images[0, 0], want, atol=1e-6)
    rgb = load_images(tmp_path, size=2, channels=3)
    assert rgb.images.shape == (1, 3, 2, 2)
    for c in range(3):
        assert torch.allclose(rgb.images[0, c], want, atol=1e-6)
    # resized: stays within range, and the mean keeps the 16-bit mean (not a clipped one)
    big = load_images(tmp_path, size=28, channels=1)
    assert big.images.min() >= -1 and big.images.max() <= 1


def test_alpha_is_composited_onto_black(tmp_path):
    img = Image.new("RGBA", (2, 2))
    img.putdata([(255, 255, 255, 255), (255, 255, 255, 0), (255, 255, 255, 51),
                 (255, 0, 0, 255)])
    img.save(tmp_path / "a.png")
    gray = load_images(tmp_path, size=2, channels=1).images[0, 0]
    # opaque white 255; transparent white -> black 0; white at alpha 51 -> 51; opaque red -> 76
    want = torch.tensor([[_norm(255), _norm(0)], [_norm(51), _norm(76)]])
    assert torch.allclose(gray, want, atol=1e-6)
    rgb = load_images(tmp_path, size=2, channels=3).images[0]
    assert torch.allclose(rgb[:, 1, 1], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(rgb[:, 0, 1], torch.tensor([-1.0, -1.0, -1.0]))


def test_gray_with_alpha_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(200, 255), (200, 0)])
    (tmp_path / "la").mkdir()
    la.save(tmp_path / "la" / "x.png")
    got = load_images(tmp_path / "la", size=2).images[0, 0, 0]
    assert torch.allclose(got, torch.tensor([_norm(200), _norm(0)]), atol=1e-6)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)  # 0: white, 1: red
    pal.putdata([0, 1])
    (tmp_path / "p").mkdir()
    pal.save(tmp_path / "p" / "x.png", transparency=0)  # white is transparent
    gray = load_images(tmp_path / "p", size=2).images[0, 0, 0]
    assert torch.allclose(gray, torch.tensor([_norm(0), _norm(76)]), atol=1e-6)
    rgb = load_images(tmp_path / "p", size=2, channels=3).images[0, :, 0, 1]
    assert torch.allclose(rgb, torch.tensor([1.0, -1.0, -1.0]))


def test_truncated_image_names_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    raw = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*cut\.png"):
        load_images(tmp_path)


def test_file_that_is_no_image_names_the_file(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8 this is no jpeg at all" * 4)
    with pytest.raises(DataError, match=r"cannot read image .*fake\.jpg"):
        load_images(tmp_path)


# ---------------------------------------------------------------------------------------------
# saved `datasets` folders
# ---------------------------------------------------------------------------------------------

def _save(tmp_path: Path, name: str, columns: dict, features: dict | None = None) -> Path:
    import datasets

    feats = datasets.Features(features) if features else None
    datasets.Dataset.from_dict(columns, features=feats).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def _gray(v: int, side: int = 4) -> Image.Image:
    return Image.new("L", (side, side), v)


def test_empty_dataset_names_the_path(tmp_path):
    import datasets

    path = _save(tmp_path, "empty", {"image": []}, {"image": datasets.Image()})
    with pytest.raises(DataError, match=r"empty holds no images \(0 rows"):
        load_images(path)


def test_dataset_without_image_column_lists_the_columns(tmp_path):
    path = _save(tmp_path, "cols", {"text": ["a", "b"], "score": [1, 2]})
    with pytest.raises(DataError, match=r"no image column \(columns: text, score\)"):
        load_images(path)


@pytest.mark.parametrize("values,found", [(["a.png", "b.png"], "string values"),
                                          ([3, 4], "int64 values")])
def test_image_column_of_non_images_names_column_and_type(tmp_path, values, found):
    path = _save(tmp_path, "bad", {"image": values, "label": [0, 1]})
    with pytest.raises(DataError, match=rf"column 'image' holds {found}, not images"):
        load_images(path)


def test_string_labels_map_to_sorted_classes(tmp_path):
    imgs = [_gray(v) for v in (0, 50, 100, 150, 200, 250)]
    names = ["dog", "cat", "dog", "bird", "cat", "dog"]
    ds = load_images(_save(tmp_path, "str", {"image": imgs, "label": names}))
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.labels.tolist() == [2, 1, 2, 0, 1, 2]
    assert ds.images[3, 0, 0, 0] == pytest.approx(_norm(150), abs=1e-6)  # the bird
    # the same mapping whatever the row order
    again = load_images(_save(tmp_path, "str2", {"image": imgs[::-1], "label": names[::-1]}))
    assert again.classes == ds.classes and again.labels.tolist() == ds.labels.tolist()[::-1]
    assert len(load_images(tmp_path / "str", limit=3).labels) == 3


@pytest.mark.parametrize("labels,match", [
    ([0, -2, 1], r"label -2 \(row 1\) is negative"),
    ([0.0, 1.5, 1.0], r"label 1\.5 \(row 1\) is not an integer"),
    ([0.0, float("nan"), 1.0], r"label nan \(row 1\) is not an integer"),
    ([0, None, 1], r"1 rows without a label \(first: row 1\)"),
])
def test_bad_labels_are_refused(tmp_path, labels, match):
    imgs = [_gray(v) for v in (0, 100, 200)]
    path = _save(tmp_path, "lab", {"image": imgs, "label": labels})
    with pytest.raises(DataError, match=r"label column 'label'.*" + match):
        load_images(path)


def test_classlabel_missing_label_is_refused_and_integral_floats_accepted(tmp_path):
    import datasets

    imgs = [_gray(v) for v in (0, 100, 200)]
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    path = _save(tmp_path, "cl", {"image": imgs, "label": [0, -1, 1]}, feats)
    with pytest.raises(DataError, match=r"label -1 \(row 1\) is negative"):
        load_images(path)
    ok = load_images(_save(tmp_path, "fl", {"image": imgs, "label": [0.0, 2.0, 1.0]}))
    assert ok.labels.tolist() == [0, 2, 1] and ok.classes == ["0", "1", "2"]


def test_nan_in_float_image_arrays_names_the_dataset(tmp_path):
    arrays = [np.full((4, 4), 0.5).tolist(), np.full((4, 4), 0.5).tolist()]
    arrays[1][2][3] = float("nan")
    path = _save(tmp_path, "nan", {"pixel_values": arrays})
    with pytest.raises(DataError, match=r"nan: column 'pixel_values' row 1: 1 of 16 pixel "
                                        r"values are NaN or inf"):
        load_images(path)
    arrays[1][2][3] = float("inf")
    with pytest.raises(DataError, match=r"NaN or inf"):
        load_images(_save(tmp_path, "inf", {"pixel_values": arrays}))


def test_float_arrays_are_scaled_once_for_the_whole_dataset(tmp_path):
    # 0..255 floats: the dark image (max 0.8) must not be read as 0..1 and scaled to 204
    dark_and_bright = [np.full((4, 4), 0.8).tolist(), np.full((4, 4), 200.0).tolist()]
    got = load_images(_save(tmp_path, "f255", {"image": dark_and_bright}), size=4).images
    assert got[0].flatten()[0] == pytest.approx(_norm(0.8), abs=1e-6)
    assert got[1].flatten()[0] == pytest.approx(_norm(200.0), abs=1e-6)
    # 0..1 floats: scaled by 255
    unit = [np.full((4, 4), 0.2).tolist(), np.full((4, 4), 1.0).tolist()]
    got = load_images(_save(tmp_path, "f1", {"image": unit}), size=4).images
    assert got[0].flatten()[0] == pytest.approx(_norm(51.0), abs=1e-5)
    # already normalised to [-1, 1]: refused, not clipped to black
    signed = [np.full((4, 4), -1.0).tolist(), np.full((4, 4), 1.0).tolist()]
    with pytest.raises(DataError, match=r"pixel values in \[-1, 1\]; expected 0\.\.1 or 0\.\.255"):
        load_images(_save(tmp_path, "fneg", {"image": signed}))


def test_ragged_or_misshapen_arrays_are_refused(tmp_path):
    path = _save(tmp_path, "shape", {"image": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]})
    with pytest.raises(DataError, match=r"row 0: an image array of shape \(3,\)"):
        load_images(path)


# ---------------------------------------------------------------------------------------------
# check_finite_images
# ---------------------------------------------------------------------------------------------

def test_check_finite_images():
    x = torch.zeros(3, 1, 4, 4)
    check_finite_images(x, "merge data")  # finite: no error
    check_finite_images(ImageSet(x, None, [], "ok"), "merge data")
    check_finite_images(torch.zeros(2, 2, dtype=torch.uint8), "ints")  # nothing to check
    x[2, 0, 1, 3] = float("nan")
    x[2, 0, 2, 2] = float("-inf")
    with pytest.raises(DataError, match=r"merge data: 2 of 48 pixel values are NaN or inf "
                                        r"\(first at index \(2, 0, 1, 3\)\)"):
        check_finite_images(x, "merge data")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_finite_images(ImageSet(x, None, [], "bad"), "merge data")
    with pytest.raises(DataError, match="arr: 1 of"):
        check_finite_images(np.array([1.0, np.inf]), "arr")


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

SMALL_MLP = {"num_classes": 3, "in_features": 16, "hidden": [8]}


def _mlp_file(tmp_path: Path, config: dict, name: str = "m.safetensors") -> Path:
    """A real small MLP checkpoint (hidden width 8) whose metadata claims ``config``."""
    torch.manual_seed(0)
    return save_checkpoint(build_model("mlp", **SMALL_MLP), tmp_path / name, "mlp", config)


def _spy_builds(monkeypatch) -> list[str]:
    """Record the device of every model load_checkpoint builds; a real (not meta) build of a
    model wider than 10**6 fails the test instead of allocating it."""
    from pleas import checkpoint

    devices: list[str] = []

    def spy(arch, **config):
        real = torch.empty(0).device.type != "meta"
        if real and max(config.get("hidden", [0])) > 10**6:
            raise AssertionError(f"a real model was built for config {config}")
        model = build_model(arch, **config)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "build_model", spy)
    return devices


def test_huge_model_in_metadata_is_refused_before_allocating(tmp_path, monkeypatch):
    from pleas import checkpoint

    path = _mlp_file(tmp_path, dict(SMALL_MLP, hidden=[10**9]))
    devices = _spy_builds(monkeypatch)

    def no_data(path):
        raise AssertionError("tensor data read before the header check")

    monkeypatch.setattr(checkpoint, "_load_safetensors", no_data)
    # 10**9 x 16 weights (64 GB in float32) would be allocated by a real build
    with pytest.raises(CheckpointError, match=r"net\.1\.weight \(expected \(1000000000, 16\), got "
                                              r"\(8, 16\)\).*the config implies "
                                              r"20,000,000,003 values, the file holds 163"):
        load_checkpoint(path)
    assert devices == ["meta"]  # only the storage-free meta model was built


def test_huge_model_in_pt_metadata_is_refused(tmp_path, monkeypatch):
    model = build_model("mlp", **SMALL_MLP)
    torch.save({"arch": "mlp", "config": dict(SMALL_MLP, hidden=[10**9]),
                "state_dict": model.state_dict()}, tmp_path / "m.pt")
    devices = _spy_builds(monkeypatch)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*net\.1\.weight"):
        load_checkpoint(tmp_path / "m.pt")
    assert devices == ["meta"]


def test_matching_checkpoint_still_loads_with_one_real_build(tmp_path, monkeypatch):
    path = _mlp_file(tmp_path, SMALL_MLP)
    devices = _spy_builds(monkeypatch)
    torch.manual_seed(0)
    want = build_model("mlp", **SMALL_MLP)
    got = load_checkpoint(path)
    assert devices == ["meta", "cpu"]
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


def test_builder_that_fails_on_meta_falls_back_to_a_real_build(tmp_path, monkeypatch):
    from pleas import checkpoint

    path = _mlp_file(tmp_path, SMALL_MLP)

    def meta_shy(arch, **config):
        if torch.empty(0).device.type == "meta":
            raise NotImplementedError("reads tensor values at construction")
        return build_model(arch, **config)

    monkeypatch.setattr(checkpoint, "build_model", meta_shy)
    assert load_checkpoint(path).net[1].weight.shape == (8, 16)


@pytest.mark.parametrize("arch,config,match", [
    ("resnet20", {"num_classes": "ten"},
     r"config key 'num_classes' of architecture 'resnet20' must be a positive integer, got "
     r"str 'ten'"),
    ("resnet20", {"num_classes": [10]}, r"'num_classes' .* positive integer, got list \[10\]"),
    ("resnet20", {"num_classes": True}, r"'num_classes' .* positive integer, got bool True"),
    ("resnet20", {"width": 0}, r"'width' .* positive integer, got int 0"),
    ("resnet20", {"num_class": 5},
     r"unknown config key 'num_class' for architecture 'resnet20' \(valid keys: in_chans, "
     r"num_classes, width\)"),
    ("mlp", {"hidden": "abc"}, r"'hidden' .* a list of positive integers, got str 'abc'"),
    ("mlp", {"hidden": [8, -1]}, r"'hidden' .* a list of positive integers, got list \[8, -1\]"),
    ("vit_tiny28", {"mlp_ratio": "2"}, r"'mlp_ratio' .* a positive number, got str '2'"),
    ("vit_tiny28", {"class_token": 1}, r"'class_token' .* true or false, got int 1"),
])
def test_config_of_the_wrong_type_names_the_key(tmp_path, arch, config, match):
    from safetensors.torch import save_file

    # the metadata names `arch` with the bad config; the weights never matter
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"arch": arch,
                                                         "config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    good = _mlp_file(tmp_path, SMALL_MLP, "good.safetensors")
    with pytest.raises(CheckpointError, match=match):  # the same check for config=
        load_checkpoint(good, arch=arch, config=config)


def test_pt_config_with_non_string_keys(tmp_path):
    model = build_model("mlp", **SMALL_MLP)
    torch.save({"arch": "mlp", "config": {1: 2}, "state_dict": model.state_dict()},
               tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"config keys must be strings, got 1"):
        load_checkpoint(tmp_path / "m.pt")


def test_shape_mismatch_reports_both_counts(tmp_path):
    path = _mlp_file(tmp_path, SMALL_MLP)
    with pytest.raises(CheckpointError, match=r"net\.3\.weight \(expected \(10, 8\), got \(3, 8\)\)"
                                              r".*implies 226 values, the file holds 163"):
        load_checkpoint(path, config=dict(SMALL_MLP, num_classes=10))


def test_image_feature_is_preferred_and_array3d_is_read(tmp_path):
    import datasets

    # 'image' holds file names, 'photo' the images: the Image feature is used
    path = _save(tmp_path, "two", {"image": ["a.png"], "photo": [_gray(200)]},
                 {"image": datasets.Value("string"), "photo": datasets.Image()})
    assert load_images(path, size=4).images[0, 0, 0, 0] == pytest.approx(_norm(200), abs=1e-6)
    # channels-first uint8 Array3D: read as is (no scaling), colour -> gray by PIL's luma
    red = np.zeros((3, 4, 4), dtype=np.uint8)
    red[0] = 255
    path = _save(tmp_path, "arr", {"image": [red]},
                 {"image": datasets.Array3D(shape=(3, 4, 4), dtype="uint8")})
    assert load_images(path, size=4).images[0, 0, 0, 0] == pytest.approx(_norm(76), abs=1e-6)
    # an Array2D of strings is no image
    path = _save(tmp_path, "strs", {"image": [[["a"]]]},
                 {"image": datasets.Array2D(shape=(1, 1), dtype="string")})
    with pytest.raises(DataError, match=r"column 'image' holds a Array2D feature"):
        load_images(path)


def test_16bit_integer_arrays_in_a_dataset_are_divided_by_257(tmp_path):
    deep = [[[0, 257], [32896, 65535]]]  # /257: 0, 1, 128, 255
    got = load_images(_save(tmp_path, "u16", {"image": deep}), size=2).images[0, 0]
    want = torch.tensor([[-1.0, 2 / 255 - 1], [256 / 255 - 1, 1.0]])
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(DataError, match=r"pixel values in \[0, 70000\]; expected 0\.\.255 or "
                                        r"16-bit"):
        load_images(_save(tmp_path, "u17", {"image": [[[0, 70000]]]}))
