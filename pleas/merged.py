"""The merged model as users get it, and its save/load without the original models.

``MergedModel.forward`` returns:
- shared label space (one head fitted to the average of both models' logits): a tensor of logits;
- different label spaces (one head per original model, each reading [merged | own-only] features
  in its original order): a dict {task name: logits}.

Saved as ``model.safetensors`` (the widened weights) plus ``merged.json`` (architecture, config,
heads, group widths) so that :func:`load_merged` rebuilds it from the architecture alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

FORMAT = "pleas-merged-v1"


@dataclass(frozen=True)
class Head:
    task: str
    start: int
    stop: int
    classes: list[str] | None = None


class MergedModel(nn.Module):
    """A widened network plus how to read its outputs (one shared head, or one head per task)."""

    def __init__(self, net: nn.Module, heads: list[Head] | None = None,
                 description: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.heads = list(heads) if heads else None
        self.description = dict(description or {})

    @property
    def multi_head(self) -> bool:
        return self.heads is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        y = self.net(x)
        if self.heads is None:
            return y
        return {h.task: y[..., h.start:h.stop] for h in self.heads}

    def logits_for(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Logits of one task (the only head when the label space is shared)."""
        y = self(x)
        if isinstance(y, dict):
            if task not in y:
                raise KeyError(f"merged model has no head for task {task!r}; heads: {list(y)}")
            return y[task]
        return y


def save_merged(model: MergedModel, path: str | os.PathLike, overwrite: bool = False,
                extra_files: dict[str, str | bytes] | None = None,
                report: str | os.PathLike | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/merged.json`` atomically, losing no file.

    The folder is published by :func:`pleas.output.publish`: staged next to ``path`` and moved
    into place in one rename, refused (:class:`pleas.output.OutputError`) where that could
    destroy anything pleas did not write.  An earlier pleas output at ``path`` is replaced only
    with ``overwrite=True`` (the default is False, so nothing is replaced by accident).
    ``extra_files`` may add ``report.json`` (text); ``report`` is a path for a copy of it,
    marked ``"pleas_report": true`` so that a later run may replace it (with ``overwrite``).
    """
    from .output import check_output, mark_report, publish

    check_output(path, overwrite, report)  # before serialising: cheap refusals first
    files = _merged_files(model, extra_files)
    report_bytes = None
    if report is not None:
        if "report.json" not in files:
            raise ValueError("save_merged(report=...) copies extra_files['report.json'], "
                             "which is missing")
        report_bytes = mark_report(files["report.json"])
    return publish(path, files, overwrite, report, report_bytes)


def _merged_files(model: MergedModel, extra_files: dict[str, str | bytes] | None
                  ) -> dict[str, bytes]:
    """The bytes of every file of the output folder (weights, description, extras)."""
    desc = dict(model.description)
    desc["format"] = FORMAT
    desc["heads"] = [asdict(h) for h in model.heads] if model.heads else None
    if not desc.get("arch"):
        raise ValueError("the merged model's description has no architecture name; "
                         "set description['arch'] (and 'config') to save it")
    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    files = {"model.safetensors": save_safetensors(state, metadata={"format": FORMAT}),
             "merged.json": json.dumps(desc, indent=2, default=_jsonable).encode()}
    for name, content in (extra_files or {}).items():
        if name in files:
            raise ValueError(f"extra_files may not replace {name}")
        files[name] = content.encode() if isinstance(content, str) else bytes(content)
    return files


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_merged(path: str | os.PathLike, device: str | torch.device = "cpu") -> MergedModel:
    """Rebuild a merged model from :func:`save_merged`'s folder, without the original models."""
    from .models import build_model
    from .widen import build_module

    path = Path(path)
    desc_file, weights = path / "merged.json", path / "model.safetensors"
    if not desc_file.exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a merged model folder (needs merged.json and "
                                "model.safetensors)")
    try:
        desc = json.loads(desc_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{desc_file} is not valid JSON: {err}") from err
    if desc.get("format") != FORMAT:
        raise ValueError(f"{desc_file}: unknown format {desc.get('format')!r}")
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    template = build_model(desc["arch"], **(desc.get("config") or {}))
    net = build_module(template, state).to(device).eval()
    heads = [Head(**h) for h in desc["heads"]] if desc.get("heads") else None
    return MergedModel(net, heads, desc).eval()
