"""Process groups and the one collective both trainings need: gathering a batch's rows across ranks.

Under `torchrun --nproc_per_node N -m ebr.cli ...` (RANK / WORLD_SIZE / MASTER_ADDR set) the
process group is gloo over env:// (CPU; on GPUs nccl would take its place). A global batch of B
examples is cut into N contiguous chunks (np.array_split: the same cut on every rank); rank r
computes its chunk's rows, and the columns of the sampled softmax (every rank's positives) are
gathered with an autograd-aware all_gather, so each column's gradient flows back to the rank that
computed it. The loss of rank r is sum over its rows / B, so the ranks' losses sum to the
one-process loss: TorchRec's sharded tables sum the ranks' gradients as they are; DDP averages
dense gradients, so the dense model's loss is scaled by N to make that average the sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def chunk(self, n: int) -> tuple[int, int, list[int]]:
        """This rank's rows of a global batch of n: (offset, size, every rank's size)."""
        sizes = [len(c) for c in np.array_split(np.arange(n), self.world)]
        return int(sum(sizes[: self.rank])), sizes[self.rank], sizes


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(need_group: bool = False) -> Ranks:
    """The process group: env:// under a launcher; else, when a one-process group is needed
    (TorchRec's sharded modules always want one), an in-memory store; else none (rank 0 of 1)."""
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if launched():
        dist.init_process_group("gloo", init_method="env://")
        return Ranks(dist.get_rank(), dist.get_world_size())
    if need_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return Ranks()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows (sizes[r] of them on rank r), in rank order, gradients flowing back to
    their rank. Identity on one process."""
    if len(sizes) == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    m = max(sizes)
    pad = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))]) if x.shape[0] < m else x
    parts = all_gather(pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_sum(value: float) -> float:
    """The sum over ranks of a float (the global loss from each rank's share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
