"""``pleas.run(config)``: what ``python -m pleas.merge`` does, as a library call.

The steps, each a public function the experiments reuse: resolve the models
(:func:`load_sides`), pick the merge data (:func:`merge_data`: the given task / folder, the
proxy images, or both models' training tasks), merge with the configured method (its record in
:mod:`pleas.methods` says which family and what it needs), evaluate on the models' test sets
(:func:`evaluate`), and write the merged model and its report (:func:`output_path`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import MergeConfig, _check_width_for
from .errors import MergeError
from .heads import ModelSide, all_task_names, model_label
from .heads import task_names as _task_names


@dataclass
class RunResult:
    """The merged model, its report, and where it was written."""

    model: Any
    report: dict
    out: Path
    written: bool = True  # False on the ranks of a torchrun group that do not write


def as_config(config: MergeConfig | Mapping[str, Any] | None = None, **options: Any
              ) -> MergeConfig:
    """A MergeConfig from a config, a mapping (flat or mergekit style) or keyword options."""
    if config is None:
        config = MergeConfig()
    elif isinstance(config, Mapping):
        config = MergeConfig.from_mapping(config)
    elif not isinstance(config, MergeConfig):
        raise MergeError(f"config must be a MergeConfig or a mapping, got "
                         f"{type(config).__name__}")
    return config.with_options(**options) if options else config


def check_request(config: MergeConfig) -> None:
    """Everything about the request that can be checked before loading anything."""
    method = config.merge_method
    k = len(config.models)
    if k < 2:
        raise MergeError(f"give at least two models (built-in names or checkpoint files); got "
                         f"{k}")
    if method.family == "task_vector" and k != 2:
        raise MergeError(f"{method.name} merges two models with their common base; got {k} "
                         "models (PLeaS and the alignment baselines merge any number)")
    if config.width is not None:
        _check_width_for(method, config.width, given=True, models=k)
    if method.needs_base and not config.base:
        raise MergeError(f"{method.name} needs the models' common base: --base CHECKPOINT")
    if config.no_data and (config.data or config.proxy_data):
        raise MergeError("--no-data contradicts --data / --proxy-data: give one of them")
    if config.no_data and method.requires_data(config.matching):
        raise MergeError(f"--no-data: {method.name} needs data (least squares, activation "
                         "statistics or the method itself); use --matching weight with permute, "
                         "zip, average or ensemble, or drop --no-data")
    if method.proxy_data and not (config.proxy_data or config.data):
        raise MergeError(f"{method.name} merges on proxy images: give --proxy-data (an unrelated "
                         "task or image folder)")
    if method.family == "task_vector":
        allowed = {p.name for p in method.params}
        unknown = sorted(set(config.params) - allowed)
        if unknown:
            raise MergeError(f"unknown parameter(s) {unknown} for method {method.name!r}; it "
                             f"takes {', '.join(sorted(allowed))}")
    elif config.params:
        raise MergeError(f"{method.name} takes no --param values (they are for the task-vector "
                         "methods)")
    if config.eval_data and not Path(config.eval_data).expanduser().exists():
        raise MergeError(f"--eval-data {config.eval_data}: no such image folder or dataset")
    check_device(config.device)


def check_device(device: str) -> None:
    """The device exists here (``cuda`` without a GPU is a clear error, not a crash later)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeError(f"device {device!r} asked for, but no CUDA GPU is available here; "
                             "use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise MergeError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MergeError("device 'mps' asked for, but MPS is not available here")


def check_heads(config: MergeConfig, *sides: ModelSide) -> None:
    """A shared head over several label spaces is refused before the statistics pass (the
    class counts are checked again once the spec knows the heads)."""
    if config.heads != "shared":
        return
    a = sides[0]
    for k, b in enumerate(sides[1:], 1):
        if a.label_space and b.label_space and a.label_space != b.label_space:
            raise MergeError(f"--heads shared, but the label spaces differ: {a.label_space!r} "
                             f"vs {b.label_space!r}; use --heads separate (or auto)")
        if a.classes and b.classes and len(a.classes) != len(b.classes):
            raise MergeError(f"--heads shared, but model A has {len(a.classes)} classes and "
                             f"model {model_label(k)} {len(b.classes)}; use --heads separate "
                             "(or auto)")


def load_sides(config: MergeConfig) -> list[ModelSide]:
    """The configured models, loaded on the configured device, with what is known of them."""
    from . import zoo

    sides = []
    for i, spec in enumerate(config.models):
        model, info = zoo.resolve(spec, arch=config.arch, device=config.device,
                                  arch_config=config.arch_config)
        sides.append(ModelSide.of(model, info, f"model_{model_label(i).lower()}"))
    return sides


def preprocess_of(side: ModelSide):
    """The model's :class:`pleas.preprocess.Preprocess`: its own (timm / torchvision / a pleas
    checkpoint's metadata), else the zoo's for its config (28 px gray unless it says more)."""
    from .preprocess import zoo_default

    if side.preprocess is not None:
        return side.preprocess
    cfg = dict(side.config or {})
    return zoo_default(int(cfg.get("img_size", 28)), int(cfg.get("in_chans", 1)))


def common_preprocess(*sides: ModelSide):
    """The one preprocessing all models expect; different ones stop the merge, naming both
    (merging on one model's images would silently feed the other what it was not trained on)."""
    a, pa = sides[0], preprocess_of(sides[0])
    for k, b in enumerate(sides[1:], 1):
        pb = preprocess_of(b)
        if pa != pb:
            raise MergeError(f"the models expect different preprocessing: model A ({a.name}): "
                             f"{pa.describe()} [{pa.source}]; model {model_label(k)} "
                             f"({b.name}): {pb.describe()} [{pb.source}]; merge models that "
                             "take the same input")
    return pa


def input_size(side: ModelSide) -> tuple[int, int]:
    """(image size, channels) a model expects (its preprocessing's height, channels)."""
    prep = preprocess_of(side)
    return prep.size[0], prep.channels


def merge_data(config: MergeConfig, *sides: ModelSide, size: int, channels: int):
    """``(images, description)``: the proxy or given data, else the models' training tasks.

    ``batches x batch_size`` images in all; an equal share from each distinct task, shuffled
    together with the config's seed.
    """
    from .data import ImageSet

    prep = preprocess_of(sides[0])
    n = config.batches * config.batch_size
    source = config.proxy_data or config.data
    if source:
        data = read_data(source, "train", prep, size, channels, n, config.workers)
        return data, f"{'proxy ' if config.proxy_data else ''}{source}"
    if not all(s.task for s in sides):
        raise MergeError("no merge data: the models do not name their tasks; pass --data (a task "
                         "or an image folder), --proxy-data, or --no-data")
    tasks = list(dict.fromkeys(s.task for s in sides))
    share = n // len(sides)  # per model: a task two models share gets both shares
    parts = [read_data(t, "train", prep, size, channels,
                       share * sum(s.task == t for s in sides), 0) for t in tasks]
    images = torch.cat([p.images for p in parts])
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    return (ImageSet(images[perm][:n], None, [], "+".join(p.name for p in parts)),
            " + ".join(tasks) + " (train)")


def _is_zoo_input(prep) -> bool:
    """The zoo's preprocessing: images read in memory by :func:`pleas.data.resolve_data`."""
    return prep.is_zoo_normalisation and prep.crop_mode == "squash" and prep.size[0] == \
        prep.size[1]


def read_data(source: str, split: str, prep, size: int, channels: int, limit: int | None,
              workers: int):
    """A task or a path, as the model expects it: the zoo's preprocessing reads it into memory
    (``limit`` images, as before); any other streams a path through ``prep`` (only ``limit``
    images are ever decoded, a few batches at a time) and renormalises a built-in task."""
    from pathlib import Path

    from .data import TASKS, ImageSet, resolve_data
    from .preprocess import renormalise
    from .stream import open_images

    if _is_zoo_input(prep):
        return resolve_data(source, split, size=size, channels=channels, limit=limit)
    if source.partition(":")[0] in {t.partition(":")[0] for t in TASKS} \
            and not Path(source).exists():
        if prep.size[0] != prep.size[1]:
            raise MergeError(f"task {source!r} is square; the model expects "
                             f"{prep.describe()}: give an image folder (--data PATH)")
        data = resolve_data(source, split, size=prep.size[0], channels=prep.channels,
                            limit=limit)
        return ImageSet(renormalise(data.images, prep), data.labels, data.classes, data.name)
    stream = open_images(source, prep, split, workers)
    return stream if limit is None else stream.subset(limit)


def labelled_data(config: MergeConfig, a: ModelSide, b: ModelSide) -> list:
    """A few labelled images of each model's task (Sens-Merging's gradients)."""
    from .data import load_task

    if not (a.task and b.task):
        raise MergeError(f"{config.method} needs labelled data of each task: the models name "
                         "no task")
    n = config.batches * config.batch_size // 2
    return [load_task(a.task, "train").subset(n, seed=config.seed),
            load_task(b.task, "train").subset(n, seed=config.seed)]


def _merge_alignment(config: MergeConfig, sides: list[ModelSide], data, data_name: str,
                     size: int, channels: int, shard):
    from .pipeline import build, prepare_models

    method, progress = config.merge_method, not config.quiet and shard.writes
    prep = prepare_models(sides, data, device=config.device, batch_size=config.batch_size,
                          max_batches=config.batches, positions=config.positions,
                          seed=config.seed, methods=[method], matching=config.matching,
                          progress=progress, data_name=data_name,
                          input_shape=preprocess_of(sides[0]).input_size, shard=shard)
    merged, report = build(prep, config.width_for(len(sides)), method, config.matching,
                           config.allocation, config.heads, config.ridge, config.seed,
                           progress=progress, max_cache_gb=config.max_cache_gb,
                           float64_products=config.float64_products,
                           unit_multiple=config.unit_multiple, layout=config.layout)
    return merged, report, prep.device


def _merge_task_vectors(config: MergeConfig, a: ModelSide, b: ModelSide, data):
    from . import zoo
    from .task_vectors import merge_with_base

    method = config.merge_method
    base = zoo.resolve(config.base, arch=config.arch, device=config.device,
                       arch_config=config.arch_config)[0] \
        if config.base else None
    labelled = labelled_data(config, a, b) if method.needs_labelled else None
    t0 = time.perf_counter()
    merged, report = merge_with_base(
        method.name, a, b, base, data=data, labelled=labelled, heads=config.heads,
        task_names=_task_names(a, b), batch_size=config.batch_size, max_batches=config.batches,
        device=config.device, progress=not config.quiet, **config.params)
    report.setdefault("width", {"requested": 1.0, "achieved": 1.0})
    report.setdefault("seconds", {})["merge"] = round(time.perf_counter() - t0, 4)
    return merged, report, config.device


def evaluate(merged, *sides: ModelSide, size: int, channels: int, device: str,
             limit: int | None = None) -> dict[str, dict[str, float | None]]:
    """Test accuracy per task of each model, their ensemble and the merged model (as the CLI
    prints): ``{task: {model_a, model_b, ..., ensemble, merged}}``.

    Separate heads: each task with its own model's head (the ensemble column is that model;
    the other models have no head for it: null); a shared head: every task with the one head,
    the ensemble averaging all models' logits.
    """
    from .evaluate import accuracy_from_logits, predict_logits

    results: dict[str, dict[str, float | None]] = {}
    shared = not merged.multi_head
    heads = all_task_names(list(sides))
    keys = [f"model_{model_label(k).lower()}" for k in range(len(sides))]
    for owner, (side, head) in enumerate(zip(sides, heads)):
        task = side.task
        if task is None or task in results:
            continue
        test = read_data(task, "test", preprocess_of(sides[0]), size, channels, None, 0)
        if limit:
            test = test.subset(limit, seed=0)
        logits = [predict_logits(s.model, test, device) if (shared or k == owner) else None
                  for k, s in enumerate(sides)]
        lm = predict_logits(merged, test, device, task=None if shared else head)
        row = {key: None if lg is None else accuracy_from_logits(lg, test.labels)
               for key, lg in zip(keys, logits)}
        if shared:
            row["ensemble"] = accuracy_from_logits(sum(logits) / len(logits), test.labels)
        else:
            row["ensemble"] = row[keys[owner]]
        row["merged"] = accuracy_from_logits(lm, test.labels)
        results[task] = {k: (None if v is None else round(v, 2)) for k, v in row.items()}
    return results


def model_entries(config: MergeConfig, sides: list[ModelSide], report: dict) -> list[dict]:
    """The report's ``models``: per model its source, name, task, head, and its units in each
    group (the merged ones, which all models share, plus its own kept ones)."""
    heads = all_task_names(sides) if report.get("heads") == "separate" else [None] * len(sides)
    out = []
    for k, (source, side, head) in enumerate(zip(config.models, sides, heads)):
        units = {g["name"]: g["merged"] + g["kept"][k] for g in report.get("groups", [])
                 if "kept" in g}
        out.append({"label": model_label(k).lower(), "source": source, "name": side.name,
                    "task": side.task, "head": head, "units": units})
    return out


def head_size(side: ModelSide, prep) -> int:
    """The number of classes of a model's head (its class names, its config, else one forward
    pass on a blank input)."""
    if side.classes:
        return len(side.classes)
    if isinstance(side.config.get("num_classes"), int) and side.config["num_classes"] > 0:
        return side.config["num_classes"]
    param = next(side.model.parameters(), None)
    with torch.no_grad():
        x = torch.zeros(1, *prep.input_size, device=None if param is None else param.device)
        return int(side.model.eval()(x).shape[-1])


def eval_data_plan(config: MergeConfig, sides: list[ModelSide], prep):
    """``(stream, owners)`` for ``--eval-data``: the labelled folder (nothing decoded yet) and
    the models (indices) whose heads it fits (same class count, and the same class names in the
    same order where a model knows its names); checked before the merge, so a mismatch costs
    nothing."""
    from .stream import open_images

    stream = open_images(config.eval_data, prep, "test", config.workers)
    if stream.labels is None:
        raise MergeError(f"--eval-data {config.eval_data}: no labels (expected one subfolder per "
                         "class, or a dataset with a label column)")
    shown = ", ".join(stream.classes[:6]) + (" ..." if stream.num_classes > 6 else "")
    owners, sizes = [], []
    for k, side in enumerate(sides):
        who = model_label(k)
        n = head_size(side, prep)
        sizes.append(f"model {who} ({side.name}) {n}")
        if n != stream.num_classes:
            continue
        if side.classes and list(side.classes) != stream.classes:
            theirs = ", ".join(side.classes[:6]) + (" ..." if len(side.classes) > 6 else "")
            raise MergeError(f"--eval-data {config.eval_data}: its classes ({shown}) are not "
                             f"model {who}'s ({theirs}), in order")
        owners.append(k)
    if not owners:
        raise MergeError(f"--eval-data {config.eval_data} has {stream.num_classes} classes "
                         f"({shown}); the heads have {' and '.join(sizes)}")
    return stream, owners


@torch.no_grad()
def evaluate_stream(merged, sides: list[ModelSide], stream, owners: list[int], device: str,
                    name: str, batch_size: int = 256) -> dict[str, dict[str, float | None]]:
    """Accuracy on a streamed labelled folder, one pass over it: a shared head gives one row
    (every model, their ensemble, merged); separate heads a row per head that fits the
    folder."""
    from .evaluate import accuracy_from_logits

    shared = not merged.multi_head
    heads = all_task_names(sides)
    keys = [f"model_{model_label(k).lower()}" for k in range(len(sides))]
    run = range(len(sides)) if shared else owners
    logits: dict[Any, list] = {}
    for x, _ in stream.loader(batch_size):
        x = x.to(device)
        for k in run:
            logits.setdefault(k, []).append(sides[k].model(x).float().cpu())
            out = merged(x) if shared else merged.logits_for(x, heads[k])
            logits.setdefault(("merged", k), []).append(out.float().cpu())
    labels = stream.labels
    cat = {k: torch.cat(v) for k, v in logits.items()}
    acc = {k: accuracy_from_logits(v, labels) for k, v in cat.items()}
    if shared:
        row = {key: acc[k] for k, key in enumerate(keys)}
        row["ensemble"] = accuracy_from_logits(sum(cat[k] for k in run) / len(sides), labels)
        row["merged"] = acc[("merged", 0)]
        return {name: {k: round(v, 2) for k, v in row.items()}}
    out = {}
    for owner in owners:
        row = {key: (acc[k] if k == owner else None) for k, key in enumerate(keys)}
        row["ensemble"], row["merged"] = acc[owner], acc[("merged", owner)]
        key = name if len(owners) == 1 else f"{name} [{heads[owner]}]"
        out[key] = {k: (None if v is None else round(v, 2)) for k, v in row.items()}
    return out


def output_path(config: MergeConfig) -> Path:
    """``--out``, else ``runs/<a>+<b>-<method>-w<width>``."""
    if config.out:
        return Path(config.out)
    stems = "+".join(Path(m).stem for m in config.models)
    width = config.width_for(len(config.models))
    return Path("runs") / f"{stems}-{config.merge_method.name}-w{width:g}"


def replaces_output(config: MergeConfig) -> bool:
    """May an earlier pleas output at the output path be replaced?  With ``overwrite``, or at
    the default path (``runs/...``, a name pleas chose), so that the same command can be run
    again.  Anything that is not an earlier pleas output is never replaced."""
    return config.overwrite or config.out is None


def run(config: MergeConfig | Mapping[str, Any] | None = None, **options: Any) -> RunResult:
    """Merge as the command line does: load, pick data, merge, evaluate, write; see module doc.

    ``config`` is a :class:`MergeConfig` or a mapping; keyword ``options`` override it.
    """
    from .distributed import from_environment
    from .merged import save_merged
    from .output import check_output

    config = as_config(config, **options)
    check_request(config)
    out = output_path(config)
    overwrite = replaces_output(config)
    shard = from_environment(config.device)  # torchrun: this process's share of the data
    if shard.writes:
        check_output(out, overwrite, config.report)  # before any expensive work
    if not shard.alone and config.merge_method.family == "task_vector":
        raise MergeError(f"{config.method} runs in one process; start it without torchrun")
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    sides = load_sides(config)
    check_heads(config, *sides)
    prep = common_preprocess(*sides)
    size, channels = input_size(sides[0])
    plan = eval_data_plan(config, sides, prep) if config.eval and config.eval_data else None
    if config.no_data:
        data, data_name = None, "none"
    else:
        data, data_name = merge_data(config, *sides, size=size, channels=channels)
    if config.merge_method.family == "task_vector":
        merged, report, device = _merge_task_vectors(config, *sides, data)
    else:
        merged, report, device = _merge_alignment(config, sides, data, data_name, size,
                                                  channels, shard)
    report["models"] = model_entries(config, sides, report)
    report["preprocess"] = prep.to_dict()
    report["processes"] = shard.world
    if not shard.writes:  # another rank of a torchrun group: rank 0 evaluates and writes
        return RunResult(merged, report, out, written=False)
    if config.eval:
        t0 = time.perf_counter()
        report["accuracy"] = evaluate(merged, *sides, size=size, channels=channels,
                                      device=device, limit=config.eval_limit)
        if plan is not None:
            report["accuracy"].update(evaluate_stream(
                merged, sides, *plan, device, Path(config.eval_data).name))
        report["seconds"]["evaluation"] = round(time.perf_counter() - t0, 4)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 4)
    if not merged.description.get("arch"):
        merged.description["arch"], merged.description["config"] = sides[0].arch, \
            sides[0].config
    merged.description["preprocess"] = prep.to_dict()
    # the folder and the --report copy in one step: both or neither (pleas.output.publish)
    save_merged(merged, out, overwrite=overwrite,
                extra_files={"report.json": json.dumps(report, indent=2)}, report=config.report)
    report["out"] = str(out)
    return RunResult(merged, report, out)
