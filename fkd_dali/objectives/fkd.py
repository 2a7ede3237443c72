"""FKD: the student replays the stored crops of a label store and learns each one's stored soft label.

The loader (``pipelines.FKDLoader``) gives ``n`` stored crops per image with their stored top-k; the top-k become
dense labels on the device (``--soft-label-type``, :func:`fkd_dali.soft_labels.recover`) and the loss is the soft
cross-entropy of ``student / T``. The plan is FKD's: a pass over the images with ``n`` crops each counts as ``n``
epochs, the warm-up and the last ``n`` epochs run single-crop (:func:`fkd_dali.schedule.fkd_segments`). No
teacher runs during training.

The store is opened, and the rows of the first pass read, while the dataset is scanned and the student built
(:meth:`StoredSoftLabels.start`); nothing is served before the store was checked against the dataset
(:meth:`StoredSoftLabels.num_classes`: files, classes, fingerprint, targets).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import labelstore

from ..schedule import Segment, fkd_segments, pass_index
from ..soft_labels import parse_label_type, recover
from ..train_config import TrainError
from .base import DenseLabels, Run


class StoredSoftLabels(DenseLabels):
    #: the store kind this objective trains from (another kind is refused by name)
    kind = "topk"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.softlabel_path:
            made = ("`fkd-dali generate --ssl-teacher`)" if self.kind == "embedding" else
                    "`fkd-dali generate` or `fkd-dali import-fkd`); or train a baseline with --labels hard")
            raise TrainError(f"--labels {cfg.labels} needs --softlabel-path STORE (a label store from {made}")
        self.temperature = cfg.temperature
        self.store = None
        self.early_reads = None  # the first pass's rows, read while the dataset is scanned
        self.label_type = None

    def segments(self) -> list[Segment]:
        cfg = self.cfg
        return fkd_segments(cfg.epochs, cfg.num_crops, cfg.warmup_epochs)

    def start(self, run: Run) -> None:
        """Open the store and start reading the rows this rank serves in the first pass: they depend on the store,
        the seed, the rank and the world size only."""
        from pipelines import RoundReads  # noqa: PLC0415 - DALI: imported once the scan started
        cfg = self.cfg
        self.store = labelstore.open_store(cfg.softlabel_path)
        self.store.require_kind(self.kind)  # a store of the other kind is trained by another objective, named
        first = run.segments[0]
        if cfg.resume is None and 1 <= first.crops <= self.store.num_crops:  # a resume starts elsewhere
            self.early_reads = RoundReads(self.store, num_crops=first.crops, seed=cfg.seed, rank=run.dist.rank,
                                          world_size=run.dist.world_size, allow_incomplete=cfg.allow_incomplete)
            self.early_reads.read(pass_index(run.segments, first))

    def num_classes(self, run: Run) -> int:
        cfg, ds, store = self.cfg, run.train_set, self.store
        store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets,
                            data_dir=ds.root, checksums=ds.checksums)
        if cfg.num_classes is not None and cfg.num_classes != store.num_classes:
            raise TrainError(f"--num-classes {cfg.num_classes} but {cfg.softlabel_path} holds labels over "
                             f"{store.num_classes} classes; the student's head must match the store: drop "
                             "--num-classes")
        if cfg.num_crops > store.num_crops:
            raise TrainError(f"--num-crops {cfg.num_crops} but {cfg.softlabel_path} stores {store.num_crops} "
                             f"crops per image; use --num-crops <= {store.num_crops}")
        if cfg.allow_incomplete and run.main:
            print(incomplete_note(store), flush=True)
        return store.num_classes

    def classes_source(self) -> str:
        return f"the classes of {self.cfg.softlabel_path}"

    def setup(self, run: Run) -> None:
        self.label_type = parse_label_type(self.cfg.soft_label_type, self.store.top_k, run.num_classes)

    def loader(self, run: Run, crops: int):
        from pipelines import FKDLoader  # noqa: PLC0415
        cfg = self.cfg
        reads = None
        if self.early_reads is not None and self.early_reads.num_crops == crops:
            reads, self.early_reads = self.early_reads, None
        return FKDLoader(cfg.data, self.store, batch_size=run.images_per_rank(crops), num_crops=crops,
                         allow_incomplete=cfg.allow_incomplete, files=run.train_set.files,
                         targets=run.train_set.targets, reads=reads, **run.loader_options())

    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        dev = run.torch_device
        return recover(batch["topk_idx"].to(dev), batch["topk_val"].to(dev), run.num_classes, self.label_type)

    def state_dict(self) -> dict[str, Any]:
        return {"store": {"path": self.store.path, "fingerprint": self.store.meta.fingerprint}}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        made = ckpt.get("store")
        if made and made["fingerprint"] != self.store.meta.fingerprint:
            raise TrainError(f"{path} was trained on labels of another dataset than {self.store.path}")

    def close(self) -> None:
        if self.early_reads is not None:
            self.early_reads.close()
            self.early_reads = None


def incomplete_note(store) -> str:
    """What --allow-incomplete leaves out, said before training starts."""
    done = store.require_complete(allow_incomplete=True)
    served = int(done.sum())
    missing = int((~store.settled()).sum())
    per_class = np.bincount(store.targets[done], minlength=len(store.classes))
    empty = [store.classes[c] for c in np.flatnonzero(per_class == 0)]
    note = (f"--allow-incomplete: training on {served:,} of {store.num_images:,} images of {store.path}; "
            f"{missing:,} have no labels yet")
    if empty:
        note += (f"; {len(empty)} of {len(store.classes)} classes have no labelled image at all "
                 f"({', '.join(empty[:8])}{' ...' if len(empty) > 8 else ''})")
    return note + ". Finish generation (rerun the same `fkd-dali generate` command) to train on every image"
