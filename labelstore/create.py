"""Creating an empty label store: its arrays, chunking and codecs (:mod:`labelstore.schema` says why), and the
rows known up front (``files``, ``targets``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from .errors import StoreFormatError, StoreWriteError
from .location import exists, location
from .schema import ATTR_KEY, CHECKSUMS, FILES_CHUNK, FILL, WRITE_CONFIG, Layout, StoreMeta, box_dtype
from .store import LabelStore


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def _empty_folder(loc) -> bool:
    """A local folder holding nothing (e.g. the staging folder :func:`labelstore.locking.create_atomically`
    made for the store): it is created into."""
    d = loc.local_dir
    return d is not None and os.path.isdir(d) and not os.path.islink(d) and not os.listdir(d)


def create_store(path: "str | os.PathLike | Store", *, files: Sequence[str], targets: Sequence[int],
                 classes: Sequence[str], fingerprint: str, dataset_root: str, num_crops: int, top_k: int = 0,
                 num_classes: int | None = None, temperature: float = 1.0,
                 teachers: Sequence[dict[str, Any]] = (), crop: dict[str, Any] | None = None,
                 seed: int | None = None, source: dict[str, Any] | None = None, max_side: int = 65535,
                 rows_per_shard: int | None = None, crops_per_chunk: int | None = None,
                 overwrite: bool = False, kind: str = "topk", kind_fields: dict[str, Any] | None = None,
                 checksums: Sequence[int] | None = None) -> "LabelStore":
    """Create an empty store for ``len(files)`` images x ``num_crops`` crops x top-``top_k`` labels, or the labels
    of another ``kind`` (:mod:`labelstore.kinds`; e.g. ``kind="embedding", kind_fields={"dim": 128, "views":
    {...}}``). ``checksums``: the CRC-32 of each image's bytes (a shard set's index gives them), recorded so that a
    dataset whose bytes differ is refused by name before training."""
    where = path
    loc = location(where, mode="w")
    path = loc.name
    n = len(files)
    num_classes = len(classes) if num_classes is None else int(num_classes)
    if n == 0:
        raise StoreWriteError(f"{path}: cannot create a label store for 0 images")
    if len(targets) != n:
        raise StoreWriteError(f"{path}: {len(files)} files but {len(targets)} targets")
    if num_crops < 1:
        raise StoreWriteError(f"{path}: num_crops must be >= 1, got {num_crops}")
    if kind == "topk" and not 1 <= top_k <= num_classes:
        raise StoreWriteError(f"{path}: top_k={top_k} must be between 1 and the number of classes "
                              f"({num_classes}); use top_k={num_classes} to store full labels")
    tgt = np.asarray(targets, dtype=np.int64)
    if tgt.size and (tgt.min() < 0 or tgt.max() >= num_classes):
        bad = int(np.flatnonzero((tgt < 0) | (tgt >= num_classes))[0])
        raise StoreWriteError(f"{path}: target {tgt[bad]} of {files[bad]} is outside 0..{num_classes - 1}")
    if exists(loc) and not _empty_folder(loc):
        if not overwrite:
            raise StoreWriteError(f"{path} already exists; choose another --save-path, resume it, or "
                                  "delete it first")
        if loc.local_dir is not None:
            shutil.rmtree(loc.local_dir)
        else:
            sync(loc.store.delete_dir(""))

    layout = Layout.choose(n, num_crops, rows_per_shard, crops_per_chunk)
    meta = StoreMeta(num_images=n, num_crops=num_crops, top_k=top_k, num_classes=num_classes,
                     classes=list(classes), dataset_root=dataset_root, fingerprint=fingerprint,
                     temperature=float(temperature), teachers=list(teachers), crop=dict(crop or {}),
                     seed=seed, source=dict(source or {}), kind=kind, kind_fields=dict(kind_fields or {}))
    try:
        label_kind, fields = meta.label_kind(path)
    except StoreFormatError as e:
        raise StoreWriteError(str(e)) from None
    attrs = meta.to_attrs()
    attrs["layout"] = dataclasses.asdict(layout) | {"write_empty_chunks": True}
    group = zarr.open_group(loc.store, mode="w", attributes={ATTR_KEY: attrs})

    R, c = layout.rows_per_shard, layout.crops_per_chunk
    sc = layout.shard_crops(num_crops)
    comp = _compressors()
    group.create_array("files", shape=(n,), dtype=str, chunks=(min(n, FILES_CHUNK),))
    group.create_array("targets", shape=(n,), dtype=np.int32, chunks=(min(n, FILES_CHUNK),),
                       compressors=comp)
    group.create_array("sizes", shape=(n, 2), dtype=np.int32, chunks=(R, 2), compressors=comp,
                       fill_value=FILL["sizes"])
    group.create_array("done", shape=(n,), dtype=bool, chunks=(R,), compressors=comp,
                       fill_value=FILL["done"])
    arrays = [("boxes", (4,), box_dtype(max_side), FILL["boxes"]), ("flips", (), np.dtype(bool), FILL["flips"])]
    arrays += [(a.name, a.tail(fields), a.dtype_for(fields), a.fill) for a in label_kind.arrays]
    for name, tail, dt, fill in arrays:
        group.create_array(name, shape=(n, num_crops) + tail, dtype=dt, chunks=(R, c) + tail,
                           shards=(R, sc) + tail, compressors=comp, fill_value=fill)
    fa = group["files"].with_config(WRITE_CONFIG)
    for a in range(0, n, FILES_CHUNK):
        fa[a:a + FILES_CHUNK] = np.asarray(list(files[a:a + FILES_CHUNK]), dtype=str)
    group["targets"].with_config(WRITE_CONFIG)[:] = tgt.astype(np.int32)
    if checksums is not None:
        crc = np.asarray(checksums)
        if crc.shape != (n,):
            raise StoreWriteError(f"{path}: {crc.shape[0] if crc.ndim else 0} checksums for {n} files")
        group.create_array(CHECKSUMS, shape=(n,), dtype=np.uint32, chunks=(min(n, FILES_CHUNK),),
                           compressors=comp)
        group[CHECKSUMS].with_config(WRITE_CONFIG)[:] = crc.astype(np.uint32)
    return LabelStore(where, mode="r+")
