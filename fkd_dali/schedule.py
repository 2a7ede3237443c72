"""FKD's epoch plan and the learning-rate schedule, as pure functions (so a resumed run recomputes them).

FKD trains in *segments*: a multi-crop pass over the images with ``n`` crops per image counts as ``n``
epochs (the same number of optimizer steps as ``n`` ordinary epochs at ``-b`` crops per step); warm-up
epochs (ViT recipe) and the last ``n`` epochs run single-crop, one epoch per segment. Exactly:

* epochs ``[0, warmup)``: single-crop;
* then passes starting at ``e`` while ``e < epochs - n``, each covering ``[e, e + n)``;
* then single-crop epochs from there to ``epochs``.

The learning rate is set every step from the fractional epoch ``t`` (FKD set it once per pass): linear
warm-up from ``warmup_lr`` over ``warmup_epochs``, then cosine to ``min_lr`` over ``t / epochs`` (timm's
convention, FKD's ViT recipe), linear decay ``lr * (1 - t / epochs)`` (``--sched linear``, S2-BNN's) or, without
``--cos``, ``x0.1`` at each milestone (FKD's ``--schedule``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int
    start_epoch: int
    crops: int  # crops per image in this segment = epochs it covers

    @property
    def end_epoch(self) -> int:
        return self.start_epoch + self.crops


def fkd_segments(epochs: int, num_crops: int, warmup_epochs: int = 0) -> list[Segment]:
    if epochs < 1 or num_crops < 1:
        raise ValueError("epochs and num_crops must be >= 1")
    plan, e = [], 0
    while e < min(warmup_epochs, epochs):
        plan.append((e, 1))
        e += 1
    while num_crops > 1 and e < epochs - num_crops:
        plan.append((e, num_crops))
        e += num_crops
    while e < epochs:
        plan.append((e, 1))
        e += 1
    return [Segment(i, s, c) for i, (s, c) in enumerate(plan)]


def pass_index(segments: list[Segment], seg: Segment) -> int:
    """The loader's pass number of a segment: its count among the earlier segments with as many crops (a
    loader's pass p picks round p of the crop pool's seeded order, so rounds never repeat early)."""
    return sum(1 for s in segments[:seg.index] if s.crops == seg.crops)


def plain_segments(epochs: int) -> list[Segment]:
    """One single-crop segment per epoch (the hard-label and online-KD baselines)."""
    return [Segment(e, e, 1) for e in range(epochs)]


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    lr: float
    epochs: int
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    cosine: bool = True
    milestones: Sequence[int] = (120, 240)
    linear: bool = False  # lr * (1 - t / epochs): S2-BNN's (and MoCo's) adjust_learning_rate, here per step

    def __call__(self, t: float) -> float:
        """Learning rate at fractional epoch ``t``."""
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup_epochs
        if self.linear:
            return self.lr * max(0.0, 1 - t / self.epochs)
        if self.cosine:
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, t / self.epochs)))
        return self.lr * 0.1 ** sum(1 for m in self.milestones if t >= m)
