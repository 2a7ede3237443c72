"""Which NVIDIA DALI build is installed, and one message that fixes a missing, doubled or mismatched one.

DALI ships one wheel per CUDA major version (``nvidia-dali-cuda120``, ``nvidia-dali-cuda130``); all of them
install into the same ``nvidia/dali`` folder, so two of them in one environment overwrite each other's files
and fail in ways that name neither. fkd-dali therefore depends on no DALI build by itself: the extras
``fkd-dali[cuda12]`` / ``fkd-dali[cuda13]`` pick one (``make`` picks CUDA 12, as the CI does), and a machine
that already has a DALI (a CUDA 13 box, a container, wheels carried by hand) keeps the one it has.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re

FIX = ("Install the DALI build for this machine's CUDA driver: pip install 'fkd-dali[cuda12]' (any driver for "
       "CUDA 12 or newer; what `make test` installs) or pip install 'fkd-dali[cuda13]' (a CUDA 13 driver)")


class DaliInstallError(ImportError):
    """DALI is missing, installed twice, or built for a newer CUDA than the driver; the message says the fix."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_builds() -> dict[str, str]:
    """{distribution name: version} of every installed DALI wheel (``nvidia-dali-cuda120``, ...)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = _norm(dist.metadata.get("Name") or "")
        if name.startswith("nvidia-dali-") and "cuda" in name:
            found[name] = dist.version
    return found


def cuda_major(build: str) -> int | None:
    """12 for ``nvidia-dali-cuda120``, 13 for ``nvidia-dali-cuda130``."""
    m = re.search(r"cuda(\d+?)0$", build)
    return int(m.group(1)) if m else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports, e.g. (13, 0); None without a driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return v.value // 1000, (v.value % 1000) // 10


def check_builds(builds: dict[str, str]) -> None:
    """Refuse two DALI builds in one environment."""
    if len(builds) > 1:
        names = ", ".join(f"{n}=={v}" for n, v in sorted(builds.items()))
        keep = max(builds, key=lambda n: cuda_major(n) or 0)
        drop = " ".join(n for n in sorted(builds) if n != keep)
        raise DaliInstallError(
            f"{len(builds)} DALI builds are installed ({names}); they share one nvidia/dali folder and break each "
            f"other. Keep the one for this machine's CUDA driver, e.g.: pip uninstall -y {drop} && "
            f"pip install --force-reinstall --no-deps {keep}=={builds[keep]}")


def import_dali():
    """``nvidia.dali``, or a DaliInstallError that names the command that fixes the installation."""
    check_builds(installed_builds())
    try:
        import nvidia.dali as dali  # noqa: PLC0415 - the import being checked
    except ImportError as e:
        raise DaliInstallError(f"NVIDIA DALI cannot be imported ({e}). {FIX}") from e
    return dali


def check_driver(builds: dict[str, str], driver: tuple[int, int] | None) -> None:
    """Refuse a DALI build that needs a newer CUDA than the driver offers (a CUDA 12 build runs on CUDA 12 and
    13 drivers; a CUDA 13 build needs a CUDA 13 driver)."""
    for name, version in builds.items():
        need = cuda_major(name)
        if need and driver and driver[0] < need:
            raise DaliInstallError(
                f"{name}=={version} needs a CUDA {need} driver, but this machine's driver supports CUDA "
                f"{driver[0]}.{driver[1]}. Replace it: pip uninstall -y {name} && pip install "
                f"nvidia-dali-cuda{driver[0]}0=={version} (or pip install 'fkd-dali[cuda{driver[0]}]')")


def check_gpu_build() -> None:
    """Before the first GPU pipeline: one DALI build, made for a CUDA the driver offers."""
    builds = installed_builds()
    check_builds(builds)
    check_driver(builds, driver_cuda_version())


def describe() -> dict:
    """What ``doctor`` and the benchmarks print: the DALI build and the driver's CUDA."""
    builds = installed_builds()
    driver = driver_cuda_version()
    try:
        import nvidia.dali as dali  # noqa: PLC0415
        version = dali.__version__
    except ImportError:
        version = None
    return {"dali": version, "dali_builds": builds,
            "driver_cuda": f"{driver[0]}.{driver[1]}" if driver else None}
