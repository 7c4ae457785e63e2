"""Distributed training under ``torchrun``: the process group and this process's place in it.

Gradients are averaged by DDP; BatchNorm becomes SyncBatchNorm on GPU (PyTorch's SyncBatchNorm has
no CPU kernel: on CPU each rank keeps its own batch statistics). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's rank, the world size and its local rank; ``created``: whether we started the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    created = False
    if not dist.is_initialized():
        backend = "nccl" if (device_pref != "cpu" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
        created = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)
