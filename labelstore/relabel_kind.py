"""The ``relabel`` store kind: dataset distillation's soft labels (SRe2L, CDA, G-VBSM, EDC, LPLD), one row per stored
training step.

SRe2L's relabel (VILA-Lab/SRe2L ``relabel/generate_soft_label.py``) draws, per epoch, the images of each step from
a seeded sampler, a crop box and flip per image, one Mixup or CutMix plan per step (a partner position per image,
one lambda, one box), and stores the teacher's logits on the MIXED crops. A relabel store keeps exactly that, one
row per kept (epoch, step); a step pruned away (LPLD) has no row, by design. Its rows are ``S = num_steps`` and
its "crops" per row are the ``B = batch_size`` positions of the step (the store's ``num_crops`` is B).

=============  ==========================  ==========================================================================
array          shape / dtype               meaning
=============  ==========================  ==========================================================================
step_index     (S, 2) int32  (creation)    (epoch, step) of each row, sorted; rows of one epoch are contiguous
step_size      (S,) int32    (creation)    positions used, 1..B (an epoch's last step may be short); the rest pad
images         (S, B) int32                the image (row of ``files``) at each position; -1 in the pad
boxes          (S, B, 4) float32           SRe2L's normalised crop (i, j, h, w) = (top/H, left/W, h/H, w/W), as stored
flips          (S, B) bool                 horizontal flip after the crop
mix_partner    (S, B) int32                the position whose crop is mixed into this one (SRe2L's ``mix_index``);
                                           a permutation of 0..size-1; identity when mix is "none"; -1 in the pad
mix_lam        (S,) float64                the step's lambda (SRe2L's ``np.random.beta`` value, kept exactly); 1: none
mix_box        (S, 4) int32                CutMix: SRe2L's (bbx1, bby1, bbx2, bby2) in pixels of the input-size crop,
                                           rows bbx1:bbx2 (dim 2) and columns bby1:bby2 (dim 3); -1 for Mixup / none
labels         (S, B, K) float16|float32   label format "full": the teacher(s)' K = num_classes values
label_idx      (S, B, k) int16|int32       label format "topk": class ids, largest value first
label_val      (S, B, k) float16|float32   label format "topk": their values
=============  ==========================  ==========================================================================

Labels are logits or probabilities (``label.values``), taken on the mixed crop: position p of a CutMix step sees
its own crop with ``mix_box`` replaced by partner[p]'s crop; of a Mixup step ``lam * own + (1 - lam) * partner``.
The pad (positions >= step_size) holds -1 (images, mix_partner), 0 (boxes, labels), False (flips), and is
never checked nor served.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreFormatError
from .kind_types import LabelArray, StoreKind, class_dtype

MIX_MODES = ("cutmix", "mixup", "none")
LABEL_FORMATS = ("full", "topk")
LABEL_VALUES = ("logits", "probabilities")
LABEL_DTYPES = ("float16", "float32")
#: Epochs and steps per epoch a relabel store may claim (SRe2L: 300 epochs; 21k at batch 1: 14 M steps).
MAX_EPOCHS = 1 << 16
MAX_STEPS_PER_EPOCH = 1 << 26
MAX_STEPS = 1 << 31
MAX_INPUT_SIZE = 1 << 14

#: What ``kind_fields`` holds (all required); ``create_relabel_store`` writes them.
FIELD_KEYS = ("epochs", "steps_per_epoch", "batch_size", "drop_last", "num_steps", "input_size", "mix", "label",
              "plan", "pruning")


def _label_dtype(fields: dict) -> np.dtype:
    return np.dtype(fields["label"]["dtype"])


def _label_width(fields: dict) -> tuple:
    return (fields["num_classes"],) if fields["label"]["format"] == "full" else (fields["label"]["k"],)


def _fail(where: str, key: str, value: Any, expected: str) -> None:
    raise StoreFormatError(f"{where}: the metadata attribute 'kind_fields.{key}' is {value!r}; expected {expected}. "
                           "The store's metadata (zarr.json) is damaged or was crafted; regenerate or re-import it")


def _whole(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def relabel_fields(attrs: dict, where: str) -> dict:
    """A relabel store's ``kind_fields``, every value checked (bounded before anything is allocated)."""
    f = attrs.get("kind_fields")
    if not isinstance(f, dict) or any(k not in f for k in FIELD_KEYS):
        missing = [k for k in FIELD_KEYS if not isinstance(f, dict) or k not in f]
        raise StoreFormatError(f"{where}: a relabel store's metadata lacks kind_fields {', '.join(missing)}; the "
                               "store is damaged or was not made by fkd-dali")
    for key, hi in (("epochs", MAX_EPOCHS), ("steps_per_epoch", MAX_STEPS_PER_EPOCH), ("num_steps", MAX_STEPS),
                    ("input_size", MAX_INPUT_SIZE), ("batch_size", attrs["num_crops"])):
        if not _whole(f[key], 1, hi):
            _fail(where, key, f[key], f"a whole number in 1..{hi}")
    if f["batch_size"] != attrs["num_crops"]:
        _fail(where, "batch_size", f["batch_size"], f"the store's num_crops ({attrs['num_crops']})")
    if f["num_steps"] > f["epochs"] * f["steps_per_epoch"]:
        _fail(where, "num_steps", f["num_steps"], f"at most epochs x steps_per_epoch "
                                                  f"({f['epochs']} x {f['steps_per_epoch']})")
    if not isinstance(f["drop_last"], bool):
        _fail(where, "drop_last", f["drop_last"], "true or false")
    n, b = attrs["num_images"], f["batch_size"]
    per_epoch = n // b if f["drop_last"] else -(-n // b)  # a BatchSampler's steps (labelstore.relabel)
    if f["steps_per_epoch"] != per_epoch:
        _fail(where, "steps_per_epoch", f["steps_per_epoch"], f"{per_epoch}: {n} images in batches of {b}"
                                                              f"{' dropping the last' if f['drop_last'] else ''}")
    if f["mix"] not in MIX_MODES:
        _fail(where, "mix", f["mix"], " or ".join(MIX_MODES))
    label = f["label"]
    if not isinstance(label, dict) or label.get("format") not in LABEL_FORMATS or \
            label.get("values") not in LABEL_VALUES or label.get("dtype") not in LABEL_DTYPES:
        _fail(where, "label", label, f"an object {{format: {'|'.join(LABEL_FORMATS)}, k, values: "
                                     f"{'|'.join(LABEL_VALUES)}, dtype: {'|'.join(LABEL_DTYPES)}}}")
    classes = attrs["num_classes"]
    k = label.get("k", 0)
    if label["format"] == "topk" and not _whole(k, 1, classes):
        _fail(where, "label.k", k, f"a whole number in 1..{classes} (the classes)")
    for key in ("plan", "pruning"):
        if not isinstance(f[key], dict):
            _fail(where, key, f[key], "an object")
    return {key: f[key] for key in FIELD_KEYS} | {
        "label": {"format": label["format"], "k": k if label["format"] == "topk" else classes,
                  "values": label["values"], "dtype": label["dtype"]},
        "num_classes": classes, "num_images": attrs["num_images"]}


def _used(data: dict, width: int) -> np.ndarray:
    """(rows, B) True at positions < the row's step_size."""
    size = np.asarray(data["step_size"])
    return np.arange(width)[None, :] < size[:, None]


def relabel_checks(data: dict, fields: dict) -> list:
    index = np.asarray(data["step_index"])
    size = np.asarray(data["step_size"])
    images = np.asarray(data["images"])
    B = images.shape[1]
    used = _used(data, B)
    boxes = np.asarray(data["boxes"], np.float32)
    i, j, h, w = (boxes[..., n] for n in range(4))
    eps = np.float32(1e-5)
    bad_box = ~np.isfinite(boxes).all(-1) | (i < 0) | (j < 0) | (h <= 0) | (w <= 0) | (i + h > 1 + eps) | \
        (j + w > 1 + eps)
    partner = np.asarray(data["mix_partner"]).astype(np.int64)
    in_range = (partner >= 0) & (partner < size[:, None])
    # a permutation of 0..size-1: each position in range, and each value used once (sorted == arange on used)
    sorted_p = np.sort(np.where(used, partner, B + 1), axis=1)
    not_perm = used & ((sorted_p != np.arange(B)[None, :]) | ~in_range)
    lam = np.asarray(data["mix_lam"], np.float64)
    mbox = np.asarray(data["mix_box"]).astype(np.int64)
    mix, s = fields["mix"], fields["input_size"]
    if mix == "cutmix":
        bad_mbox = (mbox < 0).any(-1) | (mbox > s).any(-1) | (mbox[:, 2] < mbox[:, 0]) | (mbox[:, 3] < mbox[:, 1])
        box_what = f"a CutMix box is not 0 <= bbx1 <= bbx2 <= {s}, 0 <= bby1 <= bby2 <= {s} (the input size)"
    else:
        bad_mbox = (mbox != -1).any(-1)
        box_what = f"a {mix} step has a CutMix box (expected -1s)"
    bad_lam = ~np.isfinite(lam) | (lam < 0) | (lam > 1)
    if mix == "none":
        bad_lam |= lam != 1
        not_perm |= used & (partner != np.arange(B)[None, :])
    order = index[:, 0].astype(np.int64) * fields["steps_per_epoch"] + index[:, 1]
    unsorted = np.concatenate([[False], np.diff(order) <= 0])  # rows in time order (within the block read)
    out = [
        (unsorted, "its (epoch, step) does not come after the row before it (rows are kept steps in time order)"),
        ((index[:, 0] < 0) | (index[:, 0] >= fields["epochs"]) | (index[:, 1] < 0) |
         (index[:, 1] >= fields["steps_per_epoch"]),
         f"its (epoch, step) is outside {fields['epochs']} epochs x {fields['steps_per_epoch']} steps"),
        ((size < 1) | (size > B), f"its step size is outside 1..{B} (the batch size)"),
        (size != np.minimum(B, fields["num_images"] - index[:, 1].astype(np.int64) * B),
         f"its step size is not the plan's min({B}, {fields['num_images']} - step x {B})"),
        (used & ((images < 0) | (images >= fields["num_images"])),
         f"an image index is outside 0..{fields['num_images'] - 1}"),
        (used & bad_box, "a crop box (i, j, h, w) is not finite, positive and inside [0, 1]"),
        (not_perm, "the mix partners are not a permutation of the step's positions"
                   + (" (identity for mix none)" if mix == "none" else "")),
        (bad_lam, "a mix lambda is not in [0, 1]" + (" (1 for mix none)" if mix == "none" else "")),
        (bad_mbox, box_what),
    ]
    label = fields["label"]
    values = np.asarray(data["labels" if label["format"] == "full" else "label_val"])
    vf = values.astype(np.float32, copy=False)
    finite = np.isfinite(vf).all(-1)
    out.append((used & ~finite, f"a label value ({label['values']}) is not finite"))
    if label["values"] == "probabilities":
        out.append((used & ((vf < 0) | (vf > 1.001)).any(-1), "a probability is outside [0, 1]"))
    if label["format"] == "topk":
        idx = np.asarray(data["label_idx"])
        n = fields["num_classes"]
        out.append((used & ((idx < 0) | (idx >= n)).any(-1), f"a class id is outside 0..{n - 1}"))
    return out


def _describe(f: dict) -> str:
    label = f["label"]
    what = "full" if label["format"] == "full" else f"top-{label['k']}"
    return (f"kind relabel, {f['epochs']} epochs x {f['steps_per_epoch']} steps of {f['batch_size']}, {f['mix']}, "
            f"{what} {label['dtype']} {label['values']}")


def _lines(f: dict) -> list:
    total = f["epochs"] * f["steps_per_epoch"]
    label = f["label"]
    width = f["num_classes"] if label["format"] == "full" else label["k"]
    per_label = width * np.dtype(label["dtype"]).itemsize + (0 if label["format"] == "full"
                                                             else width * class_dtype(f).itemsize)
    pruned = total - f["num_steps"]
    how = ", ".join(f"{k}={v}" for k, v in f["pruning"].items())
    return [f"  steps      {f['num_steps']:,} stored of {total:,} (epochs x steps per epoch); batch size "
            f"{f['batch_size']}, drop_last {f['drop_last']}, input size {f['input_size']} px",
            f"  mixing     {f['mix']} on the crops, labels taken on the mixed crops",
            f"  per label  {per_label:,} B uncompressed ({label['format']}, {label['values']}, {label['dtype']})",
            f"  pruned     {pruned:,} steps ({100 * pruned / total:.1f}%)" + (f": {how}" if how else ""),
            "  plan       " + ", ".join(f"{k}={v}" for k, v in f["plan"].items())]


def _serve(a: dict) -> dict:
    return {k: a[k] for k in ("labels", "label_idx", "label_val") if k in a}


RELABEL = StoreKind(
    name="relabel", what="soft labels of mixed crops (dataset distillation)", objective="relabel",
    arrays=(LabelArray("step_index", ("int32",), -1, lambda f: (2,), per_row=True, at_creation=True),
            LabelArray("step_size", ("int32",), 0, per_row=True, at_creation=True),
            LabelArray("images", ("int32",), -1),
            LabelArray("mix_partner", ("int32",), -1),
            LabelArray("mix_lam", ("float64",), float("nan"), per_row=True),
            LabelArray("mix_box", ("int32",), -2, lambda f: (4,), per_row=True),
            LabelArray("labels", LABEL_DTYPES, float("nan"), lambda f: _label_width(f), _label_dtype),
            ),
    read_fields=relabel_fields, describe=_describe, checks=relabel_checks, serve=_serve, rows="step",
    views=(LabelArray("boxes", ("float32",), float("nan"), lambda f: (4,)), LabelArray("flips", ("bool",), False)),
    lines=_lines, arrays_for=lambda f: relabel_arrays(f))


def relabel_arrays(fields: dict) -> tuple[LabelArray, ...]:
    """The label arrays of a relabel store with these fields: full labels, or top-k ids and values."""
    base = tuple(a for a in RELABEL.arrays if a.name != "labels")
    if fields["label"]["format"] == "full":
        return base + (RELABEL.arrays[-1],)
    return base + (LabelArray("label_idx", ("int16", "int32"), -1, lambda f: (f["label"]["k"],), class_dtype),
                   LabelArray("label_val", LABEL_DTYPES, float("nan"), lambda f: (f["label"]["k"],), _label_dtype))
