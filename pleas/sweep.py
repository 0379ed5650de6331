"""Sequential least squares in ONE sweep over the data: every layer of each network runs once.

The sequential fit (:func:`fit_sequential`) needs, for every fittable layer l in graph order,
(a) the merged model's OWN input to l, given the already fitted layers < l, and (b) the
originals' outputs at l (the targets).  Instead of re-running all three networks from the input
for every layer (cost quadratic in depth), the three traced graphs (torch.fx) are executed in
lockstep, node by node, over ALL merge batches: each graph advances to the next fittable layer,
the layer's moments are summed from the live activations, it is solved, the merged graph runs
it and its BatchNorm gets the exact statistics of those outputs (every position of every batch;
no BN reset pass afterwards), and the graphs move on.  Each module of each network runs once
per batch; the activations held between layers are the live tensors at the current cut of each
graph (freed after their last use), for every batch.

Memory.  Those activations are bounded by ``max_cache_gb``: beyond it new activations are
spilled, to host memory when computing on a GPU, to temporary files on disk when computing on
the CPU (each spilled tensor is written once and read back once: the sweep still runs every
layer once, at the cost of that I/O).

Precision.  The layer moments are products in the activations' dtype (float32 for float32
models) of each chunk's centred values, summed in float64 with the chunk's mean put back there
(:func:`_centred_moments`), and the targets enter as residuals of the layer's plain-merge
weights (:func:`layer_moments`): float32 products run at twice the float64 rate, and they were
most of the fit's time.  The ridge problems are ill-conditioned (a ridge of 1e-4 of the trace
allows condition numbers near 1e4), so the products' rounding moves the solution: on the demo
pair the fitted weights are within 2.6e-4 of a tensor's norm of a float64-product fit (3.9e-4
centred without residuals, 1.4e-3 with plain float32 products; 5e-3 on single entries with
plain products in chunks of 2,048), and the merged model's test accuracy did not change (91.98
/ 96.96 both ways).  That is far
below the sampling error of the moments themselves (64 positions per image, 16 where
:func:`pleas.lstsq.layer_positions` caps them), but a test that
compares with an exact least-squares solution to 1e-5 needs ``float64_products``.  Each chunk's
sums are added exactly, to float64 precision (:func:`pleas.sums.add_precise`), so the sums do
not depend on the order of the chunks.  Sampled positions are drawn from a generator seeded by
(seed, layer, batch index), so a batch gets the same positions whichever process or order
handles it: a sharded, multi-process fit gives the single-process weights bit for bit.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .lstsq import (FitResult, _initial, _store, add_gram, composite_plan,
                    fit_grouped_block, layer_rows, model_columns, position_generator,
                    sample_index, solve_blocks)
from .normalization import add_batchnorm_sums, batchnorm_sums, set_batchnorm_statistics
from .plan import Plan, shared_plan
from .spec import Layer, trace
from .stats import column_sums
from .sums import add_precise, precise_zeros, total

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums over processes (identity when alone)
PRODUCT_ROWS = 8192  # samples per float64 product


# ------------------------------------------------------------------------ activation store
class ActivationStore:
    """Per-batch values of live graph nodes, within a memory budget (spill beyond it)."""

    def __init__(self, max_bytes: float, device: torch.device):
        self.max_bytes, self.device = max_bytes, device
        self.live_bytes = 0
        self.peak_bytes = 0
        self.spilled = 0
        self._dir: tempfile.TemporaryDirectory | None = None

    @staticmethod
    def _bytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(ActivationStore._bytes(v) for v in value)
        return 0

    def put(self, value: Any) -> Any:
        """Keep ``value`` in memory, or spill it when the budget is used up."""
        size = self._bytes(value)
        if size and self.live_bytes + size > self.max_bytes:
            self.spilled += size
            return _Spilled(self._spill(value), size)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return value

    def get(self, value: Any) -> Any:
        if isinstance(value, _Spilled):
            return self._unspill(value.where)
        return value

    def drop(self, value: Any) -> None:
        if isinstance(value, _Spilled):
            if isinstance(value.where, str):
                os.unlink(value.where)
            return
        self.live_bytes -= self._bytes(value)

    def _spill(self, value: Any) -> Any:
        if self.device.type != "cpu":  # a GPU: host memory
            return _map(value, lambda t: t.to("cpu"))
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="pleas-sweep-")
        fd, path = tempfile.mkstemp(dir=self._dir.name, suffix=".pt")
        os.close(fd)
        torch.save(value, path)
        return path

    def _unspill(self, where: Any) -> Any:
        if isinstance(where, str):
            return torch.load(where, map_location=self.device, weights_only=True)
        return _map(where, lambda t: t.to(self.device))

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


@dataclass
class _Spilled:
    where: Any  # a file path (CPU) or the host copy (GPU)
    size: int


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


# ------------------------------------------------------------------------ one graph, stepped
class GraphCursor:
    """A traced model executed node by node over all batches, up to a chosen module call."""

    def __init__(self, model: nn.Module, rules: Any, store: ActivationStore, batches: int,
                 calls: dict[str, int] | None = None):
        self.gm = trace(model, rules)
        self.model = model
        self.nodes = list(self.gm.graph.nodes)
        self.pos = 0
        self.store = store
        self.batches = batches
        self.env: dict[str, list] = {}
        self.calls = calls  # module path -> number of calls (tests count forward calls)
        order = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use = {n.name: max((order[u.name] for u in n.users), default=order[n.name])
                         for n in self.nodes}

    def _value(self, arg: Any, b: int) -> Any:
        if isinstance(arg, fx.Node):
            return self.store.get(self.env[arg.name][b])
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._value(a, b) for a in arg)
        if isinstance(arg, dict):
            return {k: self._value(v, b) for k, v in arg.items()}
        if isinstance(arg, slice):
            return slice(self._value(arg.start, b), self._value(arg.stop, b),
                         self._value(arg.step, b))
        return arg

    def _run(self, node: fx.Node, b: int, inputs: list) -> Any:
        if node.op == "placeholder":
            if node is self.nodes[0]:
                return inputs[b]
            return node.args[0] if node.args else None  # a fixed optional argument
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = self._value(node.args, b)
        kwargs = self._value(node.kwargs, b)
        if node.op == "call_module":
            if self.calls is not None:
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot execute node {node.name} ({node.op})")

    def find_call(self, path: str) -> int | None:
        """Index of the next node that calls module ``path`` (None: no such node ahead)."""
        for i in range(self.pos, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "call_module" and node.target == path:
                return i
        return None

    def next_call(self, path: str) -> fx.Node:
        """The next node that calls module ``path`` (without executing anything)."""
        i = self.find_call(path)
        if i is None:
            raise RuntimeError(f"module {path!r} is not called after node {self.pos} of the "
                               "trace")
        return self.nodes[i]

    def advance_to(self, path: str, inputs: list) -> list:
        """Execute every node before the next call of ``path``; return that call's first
        argument, per batch."""
        target = self.next_call(path)
        self.run_range(self.nodes.index(target, self.pos), inputs)
        return [self._value(target.args[0], b) for b in range(self.batches)]

    def step(self, inputs: list) -> list:
        """Execute the current node over all batches; return its values."""
        node = self.nodes[self.pos]
        self.run_range(self.pos + 1, inputs, keep=node.name)
        values = [self.store.get(v) for v in self.env.get(node.name, [])]
        if not node.users:  # nothing in the trace reads it: we were its only reader
            self._free(node.name)
        return values

    def run_range(self, stop: int, inputs: list, keep: str | None = None) -> None:
        """Execute nodes ``pos .. stop-1`` batch after batch (each batch through the whole
        range while its activations are still in cache), freeing every value after its last
        use; the values later nodes need are kept for all batches."""
        nodes = self.nodes[self.pos:stop]
        if any(n.op == "output" for n in nodes):
            raise RuntimeError("the sweep ran past the model's output")
        for n in nodes:
            self.env.setdefault(n.name, [None] * self.batches)
        for b in range(self.batches):
            for i, node in enumerate(nodes, self.pos):
                value = self._run(node, b, inputs)
                self.env[node.name][b] = value if node.op == "get_attr" \
                    else self.store.put(value)
                for arg in node.all_input_nodes:
                    if self.last_use[arg.name] <= i and arg.op != "get_attr":
                        self._free_one(arg.name, b)
                if not node.users and node.name != keep:
                    self._free_one(node.name, b)
        for name in [n for n, vals in self.env.items() if all(v is None for v in vals)]:
            del self.env[name]
        self.pos = stop

    def _free_one(self, name: str, b: int) -> None:
        values = self.env.get(name)
        if values is not None and values[b] is not None:
            self.store.drop(values[b])
            values[b] = None

    def _free(self, name: str) -> None:
        for b in range(self.batches):
            self._free_one(name, b)
        self.env.pop(name, None)

    def close(self) -> None:
        for name in list(self.env):
            node = next((n for n in self.nodes if n.name == name), None)
            if node is not None and node.op == "get_attr":
                self.env.pop(name)
            else:
                self._free(name)
        self.env.clear()


# ------------------------------------------------------------------------ moments and solves
def _centred_moments(x: torch.Tensor, t: torch.Tensor, pad: int = 0):
    """Sum x x^T, sum t x^T (float64, per block), sum x, sum t of one chunk (``x`` (n, blocks,
    k), ``t`` (n, blocks, rows)), the products taken in the chunk's dtype on centred values;
    x x^T and t x^T are returned with ``pad`` extra zero columns (and rows) for a bias.

    Why centred: with float32 products the rounding of a product sum is relative to the sum of
    |x_i x_j|, i.e. to the raw second moment, while the ridge solve reads the covariance, which
    for post-ReLU activations or image pixels is a small difference of large raw moments
    (centring took the demo pair's largest weight change against float64 products from 1.4e-3
    to 3.9e-4 of a tensor's norm).  Subtracting the chunk's own mean m (rounded to the
    chunk's dtype) first makes the rounding relative to the covariance; the raw moments come
    back in float64: sum x x^T = sum c c^T + s m^T + m s^T + n m m^T, c = x - m, s = sum c.
    The mean is the chunk's own, so a chunk's terms do not depend on which process or in what
    order it is summed.
    """
    f64 = torch.float64
    n, blocks, k = x.shape
    m_x, m_t = x.mean(0), t.mean(0)  # (blocks, k), (blocks, rows): any shift near the mean
    xc, tc = x - m_x, t - m_t
    # the sums sized for a bias column (``pad``) from the start: no padded copy afterwards
    xx = torch.zeros(blocks, k + pad, k + pad, dtype=f64, device=x.device)
    yx = torch.zeros(blocks, t.shape[2], k + pad, dtype=f64, device=x.device)
    if blocks == 1:  # one block: the symmetric product, and plain matrix products
        add_gram(xx[0, :k, :k], xc[:, 0])
        yx[0, :, :k] = tc[:, 0].T @ xc[:, 0]
    else:  # grouped conv: many small blocks at once
        xx[:, :k, :k] = torch.einsum("nbk,nbl->bkl", xc, xc)
        yx[:, :, :k] = torch.einsum("nbr,nbk->brk", tc, xc)
    s_x = column_sums(xc.flatten(1)).view(m_x.shape)  # float32 partial sums, added in float64
    s_t = column_sums(tc.flatten(1)).view(m_t.shape)
    mx, mt = m_x.to(f64), m_t.to(f64)
    # s m^T + m s^T + n m m^T = u m^T + m u^T with u = s + (n/2) m: two in-place outer products
    u = s_x + (n / 2) * mx
    xk, yk = xx[:, :k, :k], yx[:, :, :k]
    xk.baddbmm_(u[:, :, None], mx[:, None, :]).baddbmm_(mx[:, :, None], u[:, None, :])
    sum_x = s_x + n * mx
    # s_t m^T + m_t s^T + n m_t m^T = s_t m^T + m_t (s + n m)^T
    yk.baddbmm_(s_t[:, :, None], mx[:, None, :]).baddbmm_(mt[:, :, None], sum_x[:, None, :])
    return xx, yx, sum_x, s_t + n * mt


@dataclass
class SweepMoments:
    """Sums over the fitted samples (float64), batched over the blocks of a grouped conv:
    x x^T, y x^T, x and |y|^2 (x = the merged net's input rows, y = the targets)."""

    xx: torch.Tensor
    yx: torch.Tensor
    sum_x: torch.Tensor
    yy: torch.Tensor
    count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    @classmethod
    def zeros(cls, blocks: int, rows: int, k: int, device) -> "SweepMoments":
        """Empty sums, each in two parts (:func:`pleas.sums.add_precise`) until
        :meth:`reduced`."""
        return cls(precise_zeros(blocks, k, k, device=device),
                   precise_zeros(blocks, rows, k, device=device),
                   precise_zeros(blocks, k, device=device), precise_zeros(device=device),
                   torch.zeros((), dtype=torch.float64, device=device))

    def add(self, xh: torch.Tensor, y: torch.Tensor, bias: bool = False) -> None:
        """``xh`` (n, blocks, k), ``y`` (n, blocks, rows), over chunks of ``PRODUCT_ROWS``
        samples: products in their dtype (:func:`layer_moments` picks it) of the chunk's
        CENTRED values, each chunk's sums
        added in float64 with its mean put back there (:func:`_centred_moments`).  ``bias``:
        the moments are those of ``[xh, 1]`` (k + 1 columns), the constant column's entries
        taken from the sums rather than from a copy of ``xh`` with a column of ones."""
        k = xh.shape[2]
        f64 = torch.float64
        for s in range(0, xh.shape[0], PRODUCT_ROWS):
            x, t = xh[s:s + PRODUCT_ROWS], y[s:s + PRODUCT_ROWS]
            xx, yx, sum_x, sum_t = _centred_moments(x, t, pad=int(bias))
            sum_xk = torch.zeros_like(self.sum_x[0])
            sum_xk[:, :k] = sum_x
            if bias:
                sum_xk[:, k] = x.shape[0]
                xx[:, :k, k] = xx[:, k, :k] = sum_x
                xx[:, k, k] = x.shape[0]
                yx[:, :, k] = sum_t
            # each chunk's sums added exactly, in any order (pleas.sums): a sharded fit
            # gives the one-process weights bit for bit
            add_precise(self.xx, xx)
            add_precise(self.yx, yx)
            add_precise(self.sum_x, sum_xk)
            t64 = t.to(f64)
            add_precise(self.yy, (t64 * t64).sum())
        self.count += xh.shape[0]

    def reduced(self, reduce: Reduce) -> "SweepMoments":
        """The sums over processes, each part summed on its own (exact), then totalled."""
        return SweepMoments(*(total(reduce(t)) for t in (self.xx, self.yx, self.sum_x,
                                                          self.yy)), reduce(self.count))

    def cpu(self) -> "SweepMoments":
        return SweepMoments(*(t.cpu() for t in (self.xx, self.yx, self.sum_x, self.yy,
                                                 self.count)))


def _out_rows(y: torch.Tensor, mod: nn.Module, index: torch.Tensor | None) -> torch.Tensor:
    """A layer's output as (positions, channels) rows, at the sampled positions (gathered
    before anything is copied)."""
    if not isinstance(mod, nn.modules.conv._ConvNd):
        rows = y.reshape(-1, y.shape[-1])
        return rows if index is None else rows[index]
    flat = y.reshape(y.shape[0], y.shape[1], -1)  # (n, channels, positions)
    if index is None:
        return flat.permute(0, 2, 1).reshape(-1, y.shape[1])
    per_image = flat.shape[2]
    return flat[index // per_image, :, index % per_image]


@dataclass(frozen=True)
class _TargetMap:
    """Which original unit each new output unit copies or averages, as one (units, new units)
    matrix per model on the compute device (built once per layer: no host copies inside the
    batch loop).

    Why matrices: y~ = sum_k y_k M_k is one small product per model, 4-7x faster than
    gathering columns of the row-major outputs and scaling them.  Each column of M_k holds at
    most one non-zero, so an output is the same sum of the same products as the gather's (the
    zeros add nothing): bit for bit where the shares are powers of two (two models: 1/2 and 1),
    else within a rounding of the last addition (a fused multiply-add may skip one)."""

    matrix: tuple[torch.Tensor, ...]  # per model: (its units, new units)

    @classmethod
    def of(cls, p_out, units: list[int], like: torch.Tensor) -> "_TargetMap":
        """``units``: each original's output units (channels or features; the heads of
        different label spaces differ)."""
        mats = []
        for index, weight, size in zip(p_out.index, p_out.weights(), units):
            m = torch.zeros(size, index.numel(), dtype=like.dtype)
            cols = torch.nonzero(index >= 0).flatten()
            m[index[cols], cols] = weight[cols].to(like.dtype)
            mats.append(m.to(like.device))
        return cls(tuple(mats))

    def __call__(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """y~ = [avg(merged) | kept from model 1 | ... | kept from model K] by new unit."""
        out = ys[0] @ self.matrix[0]
        for y, m in zip(ys[1:], self.matrix[1:]):
            out = torch.addmm(out, y, m)
        return out


def layer_moments(layer: Layer, index_in_fit: int, mod_m: nn.Module, mod_a: nn.Module,
                  xs_m: list, ys: list[list], batch_ids: list[int], plan: Plan,
                  positions: int | None, seed: int, float64_products: bool = False
                  ) -> SweepMoments:
    """The moments of one layer over all batches, from the merged net's inputs and the
    originals' outputs (``ys[k][b]``: model k, batch b; no patches of the originals' inputs
    are needed).  The targets are taken as RESIDUALS r = y - W0 x of the layer's current
    (plain merge) weights W0, and :func:`solve_layer` solves for W - W0.  The same problem in
    exact arithmetic; why: the products' rounding is then relative to what the fit still has
    to explain, not to the targets, so where the plain merge is already exact (a model merged
    with a permuted copy of itself) or nearly so, float32 products do not move it."""
    p_out = composite_plan(layer, plan)
    grouped = isinstance(mod_m, nn.Conv2d) and mod_m.groups > 1
    blocks = mod_m.groups if grouped else 1
    has_bias = layer.bias is not None
    mom = None
    units = [y[0].shape[1 if isinstance(mod_a, nn.modules.conv._ConvNd) else -1] for y in ys]
    targets = _TargetMap.of(p_out, units, ys[0][0])
    work = None
    for b, (x, bid) in enumerate(zip(xs_m, batch_ids)):
        gen = position_generator(seed, index_in_fit, bid)
        index = sample_index(mod_a, x, positions, gen)  # drawn on the host: same on any device
        xh = layer_rows(mod_m, x, index)
        y = targets([_out_rows(y_model[b], mod_a, index) for y_model in ys])
        xh = xh.reshape(xh.shape[0], blocks, -1)
        y = y.reshape(y.shape[0], blocks, -1)
        if work is None:
            work = torch.float64 if float64_products else torch.promote_types(xh.dtype,
                                                                             torch.float32)
            w0 = mod_m.weight.detach().reshape(blocks, y.shape[2], -1).to(work)
            b0 = mod_m.bias.detach().reshape(blocks, -1).to(work) if has_bias else None
        xh, y = xh.to(work), y.to(work)
        if b0 is not None:
            y = y - b0
        if blocks == 1:  # r = y - x W0^T in one product
            y = torch.addmm(y[:, 0], xh[:, 0], w0[0].T, alpha=-1)[:, None]
        else:
            y = y - torch.einsum("nbk,brk->nbr", xh, w0)
        if mom is None:
            mom = SweepMoments.zeros(blocks, y.shape[2], xh.shape[2] + has_bias, xh.device)
        mom.add(xh, y, bias=has_bias)
    return mom


def solve_layer(layer: Layer, mod: nn.Module, mom: SweepMoments, plan: Plan, ridge: float
                ) -> tuple[torch.Tensor, float, float]:
    """The block-constrained ridge solve of one layer toward its current (plain) weights W0:
    ``mom`` holds the moments of the residuals r = y - W0 x (:func:`layer_moments`), so the
    solve is for D = W - W0 (ridge toward 0) and returns W = W0 + D.  W0 is zero on the
    structural zeros (the widened plain merge), so W keeps them."""
    current = {layer.weight: mod.weight.detach().cpu()}
    if layer.bias is not None:
        current[layer.bias] = mod.bias.detach().cpu()
    count = int(mom.count)
    if isinstance(mod, nn.Conv2d) and mod.groups > 1:
        w_now = current[layer.weight].double()
        w0 = w_now.reshape(mod.groups, -1, w_now[0].numel())
        if layer.bias is not None:
            w0 = torch.cat([w0, current[layer.bias].double().reshape(mod.groups, -1, 1)], 2)
        legacy = _LegacyMoments(mom.xx, mom.yx, float(mom.yy), count)
        step, before, after = fit_grouped_block(legacy, torch.zeros_like(w0), ridge)
        w = (w0 + step).reshape(w_now.shape[0], -1)
    else:
        kk = mod.weight[0, 0].numel() if mod.weight.ndim > 2 else 1
        p_out = composite_plan(layer, plan)
        p_in = plan.get(layer.in_group) or shared_plan(mod.weight.shape[1], p_out.models)
        u_one = p_in.size * kk  # only the column kinds are read below
        col_kind = model_columns(p_in, kk, u_one, layer.bias is not None,
                                 p_out.models * u_one + 1)[2]
        w0 = _initial(layer, current)
        step, before, after = solve_blocks(mom.xx[0], mom.yx[0], float(mom.yy),
                                           torch.zeros_like(w0), p_out.kinds(), col_kind,
                                           ridge, count, p_out.models)
        w = w0 + step
    _store(layer, w, current)
    with torch.no_grad():
        mod.weight.copy_(current[layer.weight].to(mod.weight))
        if layer.bias is not None:
            mod.bias.copy_(current[layer.bias].to(mod.bias))
    return w, before, after


@dataclass
class _LegacyMoments:
    """The view :func:`pleas.lstsq.fit_grouped_block` reads."""

    xx: torch.Tensor
    yx: torch.Tensor
    yy: float
    count: int


@dataclass
class _Fitter:
    """Moments, solve and BatchNorm update of one layer (what every path of the sweep does)."""

    modules: dict
    model_a: nn.Module
    plan: Plan
    batch_ids: list[int]
    positions: int | None
    seed: int
    ridge: float
    reduce: Reduce
    update_norms: bool
    results: list
    float64_products: bool = False

    def __call__(self, index: int, layer: Layer, xs_m: list, ys: list[list],
                 closed_form_norm: bool = True) -> None:
        """Fit one layer; ``closed_form_norm``: also set its BatchNorm from the moments (off
        where the sweep sets the exact statistics right after)."""
        mod, mod_a = self.modules[layer.module], self.model_a.get_submodule(layer.module)
        mom = layer_moments(layer, index, mod, mod_a, xs_m, ys, self.batch_ids,
                            self.plan, self.positions, self.seed,
                            self.float64_products).reduced(self.reduce).cpu()
        w, before, after = solve_layer(layer, mod, mom, self.plan, self.ridge)
        self.results.append(FitResult(layer.module, before, after))
        if self.update_norms and layer.norm and closed_form_norm:
            set_norm_statistics(self.modules[layer.norm], w, mom)


def _host(cursor: GraphCursor, path: str) -> str:
    """The module of the trace that runs ``path``: itself, or the leaf module holding it."""
    targets = {n.target for n in cursor.nodes if n.op == "call_module"}
    host = path
    while host and host not in targets:
        host = host.rpartition(".")[0]
    if not host:
        raise RuntimeError(f"layer {path!r} is not run by any module of the trace")
    return host


def _by_host(cursor: GraphCursor, layers: list[Layer]) -> list[tuple[str, list]]:
    """Consecutive layers grouped by the traced module that runs them, in order."""
    groups: list[tuple[str, list]] = []
    for i, layer in enumerate(layers):
        host = _host(cursor, layer.module)
        if groups and groups[-1][0] == host and host != layer.module:
            groups[-1][1].append((i, layer))
        else:
            groups.append((host, [(i, layer)]))
    return groups


class _StopForward(Exception):
    """Ends a forward pass once a hook has read what it needs."""


def _fit_inside(host: str, group: list, cursors: list, inputs: list, xs_m: list,
                nets: list, fit: _Fitter, merged_calls: dict | None) -> None:
    """Layers inside one leaf module (timm attention's qkv and proj): the originals run the
    module once, their inner layers' outputs read by hooks; the merged module runs once per
    inner layer, stopped at it, so each layer reads inputs made by its fitted predecessors."""
    paths = [layer.module for _, layer in group]
    outputs = []
    for cursor, model in zip(cursors[1:], nets[1:]):
        store: dict[str, list] = {p: [] for p in paths}
        handles = [model.get_submodule(p).register_forward_hook(
            lambda m, a, out, p=p: store[p].append(out)) for p in paths]
        try:
            cursor.step(inputs)
        finally:
            for h in handles:
                h.remove()
        outputs.append(store)
    host_m = nets[0].get_submodule(host)
    for index, layer in group:
        seen: list = []

        def grab(mod, args, seen=seen):
            seen.append(args[0])
            raise _StopForward

        handle = nets[0].get_submodule(layer.module).register_forward_pre_hook(grab)
        try:
            for x in xs_m:
                try:
                    host_m(x)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        if merged_calls is not None:
            merged_calls[host] = merged_calls.get(host, 0) + len(xs_m)
        fit(index, layer, seen, [out[layer.module] for out in outputs])


def set_norm_statistics(bn: nn.Module, w: torch.Tensor, mom: SweepMoments) -> None:
    """The BatchNorm reading a fitted layer, in closed form from the same moments: mean
    W E[x^], variance diag(W E[x^ x^T] W^T) - mean^2 (unbiased), over the fitted samples."""
    count = float(mom.count)
    wb = w.reshape(mom.xx.shape[0], -1, mom.xx.shape[-1])  # (blocks, rows, k)
    mean = (wb @ (mom.sum_x / count)[:, :, None]).flatten()
    second = ((wb @ (mom.xx / count)) * wb).sum(-1).flatten()
    var = (second - mean ** 2).clamp_min(0) * count / max(count - 1, 1)
    bn.running_mean.copy_(mean.to(bn.running_mean))
    bn.running_var.copy_(var.to(bn.running_var))


def _exact_norm_target(cursor: GraphCursor, norm: str | None, next_host: str | None,
                       modules: dict) -> nn.Module | None:
    """The BatchNorm ``norm`` when the sweep can give it exact statistics (:func:`_exact_norm`):
    None when it is not a tracked BatchNorm, is called inside a leaf module of the trace, or
    the next fitted layer ``next_host`` comes first in the graph (running past it would use its
    weights before they are fitted)."""
    bn = modules.get(norm) if norm else None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
        return None
    at = cursor.find_call(norm)
    if at is None:
        return None
    nxt = cursor.find_call(next_host) if next_host is not None else None
    return None if nxt is not None and nxt < at else bn


def _exact_norm(cursor: GraphCursor, norm: str, bn: nn.Module, inputs: list,
                reduce: Reduce) -> None:
    """Set BatchNorm ``bn`` (path ``norm``) to the exact statistics of its input over all
    batches (float64 sums, :func:`pleas.normalization.batchnorm_sums`), running the merged
    graph up to it.

    Why here and not in a BN reset pass after the fit: each layer is then fitted on inputs
    produced by the final statistics of everything upstream, in eval mode as the model will
    run, and no extra forward pass of the merged model is needed (it ran here anyway)."""
    sums = None
    for x in cursor.advance_to(norm, inputs):
        term = batchnorm_sums(x)
        sums = torch.zeros_like(term) if sums is None else sums
        add_batchnorm_sums(sums, term)
    if sums is None:  # no batches in this process: its share of the sums is zero
        sums = torch.zeros(1 + 2 * bn.num_features, dtype=torch.float64,
                           device=bn.running_mean.device)
    set_batchnorm_statistics(bn, reduce(sums))


# ------------------------------------------------------------------------ the sweep
@torch.no_grad()
def fit_sequential(layers: list[Layer], net: nn.Module, model_a: nn.Module, model_b: nn.Module,
                   batches: list, plan: Plan, device="cpu", ridge: float = 1e-4,
                   positions: int | None = 64, seed: int = 0, progress: bool = True,
                   update_norms: bool = True, rules: Any = None, max_cache_gb: float = 4.0,
                   reduce: Reduce | None = None, batch_ids: list[int] | None = None,
                   calls: dict | None = None, more_models: tuple = (),
                   float64_products: bool = False, norms_set: set | None = None
                   ) -> list[FitResult]:
    """Sequential least squares in one sweep (see the module docstring); fits ``net`` in place.

    ``batches`` are this process's merge batches; ``batch_ids`` their indices in the whole
    merge set (default 0..n-1) and ``reduce`` the sum over processes of a float64 tensor (for
    data sharded over ranks; default: one process).  ``calls`` (a dict) counts the module
    calls of the graphs, keyed ``"merged:<path>"``, ``"a:<path>"``, ``"b:<path>"`` (then
    ``"m3:<path>"``, ...).  ``more_models``: the third to K-th original of a K-model merge.
    ``float64_products``: the moments' products in float64 rather than in the activations'
    dtype (about twice the time of the products; see the module docstring).

    With ``update_norms``, the BatchNorm reading each fitted layer gets its exact statistics
    over every position of all merge batches, from the fitted layer's real outputs, before
    anything downstream runs (:func:`_exact_norm`); ``norms_set`` (a set) receives their
    paths.  A BatchNorm the graph order does not allow that for (another fitted layer runs
    between the two) keeps the closed-form statistics of its layer's sampled moments.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    reduce = reduce or (lambda t: t)
    batch_ids = list(range(len(batches))) if batch_ids is None else list(batch_ids)
    inputs = [x.to(device) for x in batches]
    store = ActivationStore(max_cache_gb * (1 << 30), device)
    nets = [net.eval(), model_a.eval(), model_b.eval(), *(m.eval() for m in more_models)]
    counters = [{} if calls is not None else None for _ in nets]
    cursors = [GraphCursor(m, rules, store, len(inputs), c) for m, c in zip(nets, counters)]
    modules = dict(net.named_modules())
    norms_set = set() if norms_set is None else norms_set
    results = []
    fit = _Fitter(modules, model_a, plan, batch_ids, positions, seed, ridge, reduce,
                  update_norms, results, float64_products)
    bar = tqdm(total=len(layers), desc="least squares (one sweep)", disable=not progress,
               leave=False)
    groups = _by_host(cursors[0], layers)
    try:
        for g, (host, group) in enumerate(groups):
            xs_m = [c.advance_to(host, inputs) for c in cursors][0]
            if group[0][1].module == host:  # a module of the trace: the common case
                index, layer = group[0]
                after = groups[g + 1][0] if g + 1 < len(groups) else None
                bn = (_exact_norm_target(cursors[0], layer.norm, after, modules)
                      if update_norms else None)
                fit(index, layer, xs_m, [c.step(inputs) for c in cursors[1:]],
                    closed_form_norm=bn is None)
                if bn is not None:
                    _exact_norm(cursors[0], layer.norm, bn, inputs, reduce)
                    norms_set.add(layer.norm)
            else:  # layers inside a leaf module (attention): fitted one after the other
                _fit_inside(host, group, cursors, inputs, xs_m, nets, fit, counters[0])
            bar.update(len(group))  # the merged graph runs the fitted module in its next range
    finally:
        bar.close()
        for c in cursors:
            c.close()
        store.close()
    if calls is not None:
        tags = ["merged", "a", "b"] + [f"m{k}" for k in range(3, len(nets))]
        for tag, counter in zip(tags, counters):
            calls.update({f"{tag}:{k}": v for k, v in counter.items()})
        calls["peak_cache_bytes"] = store.peak_bytes
        calls["spilled_bytes"] = store.spilled
    net.eval()
    return results

