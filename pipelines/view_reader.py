"""The external source of views drawn anew every pass (:class:`FreshViewReader`): self-supervised pretraining
(``--labels moco``) and the online baseline of FKD-SSL (``--labels ssl-online``) see new views each pass, as MoCo
and S2-BNN do, through the same replay graph as the stored views (``graphs.ssl_crops``).

The views' parameters are drawn by a function the caller gives (``draw(pass, rows, sizes)``; fkd_dali's
``views.fresh_views``), per batch: the reader reads the batch's image headers for their sizes (the crops'
RandomResizedCrop needs them), so nothing is read up front and each rank reads only the images it serves.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import numpy as np
import nvidia.dali.types as types

from labelstore import PathTable

from .errors import image_header, refuse_unusable
from .fkd_reader import roi_from_boxes
from .graphs import VIEW_PARAMS
from .image_reader import ImageReader

#: draw(pass_index, rows (m,), sizes (m, 2) height/width) -> boxes (m, C, 4), flips (m, C) and VIEW_PARAMS' arrays
Draw = Callable[[int, np.ndarray, np.ndarray], dict]


class FreshViewReader(ImageReader):
    """Per image its encoded path, the ROIs of its ``num_crops`` views of this pass and their photometric
    parameters (the outputs of an embedding store's :class:`~pipelines.fkd_reader.FKDReader`, without labels),
    its target, row, view ids and header size. A batch is a function of (seed, pass, rank) and the images."""

    view_params = VIEW_PARAMS
    label_names: tuple[str, ...] = ()
    names = ("paths", "roi_start", "roi_end", *VIEW_PARAMS, "target", "index", "crop_ids", "sizes")
    dtypes = (types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT8, types.BOOL, types.FLOAT, types.INT64,
              types.INT64, types.INT64, types.INT32)
    ndims = (1, 2, 2, 2, 2, 1, 1, 0, 0, 1, 1)

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], *, draw: Draw,
                 num_crops: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False, header_workers: int = 8):
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        super().__init__(root, files, targets, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         shuffle=shuffle, drop_last=drop_last)
        self.draw, self.num_crops = draw, num_crops
        self._pool = concurrent.futures.ThreadPoolExecutor(header_workers, thread_name_prefix="fkd-view-headers")

    def sizes_of(self, rows: np.ndarray) -> np.ndarray:
        """(m, 2) int32 height and width from the images' headers; an unusable file stops the batch, named."""
        paths = [self.paths.path_of(r) for r in rows]
        found = list(self._pool.map(image_header, paths))
        refuse_unusable(paths, {i: why for i, (_, why) in enumerate(found) if why},
                        "Replace or remove them (a file left out of an ImageFolder tree simply drops out of the "
                        "dataset)")
        return np.array([hw for hw, _ in found], dtype=np.int32).reshape(len(rows), 2)

    def batch(self, rows: np.ndarray) -> tuple:
        sizes = self.sizes_of(rows)
        v = self.draw(self.current.epoch, rows, sizes)
        start, end = roi_from_boxes(v["boxes"], v["flips"])
        crop_ids = np.tile(np.arange(self.num_crops, dtype=np.int64), (len(rows), 1))
        return (self.paths.encoded(rows), start, end, *(np.ascontiguousarray(v[k]) for k in VIEW_PARAMS),
                self.targets[rows].astype(np.int64), rows.astype(np.int64), crop_ids, sizes)

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)
