"""The merged model as users get it, and its save/load without the original models.

``MergedModel.forward`` returns:
- shared label space (one head fitted to the average of both models' logits): a tensor of logits;
- different label spaces (one head per original model, each reading [merged | own-only] features
  in its original order): a dict {task name: logits}.

Saved as ``model.safetensors`` (the weights as the model stores them: a block-structured layer
only its pieces, :mod:`pleas.blockwise`) plus ``merged.json`` (architecture, config, heads,
group widths, the layout of every block-structured layer) so that :func:`load_merged` rebuilds
it from the architecture alone: the pieces are put together into the dense widened layer, which
is checked like any widened model, then split again by the saved layouts.  Format
``pleas-merged-v2``; a width-K model with nothing merged is saved as its K networks
(``members.{i}.*`` tensors, ``side_by_side`` in merged.json: :mod:`pleas.side_by_side`), each
checked like a merged network on load; a ``pleas-merged-v1`` folder (dense layers, no layouts) loads as the dense
model it holds.
Saving goes through :mod:`pleas.output` (atomic, and never replacing anything pleas did not
write); loading checks the folder before trusting it (:class:`MergedFileError`).
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

from .side_by_side import COMBINES, SideBySide, member_states

FORMAT = "pleas-merged-v2"
DENSE_FORMAT = "pleas-merged-v1"  # before block-structured layers: loads as a dense model
FORMATS = (FORMAT, DENSE_FORMAT)


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

    @property
    def preprocess(self):
        """How the merged model wants its images (:class:`pleas.preprocess.Preprocess`): the
        description's ``preprocess``, else the zoo's for its config (older folders)."""
        from .preprocess import of_description

        return of_description(self.description)

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
    from .blockwise import layouts_of

    desc = dict(model.description)
    desc["format"] = FORMAT
    desc["heads"] = [asdict(h) for h in model.heads] if model.heads else None
    desc["blocks"] = {path: lay.to_json() for path, lay in layouts_of(model.net).items()}
    desc.pop("side_by_side", None)
    if isinstance(model.net, SideBySide):
        desc["side_by_side"] = {"members": len(model.net.members),
                                "combine": model.net.combine}
    if not desc.get("arch"):
        raise ValueError("the merged model's description has no architecture name; "
                         "set description['arch'] (and 'config') to save it")
    extras = dict(extra_files or {})
    if set(extras) - {"report.json"}:  # a later run must recognise every file as pleas' own
        raise ValueError(f"extra_files may only hold report.json, got {sorted(extras)}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    files = {"model.safetensors": save_safetensors(state, metadata={"format": FORMAT}),
             "merged.json": json.dumps(desc, indent=2, default=_jsonable).encode()}
    for name, content in extras.items():
        files[name] = content.encode() if isinstance(content, str) else bytes(content)
    return files


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class MergedFileError(ValueError):
    """A merged model folder that cannot be trusted: one line naming the file and the problem."""

    def __init__(self, file: Path, problem: str):
        super().__init__(f"{file}: {' '.join(str(problem).split())}")


_SHOW = 4  # how many keys an error message lists


def _first(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOW]) + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def load_merged(path: str | os.PathLike, device: str | torch.device = "cpu") -> MergedModel:
    """Rebuild a merged model from :func:`save_merged`'s folder, without the original models.

    Everything is checked before it is used, because a folder can be edited, truncated or come
    from elsewhere: the format version, that every tensor is finite (and no BatchNorm variance
    negative), that the tensors are exactly the architecture's with the same ranks and shapes
    that fit their module types and each other (a forward pass on a dummy input), and that the
    heads are named uniquely and read disjoint, in-range slices of the output.  Any problem
    raises :class:`MergedFileError` (a ValueError) naming the file.
    """
    path = Path(path)
    desc_file, weights = path / "merged.json", path / "model.safetensors"
    if not desc_file.exists() or not weights.exists():
        raise FileNotFoundError(f"{path} is not a merged model folder (needs merged.json and "
                                "model.safetensors)")
    desc = _read_description(desc_file)
    heads = _parse_heads(desc.get("heads"), desc_file)
    state = _read_state(weights)
    template = _build_template(desc, desc_file)
    layouts = _parse_layouts(desc, template, desc_file)
    side_by_side = _parse_side_by_side(desc, layouts, desc_file)
    if side_by_side is not None:
        net = _build_side_by_side(template, state, *side_by_side, weights, desc["arch"])
        n_out = _output_count(net, template, weights)
        if heads:
            _check_heads_fit(heads, n_out, desc_file)
        return MergedModel(net.to(device).eval(), heads, desc).eval()
    state = _join_pieces(state, layouts, weights)
    _check_keys(template, state, weights)
    _check_module_shapes(template, state, weights)
    net = _build_net(template, state, weights, desc["arch"])
    n_out = _output_count(net, template, weights)  # also runs the widened net once
    if heads:
        _check_heads_fit(heads, n_out, desc_file)
    net = _split(net, layouts, desc_file)
    return MergedModel(net.to(device).eval(), heads, desc).eval()


def _parse_side_by_side(desc: dict[str, Any], layouts: dict, desc_file: Path
                        ) -> tuple[int, str] | None:
    """(members, combine) of a width-K model run as whole networks, or None."""
    raw = desc.get("side_by_side")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"members", "combine"}:
        raise MergedFileError(desc_file, "'side_by_side' must be an object with members and "
                              "combine")
    members, combine = raw["members"], raw["combine"]
    if not isinstance(members, int) or isinstance(members, bool) or members < 2:
        raise MergedFileError(desc_file, f"side_by_side: members must be an integer >= 2, found "
                              f"{members!r}")
    if combine not in COMBINES:
        raise MergedFileError(desc_file, f"side_by_side: combine must be one of "
                              f"{', '.join(COMBINES)}, found {combine!r}")
    if layouts:
        raise MergedFileError(desc_file, "a side-by-side model has no block layouts, but "
                              "'blocks' lists some")
    return members, combine


def _build_side_by_side(template: nn.Module, state: dict[str, torch.Tensor], members: int,
                        combine: str, weights: Path, arch: str) -> SideBySide:
    """The K member networks, each checked like a merged network, side by side."""
    states, stray = member_states(state, members)
    if stray:
        raise MergedFileError(weights, f"tensors that belong to none of the {members} "
                              f"side-by-side networks: {_first(stray)}")
    nets = []
    for i, member in enumerate(states):
        try:
            _check_keys(template, member, weights)
            _check_module_shapes(template, member, weights)
        except MergedFileError as err:
            raise MergedFileError(weights, f"network {i} (members.{i}.*): "
                                  f"{str(err).split(': ', 1)[1]}") from err
        nets.append(_build_net(template, member, weights, arch))
    return SideBySide(nets, combine)


def _read_description(desc_file: Path) -> dict[str, Any]:
    """merged.json as a dict of the known format with an architecture name."""
    try:
        desc = json.loads(desc_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MergedFileError(desc_file, f"not valid JSON: {err}") from err
    if not isinstance(desc, dict):
        raise MergedFileError(desc_file, f"expected a JSON object, found {type(desc).__name__}")
    if desc.get("format") not in FORMATS:
        found = "no format field" if "format" not in desc else f"format {desc['format']!r}"
        raise MergedFileError(desc_file, f"{found}; expected format {FORMAT!r} (or the older, "
                              f"dense {DENSE_FORMAT!r}): not a pleas merged model, or from an "
                              "incompatible version")
    if not isinstance(desc.get("arch"), str) or not desc["arch"]:
        raise MergedFileError(desc_file, f"'arch' must be an architecture name, found "
                              f"{desc.get('arch')!r}")
    if not isinstance(desc.get("config") or {}, dict):
        raise MergedFileError(desc_file, f"'config' must be an object, found "
                              f"{type(desc['config']).__name__}")
    if desc.get("preprocess") is not None:
        from .preprocess import Preprocess

        try:
            Preprocess.from_dict(desc["preprocess"])
        except ValueError as err:
            raise MergedFileError(desc_file, f"'preprocess': {err}") from err
    return desc


def _parse_layouts(desc: dict[str, Any], template: nn.Module, desc_file: Path) -> dict:
    """The block layouts of merged.json (none in the dense v1 format), each of a layer of the
    architecture that can run block by block."""
    from .blockwise import Layout
    from .registry import rules_for_call

    raw = desc.get("blocks") if desc.get("format") == FORMAT else None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergedFileError(desc_file, f"'blocks' must be an object, found "
                              f"{type(raw).__name__}")
    rules, layouts = rules_for_call(), {}
    for path, obj in raw.items():
        try:
            mod = template.get_submodule(path) if isinstance(path, str) and path else None
        except AttributeError:
            mod = None
        if mod is None or rules.lookup(mod, "split") is None:
            raise MergedFileError(desc_file, f"blocks: {path!r} is not a layer of the "
                                  "architecture that can run block by block")
        try:
            layouts[path] = Layout.from_json(obj)
        except ValueError as err:
            raise MergedFileError(desc_file, f"blocks: layer {path}: {err}") from err
    return layouts


def _join_pieces(state: dict[str, torch.Tensor], layouts: dict, weights: Path
                 ) -> dict[str, torch.Tensor]:
    """``state`` with every block-structured layer's pieces put together into the dense
    widened weight (zeros where no piece reads) and bias, checked against its layout."""
    from .blockwise import dense_tensors, piece_tensors

    out = dict(state)
    for path, layout in layouts.items():
        ws, bs = [], []
        key = f"{path}.pieces.0."
        if layout.diagonal_groups and f"{path}.pieces.1.weight" not in out and \
                key + "weight" in out:  # one grouped conv holds the diagonal blocks
            w, b = out.pop(key + "weight"), out.pop(key + "bias", None)
            if w.ndim < 2 or w.shape[0] != layout.rows:
                raise MergedFileError(weights, f"tensor {key}weight has shape "
                                      f"{tuple(w.shape)}; its layout asks for {layout.rows} "
                                      "rows")
            out.update({f"{path}.pieces.{i}.weight": t for i, t in
                        enumerate(piece_tensors(layout, [w], [b])[0])})
            if b is not None:
                out.update({f"{path}.pieces.{i}.bias": t for i, t in
                            enumerate(piece_tensors(layout, [w], [b])[1])})
        for i, piece in enumerate(layout.pieces):
            key = f"{path}.pieces.{i}."
            if key + "weight" not in out:
                raise MergedFileError(weights, f"missing tensors the block layout of {path} "
                                      f"needs: {key}weight")
            w, b = out.pop(key + "weight"), out.pop(key + "bias", None)
            want = (sum(e - s for s, e in piece.rows), sum(e - s for s, e in piece.cols))
            if w.ndim < 2 or tuple(w.shape[:2]) != want or (ws and w.shape[2:] != ws[0].shape[2:]):
                raise MergedFileError(weights, f"tensor {key}weight has shape {tuple(w.shape)}; "
                                      f"its layout asks for {want[0]} rows x {want[1]} columns "
                                      "(and the kernel of the other pieces)")
            if b is not None and tuple(b.shape) != (want[0],):
                raise MergedFileError(weights, f"tensor {key}bias has shape {tuple(b.shape)}, "
                                      f"not ({want[0]},)")
            ws.append(w), bs.append(b)
        if len({b is None for b in bs}) > 1:
            raise MergedFileError(weights, f"the pieces of {path} must all have a bias or none")
        weight, bias = dense_tensors(layout, ws, bs)
        out[f"{path}.weight"] = weight
        if bias is not None:
            out[f"{path}.bias"] = bias
    return out


def _split(net: nn.Module, layouts: dict, desc_file: Path) -> nn.Module:
    """The dense widened net run block by block again, as it was saved."""
    from .blockwise import split_layers

    try:
        return split_layers(net, layouts)
    except Exception as err:
        raise MergedFileError(desc_file, f"the block layouts do not fit the layers "
                              f"({type(err).__name__}: {err})") from err


def _parse_heads(raw: Any, desc_file: Path) -> list[Head] | None:
    """The heads of merged.json: null, or dicts with a unique task and a valid, disjoint slice.

    The upper bound (the number of outputs) needs the network: :func:`_check_heads_fit`.
    """
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise MergedFileError(desc_file, f"'heads' must be null or a non-empty list, found {raw!r}")
    heads = [_parse_head(h, i, desc_file) for i, h in enumerate(raw)]
    seen: set[str] = set()
    for h in heads:
        if h.task in seen:
            raise MergedFileError(desc_file, f"two heads have the task name {h.task!r}")
        seen.add(h.task)
    ordered = sorted(heads, key=lambda h: h.start)
    for prev, nxt in zip(ordered, ordered[1:]):
        if nxt.start < prev.stop:
            raise MergedFileError(desc_file, f"heads {prev.task!r} [{prev.start}, {prev.stop}) "
                                  f"and {nxt.task!r} [{nxt.start}, {nxt.stop}) overlap")
    return heads


def _parse_head(h: Any, i: int, desc_file: Path) -> Head:
    """One head entry, type-checked (bools are not accepted as integers)."""
    if not isinstance(h, dict) or set(h) - {"task", "start", "stop", "classes"}:
        raise MergedFileError(desc_file, f"head {i} must be an object with task, start, stop "
                              f"(and classes), found {h!r}")
    task, start, stop, classes = h.get("task"), h.get("start"), h.get("stop"), h.get("classes")
    if not isinstance(task, str) or not task:
        raise MergedFileError(desc_file, f"head {i} has no task name (found {task!r})")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)):
        raise MergedFileError(desc_file, f"head {task!r}: start and stop must be integers, "
                              f"found {start!r} and {stop!r}")
    if not 0 <= start < stop:
        raise MergedFileError(desc_file, f"head {task!r}: needs 0 <= start < stop, found "
                              f"start {start}, stop {stop}")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(c, str) for c in classes)):
        raise MergedFileError(desc_file, f"head {task!r}: classes must be a list of names")
    if classes is not None and len(classes) != stop - start:
        raise MergedFileError(desc_file, f"head {task!r}: {len(classes)} class names for "
                              f"{stop - start} outputs")
    return Head(task, start, stop, classes)


def _check_heads_fit(heads: list[Head], n_out: int | None, desc_file: Path) -> None:
    """Every head's slice ends within the network's outputs."""
    for h in heads:
        if n_out is not None and h.stop > n_out:
            raise MergedFileError(desc_file, f"head {h.task!r} reads outputs [{h.start}, "
                                  f"{h.stop}) but the network has {n_out} outputs")


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    """The saved tensors; all finite, and no BatchNorm running variance negative."""
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise MergedFileError(weights, f"not a readable safetensors file: {err}") from err
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MergedFileError(weights, f"tensor {key} has {bad} non-finite value(s) "
                                  "(NaN or inf)")
        if key.endswith("running_var") and t.numel() and float(t.min()) < 0:
            raise MergedFileError(weights, f"tensor {key} (a BatchNorm running variance) has "
                                  f"a negative value {float(t.min()):g}")
    return state


def _build_template(desc: dict[str, Any], desc_file: Path) -> nn.Module:
    """The architecture at its original widths: which tensors exist, and their ranks."""
    from .models import build_model
    from .registry import replaced

    try:  # as the merge saw it: modules with a replace rule swapped (same tensors)
        return replaced(build_model(desc["arch"], **(desc.get("config") or {})))
    except Exception as err:
        raise MergedFileError(desc_file, f"cannot build architecture {desc['arch']!r} with "
                              f"config {desc.get('config')!r}: {err}") from err


def _layernorm_shares(template: nn.Module) -> set[str]:
    """Keys a merged LayerNorm adds (share_a/share_b, see :class:`pleas.vit.MergedLayerNorm`)."""
    return {f"{name}.{s}" if name else s for name, m in template.named_modules()
            if isinstance(m, nn.LayerNorm) for s in ("share_a", "share_b")}


def _check_keys(template: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Exactly the template's tensors (plus LayerNorm shares, in pairs), each of its rank."""
    expected = template.state_dict()
    missing = set(expected) - set(state)
    extra = set(state) - set(expected) - _layernorm_shares(template)
    if missing:
        raise MergedFileError(weights, f"missing tensors the architecture needs: {_first(missing)}")
    if extra:
        raise MergedFileError(weights, f"tensors the architecture does not have: {_first(extra)}")
    for key, t in expected.items():
        if state[key].ndim != t.ndim:
            raise MergedFileError(weights, f"tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"rank {state[key].ndim}; the architecture's is "
                                  f"{tuple(t.shape)}, rank {t.ndim}")
    for key in set(state) - set(expected):
        pair = key[:-1] + ("b" if key.endswith("a") else "a")
        if pair not in state or state[key].ndim != 1:
            raise MergedFileError(weights, f"tensor {key} needs its pair {pair} and both must be "
                                  f"vectors (found shape {tuple(state[key].shape)})")


def _lengths_agree(state: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...],
                   n: int | None, weights: Path) -> int | None:
    """Every present ``prefix + name`` vector has length ``n`` (or the first one's)."""
    for name in names:
        t = state.get(prefix + name)
        if t is None:
            continue
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise MergedFileError(weights, f"tensor {prefix}{name} has shape {tuple(t.shape)} "
                                  f"but its module's other tensors have {n} units")
    return n


def _check_module_shapes(template: nn.Module, state: dict[str, torch.Tensor],
                         weights: Path) -> None:
    """Shapes fit each module's type: a bias as long as the weight's rows, BN vectors of one
    length, kernels and grouped-conv group sizes as in the architecture (widening changes
    channel counts only).  How layers fit each other is checked by a forward pass."""
    for name, mod in template.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.modules.conv._ConvNd):
            _check_conv(mod, state, prefix, weights)
        elif isinstance(mod, nn.Linear):
            _lengths_agree(state, prefix, ("bias",), state[prefix + "weight"].shape[0], weights)
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            _lengths_agree(state, prefix, ("weight", "bias", "running_mean", "running_var"),
                           None, weights)
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            n = _lengths_agree(state, prefix, ("weight", "bias", "share_a", "share_b"), None,
                               weights)
            grouped = isinstance(mod, nn.GroupNorm) and mod.num_groups > 1
            per = mod.num_channels // mod.num_groups if grouped else 1
            if n is not None and n % per:
                raise MergedFileError(weights, f"{prefix}weight: {n} channels do not split "
                                      f"into groups of {per}")


def _check_conv(mod: nn.modules.conv._ConvNd, state: dict[str, torch.Tensor], prefix: str,
                weights: Path) -> None:
    """A conv keeps its kernel; a grouped one its group size (more groups when widened)."""
    key = prefix + "weight"
    w, t = state[key], mod.weight
    if w.shape[2:] != t.shape[2:]:
        raise MergedFileError(weights, f"tensor {key} has shape {tuple(w.shape)}: its kernel "
                              f"differs from the architecture's {tuple(t.shape)}")
    if mod.groups > 1:
        per = mod.out_channels // mod.groups
        if w.shape[1] != t.shape[1] or w.shape[0] % per:
            raise MergedFileError(weights, f"tensor {key} has shape {tuple(w.shape)}: not "
                                  f"groups of {per} output x {t.shape[1]} input channels "
                                  f"like the architecture's {tuple(t.shape)}")
    _lengths_agree(state, prefix, ("bias",), w.shape[0], weights)


def _build_net(template: nn.Module, state: dict[str, torch.Tensor], weights: Path,
               arch: str) -> nn.Module:
    """The widened module; whatever build_module trips on becomes a MergedFileError."""
    from .widen import build_module

    try:
        return build_module(template, state).eval()
    except Exception as err:
        widened = [f"{k} {tuple(v.shape)}" for k, v in template.state_dict().items()
                   if k in state and state[k].shape != v.shape]
        raise MergedFileError(weights, f"the tensors do not fit architecture {arch!r} "
                              f"({type(err).__name__}: {err}); widened tensors: "
                              f"{', '.join(widened[:_SHOW]) or 'none'}") from err


def _dummy_inputs(template: nn.Module) -> list[torch.Tensor]:
    """Inputs the architecture might take, most likely first, judged by its first layer.

    The folder does not record the input size, so candidates (a declared image size, then
    small common ones) are tried on the unwidened template: the first it accepts is used.
    """
    first = next((m for m in template.modules()
                  if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)
    if isinstance(first, nn.Linear):
        return [torch.zeros(1, first.in_features)]
    if first is None:
        return []
    declared = getattr(getattr(template, "patch_embed", None), "img_size", None)  # ViTs: exact
    cfg_size = (getattr(template, "pretrained_cfg", None) or {}).get("input_size", (None,))[-1]
    sizes = [_side(declared), 28, 32, 64, _side(cfg_size), 224]  # small (cheap) ones first
    spatial = first.weight.ndim - 2
    return [torch.zeros((1, first.in_channels) + (s,) * spatial)
            for s in dict.fromkeys(sizes) if s is not None]


def _side(size: Any) -> int | None:
    """The first side of an image size given as an int or a (h, w) pair."""
    if isinstance(size, (tuple, list)):
        size = size[0] if size else None
    return int(size) if isinstance(size, int) else None


def _output_count(net: nn.Module, template: nn.Module, weights: Path) -> int | None:
    """The number of outputs: the last dim of the net's output on a dummy input the template
    accepts (which also checks that the widened layers fit each other), else the classifier's
    out features, else None."""
    with torch.no_grad():
        for x in _dummy_inputs(template):
            try:
                template.eval()(x)
            except Exception:
                continue
            try:
                y = net(x)
            except Exception as err:
                raise MergedFileError(weights, f"the widened layers do not fit each other: a "
                                      f"{tuple(x.shape)} input fails with {type(err).__name__}: "
                                      f"{err}") from err
            return int(y.shape[-1]) if isinstance(y, torch.Tensor) else None
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
