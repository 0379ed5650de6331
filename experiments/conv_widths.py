"""What a 3x3 conv costs by channel count: why plans count units in multiples of 16.

    python experiments/conv_widths.py        # writes experiments/results/conv_widths.md

CPU kernels (oneDNN) compute output channels in whole vector widths, so a layer whose width
is not a multiple of the vector costs about what the next multiple does.  This times one
3x3 conv (padding 1, no bias, C in and C out channels) at the ResNet-20 zoo's feature-map
sizes, batch 64, one thread, median of interleaved rounds, and states each as a rate
(GMAC/s): a width that runs at a lower rate than its neighbours pays for channels it does
not have.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "conv_widths.md"
# feature-map side -> channel counts (the zoo ResNet-20's stages at 28 px, widened)
SHAPES = {28: (16, 24, 32), 14: (32, 40, 48, 56, 64), 7: (64, 72, 80, 96, 112, 128)}


@torch.no_grad()
def time_convs(side: int, widths: tuple[int, ...], rounds: int, batch: int) -> dict[int, float]:
    """Median seconds per forward of one conv per width, timed in interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    convs = {c: torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval() for c in widths}
    xs = {c: torch.randn(batch, c, side, side, generator=gen) for c in widths}
    times: dict[int, list[float]] = {c: [] for c in widths}
    for r in range(rounds + 2):  # two warm-up rounds
        for c in widths:
            t0 = time.perf_counter()
            convs[c](xs[c])
            if r >= 2:
                times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(ts) for c, ts in times.items()}


def render(rows: list[tuple[int, int, float, float]], rounds: int, batch: int) -> str:
    lines = ["# One 3x3 conv by channel count\n",
             f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
             f"1 thread; batch {batch}, median of {rounds} interleaved rounds.  Command: "
             f"`python experiments/conv_widths.py`.\n",
             "| map | channels (in = out) | ms | GMAC/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {s}x{s} | {c} | {ms:.2f} | {rate:.1f} |" for s, c, ms, rate in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for side, widths in SHAPES.items():
        for c, sec in time_convs(side, widths, args.rounds, args.batch).items():
            macs = c * c * 9 * side * side * args.batch
            rows.append((side, c, sec * 1e3, macs / sec / 1e9))
    text = render(rows, args.rounds, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
