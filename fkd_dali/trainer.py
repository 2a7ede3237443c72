"""A training run's state, set up from its options: the process group, the student, its optimizer, EMA and
learning-rate schedule, the objective (how the student learns, :mod:`fkd_dali.objectives`), the plan, the
loaders, the position in the plan, and the checkpoint that holds all of it. The loop that drives a run is
:mod:`fkd_dali.loop`; neither knows any objective by name.

The dataset scan (a stat per file) starts first, in a child process when the dataset is large: it runs while
this process imports the model zoo, joins the process group and lets the objective start its own reading (FKD:
the label store's rows of the first pass). The CLI starts it before it imports torch (``scan``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

import labelstore
from pipelines import EvalLoader, check_loader_state

from . import backbone, checkpoint, distributed, loop, objectives, student_init
from .dataset import Scan, scan_image_folder, split_dir, start_train_scan
from .interrupt import GracefulStop
from .mixing import MixConfig
from .objectives.base import Objective
from .schedule import LRSchedule
from .train_config import DEFAULTS, PLAN_KEYS, TrainConfig, TrainError, check, notes


class Trainer:
    def __init__(self, cfg: TrainConfig, scan: Scan | None = None):
        self.objective: Objective | None = None
        try:
            if scan is None:
                scan = start_train_scan(cfg.data, cfg.evaluate)
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
            if self.objective is not None:
                self.objective.close()
            raise

    def _setup(self, cfg: TrainConfig, scan: Scan | None) -> None:
        self.cfg = cfg = cfg.resolved()
        # -e evaluates a checkpoint: no objective trains anything
        objective = Objective(cfg) if cfg.evaluate else objectives.create(cfg)
        check(cfg)
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
        if self.main and not cfg.evaluate:
            for line in notes(cfg):
                print(line, flush=True)
        self.train_set = None
        self.objective = objective
        self.segments = objective.segments()
        if not cfg.evaluate:
            objective.start(self)
        if scan is not None:
            self.train_set = scan.result()
        self.num_classes = self._num_classes()
        from .models import create_model  # noqa: PLC0415 - torchvision's import ran beside the scan (resolved())
        self.model = create_model(cfg.arch, self.num_classes, cfg.input_size, cfg.drop_path)
        if not cfg.evaluate:
            self.model = objective.student(self, self.model)
        if not cfg.evaluate and not cfg.resume:  # a resume restores the weights it trained
            self._init_student()
        if cfg.freeze_backbone and not cfg.evaluate:  # before the optimizer and DDP, which take the trained ones
            backbone.freeze_all_but_classifier(self.model)
        self.model = self.model.to(self.torch_device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = self.distributed(self.model)
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.model_ema_decay)) \
            if cfg.model_ema else None
        self.optimizer = self._optimizer()
        if not cfg.evaluate:
            objective.setup(self)
        self.lr_at = LRSchedule(cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr, cfg.cos,
                                cfg.schedule, cfg.linear)
        self.loaders: dict[Any, Any] = {}
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
        self.loader_states: dict = {}  # this rank's loaders' random state at the resume position, by key
        self.running: dict | None = None  # this rank's running sums of the segment under way (tensors)
        self.run_bar = None  # the whole-run bar (progress_style "run"), made by the first segment
        self.last_val: float | None = None  # the latest validation top-1, shown on the whole-run bar

    # ------------------------------------------------------------------ setup
    def distributed(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped for DDP when there is a process group (its gradients averaged over the ranks)."""
        if not self.dist.group:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.torch_device.index] if self.device == "gpu" else None)

    def _init_student(self) -> None:
        cfg = self.cfg
        classes_from = self.objective.classes_source()
        if cfg.init_backbone_from:
            found = backbone.read_backbone(cfg.init_backbone_from, cfg.arch)
            head = backbone.start_from(self.model, found)
            if self.main:
                print(f"student {cfg.arch}: the backbone of {cfg.init_backbone_from} ({found.source}"
                      + (f"; dropped {'; '.join(found.dropped)}" if found.dropped else "") + f"), a new classifier "
                      f"'{head}' ~ N(0, 0.01)" + ("; the backbone frozen, in eval mode" if cfg.freeze_backbone else ""),
                      flush=True)
            return
        if cfg.init_from:
            student_init.init_from_checkpoint(self.model, cfg.init_from, cfg.arch, self.num_classes, classes_from)
        elif cfg.pretrained_weights:
            student_init.init_from_torchvision(self.model, cfg.arch, cfg.pretrained_weights, self.num_classes,
                                               classes_from)
        else:
            return
        if self.main:
            print(f"student {cfg.arch} starts from {cfg.init_from or cfg.pretrained_weights}", flush=True)

    def _num_classes(self) -> int:
        cfg = self.cfg
        decided = None if cfg.evaluate else self.objective.num_classes(self)
        if decided is not None:
            return decided
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
        if cfg.opt == "adam":  # L2 weight decay in the gradient, as torch.optim.Adam (S2-BNN's)
            return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.opt_eps)
        raise TrainError(f"--opt must be sgd, adamw or adam, got {cfg.opt!r}")

    # ------------------------------------------------------------------ loaders
    def images_per_rank(self, crops: int) -> int:
        """Images each rank takes per step in a segment of ``crops`` crops per image (``-b`` counts crops)."""
        total = math.ceil(self.cfg.batch_size / crops)
        per = total // self.dist.world_size
        if per < 1:
            raise TrainError(f"-b {self.cfg.batch_size} crops gives {total} images per step, fewer than the "
                             f"{self.dist.world_size} ranks; raise -b")
        return per

    def loader_options(self) -> dict[str, Any]:
        """What every loader of this rank shares: device, rank, seed, threads, crop size, decoder settings."""
        cfg, d = self.cfg, self.dist
        return dict(device=self.device, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                    channels_last=self.channels_last, num_threads=cfg.workers, crop_size=cfg.input_size,
                    decoder=self.decoder)

    def loader(self, crops: int):
        """The objective's loader of segments with ``crops`` crops per image (made once, kept)."""
        if crops not in self.loaders:
            ld = self.objective.loader(self, crops)
            if crops in self.loader_states:  # its random crops go on as in the run that saved the checkpoint
                ld.restore(self.loader_states.pop(crops))
            self.loaders[crops] = ld
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

    def close(self) -> None:
        """Release the loaders and what the objective began."""
        for ld in self.loaders.values():
            ld.close()
        self.objective.close()

    # ------------------------------------------------------------------ the loop (fkd_dali.loop)
    def train_mode(self) -> None:
        """The student's mode while it trains: train mode, or eval mode throughout when its backbone is frozen
        (``freeze_backbone``: BatchNorm's running statistics and dropout stay as trained; MoCo's linear
        evaluation keeps the whole model in eval mode, since a BatchNorm in train mode updates its statistics
        without any gradient)."""
        self.ddp.train(not self.cfg.freeze_backbone)

    def step(self, batch: dict[str, torch.Tensor], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        return loop.train_step(self, batch, lr)

    def run(self) -> dict:
        return loop.train_run(self)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        mine = {"rng": checkpoint.rng_state(), "partial": loop.partial_sums(self.running),
                "loaders": {k: s for k, ld in self.loaders.items() if (s := ld.state()) is not None}}
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
                **self.objective.state_dict(),
                "epoch": self.segments[seg].start_epoch if seg < len(self.segments) else self.cfg.epochs,
                "segment": seg, "batch": batch, "global_step": self.global_step, "best_acc1": self.best_top1,
                "history": self.history, "rng": rngs, "world_size": self.dist.world_size,
                "partial": [x["partial"] for x in every], "loader_state": [x["loaders"] for x in every],
                "config": dataclasses.asdict(self.cfg)}

    def save(self, is_best: bool = False, last: bool = True) -> None:
        """The checkpoint of this position (``last``) and/or the best model's copy (``is_best``)."""
        state = self.state()  # every rank takes part (RNG gather)
        if self.main:
            checkpoint.save(state, self.cfg.output, is_best, last=last)
        if last:
            self.saved_at = self.position

    def save_due(self, seg) -> bool:
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
        keys = PLAN_KEYS + tuple(k for k in self.objective.plan_keys if k not in PLAN_KEYS)
        diffs = [f"{k}: {made.get(k, DEFAULTS[k])!r} -> {getattr(self.cfg, k)!r}" for k in keys
                 if _norm(made.get(k, DEFAULTS[k])) != _norm(getattr(self.cfg, k))]
        if ckpt.get("world_size") != self.dist.world_size:
            diffs.append(f"ranks: {ckpt.get('world_size')} -> {self.dist.world_size}")
        if diffs:
            made_recipe = made.get("recipe", DEFAULTS["recipe"])
            chosen = (f" (--recipe {self.cfg.recipe} was chosen by {', '.join(self.cfg.recipe_from)}: pass --recipe "
                      f"{made_recipe} to continue this run)") if self.cfg.recipe_from and made_recipe != self.cfg.recipe \
                else ""
            raise TrainError(f"{path} was made by a run with other settings ({'; '.join(diffs)}){chosen}; resume with "
                             "the same options to continue it exactly")
        self.objective.load_state_dict(ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.position = self.saved_at = (ckpt["segment"], ckpt["batch"])
        self.global_step = ckpt["global_step"]
        self.best_top1 = ckpt.get("best_acc1", 0.0)
        self.history = list(ckpt.get("history", []))
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.dist.world_size:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        partials = ckpt.get("partial") or []
        self.partial = partials[self.dist.rank] if len(partials) == self.dist.world_size else None
        self.loader_states = self._loader_states(ckpt, path)

    def _loader_states(self, ckpt: dict, path: str) -> dict:
        """This rank's loaders' random state in ``ckpt`` (checkpoints written before it was kept hold none: those
        loaders then draw fresh random crops), each checked before DALI reads it."""
        states = ckpt.get("loader_state") or []
        if not isinstance(states, list) or len(states) != self.dist.world_size:
            return {}
        mine = states[self.dist.rank]
        bad = "it is not a table of loaders" if not isinstance(mine, dict) else next(
            (f"loader {k!r}: {why}" for k, v in mine.items() if (why := check_loader_state(v))), None)
        if bad:
            raise TrainError(f"{path}: the loader state of rank {self.dist.rank} is damaged ({bad}); resume from an "
                             "intact checkpoint")
        return dict(mine)

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


def _norm(v):
    return list(v) if isinstance(v, tuple) else v

