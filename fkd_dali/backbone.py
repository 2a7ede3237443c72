"""A trained network's backbone, for a student that keeps it and learns a new classifier on top (the linear
probe of ``fkd-dali linear-eval``: :mod:`fkd_dali.linear_eval`).

The backbone of a model is every weight outside its classifier, the model's last Linear module
(:func:`fkd_dali.models.classifier_name`: ``fc`` of a ResNet or ReActNet). What a checkpoint holds there is
dropped: a classifier, or the MLP projection head a self-supervised student has in place of ``fc``. Two kinds of
file hold one:

* a checkpoint written by ``fkd-dali train`` (any objective; or FKD's, MEAL V2's: a dict with ``arch`` and
  ``state_dict``): the architecture is the recorded one;
* a self-supervised checkpoint in a layout :mod:`fkd_dali.ssl_teachers` reads (MoCo v1/v2/v3, SwAV, DINO, a
  ResNet backbone alone, or ``ARCH:PATH``): its backbone, the architecture read from its keys (MoCo's
  ``encoder_k``, ``queue`` and the projection heads are dropped, as MoCo's ``main_lincls.py`` keeps only
  ``encoder_q`` up to ``fc``).

A file with no weight outside the classifier, of an unknown layout, or of another architecture than asked is
refused naming what it holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import torch
from torch import nn

from . import checkpoint
from .models import ModelError, classifier_name, create_model


class BackboneError(Exception):
    """A checkpoint holds no backbone that can be used; the message names the file, what it holds and the fix."""


@dataclasses.dataclass
class Backbone:
    arch: str
    state: dict[str, torch.Tensor]  # the keys of create_model(arch)'s state outside its classifier
    source: str  # what the file is, in words
    dropped: list[str]  # what the file holds besides the backbone, as key groups with counts
    input_size: int = 224  # the size a recorded ViT's position embeddings were made for


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".")


def _groups(keys) -> str:
    counts = Counter(k.split(".", 1)[0] + (".*" if "." in k else "") for k in keys)
    shown = ", ".join(f"{k} ({n})" for k, n in counts.most_common(8))
    return shown + (f" and {len(counts) - 8} more" if len(counts) > 8 else "")


def read_backbone(text: str, arch: str | None = None) -> Backbone:
    """The backbone in the file ``text`` (``PATH`` or ``ARCH:PATH``); ``arch``: the architecture it must be."""
    from .ssl_teachers import parse_embedding_teacher  # noqa: PLC0415 - torchvision (see models/__init__)
    from .teachers import TeacherError  # noqa: PLC0415
    try:
        spec = parse_embedding_teacher(text, head="none")
    except TeacherError as e:
        raise BackboneError(str(e)) from None
    if not os.path.isfile(spec.path):
        raise BackboneError(f"checkpoint {spec.path} does not exist: give a checkpoint of `fkd-dali train` or a "
                            "self-supervised checkpoint (MoCo, SwAV, DINO, or ARCH:PATH)")
    found = None
    if spec.arch is None:
        try:
            ckpt = checkpoint.load(spec.path)
        except checkpoint.CheckpointError:
            ckpt = None  # e.g. DINO's (its argparse 'args'): the self-supervised route reads it, or names why not
        if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), str):
            try:
                found = _of_model_checkpoint(ckpt, spec.path)
            except BackboneError:
                if "config" in ckpt:  # ours: its recorded arch is the truth
                    raise
                # an 'arch' beside other keys (MoCo's main_moco.py records one): a self-supervised layout?
    if found is None:
        found = _of_ssl_checkpoint(spec)
    if arch is not None and found.arch != arch:
        raise BackboneError(f"{spec.path} holds the backbone of a {found.arch}, not of a {arch}; leave -a out (the "
                            f"checkpoint says its architecture) or give the checkpoint of a {arch}")
    return found


def _of_model_checkpoint(ckpt: dict, path: str) -> Backbone:
    arch = ckpt["arch"]
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    size = int(config.get("input_size", 224))
    try:
        sd = checkpoint.model_state(ckpt, path)
        model = create_model(arch, int(ckpt.get("num_classes") or 1), size)
    except (checkpoint.CheckpointError, ModelError) as e:
        raise BackboneError(f"{path}: {e}") from None
    head = classifier_name(model)
    state = {k: v for k, v in sd.items() if not _under(k, head)}
    dropped = [k for k in sd if _under(k, head)]
    if not state:
        raise BackboneError(f"{path} holds no backbone: its {len(sd)} weights are {_groups(sd)}, all of them the "
                            f"{arch}'s classifier '{head}'. Give the checkpoint of the whole network")
    own = {k: v for k, v in model.state_dict().items() if not _under(k, head)}
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        raise BackboneError(f"{path} is recorded as a {arch} but its backbone does not fit one: {len(missing)} "
                            f"missing weights (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                            f"{unexpected[:3]}). The file is damaged or of another architecture")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise BackboneError(f"{path}: '{k}' has shape {tuple(v.shape)}, a {arch} at {size} px needs "
                                f"{tuple(own[k].shape)}; the file is damaged or of another architecture")
    labels = config.get("labels")
    source = f"a {arch} trained by `fkd-dali train --labels {labels}`" if labels else f"a {arch} checkpoint"
    return Backbone(arch, state, source, [f"{_groups(dropped)} (its {head})"] if dropped else [], size)


def _of_ssl_checkpoint(spec) -> Backbone:
    from .ssl_teachers import load_embedding_teacher  # noqa: PLC0415
    from .teachers import TeacherError  # noqa: PLC0415
    try:
        teacher = load_embedding_teacher(spec)  # head "none": the backbone alone, its head dropped and said so
    except TeacherError as e:
        raise BackboneError(f"{spec.path} is neither a checkpoint of `fkd-dali train` (no architecture recorded) "
                            f"nor a self-supervised checkpoint of a known layout: {e}") from None
    info = teacher.describe()
    return Backbone(info["arch"], dict(teacher.backbone.state_dict()),
                    f"the {info['arch']} backbone of a {info['format']} checkpoint", list(info["dropped"]))


def start_from(model: nn.Module, backbone: Backbone) -> str:
    """Load ``backbone`` into ``model`` (built for its architecture) and start the classifier anew as MoCo's
    linear evaluation does: weight ~ N(0, 0.01), bias 0. Returns the classifier's name."""
    head = classifier_name(model)
    own = model.state_dict()
    keys = [k for k in own if not _under(k, head)]
    if sorted(keys) != sorted(backbone.state) or any(own[k].shape != backbone.state[k].shape for k in keys):
        raise BackboneError(f"the backbone ({backbone.source}) does not fit a {backbone.arch} at this input size: "
                            f"give --input-size {backbone.input_size}, the size it was trained at")
    model.load_state_dict({**own, **backbone.state})
    linear = model.get_submodule(head)
    nn.init.normal_(linear.weight, mean=0.0, std=0.01)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return head


def freeze_all_but_classifier(model: nn.Module) -> str:
    """Every parameter of ``model`` but its classifier's stops learning (``requires_grad`` off). Returns the
    classifier's name."""
    head = classifier_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(_under(name, head))
    return head


def changed(model: nn.Module, backbone: Backbone) -> list[str]:
    """The weights and buffers of ``model``'s backbone that are not bit for bit ``backbone``'s (MoCo's sanity
    check after a linear probe: nothing of the frozen network may change, BatchNorm statistics included)."""
    own = model.state_dict()
    return [k for k, v in backbone.state.items() if not torch.equal(own[k].detach().cpu(), v.cpu())]
