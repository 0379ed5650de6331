"""Where the demo merge's sequential fit spends its time summing moments.

    python experiments/profile_fit.py

Merges the demo pair (resnet_a + resnet_b, width 1.5, PLeaS sequential, the CLI's 1,024 merge
images) under the torch profiler and splits the time inside ``SweepMoments.add`` (the fit's
moment sums) into the products (in the activations' dtype), the exact-sum rounding
(:mod:`pleas.sums`) and the rest, next to the floor (one forward of A and B over the same
data) measured in the same run.  Prints a table; the README quotes it.  Profiled times run
slower than plain ones.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import benchmark  # noqa: E402
from pleas import sweep  # noqa: E402
from pleas.pipeline import build, prepare  # noqa: E402

PRODUCTS = {"aten::matmul", "aten::einsum"}
ROUNDING = {"aten::aminmax", "aten::frexp", "aten::ldexp", "aten::round", "aten::round_",
            "aten::addcdiv_", "aten::mul_", "aten::sub_", "aten::maximum", "aten::clamp_max"}
TAG = "pleas.SweepMoments.add"


def main() -> int:
    add = sweep.SweepMoments.add

    def tagged(self, *args, **kwargs):
        with record_function(TAG):
            return add(self, *args, **kwargs)

    sweep.SweepMoments.add = tagged
    a, b, data, batch_size = benchmark._sides("demo", 1024)
    prep = prepare(a, b, data, methods=["pleas"], batch_size=batch_size, max_batches=None,
                   progress=False)
    floor = benchmark._floor(a.model, b.model, prep.batches, "cpu")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        _, report = build(prep, 1.5, "pleas", progress=False)
        whole = time.perf_counter() - t0
    per_op: Counter = Counter()
    total = 0.0
    for event in prof.events():
        if event.name != TAG:
            continue
        total += event.cpu_time_total / 1e6
        for child in event.cpu_children:
            per_op[child.name] += child.cpu_time_total / 1e6
    products = sum(v for k, v in per_op.items() if k in PRODUCTS)
    rounding = sum(v for k, v in per_op.items() if k in ROUNDING)
    print(f"demo merge, width 1.5, PLeaS sequential, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| part | seconds (profiled) |\n|---|---:|")
    rows = [("floor: one forward of A and B (not profiled)", floor),
            ("build, profiled (fit + BatchNorm statistics + the rest)", whole),
            ("sequential fit (as the report times it)", report["seconds"]["least_squares"]),
            ("fit: summing moments (SweepMoments.add)", total),
            ("  of which products (matmul, einsum)", products),
            ("  of which exact-sum rounding (pleas.sums)", rounding),
            ("  of which the rest (copies, sums, zeros)", total - products - rounding)]
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
