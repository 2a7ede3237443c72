"""Writing a label store (:class:`StoreWriting`, a part of :class:`labelstore.LabelStore`): blocks of whole
shards, data arrays first and ``done`` last, each chunk file replaced atomically by zarr's LocalStore (an
object store PUTs whole objects), so a crash never leaves a row marked done with missing data; every chunk is
written, also one equal to the fill value, so a missing shard file always means a lost one. Also the
metadata a writer updates (``complete``, ``skipped``, teachers) under a lock shared by the ranks of a host."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any

import numpy as np
import zarr

from .checks import check_block
from .errors import StoreWriteError
from .schema import ATTR_KEY, WRITE_CONFIG, StoreMeta


class StoreWriting:
    """The writing methods of :class:`labelstore.LabelStore` (which holds ``group``, ``meta``, ``layout``,
    ``mode``, ``path``, ``store``, ``local_dir``)."""

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

    def mark_skipped(self, rows_and_reasons: list[tuple[int, str]]) -> None:
        """Record rows left out on purpose, with the reason (e.g. the file and its decode error)."""
        self._require_writable()
        new = [[int(r), str(why)] for r, why in rows_and_reasons]

        def merge(attrs):
            have = {int(r) for r, _ in attrs.get("skipped", [])}
            attrs["skipped"] = list(attrs.get("skipped", [])) + [x for x in new if x[0] not in have]
        self._set_attr(_merge=merge)

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreWriteError(f"{self.path} was opened read-only; open it with mode='r+' to write")

    def write_block(self, start: int, *, boxes: np.ndarray, flips: np.ndarray, sizes: np.ndarray | None = None,
                    rows_done: np.ndarray | None = None, overwrite: bool = False, **labels: np.ndarray) -> None:
        """Write whole rows ``[start, start + len(boxes))``; the block must cover whole shards. ``labels``: the
        store kind's label arrays by name (``topk_idx``, ``topk_val`` for a top-k store), each (rows, C, ...),
        or (rows, ...) for an array with one value per row; ``sizes`` (rows, 2): the images' sizes, given by
        an image kind's writer only (a step kind's are written at creation).

        Data arrays are written first and ``done`` last. ``rows_done`` (bool per row, default all) says
        which rows hold real labels; the others stay not done (e.g. skipped corrupt images). Rows
        already done are refused unless ``overwrite`` (nothing is silently replaced).
        """
        self._require_writable()
        m = self.meta
        count = len(boxes) if sizes is None else len(sizes)
        stop = start + count
        R, N = self.layout.rows_per_shard, self.num_rows
        if start % R or (stop % R and stop != N) or count == 0 or stop > N:
            raise StoreWriteError(f"{self.path}: block [{start}, {stop}) is not made of whole shards of "
                                  f"{R} rows ({N} rows); writers must own whole shards")
        given = self.kind.written_arrays
        if set(labels) != set(given):
            raise StoreWriteError(f"{self.path} holds {self.kind.what} ({self.describe_kind()}): a block gives its "
                                  f"arrays {', '.join(given)}, got {', '.join(sorted(labels)) or 'none'}")
        if (sizes is None) == self.row_sizes:
            raise StoreWriteError(f"{self.path}: a block of {self.kind.what} " + (
                "gives the images' sizes" if self.row_sizes else "gives no sizes (they were written at creation)"))
        expect = {"boxes": (count, m.num_crops, 4), "flips": (count, m.num_crops)}
        expect |= {a.name: ((count,) if a.per_row else (count, m.num_crops)) + a.tail(self.fields)
                   for a in self.kind.arrays if not a.at_creation}
        data = {"boxes": np.asarray(boxes), "flips": np.asarray(flips)}
        if self.row_sizes:
            expect["sizes"] = (count, 2)
            data["sizes"] = np.asarray(sizes)
        data |= {name: np.asarray(v) for name, v in labels.items()}
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
        for a in self.kind.arrays:
            if a.at_creation:  # the kind's checks see every array of the rows
                data[a.name] = self._read(a.name, slice(start, stop))
        check_block(data, m.num_classes, first_row=start, files=self.file_name if self.row_sizes else None,
                    where=self.path, rows_mask=mask, kind=self.kind, fields=self.fields)
        for name in (("sizes",) if self.row_sizes else ()) + tuple(n for n in self.crop_arrays if n in expect):
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

    def clear_done(self, start: int, stop: int) -> None:
        """Mark rows ``[start, stop)`` as not done (their labels will be regenerated on resume); a range
        holding no row of the store is refused before anything changes."""
        self._require_writable()
        if not 0 <= start < stop <= self.num_rows:
            raise StoreWriteError(f"{self.path}: rows {start}:{stop} are not a range of its rows: A:B clears rows "
                                  f"A..B-1 and needs 0 <= A < B <= {self.num_rows} (the store has "
                                  f"{self.num_rows:,} rows); nothing was changed")
        done = self._read("done", slice(None))  # not done(): a complete store's lost done file is cleared here
        done[start:stop] = False
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
