"""Streams under a LayerNorm: keep them merged (``uniform``, the default) or split them like
every other group (``even``)?  Accuracy and latency of both plans on the ViT pair.

    python experiments/allocation_norms.py              # about 3 min on CPU
    python experiments/allocation_norms.py --widths 1.25 --rounds 7      # a quick look

A LayerNorm over a partly merged stream (the ViT's residual stream) becomes a
:class:`pleas.normalization.MergedLayerNorm`: two views, each normalised on its own and blended
on the merged units.  ``allocation="even"`` keeps one fraction of every hidden group apart, the
residual stream included; ``allocation="uniform"`` keeps the streams under a LayerNorm merged
while the other groups (attention heads, MLP hidden units) can take the width, and splits them
only past that (at 1.99x on the zoo ViT).  For both plans at each width: the executed width,
the mean test accuracy over the two tasks of PLeaS (sequential and closed-form least squares),
PLeaS-free (both, on the proxy data) and permute, evaluated as ``experiments/sweep.py`` does
(same merge data, proxy data and test images), and the latency of the dense merged model
relative to one original (median of interleaved rounds, batch 64, one thread, as
``experiments/latency.py`` times it), with the number of merged LayerNorms each plan builds.

Writes experiments/results/allocation_norms.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

from latency import SLACK, _machine, time_rounds  # noqa: E402
from sweep import Evaluator  # noqa: E402

from pleas import zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.normalization import MergedLayerNorm  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402

ALLOCATIONS = ("uniform", "even")
METHODS = ("pleas", "pleas_closed", "pleas_free", "pleas_free_closed", "permute")
OUT = ROOT / "experiments" / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=float, nargs="+", default=[1.25, 1.5, 1.75])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=21, help="timed rounds (default 21)")
    p.add_argument("--out", type=Path, default=OUT)
    return p


def merged_norms(model) -> int:
    return sum(isinstance(m, MergedLayerNorm) for m in model.modules())


def run(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    (ma, ia), (mb, ib) = zoo.resolve("vit_a"), zoo.resolve("vit_b")
    a, b = ModelSide.of(ma, ia, "model_a"), ModelSide.of(mb, ib, "model_b")
    size, channels = input_size(a)
    config = MergeConfig(seed=0)  # the sweep's merge data: 16 batches of 64
    data, data_name = merge_data(config, a, b, size=size, channels=channels)
    proxy, proxy_name = merge_data(config.replace(proxy_data="animal_mnist"), a, b, size=size,
                                   channels=channels)
    on_data = [m for m in args.methods if not m.startswith("pleas_free")]
    on_proxy = [m for m in args.methods if m.startswith("pleas_free")]
    options = dict(batch_size=config.batch_size, max_batches=config.batches,
                   positions=config.positions, seed=0)
    prep = prepare(a, b, data, data_name=data_name, methods=on_data or ["permute"], **options)
    prep_free = (prepare(a, b, proxy, data_name=proxy_name, methods=on_proxy, **options)
                 if on_proxy else None)
    evaluator = Evaluator(prep, size, channels, 1000, "cpu")
    rows, models = [], {"original": a.model.eval()}
    for width in args.widths:
        for allocation in ALLOCATIONS:
            row = {"width": width, "allocation": allocation, "accuracy": {}}
            for method in args.methods:
                p = prep_free if method.startswith("pleas_free") else prep
                merged, _ = build(p, width, method, allocation=allocation, seed=0,
                                  progress=False)
                acc = evaluator(merged)
                row["accuracy"][method] = sum(acc.values()) / len(acc)
            # the plan (so the width and the norms built) is the allocation's, whatever the
            # method: read them off the model that is timed
            timed, report = build(prep, width, "permute", allocation=allocation,
                                  heads="separate", progress=False)
            row["executed"] = report["width"]["executed"]
            row["merged_norms"] = merged_norms(timed)
            models[f"{allocation}@{width}"] = timed.eval()
            rows.append(row)
    x = torch.randn(64, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        times, _ = time_rounds(models, x, args.rounds, warmup=2)
    for row in rows:
        row["latency"] = times[f"{row['allocation']}@{row['width']}"] / times["original"]
    return {"rows": rows, "methods": list(args.methods), "rounds": args.rounds,
            "original_ms": 1e3 * times["original"], "merge_data": data_name,
            "proxy_data": proxy_name, "machine": _machine(), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t_start, 1)}


def render(res: dict) -> str:
    methods = res["methods"]
    head = ("| width | allocation | executed | merged LayerNorms | "
            + " | ".join(methods) + " | latency ratio | target |")
    lines = [
        "# Streams under a LayerNorm: merged (uniform) or split like the rest (even)", "",
        f"vit_a + vit_b (Fashion-MNIST 0-4 / 5-9, separate heads).  Mean test accuracy (%) over "
        f"the two tasks (1000 test images each, as `experiments/sweep.py`; merge data "
        f"{res['merge_data']}, proxy data {res['proxy_data']} for pleas-free); latency of the "
        f"dense merged model / one original ({res['original_ms']:.1f} ms), median of "
        f"{res['rounds']} interleaved rounds, batch 64, {res['machine']}, torch {res['torch']}, "
        f"one thread.  *uniform* (the default) keeps the residual stream merged while the "
        f"other groups can take the width; *even* keeps one fraction of every group apart.  "
        f"Target: latency ratio <= width x {SLACK}.", "",
        "Command: `python experiments/allocation_norms.py`", "",
        head, "|" + "---|" * 2 + "---:|" * (len(methods) + 4)]
    for r in res["rows"]:
        acc = " | ".join(f"{r['accuracy'][m]:.2f}" for m in methods)
        lines.append(f"| {r['width']:g} | {r['allocation']} | {r['executed']:.3f} | "
                     f"{r['merged_norms']} | {acc} | {r['latency']:.2f} | "
                     f"{r['width'] * SLACK:.2f} |")
    lines += ["", f"Wall time {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocation_norms.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    (args.out / "allocation_norms.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
