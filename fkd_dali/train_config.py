"""What a ``train`` run is asked to do: :class:`TrainConfig` (every option, FKD's defaults), the recipes
(``--recipe``: another paper's defaults under the options given), the options a resume must agree on, and the
checks of options that do not depend on how the student learns."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from pipelines import DecoderOptions

from . import meal, ssl_distill
from .relabel_losses import RELABEL_LABELS, SRE2L_RECIPE


class TrainError(Exception):
    """Training cannot start or go on; the message names the problem and the fix."""


@dataclasses.dataclass
class TrainConfig:
    data: str
    arch: str = "resnet50"
    labels: str = "fkd"  # how the student learns: an objective's name (fkd_dali.objectives: fkd | hard | online | ssl)
    softlabel_path: str | None = None
    soft_label_type: str = "marginal_smoothing_k5"
    temperature: float = 1.0
    num_crops: int = 4
    batch_size: int = 1024  # crops per optimizer step, all ranks together (FKD's -b)
    epochs: int = 300
    input_size: int = 224
    opt: str | None = None  # sgd | adamw | adam; default by architecture family
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    cos: bool = True
    linear: bool = False  # lr * (1 - t / epochs) (S2-BNN's schedule); wins over cos and the steps
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
    ssl_teacher: str | None = None  # --labels ssl-online: the self-supervised teacher(s) (fkd_dali.ssl_teachers)
    ssl_head: str | None = None
    ssl_loss: str = "kl"  # --labels ssl / ssl-online: kl (S2-BNN's), cosine, mse
    ssl_views: str = "fresh"  # --labels ssl-online: fresh (new views every pass) or stored (the store's views)
    moco_k: int = 65536  # --labels moco: the queue's keys (MoCo's --moco-k)
    moco_m: float = 0.999  # --labels moco: the key encoder's momentum (--moco-m)
    moco_dim: int = 128  # --labels moco: the embedding size (--moco-dim)
    ce_weight: float = 0.1  # --labels relabel-mse: G-VBSM/EDC's cross-entropy weight (G-VBSM 0.1, EDC's scripts 0.025)
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
    init_backbone_from: str | None = None  # ... or the backbone of a checkpoint (fkd_dali.backbone), a new classifier
    freeze_backbone: bool = False  # train the classifier alone; the rest frozen and in eval mode (a linear probe)
    use_discriminator_loss: bool = False  # MEAL V2's discriminator on the student's softmax vs the soft labels
    d_lr: float = 1e-4  # the discriminator's own (constant) learning rate
    recipe_from: tuple[str, ...] = ()  # the options of MEAL V2's own that chose the recipe (--recipe not given)
    unused: tuple[str, ...] = ()  # options accepted for MEAL V2's command line and not used (e.g. --teacher-model)

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


# Options that define the run's plan: a resume must agree on them (and on its objective's own plan_keys).
PLAN_KEYS = ("arch", "labels", "num_crops", "batch_size", "epochs", "input_size", "opt", "lr", "weight_decay",
             "cos", "warmup_epochs", "soft_label_type", "temperature", "mixup_cutmix", "seed", "label_smoothing",
             "scale", "recipe", "use_discriminator_loss", "d_lr", "init_backbone_from", "freeze_backbone",
             "linear")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # of keys older checkpoints lack

# MoCo's linear evaluation (facebookresearch/moco main_lincls.py, kept by S2-BNN's Distillation_only/step2): a new
# Linear classifier on the frozen backbone, kept in eval mode; cross-entropy on RandomResizedCrop + flip, SGD
# momentum 0.9, no weight decay, 100 epochs, lr x0.1 at 60 and 80, batch 256. lr 30 is main_lincls.py's default
# and MoCo's README command (ResNet-50); S2-BNN's README evaluates its binary ReActNet with --lr 0.1.
LINEAR_EVAL = {"labels": "hard", "opt": "sgd", "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "epochs": 100,
               "cos": False, "schedule": (60, 80), "batch_size": 256, "num_crops": 1, "freeze_backbone": True}

# MoCo v2 (facebookresearch/moco main_moco.py --mlp --moco-t 0.2 --aug-plus --cos): SGD momentum 0.9, weight decay
# 1e-4, 200 epochs, cosine, T 0.2, 256 images a step (-b counts views here: two per image, 512) at lr 0.03, the lr
# scaled with the batch when -b is given (0.03 x images / 256; recipe_config). Chosen for --labels moco.
MOCO_V2_RECIPE = {"labels": "moco", "opt": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 200,
                  "cos": True, "linear": False, "temperature": 0.2, "batch_size": 512, "warmup_epochs": 0}
MOCO_VIEWS = 2  # views per image of --labels moco (fkd_dali.objectives.moco.VIEWS)

# Defaults by --recipe; options given explicitly win (recipe_config). fkd: TrainConfig's own (FKD's).
RECIPES: dict[str, dict[str, Any]] = {"fkd": {}, "meal-v2": meal.RECIPE, "linear-eval": LINEAR_EVAL,
                                     "s2-bnn": ssl_distill.RECIPE, "sre2l": SRE2L_RECIPE, "moco-v2": MOCO_V2_RECIPE}
SSL_LABELS = ("ssl", "ssl-online")  # the objectives that learn embeddings (--recipe s2-bnn's)


def choose_recipe(recipe: str | None, meal_options: Sequence[str], labels: str | None = None) -> str:
    """``--recipe`` as given; when it is not: meal-v2 if the command line uses options of MEAL V2's own
    (``meal_options``: its spellings, or its discriminator on a trained start), else fkd. A user of MEAL V2 who
    types MEAL V2's command expects MEAL V2's defaults (lr 0.01, no weight decay), not FKD's (lr 0.1, wd 1e-4,
    made for a student trained from scratch, which would undo a trained start); the run says which it took
    (:func:`notes`), and the choice is recorded, so the same command resumes the same plan."""
    if recipe is not None:
        return recipe
    if labels == "moco":  # MoCo's own defaults, not FKD's (T 1, lr 0.1, steps) made for distillation
        return "moco-v2"
    return "meal-v2" if meal_options else "fkd"


def recipe_config(recipe: str = "fkd", **options) -> TrainConfig:
    """A TrainConfig with ``recipe``'s defaults under ``options`` (an option left None takes the recipe's
    default, then TrainConfig's)."""
    if recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**RECIPES[recipe], **given}
    if recipe == "moco-v2" and "lr" not in given:  # MoCo's lr 0.03 is for 256 images a step: linear scaling
        merged["lr"] = MOCO_V2_RECIPE["lr"] * merged["batch_size"] / MOCO_VIEWS / 256
    return TrainConfig(recipe=recipe, **merged)




def check(cfg: TrainConfig) -> None:
    """Refuse options that cannot make a run, whatever the objective (``cfg`` resolved)."""
    if cfg.recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    if cfg.init_from and cfg.pretrained_weights:
        raise TrainError("give either --init-from FILE or --pretrained-weights NAME, not both")
    if cfg.init_backbone_from and (cfg.init_from or cfg.pretrained_weights):
        raise TrainError(f"the student starts from the backbone of {cfg.init_backbone_from}: give no --init-from or "
                         "--pretrained-weights besides it")
    if cfg.recipe == "meal-v2" and cfg.labels != "fkd":
        raise TrainError(MEAL_NEEDS_STORE)
    if cfg.recipe == "s2-bnn" and cfg.labels not in SSL_LABELS:
        raise TrainError(f"--recipe s2-bnn distils a self-supervised teacher's embeddings: use it with --labels ssl "
                         f"(an embedding store from `fkd-dali generate --ssl-teacher`) or ssl-online, not --labels "
                         f"{cfg.labels}")
    if cfg.recipe == "moco-v2" and cfg.labels != "moco":
        raise TrainError(f"--recipe moco-v2 pretrains without labels: use it with --labels moco, not --labels "
                         f"{cfg.labels}")
    if cfg.recipe == "sre2l" and cfg.labels not in RELABEL_LABELS:
        raise TrainError(f"--recipe sre2l trains a student on a relabel store (dataset distillation): use it with "
                         f"--labels relabel (SRe2L's KL) or relabel-mse (G-VBSM / EDC's mse_gt), not --labels "
                         f"{cfg.labels}")
    if cfg.recipe == "meal-v2" and not (cfg.init_from or cfg.pretrained_weights or cfg.resume or cfg.evaluate):
        chosen = f" (chosen by MEAL V2's {', '.join(cfg.recipe_from)})" if cfg.recipe_from else ""
        raise TrainError(f"--recipe meal-v2{chosen} distils into a student that is already trained: pass "
                         "--init-from CHECKPOINT (alias --student-state-file; e.g. a hard-label run of this dataset) "
                         "or --pretrained-weights NAME (MEAL V2's FKD_train.py silently starts from timm's "
                         "pretrained --model; here the start is named); to start from scratch, pass --recipe fkd "
                         "(with --use-discriminator-loss if wanted)")
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


def notes(cfg: TrainConfig) -> list[str]:
    """What a run says when it starts about options it chose or did not use (``cfg`` resolved)."""
    out = []
    values = f"lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, {cfg.num_crops} crops, -b {cfg.batch_size}, " \
             f"{cfg.epochs} epochs, discriminator {'on' if cfg.use_discriminator_loss else 'off'}"
    if cfg.recipe_from:
        out.append(f"recipe meal-v2 ({values}): chosen because the command uses MEAL V2's "
                   f"{', '.join(cfg.recipe_from)}; pass --recipe fkd for FKD's defaults")
    elif cfg.recipe == "fkd" and cfg.use_discriminator_loss:
        out.append(f"recipe fkd ({values}): FKD's defaults, for a student trained from scratch; MEAL V2's "
                   "(lr 0.01, no weight decay, from a trained student) are --recipe meal-v2 with --init-from")
    if cfg.recipe == "sre2l":
        out.append(f"recipe sre2l: SRe2L's train_FKD.py defaults (AdamW lr {cfg.lr:g}, weight decay "
                   f"{cfg.weight_decay:g}, -b {cfg.batch_size}, {cfg.epochs} epochs, "
                   f"{'cosine' if cfg.cos else 'linear' if cfg.linear else 'step'} schedule, --temp "
                   f"{cfg.temperature:g}, no label smoothing, {cfg.input_size} px); SRe2L's README command uses -T 20")
    elif cfg.labels in RELABEL_LABELS:
        out.append(f"--labels {cfg.labels} on recipe {cfg.recipe} (lr {cfg.lr:g}, --temp {cfg.temperature:g}); "
                   "SRe2L's trainer defaults (AdamW lr 0.001, wd 0.01, cosine, --temp 3) are --recipe sre2l")
    if cfg.recipe == "moco-v2":
        out.append(f"recipe moco-v2: MoCo v2's main_moco.py defaults (--mlp --moco-t 0.2 --aug-plus --cos): SGD lr "
                   f"{cfg.lr:g} (0.03 x images a step / 256 unless --lr is given), momentum {cfg.momentum:g}, weight "
                   f"decay {cfg.weight_decay:g}, -b {cfg.batch_size} views ({cfg.batch_size // MOCO_VIEWS} images), "
                   f"{cfg.epochs} epochs, {'cosine' if cfg.cos else 'linear' if cfg.linear else 'step'} schedule, "
                   f"--temp {cfg.temperature:g}; options given win")
    elif cfg.labels == "moco":
        out.append(f"--labels moco on recipe {cfg.recipe} (lr {cfg.lr:g}, --temp {cfg.temperature:g}); MoCo v2's "
                   "defaults (SGD lr 0.03 x images / 256, wd 1e-4, cosine, 200 epochs, --temp 0.2) are --recipe moco-v2")
    if cfg.unused:
        out.append(f"{', '.join(cfg.unused)}: accepted for MEAL V2's command line and not used: the soft labels "
                   f"come from --softlabel-path {cfg.softlabel_path} (MEAL V2's FKD_train.py does not read it either)")
    return out


MEAL_NEEDS_STORE = ("--recipe meal-v2 and --use-discriminator-loss train on stored soft labels: use them with "
                    "--labels fkd and --softlabel-path STORE (an ensemble store: generate -a a,b)")
