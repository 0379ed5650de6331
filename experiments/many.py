"""Merging K = 2, 3, 4 experts: normalised accuracy against width, the protocol of "What
matters for model merging at scale" (the seed study).

    python experiments/many.py                          # every subset, default methods
    python experiments/many.py --methods pleas_closed permute --ks 2 3

Experts: four ResNet-20s from four random initialisations, each on its own task and label
space (:data:`EXPERTS`; trained by ``experiments/train.py``).  Every subset of K of them
(K = 2: 6 subsets, K = 3: 4, K = 4: 1) is merged ONCE into statistics on its merge data (an
equal share of each expert's training split, as the CLI does), then built at widths 1, 1.5,
..., K with each method: PLeaS (closed-form least squares, and the sequential fit where asked),
``permute`` (every model matched into one order, then averaged + BatchNorm reset:
MergeMany-style permutation-then-average), ``average`` (weight averaging, no alignment, +
BatchNorm reset), and ``ensemble`` (the K experts side by side, width K).  Separate heads:
each task is evaluated on its full test split with its own head.

Normalised accuracy of a merged model: each task's accuracy divided by its expert's, averaged
over the subset's tasks.  A cell is the mean over the subsets of K, with the standard error
over subsets (K = 4 has one subset: the standard error is over its four tasks instead).
Writes ``experiments/results/many/{results.json,results.md,accuracy_vs_width.png,
accuracy_vs_k.png}`` (``--out`` elsewhere).  Two K's can run as two processes into two
folders and be joined: ``python experiments/many.py --ks 4 --out /tmp/k4`` beside ``--ks 3
--update``, then ``python experiments/many.py --merge /tmp/k4``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

from pleas import zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.data import load_task  # noqa: E402
from pleas.evaluate import accuracy_from_logits, predict_logits  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare_models, task_names  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402

EXPERTS = ("resnet_a", "resnet_b", "expert_mnist", "expert_animal")
METHODS = ("pleas_closed", "pleas", "permute", "average", "ensemble")
DEFAULT_METHODS = ("pleas_closed", "permute", "average", "ensemble")
OUT = ROOT / "experiments" / "results" / "many"


def widths_for(k: int) -> list[float]:
    return [1.0 + 0.5 * i for i in range(2 * (k - 1) + 1)]


def expert_accuracy(sides: list[ModelSide], tests: dict, device: str) -> dict[str, float]:
    return {s.task: accuracy_from_logits(predict_logits(s.model, tests[s.task], device),
                                         tests[s.task].labels) for s in sides}


def merged_accuracy(merged, sides: list[ModelSide], heads: list[str], tests: dict,
                    device: str) -> dict[str, float]:
    return {s.task: accuracy_from_logits(predict_logits(merged, tests[s.task], device, task=h),
                                         tests[s.task].labels) for s, h in zip(sides, heads)}


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def run_subset(names: tuple[str, ...], methods: list[str], config: MergeConfig, tests: dict,
               experts: dict, device: str, layout: str = "dense") -> dict:
    """Prepare one subset, build every (method, width), evaluate each task."""
    sides = []
    for n in names:
        model, info = zoo.load(n)
        sides.append(ModelSide.of(model, info))
    size, channels = input_size(sides[0])
    data, data_name = merge_data(config, *sides, size=size, channels=channels)
    t0 = time.perf_counter()
    prep = prepare_models(sides, data, device=device, batch_size=config.batch_size,
                          max_batches=config.batches, positions=config.positions,
                          seed=config.seed, methods=methods, progress=False,
                          data_name=data_name)
    prepare_s = time.perf_counter() - t0
    heads = list(task_names(prep))
    k = len(names)
    rows = []
    for method in methods:
        for width in (widths_for(k) if method != "ensemble" else [float(k)]):
            t0 = time.perf_counter()
            merged, report = build(prep, width, method, heads="separate", seed=config.seed,
                                   progress=False, layout=layout)
            seconds = time.perf_counter() - t0
            acc = merged_accuracy(merged, sides, heads, tests, device)
            norm = {t: acc[t] / experts[t] for t in acc}
            rows.append({"method": method, "width": width,
                         "width_executed": report["width"]["executed"], "accuracy": acc,
                         "normalised": norm,
                         "normalised_mean": sum(norm.values()) / len(norm),
                         "seconds": round(seconds, 2)})
    return {"experts": list(names), "tasks": [s.task for s in sides], "merge_data": data_name,
            "merge_images": prep.images, "prepare_seconds": round(prepare_s, 2), "rows": rows}


def summarise(subsets: list[dict]) -> dict:
    """(K, method, width) -> mean normalised accuracy and its standard error."""
    cells: dict[tuple, list] = {}
    tasks: dict[tuple, list] = {}
    for sub in subsets:
        k = len(sub["experts"])
        for r in sub["rows"]:
            key = (k, r["method"], r["width"])
            cells.setdefault(key, []).append(r["normalised_mean"])
            tasks.setdefault(key, []).extend(r["normalised"].values())
    out = {}
    for key, vals in cells.items():
        m, se = mean_se(vals) if len(vals) > 1 else mean_se(tasks[key])
        out[key] = {"mean": m, "se": se, "subsets": len(vals),
                    "se_over": "subsets" if len(vals) > 1 else "tasks"}
    return out


def table(summary: dict, methods: list[str], ks: list[int]) -> str:
    lines = []
    for k in ks:
        widths = widths_for(k)
        lines += [f"\n**K = {k}** (normalised accuracy, % of the experts'; mean +- standard "
                  f"error over {'subsets' if k < 4 else 'the four tasks (one subset)'})\n",
                  "| method | " + " | ".join(f"{w:g}x" for w in widths) + " |",
                  "|---|" + "---:|" * len(widths)]
        for m in methods:
            cells = []
            for w in widths:
                c = summary.get((k, m, w))
                cells.append("-" if c is None else
                             f"{100 * c['mean']:.1f} +- {100 * c['se']:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, methods: list[str], ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks) + 1.4, 3.6), sharey=True)
    axes = [axes] if len(ks) == 1 else list(axes)
    for ax, k in zip(axes, ks):
        for m in methods:
            pts = [(w, summary[(k, m, w)]) for w in widths_for(k) if (k, m, w) in summary]
            if not pts:
                continue
            xs = [w for w, _ in pts]
            ys = [100 * c["mean"] for _, c in pts]
            es = [0 if math.isnan(c["se"]) else 100 * c["se"] for _, c in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o" if len(xs) > 1 else "*", capsize=3,
                        label=m)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("width (executed MACs / one expert)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised accuracy (%)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the lines
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_width.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for m in [m for m in methods if m != "ensemble"]:
        pts = [(k, summary[(k, m, 1.0)]) for k in ks if (k, m, 1.0) in summary]
        if pts:
            ax.errorbar([k for k, _ in pts], [100 * c["mean"] for _, c in pts],
                        yerr=[0 if math.isnan(c["se"]) else 100 * c["se"] for _, c in pts],
                        marker="o", capsize=3, label=m)
    ax.set_xlabel("K (experts merged)")
    ax.set_ylabel("normalised accuracy at width 1 (%)")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the lines
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)


def rows_kept(subsets: list[dict], methods: list[str]) -> dict[tuple, list[dict]]:
    """Per subset of an earlier run, its rows of the methods NOT run now: ``--update`` with a
    few methods re-runs those and keeps the rest (their code, their command)."""
    return {tuple(r["experts"]): [row for row in r["rows"] if row["method"] not in methods]
            for r in subsets}


def joined_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """Kept and new rows in :data:`METHODS` order (each method's widths in run order)."""
    return sorted(kept + new, key=lambda row: METHODS.index(row["method"]))


def _rows_by_command(results: list[dict]) -> str:
    """Which command made each method's rows (a re-run of some methods keeps the others')."""
    made: dict[str, set] = {}
    for r in results:
        for row in r["rows"]:
            made.setdefault(row["method"], set()).add(row.get("command"))
    parts = []
    for method, cmds in made.items():
        named = sorted(c for c in cmds if c)
        where = "; ".join(f"`{c}`" for c in named)
        if None in cmds:
            where = ((where + " and " if where else "")
                     + "the earlier commands (earlier code and plans)")
        parts.append(f"{method}: {where}")
    return "Rows made by: " + "; ".join(parts) + "."


def write_report(state: dict, out: Path) -> str:
    """results.md and the two plots from a results.json state (every subset run so far)."""
    results = sorted(state["subsets"], key=lambda r: (len(r["experts"]), r["experts"]))
    ks = sorted({len(r["experts"]) for r in results})
    methods = [m for m in METHODS if any(row["method"] == m for r in results
                                         for row in r["rows"])]
    summary = summarise(results)
    experts = state["experts"]
    batches = {r["merge_images"] for r in results}
    layout = state.get("layout", "dense")  # runs before --layout existed: dense
    md = (f"# K-model merging: normalised accuracy\n\nCommands: "
          + "; ".join(f"`{c}`" for c in state["commands"])
          + f" (torch {torch.__version__}, {platform.machine()}).  Experts (test accuracy): "
          + ", ".join(f"{n} ({e['task']}, {e['test_accuracy']:.2f}%)" for n, e in experts.items())
          + f".  Merge images per subset: {', '.join(str(b) for b in sorted(batches))} (an "
          f"equal share of each expert's training split); `--layout {layout}`; "
          "separate heads; BatchNorm statistics "
          "from the merge data (reset after the merge; PLeaS's sequential fit sets them "
          "exactly inside its sweep); "
          "every task evaluated on its full test split.  " + _rows_by_command(results)
          + "\n" + table(summary, methods, ks) + "\n")
    (out / "results.md").write_text(md)
    plot(summary, methods, ks, out)
    return md


def _save(state: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(state, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--batches", type=int, default=8, help="merge batches of 64 per subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layout", choices=["dense", "blocks"], default="dense",
                   help="the merged models' layout (pleas' --layout); blocks: write to another "
                        "--out, a results.json holds one layout")
    p.add_argument("--update", action="store_true",
                   help="keep the earlier results.json's other subsets (run K by K), "
                        "and in the subsets run now the rows of the methods not run now")
    p.add_argument("--out", default=str(OUT), help="folder of results.json, .md and plots")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=[],
                   help="run nothing: fold the subsets (and commands) of other runs' "
                        "results.json into this one's, then rewrite the report")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "results.json").read_text()) \
        if (out / "results.json").exists() else None
    if args.merge:  # two K's run side by side as two processes, then joined
        if old is None:
            raise SystemExit(f"--merge: no {out / 'results.json'} to merge into")
        for other in args.merge:
            more = json.loads((Path(other) / "results.json").read_text())
            names = {tuple(r["experts"]) for r in more["subsets"]}
            old["subsets"] = [r for r in old["subsets"] if tuple(r["experts"]) not in names] \
                + more["subsets"]
            old["commands"] = old.get("commands", []) + [c for c in more.get("commands", [])
                                                         if c not in old.get("commands", [])]
        _save(old, out)
        print(write_report(old, out))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MergeConfig(batches=args.batches, batch_size=64)
    infos = {n: zoo.info(n) for n in EXPERTS}
    tests = {infos[n].task: load_task(infos[n].task, "test") for n in EXPERTS}
    sides = [ModelSide.of(*zoo.load(n)) for n in EXPERTS]
    experts = expert_accuracy(sides, tests, args.device)
    subsets = [c for k in args.ks for c in itertools.combinations(EXPERTS, k)]
    earlier, commands, kept = [], [], {}
    if args.update and old is not None:
        if old.get("layout", "dense") != args.layout:
            raise SystemExit(f"--update: {out / 'results.json'} holds --layout "
                             f"{old.get('layout', 'dense')} results, not {args.layout}")
        earlier = [r for r in old["subsets"] if tuple(r["experts"]) not in subsets]
        commands = old.get("commands", [])
        kept = rows_kept(old["subsets"], args.methods)
    commands.append("python experiments/many.py " + " ".join(sys.argv[1:]))
    state = {"experts": {n: {"task": infos[n].task, "test_accuracy": experts[infos[n].task]}
                         for n in EXPERTS},
             "commands": commands, "subsets": list(earlier), "layout": args.layout}
    for names in tqdm(subsets, desc="subsets"):
        result = run_subset(names, args.methods, config, tests, experts, args.device,
                            args.layout)
        for row in result["rows"]:
            row["command"] = commands[-1]
        result["rows"] = joined_rows(kept.get(names, []), result["rows"])
        state["subsets"].append(result)
        _save(state, out)  # after every subset: a stopped run keeps what it finished
    print(write_report(state, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
