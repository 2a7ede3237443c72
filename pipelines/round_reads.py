"""This rank's rows of each pass's round of the label store, read in bulk by a background thread ahead of the
pass that serves them (:class:`RoundReads`, what :class:`~pipelines.fkd_reader.FKDReader` serves from)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading

import numpy as np

from labelstore import LabelStore, Round

from .errors import LoaderError
from .order import pass_rows, round_for_pass, unique_rows


class RoundReads:
    """This rank's rows of each pass's round, read from the store by one background thread, a pass at a time.

    What a rank serves in pass ``p`` depends only on the store (its done rows and crop pool), the seed, the
    rank, the world size and ``num_crops``, not on the dataset scan: so training starts the first pass's read
    as soon as the store is open, before it scans the dataset, and hands this object to the loader. Nothing
    read here is served until an :class:`FKDReader` adopts it, and training makes that reader only after the
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
