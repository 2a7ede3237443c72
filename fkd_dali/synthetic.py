"""Synthetic ImageFolder datasets of real JPEG files, deterministic from a seed.

``photo`` flavour: images with natural-image statistics (1/f amplitude spectrum, correlated colour
channels, hard-edged shapes with gradients, fine texture), ImageNet-like sizes (mostly 500 px on the long
side, 4:3 / 3:4 / 1:1 / 3:2) and JPEG quality 90 with 4:2:0 chroma, so decoding costs what decoding
ImageNet costs (``write_dataset`` reports mean bytes and pixels per image). Flat synthetic colours would
decode several times faster and flatter every loader benchmark.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2), (2, 3))


def imagenet_like_size(rng: np.random.Generator, size: int = 0) -> tuple[int, int]:
    """(height, width): long side 500 px (80%) or 250..500 px, common photo aspect ratios."""
    long_side = size or (500 if rng.random() < 0.8 else int(rng.integers(250, 501)))
    a, b = ASPECTS[int(rng.integers(len(ASPECTS)))]
    if a >= b:
        return max(8, round(long_side * b / a)), long_side
    return long_side, max(8, round(long_side * a / b))


def photo_like(rng: np.random.Generator, height: int, width: int, hue: float | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 image with photo-like statistics."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** -1.0
    base = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        x = np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width))
        base.append(x / (x.std() + 1e-8))
    mix = np.array([[1.0, 0.0, 0.0], [0.7, 0.5, 0.0], [0.5, 0.3, 0.6]])  # correlated channels
    img = np.tensordot(np.stack(base, -1), mix.T, axes=1)
    img = 128 + 38 * img
    if hue is not None:
        img += 50 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])  # the class colour cast
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 9))):  # shapes with hard edges and gradients
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.35) * height, rng.uniform(0.05, 0.35) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 if rng.random() < 0.5 else \
            (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        colour = rng.uniform(20, 235, 3)
        grad = (yy - cy)[..., None] * rng.normal(0, 0.4, 3) / max(1.0, ry) * 20
        img = np.where(inside[..., None], 0.35 * img + 0.65 * (colour + grad), img)
    img += rng.normal(0, 18, img.shape)  # sensor-like fine texture
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job: tuple) -> tuple[int, int]:
    path, seed, cls, size, quality = job
    rng = np.random.default_rng(seed)
    h, w = imagenet_like_size(rng, size)
    arr = photo_like(rng, h, w, hue=cls * 0.61)
    Image.fromarray(arr).save(path, "JPEG", quality=quality, subsampling=2)
    return os.path.getsize(path), h * w


def write_dataset(out: str, *, flavour: str = "photo", classes: int = 10, per_class: int = 50,
                  val_per_class: int = 10, size: int = 0, quality: int = 90, seed: int = 0,
                  workers: int = 0) -> dict:
    """Write ``out/train/<class>/*.JPEG`` and ``out/val/<class>/*.JPEG``; returns size statistics."""
    if flavour != "photo":
        raise ValueError(f"unknown synthetic flavour '{flavour}'")
    jobs = []
    for split, count in (("train", per_class), ("val", val_per_class)):
        if count == 0:
            continue
        for c in range(classes):
            d = os.path.join(out, split, f"class_{c:04d}")
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                s = np.random.SeedSequence([seed, c, i, 0 if split == "train" else 1]).generate_state(1)[0]
                jobs.append((os.path.join(d, f"{split}_{c:04d}_{i:05d}.JPEG"), int(s), c, size, quality))
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            stats = list(pool.map(_write_one, jobs, chunksize=8))
    else:
        stats = [_write_one(j) for j in jobs]
    nbytes = np.array([s[0] for s in stats], dtype=np.float64)
    pixels = np.array([s[1] for s in stats], dtype=np.float64)
    return {"root": out, "flavour": flavour, "images": len(jobs), "classes": classes,
            "mean_bytes": float(nbytes.mean()), "mean_pixels": float(pixels.mean()),
            "bytes_per_pixel": float(nbytes.sum() / pixels.sum()), "quality": quality}
