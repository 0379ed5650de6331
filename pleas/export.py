"""Exporting a merged model to a standalone file that needs no pleas (and for ONNX no PyTorch)
at inference: ``pleas export MERGED_DIR --format onnx|torchscript|exported-program --out FILE``.

Why these three: ONNX runs anywhere (onnxruntime, TensorRT, browsers), an ``ExportedProgram``
(``torch.export``) is PyTorch's own deployable graph, TorchScript is what older serving stacks
load.  The block-structured layers are plain convolutions, matrix products, slices and
concatenations, so every exporter sees standard ops only.

* **Outputs.**  A separate-heads model returns a dict {task: logits}: the TorchScript module and
  the exported program return that dict; the ONNX graph has one named output per task (in head
  order), a shared-head model one output ``logits``.  The input is ``images`` with a dynamic
  batch dimension (the other dims as in ``example_input``).
* **Checked.**  After writing, the file is loaded back and run on a random batch of another
  size; :class:`ExportResult` gives the largest difference to the PyTorch model (ONNX: through
  onnxruntime, when it is installed).
* **File names.**  Any name works; ``torch.export.load`` wants an exported program's name to end
  in ``.pt2``, so use that suffix for ``exported-program``.
* **Written safely.**  The file is written to a hidden temp file next to ``path`` and moved into
  place in one rename; an existing ``path`` is refused unless ``overwrite`` (then it must be a
  regular file, replaced atomically).  The temp file is removed on any error.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "exported-program")
INPUT_NAME = "images"


class ExportError(ValueError):
    """An export that cannot be done as asked, in one line (bad format, path, missing package)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    outputs: list[str]
    max_abs_diff: float | None  # exported file vs the PyTorch model; None: not checked


class _Tuple(nn.Module):
    """The model with dict outputs as a tuple in head order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        y = self.model(x)
        return tuple(y.values()) if isinstance(y, dict) else y


def output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """One name per output: the task names of a multi-head model, else ``logits``."""
    with torch.no_grad():
        y = model(example_input)
    return list(y) if isinstance(y, dict) else ["logits"]


MARKER = "pleas_export"  # the name every export carries, so --overwrite can recognise it


def _marker_text() -> str:
    return json.dumps({MARKER: True})


def is_pleas_export(path: str | os.PathLike) -> bool:
    """Does ``path`` hold a file pleas exported?  TorchScript and torch.export archives carry
    an extra ``pleas_export.json`` entry, ONNX models a ``pleas_export`` metadata property."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(f"{MARKER}.json") for n in archive.namelist())
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(p.key == MARKER for p in model.metadata_props)


def check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, refused if it exists (unless ``overwrite`` and an earlier pleas
    export: a user's file is never replaced) or its folder is missing or not writable."""
    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise ExportError(f"{path} exists; choose a new path or pass --overwrite")
        if path.is_symlink() or not path.is_file():
            raise ExportError(f"{path} exists and is not a regular file; it is never replaced")
        if not is_pleas_export(path):
            raise ExportError(f"{path} exists and is not a pleas export; pleas replaces only "
                              "files it exported: choose a new path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: the folder {parent} is not writable")
    return path


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished export into place, checking ``path`` again: writing takes seconds,
    and a file a user created there meanwhile is never replaced (without ``overwrite`` the
    rename itself refuses an existing target)."""
    from .output import _rename_noreplace

    try:
        if overwrite and os.path.lexists(path):
            check_target(path, overwrite)  # still an earlier pleas export
            os.replace(tmp, path)
        else:
            _rename_noreplace(tmp, path)
    except FileExistsError:
        raise ExportError(f"{path} appeared while pleas was exporting; it was left as it was: "
                          "choose a new path") from None


def _write_onnx(model: nn.Module, tmp: Path, x: torch.Tensor, names: list[str]) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript ({err}); "
                          "pip install 'pleas[export]'") from err
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Tuple(model).eval(), (x,), None, dynamo=True,
                                    input_names=[INPUT_NAME], output_names=names,
                                    dynamic_shapes=({0: batch},), external_data=False)
        program.save(str(tmp))
    import onnx

    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = MARKER, _marker_text()
    onnx.save(proto, str(tmp))


def _write_torchscript(model: nn.Module, tmp: Path, x: torch.Tensor, names: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in favour of torch.export
        traced = torch.jit.trace(model, x, strict=False)
        torch.jit.save(traced, str(tmp), _extra_files={f"{MARKER}.json": _marker_text()})


def _write_exported_program(model: nn.Module, tmp: Path, x: torch.Tensor,
                            names: list[str]) -> None:
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp), extra_files={f"{MARKER}.json": _marker_text()})


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript,
            "exported-program": _write_exported_program}


def run_exported(path: str | os.PathLike, format: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of an exported file on ``x``, in head order (ONNX needs onnxruntime)."""
    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(y) for y in session.run(None, {INPUT_NAME: x.cpu().numpy()})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path)) if format == "torchscript" else \
            torch.export.load(str(path)).module()
    with torch.no_grad():
        y = loaded(x)
    return list(y.values()) if isinstance(y, dict) else [y]


def _max_diff(model: nn.Module, path: Path, format: str, x: torch.Tensor) -> float | None:
    """The largest difference between the file's outputs and the model's on ``x``."""
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return None
    with torch.no_grad():
        y = model(x)
    want = list(y.values()) if isinstance(y, dict) else [y]
    got = run_exported(path, format, x)
    return max(float((g.to(w) - w).abs().max()) for g, w in zip(got, want))


def export_model(model: nn.Module, path: str | os.PathLike, format: str,
                 example_input: torch.Tensor, overwrite: bool = False,
                 check: bool = True) -> ExportResult:
    """Write ``model`` (a :class:`pleas.MergedModel` or any module) to ``path`` as ``format``.

    ``example_input`` fixes every input dim but the batch (use a batch of 2 or more: a batch of
    1 would be specialised).  ``check`` runs the written file on a random batch of 3 and
    reports the largest difference to the PyTorch outputs.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    path = check_target(path, overwrite)
    model = model.eval()
    x = example_input.detach()
    names = output_names(model, x)
    # torch.export reads and writes archives named *.pt2 only
    suffix = ".pleas-tmp" + (".pt2" if format == "exported-program" else "")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix,
                                    dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _WRITERS[format](model, tmp, x, names)
        os.chmod(tmp, 0o666 & ~_umask())
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn((3, *x.shape[1:]), generator=gen).to(x)
        diff = _max_diff(model, tmp, format, probe) if check else None
        _place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path, format, names, diff)


def _umask() -> int:
    from .output import _umask as umask
    return umask()


def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """An input for a loaded merged model: the shape its description records, else the first
    of the sizes :func:`pleas.merged.load_merged` probes that the model accepts."""
    from .merged import _dummy_inputs

    desc = getattr(model, "description", {}) or {}
    shape = desc.get("input_shape")
    p = next(iter(model.parameters()))
    if isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape):
        return torch.zeros((batch, *shape), dtype=p.dtype, device=p.device)
    net = getattr(model, "net", model)
    for x in _dummy_inputs(net):
        try:
            with torch.no_grad():
                model(x.to(p))
            return x.expand(batch, *x.shape[1:]).clone().to(p)
        except Exception:
            continue
    raise ExportError("cannot tell the model's input size (its merged.json records none); "
                      "pass --input-shape C,H,W")
