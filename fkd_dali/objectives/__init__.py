"""Objectives — how a student learns from a batch (``base.py`` says what one is) — by name.

``--labels NAME`` picks one; ``--use-discriminator-loss`` (on in ``--recipe meal-v2``) picks Fast MEAL V2, which
learns from the same stored labels as ``fkd``. Adding an objective is adding its module and one line in
:data:`BUILTIN`, or calling :func:`register` (a plug-in, a test): the training loop, the checkpoints and the
command line take it from here. This module imports no torch, so the command line can list the names before
it starts the dataset scan; an objective's module is imported when a run creates it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any


@dataclasses.dataclass(frozen=True)
class Entry:
    factory: str | Callable[[Any], Any]  # "module:Class" (imported on use) or a callable taking the TrainConfig
    help: str
    labels: bool = True  # chosen by --labels (False: chosen by another option, see objective_name)


BUILTIN: dict[str, Entry] = {
    "fkd": Entry("fkd_dali.objectives.fkd:StoredSoftLabels", "stored crops and soft labels (default)"),
    "hard": Entry("fkd_dali.objectives.hard:HardLabels", "standard crops + ground truth"),
    "online": Entry("fkd_dali.objectives.online_kd:OnlineKD", "vanilla KD, a teacher on every crop"),
    "ssl": Entry("fkd_dali.objectives.ssl:StoredEmbeddings", "self-supervised FKD: stored views and teacher embeddings"),
    "ssl-online": Entry("fkd_dali.objectives.ssl:OnlineEmbeddings",
                        "a self-supervised teacher (--ssl-teacher) on every stored view"),
    "moco": Entry("fkd_dali.objectives.moco:MoCo", "self-supervised pretraining without labels (MoCo v2): a teacher "
                  "for --ssl-teacher"),
    "relabel": Entry("fkd_dali.objectives.relabel:RelabelKL",
                     "dataset distillation: a relabel store's mixed crops, SRe2L's KL (--temp)"),
    "relabel-mse": Entry("fkd_dali.objectives.relabel:RelabelMSE",
                         "dataset distillation: a relabel store, G-VBSM/EDC's mse_gt (--ce-weight)"),
    "meal-v2": Entry("fkd_dali.objectives.meal_v2:MealV2", "FKD's labels + MEAL V2's discriminator", labels=False),
}
_registry: dict[str, Entry] = dict(BUILTIN)


def register(name: str, factory: str | Callable[[Any], Any], help: str = "", labels: bool = True) -> None:
    """Make ``--labels name`` train with ``factory(cfg)`` (an :class:`~fkd_dali.objectives.base.Objective`)."""
    if name in BUILTIN:
        raise ValueError(f"objective {name!r} is built in; register yours under another name")
    _registry[name] = Entry(factory, help, labels)


def unregister(name: str) -> None:
    if name in BUILTIN:
        raise ValueError(f"objective {name!r} is built in")
    _registry.pop(name, None)


def label_choices() -> dict[str, str]:
    """The names ``--labels`` takes, with their one-line help."""
    return {name: e.help for name, e in _registry.items() if e.labels}


def objective_name(cfg) -> str:
    """The objective a run's options select."""
    return "meal-v2" if cfg.use_discriminator_loss else cfg.labels


def _factory(name: str):
    factory = _registry[name].factory
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def classifies(config: dict) -> bool:
    """Whether the run a checkpoint's recorded ``config`` describes trained a student whose output is class scores
    (its objective's ``reports_top1``): a self-supervised student's head outputs embeddings, no classes. An unknown
    objective, or a plug-in registered as a function, counts as one that classifies."""
    name = objective_name(SimpleNamespace(use_discriminator_loss=bool(config.get("use_discriminator_loss")),
                                          labels=config.get("labels")))
    if name not in _registry:
        return True
    return bool(getattr(_factory(name), "reports_top1", True))


def create(cfg):
    """The objective of a run (``cfg`` a resolved TrainConfig); an unknown ``--labels`` names the choices."""
    from ..train_config import TrainError  # noqa: PLC0415 - torch-free import of this module (see above)
    name = objective_name(cfg)
    if name not in _registry or (name == cfg.labels and not _registry[name].labels):
        choices = ", ".join(label_choices())
        raise TrainError(f"--labels must be one of {choices}, got {cfg.labels!r}")
    return _factory(name)(cfg)
