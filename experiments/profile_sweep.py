"""Where the demo merge's time goes, op by op (cProfile), next to the floor.

    python experiments/profile_sweep.py

Prepares the demo pair (resnet_a + resnet_b, the CLI's 1,024 merge images), measures the floor
(one forward of A and B over the merge data) and builds the width-1.5 PLeaS merge under
cProfile, then prints the stage times of the report and the 25 functions with the most time of
their own (convolutions, the Gram products in ``add_gram``, einsums, gathers...).  Profiled
times run slower than plain ones; the README quotes the split, not the totals.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import benchmark  # noqa: E402
from pleas.pipeline import build, prepare  # noqa: E402


def main() -> int:
    a, b, data, batch_size = benchmark._sides("demo", 1024)
    prep = prepare(a, b, data, methods=["pleas"], batch_size=batch_size, max_batches=None,
                   progress=False)
    floor = benchmark._floor(a.model, b.model, prep.batches, "cpu")
    profiler = cProfile.Profile()
    profiler.enable()
    _, report = build(prep, 1.5, "pleas", progress=False)
    profiler.disable()
    print(f"floor (one forward of A and B, not profiled): {floor:.2f} s")
    print("stages (profiled):", {k: round(v, 2) for k, v in report["seconds"].items()})
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
