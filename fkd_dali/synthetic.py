"""Synthetic ImageFolder datasets of real JPEG files, deterministic from a seed.

``objects`` flavour (the demo's): each image holds one object of its class — a shape (disc, ring, square,
frame, triangle, X, plus, diamond, half-disc, bars) in a saturated hue near the class's own (neighbouring
classes' hues overlap, so the shape decides), random size and a small rotation — at a random place on a
grey-ish cluttered background (noise and blobs), plus up to five smaller *distractor* objects of other
classes (``distractors``). A random-resized crop often misses the object or shows only a distractor: its hard label (the
image's class) is then wrong or doubtful for that crop, while a teacher labelling the crop says what the
crop shows. That is the situation FKD's per-crop soft labels are for (ReLabel's "multi-object ImageNet"
problem).

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
MAX_SIDE = 8192  # px: a photo-like image of this side takes several GiB while it is drawn (float64 planes)


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


OBJECT_SCALE = (0.3, 0.42)      # the class object's size, as a fraction of the image side
DISTRACTOR_SCALE = (0.2, 0.3)  # distractors are smaller: the image's class is its largest object
MAX_DISTRACTORS = 5  # per image, 0..5 (docs/benchmarks.md: with 0..3 of 0.18-0.26 FKD's margin was smaller)
HUE_JITTER = 0.08  # classes' hues are 1/K apart: with 10 classes neighbours overlap, so the shape decides
SHAPES = ("disc", "ring", "square", "frame", "triangle", "x", "plus", "diamond", "half_disc", "bars")


def shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of shape ``kind`` in object coordinates (u, v in [-1, 1] across the object's box)."""
    r = np.sqrt(u * u + v * v)
    box = np.maximum(np.abs(u), np.abs(v))
    return [
        r < 0.95,
        (r > 0.55) & (r < 0.95),
        box < 0.8,
        (box > 0.5) & (box < 0.85),
        (v > -0.75) & (v < 0.85 - 1.7 * np.abs(u)),
        ((np.abs(u - v) < 0.28) | (np.abs(u + v) < 0.28)) & (box < 0.85),
        ((np.abs(u) < 0.24) | (np.abs(v) < 0.24)) & (box < 0.9),
        np.abs(u) + np.abs(v) < 0.95,
        (r < 0.95) & (v > 0.05),
        (box < 0.85) & (np.cos(v * 3.2 * np.pi) > 0.1),
    ][kind]


def class_colour(kind: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """A saturated colour near the class's own hue: the hue hints at the class, but neighbouring classes' hues
    overlap (``HUE_JITTER``), so telling them apart takes the shape — learnt far better from more images."""
    import colorsys
    h = (kind / max(1, classes) + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    return 255 * np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0)))


def objects_image(rng: np.random.Generator, size: int, cls: int, classes: int, distractors: int = MAX_DISTRACTORS,
                  distractor_scale: tuple[float, float] = DISTRACTOR_SCALE) -> np.ndarray:
    """A (size, size, 3) image: grey-ish clutter, one object of class ``cls`` (its shape in its hue), 0 to
    ``distractors`` smaller objects of other classes (side a ``distractor_scale`` fraction of the image's)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    low = np.asarray(Image.fromarray(rng.integers(60, 196, (6, 6, 3)).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC), dtype=np.float32)
    low = 0.35 * low + 0.65 * low.mean(axis=2, keepdims=True)  # desaturated: clutter never looks like a class
    img = low + rng.normal(0, 12, (size, size, 1))
    for _ in range(int(rng.integers(4, 9))):  # clutter blobs, not class shapes
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.04, 0.16, 2) * size
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        grey = rng.uniform(30, 225)
        img[m] = 0.4 * img[m] + 0.6 * (grey + rng.uniform(-15, 15, 3))

    def draw(kind: int, scale: float, margin: float) -> None:
        half = scale * size / 2
        cy, cx = rng.uniform(margin * size + half, (1 - margin) * size - half, 2)
        a = rng.uniform(-0.25, 0.25)
        u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / half
        v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / half
        m = shape_mask(kind % len(SHAPES), u, v)
        img[m] = class_colour(kind, classes, rng) + rng.normal(0, 6, (int(m.sum()), 3))

    others = [k for k in range(classes) if k != cls]
    count = min(len(others), int(rng.integers(0, distractors + 1)))
    for kind in rng.choice(others, size=count, replace=False) if others else []:
        draw(int(kind), rng.uniform(*distractor_scale), 0.02)  # distractors, anywhere
    draw(cls, rng.uniform(*OBJECT_SCALE), 0.1)  # the class object, inside the centre crop
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job: tuple) -> tuple[int, int]:
    path, seed, cls, size, quality, flavour, classes, distractors = job
    rng = np.random.default_rng(seed)
    if flavour == "objects":
        arr = objects_image(rng, size or 128, cls, classes, *distractors)
    else:
        h, w = imagenet_like_size(rng, size)
        arr = photo_like(rng, h, w, hue=cls * 0.61)
    Image.fromarray(arr).save(path, "JPEG", quality=quality, subsampling=2)
    return os.path.getsize(path), arr.shape[0] * arr.shape[1]


def class_names(flavour: str, classes: int) -> list[str]:
    if flavour == "objects":
        if classes > len(SHAPES):
            raise ValueError(f"the objects flavour has {len(SHAPES)} shapes; ask for at most {len(SHAPES)} classes")
        return [f"{i}_{SHAPES[i]}" for i in range(classes)]
    return [f"class_{c:04d}" for c in range(classes)]


def write_dataset(out: str, *, flavour: str = "photo", classes: int = 10, per_class: int = 50,
                  val_per_class: int = 10, size: int = 0, quality: int = 90, seed: int = 0,
                  workers: int = 0, distractors: int = MAX_DISTRACTORS,
                  distractor_scale: tuple[float, float] = DISTRACTOR_SCALE) -> dict:
    """Write ``out/train/<class>/*.JPEG`` and ``out/val/<class>/*.JPEG``; returns size statistics.
    ``distractors``/``distractor_scale``: the ``objects`` flavour's, see ``objects_image``."""
    if flavour not in ("photo", "objects"):
        raise ValueError(f"unknown synthetic flavour '{flavour}'; use photo or objects")
    if distractors < 0 or not 0 < distractor_scale[0] <= distractor_scale[1] <= OBJECT_SCALE[0]:
        raise ValueError(f"distractors {distractors}, scale {distractor_scale}: give 0 or more distractors, no larger "
                         f"than the class object (0 < low <= high <= {OBJECT_SCALE[0]})")
    if not 0 <= size <= MAX_SIDE:
        raise ValueError(f"--size {size}: give a side from 1 to {MAX_SIDE} px, or 0 for the flavour's default "
                         f"(larger images take several GiB of memory each while they are drawn)")
    if classes < 1 or per_class < 0 or val_per_class < 0 or classes * (per_class + val_per_class) < 1:
        raise ValueError(f"--classes {classes}, --per-class {per_class}, --val-per-class {val_per_class}: nothing "
                         "to write; give at least 1 class and 1 image per class")
    names = class_names(flavour, classes)
    jobs = []
    for split, count in (("train", per_class), ("val", val_per_class)):
        if count == 0:
            continue
        for c in range(classes):
            d = os.path.join(out, split, names[c])
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                s = np.random.SeedSequence([seed, c, i, 0 if split == "train" else 1]).generate_state(1)[0]
                jobs.append((os.path.join(d, f"{split}_{c:04d}_{i:05d}.JPEG"), int(s), c, size, quality, flavour,
                             classes, (distractors, tuple(distractor_scale))))
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
