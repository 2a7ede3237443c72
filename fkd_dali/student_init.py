"""A student that starts from trained weights (MEAL V2 distils into a pretrained student): ``--init-from PATH``
or ``--pretrained-weights NAME``.

``--init-from`` takes any checkpoint ``-e`` reads — ours, FKD's (``state_dict`` under DDP's ``module.``),
MEAL V2's (a bare ``model.state_dict()`` of its DataParallel model, ``model_state_XX.pytar``), a plain
torchvision state_dict — through the same safe loading as ``--resume`` (``weights_only``: a checkpoint file
cannot run code). ``--pretrained-weights`` takes torchvision's published weights from the local torch hub
cache only (never downloaded during a run). Either way the weights must be for this architecture and this
run's classes: MEAL V2's student was trained on the classes it is distilled on, so a head of another class
count is refused with both counts and what to do, never silently re-initialised.
"""

from __future__ import annotations

import os

import torch

from . import checkpoint


class InitError(Exception):
    """The student's starting weights cannot be used; the message names the file and the fix."""


def classifier_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor], num_classes: int) -> tuple[str, int] | None:
    """(key, classes in ``sd``) when the weights differ from ``model`` only where the model has ``num_classes``
    outputs (its classifier), else None."""
    own = model.state_dict()
    if set(own) != set(sd):
        return None
    differ = [k for k in own if own[k].shape != sd[k].shape]
    if differ and all(own[k].shape[0] == num_classes and sd[k].shape[1:] == own[k].shape[1:] for k in differ):
        return differ[0], int(sd[differ[0]].shape[0])
    return None


def _check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, arch: str,
                    num_classes: int, classes_from: str) -> None:
    head = classifier_mismatch(model, sd, num_classes)
    if head is not None:
        key, theirs = head
        raise InitError(
            f"{source} has {theirs} classes ('{key}' has shape {tuple(sd[key].shape)}), this run has {num_classes} "
            f"({classes_from}). MEAL V2 distils into a student already trained on the same classes: "
            + (_more_classes_route(theirs) if theirs > num_classes else "")
            + f"start from a checkpoint trained on these {num_classes} classes (e.g. `fkd-dali train --labels hard "
            f"-a {arch} ...`), or leave --init-from/--pretrained-weights out to start from scratch")
    why = checkpoint.state_mismatch(model, sd, arch)
    if why:
        raise InitError(f"{source} {why}; give the checkpoint of a {arch} (-a names the student's architecture)")
    model.load_state_dict(sd)


def _more_classes_route(theirs: int) -> str:
    """How to start from weights with more outputs than the run's classes (MEAL V2's checkpoints and
    torchvision's ImageNet weights always have 1000): give the run their classes."""
    return (f"to start from these weights, give the run their {theirs} classes — a label store generated with "
            f"`fkd-dali generate DATA --num-classes {theirs} ...` by teachers of those {theirs} classes (e.g. "
            f"ImageNet-1k's; accuracy then counts class folder i as their class i, see docs/reliability.md), or "
            f"--num-classes {theirs} with --labels hard; or ")


def init_from_checkpoint(model: torch.nn.Module, path: str, arch: str, num_classes: int, classes_from: str) -> None:
    """Load ``path``'s weights into the fresh ``model`` (any checkpoint format ``-e`` reads)."""
    try:
        ckpt = checkpoint.load(path)
        made_for = None if checkpoint.is_bare_state_dict(ckpt) or not isinstance(ckpt, dict) else ckpt.get("arch")
        if made_for is not None and made_for != arch:
            raise InitError(f"--init-from {path} is a checkpoint of {made_for}, not {arch}; pass -a {made_for} or "
                            f"the checkpoint of a {arch}")
        sd = checkpoint.model_state(ckpt, path)
    except checkpoint.CheckpointError as e:
        raise InitError(f"--init-from: {e}") from e
    _check_and_load(model, sd, f"--init-from {path}", arch, num_classes, classes_from)


def init_from_torchvision(model: torch.nn.Module, arch: str, weights: str, num_classes: int,
                          classes_from: str) -> None:
    """Load torchvision's published ``weights`` (e.g. IMAGENET1K_V1, DEFAULT) for ``arch`` from the local hub
    cache into ``model``."""
    from .teachers import TeacherError, cached_weights  # noqa: PLC0415 - torchvision: see train.Trainer.resolved
    try:
        entry = cached_weights(arch, weights, file_flag="--init-from FILE")
    except TeacherError as e:
        raise InitError(f"--pretrained-weights: {e}") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
    try:
        sd = checkpoint.model_state(checkpoint.load(path), path)
    except checkpoint.CheckpointError as e:
        raise InitError(f"--pretrained-weights {arch} {entry.name}: {e}") from e
    _check_and_load(model, sd, f"--pretrained-weights {arch} {entry.name}", arch, num_classes, classes_from)
