"""The reader side of the pipelines: epoch order, DDP sharding, rounds, and the external sources.

Everything per batch is O(batch) numpy slicing of arrays held in memory (this rank's rows of one round of
the label store, paths in a compact :class:`labelstore.PathTable`); the JPEG files are read by
``fn.io.file.read`` inside DALI's own threads, so the Python callback never opens a file and needs no
worker processes (and so no fork-after-CUDA hazard).

Sharding follows ``torch.utils.data.DistributedSampler(drop_last=False)``: one permutation per epoch from
``(seed, epoch)``, identical on every rank, padded by wrapping to a multiple of the world size, and rank
``r`` takes positions ``r, r + world, ...``; every rank serves the same number of samples and so runs the
same number of steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from collections.abc import Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.types import BatchInfo

import labelstore
from labelstore import LabelStore, PathTable, Round

from .errors import LoaderError, image_header, read_headers, refuse_unusable

ROUND_STREAM = 0x726F756E64  # separates the round schedule's random stream from the epoch order's
# The batch of a pass whose request starts the read of the next pass's rows. The loaders' pipelines read two
# batches ahead, so DALI asks for batch 2 once batch 0 was taken: the read does not slow the pass's first batch.
READ_AHEAD_AT = 2
# Until a pass's rows are read, a batch is served from a read of its own rows and those of the next batches,
# this many in all (the pipelines ask for two or three batches at once when they start).
BRIDGE_BATCHES = 4
BRIDGE_MAX_SHARDS = 0.25  # ... while their rows fall in at most this fraction of the store's shards


class ImagePaths:
    """A root folder and a :class:`PathTable` of relative paths: the absolute path of a row as a ``str`` or as
    the 1-D uint8 array ``fn.io.file.read`` takes, built per batch (no object per file is held)."""

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


def roi_from_boxes(boxes: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) ROI start/end in pixels for ``fn.resize``: the flip swaps the x ends (DESIGN.md)."""
    b = np.asarray(boxes, dtype=np.float32)
    f = np.asarray(flips, dtype=np.float32)
    t, l, h, w = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    start = np.stack([t, l + f * w], axis=-1)
    end = np.stack([t + h, l + w - f * w], axis=-1)
    return np.ascontiguousarray(start), np.ascontiguousarray(end)


def epoch_permutation(num: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num)


def shard_positions(num: int, rank: int, world: int, order: np.ndarray) -> np.ndarray:
    """DistributedSampler(drop_last=False): pad ``order`` by wrapping to a multiple of ``world``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    per_rank = -(-num // world)
    total = per_rank * world
    reps = -(-total // max(1, num))
    padded = np.tile(order, reps)[:total] if num else order
    return padded[rank:total:world]


def pass_rows(num_rows: int, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True,
              rows: np.ndarray | None = None) -> np.ndarray:
    """The rows rank ``rank`` serves in ``epoch``, in order: ``rows`` (the usable rows; None: 0..num_rows-1)
    at this rank's positions of the epoch's permutation."""
    order = epoch_permutation(num_rows, seed, epoch, shuffle)
    positions = shard_positions(num_rows, rank, world, order)
    del order
    return positions if rows is None else rows[positions]


def unique_rows(rows: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an index array, by one sort (numpy 2.4's ``np.unique`` hashes first: 0.8 s
    for a pass's 1.28 M rows on the 2-core VM, this 0.02 s)."""
    rows = np.sort(rows)
    return rows[np.concatenate(([True], rows[1:] != rows[:-1]))] if rows.size else rows


def round_for_pass(seed: int, pass_index: int, num_rounds: int) -> int:
    """Which round of the crop pool pass ``pass_index`` (0, 1, 2, ... over the images) uses: every round once
    per cycle of ``num_rounds`` passes, in a seeded order, so no round repeats before the pool is used up."""
    if num_rounds < 1:
        raise ValueError("the crop pool holds no complete round")
    cycle, pos = divmod(int(pass_index), num_rounds)
    return int(np.random.default_rng([int(seed), ROUND_STREAM, cycle]).permutation(num_rounds)[pos])


@dataclasses.dataclass
class EpochPlan:
    """What one rank serves in one epoch: store rows in order, in batches (the last one may be short)."""

    epoch: int
    rows: np.ndarray
    batch_size: int
    drop_last: bool = False
    round_index: int = 0
    crop_start: int = 0

    @property
    def num_batches(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_rows(self, i: int) -> np.ndarray:
        if i >= self.num_batches:
            raise StopIteration
        return self.rows[i * self.batch_size:(i + 1) * self.batch_size]


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
        self.paths = ImagePaths(root, files)
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

    def close(self) -> None:
        if self.headers is not None:
            self.headers.close()

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

    def __init__(self, paths: ImagePaths, workers: int = 4):
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
                found = list(self._pool.map(lambda r: image_header(self.paths.path_of(r))[1], todo))
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


class RoundReads:
    """This rank's rows of each pass's round, read from the store by one background thread, a pass at a time.

    What a rank serves in pass ``p`` depends only on the store (its done rows and crop pool), the seed, the
    rank, the world size and ``num_crops``, not on the dataset scan: so train.py starts the first pass's read
    as soon as the store is open, before it scans the dataset, and hands this object to the loader. Nothing
    read here is served until an :class:`FKDReader` adopts it, and train.py makes that reader only after the
    store passed its check against the dataset. The thread is a daemon: an error raised meanwhile (a store
    that does not match, say) does not wait for a read to finish.

    The done mask is read first (``done()``; it raises StoreIncompleteError like
    ``LabelStore.require_complete``), then each pass asked for with :meth:`read`, in the order asked.
    """

    def __init__(self, store: LabelStore, *, num_crops: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, allow_incomplete: bool = False):
        if num_crops < 1 or num_crops > store.num_crops:
            raise LoaderError(f"num_crops={num_crops} but {store.path} stores {store.num_crops} crops per image; use "
                              f"--num-crops <= {store.num_crops} or generate a larger pool")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.store = store
        self.settings = (int(num_crops), int(seed), int(rank), int(world_size), bool(shuffle), bool(allow_incomplete))
        self.num_crops, self.seed, self.rank, self.world_size, self.shuffle, _ = self.settings
        self.num_rounds = store.num_rounds(num_crops)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._reads: dict[int, concurrent.futures.Future] = {}  # pass -> this rank's rows of its round
        self._urgent_started = self._urgent_finished = 0  # reads a batch waits for (the pass read pauses for them)
        self._urgent_cond = threading.Condition()
        threading.Thread(target=self._work, name="fkd-round", daemon=True).start()
        self._done = self._submit(lambda: store.require_complete(allow_incomplete))

    def _submit(self, fn) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the read
                fut.set_exception(e)

    def done(self) -> np.ndarray:
        """The store's done mask (the rows to serve); waits for it."""
        return self._done.result()

    def round_of(self, pass_index: int) -> int:
        return round_for_pass(self.seed, pass_index, self.num_rounds)

    def read(self, pass_index: int) -> concurrent.futures.Future:
        """This rank's rows of pass ``pass_index``'s round (a future), read after the passes asked for before."""
        if pass_index not in self._reads:
            self._reads[pass_index] = self._submit(lambda: self._read_pass(pass_index))
        return self._reads[pass_index]

    def read_rows(self, pass_index: int, rows: np.ndarray) -> Round:
        """Only ``rows`` (sorted store rows) of pass ``pass_index``'s round, read now in the caller's thread
        (what a batch is served from while the pass's read is under way; the shard listing is reused). The
        background read gives way meanwhile: it pauses before its next block of shards until this is done (on
        a busy object store its requests would otherwise queue ahead of the batch's)."""
        started = False
        try:
            with self._urgent_cond:
                self._urgent_started += 1
                started = True
            return self.store.read_round(self.round_of(pass_index), self.num_crops, rows=rows, done=self.done(),
                                         listed=True)
        finally:
            if started:
                with self._urgent_cond:
                    self._urgent_finished += 1
                    self._urgent_cond.notify_all()

    def _give_way(self, pass_index: int) -> None:
        """Before each block of the pass read: wait for the batch reads under way now (not for ones started
        later, so the pass read gets at least a block between two of them); stop if the pass was dropped."""
        with self._urgent_cond:
            under_way = self._urgent_started
            while self._urgent_finished < under_way:
                self._urgent_cond.wait()
        if pass_index not in self._reads:  # keep() dropped it (the loader moved on): its rows are not needed
            raise concurrent.futures.CancelledError(f"pass {pass_index}'s read was dropped")

    def _read_pass(self, pass_index: int) -> Round:
        done = self._done.result()
        usable = None if done.all() else np.flatnonzero(done)
        num = len(done) if usable is None else len(usable)
        rows = unique_rows(pass_rows(num, self.seed, pass_index, self.rank, self.world_size, self.shuffle, usable))
        return self.store.read_round(self.round_of(pass_index), self.num_crops, rows=rows, done=done,
                                     pause=lambda: self._give_way(pass_index))

    def keep(self, *passes: int) -> None:
        """Drop the reads of every other pass (a pending one is cancelled)."""
        for k in [k for k in self._reads if k not in passes]:
            self._reads.pop(k).cancel()

    def rounds(self) -> list[Round]:
        """The rounds read and still kept."""
        return [f.result() for f in list(self._reads.values()) if f.done() and not f.cancelled() and not f.exception()]

    def close(self) -> None:
        for f in self._reads.values():
            f.cancel()
        self._jobs.put(None)


class FKDReader(ImageReader):
    """The FKD reader: per image its encoded path, the ``num_crops`` ROI boxes (flip encoded) of the
    pass's round, its ``num_crops`` top-k rows, its target, its store row and the crop ids.

    The reader's epoch ``p`` is a *pass* over the images (FKD counts it as ``num_crops`` epochs): pass ``p``
    serves round ``round_for_pass(seed, p, C // num_crops)`` of the pool, crops ``[r*n, (r+1)*n)``, each
    round once per cycle, so no crop repeats before the pool is used up. Only the rows this rank serves in
    the pass are read from the store, in bulk (never per sample), and the next pass's rows are read in the
    background while this one trains (from its batch ``READ_AHEAD_AT`` on); a rank holds at most those two.
    A batch never waits for a whole pass's read: until it is done (a run's first batches, whose pass is read
    beside the dataset scan), the rows of the next ``BRIDGE_BATCHES`` batches are read on their own when
    needed (per shard one chunk per array, no listing), and the background read gives way to that read.
    Only rows marked done are served.

    ``files``: the dataset's paths (a scan's :class:`PathTable`) already checked against the store (e.g. by
    ``LabelStore.check_dataset`` with the scan's fingerprint); without it the store's ``files`` are read
    and, with ``verify_files``, every file's size is checked once against the fingerprint. ``targets``: the
    scan's classes, checked the same way (``check_dataset(targets=...)``); without them the store's are read. ``reads``: a
    :class:`RoundReads` of the same store and settings, started earlier (train.py starts the first pass's
    read before it scans the dataset); by default the reader starts its own.
    """

    names = ("paths", "roi_start", "roi_end", "topk_idx", "topk_val", "target", "index", "crop_ids")
    ndims = (1, 2, 2, 2, 2, 0, 0, 1)

    def __init__(self, data: str, store: str | LabelStore, *, num_crops: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = False,
                 allow_incomplete: bool = False, verify_files: bool = True,
                 files: Sequence[str] | PathTable | None = None, targets: Sequence[int] | None = None,
                 reads: RoundReads | None = None):
        self.store = store if isinstance(store, LabelStore) else labelstore.open_store(store)
        s = self.store
        settings = (num_crops, seed, rank, world_size, shuffle, allow_incomplete)
        if reads is None:
            reads = RoundReads(s, num_crops=num_crops, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                               allow_incomplete=allow_incomplete)
        elif reads.store is not s or reads.settings != settings:
            raise ValueError(f"the round reads were started for another store or other settings "
                             f"({reads.settings} vs {settings}: num_crops, seed, rank, world_size, shuffle, "
                             "allow_incomplete)")
        self.reads = reads
        done = reads.done()
        root = resolve_root(data, s)
        if files is None:
            files = s.file_table()
            if verify_files:
                check_files(root, s, files)
        elif len(files) != s.num_images:
            raise LoaderError(f"{len(files)} files given for {s.path}, which labels {s.num_images} images")
        if targets is None:
            targets = s.targets_compact()
        elif len(targets) != s.num_images:
            raise LoaderError(f"{len(targets)} targets given for {s.path}, which labels {s.num_images} images")
        self.num_crops = num_crops
        self.num_rounds = s.num_rounds(num_crops)
        self.num_shards = len(s.shard_ranges())
        idx_dtype = _dali_int(s.array("topk_idx").dtype)
        self.dtypes = (types.UINT8, types.FLOAT, types.FLOAT, idx_dtype, types.FLOAT16, types.INT64,
                       types.INT64, types.INT64)
        super().__init__(root, files, targets, batch_size=batch_size,
                         rows=None if done.all() else np.flatnonzero(done), seed=seed, rank=rank,
                         world_size=world_size, shuffle=shuffle, drop_last=drop_last)
        self._wanted: int | None = None  # the pass being served
        self._loaded: int | None = None  # the pass whose rows ``round`` holds
        self.round: Round | None = None  # this rank's rows of the pass's round (rows sorted)
        self.bridged = 0  # reads of a few batches' rows made while their pass's read was not done yet
        self._bridge: tuple[int, Round] | None = None  # (pass, the rows of its latest bridge read)
        self._upcoming: np.ndarray | None = None  # the rows of the batches after the one being made

    def round_of(self, pass_index: int) -> int:
        return self.reads.round_of(pass_index)

    def plan(self, epoch: int) -> EpochPlan:
        p = super().plan(epoch)
        p.round_index = self.round_of(epoch)
        p.crop_start = p.round_index * self.num_crops
        return p

    @property
    def _reads(self) -> dict[int, concurrent.futures.Future]:
        return self.reads._reads

    def _read(self, pass_index: int) -> concurrent.futures.Future:
        return self.reads.read(pass_index)

    def _begin(self, epoch: int) -> EpochPlan:
        plan = self.plan(epoch)
        self._wanted = epoch
        self._read(epoch)
        self.reads.keep(epoch, epoch + 1)
        return plan

    def _rows(self, info: BatchInfo) -> np.ndarray:
        rows = super()._rows(info)
        plan = self.current
        a = (info.iteration + 1) * plan.batch_size
        self._upcoming = plan.rows[a:a + (BRIDGE_BATCHES - 1) * plan.batch_size]  # what a bridge read adds
        if info.iteration >= min(READ_AHEAD_AT, plan.num_batches - 1):
            self._read(plan.epoch + 1)  # the next pass's rows, read while this one trains
        return rows

    def current_round(self) -> Round:
        """This rank's rows of the round being served (waits for the background read the first time)."""
        if self._loaded != self._wanted:
            self.round = None  # drop the previous pass's rows before holding the next
            self.round = self._read(self._wanted).result()
            self._loaded = self._wanted
        return self.round

    def _round_for(self, rows: np.ndarray) -> Round:
        """What a batch of ``rows`` is served from: the pass's rows when their read is done; until then (a run's
        first batches: the read started beside the dataset scan; a pass whose read ran late) the rows of this
        and the next ``BRIDGE_BATCHES - 1`` batches, read now, so that no batch waits for the whole pass. Such a
        read decodes a chunk of every shard its rows fall in, so it is made only while those are at most
        ``BRIDGE_MAX_SHARDS`` of the shards (big batches on a small store wait for the pass's read instead,
        which does the same work once)."""
        if self._loaded == self._wanted:
            return self.round
        if not self._read(self._wanted).done():
            if self._bridge is not None and self._bridge[0] == self._wanted:
                held = self._bridge[1].rows  # None: every row (read_round's answer to all rows)
                if held is None or (len(held) and np.array_equal(
                        held[np.minimum(np.searchsorted(held, rows), len(held) - 1)], rows)):
                    return self._bridge[1]
            ahead = self._upcoming is not None and len(self._upcoming) > 0
            for want in (np.concatenate([rows, self._upcoming]), rows) if ahead else (rows,):
                want = unique_rows(want)
                if len(unique_rows(want // self.store.layout.rows_per_shard)) <= BRIDGE_MAX_SHARDS * self.num_shards:
                    self.round, self._loaded = None, None  # the previous pass's rows are not served again
                    self.bridged += 1
                    self._bridge = (self._wanted, self.reads.read_rows(self._wanted, want))
                    return self._bridge[1]
        self._bridge = None
        return self.current_round()

    def held_bytes(self) -> dict[str, int]:
        """What this reader holds for boxes, labels and paths (the rows of the rounds read or being read)."""
        rounds = self.reads.rounds()
        for extra in (self.round, self._bridge[1] if self._bridge is not None else None):
            if extra is not None and all(r is not extra for r in rounds):
                rounds.append(extra)
        plan = self.current.rows.nbytes if self.current is not None else 0
        return {"paths": self.paths.files.nbytes, "targets": self.targets.nbytes,
                "rounds": sum(r.nbytes + (r.rows.nbytes if r.rows is not None else 0) for r in rounds),
                "plan": plan + (self.rows.nbytes if self.rows is not None else 0)}

    def batch(self, rows: np.ndarray) -> tuple:
        rnd = self._round_for(rows)
        pos = rows if rnd.rows is None else np.searchsorted(rnd.rows, rows)
        start, end = roi_from_boxes(rnd.boxes[pos], rnd.flips[pos])
        crop_ids = rnd.crop_start + np.arange(self.num_crops, dtype=np.int64)
        return (self.paths.encoded(rows), start, end, np.ascontiguousarray(rnd.topk_idx[pos]),
                np.ascontiguousarray(rnd.topk_val[pos], dtype=np.float16), self.targets[rows].astype(np.int64),
                rows.astype(np.int64), np.tile(crop_ids, (len(rows), 1)))

    def close(self) -> None:
        super().close()
        self.reads.close()


class GenerationReader:
    """External source of the generator: one job (a shard of rows) at a time, each row cut into groups of
    ``group_size`` crops; one sample = one decode of the row's image + one group of crops.

    A short last group is padded with copies of its first crop, whose crop id is -1 (discard them).
    Batches never span jobs, so a shard's teacher batches are the same whether it is generated in one
    run, after a resume, or by another rank.
    """

    names = ("paths", "roi_start", "roi_end", "index", "crop_ids")
    dtypes = (types.UINT8, types.FLOAT, types.FLOAT, types.INT64, types.INT64)
    ndims = (1, 2, 2, 0, 1)

    def __init__(self, root: str, files: Sequence[str] | PathTable, group_size: int, batch_size: int):
        if group_size < 1 or batch_size < 1:
            raise ValueError("group_size and batch_size must be >= 1")
        self.root = root
        self.paths = ImagePaths(root, files)
        self.group_size, self.batch_size = group_size, batch_size
        self._selected: tuple[int, ...] | None = None
        self._rows = self._start = self._end = self._ids = None
        self.num_batches = 0

    def start_job(self, rows: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> int:
        """Serve rows (m,) with their boxes (m, C, 4) and flips (m, C); returns the number of batches."""
        rows = np.asarray(rows, dtype=np.int64)
        m, C = boxes.shape[:2]
        G = self.group_size
        groups = -(-C // G)
        start, end = roi_from_boxes(boxes, flips)
        ids = np.arange(groups * G, dtype=np.int64)
        if groups * G > C:
            pad = groups * G - C
            first = np.repeat(np.arange(C - C % G, C - C % G + 1), pad)
            start = np.concatenate([start, start[:, first]], axis=1)
            end = np.concatenate([end, end[:, first]], axis=1)
            ids[C:] = -1
        self._start = np.ascontiguousarray(start.reshape(m * groups, G, 2))
        self._end = np.ascontiguousarray(end.reshape(m * groups, G, 2))
        self._rows = np.repeat(rows, groups)
        self._ids = np.tile(ids.reshape(groups, G), (m, 1))
        self.num_batches = -(-len(self._rows) // self.batch_size)
        return self.num_batches

    def batch_items(self, i: int) -> slice:
        if i >= self.num_batches:
            raise StopIteration
        return slice(i * self.batch_size, min(len(self._rows), (i + 1) * self.batch_size))

    def path_of(self, row: int) -> str:
        return self.paths.path_of(row)

    def rows_of_batch(self, i: int) -> np.ndarray:
        return self._rows[self.batch_items(i)]

    def batch(self, items: slice) -> tuple:
        rows = self._rows[items]
        return (self.paths.encoded(rows), self._start[items], self._end[items], rows, self._ids[items])

    def __call__(self, info: BatchInfo):
        out = self.batch(self.batch_items(info.iteration))
        return out if self._selected is None else tuple(out[i] for i in self._selected)

    def nodes(self, names: Sequence[str] | None = None) -> dict:
        return source_nodes(self, names)


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


def _dali_int(dtype) -> types.DALIDataType:
    return {"int16": types.INT16, "int32": types.INT32, "int64": types.INT64}[np.dtype(dtype).name]


def resolve_root(data: str, store: LabelStore) -> str:
    """The image folder the store's relative paths live in: DATA/<split> or DATA itself."""
    split = store.meta.dataset_root or "train"
    cand = os.path.join(data, split)
    if os.path.isdir(cand):
        return cand
    if os.path.isdir(data):
        return data
    raise LoaderError(f"{data} does not exist (expected the dataset root holding {split}/, or {split}/ itself)")


def check_files(root: str, store: LabelStore, files: Sequence[str] | PathTable | None = None) -> None:
    """Every stored file exists with the size it had when the labels were made (the fingerprint; one stat
    per file). On a mismatch, the files whose header no longer gives the stored image size are named."""
    files = store.file_table() if files is None else files
    fp = labelstore.fingerprint_of(files, labelstore.file_sizes(root, files))  # names the first missing file
    if fp == store.meta.fingerprint:
        return
    files = list(files)
    stored = store.sizes()
    got, bad = read_headers([os.path.join(root, f) for f in files], workers=16)
    changed = [f"{files[i]} ({bad[i]})" if i in bad else
               f"{files[i]} (now {got[i][1]}x{got[i][0]} px, labelled at {stored[i][1]}x{stored[i][0]})"
               for i in range(len(files)) if i in bad or (stored[i].any() and tuple(stored[i]) != got[i])]
    which = (f"{len(changed)} file(s) changed: {'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"
             if changed else "same names and pixel sizes, different byte sizes: some file was re-encoded or "
             "replaced by another image of the same size")
    raise labelstore.StoreMismatchError(
        f"{store.path}: the images under {root} differ from those the labels were made from ({which}). "
        "Restore the original files, or regenerate the store (fkd-dali generate) for the dataset as it is now")
