"""Store kinds: what a row holds per crop beside its box and flip.

A store records its kind in its metadata (``kind``; a store without it is a ``topk`` store, as every store
written before kinds existed). A kind names its per-crop label arrays (name, dtypes, trailing shape, fill
value), its own metadata fields (``kind_fields``) and its value checks; the store core (create, read, write,
verify, summary) loops over the kind's arrays and never names them.

=========  ================  ==========================  =============================================
kind       array             shape / dtype               meaning
=========  ================  ==========================  =============================================
topk       topk_idx          (N, C, k) int16 or int32    class ids, most probable first
topk       topk_val          (N, C, k) float16           teacher probabilities
embedding  embedding         (N, C, D) int8              the teacher's embedding / scale, rounded
embedding  embedding_scale   (N, C) float32              per crop: max |x| / 127 (0: a zero vector)
embedding  jitter            (N, C) bool                 colour jitter applied
embedding  jitter_factors    (N, C, 4) float32           brightness, contrast, saturation, hue factors
embedding  jitter_order      (N, C, 4) int8              the order the 4 jitter ops run in (a permutation)
embedding  grayscale         (N, C) bool                 converted to grey (3 equal channels)
embedding  blur_sigma        (N, C) float32              Gaussian blur sigma; 0: no blur
=========  ================  ==========================  =============================================

The embedding is int8 with a per-crop float32 scale (132 B per crop at D=128, half of float16's 256 B): its
cosine to the teacher's float32 output stays above 0.9999 on unit vectors (``docs/ssl.md`` has the figures).
A crop whose jitter is not applied stores the identity factors (1, 1, 1, 0) and order (0, 1, 2, 3).

The ``relabel`` kind (:mod:`labelstore.relabel_kind`) is of another shape: its rows are stored training steps,
not images (``StoreKind.rows == "step"``), with the labels a teacher gave to mixed crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreFormatError
from .kind_types import LabelArray, StoreKind, class_dtype
from .relabel_kind import RELABEL

#: Embedding dimensions a store may hold (a row's crop pool is read whole by ``show`` and generation).
MAX_DIM = 1 << 14
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


def _topk_fields(attrs: dict, where: str) -> dict:
    return {"top_k": attrs["top_k"], "num_classes": attrs["num_classes"]}


def _topk_checks(data: dict, fields: dict) -> list:
    idx, val = np.asarray(data["topk_idx"]), np.asarray(data["topk_val"])
    n = fields["num_classes"]
    vf = val if val.dtype in (np.float16, np.float32) else val.astype(np.float32)
    return [((idx < 0) | (idx >= n), f"a class id is outside 0..{n - 1}"),
            (~np.isfinite(vf) | (vf < 0) | (vf > 1.001), "a probability is not a finite value in [0, 1]")]


TOPK = StoreKind(
    name="topk", what="top-k soft labels", objective="fkd",
    arrays=(LabelArray("topk_idx", ("int16", "int32"), -1, lambda f: (f["top_k"],), class_dtype),
            LabelArray("topk_val", ("float16",), float("nan"), lambda f: (f["top_k"],))),
    read_fields=_topk_fields, describe=lambda f: f"kind topk, k={f['top_k']}", checks=_topk_checks,
    serve=lambda a: {"topk_idx": a["topk_idx"], "topk_val": np.asarray(a["topk_val"], np.float16)},
    meta_lines=("temperature",), exportable=True)


# ---------------------------------------------------------------------------------------------- embedding
#: MoCo v2's "aug-plus" (facebookresearch/moco main_moco.py, S2-BNN Distillation_only): the view recipe an
#: embedding store records under ``kind_fields.views`` and checks its stored parameters against.
MOCO_V2_VIEWS = {"scale": [0.2, 1.0], "ratio": [3 / 4, 4 / 3], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
                 "grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": [0.1, 2.0], "flip_p": 0.5}


def _embedding_fields(attrs: dict, where: str) -> dict:
    fields = attrs.get("kind_fields")
    if not isinstance(fields, dict):
        raise StoreFormatError(f"{where}: an embedding store's metadata lacks 'kind_fields' (an object with dim "
                               "and views); the store is damaged or was not made by fkd-dali")
    dim, views = fields.get("dim"), fields.get("views")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise StoreFormatError(f"{where}: the metadata attribute 'kind_fields.dim' is {dim!r}; expected a whole "
                               f"number in 1..{MAX_DIM}. The store's metadata (zarr.json) is damaged or was crafted; "
                               "regenerate the store")
    try:
        views = check_views(views)
    except ValueError as e:
        raise StoreFormatError(f"{where}: the metadata attribute 'kind_fields.views' is not a view recipe ({e}); "
                               "the store's metadata is damaged or was crafted; regenerate the store") from None
    return {"dim": dim, "views": views, "num_classes": attrs["num_classes"]}


def check_views(views: Any) -> dict:
    """A view recipe (:data:`MOCO_V2_VIEWS`'s keys) with numbers in range, or ValueError naming the value."""
    if not isinstance(views, dict) or set(views) != set(MOCO_V2_VIEWS):
        raise ValueError(f"expected the keys {', '.join(MOCO_V2_VIEWS)}")
    out = {}
    for key, default in MOCO_V2_VIEWS.items():
        v = views[key]
        want = len(default) if isinstance(default, list) else 0
        vals = v if want else [v]
        if (want and (not isinstance(v, list) or len(v) != want)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x >= 0 for x in vals):
            raise ValueError(f"{key} is {v!r}; expected {want or 1} number(s) >= 0")
        out[key] = [float(x) for x in v] if want else float(v)
    for key in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
        if out[key] > 1:
            raise ValueError(f"{key} is {out[key]}; a probability is at most 1")
    if out["jitter"][3] > 0.5:
        raise ValueError(f"jitter is {out['jitter']}; its hue strength must be <= 0.5 (torchvision's bound)")
    lo, hi = out["blur_sigma"]
    if not 0 < lo <= hi or not 0 < out["scale"][0] <= out["scale"][1] <= 1 or not 0 < out["ratio"][0] <= out["ratio"][1]:
        raise ValueError("blur_sigma, scale and ratio must be 0 < min <= max (scale <= 1)")
    return out


def _embedding_checks(data: dict, fields: dict) -> list:
    views = fields["views"]
    applied = np.asarray(data["jitter"], bool)
    f = np.asarray(data["jitter_factors"], np.float32)
    order = np.asarray(data["jitter_order"])
    sigma = np.asarray(data["blur_sigma"], np.float32)
    scale = np.asarray(data["embedding_scale"], np.float32)
    strength = np.array(views["jitter"], np.float32)
    lo = np.concatenate([np.maximum(0, 1 - strength[:3]), -strength[3:]])
    hi = np.concatenate([1 + strength[:3], strength[3:]])
    eps = np.float32(1e-6)
    out_of_range = ~np.isfinite(f) | (f < lo - eps) | (f > hi + eps)
    identity = (f == np.array(IDENTITY_FACTORS, np.float32)).all(-1) & (order == np.arange(4)).all(-1)
    s_lo, s_hi = views["blur_sigma"]
    return [
        (~np.isfinite(scale) | (scale < 0), "an embedding's scale is not a finite value >= 0"),
        (out_of_range, f"a colour jitter factor is outside the recipe's ranges (brightness, contrast, saturation in "
                       f"{lo[0]:g}..{hi[0]:g}, hue in {lo[3]:g}..{hi[3]:g})"),
        (np.sort(order, axis=-1) != np.arange(4), "a colour jitter order is not a permutation of 0..3"),
        (~applied & ~identity, "a crop without colour jitter has other factors than the identity (1, 1, 1, 0)"),
        (~np.isfinite(sigma) | ((sigma != 0) & ((sigma < s_lo - eps) | (sigma > s_hi + eps))),
         f"a blur sigma is neither 0 (no blur) nor in {s_lo:g}..{s_hi:g}"),
    ]


EMBEDDING = StoreKind(
    name="embedding", what="teacher embeddings", objective="ssl",
    arrays=(LabelArray("embedding", ("int8",), 0, lambda f: (f["dim"],)),
            LabelArray("embedding_scale", ("float32",), float("nan")),
            LabelArray("jitter", ("bool",), False),
            LabelArray("jitter_factors", ("float32",), float("nan"), lambda f: (4,)),
            LabelArray("jitter_order", ("int8",), -1, lambda f: (4,)),
            LabelArray("grayscale", ("bool",), False),
            LabelArray("blur_sigma", ("float32",), float("nan"))),
    read_fields=_embedding_fields, describe=lambda f: f"kind embedding, D={f['dim']}", checks=_embedding_checks,
    serve=lambda a: {"embedding": decode_embeddings(a["embedding"], a["embedding_scale"])},
    view_params=("jitter_factors", "jitter_order", "grayscale", "blur_sigma"))

KINDS = {k.name: k for k in (TOPK, EMBEDDING, RELABEL)}


def kind_named(name: Any, where: str) -> StoreKind:
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise StoreFormatError(f"{where} holds labels of kind {name!r}; this fkd-dali reads the kinds "
                               f"{', '.join(KINDS)}. Upgrade fkd-dali, or regenerate the store") from None


def encode_embeddings(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float embeddings (..., D) -> (int8 (..., D), float32 scale (...)): x ~ q * scale, scale = max|x| / 127."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def decode_embeddings(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 embeddings (..., D) an int8 store holds."""
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)[..., None]
