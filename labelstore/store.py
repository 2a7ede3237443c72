"""Create, open, write and read an FKD label store (schema v1, see :mod:`labelstore.schema`).

Writes go in blocks of whole shards (``write_block``): data arrays first, ``done`` last, each chunk file
replaced atomically by zarr's LocalStore, so a crash never leaves a row marked done with missing data.
Reads are bulk: ``read_round`` returns all N images x n crops as numpy arrays (one zarr call per array,
chunk by chunk), ``read_rows`` the full crop pool of chosen rows. Nothing here is meant to be called per
sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .bounds import check_bounds
from .errors import (StoreCorruptError, StoreFormatError, StoreIncompleteError, StoreMismatchError,
                     StoreNotFoundError, StoreWriteError)
from .paths import check_name, check_names
from .schema import (ALL_ARRAYS, ATTR_KEY, CROP_ARRAYS, FILES_CHUNK, SCHEMA_VERSION, Layout, StoreMeta, box_dtype,
                     class_dtype)

# Fill values are impossible values, so a chunk that is missing on disk reads as something the sanity
# checks reject instead of as plausible labels (zarr returns the fill value for absent chunks).
FILL = {"boxes": 0, "flips": False, "topk_idx": -1, "topk_val": float("nan"), "sizes": 0, "done": False}


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


@dataclasses.dataclass
class Round:
    """All images x crops ``[crop_start, crop_start + n)`` of the pool, in store row order."""

    index: int
    crop_start: int
    boxes: np.ndarray       # (N, n, 4)  top, left, height, width
    flips: np.ndarray       # (N, n)     bool
    topk_idx: np.ndarray    # (N, n, k)
    topk_val: np.ndarray    # (N, n, k)  float16

    @property
    def num_crops(self) -> int:
        return self.boxes.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.boxes, self.flips, self.topk_idx, self.topk_val))


def create_store(path: str | os.PathLike, *, files: Sequence[str], targets: Sequence[int],
                 classes: Sequence[str], fingerprint: str, dataset_root: str, num_crops: int, top_k: int,
                 num_classes: int | None = None, temperature: float = 1.0,
                 teachers: Sequence[dict[str, Any]] = (), crop: dict[str, Any] | None = None,
                 seed: int | None = None, source: dict[str, Any] | None = None, max_side: int = 65535,
                 rows_per_shard: int | None = None, crops_per_chunk: int | None = None,
                 overwrite: bool = False) -> "LabelStore":
    """Create an empty store for ``len(files)`` images x ``num_crops`` crops x top-``top_k`` labels."""
    path = os.fspath(path)
    n = len(files)
    num_classes = len(classes) if num_classes is None else int(num_classes)
    if n == 0:
        raise StoreWriteError(f"{path}: cannot create a label store for 0 images")
    if len(targets) != n:
        raise StoreWriteError(f"{path}: {len(files)} files but {len(targets)} targets")
    if num_crops < 1:
        raise StoreWriteError(f"{path}: num_crops must be >= 1, got {num_crops}")
    if not 1 <= top_k <= num_classes:
        raise StoreWriteError(f"{path}: top_k={top_k} must be between 1 and the number of classes "
                              f"({num_classes}); use top_k={num_classes} to store full labels")
    tgt = np.asarray(targets, dtype=np.int64)
    if tgt.size and (tgt.min() < 0 or tgt.max() >= num_classes):
        bad = int(np.flatnonzero((tgt < 0) | (tgt >= num_classes))[0])
        raise StoreWriteError(f"{path}: target {tgt[bad]} of {files[bad]} is outside 0..{num_classes - 1}")
    if os.path.exists(path):
        if not overwrite:
            raise StoreWriteError(f"{path} already exists; choose another --save-path, resume it, or "
                                  "delete it first")
        shutil.rmtree(path)

    layout = Layout.choose(n, num_crops, rows_per_shard, crops_per_chunk)
    meta = StoreMeta(num_images=n, num_crops=num_crops, top_k=top_k, num_classes=num_classes,
                     classes=list(classes), dataset_root=dataset_root, fingerprint=fingerprint,
                     temperature=float(temperature), teachers=list(teachers), crop=dict(crop or {}),
                     seed=seed, source=dict(source or {}))
    attrs = meta.to_attrs()
    attrs["layout"] = dataclasses.asdict(layout)
    group = zarr.open_group(path, mode="w", attributes={ATTR_KEY: attrs})

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
    kdt = class_dtype(num_classes)
    for name, tail, dt in (("boxes", (4,), box_dtype(max_side)), ("flips", (), np.dtype(bool)),
                           ("topk_idx", (top_k,), kdt), ("topk_val", (top_k,), np.dtype(np.float16))):
        group.create_array(name, shape=(n, num_crops) + tail, dtype=dt, chunks=(R, c) + tail,
                           shards=(R, sc) + tail, compressors=comp, fill_value=FILL[name])
    group["files"][:] = np.asarray(list(files), dtype=str)
    group["targets"][:] = tgt.astype(np.int32)
    return LabelStore(path, mode="r+")


def open_store(path: str | os.PathLike, mode: str = "r") -> "LabelStore":
    """Open an existing store; ``mode`` is "r" (read) or "r+" (resume writing)."""
    return LabelStore(os.fspath(path), mode=mode)


class LabelStore:
    """A label store on local disk. Use :func:`create_store` or :func:`open_store`."""

    def __init__(self, path: str, mode: str = "r"):
        self.path = path
        self.mode = mode
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            what = "does not exist" if not os.path.exists(path) else "is not a Zarr v3 group (no zarr.json)"
            raise StoreNotFoundError(f"{path} {what}: expected an fkd-dali label store, made by "
                                     "`fkd-dali generate` or `fkd-dali import-fkd`")
        try:
            self.group = zarr.open_group(path, mode=mode)
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreFormatError(f"{path}: cannot open the Zarr group ({e})") from e
        attrs = self.group.attrs.asdict().get(ATTR_KEY)
        if not isinstance(attrs, dict):
            raise StoreFormatError(f"{path} is a Zarr group without the '{ATTR_KEY}' attributes: not an "
                                   "fkd-dali label store")
        self.meta = StoreMeta.from_attrs(attrs, path)
        if self.meta.schema_version != SCHEMA_VERSION:
            raise StoreFormatError(f"{path} has schema version {self.meta.schema_version}; this fkd-dali "
                                   f"reads version {SCHEMA_VERSION}. Upgrade fkd-dali or regenerate the store")
        self._check_arrays()
        lay = attrs.get("layout") or {}
        self.layout = Layout(rows_per_shard=int(lay.get("rows_per_shard", self.group["done"].chunks[0])),
                             crops_per_chunk=int(lay.get("crops_per_chunk", self.group["boxes"].chunks[1])))
        check_bounds(path, self.meta, self.layout, {name: self.group[name] for name in ALL_ARRAYS})
        if self.meta.dataset_root:
            check_name(self.meta.dataset_root, path, "dataset.root (the split folder)")
        self._files: np.ndarray | None = None
        self._targets: np.ndarray | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def num_images(self) -> int:
        return self.meta.num_images

    @property
    def num_crops(self) -> int:
        return self.meta.num_crops

    @property
    def top_k(self) -> int:
        return self.meta.top_k

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def complete(self) -> bool:
        return self.meta.complete

    def num_rounds(self, n: int) -> int:
        """How many disjoint rounds of n crops the pool holds (leftover crops are never used)."""
        return self.num_crops // n

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def _check_arrays(self) -> None:
        m = self.meta
        expect = {"files": (m.num_images,), "targets": (m.num_images,), "sizes": (m.num_images, 2),
                  "done": (m.num_images,), "boxes": (m.num_images, m.num_crops, 4),
                  "flips": (m.num_images, m.num_crops), "topk_idx": (m.num_images, m.num_crops, m.top_k),
                  "topk_val": (m.num_images, m.num_crops, m.top_k)}
        have = set(self.group.array_keys())
        for name, shape in expect.items():
            if name not in have:
                raise StoreFormatError(f"{self.path}: array '{name}' is missing; the store is damaged or "
                                       "was not made by fkd-dali")
            got = tuple(self.group[name].shape)
            if got != shape:
                raise StoreFormatError(f"{self.path}: array '{name}' has shape {got}, the metadata says "
                                       f"{shape}; the store is damaged")

    @contextlib.contextmanager
    def _attrs_lock(self):
        """Serialise read-modify-write of the group attributes between processes (ranks) on one host."""
        fd = os.open(self.path, os.O_RDONLY)  # the store directory itself: no extra file in the hierarchy
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _set_attr(self, _merge=None, **updates: Any) -> None:
        with self._attrs_lock():
            fresh = zarr.open_group(self.path, mode="r").attrs.asdict()[ATTR_KEY]
            attrs = dict(fresh)
            attrs.update(updates)
            if _merge is not None:
                _merge(attrs)
            self.group.attrs.update({ATTR_KEY: attrs})
        self.meta = StoreMeta.from_attrs(attrs, self.path)

    def update_meta(self, **updates: Any) -> None:
        """Replace top-level metadata keys (e.g. ``teachers``, ``source``). Writers only."""
        self._require_writable()
        self._set_attr(**updates)

    # ------------------------------------------------------------------ per-row arrays
    @property
    def files(self) -> np.ndarray:
        if self._files is None:
            files = np.asarray(self._read("files", slice(None)), dtype=object).astype(str)
            check_names(files, self.path)  # names become paths: none may leave the dataset folder
            self._files = files
        return self._files

    @property
    def targets(self) -> np.ndarray:
        if self._targets is None:
            self._targets = self._read("targets", slice(None)).astype(np.int64)
        return self._targets

    def sizes(self) -> np.ndarray:
        return self._read("sizes", slice(None))

    def done(self) -> np.ndarray:
        return self._read("done", slice(None))

    def shard_ranges(self) -> list[tuple[int, int]]:
        return self.layout.shard_ranges(self.num_images)

    def skipped_rows(self) -> np.ndarray:
        """Rows left out on purpose (e.g. corrupt images under --skip-corrupt), never served."""
        return np.array(sorted({int(r) for r, _ in self.meta.skipped}), dtype=np.int64)

    def settled(self) -> np.ndarray:
        """Per row: done, or skipped on purpose."""
        mask = self.done()
        mask[self.skipped_rows()] = True
        return mask

    def missing_rows(self) -> np.ndarray:
        """Rows neither done nor skipped."""
        return np.flatnonzero(~self.settled())

    def pending_shards(self) -> list[int]:
        """Indices of shards with at least one row neither done nor skipped."""
        settled = self.settled()
        return [i for i, (a, b) in enumerate(self.shard_ranges()) if not settled[a:b].all()]

    def mark_skipped(self, rows_and_reasons: list[tuple[int, str]]) -> None:
        """Record rows left out on purpose, with the reason (e.g. the file and its decode error)."""
        self._require_writable()
        new = [[int(r), str(why)] for r, why in rows_and_reasons]

        def merge(attrs):
            have = {int(r) for r, _ in attrs.get("skipped", [])}
            attrs["skipped"] = list(attrs.get("skipped", [])) + [x for x in new if x[0] not in have]
        self._set_attr(_merge=merge)

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreWriteError(f"{self.path} was opened read-only; open it with mode='r+' to write")

    def write_block(self, start: int, *, sizes: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                    topk_idx: np.ndarray, topk_val: np.ndarray, rows_done: np.ndarray | None = None,
                    overwrite: bool = False) -> None:
        """Write whole rows ``[start, start + len(sizes))``; the block must cover whole shards.

        Data arrays are written first and ``done`` last. ``rows_done`` (bool per row, default all) says
        which rows hold real labels; the others stay not done (e.g. skipped corrupt images). Rows
        already done are refused unless ``overwrite`` (nothing is silently replaced).
        """
        self._require_writable()
        m = self.meta
        count = len(sizes)
        stop = start + count
        R = self.layout.rows_per_shard
        if start % R or (stop % R and stop != m.num_images) or count == 0 or stop > m.num_images:
            raise StoreWriteError(f"{self.path}: block [{start}, {stop}) is not made of whole shards of "
                                  f"{R} rows (N={m.num_images}); writers must own whole shards")
        expect = {"sizes": (count, 2), "boxes": (count, m.num_crops, 4), "flips": (count, m.num_crops),
                  "topk_idx": (count, m.num_crops, m.top_k), "topk_val": (count, m.num_crops, m.top_k)}
        data = {"sizes": np.asarray(sizes), "boxes": np.asarray(boxes), "flips": np.asarray(flips),
                "topk_idx": np.asarray(topk_idx), "topk_val": np.asarray(topk_val)}
        for name, shape in expect.items():
            if data[name].shape != shape:
                raise StoreWriteError(f"{self.path}: '{name}' block has shape {data[name].shape}, "
                                      f"expected {shape}")
        if not overwrite:
            already = np.flatnonzero(self._read("done", slice(start, stop)))
            if already.size:
                raise StoreWriteError(f"{self.path}: rows {start + already[0]}.. are already done; pass "
                                      "overwrite=True to replace written labels")
        mask = np.ones(count, bool) if rows_done is None else np.asarray(rows_done, dtype=bool)
        if mask.shape != (count,):
            raise StoreWriteError(f"{self.path}: rows_done has shape {mask.shape}, expected ({count},)")
        check_block(data, m.num_classes, first_row=start, files=self.files, where=self.path, rows_mask=mask)
        for name in ("sizes",) + CROP_ARRAYS:
            arr = self.group[name]
            try:
                arr[start:stop] = data[name].astype(arr.dtype, copy=False)
            except OSError as e:
                raise StoreWriteError(f"{self.path}: writing '{name}' rows [{start}, {stop}) failed: {e}. "
                                      "Nothing of these rows is marked done; free space and rerun the "
                                      "same command to resume") from e
        try:
            self.group["done"][start:stop] = mask
        except OSError as e:
            raise StoreWriteError(f"{self.path}: writing the done flags of rows [{start}, {stop}) failed: "
                                  f"{e}. Free space and rerun the same command to resume") from e

    def clear_done(self, rows: np.ndarray | slice) -> None:
        """Mark rows as not done (their labels will be regenerated on resume)."""
        self._require_writable()
        done = self.done()
        done[rows] = False
        self.group["done"][:] = done
        self._set_attr(complete=False)

    def finalize(self) -> bool:
        """Set ``complete`` once every row is done or skipped; returns whether it is. Never clears the flag
        (so ranks finishing at different times cannot undo each other); ``clear_done`` does."""
        self._require_writable()
        complete = bool(self.settled().all())
        if complete and not self.meta.complete:
            self._set_attr(complete=True)
        return complete

    def remove_partial_files(self) -> int:
        """Delete temporary chunk files left by a writer killed mid-write (zarr writes ``*.partial`` and
        renames); returns how many."""
        count = 0
        for d, _, fs in os.walk(self.path):
            for f in fs:
                if f.endswith(".partial"):
                    os.remove(os.path.join(d, f))
                    count += 1
        return count

    # ------------------------------------------------------------------ reading
    def _read(self, name: str, *selection: Any) -> np.ndarray:
        arr = self.group[name]
        sel = selection if len(selection) > 1 else selection[0]
        try:
            return arr[sel]
        except Exception as e:
            raise self._locate_corruption(name, e) from e

    def _read_orthogonal(self, name: str, rows: np.ndarray) -> np.ndarray:
        arr = self.group[name]
        try:
            return arr.get_orthogonal_selection((rows,) + (slice(None),) * (arr.ndim - 1))
        except Exception as e:
            raise self._locate_corruption(name, e) from e

    def _locate_corruption(self, name: str, err: Exception) -> Exception:
        """Find the first chunk of ``name`` that fails to decode and name it (only on the error path)."""
        if isinstance(err, (KeyboardInterrupt, MemoryError)):
            return err
        arr = self.group[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        for s in range(0, arr.shape[0], rows):
            try:
                arr[s:s + rows]
            except Exception as e:
                key = "/".join(["c", str(s // rows)] + ["0"] * (arr.ndim - 1))
                return StoreCorruptError(
                    f"{self.path}: array '{name}', chunk file {name}/{key} (rows {s}..{min(arr.shape[0], s + rows) - 1}) "
                    f"cannot be decoded: {type(e).__name__}: {e}. The file is truncated or damaged; restore "
                    f"it, or clear those rows with `fkd-dali inspect {self.path} --clear-rows {s}:{s + rows}` "
                    "and rerun generation to relabel them")
        return StoreCorruptError(f"{self.path}: reading array '{name}' failed: {type(err).__name__}: {err}")

    def _check_chunk_files(self, names: Sequence[str], rows_done: np.ndarray) -> None:
        """Every shard that holds done rows must exist on disk (zarr would return fill values)."""
        for i, (a, b) in enumerate(self.shard_ranges()):
            if not rows_done[a:b].any():
                continue
            for name in names:
                arr = self.group[name]
                key = os.path.join(self.path, name, "c", str(i), *(["0"] * (arr.ndim - 1)))
                if not os.path.isfile(key):
                    raise StoreCorruptError(
                        f"{self.path}: array '{name}' has no chunk file {os.path.relpath(key, self.path)} "
                        f"although rows {a}..{b - 1} are marked done; the store lost a file. Restore it, "
                        f"or clear those rows with `fkd-dali inspect {self.path} --clear-rows {a}:{b}` and "
                        "rerun generation")

    def require_complete(self, allow_incomplete: bool = False) -> np.ndarray:
        """Return the done mask (the rows to serve); raise StoreIncompleteError if rows are neither done nor
        skipped on purpose, unless allowed."""
        done = self.done()
        missing_mask = ~self.settled()
        missing = int(missing_mask.sum())
        if missing and not allow_incomplete:
            first = int(np.flatnonzero(missing_mask)[0])
            raise StoreIncompleteError(
                f"{self.path}: {missing} of {self.num_images} rows have no labels yet (first: row {first}, "
                f"{self.files[first]}). Finish generation by rerunning the same `fkd-dali generate` command, "
                "or pass --allow-incomplete to train on the done rows only")
        return done

    def verify(self) -> dict[str, int]:
        """Decode every chunk and check every done row's labels; raises StoreCorruptError on damage."""
        done = self.done()
        self._check_chunk_files(CROP_ARRAYS, done)
        files, sizes = self.files, self.sizes()
        _ = self.targets
        for a, b in self.shard_ranges():
            block = {name: self._read(name, slice(a, b)) for name in CROP_ARRAYS}
            block["sizes"] = sizes[a:b]
            check_block(block, self.num_classes, first_row=a, files=files, where=self.path,
                        rows_mask=done[a:b])
        return {"rows_done": int(done.sum()), "shards": len(self.shard_ranges())}

    def read_round(self, r: int, n: int, *, check: bool = True) -> Round:
        """All images x crops ``[r*n, (r+1)*n)``: bulk reads, one zarr call per array."""
        if n < 1 or r < 0 or (r + 1) * n > self.num_crops:
            raise ValueError(f"{self.path}: round {r} of {n} crops needs crops [{r * n}, {(r + 1) * n}) but "
                             f"the pool has {self.num_crops} crops per image ({self.num_rounds(n)} rounds "
                             f"of {n})")
        done = self.done()
        self._check_chunk_files(CROP_ARRAYS, done)
        cs = slice(r * n, (r + 1) * n)
        out = Round(index=r, crop_start=r * n,
                    boxes=self._read("boxes", slice(None), cs), flips=self._read("flips", slice(None), cs),
                    topk_idx=self._read("topk_idx", slice(None), cs),
                    topk_val=self._read("topk_val", slice(None), cs))
        if check:
            check_block({"sizes": self.sizes(), "boxes": out.boxes, "flips": out.flips,
                         "topk_idx": out.topk_idx, "topk_val": out.topk_val}, self.num_classes,
                        first_row=0, files=self.files, where=self.path, rows_mask=done)
        return out

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The full crop pool of the given rows (any order): sizes, boxes, flips, topk_idx, topk_val."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise IndexError(f"{self.path}: rows must be in 0..{self.num_images - 1}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        self._check_chunk_files(CROP_ARRAYS, self.done())
        out = {name: self._read_orthogonal(name, uniq)[inverse] for name in ("sizes",) + CROP_ARRAYS}
        out["done"] = self.done()[rows]
        return out

    # ------------------------------------------------------------------ validation against a dataset
    def check_dataset(self, *, files: Sequence[str], classes: Sequence[str], fingerprint: str,
                      targets: Sequence[int] | None = None, data_dir: str = "the dataset") -> None:
        """Raise StoreMismatchError naming the first difference (count, classes, files, fingerprint)."""
        m = self.meta
        if list(classes) != list(m.classes):
            diff = _first_difference(list(m.classes), list(classes))
            raise StoreMismatchError(
                f"{self.path} was made for {len(m.classes)} classes, {data_dir} has {len(classes)}; "
                f"first difference: {diff}. Use the store made for this dataset, or regenerate it")
        if len(files) != m.num_images:
            raise StoreMismatchError(
                f"{self.path} labels {m.num_images} images, {data_dir} has {len(files)}; first difference: "
                f"{_first_difference(list(self.files), list(files))}. The dataset changed since the store "
                "was made: regenerate the store, or restore the dataset")
        stored = self.files
        same = np.asarray(stored, dtype=object) == np.asarray(list(files), dtype=object)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            raise StoreMismatchError(
                f"{self.path}: image {i} is '{stored[i]}' in the store but '{files[i]}' in {data_dir}; the "
                "store was made from another dataset (or files were renamed)")
        if targets is not None:
            t = np.asarray(targets)
            bad = np.flatnonzero(t != self.targets)
            if bad.size:
                i = int(bad[0])
                raise StoreMismatchError(f"{self.path}: {stored[i]} has class {self.targets[i]} in the store "
                                         f"but {t[i]} in {data_dir}")
        if fingerprint != m.fingerprint:
            raise StoreMismatchError(
                f"{self.path}: the same {m.num_images} file names, but their sizes differ from when the "
                f"store was made (fingerprint {m.fingerprint[:19]}... vs {fingerprint[:19]}...): some image "
                "was replaced or modified. Restore the original files, or regenerate the store")


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"entry {i} is '{x}' in the store, '{y}' in the dataset"
    if len(a) > len(b):
        return f"the store has extra entries from '{a[len(b)]}' on"
    if len(b) > len(a):
        return f"the dataset has extra entries from '{b[len(a)]}' on"
    return "none"


def check_block(data: dict[str, np.ndarray], num_classes: int, *, first_row: int, where: str,
                files: np.ndarray | None = None, rows_mask: np.ndarray | None = None) -> None:
    """Reject impossible labels: boxes outside their image, class ids out of range, bad probabilities.

    Vectorised over the whole block; ``rows_mask`` limits the check to rows that are done.
    """
    sizes = np.asarray(data["sizes"]).astype(np.int64)
    boxes = np.asarray(data["boxes"]).astype(np.int64)
    idx = np.asarray(data["topk_idx"])
    val = np.asarray(data["topk_val"])
    if rows_mask is not None:
        sel = np.flatnonzero(rows_mask)
        if sel.size == 0:
            return
        sizes, boxes, idx, val = sizes[sel], boxes[sel], idx[sel], val[sel]
    else:
        sel = np.arange(len(sizes))

    def fail(mask: np.ndarray, what: str) -> None:
        r = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if r.size:
            row = int(sel[r[0]]) + first_row
            name = f" ({files[row]})" if files is not None else ""
            raise StoreCorruptError(f"{where}: row {row}{name}: {what} ({int(r.size)} rows affected). The "
                                    "labels are invalid; regenerate or re-import them")

    fail((sizes < 1).any(axis=1), "image size is missing or < 1 px (a chunk may be missing on disk)")
    t, l, h, w = (boxes[..., i] for i in range(4))
    fail((h < 1) | (w < 1), "a crop box has zero height or width (a chunk may be missing on disk)")
    fail((t < 0) | (l < 0) | (t + h > sizes[:, None, 0]) | (l + w > sizes[:, None, 1]),
         "a crop box reaches outside its image")
    fail((idx < 0) | (idx >= num_classes), f"a class id is outside 0..{num_classes - 1}")
    vf = val.astype(np.float32)
    fail(~np.isfinite(vf) | (vf < 0) | (vf > 1.001), "a probability is not a finite value in [0, 1]")
