"""How much a merge costs, in units of one forward pass of both models over the same data.

    python experiments/benchmark.py                      # all cases, CPU
    python experiments/benchmark.py --cases demo --device cuda
    python experiments/benchmark.py --cases resnet50 --images 256

The floor of each case is ONE forward pass of model A and model B over the merge data (same
device, batch size and dtype), measured in the same process right before the merge, so that
every stage can be stated as a ratio to it on a shared, noisy machine.  Stages: the matching
statistics pass, the closed-form Gram pass (measured separately: the default sequential mode
does not need it), matching, planning, widening, the sequential least-squares fit (one sweep,
pleas.sweep) and the BatchNorm reset (a pass after the fit only for BatchNorms the sweep could
not set itself: none in these cases, so ~0); "merge" is every stage of the default merge (PLeaS,
sequential) but evaluation and imports.  For the demo pair the per-layer fit it replaced
(pleas.lstsq.fit_sequential_per_layer) is timed too.  Each case runs in its own process, so
its peak resident memory (and the CUDA peak on a GPU) is its own.  Writes
experiments/results/benchmark.{md,json,png}
(a run of some cases keeps the other cases' earlier results in the table).
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
sys.path.insert(0, str(ROOT))

from child import report, run_child  # noqa: E402

CASES = {
    "demo": "resnet_a + resnet_b (ResNet-20, 28 px, the CLI's 1,024 merge images, batch 64)",
    "resnet50": "two timm resnet50 (random weights, 10 classes, 224 px, batch 32)",
    "vit_b16": "two timm vit_base_patch16_224 (random weights, 10 classes, 224 px, batch 32)",
}
TARGETS = {"statistics (matching)": 1.5, "Gram pass (closed form)": 5.0,
           "least squares (sequential)": 6.0}
WHOLE_TARGET = {"demo": None, "resnet50": 12.0, "vit_b16": 12.0}  # x floor
DEMO_MERGE_SECONDS = 8.0  # the demo pair's merge target is in seconds (issue 13)


def _sides(case: str, images: int):
    from pleas import zoo
    from pleas.config import MergeConfig
    from pleas.data import load_task
    from pleas.models import build_model
    from pleas.pipeline import ModelSide
    from pleas.runner import input_size, merge_data

    if case == "demo":
        (a, ia), (b, ib) = zoo.load("resnet_a"), zoo.load("resnet_b")
        sa, sb = ModelSide.of(a, ia), ModelSide.of(b, ib)
        size, channels = input_size(sa)
        data, _ = merge_data(MergeConfig(batches=images // 64), sa, sb, size=size,
                             channels=channels)
        return sa, sb, data, 64
    arch = {"resnet50": "timm:resnet50", "vit_b16": "timm:vit_base_patch16_224"}[case]
    torch.manual_seed(0)
    a = build_model(arch, num_classes=10).eval()
    torch.manual_seed(1)
    b = build_model(arch, num_classes=10).eval()
    data = load_task("fashion_mnist", "train").subset(images, seed=0).adapt(224, 3)
    return ModelSide(a, "a", arch=arch), ModelSide(b, "b", arch=arch), data, 32


@torch.no_grad()
def _forward_both(a, b, batches, device) -> None:
    """One forward pass of A and B over the batches: the floor's work."""
    for x in batches:
        x = x.to(device)
        a(x)
        b(x)


def _floor(a, b, batches, device) -> float:
    """Seconds of :func:`_forward_both` (the best of two)."""
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        _forward_both(a, b, batches, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(case: str, images: int, device: str, gram: bool, reference: bool,
            max_cache_gb: float | None = None, repeats: int = 1) -> dict:
    """All stages of one case, in this process; with ``repeats`` > 1 the statistics pass,
    the floor, the merge and the Gram pass run that many times and each figure is the median
    (the per-layer reference runs once).  A stage's ratio (``ratios``) is the median over the
    repeats of its seconds over the floor measured in the same repeat (right before it, for
    the Gram pass and the per-layer reference): the machine's speed drifts by 20-30% within
    a run on a shared machine, and a floor measured minutes away from its stage moved the
    demo's Gram pass from 5.6x to 4.4x between two runs at equal seconds."""
    from pleas.lstsq import fit_sequential_per_layer
    from pleas.normalization import merged_layernorm_state
    from pleas.pipeline import build, num_classes, prepare, uses_separate_heads
    from pleas.plan import allocate, build_plan
    from pleas.widen import build_module, widen_state_dict

    a, b, data, batch_size = _sides(case, images)
    a.model.to(device), b.model.to(device)
    kw = dict(device=device, batch_size=batch_size, max_batches=None, progress=False)
    cache = {} if max_cache_gb is None else {"max_cache_gb": max_cache_gb}
    floors, runs, ratios = [], [], []
    for r in range(repeats):
        prep = prepare(a, b, data, methods=["pleas"], **kw)
        if r == 0:  # the high-water mark so far: the statistics pass's peak (never goes down)
            rss_statistics = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        floors.append(_floor(a.model, b.model, prep.batches, device))
        merged, report = build(prep, 1.5, "pleas", progress=False, **cache)
        s = {**prep.seconds, **report["seconds"]}
        run = {"spec": s["spec"], "statistics (matching)": s["statistics"],
               "matching": s["matching"], "planning": s["planning"], "widen": s["widen"],
               "least squares (sequential)": s["least_squares"], "batchnorm": s["batchnorm"]}
        run["merge"] = sum(run.values())
        runs.append(run)
        ratios.append({k: v / floors[-1] for k, v in run.items()})
        del merged
    floor = statistics.median(floors)
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    stage_ratios = {k: statistics.median(r[k] for r in ratios) for k in ratios[0]}
    if gram:
        seconds, over_floor = [], []
        for _ in range(repeats):
            floor_now = _floor(a.model, b.model, prep.batches, device)
            seconds.append(prepare(a, b, data, methods=["pleas_closed"], activations=False,
                                   **kw).seconds["statistics"])
            over_floor.append(seconds[-1] / floor_now)
        stages["Gram pass (closed form)"] = statistics.median(seconds)
        stage_ratios["Gram pass (closed form)"] = statistics.median(over_floor)
        bound = counted_work(a, b, data, prep, kw, device)
    if reference:  # the per-layer fit the sweep replaced, on the same plan
        separate = uses_separate_heads(prep, "auto")
        match = prep.matching("activation", 0)
        units = allocate(prep.spec, match, 1.5, "uniform", separate_heads=separate)
        plan = build_plan(prep.spec, match, units, separate, num_classes(b.model, prep.spec))
        sa, sb = a.model.state_dict(), b.model.state_dict()
        state = merged_layernorm_state(prep.spec, plan, widen_state_dict(sa, sb, prep.spec, plan),
                                       a.model)
        net = build_module(a.model, state).to(device).eval()
        floor_now = _floor(a.model, b.model, prep.batches, device)
        t0 = time.perf_counter()
        fit_sequential_per_layer(prep.grams.layers, net, a.model, b.model, prep.batches, plan,
                                 sa, sb, device, positions=prep.grams.positions, progress=False)
        stages["least squares (per layer, before)"] = time.perf_counter() - t0
        stage_ratios["least squares (per layer, before)"] = (
            stages["least squares (per layer, before)"] / floor_now)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    out = {"case": case, "label": CASES[case], "images": prep.images, "batch_size": batch_size,
           "device": device, "floor_seconds": floor, "stages": stages, "ratios": stage_ratios,
           "width_achieved": report["width"]["achieved"], "peak_rss_mb": peak,
           "peak_rss_statistics_mb": rss_statistics,
           "layers_fitted": len(report["least_squares"]), "threads": torch.get_num_threads(),
           "max_cache_gb": max_cache_gb, "repeats": repeats}
    if gram:
        out["counted"] = bound
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return out


def gemm_rate(device: str, size: int = 1024, depth: int = 4096, repeats: int = 9) -> float:
    """Float32 multiply-adds x 2 per second of one (size x depth) @ (depth x size) product on
    ``device``, the median of ``repeats`` (shapes like the demo's widest Gram products)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, depth, generator=gen).to(device)
    y = torch.randn(depth, size, generator=gen).to(device)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        x @ y
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * size * size * depth / statistics.median(times[1:])


def count_flops(fn) -> float:
    """Flops (2 per multiply-add) of the matrix products and convolutions ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def counted_work(a, b, data, prep, kw: dict, device: str) -> dict:
    """The floating-point work of the floor, the Gram pass and the sequential fit, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on one more run of each (matrix products and
    convolutions; elementwise work is not counted), and a float32 GEMM rate measured here.
    Why: it says how much of a stage's time the arithmetic alone needs on this machine, so a
    missed target reads as "this many floors of products" or as overhead."""
    from pleas.pipeline import build, prepare

    return {"floor": count_flops(lambda: _forward_both(a.model, b.model, prep.batches, device)),
            "gram": count_flops(lambda: prepare(a, b, data, methods=["pleas_closed"],
                                          activations=False, **kw)),
            "fit": count_flops(lambda: build(prep, 1.5, "pleas", progress=False)),
            "gemm_rate": gemm_rate(device)}


def ratio(result: dict, stage: str) -> float:
    """A stage's seconds / floor: the per-repeat median (:func:`measure`), or for results
    written before there was one, the median seconds over the median floor."""
    if stage in result.get("ratios", {}):
        return result["ratios"][stage]
    return result["stages"][stage] / result["floor_seconds"]


def table(results: list[dict]) -> str:
    names = ["spec", "statistics (matching)", "Gram pass (closed form)", "matching", "planning",
             "widen", "least squares (sequential)", "least squares (per layer, before)",
             "batchnorm", "merge"]
    lines = ["| stage | " + " | ".join(f"{r['case']} s (x floor)" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    lines.append("| floor: one forward of A and B | " + " | ".join(
        f"{r['floor_seconds']:.2f} (1.0)" for r in results) + " |")
    for n in names:
        if not any(n in r["stages"] for r in results):
            continue
        cells = []
        for r in results:
            if n not in r["stages"]:
                cells.append("-")
                continue
            v, x = r["stages"][n], ratio(r, n)
            target = TARGETS.get(n) if n != "merge" else WHOLE_TARGET.get(r["case"])
            mark = "" if target is None else (" ok" if x <= target else
                                              f" **over {target:g}x by {x / target:.2f}x**")
            if n == "merge" and r["case"] == "demo":
                mark = (" ok" if v <= DEMO_MERGE_SECONDS else
                        f" **over {DEMO_MERGE_SECONDS:g} s by {v / DEMO_MERGE_SECONDS:.2f}x**")
            cells.append(f"{v:.2f} ({x:.1f}x{mark})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| peak RSS (MB) | " + " | ".join(f"{r['peak_rss_mb']:.0f}" for r in results)
                 + " |")
    if any("peak_rss_statistics_mb" in r for r in results):
        lines.append("| peak RSS by the end of statistics (MB) | " + " | ".join(
            f"{r['peak_rss_statistics_mb']:.0f}" if "peak_rss_statistics_mb" in r else "-"
            for r in results) + " |")
    if any("cuda_peak_mb" in r for r in results):
        lines.append("| CUDA peak (MB) | " + " | ".join(
            f"{r.get('cuda_peak_mb', 0):.0f}" for r in results) + " |")
    lines.append("| merge images | " + " | ".join(str(r["images"]) for r in results) + " |")
    lines.append("| torch threads | " + " | ".join(str(r.get("threads", "?")) for r in results)
                 + " |")
    lines.append("| runs (medians) | " + " | ".join(str(r.get("repeats", 1)) for r in results)
                 + " |")
    return "\n".join(lines)


def counted_table(results: list[dict]) -> str:
    """The counted arithmetic (:func:`counted_work`) of the cases that have it: GFLOP, the
    seconds it needs at the GEMM rate measured in the same process, and that as floors."""
    rows = []
    for r in results:
        c = r.get("counted")
        if not c:
            continue
        rate = c["gemm_rate"]
        for name, key, stage in [("floor: one forward of A and B", "floor", None),
                                 ("Gram pass (closed form)", "gram", "Gram pass (closed form)"),
                                 ("build (sequential fit and its forwards)", "fit",
                                  "least squares (sequential)")]:
            at_rate = c[key] / rate
            measured = (r["floor_seconds"] if stage is None else r["stages"].get(stage))
            share = "-" if not measured else f"{100 * at_rate / measured:.0f}%"
            rows.append(f"| {r['case']} | {name} | {c[key] / 1e9:.1f} | {at_rate:.2f} | "
                        f"{at_rate / r['floor_seconds']:.1f}x | {share} |")
        rows.append(f"| {r['case']} | float32 GEMM rate, GFLOP/s | {rate / 1e9:.0f} | | | |")
    if not rows:
        return ""
    return ("\nArithmetic counted by `torch.utils.flop_counter.FlopCounterMode` on one more run "
            "of each (matrix products and convolutions, 2 flops per multiply-add), and the time "
            "it needs at the float32 GEMM rate measured in the same process (a 1024 x 4096 by "
            "4096 x 1024 product): what each stage would take if every product ran at that rate and "
            "nothing else cost anything.  *share*: that time as a share of the stage's measured "
            "time.\n\n"
            "| case | work | GFLOP | s at the GEMM rate | x floor | share of measured |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["statistics (matching)", "Gram pass (closed form)", "least squares (sequential)",
             "least squares (per layer, before)", "batchnorm", "merge"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + i * width for j, n in enumerate(names) if n in r["stages"]]
        ys = [ratio(r, n) for n in names if n in r["stages"]]
        ax.bar(xs, ys, width, label=r["case"])
    ax.axhline(1, color="black", lw=1, ls="--", label="floor (one forward of A and B)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("seconds / floor")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _with_earlier(results: list[dict], path: Path) -> list[dict]:
    """This run's cases, plus the cases an earlier run wrote to ``path`` that this one did not
    re-run (in the order of CASES): one table for cases that take very different times."""
    earlier = json.loads(path.read_text()) if path.exists() else []
    new = {r["case"]: r for r in results}
    merged = {**{r["case"]: r for r in earlier if r["case"] not in new}, **new}
    return [merged[c] for c in CASES if c in merged]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--images", type=int, default=None,
                   help="merge images per case (default: 1024 for demo, 256 otherwise)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--max-cache-gb", type=float, default=None,
                   help="the sequential fit's activation memory (default: pleas' default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="statistics, floor and merge this many times per case; medians")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        images = args.images or (1024 if args.one == "demo" else 256)
        res = measure(args.one, images, args.device, gram=args.one == "demo",
                      reference=args.one == "demo", max_cache_gb=args.max_cache_gb,
                      repeats=args.repeats)
        report(res)
        return 0
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case, "--device", args.device]
        if args.images:
            cmd += ["--images", str(args.images)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.max_cache_gb is not None:
            cmd += ["--max-cache-gb", str(args.max_cache_gb)]
        cmd += ["--repeats", str(args.repeats)]
        print(f"[benchmark] {case} ...", flush=True)
        res = run_child(cmd)
        if res is None:
            return 1
        res["command"] = "python experiments/benchmark.py " + " ".join(sys.argv[1:])
        results.append(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    results = _with_earlier(results, out / f"benchmark{suffix}.json")
    md = (f"Merge cost as a ratio to one forward pass of both models over the same merge data "
          f"(the floor, measured in the same process; with several runs, each ratio is the "
          f"median over the runs of the stage's seconds over the floor measured in the same "
          f"run, next to it), width 1.5, PLeaS (sequential least "
          f"squares), {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs "
          f"({platform.machine()}).  Cases: "
          + "; ".join(f"**{r['case']}**: {r['label']}" for r in results)
          + ".  Targets (issue 13): matching statistics <= 1.5x, Gram pass <= 5x, sequential "
          "fit <= 6x the floor; merge <= 8 s for the demo pair, <= 12x the floor for the 224 px "
          "pairs.  Made by: "
          + "; ".join(f"{r['case']}: `{r.get('command', '?')}`" for r in results)
          + ".\n\n" + table(results) + "\n" + counted_table(results))
    (out / f"benchmark{suffix}.md").write_text(md)
    (out / f"benchmark{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"benchmark{suffix}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
