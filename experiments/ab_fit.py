"""The demo fit's cost against an earlier revision's, measured in interleaved processes.

    python experiments/ab_fit.py --base d124ad2 --pairs 7
    python experiments/ab_fit.py --base ee0f6bc --pairs 7 --stage gram

Why: on a shared machine a fit's seconds drift by 20-30% from one minute to the next, so a
change worth 5-10% cannot be read off two benchmark tables.  Each process merges the demo pair
(resnet_a + resnet_b, width 1.5, PLeaS sequential, the CLI's 1,024 merge images), once to warm
up and once measured, and divides the fit's seconds by the floor (one forward of A and B over
the same data) measured in the same process right before it; ``--stage gram`` times the
closed-form Gram pass (``prepare`` with ``pleas_closed``) the same way instead.  The two
revisions run in turn (base, this checkout, base, ...), and the ratio of each pair of neighbours is taken, so a drift
of the machine's speed cancels.  The base revision is checked out into a temporary git worktree
(removed afterwards).  Prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(root: str, stage: str = "fit") -> None:
    """In a child process: the fit's (or the Gram pass's) seconds and the floor's, with the
    code under ``root``."""
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "experiments"))
    import benchmark
    from pleas.pipeline import build, prepare

    a, b, data, batch_size = benchmark._sides("demo", 1024)
    kw = dict(batch_size=batch_size, max_batches=None, progress=False)
    if stage == "gram":
        prep = prepare(a, b, data, methods=["pleas_closed"], activations=False, **kw)  # warm-up
        floor = benchmark._floor(a.model, b.model, prep.batches, "cpu")
        prep = prepare(a, b, data, methods=["pleas_closed"], activations=False, **kw)
        print(f"RESULT {prep.seconds['statistics']} {floor}")
        return
    prep = prepare(a, b, data, methods=["pleas"], **kw)
    build(prep, 1.5, "pleas", progress=False)  # warm-up
    floor = benchmark._floor(a.model, b.model, prep.batches, "cpu")
    _, report = build(prep, 1.5, "pleas", progress=False)
    print(f"RESULT {report['seconds']['least_squares']} {floor}")


def run(root: str, stage: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--one", root, "--stage", stage],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    fit, floor = next(line for line in out.stdout.splitlines() if line.startswith("RESULT ")
                      ).split()[1:]
    return float(fit), float(floor)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="the revision to compare against (a git commit)")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--stage", choices=["fit", "gram"], default="fit",
                   help="the sequential fit, or the closed-form Gram pass")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        one(args.one, args.stage)
        return 0
    if not args.base:
        p.error("--base is required")
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", base,
                        args.base], check=True)
        try:
            rows = []
            for i in range(args.pairs):
                fb, lb = run(base, args.stage)
                fn, ln = run(str(ROOT), args.stage)
                rows.append((fb / lb, fn / ln))
                print(f"pair {i + 1}: base {fb / lb:.2f}x, this checkout {fn / ln:.2f}x",
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", base],
                           check=False)
    paired = [n / b for b, n in rows]
    what = "fit" if args.stage == "fit" else "closed-form Gram pass"
    print(f"\nDemo {what} / floor, {args.pairs} interleaved process pairs, base {args.base}.\n")
    print("| | median | min | max |\n|---|---:|---:|---:|")
    for name, vals in [(f"base ({args.base})", [b for b, _ in rows]),
                       ("this checkout", [n for _, n in rows]),
                       ("this checkout / base, pair by pair", paired)]:
        print(f"| {name} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
