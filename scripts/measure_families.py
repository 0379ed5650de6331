"""Measure what a partial merge approximates on the architecture families (tests/archs.py
FAMILY_ARCHS), for README's "How it works".

Two random-init models per architecture (seeds 1 and 2, BN statistics set on noise images),
merged by PLeaS (sequential least squares) with one head per model on 256 noise images; the
error is read on 64 other images: for each head, max |merged logits - its model's logits|
relative to the model's largest logit, averaged over the two heads.  Random models share no
features, so this is the worst case of the approximations (merged LayerNorm, gates and
activations of averaged pre-activations), not an accuracy.  The first row, resnet20 (no
LayerNorm, no gate: only the activations of merged units are approximate), is the baseline the
families' extra approximations add to.

Each partial width is built twice where the architecture has a stream under a LayerNorm: with
the default allocation (such streams merged while the other groups can take the width) and
with ``allocation="even"`` (one fraction everywhere: the streams split, every LayerNorm over
them a MergedLayerNorm, the approximation the earlier tables measured).

    python scripts/measure_families.py  ->  experiments/results/families/approx.md
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from archs import FAMILY_ARCHS, MERGE_ARCHS, random_model  # noqa: E402

from pleas.pipeline import ModelSide, build, prepare  # noqa: E402

WIDTHS = (1.0, 1.5, 1.75)
EVEN_WIDTHS = (1.5, 1.75)  # width 1 merges everything under either allocation
BASELINE = "resnet20"


def relative_error(merged, a, b, x) -> float:
    """Mean over the two heads of max |head - own model| / max |own model|."""
    with torch.no_grad():
        y = merged(x)
        errs = [float((y[t] - m(x)).abs().max() / m(x).abs().max())
                for t, m in (("task a", a), ("task b", b))]
    return sum(errs) / len(errs)


def measure(name: str) -> tuple[list[float], list[float] | None]:
    """Errors at WIDTHS with the default allocation, and at EVEN_WIDTHS with the even one
    (None where no group is under a LayerNorm: the two plans are the same)."""
    shape = (MERGE_ARCHS[name] if name in MERGE_ARCHS else FAMILY_ARCHS[name])[1]
    a, b = random_model(name, 1), random_model(name, 2)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(320, *shape[1:], generator=gen)
    prep = prepare(ModelSide(a, "a", task="task a"), ModelSide(b, "b", task="task b"), x[:256],
                   batch_size=64, positions=16, methods=["pleas"], progress=False)
    def error(width: float, allocation: str) -> float:
        merged = build(prep, width, "pleas", heads="separate", allocation=allocation,
                       progress=False)[0]
        return relative_error(merged, a, b, x[256:])

    default = [error(w, "uniform") for w in WIDTHS]
    if not any(g.layer_norm for g in prep.spec.hidden):
        return default, None
    return default, [error(w, "even") for w in EVEN_WIDTHS]


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    heads = [f"width {w}" for w in WIDTHS] + [f"width {w}, even" for w in EVEN_WIDTHS]
    lines = ["| architecture | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    out = ROOT / "experiments" / "results" / "families" / "approx.md"
    for name in [BASELINE, *FAMILY_ARCHS]:  # written after every row: > 8 min on 2 cores
        errs, even = measure(name)
        cells = [f"{e:.3f}" for e in errs] + (["same plan"] * len(EVEN_WIDTHS) if even is None
                                              else [f"{e:.3f}" for e in even])
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        out.write_text("Relative logit error of each head vs. its own model (scripts/"
                       "measure_families.py; two unrelated random-init "
                       "models per architecture, 256 noise images, 64 held-out; the first row "
                       "is the baseline without LayerNorm or gates; *even*: "
                       "`allocation=\"even\"`, streams under a LayerNorm split like every other "
                       "group, where the default keeps them merged)\n\n"
                       + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
