"""Merge data sharded over processes (``torchrun``): each rank streams its own batches and the
float64 sums are all-reduced, so every rank computes the single-process result.

    torchrun --nproc-per-node 2 -m pleas.merge resnet_a resnet_b --width 1.5

Every statistic pleas sums is additive over samples: the matching statistics, the Grams of
the closed form, the per-layer moments of the sequential fit, the BatchNorm reset's sums.  Batch
``i`` of the merge set goes to rank ``i % world``; positions are sampled per (layer, global
batch index), so a batch contributes the same samples whichever rank handles it, and each
batch's terms are added exactly (:mod:`pleas.sums`, within its bound on the number of
terms), so the result is the one-process merge bit for bit, whatever the number of ranks.  Backends: gloo on the CPU,
NCCL on CUDA.  Only rank 0 writes the output and evaluates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """This process's place in the group (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def alone(self) -> bool:
        return self.world == 1

    @property
    def writes(self) -> bool:
        """Does this process write the output (rank 0)?"""
        return self.rank == 0

    def split(self, batches: list) -> tuple[list, list[int]]:
        """This rank's batches and their indices in the whole merge set."""
        ids = list(range(self.rank, len(batches), self.world))
        return [batches[i] for i in ids], ids

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all ranks (``t`` itself when alone)."""
        if self.alone:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


ALONE = Shard()


def from_environment(device: str = "cpu") -> Shard:
    """The shard ``torchrun`` describes (WORLD_SIZE, RANK), the process group initialised;
    one process when those variables are absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return Shard(dist.get_rank(), dist.get_world_size())
