"""The hard-label baseline: DALI's standard random-resized crops of the dataset, flipped, and the cross-entropy
against each image's class (``--label-smoothing`` spreads that share of it evenly over the classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DenseLabels, Run


class HardLabels(DenseLabels):
    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        smoothing = self.cfg.label_smoothing
        soft = F.one_hot(batch["targets"].to(run.torch_device), run.num_classes).float()
        if smoothing:
            soft = soft * (1 - smoothing) + smoothing / run.num_classes
        return soft
