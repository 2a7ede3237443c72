"""What an objective is: how a student learns from a batch. The training loop (``fkd_dali.loop``) calls these
methods and nothing else about the way a student learns; each objective is one module beside this one.

An objective says

* **what it asks of the loader**: its epoch plan (:meth:`segments`), the loader of a segment (:meth:`loader`),
  and any reading it starts early, while the dataset is scanned (:meth:`start`);
* **what the student is**: the classes its head has (:meth:`num_classes`), where they come from (for messages),
  and any change to the model built by name (:meth:`student`: a self-supervised student's projection head);
* **how a batch becomes targets and a loss**: :meth:`targets` (no gradient: stored labels recovered, a teacher
  run, one-hot labels) and :meth:`loss` (given the student's output and the batch's mixing, if any);
* **what it owns**: networks and optimisers besides the student's (:meth:`setup`, :meth:`zero_grad`,
  :meth:`step`), what they add to a checkpoint (:meth:`state_dict`, :meth:`load_state_dict`) and to the log
  (:attr:`metrics`, :meth:`describe`);
* **what its numbers mean**: whether a training top-1 against the images' classes means anything
  (:attr:`reports_top1`), and what validation measures (:meth:`validate`: by default top-1/top-5 on DATA/val;
  :attr:`best_key` picks the best checkpoint).

The loop owns the student, its optimiser, EMA, learning-rate schedule, Mixup/CutMix of the images, DDP, the
segment bookkeeping, validation, checkpoints and the log.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from ..mixing import mix_labels
from ..schedule import Segment, plain_segments
from ..soft_labels import soft_cross_entropy


class Run(Protocol):
    """What an objective may use of the run it is part of (``fkd_dali.trainer.Trainer``, which sits above the
    objectives and is never imported by them)."""

    cfg: Any  # the resolved TrainConfig
    torch_device: torch.device
    amp: bool  # bf16 autocast
    channels_last: bool
    main: bool  # rank 0
    dist: Any  # rank, world_size, group (fkd_dali.distributed)
    segments: list[Segment]
    train_set: Any  # the scanned training split (fkd_dali.dataset.Dataset): root, files, targets, classes
    num_classes: int  # the student's (known from setup on)

    def images_per_rank(self, crops: int) -> int: ...

    def loader_options(self) -> dict[str, Any]: ...

    def distributed(self, module: torch.nn.Module) -> torch.nn.Module: ...


@dataclasses.dataclass(frozen=True)
class Mix:
    """How the loop mixed a batch's images (Mixup/CutMix): image ``i`` is ``lam`` of itself and ``1 - lam`` of
    image ``perm[i]``."""

    perm: torch.Tensor
    lam: float


@dataclasses.dataclass
class Loss:
    """A step's losses: ``value`` is what the log calls the loss; ``total`` what is minimised (``value`` plus any
    loss of the objective's own networks); ``metrics`` more per-step values, named as in :attr:`Objective.metrics`."""

    value: torch.Tensor
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.total is None:
            self.total = self.value


class Objective:
    """The default behaviour of every method: single-crop epochs of random-resized crops from the dataset, the
    dataset's classes, no networks of its own, nothing added to checkpoints or the log."""

    #: per-step values besides the loss, averaged over a segment and logged as ``train_<name>``
    metrics: tuple[str, ...] = ()
    #: options of its own (TrainConfig fields) that a resume must agree on, besides train_config.PLAN_KEYS
    plan_keys: tuple[str, ...] = ()
    #: whether the student's output is class scores, so that a training top-1 is logged (``train_top1``)
    reports_top1: bool = True
    #: the validation value (a key of :meth:`validate`'s result) whose maximum is the best checkpoint
    best_key: str = "val_top1"

    def __init__(self, cfg):
        self.cfg = cfg

    # ---------------------------------------------------------------- what it asks of the loader
    def segments(self) -> list[Segment]:
        """The run's plan: one single-crop segment per epoch."""
        return plain_segments(self.cfg.epochs)

    def start(self, run: Run) -> None:
        """Work begun while the dataset is scanned and the student built (nothing is served before
        :meth:`num_classes` checked the dataset)."""

    def loader(self, run: Run, crops: int):
        """The loader of segments with ``crops`` crops per image: random-resized crops of the dataset, flipped,
        with the images' classes (DALI's standard ImageNet training input)."""
        from pipelines import StandardLoader  # noqa: PLC0415 - DALI: imported once a loader is made
        ds, cfg = run.train_set, self.cfg
        return StandardLoader(ds.root, ds.files, ds.targets, scale=cfg.scale, batch_size=run.images_per_rank(1),
                              **run.loader_options())

    # ---------------------------------------------------------------- the student
    def num_classes(self, run: Run) -> int | None:
        """The student's classes when this objective decides them (None: ``--num-classes`` or the dataset's)."""
        return None

    def classes_source(self) -> str:
        """Where the student's classes come from, for messages."""
        return "the dataset's classes"

    def student(self, run: Run, model: torch.nn.Module) -> torch.nn.Module:
        """The student to train, given the model ``--arch`` built with :meth:`num_classes` outputs (before it
        moves to its device, its optimizer is made or a checkpoint is loaded into it): that model itself."""
        return model

    def setup(self, run: Run) -> None:
        """Build the objective's own networks, once the student is on its device (``run.num_classes`` known)."""

    # ---------------------------------------------------------------- a step
    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """What the student is asked to match for each crop (called without gradients, before mixing)."""
        raise NotImplementedError

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Clear the gradients of the objective's own networks (before the step's backward pass)."""

    def step(self) -> None:
        """Step the objective's own optimisers (after the student's)."""

    def top1(self, logits: torch.Tensor, batch_targets: torch.Tensor) -> torch.Tensor:
        """The step's training top-1 against the images' classes (asked only when :attr:`reports_top1`)."""
        return (logits.detach().argmax(1) == batch_targets).float().mean()

    # ---------------------------------------------------------------- validation
    def validate(self, run) -> dict[str, float] | None:
        """Log fields measuring the student after a segment (None: nothing to measure): top-1/top-5 of the
        student (and its EMA) on DATA/val, classified by its head."""
        from ..evaluate import evaluate  # noqa: PLC0415 - DALI's loaders, imported once a run validates
        out = {f"val_{k}": v for k, v in evaluate(run.ddp, run.eval_loader(), amp=run.amp,
                                                   group=run.dist.group).items()}
        if run.ema is not None:
            out.update({f"val_ema_{k}": v for k, v in evaluate(run.ema.module, run.eval_loader(), amp=run.amp,
                                                               group=run.dist.group).items()})
        run.loaders["val"].release()  # used once per segment: its pipeline is not kept during training
        return out

    # ---------------------------------------------------------------- checkpoints and log
    def state_dict(self) -> dict[str, Any]:
        """Entries added to the checkpoint (top-level keys)."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        """Restore from a checkpoint (:meth:`state_dict`'s entries); refuse, naming ``path``, one that does not
        fit."""

    def describe(self, record: dict[str, Any]) -> str:
        """Text after the loss in a segment's printed line (from its log record)."""
        return ""

    def close(self) -> None:
        """Release what :meth:`start` began."""


class DenseLabels(Objective):
    """Objectives whose targets are a probability distribution over the classes for each crop: Mixup/CutMix mix
    them like the images, and the loss is the soft cross-entropy of ``student / T`` (FKD's, no T^2)."""

    #: the temperature on the student's logits
    temperature: float = 1.0

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        return Loss(soft_cross_entropy(logits, mixed(targets, mix), self.temperature))


def mixed(targets: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """``lam * targets + (1 - lam) * targets[perm]`` (the targets themselves when the batch was not mixed)."""
    if mix is None:
        return targets
    with torch.no_grad():
        return mix_labels(targets, mix.perm, mix.lam)
