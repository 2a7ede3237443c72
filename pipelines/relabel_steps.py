"""Which stored steps a training epoch replays (:func:`epoch_rows`), and those steps read from the relabel store a
few ahead by a background thread (:class:`StepWindow`): a rank holds a bounded window of steps, not an epoch.

**An unpruned store**: training epoch ``e`` replays stored epoch ``e``'s steps in their stored order.

**A pruned store** (LPLD, he-y/soft-label-pruning-for-dataset-distillation @HEAD
``relabel_and_validate/train_FKD_label_pruning_batch.py``, its reproduce scripts' ``--prune_metric random
--granularity batch_to_epoch``): the kept steps are the *pool* (LPLD keeps the plan's first
``int((1 - ratio) * epochs * steps_per_epoch)`` steps; here any kept set: the store's ``step_index``); EVERY training
epoch (up to the plan's epochs) is ``steps_per_epoch`` steps drawn uniformly, with replacement, from the pool
(``torch.randint(0, len(pool))`` per step there) and trained in the order drawn, each step with its own stored crops,
mixing and labels. A drawn step that is the last of its stored epoch is replaced by the step before it (LPLD's "drop
last batch": ``if (batch_idx + 1) % batch_num_per_epoch == 0: step_list[i] = batch_idx - 1``), so that step has
twice the chance and an epoch's last step is never trained (a short last step, drop_last False, never meets a full
one). Where the step before was pruned (a store LPLD would not make) the drawn step is kept, unless it is shorter
than the stored step size: such a step leaves the pool, so every epoch trains the same number of full steps.
The draws come from a generator seeded by (``seed``, epoch), not from the global RNG, so every rank draws the same
steps and a resume replays the same epoch.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np

from .errors import LoaderError
from .relabel import StepData

#: Steps a window reads ahead of the one being trained (each a few MiB at ImageNet scale: B x K labels).
AHEAD = 4


def lpld_pool(store) -> np.ndarray:
    """The rows a pruned store's training epochs draw from, each replaced as LPLD replaces it (see the module):
    one entry per kept row, in row order."""
    index = store.step_index
    per = store.steps_per_epoch
    rows = np.arange(store.num_steps)
    order = index[:, 0].astype(np.int64) * per + index[:, 1]
    mapped = rows.copy()
    if per > 1:
        last = index[:, 1] == per - 1
        before = np.searchsorted(order, order - 1)
        has_before = (before < len(order)) & (order[np.minimum(before, len(order) - 1)] == order - 1)
        mapped = np.where(last & has_before, before, rows)
    sizes = store.step_sizes
    full = sizes[mapped] == store.batch_size if (sizes == store.batch_size).any() else np.ones(len(rows), bool)
    return mapped[full]


def is_pruned(store) -> bool:
    return store.num_steps < store.epochs * store.steps_per_epoch


def epoch_rows(store, epoch: int, seed: int, pool: np.ndarray | None = None) -> np.ndarray:
    """The store rows training epoch ``epoch`` replays, in order (module doc): the stored epoch's own rows, or, for a
    pruned store, ``steps_per_epoch`` draws from :func:`lpld_pool` (``pool``, if computed already)."""
    if not is_pruned(store):
        a, b = store.rows_of_epoch(epoch)
        return np.arange(a, b, dtype=np.int64)
    pool = lpld_pool(store) if pool is None else pool
    if len(pool) == 0:
        raise LoaderError(f"{store.path}: no kept step of the stored step size to train on")
    rng = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch), 0x4C504C44]))
    return pool[rng.integers(0, len(pool), store.steps_per_epoch)].astype(np.int64)


class StepWindow:
    """A relabel store (``labelstore.relabel.RelabelStore``) as the reader's step source: ``sizes(epoch)`` of the
    steps training epoch ``epoch`` replays (:func:`epoch_rows`), ``step(epoch, t)`` its ``t``-th step. Steps are
    read by one background thread, ``ahead`` past the one asked for; a rank holds at most ``ahead + 1`` steps (their
    boxes, plan and labels), whatever the epoch's size. ``labels=False``: only the plan."""

    def __init__(self, store, *, seed: int = 0, ahead: int = AHEAD, labels: bool = True):
        self.store, self.seed, self.ahead = store, int(seed), max(1, int(ahead))
        arr = store.store
        self.label_specs = {n: (arr.array(n).dtype, tuple(arr.array(n).shape[2:])) for n in store.label_arrays} \
            if labels else {}
        self._names = ("images", "boxes", "flips", "mix_partner", "mix_lam", "mix_box", "step_size",
                       *self.label_specs)
        self._pool = lpld_pool(store) if is_pruned(store) else None
        self._rows: tuple[int, np.ndarray] | None = None
        self._done: np.ndarray | None = None
        self._pending: dict[int, concurrent.futures.Future] = {}  # t -> the step's read
        self._epoch: int | None = None
        self._pool_exec: concurrent.futures.ThreadPoolExecutor | None = None  # started on the first read

    def rows(self, epoch: int) -> np.ndarray:
        if self._rows is None or self._rows[0] != epoch:
            if not is_pruned(self.store):
                a, b = self.store.rows_of_epoch(epoch)
                if a == b:
                    raise LoaderError(f"{self.store.path}: epoch {epoch} has no kept step; train fewer epochs")
            self._rows = (epoch, epoch_rows(self.store, epoch, self.seed, self._pool))
        return self._rows[1]

    def sizes(self, epoch: int) -> np.ndarray:
        return np.asarray(self.store.step_sizes[self.rows(epoch)], dtype=np.int64)

    def _read(self, row: int) -> StepData:
        if self._done is None:
            self._done = self.store.done()
        blk = self.store.read_steps(row, row + 1, done=self._done)
        n = int(blk.step_size[0])
        return StepData(rows=blk.images[0, :n].astype(np.int64), coords=blk.boxes[0, :n], flips=blk.flips[0, :n],
                        partner=blk.mix_partner[0, :n].astype(np.int64), lam=float(blk.mix_lam[0]),
                        box=np.asarray(blk.mix_box[0]), labels={k: blk.arrays[k][0, :n] for k in self.label_specs})

    def step(self, epoch: int, t: int) -> StepData:
        rows = self.rows(epoch)
        if self._epoch != epoch:
            self._drop(lambda k: True)
            self._epoch = epoch
        self._drop(lambda k: k < t)  # passed (or a resume jumped past them)
        if self._pool_exec is None:
            self._pool_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fkd-relabel-steps")
        for k in range(t, min(len(rows), t + self.ahead + 1)):
            if k not in self._pending:
                self._pending[k] = self._pool_exec.submit(self._read, int(rows[k]))
        return self._pending[t].result()

    def held_bytes(self) -> int:
        """Bytes of the steps read and held now (boxes, plan and labels)."""
        out = 0
        for f in self._pending.values():
            if f.done() and f.exception() is None:
                d = f.result()
                out += sum(a.nbytes for a in (d.rows, d.coords, d.flips, d.partner, d.box, *d.labels.values()))
        return out

    def _drop(self, which) -> None:
        for k in [k for k in self._pending if which(k)]:
            self._pending.pop(k).cancel()

    def close(self) -> None:
        """Drop the steps held and stop the thread (a later ``step`` starts again)."""
        self._drop(lambda k: True)
        if self._pool_exec is not None:
            self._pool_exec.shutdown(wait=False, cancel_futures=True)
            self._pool_exec = None
