"""Merge data sharded over 2 CPU processes (torch.distributed, gloo): the merged weights equal
the one-process merge (the sequential fit with its BN updates and the final BN reset, and the
closed form), because every sum is all-reduced, positions are sampled per batch, and every term
is added exactly (pleas.sums), so the order of the float64 additions does not matter.

Held to 1e-6 of each tensor's scale on float32 models (1e-9 on float64); measured here: bit-
identical.  (Before the exact sums, float32 weights moved by up to 1.4e-5: the reordered sums
differed in the last bit, a fitted weight rounded to the neighbouring float32 here and there,
and the fits downstream amplified that.)"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pleas.distributed import Shard
from pleas.models import build_model
from pleas.pipeline import ModelSide, build, prepare

torch.set_num_threads(1)
METHODS = ("pleas", "pleas_closed")


def _models(dtype):
    torch.manual_seed(0)
    a = build_model("resnet20", num_classes=5).eval().to(dtype)
    torch.manual_seed(1)
    b = build_model("resnet20", num_classes=5).eval().to(dtype)
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return a, b, x


def _merge(shard: Shard, dtype) -> dict[str, dict[str, torch.Tensor]]:
    a, b, x = _models(dtype)
    prep = prepare(ModelSide(a, "a"), ModelSide(b, "b"), x, batch_size=16, positions=16,
                   methods=METHODS, progress=False, shard=shard)
    return {m: build(prep, 1.5, m, progress=False)[0].net.state_dict() for m in METHODS}


def _merge_net(a, b, x) -> torch.nn.Module:
    """A merged network of the test's structure, to load either result into."""
    prep = prepare(ModelSide(a, "a"), ModelSide(b, "b"), x, batch_size=16, positions=16,
                   methods=("pleas_closed",), progress=False)
    return build(prep, 1.5, "pleas_closed", progress=False)[0].net


def _logits(out) -> torch.Tensor:
    """Both heads' logits side by side (separate heads return one tensor per model)."""
    return torch.cat(list(out), 1) if isinstance(out, (tuple, list)) else out


def _worker(rank: int, world: int, port: int, out: str, dtype) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _merge(Shard(rank, world), dtype)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, weight_tol, output_tol",
                         [(torch.float64, 1e-9, 1e-9), (torch.float32, 1e-6, 1e-6)])
def test_two_gloo_processes_give_the_one_process_merge(tmp_path, dtype, weight_tol, output_tol):
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, _free_port(), out, dtype), nprocs=2, join=True)
    single = _merge(Shard(), dtype)
    a, b, x = _models(dtype)
    net = _merge_net(a, b, x)
    for rank in (0, 1):
        sharded = torch.load(f"{out}.{rank}", weights_only=True)
        for method in METHODS:
            for k, v in single[method].items():
                got = sharded[method][k]
                if not v.is_floating_point():
                    continue
                scale = max(float(v.abs().max()), 1e-12)
                assert float((got - v).abs().max()) <= weight_tol * scale, (rank, method, k)
            net.load_state_dict(single[method])
            want = _logits(net(x))
            net.load_state_dict(sharded[method])
            got = _logits(net(x))
            assert float((got - want).abs().max()) <= output_tol * float(want.abs().max()), \
                (rank, method)


def test_a_shard_takes_every_world_th_batch():
    batches = list(range(7))
    assert Shard(0, 3).split(batches) == ([0, 3, 6], [0, 3, 6])
    assert Shard(2, 3).split(batches) == ([2, 5], [2, 5])
    assert Shard().split(batches) == (batches, list(range(7)))
