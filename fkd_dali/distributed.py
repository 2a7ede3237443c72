"""Process-group setup for torchrun launches (NCCL on GPU, gloo on CPU) and plain multi-process launches;
each process drives its own GPU and its own share of the CPU cores in every launch mode."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from . import affinity


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group is up
    local_world_size: int = 1
    device_index: int | None = None  # the CUDA device this process drives (None on the CPU)
    cpus: list[int] | None = None  # the cores this rank was pinned to (None: not pinned)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def close(self) -> None:
        if self.group and dist.is_initialized():
            dist.destroy_process_group()


def choose_device(local_rank: int, device_count: int, explicit: int | None = None) -> int:
    """The CUDA device of a process: ``explicit`` (--device-id) if given, else its local rank (wrapped over
    the visible devices, so plain launches of more processes than GPUs still spread evenly)."""
    if device_count < 1:
        raise RuntimeError("torch sees no CUDA device; use --device cpu")
    if explicit is not None:
        if not 0 <= explicit < device_count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(f"--device-id {explicit} but this process sees {device_count} CUDA device(s) "
                             f"(0..{device_count - 1}; CUDA_VISIBLE_DEVICES={visible!r})")
        return explicit
    return local_rank % device_count


def choose_backend(device: str, local_world: int, device_count: int, explicit: str | None = None) -> str:
    """NCCL when each rank of the node has a GPU of its own, gloo on the CPU or when ranks share a GPU (NCCL
    refuses two ranks on one device); ``explicit`` (--dist-backend) overrides."""
    if explicit:
        if explicit not in ("nccl", "gloo"):
            raise ValueError(f"--dist-backend must be nccl or gloo, got {explicit!r}")
        if explicit == "nccl" and device != "gpu":
            raise ValueError("--dist-backend nccl needs --device gpu")
        return explicit
    return "nccl" if device == "gpu" and local_world <= device_count else "gloo"


def setup(device: str, rank: int | None = None, world_size: int | None = None,
          timeout_s: float = 1800.0, device_id: int | None = None, cpu_affinity: str = "auto",
          backend: str | None = None) -> DistInfo:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) starts a process group; explicit
    ``rank``/``world_size`` (plain launches, e.g. one process per GPU without torchrun) only shard the work.

    Either way the process then drives one GPU (``torch.cuda.set_device``): ``device_id`` if given, else its
    local rank (LOCAL_RANK, or for plain launches ``rank`` modulo the visible GPUs), and is pinned to its
    share of the cores (:mod:`fkd_dali.affinity`; ``cpu_affinity="none"`` leaves it alone). The group's
    backend: :func:`choose_backend`."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    torchrun = env_world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # a one-process torchrun job gets a group too
    if torchrun:
        info = DistInfo(rank=int(os.environ["RANK"]), world_size=env_world,
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    else:
        world_size = world_size or 1
        rank = rank or 0
        if not 0 <= rank < world_size:
            raise ValueError(f"--rank {rank} must be in 0..{world_size - 1} (--world-size {world_size})")
        local = os.environ.get("LOCAL_RANK")
        info = DistInfo(rank=rank, world_size=world_size, local_rank=int(local) if local is not None else rank,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device == "gpu":
        info.device_index = choose_device(info.local_rank, torch.cuda.device_count(), device_id)
        torch.cuda.set_device(info.device_index)
    info.cpus = affinity.pin_rank(info.local_rank, info.local_world_size, device, cpu_affinity)
    if torchrun:
        if not dist.is_initialized():
            name = choose_backend(device, info.local_world_size, torch.cuda.device_count() if device == "gpu" else 0,
                                  backend)
            kw = {"device_id": torch.device("cuda", info.device_index)} if name == "nccl" else {}
            dist.init_process_group(backend=name, timeout=datetime.timedelta(seconds=timeout_s), **kw)
        info.group = True
    return info
