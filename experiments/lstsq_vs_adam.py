"""Merge wall time and peak memory per stage, closed-form least squares vs Adam, and reuse.

    python experiments/lstsq_vs_adam.py                   # CPU (default)
    python experiments/lstsq_vs_adam.py --device cuda

(a) the demo pair resnet_a + resnet_b (ResNet-20, 28x28, the CLI's default merge data);
(b) torchvision resnet50 (random weights, seeds 0 and 1, num_classes=10) at 224 px on a few
    Fashion-MNIST images (upsampled, 3 channels), ``positions`` sampling for the Grams.

1. Per stage (spec, statistics pass, matching, planning, widen, least squares, assemble, BN reset):
   wall time and peak memory.  The stages are measured by wrapping the functions that
   :func:`pleas.prepare` / :func:`pleas.build` call, so the library code itself runs unchanged.
   Memory: peak resident set size (RSS, sampled every 2 ms from /proc/self/statm) above the RSS
   at the stage's start; on CUDA also ``torch.cuda.max_memory_allocated`` during the stage.
2. Least squares: the library's closed form (:func:`pleas.lstsq.fit_layer`) against an Adam fit
   of the SAME per-layer objective, as the reference code does it: minimise
   ``E||W S u - T u||^2 + lambda ||W - W0||^2`` (the library's block-wise ridge toward the plain
   partial merge W0), computed from the same Gram matrices, structural zeros masked, 400 Adam
   steps from W0 in float32, learning rate ``c * rms(W0)`` per layer with ``c`` picked from a grid
   on the demo pair.  Reported: time and final objective (float64) of both.
3. Reuse: one prepare + 5 builds (widths 1 .. 2) against 5 independent ``pleas.merge`` calls.

The printed tables are also written to ``experiments/results/lstsq_vs_adam.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too

import pleas.pipeline as pipeline  # noqa: E402
from pleas import lstsq, zoo  # noqa: E402
from pleas.config import MergeConfig  # noqa: E402
from pleas.data import load_task  # noqa: E402
from pleas.models import build_model  # noqa: E402
from pleas.pipeline import ModelSide, build, merge, prepare  # noqa: E402
from pleas.plan import shared_plan  # noqa: E402
from pleas.runner import input_size, merge_data  # noqa: E402

STAGES = ("spec", "statistics", "matching", "planning", "widen", "least squares", "assemble",
          "BN reset")
WRAPPED = {  # names looked up in pleas.pipeline -> stage
    "derive_spec": "spec", "run_pair": "statistics",
    "match_activations": "matching", "match_weights": "matching",
    "identity_matching": "matching",
    "widen_state_dict": "widen", "merged_layernorm_state": "widen",
    "fit_all": "least squares", "fit_layer_regmean": "least squares",
    "fit_sequential": "least squares (sequential mode)",
    "build_module": "assemble", "recalibrate_batchnorm": "BN reset",
}
PLANNING = ("allocate", "build_plan", "plan_cost")
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


# ------------------------------------------------------------------------------ measurement
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler:
    """Background thread keeping the peak RSS since the last :meth:`reset`."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def reset(self) -> int:
        now = rss()
        self.peak = now
        return now

    def read(self) -> int:
        self.peak = max(self.peak, rss())
        return self.peak

    def stop(self) -> None:
        self._stop = True
        self._t.join()


class StageMeter:
    """Wraps pleas.pipeline's callees: time and peak memory per stage (accumulated per run)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.sampler = Sampler()
        self.records: dict[str, dict[str, float]] = {}
        self.depth = 0
        self.captured_fit: dict | None = None

    def clear(self) -> None:
        self.records = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.depth:  # nested call of another wrapped function: counted in the outer stage
            yield
            return
        self.depth += 1
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda0 = torch.cuda.memory_allocated()
        start = self.sampler.reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peak = self.sampler.read() - start
            rec = self.records.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0,
                                                 "cuda_peak_mb": 0.0, "calls": 0})
            rec["seconds"] += dt
            rec["calls"] += 1
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], peak / MB)
            if self.cuda:
                rec["cuda_peak_mb"] = max(rec["cuda_peak_mb"],
                                          (torch.cuda.max_memory_allocated() - cuda0) / MB)
            self.depth -= 1

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if fn.__name__ == "fit_all" and self.captured_fit is not None:
                grams, plan, sa, sb, widened = args[:5]
                self.captured_fit.update(grams=grams, plan=plan, state_a=sa, state_b=sb,
                                         widened=dict(widened),
                                         ridge=args[5] if len(args) > 5 else kwargs.get(
                                             "ridge", 1e-4))
            with self.stage(name):
                return fn(*args, **kwargs)
        return inner

    @contextlib.contextmanager
    def installed(self):
        """Patch pleas.pipeline for the duration (restored afterwards)."""
        saved = {}
        for attr, stage in WRAPPED.items():
            if hasattr(pipeline, attr):
                saved[attr] = getattr(pipeline, attr)
                setattr(pipeline, attr, self.wrap(saved[attr], stage))
        real_planning = pipeline.planning
        proxy = types.ModuleType("planning_proxy")
        proxy.__dict__.update(real_planning.__dict__)
        for attr in PLANNING:
            setattr(proxy, attr, self.wrap(getattr(real_planning, attr), "planning"))
        pipeline.planning = proxy
        try:
            yield self
        finally:
            pipeline.planning = real_planning
            for attr, fn in saved.items():
                setattr(pipeline, attr, fn)


# ------------------------------------------------------------------------ the LS objective
class LayerProblem:
    """One layer's least-squares problem in Gram form, exactly as pleas.lstsq.fit_layer poses it.

    J(W) = sum_rows [ w SGS w^T - 2 w (TGS)_row + (TGT)_rr + lambda_row ||w - w0||^2 ], over the
    allowed (non-structural-zero) columns of each row; reported per output and sample.
    """

    ALLOWED = {0: (0, 1, 2, 3), 1: (0, 1, 3), 2: (0, 2, 3)}

    def __init__(self, layer, gram, count, plan, sa, sb, widened, ridge):
        g = gram.cpu()
        wa_t, wb_t = sa[layer.weight].double().cpu(), sb[layer.weight].double().cpu()
        kk = wa_t[0, 0].numel()
        wa_mat, wb_mat = wa_t.reshape(wa_t.shape[0], -1), wb_t.reshape(wb_t.shape[0], -1)
        self.has_bias = layer.bias is not None
        ba = sa[layer.bias].double().cpu() if self.has_bias else None
        bb = sb[layer.bias].double().cpu() if self.has_bias else None
        u_a, u_dim = wa_mat.shape[1], g.shape[0]
        composite = getattr(lstsq, "composite_plan", None)  # newer library: per-layer out plan
        p_out = composite(layer, plan) if composite else plan[layer.out_group]
        p_in = plan.get(layer.in_group) or shared_plan(wa_t.shape[1])
        index, weight, col_kind = lstsq.model_columns(p_in, kk, u_a, self.has_bias, u_dim)
        sg, self.sgs = lstsq._project(g, index, weight)
        t = lstsq._targets(p_out, [wa_mat, wb_mat], [ba, bb], u_dim)
        self.tgs = t @ sg.T
        self.tgt = ((t @ g) * t).sum(1)  # diagonal of T G T^T
        w_new = widened[layer.weight]
        self.shape = w_new.shape
        w0 = w_new.double().cpu().reshape(w_new.shape[0], -1)
        if self.has_bias:
            w0 = torch.cat([w0, widened[layer.bias].double().cpu()[:, None]], 1)
        self.w0 = w0
        row_kind = torch.where(p_out.merged, 0, torch.where(p_out.a_index >= 0, 1, 2))
        self.mask = torch.zeros_like(w0)
        self.lam = torch.zeros(w0.shape[0], dtype=torch.float64)
        for kind, ok in self.ALLOWED.items():
            rows = torch.nonzero(row_kind == kind).flatten()
            if rows.numel() == 0:
                continue
            cols = torch.nonzero(torch.isin(col_kind, torch.tensor(ok))).flatten()
            self.mask[rows[:, None], cols[None, :]] = 1.0
            self.lam[rows] = ridge * float(self.sgs[cols, cols].mean().clamp_min(1e-12))
        self.count, self.out = count, w0.shape[0]
        self.module = layer.module
        self.layer = layer

    def as_matrix(self, widened: dict) -> torch.Tensor:
        w = widened[self.layer.weight].double().cpu().reshape(self.out, -1)
        if self.has_bias:
            w = torch.cat([w, widened[self.layer.bias].double().cpu()[:, None]], 1)
        return w

    def objective(self, w: torch.Tensor) -> tuple[float, float]:
        """(MSE, MSE + ridge), per output and sample, float64; W outside the mask is ignored."""
        w = w.double().cpu() * self.mask
        mse = (w @ self.sgs * w).sum() - 2 * (w * self.tgs).sum() + self.tgt.sum()
        reg = (self.lam[:, None] * ((w - self.w0) * self.mask) ** 2).sum()
        norm = self.count * max(self.out, 1)
        return float(mse) / norm, float(mse + reg) / norm

    def adam(self, steps: int, c: float, device: str) -> torch.Tensor:
        """Plain Adam (constant lr = c * rms(W0)) on J in float32, from W0, zeros masked."""
        scale = 1.0 / self.count
        a = (self.sgs * scale).float().to(device)
        r = (self.tgs * scale).float().to(device)
        lam = (self.lam * scale).float().to(device)[:, None]
        m = self.mask.float().to(device)
        w0 = (self.w0 * self.mask).float().to(device)
        w = w0.clone().requires_grad_(True)
        lr = c * float(w0[m > 0].pow(2).mean().sqrt().clamp_min(1e-8))
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            with torch.no_grad():
                wm = w * m
                w.grad = 2 * ((wm @ a) - r + lam * (wm - w0)) * m
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (w.detach() * m).double().cpu()


def ls_comparison(fit: dict, steps: int, grid: tuple[float, ...], device: str,
                  max_dim: int | None, progress: bool = True) -> dict:
    """Closed form vs Adam on every layer (Adam fully run where the Gram side <= max_dim)."""
    from tqdm.auto import tqdm

    grams = fit["grams"]
    rows = []
    for layer in tqdm(grams.layers, desc="closed form vs Adam", disable=not progress,
                      leave=False):
        gram, count = grams.gram[layer.module], grams.count[layer.module]
        args = (fit["plan"], fit["state_a"], fit["state_b"])
        widened = dict(fit["widened"])
        t0 = time.perf_counter()
        res = lstsq.fit_layer(layer, gram, count, args[0], list(args[1:]), widened, fit["ridge"])
        t_cf = time.perf_counter() - t0
        t0 = time.perf_counter()
        prob = LayerProblem(layer, gram, count, *args, fit["widened"], fit["ridge"])
        t_setup = time.perf_counter() - t0
        w_cf = prob.as_matrix(widened)
        mse_cf, j_cf = prob.objective(w_cf)
        _, j_0 = prob.objective(prob.w0)
        row = {"layer": layer.module, "dim": int(prob.sgs.shape[0]), "out": prob.out,
               "closed_seconds": t_cf, "closed_mse": mse_cf, "closed_objective": j_cf,
               "plain_objective": j_0, "library_mse": res.error_after,
               "adam": {}}
        if max_dim is None or prob.sgs.shape[0] <= max_dim:
            for c in grid:
                t0 = time.perf_counter()
                w = prob.adam(steps, c, device)
                dt = time.perf_counter() - t0 + t_setup
                mse, j = prob.objective(w)
                row["adam"][c] = {"seconds": dt, "mse": mse, "objective": j}
        else:  # too slow here: time 10 steps, extrapolate; no objective
            t0 = time.perf_counter()
            prob.adam(10, grid[0], device)
            row["adam_estimated_seconds"] = (time.perf_counter() - t0) * steps / 10 + t_setup
        rows.append(row)
    return {"layers": rows, "steps": steps}


# ------------------------------------------------------------------------------- the cases
def demo_case(args):
    """(a) resnet_a + resnet_b, the CLI's default merge data."""
    model_a, info_a = zoo.resolve(args.demo[0], device=args.device)
    model_b, info_b = zoo.resolve(args.demo[1], device=args.device)
    a, b = ModelSide.of(model_a, info_a, "model_a"), ModelSide.of(model_b, info_b, "model_b")
    size, channels = input_size(a)
    config = MergeConfig(batches=args.batches, batch_size=args.batch_size, seed=0)
    data, name = merge_data(config, a, b, size=size, channels=channels)
    return {"label": f"{args.demo[0]} + {args.demo[1]} (ResNet-20, {size}x{size})",
            "a": a, "b": b, "data": data, "data_name": name, "batch_size": args.batch_size,
            "batches": args.batches, "positions": args.positions,
            "images": min(len(data), args.batches * args.batch_size)}


def resnet50_case(args):
    """(b) torchvision resnet50, random weights (seeds 0, 1), 224 px, a few images."""
    torch.manual_seed(0)
    model_a = build_model("torchvision:resnet50", num_classes=10).eval()
    torch.manual_seed(1)
    model_b = build_model("torchvision:resnet50", num_classes=10).eval()
    n = args.r50_batches * args.r50_batch_size
    # subset BEFORE resizing: 60,000 images at 3x224x224 would not fit in memory
    data = load_task("fashion_mnist", "train").subset(n, seed=0).adapt(224, 3)
    a = ModelSide(model_a, "resnet50_seed0", arch="torchvision:resnet50")
    b = ModelSide(model_b, "resnet50_seed1", arch="torchvision:resnet50")
    return {"label": "torchvision resnet50 x2 (random weights, seeds 0/1, 224x224)",
            "a": a, "b": b, "data": data, "data_name": "fashion_mnist (224 px, 3 channels)",
            "batch_size": args.r50_batch_size, "batches": args.r50_batches,
            "positions": args.positions, "images": n}


def run_case(case: dict, args, meter: StageMeter, adam_max_dim: int | None,
             grid: tuple[float, ...], sweep: bool) -> dict:
    out: dict = {"label": case["label"], "images": case["images"], "width": args.width}
    progress = not args.quiet
    meter.clear()
    meter.captured_fit = {}
    rss0 = rss()
    t0 = time.perf_counter()
    with meter.installed():
        prep = prepare(case["a"], case["b"], case["data"], device=args.device,
                       batch_size=case["batch_size"], max_batches=case["batches"],
                       progress=progress, data_name=case["data_name"],
                       positions=case["positions"])
        merged, report = build(prep, args.width, "pleas_closed", progress=progress)
    out["total_seconds"] = time.perf_counter() - t0
    out["stages"] = {k: dict(v) for k, v in meter.records.items()}
    out["rss_growth_mb"] = (rss() - rss0) / MB
    out["library_seconds"] = report["seconds"]
    out["width_achieved"] = report["width"]["achieved"]
    out["gram_mb"] = sum(g.numel() * g.element_size() for g in prep.grams.gram.values()) / MB
    out["fittable_layers"] = len(prep.grams.layers)
    fit = meter.captured_fit
    meter.captured_fit = None
    del merged
    out["ls"] = ls_comparison(fit, args.adam_steps, grid, args.device, adam_max_dim,
                              progress)
    if args.sequential:  # the other least-squares mode, for reference
        meter.clear()
        with meter.installed():
            build(prep, args.width, "pleas", progress=progress)
        out["sequential"] = dict(meter.records.get("least squares (sequential mode)", {}))
    if sweep:
        out["reuse"] = reuse(case, args, prep)
    return out


def reuse(case: dict, args, prep) -> dict:
    widths = (1.0, 1.25, 1.5, 1.75, 2.0)
    progress = False
    t0 = time.perf_counter()
    p = prepare(case["a"], case["b"], case["data"], device=args.device,
                batch_size=case["batch_size"], max_batches=case["batches"], progress=progress,
                positions=case["positions"])
    for w in widths:
        build(p, w, "pleas_closed", progress=progress)
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w in widths:
        merge(case["a"], case["b"], case["data"], width=w, method="pleas_closed",
              device=args.device, batch_size=case["batch_size"], max_batches=case["batches"],
              positions=case["positions"], progress=progress)
    t_indep = time.perf_counter() - t0
    return {"widths": list(widths), "one_prepare_5_builds": t_shared,
            "five_merges": t_indep}


# ------------------------------------------------------------------------------- reporting
def best_c(cases: list[dict]) -> float:
    """The grid value with the lowest total Adam objective on the tuning case."""
    layers = cases[0]["ls"]["layers"]
    totals = {}
    for c in layers[0]["adam"]:
        totals[c] = sum(l["adam"][c]["objective"] for l in layers if c in l["adam"])
    return min(totals, key=totals.get)


def ls_summary(case: dict, c: float) -> dict:
    layers = case["ls"]["layers"]
    full = [l for l in layers if c in l["adam"]]
    est = [l for l in layers if "adam_estimated_seconds" in l]
    return {
        "layers": len(layers), "adam_layers": len(full),
        "closed_seconds_all": sum(l["closed_seconds"] for l in layers),
        "closed_seconds": sum(l["closed_seconds"] for l in full),
        "adam_seconds": sum(l["adam"][c]["seconds"] for l in full),
        "adam_seconds_estimated_rest": sum(l["adam_estimated_seconds"] for l in est),
        "closed_objective": sum(l["closed_objective"] for l in full),
        "adam_objective": sum(l["adam"][c]["objective"] for l in full),
        "plain_objective": sum(l["plain_objective"] for l in full),
        "closed_lower": sum(l["closed_objective"] <= l["adam"][c]["objective"] for l in full),
        "max_rel_diff_library_mse": max(
            abs(l["closed_mse"] - l["library_mse"]) / max(abs(l["library_mse"]), 1e-12)
            for l in layers),
    }


def render(results: dict) -> str:
    cases, c = results["cases"], results["adam_c"]
    dev = results["machine"]["device"]
    cuda = dev.startswith("cuda")
    L = [f"Device: {dev}, {results['machine']['threads']} torch thread(s), "
         f"{results['machine']['cpus']} CPU cores (shared with other jobs), torch "
         f"{results['machine']['torch']}.  Width {results['width']}, method pleas, activation "
         "matching, uniform allocation.", ""]
    L.append("### Merge stages: wall time and peak memory")
    L.append("")
    head = "| stage | " + " | ".join(f"{x['label']}: s | peak RSS MB" + (" | CUDA MB" if cuda else "")
                                      for x in cases) + " |"
    L += [head, "|---|" + "---:|---:|" * len(cases) + ("---:|" * len(cases) if cuda else "")]
    for st in STAGES:
        cells = []
        for x in cases:
            r = x["stages"].get(st)
            if r is None:
                cells += ["-", "-"] + (["-"] if cuda else [])
            else:
                cells += [f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}"]
                if cuda:
                    cells.append(f"{r['cuda_peak_mb']:.0f}")
        L.append(f"| {st} | " + " | ".join(cells) + " |")
    tot = []
    for x in cases:
        tot += [f"**{x['total_seconds']:.2f}**", f"{max(r['peak_rss_mb'] for r in x['stages'].values()):.0f}"]
        if cuda:
            tot.append(f"{max(r['cuda_peak_mb'] for r in x['stages'].values()):.0f}")
    L.append("| total (prepare + build) | " + " | ".join(tot) + " |")
    if any("sequential" in x for x in cases):
        cells = []
        for x in cases:
            r = x.get("sequential")
            cells += ([f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}"] + (
                [f"{r['cuda_peak_mb']:.0f}"] if cuda else [])) if r else \
                ["-", "-"] + (["-"] if cuda else [])
        L.append("| *least squares, sequential mode instead (not in total)* | "
                 + " | ".join(cells) + " |")
    L.append("")
    L.append("Peak memory of a stage: the highest resident set size during the stage (sampled "
             "every 2 ms) minus the RSS at its start"
             + ("; CUDA: torch.cuda.max_memory_allocated during the stage above the allocation "
                "at its start" if cuda else "") + ".  Timings are wall-clock on a machine shared "
             "with other jobs, so expect +-30% noise.")
    L.append("")
    for x in cases:
        L.append(f"- {x['label']}: {x['images']} merge images, achieved width "
                 f"{x['width_achieved']:.3f}, {x['fittable_layers']} least-squares layers, "
                 f"float64 Gram matrices {x['gram_mb']:.0f} MB in all, RSS growth over the whole "
                 f"merge {x['rss_growth_mb']:.0f} MB.")
    L.append("")
    L.append(f"### Least squares: closed form vs Adam ({results['adam_steps']} steps, same "
             f"objective, lr = {c:g} x rms(W0))")
    L.append("")
    L += ["| model | layers (Adam run) | closed form s (same layers) | Adam s | "
          "objective: plain merge W0 | closed form | Adam | layers closed form <= Adam |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in cases:
        s = ls_summary(x, c)
        L.append(f"| {x['label']} | {s['layers']} ({s['adam_layers']}) | "
                 f"{s['closed_seconds']:.2f} | {s['adam_seconds']:.2f} | "
                 f"{s['plain_objective']:.5g} | {s['closed_objective']:.5g} | "
                 f"{s['adam_objective']:.5g} | {s['closed_lower']}/{s['adam_layers']} |")
    L.append("")
    L.append("Objective: sum over layers of the per-layer least-squares error per output and "
             "sample plus the same ridge term, evaluated in float64 from the Gram matrices.")
    for x in cases:
        s = ls_summary(x, c)
        if s["adam_layers"] < s["layers"]:
            L.append(f"- {x['label']}: Adam was run on the {s['adam_layers']} layers whose Gram "
                     f"side is <= {results['adam_max_dim_r50']}; for the other "
                     f"{s['layers'] - s['adam_layers']}, 10 steps were timed and scaled to "
                     f"{results['adam_steps']}: about {s['adam_seconds_estimated_rest']:.0f} s "
                     f"more.  The closed form took {s['closed_seconds_all']:.2f} s for all "
                     f"{s['layers']} layers.")
        L.append(f"- {x['label']}: closed-form MSE recomputed here vs the library's reported "
                 f"error: max relative difference {s['max_rel_diff_library_mse']:.1e}.")
    L.append("")
    grid_rows = ["| c (lr = c x rms(W0)) | total Adam objective | Adam s |", "|---:|---:|---:|"]
    layers = cases[0]["ls"]["layers"]
    for g in layers[0]["adam"]:
        grid_rows.append(f"| {g:g} | {sum(l['adam'][g]['objective'] for l in layers):.5g} | "
                         f"{sum(l['adam'][g]['seconds'] for l in layers):.2f} |")
    L.append(f"Adam learning-rate grid on {cases[0]['label']} (closed form: "
             f"{ls_summary(cases[0], c)['closed_objective']:.5g}):")
    L.append("")
    L += grid_rows
    rs = [x for x in cases if "reuse" in x]
    if rs:
        L += ["", "### Reuse: a 5-width sweep (widths 1, 1.25, 1.5, 1.75, 2)", "",
              "| model | one prepare + 5 builds, s | 5 independent merges, s | speed-up |",
              "|---|---:|---:|---:|"]
        for x in rs:
            r = x["reuse"]
            L.append(f"| {x['label']} | {r['one_prepare_5_builds']:.1f} | "
                     f"{r['five_merges']:.1f} | {r['five_merges'] / r['one_prepare_5_builds']:.1f}x |")
    L += ["", f"Total benchmark wall time {results['seconds']:.0f} s."]
    return "\n".join(L)


def header(device: str) -> str:
    return ("## Benchmark\n\n```\npython experiments/lstsq_vs_adam.py"
            + (f" --device {device}" if device != "cpu" else "") + "\n```\n\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--width", type=float, default=1.5)
    p.add_argument("--demo", nargs=2, default=["resnet_a", "resnet_b"], metavar=("A", "B"))
    p.add_argument("--batches", type=int, default=16, help="demo pair merge batches")
    p.add_argument("--batch-size", type=int, default=64, help="demo pair merge batch size")
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--r50-batches", type=int, default=2)
    p.add_argument("--r50-batch-size", type=int, default=8)
    p.add_argument("--no-resnet50", action="store_true")
    p.add_argument("--adam-steps", type=int, default=400)
    p.add_argument("--adam-max-dim", type=int, default=2400,
                   help="resnet50: run Adam fully only on layers whose Gram side is <= this "
                        "(others: 10 steps timed and extrapolated); 0 = all layers")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="skip timing the sequential least-squares mode")
    p.add_argument("--r50-sweep", action="store_true",
                   help="also time the 5-width reuse sweep on resnet50 (slow on CPU)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "lstsq_vs_adam.md"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the markdown from the .json next to --out")
    args = p.parse_args(argv)
    if args.render:
        out = Path(args.out)
        results = json.loads(out.with_suffix(".json").read_text())
        for x in results["cases"]:
            for l in x["ls"]["layers"]:
                l["adam"] = {float(k): v for k, v in l["adam"].items()}
        text = render(results) + f"\nProcess peak RSS (ru_maxrss): {results['max_rss_mb']:.0f} MB.\n"
        out.write_text(header(results["machine"]["device"]) + text)
        print(text)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meter = StageMeter(args.device)
    cases = [run_case(demo_case(args), args, meter, None, LR_GRID, sweep=True)]
    c = best_c(cases)
    print(f"Adam lr factor chosen on the demo pair: c = {c:g}", flush=True)
    if c in (LR_GRID[0], LR_GRID[-1]):
        print("warning: the best Adam learning rate is at the edge of the grid", flush=True)
    if not args.no_resnet50:
        cases.append(run_case(resnet50_case(args), args, meter, args.adam_max_dim or None, (c,),
                              sweep=args.r50_sweep))
    meter.sampler.stop()
    results = {
        "cases": cases, "adam_c": c, "adam_steps": args.adam_steps, "width": args.width,
        "adam_max_dim_r50": args.adam_max_dim or None,
        "seconds": time.perf_counter() - t_start,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {"device": args.device, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
                    else None},
    }
    text = render(results)
    text += f"\nProcess peak RSS (ru_maxrss): {results['max_rss_mb']:.0f} MB.\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header(args.device) + text)

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o
    out.with_suffix(".json").write_text(json.dumps(clean(results), indent=2) + "\n")
    print(f"written to {out} (and {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
