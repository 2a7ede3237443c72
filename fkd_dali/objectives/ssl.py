"""Self-supervised FKD (S2-BNN's distillation-only scheme on stored views, FKD-SSL): the student replays the stored
views of an ``embedding`` store (crop, flip, colour jitter, grayscale, blur: the pixels the teacher embedded) and
learns each one's stored teacher embedding; no class label is read. ``--labels ssl-online`` is the baseline that
runs the teacher instead, on every view of every step.

The student is the ``--arch`` model with its classifier replaced by S2-BNN's projection head to the store's D
(:func:`fkd_dali.ssl_distill.attach_head`); the loss is S2-BNN's ``DistributionLoss`` at ``--temp`` (0.2 in
``--recipe s2-bnn``), or ``--ssl-loss cosine|mse`` (:func:`fkd_dali.ssl_distill.ssl_loss`). The log carries the
loss and ``train_cosine``, the mean cosine of the student's embedding to the teacher's (a training top-1 against
classes means nothing here, so none is logged), and there is no classification validation: DATA/val has no
teacher embeddings (``ssl-online``, whose teacher is at hand, logs ``val_cosine`` on DATA/val's centre crops).
The plan is FKD's: a pass over the images with ``n`` stored views each counts as ``n`` epochs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ssl_distill import LOSSES, attach_head, ssl_loss
from ..train_config import TrainError
from .base import Loss, Mix, Run
from .fkd import StoredSoftLabels


class StoredEmbeddings(StoredSoftLabels):
    kind = "embedding"
    metrics = ("cosine",)
    plan_keys = ("ssl_loss",)
    reports_top1 = False
    best_key = "val_cosine"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.ssl_loss not in LOSSES:
            raise TrainError(f"--ssl-loss must be one of {', '.join(LOSSES)}, got {cfg.ssl_loss!r}")
        if not cfg.temperature > 0:
            raise TrainError(f"--temp {cfg.temperature:g}: the loss divides the embeddings by it; give a temperature "
                             "> 0 (S2-BNN's is 0.2)")
        if cfg.mixup_cutmix:
            raise TrainError(f"--labels {cfg.labels} learns each view's own teacher embedding: Mixup/CutMix (which "
                             "S2-BNN does not use) would mix two views' pixels against one embedding; drop "
                             "--mixup-cutmix / --w-cutmix")
        if cfg.label_smoothing:
            raise TrainError(f"--label-smoothing applies to class labels; --labels {cfg.labels} reads none: drop it")

    # ---------------------------------------------------------------- the student
    def dim(self, run: Run) -> int:
        """D: the size of the embeddings the student learns."""
        return self.store.fields["dim"]

    def num_classes(self, run: Run) -> int:
        cfg, ds, store = self.cfg, run.train_set, self.store
        store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets,
                            data_dir=ds.root, checksums=ds.checksums)
        dim = self.dim(run)
        if cfg.num_classes is not None:
            raise TrainError(f"--num-classes {cfg.num_classes}: a self-supervised student outputs embeddings of the "
                             f"teacher's size (D={dim}), not classes; drop --num-classes")
        if cfg.num_crops > store.num_crops:
            raise TrainError(f"--num-crops {cfg.num_crops} but {cfg.softlabel_path} stores {store.num_crops} "
                             f"views per image; use --num-crops <= {store.num_crops}")
        sizes = store.meta.crop.get("input_size") or [cfg.input_size]
        if run.main and sizes[0] != cfg.input_size:
            print(f"note: the teacher embedded {sizes[0]}-px views of {cfg.softlabel_path}; the student sees them at "
                  f"--input-size {cfg.input_size} (the same crops, resampled)", flush=True)
        return dim

    def classes_source(self) -> str:
        return f"the embedding size of {self.cfg.softlabel_path}"

    def student(self, run: Run, model: torch.nn.Module) -> torch.nn.Module:
        if attach_head(model, run.num_classes) is None:
            raise TrainError(f"student {self.cfg.arch} has no Linear classifier (fc) to replace by the projection "
                             "head; choose a model with one (torchvision's ResNets, MobileNets, ...)")
        return model

    def setup(self, run: Run) -> None:
        """No label type: the stored embeddings are the targets as they are."""

    # ---------------------------------------------------------------- a step
    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return batch["embedding"].to(run.torch_device)

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        value, cosine = ssl_loss(logits, targets, self.cfg.ssl_loss, self.cfg.temperature)
        return Loss(value, metrics={"cosine": cosine})

    def validate(self, run) -> dict[str, float] | None:
        """Nothing: DATA/val has no classes the student predicts and no teacher embeddings to compare with (the
        student is measured by a linear probe of its backbone)."""
        return None

    def describe(self, record: dict[str, Any]) -> str:
        val = f", val {record['val_cosine']:.4f}" if "val_cosine" in record else ""
        return f" (cosine to the teacher {record['train_cosine']:.4f}{val})"


class OnlineEmbeddings(StoredEmbeddings):
    """The online baseline: the self-supervised teacher (``--ssl-teacher``, loaded by :mod:`fkd_dali.ssl_teachers`)
    runs on every view of every step, in bf16 autocast where the student does, and its embedding is the target.
    The views are the store's (the same aug-plus distribution, the same DALI replay graph, the same rounds of
    views per pass as ``--labels ssl``); only its stored embeddings are not read, so the two objectives differ in
    exactly the teacher's forward pass: side-by-side time, and accuracy from the same pixels.

    ``--ssl-views fresh`` (the default) draws new views every pass instead (:func:`fkd_dali.views.fresh_views`
    with the store's view recipe, the same replay graph), as S2-BNN's online distillation sees them; the store
    then gives the recipe, the dataset check and the plan only. ``stored`` keeps the store's views (the same
    pixels as ``--labels ssl``: what a comparison of the two objectives' targets on one view needs)."""

    plan_keys = ("ssl_loss", "ssl_teacher", "ssl_head", "ssl_views")

    def __init__(self, cfg):
        if not cfg.ssl_teacher:
            raise TrainError("--labels ssl-online needs --ssl-teacher CKPT (a MoCo, MoCo v3, SwAV or DINO checkpoint, "
                             "or ARCH:PATH with --ssl-head) and --softlabel-path STORE (an embedding store, for its "
                             "views)")
        super().__init__(cfg)
        self.teacher = None

    def start(self, run: Run) -> None:
        from ..ssl_teachers import load_embedding_teacher, parse_embedding_teachers  # noqa: PLC0415 - torchvision
        super().start(run)
        if self.cfg.ssl_views == "fresh" and self.early_reads is not None:  # the stored views are not served
            self.early_reads.close()
            self.early_reads = None
        specs = parse_embedding_teachers(self.cfg.ssl_teacher, self.cfg.ssl_head, self.cfg.input_size)
        self.teacher = load_embedding_teacher(specs if len(specs) > 1 else specs[0])

    def loader(self, run: Run, crops: int):
        if self.cfg.ssl_views == "stored":
            return super().loader(run, crops)
        if self.cfg.ssl_views != "fresh":
            raise TrainError(f"--ssl-views must be fresh or stored, got {self.cfg.ssl_views!r}")
        from pipelines import FreshViewLoader  # noqa: PLC0415 - DALI

        from ..views import fresh_views  # noqa: PLC0415
        ds, seed, recipe = run.train_set, self.cfg.seed, self.store.fields["views"]
        return FreshViewLoader(ds.root, ds.files, ds.targets, num_crops=crops, batch_size=run.images_per_rank(crops),
                               draw=lambda p, rows, sizes: fresh_views(seed, p, rows, sizes, crops, recipe),
                               **run.loader_options())

    def dim(self, run: Run) -> int:
        return self.teacher.dim

    def classes_source(self) -> str:
        return f"the embedding size of {self.cfg.ssl_teacher}"

    def setup(self, run: Run) -> None:
        self.teacher = self.teacher.to(run.torch_device)
        if run.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)

    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp):
            return self.teacher(images).float()

    def validate(self, run) -> dict[str, float] | None:
        """``val_cosine``: the mean cosine of the student's embedding to the teacher's on DATA/val's centre crops,
        each image counted once (the padding of the ranks' shards left out, as :func:`fkd_dali.evaluate.evaluate`)."""
        import torch.distributed as dist  # noqa: PLC0415
        loader, dev = run.eval_loader(), run.torch_device
        n_real, rank, world = loader.reader.num_rows, loader.reader.rank, loader.reader.world_size
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # sum of cosines, images
        model = run.model
        was = model.training
        model.eval()
        i = 0
        with torch.no_grad():
            for b in loader:
                x = b["images"]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp):
                    s, t = model(x), self.teacher(x)
                real = rank + world * torch.arange(i, i + len(x), device=dev) < n_real
                i += len(x)
                cos = torch.nn.functional.cosine_similarity(s.float(), t.float(), dim=1)
                total += torch.stack([(cos * real).sum().double(), real.sum().double()])
        model.train(was)
        run.loaders["val"].release()
        if run.dist.group:
            dist.all_reduce(total)
        return {"val_cosine": float(total[0] / total[1].clamp(min=1))}
