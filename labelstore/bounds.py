"""Bounds on what a store's metadata may claim, checked when it is opened, before anything is allocated.

A store's ``zarr.json`` files are input like any other: shapes written consistently but absurdly (10**13
images, a chunk as large as the array, a billion classes) would otherwise end in numpy's
``ArrayMemoryError``, an out-of-memory kill or a division by zero deep inside a command. Each check names
the value, what it would cost, and says that the metadata is damaged or crafted.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import StoreFormatError

#: Classes a store may label: dense soft labels are (batch, classes) on the GPU; ImageNet-21k has 21,841.
MAX_CLASSES = 1 << 20
#: Crops per image: FKD uses 500; a row's pool is read whole by ``show``, ``export-fkd`` and generation.
MAX_CROPS = 1 << 16
#: Bytes one decoded chunk may take: zarr allocates a whole inner chunk to read any element of it.
MAX_CHUNK_BYTES = 1 << 31
#: Bytes per image every command holds for the per-row tables (files, targets, sizes, done), pessimistic.
ROW_TABLE_BYTES = 128


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _fail(where: str, what: str) -> None:
    raise StoreFormatError(f"{where}: {what}. The store's metadata (zarr.json) is damaged or was crafted; "
                           "regenerate or re-import the store")


def check_bounds(where: str, meta, layout, arrays: dict) -> None:
    """Refuse metadata no command could use: counts out of range, chunks or per-row tables larger than
    this machine's memory. ``arrays`` maps array names to opened zarr arrays (shapes already matched)."""
    n, c, k, classes = meta.num_images, meta.num_crops, meta.top_k, meta.num_classes
    if n < 1:
        _fail(where, f"num_images is {n}; a store labels at least one image")
    if not 1 <= c <= MAX_CROPS:
        _fail(where, f"num_crops is {c:,}; fkd-dali reads stores of 1..{MAX_CROPS:,} crops per image")
    if not len(meta.classes) <= classes <= MAX_CLASSES or classes < 1:
        _fail(where, f"num_classes is {classes:,} for {len(meta.classes):,} class names; fkd-dali reads stores of "
                     f"1..{MAX_CLASSES:,} classes, at least as many as the dataset's")
    if meta.kind == "topk" and not 1 <= k <= classes:
        _fail(where, f"top_k is {k:,}; it must be between 1 and num_classes ({classes:,})")
    for name, value in (("rows_per_shard", layout.rows_per_shard), ("crops_per_chunk", layout.crops_per_chunk)):
        if value < 1:
            _fail(where, f"layout.{name} is {value}; it must be at least 1")
    memory = physical_memory()
    if memory and n * ROW_TABLE_BYTES > memory:
        _fail(where, f"it claims {n:,} images: the per-image tables alone would take "
                     f"~{n * ROW_TABLE_BYTES / 2**30:,.0f} GiB, more than this machine's {memory / 2**30:,.0f} GiB")
    rows = arrays["done"].shape[0] if "done" in arrays else n  # a step kind's rows are its stored steps
    if memory and rows * ROW_TABLE_BYTES > memory:
        _fail(where, f"it claims {rows:,} rows: their per-row tables alone would take "
                     f"~{rows * ROW_TABLE_BYTES / 2**30:,.0f} GiB, more than this machine's {memory / 2**30:,.0f} GiB")
    for name, arr in arrays.items():
        chunk = arr.chunks
        itemsize = 16 if name == "files" else int(getattr(arr.dtype, "itemsize", 8) or 8)
        nbytes = float(np.prod(chunk, dtype=np.float64)) * itemsize
        if nbytes > MAX_CHUNK_BYTES:
            _fail(where, f"array '{name}' has chunks of shape {tuple(chunk)} (~{nbytes / 2**30:,.1f} GiB each "
                         f"decoded); fkd-dali reads chunks of at most {MAX_CHUNK_BYTES / 2**30:.0f} GiB")
