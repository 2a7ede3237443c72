"""Checking a whole label store (:class:`StoreVerification`, a part of :class:`labelstore.LabelStore`):
``verify`` decodes every chunk and checks every done row's labels, in parallel over shards; ``check_dataset``
compares the store with the dataset it is used with (classes, files, fingerprint, targets) and names the
first difference."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence

import numpy as np

from .checks import check_block
from .errors import StoreMismatchError

VERIFY_BATCH = 8  # shards per verify task (progress granularity)




class StoreVerification:
    """The whole-store checks of :class:`labelstore.LabelStore`."""

    def verify(self, *, sample: int | None = None, workers: int | None = None, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Decode every chunk (of ``sample`` random shards, if given) and check every done row's labels, in
        ``workers`` processes (default: the cores); raises StoreCorruptError on damage. ``progress(k)`` is
        called as shards finish."""
        if sample is not None and sample < 1:
            raise ValueError(f"{self.path}: a sample of {sample} shards checks nothing; verify at least 1 shard")
        done = self.done()
        self.targets_compact()  # every row's class
        ranges = self.shard_ranges()
        with_done = [i for i, (a, b) in enumerate(ranges) if done[a:b].any()]
        self._check_chunk_files(self.crop_arrays, with_done)
        chosen = list(range(len(ranges)))
        if sample is not None and sample < len(chosen):
            picked = np.random.default_rng(seed).choice(len(chosen), size=max(0, sample), replace=False)
            chosen = sorted(picked.tolist())
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
                                                        initargs=(type(self), self.location)) as pool:
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

    def check_dataset(self, *, files: Sequence[str], classes: Sequence[str], fingerprint: str,
                      targets: Sequence[int] | None = None, data_dir: str = "the dataset",
                      checksums: np.ndarray | None = None) -> None:
        """Raise StoreMismatchError naming the first difference (count, classes, files, fingerprint, and the
        images' CRC-32 when both the store and the dataset's index record them: same name and size, other bytes).

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
        stored_crc = self.checksums() if checksums is not None else None
        if stored_crc is not None:
            bad = np.flatnonzero(np.asarray(checksums, np.uint32) != stored_crc)
            if bad.size:
                names = ", ".join(self.file_name(int(i)) for i in bad[:5]) + (" ..." if bad.size > 5 else "")
                raise StoreMismatchError(
                    f"{self.path}: {bad.size} image(s) of {data_dir} hold other bytes than those the labels were "
                    f"made from (CRC-32 differs): {names}. Restore the original images, or regenerate the store")
        if fingerprint != m.fingerprint:
            raise StoreMismatchError(
                f"{self.path}: the same {m.num_images} file names, but their sizes differ from when the "
                f"store was made (fingerprint {m.fingerprint[:19]}... vs {fingerprint[:19]}...): some image "
                "was replaced or modified. Restore the original files, or regenerate the store")



def _verify_shards(store, shards: Sequence[int]) -> None:
    """Decode shards and check their done rows (one worker's share of ``verify``)."""
    ranges = store.shard_ranges()
    for i in shards:
        a, b = ranges[i]
        block = {}
        for name in ("sizes", "done") + store.crop_arrays:
            try:
                block[name] = store._reader(name)[a:b]
            except Exception as e:  # noqa: BLE001 - any decode failure names the chunk
                raise store._corrupt_chunk(name, i, e) from e
        check_block(block, store.num_classes, first_row=a, files=store.file_name, where=store.path,
                    rows_mask=block.pop("done"), kind=store.kind, fields=store.fields)


_WORKER_STORE = None  # the store a verify worker process opened once


def _open_in_worker(store_class: type, where: str) -> None:
    global _WORKER_STORE
    _WORKER_STORE = store_class(where)


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
