"""Fast MEAL V2 (``--use-discriminator-loss``, on in ``--recipe meal-v2``): FKD's stored soft labels (a teacher
ensemble's, ``generate -a a,b``) plus MEAL V2's discriminator on the student's softmax against those labels.

The discriminator and its loss are :mod:`fkd_dali.meal`'s. Student and discriminator minimise the sum of the
similarity loss and the discriminator loss together, each with its own optimizer (the discriminator: SGD at its
own constant ``--d-lr``, the student's momentum, no weight decay); under DDP the discriminator's gradients are
averaged over the ranks like the student's. With CutMix the discriminator loss weighs the two images' label sets
by ``lam`` and ``1 - lam``, as MEAL V2's ``--w-cutmix``."""

from __future__ import annotations

from typing import Any

import torch

from .. import meal
from ..soft_labels import soft_cross_entropy
from ..train_config import MEAL_NEEDS_STORE, TrainError
from .base import Loss, Mix, Run, mixed
from .fkd import StoredSoftLabels


class MealV2(StoredSoftLabels):
    metrics = ("d_loss",)

    def __init__(self, cfg):
        if cfg.labels != "fkd":
            raise TrainError(MEAL_NEEDS_STORE)
        super().__init__(cfg)
        self.disc = self.wrapped = self.optimizer = None
        self.d_loss = None  # the discriminator loss of the last step

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.disc = meal.Discriminator(run.num_classes).to(run.torch_device)
        self.wrapped = run.distributed(self.disc)
        self.optimizer = torch.optim.SGD(self.disc.parameters(), lr=self.cfg.d_lr, momentum=self.cfg.momentum)

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        label_sets, weights = ([targets], [1.0]) if mix is None else \
            ([targets, targets[mix.perm]], [mix.lam, 1.0 - mix.lam])
        value = soft_cross_entropy(logits, mixed(targets, mix), self.temperature)
        self.d_loss = meal.discriminator_loss(self.wrapped, meal.student_probs(logits), label_sets, weights)
        return Loss(value, value + self.d_loss, {"d_loss": self.d_loss.detach()})

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "discriminator": self.disc.state_dict(),
                "d_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        super().load_state_dict(ckpt, path)
        if ckpt.get("discriminator") is None or ckpt.get("d_optimizer") is None:
            raise TrainError(f"{path} holds no discriminator: it was trained without --use-discriminator-loss; "
                             "resume it without that option")
        self.disc.load_state_dict(ckpt["discriminator"])
        self.optimizer.load_state_dict(ckpt["d_optimizer"])

    def describe(self, record: dict[str, Any]) -> str:
        return f" (discriminator {record['train_d_loss']:.4f})"
