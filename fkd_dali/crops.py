"""RandomResizedCrop boxes and flips, drawn exactly like torchvision, vectorised in numpy.

``torchvision.transforms.RandomResizedCrop.get_params`` draws, up to 10 times, an area fraction
``s ~ U(scale)`` and a log aspect ``log r ~ U(log ratio)``, sets ``w = round(sqrt(s*A*r))``,
``h = round(sqrt(s*A/r))`` and accepts the first attempt with ``0 < w <= W and 0 < h <= H``, placing
it uniformly (``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``); if all 10 fail it takes the central crop of
the image clipped to the ratio range. FKD then flips the crop with p = 0.5.

Every image (store row) has its own generator seeded by ``(seed, row)``, so a row's crops do not depend
on which process or block generates it. Boxes are exact integer pixels ``(top, left, height, width)`` of
the decoded image; FKD's normalised ``(i/H, j/W, h/H, w/W)`` form is derived by :func:`normalized`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ATTEMPTS = 10
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def row_rng(seed: int, row: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(row)])


def get_params(heights: np.ndarray, widths: np.ndarray, u_area: np.ndarray, u_logr: np.ndarray,
               u_top: np.ndarray, u_left: np.ndarray, scale: Sequence[float] = DEFAULT_SCALE,
               ratio: Sequence[float] = DEFAULT_RATIO) -> np.ndarray:
    """Vectorised ``get_params`` from uniform draws.

    heights, widths: (M,) image sizes; u_area, u_logr: (M, ATTEMPTS) uniforms in [0, 1);
    u_top, u_left: (M,) uniforms in [0, 1). Returns (M, 4) int64 boxes (top, left, height, width).
    """
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    area = (H * W).astype(np.float64)[:, None]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u_logr)
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.argmax(axis=1)
    found = ok[np.arange(len(H)), first]
    w = w[np.arange(len(H)), first]
    h = h[np.arange(len(H)), first]

    # Central-crop fallback, exactly as torchvision.
    in_ratio = W / H
    fw = np.where(in_ratio < min(ratio), W,
                  np.where(in_ratio > max(ratio), np.round(H * max(ratio)).astype(np.int64), W))
    fh = np.where(in_ratio < min(ratio), np.round(W / min(ratio)).astype(np.int64), H)
    fh = np.where(in_ratio > max(ratio), H, fh)
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    top = np.where(found, np.floor(u_top * (H - h + 1)).astype(np.int64), (H - h) // 2)
    left = np.where(found, np.floor(u_left * (W - w + 1)).astype(np.int64), (W - w) // 2)
    return np.stack([top, left, h, w], axis=-1)


def sample_crops(seed: int, rows: Sequence[int], sizes: np.ndarray, num_crops: int,
                 scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
                 flip_p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (len(rows), C, 4) int64 and flips (len(rows), C) bool for images of the given sizes.

    sizes: (len(rows), 2) of (height, width). Row ``rows[i]``'s crops depend only on (seed, rows[i],
    sizes[i]).
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if len(rows) != len(sizes):
        raise ValueError(f"{len(rows)} rows but {len(sizes)} sizes")
    if (sizes < 1).any():
        raise ValueError("image sizes must be >= 1 pixel")
    if not (0 < scale[0] <= scale[1] <= 1.0 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"invalid scale {tuple(scale)} or ratio {tuple(ratio)}: need 0 < min <= max "
                         "(scale <= 1)")
    m, C = len(rows), num_crops
    draws = np.empty((m, C, 2 * ATTEMPTS + 3))
    for i, row in enumerate(rows):
        draws[i] = row_rng(seed, row).random((C, 2 * ATTEMPTS + 3))
    d = draws.reshape(m * C, -1)
    boxes = get_params(np.repeat(sizes[:, 0], C), np.repeat(sizes[:, 1], C),
                       d[:, :ATTEMPTS], d[:, ATTEMPTS:2 * ATTEMPTS], d[:, -3], d[:, -2], scale, ratio)
    flips = d[:, -1] < flip_p
    return boxes.reshape(m, C, 4), flips.reshape(m, C)


def normalized(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """FKD's coordinates ``(i/H, j/W, h/H, w/W)`` (float32) of pixel boxes (..., C, 4)."""
    s = np.asarray(sizes, dtype=np.float64)
    H, W = s[..., 0, None], s[..., 1, None]
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([b[..., 0] / H, b[..., 1] / W, b[..., 2] / H, b[..., 3] / W], axis=-1).astype(np.float32)


def from_normalized(coords: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, float]:
    """Pixel boxes of FKD's normalised coords, as FKD's own replay crops them, and the largest rounding.

    FKD replays ``resized_crop(img, c0*H, c1*W, c2*H, c3*W)`` on a PIL image, which crops
    ``(round(j), round(i), round(j + w), round(i + h))``; the same arithmetic here gives the box FKD
    actually trained on. The second value is the largest distance of any such coordinate from an
    integer, in pixels: ~0 for float32 files, up to ~0.25 px for float16 ones on 500-px images.
    """
    c = np.asarray(coords).astype(np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    H, W = s[..., 0, None], s[..., 1, None]
    i, j, h, w = c[..., 0] * H, c[..., 1] * W, c[..., 2] * H, c[..., 3] * W
    raw = np.stack([i, j, i + h, j + w], axis=-1)
    r = np.round(raw)
    top, left, bottom, right = (r[..., k].astype(np.int64) for k in range(4))
    max_rounding = float(np.abs(raw - r).max()) if raw.size else 0.0
    return np.stack([top, left, bottom - top, right - left], axis=-1), max_rounding
