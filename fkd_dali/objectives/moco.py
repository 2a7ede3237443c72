"""Self-supervised pretraining without labels: MoCo v2 (He et al. 2020, Chen et al. 2020), the teacher FKD-SSL and
S2-BNN distil from, trained by the project (``--labels moco``).

What facebookresearch/moco (``moco/builder.py``, ``main_moco.py --mlp --aug-plus --cos``) does, and how it maps:

* **encoders**: the query encoder is the student (``--arch``) with MoCo v2's MLP head ``fc.0`` Linear(F, F),
  ReLU, ``fc.2`` Linear(F, D) (F the backbone's features: 2048 for a ResNet-50, 512 for a ResNet-18; D
  ``--moco-dim``, 128) — :func:`fkd_dali.ssl_distill.attach_head`; the key encoder is its copy, never trained by
  gradients, moved towards it by momentum ``m`` (``--moco-m``, 0.999) before each step's keys.
* **loss**: InfoNCE at T (``--temp``; MoCo v2's 0.2): per query ``q`` its positive key ``k+`` (the other view of
  the same image, from the key encoder) against the ``K`` keys of the queue (``--moco-k``, 65536), cross-entropy
  with the positive as class 0 of ``[q.k+, q.queue] / T``, q and k L2-normalised. The step's keys then enter the
  queue (first in, first out).
* **symmetric**: the loop runs the student on every view of the batch, so both views are queries (each against
  the other's key) and the loss is the mean of the two, as MoCo v3 and the symmetrised MoCo v2 baseline of MoCo v3's
  paper; both views' keys are enqueued, every rank's (gathered in rank order, MoCo's ``concat_all_gather``), so
  every rank holds the same queue and rank 0's in the checkpoint resumes them all.
* **shuffled BN**: MoCo shuffles the keys across GPUs so that a BatchNorm's batch statistics cannot tell a query its
  positive; here the key batch is permuted (seeded by the step) and run in chunks of at least 16 views (at most 8),
  each chunk's statistics its own, as the MoCo authors' single-GPU CIFAR demo's split BatchNorm. Below 32 views a
  rank still runs two chunks (smaller ones, down to 2 views), never the query batch as one: only a lone image (2
  views) is one chunk. The query side keeps the whole batch's statistics, as in MoCo.
* **views**: two views per image drawn anew every pass (:func:`fkd_dali.views.fresh_views`, MoCo v2's aug-plus)
  and applied by the replay graph of the embedding stores (``pipelines.FreshViewLoader``); ``-b`` counts views
  (two per image), an epoch is one pass over the images.

The checkpoint holds the query encoder as the student (``state_dict``; its head at ``fc.0`` / ``fc.2``), which
``generate --ssl-teacher`` and ``train --labels ssl-online --ssl-teacher`` load as a teacher (format ``fkd_dali``
of :mod:`fkd_dali.ssl_teachers`) and ``linear-eval`` probes; the key encoder, the queue and its pointer are under
``moco`` for an exact resume.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from ..schedule import Segment, plain_segments
from ..ssl_distill import attach_head
from ..train_config import TrainError
from .base import Loss, Mix, Objective, Run

VIEWS = 2  # per image per step: each view is the query of the other's key
MIN_CHUNK, MAX_CHUNKS = 16, 8  # the shuffled key batch's BatchNorm groups


def _gathered(run: Run, keys: torch.Tensor) -> torch.Tensor:
    """Every rank's keys of the step, rank 0's first (MoCo's ``concat_all_gather``): with several ranks each
    enqueues them all, so the ranks' queues stay identical. A rank's last batch may be shorter: the counts are
    gathered first and each rank's keys padded to the longest, then trimmed."""
    if not run.dist.group:
        return keys
    import torch.distributed as dist  # noqa: PLC0415
    world = dist.get_world_size()
    count = torch.tensor([len(keys)], device=keys.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = keys.new_zeros(max(counts), keys.shape[1])
    padded[:len(keys)] = keys
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class MoCo(Objective):
    metrics = ("contrast_top1",)  # how often the positive key scores above every key of the queue
    plan_keys = ("moco_k", "moco_m", "moco_dim")
    reports_top1 = False
    best_key = "val_cosine"  # never logged: no validation, the last checkpoint is the model

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.temperature > 0:
            raise TrainError(f"--temp {cfg.temperature:g}: InfoNCE divides the similarities by it; give a "
                             "temperature > 0 (MoCo v2's is 0.2)")
        if not 0 <= cfg.moco_m < 1:
            raise TrainError(f"--moco-m {cfg.moco_m:g}: the key encoder's momentum lies in [0, 1) (MoCo's 0.999)")
        if cfg.moco_k < 1 or cfg.moco_dim < 1:
            raise TrainError(f"--moco-k {cfg.moco_k} and --moco-dim {cfg.moco_dim} must be >= 1 (MoCo's 65536 and "
                             "128)")
        if cfg.mixup_cutmix or cfg.label_smoothing:
            raise TrainError("--labels moco reads no labels and contrasts each view with its own image's other view: "
                             "drop --mixup-cutmix / --label-smoothing")
        if cfg.num_classes is not None:
            raise TrainError(f"--num-classes {cfg.num_classes}: MoCo's encoder outputs {cfg.moco_dim}-d embeddings "
                             "(--moco-dim), not classes; drop --num-classes")
        self.key_encoder = None
        self.queue = None  # (K, D) L2-normalised keys, oldest overwritten first (random unit vectors at first, as MoCo's)
        self.queue_ptr = 0
        self._pending = None  # the step's keys, enqueued once the step is taken

    # ---------------------------------------------------------------- the loader
    def segments(self) -> list[Segment]:
        return plain_segments(self.cfg.epochs)

    def loader(self, run: Run, crops: int):
        from pipelines import FreshViewLoader  # noqa: PLC0415 - DALI: imported once a loader is made

        from ..views import fresh_views  # noqa: PLC0415
        ds, seed = run.train_set, self.cfg.seed
        return FreshViewLoader(ds.root, ds.files, ds.targets, num_crops=VIEWS,
                               draw=lambda p, rows, sizes: fresh_views(seed, p, rows, sizes, VIEWS),
                               batch_size=run.images_per_rank(VIEWS), **run.loader_options())

    # ---------------------------------------------------------------- the encoders
    def num_classes(self, run: Run) -> int:
        return self.cfg.moco_dim

    def classes_source(self) -> str:
        return "--moco-dim (MoCo's embedding size)"

    def student(self, run: Run, model: torch.nn.Module) -> torch.nn.Module:
        if attach_head(model, self.cfg.moco_dim) is None:
            raise TrainError(f"{self.cfg.arch} has no Linear classifier (fc) to replace by MoCo v2's MLP head; "
                             "choose a model with one (torchvision's ResNets, ...)")
        return model

    def setup(self, run: Run) -> None:
        self.key_encoder = copy.deepcopy(run.model)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.queue = F.normalize(torch.randn(self.cfg.moco_k, self.cfg.moco_dim, generator=g), dim=1).to(
            run.torch_device)

    # ---------------------------------------------------------------- a step
    @torch.no_grad()
    def _momentum_update(self, run: Run) -> None:
        m = self.cfg.moco_m
        for k, q in zip(self.key_encoder.parameters(), run.model.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """The positive key of every view: the key encoder's embedding of its image's other view."""
        self._momentum_update(run)
        n = len(images)
        if n % VIEWS:
            raise TrainError(f"a MoCo batch holds {VIEWS} views per image, got {n} views")
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + run.global_step)
        perm = torch.randperm(n, generator=g).to(images.device)
        # at least two groups (of >= 2 views: a BatchNorm needs two): a single group would be the query batch's very
        # views, so a key's BN statistics would match its query's and leak the positive
        chunks = min(MAX_CHUNKS, max(2, n // MIN_CHUNK)) if n >= 4 else 1
        self.key_encoder.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp):
            shuffled = torch.cat([self.key_encoder(c).float() for c in images[perm].chunk(chunks)])
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled
        keys = F.normalize(keys, dim=1)
        self._pending = _gathered(run, keys)
        return keys.view(n // VIEWS, VIEWS, -1).flip(1).reshape(n, -1)  # view v of an image: the other view's key

    def loss(self, run: Run, logits: torch.Tensor, targets: torch.Tensor, mix: Mix | None) -> Loss:
        q = F.normalize(logits.float(), dim=1)
        pos = (q * targets).sum(1, keepdim=True)
        neg = q @ self.queue.T
        scores = torch.cat([pos, neg], dim=1) / self.cfg.temperature
        zero = torch.zeros(len(q), dtype=torch.long, device=q.device)
        value = F.cross_entropy(scores, zero)
        return Loss(value, metrics={"contrast_top1": (scores.detach().argmax(1) == 0).float().mean()})

    @torch.no_grad()
    def step(self) -> None:
        """The step's keys, every rank's in rank order, enter the queue (after the loss used it), overwriting the
        oldest: every rank's queue is the same, so rank 0's in the checkpoint is exact for all."""
        keys, self._pending = self._pending, None
        if keys is None:
            return
        K = len(self.queue)
        keys = keys[-K:]
        idx = (self.queue_ptr + torch.arange(len(keys))) % K
        self.queue[idx.to(self.queue.device)] = keys.to(self.queue.dtype)
        self.queue_ptr = int((self.queue_ptr + len(keys)) % K)

    def validate(self, run) -> dict[str, float] | None:
        """Nothing: MoCo's encoder is measured by a linear probe of its backbone (``fkd-dali linear-eval``)."""
        return None

    # ---------------------------------------------------------------- checkpoints and log
    def state_dict(self) -> dict[str, Any]:
        return {"moco": {"key_encoder": self.key_encoder.state_dict(), "queue": self.queue.cpu(),
                         "queue_ptr": self.queue_ptr}}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        saved = ckpt.get("moco")
        if not isinstance(saved, dict) or not {"key_encoder", "queue", "queue_ptr"} <= set(saved):
            raise TrainError(f"{path} holds no MoCo state (key encoder, queue): it was not made by --labels moco")
        if tuple(saved["queue"].shape) != tuple(self.queue.shape):
            raise TrainError(f"{path}'s queue is {tuple(saved['queue'].shape)}, this run's {tuple(self.queue.shape)} "
                             "(--moco-k, --moco-dim); resume with the run's own options")
        self.key_encoder.load_state_dict(saved["key_encoder"])
        self.queue.copy_(saved["queue"].to(self.queue.device))
        self.queue_ptr = int(saved["queue_ptr"])

    def describe(self, record: dict[str, Any]) -> str:
        return f" (positive key first in {100 * record['train_contrast_top1']:.1f} % of the views)"
