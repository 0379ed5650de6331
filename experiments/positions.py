"""What capping each layer's sampled positions by its Gram cost does to accuracy and time.

    python experiments/positions.py                 # resnet pair, seeds 0 1 (about 5 min)
    python experiments/positions.py --pairs resnet vit --seeds 0 1 2

The least-squares moments sample ``--positions`` (64) positions per image and layer, fewer
where a layer's Gram would cost more than ``pleas.lstsq.GRAM_COST`` (3) times its own forward
pass (:func:`pleas.lstsq.layer_positions`; in the demo ResNet-20 that is stage 3, 16 of its 49
positions).  This script builds the same merges with that cap ("capped") and without it
("uncapped": GRAM_COST set to infinity, the rule of earlier releases), for each sampling seed,
and prints mean test accuracy by width next to the seconds of the statistics pass (with the
closed-form Gram pass for pleas_closed) and of the fits.  Writes
``experiments/results/positions.md``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from pleas import lstsq, zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.pipeline import ModelSide, build, prepare  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402
from sweep import PAIRS, Evaluator  # noqa: E402

RULES = {"capped": lstsq.GRAM_COST, "uncapped": float("inf")}


def run_pair(pair: str, methods: list[str], widths: list[float], seeds: list[int],
             eval_limit: int) -> list[dict]:
    name_a, name_b, _ = PAIRS[pair]
    (a, ia), (b, ib) = zoo.load(name_a), zoo.load(name_b)
    sa, sb = ModelSide.of(a, ia, "model_a"), ModelSide.of(b, ib, "model_b")
    size, channels = input_size(sa)
    data, _ = merge_data(MergeConfig(), sa, sb, size=size, channels=channels)
    rows, evaluator = [], None
    for method in methods:
        for seed in seeds:
            for rule, cost in RULES.items():
                lstsq.GRAM_COST = cost  # read by layer_positions at every draw
                try:
                    t0 = time.perf_counter()
                    prep = prepare(sa, sb, data, methods=[method], seed=seed, progress=False)
                    t_prep = time.perf_counter() - t0
                    evaluator = evaluator or Evaluator(prep, size, channels, eval_limit, "cpu")
                    acc, t_fit = [], 0.0
                    for w in widths:
                        merged, report = build(prep, w, method, seed=seed, progress=False)
                        t_fit += report["seconds"].get("least_squares", 0.0)
                        per_task = evaluator(merged)
                        acc.append(sum(per_task.values()) / len(per_task))  # percent
                finally:
                    lstsq.GRAM_COST = RULES["capped"]
                rows.append({"pair": pair, "method": method, "seed": seed, "rule": rule,
                             "acc": acc, "prepare_s": t_prep, "fit_s": t_fit})
                print(f"{pair} {method} seed {seed} {rule}: "
                      + " ".join(f"{x:.2f}" for x in acc)
                      + f"  prepare {t_prep:.1f} s, fits {t_fit:.1f} s", flush=True)
    return rows


def table(rows: list[dict], widths: list[float]) -> list[str]:
    head = " | ".join(f"{w:g}x" for w in widths)
    lines = [f"| pair | method | seed | rule | {head} | prepare s | fits s |",
             "|---|---|---:|---|" + "---:|" * len(widths) + "---:|---:|"]
    for r in rows:
        cells = " | ".join(f"{x:.2f}" for x in r["acc"])
        lines.append(f"| {r['pair']} | {r['method']} | {r['seed']} | {r['rule']} | {cells} | "
                     f"{r['prepare_s']:.1f} | {r['fit_s']:.1f} |")
    lines += ["", "Capped minus uncapped, same seed (accuracy points; time as capped / uncapped):",
              "", f"| pair | method | seed | {head} | prepare | fits |",
              "|---|---|---:|" + "---:|" * len(widths) + "---:|---:|"]
    diffs = []
    for r in rows:
        if r["rule"] != "capped":
            continue
        u = next(o for o in rows if o["rule"] == "uncapped" and
                 (o["pair"], o["method"], o["seed"]) == (r["pair"], r["method"], r["seed"]))
        d = [c - v for c, v in zip(r["acc"], u["acc"])]
        diffs += d
        lines.append(f"| {r['pair']} | {r['method']} | {r['seed']} | "
                     + " | ".join(f"{x:+.2f}" for x in d)
                     + f" | {r['prepare_s'] / u['prepare_s']:.2f} | "
                       f"{r['fit_s'] / max(u['fit_s'], 1e-9):.2f} |")
    if diffs:
        lines += ["", f"Over all {len(diffs)} cells: mean {statistics.mean(diffs):+.2f}, "
                      f"largest |difference| {max(abs(x) for x in diffs):.2f} points."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["resnet"], choices=sorted(PAIRS))
    p.add_argument("--methods", nargs="+", default=["pleas", "pleas_closed"])
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-limit", type=int, default=1000,
                   help="test images per task (stratified, seed 0), as experiments/sweep.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for pair in args.pairs:
        rows += run_pair(pair, args.methods, args.widths, args.seeds, args.eval_limit)
    cmd = "python experiments/positions.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    lines = ["# Positions capped by each layer's Gram cost, against the uncapped rule", "",
             f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
             f"mean test accuracy (%) over the two tasks ({args.eval_limit} test images per "
             f"task), merge data as the CLI's (1,024 images).  GRAM_COST = "
             f"{RULES['capped']:g}, MIN_POSITIONS = {lstsq.MIN_POSITIONS}.  Command: "
             f"`{cmd.strip()}`", ""] + table(rows, args.widths)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "positions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
