"""Where a merge's peak memory is: resident set size per stage of a width-1.5 PLeaS merge.

    python experiments/rss_stages.py --case vit_b16 --images 256     # about 17 min, 1 thread
    python experiments/rss_stages.py --case demo                     # seconds

A thread samples the process's RSS every 50 ms and files each sample under the stage running
then (the pipeline's stage functions are wrapped to name themselves; "a+after_b" is the time
inside stage a after its step b returned).  Prints each stage's highest RSS, highest first,
and the process's high-water mark.  The cases are benchmark.py's (same models and data).
"""
from __future__ import annotations

import argparse
import functools
import resource
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import benchmark  # noqa: E402
import pleas.pipeline as pipeline  # noqa: E402

WRAPPED = {"run_models": "statistics", "fit_sequential": "fit_sequential",
           "recalibrate_batchnorm": "batchnorm", "widen_states": "widen",
           "build_module": "build_module", "block_structured": "block_structured",
           "match_activations": "matching"}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="demo", choices=list(benchmark.CASES))
    p.add_argument("--images", type=int, default=None,
                   help="merge images (default: 1024 for demo, 256 otherwise)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stage, peaks = ["start"], {}

    def sample() -> None:
        while True:
            r, s = rss_mb(), stage[0]
            peaks[s] = max(peaks.get(s, 0.0), r)
            time.sleep(0.05)

    def named(name: str, fn):
        @functools.wraps(fn)
        def run(*a, **k):
            before = stage[0]
            stage[0] = name
            try:
                return fn(*a, **k)
            finally:
                stage[0] = f"{before}+after_{name}"
        return run

    for attr, name in WRAPPED.items():
        if hasattr(pipeline, attr):
            setattr(pipeline, attr, named(name, getattr(pipeline, attr)))
    threading.Thread(target=sample, daemon=True).start()
    images = args.images or (1024 if args.case == "demo" else 256)
    a, b, data, batch_size = benchmark._sides(args.case, images)
    stage[0] = "prepare"
    prep = pipeline.prepare(a, b, data, methods=["pleas"], batch_size=batch_size,
                            max_batches=None, progress=False)
    stage[0] = "build"
    pipeline.build(prep, 1.5, "pleas", progress=False)
    stage[0] = "done"
    time.sleep(0.2)
    print(f"case {args.case}, {images} images, {args.threads} thread(s)")
    print("| stage | highest RSS (MB) |\n|---|---:|")
    for name, mb in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {mb:.0f} |")
    print(f"\nprocess high-water mark: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
