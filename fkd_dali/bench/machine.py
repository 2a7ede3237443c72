"""What machine and software a benchmark ran on, recorded next to every figure."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for mod, key in (("nvidia.dali", "dali"), ("zarr", "zarr"), ("numpy", "numpy")):
        try:
            info[key] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return info


def one_line(info: dict) -> str:
    gpu = info.get("gpu") or "no GPU"
    return (f"{info['cpu']}, {info['cores']} cores, {gpu}; python {info['python']}, torch {info.get('torch')}, "
            f"DALI {info.get('dali')}, zarr {info.get('zarr')}")
