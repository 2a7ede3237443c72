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

The jitter order varies per crop. Each of the four slots applies one op chosen by the stored order; rather than
branching (DALI conditionals split and merge the batch at every slot of every crop), a slot computes the blend
ops as one formula whose degenerate image and factor are selected arithmetically and applies hue only through
an exact 0/1 mask; the identity parameters (1, 1, 1, 0) give back the input bit for bit. (A hue factor of exactly
0 skips Pillow's lossy HSV round trip, which torchvision would still make; a drawn factor is 0 with probability 0.)
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


def jitter_slot(x: DataNode, op: DataNode, factors: DataNode) -> DataNode:
    """One slot of ColorJitter: op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue; a per-sample scalar)
    with its factor from ``factors`` (4,)."""
    is_b, is_c, is_s, is_h = (_f(op == j) for j in range(4))
    apply_h = is_h * _f(factors[HUE] != 0.0)  # hue 0 is no hue op: the identity (1, 1, 1, 0) gives the input back
    g = grey(x)
    mean = dmath.floor(fn.reductions.mean(g) + 0.5)  # ImageStat mean of the grey, rounded (Pillow's Contrast)
    d = is_c * mean + is_s * g  # brightness blends with black
    f = _select([(is_b, factors[BRIGHTNESS]), (is_c, factors[CONTRAST]), (is_s, factors[SATURATION])]) + is_h
    blended = _blend(d, x, f)  # a hue slot blends with factor 1: the input, exactly
    return apply_h * hue(x, factors[HUE]) + (1.0 - apply_h) * blended


def photometric(frame: DataNode, factors: DataNode, order: DataNode, grayscale: DataNode, sigma: DataNode,
                device: str) -> DataNode:
    """A view's photometric ops on one HWC uint8 crop: jitter slots in ``order`` (4,) with ``factors`` (4,),
    grayscale (0/1), Gaussian blur ``sigma`` (0: none); per-sample CPU DataNodes. Returns HWC uint8."""
    sigma_arg = dmath.max(sigma, 0.1)  # the operator's argument stays on the CPU; 0 is masked below
    if device == "gpu":
        factors, order, grayscale, sigma = (a.gpu() for a in (factors, order, grayscale, sigma))
    x = _f(frame)
    for slot in range(4):
        x = jitter_slot(x, order[slot], factors)
    gsel = _f(grayscale)
    x = fn.cast(gsel * grey(x) + (1.0 - gsel) * x, dtype=types.UINT8)
    blurred = fn.gaussian_blur(x, device=device, sigma=sigma_arg)
    on = _f(sigma > 0.0)
    return fn.cast(on * _f(blurred) + (1.0 - on) * _f(x), dtype=types.UINT8)
