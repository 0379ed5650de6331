"""Command line: ``python -m pleas.merge MODEL_A MODEL_B --width W`` (also ``pleas merge``).

MODEL is a built-in zoo name or a checkpoint file.  Writes the merged model (safetensors +
merged.json) and report.json into ``--out``, atomically, and prints an accuracy table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .pipeline import MATCHINGS, METHODS, MergeError, ModelSide, build, prepare
from .plan import ALLOCATORS, check_width

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare", "sens", "dam")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pleas.merge",
        description="Merge two image classifiers of the same architecture with PLeaS "
                    "(permutations + least squares) into one model of the chosen width.")
    p.add_argument("model_a", nargs="?", help="built-in model name or checkpoint file")
    p.add_argument("model_b", nargs="?", help="built-in model name or checkpoint file")
    p.add_argument("--config", help="YAML/JSON file describing the merge (CLI flags override it)")
    p.add_argument("--width", type=float, default=None,
                   help="compute budget in [1, 2]: merged MACs / one model's MACs (default 1.5)")
    p.add_argument("--method", choices=METHODS + TASK_VECTOR_METHODS, default=None,
                   help="merge method (default pleas); task-vector methods need --base")
    p.add_argument("--base", help="common base checkpoint of A and B (task-vector methods)")
    p.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="hyper-parameter of a task-vector method, e.g. lam=0.5, density=0.2, "
                        "p=0.5, steps=200 (repeatable)")
    p.add_argument("--matching", choices=MATCHINGS, default=None,
                   help="how units are paired (default activation)")
    p.add_argument("--allocation", choices=ALLOCATORS, default=None,
                   help="how the budget is spread over groups (default uniform)")
    p.add_argument("--heads", choices=("auto", "shared", "separate"), default=None,
                   help="one head for a shared label space, or one head per model")
    p.add_argument("--data", help="merge data: a task name (e.g. fashion_mnist) or an image "
                                  "folder / saved dataset (default: both models' training tasks)")
    p.add_argument("--proxy-data", help="data-free PLeaS: proxy images unrelated to the tasks")
    p.add_argument("--no-data", action="store_true",
                   help="merge without any data (weight matching, no least squares, no BN reset)")
    p.add_argument("--arch", help="architecture of checkpoint files without metadata")
    p.add_argument("--batches", type=int, default=None, help="number of merge batches (default 16)")
    p.add_argument("--batch-size", type=int, default=None, help="merge batch size (default 64)")
    p.add_argument("--positions", type=int, default=None,
                   help="positions sampled per image for least squares (0 = all; default 64)")
    p.add_argument("--least-squares", dest="least_squares", choices=("sequential", "closed"),
                   default=None, help="sequential: each layer fitted on the merged model's own "
                   "inputs (one pass per layer, more accurate); closed: one pass, solves only "
                   "(default sequential)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--out", help="output folder (default runs/<a>+<b>-<method>-w<width>)")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--eval", dest="eval", action="store_true", default=None,
                   help="evaluate on the models' test sets (default on)")
    p.add_argument("--no-eval", dest="eval", action="store_false")
    p.add_argument("--eval-limit", type=int, default=None, help="test images per task")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


DEFAULTS: dict[str, Any] = dict(width=1.5, method="pleas", matching="activation",
                                allocation="uniform", heads="auto", batches=16, batch_size=64,
                                positions=64, seed=0, device="cpu", eval=True,
                                least_squares="sequential")


def read_config(path: str) -> dict[str, Any]:
    """Flat keys (model_a, width, method, ...) or mergekit-style models/merge_method/parameters."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise MergeError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise MergeError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(raw, dict):
        raise MergeError(f"config file {path} must hold a mapping")
    cfg = dict(raw)
    if "models" in cfg:
        models = cfg.pop("models")
        if not isinstance(models, list) or len(models) != 2:
            raise MergeError("config 'models' must list exactly two models")
        names = [m["model"] if isinstance(m, dict) else m for m in models]
        cfg["model_a"], cfg["model_b"] = names
    if "merge_method" in cfg:
        cfg["method"] = cfg.pop("merge_method")
    cfg.update(cfg.pop("parameters", None) or {})
    known = set(DEFAULTS) | {"model_a", "model_b", "data", "proxy_data", "no_data", "arch", "out",
                             "report", "eval_limit", "quiet", "base", "params"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise MergeError(f"config file {path}: unknown keys {unknown}")
    return cfg


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    if args.config:
        opts.update(read_config(args.config))
    for k, v in vars(args).items():
        if v is not None and v is not False and k != "config":
            opts[k] = v
    if args.eval is False:
        opts["eval"] = False
    for k in ("model_a", "model_b"):
        if not opts.get(k):
            raise MergeError(f"missing {k.replace('_', ' ')}: give two models (built-in names "
                             "or checkpoint files) or a --config")
    if opts["method"] in TASK_VECTOR_METHODS:
        if args.width is not None and float(args.width) != 1.0:
            raise MergeError(f"{opts['method']} merges into one model of the same size: "
                             "width must be 1")
        opts["width"] = 1.0
        if not opts.get("base"):
            raise MergeError(f"{opts['method']} needs the models' common base: --base CHECKPOINT")
    check_width(float(opts["width"]))
    if opts["method"] not in METHODS + TASK_VECTOR_METHODS:
        raise MergeError(f"unknown method {opts['method']!r}")
    opts["params"] = _parse_params(opts.get("param") or [], opts.get("params") or {})
    if opts.get("positions") == 0:
        opts["positions"] = None
    return opts


def _parse_params(items: list[str], given: dict) -> dict[str, Any]:
    """KEY=VALUE strings (numbers parsed) merged over a config's ``params`` mapping."""
    import yaml

    out = dict(given)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergeError(f"--param expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _run_task_vectors(opts: dict, a: ModelSide, b: ModelSide, data, progress: bool):
    """A task-vector merge (--base): returns the merged model and its report."""
    from types import SimpleNamespace

    from . import zoo
    from .data import load_task
    from .pipeline import task_names
    from .task_vectors import merge_with_base

    base, _ = zoo.resolve(opts["base"], arch=opts.get("arch"), device=opts["device"])
    names = task_names(SimpleNamespace(a=a, b=b))
    labelled = None
    if opts["method"] == "sens":
        if not (a.task and b.task):
            raise MergeError("sens needs labelled data of each task: the models name no task")
        n = opts["batches"] * opts["batch_size"] // 2
        labelled = [load_task(a.task, "train").subset(n, seed=opts["seed"]),
                    load_task(b.task, "train").subset(n, seed=opts["seed"])]
    return merge_with_base(opts["method"], a, b, base, data=data, labelled=labelled,
                           heads=opts["heads"], task_names=names, batch_size=opts["batch_size"],
                           max_batches=opts["batches"], device=opts["device"],
                           progress=progress, **opts["params"])


def _merge_data(opts: dict, a: ModelSide, b: ModelSide, size: int, channels: int):
    from .data import ImageSet, resolve_data

    n = opts["batches"] * opts["batch_size"]
    source = opts.get("proxy_data") or opts.get("data")
    if source:
        data = resolve_data(source, "train", size=size, channels=channels, limit=n)
        return data, f"{'proxy ' if opts.get('proxy_data') else ''}{source}"
    if not (a.task and b.task):
        raise MergeError("no merge data: the models do not name their tasks; pass --data (a task "
                         "or an image folder), --proxy-data, or --no-data")
    parts = [resolve_data(t, "train", size=size, channels=channels, limit=n // 2)
             for t in dict.fromkeys([a.task, b.task])]
    images = torch.cat([p.images for p in parts])
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(opts["seed"]))
    return ImageSet(images[perm][:n], None, [], "+".join(p.name for p in parts)), \
        " + ".join(dict.fromkeys([a.task, b.task])) + " (train)"


def _input_size(model: torch.nn.Module, info) -> tuple[int, int]:
    cfg = dict(getattr(info, "config", None) or {})
    return int(cfg.get("img_size", 28)), int(cfg.get("in_chans", 1))


def evaluate(merged, prep, opts, size: int, channels: int) -> dict[str, dict[str, float | None]]:
    from .data import load_task
    from .evaluate import accuracy_from_logits, predict_logits
    from .pipeline import task_names

    a, b = prep.a, prep.b
    results: dict[str, dict[str, float | None]] = {}
    shared = not merged.multi_head
    ta, tb = task_names(prep)
    tasks = [(a.task, ta, "a"), (b.task, tb, "b")]
    for task, head, owner in tasks:
        if task is None or task in results:
            continue
        test = load_task(task, "test").adapt(size, channels)
        if opts.get("eval_limit"):
            test = test.subset(opts["eval_limit"], seed=0)
        dev = prep.device
        la = predict_logits(a.model, test, dev) if (shared or owner == "a") else None
        lb = predict_logits(b.model, test, dev) if (shared or owner == "b") else None
        lm = predict_logits(merged, test, dev, task=None if shared else head)
        row = {"model_a": None if la is None else accuracy_from_logits(la, test.labels),
               "model_b": None if lb is None else accuracy_from_logits(lb, test.labels)}
        if shared:
            row["ensemble"] = accuracy_from_logits((la + lb) / 2, test.labels)
        else:
            row["ensemble"] = row["model_a"] if owner == "a" else row["model_b"]
        row["merged"] = accuracy_from_logits(lm, test.labels)
        results[task] = {k: (None if v is None else round(v, 2)) for k, v in row.items()}
    return results


def format_table(acc: dict[str, dict[str, float | None]]) -> str:
    cols = ["model_a", "model_b", "ensemble", "merged"]
    lines = [f"{'task':<22}" + "".join(f"{c:>10}" for c in cols)]
    for task, row in acc.items():
        cells = "".join(f"{'-' if row[c] is None else f'{row[c]:.2f}':>10}" for c in cols)
        lines.append(f"{task:<22}{cells}")
    return "\n".join(lines)


def run(opts: dict[str, Any]) -> dict:
    from . import zoo

    t_start = time.perf_counter()
    torch.manual_seed(opts["seed"])
    progress = not opts.get("quiet")
    model_a, info_a = zoo.resolve(opts["model_a"], arch=opts.get("arch"), device=opts["device"])
    model_b, info_b = zoo.resolve(opts["model_b"], arch=opts.get("arch"), device=opts["device"])
    a, b = ModelSide.of(model_a, info_a, "model_a"), ModelSide.of(model_b, info_b, "model_b")
    size, channels = _input_size(model_a, info_a)
    tv = opts["method"] in TASK_VECTOR_METHODS
    if opts.get("no_data") and tv:
        if opts["method"] in ("sens", "dam"):
            raise MergeError(f"{opts['method']} needs data; drop --no-data")
        data, data_name = None, "none"
    elif opts.get("no_data"):
        if opts["method"] in ("pleas", "regmean") or opts["matching"] == "activation":
            raise MergeError("--no-data works with --matching weight and methods permute, zip, "
                             "average or ensemble (least squares and activations need data)")
        data, data_name = torch.zeros(2, channels, size, size), "none (shape only)"
    else:
        data, data_name = _merge_data(opts, a, b, size, channels)
    if tv:
        t0 = time.perf_counter()
        merged, report = _run_task_vectors(opts, a, b, data, progress)
        report.setdefault("width", {"requested": 1.0, "achieved": 1.0})
        report.setdefault("seconds", {})["merge"] = round(time.perf_counter() - t0, 4)
        from types import SimpleNamespace
        return _finish(opts, merged, report, SimpleNamespace(a=a, b=b, device=opts["device"]),
                       size, channels, t_start)
    need_ls = opts["method"] in ("pleas", "regmean")
    prep = prepare(a, b, data, device=opts["device"], batch_size=opts["batch_size"],
                   max_batches=opts["batches"], activations=opts["matching"] == "activation",
                   least_squares=need_ls, progress=progress, data_name=data_name,
                   positions=opts["positions"], seed=opts["seed"],
                   closed_form=opts["method"] == "regmean" or opts["least_squares"] == "closed")
    if opts.get("no_data"):
        prep.batches = []
    merged, report = build(prep, float(opts["width"]), opts["method"], opts["matching"],
                           opts["allocation"], opts["heads"], seed=opts["seed"], progress=progress,
                           sequential=opts["least_squares"] == "sequential")
    return _finish(opts, merged, report, prep, size, channels, t_start)


def _finish(opts: dict, merged, report: dict, prep, size: int, channels: int,
            t_start: float) -> dict:
    """Evaluate (optionally), then write the model and the report atomically."""
    from .merged import save_merged

    report["models"] = {"a": str(opts["model_a"]), "b": str(opts["model_b"])}
    if opts.get("eval"):
        t0 = time.perf_counter()
        report["accuracy"] = evaluate(merged, prep, opts, size, channels)
        report["seconds"]["evaluation"] = round(time.perf_counter() - t0, 4)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 4)
    out = Path(opts.get("out") or Path("runs") / (
        f"{Path(str(opts['model_a'])).stem}+{Path(str(opts['model_b'])).stem}"
        f"-{opts['method']}-w{float(opts['width']):g}"))
    merged.description.setdefault("arch", prep.a.arch)
    merged.description.setdefault("config", prep.a.config)
    if not merged.description.get("arch"):
        merged.description["arch"], merged.description["config"] = prep.a.arch, prep.a.config
    save_merged(merged, out, extra_files={"report.json": json.dumps(report, indent=2)})
    if opts.get("report"):
        Path(opts["report"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["report"]).write_text(json.dumps(report, indent=2))
    report["out"] = str(out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        opts = resolve_options(args)
        report = run(opts)
    except (MergeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    w = report["width"]
    print(f"{report['method']} merge of {report['models']['a']} + {report['models']['b']}: "
          f"width {w['achieved']:.3f} (requested {w['requested']}), heads {report['heads']}, "
          f"{report['seconds']['total']:.1f} s")
    if "accuracy" in report:
        print(format_table(report["accuracy"]))
    print(f"merged model and report written to {report['out']}/")
    return 0
