"""Mixup / CutMix on images and their *dense soft labels* (FKD's ``--mixup_cutmix``).

One draw per batch, as FKD: with probability ``prob`` the batch is mixed with a permutation of itself;
then CutMix with probability ``switch`` (``λ ~ Beta(cutmix, cutmix)``, a box pasted, λ recomputed from
its area) or Mixup otherwise (``λ ~ Beta(mixup, mixup)``); labels are mixed linearly with λ. The random
draws come from ``(seed, step)``, so a resumed run mixes exactly as an uninterrupted one. FKD's ``np.int``
(gone in NumPy 1.24) is plain ``int`` here, and its swapped W/H only mattered for non-square crops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class MixConfig:
    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch: float = 0.5


def mix(images: torch.Tensor, soft: torch.Tensor, cfg: MixConfig, seed: int, step: int):
    """(images, soft labels, description) after one seeded Mixup/CutMix draw; inputs are not modified."""
    out, perm, lam, kind = mix_images(images, cfg, seed, step)
    if perm is None:
        return images, soft, kind
    return out, mix_labels(soft, perm, lam), f"{kind} lam={lam:.3f}"


def mix_labels(labels: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * labels + (1 - lam) * labels[perm]``, the labels of images mixed by :func:`mix_images` (a new
    tensor; ``labels`` is not modified)."""
    return labels.mul(lam).add_(labels[perm], alpha=1.0 - lam)


def mix_images(images: torch.Tensor, cfg: MixConfig, seed: int, step: int):
    """The image half of :func:`mix`: (images, perm, lam, kind); ``perm`` is None (and lam 1.0) when the draw
    leaves the batch unmixed. The labels of the result are ``lam * labels + (1 - lam) * labels[perm]`` (MEAL V2
    weights its two losses by ``lam`` and ``1 - lam`` instead)."""
    rng = np.random.default_rng([int(seed), int(step), 0x6D6978])
    if rng.random() >= cfg.prob or (cfg.mixup <= 0 and cfg.cutmix <= 0):
        return images, None, 1.0, "none"
    B = images.shape[0]
    perm = torch.from_numpy(rng.permutation(B)).to(images.device)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < cfg.switch)
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix, cfg.cutmix))
        H, W = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
        x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
        out = images.clone()
        out[..., y1:y2, x1:x2] = images[perm][..., y1:y2, x1:x2]
        return out, perm, 1.0 - (y2 - y1) * (x2 - x1) / float(H * W), "cutmix"
    lam = float(rng.beta(cfg.mixup, cfg.mixup))
    return images.mul(lam).add_(images[perm], alpha=1.0 - lam), perm, lam, "mixup"
