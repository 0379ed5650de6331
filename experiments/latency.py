"""Latency of merged models against one original: does the merged model cost its width?

    python experiments/latency.py                       # all four pairs (about 10 min on CPU)
    python experiments/latency.py --pairs resnet vit --rounds 7       # a quick look

For each pair and width (1, 1.25, 1.5, 1.75, 2) the merged model is built with
``method="permute"`` (no least squares: the weights' values do not change the time) from a few
merge images: in the default dense layout (what pleas builds and saves: plain layers, the plan
paying for their structural zeros); block-structured (``layout="blocks"``: only the non-zero
blocks, paid for and executed), also with unit counts in other multiples; and the blocks plan
with its zeros multiplied (``build(..., blocks=False)``: executing more than the width).  Every model,
and one original, runs on the same batch in rounds (each round runs every model once, so that
load from other processes hits them alike); latency is the median over the rounds, the ratio
is median(merged) / median(original).  Next to it: the MACs executed on the forward pass
(FlopCounterMode) and the parameters stored, both relative to one original.

Each pair runs in a process of its own (as ``experiments/benchmark.py`` runs each case): run in
one process after the ResNet-20 pair, the ViT pair's controls drifted (its width-1 model, the
original's own architecture, read 1.06 and its width-2 model, exactly two originals, 2.17 and
2.13; measured in fresh processes: 0.95-1.02 and 1.94-2.05), so what ran before in the process
moved the ratios by up to 8%.

Pairs: the zoo's resnet_a/resnet_b (ResNet-20), vit_a/vit_b (ViT), resnext_a/resnext_b
(ResNeXt-29, grouped convs), batch 64 at 28 px; and two randomly initialised timm resnet50
(seeds 0/1, 10 classes), batch 16 at 224 px.  Target: ratio <= width x 1.15.

Writes experiments/results/latency.md, latency.json and latency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

from child import report, run_child  # noqa: E402

from pleas import zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.data import load_task  # noqa: E402
from pleas.measure import executed_macs, stored_params  # noqa: E402
from pleas.models import build_model  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402

WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
SLACK = 1.15
ZOO_PAIRS = {"resnet": ("resnet_a", "resnet_b", "ResNet-20"),
             "vit": ("vit_a", "vit_b", "ViT (4 blocks, 3 heads)"),
             "resnext": ("resnext_a", "resnext_b", "ResNeXt-29 (grouped convs)")}
PAIRS = (*ZOO_PAIRS, "resnet50")
OUT = ROOT / "experiments" / "results"


def zoo_case(key: str, merge_images: int) -> dict:
    """A zoo pair, merged on ``merge_images`` images of both tasks; timed on batch 64."""
    name_a, name_b, label = ZOO_PAIRS[key]
    (ma, ia), (mb, ib) = zoo.load(name_a), zoo.load(name_b)
    a, b = ModelSide.of(ma, ia, "model_a"), ModelSide.of(mb, ib, "model_b")
    size, channels = input_size(a)
    data, _ = merge_data(MergeConfig(batches=1, batch_size=merge_images), a, b, size=size,
                         channels=channels)
    x = torch.randn(64, channels, size, size, generator=torch.Generator().manual_seed(0))
    return {"key": key, "label": f"{name_a} + {name_b}: {label}", "a": a, "b": b,
            "data": data.images, "x": x, "batch": 64, "size": size}


def resnet50_case(merge_images: int) -> dict:
    """Two random timm resnet50 (seeds 0 and 1, 10 classes); timed on batch 16 at 224 px."""
    sides = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("timm:resnet50", num_classes=10).eval()
        sides.append(ModelSide(model, f"resnet50_seed{seed}", arch="timm:resnet50",
                               task=f"task{seed}", label_space=f"space{seed}"))
    data = load_task("fashion_mnist", "train").subset(merge_images, seed=0).adapt(224, 3)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return {"key": "resnet50", "label": "timm resnet50 x2 (random, 10 classes, 224 px)",
            "a": sides[0], "b": sides[1], "data": data.images, "x": x, "batch": 16,
            "size": 224}


@torch.no_grad()
def time_rounds(models: dict, x: torch.Tensor, rounds: int, warmup: int
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward of each model, timed in interleaved rounds, and the minor
    page faults per forward (memory the allocator maps afresh: glibc hands large freed
    tensors back to the system in some processes and not in others, and the faults, not the
    arithmetic, then set a wide model's time)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    faults = {name: 0 for name in models}
    for r in range(warmup + rounds):
        for name, model in models.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            model(x)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return ({name: statistics.median(ts) for name, ts in times.items()},
            {name: f / rounds for name, f in faults.items()})


def run_pair(case: dict, rounds: int, warmup: int, also: int = 64) -> dict:
    t0 = time.perf_counter()
    prep = prepare(case["a"], case["b"], case["data"], batch_size=len(case["data"]),
                   methods=["permute"], progress=False)
    base_macs, base_params = prep.spec.total_macs, stored_params(case["a"].model)
    models = {"original": case["a"].model.eval()}
    rows = []
    for width in WIDTHS:
        block, report = build(prep, width, "permute", heads="separate", progress=False,
                              layout="blocks")
        any_count, any_report = build(prep, width, "permute", heads="separate", progress=False,
                                      unit_multiple=1, layout="blocks")
        wide, wide_report = build(prep, width, "permute", heads="separate", progress=False,
                                  unit_multiple=also, layout="blocks")
        models[f"wide@{width}"] = wide
        dense, _ = build(prep, width, "permute", heads="separate", progress=False, blocks=False,
                         layout="blocks")
        dplan, dplan_report = build(prep, width, "permute", heads="separate", progress=False,
                                    layout="dense")
        models[f"dplan@{width}"] = dplan
        models[f"blocks@{width}"], models[f"dense@{width}"] = block, dense
        models[f"any@{width}"] = any_count
        rows.append({"width": width, "achieved": report["width"]["achieved"],
                     "structure": report["structure"],
                     "unit_multiple": report["unit_multiple"]["used"],
                     "any_macs": any_report["macs"]["executed"] / base_macs,
                     "wide_macs": wide_report["macs"]["executed"] / base_macs,
                     "wide_used": wide_report["unit_multiple"]["used"],
                     "executed_macs": report["macs"]["executed"] / base_macs,
                     "planned_macs": report["macs"]["merged"] / base_macs,
                     "dense_macs": executed_macs(dense, prep.spec.input_shape) / base_macs,
                     "params": report["params"]["merged"] / base_params,
                     "dense_params": stored_params(dense) / base_params,
                     "dplan_macs": dplan_report["macs"]["executed"] / base_macs,
                     "dplan_params": dplan_report["params"]["merged"] / base_params,
                     "dplan_planned": dplan_report["macs"]["merged"] / base_macs})
    times, faults = time_rounds(models, case["x"], rounds, warmup)
    for row in rows:
        w = row["width"]
        row["ms"] = 1e3 * times[f"blocks@{w}"]
        row["ratio"] = times[f"blocks@{w}"] / times["original"]
        row["dplan_ms"] = 1e3 * times[f"dplan@{w}"]
        row["any_ratio"] = times[f"any@{w}"] / times["original"]
        row["wide_ratio"] = times[f"wide@{w}"] / times["original"]
        row["dense_ms"] = 1e3 * times[f"dense@{w}"]
        row["dense_ratio"] = times[f"dense@{w}"] / times["original"]
        row["target"] = w * SLACK
        row["miss"] = max(0.0, row["ratio"] - row["target"])
        row["dplan_ratio"] = times[f"dplan@{w}"] / times["original"]
        row["dplan_faults"] = faults[f"dplan@{w}"]
        row["dplan_miss"] = max(0.0, row["dplan_ratio"] - row["target"])
    return {"key": case["key"], "label": case["label"], "batch": case["batch"], "also": also,
            "size": case["size"], "original_ms": 1e3 * times["original"],
            "original_faults": faults["original"],
            "rounds": rounds, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _machine() -> str:
    """The CPU model (Linux), cores and architecture, for the results header."""
    import os

    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores ({platform.machine()}), shared with other jobs"


def render(results: dict) -> str:
    lines = ["# Latency of merged models relative to one original\n",
             f"{results['machine']}; torch {results['torch']}, {results['threads']} thread(s); "
             f"median of interleaved rounds (after {results['warmup']} warm-up)"
             + ("; each pair in a process of its own" if results.get("own_process") else "")
             + f"; `method=\"permute\"`, separate heads, the default allocation (streams "
             f"under a LayerNorm merged while the other groups can take the width).  *dense*: "
             f"the model pleas builds by "
             f"default (`--layout dense`: plain layers, the plan counting their structural "
             f"zeros in the width; width 2: the two networks run whole, `side_by_side`); "
             f"*blocks*: `--layout blocks` (only the non-zero blocks, as up to three pieces "
             f"per layer; unit counts in multiples of 16 where the width allows, *multiple* "
             f"the one used); *multiple 64*: blocks with `--unit-multiple 64`; *any count*: "
             f"blocks with unit counts unrounded (`unit_multiple=1`); *zeros multiplied*: the "
             f"blocks plan's model with its structural zeros multiplied (executing more than "
             f"the width).  MACs executed on the forward pass and params stored, both / one "
             f"original.  Target: latency ratio <= width x {SLACK}.\n",
             f"Command: `{results['command']}`\n"]
    for pair in results["pairs"]:
        lines.append(f"\n**{pair['label']}**, batch {pair['batch']} at {pair['size']} px, "
                     f"{pair['rounds']} rounds (one original: {pair['original_ms']:.1f} ms"
                     + (f", {pair['original_faults']:.0f} minor page faults per forward"
                        if "original_faults" in pair else "") + ")\n")
        also = pair.get("also", 64)
        lines.append("| width | dense: executed MACs | dense: stored params | dense: ms "
                     "| dense: latency ratio | target | dense: missed by | dense: page faults "
                     "| blocks: multiple | blocks: MACs | blocks: params | blocks: ratio "
                     f"| blocks: missed by | multiple {also}: ratio | any count: ratio "
                     "| zeros multiplied: MACs | zeros multiplied: ratio |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                     "---:|---:|---:|")
        for r in pair["rows"]:
            miss = f"**{r['miss']:.2f}**" if r["miss"] > 0 else "met"
            dmiss = f"**{r['dplan_miss']:.2f}**" if r["dplan_miss"] > 0 else "met"
            multiple = ("side by side" if r.get("structure") == "side_by_side"
                        else r.get("unit_multiple", 1))
            faults = f"{r['dplan_faults']:.0f}" if "dplan_faults" in r else "-"
            lines.append(f"| {r['width']:g} | {r['dplan_macs']:.3f}x | "
                         f"{r.get('dplan_params', float('nan')):.3f}x | "
                         f"{r.get('dplan_ms', float('nan')):.1f} | {r['dplan_ratio']:.2f} | "
                         f"{r['target']:.2f} | {dmiss} | {faults} | {multiple} | "
                         f"{r['executed_macs']:.3f}x | {r['params']:.3f}x | {r['ratio']:.2f} | "
                         f"{miss} | {r.get('wide_ratio', float('nan')):.2f} | "
                         f"{r.get('any_ratio', float('nan')):.2f} | {r['dense_macs']:.2f}x | "
                         f"{r['dense_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, pair in enumerate(results["pairs"]):
        ws = [r["width"] for r in pair["rows"]]
        color = f"C{i}"
        ax.plot(ws, [r["dplan_ratio"] for r in pair["rows"]], "o-", color=color,
                label=f"{pair['key']}: dense (default)")
        ax.plot(ws, [r["ratio"] for r in pair["rows"]], "d--", color=color, alpha=0.7,
                label=f"{pair['key']}: blocks")
        ax.plot(ws, [r["dense_ratio"] for r in pair["rows"]], "x--", color=color, alpha=0.6,
                label=f"{pair['key']}: zeros multiplied")
        if "wide_ratio" in pair["rows"][0]:
            ax.plot(ws, [r["wide_ratio"] for r in pair["rows"]], "s-.", color=color, alpha=0.6,
                    label=f"{pair['key']}: multiple {pair.get('also', 64)}")
        if "any_ratio" in pair["rows"][0]:
            ax.plot(ws, [r["any_ratio"] for r in pair["rows"]], "+:", color=color, alpha=0.6,
                    label=f"{pair['key']}: any count")
    ax.plot(WIDTHS, WIDTHS, color="black", lw=1, label="ratio = width")
    ax.plot(WIDTHS, [w * SLACK for w in WIDTHS], color="gray", lw=1, ls=":",
            label=f"target: width x {SLACK}")
    ax.set_xlabel("width (compute budget, x one model)")
    ax.set_ylabel("latency / one original")
    ax.set_title("Merged model latency (CPU)")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_pair(key: str, args: argparse.Namespace) -> dict:
    """One pair's table, timed in this process."""
    if key == "resnet50":
        case, rounds = resnet50_case(16), args.rounds_resnet50
    else:
        case, rounds = zoo_case(key, args.merge_images), args.rounds
    return run_pair(case, rounds, args.warmup, args.also_multiple)


def pair_in_own_process(key: str, args: argparse.Namespace) -> dict | None:
    """:func:`measure_pair` in a fresh process (why: the module docstring); None if it
    failed (its error output is printed)."""
    cmd = [sys.executable, __file__, "--one", key, "--rounds", str(args.rounds),
           "--rounds-resnet50", str(args.rounds_resnet50), "--warmup", str(args.warmup),
           "--merge-images", str(args.merge_images), "--threads", str(args.threads),
           "--also-multiple", str(args.also_multiple)]
    return run_child(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--rounds", type=int, default=21, help="timed rounds, zoo pairs (21)")
    p.add_argument("--rounds-resnet50", type=int, default=5, help="timed rounds, resnet50 (5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--merge-images", type=int, default=64, help="zoo pairs (64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--also-multiple", type=int, default=64,
                   help="a second unit multiple timed beside the default (64)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--render", action="store_true",
                   help="only rewrite latency.md and latency.png from --out's latency.json")
    p.add_argument("--one", choices=PAIRS, help=argparse.SUPPRESS)  # a child: one pair
    args = p.parse_args(argv)
    if args.render:
        results = json.loads((args.out / "latency.json").read_text())
        (args.out / "latency.md").write_text(render(results))
        plot(results, args.out / "latency.png")
        return 0
    torch.set_num_threads(args.threads)
    if args.one:
        report(measure_pair(args.one, args))
        return 0
    command = " ".join(["python experiments/latency.py", *(argv or sys.argv[1:])])
    results = {"machine": _machine(), "torch": torch.__version__, "threads": args.threads,
               "rounds": args.rounds, "warmup": args.warmup, "command": command,
               "own_process": True, "pairs": []}
    for key in args.pairs:
        pair = pair_in_own_process(key, args)
        if pair is None:
            return 1
        results["pairs"].append(pair)
        print(f"{pair['label']} ({pair['seconds']} s)")
        for r in pair["rows"]:
            print(f"  width {r['width']:<4g} dense: MACs {r['dplan_macs']:.3f}x  ratio "
                  f"{r['dplan_ratio']:.2f} (target {r['target']:.2f})  blocks: MACs "
                  f"{r['executed_macs']:.3f}x  ratio {r['ratio']:.2f}  any-count ratio "
                  f"{r['any_ratio']:.2f}  zeros-multiplied ratio {r['dense_ratio']:.2f}  page "
                  f"faults per forward: dense {r['dplan_faults']:.0f}, original "
                  f"{pair['original_faults']:.0f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(results)
    (args.out / "latency.md").write_text(text)
    (args.out / "latency.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "latency.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
