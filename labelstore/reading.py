"""Reading a label store in bulk (:class:`StoreReading`, a part of :class:`labelstore.LabelStore`):
``read_round`` returns the chosen rows x ``n`` crops as numpy arrays (one zarr call per array, the arrays
fetched together), ``read_rows`` the full crop pool of chosen rows; every shard holding done rows must exist
(zarr would return fill values for a lost file), and a chunk that fails to decode is named. Nothing here is
meant to be called per sample."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from .checks import check_block
from .errors import StoreCorruptError, StoreIncompleteError

# A read that gives way to others (``read_round(pause=...)``) pauses at most every this many shards: on an
# object store that is 32 x (4 x 2 + 1) requests, on local disk ~0.1 s of decoding at world 1 on ImageNet-1k.
READ_BLOCK_SHARDS = 32
CHECK_ROWS = 1 << 16  # rows validated at a time (bounds the temporary copies of check_block)
# Chunks decoded per batch of zarr's codec pipeline (default 1): a shard holds C/4 inner chunks per array;
# decoding them in batches was faster in every paired trial of a whole-shard read on the 2-core VM (1.3-2.8x,
# noisy), and no slower for a round's one chunk per shard.
READ_BATCH = {"codec_pipeline.batch_size": 128}

@dataclasses.dataclass
class Round:
    """All images x crops ``[crop_start, crop_start + n)`` of the pool, in store row order: boxes, flips and
    the store kind's label arrays (``labels``, also read as attributes: ``rnd.topk_idx``, ``rnd.embedding``)."""

    index: int
    crop_start: int
    boxes: np.ndarray       # (N, n, 4)  top, left, height, width (N: the rows read, in ``rows`` order)
    flips: np.ndarray       # (N, n)     bool
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (N, n, ...) per label array
    rows: np.ndarray | None = None  # the store rows read (sorted), None: all rows
    sizes: np.ndarray | None = None  # (N, 2)  the stored (height, width) of each image, what its boxes lie in

    def __getattr__(self, name: str) -> np.ndarray:
        labels = self.__dict__.get("labels") or {}
        if name in labels:
            return labels[name]
        raise AttributeError(f"this round holds no array '{name}' (it holds boxes, flips, {', '.join(labels)})")

    @property
    def num_crops(self) -> int:
        return self.boxes.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.boxes, self.flips, *self.labels.values(), self.sizes) if a is not None)


class StoreReading:
    """The reading methods of :class:`labelstore.LabelStore` (which holds ``group``, ``store``, ``layout``,
    ``path``, ``num_images``, ``num_crops``, ``kind``, ``fields``, ``crop_arrays``, ``_lock``, ``_readers``,
    ``_seen_shards``)."""

    def _reader(self, name: str) -> zarr.Array:
        """The array with batched chunk decoding (zarr fixes its codec pipeline when the array is opened), opened
        once per store object (on an object store, opening an array GETs its metadata)."""
        with self._lock:
            if name not in self._readers:
                with zarr.config.set(READ_BATCH):
                    self._readers[name] = self.group[name]
            return self._readers[name]

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
                a, b = i * R, min(self.num_rows, (i + 1) * R)
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
                f"{self.path}: {missing} of {self.num_rows} rows have no labels yet (first: row {first}"
                + (f", {self.file_name(first)}" if self.row_sizes else "") + "). Finish generation by rerunning the same `fkd-dali generate` command, "
                "or pass --allow-incomplete to train on the done rows only")
        return done

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
        if not self.row_sizes:
            raise ValueError(f"{self.path} holds {self.kind.what}, one row per training step: it is read by steps "
                             "(labelstore.relabel), not in rounds of crops per image")
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
        self._check_chunk_files(self.crop_arrays, self._shards_of(np.flatnonzero(done) if rows is None
                                                                   else sel[served]), listed)
        cs = slice(r * n, (r + 1) * n)
        count = self.num_images if rows is None else len(sel)
        blocks = [(0, count)] if pause is None else self._row_blocks(sel)
        got: dict[str, np.ndarray] = {}
        for a, b in blocks:
            part = slice(a, b) if rows is None else sel[a:b]
            wanted = {name: (part, cs) for name in self.crop_arrays}
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
        sizes = got.pop("sizes")
        out = Round(index=r, crop_start=r * n, rows=None if rows is None else sel, boxes=got.pop("boxes"),
                    flips=got.pop("flips"), labels=got, sizes=sizes)
        if check:
            row_ids = np.arange(self.num_images) if rows is None else sel
            for a in range(0, len(row_ids), CHECK_ROWS):
                b = a + CHECK_ROWS
                check_block({"sizes": sizes[a:b], "boxes": out.boxes[a:b]} | {k: v[a:b] for k, v in got.items()},
                            self.num_classes, first_row=0, row_ids=row_ids[a:b], files=self.file_name,
                            where=self.path, rows_mask=served[a:b], kind=self.kind, fields=self.fields)
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
        """The full crop pool of the given rows (any order): sizes (of an image kind's rows), boxes, flips and the
        kind's label arrays."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.path}: rows must be in 0..{self.num_rows - 1}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        done = self.done()
        self._check_chunk_files(self.crop_arrays, self._shards_of(uniq[done[uniq]]))
        names = (("sizes",) if self.row_sizes else ()) + self.crop_arrays
        out = {name: self._read_orthogonal(name, uniq)[inverse] for name in names}
        out["done"] = done[rows]
        return out
