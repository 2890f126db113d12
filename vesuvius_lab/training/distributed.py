"""Ranks under torchrun, and the few things every rank must agree on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag true on any rank (one all-reduce for all of them)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t)
        return [v > 0 for v in t.tolist()]

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, values: list) -> list:
        """Rank 0's ``values`` on every rank."""
        if self.world > 1:
            dist.broadcast_object_list(values, src=0)
        return values

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed() -> Distributed:
    """The process group torchrun describes (gloo on CPU, nccl on GPUs), or one plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
