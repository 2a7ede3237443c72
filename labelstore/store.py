"""The label store object (schema v1, see :mod:`labelstore.schema`): opening one, its metadata and its per-row
arrays. Its other jobs are parts of the class, each in its own module: :mod:`labelstore.reading` (bulk reads of
rounds and rows), :mod:`labelstore.writing` (blocks of whole shards, metadata updates), :mod:`labelstore.verify`
(whole-store checks); :mod:`labelstore.create` makes an empty store, :mod:`labelstore.location` says where one
lives.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import zarr
from zarr.abc.store import Store

from .bounds import check_bounds
from .checks import check_targets
from .errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from .location import location
from .paths import check_name, check_names, check_no_links
from .pathtable import PathTable
from .reading import StoreReading
from .errors import StoreKindError
from .schema import (ATTR_KEY, CHECKSUMS, DTYPES, FILES_CHUNK, ROW_ARRAYS, SCHEMA_VERSION, VIEW_ARRAYS, Layout, StoreMeta,
                     dtype_name)
from .verify import StoreVerification
from .writing import StoreWriting


def open_store(path: "str | os.PathLike | Store", mode: str = "r") -> "LabelStore":
    """Open an existing store (a path, ``.zip``, fsspec URL or zarr store); ``mode`` is "r" (read) or "r+"
    (resume writing)."""
    return LabelStore(path, mode=mode)


class LabelStore(StoreReading, StoreWriting, StoreVerification):
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
        if loc.local_dir is not None:
            check_no_links(loc.local_dir, self.path)  # nothing is read or written through a link
        try:
            self.group = zarr.open_group(loc.store, mode=mode)
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{self.path} does not exist or holds no Zarr group ({e}): expected an "
                                     "fkd-dali label store, made by `fkd-dali generate` or `fkd-dali "
                                     "import-fkd`") from e
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreFormatError(f"{self.path}: cannot open the Zarr group ({e})") from e
        self.store = loc.store
        self._lock = threading.Lock()  # the training reader reads from two threads (pipelines.round_reads)
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
        self.kind, self.fields = self.meta.label_kind(path)
        self._check_arrays()
        lay = attrs.get("layout") or {}
        self.layout = Layout(rows_per_shard=int(lay.get("rows_per_shard", self.group["done"].chunks[0])),
                             crops_per_chunk=int(lay.get("crops_per_chunk", self.group["boxes"].chunks[1])))
        check_bounds(path, self.meta, self.layout, {name: self.group[name] for name in ROW_ARRAYS + self.crop_arrays})
        if self.meta.dataset_root:
            check_name(self.meta.dataset_root, path, "dataset.root (the split folder)")
        # Stores written before every chunk was written may lack an all-False ``flips`` shard on purpose.
        self.writes_empty_chunks = bool(lay.get("write_empty_chunks", False))
        self._files: np.ndarray | None = None
        self._targets: np.ndarray | None = None
        self._done_files_checked = False

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
    def crop_arrays(self) -> tuple[str, ...]:
        """Every per-crop array: boxes, flips and the kind's label arrays."""
        return VIEW_ARRAYS + self.kind.names

    @property
    def label_arrays(self) -> tuple[str, ...]:
        return self.kind.names

    def describe_kind(self) -> str:
        """"kind embedding, D=128": the kind and its size, for messages."""
        return self.kind.describe(self.fields)

    def require_kind(self, name: str) -> None:
        """Refuse, by name, a store of another kind than the code reading it needs (``name``: topk, embedding)."""
        if self.kind.name == name:
            return
        from .kinds import kind_named  # noqa: PLC0415
        wanted = kind_named(name, self.path)
        raise StoreKindError(f"label store {self.path} holds {self.kind.what} ({self.describe_kind()}), not "
                             f"{wanted.what}: train it with --labels {self.kind.objective}")

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
                  "flips": (m.num_images, m.num_crops)}
        dtypes = dict(DTYPES)
        for a in self.kind.arrays:
            expect[a.name] = (m.num_images, m.num_crops) + a.tail(self.fields)
            dtypes[a.name] = a.dtypes
        have = set(self.group.array_keys())
        for name, shape in expect.items():
            if name not in have:
                raise StoreFormatError(f"{self.path}: array '{name}' is missing; the store is damaged or "
                                       "was not made by fkd-dali")
            got = tuple(self.group[name].shape)
            if got != shape:
                raise StoreFormatError(f"{self.path}: array '{name}' has shape {got}, the metadata says "
                                       f"{shape}; the store is damaged")
            dtype = dtype_name(self.group[name].dtype)
            if dtype not in dtypes[name]:
                raise StoreFormatError(f"{self.path}: array '{name}' holds {dtype} values; a label store's '{name}' "
                                       f"is {' or '.join(dtypes[name])} (schema v{SCHEMA_VERSION}). The store is "
                                       "damaged or was not made by fkd-dali; regenerate or re-import it")

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
            self._targets = self.targets_compact().astype(np.int64)
        return self._targets

    def targets_compact(self) -> np.ndarray:
        """Targets in the stored int32 (no int64 copy), each checked to be a class of the store."""
        targets = self._read("targets", slice(None))
        check_targets(targets, self.num_classes, where=self.path, files=self.file_name)
        return targets

    def sizes(self) -> np.ndarray:
        return self._read("sizes", slice(None))

    def checksums(self) -> np.ndarray | None:
        """The CRC-32 of each image's bytes when the store recorded them (made from a shard set), else None."""
        if CHECKSUMS not in set(self.group.array_keys()):
            return None
        arr = self.group[CHECKSUMS]
        if tuple(arr.shape) != (self.num_images,) or dtype_name(arr.dtype) not in DTYPES[CHECKSUMS]:
            raise StoreFormatError(f"{self.path}: array '{CHECKSUMS}' has shape {tuple(arr.shape)} and dtype "
                                   f"{dtype_name(arr.dtype)}, not ({self.num_images},) uint32; the store is damaged")
        return self._read(CHECKSUMS, slice(None))

    def done(self) -> np.ndarray:
        done = self._read("done", slice(None))
        if self.meta.complete and not self._done_files_checked:
            self._check_done_files()
        return done

    def _check_done_files(self) -> None:
        """A store marked complete has a ``done`` chunk per shard (every shard was written, its done flags last):
        a missing one is a lost file, not rows "not done" (zarr would read it as all False). One listing.
        (A shard whose rows were all skipped may lack it in a store written before every chunk was.)"""
        present = self._present_shards("done")
        skipped = self.settled(np.zeros(self.num_images, bool))
        lost = [i for i, (a, b) in enumerate(self.shard_ranges()) if i not in present and not skipped[a:b].all()]
        if lost:
            a, b = self.shard_ranges()[lost[0]]
            raise StoreCorruptError(
                f"{self.path}: array 'done' has no chunk file done/c/{lost[0]} (rows {a}..{b - 1}) although the store "
                f"is marked complete ({len(lost)} such file(s)); the store lost a file. Restore it, or clear those "
                f"rows with `fkd-dali inspect {self.path} --clear-rows {a}:{b}` and rerun generation")
        self._done_files_checked = True

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
