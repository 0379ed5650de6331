"""Width sweep of PLeaS against the baselines on one zoo pair.

    python experiments/sweep.py --pair resnet      # resnet_a + resnet_b (Fashion-MNIST 0-4 / 5-9)
    python experiments/sweep.py --pair digits      # digits_a + digits_b (MNIST / sklearn digits)
    python experiments/sweep.py --pair vit         # vit_a + vit_b
    python experiments/sweep.py --pair resnext     # resnext_a + resnext_b (grouped convs)

The statistics pass runs ONCE on the pair's merge data (both tasks' train splits, as the CLI
does) and once more on PROXY data for PLeaS-free (animal_mnist for the Fashion-MNIST pairs,
fashion_mnist for the digits pair); every width and method afterwards is built from those
statistics (:func:`pleas.build`).  Methods are the registered names of :mod:`pleas.methods`:
pleas_closed, pleas_free_closed (closed-form least squares), permute, zip, average (widths
1 .. 2), regmean (width 1), ensemble (width 2, drawn as a horizontal reference line); on
request pleas, pleas_free (the library's default sequential least squares: one data pass per
layer, much slower) -- ``--update`` adds them to an earlier sweep's results.  Results files
written before the registry (keys pleas, pleas-seq, pleas-free, pleas-free-seq) are read with
their keys renamed (:data:`LEGACY_NAMES`).

Every merged model is evaluated like ``python -m pleas.merge`` does: separate heads -> each
task's test split with that task's head; shared head -> both test splits with the one head.
A cell is the mean accuracy over the two tasks.  Writes ``results.json``, ``results.md`` and
``accuracy_vs_width.png`` under ``experiments/results/<pair>/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

from pleas import methods as registry  # noqa: E402
from pleas import zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.data import load_task  # noqa: E402
from pleas.evaluate import accuracy_from_logits, predict_logits  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare, task_names  # noqa: E402
from pleas.plan import LAYOUTS  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402

PAIRS = {
    "resnet": ("resnet_a", "resnet_b", "animal_mnist"),
    "digits": ("digits_a", "digits_b", "fashion_mnist"),
    "vit": ("vit_a", "vit_b", "animal_mnist"),
    "resnext": ("resnext_a", "resnext_b", "animal_mnist"),
}
WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
ORDER = ("pleas_closed", "pleas", "pleas_free_closed", "pleas_free", "permute", "zip", "average",
         "regmean", "ensemble")
DEFAULT_METHODS = ("pleas_closed", "pleas_free_closed", "permute", "zip", "average", "regmean",
                   "ensemble")
# the keys of results files written before the method registry
LEGACY_NAMES = {"pleas": "pleas_closed", "pleas-seq": "pleas", "pleas-free": "pleas_free_closed",
                "pleas-free-seq": "pleas_free"}
STYLE = {"pleas_closed": ("tab:red", "o"), "pleas_free_closed": ("tab:orange", "s"),
         "pleas": ("darkred", "P"), "pleas_free": ("saddlebrown", "X"),
         "permute": ("tab:blue", "^"), "zip": ("tab:green", "v"),
         "average": ("tab:gray", "D"), "regmean": ("tab:purple", "*")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), required=True)
    p.add_argument("--widths", type=float, nargs="+", default=list(WIDTHS))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ORDER,
                   help="pleas_closed / pleas_free_closed use the closed-form least squares "
                        "(one Gram pass, solves only); pleas / pleas_free the sequential mode "
                        "(one data pass per layer: about 20x slower here, so not in the default "
                        "list)")
    p.add_argument("--update", action="store_true",
                   help="add the methods run now to the folder's existing results.json (same "
                        "merge data, seed and test sets required)")
    p.add_argument("--batches", type=int, default=16, help="merge batches (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="merge batch size (default 64)")
    p.add_argument("--positions", type=int, default=64,
                   help="positions per image sampled for least squares (0 = all; default 64)")
    p.add_argument("--proxy", help="proxy data for pleas-free (default: per pair)")
    p.add_argument("--models", nargs=2, metavar=("A", "B"),
                   help="other zoo models or checkpoints instead of the pair's")
    p.add_argument("--eval-limit", type=int, default=1000,
                   help="test images per task (stratified, seed 0; 0 = the full test split; "
                        "default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=LAYOUTS, default=MergeConfig().layout,
                   help="how partly merged layers run and are counted (default: pleas' "
                        f"default, {MergeConfig().layout}); a non-default layout writes to "
                        "experiments/results/<pair>_<layout>")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output folder (default experiments/results/<pair>)")
    p.add_argument("--render", action="store_true",
                   help="only redraw the tables and plot from the folder's results.json")
    return p


class Evaluator:
    """The CLI's evaluation (pleas.cli_merge.evaluate), with the originals' logits cached."""

    def __init__(self, prep, size: int, channels: int, limit: int | None, device: str):
        self.prep, self.device = prep, device
        a, b = prep.a, prep.b
        ta, tb = task_names(prep)
        self.tasks = []  # (task, head name, owner, test set)
        for task, head, owner in ((a.task, ta, "a"), (b.task, tb, "b")):
            if task is None or any(t[0] == task for t in self.tasks):
                continue
            test = load_task(task, "test").adapt(size, channels)
            if limit:
                test = test.subset(limit, seed=0)
            self.tasks.append((task, head, owner, test))
        self.logits: dict[tuple[str, str], torch.Tensor] = {}
        for task, _, _, test in self.tasks:
            self.logits[(task, "a")] = predict_logits(a.model, test, device)
            self.logits[(task, "b")] = predict_logits(b.model, test, device)

    def originals(self, shared: bool) -> dict[str, dict[str, float | None]]:
        out = {}
        for task, _, owner, test in self.tasks:
            la, lb = self.logits[(task, "a")], self.logits[(task, "b")]
            row = {"model_a": accuracy_from_logits(la, test.labels) if shared or owner == "a"
                   else None,
                   "model_b": accuracy_from_logits(lb, test.labels) if shared or owner == "b"
                   else None}
            row["ensemble"] = (accuracy_from_logits((la + lb) / 2, test.labels) if shared
                               else row["model_" + owner])
            out[task] = row
        return out

    def __call__(self, merged) -> dict[str, float]:
        shared = not merged.multi_head
        return {task: accuracy_from_logits(
                    predict_logits(merged, test, self.device, task=None if shared else head),
                    test.labels)
                for task, head, _, test in self.tasks}


def run_sweep(args) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    name_a, name_b, default_proxy = PAIRS[args.pair]
    if args.models:
        name_a, name_b = args.models
    proxy = args.proxy or default_proxy
    model_a, info_a = zoo.resolve(name_a, device=args.device)
    model_b, info_b = zoo.resolve(name_b, device=args.device)
    a, b = ModelSide.of(model_a, info_a, "model_a"), ModelSide.of(model_b, info_b, "model_b")
    size, channels = input_size(a)
    positions = args.positions or None
    config = MergeConfig(batches=args.batches, batch_size=args.batch_size, seed=args.seed)
    records = {m: registry.get(m) for m in args.methods}
    on_merge_data = [r for r in records.values() if not r.proxy_data]
    on_proxy = [r for r in records.values() if r.proxy_data]
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    data, data_name = merge_data(config, a, b, size=size, channels=channels)
    prep = prepare(a, b, data, device=args.device, batch_size=args.batch_size,
                   max_batches=args.batches, data_name=data_name, positions=positions,
                   seed=args.seed, methods=on_merge_data)
    seconds["prepare_merge_data"] = time.perf_counter() - t0
    prep_free = None
    if on_proxy:
        t0 = time.perf_counter()
        pdata, pname = merge_data(config.replace(proxy_data=proxy), a, b, size=size,
                                     channels=channels)
        prep_free = prepare(a, b, pdata, device=args.device, batch_size=args.batch_size,
                            max_batches=args.batches, data_name=pname, positions=positions,
                            seed=args.seed, methods=on_proxy)
        seconds["prepare_proxy_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluator = Evaluator(prep, size, channels, args.eval_limit or None, args.device)
    seconds["evaluate_originals"] = time.perf_counter() - t0

    jobs = []
    for method, record in records.items():
        fixed = record.fixed_width
        jobs += [(method, fixed)] if fixed is not None else [(method, w) for w in args.widths]
    results: dict[str, dict[str, dict]] = {m: {} for m in args.methods}
    heads = None
    t_builds = time.perf_counter()
    bar = tqdm(jobs, desc=f"sweep {args.pair}")
    for method, width in bar:
        bar.set_postfix_str(f"{method} w{width:g}")
        p = prep_free if records[method].proxy_data else prep
        t0 = time.perf_counter()
        merged, report = build(p, width, records[method], seed=args.seed, progress=False,
                               layout=args.layout)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = evaluator(merged)
        t_eval = time.perf_counter() - t0
        heads = report["heads"]
        results[method][f"{width:g}"] = {
            "mean": sum(acc.values()) / len(acc),
            "tasks": acc,
            "width_achieved": report["width"]["achieved"],
            "width_executed": report["width"]["executed"],
            "macs": report["macs"]["merged"],
            "params": report["params"]["merged"],
            "merge_data": report["merge_data"],
            "seconds_build": round(t_build, 3),
            "seconds_eval": round(t_eval, 3),
        }
    seconds["builds_and_evaluation"] = time.perf_counter() - t_builds
    seconds["total"] = time.perf_counter() - t_start
    seconds["cpu_total"] = time.process_time()  # this process's CPU time (all threads)
    shared = heads == "shared"
    orig = evaluator.originals(shared)
    return {
        "pair": args.pair, "models": [name_a, name_b],
        "tasks": [t[0] for t in evaluator.tasks],
        "test_images": {t[0]: len(t[3]) for t in evaluator.tasks},
        "heads": heads,
        "merge_data": {"name": data_name, "images": sum(len(x) for x in prep.batches)},
        "proxy_data": None if prep_free is None else
        {"name": prep_free.data_name, "images": sum(len(x) for x in prep_free.batches)},
        "method_names": "registry",
        "methods": list(args.methods), "positions": positions, "seed": args.seed,
        "layout": args.layout,
        "widths": list(args.widths),
        "originals": orig,
        "results": results,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "machine": {"device": args.device, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def tables(res: dict) -> str:
    widths = [f"{w:g}" for w in res["widths"]]
    lines = [f"Mean test accuracy (%) over the two tasks, {res['models'][0]} + "
             f"{res['models'][1]} ({res['heads']} heads), by compute width (executed MACs / "
             f"one model's; layout {res.get('layout', 'blocks')}):", "",
             "| method | " + " | ".join(f"{w}x" for w in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    for m in ORDER:
        if m not in res["results"]:
            continue
        cells = [fmt(res["results"][m][w]["mean"]) if w in res["results"][m] else ""
                 for w in widths]
        lines.append(f"| {LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (%): " + ", ".join(res["tasks"]), "",
              "| method | " + " | ".join(f"{w}x" for w in widths) + " |",
              "|---|" + "---:|" * len(widths)]
    for m in ORDER:
        if m not in res["results"]:
            continue
        cells = [" / ".join(f"{v:.2f}" for v in res["results"][m][w]["tasks"].values())
                 if w in res["results"][m] else "" for w in widths]
        lines.append(f"| {LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "Original models (endpoints):", "",
              "| task | model A | model B | ensemble |", "|---|---:|---:|---:|"]
    for task, row in res["originals"].items():
        lines.append(f"| {task} | {fmt(row['model_a'])} | {fmt(row['model_b'])} | "
                     f"{fmt(row['ensemble'])} |")
    return "\n".join(lines)


def std_error(res: dict, cell: dict) -> float:
    """Binomial standard error (points) of a cell's mean accuracy over the tasks."""
    n = res["test_images"]
    var = sum((p / 100) * (1 - p / 100) / n[t] for t, p in cell["tasks"].items())
    return 100 * var ** 0.5 / len(cell["tasks"])


LABEL = {"pleas_closed": "pleas (closed form)", "pleas": "pleas (sequential)",
         "pleas_free_closed": "pleas-free (closed form)", "pleas_free": "pleas-free (sequential)"}
PLEAS_VARIANTS = ("pleas_closed", "pleas", "pleas_free_closed", "pleas_free")


def claim_check(res: dict) -> str:
    """Every PLeaS variant against permute at every width below 2."""
    r = res["results"]
    variants = [m for m in PLEAS_VARIANTS if m in r]
    if not variants or "permute" not in r:
        return ""
    widths = [f"{w:g}" for w in res["widths"] if w < 2.0 and f"{w:g}" in r["permute"]]
    summary, cells = [], {k: [] for k in widths}
    for m in variants:
        wins = clear = total = 0
        for k in widths:
            if k not in r[m]:
                cells[k].append("")
                continue
            d = r[m][k]["mean"] - r["permute"][k]["mean"]
            se = (std_error(res, r[m][k]) ** 2 + std_error(res, r["permute"][k]) ** 2) ** 0.5
            total += 1
            wins += d > 0
            clear += d > 2 * se
            cells[k].append(f"{d:+.2f} (±{2 * se:.1f})")
        summary.append(f"- {LABEL[m]} beats permute at {wins} of {total} widths below 2, by more "
                       f"than two standard errors at {clear}.")
    lines = ["Against permute (difference in mean accuracy, ± two binomial standard errors of "
             "the difference, unpaired, test-set noise only):", "", *summary, "",
             "| width | permute | " + " | ".join(f"{LABEL[m]} - permute" for m in variants)
             + " |", "|---|---:|" + "---:|" * len(variants)]
    for k in widths:
        lines.append(f"| {k}x | {r['permute'][k]['mean']:.2f} | " + " | ".join(cells[k]) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    r = res["results"]
    for m in ("average", "zip", "permute", "regmean", "pleas_free", "pleas_free_closed",
              "pleas", "pleas_closed"):  # pleas on top
        if m not in r:
            continue
        ws = sorted(float(w) for w in r[m])
        ys = [r[m][f"{w:g}"]["mean"] for w in ws]
        color, marker = STYLE[m]
        ax.plot(ws, ys, marker=marker, color=color, label=LABEL.get(m, m),
                ms=7 if m != "regmean" else 12, lw=2 if m.startswith("pleas") else 1.3,
                ls="-." if registry.get(m).least_squares == "sequential" else "-")
        if m in ("pleas_closed", "pleas", "permute") and ws:  # the curves' endpoints
            for x, y in ((ws[0], ys[0]), (ws[-1], ys[-1])) if len(ws) > 1 else ((ws[0], ys[0]),):
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points",
                            xytext=(-8 if x == ws[-1] and len(ws) > 1 else 6,
                                    6 if m == "pleas_closed" else -13),
                            ha="right" if x == ws[-1] and len(ws) > 1 else "left", fontsize=8,
                            color=color)
    if "ensemble" in r:
        y = r["ensemble"]["2"]["mean"]
        ax.axhline(y, ls="--", color="black", lw=1.2, label=f"ensemble (2x): {y:.1f}")
    orig = res["originals"]
    text = ["original models (test accuracy):"]
    for task, row in orig.items():
        parts = [f"A {row['model_a']:.1f}" if row["model_a"] is not None else None,
                 f"B {row['model_b']:.1f}" if row["model_b"] is not None else None]
        text.append(f"{task}: " + ", ".join(p for p in parts if p))
    ax.text(1.02, 0.0, "\n".join(text), transform=ax.transAxes, ha="left", va="bottom",
            fontsize=8, bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
    ax.set_xlabel("compute width (merged MACs / one model's MACs)")
    ax.set_ylabel("mean test accuracy over the two tasks (%)")
    ax.set_title(f"{res['models'][0]} + {res['models'][1]} ({res['heads']} heads)")
    ax.set_xticks(res["widths"])
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    names = [*(LABEL.get(m, m) for m in ORDER)]
    order = sorted(range(len(labels)),
                   key=lambda i: names.index(labels[i]) if labels[i] in names else len(names))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_line(run: dict, machine: dict) -> str:
    s = run["seconds"]
    n = sum(len(v) for v in run["results"].values())
    return (f"{', '.join(run['methods'])}: wall time {s['total']:.0f} s on {machine['device']} "
            f"({machine['threads']} thread(s)"
            + (f", {s['cpu_total']:.0f} s of CPU time" if "cpu_total" in s else "")
            + f"): statistics {s['prepare_merge_data']:.0f} s"
            + (f" + proxy statistics {s['prepare_proxy_data']:.0f} s"
               if "prepare_proxy_data" in s else "")
            + f", {n} builds + evaluation {s['builds_and_evaluation']:.0f} s.")


def read_results(path: Path) -> dict:
    """A results file, with the method keys of files older than the registry renamed."""
    res = json.loads(path.read_text())
    if res.get("method_names") == "registry":
        return res
    rename = lambda names: [LEGACY_NAMES.get(m, m) for m in names]  # noqa: E731
    res["results"] = {LEGACY_NAMES.get(m, m): v for m, v in res["results"].items()}
    res["methods"] = rename(res.get("methods", []))
    for u in res.get("updates", []):
        u["methods"] = rename(u["methods"])
        u["results"] = {LEGACY_NAMES.get(m, m): v for m, v in u["results"].items()}
    res["method_names"] = "registry"
    return res


def merge_update(old: dict, new: dict) -> dict:
    """Add a run's methods to an earlier sweep of the same pair, data and test sets."""
    old = {"layout": "blocks", **old}  # sweeps from before the layout option ran blocks
    for key in ("models", "merge_data", "positions", "seed", "test_images", "heads", "layout"):
        if old.get(key) != new.get(key):
            raise SystemExit(f"--update: {key} differs from the existing results "
                             f"({old.get(key)!r} vs {new.get(key)!r}); run the full sweep")
    if new.get("proxy_data") and old.get("proxy_data") and new["proxy_data"] != old["proxy_data"]:
        raise SystemExit("--update: the proxy data differs from the existing results")
    merged = dict(old)
    merged["proxy_data"] = old.get("proxy_data") or new.get("proxy_data")
    merged["results"] = {**old["results"], **new["results"]}
    merged["widths"] = sorted(set(old["widths"]) | set(new["widths"]))
    merged["updates"] = [*old.get("updates", []),
                         {"methods": new["methods"], "seconds": new["seconds"],
                          "results": {m: list(v) for m, v in new["results"].items()}}]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    default = (args.pair if args.layout == MergeConfig().layout
               else f"{args.pair}_{args.layout}")
    out = Path(args.out or ROOT / "experiments" / "results" / default)
    if args.render:
        res = read_results(out / "results.json")
    else:
        res = run_sweep(args)
        if args.update:
            res = merge_update(read_results(out / "results.json"), res)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = tables(res)
    check = claim_check(res)
    base_methods = res.get("methods") or [m for m in DEFAULT_METHODS if m in res["results"]]
    # the first run's line counts its own builds (a later --update re-ran some of its methods
    # at the same widths: their cells were replaced, not removed from that run)
    base = {"methods": base_methods, "seconds": res["seconds"],
            "results": {m: v for m, v in res["results"].items() if m in base_methods}}
    footer = (f"Merge data: {res['merge_data']['name']}, {res['merge_data']['images']} images; "
              f"proxy data (pleas-free): "
              f"{res['proxy_data']['name'] if res['proxy_data'] else '-'}; test images per task: "
              + ", ".join(f"{k} {v}" for k, v in res["test_images"].items())
              + "; least squares: closed form for pleas_closed and pleas_free_closed, "
              f"sequential for pleas and pleas_free; seed {res['seed']}.\n\n"
              + "\n".join(f"- {run_line(r, res['machine'])}"
                          for r in [base, *res.get("updates", [])]))
    text = "\n\n".join(x for x in (md, check, footer) if x) + "\n"
    (out / "results.md").write_text(text)
    plot(res, out / "accuracy_vs_width.png")
    print(text)
    print(f"total wall time: {res['seconds']['total']:.1f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
