"""The external source of the generator: :class:`GenerationReader` serves one job (a shard of rows) at a time, each
row's crops cut into groups, one decode of the image per group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import nvidia.dali.types as types
from nvidia.dali.types import BatchInfo

from labelstore import PathTable

from .fkd_reader import roi_from_boxes
from .image_reader import image_source, source_nodes


class GenerationReader:
    """External source of the generator: one job (a shard of rows) at a time, each row cut into groups of
    ``group_size`` crops; one sample = one decode of the row's image + one group of crops.

    A short last group is padded with copies of its first crop, whose crop id is -1 (discard them).
    Batches never span jobs, so a shard's teacher batches are the same whether it is generated in one
    run, after a resume, or by another rank.
    """

    names = ("paths", "roi_start", "roi_end", "index", "crop_ids", "sizes")
    dtypes = (types.UINT8, types.FLOAT, types.FLOAT, types.INT64, types.INT64, types.INT32)
    ndims = (1, 2, 2, 0, 1, 1)

    def __init__(self, root: str, files: Sequence[str] | PathTable, group_size: int, batch_size: int,
                 view_params: Sequence[str] = ()):
        if group_size < 1 or batch_size < 1:
            raise ValueError("group_size and batch_size must be >= 1")
        # per crop view parameters served beside the boxes (an embedding store's photometric ops: graphs.VIEW_PARAMS)
        self.view_params = tuple(view_params)
        if self.view_params:
            kinds = {"jitter_factors": (types.FLOAT, 2), "jitter_order": (types.INT8, 2), "grayscale": (types.BOOL, 1),
                     "blur_sigma": (types.FLOAT, 1)}
            self.names = GenerationReader.names + self.view_params
            self.dtypes = GenerationReader.dtypes + tuple(kinds[k][0] for k in self.view_params)
            self.ndims = GenerationReader.ndims + tuple(kinds[k][1] for k in self.view_params)
        self._views: list[np.ndarray] = []
        self.root = root
        self.paths = image_source(root, files)
        self.serves_bytes = self.paths.serves_bytes
        self.group_size, self.batch_size = group_size, batch_size
        self._selected: tuple[int, ...] | None = None
        self._rows = self._start = self._end = self._ids = self._sizes = None
        self.num_batches = 0

    def start_job(self, rows: np.ndarray, boxes: np.ndarray, flips: np.ndarray, sizes: np.ndarray,
                  views: dict[str, np.ndarray] | None = None) -> int:
        """Serve rows (m,) with their boxes (m, C, 4) and flips (m, C), made for images of ``sizes`` (m, 2)
        (height, width; the graph checks each image's header against it before a box is used, for the stored
        crops and the self-supervised views alike: :func:`graphs.fit_rois`), and ``views``: the reader's view
        parameters, (m, C, ...) each; returns the number of batches."""
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
        else:
            first = np.zeros(0, np.int64)
        self._views = []
        for k in self.view_params:
            v = np.asarray(views[k])
            v = np.concatenate([v, v[:, first]], axis=1)
            self._views.append(np.ascontiguousarray(v.reshape((m * groups, G) + v.shape[2:])))
        self._start = np.ascontiguousarray(start.reshape(m * groups, G, 2))
        self._end = np.ascontiguousarray(end.reshape(m * groups, G, 2))
        self._rows = np.repeat(rows, groups)
        self._sizes = np.repeat(np.asarray(sizes, dtype=np.int32).reshape(m, 2), groups, axis=0)
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
        return (self.paths.encoded(rows), self._start[items], self._end[items], rows, self._ids[items],
                self._sizes[items], *(v[items] for v in self._views))

    def __call__(self, info: BatchInfo):
        out = self.batch(self.batch_items(info.iteration))
        return out if self._selected is None else tuple(out[i] for i in self._selected)

    def nodes(self, names: Sequence[str] | None = None) -> dict:
        return source_nodes(self, names)
