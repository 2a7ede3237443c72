"""The losses of training on relabel stores (dataset distillation), as their papers' trainers compute them.

* SRe2L (VILA-Lab/SRe2L @8d00cba ``validate/train_FKD.py``): ``KLDivLoss(reduction='batchmean')(log_softmax(s / T),
  softmax(t / T))`` on the stored teacher logits ``t`` of the mixed crop, no ``T^2`` (its default ``-T 3``).
* G-VBSM / EDC (shaoshitong/G_VBSM_Dataset_Condensation @1ed80b0 and shaoshitong/EDC @80116a7,
  ``train/train_FKD_parallel.py`` ``--loss-type mse_gt``): ``F.mse_loss(s, t) + F.cross_entropy(s, target) *
  ce_weight`` on the raw logits (no temperature; the target is the image's own class, also for a mixed crop;
  G-VBSM's default ``--ce-weight 0.1``, EDC's scripts 0.025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``--recipe sre2l``: SRe2L's ``validate/train_FKD.py`` defaults (VILA-Lab/SRe2L @8d00cba): AdamW (``--adamw-lr
#: 0.001 --adamw-weight-decay 0.01``, weight decay on the >1-d weights only, as ``get_parameters``), ``-b 1024``,
#: 300 epochs, ``-T 3``, no warm-up, 224 px crops; its ``train_FKD.sh`` (the README's command) passes ``--cos``:
#: cosine to 0 (``LambdaLR`` 0.5 (1 + cos(pi epoch / epochs)); without ``--cos`` the code decays linearly, here
#: ``--sched linear``). The lr is set per step here, per epoch there. G-VBSM / EDC's ``train_FKD_parallel.py`` keep
#: the same defaults (their loss, ``--loss-type mse_gt``, is ``--labels relabel-mse``), so one recipe serves them.
SRE2L_RECIPE = dict(labels="relabel", opt="adamw", lr=0.001, weight_decay=0.01, batch_size=1024, epochs=300,
                    cos=True, linear=False, temperature=3.0, warmup_epochs=0, min_lr=0.0, label_smoothing=0.0,
                    input_size=224)
RELABEL_LABELS = ("relabel", "relabel-mse")  # the objectives --recipe sre2l trains


def sre2l_kl(student: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """SRe2L's distillation loss (batch mean of the per-crop KL divergence, no T^2)."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=1),
                    F.softmax(teacher_logits.float() / temperature, dim=1), reduction="batchmean")


def mse_gt(student: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
           ce_weight: float) -> torch.Tensor:
    """G-VBSM / EDC's ``mse_gt``: mean squared error to the teacher's logits plus ``ce_weight`` times the
    cross-entropy with the image's class."""
    s = student.float()
    return F.mse_loss(s, teacher_logits.float()) + F.cross_entropy(s, targets) * ce_weight


def dense_logits(labels: dict[str, torch.Tensor], label_format: str, values: str, num_classes: int) -> torch.Tensor:
    """A relabel store's labels of a batch as dense teacher logits (float32): full logits as they are; full
    probabilities as their logarithm; top-k values scattered into ``-inf`` (their softmax is 0 outside the top-k:
    the teacher's distribution renormalised over its k largest classes)."""
    if label_format == "full":
        v = labels["labels"].float()
        return v if values == "logits" else v.clamp_min(torch.finfo(torch.float32).tiny).log()
    idx, val = labels["label_idx"].long(), labels["label_val"].float()
    if values == "probabilities":
        val = val.clamp_min(torch.finfo(torch.float32).tiny).log()
    out = torch.full((idx.shape[0], num_classes), float("-inf"), device=val.device)
    return out.scatter_(1, idx, val)
