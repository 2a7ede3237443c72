"""Shared fixtures: tiny ImageFolder datasets of real JPEG files written by the tests, and the device the
tests run their DALI pipelines and models on.

``FKD_TEST_DEVICE=gpu`` (or ``pytest --device gpu``) runs the loader, generation, training, show and
reliability tests on the GPU (DALI's mixed decoder and GPU ops, CUDA models); the default is ``cpu`` (DALI's
CPU backend), which is what CI runs. Tests marked ``gpu`` need CUDA whatever the setting and skip without it.
Tests marked ``slow`` (real processes started and killed, servers, whole runs) are left out of the fast tier
(``make test-fast``, ``pytest -m "not slow"``), which covers every module in a few minutes for the edit loop;
``make test`` (CI) runs everything.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

DEVICES = ("cpu", "gpu")


def pytest_addoption(parser):
    parser.addoption("--device", choices=DEVICES, default=None,
                     help="device of the DALI pipelines and models under test (default: $FKD_TEST_DEVICE or cpu)")


def test_device(config) -> str:
    device = config.getoption("--device") or os.environ.get("FKD_TEST_DEVICE", "cpu")
    if device not in DEVICES:
        raise pytest.UsageError(f"FKD_TEST_DEVICE={device!r}: use cpu or gpu")
    return device


test_device.__test__ = False  # a helper, not a test


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one, whatever FKD_TEST_DEVICE says)")
    config.addinivalue_line("markers", "slow: several seconds or more (processes started, killed, servers, whole "
                            "runs); `make test-fast` (pytest -m 'not slow') leaves these out")
    device = test_device(config)
    if device == "gpu" and not torch.cuda.is_available():
        raise pytest.UsageError("FKD_TEST_DEVICE=gpu (or --device gpu) but torch sees no CUDA device; run the tests "
                                "on the CPU (the default) or on a machine with a GPU")
    os.environ["FKD_TEST_DEVICE"] = device  # test modules (DEVICE) and the commands they start see it too
    # Multi-process tests run on one host: gloo and NCCL talk over loopback (a container's hostname may not
    # resolve to an address).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def current_device() -> str:
    """The device under test, for module-level helpers and command lines ("cpu" or "gpu")."""
    return os.environ.get("FKD_TEST_DEVICE", "cpu")


def pytest_report_header(config):
    device = test_device(config)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"fkd-dali test device: {device} ({gpu})"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The device of DALI pipelines and models under test: "cpu" (default) or "gpu"."""
    return test_device(pytestconfig)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pythonpath(*first: str) -> str:
    """PYTHONPATH for a command a test starts: ``first`` (default the repository) ahead of what this process
    has, so machines whose dependencies come from PYTHONPATH (a GPU box with DALI carried as wheels) keep them."""
    inherited = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
    return os.pathsep.join([*(first or (ROOT,)), *inherited])


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous in tests run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jpeg(path: str, array: np.ndarray, quality: int = 95) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, "JPEG", quality=quality)


def textured(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random image (upsampled noise): real JPEG content, cheap to write."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def make_image_folder(root: str, classes: int = 3, per_class: int = 4, seed: int = 0,
                      sizes: list[tuple[int, int]] | None = None, split: str = "train") -> str:
    """root/<split>/class_<c>/img_<i>.jpg with varied sizes; returns the split folder."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(48, 64), (64, 48), (40, 40), (56, 72), (33, 47)]
    k = 0
    for c in range(classes):
        for i in range(per_class):
            h, w = sizes[k % len(sizes)]
            k += 1
            write_jpeg(os.path.join(root, split, f"class_{c}", f"img_{i:03d}.jpg"), textured(rng, h, w))
    return os.path.join(root, split)


@pytest.fixture
def image_folder(tmp_path) -> str:
    """A dataset root with train/ (3 classes x 4 images) and val/ (3 x 2)."""
    root = str(tmp_path / "data")
    make_image_folder(root, classes=3, per_class=4, seed=0, split="train")
    make_image_folder(root, classes=3, per_class=2, seed=1, split="val")
    return root


def assert_same_weights(a: dict, b: dict, rerun: dict | None = None) -> None:
    """A resumed (or sharded) run's weights ``b`` against an uninterrupted run's ``a``.

    CPU kernels are deterministic: bit for bit. GPU kernels need not be (cuDNN picks algorithms that sum in
    varying order), so there the promise is "as close as two uninterrupted runs are to each other":
    ``rerun`` is a second uninterrupted run; if it equals ``a`` exactly, ``b`` must too, else every tensor of
    ``b`` may differ from ``a`` by at most 10x the rerun's largest difference."""
    assert a.keys() == b.keys()
    if current_device() == "cpu" or rerun is None:
        for k in a:
            assert torch.equal(a[k].cpu(), b[k].cpu()), k
        return
    noise = max(float((a[k].double() - rerun[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    for k in a:
        if not a[k].is_floating_point() or noise == 0.0:
            assert torch.equal(a[k].cpu(), b[k].cpu()), (k, noise)
        else:
            d = float((a[k].double() - b[k].double()).abs().max())
            assert d <= 10 * noise, (k, d, noise)
