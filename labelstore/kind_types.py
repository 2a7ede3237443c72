"""The classes a store kind is made of (:mod:`labelstore.kinds` lists the kinds)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelArray:
    """One per-crop label array of a kind: ``(N, C) + tail(fields)``, stored as ``dtype(fields)`` (one of
    ``dtypes``); ``fill`` is an impossible value, so a chunk missing on disk reads as something refused."""

    name: str
    dtypes: tuple[str, ...]
    fill: Any
    tail: Callable[[dict], tuple] = lambda f: ()
    dtype: Callable[[dict], np.dtype] | None = None
    per_row: bool = False  # one value per row, ``(rows,) + tail`` (a step's Mixup lambda), not one per crop
    at_creation: bool = False  # written by ``create_store`` (``row_data``), never by ``write_block``

    def dtype_for(self, fields: dict) -> np.dtype:
        return self.dtype(fields) if self.dtype else np.dtype(self.dtypes[0])


@dataclasses.dataclass(frozen=True)
class StoreKind:
    """A store kind: its label arrays, what its labels are (for people), the ``--labels`` objective that
    trains from it, its metadata fields and its value checks."""

    name: str
    what: str  # "top-k soft labels"
    objective: str  # the --labels value that trains from it
    arrays: tuple[LabelArray, ...]
    read_fields: Callable[[dict, str], dict]  # its metadata fields, checked (``where`` names the store)
    describe: Callable[[dict], str]  # "kind embedding, D=128"
    checks: Callable[[dict, dict], list]  # (data, fields) -> [(bad mask (rows, ...), what), ...]
    serve: Callable[[dict], dict]  # a batch's label arrays -> what a loader serves (e.g. embeddings as float32)
    view_params: tuple[str, ...] = ()  # the arrays a replay of the view needs beside box and flip
    meta_lines: tuple[str, ...] = ()  # the store metadata that means something for this kind ("temperature")
    exportable: bool = False  # ``export-fkd`` writes FKD's label files from it
    # What a row of its per-crop arrays is: "image" (N images x C crops, boxes in pixels of the image, the core's
    # ``sizes`` and ``done`` per image) or "step" (``fields["num_steps"]`` stored training steps x C = the batch
    # size positions; ``sizes`` per image, written at creation, ``done`` per step; the kind's ``views`` say the
    # boxes' and flips' dtypes and its checks check them)
    rows: str = "image"
    views: tuple[LabelArray, ...] = ()  # a "step" kind's boxes and flips (an "image" kind's are the core's)
    lines: Callable[[dict], list] = lambda f: []  # more "name  value" lines for ``inspect``
    arrays_for: Callable[[dict], tuple] | None = None  # its arrays, where they depend on its fields

    def bound(self, fields: dict) -> "StoreKind":
        """The kind with the arrays of a store with these fields (a relabel store's full or top-k labels)."""
        return self if self.arrays_for is None else dataclasses.replace(self, arrays=self.arrays_for(fields),
                                                                        arrays_for=None)

    @property
    def written_arrays(self) -> tuple[str, ...]:
        """The label arrays a block write gives (not those written at creation)."""
        return tuple(a.name for a in self.arrays if not a.at_creation)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)


def class_dtype(fields: dict) -> np.dtype:
    """Class ids: int16 while they fit, else int32."""
    return np.dtype(np.int16) if fields["num_classes"] <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)
