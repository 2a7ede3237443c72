"""``fkd-dali train``: FKD training of a student from a label store, with the hard-label and online-KD
baselines in the same loop; DDP via torchrun; checkpoints that resume exactly.

One step (``--labels fkd``): ``FKDLoader`` gives ``ceil(b / n) / world`` images per rank, each as ``n``
stored crops with their stored top-k; the top-k become dense soft labels on the device
(``--soft-label-type``); optional Mixup/CutMix mixes images and labels; the loss is the soft
cross-entropy of ``student / T`` against them. ``--labels hard``: the standard random-resized-crop DALI
pipeline and cross-entropy (optionally label-smoothed). ``--labels online``: the same standard crops, and a
teacher run on them every step gives the soft labels (vanilla KD) — what FKD saves.

The plan (segments of n epochs, single-crop warm-up and tail) and the learning rate per step are pure
functions of the options (:mod:`fkd_dali.schedule`), the data order of ``(seed, epoch)``, the mixing of
``(seed, step)``; a checkpoint stores the position, weights, optimizer, EMA and every rank's RNG, so
``--resume`` continues the same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import labelstore
from pipelines import DecoderOptions, EvalLoader, FKDLoader, RoundReads, StandardLoader

from . import checkpoint, distributed, meal, student_init
from .interrupt import GracefulStop
from .dataset import Scan, scan_image_folder, split_dir, start_train_scan
from .evaluate import evaluate
from .mixing import MixConfig, mix_images
from .progress import format_eta, progress
from .schedule import LRSchedule, Segment, fkd_segments, plain_segments
from .soft_labels import parse_label_type, recover, soft_cross_entropy


class TrainError(Exception):
    """Training cannot start or go on; the message names the problem and the fix."""


@dataclasses.dataclass
class TrainConfig:
    data: str
    arch: str = "resnet50"
    labels: str = "fkd"  # fkd | hard | online
    softlabel_path: str | None = None
    soft_label_type: str = "marginal_smoothing_k5"
    temperature: float = 1.0
    num_crops: int = 4
    batch_size: int = 1024  # crops per optimizer step, all ranks together (FKD's -b)
    epochs: int = 300
    input_size: int = 224
    opt: str | None = None  # sgd | adamw; default by architecture family
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    cos: bool = True
    schedule: tuple[int, ...] = (120, 240)
    warmup_epochs: int | None = None
    warmup_lr: float = 1e-5
    min_lr: float | None = None
    opt_eps: float = 1e-8
    drop_path: float | None = None
    clip_grad: float | None = None
    mixup_cutmix: bool = False
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_cutmix_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range of --labels hard/online
    teacher_arch: str | None = None
    teacher_path: str | None = None
    teacher_weights: str | None = None
    teacher_input_size: int | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    amp: bool | None = None
    channels_last: bool | None = None
    device: str | None = None
    output: str | None = None
    resume: str | None = None
    evaluate: bool = False
    seed: int = 0
    workers: int | None = None
    num_classes: int | None = None
    allow_incomplete: bool = False
    checkpoint_every: int = 0  # also save every N steps inside a segment (0: at segment ends only)
    checkpoint_epochs: int = 1  # at a segment end, save only once this many epochs passed since the last save
    #                             (the last segment, a stop and a new best model always save)
    max_steps: int | None = None  # stop (with a checkpoint) after this global step
    val_batch_size: int = 64
    show_progress: bool = True
    progress_style: str = "epoch"  # epoch: a bar per segment and a line per epoch; run: one bar for the whole run
    progress_label: str = ""  # the whole-run bar's description (progress_style "run")
    eval_every: int = 1  # validate after every N-th segment (and always after the last)
    dist_timeout: float = 600.0  # seconds a collective may wait for a lost rank before the job fails
    device_id: int | None = None  # CUDA device of this process (default: its local rank)
    cpu_affinity: str = "auto"  # auto: each rank of a node pinned to its share of the cores near its GPU
    dist_backend: str | None = None  # nccl | gloo (default: nccl when every rank has a GPU of its own)
    decoder: DecoderOptions = dataclasses.field(default_factory=DecoderOptions)  # mixed-decoder settings
    overwrite: bool = False  # replace another run's checkpoints in --output (else refused unless --resume)
    recipe: str = "fkd"  # fkd | meal-v2 (the defaults of recipe_config; recorded, and checked on --resume)
    init_from: str | None = None  # the student's starting weights: a checkpoint file ...
    pretrained_weights: str | None = None  # ... or torchvision's published weights, from the local hub cache
    use_discriminator_loss: bool = False  # MEAL V2's discriminator on the student's softmax vs the soft labels
    d_lr: float = 1e-4  # the discriminator's own (constant) learning rate

    def resolved(self) -> "TrainConfig":
        """Fill the defaults that depend on the architecture family (FKD's CNN vs ViT recipes)."""
        from .models import is_transformer  # noqa: PLC0415 - torchvision: imported once the dataset scan started
        vit = is_transformer(self.arch)
        opt = self.opt or ("adamw" if vit else "sgd")
        recipe = RECIPES.get(self.recipe, {})
        return dataclasses.replace(
            self, opt=opt,
            lr=self.lr if self.lr is not None else recipe.get("lr", 0.002 if opt == "adamw" else 0.1),
            weight_decay=self.weight_decay if self.weight_decay is not None else
            recipe.get("weight_decay", 0.05 if opt == "adamw" else 1e-4),
            warmup_epochs=self.warmup_epochs if self.warmup_epochs is not None else (5 if vit else 0),
            min_lr=self.min_lr if self.min_lr is not None else (1e-5 if opt == "adamw" else 0.0),
            output=self.output or os.path.join("runs", f"{self.arch}-{self.labels}"))


# Options that define the run's plan: a resume must agree on them.
PLAN_KEYS = ("arch", "labels", "num_crops", "batch_size", "epochs", "input_size", "opt", "lr", "weight_decay",
             "cos", "warmup_epochs", "soft_label_type", "temperature", "mixup_cutmix", "seed", "label_smoothing",
             "scale", "recipe", "use_discriminator_loss", "d_lr")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # of keys older checkpoints lack

# Defaults by --recipe; options given explicitly win (recipe_config). fkd: TrainConfig's own (FKD's).
RECIPES: dict[str, dict[str, Any]] = {"fkd": {}, "meal-v2": meal.RECIPE}


def recipe_config(recipe: str = "fkd", **options) -> TrainConfig:
    """A TrainConfig with ``recipe``'s defaults under ``options`` (an option left None takes the recipe's
    default, then TrainConfig's)."""
    if recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    given = {k: v for k, v in options.items() if v is not None}
    return TrainConfig(recipe=recipe, **{**RECIPES[recipe], **given})


class Trainer:
    def __init__(self, cfg: TrainConfig, scan: Scan | None = None):
        # The dataset scan (a stat per file) starts first, in a child process when the dataset is large: it runs
        # while this process imports the model zoo, joins the process group, opens the label store and reads
        # the rows of the first pass (see _open_store). The CLI starts it before it imports torch (``scan``).
        self.early_reads: RoundReads | None = None  # the first pass's rows, read while the dataset is scanned
        try:
            if scan is None:
                scan = start_train_scan(cfg.data, cfg.labels, cfg.evaluate)
            elif scan.root != split_dir(cfg.data, "train"):
                raise ValueError(f"the scan given is of {scan.root}, not of {cfg.data}'s train split")
        except BaseException:
            if scan is not None:
                scan.cancel()
            raise
        try:
            self._setup(cfg, scan)
        except BaseException:
            if scan is not None:
                scan.cancel()
            if self.early_reads is not None:
                self.early_reads.close()
            raise

    def _setup(self, cfg: TrainConfig, scan: Scan | None) -> None:
        self.cfg = cfg = cfg.resolved()
        if cfg.labels not in ("fkd", "hard", "online"):
            raise TrainError(f"--labels must be fkd, hard or online, got {cfg.labels!r}")
        self._check_recipe()
        if cfg.progress_style not in ("epoch", "run"):
            raise TrainError(f"progress_style must be epoch or run, got {cfg.progress_style!r}")
        if cfg.eval_every < 1:
            raise TrainError(f"eval_every {cfg.eval_every}: validate at least after every segment (1) or less often "
                             "(N > 1)")
        if cfg.checkpoint_epochs < 1:
            raise TrainError(f"--checkpoint-epochs {cfg.checkpoint_epochs}: give at least 1 (1 writes the "
                             "checkpoint after every segment)")
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise TrainError(f"--max-steps {cfg.max_steps}: give at least 1 step (or leave it out to train the "
                             "whole plan)")
        self.device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise TrainError("--device gpu was asked for but torch sees no CUDA device; use --device cpu")
        self.dist = distributed.setup(self.device, timeout_s=cfg.dist_timeout, device_id=cfg.device_id,
                                      cpu_affinity=cfg.cpu_affinity, backend=cfg.dist_backend)
        self.decoder = cfg.decoder
        self.torch_device = torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else \
            torch.device("cpu")
        self.amp = cfg.amp if cfg.amp is not None else self.device == "gpu"
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device == "gpu"
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.main = self.dist.is_main
        self.store = None
        self.train_set = None
        self.segments = fkd_segments(cfg.epochs, cfg.num_crops, cfg.warmup_epochs) if cfg.labels == "fkd" \
            else plain_segments(cfg.epochs)
        if cfg.labels == "fkd" and not cfg.evaluate:
            self._open_store()
        if scan is not None:
            self.train_set = scan.result()
        self.num_classes = self._num_classes()
        from .models import create_model  # noqa: PLC0415 - torchvision's import ran beside the scan (resolved())
        self.model = create_model(cfg.arch, self.num_classes, cfg.input_size, cfg.drop_path)
        if not cfg.evaluate and not cfg.resume:  # a resume restores the weights it trained
            self._init_student()
        self.model = self.model.to(self.torch_device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.torch_device.index] if self.device == "gpu" else None) \
            if self.dist.group else self.model
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.model_ema_decay)) \
            if cfg.model_ema else None
        self.optimizer = self._optimizer()
        self.disc, self.ddisc, self.d_optimizer = self._discriminator()
        self.d_loss = None  # the discriminator loss of the last step
        self.lr_at = LRSchedule(cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr, cfg.cos,
                                cfg.schedule)
        self.loaders: dict[int, Any] = {}
        self.teacher = self._teacher() if cfg.labels == "online" else None
        self.label_type = parse_label_type(cfg.soft_label_type, self.store.top_k, self.num_classes) \
            if self.store is not None else None
        self.mix_cfg = MixConfig(cfg.mixup, cfg.cutmix, cfg.mixup_cutmix_prob, cfg.mixup_switch_prob) \
            if cfg.mixup_cutmix else None
        self.position = (0, 0)  # (segment, batch inside it)
        self.saved_at = (0, 0)  # the position of the last checkpoint written
        self.global_step = 0
        self.best_top1 = 0.0
        self.history: list[dict] = []
        self.output_lock = None
        self.stop: GracefulStop | None = None
        self.partial: dict | None = None  # this rank's running sums of the segment at the resume position
        self.running = {"loss": None, "top1": None, "d_loss": None, "steps": 0}
        self.run_bar = None  # the whole-run bar (progress_style "run"), made by the first segment
        self.last_val: float | None = None  # the latest validation top-1, shown on the whole-run bar

    # ------------------------------------------------------------------ setup
    def _check_recipe(self) -> None:
        cfg = self.cfg
        if cfg.recipe not in RECIPES:
            raise TrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
        if cfg.init_from and cfg.pretrained_weights:
            raise TrainError("give either --init-from FILE or --pretrained-weights NAME, not both")
        if cfg.labels != "fkd" and (cfg.recipe == "meal-v2" or cfg.use_discriminator_loss):
            raise TrainError("--recipe meal-v2 and --use-discriminator-loss train on stored soft labels: use them "
                             "with --labels fkd and --softlabel-path STORE (an ensemble store: generate -a a,b)")
        if cfg.recipe == "meal-v2" and not (cfg.init_from or cfg.pretrained_weights or cfg.resume or cfg.evaluate):
            raise TrainError("--recipe meal-v2 distils into a student that is already trained: pass --init-from "
                             "CHECKPOINT (e.g. a hard-label run of this dataset) or --pretrained-weights NAME; to "
                             "start from scratch, use the default recipe (with --use-discriminator-loss if wanted)")

    def _init_student(self) -> None:
        cfg = self.cfg
        classes_from = f"the classes of {cfg.softlabel_path}" if self.store is not None else "the dataset's classes"
        if cfg.init_from:
            student_init.init_from_checkpoint(self.model, cfg.init_from, cfg.arch, self.num_classes, classes_from)
        elif cfg.pretrained_weights:
            student_init.init_from_torchvision(self.model, cfg.arch, cfg.pretrained_weights, self.num_classes,
                                               classes_from)
        else:
            return
        if self.main:
            print(f"student {cfg.arch} starts from {cfg.init_from or cfg.pretrained_weights}", flush=True)

    def _discriminator(self):
        """MEAL V2's discriminator, its DDP wrapper (its gradients are averaged over the ranks like the
        student's) and its own optimizer (SGD, the student's momentum, no weight decay); Nones without it."""
        if not self.cfg.use_discriminator_loss:
            return None, None, None
        disc = meal.Discriminator(self.num_classes).to(self.torch_device)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            disc, device_ids=[self.torch_device.index] if self.device == "gpu" else None) if self.dist.group else disc
        return disc, wrapped, torch.optim.SGD(disc.parameters(), lr=self.cfg.d_lr, momentum=self.cfg.momentum)

    def _open_store(self) -> None:
        """Open the label store and start reading the rows this rank serves in the first pass. They depend on
        the store, the seed, the rank and the world size only, so the read runs while the dataset is scanned
        and the model is built; nothing is served before ``check_dataset`` passed (the loader that serves
        them is made after it)."""
        cfg = self.cfg
        if not cfg.softlabel_path:
            raise TrainError("--labels fkd needs --softlabel-path STORE (a label store from `fkd-dali generate` "
                             "or `fkd-dali import-fkd`); or train a baseline with --labels hard")
        self.store = labelstore.open_store(cfg.softlabel_path)
        first = self.segments[0]
        if cfg.resume is None and 1 <= first.crops <= self.store.num_crops:  # a resume starts elsewhere
            self.early_reads = RoundReads(self.store, num_crops=first.crops, seed=cfg.seed, rank=self.dist.rank,
                                          world_size=self.dist.world_size, allow_incomplete=cfg.allow_incomplete)
            self.early_reads.read(pass_index(self.segments, first))

    def _num_classes(self) -> int:
        cfg = self.cfg
        if cfg.labels == "fkd" and not cfg.evaluate:
            ds = self.train_set
            self.store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint,
                                     targets=ds.targets, data_dir=ds.root)
            if cfg.num_classes is not None and cfg.num_classes != self.store.num_classes:
                raise TrainError(f"--num-classes {cfg.num_classes} but {cfg.softlabel_path} holds labels over "
                                 f"{self.store.num_classes} classes; the student's head must match the store: drop "
                                 "--num-classes")
            if cfg.num_crops > self.store.num_crops:
                raise TrainError(f"--num-crops {cfg.num_crops} but {cfg.softlabel_path} stores {self.store.num_crops} "
                                 f"crops per image; use --num-crops <= {self.store.num_crops}")
            if cfg.allow_incomplete and self.main:
                print(incomplete_note(self.store), flush=True)
            return self.store.num_classes
        if cfg.num_classes is not None:
            return cfg.num_classes
        classes = (self.train_set or scan_image_folder(split_dir(cfg.data, "val"))).classes
        return len(classes)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        skip = getattr(self.model, "no_weight_decay", lambda: set())()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if cfg.opt == "adamw" and (p.ndim <= 1 or name in skip or name.endswith(".bias"))
             else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if cfg.opt == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        if cfg.opt == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.opt_eps)
        raise TrainError(f"--opt must be sgd or adamw, got {cfg.opt!r}")

    def _teacher(self):
        from .teachers import TeacherSpec, build_teacher, output_classes  # noqa: PLC0415 - see resolved()
        cfg = self.cfg
        if not cfg.teacher_arch:
            raise TrainError("--labels online needs --teacher-arch (and --teacher-path or --teacher-weights)")
        spec = TeacherSpec(cfg.teacher_arch, weights=cfg.teacher_weights, path=cfg.teacher_path,
                           input_size=cfg.teacher_input_size or cfg.input_size)
        teacher = build_teacher(spec, self.num_classes).to(self.torch_device)
        if self.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        got = output_classes(teacher, spec, self.torch_device)
        if got != self.num_classes:
            raise TrainError(f"teacher {cfg.teacher_arch} outputs {got} classes, the student {self.num_classes}")
        self.teacher_size = spec.input_size
        return teacher

    def _images_per_rank(self, crops: int) -> int:
        total = math.ceil(self.cfg.batch_size / crops)
        per = total // self.dist.world_size
        if per < 1:
            raise TrainError(f"-b {self.cfg.batch_size} crops gives {total} images per step, fewer than the "
                             f"{self.dist.world_size} ranks; raise -b")
        return per

    def loader(self, crops: int):
        if crops not in self.loaders:
            cfg, d = self.cfg, self.dist
            common = dict(device=self.device, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                          channels_last=self.channels_last, num_threads=cfg.workers, crop_size=cfg.input_size,
                          decoder=self.decoder)
            if cfg.labels == "fkd":
                reads = None
                if self.early_reads is not None and self.early_reads.num_crops == crops:
                    reads, self.early_reads = self.early_reads, None
                self.loaders[crops] = FKDLoader(cfg.data, self.store, batch_size=self._images_per_rank(crops),
                                                num_crops=crops, allow_incomplete=cfg.allow_incomplete,
                                                files=self.train_set.files, targets=self.train_set.targets,
                                                reads=reads, **common)
            else:
                ds = self.train_set
                self.loaders[crops] = StandardLoader(ds.root, ds.files, ds.targets, scale=cfg.scale,
                                                     batch_size=self._images_per_rank(1), **common)
        return self.loaders[crops]

    def eval_loader(self) -> EvalLoader:
        if "val" not in self.loaders:
            val = scan_image_folder(split_dir(self.cfg.data, "val"))
            self.loaders["val"] = EvalLoader(val.root, val.files, val.targets, batch_size=self.cfg.val_batch_size,
                                             crop_size=self.cfg.input_size, device=self.device, rank=self.dist.rank,
                                             world_size=self.dist.world_size, channels_last=self.channels_last,
                                             num_threads=self.cfg.workers, decoder=self.decoder)
        return self.loaders["val"]

    def release_loaders(self, keep=None) -> None:
        """Free the DALI pipelines of every loader but ``keep`` (key of ``self.loaders``): only the pipeline in
        use holds its threads, decoder buffers and (GPU) memory; a released one rebuilds when used again."""
        for key, ld in self.loaders.items():
            if key != keep:
                ld.release()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        run = self.running
        mine = {"rng": checkpoint.rng_state(), "partial": None if run["loss"] is None else {
            "loss": float(run["loss"].item()), "top1": float(run["top1"].item()), "steps": run["steps"],
            "d_loss": float(run["d_loss"].item())}}
        every = [None] * self.dist.world_size
        if self.dist.group:
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        rngs = [x["rng"] for x in every]
        seg, batch = self.position
        return {"arch": self.cfg.arch, "num_classes": self.num_classes, "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "discriminator": self.disc.state_dict() if self.disc is not None else None,
                "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer is not None else None,
                "epoch": self.segments[seg].start_epoch if seg < len(self.segments) else self.cfg.epochs,
                "segment": seg, "batch": batch, "global_step": self.global_step, "best_acc1": self.best_top1,
                "history": self.history, "rng": rngs, "world_size": self.dist.world_size,
                "partial": [x["partial"] for x in every],
                "config": dataclasses.asdict(self.cfg),
                "store": {"path": self.store.path, "fingerprint": self.store.meta.fingerprint} if self.store else None}

    def save(self, is_best: bool = False, last: bool = True) -> None:
        """The checkpoint of this position (``last``) and/or the best model's copy (``is_best``)."""
        state = self.state()  # every rank takes part (RNG gather)
        if self.main:
            checkpoint.save(state, self.cfg.output, is_best, last=last)
        if last:
            self.saved_at = self.position

    def save_due(self, seg: Segment) -> bool:
        """Whether the checkpoint is written at the end of ``seg``: ``checkpoint_epochs`` since the last one (the
        same decision on every rank: it counts epochs, not seconds), or the run's last segment."""
        saved_epoch = self.segments[self.saved_at[0]].start_epoch if self.saved_at[0] < len(self.segments) else 0
        return (seg.index + 1 == len(self.segments) or seg.end_epoch - saved_epoch >= self.cfg.checkpoint_epochs)

    def resume(self, path: str) -> None:
        ckpt = checkpoint.load(path)
        checkpoint.load_weights(self.model, ckpt, path, self.cfg.arch)
        made = ckpt.get("config")
        if made is None:
            raise TrainError(f"{path} is not a checkpoint of `fkd-dali train` (no run configuration); it can only be "
                             "evaluated (-e --resume)")
        diffs = [f"{k}: {made.get(k, DEFAULTS[k])!r} -> {getattr(self.cfg, k)!r}" for k in PLAN_KEYS
                 if _norm(made.get(k, DEFAULTS[k])) != _norm(getattr(self.cfg, k))]
        if ckpt.get("world_size") != self.dist.world_size:
            diffs.append(f"ranks: {ckpt.get('world_size')} -> {self.dist.world_size}")
        if diffs:
            raise TrainError(f"{path} was made by a run with other settings ({'; '.join(diffs)}); resume with the same "
                             "options to continue it exactly")
        if self.store is not None and ckpt.get("store") and ckpt["store"]["fingerprint"] != self.store.meta.fingerprint:
            raise TrainError(f"{path} was trained on labels of another dataset than {self.store.path}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["discriminator"])
            self.d_optimizer.load_state_dict(ckpt["d_optimizer"])
        self.position = self.saved_at = (ckpt["segment"], ckpt["batch"])
        self.global_step = ckpt["global_step"]
        self.best_top1 = ckpt.get("best_acc1", 0.0)
        self.history = list(ckpt.get("history", []))
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.dist.world_size:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        partials = ckpt.get("partial") or []
        self.partial = partials[self.dist.rank] if len(partials) == self.dist.world_size else None

    # ------------------------------------------------------------------ the loop
    def step(self, batch: dict[str, torch.Tensor], lr: float) -> tuple[float, float]:
        cfg = self.cfg
        x = batch["images"]
        target = batch["targets"].to(self.torch_device)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            if cfg.labels == "fkd":
                soft = recover(batch["topk_idx"].to(self.torch_device), batch["topk_val"].to(self.torch_device),
                               self.num_classes, self.label_type)
            elif cfg.labels == "online":
                t_in = x if self.teacher_size == cfg.input_size else \
                    F.interpolate(x.float(), size=self.teacher_size, mode="bilinear", antialias=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    soft = torch.softmax(self.teacher(t_in).float(), dim=1)
            else:
                soft = F.one_hot(target, self.num_classes).float()
                if cfg.label_smoothing:
                    soft = soft * (1 - cfg.label_smoothing) + cfg.label_smoothing / self.num_classes
            label_sets, weights = [soft], [1.0]  # what the discriminator compares the student with
            if self.mix_cfg is not None:
                x, perm, lam, _ = mix_images(x, self.mix_cfg, cfg.seed, self.global_step)
                if perm is not None:
                    label_sets, weights = [soft, soft[perm]], [lam, 1.0 - lam]
                    soft = soft.mul(lam).add_(soft[perm], alpha=1.0 - lam)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.ddp(x)
        loss = soft_cross_entropy(out, soft, cfg.temperature if cfg.labels != "hard" else 1.0)
        total = loss
        if self.disc is not None:  # MEAL V2: student and discriminator minimise the sum together
            self.d_loss = meal.discriminator_loss(self.ddisc, meal.student_probs(out), label_sets, weights)
            total = loss + self.d_loss
            self.d_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if self.d_optimizer is not None:
            self.d_optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.global_step += 1
        top1 = (out.detach().argmax(1) == target).float().mean()
        return loss.detach(), top1

    def claim_output(self) -> None:
        """Rank 0 takes the output folder (refused when another run's checkpoint is there, or a live run
        writes it); every rank raises the same error."""
        why = None
        if self.main:
            try:
                self.output_lock = checkpoint.claim_folder(self.cfg.output, resume=self.cfg.resume,
                                                           overwrite=self.cfg.overwrite)
            except (checkpoint.CheckpointError, labelstore.StoreError) as e:
                why = str(e)
            except OSError as e:  # a read-only or misnamed --output
                why = f"--output {self.cfg.output}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "") + \
                    ". Choose a folder you can write"
        if self.dist.group:
            box = [why]
            dist.broadcast_object_list(box, src=0)
            why = box[0]
        if why:
            raise TrainError(why)

    def open_log(self):
        """``log.jsonl`` for appending. On a resume it first holds exactly the checkpoint's records: those a
        crash left after the checkpoint (``checkpoint_epochs`` > 1) are trained again and must not appear twice."""
        path = os.path.join(self.cfg.output, "log.jsonl")
        if self.cfg.resume:  # resume() accepts only our checkpoints, and every one of them carries its history
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            os.replace(path + ".tmp", path)
        return open(path, "a")

    def run(self) -> dict:
        self.claim_output()
        try:
            return self._run()
        finally:
            if self.output_lock is not None:
                self.output_lock.release()

    def _run(self) -> dict:
        cfg = self.cfg
        if cfg.resume:
            self.resume(cfg.resume)
        t_run = time.perf_counter()
        log = self.open_log() if self.main and _mkdir(cfg.output) else None
        resumed_at = (self.segments[self.position[0]].start_epoch + 1  # the next record's epoch, at the earliest
                      if cfg.resume and self.position[0] < len(self.segments) else None)
        tb = _tensorboard(cfg.output, resumed_at) if self.main else None
        stopped = False
        self.stop = GracefulStop(self.dist.group)
        self.eta = (time.perf_counter(), self.global_step)
        try:
            with self.stop:
                for seg in self.segments[self.position[0]:]:
                    stopped = self.train_segment(seg, log, tb)
                    if stopped:
                        break
        finally:
            if log:
                log.close()
            if tb:
                tb.close()
            for ld in self.loaders.values():
                ld.close()
            if self.early_reads is not None:
                self.early_reads.close()
            if self.run_bar is not None:
                self.run_bar.close()
        summary = {"arch": cfg.arch, "labels": cfg.labels, "best_top1": self.best_top1,
                   "last": self.history[-1] if self.history else None, "seconds": time.perf_counter() - t_run,
                   "global_step": self.global_step, "stopped_early": stopped, "output": cfg.output,
                   "interrupted": self.stop.name}
        if self.stop.name and self.main:
            last = os.path.join(cfg.output, checkpoint.LAST)
            print(f"stopped by {self.stop.name} after step {self.global_step}: checkpoint {last} saved. To continue, "
                  f"rerun the same command with --resume {last}", flush=True)
        self.dist.close()
        return summary

    def run_steps(self, rows: int) -> int:
        """Optimizer steps of the whole plan when ``rows`` images are served (for the run's ETA)."""
        per_rank = -(-rows // self.dist.world_size)
        return sum(-(-per_rank // self._images_per_rank(seg.crops)) for seg in self.segments)

    def run_eta(self, total: int) -> str:
        t0, step0 = self.eta
        done = self.global_step - step0
        if done < 1:
            return "?"
        return format_eta((total - self.global_step) * (time.perf_counter() - t0) / done)

    def segment_bar(self, label: str, steps: int, start: int, total: int):
        """The bar this segment updates: its own (progress_style "epoch"), or the run's single bar ("run")."""
        cfg = self.cfg
        disable = not (self.main and cfg.show_progress)
        if cfg.progress_style == "epoch":
            return progress(total=steps, initial=start, desc=label, unit="step", disable=disable)
        if self.run_bar is None:
            self.run_bar = progress(total=total, initial=self.global_step, desc=cfg.progress_label or cfg.labels,
                                    unit="step", disable=disable)
        return self.run_bar

    def bar_postfix(self, label: str, loss: float, top1: float, rate: float, lr: float, total: int) -> dict:
        if self.cfg.progress_style == "epoch":
            return {"loss": f"{loss:.3f}", "top1": f"{top1:.1f}", "crops_s": f"{rate:,.0f}", "lr": f"{lr:.2e}",
                    "run_eta": self.run_eta(total)}
        post = {"epoch": label.split()[-1], "loss": f"{loss:.3f}", "crops_s": f"{rate:,.0f}"}
        if self.last_val is not None:
            post["val_top1"] = f"{self.last_val:.1f}"
        return post

    def validates_after(self, seg: Segment) -> bool:
        """Validation after this segment: every ``eval_every``-th one and the last."""
        return (seg.index + 1) % self.cfg.eval_every == 0 or seg.index == len(self.segments) - 1

    def train_segment(self, seg: Segment, log, tb) -> bool:
        """Train one segment (from the resume position); returns True when --max-steps or a signal stopped the
        run (after saving a checkpoint)."""
        cfg = self.cfg
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            return True  # a resumed run that is already there
        self.release_loaders(keep=seg.crops)  # e.g. the n-crop pipeline once the single-crop tail starts
        loader = self.loader(seg.crops)
        start = self.position[1] if self.position[0] == seg.index else 0
        steps = len(loader)
        total = self.run_steps(loader.reader.num_rows)
        loader.set_epoch(pass_index(self.segments, seg), start_batch=start)
        self.position = (seg.index, start)
        self.ddp.train()
        label = f"epoch {seg.start_epoch}" + (f"-{seg.end_epoch - 1}" if seg.crops > 1 else "")
        bar = self.segment_bar(label, steps, start, total)
        carried = self.partial if start > 0 and self.partial else {"loss": 0.0, "top1": 0.0, "steps": 0}
        self.partial = None
        loss_sum = torch.tensor(carried["loss"], device=self.torch_device)
        top1_sum = torch.tensor(carried["top1"], device=self.torch_device)
        d_sum = torch.tensor(carried.get("d_loss", 0.0), device=self.torch_device)
        n = carried["steps"]  # steps of this segment so far on this rank (before a resume too)
        self.running = {"loss": loss_sum, "top1": top1_sum, "d_loss": d_sum, "steps": n}
        crops = 0
        t0 = time.perf_counter()
        stopped = False
        lr = self.lr_at(seg.start_epoch + seg.crops * max(0, start - 1) / steps)  # a resume after its last step
        for i, batch in enumerate(loader, start=start):
            lr = self.lr_at(seg.start_epoch + seg.crops * i / steps)
            loss, top1 = self.step(batch, lr)
            loss_sum += loss
            top1_sum += top1
            if self.disc is not None:
                d_sum += self.d_loss.detach()
            n += 1
            self.running["steps"] = n
            crops += batch["images"].shape[0]
            self.position = (seg.index, i + 1)
            if self.main and (n % 10 == 0 or i + 1 == steps):
                rate = crops * self.dist.world_size / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(self.bar_postfix(label, loss_sum.item() / n, 100 * top1_sum.item() / n, rate, lr,
                                                 total), refresh=False)
            bar.update(1)
            if self.stop.requested() or (cfg.max_steps is not None and self.global_step >= cfg.max_steps):
                stopped = True
                break
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and i + 1 < steps:
                self.save()
        if bar is not self.run_bar:
            bar.close()
        seconds = time.perf_counter() - t0
        if stopped:
            self.save()
            return True
        self.position = (seg.index + 1, 0)
        self.running = {"loss": None, "top1": None, "d_loss": None, "steps": 0}
        if self.dist.group:
            dist.all_reduce(loss_sum)
            dist.all_reduce(top1_sum)
            dist.all_reduce(d_sum)
        world = self.dist.world_size
        record = {"segment": seg.index, "epochs": [seg.start_epoch, seg.end_epoch], "crops_per_image": seg.crops,
                  "train_loss": loss_sum.item() / max(1, n * world), "train_top1": 100 * top1_sum.item() / max(1, n * world),
                  "lr": lr, "steps": n, "seconds": seconds, "crops_per_s": crops * world / max(1e-9, seconds)}
        if self.disc is not None:
            record["train_d_loss"] = d_sum.item() / max(1, n * world)
        if start:  # loss and top-1 cover the whole segment (carried in the checkpoint); the timing does not
            record["resumed_at_step"] = start
        is_best = False
        if self.validates_after(seg):
            record.update({f"val_{k}": v for k, v in evaluate(self.ddp, self.eval_loader(), amp=self.amp,
                                                              group=self.dist.group).items()})
            if self.ema is not None:
                record.update({f"val_ema_{k}": v for k, v in evaluate(self.ema.module, self.eval_loader(),
                                                                      amp=self.amp, group=self.dist.group).items()})
            self.loaders["val"].release()  # used once per segment: its pipeline is not kept during training
            is_best = record["val_top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, record["val_top1"])
        self.history.append(record)
        if self.save_due(seg):
            self.save(is_best)
        elif is_best:
            self.save(is_best, last=False)
        if self.main:
            if cfg.progress_style == "epoch":
                d_text = f" (discriminator {record['train_d_loss']:.4f})" if self.disc is not None else ""
                val = f"val top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%  " \
                    if "val_top1" in record else ""
                print(f"{label}: loss {record['train_loss']:.4f}{d_text}  train top-1 {record['train_top1']:.2f}%  "
                      f"{val}({record['crops_per_s']:,.0f} crops/s; run ETA {self.run_eta(total)})", flush=True)
            elif "val_top1" in record:
                self.last_val = record["val_top1"]
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if tb:
                for k, v in record.items():
                    if isinstance(v, (int, float)):
                        tb.add_scalar(k, v, seg.end_epoch)
        if self.stop.requested():  # a signal during validation: this position's checkpoint resumes
            if self.saved_at != self.position:
                self.save()
            return True
        return False


def evaluate_checkpoint(cfg: TrainConfig) -> dict:
    """``-e --resume CKPT``: top-1/top-5 of a checkpoint (ours or FKD's) on DATA/val."""
    cfg = cfg.resolved()
    if not cfg.resume:
        raise TrainError("-e needs --resume CKPT (the checkpoint to evaluate)")
    path = cfg.resume
    ckpt = checkpoint.load(path)
    num_classes = cfg.num_classes or ckpt.get("num_classes")
    if num_classes is None:  # FKD's checkpoints: the last 2-D weight is the classifier
        heads = [v for k, v in checkpoint.model_state(ckpt, path).items() if k.endswith("weight") and v.ndim == 2]
        num_classes = int(heads[-1].shape[0]) if heads else 1000
    trainer = Trainer(dataclasses.replace(cfg, evaluate=True, num_classes=num_classes, resume=None))
    checkpoint.load_weights(trainer.model, ckpt, path, cfg.arch)
    res = evaluate(trainer.ddp, trainer.eval_loader(), amp=trainer.amp, group=trainer.dist.group)
    if trainer.main:
        print(f"{cfg.arch} ({path}) on {split_dir(cfg.data, 'val')}: top-1 {res['top1']:.2f}%  "
              f"top-5 {res['top5']:.2f}%  ({res['images']} images)")
    trainer.dist.close()
    return res


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


def pass_index(segments: list[Segment], seg: Segment) -> int:
    """The loader's pass number of a segment: its count among the earlier segments with as many crops (a
    loader's pass p picks round p of the crop pool's seeded order, so rounds never repeat early)."""
    return sum(1 for s in segments[:seg.index] if s.crops == seg.crops)


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _mkdir(path: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return True


def _tensorboard(folder: str, purge_step: int | None = None):
    """The TensorBoard writer (None without tensorboard); ``purge_step``: events from this epoch on were written
    after the checkpoint a resume continues (a crash after an unsaved segment) and are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional (needs tensorboard)
    except Exception:  # noqa: BLE001
        return None
    return SummaryWriter(os.path.join(folder, "tb"), purge_step=purge_step)


def train(cfg: TrainConfig, scan: Scan | None = None) -> dict:
    """Train (or, with ``cfg.evaluate``, evaluate a checkpoint). ``scan``: the training split's scan, started
    early by the caller (:func:`fkd_dali.dataset.start_train_scan`, before torch is imported); by default
    the Trainer starts it."""
    if cfg.evaluate:
        if scan is not None:
            scan.cancel()
        return evaluate_checkpoint(cfg)
    return Trainer(cfg, scan).run()
