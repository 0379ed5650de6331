"""Task-vector merging methods against PLeaS, on same-base and different-base model pairs.

    python experiments/compare_methods.py                       # every pair (~30 min, 1 thread)
    python experiments/compare_methods.py --pairs sb_fmnist     # one pair
    python experiments/compare_methods.py --render              # redraw from results.json

Pairs (zoo models, ResNet-20 on 28x28 gray images):
- (a) same base: ``sb_digits`` = sb_digits_a (mnist5k) + sb_digits_b (sklearn digits), one
  shared digit label space, both fine-tuned from ``sb_base`` (Fashion-MNIST, 10 classes) with
  its head; ``sb_fmnist`` = sb_fmnist_a (Fashion-MNIST 0-4) + sb_fmnist_b (5-9), fine-tuned from
  ``sb_base`` with new 5-class heads (separate heads); ``sb_digits_sep`` = the sb_digits pair
  with one head per model (the task is known at test time), to separate the head's share of
  the loss from the trunk's.
- (b) different bases: ``digits`` = digits_a (from digits_base1) + digits_b (from
  digits_base2).  Task vectors need ONE base: they are taken with respect to digits_base1 (A's
  own base), which B never saw; the report's ``shared_base`` says so.  ``resnet`` = resnet_a +
  resnet_b, trained independently from random inits: there is no base at all, so only the
  methods that need none run (weight averaging, PLeaS, ensemble).

Methods: weight averaging (model soup), task arithmetic (lambda 0.3 and 1), TIES (k = 20%,
lambda 1), DARE (p = 0.5, summed with lambda 0.3) and DARE-TIES (p = 0.5, lambda 1), Sens-Merging
(lambda 0.3, 256 labelled training images per task), DAM (200 Adam steps, per-layer
coefficients, on the unlabeled merge data), PLeaS at widths 1.0 and 1.5 and the ensemble
(width 2); every hyper-parameter is its paper's usual default, none is tuned on test data.
A lambda sweep of task arithmetic on the test subsets is drawn separately (for illustration,
not a tuned result).  Heads as the CLI chooses them ("auto"): one shared head for a shared label
space, separate heads otherwise.  A diagnostic row re-runs the weight average with BatchNorm
statistics recomputed on each task's data alone (two sets of statistics: not one model) to show
how much of a gap comes from the statistics of mixed-task data rather than from the weights.

Merge data: 512 training images of each task (stratified, seed 0) -- the unlabeled data of DAM,
PLeaS's statistics (both tasks together, 16 batches of 64, as the CLI) and every BatchNorm
reset.  Accuracy: each task's test split (a stratified subset of ``--eval-limit`` images) through
that task's head; a row's score is the mean over the two tasks.  Writes ``results.json``,
``results.md`` and ``methods.png`` under ``experiments/results/methods/``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

from pleas import zoo  # noqa: E402
from pleas.data import ImageSet, load_task  # noqa: E402
from pleas.evaluate import accuracy_from_logits, predict_logits  # noqa: E402
from pleas.normalization import recalibrate_batchnorm  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare  # noqa: E402
from pleas.task_vectors import merge_with_base  # noqa: E402

OUT = ROOT / "experiments" / "results" / "methods"
PAIRS = {
    "sb_digits": {"a": "sb_digits_a", "b": "sb_digits_b", "base": "sb_base",
                  "kind": "same base", "note": "both fine-tuned from sb_base (with its head)"},
    "sb_digits_sep": {"a": "sb_digits_a", "b": "sb_digits_b", "base": "sb_base",
                      "kind": "same base, separate heads", "heads": "separate",
                      "note": "the sb_digits pair with one head per model (the task is known "
                              "at test time)"},
    "sb_fmnist": {"a": "sb_fmnist_a", "b": "sb_fmnist_b", "base": "sb_base",
                  "kind": "same base", "note": "both fine-tuned from sb_base, new 5-class heads"},
    "digits": {"a": "digits_a", "b": "digits_b", "base": "digits_base1",
               "kind": "different bases",
               "note": "A from digits_base1, B from digits_base2; task vectors w.r.t. "
                       "digits_base1"},
    "resnet": {"a": "resnet_a", "b": "resnet_b", "base": None, "kind": "no common base",
               "note": "independent random inits: task-vector methods need a base and do "
                       "not run"},
}
# (row name, task-vector method or None, params)
TV_METHODS = [
    ("weight average (soup)", "weight_average", {}),
    ("task arithmetic λ=0.3", "task_arithmetic", {"lam": 0.3}),
    ("task arithmetic λ=1", "task_arithmetic", {"lam": 1.0}),
    ("TIES (k=20%, λ=1)", "ties", {"density": 0.2, "lam": 1.0}),
    ("DARE (p=0.5, sum, λ=0.3)", "dare", {"p": 0.5, "combine": "sum", "lam": 0.3, "seed": 0}),
    ("DARE-TIES (p=0.5, λ=1)", "dare", {"p": 0.5, "combine": "ties", "lam": 1.0, "seed": 0}),
    ("Sens-Merging (λ=0.3)", "sens", {"lam": 0.3}),
    ("DAM (200 steps, per layer)", "dam", {"steps": 200, "lr": 0.01, "per": "layer", "seed": 0}),
]
PLEAS_ROWS = [("PLeaS width 1.0", 1.0, "pleas"), ("PLeaS width 1.5", 1.5, "pleas"),
              ("ensemble (width 2)", 2.0, "ensemble")]
DIAGNOSTIC = "weight average, per-task BN statistics (diagnostic)"
LAMBDAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    p.add_argument("--merge-images", type=int, default=512,
                   help="unlabeled training images per task (default 512)")
    p.add_argument("--labelled-images", type=int, default=256,
                   help="labelled training images per task for Sens-Merging (default 256)")
    p.add_argument("--eval-limit", type=int, default=2000,
                   help="test images per task (stratified, seed 0; 0 = all; default 2000)")
    p.add_argument("--dam-steps", type=int, default=200)
    p.add_argument("--no-sweep", action="store_true", help="skip the task-arithmetic λ sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--render", action="store_true", help="only redraw from results.json")
    return p


class Pair:
    """The models, data and cached evaluation of one pair."""

    def __init__(self, key: str, args):
        spec = PAIRS[key]
        self.key, self.spec = key, spec
        ma, ia = zoo.load(spec["a"])
        mb, ib = zoo.load(spec["b"])
        self.a, self.b = ModelSide.of(ma, ia, spec["a"]), ModelSide.of(mb, ib, spec["b"])
        self.base = zoo.load(spec["base"])[0] if spec["base"] else None
        self.shared_space = (ia.label_space == ib.label_space and ia.num_classes == ib.num_classes)
        self.heads = spec.get("heads") or ("shared" if self.shared_space else "separate")
        self.tasks = [ia.task, ib.task]
        self.merge = [load_task(t, "train").subset(args.merge_images, seed=0) for t in self.tasks]
        self.labelled = [load_task(t, "train").subset(args.labelled_images, seed=1)
                         for t in self.tasks]
        self.test = []
        for t in self.tasks:
            test = load_task(t, "test")
            self.test.append(test.subset(args.eval_limit, seed=0) if args.eval_limit else test)
        images = torch.cat([m.images for m in self.merge])
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.pooled = ImageSet(images[perm], None, [], "+".join(self.tasks))
        self.orig_logits = [[predict_logits(m.model, test) for test in self.test]
                            for m in (self.a, self.b)]

    def evaluate(self, merged) -> dict[str, float]:
        out = {}
        for i, (task, test) in enumerate(zip(self.tasks, self.test)):
            head = None if not merged.multi_head else merged.heads[i].task
            out[task] = accuracy_from_logits(predict_logits(merged, test, task=head), test.labels)
        return out

    def originals(self) -> list[dict]:
        rows = []
        for j, (name, side) in enumerate((("model A alone", self.a), ("model B alone", self.b))):
            acc = {}
            for i, (task, test) in enumerate(zip(self.tasks, self.test)):
                if self.shared_space or i == j:
                    acc[task] = accuracy_from_logits(self.orig_logits[j][i], test.labels)
                else:
                    acc[task] = None
            rows.append({"name": name, "group": "reference", "acc": acc, "mean": _mean(acc),
                         "model": side.name})
        own = {task: accuracy_from_logits(self.orig_logits[i][i], test.labels)
               for i, (task, test) in enumerate(zip(self.tasks, self.test))}
        rows.append({"name": "each model on its own task", "group": "reference", "acc": own,
                     "mean": _mean(own)})
        return rows


def per_task_bn(merged, pair: Pair) -> dict[str, float]:
    """The merged weights with BatchNorm statistics recomputed on EACH task's merge data alone,
    evaluated on that task: two sets of statistics, so not one model (a diagnostic of how much
    of the gap is the statistics of mixed-task data rather than the weights)."""
    out = {}
    for i, (task, test) in enumerate(zip(pair.tasks, pair.test)):
        m = copy.deepcopy(merged)
        recalibrate_batchnorm(m.net, list(pair.merge[i].images.split(64)), progress=False)
        head = None if not m.multi_head else m.heads[i].task
        out[task] = accuracy_from_logits(predict_logits(m, test, task=head), test.labels)
    return out


def _mean(acc: dict) -> float | None:
    vals = list(acc.values())
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def run_pair(key: str, args) -> dict:
    t_pair = time.perf_counter()
    pair = Pair(key, args)
    heads = pair.heads
    names = tuple(pair.tasks)
    result = {"pair": key, **PAIRS[key], "models": [pair.a.name, pair.b.name],
              "tasks": list(names), "heads": heads,
              "test_images": [len(t) for t in pair.test], "rows": pair.originals()}
    print(f"[{key}] {pair.a.name} + {pair.b.name} (base {PAIRS[key]['base']}), heads {heads}",
          flush=True)
    base_check = None
    for name, method, params in TV_METHODS:
        if pair.base is None and method != "weight_average":
            result["rows"].append({"name": name, "group": "task vectors", "method": method,
                                   "params": params, "acc": None, "mean": None,
                                   "skipped": "needs a common base; these models have none"})
            continue
        t0 = time.perf_counter()
        merged, report = merge_with_base(
            method, pair.a, pair.b, pair.base, data=pair.merge, labelled=pair.labelled,
            heads=heads, task_names=names, progress=False, **params)
        acc = pair.evaluate(merged)
        row = {"name": name, "group": "task vectors", "method": method,
               "params": report["params"], "acc": acc, "mean": _mean(acc),
               "seconds": round(time.perf_counter() - t0, 1),
               "shared_base": report["shared_base"]}
        if method == "dam":
            row["objective"] = report["details"]["objective"]
        if method == "sens":
            row["beta"] = report["details"]["beta"]
        if report["base_check"] is not None:
            base_check = report["base_check"]
            result["warnings"] = report["warnings"]
        result["rows"].append(row)
        print(f"  {name:30s} {_fmt(acc)}  ({row['seconds']} s)", flush=True)
        if method == "weight_average":
            acc = per_task_bn(merged, pair)
            result["rows"].append({"name": DIAGNOSTIC, "group": "diagnostic", "acc": acc,
                                   "mean": _mean(acc)})
            print(f"  {'  per-task BN (diagnostic)':30s} {_fmt(acc)}", flush=True)
    result["base_check"] = base_check
    result["shared_base"] = None if base_check is None else base_check["shared"]

    t0 = time.perf_counter()
    prep = prepare(pair.a, pair.b, pair.pooled, max_batches=16, progress=False)
    prep_s = time.perf_counter() - t0
    for name, width, method in PLEAS_ROWS:
        t0 = time.perf_counter()
        merged, report = build(prep, width, method, heads=heads, progress=False)
        acc = pair.evaluate(merged)
        row = {"name": name, "group": "alignment", "method": method, "width": width,
               "acc": acc, "mean": _mean(acc),
               "seconds": round(time.perf_counter() - t0 + (prep_s if method == "pleas" else 0),
                                1)}
        result["rows"].append(row)
        print(f"  {name:30s} {_fmt(acc)}  ({row['seconds']} s)", flush=True)

    if pair.base is not None and not args.no_sweep:
        sweep = []
        for lam in LAMBDAS:
            merged, _ = merge_with_base("task_arithmetic", pair.a, pair.b, pair.base,
                                        data=pair.merge, heads=heads, task_names=names,
                                        progress=False, lam=lam)
            acc = pair.evaluate(merged)
            sweep.append({"lam": lam, "acc": acc, "mean": _mean(acc)})
        result["lambda_sweep"] = sweep
        print("  λ sweep: " + ", ".join(f"{s['lam']}: {s['mean']:.1f}" for s in sweep),
              flush=True)
    result["seconds"] = round(time.perf_counter() - t_pair, 1)
    return result


def _fmt(acc: dict | None) -> str:
    if not acc:
        return "-"
    return "  ".join(f"{t}: {v:5.1f}" if v is not None else f"{t}: -" for t, v in acc.items())


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(results: dict, out: Path) -> None:
    pairs = results["pairs"]
    keys = [k for k in PAIRS if k in pairs]
    names: list[str] = []
    for k in keys:
        for r in pairs[k]["rows"]:
            if r["name"] not in names:
                names.append(r["name"])
    lines = ["# Task-vector methods vs PLeaS: mean test accuracy (%) over the two tasks", ""]
    lines.append("| method | " + " | ".join(
        f"{k} ({pairs[k]['kind']})" for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for n in names:
        cells = []
        for k in keys:
            row = next((r for r in pairs[k]["rows"] if r["name"] == n), None)
            if row is None:
                cells.append("")
            elif row.get("skipped"):
                cells.append("n/a (no base)")
            else:
                cells.append(_cell(row["mean"]))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (each task's test subset through its own head):", ""]
    for k in keys:
        p = pairs[k]
        bc = p.get("base_check")
        lines.append(f"## {k}: {p['models'][0]} + {p['models'][1]} ({p['kind']}; {p['note']})")
        lines.append("")
        lines.append(f"Heads: {p['heads']}; test images per task: {p['test_images']}; "
                     f"base: {p['base'] or 'none'}.")
        if bc:
            lines.append(f"Shared base: **{bc['shared']}** (median cosine to the base: A "
                         f"{bc['median_cosine_to_base']['a']}, B "
                         f"{bc['median_cosine_to_base']['b']}; ||θ−θ_base||/||θ_base||: A "
                         f"{bc['relative_distance']['a_to_base']}, B "
                         f"{bc['relative_distance']['b_to_base']}, A−B "
                         f"{bc['relative_distance']['a_to_b']}).")
        lines.append("")
        lines.append(f"| method | {p['tasks'][0]} | {p['tasks'][1]} | mean | seconds |")
        lines.append("|---|---|---|---|---|")
        for r in p["rows"]:
            if r.get("skipped"):
                lines.append(f"| {r['name']} | - | - | n/a ({r['skipped']}) | |")
                continue
            acc = r["acc"]
            extra = ""
            if r.get("objective"):
                o = r["objective"]
                extra = f" (KL {o['initial']:.3f} → {o['final']:.3f})"
            lines.append(f"| {r['name']}{extra} | {_cell(acc[p['tasks'][0]])} | "
                         f"{_cell(acc[p['tasks'][1]])} | {_cell(r['mean'])} | "
                         f"{r.get('seconds', '')} |")
        if p.get("lambda_sweep"):
            lines.append("")
            lines.append("Task arithmetic λ sweep (test subsets, illustration only): " + ", ".join(
                f"λ={s['lam']}: {s['mean']:.1f}" for s in p["lambda_sweep"]))
        lines.append("")
    env = results.get("environment", {})
    lines.append(f"Environment: {env}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "methods.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["pairs"]
    keys = [k for k in PAIRS if k in pairs]
    cols = 3
    rows_n = (len(keys) + 1 + cols - 1) // cols
    fig, grid = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 5.2 * rows_n), squeeze=False)
    axes = list(grid.flat)
    for extra in axes[len(keys) + 1:]:
        extra.axis("off")
    sweep_ax = axes[len(keys)]
    colors = {"reference": "tab:gray", "task vectors": "tab:blue", "alignment": "tab:red",
              "diagnostic": "tab:olive"}
    for ax, k in zip(axes, keys):
        p = pairs[k]
        rows = [r for r in p["rows"] if r["name"] != "model A alone" and r["name"] != "model B alone"]
        y = list(range(len(rows)))[::-1]
        for yi, r in zip(y, rows):
            if r.get("skipped") or r["mean"] is None:
                ax.text(1, yi, "needs a base", va="center", fontsize=7, color="0.4")
                continue
            ax.barh(yi, r["mean"], color=colors[r["group"]], alpha=0.8)
            for v, mk in zip(r["acc"].values(), ("|", "x")):
                ax.plot(v, yi, marker=mk, color="k", ms=6)
            ax.text(101, yi, f"{r['mean']:.1f}", va="center", fontsize=8)
        ax.set_yticks(y)
        ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
        ax.set_xlim(0, 112)
        ax.set_xlabel("test accuracy (%): bar = mean, | task A, x task B")
        ax.set_title(f"{k}: {p['kind']}", fontsize=9)
        ax.axvline(next(r["mean"] for r in p["rows"] if r["name"] == "each model on its own task"),
                   color="k", lw=0.8, ls=":")
    ax = sweep_ax
    for k in keys:
        sw = pairs[k].get("lambda_sweep")
        if sw:
            ax.plot([s["lam"] for s in sw], [s["mean"] for s in sw], marker="o", label=k)
    ax.set_xlabel("task arithmetic λ (λ=0: the base, 0.5: the soup)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("task arithmetic λ sweep (illustration)", fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if args.render:
        render(json.loads(path.read_text()), args.out)
        return 0
    torch.set_num_threads(args.threads)
    results = json.loads(path.read_text()) if path.exists() else {"pairs": {}}
    t0 = time.perf_counter()
    for key in args.pairs:
        results["pairs"][key] = run_pair(key, args)
    results["environment"] = {"torch": torch.__version__, "threads": args.threads,
                              "machine": platform.machine(), "eval_limit": args.eval_limit,
                              "merge_images": args.merge_images,
                              "labelled_images": args.labelled_images,
                              "seconds_last_run": round(time.perf_counter() - t0, 1)}
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    render(results, args.out)
    print(f"wrote {args.out}/results.json, results.md, methods.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
