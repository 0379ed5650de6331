"""Model checkpoints: safetensors files that name their own architecture.

A checkpoint is a safetensors file of the model's ``state_dict`` whose metadata holds
``{"arch": <architecture name>, "config": <json of build_model kwargs>}`` (plus optional extra
string entries such as the task).  :func:`load_checkpoint` also reads PyTorch ``.pt``/``.pth``
files (a state dict, or a dict holding one under ``"state_dict"`` or ``"model"``) and checks
what it loads, raising :class:`CheckpointError` with a precise message when something is wrong:
the config is checked key by key (:func:`check_config`), and tensor names and shapes (from the
safetensors header, :func:`read_shapes`) are compared with a model built on the ``meta`` device
before any weights are read or any model allocated.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .models import ARCHITECTURES, build_model

__all__ = ["CheckpointError", "CheckpointNotFound", "save_checkpoint", "load_checkpoint",
           "read_metadata", "read_state_dict", "read_shapes", "check_config", "file_sha256",
           "count_params"]

FORMAT = "pleas-checkpoint-v1"
_SHOW = 5  # how many names an error message lists


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not matching its architecture."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics not included)."""
    return sum(p.numel() for p in model.parameters())


def _names(names, n: int = _SHOW) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def save_checkpoint(model: nn.Module, path: str | os.PathLike, arch: str,
                    config: Mapping[str, Any] | None = None,
                    extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` (safetensors) atomically; returns the path.

    ``extra_metadata`` values that are not strings are stored as JSON.
    """
    from safetensors.torch import save

    path = Path(path)
    meta = {"format": FORMAT, "arch": arch, "config": json.dumps(dict(config or {}),
                                                                 sort_keys=True)}
    for key, value in (extra_metadata or {}).items():
        if key in meta:
            raise ValueError(f"extra_metadata may not override {key!r}")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    # safetensors refuses tensors that share memory: save independent contiguous copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in
               model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(_canonical(save(tensors, metadata=meta)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _canonical(blob: bytes) -> bytes:
    """The same safetensors bytes with a header in a fixed order (metadata keys sorted).

    safetensors writes its metadata in hash-map order, so two saves of the same weights would
    differ byte for byte; a canonical header makes a checkpoint's sha256 reproducible.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata with ``config`` (and other JSON values) decoded; ``{}`` if none.

    For ``.pt`` files: the non-tensor entries ``arch``/``config``/... of a wrapping dict.
    """
    path = Path(path)
    _check_exists(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file "
                                  f"({err})") from err
        meta: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                meta[key] = value if key in ("arch", "format") else json.loads(value)
            except (json.JSONDecodeError, TypeError):
                meta[key] = value
        return meta
    return read_state_dict(path)[1]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: not a readable PyTorch file "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a .safetensors or .pt/.pth checkpoint, on the CPU."""
    path = Path(path)
    _check_exists(path)
    if _is_safetensors(path):
        meta = read_metadata(path)
        return _load_safetensors(path), meta
    obj = _torch_load(path)
    meta = {}
    if isinstance(obj, nn.Module):  # not reachable with weights_only=True, kept for clarity
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                meta = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or a "
                              "dict with one under 'state_dict' or 'model')")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    if isinstance(meta.get("config"), str):
        try:
            meta["config"] = json.loads(meta["config"])
        except json.JSONDecodeError:
            pass
    return state, meta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt safetensors data "
                              f"({err})") from err


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a checkpoint's tensors; for safetensors from the header alone.

    Reading no tensor data lets :func:`load_checkpoint` compare a file with what its metadata
    asks for before anything is allocated (``.pt`` files have no header: they are loaded).
    """
    path = Path(path)
    _check_exists(path)
    if not _is_safetensors(path):
        return {k: tuple(v.shape) for k, v in read_state_dict(path)[0].items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file "
                              f"({err})") from err


def _kind_of(default: Any) -> str | None:
    """The kind of value a builder argument takes, judged from its default (None: unchecked)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, (tuple, list)) and all(isinstance(v, int) for v in default):
        return "ints"
    return None


def _value_ok(kind: str, value: Any) -> bool:
    """Whether ``value`` fits ``kind``; sizes and counts must be positive (bool is no int)."""
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return positive_int(value)
    if kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value > 0)
    return isinstance(value, (list, tuple)) and all(positive_int(v) for v in value)


_KIND_TEXT = {"bool": "true or false", "int": "a positive integer", "float": "a positive number",
              "ints": "a list of positive integers"}


def check_config(arch: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as a dict, after checking it against ``arch``'s builder; raises ValueError.

    For the project's own architectures each key must be an argument of the builder and each
    value of the kind its default has (``num_classes`` a positive int, ``hidden`` a list of
    positive ints, ...), so a wrong type is one message naming the key, not a TypeError from
    deep inside torch.  timm/torchvision builders take ``**kwargs``: only the key type is checked.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a JSON object / dict, got {type(config).__name__}")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"config keys must be strings, got {bad_keys[0]!r}")
    if arch not in ARCHITECTURES:
        return dict(config)
    params = inspect.signature(ARCHITECTURES[arch]).parameters
    valid = sorted(params)
    for key, value in config.items():
        if key not in params:
            raise ValueError(f"unknown config key {key!r} for architecture {arch!r} (valid "
                             f"keys: {', '.join(valid)})")
        kind = _kind_of(params[key].default)
        if kind is not None and not _value_ok(kind, value):
            raise ValueError(f"config key {key!r} of architecture {arch!r} must be "
                             f"{_KIND_TEXT[kind]}, got {type(value).__name__} {value!r}")
    return dict(config)


def _arch_and_config(path: Path, meta: Mapping[str, Any], arch: str | None,
                     config: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The architecture and checked config to build: the arguments, else the metadata's."""
    arch = arch or meta.get("arch")
    if not arch:
        raise CheckpointError(f"{path} does not name its architecture; pass arch= (and "
                              "config=), on the command line --arch timm:NAME, "
                              "torchvision:NAME or a pleas architecture (and --arch-config)")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: the architecture must be a name, got {arch!r}")
    if config is None:
        config = meta.get("config") or {}
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{path}: metadata 'config' is not a JSON object: {config!r}")
    try:
        return arch, check_config(arch, config)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _build(path: Path, arch: str, config: dict[str, Any]) -> nn.Module:
    """``build_model(arch, **config)``; a builder that refuses the config is a CheckpointError."""
    try:
        return build_model(arch, **config)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot build architecture {arch!r} with config "
                              f"{config}: {err}") from err


def _expected_shapes(path: Path, arch: str, config: dict[str, Any]
                     ) -> tuple[dict[str, tuple[int, ...]], nn.Module | None]:
    """The state-dict shapes ``arch(**config)`` has, from a model built on the ``meta`` device.

    Meta tensors have shapes and no storage, so a config asking for 10**9 hidden units costs
    nothing here and is refused by the comparison with the file before any real allocation.
    Should a builder not work on the meta device (it reads a tensor's values), the model is
    built for real instead and returned, as load_checkpoint did before this check existed.
    """
    try:
        with torch.device("meta"):
            model = build_model(arch, **config)
    except (ValueError, TypeError, AssertionError) as err:
        raise CheckpointError(f"{path}: cannot build architecture {arch!r} with config "
                              f"{config}: {err}") from err
    except (NotImplementedError, RuntimeError):
        model = _build(path, arch, config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, None


def _check_against(path: Path, arch: str, config: dict[str, Any],
                   expected: Mapping[str, tuple[int, ...]],
                   found: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensor names or shapes differ from what the architecture expects."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
        raise CheckpointError(f"{path} does not match architecture {arch!r} "
                              f"{config}: " + "; ".join(parts))
    bad = [f"{k} (expected {tuple(v)}, got {tuple(found[k])})"
           for k, v in expected.items() if tuple(v) != tuple(found[k])]
    if bad:
        more = f" (and {len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        want = sum(math.prod(v) for v in expected.values())
        have = sum(math.prod(v) for v in found.values())
        raise CheckpointError(f"{path}: shape mismatch for architecture {arch!r} "
                              f"{config}: " + "; ".join(bad[:_SHOW]) + more +
                              f"; the config implies {want:,} values, the file holds {have:,}")


def load_checkpoint(path: str | os.PathLike, arch: str | None = None,
                    config: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
                    ) -> nn.Module:
    """Build the checkpoint's architecture, load and check its weights; returns it in eval mode.

    ``arch``/``config`` default to the checkpoint's metadata.  Raises :class:`CheckpointError`
    for a missing or unreadable file, an unknown architecture, a config value of the wrong
    type, missing or unexpected keys, shape mismatches and non-finite weights.  Names and
    shapes are compared (safetensors: from the header) with a model built on the ``meta``
    device before any weights are read or any model allocated, so metadata asking for a huge
    model is refused cheaply.
    """
    path = Path(path)
    if _is_safetensors(path):
        meta, found, state = read_metadata(path), read_shapes(path), None
    else:
        state, meta = read_state_dict(path)
        found = {k: tuple(v.shape) for k, v in state.items()}
    arch, config = _arch_and_config(path, meta, arch, config)
    expected, model = _expected_shapes(path, arch, config)
    _check_against(path, arch, config, expected, found)
    if state is None:
        state = _load_safetensors(path)
    nonfinite = [k for k, v in state.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{path}: non-finite (NaN/inf) values in {_names(nonfinite)}")
    model = model if model is not None else _build(path, arch, config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
