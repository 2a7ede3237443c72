"""Teacher-like soft labels for storage benchmarks when no real teacher has labelled real photos.

Per image: a few dominant classes (the object and its look-alikes) over a noisy floor of all classes;
per crop: the image's logits plus crop noise, so crops of one image agree on their top classes and
disagree on the tail, as a real teacher's do. The numbers in docs/benchmarks.md say when they come from
this simulation.
"""

from __future__ import annotations

import numpy as np

from ..crops import sample_crops
from ..synthetic import imagenet_like_size


def teacher_topk(num_images: int, num_crops: int, k: int = 5, num_classes: int = 1000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = np.empty((num_images, num_crops, k), np.int64)
    val = np.empty((num_images, num_crops, k), np.float32)
    for i in range(num_images):
        base = rng.normal(0, 1.0, num_classes).astype(np.float32)
        cls = rng.choice(num_classes, 4, replace=False)
        base[cls] += np.array([7, 5, 4, 3], np.float32) * rng.uniform(0.5, 1.2)
        logits = base[None] + rng.normal(0, 1.2, (num_crops, num_classes)).astype(np.float32)
        logits[:, cls] += rng.normal(0, 1.5, (num_crops, 4)).astype(np.float32)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.argpartition(-p, k, axis=1)[:, :k]
        pv = np.take_along_axis(p, top, 1)
        order = np.argsort(-pv, 1)
        idx[i] = np.take_along_axis(top, order, 1)
        val[i] = np.take_along_axis(pv, order, 1)
    return idx, val


def imagenet_like_crops(num_images: int, num_crops: int, seed: int = 0,
                        scale: tuple[float, float] = (0.08, 1.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sizes (N, 2), boxes (N, C, 4), flips (N, C) for ImageNet-like image sizes."""
    rng = np.random.default_rng(seed)
    sizes = np.array([imagenet_like_size(rng) for _ in range(num_images)], dtype=np.int64)
    boxes, flips = sample_crops(seed, range(num_images), sizes, num_crops, scale=scale)
    return sizes, boxes, flips


def teacher_embeddings(num_images: int, num_crops: int, dim: int = 128, seed: int = 0,
                       crop_noise: float = 1.0) -> np.ndarray:
    """(N, C, D) float32 unit vectors like a self-supervised teacher's: each image has its own direction, drawn from
    an anisotropic Gaussian (variance ~ 1 / (i + 1) along the axes of a fixed random rotation: a few directions carry
    most of the spread, as in a trained projection head); each crop adds isotropic noise of ``crop_noise`` times the
    image direction's length, so crops of one image agree (cosine ~0.7 at 1.0) and differ in detail."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spread = 1.0 / np.sqrt(np.arange(1, dim + 1))
    base = (rng.standard_normal((num_images, dim)) * spread) @ rotation.T
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = base[:, None] + rng.standard_normal((num_images, num_crops, dim)) * (crop_noise / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
