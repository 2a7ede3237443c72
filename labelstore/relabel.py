"""Relabel stores by (epoch, step): create one, write and read blocks of steps, which steps are kept and done.

A relabel store (:mod:`labelstore.relabel_kind` has its arrays) is a label store whose rows are the kept training
steps in time order: row r is ``step_index[r] = (epoch, step)``. A training step reads one row: one inner chunk
per array (a chunk is one step x all B positions). Writers own whole shards of rows (``shard_rows``), as for every
store: a shard is ``rows_per_shard`` consecutive kept steps, which may straddle an epoch's end.

    store = create_relabel_store(path, files=..., targets=..., sizes=..., classes=..., fingerprint=...,
                                 dataset_root="train", epochs=300, batch_size=100, mix="cutmix",
                                 label_format="full", values="logits", label_dtype="float16")
    for a, b in store.shard_rows():          # a rank's share: whole shards
        store.write_steps(a, images=..., boxes=..., flips=..., mix_partner=..., mix_lam=..., mix_box=...,
                          labels=...)        # or label_idx=..., label_val=... (label_format "topk")
    store.finalize()
    block = open_relabel(path).read_steps(row, row + 1)   # or .read_step(epoch, step)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .create import create_store
from .errors import StoreWriteError
from .relabel_kind import LABEL_DTYPES, LABEL_FORMATS, LABEL_VALUES, MIX_MODES
from .store import LabelStore

#: Bytes of labels one shard (a write unit, held in memory by its writer) aims at.
TARGET_SHARD_BYTES = 1 << 26
MAX_ROWS_PER_SHARD = 4096


def steps_per_epoch(num_images: int, batch_size: int, drop_last: bool) -> int:
    """The steps of one pass of a ``BatchSampler`` over ``num_images`` (SRe2L: drop_last False; LPLD when pruning:
    True)."""
    return num_images // batch_size if drop_last else -(-num_images // batch_size)


def step_size(step: int, num_images: int, batch_size: int) -> int:
    """The images in ``step`` of an epoch: ``batch_size`` but for a short last step (drop_last False)."""
    return min(batch_size, num_images - step * batch_size)


def all_steps(epochs: int, per_epoch: int) -> np.ndarray:
    """Every (epoch, step) of the plan, in time order: the ``kept`` of an unpruned store."""
    e, s = np.divmod(np.arange(epochs * per_epoch, dtype=np.int64), per_epoch)
    return np.stack([e, s], axis=1).astype(np.int32)


def create_relabel_store(path: "str | os.PathLike", *, files: Sequence[str], targets: Sequence[int],
                         sizes: np.ndarray, classes: Sequence[str], fingerprint: str, dataset_root: str,
                         epochs: int, batch_size: int, mix: str = "cutmix", label_format: str = "full",
                         top_k: int = 0, values: str = "logits", label_dtype: str = "float16",
                         input_size: int = 224, drop_last: bool = False, kept: np.ndarray | None = None,
                         pruning: dict[str, Any] | None = None, plan: dict[str, Any] | None = None,
                         num_classes: int | None = None, teachers: Sequence[dict[str, Any]] = (),
                         crop: dict[str, Any] | None = None, seed: int | None = None,
                         source: dict[str, Any] | None = None, rows_per_shard: int | None = None,
                         overwrite: bool = False) -> "RelabelStore":
    """An empty relabel store for ``epochs`` passes over ``len(files)`` images in steps of ``batch_size``.

    ``kept``: the (epoch, step) pairs stored, (S, 2), sorted in time order (default: all; a pruned step has no
    row). ``pruning``: how they were chosen, for people ({"how": "lpld", ...}). ``plan``: how the images of a
    step were drawn ({"sampler": "sre2l", "seed": 42}: SRe2L's seeded RandomSampler; {"sampler": "stored"}).
    ``sizes``: (N, 2) (height, width) of each image. ``mix``: cutmix, mixup or none; ``label_format``: full
    (K = num_classes values) or topk (``top_k``); ``values``: logits or probabilities; ``label_dtype``: float16 or
    float32."""
    for name, value, allowed in (("mix", mix, MIX_MODES), ("label_format", label_format, LABEL_FORMATS),
                                 ("values", values, LABEL_VALUES), ("label_dtype", label_dtype, LABEL_DTYPES)):
        if value not in allowed:
            raise StoreWriteError(f"{path}: {name} is {value!r}; choose {', '.join(allowed)}")
    n = len(files)
    num_classes = len(classes) if num_classes is None else int(num_classes)
    if not 1 <= batch_size or epochs < 1:
        raise StoreWriteError(f"{path}: epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if drop_last and batch_size > n:
        raise StoreWriteError(f"{path}: batch size {batch_size} with drop_last leaves no step for {n} images")
    per_epoch = steps_per_epoch(n, batch_size, drop_last)
    kept = all_steps(epochs, per_epoch) if kept is None else np.asarray(kept, dtype=np.int64).reshape(-1, 2)
    if kept.shape[0] == 0:
        raise StoreWriteError(f"{path}: no step is kept; a relabel store holds at least one step")
    order = kept[:, 0] * per_epoch + kept[:, 1]
    if (kept < 0).any() or (kept[:, 0] >= epochs).any() or (kept[:, 1] >= per_epoch).any() or \
            (np.diff(order) <= 0).any():
        raise StoreWriteError(f"{path}: kept steps must be distinct (epoch, step) pairs in time order, epochs in "
                              f"0..{epochs - 1}, steps in 0..{per_epoch - 1}")
    sizes_per_step = np.minimum(batch_size, n - kept[:, 1] * batch_size).astype(np.int32)
    label = {"format": label_format, "values": values, "dtype": label_dtype}
    if label_format == "topk":
        label["k"] = int(top_k)
    fields = {"epochs": int(epochs), "steps_per_epoch": int(per_epoch), "batch_size": int(batch_size),
              "drop_last": bool(drop_last), "num_steps": int(kept.shape[0]), "input_size": int(input_size),
              "mix": mix, "label": label, "plan": dict(plan or {"sampler": "stored"}), "pruning": dict(pruning or {})}
    if rows_per_shard is None:
        width = num_classes if label_format == "full" else 2 * int(top_k)
        per_step = batch_size * (width * np.dtype(label_dtype).itemsize + 24)
        rows_per_shard = max(1, min(MAX_ROWS_PER_SHARD, TARGET_SHARD_BYTES // per_step))
    store = create_store(path, files=files, targets=targets, classes=classes, fingerprint=fingerprint,
                         dataset_root=dataset_root, num_crops=batch_size, num_classes=num_classes,
                         teachers=teachers, crop=crop, seed=seed, source=source, rows_per_shard=rows_per_shard,
                         crops_per_chunk=batch_size, overwrite=overwrite, kind="relabel", kind_fields=fields,
                         sizes=sizes, row_data={"step_index": kept.astype(np.int32), "step_size": sizes_per_step})
    return RelabelStore(store)


def open_relabel(path: "str | os.PathLike", mode: str = "r") -> "RelabelStore":
    """Open a relabel store; a store of another kind is refused by name."""
    return RelabelStore(LabelStore(path, mode=mode))


@dataclasses.dataclass
class StepBlock:
    """Rows ``[start, start + len)`` of a relabel store: consecutive kept steps. Per step (S,): ``step_index``
    (epoch, step), ``step_size``, ``mix_lam``, ``mix_box``; per position (S, B): ``images``, ``boxes`` (S, B, 4),
    ``flips``, ``mix_partner``; the labels: ``labels`` (S, B, K) or ``label_idx`` / ``label_val`` (S, B, k).
    Positions >= step_size are pad."""

    start: int
    arrays: dict[str, np.ndarray]

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays") or {}
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"a step block holds no array '{name}' (it holds {', '.join(arrays)})")

    def __len__(self) -> int:
        return len(self.arrays["step_size"])


class RelabelStore:
    """A relabel store by (epoch, step); ``store`` is the :class:`~labelstore.LabelStore` underneath (files,
    targets, sizes, classes, check_dataset, verify, finalize, ...)."""

    def __init__(self, store: LabelStore):
        store.require_kind("relabel")
        self.store = store
        f = store.fields
        self.epochs, self.steps_per_epoch, self.batch_size = f["epochs"], f["steps_per_epoch"], f["batch_size"]
        self.drop_last, self.num_steps, self.input_size = f["drop_last"], f["num_steps"], f["input_size"]
        self.mix, self.plan, self.pruning = f["mix"], f["plan"], f["pruning"]
        self.label_format, self.values = f["label"]["format"], f["label"]["values"]
        self.label_dtype = np.dtype(f["label"]["dtype"])
        self.top_k = f["label"]["k"]  # num_classes for full labels
        self._index: np.ndarray | None = None
        self._sizes: np.ndarray | None = None

    # ------------------------------------------------------------------ which steps
    @property
    def path(self) -> str:
        return self.store.path

    @property
    def label_arrays(self) -> tuple[str, ...]:
        return ("labels",) if self.label_format == "full" else ("label_idx", "label_val")

    @property
    def step_index(self) -> np.ndarray:
        """(S, 2) int32: (epoch, step) of each row, in time order."""
        if self._index is None:
            index = self.store._read("step_index", slice(None))
            order = index[:, 0].astype(np.int64) * self.steps_per_epoch + index[:, 1]
            if (index < 0).any() or (index[:, 0] >= self.epochs).any() or \
                    (index[:, 1] >= self.steps_per_epoch).any() or (np.diff(order) <= 0).any():
                from .errors import StoreCorruptError  # noqa: PLC0415
                raise StoreCorruptError(f"{self.path}: its step_index is not distinct (epoch, step) pairs in time "
                                        "order inside the plan; the store is damaged or was crafted: re-import it")
            self._index = index
        return self._index

    @property
    def step_sizes(self) -> np.ndarray:
        """(S,) int32: the positions used in each row's step."""
        if self._sizes is None:
            self._sizes = self.store._read("step_size", slice(None))
        return self._sizes

    def row_of(self, epoch: int, step: int) -> int | None:
        """The row holding (epoch, step), or None when that step was pruned away (absent by design)."""
        key = int(epoch) * self.steps_per_epoch + int(step)
        order = self.step_index[:, 0].astype(np.int64) * self.steps_per_epoch + self.step_index[:, 1]
        r = int(np.searchsorted(order, key))
        return r if r < len(order) and order[r] == key else None

    def rows_of_epoch(self, epoch: int) -> tuple[int, int]:
        """Rows ``[a, b)`` holding the kept steps of ``epoch`` (a == b: the whole epoch was pruned)."""
        e = self.step_index[:, 0]
        return int(np.searchsorted(e, epoch, "left")), int(np.searchsorted(e, epoch, "right"))

    def kept_steps(self, epoch: int) -> np.ndarray:
        """The steps of ``epoch`` that are stored (sorted)."""
        a, b = self.rows_of_epoch(epoch)
        return self.step_index[a:b, 1].copy()

    def done(self) -> np.ndarray:
        """(S,) bool: the row (step) is fully written (resume marker)."""
        return self.store.done()

    def shard_rows(self) -> list[tuple[int, int]]:
        """The write units: rows ``[a, b)`` of each shard; a writer writes whole ones."""
        return self.store.shard_ranges()

    def pending_shards(self) -> list[int]:
        return self.store.pending_shards()

    # ------------------------------------------------------------------ writing
    def write_steps(self, start: int, *, images: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                    mix_partner: np.ndarray, mix_lam: np.ndarray, mix_box: np.ndarray, overwrite: bool = False,
                    **labels: np.ndarray) -> None:
        """Write rows ``[start, start + len(images))`` (whole shards: ``shard_rows``). Per row (S,): ``mix_lam``
        (float64), ``mix_box`` (S, 4) (-1s unless CutMix); per position (S, B): ``images``, ``boxes`` (S, B, 4)
        normalised (i, j, h, w) float32, ``flips``, ``mix_partner``; labels: ``labels`` (S, B, K) or
        ``label_idx`` / ``label_val`` (S, B, k). Positions >= the step's size may hold anything: they are written
        as pad (-1, 0, False)."""
        rows = len(images)
        used = np.arange(self.batch_size)[None, :] < self.store._read("step_size", slice(start, start + rows))[:, None] \
            if rows and start + rows <= self.num_steps else None
        data = {"images": images, "boxes": boxes, "flips": flips, "mix_partner": mix_partner} | labels
        if used is not None:
            data = {k: _pad(np.asarray(v), used) if np.asarray(v).shape[:2] == used.shape else np.asarray(v)
                    for k, v in data.items()}
        self.store.write_block(start, mix_lam=np.asarray(mix_lam, np.float64), mix_box=np.asarray(mix_box),
                               overwrite=overwrite, **data)

    def finalize(self) -> bool:
        return self.store.finalize()

    # ------------------------------------------------------------------ reading
    def read_steps(self, a: int, b: int, *, check: bool = True, done: np.ndarray | None = None) -> StepBlock:
        """Rows ``[a, b)``: contiguous reads (one inner chunk per array and row); every row must be done and
        its values pass the kind's checks (``check``). ``done``: the store's done mask, read once by a caller that
        reads many blocks (else it is read here)."""
        if not 0 <= a < b <= self.num_steps:
            raise IndexError(f"{self.path}: rows {a}:{b} are not rows of this store (0..{self.num_steps - 1})")
        done = self.store.done() if done is None else done
        if not done[a:b].all():
            r = a + int(np.flatnonzero(~done[a:b])[0])
            e, s = (int(x) for x in self.step_index[r])
            from .errors import StoreIncompleteError  # noqa: PLC0415
            raise StoreIncompleteError(f"{self.path}: row {r} (epoch {e}, step {s}) has no labels yet; finish the "
                                       "command that writes the store (rerun it to resume)")
        self.store._check_chunk_files(self.store.crop_arrays, self.store._shards_of(np.arange(a, b)), listed=True)
        names = self.store.crop_arrays
        got = self.store._read_many({n: (slice(a, b),) for n in names}, rows_are_slice=True)
        if check:
            from .checks import check_block  # noqa: PLC0415
            check_block(got, self.store.num_classes, first_row=a, where=self.path, kind=self.store.kind,
                        fields=self.store.fields)
        return StepBlock(start=a, arrays=got)

    def read_step(self, epoch: int, step: int) -> StepBlock | None:
        """One step's row, or None when it was pruned away."""
        r = self.row_of(epoch, step)
        return None if r is None else self.read_steps(r, r + 1)


def _pad(v: np.ndarray, used: np.ndarray) -> np.ndarray:
    """``v`` (S, B, ...) with the positions past each step's size set to the pad value (-1 for ids, else 0)."""
    pad = -1 if v.dtype.kind in "iu" else 0
    out = v.copy()
    out[~used] = pad
    return out


def pixel_boxes(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """SRe2L's normalised crops (..., 4) (i, j, h, w) float32 -> the pixel boxes (..., 4) int64 (top, left, height,
    width) its replay crops, for images of ``sizes`` (..., 2) (height, width).

    SRe2L (``relabel/utils_fkd.py`` RandomResizedCropWithCoords) computes ``i * H, j * W, h * H, w * W`` in Python
    floats (float64) from the stored float32 values and calls torchvision's ``F.resized_crop``, whose PIL path crops
    ``img.crop((left, top, left + width, top + height))``; Pillow rounds each of the four edges with Python's
    ``round`` (half to even, as ``np.rint``). So the pixel box is x0 = rint(jW), y0 = rint(iH), x1 = rint(jW + wW),
    y1 = rint(iH + hH), height y1 - y0 and width x1 - x0; then a PIL bilinear resize to the input size, the flip,
    ToTensor and the normalisation."""
    b = np.asarray(boxes, np.float32).astype(np.float64)
    hw = np.asarray(sizes, np.float64)
    H, W = hw[..., 0:1], hw[..., 1:2]
    top, left = b[..., 0:1] * H, b[..., 1:2] * W
    y0, x0 = np.rint(top), np.rint(left)
    y1, x1 = np.rint(top + b[..., 2:3] * H), np.rint(left + b[..., 3:4] * W)
    return np.concatenate([y0, x0, y1 - y0, x1 - x0], axis=-1).astype(np.int64)
