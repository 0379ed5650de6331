"""Sequential least squares in ONE sweep over the data: every layer of each network runs once.

The sequential fit (:func:`fit_sequential`) needs, for every fittable layer l in graph order,
(a) the merged model's OWN input to l, given the already fitted layers < l, and (b) the
originals' outputs at l (the targets).  Instead of re-running all three networks from the input
for every layer (cost quadratic in depth), the three traced graphs (torch.fx) are executed in
lockstep, node by node, over ALL merge batches: each graph advances to the next fittable layer,
the layer's moments are summed from the live activations, it is solved, its BatchNorm gets
its statistics in closed form, and the graphs move on.  Each module of each network runs once
per batch; the activations held between layers are the live tensors at the current cut of each
graph (freed after their last use), for every batch.

Memory.  Those activations are bounded by ``max_cache_gb``: beyond it new activations are
spilled, to host memory when computing on a GPU, to temporary files on disk when computing on
the CPU (each spilled tensor is written once and read back once: the sweep still runs every
layer once, at the cost of that I/O).

Precision.  The layer moments are products in float64, summed in float64: the ridge problems
are ill-conditioned (a ridge of 1e-4 of the trace allows condition numbers near 1e4), and
float32 products, even summed in float64 over chunks of 2,048 samples, moved the fitted
weights of the resnet pair by up to 0.5% against float64 ones (measured: 3.5e-3 on
layer1.0.conv1, 5e-3 on layer3.2.conv2).  Each chunk's products are added to the sums
exactly, to float64 precision (:func:`pleas.sums.add_precise`), so the sums do not depend on
the order of the chunks.  Sampled positions are drawn from a generator seeded by (seed, layer,
batch index), so a batch gets the same positions whichever process or order handles it: a
sharded, multi-process fit gives the single-process weights bit for bit.
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
from .plan import Plan, shared_plan
from .spec import Layer, trace
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

    def next_call(self, path: str) -> fx.Node:
        """The next node that calls module ``path`` (without executing anything)."""
        for node in self.nodes[self.pos:]:
            if node.op == "call_module" and node.target == path:
                return node
        raise RuntimeError(f"module {path!r} is not called after node {self.pos} of the trace")

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
        """``xh`` (n, blocks, k), ``y`` (n, blocks, rows), in float64 over chunks of
        ``PRODUCT_ROWS`` samples (the float64 copies stay small).  ``bias``: the moments are
        those of ``[xh, 1]`` (k + 1 columns), the constant column's entries taken from the
        sums rather than from a copy of ``xh`` with a column of ones."""
        k = xh.shape[2]
        for s in range(0, xh.shape[0], PRODUCT_ROWS):
            x, t = xh[s:s + PRODUCT_ROWS].double(), y[s:s + PRODUCT_ROWS].double()
            xx = torch.zeros_like(self.xx[0])
            if x.shape[1] == 1:  # one block: the symmetric product
                add_gram(xx[0, :k, :k], x[:, 0])
            else:  # grouped conv: many small blocks at once
                xx[:, :k, :k] = torch.einsum("nbk,nbl->bkl", x, x)
            yx = torch.zeros_like(self.yx[0])
            yx[:, :, :k] = torch.einsum("nbr,nbk->brk", t, x)
            sum_x = torch.zeros_like(self.sum_x[0])
            sum_x[:, :k] = x.sum(0)
            if bias:
                sum_x[:, k] = x.shape[0]
                xx[:, :k, k] = xx[:, k, :k] = sum_x[:, :k]
                xx[:, k, k] = x.shape[0]
                yx[:, :, k] = t.sum(0)
            # each chunk's sums added exactly, in any order (pleas.sums): a sharded fit
            # gives the one-process weights bit for bit
            add_precise(self.xx, xx)
            add_precise(self.yx, yx)
            add_precise(self.sum_x, sum_x)
            add_precise(self.yy, (t * t).sum())
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
    """Which original unit each new output unit copies or averages, on the compute device
    (built once per layer: no host copies inside the batch loop)."""

    index: tuple[torch.Tensor, ...]  # per model
    weight: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, p_out, like: torch.Tensor) -> "_TargetMap":
        return cls(tuple(i.clamp_min(0).to(like.device) for i in p_out.index),
                   tuple(w.to(like) for w in p_out.weights()))

    def __call__(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """y~ = [avg(merged) | kept from model 1 | ... | kept from model K] by new unit."""
        out = ys[0][:, self.index[0]] * self.weight[0]
        for y, i, w in zip(ys[1:], self.index[1:], self.weight[1:]):
            out = out + y[:, i] * w
        return out


def layer_moments(layer: Layer, index_in_fit: int, mod_m: nn.Module, mod_a: nn.Module,
                  xs_m: list, ys: list[list], batch_ids: list[int], plan: Plan,
                  positions: int | None, seed: int) -> SweepMoments:
    """The moments of one layer over all batches, from the merged net's inputs and the
    originals' outputs (``ys[k][b]``: model k, batch b; no patches of the originals' inputs
    are needed)."""
    p_out = composite_plan(layer, plan)
    grouped = isinstance(mod_m, nn.Conv2d) and mod_m.groups > 1
    blocks = mod_m.groups if grouped else 1
    has_bias = layer.bias is not None
    mom = None
    targets = _TargetMap.of(p_out, ys[0][0])
    for b, (x, bid) in enumerate(zip(xs_m, batch_ids)):
        gen = position_generator(seed, index_in_fit, bid)
        index = sample_index(mod_a, x, positions, gen)  # drawn on the host: same on any device
        xh = layer_rows(mod_m, x, index)
        y = targets([_out_rows(y_model[b], mod_a, index) for y_model in ys])
        xh = xh.reshape(xh.shape[0], blocks, -1)
        y = y.reshape(y.shape[0], blocks, -1)
        if mom is None:
            mom = SweepMoments.zeros(blocks, y.shape[2], xh.shape[2] + has_bias, xh.device)
        mom.add(xh, y, bias=has_bias)
    return mom


def solve_layer(layer: Layer, mod: nn.Module, mom: SweepMoments, plan: Plan, ridge: float
                ) -> tuple[torch.Tensor, float, float]:
    """The block-constrained ridge solve of one layer toward its current (plain) weights."""
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
        w, before, after = fit_grouped_block(legacy, w0, ridge)
        w = w.reshape(w_now.shape[0], -1)
    else:
        kk = mod.weight[0, 0].numel() if mod.weight.ndim > 2 else 1
        p_out = composite_plan(layer, plan)
        p_in = plan.get(layer.in_group) or shared_plan(mod.weight.shape[1], p_out.models)
        u_one = p_in.size * kk  # only the column kinds are read below
        col_kind = model_columns(p_in, kk, u_one, layer.bias is not None,
                                 p_out.models * u_one + 1)[2]
        w, before, after = solve_blocks(mom.xx[0], mom.yx[0], float(mom.yy),
                                        _initial(layer, current), p_out.kinds(), col_kind,
                                        ridge, count, p_out.models)
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

    def __call__(self, index: int, layer: Layer, xs_m: list, ys: list[list]) -> None:
        mod, mod_a = self.modules[layer.module], self.model_a.get_submodule(layer.module)
        mom = layer_moments(layer, index, mod, mod_a, xs_m, ys, self.batch_ids,
                            self.plan, self.positions, self.seed).reduced(self.reduce).cpu()
        w, before, after = solve_layer(layer, mod, mom, self.plan, self.ridge)
        self.results.append(FitResult(layer.module, before, after))
        if self.update_norms and layer.norm:
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


# ------------------------------------------------------------------------ the sweep
@torch.no_grad()
def fit_sequential(layers: list[Layer], net: nn.Module, model_a: nn.Module, model_b: nn.Module,
                   batches: list, plan: Plan, device="cpu", ridge: float = 1e-4,
                   positions: int | None = 64, seed: int = 0, progress: bool = True,
                   update_norms: bool = True, rules: Any = None, max_cache_gb: float = 4.0,
                   reduce: Reduce | None = None, batch_ids: list[int] | None = None,
                   calls: dict | None = None, more_models: tuple = ()) -> list[FitResult]:
    """Sequential least squares in one sweep (see the module docstring); fits ``net`` in place.

    ``batches`` are this process's merge batches; ``batch_ids`` their indices in the whole
    merge set (default 0..n-1) and ``reduce`` the sum over processes of a float64 tensor (for
    data sharded over ranks; default: one process).  ``calls`` (a dict) counts the module
    calls of the graphs, keyed ``"merged:<path>"``, ``"a:<path>"``, ``"b:<path>"`` (then
    ``"m3:<path>"``, ...).  ``more_models``: the third to K-th original of a K-model merge.
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
    results = []
    fit = _Fitter(modules, model_a, plan, batch_ids, positions, seed, ridge, reduce,
                  update_norms, results)
    bar = tqdm(total=len(layers), desc="least squares (one sweep)", disable=not progress,
               leave=False)
    try:
        for host, group in _by_host(cursors[0], layers):
            xs_m = [c.advance_to(host, inputs) for c in cursors][0]
            if group[0][1].module == host:  # a module of the trace: the common case
                index, layer = group[0]
                fit(index, layer, xs_m, [c.step(inputs) for c in cursors[1:]])
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

