"""``fkd-dali train``: a student trained from a label store (FKD), or by another objective (hard labels, online KD,
Fast MEAL V2: :mod:`fkd_dali.objectives`), DDP via torchrun, checkpoints that resume exactly; ``-e`` evaluates a
checkpoint.

The pieces: the options (:mod:`fkd_dali.train_config`), the run's state (:class:`fkd_dali.trainer.Trainer`),
the loop (:mod:`fkd_dali.loop`), and how a student learns from a batch (an objective).
"""

from __future__ import annotations

import dataclasses

from . import checkpoint, objectives
from .dataset import Scan, split_dir
from .evaluate import evaluate
from .schedule import pass_index
from .train_config import DEFAULTS, PLAN_KEYS, RECIPES, TrainConfig, TrainError, recipe_config
from .trainer import Trainer


def evaluate_checkpoint(cfg: TrainConfig) -> dict:
    """``-e --resume CKPT``: top-1/top-5 of a checkpoint (ours or FKD's) on DATA/val."""
    cfg = cfg.resolved()
    if not cfg.resume:
        raise TrainError("-e needs --resume CKPT (the checkpoint to evaluate)")
    path = cfg.resume
    ckpt = checkpoint.load(path)
    made = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(made, dict) and not objectives.classifies(made):
        raise TrainError(f"{path} is a student of `fkd-dali train --labels {made.get('labels')}`, whose head does not "
                         "output class scores (a self-supervised student has no classifier), so -e has nothing to "
                         f"evaluate on DATA/val. Evaluate its backbone with a linear probe: fkd-dali linear-eval {path} "
                         f"{cfg.data}")
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


def train(cfg: TrainConfig, scan: Scan | None = None) -> dict:
    """Train (or, with ``cfg.evaluate``, evaluate a checkpoint). ``scan``: the training split's scan, started
    early by the caller (:func:`fkd_dali.dataset.start_train_scan`, before torch is imported); by default
    the Trainer starts it."""
    if cfg.evaluate:
        if scan is not None:
            scan.cancel()
        return evaluate_checkpoint(cfg)
    return Trainer(cfg, scan).run()


__all__ = ["DEFAULTS", "PLAN_KEYS", "RECIPES", "TrainConfig", "TrainError", "Trainer", "evaluate_checkpoint",
           "pass_index", "recipe_config", "train"]
