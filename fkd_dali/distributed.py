"""Process-group setup for torchrun launches (NCCL on GPU, gloo on CPU) and plain multi-process launches."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def close(self) -> None:
        if self.group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str, rank: int | None = None, world_size: int | None = None,
          timeout_s: float = 1800.0) -> DistInfo:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) starts a process group; explicit
    ``rank``/``world_size`` (plain launches, e.g. one process per node without torchrun) only shard the work."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        info = DistInfo(rank=int(os.environ["RANK"]), world_size=env_world,
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if device == "gpu":
            torch.cuda.set_device(info.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "gpu" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        info.group = True
        return info
    world_size = world_size or 1
    rank = rank or 0
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} must be in 0..{world_size - 1} (--world-size {world_size})")
    return DistInfo(rank=rank, world_size=world_size, local_rank=0)
