"""Float64 sums whose value does not depend on the order of their terms.

Why: a merge whose data is sharded over processes (:mod:`pleas.distributed`) adds the same
per-batch terms in another order than one process does (each rank sums its own batches, then
the ranks' sums are all-reduced).  Float64 addition is not associative, so the statistics
differed by ~1e-16; a fitted float64 weight then rounded to the neighbouring float32 here and
there, and the ill-conditioned fits downstream amplified that one ulp to ~1e-5 of a weight.

The cure is to make every addition exact.  Each term (one batch's, or one chunk's, sum of
products) is rounded onto a grid of ``2^(e - 53 + HEADROOM_BITS)``, ``e`` the binary exponent
of the term's largest entry: every entry is then an integer number of grid steps below
``2^(53 - HEADROOM_BITS)``, and float64 adds up to ``2^HEADROOM_BITS`` such terms (terms whose
largest entries differ by a factor r count r times) without rounding, so in any order, on any
number of processes, the sum is the same number, bit for bit.  The price is the rounding of
each term to 41 significant bits of its largest entry (a relative error of 5e-13 of the
tensor's scale, far below what the float32 data carries); beyond the headroom, the sums are
merely as accurate as ordinary float64 sums (and may depend on the order again).  Where
that rounding is too coarse (the sequential fit's moments) a sum is kept in two parts
(:func:`add_precise`).  The rounding multiplies by powers of two and rounds to integers
(exact operations) on the tensor's device, without a host copy.
"""
from __future__ import annotations

import torch

HEADROOM_BITS = 12  # terms of one sum that add exactly: 4,096 (fewer if their sizes differ)


def _grid_scale(term: torch.Tensor, headroom: int, max_shift: int = 960) -> torch.Tensor:
    """``2^(53 - headroom - e)``, ``e`` the binary exponent of max|term| (a float64 0-dim
    tensor on the term's device: no host copy), at most ``2^max_shift``."""
    low, high = torch.aminmax(term)  # max|term| without a copy of |term|
    exponent = torch.frexp(torch.maximum(high, -low).double()).exponent  # max|term| < 2^e
    # capped so that the scale stays finite for tiny terms (below 2^-900: zero to any sum)
    shift = ((53 - headroom) - exponent).clamp_max(max_shift)
    return torch.ldexp(torch.ones((), dtype=torch.float64, device=term.device), shift)


def add_term(acc: torch.Tensor, term: torch.Tensor) -> None:
    """``acc += term`` exactly, ``term`` rounded onto the grid of its largest entry first
    (module doc).  ``term`` is consumed: it is overwritten (no copy of a large term).

    A float32 term is rounded in float32, in place: scaling by a power of two is exact there
    too, and an entry that still has a fraction after scaling is below 2^23, so its nearest
    integer is a float32 number; the rounded term is the same number as the float64 path's,
    bit for bit, without the float64 copy (for a 3,072-wide cross product that copy cost more
    than rounding and adding).  Only terms whose largest entry is below 2^-85 (where the
    float32 scale would overflow) land on a coarser grid, 2^-126: still exact to add, in any
    order, and far below anything the float32 data resolves."""
    if term.numel() == 0:
        return
    if term.dtype == torch.float32:
        scaled, scale = term, _grid_scale(term, HEADROOM_BITS, max_shift=126)
    else:
        scaled = term.to(torch.float64)
        scale = _grid_scale(scaled, HEADROOM_BITS)
    # a power of two in the term's dtype (finite there); grid steps / scale: exact
    # the float64 copy made explicitly: a mixed-dtype addcdiv_ cast element by element, 1.5x
    # slower for a 1,153-wide term (the cast is exact either way)
    acc.addcdiv_(scaled.mul_(scale.to(scaled.dtype)).round_().to(acc.dtype), scale)


def on_grid(term: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``term`` rounded onto the grid :func:`add_term` uses (``term`` is
    left as it was)."""
    out = torch.zeros(term.shape, dtype=torch.float64, device=term.device)
    add_term(out, term.to(torch.float64, copy=True))
    return out


def precise_zeros(*shape: int, device=None) -> torch.Tensor:
    """The two parts (leading dim 2) of a sum kept to float64 precision: see
    :func:`add_precise`."""
    return torch.zeros(2, *shape, dtype=torch.float64, device=device)


PRECISE_HEADROOM_BITS = 24  # terms of a two-part sum that add exactly: 16.7 million
FINE_BITS = 53 - PRECISE_HEADROOM_BITS  # the second part's grid, below the first's step


def add_precise(parts: torch.Tensor, term: torch.Tensor) -> None:
    """``parts += term`` exactly, to float64 precision: the term rounded onto a coarse grid
    (29 bits of its largest entry, 24 bits of headroom) goes to ``parts[0]``, what that
    rounded off (at most half a step), onto a grid 2^29 times finer, to ``parts[1]``: 58 bits
    in all (an error of 2^-58 of the largest entry, below float64's own rounding), exact for
    2^24 terms.  Why: the sequential fit chains its layers, and each fit amplifies a
    perturbation of its inputs about twofold: a 5e-13 rounding at the first layer grew to
    1e-6 at the head of a ResNet-20, where float64 rounding (1e-16) stays harmless.
    ``parts`` from :func:`precise_zeros`; the sum is :func:`total`.  ``term`` is consumed (a
    float64 term is overwritten): one temporary of its size, for the largest fits' Grams
    (hundreds of MB) that matters."""
    scaled = term.to(torch.float64)
    if scaled.numel() == 0:
        return
    scale = _grid_scale(scaled, PRECISE_HEADROOM_BITS)
    scaled.mul_(scale)  # exact (a power of two): entries below 2^29 grid steps
    coarse = scaled.round()
    parts[0].addcdiv_(coarse, scale)
    fine = scaled.sub_(coarse).mul_(2.0 ** FINE_BITS).round_()  # exact: |.| <= 1/2 step
    parts[1].addcdiv_(fine, scale * 2.0 ** FINE_BITS)


def total(parts: torch.Tensor) -> torch.Tensor:
    """The value of a sum kept by :func:`add_precise` (one rounding, the same in any order)."""
    return parts[0] + parts[1]
