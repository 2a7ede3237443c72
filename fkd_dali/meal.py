"""Fast MEAL V2 (Shen & Savvides, arXiv 2009.08453; its ``FKD_train.py``): the discriminator, its loss, the
recipe's defaults.

What MEAL V2's ``FKD_train.py`` does with FKD's stored crops, and how it maps here:

* **labels**: the teacher ensemble's averaged probabilities, stored per crop (``fkd-dali generate -a a,b``),
  recovered with FKD's ``Recover_soft_label`` (``--soft-label-type``; MEAL V2's copy is FKD's). No hard label
  enters the loss.
* **similarity loss**: ``KLLoss`` = ``-sum(soft * log_softmax(student))``, averaged over the batch: FKD's soft
  cross-entropy at temperature 1 (equal to the KL divergence up to the labels' entropy, a constant).
* **discriminator** (``--use-discriminator-loss``): :class:`Discriminator`, three 1x1 convolutions on the
  class-probability vector; it sees the student's ``softmax(logits)`` labelled ``[1, 0]`` and the stored soft
  labels labelled ``[0, 1]`` in one batch, loss ``BCEWithLogits`` (:func:`discriminator_loss`). MEAL V2 adds
  it to the similarity loss and minimises the sum jointly: the discriminator learns to tell the student from
  the ensemble and the student gets the gradient of the same loss through its softmax — the author calls it
  a regulariser that keeps the student from copying the ensemble exactly (szq0214/MEAL-V2#2, #6), not a GAN
  min-max. Here the discriminator has its own SGD optimizer at its own constant learning rate ``--d-lr``
  (MEAL V2's ``--d_lr 1e-4``; MEAL V2's schedule overwrote it with the student's rate every epoch, a bug
  the author acknowledged in szq0214/MEAL-V2#9).
* **CutMix** (``--w-cutmix``): one box per batch with probability ``--cutmix-prob``, ``lam ~ Beta(beta,
  beta)`` recomputed from the box; similarity loss ``lam * L(a) + (1 - lam) * L(b)`` (= the loss on linearly
  mixed labels), discriminator loss ``lam * D(a) + (1 - lam) * D(b)`` on the two label sets.
* **recipe** (``--recipe meal-v2``): :data:`RECIPE` — SGD momentum 0.9, lr 0.01, no weight decay, 8 crops
  per image, 512 crops per step, 200 epochs, x0.1 at epochs 100 and 180 (its README command), the
  discriminator on; the student starts from trained weights (``--init-from`` / ``--pretrained-weights``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# MEAL V2's FKD command (README) and opts.py defaults, as TrainConfig fields.
RECIPE = dict(num_crops=8, batch_size=512, epochs=200, lr=0.01, momentum=0.9, weight_decay=0.0, cos=False,
              schedule=(100, 180), soft_label_type="marginal_smoothing_k5", temperature=1.0,
              use_discriminator_loss=True, d_lr=1e-4)
MEAL_CUTMIX = dict(mixup=0.0, cutmix=1.0, mixup_cutmix_prob=1.0)  # --w-cutmix: CutMix only, Beta(1, 1), always


class Discriminator(nn.Module):
    """MEAL V2's ``models/discriminator.py``: 1x1 convolutions ``C -> C/K -> C/K^2 -> 2`` on a (B, C) probability
    vector seen as a 1x1 image, ReLU after each layer (the last one too, as MEAL V2: its two outputs are
    non-negative logits). For 1,000 classes and K = 8 the widths are 125 and 15 as in MEAL V2; with few classes
    they are kept at ``min_width`` or more (MEAL V2 hard-codes 1,000)."""

    def __init__(self, num_classes: int, k: int = 8, min_width: int = 8):
        super().__init__()
        w1 = max(num_classes // k, min_width)
        w2 = max(w1 // k, min_width)
        self.conv1 = nn.Conv2d(num_classes, w1, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(w1, w2, kernel_size=1, bias=True)
        self.conv3 = nn.Conv2d(w2, 2, kernel_size=1, bias=True)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        x = probs[:, :, None, None]
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return x.flatten(1)


def discriminator_loss(disc: nn.Module, student_probs: torch.Tensor, targets: Sequence[torch.Tensor],
                       weights: Sequence[float] = (1.0,)) -> torch.Tensor:
    """``sum_i weights[i] * BCE(disc([student; targets[i]]), [[1, 0]] * B + [[0, 1]] * B)`` — MEAL V2's
    ``discriminatorLoss`` on the student's probabilities against each label set (CutMix: the two mixed sets,
    weighted ``lam`` and ``1 - lam``), with one forward pass of the discriminator over all of them (so a DDP
    wrapper sees one call per step)."""
    B = student_probs.shape[0]
    rows = torch.cat([t for target in targets for t in (student_probs, target.to(student_probs.dtype))], 0)
    logits = disc(rows).float()
    is_student = torch.tensor([[1.0, 0.0]], device=logits.device).expand(B, 2)
    label = torch.cat([is_student, is_student.flip(1)], 0).repeat(len(targets), 1)
    per_pair = F.binary_cross_entropy_with_logits(logits, label, reduction="none").view(len(targets), 2 * B * 2)
    return sum(w * per_pair[i].mean() for i, w in enumerate(weights))


def student_probs(logits: torch.Tensor) -> torch.Tensor:
    """What the discriminator sees of the student: ``softmax(logits)`` in float32 (MEAL V2's FKD_train.py; the
    stored labels are probabilities "after softmax")."""
    return torch.softmax(logits.float(), dim=1)
