"""Streaming float64 statistics of matched activations, over any number of batches.

Only sufficient statistics are kept (counts, sums, squares, the A x B cross-product), so memory
does not grow with the data and N batches give the statistics of their concatenation (to the
precision below).
(The public reference code kept only the last batch; that is the bug this module exists to
avoid.)  Products are taken in the activations' dtype over chunks of ``CHUNK`` samples, and the
chunks' sums accumulated in float64: casting every activation to float64 cost more than the
forward passes, and the sums stay within 1e-6 (relative) of float64 ones (tested).  Matching
only ranks correlations, which this precision leaves unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import Point
from .spec import PermSpec
from .sums import add_term

CHUNK = 4096  # samples per product in the activations' dtype


PARTIAL = 64  # rows per partial sum in the activations' dtype


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """Float64 column sums of ``x`` (rows = samples): partial sums of ``PARTIAL`` rows in
    ``x``'s dtype, added in float64.  Casting every element to float64 first cost more than
    the products (profiled on the demo pair); a partial sum of 64 float32 terms is accurate
    to about 1e-7 relative, so the result stays within the 1e-6 the statistics promise
    (tested)."""
    if x.dtype == torch.float64:
        return x.sum(0)
    full = x.shape[0] // PARTIAL * PARTIAL
    out = x[:full].reshape(-1, PARTIAL, x.shape[1]).sum(1).sum(0, dtype=torch.float64)
    if full < x.shape[0]:
        out += x[full:].sum(0, dtype=torch.float64)
    return out


@dataclass
class CrossStats:
    """Sums over samples of a, b, a^2, b^2 and a b^T for two sets of units."""

    n: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def zeros(cls, d_a: int, d_b: int | None = None, device="cpu") -> "CrossStats":
        d_b = d_a if d_b is None else d_b
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(d_a), z(d_b), z(d_a), z(d_b), z(d_a, d_b))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add samples: rows of ``a`` and ``b`` are the same inputs seen by A and by B."""
        if a.shape[0] != b.shape[0]:
            raise ValueError("A and B activations have different numbers of samples")
        dev = self.cross.device
        for s in range(0, a.shape[0], CHUNK):
            x, y = a[s:s + CHUNK].to(dev), b[s:s + CHUNK].to(dev)
            # each chunk's sums rounded onto a grid: added exactly, in any order (pleas.sums)
            add_term(self.sum_a, column_sums(x))
            add_term(self.sum_b, column_sums(y))
            add_term(self.sq_a, column_sums(x * x))
            add_term(self.sq_b, column_sums(y * y))
            add_term(self.cross, x.T @ y)
        self.n += a.shape[0]

    def reduce(self, reduce) -> None:
        """In place: the sums over processes (``reduce`` sums a float64 tensor)."""
        self.n = int(reduce(torch.tensor(float(self.n), dtype=torch.float64)))
        for key in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
            setattr(self, key, reduce(getattr(self, key)))

    def __add__(self, other: "CrossStats") -> "CrossStats":
        return CrossStats(self.n + other.n, self.sum_a + other.sum_a, self.sum_b + other.sum_b,
                          self.sq_a + other.sq_a, self.sq_b + other.sq_b, self.cross + other.cross)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation of every A unit with every B unit."""
        if self.n == 0:
            raise ValueError("no samples were accumulated")
        mean_a, mean_b = self.sum_a / self.n, self.sum_b / self.n
        cov = self.cross / self.n - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / self.n - mean_a ** 2).clamp_min(0).sqrt()
        std_b = (self.sq_b / self.n - mean_b ** 2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + eps)

    def inner_product(self) -> torch.Tensor:
        """Mean product E[a b^T] (the cruder similarity some papers use)."""
        return self.cross / max(self.n, 1)


class MatchingStats:
    """Consumer of :func:`pleas.capture.run_models`: CrossStats per hidden group and pair of
    models, over all sites.

    ``positions`` caps the samples one image contributes at one site (spatial positions or
    tokens; the same ones for every model, drawn per (site, batch) from ``seed``); None keeps
    all.  Without a cap the first stage of a CNN dominates the pass (112 x 112 positions per
    image at 224 px against 7 x 7 at the last stage) although a few dozen positions per image
    already estimate a correlation well.  ``models`` > 2: statistics of every pair (i, j),
    i < j, for matching K models without a privileged one (:func:`pleas.matching.match_many`).
    """

    def __init__(self, spec: PermSpec, device="cpu", positions: int | None = None,
                 seed: int = 0, models: int = 2):
        self.spec = spec
        self.models = models
        self.model_pairs = [(i, j) for i in range(models) for j in range(i + 1, models)]
        self.pairs = {g.name: {ij: CrossStats.zeros(g.size, device=device)
                               for ij in self.model_pairs}
                      for g in spec.hidden if g.sites}
        self.points: set[Point] = {(s.module, s.io) for g in spec.hidden for s in g.sites}
        self.positions, self.seed = positions, seed
        # every site numbered in spec order (the number seeds its position draws)
        self._sites = [(g.name, i, site) for i, (g, site) in
                       enumerate((g, site) for g in spec.hidden for site in g.sites)]
        self._sites_at: dict[Point, list] = {}
        for _, i, site in self._sites:
            self._sites_at.setdefault((site.module, site.io), []).append((i, site))
        self._drawn: dict[tuple, torch.Tensor | None] = {}  # this batch's draws, by site
        self._drawn_batch: int | None = None

    @property
    def by_group(self) -> dict[str, CrossStats]:
        """The statistics of the first two models (A and B), per group."""
        return {name: pairs[(0, 1)] for name, pairs in self.pairs.items()}

    def reduce(self, reduce) -> None:
        """Sum every group's statistics over processes (pleas.distributed)."""
        for pairs in self.pairs.values():
            for st in pairs.values():
                st.reduce(reduce)

    def take(self, point: Point, t: torch.Tensor, batch_id: int) -> dict[int, torch.Tensor]:
        """The rows every site at ``point`` reads (sampled positions), by site number: taken
        in the forward hook, so that the pass holds samples rather than activations (for
        ViT-B/16 at 224 px the stored activations of both models were most of the pass's
        peak memory).  The rows never alias ``t`` (an in-place op may rewrite it later)."""
        out = {}
        for index, site in self._sites_at[point]:
            picks = self._picks(site.rows(t), t.shape[0], index, batch_id)
            keep = None if picks is None else site.image_rows(t, picks.to(t.device))
            rows = site.extract(t, keep)
            aliased = rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            out[index] = rows.clone() if aliased else rows
        return out

    def _picks(self, rows: int, images: int, index: int, batch_id: int) -> torch.Tensor | None:
        """:meth:`_sample`, drawn once per (site, batch) for all models."""
        if batch_id != self._drawn_batch:  # a new batch: the earlier draws are done with
            self._drawn.clear()
            self._drawn_batch = batch_id
        key = (index, rows, images)
        if key not in self._drawn:
            self._drawn[key] = self._sample(rows, images, index, batch_id)
        return self._drawn[key]

    def update(self, acts: list[dict], batch_id: int = 0) -> None:
        """``acts[k][point]``: what :meth:`take` kept of model k's tensor at ``point``."""
        for name, index, site in self._sites:
            p = (site.module, site.io)
            rows = [a[p][index] for a in acts]
            for i, j in self.model_pairs:
                self.pairs[name][(i, j)].update(rows[i], rows[j])

    def _sample(self, rows: int, images: int, site: int, batch_id: int) -> torch.Tensor | None:
        """At most ``positions`` rows per image (rows are image-major), as [images, k] row
        numbers within each image, or None for all."""
        per_image = rows // max(images, 1)
        if self.positions is None or per_image <= self.positions:
            return None
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * site) * 1_000_033
                                            + batch_id)
        # the positions with the smallest draws, ascending (what argsort()[:, :k] picks, in
        # the same order, without sorting every row)
        return torch.rand(images, per_image, generator=gen).topk(
            self.positions, 1, largest=False, sorted=True).indices
