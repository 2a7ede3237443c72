"""Checks of label values, vectorised over blocks of rows: a row is refused (naming its file) when a box
leaves its image or its labels fail its store kind's checks (:mod:`labelstore.kinds`: for top-k, a class id out
of range or a probability that is not one). Used wherever labels are written or read (:mod:`labelstore.writing`,
:mod:`labelstore.reading`, :mod:`labelstore.verify`), and of the rows' classes whenever a store's ``targets``
are read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import StoreCorruptError
from .kinds import TOPK, StoreKind


def check_block(data: dict[str, np.ndarray], num_classes: int, *, first_row: int, where: str,
                files: Sequence[str] | Callable[[int], str] | None = None, rows_mask: np.ndarray | None = None,
                row_ids: np.ndarray | None = None, kind: StoreKind = TOPK, fields: dict | None = None) -> None:
    """Reject impossible labels: boxes outside their image, and what the store's ``kind`` refuses (for top-k:
    class ids out of range, bad probabilities; ``fields``: the kind's metadata fields, default top-k's).

    Vectorised over the whole block in the stored dtypes (int32 for box arithmetic, no int64 copies);
    ``rows_mask`` limits the check to rows that are done. Block row i is store row ``row_ids[i]`` (default
    ``first_row + i``); ``files`` (a sequence or a function of the row) names it in the error.
    """
    boxes = np.asarray(data["boxes"])
    labels = {name: np.asarray(data[name]) for name in kind.names}
    if kind.views:  # a step kind's boxes and flips are the kind's to check (normalised, not pixels)
        labels |= {a.name: np.asarray(data[a.name]) for a in kind.views}
    sel = np.arange(len(boxes)) if rows_mask is None else np.flatnonzero(rows_mask)
    if sel.size == 0:
        return
    if rows_mask is not None and sel.size < len(boxes):
        boxes = boxes[sel]
        labels = {name: v[sel] for name, v in labels.items()}

    def fail(mask: np.ndarray, what: str) -> None:
        r = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if r.size:
            i = int(sel[r[0]])
            row = int(row_ids[i]) if row_ids is not None else i + first_row
            name = ""
            if files is not None:
                name = f" ({files(row) if callable(files) else files[row]})"
            raise StoreCorruptError(f"{where}: row {row}{name}: {what} ({int(r.size)} rows affected). The "
                                    "labels are invalid; regenerate or re-import them")

    if kind.rows == "step":
        for mask, what in kind.checks(labels, fields):
            fail(mask, what)
        return
    sizes = np.asarray(data["sizes"])
    sizes = sizes[sel] if rows_mask is not None and sel.size < len(sizes) else sizes
    wide = np.int64 if boxes.dtype.itemsize > 2 or sizes.dtype.itemsize > 4 else np.int32
    sizes = sizes.astype(wide, copy=False)
    fail((sizes < 1).any(axis=1), "image size is missing or < 1 px (a chunk may be missing on disk)")
    t, l, h, w = (boxes[..., i].astype(wide, copy=False) for i in range(4))
    fail((h < 1) | (w < 1), "a crop box has zero height or width (a chunk may be missing on disk)")
    fail((t < 0) | (l < 0) | (t + h > sizes[:, None, 0]) | (l + w > sizes[:, None, 1]),
         "a crop box reaches outside its image")
    for mask, what in kind.checks(labels, fields or {"num_classes": num_classes}):
        fail(mask, what)


def check_targets(targets: np.ndarray, num_classes: int, *, where: str, files: Callable[[int], str]) -> None:
    """Reject a ground-truth class id (``targets``) outside ``0..num_classes-1``, naming the first row."""
    t = np.asarray(targets)
    bad = np.flatnonzero((t < 0) | (t >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise StoreCorruptError(f"{where}: row {row} ({files(row)}): its class (targets) is {int(t[row])}, outside "
                                f"0..{num_classes - 1} (the store has {num_classes} classes; {bad.size} rows "
                                "affected). The store is damaged or was crafted; regenerate or re-import it")
