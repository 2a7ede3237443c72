"""Dataset distillation's students: training on a relabel store (SRe2L, CDA, G-VBSM, EDC, LPLD's labels).

The loader (``pipelines.relabel.RelabelLoader``) replays each stored step in the stored order: the stored crops of
the step's images, mixed on the device by the step's stored CutMix / Mixup plan, paired with the teacher's labels
taken on those mixed pixels; no PyTorch patch, and no mixing of the loop's own (``--mixup-cutmix`` is refused). One
run epoch is one stored epoch; on a store pruned by step (LPLD) every run epoch draws its steps from the kept ones as
LPLD's trainer does (:mod:`pipelines.relabel_steps`). The batch per optimizer step (``-b``, all ranks) must divide
the stored step size (a step is then trained as consecutive pieces; a rank decodes its crops' mix partners too) or be
a multiple of it (whole steps per batch, each mixed inside its own step); otherwise the run is refused naming the
sizes that work. A rank reads its steps a few ahead (a bounded window), never a whole epoch's labels.

* ``--labels relabel``: SRe2L's KL at temperature ``--temp`` (SRe2L's trainer defaults to 3, its README uses 20;
  :func:`fkd_dali.relabel_losses.sre2l_kl`).
* ``--labels relabel-mse``: G-VBSM / EDC's ``mse_gt`` with ``--ce-weight`` (:func:`fkd_dali.relabel_losses.mse_gt`);
  EDC trains with an EMA of the student (``--ema-dr 0.99``): here ``--model-ema --model-ema-decay 0.99``, validated
  beside the student (``val_ema_top1``). Needs full logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import labelstore

from ..relabel_losses import dense_logits, mse_gt, sre2l_kl
from ..schedule import Segment, plain_segments
from ..train_config import TrainError
from .base import Loss, Mix, Objective, Run


class RelabelKL(Objective):
    """SRe2L's student: KL to the stored teacher logits of each mixed crop."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.softlabel_path:
            raise TrainError(f"--labels {cfg.labels} needs --softlabel-path STORE (a relabel store from `fkd-dali "
                             "generate --relabel` or `fkd-dali import-sre2l`)")
        if cfg.mixup_cutmix:
            raise TrainError(f"--labels {cfg.labels} replays the mixing stored with the labels (the teacher labelled "
                             "the mixed crops); drop --mixup-cutmix")
        self.relabel = None
        self.steps = None
        self.classes = None  # the batch's image classes (mse_gt's cross-entropy; the top-1)

    def segments(self) -> list[Segment]:
        return plain_segments(self.cfg.epochs)

    def start(self, run: Run) -> None:
        from labelstore.relabel import open_relabel  # noqa: PLC0415
        cfg = self.cfg
        store = labelstore.open_store(cfg.softlabel_path)
        store.require_kind("relabel")  # a top-k or embedding store is trained by another objective, named
        self.relabel = open_relabel(cfg.softlabel_path)
        if cfg.epochs > self.relabel.epochs:
            raise TrainError(f"--epochs {cfg.epochs} but {cfg.softlabel_path} holds labels of "
                             f"{self.relabel.epochs} epochs; use --epochs <= {self.relabel.epochs}")
        self.check_labels()

    def check_labels(self) -> None:
        """Refuse label formats this objective cannot learn from (the KL takes every format)."""

    def num_classes(self, run: Run) -> int:
        cfg, ds, store = self.cfg, run.train_set, self.relabel.store
        store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets,
                            data_dir=ds.root)
        if cfg.num_classes is not None and cfg.num_classes != store.num_classes:
            raise TrainError(f"--num-classes {cfg.num_classes} but {cfg.softlabel_path} holds labels over "
                             f"{store.num_classes} classes; drop --num-classes")
        return store.num_classes

    def classes_source(self) -> str:
        return f"the classes of {self.cfg.softlabel_path}"

    def loader(self, run: Run, crops: int):
        from pipelines.fkd_reader import refuse_resized  # noqa: PLC0415
        from pipelines.relabel import RelabelLoader, batch_refusal  # noqa: PLC0415
        from pipelines.relabel_steps import StepWindow, is_pruned, lpld_pool  # noqa: PLC0415
        rs, world = self.relabel, run.dist.world_size
        per_rank = run.images_per_rank(1)
        trained = rs.step_sizes[lpld_pool(rs)] if is_pruned(rs) else rs.step_sizes
        why = batch_refusal([rs.batch_size, *np.unique(trained).tolist()], per_rank, world)
        if why:
            raise TrainError(f"{rs.path} stores steps of {rs.batch_size} crops: {why}")
        self.steps = StepWindow(rs, seed=self.cfg.seed)
        ds, store = run.train_set, rs.store
        opts = run.loader_options()
        if opts.pop("crop_size") != rs.input_size:
            raise TrainError(f"--input-size {self.cfg.input_size} but {rs.path} was labelled on {rs.input_size} px "
                             f"crops (its CutMix boxes are in their pixels); use --input-size {rs.input_size}")
        return RelabelLoader(ds.root, ds.files, ds.targets, store.sizes(), source=self.steps,
                             label_specs=self.steps.label_specs, stored_step=rs.batch_size, mix=rs.mix, batch_size=per_rank, crop_size=rs.input_size,
                             refuse=lambda rows: refuse_resized(ds.root, store, ds.files, rows, store.sizes()[rows]),
                             **opts)

    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        rs = self.relabel
        self.classes = batch["targets"].to(run.torch_device)
        labels = {n: batch[n].to(run.torch_device) for n in rs.label_arrays}
        return dense_logits(labels, rs.label_format, rs.values, run.num_classes)

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        return Loss(sre2l_kl(logits, targets, self.cfg.temperature))

    def state_dict(self) -> dict[str, Any]:
        return {"store": {"path": self.relabel.path, "fingerprint": self.relabel.store.meta.fingerprint}}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        made = ckpt.get("store")
        if made and made["fingerprint"] != self.relabel.store.meta.fingerprint:
            raise TrainError(f"{path} was trained on labels of another dataset than {self.relabel.path}")


class RelabelMSE(RelabelKL):
    """G-VBSM / EDC's student: ``mse_gt`` (MSE to the stored logits + ``--ce-weight`` x CE with the image's class)."""

    plan_keys = ("ce_weight",)

    def check_labels(self) -> None:
        rs = self.relabel
        if rs.label_format != "full" or rs.values != "logits":
            raise TrainError(f"--labels {self.cfg.labels} (mse_gt) regresses the teacher's full logits, but "
                             f"{rs.path} holds {rs.label_format} {rs.values}; train it with --labels relabel (KL), or "
                             "relabel with full logits")

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        return Loss(mse_gt(logits, targets, self.classes, self.cfg.ce_weight))
