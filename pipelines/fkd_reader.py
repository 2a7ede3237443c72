"""The FKD reader: :class:`FKDReader`, the external source that replays the stored crops of a pass's round with
their soft labels; the ROI form of a stored box and flip (:func:`roi_from_boxes`); and the dataset folder a
store's paths live in (:func:`resolve_root`) and its check against the store (:func:`check_files`).

Per batch, the reader slices this rank's rows of the pass's round, held in memory (read by
:class:`~pipelines.round_reads.RoundReads`); it never reads the store per sample.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import numpy as np
import nvidia.dali.types as types
from nvidia.dali.types import BatchInfo

import labelstore
from labelstore import LabelStore, PathTable, Round

from .errors import LoaderError, read_headers
from .image_reader import ImageReader
from .order import EpochPlan, unique_rows
from .round_reads import RoundReads
from .shards import ShardKeys, ShardSetError, is_shard_set, open_shard_set

# The batch of a pass whose request starts the read of the next pass's rows. The loaders' pipelines read two
# batches ahead, so DALI asks for batch 2 once batch 0 was taken: the read does not slow the pass's first batch.
READ_AHEAD_AT = 2
# Until a pass's rows are read, a batch is served from a read of its own rows and those of the next batches,
# this many in all (the pipelines ask for two or three batches at once when they start).
BRIDGE_BATCHES = 4
BRIDGE_MAX_SHARDS = 0.25  # ... while their rows fall in at most this fraction of the store's shards


def roi_from_boxes(boxes: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) ROI start/end in pixels for ``fn.resize``: the flip swaps the x ends (DESIGN.md)."""
    b = np.asarray(boxes, dtype=np.float32)
    f = np.asarray(flips, dtype=np.float32)
    t, l, h, w = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    start = np.stack([t, l + f * w], axis=-1)
    end = np.stack([t + h, l + w - f * w], axis=-1)
    return np.ascontiguousarray(start), np.ascontiguousarray(end)


class FKDReader(ImageReader):
    """The FKD reader: per image its encoded path, the ``num_crops`` ROI boxes (flip encoded) of the
    pass's round, its ``num_crops`` labels as the store kind serves them (top-k rows; or an embedding store's
    float32 embeddings, after the views' photometric parameters), its target, its store row, the crop ids and its
    stored size (what the graph checks the image's header against before a box is used, for the stored crops and
    the self-supervised views alike: :func:`graphs.fit_rois`).

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
    scan's classes, checked the same way (``check_dataset(targets=...)``); without them the store's are read.
    ``reads``: a :class:`RoundReads` of the same store and settings, started earlier (training starts the
    first pass's read before it scans the dataset); by default the reader starts its own.
    """

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
            files = dataset_files(root, s, verify_files)
        elif len(files) != s.num_images:
            raise LoaderError(f"{len(files)} files given for {s.path}, which labels {s.num_images} images")
        if targets is None:
            targets = s.targets_compact()
        elif len(targets) != s.num_images:
            raise LoaderError(f"{len(targets)} targets given for {s.path}, which labels {s.num_images} images")
        self.num_crops = num_crops
        self.num_rounds = s.num_rounds(num_crops)
        self.num_shards = len(s.shard_ranges())
        # what the store kind serves per crop: its view parameters (an embedding store's photometric ops) and labels
        self.view_params = s.kind.view_params
        probe = {a.name: np.zeros((0, num_crops) + a.tail(s.fields), s.array(a.name).dtype) for a in s.kind.arrays}
        served = s.kind.serve(probe)
        self.label_names = tuple(served)
        outputs = [(k, probe[k]) for k in self.view_params] + list(served.items())
        self.names = ("paths", "roi_start", "roi_end", *(k for k, _ in outputs), "target", "index", "crop_ids",
                      "sizes")
        self.dtypes = (types.UINT8, types.FLOAT, types.FLOAT, *(_dali_type(v.dtype) for _, v in outputs),
                       types.INT64, types.INT64, types.INT64, types.INT32)
        self.ndims = (1, 2, 2, *(v.ndim - 1 for _, v in outputs), 0, 0, 1, 1)
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
        views = [np.ascontiguousarray(rnd.labels[k][pos]) for k in self.view_params]
        labels = [np.ascontiguousarray(v) for v in self.store.kind.serve({k: v[pos] for k, v in rnd.labels.items()
                                                                          if k not in self.view_params}).values()]
        return (self.paths.encoded(rows), start, end, *views, *labels, self.targets[rows].astype(np.int64),
                rows.astype(np.int64), np.tile(crop_ids, (len(rows), 1)),
                np.ascontiguousarray(rnd.sizes[pos], dtype=np.int32))

    def close(self) -> None:
        super().close()
        self.reads.close()


def _dali_type(dtype) -> types.DALIDataType:
    return {"int8": types.INT8, "int16": types.INT16, "int32": types.INT32, "int64": types.INT64, "bool": types.BOOL,
            "float16": types.FLOAT16, "float32": types.FLOAT}[np.dtype(dtype).name]


def resolve_root(data: str, store: LabelStore) -> str:
    """The image folder the store's relative paths live in: DATA/<split> or DATA itself."""
    split = store.meta.dataset_root or "train"
    cand = os.path.join(data, split)
    if os.path.isdir(cand):
        return cand
    if os.path.isdir(data):
        return data
    raise LoaderError(f"{data} does not exist (expected the dataset root holding {split}/, or {split}/ itself)")


def dataset_files(root: str, store: LabelStore, verify: bool = True) -> PathTable:
    """The store's images under ``root``: a shard set's keys (its index checked against the store: names, classes,
    fingerprint, and the bytes' CRC-32 where the store recorded them), or the store's relative paths, with
    ``verify`` each file's size checked against the store's fingerprint."""
    if is_shard_set(root):
        try:
            shards = open_shard_set(root)
        except ShardSetError as e:
            raise LoaderError(str(e)) from None
        store.check_dataset(files=shards.keys, classes=shards.classes, fingerprint=shards.fingerprint,
                            targets=shards.labels, data_dir=root, checksums=shards.checksums())
        return shards.keys
    files = store.file_table()
    if verify:
        check_files(root, store, files)
    return files


def check_files(root: str, store: LabelStore, files: Sequence[str] | PathTable | None = None) -> None:
    """Every stored file exists with the size it had when the labels were made (the fingerprint; one stat
    per file). On a mismatch, the files whose header no longer gives the stored image size are named."""
    files = store.file_table() if files is None else files
    fp = labelstore.fingerprint_of(files, labelstore.file_sizes(root, files))  # names the first missing file
    if fp == store.meta.fingerprint:
        return
    changed = changed_images(root, files, np.arange(len(files)), store.sizes())
    raise _images_changed(root, store, changed or "same names and pixel sizes, different byte sizes: some file was "
                          "re-encoded or replaced by another image of the same size")


def refuse_resized(root: str, store: LabelStore, files: Sequence[str] | PathTable, rows: Sequence[int],
                   stored: np.ndarray) -> None:
    """Raise StoreMismatchError naming the images of ``rows`` whose header the graph found to differ from their
    stored (height, width) ``stored`` (:func:`graphs.fit_rois`): replaced after the labels were made by an image
    of other pixel sizes (a file of the same byte size passes the fingerprint), or a crafted store."""
    changed = changed_images(root, files, rows, stored) or [
        f"{files[int(r)]} (its header does not give the {w}x{h} px it was labelled at)"
        for r, (h, w) in zip(rows, np.asarray(stored).tolist())]
    raise _images_changed(root, store, changed)


def changed_images(root: str, files: Sequence[str] | PathTable, rows: Sequence[int], stored: np.ndarray) -> list[str]:
    """``NAME (now WxH px, labelled at WxH)`` (or why it cannot be used) for each of ``rows`` whose header (read
    now) no longer gives its stored (height, width) ``stored[i]``."""
    names = [files[int(r)] for r in rows]
    if isinstance(files, ShardKeys):  # a shard set's samples: their bytes (CRC-checked), not paths
        sources = [io.BytesIO(files.shards.read(int(r))) for r in rows]
    else:
        sources = [os.path.join(root, f) for f in names]
    got, bad = read_headers(sources, workers=16)
    return [f"{names[i]} ({bad[i]})" if i in bad else
            f"{names[i]} (now {got[i][1]}x{got[i][0]} px, labelled at {stored[i][1]}x{stored[i][0]})"
            for i in range(len(names)) if i in bad or (stored[i].any() and tuple(stored[i]) != got[i])]


def _images_changed(root: str, store: LabelStore, changed: list[str] | str) -> labelstore.StoreMismatchError:
    which = changed if isinstance(changed, str) else \
        f"{len(changed)} file(s) changed: {'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"
    return labelstore.StoreMismatchError(
        f"{store.path}: the images under {root} differ from those the labels were made from ({which}). "
        "Restore the original files, or regenerate the store (fkd-dali generate) for the dataset as it is now")
