"""The external source of single-view pipelines: :class:`ImageReader` serves an epoch plan batch by batch, with
the image paths it hands to DALI (:class:`ImagePaths`), the header check that runs ahead of it
(:class:`HeaderCheck`), and :func:`source_nodes`, which makes any reader's DataNodes.

Everything per batch is O(batch) numpy slicing of arrays held in memory (paths in a compact
:class:`labelstore.PathTable`); the JPEG files are read by ``fn.io.file.read`` inside DALI's own threads, so
the Python callback never opens a file and needs no worker processes (and so no fork-after-CUDA hazard).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.types import BatchInfo

from labelstore import PathTable

from .errors import LoaderError, image_header, refuse_unusable
from .order import EpochPlan, pass_rows
from .shards import ShardImages, ShardKeys


class ImagePaths:
    """A root folder and a :class:`PathTable` of relative paths: the absolute path of a row as a ``str`` or as
    the 1-D uint8 array ``fn.io.file.read`` takes, built per batch (no object per file is held)."""

    serves_bytes = False  # the reader serves paths; DALI reads the files

    def __init__(self, root: str, files: Sequence[str] | PathTable):
        self.root = root
        self.files = PathTable.of(files)
        self._prefix = os.path.join(os.path.abspath(root), "").encode("utf-8", "surrogateescape")

    def __len__(self) -> int:
        return len(self.files)

    def encoded(self, rows: np.ndarray) -> list[np.ndarray]:
        return [np.frombuffer(self._prefix + self.files.encoded(int(r)), dtype=np.uint8) for r in rows]

    def path_of(self, row: int) -> str:
        return os.path.join(self.root, self.files[int(row)])

    def header_source(self, row: int) -> str:
        return self.path_of(row)

    def close(self) -> None:
        pass


def image_source(root: str, files: Sequence[str] | PathTable) -> "ImagePaths | ShardImages":
    """What a reader serves images from: a shard set's bytes (read and CRC-checked here) when ``files`` are a
    shard set's keys, else the paths under ``root``, which DALI reads (``fn.io.file.read``)."""
    return ShardImages(files.shards) if isinstance(files, ShardKeys) else ImagePaths(root, files)


class ImageReader:
    """Epoch plans (order, DDP shard, batches) and the batch-mode external source of single-view pipelines.

    The pipeline calls the reader once per batch with ``BatchInfo`` and gets encoded paths, targets and
    row indices. :meth:`start_epoch` chooses the epoch the pipeline's next epoch serves; when the pipeline
    starts another epoch without it (an iterator with ``auto_reset=True`` resets and reads ahead at once),
    the reader advances to the following epoch by itself, so batches never mix two epochs' plans.

    ``check_headers``: every file's header is read (a few KB, :func:`image_header`) before its batch is
    handed to DALI, by a background thread running ahead of the pipeline through this rank's plan, and an
    unusable file (empty, not an image, a decompression bomb) stops the batch with its name. Nothing is
    read up front, each rank checks only the files it serves, and a file checked once is not read again.
    """

    names = ("paths", "target", "index")
    dtypes = (types.UINT8, types.INT64, types.INT64)
    ndims = (1, 0, 0)

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], *, batch_size: int,
                 rows: np.ndarray | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False, check_headers: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.root = root
        self.paths = image_source(root, files)
        t = np.asarray(targets)
        top = int(t.max()) if t.size else 0
        self.targets = t.astype(np.int16 if top < 2**15 else np.int32 if top < 2**31 else np.int64, copy=False)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # None: every row, in order
        self.num_rows = len(self.paths) if rows is None else len(self.rows)
        if self.num_rows == 0:
            raise LoaderError("there is no image to load (0 usable rows)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.current: EpochPlan | None = None
        self._pipeline_epoch: int | None = None  # the pipeline's epoch_idx that ``current`` is serving
        self._serving = False  # the pipeline is inside ``current`` (not past its end)
        self._selected: tuple[int, ...] | None = None  # outputs a pipeline asked for (None: all)

        self.headers = HeaderCheck(self.paths) if check_headers else None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(epoch=epoch, rows=pass_rows(self.num_rows, self.seed, epoch, self.rank, self.world_size,
                                                     self.shuffle, self.rows),
                         batch_size=self.batch_size, drop_last=self.drop_last)

    def start_epoch(self, epoch: int, reset: bool = False, start_batch: int = 0) -> EpochPlan:
        """Make the pipeline's next epoch serve ``epoch`` (from batch ``start_batch``, to resume inside an
        epoch); returns its plan.

        Asking again for the epoch the reader is on is a no-op (an iterator may already have read it
        ahead). ``reset=True`` says the caller resets or rebuilds the pipeline right after, discarding
        whatever it read ahead, so the next pipeline epoch serves ``epoch`` from its start (also when it is
        the same epoch again).
        """
        epoch = int(epoch)
        if reset:
            self._pipeline_epoch, self._serving = None, False
        elif self.current is not None and self.current.epoch == epoch:
            return self.current
        elif self._serving:  # the pipeline is inside another epoch it started by itself (auto_reset)
            raise LoaderError(
                f"the pipeline already reads epoch {self.current.epoch} ahead (an iterator with auto_reset "
                f"resets and prefetches at once); start_epoch({epoch}) came too late. Call start_epoch before "
                "the pipeline resets, or let the reader advance by itself")
        self.current = self._begin(epoch)
        if start_batch:
            if not 0 <= start_batch <= self.current.num_batches:
                raise ValueError(f"start_batch {start_batch} is outside 0..{self.current.num_batches}")
            self.current = dataclasses.replace(self.current,
                                               rows=self.current.rows[start_batch * self.current.batch_size:])
        self._pipeline_epoch = None
        return self.current

    def _begin(self, epoch: int) -> EpochPlan:
        plan = self.plan(epoch)
        if self.headers is not None:
            self.headers.start(plan)
        return plan

    def _plan_for(self, info: BatchInfo) -> EpochPlan:
        if self.current is None:
            self.current = self._begin(0)
        if self._pipeline_epoch is None:
            self._pipeline_epoch = info.epoch_idx
        elif info.epoch_idx != self._pipeline_epoch:  # the pipeline was reset without start_epoch
            self.current = self._begin(self.current.epoch + info.epoch_idx - self._pipeline_epoch)
            self._pipeline_epoch = info.epoch_idx
        self._serving = info.iteration < self.current.num_batches
        return self.current

    def __len__(self) -> int:
        """Batches per epoch: the same on every rank and every epoch."""
        return self.plan(0).num_batches

    def path_of(self, row: int) -> str:
        return self.paths.path_of(row)

    def _rows(self, info: BatchInfo) -> np.ndarray:
        plan = self._plan_for(info)
        rows = plan.batch_rows(info.iteration)
        if self.headers is not None:
            self.headers.require(plan, info.iteration)
        return rows

    def batch(self, rows: np.ndarray) -> tuple:
        """Every output for the given rows, in ``names`` order."""
        return self.paths.encoded(rows), self.targets[rows].astype(np.int64), rows.astype(np.int64)

    @property
    def serves_bytes(self) -> bool:
        """True when the "paths" output holds the images' bytes (a shard set), not paths for DALI to read."""
        return self.paths.serves_bytes

    def close(self) -> None:
        if self.headers is not None:
            self.headers.close()
        self.paths.close()

    def __call__(self, info: BatchInfo):
        out = self.batch(self._rows(info))
        return out if self._selected is None else tuple(out[i] for i in self._selected)

    def nodes(self, names: Sequence[str] | None = None) -> dict:
        """This reader's DataNodes by name (call inside a pipeline definition); ``names`` limits the
        outputs to those the pipeline uses."""
        return source_nodes(self, names)


class HeaderCheck:
    """Image headers read ahead of the pipeline, batch by batch, in a background thread (see ImageReader)."""

    FIX = "Replace or remove them (a file left out of an ImageFolder tree simply drops out of the dataset)"

    def __init__(self, paths: "ImagePaths | ShardImages", workers: int = 4):
        self.paths = paths
        self.ok = np.zeros(len(paths), dtype=bool)  # rows whose header was read and is sound
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fkd-headers")
        self._cond = threading.Condition()
        self._plan: EpochPlan | None = None
        self._checked = 0  # batches of _plan checked so far
        self._bad: dict[int, list[tuple[str, str]]] = {}

    def start(self, plan: EpochPlan) -> None:
        """Check ``plan``'s batches in order from now on (a previous plan's checking stops)."""
        with self._cond:
            self._plan, self._checked, self._bad = plan, 0, {}
        threading.Thread(target=self._run, args=(plan,), name="fkd-header-check", daemon=True).start()

    def _run(self, plan: EpochPlan) -> None:
        for i in range(plan.num_batches):
            if self._plan is not plan:
                return
            rows = plan.batch_rows(i)
            todo = np.unique(rows[~self.ok[rows]])
            try:
                found = list(self._pool.map(lambda r: image_header(self.paths.header_source(r))[1], todo))
            except Exception as e:  # noqa: BLE001 - reported with the batch
                found = [f"its header could not be checked ({type(e).__name__}: {e})"] * len(todo)
            except BaseException:  # the pool shut down (interpreter exit)
                return
            self.ok[todo[[why is None for why in found]]] = True
            bad = [(self.paths.path_of(r), why) for r, why in zip(todo, found) if why]
            with self._cond:
                if self._plan is not plan:
                    return
                if bad:
                    self._bad[i] = bad
                self._checked = i + 1
                self._cond.notify_all()

    def require(self, plan: EpochPlan, i: int) -> None:
        """Wait until batch ``i`` of ``plan`` is checked; raise LoaderError naming its unusable files."""
        if self._plan is not plan:  # e.g. a plan resumed from a later batch
            self.start(plan)
        with self._cond:
            while self._plan is plan and self._checked <= i:
                self._cond.wait(1.0)
            bad = self._bad.get(i)
        if bad:
            refuse_unusable([p for p, _ in bad], {j: why for j, (_, why) in enumerate(bad)}, self.FIX)

    def close(self) -> None:
        with self._cond:
            self._plan = None
        self._pool.shutdown(wait=False, cancel_futures=True)


def source_nodes(reader, names: Sequence[str] | None = None) -> dict:
    """A reader's DataNodes by name: one batch-mode external source returning the outputs in ``names``."""
    names = tuple(reader.names if names is None else names)
    unknown = set(names) - set(reader.names)
    if unknown:
        raise ValueError(f"unknown reader output(s) {sorted(unknown)}; available: {', '.join(reader.names)}")
    sel = tuple(reader.names.index(n) for n in names)
    reader._selected = None if sel == tuple(range(len(reader.names))) else sel
    out = fn.external_source(reader, num_outputs=len(sel), batch=True, batch_info=True,
                             dtype=[reader.dtypes[i] for i in sel], ndim=[reader.ndims[i] for i in sel])
    return dict(zip(names, out if len(sel) > 1 else [out]))
