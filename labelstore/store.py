"""Create, open, write and read an FKD label store (schema v1, see :mod:`labelstore.schema`).

A store lives in a local folder, a read-only ``.zip`` or behind any fsspec URL (``s3://``, ``gs://``,
``file://``, ...): :func:`location` picks zarr's own store class (LocalStore, ZipStore, FsspecStore).
Writes go in blocks of whole shards (``write_block``): data arrays first, ``done`` last, each chunk file
replaced atomically by zarr's LocalStore (an object store PUTs whole objects), so a crash never leaves a
row marked done with missing data. Every chunk is written, also one equal to the fill value, so a missing
shard file always means a lost one. Reads are bulk: ``read_round`` returns the chosen rows x n crops as
numpy arrays (one zarr call per array), ``read_rows`` the full crop pool of chosen rows. Nothing here is
meant to be called per sample.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from .bounds import check_bounds
from .errors import (StoreCorruptError, StoreFormatError, StoreIncompleteError, StoreMismatchError,
                     StoreNotFoundError, StoreWriteError)
from .paths import check_name, check_names
from .pathtable import PathTable
from .schema import (ALL_ARRAYS, ATTR_KEY, CROP_ARRAYS, FILES_CHUNK, SCHEMA_VERSION, Layout, StoreMeta, box_dtype,
                     class_dtype)

# Fill values are impossible values, so a chunk that is missing on disk reads as something the sanity
# checks reject instead of as plausible labels (zarr returns the fill value for absent chunks).
FILL = {"boxes": 0, "flips": False, "topk_idx": -1, "topk_val": float("nan"), "sizes": 0, "done": False}


# Every chunk is written, also one equal to the fill value (an all-False ``flips`` shard is real data):
# zarr skips such chunks by default, and a skipped chunk cannot be told from a lost file.
WRITE_CONFIG = {"write_empty_chunks": True}
# A read that gives way to others (``read_round(pause=...)``) pauses at most every this many shards: on an
# object store that is 32 x (4 x 2 + 1) requests, on local disk ~0.1 s of decoding at world 1 on ImageNet-1k.
READ_BLOCK_SHARDS = 32
CHECK_ROWS = 1 << 16  # rows validated at a time (bounds the temporary copies of check_block)
# Chunks decoded per batch of zarr's codec pipeline (default 1): a shard holds C/4 inner chunks per array;
# decoding them in batches was faster in every paired trial of a whole-shard read on the 2-core VM (1.3-2.8x,
# noisy), and no slower for a round's one chunk per shard.
READ_BATCH = {"codec_pipeline.batch_size": 128}
VERIFY_BATCH = 8  # shards per verify task (progress granularity)


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


@dataclasses.dataclass
class Round:
    """All images x crops ``[crop_start, crop_start + n)`` of the pool, in store row order."""

    index: int
    crop_start: int
    boxes: np.ndarray       # (N, n, 4)  top, left, height, width (N: the rows read, in ``rows`` order)
    flips: np.ndarray       # (N, n)     bool
    topk_idx: np.ndarray    # (N, n, k)
    topk_val: np.ndarray    # (N, n, k)  float16
    rows: np.ndarray | None = None  # the store rows read (sorted), None: all rows

    @property
    def num_crops(self) -> int:
        return self.boxes.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.boxes, self.flips, self.topk_idx, self.topk_val))


@dataclasses.dataclass
class Location:
    """Where a store lives: zarr's store object, the name shown to people, and the local folder if any."""

    store: Store
    name: str
    local_dir: str | None = None


def location(where: "str | os.PathLike | Store", mode: str = "r") -> Location:
    """zarr's own store for a local folder, a ``.zip`` (read-only), ``file://`` or any fsspec URL.

    A URL whose scheme needs a package that is not installed raises StoreNotFoundError saying which one to
    install. Credentials come the usual way (environment, config files), as for the fsspec backend alone;
    ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``) set backend options.
    """
    read_only = mode == "r"
    if isinstance(where, Store):
        local = where.root if isinstance(where, zarr.storage.LocalStore) else None
        return Location(where, str(where), os.fspath(local) if local is not None else None)
    where = os.fspath(where)
    scheme, sep, rest = where.partition("://")
    if sep and scheme == "file":
        where, sep = rest, ""
    if sep:
        import fsspec  # noqa: PLC0415 - a zarr dependency; only URLs need it
        import fsspec.config  # noqa: PLC0415
        from fsspec.registry import known_implementations  # noqa: PLC0415
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            impl = known_implementations.get(scheme, {}).get("class", "")
            pkg = impl.split(".")[0] or "the fsspec backend for it"
            raise StoreNotFoundError(f"{where}: {scheme}:// label stores need the {pkg} package ({e}); install "
                                     f"it with `pip install {pkg}`") from None
        except ValueError as e:
            raise StoreNotFoundError(f"{where}: unknown URL scheme {scheme}:// ({e}); use a local path or an "
                                     "fsspec URL such as s3://bucket/store") from None
        # No listings cache: ranks write shards concurrently, and a cached listing (or a cached "not found"
        # from before another rank created the store) would hide them.
        options: dict[str, Any] = {"use_listings_cache": False}
        if scheme in ("s3", "s3a") and "max_concurrency" not in fsspec.config.conf.get(scheme, {}):
            # s3fs sends a HEAD before every whole-object GET to decide whether to split it into parallel ranges
            # (objects over 50 MB); a store's objects are all smaller, so that doubled the requests for the
            # unsharded arrays (done, sizes, targets, metadata). One stream per object: one GET.
            options["max_concurrency"] = 1
        return Location(zarr.storage.FsspecStore.from_url(where, read_only=read_only, storage_options=options), where)
    if where.endswith(".zip") and not os.path.isdir(where):
        if not read_only:
            raise StoreWriteError(f"{where}: a .zip label store is read-only; generate or resume into a folder "
                                  "(or an object-store URL), then zip it (see docs/object-storage.md)")
        if not os.path.isfile(where):
            raise StoreNotFoundError(f"{where} does not exist: expected an fkd-dali label store, made by "
                                     "`fkd-dali generate` or `fkd-dali import-fkd`")
        return Location(zarr.storage.ZipStore(where, mode="r"), where)
    return Location(zarr.storage.LocalStore(where, read_only=read_only), where, where)


def _exists(loc: Location) -> bool:
    if loc.local_dir is not None:
        return os.path.exists(loc.local_dir)
    return bool(sync(loc.store.exists("zarr.json")))


def store_exists(where: "str | os.PathLike | Store") -> bool:
    """Whether a label store (a Zarr group) is at ``where`` (a path or URL)."""
    loc = location(where)
    if loc.local_dir is not None:
        return os.path.isfile(os.path.join(loc.local_dir, "zarr.json"))
    try:
        return bool(sync(loc.store.exists("zarr.json")))
    except FileNotFoundError:
        return False


def create_store(path: "str | os.PathLike | Store", *, files: Sequence[str], targets: Sequence[int],
                 classes: Sequence[str], fingerprint: str, dataset_root: str, num_crops: int, top_k: int,
                 num_classes: int | None = None, temperature: float = 1.0,
                 teachers: Sequence[dict[str, Any]] = (), crop: dict[str, Any] | None = None,
                 seed: int | None = None, source: dict[str, Any] | None = None, max_side: int = 65535,
                 rows_per_shard: int | None = None, crops_per_chunk: int | None = None,
                 overwrite: bool = False) -> "LabelStore":
    """Create an empty store for ``len(files)`` images x ``num_crops`` crops x top-``top_k`` labels."""
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
    if not 1 <= top_k <= num_classes:
        raise StoreWriteError(f"{path}: top_k={top_k} must be between 1 and the number of classes "
                              f"({num_classes}); use top_k={num_classes} to store full labels")
    tgt = np.asarray(targets, dtype=np.int64)
    if tgt.size and (tgt.min() < 0 or tgt.max() >= num_classes):
        bad = int(np.flatnonzero((tgt < 0) | (tgt >= num_classes))[0])
        raise StoreWriteError(f"{path}: target {tgt[bad]} of {files[bad]} is outside 0..{num_classes - 1}")
    if _exists(loc):
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
                     seed=seed, source=dict(source or {}))
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
    kdt = class_dtype(num_classes)
    for name, tail, dt in (("boxes", (4,), box_dtype(max_side)), ("flips", (), np.dtype(bool)),
                           ("topk_idx", (top_k,), kdt), ("topk_val", (top_k,), np.dtype(np.float16))):
        group.create_array(name, shape=(n, num_crops) + tail, dtype=dt, chunks=(R, c) + tail,
                           shards=(R, sc) + tail, compressors=comp, fill_value=FILL[name])
    fa = group["files"].with_config(WRITE_CONFIG)
    for a in range(0, n, FILES_CHUNK):
        fa[a:a + FILES_CHUNK] = np.asarray(list(files[a:a + FILES_CHUNK]), dtype=str)
    group["targets"].with_config(WRITE_CONFIG)[:] = tgt.astype(np.int32)
    return LabelStore(where, mode="r+")


def open_store(path: "str | os.PathLike | Store", mode: str = "r") -> "LabelStore":
    """Open an existing store (a path, ``.zip``, fsspec URL or zarr store); ``mode`` is "r" (read) or "r+"
    (resume writing)."""
    return LabelStore(path, mode=mode)


class LabelStore:
    """A label store. Use :func:`create_store` or :func:`open_store`."""

    def __init__(self, path: "str | os.PathLike | Store", mode: str = "r", name: str | None = None):
        loc = location(path, mode)
        self.path = name or loc.name
        # what another process can open again (a path or URL; None for a store object)
        self.location = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        self.local_dir = loc.local_dir
        self.mode = mode
        if loc.local_dir is not None and not os.path.isfile(os.path.join(loc.local_dir, "zarr.json")):
            what = "does not exist" if not os.path.exists(loc.local_dir) else \
                "is not a Zarr v3 group (no zarr.json)"
            raise StoreNotFoundError(f"{self.path} {what}: expected an fkd-dali label store, made by "
                                     "`fkd-dali generate` or `fkd-dali import-fkd`")
        try:
            self.group = zarr.open_group(loc.store, mode=mode)
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{self.path} does not exist or holds no Zarr group ({e}): expected an "
                                     "fkd-dali label store, made by `fkd-dali generate` or `fkd-dali "
                                     "import-fkd`") from e
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreFormatError(f"{self.path}: cannot open the Zarr group ({e})") from e
        self.store = loc.store
        self._lock = threading.Lock()  # the training reader reads from two threads (see pipelines.reader)
        self._readers: dict[str, zarr.Array] = {}
        self._seen_shards: dict[str, set[int]] = {}  # shard files found by the last listing, per array
        path = self.path
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
        # Stores written before every chunk was written may lack an all-False ``flips`` shard on purpose.
        self.writes_empty_chunks = bool(lay.get("write_empty_chunks", False))
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

    def _reader(self, name: str) -> zarr.Array:
        """The array with batched chunk decoding (zarr fixes its codec pipeline when the array is opened), opened
        once per store object (on an object store, opening an array GETs its metadata)."""
        with self._lock:
            if name not in self._readers:
                with zarr.config.set(READ_BATCH):
                    self._readers[name] = self.group[name]
            return self._readers[name]

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
        """Serialise read-modify-write of the group attributes between processes (ranks) on one host (a
        local store; an object store has no locks: there ranks only add rows to ``skipped``)."""
        if self.local_dir is None:
            yield
            return
        fd = os.open(self.local_dir, os.O_RDONLY)  # the store directory itself: no extra file in the hierarchy
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _set_attr(self, _merge=None, **updates: Any) -> None:
        with self._attrs_lock():
            fresh = zarr.open_group(self.store, mode="r+").attrs.asdict()[ATTR_KEY]
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

    def file_table(self) -> PathTable:
        """The ``files`` array as a compact :class:`PathTable`, read chunk by chunk."""
        n = self.num_images

        def chunks() -> Iterator[str]:
            for a in range(0, n, FILES_CHUNK):
                names = np.asarray(self._read("files", slice(a, min(n, a + FILES_CHUNK))), dtype=object).astype(str)
                check_names(names, self.path)  # names become paths: none may leave the dataset folder
                yield from names.tolist()
        return PathTable.from_paths(chunks())

    def file_name(self, row: int) -> str:
        """One row's relative path (reads one chunk of ``files``): for error messages."""
        if self._files is not None:
            return str(self._files[row])
        return str(self._read("files", slice(int(row), int(row) + 1))[0])

    @property
    def targets(self) -> np.ndarray:
        if self._targets is None:
            self._targets = self._read("targets", slice(None)).astype(np.int64)
        return self._targets

    def targets_compact(self) -> np.ndarray:
        """Targets in the stored int32 (no int64 copy)."""
        return self._read("targets", slice(None))

    def sizes(self) -> np.ndarray:
        return self._read("sizes", slice(None))

    def done(self) -> np.ndarray:
        return self._read("done", slice(None))

    def shard_ranges(self) -> list[tuple[int, int]]:
        return self.layout.shard_ranges(self.num_images)

    def skipped_rows(self) -> np.ndarray:
        """Rows left out on purpose (e.g. corrupt images under --skip-corrupt), never served."""
        return np.array(sorted({int(r) for r, _ in self.meta.skipped}), dtype=np.int64)

    def settled(self, done: np.ndarray | None = None) -> np.ndarray:
        """Per row: done, or skipped on purpose (``done``: the done mask, if already read)."""
        mask = self.done() if done is None else done.copy()
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
        check_block(data, m.num_classes, first_row=start, files=self.file_name, where=self.path, rows_mask=mask)
        for name in ("sizes",) + CROP_ARRAYS:
            arr = self.group[name].with_config(WRITE_CONFIG)
            try:
                arr[start:stop] = data[name].astype(arr.dtype, copy=False)
            except OSError as e:
                raise StoreWriteError(f"{self.path}: writing '{name}' rows [{start}, {stop}) failed: {e}. "
                                      "Nothing of these rows is marked done; free space and rerun the "
                                      "same command to resume") from e
        try:
            self.group["done"].with_config(WRITE_CONFIG)[start:stop] = mask
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
        if self.local_dir is None:  # object stores PUT whole objects: nothing partial is left
            return 0
        for d, _, fs in os.walk(self.local_dir):
            for f in fs:
                if f.endswith(".partial"):
                    os.remove(os.path.join(d, f))
                    count += 1
        return count

    # ------------------------------------------------------------------ reading
    def _read(self, name: str, *selection: Any) -> np.ndarray:
        arr = self._reader(name)
        sel = selection if len(selection) > 1 else selection[0]
        try:
            return arr[sel]
        except Exception as e:
            raise self._locate_corruption(name, e) from e

    def _read_orthogonal(self, name: str, rows: np.ndarray, *rest: Any) -> np.ndarray:
        arr = self._reader(name)
        try:
            return arr.get_orthogonal_selection((rows,) + (rest or (slice(None),) * (arr.ndim - 1)))
        except Exception as e:
            raise self._locate_corruption(name, e) from e

    def _read_many(self, selections: dict[str, tuple], rows_are_slice: bool) -> dict[str, np.ndarray]:
        """Several arrays' selections (rows first) in one go: zarr fetches and decodes their chunks
        concurrently (what keeps an object store's request latency off the critical path)."""
        arrays = {n: self._reader(n).async_array for n in selections}

        async def fetch():
            if rows_are_slice:
                return await asyncio.gather(*(arrays[n].getitem(sel) for n, sel in selections.items()),
                                            return_exceptions=True)
            return await asyncio.gather(*(arrays[n].get_orthogonal_selection(sel) for n, sel in selections.items()),
                                        return_exceptions=True)
        out = {}
        for name, got in zip(selections, sync(fetch())):
            if isinstance(got, BaseException):
                raise self._locate_corruption(name, got) from got
            out[name] = np.asarray(got)
        return out

    def _locate_corruption(self, name: str, err: BaseException) -> BaseException:
        """Find the first chunk of ``name`` that fails to decode and name it (only on the error path)."""
        if isinstance(err, (KeyboardInterrupt, MemoryError)) or not isinstance(err, Exception):
            return err
        arr = self.group[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        for s in range(0, arr.shape[0], rows):
            try:
                arr[s:s + rows]
            except Exception as e:
                return self._corrupt_chunk(name, s // rows, e)
        return StoreCorruptError(f"{self.path}: reading array '{name}' failed: {type(err).__name__}: {err}")

    def _corrupt_chunk(self, name: str, shard: int, e: Exception) -> StoreCorruptError:
        arr = self.group[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        s = shard * rows
        key = "/".join(["c", str(shard)] + ["0"] * (arr.ndim - 1))
        return StoreCorruptError(
            f"{self.path}: array '{name}', chunk file {name}/{key} (rows {s}..{min(arr.shape[0], s + rows) - 1}) "
            f"cannot be decoded: {type(e).__name__}: {e}. The file is truncated or damaged; restore "
            f"it, or clear those rows with `fkd-dali inspect {self.path} --clear-rows {s}:{s + rows}` "
            "and rerun generation to relabel them")

    def _present_shards(self, name: str) -> set[int]:
        """Indices of the shard files of a per-crop array that exist: one listing (a few LIST requests on an
        object store), never a request per shard."""
        prefix = f"{name}/c/"

        async def keys():
            return [k async for k in self.store.list_prefix(prefix)]
        present = set()
        for k in sync(keys()):
            head = k[len(prefix):].split("/", 1)[0] if k.startswith(prefix) else ""
            if head.isdigit():
                present.add(int(head))
        with self._lock:
            self._seen_shards[name] = present
        return present

    def _check_chunk_files(self, names: Sequence[str], shards: Sequence[int] | np.ndarray,
                           listed: bool = False) -> None:
        """Every listed shard (one holding done rows) must exist (zarr would return fill values). ``flips``
        of a store written before every chunk was written is not checked: an all-False shard was skipped.
        ``listed``: shards the last listing found are taken as present (no new listing unless one is not)."""
        shards = np.asarray(shards, dtype=np.int64)
        if shards.size == 0:
            return
        R = self.layout.rows_per_shard
        for name in names:
            if name == "flips" and not self.writes_empty_chunks:
                continue
            seen = self._seen_shards.get(name) if listed else None
            if seen is not None and all(int(i) in seen for i in shards):
                continue
            present = self._present_shards(name)
            lost = [int(i) for i in shards if int(i) not in present]
            if lost:
                i = lost[0]
                a, b = i * R, min(self.num_images, (i + 1) * R)
                key = "/".join([name, "c", str(i)] + ["0"] * (self.group[name].ndim - 1))
                raise StoreCorruptError(
                    f"{self.path}: array '{name}' has no chunk file {key} although rows {a}..{b - 1} are marked "
                    f"done ({len(lost)} such file(s)); the store lost a file. Restore it, or clear those rows "
                    f"with `fkd-dali inspect {self.path} --clear-rows {a}:{b}` and rerun generation")

    def _shards_of(self, rows: np.ndarray) -> np.ndarray:
        return np.unique(np.asarray(rows, dtype=np.int64) // self.layout.rows_per_shard)

    def require_complete(self, allow_incomplete: bool = False) -> np.ndarray:
        """Return the done mask (the rows to serve); raise StoreIncompleteError if rows are neither done nor
        skipped on purpose, unless allowed."""
        done = self.done()
        missing_mask = ~self.settled(done)
        missing = int(missing_mask.sum())
        if missing and not allow_incomplete:
            first = int(np.flatnonzero(missing_mask)[0])
            raise StoreIncompleteError(
                f"{self.path}: {missing} of {self.num_images} rows have no labels yet (first: row {first}, "
                f"{self.file_name(first)}). Finish generation by rerunning the same `fkd-dali generate` command, "
                "or pass --allow-incomplete to train on the done rows only")
        return done

    def verify(self, *, sample: int | None = None, workers: int | None = None, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Decode every chunk (of ``sample`` random shards, if given) and check every done row's labels, in
        ``workers`` processes (default: the cores); raises StoreCorruptError on damage. ``progress(k)`` is
        called as shards finish."""
        done = self.done()
        ranges = self.shard_ranges()
        with_done = [i for i, (a, b) in enumerate(ranges) if done[a:b].any()]
        self._check_chunk_files(CROP_ARRAYS, with_done)
        chosen = list(range(len(ranges)))
        if sample is not None and sample < len(chosen):
            chosen = sorted(np.random.default_rng(seed).choice(len(chosen), size=max(0, sample), replace=False).tolist())
        workers = max(1, min(workers or os.cpu_count() or 1, len(chosen) or 1))
        batches = [chosen[i:i + VERIFY_BATCH] for i in range(0, len(chosen), VERIFY_BATCH)]
        if workers == 1 or self.location is None:  # a store object cannot be reopened in another process
            for b in batches:
                _verify_shards(self, b)
                if progress:
                    progress(len(b))
        else:
            import multiprocessing  # noqa: PLC0415

            # forkserver: the parent may hold zarr/fsspec event-loop threads, which fork() does not carry over
            ctx = multiprocessing.get_context("forkserver")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_open_in_worker,
                                                        initargs=(self.location,)) as pool:
                futures = [pool.submit(_verify_in_worker, b) for b in batches]
                try:
                    for f in concurrent.futures.as_completed(futures):
                        done_now = f.result()
                        if progress:
                            progress(done_now)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        rows = sum(int(done[a:b].sum()) for a, b in (ranges[i] for i in chosen))
        return {"rows_done": int(done.sum()), "rows_checked": rows, "shards": len(chosen),
                "shards_total": len(ranges)}

    def read_round(self, r: int, n: int, *, rows: np.ndarray | None = None, check: bool = True,
                   done: np.ndarray | None = None, listed: bool = False,
                   pause: Callable[[], None] | None = None) -> Round:
        """Crops ``[r*n, (r+1)*n)`` of ``rows`` (sorted store rows; default all): bulk reads, one zarr call per
        array, chunk-file check once, labels checked in blocks (no int64 copy of the whole round). ``done``:
        the done mask, if the caller holds it (on an object store, one request per shard saved). ``listed``:
        trust the last listing of the shard files for the shards it found (a few rows read often, e.g. one
        batch's: no LIST per read). ``pause``: read in blocks of ``READ_BLOCK_SHARDS`` shards and call it
        before each (a background read that gives way to reads someone waits for)."""
        if n < 1 or r < 0 or (r + 1) * n > self.num_crops:
            raise ValueError(f"{self.path}: round {r} of {n} crops needs crops [{r * n}, {(r + 1) * n}) but "
                             f"the pool has {self.num_crops} crops per image ({self.num_rounds(n)} rounds "
                             f"of {n})")
        done = self.done() if done is None else done
        if rows is not None and len(rows) == self.num_images:
            rows = None  # sorted, unique and in range: every row (a slice reads faster than an index array)
        if rows is None:
            sel: np.ndarray | slice = slice(None)
            served = done
        else:
            sel = np.asarray(rows, dtype=np.int64)
            if sel.size and (sel[0] < 0 or sel[-1] >= self.num_images or np.any(np.diff(sel) <= 0)):
                raise ValueError(f"{self.path}: rows must be sorted, unique and in 0..{self.num_images - 1}")
            served = done[sel]
        self._check_chunk_files(CROP_ARRAYS, self._shards_of(np.flatnonzero(done) if rows is None
                                                              else sel[served]), listed)
        cs = slice(r * n, (r + 1) * n)
        count = self.num_images if rows is None else len(sel)
        blocks = [(0, count)] if pause is None else self._row_blocks(sel)
        got: dict[str, np.ndarray] = {}
        for a, b in blocks:
            part = slice(a, b) if rows is None else sel[a:b]
            wanted = {name: (part, cs) for name in CROP_ARRAYS}
            if check:
                wanted["sizes"] = (part, slice(None))
            if pause is not None:
                pause()
            block = self._read_many(wanted, rows_are_slice=rows is None)
            if len(blocks) == 1:
                got = block
                break
            for name, v in block.items():
                if name not in got:
                    got[name] = np.empty((count,) + v.shape[1:], v.dtype)
                got[name][a:b] = v
        sizes = got.pop("sizes", None)
        out = Round(index=r, crop_start=r * n, rows=None if rows is None else sel, **got)
        if check:
            row_ids = np.arange(self.num_images) if rows is None else sel
            for a in range(0, len(row_ids), CHECK_ROWS):
                b = a + CHECK_ROWS
                check_block({"sizes": sizes[a:b], "boxes": out.boxes[a:b], "flips": out.flips[a:b],
                             "topk_idx": out.topk_idx[a:b], "topk_val": out.topk_val[a:b]}, self.num_classes,
                            first_row=0, row_ids=row_ids[a:b], files=self.file_name, where=self.path,
                            rows_mask=served[a:b])
        return out

    def _row_blocks(self, sel: np.ndarray | slice) -> list[tuple[int, int]]:
        """Positions ``[a, b)`` of a selection (sorted rows, or every row) cut at every
        ``READ_BLOCK_SHARDS``-th shard boundary."""
        step = READ_BLOCK_SHARDS * self.layout.rows_per_shard
        edges = np.arange(step, self.num_images, step)
        if not isinstance(sel, slice):
            edges = np.searchsorted(sel, edges)
        count = self.num_images if isinstance(sel, slice) else len(sel)
        cuts = [0, *(int(e) for e in edges), count]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, 0)]

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The full crop pool of the given rows (any order): sizes, boxes, flips, topk_idx, topk_val."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise IndexError(f"{self.path}: rows must be in 0..{self.num_images - 1}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        done = self.done()
        self._check_chunk_files(CROP_ARRAYS, self._shards_of(uniq[done[uniq]]))
        out = {name: self._read_orthogonal(name, uniq)[inverse] for name in ("sizes",) + CROP_ARRAYS}
        out["done"] = done[rows]
        return out

    # ------------------------------------------------------------------ validation against a dataset
    def check_dataset(self, *, files: Sequence[str], classes: Sequence[str], fingerprint: str,
                      targets: Sequence[int] | None = None, data_dir: str = "the dataset") -> None:
        """Raise StoreMismatchError naming the first difference (count, classes, files, fingerprint).

        The fingerprint hashes every relative path and size in order, so when it matches the names match
        too: the store's ``files`` are read only to name a difference."""
        m = self.meta
        if list(classes) != list(m.classes):
            diff = _first_difference(list(m.classes), list(classes))
            raise StoreMismatchError(
                f"{self.path} was made for {len(m.classes)} classes, {data_dir} has {len(classes)}; "
                f"first difference: {diff}. Use the store made for this dataset, or regenerate it")
        if len(files) != m.num_images:
            raise StoreMismatchError(
                f"{self.path} labels {m.num_images} images, {data_dir} has {len(files)}; first difference: "
                f"{_first_difference(self.file_table(), files)}. The dataset changed since the store "
                "was made: regenerate the store, or restore the dataset")
        if fingerprint != m.fingerprint:
            for i, (x, y) in enumerate(zip(self.file_table(), files)):
                if x != y:
                    raise StoreMismatchError(
                        f"{self.path}: image {i} is '{x}' in the store but '{y}' in {data_dir}; the "
                        "store was made from another dataset (or files were renamed)")
        if targets is not None:
            stored_t = self.targets_compact()
            bad = np.flatnonzero(np.asarray(targets) != stored_t)
            if bad.size:
                i = int(bad[0])
                raise StoreMismatchError(f"{self.path}: {self.file_name(i)} has class {stored_t[i]} in the store "
                                         f"but {np.asarray(targets)[i]} in {data_dir}")
        if fingerprint != m.fingerprint:
            raise StoreMismatchError(
                f"{self.path}: the same {m.num_images} file names, but their sizes differ from when the "
                f"store was made (fingerprint {m.fingerprint[:19]}... vs {fingerprint[:19]}...): some image "
                "was replaced or modified. Restore the original files, or regenerate the store")


def _verify_shards(store: LabelStore, shards: Sequence[int]) -> None:
    """Decode shards and check their done rows (one worker's share of ``verify``)."""
    ranges = store.shard_ranges()
    for i in shards:
        a, b = ranges[i]
        block = {}
        for name in ("sizes", "done") + CROP_ARRAYS:
            try:
                block[name] = store._reader(name)[a:b]
            except Exception as e:  # noqa: BLE001 - any decode failure names the chunk
                raise store._corrupt_chunk(name, i, e) from e
        check_block(block, store.num_classes, first_row=a, files=store.file_name, where=store.path,
                    rows_mask=block.pop("done"))


_WORKER_STORE: LabelStore | None = None  # the store a verify worker process opened once


def _open_in_worker(where: str) -> None:
    global _WORKER_STORE
    _WORKER_STORE = open_store(where)


def _verify_in_worker(shards: Sequence[int]) -> int:
    _verify_shards(_WORKER_STORE, shards)
    return len(shards)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"entry {i} is '{x}' in the store, '{y}' in the dataset"
    if len(a) > len(b):
        return f"the store has extra entries from '{a[len(b)]}' on"
    if len(b) > len(a):
        return f"the dataset has extra entries from '{b[len(a)]}' on"
    return "none"


def check_block(data: dict[str, np.ndarray], num_classes: int, *, first_row: int, where: str,
                files: Sequence[str] | Callable[[int], str] | None = None, rows_mask: np.ndarray | None = None,
                row_ids: np.ndarray | None = None) -> None:
    """Reject impossible labels: boxes outside their image, class ids out of range, bad probabilities.

    Vectorised over the whole block in the stored dtypes (int32 for box arithmetic, no int64 copies);
    ``rows_mask`` limits the check to rows that are done. Block row i is store row ``row_ids[i]`` (default
    ``first_row + i``); ``files`` (a sequence or a function of the row) names it in the error.
    """
    sizes = np.asarray(data["sizes"])
    boxes = np.asarray(data["boxes"])
    idx = np.asarray(data["topk_idx"])
    val = np.asarray(data["topk_val"])
    sel = np.arange(len(sizes)) if rows_mask is None else np.flatnonzero(rows_mask)
    if sel.size == 0:
        return
    if rows_mask is not None and sel.size < len(sizes):
        sizes, boxes, idx, val = sizes[sel], boxes[sel], idx[sel], val[sel]

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

    wide = np.int64 if boxes.dtype.itemsize > 2 or sizes.dtype.itemsize > 4 else np.int32
    sizes = sizes.astype(wide, copy=False)
    fail((sizes < 1).any(axis=1), "image size is missing or < 1 px (a chunk may be missing on disk)")
    t, l, h, w = (boxes[..., i].astype(wide, copy=False) for i in range(4))
    fail((h < 1) | (w < 1), "a crop box has zero height or width (a chunk may be missing on disk)")
    fail((t < 0) | (l < 0) | (t + h > sizes[:, None, 0]) | (l + w > sizes[:, None, 1]),
         "a crop box reaches outside its image")
    fail((idx < 0) | (idx >= num_classes), f"a class id is outside 0..{num_classes - 1}")
    vf = val if val.dtype in (np.float16, np.float32) else val.astype(np.float32)
    fail(~np.isfinite(vf) | (vf < 0) | (vf > 1.001), "a probability is not a finite value in [0, 1]")
