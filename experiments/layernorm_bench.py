"""What one merged LayerNorm costs, against one plain LayerNorm of the same width.

    python experiments/layernorm_bench.py            # writes experiments/results/layernorm.md

A LayerNorm over a partly merged stream normalises A's view (A-only + merged units) and B's
view (merged + B-only) apart (:class:`pleas.normalization.MergedLayerNorm`).  Timed on the
same input, one thread, median of interleaved rounds: the sliced form (views ordered
[A-only | merged | B-only], as pleas builds them: two native layer norms), the matmul form
(what views in any other order take, and what every merged norm ran before), and one plain
``nn.LayerNorm`` over all units (the floor).  Shapes: the zoo ViT at width 1.25 (batch 64 x 17
tokens, 16 + 80 + 16 units) and a ViT-B-sized stream (batch 16 x 197 tokens, 128 + 512 + 128).
Next to the times: minor page faults per call (``getrusage``), i.e. memory the allocator had
handed back to the system and maps afresh; at the ViT-B size they, not the arithmetic, set the
merged norms' cost (in some processes and not others: glibc's trimming depends on the heap's
state).
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pleas.normalization import MergedLayerNorm  # noqa: E402

CASES = {"zoo ViT, width 1.25": ((64, 17), (16, 80, 16)),
         "ViT-B-sized stream": ((16, 197), (128, 512, 128))}


def merged_norm(a: int, m: int, b: int) -> MergedLayerNorm:
    share_a = torch.cat([torch.ones(a), torch.full((m,), 0.5), torch.zeros(b)])
    norm = MergedLayerNorm(share_a, share_a.flip(0), eps=1e-6)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(a + m + b, generator=gen))
        norm.bias.copy_(torch.randn(a + m + b, generator=gen))
    return norm.eval()


def sliced_views_kept(norm: MergedLayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The sliced form with both centred views alive until its output is made (what the
    release before this one ran: the A/B of dropping each view once its norm has read it).
    Not a copy of the code: the same ``_sliced``, its layer norms' inputs held here."""
    kept, native = [], F.layer_norm

    def keeping(inp, *args, **kwargs):
        kept.append(inp)
        return native(inp, *args, **kwargs)

    F.layer_norm = keeping  # the module pleas.normalization calls through
    try:
        return norm._sliced(x)
    finally:
        F.layer_norm = native


@torch.no_grad()
def time_forms(lead: tuple[int, int], units: tuple[int, int, int], rounds: int) -> dict:
    norm = merged_norm(*units)
    assert norm.split is not None  # the ordered views take the sliced form
    n = sum(units)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)) * 3 + 1
    plain = torch.nn.LayerNorm(n, eps=1e-6).eval()
    forms = {"sliced": lambda: norm._sliced(x),
             "sliced, views kept": lambda: sliced_views_kept(norm, x),
             "matmul form": lambda: norm._matmul_form(x), "plain LayerNorm": lambda: plain(x)}
    diff = float((norm._sliced(x) - norm._matmul_form(x)).abs().max())
    if not torch.equal(norm._sliced(x), sliced_views_kept(norm, x)):
        raise AssertionError("dropping the views early changed the output")
    inner = 20  # calls per timed sample (one call is tens of microseconds)
    times: dict[str, list[float]] = {k: [] for k in forms}
    faults = {k: 0 for k in forms}  # minor page faults: fresh memory the allocator mapped
    for r in range(rounds + 2):
        for name, f in forms.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            if r >= 2:
                times[name].append((time.perf_counter() - t0) / inner)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
            "faults_per_call": {k: v / (rounds * inner) for k, v in faults.items()},
            "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# One merged LayerNorm against one plain LayerNorm", "",
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one "
             f"thread, median of {args.rounds} interleaved rounds of 20 calls.  Command: "
             "`python experiments/layernorm_bench.py`", "",
             "*sliced, views kept*: the sliced form with both centred views alive until its "
             "output is made (the release before), same output to the bit.", "",
             "| stream | units A-only + merged + B-only | sliced us (x plain) | sliced, views "
             "kept us (x plain) | matmul form us (x plain) | plain LayerNorm us | page faults "
             "per call: sliced / views kept / matmul / plain | max abs diff sliced vs matmul |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, (lead, units) in CASES.items():
        r = time_forms(lead, units, args.rounds)
        t = r["median_us"]
        floor = t["plain LayerNorm"]
        lines.append(f"| {label} ({lead[0]} x {lead[1]} rows) | {' + '.join(map(str, units))} "
                     f"| {t['sliced']:.0f} ({t['sliced'] / floor:.1f}x) | "
                     f"{t['sliced, views kept']:.0f} ({t['sliced, views kept'] / floor:.1f}x) | "
                     f"{t['matmul form']:.0f} ({t['matmul form'] / floor:.1f}x) | {floor:.0f} "
                     f"| {' / '.join(f'{v:.0f}' for v in r['faults_per_call'].values())} "
                     f"| {r['max_abs_diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layernorm.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
