"""The photometric half of a self-supervised view as DALI graph functions (pure functions of DataNodes): colour
jitter in a per-sample order, grayscale and Gaussian blur, with the formulas Pillow applies under torchvision's
``ColorJitter`` / ``RandomGrayscale`` on PIL images (what MoCo v2 trains on), written with DALI's arithmetic.

Every op takes and gives HWC images holding whole numbers 0..255 as float32 and rounds as Pillow does:

* brightness, contrast, saturation are Pillow's ``ImageEnhance``: ``Image.blend(degenerate, x, f)`` =
  ``trunc(d + f * (x - d))`` clipped to 0..255, with ``d`` = 0 (brightness), the rounded mean of the image's
  grey (contrast), each pixel's grey (saturation);
* grey is Pillow's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``, exact in float32;
* hue is torchvision's ``adjust_hue`` on PIL: Pillow's 8-bit HSV (``rgb2hsv`` / ``hsv2rgb`` of Convert.c), the
  hue byte shifted by ``uint8(hue * 255)`` (wrapping);
* blur is DALI's ``gaussian_blur`` (a true Gaussian, window ``2 * ceil(3 sigma) + 1``, reflect-101 borders);
  MoCo's PIL ``GaussianBlur(radius=sigma)`` approximates a Gaussian with three box blurs, so blur differs from
  MoCo's pixels by a few grey levels (``docs/ssl.md`` has the measured differences per op).

The jitter order varies per crop: each of the four slots runs the op the stored order names, chosen per sample
with DALI conditionals (``if`` on a per-sample DataNode: the batch is split, each part runs its own op, and merged),
so each crop runs each op once. (Selecting arithmetically instead, every slot computing every op and masking,
was 4x the work: DALI's CPU arithmetic is one operator per operation, ~1 ms per 224-px crop each; docs/ssl.md.)
The identity parameters (1, 1, 1, 0) give back the input bit for bit; a hue factor of exactly 0 skips Pillow's
lossy HSV round trip, which torchvision would still make (a drawn factor is 0 with probability 0).
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _f(x: DataNode) -> DataNode:
    return fn.cast(x, dtype=types.FLOAT)


def _clip8(x: DataNode) -> DataNode:
    return dmath.clamp(x, 0.0, 255.0)


def grey(x: DataNode) -> DataNode:
    """Pillow's ``convert("L")`` of float HWC RGB (whole numbers): HW1, whole numbers."""
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    return dmath.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _blend(d: DataNode, x: DataNode, f: DataNode) -> DataNode:
    """Pillow's ``Image.blend(d, x, f)``: ``trunc(d + f (x - d))`` clipped to 0..255."""
    return _clip8(dmath.floor(_clip8(d + f * (x - d))))


def _select(masks_values: list[tuple[DataNode, DataNode]]) -> DataNode:
    out = None
    for m, v in masks_values:
        term = m * v
        out = term if out is None else out + term
    return out


def hue(x: DataNode, shift: DataNode) -> DataNode:
    """torchvision ``adjust_hue(pil_image, hue)``: Pillow's 8-bit HSV, hue byte + ``uint8(hue * 255)`` (mod 256)."""
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc = dmath.max(r, dmath.max(g, b))
    minc = dmath.min(r, dmath.min(g, b))
    grey_px = _f(maxc == minc)
    cr = dmath.max(maxc - minc, 1.0)
    s = (maxc - minc) / dmath.max(maxc, 1.0)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    is_r = _f(r == maxc)
    is_g = _f(g == maxc) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h = _select([(is_r, bc - gc), (is_g, 2.0 + rc - bc), (is_b, 4.0 + gc - rc)])
    t = h / 6.0 + 1.0
    h = t - dmath.floor(t)  # fmod(h / 6 + 1, 1)
    uh = (1.0 - grey_px) * _clip8(dmath.floor(h * 255.0))
    us = (1.0 - grey_px) * _clip8(dmath.floor(s * 255.0))
    # numpy's uint8 cast of hue * 255 truncates towards zero and wraps: -12.7 -> 244
    k = hue_byte(shift)
    uh = uh + k
    uh = uh - 256.0 * dmath.floor(uh / 256.0)
    # hsv2rgb
    h6 = uh * 6.0 / 255.0
    i = dmath.floor(h6)
    frac = h6 - i
    fs = us / 255.0
    v = maxc
    p = _clip8(dmath.floor(v * (1.0 - fs) + 0.5))
    q = _clip8(dmath.floor(v * (1.0 - fs * frac) + 0.5))
    tt = _clip8(dmath.floor(v * (1.0 - fs * (1.0 - frac)) + 0.5))
    i = i - 6.0 * dmath.floor(i / 6.0)
    sel = [_f(i == float(j)) for j in range(6)]
    rows = ((v, tt, p), (q, v, p), (p, v, tt), (p, q, v), (tt, p, v), (v, p, q))
    flat = _f(us == 0.0)
    out = []
    for c in range(3):
        val = _select([(sel[j], rows[j][c]) for j in range(6)])
        out.append(flat * v + (1.0 - flat) * val)
    return fn.cat(*out, axis=2)


def hue_byte(shift: DataNode) -> DataNode:
    """``np.array(hue * 255).astype(np.uint8)`` as a float: truncation towards zero, wrapped to 0..255."""
    t = shift * 255.0
    k = dmath.floor(dmath.abs(t)) * (_f(t >= 0.0) * 2.0 - 1.0)
    return k - 256.0 * dmath.floor(k / 256.0)


def brightness(x: DataNode, f: DataNode) -> DataNode:
    return _clip8(dmath.floor(_clip8(x * f)))


def contrast(x: DataNode, f: DataNode) -> DataNode:
    mean = dmath.floor(fn.reductions.mean(grey(x)) + 0.5)  # Pillow's ImageStat mean of the grey, rounded
    return _blend(mean, x, f)


def saturation(x: DataNode, f: DataNode) -> DataNode:
    return _blend(grey(x), x, f)


def photometric(frame: DataNode, factors: DataNode, order: DataNode, grayscale: DataNode, sigma: DataNode,
                device: str) -> DataNode:
    """A view's photometric ops on one HWC uint8 crop: jitter slots in ``order`` (4,) with ``factors`` (4,),
    grayscale (0/1), Gaussian blur ``sigma`` (0: none); per-sample CPU DataNodes. Returns HWC uint8. Needs a
    pipeline with ``enable_conditionals=True``: each sample runs only its own ops."""
    x = _f(frame)
    f = factors.gpu() if device == "gpu" else factors
    for slot in range(4):
        op = order[slot]
        if op == BRIGHTNESS:
            x = brightness(x, f[BRIGHTNESS])
        elif op == CONTRAST:
            x = contrast(x, f[CONTRAST])
        elif op == SATURATION:
            x = saturation(x, f[SATURATION])
        elif factors[HUE] != 0.0:  # hue 0 is no hue op: the identity (1, 1, 1, 0) gives the input back
            x = hue(x, f[HUE])
    if grayscale:
        x = fn.cat(*([grey(x)] * 3), axis=2)
    x = fn.cast(x, dtype=types.UINT8)
    if sigma > 0.0:
        x = fn.gaussian_blur(x, device=device, sigma=sigma)
    return x
