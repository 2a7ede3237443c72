"""Self-supervised teachers: checkpoints of MoCo, MoCo v3, SwAV, DINO (or a torchvision backbone with a head the
user describes) loaded as a module that maps normalised images (N, 3, H, W) to L2-normalised (N, D) float32
embeddings, for stores of per-crop embeddings (FKD-SSL, issue 22).

The layout is read from the checkpoint's keys (after DDP's ``module.`` prefix); each is the one its repository
writes, read at the commit named:

=============  ======================================================  ==========================================
format         keys (what the repository saves)                        embedding (what this loader returns)
=============  ======================================================  ==========================================
``moco_v1``    ``state_dict``: ``encoder_q.*`` (a torchvision ResNet,   ``normalize(encoder_q(x))``: MoCo's query,
``moco_v2``    ``fc`` = Linear(2048, 128); v2's ``--mlp``: ``fc.0``    128-d; S2-BNN's teacher exactly
               Linear(2048, 2048), ReLU, ``fc.2`` Linear(2048, 128)),  (szq0214/S2-BNN @6eeda81,
               ``encoder_k.*``, ``queue``, ``queue_ptr`` (dropped).    ``Distillation_only/step1/moco/
               facebookresearch/moco @4397a04 ``moco/builder.py``,     builder_teacher.py``: only ``encoder_q``,
               ``main_moco.py``                                        L2-normalised)
``moco_v3``    ``state_dict``: ``base_encoder.*`` (ResNet, ``fc`` = the ``normalize(fc(backbone(x)))``: the base
               projector Linear(2048, 4096, no bias), BN, ReLU,        encoder's projector, 256-d. The predictor
               Linear(4096, 256, no bias), BN(affine=False)),          only maps it onto the momentum encoder's
               ``momentum_encoder.*``, ``predictor.*`` (dropped).      space during training, and the base
               facebookresearch/moco-v3 @c349e6e ``moco/builder.py``   encoder is what MoCo v3 evaluates and
               (``MoCo_ResNet``). ViT checkpoints are refused.         transfers (``main_lincls.py``)
``swav``       a bare state_dict (``swav_800ep_pretrain.pth.tar``) or  ``normalize(projection_head(backbone(x)))``:
               ``state_dict``: torchvision ResNet keys (SwAV's          the normalised projection SwAV computes
               ``padding`` + conv1 padding 2 = torchvision's padding   its codes from, 128-d
               3), ``projection_head.0`` Linear(2048, 2048),
               ``.1`` BN, ReLU, ``.3`` Linear(2048, 128) (or one
               Linear), ``prototypes*`` (dropped).
               facebookresearch/swav @06b1b7c ``src/resnet50.py``
``dino``       the full checkpoint: ``teacher`` / ``student`` dicts,   ``normalize(head.mlp(backbone(x)))``: the
               ``backbone.*`` (torchvision ResNet, ``fc`` removed),    head's 256-d bottleneck, which DINOHead
               ``head.mlp.*`` (Linear, [BN], GELU, ..., Linear) and    itself normalises before its last layer;
               ``head.last_layer.weight_g/_v`` (dropped), ``args``     the (EMA) ``teacher``, which DINO
               (an argparse.Namespace, allowed). facebookresearch/dino evaluates; the 65536 prototype logits
               @7c446df ``main_dino.py``, ``vision_transformer.py``    are not an embedding
               (``DINOHead``), ``utils.py`` (``MultiCropWrapper``)
``fkd_dali``   a checkpoint of ``fkd-dali train --labels moco`` (or     ``normalize(fc(backbone(x)))``: the MLP
               ``ssl``/``ssl-online``): ``config`` (the run's options)  head's D-d output, MoCo v2's query exactly
               and ``state_dict``: a torchvision ResNet whose ``fc``
               is ``fc.0`` Linear(F, F), ReLU, ``fc.2`` Linear(F, D)
               (``moco``: key encoder and queue, dropped)
``backbone``   a ResNet without ``fc`` (DINO's                         the pooled features, L2-normalised
               ``dino_resnet50_pretrain.pth``)                         (2048-d for a ResNet-50)
``torchvision``  ``ARCH:PATH``: a torchvision model's state_dict       ``normalize(head(features(x)))``; the
               (its last Linear, the classifier, removed) and a head   features are the classifier's input
               the user describes (below)
=============  ======================================================  ==========================================

The official checkpoints are ResNet-50s; the ResNet is read from the keys (blocks per stage, widths), so MoCo /
SwAV / DINO runs of torchvision's other ResNets load too. SwAV's widened ResNets (RN50-w2/w4/w5) and the ViTs of MoCo v3
and DINO are refused by name.

A user's head (``head=``): ``none`` (the pooled features) or ``mlp:W0-W1-...-D[@PREFIX]``: Linear layers of
those widths with ReLU between them (a BatchNorm1d after a hidden Linear where the keys hold one, as SimCLR's
and SwAV's heads), stored at ``PREFIX`` (default: where the classifier was, e.g. ``fc.0``, ``fc.2`` as MoCo v2
stores its MLP). ``none`` also gives any official format's pooled features instead of its head's embedding.

Checkpoints are untrusted input: ``torch.load(weights_only=True)`` (plus argparse.Namespace, the one object
DINO's checkpoints hold), the backbone from a fixed table, heads of at most ``MAX_HEAD_MODULES`` modules and
``MAX_WIDTH`` features, and errors that name the file, the key and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checkpoint import read_untrusted, strip_ddp_prefix
from .models import ModelError, available, classifier_name, create_model, torchvision_models, without_classifier
from .teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherError, file_digest

MAX_WIDTH = 1 << 16  # features of one head layer (DINO's widest hidden layer: 2048; its prototypes, dropped: 65536)
MAX_HEAD_MODULES = 16

#: What the layouts are called in the messages, with the keys that tell them.
KNOWN = ("MoCo v1/v2 (encoder_q.*, encoder_k.*, queue), MoCo v3 ResNet (base_encoder.*, momentum_encoder.*, "
         "predictor.*), SwAV (conv1.*, layer1-4.*, projection_head.*, prototypes.*), DINO's full checkpoint "
         "(teacher/student: backbone.*, head.*), a ResNet backbone alone (conv1.*, layer1-4.*, no fc, as DINO's "
         "dino_resnet50_pretrain.pth), fkd-dali's own (train --labels moco or ssl: config, state_dict with a ResNet "
         "and fc.0/fc.2); or name a torchvision architecture and its head: ARCH:PATH with head "
         "'none' or 'mlp:IN-...-D'")

# torchvision's ResNets by (bottleneck, blocks per stage, layer1's first width, groups).
RESNETS = {(False, (2, 2, 2, 2), 64, 1): "resnet18", (False, (3, 4, 6, 3), 64, 1): "resnet34",
           (True, (3, 4, 6, 3), 64, 1): "resnet50", (True, (3, 4, 23, 3), 64, 1): "resnet101",
           (True, (3, 8, 36, 3), 64, 1): "resnet152", (True, (3, 4, 6, 3), 128, 1): "wide_resnet50_2",
           (True, (3, 4, 23, 3), 128, 1): "wide_resnet101_2", (True, (3, 4, 6, 3), 128, 32): "resnext50_32x4d",
           (True, (3, 4, 23, 3), 256, 32): "resnext101_32x8d", (True, (3, 4, 23, 3), 256, 64): "resnext101_64x4d"}
_VIT = re.compile(r"(^|\.)(pos_embed|cls_token)$|(^|\.)patch_embed\.")  # MoCo v3's vits.py, DINO's (timm's keys)


@dataclasses.dataclass
class EmbeddingTeacherSpec:
    """One self-supervised teacher: its file, optionally its torchvision architecture and head, and its view."""

    path: str
    arch: str | None = None
    head: str | None = None
    input_size: int = 224
    interpolation: str = "bilinear"  # MoCo's, S2-BNN's and SwAV's RandomResizedCrop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def view(self) -> tuple:
        return (self.input_size, self.interpolation, tuple(self.mean), tuple(self.std))


def parse_embedding_teacher(text: str, head: str | None = None) -> EmbeddingTeacherSpec:
    """``PATH`` (the layout read from the keys) or ``ARCH:PATH`` (a torchvision architecture), with ``head``."""
    arch, sep, rest = text.partition(":")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", arch) and not os.path.exists(text):
        if arch not in torchvision_models():
            raise TeacherError(f"'{arch}' in '{text}' is not a torchvision architecture: give ARCH:PATH with a "
                               "torchvision classification model (e.g. resnet50:weights.pth), or the checkpoint's "
                               "path alone for MoCo, MoCo v3, SwAV and DINO files")
        return EmbeddingTeacherSpec(path=rest, arch=arch, head=head)
    return EmbeddingTeacherSpec(path=text, head=head)


def parse_embedding_teachers(text: str, head: str | None = None, input_size: int | None = None,
                             interpolation: str | None = None, mean: Sequence[float] | None = None,
                             std: Sequence[float] | None = None) -> list[EmbeddingTeacherSpec]:
    """The specs of ``--ssl-teacher A[,B...]`` (an ensemble when several; each ``PATH`` or ``ARCH:PATH``) with
    ``--ssl-head`` (one for all, or one per teacher, comma-separated) and the view options given (None: the
    spec's defaults, MoCo's bilinear 224-px ImageNet-normalised view)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise TeacherError("--ssl-teacher needs a checkpoint: PATH (MoCo, MoCo v3, SwAV, DINO) or ARCH:PATH")
    heads = [h.strip() for h in head.split(",")] if head else [None]
    if len(heads) not in (1, len(items)):
        raise TeacherError(f"--ssl-head has {len(heads)} values for {len(items)} teachers; give one, or one per "
                           "teacher (comma-separated)")
    specs = []
    for item, h in zip(items, heads * len(items) if len(heads) == 1 else heads):
        spec = parse_embedding_teacher(item, h or None)
        spec.input_size = input_size or spec.input_size
        spec.interpolation = interpolation or spec.interpolation
        spec.mean = tuple(mean) if mean is not None else spec.mean
        spec.std = tuple(std) if std is not None else spec.std
        specs.append(spec)
    return specs


@dataclasses.dataclass
class _Layout:
    """Where a checkpoint keeps its backbone and head."""

    format: str
    state: dict[str, torch.Tensor]
    backbone: str  # key prefix of the backbone ("" for top-level keys)
    head: str | None  # key prefix of the head module, None without one
    activation: type[nn.Module]
    pattern: str  # the head's module kinds (see _kind; S: held in an nn.Sequential), as a regex
    expected: str  # the head, in words, for the messages
    embedding: str
    dropped: list[str]
    arch: str | None = None  # the architecture the checkpoint names (format fkd_dali: its config's arch)
    image_size: int = 224  # the input size it was built for (the project's ReActNet / tiny models take it)


class EmbeddingTeacher(nn.Module):
    """backbone -> head -> L2 normalisation, in float32; ``dim`` and ``describe()`` for the store."""

    def __init__(self, backbone: nn.Module, head: nn.Module, dim: int, info: dict[str, Any],
                 spec: EmbeddingTeacherSpec):
        super().__init__()
        self.backbone, self.head, self.dim, self.info, self.spec = backbone, head, dim, info, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.backbone(x)).float(), dim=1)

    def describe(self) -> dict[str, Any]:
        return dict(self.info)


class EmbeddingEnsemble(nn.Module):
    """The mean of its teachers' L2-normalised embeddings, normalised again."""

    def __init__(self, members: Sequence[EmbeddingTeacher]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dim = members[0].dim
        self.spec = members[0].spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(torch.stack([m(x) for m in self.members]).mean(0), dim=1)

    def describe(self) -> dict[str, Any]:
        return {"format": "ensemble", "dim": self.dim, "members": [m.describe() for m in self.members]}


def load_embedding_teacher(spec: str | EmbeddingTeacherSpec | Sequence[str | EmbeddingTeacherSpec],
                           device: str | torch.device = "cpu") -> EmbeddingTeacher | EmbeddingEnsemble:
    """The teacher (or the ensemble of a list of them) in eval mode, frozen, on ``device``."""
    if isinstance(spec, (list, tuple)):
        return _ensemble([load_embedding_teacher(s, device) for s in spec])
    if isinstance(spec, str):
        spec = parse_embedding_teacher(spec)
    layout = _layout(_read(spec.path), spec)
    model, arch, classifier, features = _model(layout, spec)
    head_prefix = _head_prefix(layout, spec, layout.backbone + classifier)
    _load_backbone(model, layout, spec, arch, classifier, head_prefix)
    head, dim = _head(layout, spec, head_prefix, features)
    embedding = layout.embedding if head_prefix else f"{arch} pooled features ({layout.format}), L2-normalised"
    info = {"format": layout.format, "arch": arch, "dim": dim, "embedding": embedding,
            "source": os.path.abspath(spec.path), "sha256": file_digest(spec.path), "dropped": layout.dropped,
            "input_size": spec.input_size, "interpolation": spec.interpolation, "mean": list(spec.mean),
            "std": list(spec.std)}
    teacher = EmbeddingTeacher(model, head, dim, info, spec).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _ensemble(members: list[EmbeddingTeacher]) -> EmbeddingTeacher | EmbeddingEnsemble:
    if not members:
        raise TeacherError("an ensemble needs at least one teacher")
    first = members[0]
    for m in members[1:]:
        if m.dim != first.dim:
            raise TeacherError(f"the ensemble's teachers give embeddings of different sizes: {_name(first)} "
                               f"{first.dim}-d, {_name(m)} {m.dim}-d. An ensemble averages embeddings of one "
                               "space: use teachers whose heads give one size (or head 'none' for all)")
        if m.spec.view != first.spec.view:
            raise TeacherError(f"the ensemble's teachers see crops differently: {_name(first)} {first.spec.view}, "
                               f"{_name(m)} {m.spec.view}; give them one input size, interpolation, mean and std")
    return first if len(members) == 1 else EmbeddingEnsemble(members)


def _name(t: EmbeddingTeacher) -> str:
    return f"{t.info['format']} {t.info['arch']} ({t.info['source']})"


def _read(path: str) -> Any:
    if not os.path.isfile(path):
        raise TeacherError(f"teacher checkpoint {path} does not exist")
    return read_untrusted(path, TeacherError, "it may be truncated: download it again",
                          allow=(argparse.Namespace,))  # DINO's checkpoints hold their 'args'


def _is_state(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in d.items())


def _groups(keys, limit: int = 8) -> str:
    """``encoder_k.* (320), queue (1), ...``: what a set of keys holds, by first name."""
    counts = Counter(k.split(".", 1)[0] + (".*" if "." in k else "") for k in keys)
    shown = ", ".join(f"{k} ({n})" for k, n in counts.most_common(limit))
    return shown + (f" and {len(counts) - limit} more" if len(counts) > limit else "")


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _layout(ckpt: Any, spec: EmbeddingTeacherSpec) -> _Layout:
    path = spec.path
    relu, gelu = nn.ReLU, nn.GELU
    if isinstance(ckpt, dict) and _is_state(ckpt.get("teacher")):  # DINO's full checkpoint
        state = strip_ddp_prefix(ckpt["teacher"])
        _refuse_vit(state, path)
        others = [k for k in ckpt if k != "teacher"]
        dropped = [_groups(k for k in state if k.startswith("head.last_layer"))] + [f"{k} (top level)"
                                                                                   for k in others]
        if not any(k.startswith("backbone.") for k in state):
            raise TeacherError(f"{path}: its 'teacher' holds no backbone.* keys (it holds {_groups(state)}); a "
                               "DINO checkpoint's teacher has backbone.* and head.*")
        has_head = any(k.startswith("head.mlp.") for k in state)
        return _Layout("dino", state, "backbone.", "head.mlp" if has_head else None, gelu, r"L|SLB?A(?:LB?A)*L",
                       "Linear, [BatchNorm], GELU, ..., Linear (DINOHead's mlp)",
                       "DINO teacher head's bottleneck (head.mlp), L2-normalised" if has_head else
                       "DINO teacher backbone's pooled features, L2-normalised",
                       [d for d in dropped if d])
    state = ckpt
    if isinstance(ckpt, dict) and not _is_state(ckpt):
        for key in ("state_dict", "model", "model_state", "module"):
            if _is_state(ckpt.get(key)):
                state = ckpt[key]
                break
    if not _is_state(state):
        top = ", ".join(repr(k) for k in list(ckpt)[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TeacherError(f"{path} holds no state_dict of tensors (top level: {top}); known layouts: {KNOWN}")
    state = strip_ddp_prefix(state)
    keys = list(state)
    if not spec.arch:
        _refuse_vit(state, path)

    def outside(prefix: str) -> list[str]:
        rest = [k for k in keys if not k.startswith(prefix)]
        return [_groups(rest)] if rest else []

    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and {"fc.0.weight", "fc.2.weight"} <= set(keys):
        config = ckpt["config"]
        arch = config.get("arch") if isinstance(config.get("arch"), str) else None
        size = config.get("input_size")
        return _Layout("fkd_dali", state, "", "fc", relu, r"SLAL", "fc.0 Linear, ReLU, fc.2 Linear",
                       "the encoder's MLP head output (fc), L2-normalised",
                       [f"{k} (top level)" for k in ("moco", "optimizer", "ema") if ckpt.get(k) is not None],
                       arch, size if isinstance(size, int) and 1 <= size <= 4096 else 224)
    if any(k.startswith("encoder_q.") for k in keys):
        v1 = "encoder_q.fc.weight" in state
        return _Layout("moco_v1" if v1 else "moco_v2", state, "encoder_q.", "encoder_q.fc", relu, r"L|SLAL",
                       "fc = Linear (v1) or fc.0 Linear, ReLU, fc.2 Linear (v2)",
                       "MoCo query encoder's output (encoder_q, fc included), L2-normalised",
                       outside("encoder_q."))
    if any(k.startswith("base_encoder.") for k in keys):
        return _Layout("moco_v3", state, "base_encoder.", "base_encoder.fc", relu, "SlBAlb",
                       "fc.0 Linear, fc.1 BatchNorm, ReLU, fc.3 Linear, fc.4 BatchNorm (the projector)",
                       "MoCo v3 base encoder's projector output (base_encoder.fc), L2-normalised",
                       outside("base_encoder."))
    resnet = "conv1.weight" in state and any(k.startswith("layer4.") for k in keys)
    if resnet and any(k.startswith(("projection_head.", "prototypes")) for k in keys):
        has_head = any(k.startswith("projection_head.") for k in keys)
        prototypes = [k for k in keys if k.startswith("prototypes")]
        state = {k: v for k, v in state.items() if k not in prototypes}
        return _Layout("swav", state, "", "projection_head" if has_head else None, relu, r"L|SLBAL",
                       "projection_head.0 Linear, .1 BatchNorm, ReLU, .3 Linear (or one Linear)",
                       "SwAV's normalised projection (projection_head)" if has_head else
                       "SwAV backbone's pooled features, L2-normalised",
                       [_groups(prototypes)] if prototypes else [])
    if spec.arch:
        return _Layout("torchvision", state, "", None, relu, "", "", "", [])
    if resnet and not any(k.startswith("fc.") for k in keys):
        return _Layout("backbone", state, "", None, relu, "", "", "ResNet backbone's pooled features, "
                       "L2-normalised", [])
    hint = (" It holds a classifier (fc.weight "
            f"{tuple(state['fc.weight'].shape)}): for its pooled features give ARCH:PATH with head 'none'; "
            "to label classes use `fkd-dali generate`.") if "fc.weight" in state else ""
    raise TeacherError(f"{path}: unknown checkpoint layout: its {len(keys)} keys are {_groups(keys)}.{hint} "
                       f"Known layouts: {KNOWN}")


def _refuse_vit(state: dict[str, torch.Tensor], path: str) -> None:
    """MoCo v3's and DINO's ViTs (timm-style keys: cls_token, pos_embed, patch_embed.*) are not supported."""
    vit = [k for k in state if _VIT.search(k)]
    if vit:
        raise TeacherError(f"{path} holds a Vision Transformer ({vit[0]}, ...): only ResNet teachers are supported "
                           "(MoCo v1/v2, MoCo v3's r-50-*.pth.tar, SwAV's ResNet-50, DINO's dino_resnet50_*); use "
                           "the ResNet checkpoint of the method")


def _resnet_arch(state: dict[str, torch.Tensor], path: str) -> str:
    """The torchvision ResNet whose blocks and widths the keys hold."""
    need = ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight")
    stages = [{int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()}
              for i in range(1, 5)]
    if any(k not in state for k in need) or not all(stages):
        raise TeacherError(f"{path}: its backbone is not a ResNet that torchvision builds (its keys: "
                           f"{_groups(state)}); give ARCH:PATH to name its architecture")
    blocks = tuple(1 + max(s) for s in stages)
    conv1, conv2, stem = state[need[1]], state[need[2]], state[need[0]].shape[0]
    bottleneck = "layer1.0.conv3.weight" in state
    groups = conv2.shape[0] // max(1, conv2.shape[1])
    arch = RESNETS.get((bottleneck, blocks, conv1.shape[0], groups)) if stem == 64 else None
    if arch is None:
        raise TeacherError(f"{path}: its backbone is a ResNet with {stem} stem filters, blocks {blocks}, "
                           f"{'bottleneck' if bottleneck else 'basic'} blocks of width {conv1.shape[0]} and "
                           f"groups {groups}, which is none of torchvision's ResNets ({', '.join(RESNETS.values())})"
                           "; SwAV's widened RN50-w2/w4/w5 are not torchvision architectures and are not supported")
    return arch


def _fit(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path: str, what: str) -> None:
    """Load ``state`` into ``module`` strictly; a missing, unexpected or misshapen key is named as in the file."""
    own = module.state_dict()
    missing = [prefix + k for k in own if k not in state]
    unexpected = [prefix + k for k in state if k not in own]
    if missing:
        raise TeacherError(f"{path}: {len(missing)} key(s) of the {what} are missing: {', '.join(missing[:4])}; the "
                           "file is damaged or of another architecture (name it with ARCH:PATH)")
    if unexpected:
        raise TeacherError(f"{path}: {len(unexpected)} key(s) the {what} does not have: "
                           f"{', '.join(unexpected[:4])}; the file is of another architecture (name it with "
                           "ARCH:PATH)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise TeacherError(f"{path}: {prefix + k} has shape {tuple(v.shape)}, the {what} needs "
                               f"{tuple(own[k].shape)}; the file is of another architecture (name it with "
                               "ARCH:PATH)")
    module.load_state_dict(state)


def _head_prefix(layout: _Layout, spec: EmbeddingTeacherSpec, classifier: str) -> str | None:
    """Where the head's keys are (None: the pooled features), after the user's head option."""
    if spec.head is None:
        if layout.format == "torchvision":
            raise TeacherError(f"{spec.arch}:{spec.path} needs a head: 'none' (the pooled features) or "
                               "'mlp:IN-...-D' (the MLP stored where the classifier was, e.g. fc.0, fc.2)")
        return layout.head
    if spec.head == "none":
        return None
    if layout.format != "torchvision":
        own = f"its own head ({layout.expected})" if layout.head else "no head"
        raise TeacherError(f"{spec.path} is a {layout.format} checkpoint with {own}; give no head, or 'none' for "
                           f"the pooled features, not '{spec.head}'")
    widths, prefix = _parse_mlp(spec.head)
    layout.pattern = "S?(?:[Ll][Bb]?A)*[Ll]"
    layout.expected = f"Linear layers {'-'.join(map(str, widths))} with ReLU between them"
    layout.embedding = f"{spec.arch} features through the head {spec.head}, L2-normalised"
    return prefix or classifier


def _parse_mlp(head: str) -> tuple[list[int], str | None]:
    m = re.fullmatch(r"mlp:(\d+(?:-\d+)+)(?:@([\w.]+))?", head)
    if not m:
        raise TeacherError(f"head '{head}' is not understood: give 'none' or 'mlp:W0-W1-...-D' (the widths of its "
                           "Linear layers, e.g. mlp:2048-2048-128), optionally '@PREFIX' (where its keys are)")
    widths = [int(w) for w in m.group(1).split("-")]
    if not all(1 <= w <= MAX_WIDTH for w in widths) or len(widths) > MAX_HEAD_MODULES:
        raise TeacherError(f"head '{head}': widths must lie in 1..{MAX_WIDTH}, at most {MAX_HEAD_MODULES} of them")
    return widths, m.group(2)


def _model(layout: _Layout, spec: EmbeddingTeacherSpec) -> tuple[nn.Module, str, str, int]:
    """The backbone's architecture built with its classifier (last Linear) replaced by Identity: the model,
    its name, the classifier's name and its input width (the features)."""
    import torchvision  # noqa: PLC0415 - ~1.7 s; see models/__init__.py

    arch = spec.arch or layout.arch or _resnet_arch(_under(layout.state, layout.backbone), spec.path)
    if arch in torchvision_models():
        model = torchvision.models.get_model(arch, weights=None)
    elif layout.arch and arch == layout.arch and arch in available():  # the project's own (ReActNet, ...)
        model = create_model(arch, num_classes=1000, image_size=layout.image_size)  # the classifier is dropped
    else:
        raise TeacherError(f"'{arch}' is not a torchvision classification model")
    try:
        name = classifier_name(model)
    except ModelError:
        raise TeacherError(f"{arch} has no Linear classifier to take features from; choose another "
                           "architecture") from None
    features = model.get_submodule(name).in_features
    return without_classifier(model), arch, name, features


def _load_backbone(model: nn.Module, layout: _Layout, spec: EmbeddingTeacherSpec, arch: str, classifier: str,
                   head: str | None) -> None:
    """The backbone's weights: the keys under its prefix but the head's (the format's own head and a
    classifier, if any, are dropped, and said so, when the head is elsewhere or the pooled features are asked
    for)."""
    cut = {p for p in (head, layout.head, layout.backbone + classifier) if p}
    state, dropped = {}, []
    for k, v in _under(layout.state, layout.backbone).items():
        full = layout.backbone + k
        if any(full.startswith(p + ".") for p in cut):
            if not (head and full.startswith(head + ".")):
                dropped.append(full)
        else:
            state[k] = v
    if dropped:
        layout.dropped.append(_groups(dropped))
    _fit(model, state, layout.backbone, spec.path, f"{arch} backbone")


def _head(layout: _Layout, spec: EmbeddingTeacherSpec, prefix: str | None, features: int) -> tuple[nn.Module, int]:
    """The head rebuilt from its keys (Linear, BatchNorm1d, the format's activation between them), checked
    against the head the format (or the user's mlp:) describes, loaded; and its output width."""
    if prefix is None:
        return nn.Identity(), features
    state = _under(layout.state, prefix + ".")
    if not state:
        raise TeacherError(f"{spec.path}: no {prefix}.* keys: the head ({layout.expected}) is missing; give head "
                           "'none' for the pooled features")
    single = set(state) <= {"weight", "bias"}  # one Linear, not a Sequential (MoCo v1, SwAV without hidden layer)
    if single:
        modules = [_linear(state, prefix, "", spec.path)]
    else:
        modules = _sequential(state, prefix, layout.activation, spec.path)
    kinds = ("" if single else "S") + "".join(_kind(m) for m in modules)  # S: an nn.Sequential
    if not re.fullmatch(layout.pattern, kinds):
        found = ", ".join(("" if single else f"{prefix}.{i} ") + _say(m) for i, m in enumerate(modules))
        raise TeacherError(f"{spec.path}: the head {prefix} is {found}; a {layout.format} head is {layout.expected}"
                           f": {_missing(kinds, layout.pattern, prefix, state)}")
    head = modules[0] if single else nn.Sequential(*modules)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    if widths[0] != features:
        raise TeacherError(f"{spec.path}: the head {prefix} takes {widths[0]} features, the backbone gives "
                           f"{features}: the file is of another architecture (name it with ARCH:PATH)")
    if layout.format == "torchvision" and widths != _parse_mlp(spec.head)[0]:
        raise TeacherError(f"{spec.path}: the head at {prefix} has widths {'-'.join(map(str, widths))}, not "
                           f"{spec.head}; give head mlp:{'-'.join(map(str, widths))}")
    _fit(head, state, prefix + ".", spec.path, "head")
    return head, widths[-1]


def _linear(state: dict[str, torch.Tensor], prefix: str, index: str, path: str) -> nn.Linear:
    w = state.get(index + "weight")
    if w is None or w.ndim != 2:
        raise TeacherError(f"{path}: {prefix}.{index}weight is missing or not a matrix; the head is damaged")
    if max(w.shape) > MAX_WIDTH:
        raise TeacherError(f"{path}: {prefix}.{index}weight has shape {tuple(w.shape)}, wider than {MAX_WIDTH}")
    return nn.Linear(w.shape[1], w.shape[0], bias=index + "bias" in state)


def _sequential(state: dict[str, torch.Tensor], prefix: str, activation: type[nn.Module],
                path: str) -> list[nn.Module]:
    """An nn.Sequential's modules from its keys ``I.NAME``: a matrix weight is a Linear, running statistics a
    BatchNorm1d, an index without keys the activation."""
    params: dict[int, set[str]] = {}
    for k in state:
        i, _, name = k.partition(".")
        if not i.isdigit() or "." in name:
            raise TeacherError(f"{path}: {prefix}.{k} is not a key of a Linear/BatchNorm head; the file is of "
                               "another layout")
        params.setdefault(int(i), set()).add(name)
    if max(params) >= MAX_HEAD_MODULES:
        raise TeacherError(f"{path}: the head {prefix} has {max(params) + 1} modules, more than {MAX_HEAD_MODULES}")
    modules: list[nn.Module] = []
    for i in range(max(params) + 1):
        names = params.get(i, set())
        stats = [state[f"{i}.{n}"] for n in ("running_mean", "running_var") if n in names]
        if not names:
            modules.append(activation())
        elif stats or ("weight" in names and state[f"{i}.weight"].ndim == 1):
            n = (stats or [state[f"{i}.weight"]])[0].shape[0]
            if n > MAX_WIDTH:
                raise TeacherError(f"{path}: {prefix}.{i} has {n} features, more than {MAX_WIDTH}")
            if "bias" in names and "weight" not in names:
                raise TeacherError(f"{path}: {prefix}.{i}.weight is missing ({prefix}.{i}.bias is there); the "
                                   "head is damaged")
            modules.append(nn.BatchNorm1d(n, affine="weight" in names))
        else:
            modules.append(_linear(state, prefix, f"{i}.", path))
    return modules


_KEYS = {"L": ("weight", "bias"), "l": ("weight",), "B": ("weight", "bias", "running_mean", "running_var"),
         "b": ("running_mean", "running_var")}


def _missing(kinds: str, pattern: str, prefix: str, state: dict[str, torch.Tensor]) -> str:
    """The keys whose absence turned the expected head into the one found: one module changed, or one more
    (after an activation) at the end."""
    seq = kinds.startswith("S")
    for kind, names in _KEYS.items():
        tries = [(kinds[:j] + kind + kinds[j + 1:], j) for j in range(int(seq), len(kinds)) if kinds[j] != kind]
        tries += [(kinds + "A" + kind, len(kinds) + 1)] if seq else []
        for candidate, j in tries:
            if re.fullmatch(pattern, candidate):
                at = f"{j - 1}." if seq else ""
                missing = [f"{prefix}.{at}{n}" for n in names if at + n not in state]
                if missing:
                    return f"{', '.join(missing)} missing; the file is damaged or of another layout"
    return "a key is missing or the file is of another layout"


def _kind(m: nn.Module) -> str:
    """L / l: Linear with / without bias; B / b: BatchNorm1d with / without affine; A: the activation."""
    if isinstance(m, nn.Linear):
        return "L" if m.bias is not None else "l"
    if isinstance(m, nn.BatchNorm1d):
        return "B" if m.affine else "b"
    return "A"


def _say(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features}{'' if m.bias is not None else ', no bias'})"
    if isinstance(m, nn.BatchNorm1d):
        return f"BatchNorm1d({m.num_features}{'' if m.affine else ', affine=False'})"
    return type(m).__name__
