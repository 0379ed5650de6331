"""The benchmark's counted-work bound (experiments/benchmark.py): the flop count it relies on
against a hand count, and the table's arithmetic against a synthetic result."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import benchmark  # noqa: E402


def test_count_flops_matches_a_hand_count_of_products_and_convolutions():
    lin, conv = nn.Linear(12, 5), nn.Conv2d(3, 4, 3, padding=1)
    x, img = torch.randn(7, 12), torch.randn(2, 3, 6, 6)

    def run():
        with torch.no_grad():
            lin(x)
            conv(img)
            x.T @ x

    expected = 2 * 7 * 12 * 5 + 2 * (2 * 6 * 6) * 4 * (3 * 9) + 2 * 12 * 12 * 7
    assert benchmark.count_flops(run) == expected


def test_counted_table_states_the_bound_as_seconds_floors_and_share():
    result = {"case": "demo", "floor_seconds": 2.0,
              "stages": {"Gram pass (closed form)": 10.0, "least squares (sequential)": 8.0},
              "counted": {"floor": 100e9, "gram": 400e9, "fit": 200e9, "gemm_rate": 100e9}}
    lines = benchmark.counted_table([result]).splitlines()
    gram = next(line for line in lines if "| Gram pass" in line)
    # 400 GFLOP at 100 GFLOP/s = 4 s = 2 floors = 40% of the 10 s measured
    assert gram == "| demo | Gram pass (closed form) | 400.0 | 4.00 | 2.0x | 40% |"
    fit = next(line for line in lines if "| build" in line)
    assert fit.endswith("| 200.0 | 2.00 | 1.0x | 25% |")
    assert "| float32 GEMM rate, GFLOP/s | 100 |" in lines[-1]
    assert benchmark.counted_table([{**result, "counted": None}]) == ""



def test_table_states_the_per_run_ratio_and_falls_back_for_older_results():
    """A stage's ratio is the median of its per-run ratios (each over the floor of its own run)
    where the result has them, else median seconds over the median floor; targets judge the
    ratio shown."""
    stages = {"Gram pass (closed form)": 4.0, "statistics (matching)": 1.0}
    new = {"case": "demo", "floor_seconds": 1.0, "stages": stages, "peak_rss_mb": 1.0,
           "images": 8, "ratios": {"Gram pass (closed form)": 4.5, "statistics (matching)": 1.6}}
    old = {**new, "case": "resnet50", "ratios": None}
    del old["ratios"]
    assert benchmark.ratio(new, "Gram pass (closed form)") == 4.5
    assert benchmark.ratio(old, "Gram pass (closed form)") == 4.0
    text = benchmark.table([new, old])
    gram = next(line for line in text.splitlines() if line.startswith("| Gram pass"))
    assert gram == "| Gram pass (closed form) | 4.00 (4.5x ok) | 4.00 (4.0x ok) |"
    stats = next(line for line in text.splitlines() if line.startswith("| statistics"))
    assert "1.00 (1.6x **over 1.5x by 1.07x**)" in stats and "1.00 (1.0x ok)" in stats
