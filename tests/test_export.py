"""pleas export: a merged model as ONNX, TorchScript and a torch.export program that run
without pleas and give the PyTorch outputs (to 1e-4), for a separate-heads and a shared-head
merge; the command line's errors are one line and exit code 2, and no file is replaced."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pleas.cli import main
from pleas.export import ExportError, export_model, run_exported
from pleas.merged import save_merged
from pleas.pipeline import ModelSide, build, prepare

from archs import random_model

torch.set_num_threads(1)
X = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(7))
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


def _merge(arch: str, config: dict, shared: bool, width: float = 1.5, layout: str = "dense"):
    """The ViT merges use the even allocation, which splits the residual stream: the exports
    then carry merged LayerNorms (and under the blocks layout, split layers); the uniform
    allocation keeps that stream merged at 1.5."""
    a, b = random_model(arch, 1), random_model(arch, 2)
    data = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    space = [dict(task="t", label_space="s")] * 2 if shared else [
        dict(task="fashion", label_space="f"), dict(task="digits", label_space="d")]
    prep = prepare(ModelSide(a, "a", arch=arch, config=config, **space[0]),
                   ModelSide(b, "b", **space[1]), data, batch_size=24, positions=8,
                   methods=["permute"], progress=False)
    allocation = "even" if arch == "vit_tiny28" else "uniform"
    return build(prep, width, "permute", progress=False, layout=layout,
                 allocation=allocation)[0]


@pytest.fixture(scope="module")
def merges():
    return {"separate": _merge("vit_tiny28", {"num_classes": 5, "depth": 1}, shared=False),
            "shared": _merge("resnet20", {"num_classes": 5}, shared=True),
            # width 2: the two networks side by side (pleas.side_by_side)
            "separate@2": _merge("vit_tiny28", {"num_classes": 5, "depth": 1}, shared=False,
                                 width=2.0),
            "shared@2": _merge("resnet20", {"num_classes": 5}, shared=True, width=2.0),
            # the block-structured layout: split layers (pieces, slicing, concatenation)
            "separate/blocks": _merge("vit_tiny28", {"num_classes": 5, "depth": 1},
                                      shared=False, layout="blocks"),
            "shared/blocks": _merge("resnet20", {"num_classes": 5}, shared=True,
                                    layout="blocks")}


def _reference(model) -> list[torch.Tensor]:
    with torch.no_grad():
        y = model(X)
    return list(y.values()) if isinstance(y, dict) else [y]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
@pytest.mark.parametrize("heads", ["separate", "shared", "separate@2", "shared@2",
                                   "separate/blocks", "shared/blocks"])
def test_exports_match_pytorch(merges, tmp_path, fmt, heads):
    model = merges[heads]
    if heads.endswith("@2"):
        assert type(model.net).__name__ == "SideBySide"
    kinds = {type(m).__name__ for m in model.net.modules()}
    if heads.endswith("/blocks"):
        assert "BlockLayer" in kinds
    if heads in ("separate", "separate/blocks"):
        assert "MergedLayerNorm" in kinds
    path = tmp_path / f"model{SUFFIX[fmt]}"
    result = export_model(model, path, fmt, torch.zeros(2, 1, 28, 28))
    assert result.path == path and path.is_file() and result.max_abs_diff <= 1e-4
    assert result.outputs == (["fashion", "digits"] if heads.startswith("separate")
                              else ["logits"])
    got, want = run_exported(path, fmt, X), _reference(model)  # another batch size
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-4
    if fmt == "onnx":
        import onnxruntime as ort

        names = [o.name for o in ort.InferenceSession(str(path)).get_outputs()]
        assert names == result.outputs
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_exported_files_run_without_pleas(merges, tmp_path):
    """A fresh interpreter in which ``import pleas`` fails runs all three files."""
    model = merges["separate"]
    for fmt in ("onnx", "torchscript", "exported-program"):
        export_model(model, tmp_path / f"m{SUFFIX[fmt]}", fmt, torch.zeros(2, 1, 28, 28),
                     check=False)
    np.save(tmp_path / "x.npy", X.numpy())
    script = f"""
import sys, warnings
class NoPleas:
    def find_spec(self, name, path=None, target=None):
        if name == "pleas" or name.startswith("pleas."):
            raise ImportError("pleas is not available here")
sys.meta_path.insert(0, NoPleas())
warnings.simplefilter("ignore")
import json, numpy as np, torch, onnxruntime as ort
d = {str(tmp_path)!r}
x = np.load(d + "/x.npy")
session = ort.InferenceSession(d + "/m.onnx")
out = {{"onnx": [y.tolist() for y in session.run(None, {{"images": x}})]}}
with torch.no_grad():
    ts = torch.jit.load(d + "/m.pt")(torch.from_numpy(x))
    ep = torch.export.load(d + "/m.pt2").module()(torch.from_numpy(x))
out["torchscript"] = [v.tolist() for v in ts.values()]
out["exported-program"] = [v.tolist() for v in ep.values()]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want = _reference(model)
    for fmt, ys in out.items():
        for y, w in zip(ys, want):
            assert (torch.tensor(y) - w).abs().max() <= 1e-4, fmt


def test_export_refuses_existing_files_and_unknown_formats(merges, tmp_path):
    model = merges["shared"]
    target = tmp_path / "keep.pt"
    target.write_text("mine")
    with pytest.raises(ExportError, match="exists; choose a new path or pass --overwrite"):
        export_model(model, target, "torchscript", torch.zeros(2, 1, 28, 28))
    assert target.read_text() == "mine"
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite", torch.zeros(2, 1, 28, 28))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ExportError, match="not a regular file"):
        export_model(model, tmp_path / "folder", "torchscript", torch.zeros(2, 1, 28, 28),
                     overwrite=True)
    # --overwrite replaces only an earlier pleas export, never a user's file
    with pytest.raises(ExportError, match="not a pleas export"):
        export_model(model, target, "torchscript", torch.zeros(2, 1, 28, 28), overwrite=True)
    assert target.read_text() == "mine"
    for fmt in ("torchscript", "exported-program", "onnx"):
        earlier = tmp_path / f"earlier.{fmt}"
        export_model(model, earlier, fmt, torch.zeros(2, 1, 28, 28), check=False)
        first = earlier.read_bytes()
        export_model(model, earlier, fmt, torch.zeros(2, 1, 28, 28), overwrite=True,
                     check=False)
        assert earlier.stat().st_size > 1000 and len(first) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "earlier.exported-program", "earlier.onnx", "earlier.torchscript", "folder", "keep.pt"]


def test_a_file_that_appears_during_the_export_is_never_replaced(merges, tmp_path,
                                                                 monkeypatch):
    """The target is checked again when the finished export moves into place: a user's file
    created there meanwhile stays byte for byte, and no temp file is left."""
    import pleas.export

    target = tmp_path / "m.pt"
    real = pleas.export._WRITERS["torchscript"]

    def write_then_user_saves(model, tmp, x, names):
        real(model, tmp, x, names)
        target.write_text("the user's")

    monkeypatch.setitem(pleas.export._WRITERS, "torchscript", write_then_user_saves)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="appeared while pleas was exporting|not a pleas"):
            export_model(merges["shared"], target, "torchscript", torch.zeros(2, 1, 28, 28),
                         overwrite=overwrite, check=False)
        assert target.read_text() == "the user's"
        target.unlink()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def folder(merges, tmp_path_factory):
    return save_merged(merges["shared"], tmp_path_factory.mktemp("cli") / "merged")


def test_cli_exports(folder, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["export", str(folder), "--format", "exported-program", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (exported-program; input (1, 28, 28)")
    got = run_exported(out, "exported-program", X)[0]
    from pleas.merged import load_merged

    assert (got - _reference(load_merged(folder))[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("args,match", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--format", "onnx", "--missing"], "is not a merged model folder"),
    (["--format", "onnx", "--exists"], "exists; choose a new path or pass --overwrite"),
    (["--format", "onnx", "--input-shape", "1,x"], "--input-shape must be C,H,W"),
    (["--format", "onnx", "--no-folder"], "does not exist"),
], ids=["unknown-format", "missing-folder", "existing-file", "bad-shape", "no-out-folder"])
def test_cli_errors_are_one_line(folder, tmp_path, capsys, args, match):
    src, out = str(folder), tmp_path / "m.onnx"
    exists = "--exists" in args
    if "--missing" in args:
        src = str(tmp_path / "nothing")
    if "--exists" in args:
        out.write_text("mine")
    if "--no-folder" in args:
        out = tmp_path / "no" / "m.onnx"
    args = [a for a in args if a not in ("--missing", "--exists", "--no-folder")]
    code = main(["export", src, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.onnx"] if exists else [])
    if exists:
        assert out.read_text() == "mine"
