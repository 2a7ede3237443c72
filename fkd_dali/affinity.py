"""CPU cores per rank: each rank on a node gets its own share of the cores near its GPU.

Eight ranks of a node each start DALI threads (decoding, resizing) and the mixed decoder pins its own
threads to the cores NVML reports near the GPU; without a plan, ranks whose GPUs share a NUMA node pile
their threads onto the same cores. Here the cores this process may use, intersected with the cores local to
the rank's GPU (sysfs ``local_cpulist`` of its PCI device), are split evenly among the local ranks that
share them; the process is pinned there and ``DALI_AFFINITY_MASK`` names the same cores, so DALI's threads
stay on them too (``FKD_RANK_CPUS`` tells the loaders to use all of them). A rank that its launcher already
bound to fewer cores than its parent process has (torchrun's NUMA binding, numactl per rank) is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

RANK_CPUS_ENV = "FKD_RANK_CPUS"


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return sorted(set(cpus))


def gpu_local_cpus(device_index: int) -> list[int] | None:
    """Cores on the NUMA node of CUDA device ``device_index`` (sysfs), or None when unknown."""
    try:
        import torch  # noqa: PLC0415
        p = torch.cuda.get_device_properties(device_index)
        bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{bus}/local_cpulist") as f:
            return parse_cpulist(f.read()) or None
    except (OSError, AttributeError, RuntimeError, ValueError):
        return None


def share(cpus: Sequence[int], local_rank: int, local_world: int,
          near: Callable[[int], Sequence[int] | None] | None = None) -> list[int]:
    """The cores of ``local_rank`` among ``local_world`` ranks on this node.

    ``cpus``: the cores the process may use. ``near(r)``: the cores near local rank r's GPU (None on the
    CPU or when unknown). Ranks whose GPUs are near the same cores split those cores evenly, in rank order;
    with fewer cores than ranks in a group, every rank keeps the group's cores (no pinning gains anything).
    """
    cpus = sorted(cpus)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(local_world):
        local = near(r) if near else None
        pool = tuple(c for c in cpus if local is None or c in set(local)) or tuple(cpus)
        groups.setdefault(pool, []).append(r)
    for pool, members in groups.items():
        if local_rank in members:
            if len(pool) < len(members):
                return list(pool)
            per = len(pool) // len(members)
            i = members.index(local_rank)
            return list(pool[i * per:(i + 1) * per])
    return cpus  # pragma: no cover - local_rank is always in some group


def pin_rank(local_rank: int, local_world: int, device: str, policy: str = "auto") -> list[int] | None:
    """Pin this process (and DALI's threads) to its share of the cores; returns the cores, or None when
    nothing was changed (one rank, policy "none", or a process already restricted by its launcher)."""
    if policy not in ("auto", "none"):
        raise ValueError(f"--cpu-affinity must be auto or none, got {policy!r}")
    if policy == "none" or local_world <= 1 or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    try:
        if set(allowed) < os.sched_getaffinity(os.getppid()):
            return None  # the launcher already chose this rank's cores
    except OSError:
        pass
    near = None
    if device == "gpu":
        import torch  # noqa: PLC0415
        count = torch.cuda.device_count()
        near = (lambda r: gpu_local_cpus(r % count)) if count else None
    mine = share(allowed, local_rank, local_world, near)
    if len(mine) < len(allowed):
        os.sched_setaffinity(0, mine)
        os.environ["DALI_AFFINITY_MASK"] = ",".join(str(c) for c in mine)
        os.environ[RANK_CPUS_ENV] = str(len(mine))
        return mine
    return None
