"""Running the models over the same batches while hooks read the activations consumers need.

One pass over the data feeds every consumer at once (matching statistics, least-squares second
moments, ...), so the data is read once however many statistics a merge needs.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .registry import replaced

Point = tuple[str, str]  # (module path, "in" | "out")


class Consumer(Protocol):
    """Reads activations at ``points``.  A consumer may also define ``take(point, tensor,
    batch_id)``: what it keeps of a tensor, taken in the hook as the tensor is produced (a
    sample of its rows, say); ``update`` then gets those instead of the tensors, so that a
    pass over models with many wide activations holds samples, not whole activations."""

    points: set[Point]

    def update(self, acts: list[dict[Point, Any]], batch_id: int = 0) -> None:
        """One batch: ``acts[k]`` holds model k's tensors (or what ``take`` kept of them) at
        the consumer's points."""

    def reduce(self, reduce) -> None:
        """Sum the statistics over processes (sharded merge data)."""


class Captures(dict):
    """The tensors one model's hooks stored in its last forward, by point.

    Tensors are stored without a copy, with their version counter: an in-place op later in
    the forward (timm's SE: conv_reduce, then ReLU(inplace=True); an in-place module reading a
    hooked input) would rewrite a stored tensor, and :meth:`rewritten` finds those points
    after the forward so that they are copied from then on (:func:`run_models` runs that batch
    again).  Copying every output instead cost a full activation copy per point and batch, for
    the few models that need it."""

    def __init__(self) -> None:
        super().__init__()
        self.copied: set[Point] = set()
        self.versions: dict[Point, int] = {}

    def keep(self, point: Point, out: torch.Tensor) -> None:
        out = out.detach()
        if point not in self.copied:
            try:
                self.versions[point] = out._version
            except RuntimeError:  # inference tensors keep no version counter: copy
                self.copied.add(point)
        self[point] = out.clone() if point in self.copied else out

    def rewritten(self) -> set[Point]:
        """Points whose stored tensor changed in place since it was stored (not copied ones)."""
        return {p for p, v in self.versions.items()
                if p not in self.copied and p in self and self[p]._version != v}


@contextmanager
def hooked(model: nn.Module, points: set[Point],
           keep: Callable[[Point, torch.Tensor], None] | None = None) -> Iterator[Captures]:
    """Within the context, every forward of ``model`` stores the tensors at ``points`` (or
    hands them to ``keep``, which then decides what is stored where)."""
    store = Captures()
    keep = store.keep if keep is None else keep
    handles = []
    modules = dict(model.named_modules())
    for path, io in points:
        if path not in modules:
            raise KeyError(f"model has no module {path!r}")
        mod = modules[path]
        if io == "in":
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, p=(path, io): keep(p, args[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, p=(path, io): keep(p, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def batch_inputs(batch: Any) -> torch.Tensor:
    """The image tensor of a batch given as a tensor, an (x, y) pair or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        return batch.get("images", batch.get("pixel_values"))
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def as_batches(source: Any, batch_size: int, max_batches: int | None = None) -> list:
    """Batches, as given, from an ImageSet (``.loader``), a tensor of images, or an iterable."""
    if hasattr(source, "loader"):
        source = source.loader(batch_size)
    elif isinstance(source, torch.Tensor):
        source = list(source.split(batch_size))
    return list(limited(source, max_batches))


def limited(batches: Iterable, max_batches: int | None) -> Iterator:
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        yield b


def run_pair(model_a: nn.Module, model_b: nn.Module, batches: Iterable,
             consumers: list[Consumer], device: str | torch.device = "cpu",
             max_batches: int | None = None, desc: str = "statistics",
             progress: bool = True, batch_ids: list[int] | None = None) -> int:
    """:func:`run_models` for two models."""
    return run_models([model_a, model_b], batches, consumers, device, max_batches, desc,
                      progress, batch_ids)


def run_models(models: list[nn.Module], batches: Iterable, consumers: list[Consumer],
               device: str | torch.device = "cpu", max_batches: int | None = None,
               desc: str = "statistics", progress: bool = True,
               batch_ids: list[int] | None = None) -> int:
    """Feed every batch to every model (eval mode, no grad) and hand the captures to the
    consumers.

    ``batch_ids`` are the batches' indices in the whole merge set (default 0, 1, ...: they
    seed position sampling, so a shard of the data samples what the whole would).  Returns the
    number of batches seen; raises ValueError when there were none.
    """
    takers = [c for c in consumers if hasattr(c, "take")]
    raw_points: set[Point] = set().union(*(c.points for c in consumers if c not in takers))
    slot = {id(c): i for i, c in enumerate(takers)}  # a taker's place in the taken stores
    taken_by: dict[Point, list[int]] = {}
    for i, c in enumerate(takers):
        for p in c.points:
            taken_by.setdefault(p, []).append(i)
    batch_id = [0]  # read by the hooks: takers sample by batch

    def keeper(raw: Captures, taken: list[dict]) -> Callable[[Point, torch.Tensor], None]:
        def keep(p: Point, t: torch.Tensor) -> None:
            for i in taken_by.get(p, ()):
                taken[i][p] = takers[i].take(p, t.detach(), batch_id[0])
            if p in raw_points:
                raw.keep(p, t)
        return keep

    # hook points inside modules with a replace rule (pleas.registry) exist in the replacement
    models = [replaced(m) for m in models]
    for m in models:
        m.eval()
    seen = 0
    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    with ExitStack() as stack, torch.no_grad():
        raws, taken = [], []
        for m in models:
            raw, kept = Captures(), [{} for _ in takers]
            stack.enter_context(hooked(m, raw_points | set(taken_by), keeper(raw, kept)))
            raws.append(raw)
            taken.append(kept)
        for batch in tqdm(limited(batches, max_batches), total=total, desc=desc,
                          disable=not progress, leave=False):
            x = batch_inputs(batch).to(device)
            batch_id[0] = seen if batch_ids is None else batch_ids[seen]
            for m, store in zip(models, raws):
                m(x)
                rewritten = store.rewritten()
                if rewritten:  # copy those outputs from now on; this batch again
                    store.copied |= rewritten
                    m(x)
            for c in consumers:
                i = slot.get(id(c))
                c.update(raws if i is None else [kept[i] for kept in taken], batch_id[0])
            for store in raws:  # nothing held into the next batch's forward passes
                store.clear()
            for kept in taken:
                for d in kept:
                    d.clear()
            seen += 1
    if seen == 0:
        raise ValueError("the merge data is empty: no batches to compute statistics from")
    return seen
