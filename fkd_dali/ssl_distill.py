"""Self-supervised distillation (S2-BNN's distillation-only scheme, FKD-SSL): the student's projection head, the
losses, the recipe's defaults.

What szq0214/S2-BNN (@6eeda81, ``Distillation_only/step{1,2}/``) does, and how it maps here:

* **student** (``moco/builder.py``, ``--mlp``): the backbone's classifier ``fc`` (built with ``num_classes`` =
  ``--moco-dim`` 128) is replaced by ``Linear(F, F) -> ReLU -> fc``, F the classifier's input features
  (``dim_mlp = fc.weight.shape[1]``: 1024 for ReActNet, 2048 for a ResNet-50); the output is L2-normalised.
  :func:`attach_head` does the same to any student (its ``fc``, else its last ``nn.Linear``), with D the store's
  embedding size; the normalisation is in the loss, so the student's weights keep MoCo's ``fc.0`` / ``fc.2`` keys.
* **loss** (``extensions/kd_loss.py`` ``DistributionLoss``, called as ``criterion_kd(student / moco_t,
  teacher / moco_t)``, README ``--moco-t 0.2``): ``-sum(softmax(t / T) * log_softmax(s / T))`` over the D
  dimensions, averaged over the batch, on the L2-normalised student and teacher outputs; no contrastive term, teacher
  and student on the same view (``images[0]``). :func:`ssl_loss` ``kl``. The variants: ``cosine`` ``1 - cos(s, t)``
  and ``mse`` ``|s - t|^2`` on the normalised vectors (SimReg's regression; DisCo's consistency), which is
  ``2 (1 - cos)``: the same minimum, twice the gradient.
* **recipe** (``main_moco.py`` defaults and README command ``--lr 0.0003 --batch-size 256 --moco-t 0.2 --cos --wd
  0``): :data:`RECIPE` — Adam (``torch.optim.Adam``, not AdamW), lr 3e-4, no weight decay, 256 images per step, 200
  epochs, linear decay ``lr * (1 - epoch / epochs)`` (S2-BNN's ``adjust_learning_rate`` under its ``--cos`` flag;
  set per epoch there, per step here), T 0.2.
* **views**: S2-BNN's aug-plus has ColorJitter with p 0.6 and the blur with p 0.2 (MoCo v2's: 0.8 and 0.5); they are
  drawn at generation (``generate --ssl-teacher ... --views s2-bnn``), the student replays the store's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("kl", "cosine", "mse")

RECIPE = dict(labels="ssl", opt="adam", lr=3e-4, weight_decay=0.0, batch_size=256, epochs=200, cos=False,
              linear=True, temperature=0.2, warmup_epochs=0)


def classifier_name(model: nn.Module) -> str | None:
    """Where a model keeps its classifier: ``fc`` (torchvision's ResNets, ReActNet), else its last Linear."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def attach_head(model: nn.Module, dim: int) -> str | None:
    """Replace the classifier by S2-BNN's head ``Linear(F, F) -> ReLU -> Linear(F, dim)``; returns its name (None:
    the model has no Linear classifier, nothing changed)."""
    name = classifier_name(model)
    if name is None:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    features = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True),
                                        nn.Linear(features, dim)))
    return name


def ssl_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl", temperature: float = 0.2
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the student's raw output (B, D) against the teacher's embeddings (B, D), averaged over the
    batch, and the mean cosine of the two (no gradient): both are L2-normalised first."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    if kind == "kl":
        loss = -(torch.softmax(t / temperature, dim=1) * torch.log_softmax(s / temperature, dim=1)).sum(1).mean()
    elif kind == "cosine":
        loss = (1 - (s * t).sum(1)).mean()
    elif kind == "mse":
        loss = (s - t).pow(2).sum(1).mean()
    else:
        raise ValueError(f"--ssl-loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    return loss, (s.detach() * t).sum(1).mean()
