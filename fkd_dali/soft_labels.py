"""Dense soft labels from stored top-k, and the soft cross-entropy FKD trains with (torch, any device).

Label types (DESIGN.md "Label store"); FKD's names are accepted as aliases:

==========================  =================================================================  ===========
type                        recovery to num_classes                                            FKD name
==========================  =================================================================  ===========
hard                        one-hot of the top-1 class                                         hard
smoothing                   p1 at the top-1 class, (1 - p1)/(C - 1) everywhere else             smoothing
marginal_smoothing_kK       top-K values, (1 - sum)/(C - K) on every other class                marginal_smoothing_k5/k10
marginal_renorm_kK          top-K values renormalised to sum 1                                 marginal_renorm
full                        all stored values (the store holds k = num_classes)                ori
==========================  =================================================================  ===========

``marginal_smoothing`` / ``marginal_renorm`` without ``_kK`` use every stored value (K = k). One
deliberate difference from FKD: the spread mass ``1 - sum`` is clamped at 0, since float16 rounding can
make the stored top-k sum exceed 1 by a hair and FKD would then put negative probability on every class.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F

KINDS = ("hard", "smoothing", "marginal_smoothing", "marginal_renorm", "full")
ALIASES = {"ori": "full"}


@dataclasses.dataclass(frozen=True)
class LabelType:
    kind: str
    k: int | None = None  # values used (marginal_*), None = all stored

    @property
    def name(self) -> str:
        return f"{self.kind}_k{self.k}" if self.k is not None else self.kind


def parse_label_type(name: str, top_k: int | None = None, num_classes: int | None = None) -> LabelType:
    """Parse a label-type name; check it against the store's ``top_k`` and class count when given."""
    raw = name
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    m = re.fullmatch(r"(marginal_smoothing|marginal_renorm)(?:_k(\d+))?", name)
    if m:
        lt = LabelType(m.group(1), int(m.group(2)) if m.group(2) else None)
    elif name in ("hard", "smoothing", "full"):
        lt = LabelType(name)
    else:
        raise ValueError(f"unknown soft-label type '{raw}'; use one of hard, smoothing, "
                         "marginal_smoothing_kK, marginal_renorm_kK, full (FKD's marginal_smoothing_k5, "
                         "marginal_smoothing_k10, marginal_renorm, ori are accepted)")
    if lt.k is not None and lt.k < 1:
        raise ValueError(f"soft-label type '{raw}': K must be >= 1")
    if top_k is not None and lt.k is not None and lt.k > top_k:
        raise ValueError(f"soft-label type '{raw}' needs the top-{lt.k} values but the store holds top-{top_k}; "
                         f"use K <= {top_k} or regenerate with --top-k {lt.k}")
    if lt.kind == "full" and top_k is not None and num_classes is not None and top_k != num_classes:
        raise ValueError(f"soft-label type 'full' needs a store with k = num_classes ({num_classes}), this "
                         f"one holds top-{top_k}; regenerate with --top-k {num_classes} or use "
                         f"marginal_smoothing_k{top_k}")
    if lt.kind == "marginal_smoothing" and num_classes is not None:
        used = lt.k if lt.k is not None else top_k
        if used is not None and used >= num_classes:
            raise ValueError(f"soft-label type '{raw}' spreads the rest over num_classes - K classes, but K "
                             f"({used}) >= {num_classes}; use 'full' or 'marginal_renorm'")
    return lt


def recover(topk_idx: torch.Tensor, topk_val: torch.Tensor, num_classes: int,
            label_type: LabelType | str) -> torch.Tensor:
    """Dense (B, num_classes) float32 labels from (B, k) class ids and probabilities."""
    lt = parse_label_type(label_type) if isinstance(label_type, str) else label_type
    idx = topk_idx.long()
    val = topk_val.float()
    B = idx.shape[0]
    if lt.kind == "hard":
        out = torch.zeros(B, num_classes, device=idx.device)
        return out.scatter_(1, idx[:, :1], 1.0)
    if lt.kind == "smoothing":
        p = val[:, :1]
        out = ((1.0 - p).clamp_min(0) / (num_classes - 1)).expand(B, num_classes).contiguous()
        return out.scatter_(1, idx[:, :1], p)
    if lt.kind == "full":
        if idx.shape[1] != num_classes:
            raise ValueError(f"'full' labels need k = num_classes ({num_classes}), got k = {idx.shape[1]}")
        return torch.zeros(B, num_classes, device=idx.device).scatter_(1, idx, val)
    K = idx.shape[1] if lt.k is None else lt.k
    if K > idx.shape[1]:
        raise ValueError(f"{lt.name} needs top-{K} labels, got top-{idx.shape[1]}")
    idx, val = idx[:, :K], val[:, :K]
    if lt.kind == "marginal_smoothing":
        rest = (1.0 - val.sum(dim=1, keepdim=True)).clamp_min(0) / (num_classes - K)
        return rest.expand(B, num_classes).contiguous().scatter_(1, idx, val)
    out = torch.zeros(B, num_classes, device=idx.device).scatter_(1, idx, val)
    return F.normalize(out, p=1.0, dim=1, eps=1e-12)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c * log_softmax(logits / T)_c`` (FKD's loss, no T^2)."""
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    return -(target * logp).sum(dim=1).mean()
