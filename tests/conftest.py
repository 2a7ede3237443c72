"""Shared fixtures: tiny ImageFolder datasets of real JPEG files written by the tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


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
